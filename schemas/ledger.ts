import { z } from "zod";
import { ExecutionId, PoolAmounts, PoolName, Priority, StageId, WorkerName } from "./common";

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
});
export type ReserveRequest = z.infer<typeof ReserveRequest>;

export type ReserveResult =
  | { status: "granted"; reservationId: string; expiresAt: number; requirements: PoolAmounts }
  | { status: "waiting"; reservationId: string; position: number; estimatedWaitMs: number }
  | { status: "refused"; reservationId: string; code: "resource_unsatisfiable" | "unknown_pool"; message: string }
  /** A replay of a reservation that already ended (settled, released, expired): reserve again with a new attempt. */
  | { status: "ended"; reservationId: string; state: ReservationState; code: "reservation_ended"; message: string };

export type ReservationState = "waiting" | "granted" | "settled" | "released" | "expired" | "unknown";

export interface PoolSnapshot {
  name: string;
  kind: PoolKind;
  capacity: number;
  in_use: number;
  available: number;
  waiting: number;
  refill_per_second?: number;
  consumed?: number;
  estimates?: { avg_usage_per_stage: number | null; samples: number };
}
export interface LedgerSnapshot {
  pools: PoolSnapshot[];
  leases: number;
  waiters: number;
}

/** A grant notice the ledger sends to an Execution when a waiter is granted. */
export interface GrantNotice {
  reservationId: string;
  requirements: PoolAmounts;
  stageId: string;
  attempt: number;
  expiresAt: number;
}

export const UsageReport = z.object({ usage: PoolAmounts, durationMs: z.number().nonnegative().optional() });
export { PoolAmounts };
