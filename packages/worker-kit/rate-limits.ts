/**
 * Provider rate-limit headers as the orchestrator's `rate_limits` reports
 * (docs/protocol.md, "Provider pacing"), so the ledger paces every execution
 * on that pool together instead of each retrying into the same 429.
 *
 *   const text = await job.step("call", async () => {
 *     const res = await fetch("https://api.openai.com/v1/chat/completions", ...);
 *     job.rateLimits(res, "tokens:openai"); // sent with the stage's next callback
 *     if (res.status === 429) throw new StageError("provider_rate_limited", "429", { retryable: true });
 *     return res.text();
 *   });
 */
export interface RateLimitReport {
  pool: string;
  remaining?: number;
  reset_ms?: number;
  retry_after_ms?: number;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s". */
export function parseDurationMs(text: string): number | undefined {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let matched = "";
  for (const m of text.trim().matchAll(re)) {
    total += Number(m[1]) * UNIT_MS[m[2]];
    matched += m[0];
  }
  return matched.length > 0 && matched === text.trim() ? Math.ceil(total) : undefined;
}

/** `Retry-After`: delta-seconds or an HTTP date. */
function retryAfterMs(value: string | null, now: number): number | undefined {
  if (value === null) return undefined;
  const v = value.trim();
  if (/^\d+(\.\d+)?$/.test(v)) return Math.ceil(Number(v) * 1000);
  const at = Date.parse(v);
  return Number.isFinite(at) ? Math.max(0, at - now) : undefined;
}

function num(value: string | null): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const n = Number(value);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

/**
 * The report for `pool` from a provider's response headers, or [] when the
 * response says nothing about its limits:
 * - OpenAI: `x-ratelimit-remaining-tokens` -> remaining, `x-ratelimit-reset-tokens` (a duration, e.g. "6m0s") -> reset_ms;
 * - Anthropic: `anthropic-ratelimit-tokens-remaining` -> remaining, `anthropic-ratelimit-tokens-reset` (RFC 3339 time) -> reset_ms;
 * - any: `retry-after-ms` (milliseconds) or `retry-after` (seconds or an HTTP date) -> retry_after_ms.
 */
export function rateLimitsFrom(response: Response, pool: string, now = Date.now()): RateLimitReport[] {
  const h = response.headers;
  const report: RateLimitReport = { pool };
  const remaining = num(h.get("x-ratelimit-remaining-tokens")) ?? num(h.get("anthropic-ratelimit-tokens-remaining"));
  if (remaining !== undefined) report.remaining = remaining;
  const openaiReset = h.get("x-ratelimit-reset-tokens");
  const anthropicReset = h.get("anthropic-ratelimit-tokens-reset");
  const reset = openaiReset !== null ? parseDurationMs(openaiReset) : anthropicReset !== null ? retryAfterMs(anthropicReset, now) : undefined;
  if (reset !== undefined) report.reset_ms = reset;
  const retry = num(h.get("retry-after-ms")) ?? retryAfterMs(h.get("retry-after"), now);
  if (retry !== undefined) report.retry_after_ms = Math.ceil(retry);
  return Object.keys(report).length > 1 ? [report] : [];
}

/** A report as the kit keeps it until a callback carries it: its relative times anchored at `at` (unix ms). */
interface HeldReport {
  report: RateLimitReport;
  at: number;
}

/**
 * Reports held by a job until its next callback (progress, complete or fail)
 * carries them, one per pool (the latest wins). Kept as JSON in the job's
 * storage; `due` re-bases `reset_ms` and `retry_after_ms` on the time the
 * callback is sent, so a report that waited in the outbox (or is sent again
 * after a failed try) still ends the pause when the provider said, not later.
 */
export function holdReports(held: string | null, reports: RateLimitReport[], now: number): string {
  const byPool = new Map<string, HeldReport>((held ? (JSON.parse(held) as HeldReport[]) : []).map((h) => [h.report.pool, h]));
  for (const report of reports) byPool.set(report.pool, { report, at: now });
  return JSON.stringify([...byPool.values()]);
}

export function dueReports(held: string | null, now: number): RateLimitReport[] {
  if (!held) return [];
  const out: RateLimitReport[] = [];
  for (const { report, at } of JSON.parse(held) as HeldReport[]) {
    const gone = Math.max(0, now - at);
    const r: RateLimitReport = { pool: report.pool };
    if (report.remaining !== undefined) r.remaining = report.remaining;
    if (report.reset_ms !== undefined && report.reset_ms > gone) r.reset_ms = report.reset_ms - gone;
    if (report.retry_after_ms !== undefined && report.retry_after_ms > gone) r.retry_after_ms = report.retry_after_ms - gone;
    if (Object.keys(r).length > 1) out.push(r);
  }
  return out;
}
