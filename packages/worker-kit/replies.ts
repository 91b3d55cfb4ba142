/** The kit's protocol answers and a timeout for calls that have none (./job-object.ts). */
import type { JobRow } from "./store";
import type { Reply } from "./types";

/** A process or cancel for another attempt than the job's: an older one is stale, a newer one unknown. */
export function staleAttempt(job: JobRow, attempt: number | undefined): Reply | null {
  if (attempt === undefined || attempt === job.attempt) return null;
  if (attempt < job.attempt) return error(409, "stale_attempt", `attempt ${attempt} was replaced by attempt ${job.attempt}`);
  return error(404, "not_found", `no job for attempt ${attempt} (the job is on attempt ${job.attempt})`);
}

export function ok(body: unknown): Reply {
  return { status: 200, body };
}

export function error(status: number, code: string, message: string): Reply {
  return { status, body: { error: { code, message } } };
}

export function notFound(): Reply {
  return error(404, "not_found", "no job for this execution and stage");
}

/** RPC and service calls have no timeout of their own. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | null = null;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => {
    if (timer !== null) clearTimeout(timer);
  });
}
