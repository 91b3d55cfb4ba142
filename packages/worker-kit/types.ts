import type { DataReference } from "../../schemas/data";
import type { StoredRef } from "./data";
import type { HandshakeRequest } from "../../schemas/worker-protocol";

/** What every worker built on the kit needs in its env. */
export interface KitEnv {
  WORKER_SECRET: string;
  /** The previous secret while it is rotated: it still authenticates the orchestrator's calls. */
  WORKER_SECRET_PREVIOUS?: string;
  /** Service binding to the orchestrator: callbacks, input reads and output uploads go through it. */
  ORCHESTRATOR: Fetcher;
}

/** An answer from the job object; the fetch handler turns it into a response. */
export interface Reply {
  status: number;
  body?: unknown;
  /** A raw body instead of JSON. */
  text?: string;
  /** Extra response headers (e.g. `retry-after`). */
  headers?: Record<string, string>;
}

export type Usage = Record<string, number>;

/** The W3C trace context the orchestrator sent with the attempt's calls: its span is the parent of the worker's. */
export interface TraceHeaders {
  traceparent: string;
  tracestate?: string;
}

/** The current job as hooks see it. */
export interface JobInfo {
  executionId: string;
  stageId: string;
  attempt: number;
  action: string;
  parameters: Record<string, unknown>;
  handshake: HandshakeRequest;
  /** The attempt's trace context (the handshake's `traceparent`), sent back on every callback; null when none came. */
  trace: TraceHeaders | null;
}

/** Per-stage counters kept across attempts (a new attempt replaces the job, not these). */
export interface Counters {
  get(name: string): number;
  /** Adds one and returns the new value. */
  bump(name: string): number;
}

/** What `run` gets: the job, its input, and durable building blocks. */
export interface JobContext<E = KitEnv> extends JobInfo {
  env: E;
  /** `inputData.previousOutput` as sent (a small `{ $ref, ... }` summary when the input is a reference). */
  previousOutput: unknown;
  /** Where the input lives when the orchestrator passed it by reference. */
  dataReference: DataReference | undefined;
  /**
   * The previous stage's output as a value: `previousOutput`, or the referenced
   * data read through the orchestrator (JSON parsed; other content types as a
   * Uint8Array). Cached in memory for the attempt.
   */
  input<T = unknown>(): Promise<T>;
  /** The referenced input's raw bytes as a stream (null without a reference); errors with `data_unavailable`. */
  readInput(): Promise<ReadableStream<Uint8Array> | null>;
  /** `inputData.inputs` as sent: one entry per dependency, stage id -> its output (a `{ $ref, size, contentType }` summary when stored). */
  inputs: Record<string, unknown>;
  /**
   * One stored input named by a `{ $ref }` in `inputs` or `previousOutput` (several
   * dependencies, a fan-out's stored item outputs) as a stream, through the
   * orchestrator with the stage's data token, which reads only this stage's inputs
   * (another key: `data_unavailable` with status 403). Bounded by `dataTimeoutMs` and `maxReadBytes`.
   */
  openRef(ref: StoredRef): Promise<ReadableStream<Uint8Array>>;
  /** `openRef`, read in full: JSON parsed for a JSON content type, else a Uint8Array. */
  readRef<T = unknown>(ref: StoredRef): Promise<T>;
  /** A copy of `value` (e.g. `inputs`, `previousOutput`) with every `{ $ref }` in it read (`readRef`); at most `maxReadBytes` in all. */
  resolveRefs<T = unknown>(value: unknown): Promise<T>;
  /** Runs `fn` once per attempt: its (JSON) result is stored, and a resumed run gets it back without running it again. */
  step<T>(name: string, fn: () => T | Promise<T>): Promise<T>;
  /** A durable pause: the run stops here and the alarm resumes it after `ms` (Infinity: until cancelled). */
  sleep(ms: number): Promise<void>;
  /** Records progress and queues a progress callback (once per call site, even when the run resumes). */
  progress(percent: number, message?: string): Promise<void>;
  /**
   * A provider's response: its rate-limit headers (rate-limits.ts `rateLimitsFrom`)
   * for `pool` go out as `rate_limits` with the stage's next callback (progress,
   * complete or fail), so the ledger paces every execution on that pool. Call it
   * inside the `step` that made the request, so a resumed run does not report it twice.
   */
  rateLimits(response: Response, pool: string): void;
  counters: Counters;
}

