import { z } from "zod";
import { WaitingOn } from "./clients";
import { ClientId, ErrorInfo, ExecutionId, PoolAmounts, Priority, RequestId, StageId, TemplateName } from "./common";
import { DataReference } from "./data";

/** `POST /execute` and RPC `execute()`. Unknown fields are refused so a typo is not silently ignored. */
export const ExecuteRequest = z
  .object({
    template_name: TemplateName,
    parameters: z.record(z.string(), z.unknown()),
    client_id: ClientId,
    request_id: RequestId.optional(),
    priority: Priority.default("normal"),
    /** Deliver this execution's events to KAM (POST /api/orchestrator/events); default: the NOTIFY_DEFAULT var. */
    notify: z.boolean().optional(),
    /** The longest the whole execution may run (default `executionTimeoutMs`, 24 h): then it fails with `execution_timeout`. */
    execution_timeout_ms: z.number().int().min(1000).max(30 * 24 * 3600 * 1000).optional(),
  })
  .strict();
export type ExecuteRequest = z.input<typeof ExecuteRequest>;
export type ExecuteInput = z.output<typeof ExecuteRequest>;

export const ExecutionStatus = z.enum(["queued", "running", "paused", "completed", "failed", "cancelled"]);
export type ExecutionStatus = z.infer<typeof ExecutionStatus>;
export const TERMINAL_STATUSES: readonly ExecutionStatus[] = ["completed", "failed", "cancelled"];

export const StageStatus = z.enum([
  "pending",
  "awaiting_approval",
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

export const ItemCounts = z.object({
  total: z.number(),
  pending: z.number(),
  running: z.number(),
  completed: z.number(),
  failed: z.number(),
  cancelled: z.number(),
});

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
  /** `approval`: waits for a decision instead of running on a worker (docs/protocol.md, "Approval stages"). */
  type: z.enum(["worker", "approval"]),
  /** Rerun: this stage was taken over from that execution (its output, no usage, cost 0). */
  reused_from: z.string().optional(),
  /** An approval stage's decision, once made. */
  decision: z.object({ approved: z.boolean(), by: z.enum(["kam", "ops", "client"]), comment: z.string().nullable(), at: z.string() }).optional(),
  /** The current attempt's span (W3C trace context), the parent of the worker's spans; null before the first attempt. */
  span_id: z.string().nullable(),
  /** The stage ids this stage waits for (an item: its fan-out stage's). */
  depends_on: z.array(z.string()),
  /** Fan-out stages: the JSON Pointer their items come from, and how many run at once. */
  for_each: z.string().optional(),
  max_parallel: z.number().optional(),
  /** Fan-out stages: item counts by state; null until the dependency completed and the list is known. */
  items: ItemCounts.nullable().optional(),
  /** Items: the position in the list (the item id is `{stage_id}.{item_index}`). */
  item_index: z.number().optional(),
  /** While `waiting_resources`: why (the ledger's pools, reason, place and expected wait; docs/ledger.md, "Why is it waiting"). */
  waiting_on: WaitingOn.optional(),
});
export type StageDocument = z.infer<typeof StageDocument>;

export const EventType = z.enum([
  "execution.completed",
  "execution.failed",
  "execution.cancelled",
  "execution.paused",
  "execution.resumed",
  "stage.awaiting_approval",
]);
export type EventType = z.infer<typeof EventType>;

/** The body of `POST /api/orchestrator/events` on KAM; the same bytes on every redelivery. */
export const ExecutionEvent = z.object({
  /** Stable across redeliveries: de-duplicate on it. */
  event_id: z.string(),
  type: EventType,
  execution_id: z.string(),
  client_id: z.string(),
  request_id: z.string().nullable(),
  /** The execution's status when the event was decided. */
  status: ExecutionStatus,
  stage_id: z.string().optional(),
  error: ErrorInfo.optional(),
  cost: Cost.optional(),
  /** `execution.completed`: where to read the result. */
  result_url: z.string().optional(),
  occurred_at: z.string(),
});
export type ExecutionEvent = z.infer<typeof ExecutionEvent>;

