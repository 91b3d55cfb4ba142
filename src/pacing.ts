import type { RateLimitReport } from "../schemas/worker-protocol";
import { configOf } from "./config";
import { ledgerFor } from "./ledger-routing";
import { log } from "./log";
import { withTimeout } from "./outbound";

/**
 * Provider pacing (docs/ledger.md, "Provider pacing"): a worker's rate-limit
 * reports go to the ledger, which lowers the pools' buckets and pauses a pool
 * for every execution after a `retry_after_ms`. Best effort and bounded: a
 * slow or failing ledger costs at most `ledgerCallTimeoutMs` and never fails
 * the callback or poll that carried the report.
 */
export async function reportRateLimits(env: Env, reports: RateLimitReport[] | undefined, ids: Record<string, unknown> = {}): Promise<void> {
  if (!reports?.length) return;
  try {
    await withTimeout(ledgerFor(env, reports[0].pool).pace(reports), configOf(env).tuning.ledgerCallTimeoutMs, "ledger.pace");
  } catch (err) {
    log("warn", "ledger_pace_failed", { ...ids, pools: reports.map((r) => r.pool), error: err instanceof Error ? err.message : String(err) });
  }
}

/** The longest `retry_after_ms` of a set of reports (a failed attempt retries no sooner). */
export function retryAfterOf(reports: RateLimitReport[] | undefined): number | undefined {
  const ms = (reports ?? []).map((r) => r.retry_after_ms ?? 0);
  const max = Math.max(0, ...ms);
  return max > 0 ? max : undefined;
}
