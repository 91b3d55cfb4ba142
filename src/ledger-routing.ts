import type { ResourceLedger } from "../actors/resource-ledger";
import { configOf } from "./config";

/**
 * The one place that decides which ResourceLedger object owns a pool
 * (docs/scaling.md). `LEDGER_SHARDS` (1-256, default 1) names how many ledger
 * objects there are: `ledger-0` .. `ledger-{n-1}`, or the single `"global"`
 * object when there is one (so the state of an unsharded deployment stays
 * valid). `LEDGER_SHARD_MAP` pins pools or pool-name prefixes to shards, and
 * may split one hot pool into sub-pools on several shards; every other pool
 * goes by a stable hash of its name. A client's own state (quotas, execution
 * slots, running stages, rate buckets, spend) lives on the shard of its client id.
 *
 * The binding is `LEDGER_BINDING` (default `RESOURCE_LEDGER`): the fault tests
 * put a real object that stalls or fails in front of the ledger there.
 */
export const LEDGER_OBJECT_NAME = "global";
export const MAX_LEDGER_SHARDS = 256;
/** Sub-pools of one split pool, at most. */
export const MAX_SPLIT = 64;

export interface ShardPin {
  /** A pool name, or a prefix when `prefix` (written `tokens:*` in the map). */
  key: string;
  prefix: boolean;
  shard: number;
}

export interface ShardLayout {
  count: number;
  /** Exact pins and prefix pins; no two of them can match one pool with different shards. */
  pins: ShardPin[];
  /** A split pool's sub-pools: `<pool>#i` lives on `splits[pool][i]`. */
  splits: Record<string, number[]>;
}

/** A refused `LEDGER_SHARDS` / `LEDGER_SHARD_MAP`; `problems` lists every one. */
export class ShardConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`ledger shard config is invalid: ${problems.join("; ")}`);
    this.name = "ShardConfigError";
  }
}

/** FNV-1a, 32 bits: stable across isolates, versions and platforms (the routing must never move a pool by itself). */
export function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

const SINGLE: ShardLayout = Object.freeze({ count: 1, pins: [], splits: {} }) as ShardLayout;

/** Two pins that can match the same pool name (exact inside a prefix, nested prefixes, or the same key). */
function overlap(a: ShardPin, b: ShardPin): boolean {
  if (!a.prefix && !b.prefix) return a.key === b.key;
  if (a.prefix && b.prefix) return a.key.startsWith(b.key) || b.key.startsWith(a.key);
  const [p, e] = a.prefix ? [a, b] : [b, a];
  return e.key.startsWith(p.key);
}