/** The handshake's verdict. */
export type Acceptance =
  | {
      accepted: true;
      estimatedCompletionMs?: number;
      resourceRequirements?: Record<string, unknown>;
      capabilities?: Record<string, unknown>;
    }
  | { accepted: false; reason: string; retryable?: boolean };

export interface RunResult {
  /** A JSON value, or bytes: Uint8Array, ArrayBuffer, Blob, or `bytes(stream, { size })`. */
  output: unknown;
  usage?: Usage;
}

/** Optional calls around a job's life, e.g. metrics. `onEnd` runs before the result becomes visible. */
export interface Lifecycle<E> {
  onBegin?(job: JobInfo, env: E): Promise<unknown> | unknown;
  onEnd?(job: JobInfo, outcome: "completed" | "failed" | "cancelled", env: E): Promise<unknown> | unknown;
}

/** Extension points off the happy path (fault injection in the demo). */
export interface Hooks {
  /** Before a `process` starts the job: a Reply answers instead and the job stays accepted. */
  beforeProcess?(job: JobInfo, counters: Counters): Reply | null;
  /** While processing: a Reply answers progress polls instead of the job's state. */
  progress?(job: JobInfo): Reply | null;
  /** The tokens to send the final callback with, in order (default: `[token]`). */
  callbackTokens?(job: JobInfo, kind: "complete" | "fail", token: string): string[];
}

export interface KitOptions {
  /** Outputs over this are uploaded (JSON text length, or bytes); at most 768 KiB (callbacks are limited to 1 MiB). */
  uploadThresholdBytes: number;
  /** The orchestrator's upload limit; a larger output fails with `output_too_large`. */
  maxUploadBytes: number;
  callbackTimeoutMs: number;
  /** Tries per callback; a failed progress is dropped at once when something newer is queued. */
  callbackMaxTries: number;
  /** Backoff before the second try, doubling after. */
  callbackBackoffMs: number;
  /** Timeout of the request reading a referenced input (the body keeps streaming after). */
  dataTimeoutMs: number;
  /** Most bytes one `openRef`/`readRef` may read, and `resolveRefs` in all; a larger reference fails with `input_too_large`. */
  maxReadBytes: number;
  uploadTimeoutMs: number;
  /** Tries of the finishing step (upload) after transient errors, then `upload_failed` (retryable). */
  uploadMaxTries: number;
  uploadBackoffMs: number;
  /** Timeout of each lifecycle call. */
  hookTimeoutMs: number;
  /** When a lifecycle `onEnd` failed: how soon the alarm tries again. */
  endRetryMs: number;
  /** A job untouched this long is deleted by its alarm. */
  retentionMs: number;
}

export const DEFAULT_OPTIONS: KitOptions = {
  uploadThresholdBytes: 512 * 1024,
  maxUploadBytes: 64 * 1024 * 1024,
  callbackTimeoutMs: 5_000,
  callbackMaxTries: 3,
  callbackBackoffMs: 250,
  dataTimeoutMs: 10_000,
  maxReadBytes: 64 * 1024 * 1024,
  uploadTimeoutMs: 120_000,
  uploadMaxTries: 3,
  uploadBackoffMs: 500,
  hookTimeoutMs: 5_000,
  endRetryMs: 1_000,
  retentionMs: 24 * 3600_000,
};

export interface WorkerDefinition<E extends KitEnv> {
  /** Reported as `workerId` in handshake answers. */
  workerId: string;
  /** The name of the Durable Object binding that holds the jobs (one object per execution stage). */
  binding: keyof E & string;
  /** Actions served; others are refused at the handshake. Also sent as `capabilities.actions`. */
  actions?: readonly string[];
  /** Decides the handshake once the kit's checks passed (default: accept). */
  accept?(request: HandshakeRequest, ctx: { env: E; counters: Counters }): Acceptance | Promise<Acceptance>;
  /** The work. Throw `StageError` for a reported failure; other errors fail with `errorCode`. */
  run(job: JobContext<E>): Promise<RunResult>;
  /** Code for unexpected errors thrown by `run` (default `worker_error`, not retryable). */
  errorCode?: string;
  /** More routes under `/api/`, after auth; return null for 404. */
  routes?(request: Request, env: E, url: URL): Promise<Response | null> | Response | null;
  lifecycle?: Lifecycle<E>;
  hooks?: Hooks;
  options?: Partial<KitOptions>;
}
