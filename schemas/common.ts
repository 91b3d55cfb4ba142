import { z } from "zod";

/** Priorities, lowest first: the index is the rank used by the ledger's queue. */
export const PRIORITIES = ["low", "normal", "high", "critical"] as const;
export const Priority = z.enum(PRIORITIES);
export type Priority = z.infer<typeof Priority>;

/** `exec_{unix ms}_{nanoid}`: checked before any object is touched. */
export const EXECUTION_ID_RE = /^exec_\d{13}_[A-Za-z0-9_-]{12,32}$/;
export const ExecutionId = z.string().regex(EXECUTION_ID_RE, "must look like exec_{unix ms}_{id}");

/** Stage ids are `stage_{order}` within their execution. */
/** A stage `stage_{n}`, or item `i` of a fan-out stage: `stage_{n}.{i}`. */
export const STAGE_ID_RE = /^stage_\d{1,3}(\.\d{1,6})?$/;
export const StageId = z.string().regex(STAGE_ID_RE, "must look like stage_{n} or stage_{n}.{i}");

/** Safe character sets and lengths for names that end up in keys, logs and URLs. */
export const TemplateName = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, "letters, digits, '_', '.', '-' only");
/** At most 57 characters, so `worker:{name}` is still a valid pool name. */
export const WorkerName = z
  .string()
  .min(1)
  .max(57)
  .regex(/^[a-z0-9][a-z0-9-]*$/, "lower-case letters, digits and '-' only");
export const PoolName = z
  .string()
  .min(1)
  .max(64)
  // `#k` names sub-pool k of a pool split across ledger shards (LEDGER_SHARD_MAP, docs/scaling.md).
  .regex(/^[a-z0-9][a-z0-9:_.-]*(#[0-9]{1,2})?$/, "lower-case letters, digits, ':', '_', '.', '-' only, optionally #<sub-pool>");
export const ClientId = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[A-Za-z0-9][A-Za-z0-9_.:@-]*$/, "letters, digits and _ . : @ - only");
export const RequestId = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[A-Za-z0-9][A-Za-z0-9_.:-]*$/, "letters, digits and _ . : - only");

/** Amounts per pool, e.g. `{ "tokens:openai": 1200 }`. */
export const PoolAmounts = z.record(PoolName, z.number().finite().nonnegative());
export type PoolAmounts = z.infer<typeof PoolAmounts>;

export const ErrorInfo = z.object({
  code: z.string().min(1).max(64),
  message: z.string().max(2000),
  stage_id: z.string().optional(),
  details: z.unknown().optional(),
});
export type ErrorInfo = z.infer<typeof ErrorInfo>;

/** Every error the HTTP API answers has this shape. */
export const ErrorEnvelope = z.object({
  error: z.object({ code: z.string(), message: z.string(), details: z.unknown().optional() }),
});
