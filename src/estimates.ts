import type { Priority } from "../schemas/common";
import { remember } from "./bounded-memo";
import { configOf } from "./config";
import { ledgerFor } from "./ledger-routing";
import { log } from "./log";
import { withTimeout } from "./outbound";

/**
 * The completion estimate a start answers with. The ledger computes it (duration
 * averages per worker and the queue ahead, docs/ledger.md); this isolate keeps each
 * answer for `estimateCacheMs`, so a burst of starts of the same pipeline asks the
 * ledger once instead of adding a round trip to the one ledger object per start.
 * With no answer in time, the default stage duration per stage.
 */
export interface EstimateStage {
  worker: string;
  resources?: Record<string, number>;
}

const MAX_ENTRIES = 256;
const memo = new Map<string, { totalMs: number; at: number }>();

export async function estimateTotalMs(env: Env, stages: EstimateStage[], priority: Priority): Promise<number> {
  const { tuning } = configOf(env);
  const fallback = Math.max(1, stages.length) * tuning.defaultStageDurationMs;
  if (stages.length === 0) return fallback;
  const key = `${priority}|${JSON.stringify(stages.map((s) => [s.worker, s.resources ?? null]))}`;
  const hit = memo.get(key);
  if (hit && Date.now() - hit.at < tuning.estimateCacheMs) return hit.totalMs;
  try {
    const est = await withTimeout(ledgerFor(env).estimate(stages, priority), tuning.ledgerCallTimeoutMs, "ledger.estimate");
    remember(memo, key, { totalMs: est.totalMs, at: Date.now() }, MAX_ENTRIES);
    return est.totalMs;
  } catch (err) {
    log("warn", "estimate_failed", { error: String(err) });
    return fallback;
  }
}
