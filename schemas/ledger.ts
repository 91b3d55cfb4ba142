import { z } from "zod";
import { ClientQuotas, WaitingOn } from "./clients";
import { ClientId, ExecutionId, PoolAmounts, PoolName, Priority, StageId, WorkerName } from "./common";

/**
 * Pool kinds:
 * - concurrency: `capacity` slots held from grant until settle or release;
 * - rate: a token bucket of `capacity` refilled at `refill_per_second`; a grant
 *   takes tokens, settling refunds the unused part;
 * - budget: an amount only settles consume and only an operator refills.
 */
export const PoolKind = z.enum(["concurrency", "rate", "budget"]);
export type PoolKind = z.infer<typeof PoolKind>;

export const PoolSpec = z
  .object({
    kind: PoolKind,
    capacity: z.number().finite().nonnegative().max(1e15),
    refill_per_second: z.number().finite().nonnegative().max(1e12).optional(),
    /** budget pools: set the consumed amount back to this (an operator's refill). */
    refill: z.boolean().optional(),
  })
  .strict()
  .refine((p) => p.kind !== "rate" || (p.refill_per_second ?? 0) > 0, {
    message: "a rate pool needs refill_per_second > 0",
    path: ["refill_per_second"],
  });
export type PoolSpec = z.infer<typeof PoolSpec>;

export const PoolConfig = z.array(PoolSpec.and(z.object({ name: PoolName })));

/** A ledger shard's index (`ledger-{i}`; the single object `global` is 0). */
export const ShardIndex = z.number().int().min(0).max(255);

/**
 * One shard's part of a stage whose pools span shards (docs/ledger.md, "Parts"):
 * this reservation holds only `requirements` (this shard's pools), the worker
 * slot only when `worker`, and the client's own holds (running-stage count,
 * rate buckets, budget hold) only when `client`, judged on `stageNeeds`.
 */
export const ReservePart = z
  .object({
    shard: ShardIndex,
    /** Every shard of the stage's set, in acquisition order (kept on the row for the snapshot). */
    shards: z.array(ShardIndex).min(1).max(256),
    /** This part holds the stage's `worker:{worker}` slot. */
    worker: z.boolean(),
    /** This part holds the client's running-stage count, rate buckets and budget hold (the client's shard). */
    client: z.boolean(),
    /** The whole stage's needs (every shard's pools): the client part's budget cost and client rate are judged on them. */
    stageNeeds: PoolAmounts.optional(),
  })
  .strict()
  .refine((p) => p.shards.includes(p.shard), { message: "shards must include shard", path: ["shards"] });
export type ReservePart = z.infer<typeof ReservePart>;

export const ReserveRequest = z.object({
  executionId: ExecutionId,
  stageId: StageId,
  /** Reservation ids are derived from (execution, stage, attempt), so a repeated reserve is idempotent. */
  attempt: z.number().int().min(1),
  priority: Priority,
  /** Explicit needs from the template; when absent the ledger reserves its estimate for `worker`. */
  requirements: PoolAmounts.optional(),
  leaseMs: z.number().int().min(1000).max(24 * 3600 * 1000),
  /** The stage's worker: the ledger always adds one slot of `worker:{worker}` and keeps estimates per worker. */
  worker: WorkerName,
  /** The execution's client: its quotas and fair share apply (absent: no client limits, one shared fair-queue lane). */
  clientId: ClientId.optional(),
  /** Absent: the whole stage on this object (every pool, the worker slot, the client's holds). */
  part: ReservePart.optional(),
  /**
   * Acquisition round of a multi-shard stage (default 0): a set that backs off
   * retries with round + 1 without spending an attempt; the id gains `@{round}`.
   */
  round: z.number().int().min(0).max(1_000_000).optional(),
  /**
   * The client's fair-share weight, for a part on a shard that is not the
   * client's (the Execution has it from `acquireSlot`); the client's own shard
   * always uses the quotas it keeps.
   */
  clientWeight: ClientQuotas.shape.weight,
  /**
   * The stages that follow this one, one after another on the same worker (docs/ledger.md, "Chain
   * grants"): granted with it, in one reservation, when nobody waits and all of it fits; otherwise
   * the stage alone is reserved, as without it. Not with `part`.
   */
  chain: z
    .array(z.object({ stageId: StageId, requirements: PoolAmounts.optional() }).strict())
    .min(1)
    .max(64)
    .optional(),
}).refine((r) => !(r.chain && r.part), { message: "a part cannot carry a chain", path: ["chain"] });
export type ReserveRequest = z.infer<typeof ReserveRequest>;