/** Delivery of the execution's events to KAM (all zero when `notify` is off). */
export const NotificationsDocument = z.object({
  enabled: z.boolean(),
  delivered: z.number(),
  pending: z.number(),
  /** Events given up on after the retry window (notifyRetryWindowMs, 24 h by default). */
  undeliverable: z.array(z.object({ event_id: z.string(), type: EventType, attempts: z.number(), last_error: z.string(), occurred_at: z.string() })),
});
export type NotificationsDocument = z.infer<typeof NotificationsDocument>;
export const UndeliverableMessage = z.object({
  outbox_id: z.number().int(),
  /** `ledger_settle`, `ledger_release`, `worker_cancel`, `index_upsert`, `rerun_link`. */
  kind: z.string(),
  since: z.string(),
  attempts: z.number().int(),
  last_error: z.string().nullable(),
});
export type UndeliverableMessage = z.infer<typeof UndeliverableMessage>;

/** `GET /resources/undeliverable`: every execution's undeliverable messages, a page at a time. */
export const UndeliverableList = z.object({
  items: z.array(UndeliverableMessage.extend({ execution_id: z.string() })),
  /** Pass back as `cursor` for the next page; null on the last. */
  cursor: z.string().nullable(),
});
export type UndeliverableList = z.infer<typeof UndeliverableList>;

/** `POST /resources/undeliverable/retry`: `{}` for the first hundred listed, or one execution's. */
export const RetryUndeliverableRequest = z.object({ execution_id: ExecutionId.optional() }).strict();
export const RetryUndeliverableResult = z.object({ executions: z.number().int(), retried: z.number().int() });

export const StatusDocument = z.object({
  execution_id: z.string(),
  status: ExecutionStatus,
  template_name: z.string(),
  template_id: z.string().nullable(),
  /** `snapshot`: a rerun, which runs the original's template as it was. */
  template_source: z.enum(["kam", "cache", "snapshot"]).nullable(),
  client_id: z.string(),
  request_id: z.string().nullable(),
  priority: Priority,
  created_at: z.string(),
  started_at: z.string().nullable(),
  completed_at: z.string().nullable(),
  estimated_completion_at: z.string().nullable(),
  /** Set when retention deleted the execution's data; the summary stays. */
  data_expired_at: z.string().nullable(),
  /** While paused: since when. */
  paused_at: z.string().nullable(),
  /** Time spent paused, the current pause included (an execution-wide deadline does not count it). */
  paused_ms: z.number(),
  error: ErrorInfo.nullable(),
  cost: Cost.nullable(),
  notifications: NotificationsDocument,
  /** W3C trace context: the trace (the caller's, when POST /execute sent a traceparent) and the execution's span. */
  trace_id: z.string().nullable(),
  span_id: z.string().nullable(),
  /** The caller's span, when POST /execute sent a valid traceparent. */
  parent_span_id: z.string().nullable(),
  /** The execution this one reruns (POST /executions/:id/rerun), and this one's reruns, newest first. */
  rerun_of: z.string().nullable(),
  reruns: z.array(z.string()),
  stages: z.array(StageDocument),
  /**
   * Messages to other systems (ledger settle or release, worker cancel, index
   * update) that failed for longer than `outboxUndeliverableMs`: still retried,
   * listed for operators at `GET /resources/undeliverable`.
   */
  undeliverable: z.array(UndeliverableMessage).optional(),
  /** While `queued` for a slot under the client's `max_running_executions`: reason `client_quota`, its place (docs/ledger.md, "Execution slots"). */
  waiting_on: WaitingOn.optional(),
  /**
   * Counts the document's changes: higher whenever anything in it changed,
   * the same while nothing did (running durations grow without a change). Never goes back,
   * also across restarts. The `ETag` is made of it (docs/protocol.md, "Status reads").
   */
  version: z.number().int().min(1),
});
export type StatusDocument = z.infer<typeof StatusDocument>;

/** `GET /executions/:id` query: a long poll (docs/protocol.md, "Status reads"). */
export const StatusQuery = z.object({
  /** Wait up to this long for a version after `since` (at most `statusWaitMaxMs`); 0 or absent: answer now. */
  wait_ms: z.string().regex(/^\d{1,9}$/, "a whole number of milliseconds").transform(Number).optional(),
  /** The version the caller has; absent: the version current when the request arrives. */
  since: z.string().regex(/^\d{1,15}$/, "a version from an earlier answer").transform(Number).optional(),
});

