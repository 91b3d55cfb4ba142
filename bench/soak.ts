/**
 * `npm run bench:soak`: 1,000 executions through `wrangler dev` on localhost
 * (orchestrator + demo KAM + demo granulator), with a seeded share of faulty
 * stages and some cancellations, then a report: how many completed, failed
 * with which codes, were cancelled, and that none is still running and no
 * capacity leaked (every ledger pool back to zero in use, no lease, no waiter).
 *
 *   npm run bench:soak -- [--n 1000] [--inflight 50] [--fault-share 0.3] [--seed 7]
 *   npm run bench:soak -- --crash [--kills 5] [--n 1000] [--inflight 4] [--steps 10] [--step-ms 1000]
 *
 * `--crash`: the same plan (no cancellations) on a persisted state directory,
 * in `--kills` rounds; in each, the whole runtime is killed with SIGKILL once
 * enough executions have a stage on the worker (each stage of a fault-free
 * execution works `--steps` x `--step-ms`, so they are there long enough to
 * be caught), started again on
 * the same state, and the requests the kill kept from being sent are sent
 * (bench/lib/crash.ts). It fails (exit 1) on any execution lost or still
 * running 180 s after its round's last POST, a repeated request_id answering
 * another execution, a ledger left holding or queueing anything, or a kill
 * that came before enough stages were on the worker.
 *
 * Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
 */
import os from "node:os";
import { mkdtempSync, rmSync } from "node:fs";
import path from "node:path";
import { CrashSystem, crashRound } from "./lib/crash";
import { demoSecrets, flagArgs, runMain, startDemoSession } from "./lib/demo-session";
import { snapshotTree } from "./lib/e2e-session";
import { mulberry32 } from "./lib/mulberry32";

const args = flagArgs();
const N = Number(args.get("n") ?? 1000);
const INFLIGHT = Number(args.get("inflight") ?? 50);
const FAULT_SHARE = Number(args.get("fault-share") ?? 0.3);
const CANCEL_SHARE = Number(args.get("cancel-share") ?? 0.03);
const SEED = Number(args.get("seed") ?? 7);
const DEADLINE_MS = Number(args.get("deadline-ms") ?? 15 * 60_000);

const SECRETS = demoSecrets("soak");
const KAM = { authorization: `Bearer ${SECRETS.KAM_TOKEN}`, "content-type": "application/json" };
const OPS = { authorization: `Bearer ${SECRETS.OPS_TOKEN}` };

/** Each fault and the outcome docs/reliability.md promises for it. */
const FAULTS: { mode: string; template: string; expect: { status: string; code?: string } }[] = [
  { mode: "refuse", template: "soak_single", expect: { status: "failed", code: "handshake_refused" } },
  { mode: "refuse_retryable", template: "soak_single", expect: { status: "completed" } },
  { mode: "process_500_once", template: "soak_single", expect: { status: "completed" } },
  { mode: "crash", template: "soak_single", expect: { status: "failed", code: "worker_http_500" } },
  { mode: "hang", template: "soak_single", expect: { status: "failed", code: "stage_timeout" } },
  { mode: "malformed", template: "soak_single", expect: { status: "failed", code: "worker_protocol_error" } },
  { mode: "double_callback", template: "soak_two_stage", expect: { status: "completed" } },
  { mode: "wrong_token", template: "soak_two_stage", expect: { status: "completed" } },
  { mode: "progress_backwards", template: "soak_single", expect: { status: "completed" } },
  { mode: "fail", template: "soak_two_stage", expect: { status: "failed", code: "granulation_failed" } },
  { mode: "fail_retryable_once", template: "soak_two_stage", expect: { status: "completed" } },
];

interface Plan {
  body: Record<string, unknown>;
  fault: string | null;
  expect: { status: string; code?: string } | null;
  cancel: boolean;
}