export const ReservationState = z.enum(["waiting", "granted", "settled", "released", "expired", "refused", "unknown"]);
export type ReservationState = z.infer<typeof ReservationState>;

export const ReserveResult = z.discriminatedUnion("status", [
  z.object({
    status: z.literal("granted"),
    reservationId: z.string(),
    expiresAt: z.number(),
    /** The stage's own needs (a chain grant holds the sum of its stages'). */
    requirements: PoolAmounts,
    /** A chain grant: the later stages it covers, in order (the request's `chain`, whole). */
    chain: z.array(z.string()).optional(),
  }),
  z.object({
    status: z.literal("waiting"),
    reservationId: z.string(),
    position: z.number().int(),
    estimatedWaitMs: z.number(),
    waitingOn: WaitingOn.optional(),
  }),
  z.object({
    status: z.literal("refused"),
    reservationId: z.string(),
    /**
     * budget_exhausted: the client's monthly budget cannot cover the stage and nothing of the client's runs.
     * wrong_shard: a pool (or the client, or the part's shard) belongs to another ledger shard under this
     * object's routing layout (docs/ledger.md, "Ownership"); nothing is stored.
     */
    code: z.enum(["resource_unsatisfiable", "unknown_pool", "budget_exhausted", "wrong_shard"]),
    message: z.string(),
  }),
  /**
   * The request itself is malformed (a field fails the schema, or the worker makes no valid pool name): the
   * same request can never succeed, so the caller fails for good and does not ask again. No reservation is made.
   */
  z.object({ status: z.literal("invalid"), code: z.literal("invalid_request"), message: z.string() }),
  /** A replay of a reservation that already ended (settled, released, expired): reserve again with a new attempt. Also a part's round that arrives after its set's later round (`released`, nothing made). */
  z.object({
    status: z.literal("ended"),
    reservationId: z.string(),
    state: ReservationState,
    code: z.literal("reservation_ended"),
    message: z.string(),
  }),
]);
export type ReserveResult = z.infer<typeof ReserveResult>;

// ---- the other RPC inputs and results (docs/ledger.md, "RPC surface") -------

export const ReservationId = z.string().min(1).max(256);
export const LeaseMs = z.number().int().min(1000).max(24 * 3600 * 1000);
export const DurationMs = z.number().finite().nonnegative().optional();
export const SettledStages = z.number().int().min(1).max(65).optional();
export const EstimateStages = z
  .array(z.object({ worker: z.string().min(1).max(63), resources: PoolAmounts.optional() }))
  .max(500);
export type EstimateStages = z.infer<typeof EstimateStages>;
export const SettleInput = z.object({
  reservationId: z.string(),
  usage: z.record(z.string(), z.number()),
  durationMs: z.number().optional(),
  /** A part holding the client: the whole stage's usage, for the client's spend and rate refund (docs/ledger.md, "Parts"). */
  stageUsage: z.record(z.string(), z.number()).optional(),
  /** How many stages of a chain grant the usage and duration cover (default 1): the worker's averages learn each. */
  stages: SettledStages,
});
export type SettleInput = z.infer<typeof SettleInput>;

