import { DurableObject } from "cloudflare:workers";
import { CancelRequest, HandshakeRequest, ProcessRequest } from "../../schemas/worker-protocol";
import { type ContractEnv, onContract } from "./contract-floor";
import { bounded, type Completion, startStage, type Waiter, waitIn } from "./stage-driver";
import {
  BENCH_STAGES,
  BENCH_WORKER,
  bearer,
  error,
  json,
  type ExecTimings,
  type FloorAnswer,
  SINK_ORIGIN,
  STAGE_USAGE,
  type StageTiming,
  type WaitAnswer,
  type WorkerCounters,
  type WorkerStats,
  WF_ORIGIN,
} from "./shared";

/**
 * bitware-bench-worker: a zero-work stage worker for bench/e2e.ts.
 *
 * Protocol (docs/protocol.md §3): the handshake accepts at once; process answers
 * 202 and completes at once (or after `parameters.bench_work_ms`) by calling back `complete` with a tiny output
 * (stage_1 with `parameters.bench_items`: `{ items: [0..n-1] }`, the fan-out workload's list) and
 * usage `{ "tokens:openai": 10 }`, in `ctx.waitUntil` (default) or before
 * answering (`parameters.bench_callback = "sync"`); progress answers completed
 * if polled; cancel is a no-op. Bodies are validated with the same zod schemas
 * as the orchestrator's, so the worker does the parsing a real worker does.
 *
 * Bench endpoints (Bearer WORKER_SECRET):
 * - `GET /bench/wait/{executionId}?timeout_ms=` answers when the last stage's
 *   `complete` has been acknowledged (or on timeout) with the execution's
 *   timings, which it then forgets: the bench script learns completions
 *   without polling the orchestrator's status, and the worker keeps nothing.
 * - `POST /bench/floor` `{ executionId, parameters }`: the floor, the same
 *   stages driven from here with no orchestrator: handshake and process through
 *   SELF, the callback goes to `/bench/sink` through SELF, the next stage starts
 *   when the sink has it.
 * - `POST /bench/floor` `{ executionId, parameters, durable: true }`: the durable
 *   floor, the least a crash-safe orchestrator of this design does: the same
 *   run inside one `FloorRun` Durable Object per execution (SQLite), which
 *   records each stage as started before its handshake and as completed when
 *   the callback, routed through the object (`/bench/sink/durable/...`),
 *   arrives. No ledger, no alarm, no index, no authentication, no validation.
 * - `/bench/contract/...`: the contract floor (bench/worker/contract-floor.ts),
 *   the durable floor plus what the orchestrator's contract adds, in the
 *   orchestrator's shape (start, status, a ledger object).
 * - `GET /bench/stats`, `POST /bench/reset`: counters and map sizes.
 *
 * State is in isolate memory: `wrangler dev` runs one isolate per worker, and
 * every map is bounded (the oldest entries go first).
 *
 * Clock: workerd freezes Date.now() while JavaScript runs (Spectre mitigation);
 * it advances across I/O, so a timestamp is the time the request (or the last
 * awaited I/O) started, to the millisecond. That is enough for events that are
 * separate requests, which is all this records.
 */
interface Fetcher {
  fetch(input: Request | string, init?: RequestInit): Promise<Response>;
}
interface Ctx {
  waitUntil(promise: Promise<unknown>): void;
}
export interface BenchEnv extends ContractEnv {
  WORKER_SECRET: string;
  ORCHESTRATOR: Fetcher;
  SELF: Fetcher;
  /** The Workflows implementation's callback routes (only in a `--vs-workflows` session). */
  WORKFLOWS: Fetcher;
  FLOOR_RUN: DurableObjectNamespace<FloorRun>;
}

interface Job {
  executionId: string;
  stageId: string;
  attempt: number;
  callbackUrl: string;
  token: string;
  last: boolean;
  sync: boolean;
  /** ms of pretended work between `process` and `complete` (`parameters.bench_work_ms`, 0 by default). */
  workMs: number;
  /** The pretended work is done (a progress poll says completed only then). */
  worked: boolean;
  processed: boolean;
  output: unknown;
  timing: StageTiming;
}