/**
 * One stage or item attempt as a span (`GET /executions/{id}/spans`): its
 * W3C span id (the `traceparent` every call of the attempt carried), its
 * worker, and its three phases: waiting for resources (`queued_at` to
 * `granted_at`), handshake (`granted_at` to `processing_at`: input check,
 * handshake and process calls) and processing (`processing_at` to
 * `ended_at`). An attempt still open has `ended_at` and `outcome` null, its
 * current phase running to now.
 */
export const SpanDocument = z.object({
  stage_id: z.string(),
  /** The fan-out stage of an item; null for a stage. */
  parent_stage_id: z.string().nullable(),
  attempt: z.number().int().positive(),
  worker: z.string(),
  span_id: z.string().nullable(),
  /** The execution's span. */
  parent_span_id: z.string().nullable(),
  queued_at: z.string(),
  granted_at: z.string().nullable(),
  processing_at: z.string().nullable(),
  ended_at: z.string().nullable(),
  /** `completed`, the attempt's error code, or `paused` (given back by a pause while it waited); null while open. */
  outcome: z.string().nullable(),
  waiting_ms: z.number().int().nonnegative(),
  handshake_ms: z.number().int().nonnegative(),
  processing_ms: z.number().int().nonnegative(),
});
export type SpanDocument = z.infer<typeof SpanDocument>;

export const SpansDocument = z.object({
  execution_id: z.string(),
  trace_id: z.string().nullable(),
  span_id: z.string().nullable(),
  created_at: z.string(),
  completed_at: z.string().nullable(),
  /** Oldest first; at most 2000 (then `truncated`). */
  spans: z.array(SpanDocument),
  truncated: z.boolean(),
});
export type SpansDocument = z.infer<typeof SpansDocument>;

/** `POST /executions/:id/rerun` and RPC `rerun(id, request)`. */
export const RerunRequest = z
  .object({
    /** Run again from this stage (and everything that depends on it); default: the lowest-numbered stage that did not complete. */
    from_stage: StageId.optional(),
    /** Instead of the original's parameters. */
    parameters: z.record(z.string(), z.unknown()).optional(),
    request_id: RequestId.optional(),
    /** Default: the original's. */
    notify: z.boolean().optional(),
  })
  .strict();
export type RerunRequest = z.infer<typeof RerunRequest>;

/** The start summary of a rerun: a new execution, linked to the old one. */
export const RerunResponse = ExecuteResponse.extend({ rerun_of: z.string(), from_stage: z.string(), reused: z.array(z.string()) });
export type RerunResponse = z.infer<typeof RerunResponse>;

/** `POST /executions/:id/stages/:stage_id/approve` and `/reject`. */
export const DecisionRequest = z.object({ comment: z.string().max(2_000).optional() }).strict();
export type DecisionRequest = z.infer<typeof DecisionRequest>;

/** `POST /executions/:id/live-ticket`: what opens the live socket for a minute. */
export const LiveTicket = z.object({
  ticket: z.string(),
  expires_at: z.string(),
  /** Where to connect (ws:// or wss://). */
  url: z.string(),
  /** Offer both as the socket's subprotocols; the server answers with the first. */
  protocols: z.array(z.string()),
});
export type LiveTicket = z.infer<typeof LiveTicket>;

/** What the live socket sends: the status document, on connect and after every change (the last one before it closes when the execution ended). */
export const LiveMessage = z.object({ type: z.literal("status"), document: StatusDocument });
export type LiveMessage = z.infer<typeof LiveMessage>;
/** `?cursor=&limit=` of the items route: cursor is the item index to start from (a `next_cursor`). */
export const ItemsQuery = z
  .object({
    cursor: z.string().regex(/^\d{1,6}$/, "must be a next_cursor from an earlier page").optional(),
    limit: z.coerce.number().int().min(1).max(500).default(100),
  })
  .strict();

/** `GET /executions/:id/stages/:stage_id/items`: a page of a fan-out stage's items, in item order. */
export const ItemsPage = z.object({
  execution_id: z.string(),
  stage_id: z.string(),
  total: z.number().nullable(),
  items: z.array(StageDocument),
  /** Pass as `cursor` for the next page; null on the last. */
  next_cursor: z.string().nullable(),
});
export type ItemsPage = z.infer<typeof ItemsPage>;

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
