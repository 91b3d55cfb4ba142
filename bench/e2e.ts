/**
 * End-to-end benchmark of the orchestrator (issue 6): `npm run bench [-- options]`.
 *
 * Starts the real system (`wrangler dev`: the orchestrator from src/, the zero-work
 * bench stage worker, a bench KAM and a gateway; see bench/lib/e2e-session.ts) on a
 * free 127.0.0.1 port with fresh state, warms up, then measures on the same
 * session, with the same seeded workload and the same number in flight:
 *
 * - the floor: the three stages driven directly against the bench worker with no
 *   orchestrator (POST /bench/floor: handshake, process, completion callback to the
 *   worker's own sink, all through service bindings);
 * - the durable floor: the same, run by one FloorRun Durable Object per execution
 *   that records each stage as started and completed in its SQLite, with the
 *   callback passing through the object: what the least crash-safe orchestrator
 *   of this design (an object per execution) costs here;
 * - orchestrated: POST /execute of `bench_three_stage`, completion learnt from the
 *   bench worker (GET /bench/wait/:id answers once the orchestrator has
 *   acknowledged the last stage's `complete`), then confirmed with
 *   GET /executions/:id (latency ends when that says `completed`).
 *
 * Prints a table and one JSON line ({"bench":"e2e",...}); writes the JSON to
 * bench/results/ (gitignored). Exits 1 if any execution failed or got stuck, or
 * the session could not run; never on time targets. See docs/performance.md.
 *
 * Options: --n N (2000) --concurrency C (200) --warmup W (200) --seed S (42)
 *   --callback async|sync (async: the worker calls back in ctx.waitUntil after
 *   answering process; sync: before answering) --work-ms MS (0: the stage worker
 *   waits MS between process and its callback, a stage that takes time) --settle-ms MS (15000: idle time
 *   after the run before the last memory reading) --no-floor --no-durable-floor --quick (300
 *   executions, 100 in flight, for CI) --soak (10000 executions, memory check)
 *   --tree worktree|COMMIT|DIR (worktree: what to run is a copy of the working
 *   tree taken at start; or a commit, e.g. HEAD; or another checkout, e.g. a
 *   `git worktree` holding an experimental change) --observability config|off (off: run the
 *   orchestrator with [observability] disabled, to measure what local tracing
 *   costs) --local-observability on|off (wrangler dev's own tracing of every
 *   invocation, X_LOCAL_OBSERVABILITY; on is what `wrangler dev` does)
 *   --no-plain-floor (only the durable floor) --orchestrated-first (the orchestrated phase before the
 *   floors: each later phase runs on the heap the earlier ones grew, so the order matters for memory)
 *   --phase-budget-s S (0: 120 s + 300 ms per execution; then the executions in flight are abandoned)
 *   --json-out FILE --verbose
 *   --vs-workflows: instead, the same pipeline on Cloudflare Workflows
 *   (bench/worker/workflows.ts) against ours, alternating, on two workloads: (a)
 *   closed loop as above, (b) --poll-n 300 executions, --poll-concurrency 100 in
 *   flight, each polling its status every --poll-ms 100 ms until it ends; then
 *   billed units per execution from the runtime's traces (bench/vs-workflows.ts); on both
 *   workloads also the contract floor (bench/worker/contract-floor.ts: the least the
 *   orchestrator's contract makes any implementation do), --no-contract-floor leaves it out
 *   --fan-out: instead, the pipeline graph's fan-out workload (bench/fan-out.ts): list -> N items ->
 *   merge against the same N items as a straight line, --fan-items 10,100,1000, --fan-work-ms 50,
 *   --fan-rounds 2, --fan-line-max N (1000: the straight line runs only for N items up to this; it takes
 *   N x (work + orchestration), 10 minutes for 1,000 items on a loaded machine)
 *   --status-reads: instead, status read throughput (bench/status-reads.ts): GET /health, a running and
 *   an ended execution's GET /executions/:id and a 304, closed loop, --read-concurrency 20 in flight,
 *   --read-seconds 5 each, --rounds 2 (order rotated); --perf-record DIR: `perf record -g` of the workerd
 *   runtime during each read (Linux perf), one file per read and round, for `perf report`
 *   --rounds R (2: each round runs both systems on both workloads, the order
 *   swapped every round) --count-n K (30 executions per system counted for the
 *   billed units)
 *   --fsyncs: count the runtime's fsyncs by file (strace) during the orchestrated phase
 *   --memory: instead, the runtime's memory growth over --n executions, ours against the durable
 *   floor, each phase in a fresh runtime (bench/memory.ts; with --soak 10,000 each, 50 in flight)
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { type BenchSession, BENCH_BINDING, startBenchSession, workerdProcesses } from "./lib/e2e-session";
import { KeepAliveClient } from "./lib/http-keepalive";
import { mulberry32, weighted } from "./lib/mulberry32";
import { FsyncCounter } from "./lib/fsyncs";
import { cpuSecondsOf, descendants, machineBusySeconds, memoryOf, openFds, RssSampler } from "./lib/proc-stats";
import { type Summary, summarize } from "./lib/quantiles";
import { runFanOut } from "./fan-out";
import { runMemory } from "./memory";
import { runStatusReads } from "./status-reads";
import { runVsWorkflows } from "./vs-workflows";
import { BENCH_STAGES, BENCH_TEMPLATE, BENCH_WORKER, type ExecTimings, type FloorAnswer, type WaitAnswer, type WorkerStats } from "./worker/shared";

// ------------------------------------------------------------------ options ----

export interface Options {
  n: number;
  concurrency: number;
  warmup: number;
  seed: number;
  callback: "async" | "sync";
  settleMs: number;
  floor: boolean;
  /** Also run the durable floor (needs the floor). */
  durableFloor: boolean;
  /** --no-plain-floor: skip the floor without storage (the durable floor still runs). */
  plainFloor: boolean;
  /** --no-contract-floor (--vs-workflows): skip the contract floor (bench/worker/contract-floor.ts). */
  contractFloor: boolean;
  /** --orchestrated-first: the orchestrated phase before the floors (each later phase runs on the heap the earlier ones grew). */
  orchestratedFirst: boolean;
  /** --phase-budget-s: the longest a phase may run before the executions in flight are abandoned (0: 120 s + 300 ms per execution). */
  phaseBudgetS: number;
  quick: boolean;
  soak: boolean;
  jsonOut: string | null;
  verbose: boolean;
  /** What to run: "worktree" (a copy of the working tree) or a commit-ish such as HEAD. */
  tree: string;
  /** The orchestrator's `[observability]` as in wrangler.toml, or forced off. */
  observability: "config" | "off";
  /** wrangler dev's local observability (a trace of every invocation into its local store). */
  localObservability: boolean;
  /** Per-execution deadline: past it the execution counts as stuck. */
  execTimeoutMs: number;
  /** Ours against the same pipeline on Cloudflare Workflows (bench/vs-workflows.ts). */
  vsWorkflows: boolean;
  /** --vs-workflows: rounds, the polled workload's size, in flight and poll interval, executions counted for billed units. */
  rounds: number;
  pollN: number;
  pollConcurrency: number;
  pollMs: number;
  countN: number;
  /** ms the bench stage worker pretends to work per stage (0: it completes at once). */
  workMs: number;
  /** --fan-out: the fan-out workload (bench/fan-out.ts) instead of the closed loop. */
  fanOut: boolean;
  fanItems: number[];
  fanWorkMs: number;
  fanRounds: number;
  fanLineMax: number;
  /** --status-reads: GET /executions/:id (running, ended, 304) against GET /health (bench/status-reads.ts). */
  statusReads: boolean;
  readSeconds: number;
  /** --perf-record DIR (with --status-reads): `perf record -g` of the workerd runtime during each read. */
  perfRecord: string | null;
  readConcurrency: number;
  /** --fsyncs: count the runtime's fsyncs by file during the orchestrated phase (bench/lib/fsyncs.ts). */
  fsyncs: boolean;
  /** --memory: memory growth, ours against the durable floor, each phase in a fresh runtime (bench/memory.ts). */
  memory: boolean;
}