export const RenewResult = z.object({
  ok: z.boolean(),
  state: ReservationState,
  expiresAt: z.number().optional(),
  /** A chain grant cut by a waiter (docs/ledger.md, "Chain grants"): settle it at the end of the stage now running. */
  chainCut: z.literal(true).optional(),
});
export type RenewResult = z.infer<typeof RenewResult>;
export const SettleResult = z.object({ ok: z.boolean(), state: ReservationState, unknownPools: z.array(z.string()) });
export type SettleResult = z.infer<typeof SettleResult>;
export const ReleaseResult = z.object({ ok: z.boolean(), state: ReservationState });
export type ReleaseResult = z.infer<typeof ReleaseResult>;
export const StatusResult = z.object({
  state: ReservationState,
  expiresAt: z.number().optional(),
  position: z.number().int().optional(),
  requirements: PoolAmounts.optional(),
  waitingOn: WaitingOn.optional(),
});
export type StatusResult = z.infer<typeof StatusResult>;
export const EstimateResult = z.object({
  stages: z.array(z.object({ requirements: PoolAmounts, durationMs: z.number() })),
  queueAheadMs: z.number(),
  totalMs: z.number(),
});
export type EstimateResult = z.infer<typeof EstimateResult>;
export const SettleAndReserveResult = z.object({ settled: SettleResult.nullable(), reserved: ReserveResult });
export const PaceResult = z.object({ applied: z.array(z.string()), ignored: z.array(z.string()) });
export type PaceResult = z.infer<typeof PaceResult>;
export type SettleAndReserveResult = z.infer<typeof SettleAndReserveResult>;

/**
 * A client execution slot (max_running_executions, docs/ledger.md "Execution
 * slots"): `granted` (counted: the client has the quota, so the slot must be
 * released when the execution ends) or `waiting` with why and where.
 */
export const SlotResult = z.discriminatedUnion("status", [
  /** `weight`: the client's fair-share weight in force, for `clientWeight` of the stage parts on other shards. */
  z.object({ status: z.literal("granted"), counted: z.boolean(), weight: z.number().int().optional() }),
  z.object({ status: z.literal("waiting"), waitingOn: WaitingOn }),
]);
export type SlotResult = z.infer<typeof SlotResult>;

export const PoolSnapshot = z.object({
  name: z.string(),
  /** The ledger shard that keeps the pool (0 on the single object `global`); always set by a ledger object. */
  shard: ShardIndex.optional(),
  kind: PoolKind,
  capacity: z.number(),
  in_use: z.number(),
  available: z.number(),
  waiting: z.number(),
  refill_per_second: z.number().optional(),
  consumed: z.number().optional(),
  /** Provider backoff (a `retry_after_ms` report): nothing is granted from the pool before this time (unix ms). */
  paused_until: z.number().optional(),
  estimates: z.object({ avg_usage_per_stage: z.number().nullable(), samples: z.number() }).optional(),
});
export type PoolSnapshot = z.infer<typeof PoolSnapshot>;
/** One waiter as the snapshot lists it (the first `queue_limit` in queue order, then those held by a client quota). */
export const QueuedWaiter = z.object({
  reservation_id: z.string(),
  execution_id: z.string(),
  stage_id: z.string(),
  client_id: z.string().nullable(),
  priority: Priority,
  effective_priority: Priority,
  waiting_on: WaitingOn,
});
export type QueuedWaiter = z.infer<typeof QueuedWaiter>;
export const LedgerSnapshot = z.object({
  /** This object's shard index (always set by a ledger object; 0 outside a layout) and, on a shard of the layout, its name. */
  shard: ShardIndex.optional(),
  name: z.string().optional(),
  pools: z.array(PoolSnapshot),
  leases: z.number(),
  waiters: z.number(),
  queue: z.array(QueuedWaiter),
});
export type LedgerSnapshot = z.infer<typeof LedgerSnapshot>;

/** A grant notice the ledger sends to an Execution when a waiter is granted. */
export const GrantNotice = z.object({
  reservationId: z.string(),
  requirements: PoolAmounts,
  stageId: z.string(),
  attempt: z.number().int(),
  expiresAt: z.number(),
  /** A part's grant (a multi-shard stage): the shard that granted it. Absent for a whole stage's. */
  shard: ShardIndex.optional(),
});
export type GrantNotice = z.infer<typeof GrantNotice>;

export const UsageReport = z.object({ usage: PoolAmounts, durationMs: z.number().nonnegative().optional() });
export { PoolAmounts };
