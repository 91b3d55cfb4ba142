import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { DEMO_CONFIGS, startDevSession } from "../../scripts/dev-session.mjs";

/**
 * Hard crashes of the whole local runtime: the demo system (orchestrator, demo
 * KAM, demo granulator) in `wrangler dev` on a persisted state directory,
 * killed with SIGKILL (the process group: wrangler and both workerd processes)
 * while stages are on workers, then started again on the same state. Used by
 * the e2e test (test/e2e/crash.test.ts) and `npm run bench:soak -- --crash`.
 */

type Session = Awaited<ReturnType<typeof startDevSession>>;
export type Doc = { execution_id: string; status: string; error: { code: string; message: string } | null; stages: { stage_id: string; status: string; attempts: number }[] };

export interface CrashSystemOptions {
  secrets: Record<string, string>;
  vars?: Record<string, string>;
  /** The tree the workers run from (a snapshot, so edits elsewhere cannot make wrangler reload). */
  cwd?: string;
  configs?: string[];
}

export class CrashSystem {
  readonly stateDir: string;
  session: Session | null = null;
  readonly kam: Record<string, string>;
  readonly ops: Record<string, string>;

  constructor(private readonly opts: CrashSystemOptions) {
    this.stateDir = mkdtempSync(path.join(os.tmpdir(), "orch-crash-"));
    this.kam = { authorization: `Bearer ${opts.secrets.KAM_TOKEN}`, "content-type": "application/json" };
    this.ops = { authorization: `Bearer ${opts.secrets.OPS_TOKEN}` };
  }

  get url(): string {
    if (!this.session) throw new Error("the system is not running");
    return this.session.url;
  }

  /** Starts the runtime on the persisted state (the same directory every time). */
  async start(): Promise<void> {
    const cwd = this.opts.cwd;
    this.session = await startDevSession({
      configs: (this.opts.configs ?? DEMO_CONFIGS).map((c) => (cwd ? path.join(cwd, c) : c)),
      secrets: this.opts.secrets,
      vars: this.opts.vars,
      persistTo: path.join(this.stateDir, "state"),
      cwd,
    });
  }

  /** SIGKILL to the process group: nothing is flushed, nothing is told. */
  async crash(): Promise<void> {
    await this.session?.kill();
    this.session = null;
  }

  async stop(): Promise<void> {
    await this.session?.stop();
    this.session = null;
  }

  async dispose(): Promise<void> {
    await this.stop();
    rmSync(this.stateDir, { recursive: true, force: true });
  }

  async execute(body: unknown): Promise<{ status: number; body: any }> {
    const res = await fetch(`${this.url}/execute`, { method: "POST", headers: this.kam, body: JSON.stringify(body), signal: AbortSignal.timeout(30_000) });
    return { status: res.status, body: await res.json().catch(() => null) };
  }

  async status(id: string): Promise<{ status: number; doc: Doc | null }> {
    const res = await fetch(`${this.url}/executions/${id}`, { headers: this.kam, signal: AbortSignal.timeout(30_000) });
    if (res.status === 200) return { status: res.status, doc: (await res.json()) as Doc };
    await res.body?.cancel();
    return { status: res.status, doc: null };
  }

  async resources(): Promise<{ leases: number; waiters: number; pools: { name: string; kind: string; in_use: number; waiting: number }[]; shards: { shard: number; ok: boolean }[] }> {
    const res = await fetch(`${this.url}/resources`, { headers: this.ops, signal: AbortSignal.timeout(30_000) });
    return (await res.json()) as never;
  }
}

export interface Submitted {
  requestId: string;
  body: Record<string, unknown>;
  /** The execution id the first POST answered, or null when the crash cut it off. */
  executionId: string | null;
  /** The first POST's answer: its status, or the error that cut it off. */
  first: string;
}

/** A request body that keeps each of its three stages on the worker for a while (steps x step_ms). */
export function crashBody(requestId: string, i: number, shape: { steps: number; stepMs: number } = { steps: 4, stepMs: 150 }): Record<string, unknown> {
  return { template_name: "course_creation", parameters: { topic: `crash ${i}`, steps: shape.steps, step_ms: shape.stepMs }, client_id: `crash_${i % 7}`, request_id: requestId };
}

/**
 * Starts the executions with `concurrency` POSTs at a time, recording each in
 * `out` as it goes (so a watcher sees them); a POST that the crash cuts off is
 * recorded with no execution id (its request_id is repeated after the restart).
 */