export function parseArgs(argv: string[]): Options {
  const o: Options = { n: 2000, concurrency: 200, warmup: 200, seed: 42, callback: "async", settleMs: 15_000, floor: true, durableFloor: true, plainFloor: true, contractFloor: true, orchestratedFirst: false, phaseBudgetS: 0, quick: false, soak: false, jsonOut: null, verbose: false, execTimeoutMs: 60_000, tree: "worktree", observability: "config", localObservability: true, vsWorkflows: false, rounds: 2, pollN: 300, pollConcurrency: 100, pollMs: 100, countN: 30, workMs: 0, fanOut: false, fanItems: [10, 100, 1000], fanWorkMs: 50, fanRounds: 2, fanLineMax: 1000, statusReads: false, readSeconds: 5, readConcurrency: 20, perfRecord: null, fsyncs: false, memory: false };
  const given = new Set<string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    const num = () => {
      const v = Number(next());
      if (!Number.isFinite(v) || v < 0) throw new Error(`${a} needs a non-negative number`);
      return Math.floor(v);
    };
    switch (a) {
      case "--n": o.n = num(); given.add("n"); break;
      case "--concurrency": case "-c": o.concurrency = Math.max(1, num()); given.add("c"); break;
      case "--warmup": o.warmup = num(); given.add("w"); break;
      case "--seed": o.seed = num(); break;
      case "--callback": { const v = next(); if (v !== "async" && v !== "sync") throw new Error("--callback async|sync"); o.callback = v; break; }
      case "--settle-ms": o.settleMs = num(); given.add("s"); break;
      case "--no-floor": o.floor = false; break;
      case "--no-durable-floor": o.durableFloor = false; break;
      case "--no-plain-floor": o.plainFloor = false; break;
      case "--no-contract-floor": o.contractFloor = false; break;
      case "--orchestrated-first": o.orchestratedFirst = true; break;
      case "--phase-budget-s": o.phaseBudgetS = Math.max(0, num()); break;
      case "--quick": o.quick = true; break;
      case "--soak": o.soak = true; break;
      case "--json-out": o.jsonOut = next(); break;
      case "--verbose": o.verbose = true; break;
      case "--tree": o.tree = next(); break;
      case "--local-observability": { const v = next(); if (v !== "on" && v !== "off") throw new Error("--local-observability on|off"); o.localObservability = v === "on"; break; }
      case "--observability": { const v = next(); if (v !== "config" && v !== "off") throw new Error("--observability config|off"); o.observability = v; break; }
      case "--exec-timeout-ms": o.execTimeoutMs = Math.max(1000, num()); break;
      case "--vs-workflows": o.vsWorkflows = true; break;
      case "--rounds": o.rounds = Math.max(1, num()); break;
      case "--poll-n": o.pollN = Math.max(1, num()); break;
      case "--poll-concurrency": o.pollConcurrency = Math.max(1, num()); break;
      case "--poll-ms": o.pollMs = Math.max(1, num()); break;
      case "--count-n": o.countN = num(); break;
      case "--work-ms": o.workMs = Math.min(60_000, num()); break;
      case "--fan-out": o.fanOut = true; break;
      case "--status-reads": o.statusReads = true; break;
      case "--fsyncs": o.fsyncs = true; break;
      case "--memory": o.memory = true; break;
      case "--read-seconds": o.readSeconds = Math.max(1, num()); break;
      case "--read-concurrency": o.readConcurrency = Math.max(1, num()); break;
      case "--perf-record": o.perfRecord = path.resolve(next()); break;
      case "--fan-items": o.fanItems = next().split(",").map((v) => Math.min(1000, Math.max(1, Math.floor(Number(v)) || 1))); break;
      case "--fan-work-ms": o.fanWorkMs = Math.min(10_000, num()); break;
      case "--fan-rounds": o.fanRounds = Math.max(1, num()); break;
      case "--fan-line-max": o.fanLineMax = Math.max(0, num()); break;
      case "--help": case "-h":
        console.log(readFileSync(new URL(import.meta.url), "utf8").split("*/")[0]);
        return process.exit(0);
      default: throw new Error(`unknown option ${a} (see --help)`);
    }
  }
  // Against Workflows the closed loop runs at the polled workload's scale unless told otherwise.
  if (o.vsWorkflows) {
    if (!given.has("n")) o.n = 300;
    if (!given.has("c")) o.concurrency = 100;
    if (!given.has("w")) o.warmup = 50;
  }
  if (o.quick) {
    if (!given.has("n")) o.n = 300;
    if (!given.has("c")) o.concurrency = 100;
    if (!given.has("w")) o.warmup = 50;
    if (!given.has("s")) o.settleMs = 2_000;
  }
  if (o.soak && !given.has("n")) o.n = 10_000;
  if (o.memory) {
    if (!given.has("c")) o.concurrency = 50;
    if (!given.has("w")) o.warmup = 50;
    if (!given.has("s")) o.settleMs = 15_000;
  }
  if (o.n < 1) throw new Error("--n must be at least 1");
  return o;
}

// ----------------------------------------------------------------- workload ----

export interface WorkItem {
  parameters: Record<string, unknown>;
  priority: "low" | "normal" | "high" | "critical";
  client_id: string;
}

const TOPICS = ["react", "rust", "sql", "physics", "poetry", "chess", "finance", "biology", "music", "history"];

/** The same N items for the same seed: priorities, clients and small parameters vary. */
export function workload(n: number, seed: number, callback: Options["callback"], workMs = 0): WorkItem[] {
  const random = mulberry32(seed);
  return Array.from({ length: n }, (_, i) => ({
    priority: weighted(random, [["normal", 70], ["high", 15], ["low", 10], ["critical", 5]] as const),
    client_id: `bench_client_${Math.floor(random() * 16)}`,
    parameters: {
      bench_stages: BENCH_STAGES,
      bench_callback: callback,
      ...(workMs > 0 ? { bench_work_ms: workMs } : {}),
      item: i,
      topic: TOPICS[Math.floor(random() * TOPICS.length)],
      size: 1 + Math.floor(random() * 1000),
      note: "x".repeat(Math.floor(random() * 200)),
    },
  }));
}

// ------------------------------------------------------------------ running ----

export interface RunRecord {
  ok: boolean;
  /** The execution's id, once started. */
  id?: string;
  /** Round trip of the request that started it (ms). */
  startRttMs?: number;
  error?: string;
  /** ms, Node's monotonic clock: request sent -> completion observed */
  latencyMs: number;
  /** ms: request sent (wall clock) -> last stage's completion acknowledged (workerd clock) */
  ackLatencyMs: number | null;
  /** execute (or floor request) sent -> first handshake arrived */
  firstGapMs: number | null;
  /** stage n complete sent -> stage n+1 handshake arrived */
  betweenGapsMs: number[];
  /** complete callback round trip (sent -> answered), per stage */
  callbackRttMs: number[];
  /** last stage complete sent -> completed status observed (orchestrated only) */
  tailMs: number | null;
  statusGets: number;
  /** round trip of the status read that saw `completed` (ms) */
  statusRttMs: number | null;
  /** last acknowledgment answered -> the bench had it (ms; wait answer delivery) */
  waitDeliveryMs: number | null;
  waits: number;
  attempts: number;
  polls: number;
}

