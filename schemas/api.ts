import { z } from "zod";
import { ClientId, ErrorInfo, PoolAmounts, Priority, RequestId, TemplateName } from "./common";
import { DataReference } from "./data";

/** `POST /execute` and RPC `execute()`. Unknown fields are refused so a typo is not silently ignored. */
export const ExecuteRequest = z
  .object({
    template_name: TemplateName,
    parameters: z.record(z.string(), z.unknown()),
    client_id: ClientId,
    request_id: RequestId.optional(),
    priority: Priority.default("normal"),
  })
  .strict();
export type ExecuteRequest = z.input<typeof ExecuteRequest>;
export type ExecuteInput = z.output<typeof ExecuteRequest>;

export const ExecutionStatus = z.enum(["queued", "running", "completed", "failed", "cancelled"]);
export type ExecutionStatus = z.infer<typeof ExecutionStatus>;
export const TERMINAL_STATUSES: readonly ExecutionStatus[] = ["completed", "failed", "cancelled"];

export const StageStatus = z.enum([
  "pending",
  "waiting_resources",
  "handshaking",
  "processing",
  "completed",
  "failed",
  "cancelled",
]);
export type StageStatus = z.infer<typeof StageStatus>;

export const ExecuteResponse = z.object({
  execution_id: z.string(),
  status: ExecutionStatus,
  estimated_completion_ms: z.number(),
  estimated_completion_at: z.string(),
  status_url: z.string(),
});
export type ExecuteResponse = z.infer<typeof ExecuteResponse>;

export const Cost = z.object({
  total: z.number(),
  currency: z.string(),
  by_pool: z.record(z.string(), z.number()),
  by_stage: z.record(z.string(), z.number()),
  unpriced: z.array(z.string()),
});
export type Cost = z.infer<typeof Cost>;

export const StageDocument = z.object({
  stage_id: z.string(),
  order: z.number(),
  worker: z.string(),
  template_ref: z.string(),
  action: z.string(),
  status: StageStatus,
  attempts: z.number(),
  max_attempts: z.number(),
  progress: z.number(),
  message: z.string().nullable(),
  started_at: z.string().nullable(),
  completed_at: z.string().nullable(),
  waiting_ms: z.number(),
  processing_ms: z.number(),
  error: ErrorInfo.nullable(),
  /** The most recent failed attempt's error (with `attempt`), also after a retry succeeded. */
  last_error: ErrorInfo.extend({ attempt: z.number().optional() }).nullable(),
  usage: PoolAmounts.nullable(),
  cost: z.number().nullable(),
});
export type StageDocument = z.infer<typeof StageDocument>;

export const StatusDocument = z.object({
  execution_id: z.string(),
  status: ExecutionStatus,
  template_name: z.string(),
  template_id: z.string().nullable(),
  template_source: z.enum(["kam", "cache"]).nullable(),
  client_id: z.string(),
  request_id: z.string().nullable(),
  priority: Priority,
  created_at: z.string(),
  started_at: z.string().nullable(),
  completed_at: z.string().nullable(),
  estimated_completion_at: z.string().nullable(),
  /** Set when retention deleted the execution's data; the summary stays. */
  data_expired_at: z.string().nullable(),
  error: ErrorInfo.nullable(),
  cost: Cost.nullable(),
  stages: z.array(StageDocument),
});
export type StatusDocument = z.infer<typeof StatusDocument>;

/** The deliverable: inline when small; otherwise `output` is null and `output_reference` + `content_url` lead to the bytes. */
export const ResultDocument = z.object({
  execution_id: z.string(),
  status: z.literal("completed"),
  output: z.unknown(),
  output_reference: DataReference.nullable(),
  content_url: z.string(),
  cost: Cost.nullable(),
});
export type ResultDocument = z.infer<typeof ResultDocument>;
