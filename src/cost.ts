import type { Cost } from "../schemas/api";
import type { PriceTable } from "./config";

/**
 * Settled usage x the price table. Amounts are summed in micro-units of the
 * currency and rounded once, so totals agree to the cent with a hand
 * calculation. Pools with no price are listed in `unpriced`, never dropped.
 */
const MICRO = 1_000_000;

export function costOf(stages: { stage_id: string; usage: Record<string, number> | null }[], prices: PriceTable): Cost {
  const byPool: Record<string, number> = {};
  const byStage: Record<string, number> = {};
  const unpriced = new Set<string>();
  let total = 0;
  for (const s of stages) {
    let stageMicros = 0;
    for (const [pool, amount] of Object.entries(s.usage ?? {})) {
      const price = prices.per_unit[pool];
      if (price === undefined) {
        unpriced.add(pool);
        continue;
      }
      const micros = Math.round(amount * price * MICRO);
      byPool[pool] = (byPool[pool] ?? 0) + micros;
      stageMicros += micros;
    }
    byStage[s.stage_id] = stageMicros;
    total += stageMicros;
  }
  const money = (m: number) => m / MICRO;
  return {
    total: money(total),
    currency: prices.currency,
    by_pool: Object.fromEntries(Object.entries(byPool).map(([k, v]) => [k, money(v)])),
    by_stage: Object.fromEntries(Object.entries(byStage).map(([k, v]) => [k, money(v)])),
    unpriced: [...unpriced].sort(),
  };
}

/** Adds usage maps (a stage's attempts, or settles). */
export function addUsage(a: Record<string, number> | null, b: Record<string, number> | undefined): Record<string, number> | null {
  if (!b || Object.keys(b).length === 0) return a;
  const out = { ...(a ?? {}) };
  for (const [k, v] of Object.entries(b)) out[k] = (out[k] ?? 0) + v;
  return out;
}