export interface PhaseResult {
  name: string;
  n: number;
  concurrency: number;
  elapsedS: number;
  records: RunRecord[];
  stuck: number;
  cpu: Record<string, number>;
  /** The workerd runtime's resident memory at the start and the end of the phase (MiB). */
  rssMib: { start: number | null; end: number | null };
  worker: WorkerStats | null;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function gaps(timings: ExecTimings | null, sentWall: number) {
  const out = { firstGapMs: null as number | null, betweenGapsMs: [] as number[], callbackRttMs: [] as number[], attempts: 0, lastCs: null as number | null, lastCa: null as number | null };
  if (!timings) return out;
  // The last attempt of each stage, in stage order.
  const byStage = new Map<string, (typeof timings.stages)[number]>();
  for (const s of timings.stages) {
    out.attempts++;
    const cur = byStage.get(s.stage);
    if (!cur || s.attempt >= cur.attempt) byStage.set(s.stage, s);
  }
  const stages = [...byStage.values()].sort((a, b) => Number(a.stage.slice(6)) - Number(b.stage.slice(6)));
  if (stages[0]) out.firstGapMs = stages[0].hs - sentWall;
  for (let i = 1; i < stages.length; i++) {
    const prev = stages[i - 1];
    if (prev.cs !== null) out.betweenGapsMs.push(stages[i].hs - prev.cs);
  }
  for (const s of stages) if (s.cs !== null && s.ca !== null) out.callbackRttMs.push(s.ca - s.cs);
  const last = stages[stages.length - 1];
  out.lastCs = last?.cs ?? null;
  out.lastCa = last?.ca ?? null;
  return out;
}

/** Where one system under test takes executions and answers their status (ours, or the Workflows implementation). */
export interface System {
  name: string;
  /** The request that starts one execution. */
  start(item: WorkItem): { path: string; body: unknown };
  statusPath(id: string): string;
}

export const OURS: System = {
  name: "ours",
  start: (item) => ({ path: "/execute", body: { template_name: BENCH_TEMPLATE, parameters: item.parameters, client_id: item.client_id, priority: item.priority } }),
  statusPath: (id) => `/executions/${id}`,
};

const ENDED = new Set(["completed", "failed", "cancelled"]);

export class Bench {
  readonly client: KeepAliveClient;
  readonly kam: Record<string, string>;
  readonly ops: Record<string, string>;
  readonly worker: Record<string, string>;
  aborted = false;

  constructor(
    readonly session: BenchSession,
    readonly secrets: Record<string, string>,
    readonly opts: Options,
  ) {
    this.client = new KeepAliveClient(session.url, 4 * opts.concurrency + 64);
    this.kam = { authorization: `Bearer ${secrets.KAM_TOKEN}` };
    this.ops = { authorization: `Bearer ${secrets.OPS_TOKEN}` };
    this.worker = { authorization: `Bearer ${secrets.WORKER_SECRET}` };
  }

  async workerStats(reset = false): Promise<WorkerStats | null> {
    const res = await this.client.request<WorkerStats>(reset ? "POST" : "GET", reset ? "/bench/reset" : "/bench/stats", { headers: this.worker, timeoutMs: 10_000 }).catch(() => null);
    return res && res.status === 200 ? res.body : null;
  }

  /** One orchestrated execution, from POST /execute (or `system`'s start) to `completed` observed. */
  async orchestrated(item: WorkItem, system: System = OURS): Promise<RunRecord> {
    const rec: RunRecord = { ok: false, latencyMs: 0, ackLatencyMs: null, firstGapMs: null, betweenGapsMs: [], callbackRttMs: [], tailMs: null, statusGets: 0, statusRttMs: null, waitDeliveryMs: null, waits: 0, attempts: 0, polls: 0 };
    const sentWall = Date.now();
    const t0 = performance.now();
    const deadline = t0 + this.opts.execTimeoutMs;
    const fail = (error: string) => {
      rec.error = error;
      rec.latencyMs = performance.now() - t0;
      return rec;
    };
    const started = await this.start(item, system);
    if ("error" in started) return fail(started.error);
    const id = started.id;
    rec.id = id;
    rec.startRttMs = started.ms;
    // 1. The worker tells us when the orchestrator acknowledged the last stage.
    let timings: ExecTimings | null = null;
    let acked = false;
    while (!this.aborted && performance.now() < deadline) {
      const left = Math.max(50, Math.min(30_000, deadline - performance.now()));
      rec.waits++;
      try {
        const w = await this.client.request<WaitAnswer>("GET", `/bench/wait/${id}?timeout_ms=${Math.round(left)}`, { headers: this.worker, timeoutMs: left + 5_000 });
        if (w.status === 200) {
          timings = w.body.timings ?? timings;
          if (w.body.done) {
            acked = true;
            const lastCa = gaps(timings, sentWall).lastCa;
            if (lastCa !== null) rec.waitDeliveryMs = Date.now() - lastCa;
            break;
          }
        }
      } catch {}
      // Not acknowledged (the callback failed, or slow): the status tells whether it ended another way.
      const st = await this.status(id, rec, system).catch(() => null);
      if (st && st !== "queued" && st !== "running") {
        // Ended meanwhile: the worker has the complete record now (the last ack precedes `completed`).
        const w = await this.client.request<WaitAnswer>("GET", `/bench/wait/${id}?timeout_ms=200`, { headers: this.worker, timeoutMs: 5_000 }).catch(() => null);
        if (w?.status === 200 && w.body.timings) timings = w.body.timings;
        break;
      }
      if (timings?.ended) break;
    }
    // 2. Observe `completed` in the status document.
    let backoff = 1;
    for (;;) {
      if (this.aborted || performance.now() > deadline) {
        const g = gaps(timings, sentWall);
        Object.assign(rec, { firstGapMs: g.firstGapMs, betweenGapsMs: g.betweenGapsMs, attempts: g.attempts });
        return fail(`stuck: not ended within ${this.opts.execTimeoutMs} ms (acknowledged: ${acked})`);
      }
      let st: string | null = null;
      const asked = performance.now();
      try {
        st = await this.status(id, rec, system);
      } catch {}
      if (st === "completed") {
        rec.statusRttMs = performance.now() - asked;
        break;
      }
      if (st === "failed" || st === "cancelled") return fail(`execution ${id} ${st}`);
      await sleep(backoff);
      backoff = Math.min(50, backoff * 2);
    }
    const doneWall = Date.now();
    rec.latencyMs = performance.now() - t0;
    const g = gaps(timings, sentWall);
    rec.ok = true;
    rec.firstGapMs = g.firstGapMs;
    rec.betweenGapsMs = g.betweenGapsMs;
    rec.callbackRttMs = g.callbackRttMs;
    rec.attempts = g.attempts;
    rec.polls = timings?.polls ?? 0;
    rec.ackLatencyMs = g.lastCa !== null ? g.lastCa - sentWall : null;
    rec.tailMs = g.lastCs !== null ? doneWall - g.lastCs : null;
    return rec;
  }

  private async start(item: WorkItem, system: System): Promise<{ id: string; ms: number } | { error: string }> {
    const { path: startPath, body } = system.start(item);
    const t0 = performance.now();
    try {
      const res = await this.client.request<{ execution_id?: string; error?: { code: string } }>("POST", startPath, { headers: this.kam, body, timeoutMs: 30_000 });
      if (res.status !== 202 || !res.body?.execution_id) return { error: `execute answered ${res.status} ${JSON.stringify(res.body).slice(0, 200)}` };
      return { id: res.body.execution_id, ms: performance.now() - t0 };
    } catch (err) {
      return { error: `execute: ${String(err)}` };
    }
  }

