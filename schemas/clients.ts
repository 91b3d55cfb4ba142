import { z } from "zod";
import { ClientId, PoolName, Priority } from "./common";

/**
 * A client's quotas (docs/ledger.md, "Clients"). Every field is optional: a
 * field a client's own quotas leave out comes from `CLIENT_DEFAULTS`, and a
 * field neither names is no limit (weight: 1).
 */
export const ClientQuotas = z
  .object({
    /** Executions of the client running at once; beyond it a new one stays `queued`. */
    max_running_executions: z.number().int().min(0).max(1_000_000).optional(),
    /** Stages (and fan-out items) of the client holding a reservation at once. */
    max_running_stages: z.number().int().min(0).max(1_000_000).optional(),
    /** A per-client token bucket per pool, on top of the pool itself. */
    rate: z.record(PoolName, z.object({ per_minute: z.number().int().min(1).max(1e12) }).strict()).optional(),
    /** Spend per calendar month (UTC) at the price table, in its currency. */
    monthly_budget: z.number().finite().nonnegative().max(1e12).optional(),
    /** The highest priority the client may ask for. */
    max_priority: Priority.optional(),
    /** Share of contended capacity against other clients of the same priority. */
    weight: z.number().int().min(1).max(100).optional(),
    /** Starts (POST /execute) per minute. */
    max_starts_per_minute: z.number().int().min(1).max(1_000_000).optional(),
  })
  .strict();
export type ClientQuotas = z.infer<typeof ClientQuotas>;

export const WaitReason = z.enum(["capacity", "client_quota", "client_budget", "client_rate", "provider_backoff", "paused"]);
export type WaitReason = z.infer<typeof WaitReason>;

/** Why a waiter waits: the pools (or client limits) that hold it, its place and the expected wait. */
export const WaitingOn = z.object({
  pools: z.array(z.string()),
  reason: WaitReason,
  position: z.number().int().min(1),
  estimated_wait_ms: z.number().nonnegative(),
});
export type WaitingOn = z.infer<typeof WaitingOn>;

export const ClientUsage = z.object({
  running_executions: z.number().int(),
  running_stages: z.number().int(),
  /** The calendar month (UTC) of `spent`, `YYYY-MM`. */
  month: z.string(),
  spent: z.number(),
  /** Estimated cost of the stages running now (held against the budget until they settle). */
  held: z.number(),
  /** monthly_budget − spent − held (never below 0); null without a budget. */
  remaining: z.number().nullable(),
  waiting_stages: z.number().int(),
});

export const ClientDocument = z.object({
  client_id: ClientId,
  /** The quotas in force: the client's own over CLIENT_DEFAULTS. */
  quotas: ClientQuotas,
  /** What PUT /clients/:client_id/quotas stored (null: defaults only). */
  own_quotas: ClientQuotas.nullable(),
  currency: z.string(),
  usage: ClientUsage,
});
export type ClientDocument = z.infer<typeof ClientDocument>;

export const ClientList = z.object({ clients: z.array(ClientDocument) });
export type ClientList = z.infer<typeof ClientList>;

/** The ledger's answer to a start (POST /execute): admitted, or why not. */
export const StartAdmission = z.discriminatedUnion("ok", [
  z.object({
    ok: z.literal(true),
    /**
     * `free`: the client has no `max_running_executions`, so the execution takes
     * no counted slot and starts without asking `acquireSlot`; `counted`: it asks
     * before its first stage (docs/ledger.md, "Execution slots").
     */
    slot: z.enum(["counted", "free"]),
    /** With `free` on a sharded ledger: the client's fair-share weight, as acquireSlot's answer carries it. */
    weight: z.number().int().optional(),
    /**
     * The answer depends on the client's quotas alone (no `monthly_budget`, no
     * `max_starts_per_minute`): no start changes it, so the front Worker may reuse
     * it for `admissionCacheMs` (docs/ledger.md, "Quotas", Admission).
     */
    steady: z.boolean().optional(),
  }),
  z.object({
    ok: z.literal(false),
    code: z.enum(["priority_not_allowed", "budget_exhausted", "rate_limited"]),
    message: z.string(),
    retryAfterMs: z.number().int().optional(),
  }),
]);
export type StartAdmission = z.infer<typeof StartAdmission>;
