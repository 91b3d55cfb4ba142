import { z } from "zod";
import { ClientDocument } from "./clients";
import { LedgerSnapshot, PoolSnapshot, QueuedWaiter } from "./ledger";

/**
 * What the front Worker answers when it asks every ledger shard at once
 * (`GET /resources`, `GET /clients`, src/ledger-fanout.ts): each shard's
 * answer merged, and which shards answered.
 */
export const ShardAnswerStatus = z.object({
  /** The shard's index, 0 .. LEDGER_SHARDS-1. */
  shard: z.number().int().min(0),
  /** Its ledger object's name: `global` with one shard, else `ledger-{shard}`. */
  name: z.string(),
  /** false: no answer within ledgerCallTimeoutMs (or before the fan-out's deadline), or the call failed. */
  ok: z.boolean(),
  /** With ok false: what went wrong, never an internal message. */
  error: z.string().optional(),
});
export type ShardAnswerStatus = z.infer<typeof ShardAnswerStatus>;

/** A pool more than one shard has state for (a shard count or map change left it behind): `pools` shows the owner's copy when it has one. */
export const PoolConflict = z.object({
  pool: z.string(),
  /** Every shard that listed the pool, ascending. */
  shards: z.array(z.number().int().min(0)),
  /** The shard the routing (LEDGER_SHARDS, LEDGER_SHARD_MAP) gives the pool now. */
  owner: z.number().int().min(0),
});
export type PoolConflict = z.infer<typeof PoolConflict>;

export const ShardedPoolSnapshot = PoolSnapshot.extend({
  /** The shard whose ledger object holds this pool. */
  shard: z.number().int().min(0),
});
export type ShardedPoolSnapshot = z.infer<typeof ShardedPoolSnapshot>;

export const ShardedWaiter = QueuedWaiter.extend({
  /** The shard this waiter waits on: a stage needing pools on several shards waits on each with its part. */
  shard: z.number().int().min(0),
});
export type ShardedWaiter = z.infer<typeof ShardedWaiter>;

/** `GET /resources`: the ledger snapshot's fields over every shard, and which shards answered. */
export const ResourcesDocument = LedgerSnapshot.omit({ shard: true, name: true }).extend({
  /** Every pool once, by name, with its shard. */
  pools: z.array(ShardedPoolSnapshot),
  /** Grants held, summed over the shards that answered: a stage holding parts on several shards counts once per shard. `waiters` the same. */
  leases: z.number(),
  /** Each answering shard's waiters in its queue order, shard by shard. */
  queue: z.array(ShardedWaiter),
  /** Every shard, in order, and whether it answered. */
  shards: z.array(ShardAnswerStatus),
  /** Pools listed by more than one shard (empty normally). */
  conflicts: z.array(PoolConflict),
});
export type ResourcesDocument = z.infer<typeof ResourcesDocument>;

/** `GET /clients`. */
export const ShardedClientList = z.object({
  /** Every client any shard knows, once, as its own shard (the shard of its client id) keeps it. */
  clients: z.array(ClientDocument),
  shards: z.array(ShardAnswerStatus),
});
export type ShardedClientList = z.infer<typeof ShardedClientList>;

/** The ledger's answer to a pool change from the front Worker (`definePool`): a kind change is refused, typed. */
export const PutPoolResult = z.discriminatedUnion("ok", [
  z.object({ ok: z.literal(true), pool: PoolSnapshot }),
  /** pool_kind_immutable: the pool exists with another kind (`kind`); wrong_shard: the routing layout places it on another shard (docs/ledger.md, "Ownership"). */
  z.object({ ok: z.literal(false), code: z.enum(["pool_kind_immutable", "wrong_shard"]), message: z.string(), kind: z.string().optional() }),
]);
export type PutPoolResult = z.infer<typeof PutPoolResult>;