  private async status(id: string, rec: RunRecord, system: System = OURS): Promise<string | null> {
    rec.statusGets++;
    const res = await this.client.request<{ status?: string }>("GET", system.statusPath(id), { headers: this.kam, timeoutMs: 15_000 });
    return res.status === 200 ? (res.body.status ?? null) : null;
  }

  /**
   * One execution as a client without notifications sees it: start it, then
   * read its status every `pollMs` until it says it ended. The latency ends at
   * the read that saw `completed`. Afterwards (outside the latency) the stage
   * timings are fetched from the bench worker, which also forgets them.
   */
  async polled(item: WorkItem, system: System, pollMs: number): Promise<RunRecord> {
    const rec: RunRecord = { ok: false, latencyMs: 0, ackLatencyMs: null, firstGapMs: null, betweenGapsMs: [], callbackRttMs: [], tailMs: null, statusGets: 0, statusRttMs: null, waitDeliveryMs: null, waits: 0, attempts: 0, polls: 0 };
    const sentWall = Date.now();
    const t0 = performance.now();
    const deadline = t0 + this.opts.execTimeoutMs;
    const started = await this.start(item, system);
    if ("error" in started) {
      rec.error = started.error;
      rec.latencyMs = performance.now() - t0;
      return rec;
    }
    rec.id = started.id;
    rec.startRttMs = started.ms;
    let st: string | null = null;
    for (;;) {
      if (this.aborted || performance.now() > deadline) {
        rec.error = `stuck: not ended within ${this.opts.execTimeoutMs} ms`;
        break;
      }
      const asked = performance.now();
      st = await this.status(started.id, rec, system).catch(() => null);
      if (st !== null && ENDED.has(st)) {
        rec.statusRttMs = performance.now() - asked;
        break;
      }
      await sleep(Math.max(0, pollMs - (performance.now() - asked)));
    }
    rec.latencyMs = performance.now() - t0;
    if (st === "completed") rec.ok = true;
    else if (!rec.error) rec.error = `execution ${started.id} ${st}`;
    const w = await this.client.request<WaitAnswer>("GET", `/bench/wait/${started.id}?timeout_ms=10`, { headers: this.worker, timeoutMs: 5_000 }).catch(() => null);
    const g = gaps(w?.status === 200 ? w.body.timings : null, sentWall);
    Object.assign(rec, { firstGapMs: g.firstGapMs, betweenGapsMs: g.betweenGapsMs, callbackRttMs: g.callbackRttMs, attempts: g.attempts });
    if (g.lastCa !== null) rec.ackLatencyMs = g.lastCa - sentWall;
    return rec;
  }

  /** One floor run: the same stages straight against the bench worker (durable: through a FloorRun object). */
  async floor(item: WorkItem, index: number, durable = false): Promise<RunRecord> {
    const rec: RunRecord = { ok: false, latencyMs: 0, ackLatencyMs: null, firstGapMs: null, betweenGapsMs: [], callbackRttMs: [], tailMs: null, statusGets: 0, statusRttMs: null, waitDeliveryMs: null, waits: 0, attempts: 0, polls: 0 };
    const sentWall = Date.now();
    const t0 = performance.now();
    const executionId = `exec_${sentWall}_${durable ? "dfloor" : "floor"}${String(index).padStart(8, "0")}`;
    try {
      const res = await this.client.request<FloorAnswer>("POST", "/bench/floor", {
        headers: this.worker,
        body: { executionId, parameters: item.parameters, durable },
        timeoutMs: this.opts.execTimeoutMs,
      });
      rec.latencyMs = performance.now() - t0;
      if (res.status !== 200 || !res.body.ok) {
        rec.error = `floor answered ${res.status} ${JSON.stringify(res.body).slice(0, 200)}`;
        return rec;
      }
      const g = gaps(res.body.timings, sentWall);
      rec.ok = true;
      rec.firstGapMs = g.firstGapMs;
      rec.betweenGapsMs = g.betweenGapsMs;
      rec.callbackRttMs = g.callbackRttMs;
      rec.attempts = g.attempts;
      return rec;
    } catch (err) {
      rec.latencyMs = performance.now() - t0;
      rec.error = `floor: ${String(err)}`;
      return rec;
    }
  }

  /** Runs `n` items through `one` with `concurrency` in flight; bounded in time. */
  async phase(
    name: string,
    items: WorkItem[],
    concurrency: number,
    one: (item: WorkItem, i: number) => Promise<RunRecord>,
    pids: Record<string, number>,
    onProgress?: (done: number) => void,
  ): Promise<PhaseResult> {
    const records: RunRecord[] = [];
    let next = 0;
    const cpu0 = cpuSnapshot(pids);
    const rss0 = mib(memoryOf(pids.workerd_runtime)?.rss);
    const started = performance.now();
    // Whole-phase bound: generous, but the run always ends by itself.
    // 100 ms per execution was too little on a machine at 8-10x its core count (a 10,000-execution soak ran out at 16:46 on 2026-12-01).
    const budgetMs = this.opts.phaseBudgetS ? this.opts.phaseBudgetS * 1000 : 120_000 + items.length * 300;
    const watchdog = setTimeout(() => {
      this.aborted = true;
      console.error(`! ${name}: phase budget of ${budgetMs} ms exceeded; abandoning the executions still in flight`);
    }, budgetMs);
    let lastLog = started;
    const loop = async () => {
      while (!this.aborted && next < items.length) {
        const i = next++;
        const r = await one(items[i], i);
        records.push(r);
        if (!r.ok && this.opts.verbose) console.error(`  ${name} #${i}: ${r.error}`);
        onProgress?.(records.length);
        if (this.opts.verbose && performance.now() - lastLog > 5000) {
          lastLog = performance.now();
          console.error(`  ${name}: ${records.length}/${items.length}`);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, loop));
    clearTimeout(watchdog);
    const elapsedS = (performance.now() - started) / 1000;
    const stuck = items.length - records.length + records.filter((r) => r.error?.startsWith("stuck")).length;
    const wasAborted = this.aborted;
    this.aborted = false;
    if (wasAborted) console.error(`! ${name}: aborted`);
    const rssMib = { start: rss0, end: mib(memoryOf(pids.workerd_runtime)?.rss) };
    return { name, n: items.length, concurrency, elapsedS, records, stuck, cpu: cpuDelta(cpu0, cpuSnapshot(pids)), rssMib, worker: null };
  }
}

export function cpuSnapshot(pids: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, pid] of Object.entries(pids)) out[name] = cpuSecondsOf(pid);
  const u = process.cpuUsage();
  out.bench_node = (u.user + u.system) / 1e6;
  out.machine_busy = machineBusySeconds();
  return out;
}

export function cpuDelta(a: Record<string, number>, b: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of Object.keys(b)) out[k] = Number((b[k] - a[k]).toFixed(2));
  // What other processes on the machine used meanwhile (a busy machine makes the figures noisy).
  const ours = Object.entries(out).filter(([k]) => k !== "machine_busy").reduce((s, [, v]) => s + (Number.isFinite(v) ? v : 0), 0);
  out.others = Number(Math.max(0, out.machine_busy - ours).toFixed(2));
  return out;
}

// ---------------------------------------------------------------- reporting ----

