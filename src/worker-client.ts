import { z } from "zod";
import {
  type CancelRequest,
  type HandshakeRequest,
  HandshakeResponse,
  type ProcessRequest,
  ProgressResponse,
} from "../schemas/worker-protocol";
import { configOf } from "./config";
import { type CallResult, callJson } from "./outbound";
import { workerSecret } from "./secrets";

/**
 * The stage worker protocol client: handshake, process, progress, cancel.
 * Calls go through the worker's service binding (named in WORKER_BINDINGS)
 * with `Authorization: Bearer <that worker's own secret>` (src/secrets.ts:
 * WORKER_SECRETS, else the shared WORKER_SECRET) and a timeout each.
 */
export class WorkerClient {
  private readonly base: string;
  constructor(
    private readonly fetcher: Fetcher,
    private readonly secret: string,
    private readonly timeoutMs: number,
    private readonly maxAnswerBytes: number,
    readonly worker: string,
    /** Sent on every call: the attempt's `traceparent` and `tracestate` (src/trace.ts). */
    private readonly traceHeaders: Record<string, string> = {},
  ) {
    this.base = `https://${worker}.internal`;
  }

  /** The client for a worker name, or null when no binding (or no secret) serves it (`worker_not_bound`). */
  static for(env: Env, worker: string, traceHeaders: Record<string, string> = {}): WorkerClient | null {
    const config = configOf(env);
    const bindingName = config.workerBindings[worker];
    const fetcher = bindingName ? (env as unknown as Record<string, Fetcher | undefined>)[bindingName] : undefined;
    const secret = workerSecret(env, worker);
    if (!fetcher || typeof fetcher.fetch !== "function" || !secret) return null;
    return new WorkerClient(fetcher, secret, config.tuning.workerCallTimeoutMs, config.tuning.maxWorkerAnswerBytes, worker, traceHeaders);
  }

  private call<S extends z.ZodType>(method: "GET" | "POST", path: string, schema: S, body?: unknown, timeoutMs = this.timeoutMs): Promise<CallResult<z.output<S>>> {
    return callJson({
      fetcher: this.fetcher,
      url: this.base + path,
      method,
      body,
      schema,
      timeoutMs: Math.min(timeoutMs, this.timeoutMs),
      maxAnswerBytes: this.maxAnswerBytes,
      headers: { ...this.traceHeaders, authorization: `Bearer ${this.secret}` },
      peer: "worker",
    });
  }

  /** `timeoutMs`: a shorter bound than the call timeout (what is left of the handshaking deadline). */
  handshake(body: HandshakeRequest, timeoutMs?: number) {
    return this.call("POST", "/api/handshake", HandshakeResponse, body, timeoutMs);
  }

  process(body: ProcessRequest, timeoutMs?: number) {
    return this.call("POST", "/api/process", z.unknown(), body, timeoutMs);
  }

  progress(executionId: string, stageId: string) {
    return this.call("GET", `/api/progress/${encodeURIComponent(executionId)}?stageId=${encodeURIComponent(stageId)}`, ProgressResponse);
  }

  cancel(body: CancelRequest) {
    return this.call("POST", "/api/cancel", z.unknown(), body);
  }
}