/** Parses and checks the two vars; throws ShardConfigError naming every problem. */
export function parseShardLayout(shardsVar: unknown, mapVar: unknown): ShardLayout {
  const problems: string[] = [];
  let count = 1;
  if (shardsVar !== undefined && shardsVar !== null && shardsVar !== "") {
    const n = typeof shardsVar === "number" ? shardsVar : Number(String(shardsVar).trim());
    if (!Number.isInteger(n) || n < 1 || n > MAX_LEDGER_SHARDS) problems.push(`LEDGER_SHARDS must be an integer from 1 to ${MAX_LEDGER_SHARDS} (got ${JSON.stringify(shardsVar)})`);
    else count = n;
  }
  let raw: unknown = {};
  if (mapVar !== undefined && mapVar !== null && mapVar !== "") {
    try {
      raw = typeof mapVar === "string" ? JSON.parse(mapVar) : mapVar;
    } catch (err) {
      problems.push(`LEDGER_SHARD_MAP is not JSON: ${String(err)}`);
    }
  }
  const pins: ShardPin[] = [];
  const splits: Record<string, number[]> = {};
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    problems.push("LEDGER_SHARD_MAP must be a JSON object of pool name or prefix (ending in *) -> shard, or -> { \"split\": [shards] }");
    raw = {};
  }
  const inRange = (s: unknown): s is number => Number.isInteger(s) && (s as number) >= 0 && (s as number) < count;
  for (const [key, value] of Object.entries(raw as Record<string, unknown>)) {
    const prefix = key.endsWith("*");
    const name = prefix ? key.slice(0, -1) : key;
    if (!/^[a-z0-9][a-z0-9:_.-]*$/.test(name) || name.length > 64) {
      problems.push(`LEDGER_SHARD_MAP key "${key}" is not a pool name or prefix (lower-case letters, digits, ':', '_', '.', '-', optionally ending in *)`);
      continue;
    }
    if (typeof value === "object" && value !== null && !Array.isArray(value) && "split" in value) {
      const split = (value as { split: unknown }).split;
      if (prefix) problems.push(`LEDGER_SHARD_MAP key "${key}": only a single pool can be split, not a prefix`);
      else if (!Array.isArray(split) || split.length < 2 || split.length > MAX_SPLIT || !split.every(inRange)) {
        problems.push(`LEDGER_SHARD_MAP "${key}".split must be 2 to ${MAX_SPLIT} shard numbers from 0 to ${count - 1}`);
      } else splits[name] = split as number[];
      continue;
    }
    if (!inRange(value)) {
      problems.push(`LEDGER_SHARD_MAP "${key}" must name a shard from 0 to ${count - 1} (got ${JSON.stringify(value)})`);
      continue;
    }
    pins.push({ key: name, prefix, shard: value });
  }
  // Two claims on one pool would let two shards each grant it: refuse, do not pick one.
  for (let i = 0; i < pins.length; i++) {
    for (let j = i + 1; j < pins.length; j++) {
      const [a, b] = [pins[i], pins[j]];
      if (a.shard !== b.shard && overlap(a, b)) {
        problems.push(`LEDGER_SHARD_MAP "${a.key}${a.prefix ? "*" : ""}" (shard ${a.shard}) and "${b.key}${b.prefix ? "*" : ""}" (shard ${b.shard}) both claim some pools`);
      }
    }
  }
  for (const pool of Object.keys(splits)) {
    const claim = pins.find((p) => overlap(p, { key: pool, prefix: false, shard: -1 }));
    if (claim) problems.push(`LEDGER_SHARD_MAP splits "${pool}" and also pins it with "${claim.key}${claim.prefix ? "*" : ""}"`);
  }
  if (problems.length) throw new ShardConfigError(problems);
  if (count === 1 && pins.length === 0 && Object.keys(splits).length === 0) return SINGLE;
  return { count, pins, splits };
}

const layouts = new WeakMap<object, ShardLayout>();

/** The layout in force, parsed once per env object; a bad config throws ShardConfigError at every use. */
export function layoutOf(env: Env): ShardLayout {
  const hit = layouts.get(env);
  if (hit) return hit;
  const vars = env as unknown as Record<string, unknown>;
  const layout = parseShardLayout(vars.LEDGER_SHARDS, vars.LEDGER_SHARD_MAP);
  layouts.set(env, layout);
  return layout;
}

export function shardName(layout: ShardLayout, shard: number): string {
  return layout.count === 1 ? LEDGER_OBJECT_NAME : `ledger-${shard}`;
}

/** The shard index of an object name under this layout, or null when the name is not one of its shards. */
export function shardIndexOf(layout: ShardLayout, name: string | undefined): number | null {
  if (name === undefined) return null;
  if (layout.count === 1) return name === LEDGER_OBJECT_NAME ? 0 : null;
  const m = /^ledger-(\d{1,3})$/.exec(name);
  if (!m) return null;
  const i = Number(m[1]);
  return i < layout.count && String(i) === m[1] ? i : null;
}

const SUB = /^(.+)#(\d{1,2})$/;

/** `tokens:openai#2` -> `tokens:openai`; any other name is itself. */
export function basePoolOf(pool: string): string {
  const m = SUB.exec(pool);
  return m ? m[1] : pool;
}

/** The sub-pool of a split pool an execution uses (by its id, so all its stages use the same one); else the pool. */
export function subPoolOf(layout: ShardLayout, pool: string, executionId: string): string {
  const split = layout.splits[pool];
  return split ? `${pool}#${fnv1a(executionId) % split.length}` : pool;
}

/** The sub-pool names of a split pool (empty when it is not split). */
export function subPoolsOf(layout: ShardLayout, pool: string): string[] {
  return (layout.splits[pool] ?? []).map((_, i) => `${pool}#${i}`);
}

export function shardOfClient(layout: ShardLayout, clientId: string): number {
  return layout.count === 1 ? 0 : fnv1a(`client:${clientId}`) % layout.count;
}