const jobs = new Map<string, Job>();
const execs = new Map<string, ExecTimings>();
const execWaiters = new Map<string, (rec: ExecTimings | null) => void>();
const sinkWaiters = new Map<string, Waiter>();
let counters = zeroCounters();

function zeroCounters(): WorkerCounters {
  return { handshake: 0, process: 0, progress: 0, cancel: 0, callbacks: 0, callbackFailures: 0, sink: 0, floor: 0, unknownJob: 0 };
}

const PROGRESS_PATH = /^\/api\/progress\/([^/]+)$/;
const WAIT_PATH = /^\/bench\/wait\/([^/]+)$/;
const SINK_PATH = /^\/bench\/sink\/(?:(durable)\/)?([^/]+)\/stages\/([^/]+)\/(complete|progress|fail)$/;

export default {
  async fetch(request: Request, env: BenchEnv, ctx: Ctx): Promise<Response> {
    const url = new URL(request.url);
    const path = url.pathname;
    if (path === "/health") return json(200, { status: "ok" });
    // The contract floor's routes check their own tokens (KAM's, the stage's).
    const contract =
      path.startsWith("/bench/contract/") || path.startsWith("/bench/sink/contract/")
        ? await onContract(request, env, path).catch((err: unknown) => error(500, "internal_error", err instanceof Error ? err.message : String(err)))
        : null;
    if (contract) return contract;
    const sink = SINK_PATH.exec(path);
    if (sink) return onSink(request, env, sink[1] === "durable", sink[2], sink[3], sink[4]);
    if (!env.WORKER_SECRET) return error(500, "not_configured", "WORKER_SECRET is not set");
    if (bearer(request) !== env.WORKER_SECRET) return error(401, "unauthorized", "missing or wrong bearer token");
    try {
      if (request.method === "POST" && path === "/api/handshake") return await onHandshake(request);
      if (request.method === "POST" && path === "/api/process") return await onProcess(request, env, ctx);
      const progress = PROGRESS_PATH.exec(path);
      if (request.method === "GET" && progress) return onProgress(decodeURIComponent(progress[1]), url.searchParams.get("stageId") ?? "");
      if (request.method === "POST" && path === "/api/cancel") return await onCancel(request);
      const wait = WAIT_PATH.exec(path);
      if (request.method === "GET" && wait) return await onWait(decodeURIComponent(wait[1]), Number(url.searchParams.get("timeout_ms") ?? 30_000));
      if (request.method === "POST" && path === "/bench/floor") return await onFloor(request, env);
      if (request.method === "GET" && path === "/bench/stats") return json(200, stats());
      if (request.method === "POST" && path === "/bench/reset") {
        const before = stats();
        counters = zeroCounters();
        return json(200, before);
      }
      return error(404, "not_found", `no route for ${request.method} ${path}`);
    } catch (err) {
      return error(500, "internal_error", err instanceof Error ? err.message : String(err));
    }
  },
};

// ------------------------------------------------------------ protocol ----

async function onHandshake(request: Request): Promise<Response> {
  const parsed = HandshakeRequest.safeParse(await request.json().catch(() => null));
  if (!parsed.success) return error(400, "invalid_request", "the body does not match the protocol");
  const hs = parsed.data;
  const now = Date.now();
  counters.handshake++;
  const key = `${hs.executionId}|${hs.stageId}`;
  const existing = jobs.get(key);
  if (existing && existing.attempt === hs.attempt) {
    existing.timing.handshakes++;
  } else {
    const params = hs.inputData.parameters;
    const total = Number(params.bench_stages ?? BENCH_STAGES);
    const timing: StageTiming = { stage: hs.stageId, attempt: hs.attempt, hs: now, pr: null, cs: null, ca: null, status: null, handshakes: 1 };
    execFor(hs.executionId).stages.push(timing);
    bounded(jobs, key, {
      executionId: hs.executionId,
      stageId: hs.stageId,
      attempt: hs.attempt,
      callbackUrl: hs.callback.url,
      token: hs.callback.token,
      last: hs.stageId === `stage_${total}`,
      sync: params.bench_callback === "sync",
      workMs: Math.min(60_000, Math.max(0, Number(params.bench_work_ms ?? 0) || 0)),
      worked: false,
      processed: false,
      // The fan-out workload's first stage lists `bench_items` entries for stage 2's `for_each: "/items"`.
      output:
        hs.stageId === "stage_1" && params.bench_items !== undefined
          ? { items: Array.from({ length: Math.min(10_000, Math.max(0, Number(params.bench_items) || 0)) }, (_, i) => i) }
          : { stage: hs.stageId, action: hs.action, ok: true },
      timing,
    });
  }
  return json(200, { executionId: hs.executionId, workerId: BENCH_WORKER, accepted: true, estimatedCompletionMs: 0 });
}

