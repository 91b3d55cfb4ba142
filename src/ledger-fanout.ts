import type { ResourceLedger } from "../actors/resource-ledger";
import type { ClientDocument } from "../schemas/clients";
import type { LedgerSnapshot } from "../schemas/ledger";
import type { PoolConflict, ResourcesDocument, ShardAnswerStatus, ShardedClientList, ShardedPoolSnapshot } from "../schemas/resources";
import { configOf } from "./config";
import { everyShard, layoutOf, ledgerShard, shardOfClient, shardOfPool } from "./ledger-routing";
import { log } from "./log";
import { withTimeout } from "./outbound";

/**
 * Reads that need every ledger shard (docs/scaling.md, "Shards"): the
 * snapshot behind `GET /resources`, `/metrics`, the queue sampler and
 * `/ui/resources`, and the client list. Bounded: at most FAN_OUT_PARALLEL
 * calls in flight, each with `ledgerCallTimeoutMs`, all within one deadline
 * (`ledgerFanOutDeadlineMs`); a shard that does not answer in time is listed
 * as such and the answer comes without it.
 */
export const FAN_OUT_PARALLEL = 16;

export interface ShardTarget {
  shard: number;
  name: string;
  stub: DurableObjectStub<ResourceLedger>;
}
export type ShardAnswer<T> = ShardAnswerStatus & ({ ok: true; value: T } | { ok: false; error: string });

/**
 * Asks each target, FAN_OUT_PARALLEL at a time, and answers one entry per target in the targets' order.
 * `deadlineMs` bounds the whole fan-out (default `ledgerFanOutDeadlineMs`); `logFields` (a caller's
 * ids) ride on the one log line a shard that did not answer gets.
 */
export async function askShards<T, S extends ShardTarget>(
  env: Env,
  targets: S[],
  ask: (target: S) => PromiseLike<T>,
  what: string,
  opts: { deadlineMs?: number; logFields?: Record<string, unknown> } = {},
): Promise<ShardAnswer<T>[]> {
  const t = configOf(env).tuning;
  const deadlineMs = opts.deadlineMs ?? t.ledgerFanOutDeadlineMs;
  const deadline = Date.now() + deadlineMs;
  const out: ShardAnswer<T>[] = new Array(targets.length);
  let next = 0;
  const runner = async () => {
    for (let i = next++; i < targets.length; i = next++) {
      const { shard, name } = targets[i];
      const left = deadline - Date.now();
      if (left <= 0) {
        out[i] = { shard, name, ok: false, error: `not asked: the fan-out's ${deadlineMs} ms deadline passed` };
        continue;
      }
      const ms = Math.min(t.ledgerCallTimeoutMs, left);
      try {
        out[i] = { shard, name, ok: true, value: await withTimeout(ask(targets[i]), ms, `${what} of ${name}`) };
      } catch (err) {
        // The cause goes to the log only: an internal message never reaches the caller.
        log("warn", "ledger_shard_unanswered", { ...opts.logFields, what, shard, name, error: err instanceof Error ? err.message : String(err) });
        out[i] = { shard, name, ok: false, error: `no answer within ${ms} ms, or it failed` };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(FAN_OUT_PARALLEL, targets.length) }, runner));
  return out;
}

const statusOf = <T>(a: ShardAnswer<T>): ShardAnswerStatus => (a.ok ? { shard: a.shard, name: a.name, ok: true } : { shard: a.shard, name: a.name, ok: false, error: a.error });

/**
 * Every shard's snapshot merged (pure, for the tests): each pool once, with
 * the shard it was found on; a pool found on more than one shard is a
 * conflict, shown from its owner's copy when the owner has one. Leases and
 * waiters are summed, so a stage holding or waiting for parts on k shards
 * counts k times.
 */
export function mergeSnapshots(answers: ShardAnswer<LedgerSnapshot>[], ownerOf: (pool: string) => number): ResourcesDocument {
  const seen = new Map<string, ShardedPoolSnapshot[]>();
  const doc: ResourcesDocument = { pools: [], leases: 0, waiters: 0, queue: [], shards: answers.map(statusOf), conflicts: [] };
  for (const a of answers) {
    if (!a.ok) continue;
    doc.leases += a.value.leases;
    doc.waiters += a.value.waiters;
    for (const w of a.value.queue) doc.queue.push({ ...w, shard: a.shard });
    for (const p of a.value.pools) {
      const copies = seen.get(p.name) ?? [];
      copies.push({ ...p, shard: a.shard });
      seen.set(p.name, copies);
    }
  }
  const conflicts: PoolConflict[] = [];
  for (const [pool, copies] of seen) {
    const owner = ownerOf(pool);
    doc.pools.push(copies.find((c) => c.shard === owner) ?? copies[0]);
    if (copies.length > 1) conflicts.push({ pool, shards: copies.map((c) => c.shard).sort((x, y) => x - y), owner });
  }
  doc.pools.sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
  doc.conflicts = conflicts.sort((x, y) => (x.pool < y.pool ? -1 : 1));
  return doc;
}

/** The merged snapshot of every shard; `answered` is how many shards answered (0: nothing is known). */
export async function resourcesDocument(env: Env): Promise<{ doc: ResourcesDocument; answered: number }> {
  const layout = layoutOf(env);
  const answers = await askShards(env, everyShard(env), (s) => s.stub.snapshot(), "ledger.snapshot");
  const doc = mergeSnapshots(answers, (pool) => shardOfPool(layout, pool));
  if (doc.conflicts.length) log("warn", "ledger_pool_conflicts", { conflicts: doc.conflicts });
  return { doc, answered: answers.filter((a) => a.ok).length };
}

/**
 * Every client any shard knows, once, as its own shard keeps it: a client
 * also appears on the shards its stages reserved on, but its quotas, slots,
 * running stages and spend live on the shard of its id. A client only other
 * shards named is read from its own shard in a second bounded round.
 */
export async function clientList(env: Env): Promise<ShardedClientList> {
  const layout = layoutOf(env);
  const answers = await askShards(env, everyShard(env), (s) => s.stub.clients(), "ledger.clients");
  const found = new Map<string, ClientDocument>();
  const elsewhere = new Set<string>();
  for (const a of answers) {
    if (!a.ok) continue;
    for (const c of a.value) {
      if (shardOfClient(layout, c.client_id) === a.shard) found.set(c.client_id, c);
      else elsewhere.add(c.client_id);
    }
  }
  const missing = [...elsewhere].filter((id) => !found.has(id) && answers[shardOfClient(layout, id)]?.ok);
  const targets = missing.map((id) => {
    const shard = shardOfClient(layout, id);
    return { shard, name: answers[shard].name, stub: ledgerShard(env, shard), id };
  });
  for (const a of await askShards(env, targets, (t) => t.stub.client(t.id), "ledger.client")) if (a.ok) found.set(a.value.client_id, a.value);
  const clients = [...found.values()].sort((x, y) => (x.client_id < y.client_id ? -1 : 1));
  return { clients, shards: answers.map(statusOf) };
}
