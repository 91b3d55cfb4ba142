import { z } from "zod";
import { ErrorInfo, ExecutionId, PoolAmounts, PoolName, StageId } from "./common";
import { DataReference } from "./data";

/**
 * The stage worker protocol (docs/protocol.md). Every call we make carries
 * `Authorization: Bearer <the worker's own secret>` (its WORKER_SECRET); every
 * callback a worker makes carries the per-stage callback token it received in
 * the handshake, and every input read the data token.
 */

export const HandshakeRequest = z.object({
  executionId: ExecutionId,
  stageId: StageId,
  attempt: z.number().int().min(1),
  action: z.string().min(1).max(64),
  inputData: z.object({
    parameters: z.record(z.string(), z.unknown()),
    template_ref: z.string(),
    /** The output of the stage's single dependency; null when it has none or several. */
    previousOutput: z.unknown().nullable(),
    /** One entry per dependency: stage id -> that stage's output (`{}` without dependencies). */
    inputs: z.record(z.string(), z.unknown()).default({}),
    /** For an item of a fan-out stage: the element of the list and its position. */
    item: z.unknown().optional(),
    item_index: z.number().int().min(0).optional(),
  }),
  dataReference: DataReference.optional(),
  resourceRequirements: z.object({
    estimatedTokens: z.number().nonnegative(),
    timeoutMs: z.number().int().positive(),
    pools: PoolAmounts.optional(),
  }),
  validationConfig: z.record(z.string(), z.unknown()),
  /**
   * `token` (use `callback`): the stage's callbacks and uploads; `dataToken` (use
   * `data`): reading the stage's inputs (`GET /data/{key}`) and nothing else.
   * Both expire (docs/protocol.md, "Callback tokens").
   */
  callback: z.object({ url: z.string().url(), token: z.string().min(16), dataToken: z.string().min(16).optional() }),
});
export type HandshakeRequest = z.infer<typeof HandshakeRequest>;

export const HandshakeResponse = z.object({
  executionId: z.string(),
  workerId: z.string(),
  accepted: z.boolean(),
  estimatedCompletionMs: z.number().nonnegative().optional(),
  resourceRequirements: z.record(z.string(), z.unknown()).optional(),
  capabilities: z.record(z.string(), z.unknown()).optional(),
  reason: z.string().max(500).optional(),
  /** With `accepted: false`: whether asking again later may succeed (busy, draining). */
  retryable: z.boolean().optional(),
});
export type HandshakeResponse = z.infer<typeof HandshakeResponse>;

/** `attempt` lets a worker ignore a late process or cancel meant for an earlier attempt. */
export const ProcessRequest = z.object({ executionId: ExecutionId, stageId: StageId, attempt: z.number().int().min(1).optional() });
export type ProcessRequest = z.infer<typeof ProcessRequest>;

export const CancelRequest = z.object({ executionId: ExecutionId, stageId: StageId, attempt: z.number().int().min(1).optional() });
export type CancelRequest = z.infer<typeof CancelRequest>;

/**
 * What a provider said about its rate limit on one pool (from its response
 * headers; packages/worker-kit `rateLimitsFrom`): the ledger lowers that rate
 * pool's bucket to `remaining`, and after `retry_after_ms` (or `remaining: 0`
 * with `reset_ms`) grants nothing on the pool until that time has passed.
 */
export const RateLimitReport = z
  .object({
    pool: PoolName,
    remaining: z.number().finite().nonnegative().optional(),
    reset_ms: z.number().int().nonnegative().max(24 * 3600_000).optional(),
    retry_after_ms: z.number().int().nonnegative().max(24 * 3600_000).optional(),
  })
  .strict();
export type RateLimitReport = z.infer<typeof RateLimitReport>;
export const RateLimits = z.array(RateLimitReport).max(16);

export const ProgressResponse = z.object({
  status: z.enum(["processing", "completed", "failed"]),
  progress: z.number().min(0).max(100).optional(),
  message: z.string().max(1000).optional(),
  output: z.unknown().optional(),
  dataReference: DataReference.optional(),
  usage: PoolAmounts.optional(),
  error: ErrorInfo.pick({ code: true, message: true }).optional(),
  retryable: z.boolean().optional(),
  rate_limits: RateLimits.optional(),
});
export type ProgressResponse = z.infer<typeof ProgressResponse>;

/** Callbacks: `POST /executions/:id/stages/:stageId/{progress,complete,fail}`. */
export const ProgressCallback = z.object({
  progress: z.number().min(0).max(100),
  message: z.string().max(1000).optional(),
  rate_limits: RateLimits.optional(),
});
export type ProgressCallback = z.infer<typeof ProgressCallback>;

export const CompleteCallback = z
  .object({
    output: z.unknown().optional(),
    dataReference: DataReference.optional(),
    usage: PoolAmounts.optional(),
    rate_limits: RateLimits.optional(),
  })
  .refine((b) => b.output !== undefined || b.dataReference !== undefined, {
    message: "either output or dataReference is required",
    path: ["output"],
  });
export type CompleteCallback = z.infer<typeof CompleteCallback>;

export const FailCallback = z.object({
  error: z.object({ code: z.string().min(1).max(64), message: z.string().max(2000) }),
  retryable: z.boolean().optional(),
  usage: PoolAmounts.optional(),
  rate_limits: RateLimits.optional(),
});
export type FailCallback = z.infer<typeof FailCallback>;