export interface PhaseReport {
  n: number;
  completed: number;
  failed: number;
  stuck: number;
  elapsed_s: number;
  throughput_per_s: number;
  latency_ms: Summary;
  ack_latency_ms?: Summary;
  overhead_first_ms: Summary;
  overhead_between_ms: Summary;
  overhead_per_stage_ms: Summary;
  callback_rtt_ms: Summary;
  tail_ms?: Summary;
  status_rtt_ms?: Summary;
  wait_delivery_ms?: Summary;
  /** Round trip of the request that started the execution. */
  start_rtt_ms?: Summary;
  attempts_per_execution: number;
  progress_polls: number;
  status_gets_per_execution?: number;
  cpu_s: Record<string, number>;
  cpu_ms_per_execution: Record<string, number>;
  /** The runtime's RSS at the phase's start and end, MiB (phases run one after the other in one runtime). */
  runtime_rss_mib: { start: number | null; end: number | null };
  worker_counters: WorkerStats["counters"] | null;
  errors: string[];
}

export function report(p: PhaseResult): PhaseReport {
  const ok = p.records.filter((r) => r.ok);
  const firsts = ok.map((r) => r.firstGapMs).filter((v): v is number => v !== null);
  const betweens = ok.flatMap((r) => r.betweenGapsMs);
  const acks = ok.map((r) => r.ackLatencyMs).filter((v): v is number => v !== null);
  const tails = ok.map((r) => r.tailMs).filter((v): v is number => v !== null);
  const per: Record<string, number> = {};
  for (const [k, v] of Object.entries(p.cpu)) per[k] = ok.length ? Number(((v * 1000) / ok.length).toFixed(2)) : Number.NaN;
  const failed = p.records.filter((r) => !r.ok && !r.error?.startsWith("stuck")).length;
  return {
    n: p.n,
    completed: ok.length,
    failed,
    stuck: p.stuck,
    elapsed_s: Number(p.elapsedS.toFixed(2)),
    throughput_per_s: Number((ok.length / p.elapsedS).toFixed(1)),
    latency_ms: summarize(ok.map((r) => r.latencyMs)),
    ...(acks.length ? { ack_latency_ms: summarize(acks) } : {}),
    overhead_first_ms: summarize(firsts),
    overhead_between_ms: summarize(betweens),
    overhead_per_stage_ms: summarize([...firsts, ...betweens]),
    callback_rtt_ms: summarize(ok.flatMap((r) => r.callbackRttMs)),
    ...(tails.length ? { tail_ms: summarize(tails) } : {}),
    ...(p.records.some((r) => r.statusGets > 0)
      ? {
          status_rtt_ms: summarize(ok.map((r) => r.statusRttMs).filter((v): v is number => v !== null)),
          wait_delivery_ms: summarize(ok.map((r) => r.waitDeliveryMs).filter((v): v is number => v !== null)),
          start_rtt_ms: summarize(ok.map((r) => r.startRttMs).filter((v): v is number => v !== undefined)),
        }
      : {}),
    attempts_per_execution: ok.length ? Number((ok.reduce((s, r) => s + r.attempts, 0) / ok.length).toFixed(3)) : 0,
    progress_polls: ok.reduce((s, r) => s + r.polls, 0),
    ...(p.records.some((r) => r.statusGets > 0) ? { status_gets_per_execution: ok.length ? Number((ok.reduce((s, r) => s + r.statusGets, 0) / ok.length).toFixed(2)) : 0 } : {}),
    cpu_s: p.cpu,
    cpu_ms_per_execution: per,
    runtime_rss_mib: p.rssMib,
    worker_counters: p.worker?.counters ?? null,
    errors: [...new Set(p.records.filter((r) => !r.ok).map((r) => r.error ?? "?"))].slice(0, 10),
  };
}

export function versions(tree: string) {
  const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
  const pkg = (name: string) => {
    try {
      return JSON.parse(readFileSync(path.join(root, "node_modules", name, "package.json"), "utf8")).version as string;
    } catch {
      return "?";
    }
  };
  let commit = "?";
  let dirty = false;
  try {
    const dir = existsSync(tree) ? path.resolve(tree) : root;
    const local = tree === "worktree" || dir !== root;
    commit = execFileSync("git", ["rev-parse", "--short=12", local ? "HEAD" : tree], { cwd: dir, encoding: "utf8" }).trim();
    dirty = local && execFileSync("git", ["status", "--porcelain", "--", "src", "actors", "schemas", "wrangler.toml", "bench/worker"], { cwd: dir, encoding: "utf8" }).trim() !== "";
  } catch {}
  return { node: process.version, wrangler: pkg("wrangler"), workerd: pkg("workerd"), tsx: pkg("tsx"), tree, commit, worktree_changes: dirty };
}

const MiB = 1024 * 1024;
export const mib = (b: number | null | undefined) => (b === null || b === undefined || !Number.isFinite(b) ? null : Number((b / MiB).toFixed(1)));

export function fmt(s: Summary | undefined): string {
  if (!s?.n) return "-";
  return `${s.p50} / ${s.p95} / ${s.p99}`;
}

function printTable(result: any): void {
  const o = result.orchestrated as PhaseReport;
  const f = result.floor as PhaseReport | null;
  const d = result.durable_floor as PhaseReport | null;
  const both = (fn: (p: PhaseReport) => string): [string, string] => [f ? fn(f) : "", d ? fn(d) : ""];
  const rows: string[][] = [
    ["", "orchestrated", f ? "floor" : "", d ? "durable floor" : ""],
    ["executions (completed/failed/stuck)", `${o.completed}/${o.failed}/${o.stuck}`, ...both((p) => `${p.completed}/${p.failed}/${p.stuck}`)],
    ["throughput (executions/s)", String(o.throughput_per_s), ...both((p) => String(p.throughput_per_s))],
    ["latency ms p50/p95/p99", fmt(o.latency_ms), ...both((p) => fmt(p.latency_ms))],
    ["  to last complete acknowledged", fmt(o.ack_latency_ms), "", ""],
    ["overhead per stage ms p50/p95/p99", fmt(o.overhead_per_stage_ms), ...both((p) => fmt(p.overhead_per_stage_ms))],
    ["  POST -> first handshake", fmt(o.overhead_first_ms), ...both((p) => fmt(p.overhead_first_ms))],
    ["  complete -> next handshake", fmt(o.overhead_between_ms), ...both((p) => fmt(p.overhead_between_ms))],
    ["complete callback round trip ms", fmt(o.callback_rtt_ms), ...both((p) => fmt(p.callback_rtt_ms))],
    ["last complete -> status completed", fmt(o.tail_ms), "", ""],
    ["  last ack -> bench has it", fmt(o.wait_delivery_ms), "", ""],
    ["  status read that saw completed", fmt(o.status_rtt_ms), "", ""],
    ["attempts per execution", String(o.attempts_per_execution), ...both((p) => String(p.attempts_per_execution))],
    ["progress polls", String(o.progress_polls), "", ""],
    ["CPU ms/execution workerd runtime", String(o.cpu_ms_per_execution.workerd_runtime ?? "-"), ...both((p) => String(p.cpu_ms_per_execution.workerd_runtime ?? "-"))],
    ["CPU ms/execution workerd proxy", String(o.cpu_ms_per_execution.workerd_proxy ?? "-"), ...both((p) => String(p.cpu_ms_per_execution.workerd_proxy ?? "-"))],
    ["CPU ms/execution bench (node)", String(o.cpu_ms_per_execution.bench_node ?? "-"), ...both((p) => String(p.cpu_ms_per_execution.bench_node ?? "-"))],
  ];
  const width = (i: number) => Math.max(...rows.map((r) => r[i].length));
  const [w0, w1, w2] = [width(0), width(1), width(2)];
  console.log("");
  console.log(`e2e bench: ${result.n} executions of ${BENCH_TEMPLATE} (3 stages), ${result.concurrency} in flight, seed ${result.seed}, callback ${result.callback}, ${result.cores} cores`);
  for (const r of rows) console.log(`  ${r[0].padEnd(w0)}  ${r[1].padEnd(w1)}  ${r[2].padEnd(w2)}  ${r[3]}`.trimEnd());
  if (result.ratio) {
    console.log(`  ratio orchestrated/floor: throughput ${result.ratio.throughput}, latency p50 ${result.ratio.latency_p50}, p99 ${result.ratio.latency_p99}`);
  }
  if (result.ratio_durable_floor) {
    const r = result.ratio_durable_floor;
    console.log(`  durable floor: its throughput is ${r.durable_floor_vs_floor} of the floor's; orchestrated/durable floor: throughput ${r.throughput}, latency p50 ${r.latency_p50}`);
  }
  for (const [name, ph] of [["orchestrated", o], ["floor", f], ["durable floor", d]] as const) {
    if (ph && ph.cpu_s.others > 0.1 * ph.elapsed_s) {
      console.log(`  ! noisy machine: other processes used ${ph.cpu_s.others} CPU-s during the ${name} phase (${ph.elapsed_s} s): figures are not representative`);
    }
  }
  const m = result.memory;
  console.log(
    `  workerd runtime RSS MiB: before ${m.runtime_rss_before_mib}, peak ${m.runtime_rss_peak_mib}, end ${m.runtime_rss_end_mib}, after ${m.settle_ms} ms idle ${m.runtime_rss_settled_mib} (growth ${m.runtime_growth_mib}); VmHWM ${m.runtime_hwm_mib}; proxy peak ${m.proxy_rss_peak_mib}; open fds ${m.runtime_fds_before} -> ${m.runtime_fds_settled}${m.runtime_alive_at_end ? "" : " (runtime process gone: crashed or restarted)"}`,
  );
  const phases = [["floor", f], ["durable floor", d], ["orchestrated", o]] as const;
  console.log(`  runtime RSS MiB by phase (start -> end): ${phases.filter(([, p]) => p).map(([n, p]) => `${n} ${p!.runtime_rss_mib.start} -> ${p!.runtime_rss_mib.end}`).join("; ")}`);
  console.log("  targets:");
  for (const t of result.targets) console.log(`    ${t.met === null ? "n/a " : t.met ? "MET " : "MISS"} ${t.name}: ${t.measured}${t.met === false && t.by ? ` (${t.by})` : ""}`);
  if (o.errors.length) console.log(`  orchestrated errors: ${o.errors.join(" | ")}`);
  if (f?.errors.length) console.log(`  floor errors: ${f.errors.join(" | ")}`);
  if (d?.errors.length) console.log(`  durable floor errors: ${d.errors.join(" | ")}`);
  console.log("");
}