export async function submit(
  system: CrashSystem,
  bodies: Record<string, unknown>[],
  concurrency: number,
  out: Submitted[],
  stop: () => boolean,
  /** POSTs that fail (cut off, 5xx) are sent again with the same request_id this many more times, as a client would. */
  retries = 0,
): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (next < bodies.length && !stop()) {
      const body = bodies[next++];
      const entry: Submitted = { requestId: String(body.request_id), body, executionId: null, first: "pending" };
      out.push(entry);
      for (let tries = 0; tries <= retries && !entry.executionId && !stop(); tries++) {
        try {
          const r = await system.execute(body);
          const answer = r.status === 202 || r.status === 200 ? String(r.status) : `${r.status} ${r.body?.error?.code ?? ""}`;
          if (tries === 0) entry.first = answer;
          if (r.status === 202 || r.status === 200) entry.executionId = r.body.execution_id;
        } catch (err) {
          // cut off by the crash (or, after it, a POST that timed out)
          if (tries === 0) entry.first = err instanceof Error ? err.name : "error";
        }
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, lane));
}

/** How many of these executions have a stage on a worker right now, and how many have not ended. */
export async function onWorkers(system: CrashSystem, ids: string[]): Promise<{ onWorkers: number; live: number; ended: string[] }> {
  const docs = await Promise.all(ids.map((id) => system.status(id).then((r) => r.doc).catch(() => null)));
  const isEnded = (d: Doc | null) => !!d && ["completed", "failed", "cancelled"].includes(d.status);
  return {
    onWorkers: docs.filter((d) => d?.stages.some((s) => s.status === "handshaking" || s.status === "processing")).length,
    live: docs.filter((d) => !isEnded(d)).length,
    ended: docs.filter(isEnded).map((d) => d!.execution_id),
  };
}

export interface Outcome {
  executionId: string;
  requestId: string;
  status: string;
  code: string | null;
  doc: Doc | null;
}

/** Reads every execution until it has ended or the deadline passes; those still live come back with their last status. */
export async function awaitEnded(system: CrashSystem, items: { executionId: string; requestId: string }[], deadlineMs: number): Promise<Outcome[]> {
  const deadline = Date.now() + deadlineMs;
  const results = new Map<string, Outcome>();
  let open = [...items];
  while (open.length && Date.now() < deadline) {
    const still: typeof open = [];
    for (let i = 0; i < open.length; i += 25) {
      const chunk = open.slice(i, i + 25);
      const read = await Promise.all(chunk.map((it) => system.status(it.executionId).catch(() => ({ status: 0, doc: null }))));
      chunk.forEach((it, k) => {
        const { status, doc } = read[k];
        const o: Outcome = { ...it, status: status === 404 ? "lost" : (doc?.status ?? `http_${status}`), code: doc?.error?.code ?? null, doc };
        results.set(it.executionId, o);
        if (!["completed", "failed", "cancelled", "lost"].includes(o.status)) still.push(it);
      });
    }
    open = still;
    if (open.length) await new Promise((r) => setTimeout(r, 250));
  }
  return items.map((it) => results.get(it.executionId)!);
}

/**
 * Polls the ledger until nothing is held or waiting, or the deadline passes; answers the last snapshot.
 * Clean counts only with every ledger shard answering (the snapshot sums the shards that did).
 */
export async function awaitLedgerClean(system: CrashSystem, deadlineMs: number) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const snap = await system.resources();
    const clean =
      snap.shards.every((s) => s.ok) && snap.leases === 0 && snap.waiters === 0 && snap.pools.every((p) => p.kind !== "concurrency" || p.in_use === 0);
    if (clean || Date.now() > deadline) return { clean, snap };
    await new Promise((r) => setTimeout(r, 250));
  }
}

export interface RoundReport {
  submitted: number;
  /** Requests not yet sent at the kill, sent after the restart (every planned execution runs). */
  sent_after_restart: number;
  /** What the first POST of each of those answered (a failed one is sent again, up to 3 times). */
  late_first_answers: Record<string, number>;
  /** Of those, how many got no execution after every try (each is a failure of the round). */
  start_failures: number;
  cut_off: number;
  /** What the first POST of each request answered before the kill (status, or the error that cut it off). */
  first_answers: Record<string, number>;
  on_workers_at_kill: number;
  /** The kill came before `killWhenOnWorkers` executions had a stage on a worker (the round proves less). */
  killed_below_target: boolean;
  ended: number;
  by_status: Record<string, number>;
  stuck: { execution_id: string; status: string; stages: unknown }[];
  lost: number;
  repeat_mismatches: number;
  ledger_clean: boolean;
  ledger: unknown;
  seconds_to_end: number;
}

/** Tries of each repeated request after the restart (the late first POSTs get as many: `submit`'s 3 retries + 1). */
const REPEAT_TRIES = 4;

/**
 * One crash round on a running system: submits `n` executions, kills the
 * runtime once `killWhenOnWorkers` of them have a stage on a worker (POSTs
 * still going), starts it again on the same state, repeats every request_id
 * sent, sends those not yet sent, and checks that every execution ends within
 * `endDeadlineMs` of the last POST (one still running then is `stuck`: a
 * failure, however it got there), that every repeated request_id answers the
 * same execution, and that the ledger ends clean.
 */