export function shardOfPool(layout: ShardLayout, pool: string): number {
  if (layout.count === 1) return 0;
  const m = SUB.exec(pool);
  if (m && layout.splits[m[1]]) {
    const shard = layout.splits[m[1]][Number(m[2])];
    if (shard !== undefined) return shard;
  }
  // The checks in parseShardLayout make at most one shard match, so the first pin found is the only claim.
  const pin = layout.pins.find((p) => (p.prefix ? pool.startsWith(p.key) : pool === p.key));
  if (pin) return pin.shard;
  return fnv1a(pool) % layout.count;
}

export interface RequirementPart {
  shard: number;
  /** This shard's pools and amounts (sub-pool names already mapped). */
  requirements: Record<string, number>;
  /** This part holds the stage's `worker:{w}` slot (the shard of that pool). */
  worker: boolean;
  /** This part holds the client's own limits (the client's shard). */
  client: boolean;
}

/**
 * A stage's needs split by shard, sorted by shard index: the one global order
 * in which every multi-shard stage acquires its parts, so no two stages can each
 * hold what the other waits for. One part: a single-shard stage (one reserve).
 * The worker's shard always gets a part (it holds the `worker:{w}` slot), and so
 * does the client's shard when `clientId` is given: the caller passes it when the
 * client's own limits must be held with the stage (running stages, rate, budget).
 */
export function partsOf(layout: ShardLayout, needs: Record<string, number>, opts: { worker: string; clientId?: string; executionId: string }): RequirementPart[] {
  const parts = new Map<number, RequirementPart>();
  const part = (shard: number) => {
    const p = parts.get(shard) ?? { shard, requirements: {}, worker: false, client: false };
    parts.set(shard, p);
    return p;
  };
  part(shardOfPool(layout, `worker:${opts.worker}`)).worker = true;
  if (opts.clientId !== undefined) part(shardOfClient(layout, opts.clientId)).client = true;
  for (const [pool, amount] of Object.entries(needs)) {
    if (pool === `worker:${opts.worker}`) continue; // the ledger adds the worker slot itself
    const name = subPoolOf(layout, pool, opts.executionId);
    const p = part(shardOfPool(layout, name));
    p.requirements[name] = (p.requirements[name] ?? 0) + amount;
  }
  return [...parts.values()].sort((a, b) => a.shard - b.shard);
}

function namespace(env: Env): DurableObjectNamespace<ResourceLedger> {
  const ns = (env as unknown as Record<string, unknown>)[configOf(env).ledgerBinding] as DurableObjectNamespace<ResourceLedger> | undefined;
  if (!ns || typeof ns.idFromName !== "function") throw new Error(`LEDGER_BINDING names no Durable Object binding (${configOf(env).ledgerBinding})`);
  return ns;
}

export function ledgerShard(env: Env, shard: number): DurableObjectStub<ResourceLedger> {
  const layout = layoutOf(env);
  if (!Number.isInteger(shard) || shard < 0 || shard >= layout.count) throw new RangeError(`no ledger shard ${shard} (LEDGER_SHARDS is ${layout.count})`);
  const ns = namespace(env);
  return ns.get(ns.idFromName(shardName(layout, shard)));
}

/** The ledger object that owns `pool` (shard 0 when no pool is named: callers that mean every shard use everyShard). */
export function ledgerFor(env: Env, pool?: string): DurableObjectStub<ResourceLedger> {
  return ledgerShard(env, pool === undefined ? 0 : shardOfPool(layoutOf(env), pool));
}

/** The ledger object that keeps a client's quotas, execution slots, buckets and spend. */
export function ledgerForClient(env: Env, clientId: string): DurableObjectStub<ResourceLedger> {
  return ledgerShard(env, shardOfClient(layoutOf(env), clientId));
}

/** Every shard, in order: for fan-outs (snapshot, clients, estimates). */
export function everyShard(env: Env): Array<{ shard: number; name: string; stub: DurableObjectStub<ResourceLedger> }> {
  const layout = layoutOf(env);
  return Array.from({ length: layout.count }, (_, shard) => ({ shard, name: shardName(layout, shard), stub: ledgerShard(env, shard) }));
}
