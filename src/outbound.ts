import type { z } from "zod";
import { ApiError, readLimited, zodIssues } from "./http";
import { log } from "./log";

/**
 * Outbound calls: every one has a timeout, and every failure is classified as
 * transient (worth retrying: network, timeout, 5xx, 408, 429) or permanent
 * (other 4xx, a body that breaks the protocol), with a code for the status
 * document.
 */
export interface CallFailure {
  code: string;
  message: string;
  retryable: boolean;
  httpStatus?: number;
  retryAfterMs?: number;
}
type Outcome<T> = { ok: true; value: T; httpStatus: number } | { ok: false; error: CallFailure };
export type CallResult<T> = Outcome<T> & { ms: number };

export interface CallOptions<S extends z.ZodType> {
  fetcher: Fetcher;
  url: string;
  method: "GET" | "POST";
  headers?: Record<string, string>;
  body?: unknown;
  timeoutMs: number;
  schema: S;
  /** Code prefix for failures, e.g. `worker` -> `worker_timeout`. */
  peer: string;
  /** The largest answer body read; a larger one is `{peer}_answer_too_large` and is not read further. */
  maxAnswerBytes: number;
}

function retryAfterMs(res: Response): number | undefined {
  const v = res.headers.get("retry-after");
  if (!v) return undefined;
  const secs = Number(v);
  if (Number.isFinite(secs)) return Math.max(0, secs * 1000);
  const at = Date.parse(v);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : undefined;
}

export async function callJson<S extends z.ZodType>(opts: CallOptions<S>): Promise<CallResult<z.output<S>>> {
  const started = Date.now();
  const done = (r: Outcome<z.output<S>>): CallResult<z.output<S>> => ({ ...r, ms: Date.now() - started });
  let res: Response;
  try {
    res = await opts.fetcher.fetch(opts.url, {
      method: opts.method,
      headers: { accept: "application/json", ...(opts.body !== undefined ? { "content-type": "application/json" } : {}), ...opts.headers },
      body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
      signal: AbortSignal.timeout(opts.timeoutMs),
    });
  } catch (err) {
    const timedOut = err instanceof Error && (err.name === "TimeoutError" || err.name === "AbortError");
    return done({
      ok: false,
      error: timedOut
        ? { code: `${opts.peer}_timeout`, message: `no answer within ${opts.timeoutMs} ms`, retryable: true }
        : { code: `${opts.peer}_unreachable`, message: err instanceof Error ? err.message : String(err), retryable: true },
    });
  }
  let text: string | null;
  try {
    text = await readLimited(res, opts.maxAnswerBytes);
  } catch (err) {
    return done({ ok: false, error: { code: `${opts.peer}_unreachable`, message: `body not read: ${String(err)}`, retryable: true } });
  }
  if (text === null) {
    return done({
      ok: false,
      error: {
        code: `${opts.peer}_answer_too_large`,
        message: `${opts.method} ${new URL(opts.url).pathname} answered more than ${opts.maxAnswerBytes} bytes`,
        retryable: false,
        httpStatus: res.status,
      },
    });
  }
  if (!res.ok) {
    const transient = res.status >= 500 || res.status === 408 || res.status === 429;
    return done({
      ok: false,
      error: {
        code: res.status === 404 ? `${opts.peer}_not_found` : `${opts.peer}_http_${res.status}`,
        message: `${opts.method} ${new URL(opts.url).pathname} answered ${res.status}: ${text.slice(0, 200)}`,
        retryable: transient,
        httpStatus: res.status,
        retryAfterMs: retryAfterMs(res),
      },
    });
  }
  let value: unknown;
  try {
    value = text.length ? JSON.parse(text) : {};
  } catch {
    return done({
      ok: false,
      error: { code: `${opts.peer}_protocol_error`, message: "answer is not JSON", retryable: true, httpStatus: res.status },
    });
  }
  const parsed = opts.schema.safeParse(value);
  if (!parsed.success) {
    const fields = zodIssues(parsed.error)
      .map((i) => `${i.path}: ${i.message}`)
      .join("; ");
    return done({
      ok: false,
      error: { code: `${opts.peer}_protocol_error`, message: `answer breaks the protocol: ${fields}`, retryable: false, httpStatus: res.status },
    });
  }
  return done({ ok: true, value: parsed.data, httpStatus: res.status });
}

/** Promise with a deadline, for RPC calls to other objects (fetch has its own signal). */
export async function withTimeout<T>(promise: PromiseLike<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | null = null;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`${what} gave no answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([Promise.resolve(promise), timeout]);
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}

export class TimeoutError extends Error {
  override name = "TimeoutError";
}

/**
 * The front Worker's RPC to one of our objects: a deadline, and any failure
 * other than an ApiError becomes a 503 that says what did not answer. The
 * cause goes to the log only: an internal message never reaches the caller.
 */
export async function askObject<T>(promise: PromiseLike<T>, timeoutMs: number, what: string): Promise<T> {
  try {
    return await withTimeout(promise, timeoutMs, what);
  } catch (err) {
    if (err instanceof ApiError) throw err;
    log("warn", "object_unavailable", { what, error: err instanceof Error ? err.message : String(err) });
    throw new ApiError(503, "unavailable", `${what} is unavailable: no answer within ${timeoutMs} ms, or it failed`);
  }
}
