/**
 * What the bench workers and bench/e2e.ts share: names, the template's shape,
 * and the timing records the bench worker keeps (epoch ms, workerd's clock).
 */
export const BENCH_WORKER = "bitware-bench-worker";
export const BENCH_TEMPLATE = "bench_three_stage";
export const BENCH_STAGES = 3;
/** The fan-out workload's templates (bench/fan-out.ts): list -> one item per entry -> merge, 100 at once or one by one. */
export const BENCH_FAN_OUT = "bench_fan_out";
export const BENCH_FAN_OUT_SERIAL = "bench_fan_out_serial";
/** Callback URLs of the floor run point here (the bench worker's own sink, reached through SELF). */
export const SINK_ORIGIN = "https://bitware-bench-worker.internal";
/** Callback URLs of the Workflows implementation (bench/worker/workflows.ts) point here; the stage worker reaches it through its WORKFLOWS binding. */
export const WF_ORIGIN = "https://bitware-bench-workflows.internal";
/** Usage every stage reports. */
export const STAGE_USAGE = { "tokens:openai": 10 } as const;

/** One attempt of one stage as the bench worker saw it. */
export interface StageTiming {
  stage: string;
  attempt: number;
  /** handshake arrived */
  hs: number;
  /** process arrived */
  pr: number | null;
  /** complete callback sent (the worker signalling completion) */
  cs: number | null;
  /** complete callback answered */
  ca: number | null;
  /** HTTP status of the complete callback (0: network error) */
  status: number | null;
  /** handshakes received for this attempt (1 unless repeated) */
  handshakes: number;
}

export interface ExecTimings {
  id: string;
  stages: StageTiming[];
  /** the last stage's complete was acknowledged with 2xx */
  done: boolean;
  /** the last stage's complete callback failed (the orchestrator will poll) */
  ended: boolean;
  callbackFailures: number;
  polls: number;
  cancels: number;
}

export interface WaitAnswer {
  /** true: the last stage's completion was acknowledged; false: timed out or the callback failed */
  done: boolean;
  timings: ExecTimings | null;
}

export interface FloorAnswer {
  ok: boolean;
  error?: string;
  timings: ExecTimings | null;
}

export interface WorkerCounters {
  handshake: number;
  process: number;
  progress: number;
  cancel: number;
  callbacks: number;
  callbackFailures: number;
  sink: number;
  floor: number;
  unknownJob: number;
}

export interface WorkerStats {
  counters: WorkerCounters;
  sizes: { jobs: number; execs: number; execWaiters: number; sinkWaiters: number };
}

/** The bench workers' small HTTP helpers. */
export function bearer(request: Request): string {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.get("authorization") ?? "");
  return m ? m[1] : "";
}

export function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}

export function error(status: number, code: string, message: string): Response {
  return json(status, { error: { code, message } });
}