// --------------------------------------------------------------------- main ----

/** The secrets and vars of a bench session (fresh tokens for each run). */
function sessionSetup(opts: Options) {
  const token = () => Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex");
  const workerSecret = token();
  const secrets = {
    CALLBACK_SECRET: token(),
    WORKER_SECRETS: JSON.stringify({ [BENCH_WORKER]: workerSecret }),
    WORKER_SECRET: workerSecret,
    KAM_TOKEN: token(),
    OPS_TOKEN: token(),
    NOTIFY_SECRET: token(),
  };
  const pools = [
    // The fan-out runs 100 items at once (bench_fan_out's max_parallel): the pool must not be what caps it.
    { name: `worker:${BENCH_WORKER}`, kind: "concurrency", capacity: Math.max(opts.fanOut ? 200 : 64, 2 * opts.concurrency) },
    { name: "tokens:openai", kind: "rate", capacity: 1e12, refill_per_second: 1e9 },
  ];
  const vars = {
    WORKER_BINDINGS: JSON.stringify({ [BENCH_WORKER]: BENCH_BINDING }),
    POOLS: JSON.stringify(pools),
    TUNING: "{}",
    LOG_LEVEL: "warn",
  };
  return { secrets, vars };
}

/** A running bench session: wrangler dev, its workerd processes, an RSS sampler of them, and the bench client. */
export interface OpenSession {
  session: BenchSession;
  procs: { runtime: number; proxy: number[] };
  pids: Record<string, number>;
  sampler: RssSampler;
  bench: Bench;
}

/** The session being run, stopped on Ctrl-C or a kill (its own process group) before leaving. */
let current: BenchSession | null = null;
let stopping = false;
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(sig, () => {
    if (stopping) return;
    stopping = true;
    console.error(`${sig}: stopping the session`);
    (current?.stop() ?? Promise.resolve()).finally(() => process.exit(130));
  });
}

/** Starts a bench session with fresh local state (a new workerd runtime); `close` stops it. */
export async function openSession(opts: Options): Promise<OpenSession & { close: () => Promise<void> }> {
  const { secrets, vars } = sessionSetup(opts);
  const t0 = performance.now();
  console.error(`starting wrangler dev (gateway, orchestrator, ${BENCH_WORKER}, bench KAM)...`);
  const session = await startBenchSession({
    vars,
    secrets,
    quiet: true,
    tree: opts.tree,
    overrides: opts.observability === "off" ? { observability: { enabled: false } } : {},
    localObservability: opts.localObservability,
    extraConfigs: opts.vsWorkflows ? ["bench/worker/workflows.wrangler.toml"] : [],
  });
  current = session;
  let sampler: RssSampler | null = null;
  let bench: Bench | null = null;
  const close = async () => {
    sampler?.stop();
    bench?.client.close();
    await session.stop();
    if (current === session) current = null;
  };
  try {
    const procs = workerdProcesses(session.pid);
    if (!procs.runtime) throw new Error(`cannot tell the workerd runtime among ${JSON.stringify(procs)}`);
    const pids: Record<string, number> = { workerd_runtime: procs.runtime };
    if (procs.proxy[0]) pids.workerd_proxy = procs.proxy[0];
    const cli = descendants(session.pid).find((p) => p.comm.startsWith("node"));
    if (cli) pids.wrangler_node = cli.pid;
    sampler = new RssSampler(Object.values(pids), 250).start();
    bench = new Bench(session, secrets, opts);
    console.error(`session ${session.url} up in ${((performance.now() - t0) / 1000).toFixed(1)} s; workerd runtime pid ${procs.runtime}, proxy ${procs.proxy.join(",")}`);
    return { session, procs: { runtime: procs.runtime, proxy: procs.proxy }, pids, sampler, bench, close };
  } catch (err) {
    await close();
    throw err;
  }
}