async function onProcess(request: Request, env: BenchEnv, ctx: Ctx): Promise<Response> {
  const parsed = ProcessRequest.safeParse(await request.json().catch(() => null));
  if (!parsed.success) return error(400, "invalid_request", "the body does not match the protocol");
  counters.process++;
  const job = jobs.get(`${parsed.data.executionId}|${parsed.data.stageId}`);
  if (!job) {
    counters.unknownJob++;
    return error(404, "not_found", "no such job");
  }
  job.timing.pr ??= Date.now();
  if (job.processed) return json(202, { status: "processing" });
  job.processed = true;
  const work = job.workMs > 0 ? new Promise((r) => setTimeout(r, job.workMs)) : Promise.resolve();
  const done = work.then(() => {
    job.worked = true;
    return complete(job, env);
  });
  if (job.sync) await done;
  else ctx.waitUntil(done);
  return json(202, { status: "processing" });
}

function onProgress(executionId: string, stageId: string): Response {
  counters.progress++;
  const rec = execs.get(executionId);
  if (rec) rec.polls++;
  const job = jobs.get(`${executionId}|${stageId}`);
  if (!job) return error(404, "not_found", "no such job");
  if (!job.processed || !job.worked) return json(200, { status: "processing", progress: 0 });
  return json(200, { status: "completed", progress: 100, output: job.output, usage: STAGE_USAGE });
}

async function onCancel(request: Request): Promise<Response> {
  const parsed = CancelRequest.safeParse(await request.json().catch(() => null));
  if (!parsed.success) return error(400, "invalid_request", "the body does not match the protocol");
  counters.cancel++;
  const rec = execs.get(parsed.data.executionId);
  if (rec) rec.cancels++;
  jobs.delete(`${parsed.data.executionId}|${parsed.data.stageId}`);
  return json(200, { cancelled: false, status: "completed" });
}

/** The worker signalling completion: `POST {callback.url}/complete` through ORCHESTRATOR (SELF for the floor's sink, WORKFLOWS for the Workflows implementation). */
async function complete(job: Job, env: BenchEnv): Promise<void> {
  const target = job.callbackUrl.startsWith(`${SINK_ORIGIN}/bench/sink/`) ? env.SELF : job.callbackUrl.startsWith(`${WF_ORIGIN}/`) ? env.WORKFLOWS : env.ORCHESTRATOR;
  const body = JSON.stringify({ output: job.output, usage: STAGE_USAGE });
  job.timing.cs = Date.now();
  counters.callbacks++;
  let status = 0;
  try {
    const res = await target.fetch(`${job.callbackUrl}/complete`, {
      method: "POST",
      headers: { authorization: `Bearer ${job.token}`, "content-type": "application/json" },
      body,
    });
    status = res.status;
    await res.arrayBuffer();
  } catch {
    status = 0;
  }
  job.timing.ca = Date.now();
  job.timing.status = status;
  const rec = execs.get(job.executionId);
  if (status >= 200 && status < 300) {
    // Acknowledged: the orchestrator will not poll this stage any more.
    jobs.delete(`${job.executionId}|${job.stageId}`);
    if (job.last && rec) {
      rec.done = true;
      rec.ended = true;
      wake(rec);
    }
  } else {
    counters.callbackFailures++;
    if (rec) {
      rec.callbackFailures++;
      if (job.last) {
        rec.ended = true;
        wake(rec);
      }
    }
  }
}

