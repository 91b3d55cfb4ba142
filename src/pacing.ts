import type { RateLimitReport } from "../schemas/worker-protocol";
import { configOf } from "./config";
import { layoutOf, ledgerShard, shardOfPool, subPoolsOf } from "./ledger-routing";
import { log } from "./log";
import { withTimeout } from "./outbound";

/**
 * Provider pacing (docs/ledger.md, "Provider pacing"): a worker's rate-limit
 * reports go to the ledger, which lowers the pools' buckets and pauses a pool
 * for every execution after a `retry_after_ms`, each report at its pool's
 * ledger shard (in parallel). Best effort and bounded: a
 * slow or failing ledger costs at most `ledgerCallTimeoutMs` and never fails
 * the callback or poll that carried the report.
 */
export async function reportRateLimits(env: Env, reports: RateLimitReport[] | undefined, ids: Record<string, unknown> = {}): Promise<void> {
  if (!reports?.length) return;
  try {
    const layout = layoutOf(env);
    // Each report to the shard of its pool; a split pool's report to each sub-pool, its `remaining` shared out as the capacity is.
    const byShard = new Map<number, RateLimitReport[]>();
    for (const r of reports) {
      const subs = subPoolsOf(layout, r.pool);
      const parts = subs.length ? subs.map((pool) => ({ ...r, pool, ...(r.remaining !== undefined ? { remaining: r.remaining / subs.length } : {}) })) : [r];
      for (const part of parts) {
        const shard = shardOfPool(layout, part.pool);
        byShard.set(shard, [...(byShard.get(shard) ?? []), part]);
      }
    }
    const t = configOf(env).tuning;
    await Promise.all(
      [...byShard].map(async ([shard, list]) => {
        try {
          await withTimeout(ledgerShard(env, shard).pace(list), t.ledgerCallTimeoutMs, "ledger.pace");
        } catch (err) {
          log("warn", "ledger_pace_failed", { ...ids, shard, pools: list.map((r) => r.pool), error: err instanceof Error ? err.message : String(err) });
        }
      }),
    );
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
