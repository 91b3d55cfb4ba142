import { createFetch } from "./http";
import { KitJobObject } from "./job-object";
import { DEFAULT_OPTIONS, type KitEnv, type KitOptions, type WorkerDefinition } from "./types";

/**
 * The worker kit: serve the stage worker protocol (docs/protocol.md §3) from a
 * `run` function. See README.md.
 *
 *   const worker = defineWorker<Env>({ workerId, binding: "JOBS", actions, run });
 *   export class MyJob extends worker.JobObject {}
 *   export default worker.handler;
 */
export function defineWorker<E extends KitEnv>(def: WorkerDefinition<E>): {
  /** `export default worker.handler`: the fetch handler. */
  handler: { fetch(request: Request, env: E): Promise<Response> };
  /** The Durable Object class to export (under the class name your wrangler config binds). */
  JobObject: new (ctx: DurableObjectState, env: E) => KitJobObject<E>;
  options: KitOptions;
} {
  const options: KitOptions = { ...DEFAULT_OPTIONS, ...def.options };
  if (options.uploadThresholdBytes > 768 * 1024) {
    throw new Error("uploadThresholdBytes: at most 768 KiB, so an inline output fits the orchestrator's 1 MiB callback limit");
  }
  const fetch = createFetch(def);
  class JobObject extends KitJobObject<E> {
    constructor(ctx: DurableObjectState, env: E) {
      super(ctx, env, def, options);
    }
  }
  return { handler: { fetch }, JobObject, options };
}

export { KitJobObject } from "./job-object";
export { parseDurationMs, rateLimitsFrom, type RateLimitReport } from "./rate-limits";
export {
  StageError,
  DataReadError,
  BytesOutput,
  bytes,
  bytesOf,
  isInlineBytes,
  isJsonType,
  isStoredRef,
  storedRefsIn,
  toBase64,
  fromBase64,
  sha256Hex,
  type InlineBytes,
  type StoredRef,
} from "./data";
export { authorized, error as errorResponse, json as jsonResponse } from "./http";
export type {
  Acceptance,
  Counters,
  Hooks,
  JobContext,
  JobInfo,
  KitEnv,
  KitOptions,
  Lifecycle,
  Reply,
  RunResult,
  TraceHeaders,
  Usage,
  WorkerDefinition,
} from "./types";
export { DEFAULT_OPTIONS } from "./types";
