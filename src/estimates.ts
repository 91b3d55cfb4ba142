import type { Priority } from "../schemas/common";
import { remember } from "./bounded-memo";
import { configOf } from "./config";
import { askShards } from "./ledger-fanout";
import { layoutOf, ledgerShard, shardName, shardOfPool } from "./ledger-routing";

/**
 * The completion estimate a start answers with. The ledger computes it (duration
 * averages per worker and the queue ahead, docs/ledger.md); this isolate keeps each
 * answer for `estimateCacheMs`, so a burst of starts of the same pipeline asks the
 * ledger once instead of adding a round trip to the ledger per start. With
 * sharded pools each stage is asked of its worker's shard (below). With no
 * answer in time, the default stage duration for each stage not answered.
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
  // A worker's duration averages and its queue live with its `worker:{w}` pool, so each stage is
  // asked of that pool's shard: one call per shard the stages need, in parallel (one call with one shard).
  const layout = layoutOf(env);
  const byShard = new Map<number, EstimateStage[]>();
  for (const s of stages) {
    const shard = shardOfPool(layout, `worker:${s.worker}`);
    byShard.set(shard, [...(byShard.get(shard) ?? []), s]);
  }
  const targets = [...byShard.keys()].map((shard) => ({ shard, name: shardName(layout, shard), stub: ledgerShard(env, shard) }));
  const answers = await askShards(env, targets, (t) => t.stub.estimate(byShard.get(t.shard)!, priority), "ledger.estimate");
  if (!answers.some((a) => a.ok)) return fallback;
  // The stages run one after another, so their durations add up; the queues ahead are waited out at once.
  let queueAheadMs = 0;
  let totalMs = 0;
  for (const a of answers) {
    if (a.ok) {
      queueAheadMs = Math.max(queueAheadMs, a.value.queueAheadMs);
      totalMs += a.value.totalMs - a.value.queueAheadMs;
    } else totalMs += byShard.get(a.shard)!.length * tuning.defaultStageDurationMs;
  }
  totalMs += queueAheadMs;
  if (answers.every((a) => a.ok)) remember(memo, key, { totalMs, at: Date.now() }, MAX_ENTRIES);
  return totalMs;
}