// --------------------------------------------------------------- bench ----

function execFor(id: string): ExecTimings {
  let rec = execs.get(id);
  if (!rec) {
    rec = { id, stages: [], done: false, ended: false, callbackFailures: 0, polls: 0, cancels: 0 };
    bounded(execs, id, rec);
  }
  return rec;
}

function wake(rec: ExecTimings): void {
  const waiter = execWaiters.get(rec.id);
  if (!waiter) return;
  execWaiters.delete(rec.id);
  execs.delete(rec.id);
  waiter(rec);
}

async function onWait(id: string, timeoutMs: number): Promise<Response> {
  const ready = execs.get(id);
  if (ready?.ended) {
    execs.delete(id);
    return json(200, { done: ready.done, timings: ready } satisfies WaitAnswer);
  }
  execWaiters.get(id)?.(null);
  let timer: ReturnType<typeof setTimeout> | null = null;
  let mine: ((rec: ExecTimings | null) => void) | undefined;
  const rec = await new Promise<ExecTimings | null>((resolve) => {
    mine = resolve;
    bounded(execWaiters, id, resolve);
    timer = setTimeout(() => resolve(null), Math.min(Math.max(10, timeoutMs || 0), 120_000));
  });
  clearTimeout(timer);
  if (rec) return json(200, { done: rec.done, timings: rec } satisfies WaitAnswer);
  if (execWaiters.get(id) === mine) execWaiters.delete(id);
  return json(200, { done: false, timings: execs.get(id) ?? null } satisfies WaitAnswer);
}

/** The floor: the same stages with no orchestrator (in memory, or in a FloorRun object when `durable`). */
async function onFloor(request: Request, env: BenchEnv): Promise<Response> {
  counters.floor++;
  const { executionId, parameters, durable } = (await request.json()) as { executionId: string; parameters: Record<string, unknown>; durable?: boolean };
  if (!durable) return json(200, await driveFloor(env, executionId, parameters, { sinkBase: `${SINK_ORIGIN}/bench/sink/${executionId}`, completion: sinkCompletion(executionId) }));
  return json(200, await env.FLOOR_RUN.get(env.FLOOR_RUN.idFromName(executionId)).run(executionId, parameters));
}

/** The in-memory floor: waiters in this isolate's sinkWaiters, resolved by onSink. */
function sinkCompletion(executionId: string): Completion {
  return (stageId, token) => waitIn(sinkWaiters, `${executionId}|${stageId}`, token);
}

/**
 * Drives the stages one after the other: handshake and process through SELF,
 * then waits for the stage's completion at the sink. `record` (durable floor)
 * persists each stage as started before its handshake.
 */
async function driveFloor(
  env: BenchEnv,
  executionId: string,
  parameters: Record<string, unknown>,
  how: { sinkBase: string; completion: Completion; record?: (stageId: string) => void },
): Promise<FloorAnswer> {
  const total = Number(parameters.bench_stages ?? BENCH_STAGES);
  let previousOutput: unknown = null;
  const fail = (message: string): FloorAnswer => {
    const timings = execs.get(executionId) ?? null;
    execs.delete(executionId);
    return { ok: false, error: message, timings };
  };
  for (let i = 1; i <= total; i++) {
    const stageId = `stage_${i}`;
    const token = `floor.${crypto.randomUUID()}`;
    const completed = how.completion(stageId, token);
    how.record?.(stageId);
    const failed = await startStage(env.SELF, env.WORKER_SECRET, { executionId, n: i, parameters, previousOutput, callbackUrl: `${how.sinkBase}/stages/${stageId}`, token });
    if (failed) {
      completed.cancel();
      return fail(failed);
    }
    const body = await completed.done;
    if (!body) {
      completed.cancel();
      return fail(`${stageId}: no completion within 30 s`);
    }
    previousOutput = body.output ?? null;
  }
  const timings = execs.get(executionId) ?? null;
  execs.delete(executionId);
  return { ok: true, timings };
}

