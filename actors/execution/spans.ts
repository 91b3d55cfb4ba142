import type { SpanDocument, SpansDocument } from "../../schemas/api";
import { INDEX_ATTEMPTS_KEPT } from "../../schemas/index-entry";
import { type TraceContext, attemptSpanId } from "../../src/trace";
import type { Sql } from "../sql";
import { ISO, type ExecutionRow, type StageRow } from "./store";

/**
 * One row per ended stage or item attempt: the attempt's span (src/trace.ts
 * derives its id), with the three phases the timeline shades and the latency
 * metrics measure: waiting for resources (`queued_at` to `granted_at`),
 * handshake (`granted_at` to `processing_at`: input check, handshake and
 * process calls) and processing (`processing_at` to `ended_at`). The row is
 * written in the same transition that ends the attempt, and the same values
 * go into its `stage_attempt` data point, so the page, the index's latency
 * series and Analytics Engine read one span. The table is in store.ts's SCHEMA.
 */

interface SpanRow {
  stage_id: string;
  attempt: number;
  worker: string;
  parent: string | null;
  queued_at: number;
  granted_at: number | null;
  processing_at: number | null;
  ended_at: number | null;
  outcome: string | null;
}

/** The phases of an attempt, in ms (an open phase runs to `now`; a phase never reached is 0). */
export function phases(s: Pick<SpanRow, "queued_at" | "granted_at" | "processing_at" | "ended_at">, now: number) {
  const end = s.ended_at ?? now;
  const granted = s.granted_at ?? end;
  const processing = s.processing_at ?? end;
  return {
    waiting_ms: Math.max(0, granted - s.queued_at),
    handshake_ms: s.granted_at === null ? 0 : Math.max(0, processing - s.granted_at),
    processing_ms: s.processing_at === null ? 0 : Math.max(0, end - s.processing_at),
  };
}

/** The attempt's span from its stage row before the transition that ends it (null: it never started). */
export function endedSpan(st: StageRow, outcome: string, now: number): SpanRow | null {
  if (st.attempt < 1 || st.attempt_at === null) return null;
  return {
    stage_id: st.stage_id,
    attempt: st.attempt,
    worker: st.worker,
    parent: st.parent,
    queued_at: st.attempt_at,
    granted_at: st.granted_at,
    processing_at: st.processing_since,
    ended_at: now,
    outcome,
  };
}

export function recordSpan(sql: Sql, s: SpanRow, tokens: number): void {
  sql`INSERT OR REPLACE INTO spans (stage_id, attempt, worker, parent, queued_at, granted_at, processing_at, ended_at, outcome, tokens)
    VALUES (${s.stage_id}, ${s.attempt}, ${s.worker}, ${s.parent}, ${s.queued_at}, ${s.granted_at}, ${s.processing_at}, ${s.ended_at}, ${s.outcome}, ${tokens})`;
}

/** At most this many spans per answer (the newest attempts of a long fan-out are left out, and said so). */
export const MAX_SPANS = 2000;

/**
 * Every attempt of the execution as a span, oldest first: the ended ones from
 * `spans`, and the one in flight for each stage or item still waiting,
 * handshaking or processing.
 */
export function spansDocument(sql: Sql, ex: ExecutionRow, trace: TraceContext | null, now: number): SpansDocument {
  return {
    execution_id: ex.execution_id,
    trace_id: trace?.trace_id ?? null,
    span_id: trace?.span_id ?? null,
    created_at: ISO(ex.created_at)!,
    completed_at: ISO(ex.completed_at),
    ...spanDocuments(sql, trace, now),
  };
}

function spanDocuments(sql: Sql, trace: TraceContext | null, now: number): { spans: SpanDocument[]; truncated: boolean } {
  const ended = sql<SpanRow>`SELECT stage_id, attempt, worker, parent, queued_at, granted_at, processing_at, ended_at, outcome FROM spans
    ORDER BY queued_at, stage_id, attempt LIMIT ${MAX_SPANS + 1}`;
  const open = sql<SpanRow>`SELECT stage_id, attempt, worker, parent, attempt_at AS queued_at, granted_at, processing_since AS processing_at,
      NULL AS ended_at, NULL AS outcome
    FROM stages WHERE status IN ('waiting_resources', 'handshaking', 'processing') AND attempt > 0 AND attempt_at IS NOT NULL
      AND NOT (for_each IS NOT NULL AND parent IS NULL)
    ORDER BY attempt_at, stage_id LIMIT ${MAX_SPANS + 1}`;
  const all = [...ended, ...open].sort((a, b) => a.queued_at - b.queued_at || (a.stage_id < b.stage_id ? -1 : a.stage_id > b.stage_id ? 1 : a.attempt - b.attempt));
  const truncated = all.length > MAX_SPANS;
  return {
    truncated,
    spans: all.slice(0, MAX_SPANS).map((s) => ({
      stage_id: s.stage_id,
      parent_stage_id: s.parent,
      attempt: s.attempt,
      worker: s.worker,
      span_id: trace ? attemptSpanId(trace, s.stage_id, s.attempt) : null,
      parent_span_id: trace?.span_id ?? null,
      queued_at: ISO(s.queued_at)!,
      granted_at: ISO(s.granted_at),
      processing_at: ISO(s.processing_at),
      ended_at: ISO(s.ended_at),
      outcome: s.outcome,
      ...phases(s, now),
    })),
  };
}

/** The ended attempts an ended execution's index entry carries for the latency charts and /metrics (the first INDEX_ATTEMPTS_KEPT). */
export function indexAttempts(sql: Sql): [string, number, number, number, number, string][] {
  const rows = sql<SpanRow>`SELECT stage_id, attempt, worker, parent, queued_at, granted_at, processing_at, ended_at, outcome FROM spans
    ORDER BY ended_at, stage_id, attempt LIMIT ${INDEX_ATTEMPTS_KEPT}`;
  return rows.map((s) => {
    const p = phases(s, s.ended_at!);
    return [s.worker, s.ended_at!, p.waiting_ms, p.handshake_ms, p.processing_ms, s.outcome!];
  });
}
