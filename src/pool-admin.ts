import type { PoolSnapshot, PoolSpec } from "../schemas/ledger";
import type { PutPoolResult } from "../schemas/resources";
import { configOf } from "./config";
import { ApiError } from "./http";
import { type ShardLayout, basePoolOf, layoutOf, ledgerFor, shardOfPool, subPoolsOf } from "./ledger-routing";
import { askObject } from "./outbound";

/**
 * `PUT /resources/pools/:name`, at the shard that owns the pool
 * (src/ledger-routing.ts). A pool split by LEDGER_SHARD_MAP has no object of
 * its own: each sub-pool `name#i` is set on its shard (that is how capacity is
 * moved between them), and the pool's own name is refused with the sub-pools
 * to set instead.
 */
export function checkPoolTarget(layout: ShardLayout, name: string): string {
  const base = basePoolOf(name);
  const subs = subPoolsOf(layout, base);
  const bad = (message: string) => new ApiError(400, "invalid_request", message, [{ path: "name", message }]);
  if (base !== name && !subs.includes(name)) {
    throw bad(subs.length ? `${base} is split into ${subs[0]} .. ${subs[subs.length - 1]} (LEDGER_SHARD_MAP); ${name} is none of them` : `${base} is not split (LEDGER_SHARD_MAP), so it has no sub-pool ${name}`);
  }
  if (base === name && subs.length) throw bad(`${name} is split into ${subs.join(", ")} (LEDGER_SHARD_MAP): PUT each sub-pool's capacity`);
  return name;
}

export async function putPoolAt(env: Env, name: string, spec: PoolSpec): Promise<PoolSnapshot & { shard: number }> {
  const layout = layoutOf(env);
  checkPoolTarget(layout, name);
  const r = await askObject<PutPoolResult>(ledgerFor(env, name).definePool(name, spec), configOf(env).tuning.ledgerCallTimeoutMs, "the pool's ledger shard");
  if (!r.ok) {
    // wrong_shard: the front and the shard disagree on the layout (a deploy in progress), the pool's name is the field.
    const detail = r.code === "wrong_shard" ? { path: "name", message: r.message } : { path: "kind", message: `the pool is a ${r.kind} pool` };
    throw new ApiError(409, r.code, r.message, [detail]);
  }
  return { ...r.pool, shard: shardOfPool(layout, name) };
}