export async function crashRound(
  system: CrashSystem,
  opts: {
    round: number;
    n: number;
    concurrency: number;
    killWhenOnWorkers: number;
    endDeadlineMs: number;
    ledgerDeadlineMs: number;
    shape?: { steps: number; stepMs: number };
    /** The requests to start (each with a `request_id`); default: `n` of crashBody. */
    bodies?: Record<string, unknown>[];
  },
): Promise<{ report: RoundReport; outcomes: Outcome[] }> {
  const bodies = opts.bodies ?? Array.from({ length: opts.n }, (_, i) => crashBody(`crash-r${opts.round}-${i}`, i, opts.shape));
  const submitted: Submitted[] = [];
  let killed = false;
  const submitting = submit(system, bodies, opts.concurrency, submitted, () => killed);
  let finished = false;
  void submitting.then(() => {
    finished = true;
  });
  let atKill = 0;
  const watchUntil = Date.now() + 120_000;
  // Ended ones are not read again (the watcher must not become the load).
  const endedIds = new Set<string>();
  while (Date.now() < watchUntil) {
    await new Promise((r) => setTimeout(r, 200));
    const ids = submitted.filter((s) => s.executionId && !endedIds.has(s.executionId)).map((s) => s.executionId!);
    const seen = await onWorkers(system, ids);
    for (const id of seen.ended) endedIds.add(id);
    atKill = seen.onWorkers;
    // Kill once enough are on the worker; give up waiting only when nothing is left that could get there.
    if (atKill >= opts.killWhenOnWorkers || (finished && seen.live === 0)) break;
  }
  killed = true;
  await system.crash();
  await submitting;
  const cutOff = submitted.filter((s) => !s.executionId).length;
  const firstAnswers: Record<string, number> = {};
  for (const s of submitted) firstAnswers[s.first] = (firstAnswers[s.first] ?? 0) + 1;
  await system.start();
  const restartedAt = Date.now();

  // Every request_id again: the same execution for those that were answered; the cut-off ones now get theirs.
  let repeatMismatches = 0;
  let nextRepeat = 0;
  const repeatLane = async () => {
    while (nextRepeat < submitted.length) {
      const s = submitted[nextRepeat++];
      // As a client would: a repeat that gets no answer or a 5xx (the restarted runtime still warming up
      // under load) is sent again, up to REPEAT_TRIES in all; only an answer counts, right or wrong.
      let r: { status: number; body: any } = { status: 0, body: null };
      for (let tries = 0; tries < REPEAT_TRIES && (r.status === 0 || r.status >= 500); tries++) {
        r = await system.execute(s.body).catch(() => ({ status: 0, body: null }));
      }
      const id = r.body?.execution_id as string | undefined;
      if (s.executionId) {
        if (r.status !== 200 || id !== s.executionId) repeatMismatches++;
      } else if (id && (r.status === 200 || r.status === 202)) {
        s.executionId = id;
      } else {
        repeatMismatches++;
      }
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency }, repeatLane));
  // What the kill kept from being sent goes now: every planned execution runs.
  const rest = bodies.slice(submitted.length);
  const late: Submitted[] = [];
  await submit(system, rest, opts.concurrency, late, () => false, 3);
  const startFailures = late.filter((s) => !s.executionId).length;
  const lateAnswers: Record<string, number> = {};
  for (const s of late) lateAnswers[s.first] = (lateAnswers[s.first] ?? 0) + 1;
  const items = [...submitted, ...late].filter((s) => s.executionId).map((s) => ({ executionId: s.executionId!, requestId: s.requestId }));
  const outcomes = await awaitEnded(system, items, opts.endDeadlineMs);
  const secondsToEnd = Math.round((Date.now() - restartedAt) / 100) / 10;
  const ledger = await awaitLedgerClean(system, opts.ledgerDeadlineMs);
  const byStatus: Record<string, number> = {};
  for (const o of outcomes) {
    const label = o.code ? `${o.status}:${o.code}` : o.status;
    byStatus[label] = (byStatus[label] ?? 0) + 1;
  }
  const stuck = outcomes.filter((o) => !["completed", "failed", "cancelled", "lost"].includes(o.status));
  return {
    outcomes,
    report: {
      submitted: submitted.length,
      sent_after_restart: late.length,
      late_first_answers: lateAnswers,
      start_failures: startFailures,
      cut_off: cutOff,
      first_answers: firstAnswers,
      on_workers_at_kill: atKill,
      killed_below_target: atKill < opts.killWhenOnWorkers,
      ended: outcomes.length - stuck.length,
      by_status: byStatus,
      stuck: stuck.map((o) => ({ execution_id: o.executionId, status: o.status, stages: o.doc?.stages })),
      lost: outcomes.filter((o) => o.status === "lost").length,
      repeat_mismatches: repeatMismatches,
      ledger_clean: ledger.clean,
      ledger: ledger.snap,
      seconds_to_end: secondsToEnd,
    },
  };
}