function plan(rand: () => number): Plan[] {
  return Array.from({ length: N }, (_, i) => {
    const cancel = rand() < CANCEL_SHARE;
    if (rand() < FAULT_SHARE) {
      const f = FAULTS[Math.floor(rand() * FAULTS.length)];
      return {
        body: { template_name: f.template, parameters: { steps: 2, step_ms: 5, echo: { i }, fault: { mode: f.mode } }, client_id: `soak_${i % 17}` },
        fault: f.mode,
        expect: cancel ? null : f.expect,
        cancel,
      };
    }
    return {
      body: { template_name: "course_creation", parameters: { steps: 2, step_ms: 5, topic: `t${i}` }, client_id: `soak_${i % 17}`, priority: rand() < 0.2 ? "high" : "normal" },
      fault: null,
      expect: cancel ? null : { status: "completed" },
      cancel,
    };
  });
}

async function json(res: Response): Promise<any> {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON (${res.status}): ${text.slice(0, 200)}`);
  }
}

const POOLS = JSON.stringify([
  { name: "worker:bitware-content-granulator", kind: "concurrency", capacity: 64 },
  { name: "tokens:openai", kind: "rate", capacity: 2_000_000, refill_per_second: 33_333 },
  { name: "tokens:anthropic", kind: "rate", capacity: 1_000_000, refill_per_second: 16_666 },
  { name: "storage:r2", kind: "budget", capacity: 1e11 },
  { name: "compute_ms", kind: "budget", capacity: 1e12 },
]);
const TUNING = JSON.stringify({ pollInitialMs: 100, pollMaxMs: 500, retryBaseMs: 50, retryCapMs: 300, maxPollFailures: 3, outboxRetryMs: 200 });

/** `--crash`: the plan in rounds, each with a hard kill of the whole runtime while stages are on workers. */
async function crashMain() {
  const started = Date.now();
  const kills = Number(args.get("kills") ?? 5);
  // Slow stages: a kill must find them on the worker (with the soak's 5 ms steps they end before it comes).
  // Only the fault-free executions are slowed: the faulty ones keep the shape their expected outcomes assume
  // (their templates' 5 s stage deadline).
  const steps = Number(args.get("steps") ?? 10);
  const stepMs = Number(args.get("step-ms") ?? 1000);
  const loadAtStart = os.loadavg();
  // Few POSTs at a time: on `wrangler dev` concurrent starts contend (50 at once each took over 30 s).
  const inflight = Number(args.get("inflight") ?? 4);
  const dir = mkdtempSync(path.join(os.tmpdir(), "orch-soak-crash-"));
  const system = new CrashSystem({ secrets: SECRETS, vars: { LOG_LEVEL: "error", POOLS, TUNING }, cwd: snapshotTree(dir, "worktree") });
  const plans = plan(mulberry32(SEED)).map((p, i) => ({
    ...p,
    body: { ...p.body, ...(p.fault ? {} : { parameters: { ...(p.body.parameters as object), steps, step_ms: stepMs } }), request_id: `soak-crash-${SEED}-${i}` },
  }));
  const expected = new Map(plans.map((p) => [p.body.request_id as string, p]));
  const per = Math.ceil(plans.length / kills);
  const rounds: unknown[] = [];
  const byStatus: Record<string, number> = {};
  let total = 0;
  let stuck = 0;
  let lost = 0;
  let repeats = 0;
  let unclean = 0;
  let belowTarget = 0;
  let startFailures = 0;
  let mismatches = 0;
  const mismatchSamples: unknown[] = [];
  try {
    await system.start();
    for (let r = 0; r < kills; r++) {
      const chunk = plans.slice(r * per, (r + 1) * per);
      if (!chunk.length) break;
      const { report, outcomes } = await crashRound(system, {
        round: r,
        n: chunk.length,
        bodies: chunk.map((p) => p.body),
        concurrency: inflight,
        killWhenOnWorkers: Math.min(8, Math.ceil(chunk.length / 4)),
        endDeadlineMs: 180_000,
        ledgerDeadlineMs: 60_000,
      });
      const { ledger: _ledger, ...summary } = report;
      rounds.push(summary);
      console.log("round %d: %s", r, JSON.stringify(summary));
      total += outcomes.length;
      stuck += report.stuck.length;
      lost += report.lost;
      repeats += report.repeat_mismatches;
      if (!report.ledger_clean) unclean++;
      if (report.killed_below_target) belowTarget++;
      startFailures += report.start_failures;
      for (const o of outcomes) {
        const label = o.code ? `${o.status}:${o.code}` : o.status;
        byStatus[label] = (byStatus[label] ?? 0) + 1;
        const e = expected.get(o.requestId)?.expect;
        if (e && (o.status !== e.status || (e.code && o.code !== e.code))) {
          mismatches++;
          if (mismatchSamples.length < 10) mismatchSamples.push({ id: o.executionId, fault: expected.get(o.requestId)?.fault, expected: e, got: { status: o.status, code: o.code } });
        }
      }
    }
  } finally {
    await system.dispose();
    rmSync(dir, { recursive: true, force: true });
  }
  const report = {
    bench: "soak-crash",
    planned: plans.length,
    executions: total,
    kills,
    seed: SEED,
    inflight,
    fault_share: FAULT_SHARE,
    by_status: byStatus,
    still_running: stuck,
    lost,
    repeat_mismatches: repeats,
    rounds_with_ledger_left_held: unclean,
    rounds_killed_below_target: belowTarget,
    start_failures: startFailures,
    stage_shape: { steps, step_ms: stepMs },
    outcome_mismatches: mismatches,
    mismatch_samples: mismatchSamples,
    rounds,
    seconds: Math.round((Date.now() - started) / 100) / 10,
    started_at: new Date(started).toISOString(),
    load_avg_at_start: loadAtStart.map((l) => Math.round(l * 100) / 100),
    load_avg_at_end: os.loadavg().map((l) => Math.round(l * 100) / 100),
    cores: os.cpus().length,
    node: process.version,
  };
  console.log(JSON.stringify(report));
  if (stuck || lost || repeats || unclean || belowTarget || startFailures || total !== plans.length) process.exitCode = 1;
}

async function main() {
  if (args.has("crash")) return crashMain();
  const started = Date.now();
  const session = await startDemoSession({
    secrets: SECRETS,
    vars: {
      LOG_LEVEL: "error",
      // Hung and crashed stages hold a worker slot until their deadline: give the worker room.
      POOLS,
      TUNING,
    },
  });
  const plans = plan(mulberry32(SEED));
  const outcomes: { plan: Plan; id: string | null; status: string; code: string | null; stages?: unknown }[] = [];
  let next = 0;
  try {
    const worker = async () => {
      while (next < plans.length && Date.now() - started < DEADLINE_MS) {
        const p = plans[next++];
        const res = await fetch(`${session.url}/execute`, { method: "POST", headers: KAM, body: JSON.stringify(p.body) });
        const body = await json(res);
        if (res.status !== 202) {
          outcomes.push({ plan: p, id: null, status: "start_failed", code: body?.error?.code ?? String(res.status) });
          continue;
        }
        const id = body.execution_id as string;
        let cancelled = false;
        for (let polls = 0; ; polls++) {
          if (p.cancel && !cancelled && polls === 2) {
            await fetch(`${session.url}/executions/${id}/cancel`, { method: "POST", headers: KAM });
            cancelled = true;
          }
          const doc = await json(await fetch(`${session.url}/executions/${id}`, { headers: KAM }));
          if (["completed", "failed", "cancelled"].includes(doc.status)) {
            outcomes.push({ plan: p, id, status: doc.status, code: doc.error?.code ?? null, stages: doc.stages.map((s: any) => ({ id: s.stage_id, status: s.status, attempts: s.attempts, waiting_ms: s.waiting_ms, processing_ms: s.processing_ms, last_error: s.last_error?.code })) });
            break;
          }
          if (Date.now() - started > DEADLINE_MS) {
            outcomes.push({ plan: p, id, status: doc.status, code: "still_running_at_deadline" });
            break;
          }
          // A modest status rate, so the observer does not become the load.
          await new Promise((r) => setTimeout(r, 250));
        }
      }
    };
    await Promise.all(Array.from({ length: INFLIGHT }, worker));

    // Leaks: settles and releases travel through each execution's outbox; give them a bounded time to land.
    let snapshot: any = null;
    const leakDeadline = Date.now() + 60_000;
    for (;;) {
      snapshot = await json(await fetch(`${session.url}/resources`, { headers: OPS }));
      const clean = snapshot.leases === 0 && snapshot.waiters === 0 && snapshot.pools.every((p: any) => p.kind !== "concurrency" || p.in_use === 0);
      if (clean || Date.now() > leakDeadline) break;
      await new Promise((r) => setTimeout(r, 250));
    }

    const byStatus: Record<string, number> = {};
    const byCode: Record<string, number> = {};
    const byFault: Record<string, Record<string, number>> = {};
    let mismatches = 0;
    const mismatchSamples: unknown[] = [];
    for (const o of outcomes) {
      byStatus[o.status] = (byStatus[o.status] ?? 0) + 1;
      if (o.code) byCode[o.code] = (byCode[o.code] ?? 0) + 1;
      const key = o.plan.fault ?? "none";
      byFault[key] ??= {};
      const label = o.code ? `${o.status}:${o.code}` : o.status;
      byFault[key][label] = (byFault[key][label] ?? 0) + 1;
      const e = o.plan.expect;
      if (e && (o.status !== e.status || (e.code && o.code !== e.code))) {
        mismatches++;
        if (mismatchSamples.length < 5) mismatchSamples.push({ id: o.id, fault: o.plan.fault, expected: e, got: { status: o.status, code: o.code }, stages: o.stages });
      }
    }
    const stillRunning = outcomes.filter((o) => !["completed", "failed", "cancelled", "start_failed"].includes(o.status)).length;
    const leakedPools = snapshot.pools.filter((p: any) => p.kind === "concurrency" && p.in_use !== 0).map((p: any) => `${p.name}=${p.in_use}`);
    const report = {
      bench: "soak",
      executions: outcomes.length,
      planned: N,
      inflight: INFLIGHT,
      fault_share: FAULT_SHARE,
      cancel_share: CANCEL_SHARE,
      seed: SEED,
      by_status: byStatus,
      by_code: byCode,
      by_fault: byFault,
      outcome_mismatches: mismatches,
      mismatch_samples: mismatchSamples,
      still_running: stillRunning,
      leaked_leases: snapshot.leases,
      leaked_waiters: snapshot.waiters,
      leaked_pools: leakedPools,
      seconds: Math.round((Date.now() - started) / 100) / 10,
      cores: os.cpus().length,
      node: process.version,
    };
    console.log("\nSoak: %d executions (%d in flight, %d%% faulty, %d%% cancelled), %ss", outcomes.length, INFLIGHT, FAULT_SHARE * 100, CANCEL_SHARE * 100, report.seconds);
    console.table(Object.fromEntries(Object.entries(byFault).map(([k, v]) => [k, v])));
    console.log("by status:", byStatus);
    console.log("by error code:", byCode);
    console.log("outcome mismatches: %d, still running: %d, leaked leases: %d, waiters: %d, pools in use: %s", mismatches, stillRunning, snapshot.leases, snapshot.waiters, leakedPools.join(", ") || "none");
    console.log(JSON.stringify(report));
    if (stillRunning || snapshot.leases || snapshot.waiters || leakedPools.length || mismatches || outcomes.length !== N) process.exitCode = 1;
  } finally {
    await session.stop();
  }
}

runMain(main);
