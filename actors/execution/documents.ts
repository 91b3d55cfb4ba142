import type { WaitingOn } from "../../schemas/clients";
import type { NotificationsDocument, StageDocument, StatusDocument, UndeliverableMessage } from "../../schemas/api";
import { type TraceContext, attemptSpanId } from "../../src/trace";
import type { ErrorInfo } from "../../schemas/common";
import type { IndexEntry } from "../../schemas/index-entry";
import type { Config } from "../../src/config";
import { costOf } from "../../src/cost";
import { tokensOf } from "../../src/metrics";
import type { StartResult } from "./index";
import { DEFAULT_MAX_PARALLEL } from "./graph";
import { type ExecutionRow, ISO, ITEM_ORD_STRIDE, type ItemCounts, type StageRow, dependsOn, isFanOut, parse } from "./store";

/** Pure projections of the rows: what `start` answers, the status document, the index summary. */

export function startSummary(ex: ExecutionRow, created: boolean, defaultStageDurationMs: number): StartResult {
  const at = ex.estimated_completion_at ?? ex.created_at + defaultStageDurationMs;
  return {
    created,
    status: ex.status,
    estimated_completion_ms: Math.max(0, at - ex.created_at),
    estimated_completion_at: new Date(at).toISOString(),
    request_hash: ex.request_hash,
  };
}

/**
 * A stage's (or an item's) document. A fan-out stage adds its item counts (null
 * until its list is known); an item carries its stage's `depends_on`.
 */
export function stageDocument(
  s: StageRow,
  now: number,
  prices: Config["prices"],
  opts: { counts?: ReadonlyMap<string, Readonly<ItemCounts>>; parent?: StageRow; trace: TraceContext | null },
): StageDocument {
  const { counts, parent, trace } = opts;
  const usage = parse<Record<string, number>>(s.usage);
  const doc: StageDocument = {
    stage_id: s.stage_id,
    order: s.parent === null ? s.ord : Math.floor(s.ord / ITEM_ORD_STRIDE),
    worker: s.worker,
    template_ref: s.template_ref,
    action: s.action,
    status: s.status,
    attempts: s.attempt,
    max_attempts: s.max_attempts,
    progress: s.progress,
    message: s.message,
    started_at: ISO(s.started_at),
    completed_at: ISO(s.completed_at),
    waiting_ms: s.waiting_ms + (s.waiting_since !== null ? now - s.waiting_since : 0),
    processing_ms: s.processing_ms + (s.processing_since !== null ? now - s.processing_since : 0),
    error: parse<ErrorInfo>(s.error) ?? (s.status === "pending" ? parse<ErrorInfo>(s.last_error) : null),
    last_error: parse<ErrorInfo>(s.last_error),
    usage,
    cost: usage ? costOf([{ stage_id: s.stage_id, usage }], prices).total : null,
    depends_on: dependsOn(parent ?? s),
    span_id: trace && s.attempt > 0 ? attemptSpanId(trace, s.stage_id, s.attempt) : null,
    type: s.kind === "approval" ? "approval" : "worker",
    ...(s.reused_from ? { reused_from: s.reused_from } : {}),
    ...(s.decision ? { decision: parse<NonNullable<StageDocument["decision"]>>(s.decision)! } : {}),
  };
  if (s.status === "waiting_resources" && s.waiting_on) doc.waiting_on = parse<WaitingOn>(s.waiting_on)!;
  if (s.parent !== null) doc.item_index = s.item_index!;
  if (isFanOut(s)) {
    const c = counts?.get(s.stage_id);
    doc.items = s.items_total === null ? null : (c ?? { total: 0, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 });
    doc.for_each = s.for_each!;
    doc.max_parallel = s.max_parallel ?? DEFAULT_MAX_PARALLEL;
    // A fan-out stage's progress is its items': the share completed.
    if (doc.items && doc.items.total > 0 && s.status === "processing") doc.progress = Math.round((doc.items.completed / doc.items.total) * 1000) / 10;
  }
  return doc;
}

export function statusDocument(
  ex: ExecutionRow,
  rows: readonly StageRow[],
  now: number,
  prices: Config["prices"],
  counts: ReadonlyMap<string, Readonly<ItemCounts>>,
  notifications: NotificationsDocument,
  trace: TraceContext | null,
  reruns: string[],
  undeliverable: UndeliverableMessage[] = [],
): Omit<StatusDocument, "version"> {
  const cost = parse<StatusDocument["cost"]>(ex.cost);
  const stages = rows.map((s) => stageDocument(s, now, prices, { counts, trace }));
  return {
    execution_id: ex.execution_id,
    status: ex.status,
    template_name: ex.template_name,
    template_id: ex.template_id,
    template_source: ex.template_source,
    client_id: ex.client_id,
    request_id: ex.request_id,
    priority: ex.priority,
    created_at: ISO(ex.created_at)!,
    started_at: ISO(ex.started_at),
    completed_at: ISO(ex.completed_at),
    estimated_completion_at: ISO(ex.estimated_completion_at),
    data_expired_at: ISO(ex.data_expired_at),
    paused_at: ISO(ex.paused_at),
    paused_ms: ex.paused_ms + (ex.paused_at !== null ? now - ex.paused_at : 0),
    error: parse<ErrorInfo>(ex.error),
    cost,
    notifications,
    trace_id: trace?.trace_id ?? null,
    span_id: trace?.span_id ?? null,
    parent_span_id: trace?.parent_span_id ?? null,
    rerun_of: ex.rerun_of,
    reruns,
    stages,
    undeliverable,
    // Queued by the client's max_running_executions: why, and its place in the client's line.
    ...(ex.status === "queued" && ex.slot === "waiting" && ex.slot_wait ? { waiting_on: parse<WaitingOn>(ex.slot_wait)! } : {}),
  };
}

/** The execution's summary for the execution index, at `version` (the index ignores older ones). */
export function indexEntry(ex: ExecutionRow, stages: readonly StageRow[], now: number, version: number, attempts?: IndexEntry["attempts"]): IndexEntry {
  const cost = parse<{ total: number }>(ex.cost);
  return {
    execution_id: ex.execution_id,
    client_id: ex.client_id,
    template_name: ex.template_name,
    status: ex.status,
    priority: ex.priority,
    created_at: ex.created_at,
    updated_at: now,
    completed_at: ex.completed_at,
    error_code: parse<ErrorInfo>(ex.error)?.code ?? null,
    cost_total: cost?.total ?? null,
    tokens_total: stages.reduce((n, s) => n + tokensOf(parse<Record<string, number>>(s.usage)), 0),
    stages_total: stages.length,
    stages_completed: stages.filter((s) => s.status === "completed").length,
    version,
    rerun_of: ex.rerun_of,
    ...(attempts ? { attempts } : {}),
  };
}