export { ContractLedger, ContractRun } from "./contract-floor";

/**
 * The durable floor's execution: one object per execution, its stages in its
 * own SQLite. Each record is one write in its own turn, so one commit each, as
 * an orchestrator that can resume after a crash must at least do.
 */
export class FloorRun extends DurableObject<BenchEnv> {
  /**
   * This run's waiters, resolved by complete() inside the object: a promise
   * resolved from another request's context would carry on in that context,
   * and workerd refuses I/O there once that request has ended.
   */
  private readonly waiters = new Map<string, Waiter>();

  constructor(ctx: DurableObjectState, env: BenchEnv) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS stages (stage_id TEXT PRIMARY KEY, status TEXT NOT NULL, output TEXT, at INTEGER NOT NULL)");
    });
  }

  async run(executionId: string, parameters: Record<string, unknown>): Promise<FloorAnswer> {
    return driveFloor(this.env, executionId, parameters, {
      sinkBase: `${SINK_ORIGIN}/bench/sink/durable/${executionId}`,
      completion: (stageId, token) => waitIn(this.waiters, stageId, token),
      record: (stageId) => {
        this.ctx.storage.sql.exec("INSERT OR REPLACE INTO stages (stage_id, status, output, at) VALUES (?, 'started', NULL, ?)", stageId, Date.now());
      },
    });
  }

  /** A stage's completion callback, relayed by the sink: checks the token, records the stage, wakes the run. */
  async complete(stageId: string, token: string, output: unknown): Promise<200 | 401 | 404> {
    const waiter = this.waiters.get(stageId);
    if (!waiter) return 404;
    if (waiter.token !== token) return 401;
    this.ctx.storage.sql.exec("UPDATE stages SET status = 'completed', output = ?, at = ? WHERE stage_id = ?", JSON.stringify(output ?? null), Date.now(), stageId);
    this.waiters.delete(stageId);
    waiter.resolve({ output });
    return 200;
  }
}

/** The floor's callback receiver: checks the stage's token, reads the body, hands it to the waiting run (durable: through the run's object). */
async function onSink(request: Request, env: BenchEnv, durable: boolean, executionId: string, stageId: string, kind: string): Promise<Response> {
  counters.sink++;
  if (durable) {
    const body = (await request.json().catch(() => null)) as { output?: unknown } | null;
    if (!body || typeof body !== "object") return error(400, "invalid_json", "the body is not valid JSON");
    if (kind !== "complete") return json(200, { ok: true, stage_status: "processing" });
    const status = await env.FLOOR_RUN.get(env.FLOOR_RUN.idFromName(executionId)).complete(stageId, bearer(request), body.output ?? null);
    if (status === 404) return error(404, "not_found", "no such stage");
    if (status === 401) return error(401, "unauthorized", "missing or invalid callback token");
    return json(200, { ok: true, stage_status: "completed" });
  }
  const key = `${executionId}|${stageId}`;
  const waiter = sinkWaiters.get(key);
  if (!waiter) return error(404, "not_found", "no such stage");
  if (bearer(request) !== waiter.token) return error(401, "unauthorized", "missing or invalid callback token");
  const body = (await request.json().catch(() => null)) as { output?: unknown } | null;
  if (!body || typeof body !== "object") return error(400, "invalid_json", "the body is not valid JSON");
  if (kind !== "complete") return json(200, { ok: true, stage_status: "processing" });
  sinkWaiters.delete(key);
  waiter.resolve(body);
  return json(200, { ok: true, stage_status: "completed" });
}

function stats(): WorkerStats {
  return {
    counters: { ...counters },
    sizes: { jobs: jobs.size, execs: execs.size, execWaiters: execWaiters.size, sinkWaiters: sinkWaiters.size },
  };
}

// ------------------------------------------------------------- helpers ----