async function main(): Promise<number> {
  const opts = parseArgs(process.argv.slice(2));
  const startedAt = new Date();
  const t0 = performance.now();
  if (opts.memory) return await runMemory(opts, () => openSession(opts), startedAt);
  const open = await openSession(opts);
  const { procs, pids, sampler, bench: b } = open;
  try {
    if (opts.vsWorkflows) return await runVsWorkflows(b, opts, pids, startedAt);
    if (opts.statusReads) {
      if (opts.perfRecord) mkdirSync(opts.perfRecord, { recursive: true });
      const result = await runStatusReads(b, { seconds: opts.readSeconds, concurrency: opts.readConcurrency, rounds: opts.rounds, pids, perfDir: opts.perfRecord });
      const out = opts.jsonOut ?? path.join(path.dirname(new URL(import.meta.url).pathname), "results", `e2e-status-reads-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
      mkdirSync(path.dirname(out), { recursive: true });
      writeFileSync(out, JSON.stringify({ ...result, started_at: startedAt.toISOString(), cores: os.cpus().length, loadavg: os.loadavg(), versions: versions(opts.tree) }, null, 2));
      return 0;
    }
    if (opts.fanOut) {
      const result = await runFanOut(b, opts, { items: opts.fanItems, workMs: opts.fanWorkMs, rounds: opts.fanRounds, lineMax: opts.fanLineMax }, pids);
      const out = opts.jsonOut ?? path.join(path.dirname(new URL(import.meta.url).pathname), "results", `e2e-fan-out-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
      mkdirSync(path.dirname(out), { recursive: true });
      writeFileSync(out, JSON.stringify({ ...result, started_at: startedAt.toISOString(), cores: os.cpus().length, loadavg: os.loadavg(), versions: versions(opts.tree) }, null, 2));
      return 0;
    }

    const items = workload(opts.n, opts.seed, opts.callback, opts.workMs);
    const warm = workload(opts.warmup, opts.seed + 1, opts.callback, opts.workMs);
    if (opts.warmup) {
      console.error(`warm-up: ${opts.warmup} orchestrated${opts.floor ? " + floor" : ""}...`);
      const w1 = await b.phase("warmup", warm, Math.min(opts.concurrency, 50), (it) => b.orchestrated(it), pids);
      const bad = w1.records.filter((r) => !r.ok);
      if (bad.length) throw new Error(`warm-up failed: ${bad.length} of ${warm.length}: ${bad[0].error}`);
      if (opts.floor) await b.phase("warmup-floor", warm, Math.min(opts.concurrency, 50), (it, i) => b.floor(it, 1e7 + i), pids);
      if (opts.floor && opts.durableFloor) await b.phase("warmup-durable-floor", warm, Math.min(opts.concurrency, 50), (it, i) => b.floor(it, 1e7 + i, true), pids);
    }

    // Assigned in runFloors (maybe after the orchestrated phase): typed so TypeScript does not narrow them to null here.
    let floor = null as PhaseResult | null;
    let durableFloor = null as PhaseResult | null;
    const runFloors = async () => {
      if (opts.floor && opts.plainFloor) {
        console.error(`floor: ${opts.n} at ${opts.concurrency} in flight...`);
        await b.workerStats(true);
        floor = await b.phase("floor", items, opts.concurrency, (it, i) => b.floor(it, i), pids);
        floor.worker = await b.workerStats(true);
      }
      if (opts.floor && opts.durableFloor) {
        console.error(`durable floor: ${opts.n} at ${opts.concurrency} in flight...`);
        durableFloor = await b.phase("durable-floor", items, opts.concurrency, (it, i) => b.floor(it, i, true), pids);
        durableFloor.worker = await b.workerStats(true);
      }
    };
    if (!opts.orchestratedFirst) await runFloors();

    console.error(`orchestrated: ${opts.n} at ${opts.concurrency} in flight...`);
    await b.workerStats(true);
    await sleep(1000);
    const before = sampler.sample()[procs.runtime];
    const orchStart = Date.now();
    const fdsBefore = openFds(procs.runtime);
    const checkpoints: { completed: number; rss_mib: number | null; fds: number | null }[] = [{ completed: 0, rss_mib: mib(before), fds: fdsBefore }];
    const every = Math.max(1, Math.floor(opts.n / 10));
    const fsyncCounter = opts.fsyncs ? new FsyncCounter() : null;
    await fsyncCounter?.start(procs.runtime);
    const orch = await b.phase("orchestrated", items, opts.concurrency, (it) => b.orchestrated(it), pids, (done) => {
      if (done % every === 0) checkpoints.push({ completed: done, rss_mib: mib(memoryOf(procs.runtime!)?.rss), fds: openFds(procs.runtime!) });
    });
    // The background deliveries (index, last settle) trail the last execution by a few ms.
    if (fsyncCounter) await sleep(3000);
    const fsyncs = fsyncCounter ? await fsyncCounter.stop(orch.n) : null;
    if (fsyncs) console.error(`fsyncs per execution: ${JSON.stringify(fsyncs.per_execution)}; one Execution's commits, median: ${fsyncs.execution_commits_median}`);
    orch.worker = await b.workerStats(true);
    const end = sampler.sample()[procs.runtime];
    const peak = sampler.peak(procs.runtime, orchStart);
    const proxyPeak = procs.proxy[0] ? sampler.peak(procs.proxy[0], orchStart) : null;
    console.error(`settling ${opts.settleMs} ms...`);
    await sleep(opts.settleMs);
    const settled = sampler.sample()[procs.runtime];
    const fdsSettled = openFds(procs.runtime);
    if (opts.orchestratedFirst) await runFloors();
    if (fdsSettled === null) console.error(`! the workerd runtime (pid ${procs.runtime}) is gone: it crashed or wrangler restarted it during the run`);
    const hwm = memoryOf(procs.runtime)?.hwm ?? null;
    const leftovers = await b.workerStats();
    const resources = await b.client.request<any>("GET", "/resources", { headers: b.ops, timeoutMs: 10_000 }).catch((e) => ({ status: 0, body: String(e) }));

    const o = report(orch);
    const f = floor ? report(floor) : null;
    const d = durableFloor ? report(durableFloor) : null;
    const ratio = f
      ? {
          throughput: Number((o.throughput_per_s / f.throughput_per_s).toFixed(3)),
          latency_p50: Number((o.latency_ms.p50 / f.latency_ms.p50).toFixed(2)),
          latency_p95: Number((o.latency_ms.p95 / f.latency_ms.p95).toFixed(2)),
          latency_p99: Number((o.latency_ms.p99 / f.latency_ms.p99).toFixed(2)),
        }
      : null;
    const ratioDurable =
      f && d
        ? {
            durable_floor_vs_floor: Number((d.throughput_per_s / f.throughput_per_s).toFixed(3)),
            throughput: Number((o.throughput_per_s / d.throughput_per_s).toFixed(3)),
            latency_p50: Number((o.latency_ms.p50 / d.latency_ms.p50).toFixed(2)),
          }
        : null;
    const growth = settled - before;
    const memory = {
      runtime_pid: procs.runtime,
      runtime_rss_before_mib: mib(before),
      runtime_rss_peak_mib: mib(peak),
      runtime_rss_end_mib: mib(end),
      runtime_rss_settled_mib: mib(settled),
      runtime_growth_mib: mib(growth),
      runtime_growth_per_execution_bytes: Math.round(growth / Math.max(1, o.completed)),
      runtime_hwm_mib: mib(hwm),
      runtime_fds_before: fdsBefore,
      runtime_fds_settled: fdsSettled,
      runtime_alive_at_end: fdsSettled !== null,
      proxy_rss_peak_mib: mib(proxyPeak),
      settle_ms: opts.settleMs,
      checkpoints,
    };
    const ledger = resources.status === 200 ? { leases: resources.body.leases, waiters: resources.body.waiters, pools: resources.body.pools?.map((p: any) => ({ name: p.name, in_use: p.in_use, waiting: p.waiting })) } : { error: `GET /resources answered ${resources.status}` };
    const memoryBoundMib = 64;
    const targets = [
      { name: "throughput >= 200 executions/s at 200 in flight", measured: `${o.throughput_per_s}/s at ${opts.concurrency}`, met: opts.concurrency >= 200 ? o.throughput_per_s >= 200 : null, by: o.throughput_per_s < 200 ? `${(200 - o.throughput_per_s).toFixed(1)}/s short (${((o.throughput_per_s / 200) * 100).toFixed(0)}% of target)` : undefined },
      { name: "overhead per stage p50 <= 5 ms", measured: `${o.overhead_per_stage_ms.p50} ms (first ${o.overhead_first_ms.p50}, between ${o.overhead_between_ms.p50})`, met: o.overhead_per_stage_ms.p50 <= 5, by: `${(o.overhead_per_stage_ms.p50 - 5).toFixed(1)} ms over` },
      { name: "overhead per stage p99 <= 30 ms", measured: `${o.overhead_per_stage_ms.p99} ms (first ${o.overhead_first_ms.p99}, between ${o.overhead_between_ms.p99})`, met: o.overhead_per_stage_ms.p99 <= 30, by: `${(o.overhead_per_stage_ms.p99 - 30).toFixed(1)} ms over` },
      { name: "throughput >= 50% of the floor", measured: ratio ? `${(ratio.throughput * 100).toFixed(1)}%` : "no floor", met: ratio ? ratio.throughput >= 0.5 : null, by: ratio ? `${((0.5 - ratio.throughput) * 100).toFixed(1)} points short` : undefined },
      { name: `workerd growth <= ${memoryBoundMib} MiB across the run after ${opts.settleMs} ms idle (judged at >= 10000)`, measured: `${mib(growth)} MiB over ${o.completed} executions`, met: opts.n >= 10_000 ? growth <= memoryBoundMib * MiB : null, by: `${(mib(growth - memoryBoundMib * MiB) ?? 0)} MiB over` },
      { name: "zero failed or stuck executions", measured: `${o.failed} failed, ${o.stuck} stuck${f ? `; floor ${f.failed}/${f.stuck}` : ""}${d ? `; durable floor ${d.failed}/${d.stuck}` : ""}`, met: o.failed === 0 && o.stuck === 0 && (!f || (f.failed === 0 && f.stuck === 0)) && (!d || (d.failed === 0 && d.stuck === 0)) },
    ];
    // Issue 17's targets against the durable floor (2, 5, 6, 7), each a ratio in this run.
    const late = orch.records.filter((r) => r.error?.startsWith("execute:") && r.error.includes("no answer within")).length;
    const dGrowth = durableFloor && durableFloor.rssMib.start !== null && durableFloor.rssMib.end !== null ? durableFloor.rssMib.end - durableFloor.rssMib.start : null;
    const oGrowth = orch.rssMib.start !== null && orch.rssMib.end !== null ? orch.rssMib.end - orch.rssMib.start : null;
    const x = (a: number, b: number) => Number((a / b).toFixed(2));
    const vsDurable = d
      ? {
          throughput: x(o.throughput_per_s, d.throughput_per_s),
          runtime_cpu_per_execution: x(o.cpu_ms_per_execution.workerd_runtime, d.cpu_ms_per_execution.workerd_runtime),
          overhead_per_stage_p50: x(o.overhead_per_stage_ms.p50, d.overhead_per_stage_ms.p50),
          overhead_per_stage_p99: x(o.overhead_per_stage_ms.p99, d.overhead_per_stage_ms.p99),
          // Each phase's RSS end - start; the durable floor runs first, on the heap the floor grew.
          memory_growth_mib: { orchestrated: oGrowth === null ? null : Number(oGrowth.toFixed(1)), durable_floor: dGrowth === null ? null : Number(dGrowth.toFixed(1)), ratio: oGrowth !== null && dGrowth ? x(oGrowth, dGrowth) : null },
        }
      : null;
    if (vsDurable) {
      targets.push(
        { name: "issue 17 (2): throughput >= 0.6x the durable floor's", measured: `${vsDurable.throughput}x`, met: vsDurable.throughput >= 0.6, by: `${(0.6 - vsDurable.throughput).toFixed(2)} short` },
        { name: "issue 17 (2): runtime CPU per execution <= 1.7x the durable floor's", measured: `${vsDurable.runtime_cpu_per_execution}x (${o.cpu_ms_per_execution.workerd_runtime} / ${d!.cpu_ms_per_execution.workerd_runtime} ms)`, met: vsDurable.runtime_cpu_per_execution <= 1.7, by: `${(vsDurable.runtime_cpu_per_execution - 1.7).toFixed(2)} over` },
        { name: "issue 17 (5): overhead per stage p50 <= 1.5x the durable floor's (judged at 1 in flight)", measured: `${vsDurable.overhead_per_stage_p50}x (${o.overhead_per_stage_ms.p50} / ${d!.overhead_per_stage_ms.p50} ms)`, met: opts.concurrency === 1 ? vsDurable.overhead_per_stage_p50 <= 1.5 : null, by: `${(vsDurable.overhead_per_stage_p50 - 1.5).toFixed(2)} over` },
        { name: "issue 17 (5): overhead per stage p99 <= 3x the durable floor's (judged at 1 in flight)", measured: `${vsDurable.overhead_per_stage_p99}x (${o.overhead_per_stage_ms.p99} / ${d!.overhead_per_stage_ms.p99} ms)`, met: opts.concurrency === 1 ? vsDurable.overhead_per_stage_p99 <= 3 : null, by: `${(vsDurable.overhead_per_stage_p99 - 3).toFixed(2)} over` },
        { name: "issue 17 (7): runtime memory growth <= 1.2x the durable floor's over the same executions (judged at >= 10000)", measured: `${vsDurable.memory_growth_mib.ratio}x (${oGrowth?.toFixed(1)} / ${dGrowth?.toFixed(1)} MiB)`, met: opts.n >= 10_000 && vsDurable.memory_growth_mib.ratio !== null ? vsDurable.memory_growth_mib.ratio <= 1.2 : null, by: `${((vsDurable.memory_growth_mib.ratio ?? 0) - 1.2).toFixed(2)} over` },
      );
    }
    targets.push({ name: `issue 17 (6): zero failed, zero late (POST unanswered in 30 s) at 200 in flight`, measured: `${o.failed} failed (${late} late), ${o.stuck} stuck at ${opts.concurrency} in flight`, met: opts.concurrency >= 200 ? o.failed === 0 && o.stuck === 0 : null, by: `${o.failed + o.stuck} executions` });
    const result = {
      bench: "e2e",
      date: startedAt.toISOString(),
      mode: opts.quick ? "quick" : opts.soak ? "soak" : "full",
      n: opts.n,
      concurrency: opts.concurrency,
      warmup: opts.warmup,
      seed: opts.seed,
      callback: opts.callback,
      work_ms: opts.workMs,
      observability: opts.observability,
      local_observability: opts.localObservability,
      template: BENCH_TEMPLATE,
      stages: BENCH_STAGES,
      cores: os.cpus().length,
      cpu_model: os.cpus()[0]?.model ?? "?",
      versions: versions(opts.tree),
      orchestrated: o,
      floor: f,
      durable_floor: d,
      ratio,
      ratio_durable_floor: ratioDurable,
      vs_durable_floor: vsDurable,
      late_posts: late,
      requests_resent: b.client.resent,
      loadavg: os.loadavg(),
      memory,
      ledger_after: ledger,
      ...(fsyncs ? { fsyncs } : {}),
      bench_worker_after: leftovers?.sizes ?? null,
      targets,
      total_s: Number(((performance.now() - t0) / 1000).toFixed(1)),
    };
    printTable(result);
    const line = JSON.stringify(result);
    console.log(line);
    const out = opts.jsonOut ?? path.join(path.dirname(new URL(import.meta.url).pathname), "results", `e2e-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
    mkdirSync(path.dirname(out), { recursive: true });
    writeFileSync(out, `${line}\n`);
    console.error(`wrote ${out}`);
    const broken = o.failed + o.stuck + (f ? f.failed + f.stuck : 0) + (d ? d.failed + d.stuck : 0);
    return broken > 0 ? 1 : 0;
  } finally {
    await open.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`bench failed: ${err instanceof Error ? err.stack : String(err)}`);
    process.exit(2);
  },
);
