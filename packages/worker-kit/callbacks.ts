import type { HandshakeRequest } from "../../schemas/worker-protocol";
import { messageOf } from "./data";
import { type RateLimitReport, dueReports, holdReports } from "./rate-limits";
import type { CallbackKind, JobRow, Store } from "./store";
import type { KitOptions, TraceHeaders } from "./types";

/** Rate-limit reports held for the next callback (rate-limits.ts `holdReports`). */
const HELD_RATE_LIMITS = "rate_limits";

/** What the callbacks need of their job object. */
export interface CallbackHost {
  handshakeOf(job: JobRow): HandshakeRequest;
  traceOf(): TraceHeaders | null;
  noteTrace(attempt: number, call: string, trace: TraceHeaders | null): void;
}

/**
 * A job's callbacks to the orchestrator (./job-object.ts queues them in the
 * store's outbox) and the provider rate-limit reports that ride on them.
 */
export class Callbacks {
  constructor(
    private readonly store: Store,
    private readonly orchestrator: Fetcher,
    private readonly opts: KitOptions,
    private readonly host: CallbackHost,
  ) {}

  /** Holds reports until the next callback carries them (one per pool, the latest wins). */
  hold(reports: RateLimitReport[], now: number): void {
    this.store.putBlob(HELD_RATE_LIMITS, holdReports(this.store.getBlob(HELD_RATE_LIMITS), reports, now));
  }

  /** The held reports re-based on `now` (a progress answer carries them too, without dropping them). */
  due(now: number): RateLimitReport[] {
    return dueReports(this.store.getBlob(HELD_RATE_LIMITS), now);
  }

  /**
   * Sends due callbacks in order through the ORCHESTRATOR binding. A try is
   * repeated (later, from the alarm) only after a network error, 5xx, 408 or
   * 429, at most `callbackMaxTries` times; a failed progress is dropped when
   * something newer is queued. 2xx and 409 (the stage already ended; or
   * `stage_waiting`: the orchestrator replays the attempt and its progress poll
   * takes the result the job keeps, so unlike an upload nothing is lost) settle
   * it, and so does any other 4xx: the same request would get the same answer.
   */
  async deliver(): Promise<void> {
    for (;;) {
      const head = this.store.outboxHead();
      if (!head || head.next_at > Date.now()) return;
      const job = this.store.row();
      if (!job) return;
      const { callback } = this.host.handshakeOf(job);
      const token = head.token ?? callback.token;
      // Rate-limit reports ride on whichever callback goes out next, re-based on the time it is sent.
      const held = this.store.getBlob(HELD_RATE_LIMITS);
      const body = withRateLimits(head.body ?? this.finalBody(job, head.kind), dueReports(held, Date.now()));
      const trace = this.host.traceOf();
      const status = await this.post(`${callback.url.replace(/\/+$/, "")}/${head.kind}`, token, body, trace);
      this.store.log(job.attempt, `callback:${head.kind}`, status, head.token ? "alternate token" : null);
      this.host.noteTrace(job.attempt, `callback:${head.kind}`, trace);
      const transient = status === 0 || status >= 500 || status === 408 || status === 429;
      const superseded = head.kind === "progress" && this.store.hasAfter(head.seq);
      // The entry may be gone by now (cancelled or replaced): both statements are then no-ops.
      if (transient && !superseded && head.tries + 1 < this.opts.callbackMaxTries) {
        const at = Date.now() + this.opts.callbackBackoffMs * 2 ** head.tries;
        this.store.sql`UPDATE kit_outbox SET tries = tries + 1, next_at = ${at} WHERE seq = ${head.seq}`;
      } else {
        this.store.sql`DELETE FROM kit_outbox WHERE seq = ${head.seq}`;
        // Carried (or refused for good): reported. Reports held meanwhile stay for the next callback.
        if (held !== null && this.store.getBlob(HELD_RATE_LIMITS) === held) this.store.deleteBlob(HELD_RATE_LIMITS);
      }
    }
  }

  private finalBody(job: JobRow, kind: CallbackKind): string {
    const usage = job.usage ? `,"usage":${job.usage}` : "";
    if (kind === "complete") {
      if (job.data_ref) return `{"dataReference":${job.data_ref}${usage}}`;
      return `{"output":${this.store.getBlob("output") ?? "null"}${usage}}`;
    }
    return `{"error":${job.error ?? "{}"},"retryable":${job.retryable === 1}${usage}}`;
  }

  /** The answer's status, or 0 when the request failed or timed out. */
  private async post(url: string, token: string, body: string, trace: TraceHeaders | null): Promise<number> {
    try {
      // The binding routes the request; the URL's host is informational.
      const res = await this.orchestrator.fetch(url, {
        method: "POST",
        headers: { ...(trace ?? {}), authorization: `Bearer ${token}`, "content-type": "application/json" },
        body,
        signal: AbortSignal.timeout(this.opts.callbackTimeoutMs),
      });
      await res.body?.cancel();
      if (!res.ok && res.status !== 409) console.warn(`callback ${url} answered ${res.status}`);
      return res.status;
    } catch (err) {
      console.warn(`callback ${url} failed: ${messageOf(err)}`);
      return 0;
    }
  }
}

/** A callback's JSON object body with `rate_limits` spliced in (the body may be a large inline output: not parsed again). */
export function withRateLimits(body: string, reports: RateLimitReport[]): string {
  if (!reports.length) return body;
  const field = `"rate_limits":${JSON.stringify(reports)}`;
  const rest = body.trim().slice(1).trimStart();
  return rest.startsWith("}") ? `{${field}}` : `{${field},${rest}`;
}
