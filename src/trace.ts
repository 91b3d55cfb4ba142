import { TraceState, parseTraceParent } from "@opentelemetry/core";

/**
 * W3C Trace Context (https://www.w3.org/TR/trace-context/) for an execution,
 * parsed and validated by @opentelemetry/core. The spans:
 * - the caller's span: the `traceparent` of `POST /execute`, if it sent one;
 * - the execution's span (`span_id`), a child of the caller's, or the root of
 *   a new trace;
 * - one span per stage attempt, a child of the execution's: its id is derived
 *   from the execution's span, the stage and the attempt (so it needs no
 *   storage and is the same after a restart);
 * - every handshake, process, progress and cancel call of an attempt carries
 *   `traceparent: 00-{trace_id}-{attempt span}-{flags}`, so the worker's own
 *   spans are children of the attempt's, and sends it back on its callbacks.
 */
export interface TraceContext {
  trace_id: string;
  /** The execution's own span. */
  span_id: string;
  /** The caller's span, when `POST /execute` carried a valid `traceparent`. */
  parent_span_id: string | null;
  /** Trace flags (bit 0: sampled), as sent or 01. */
  flags: number;
  tracestate: string | null;
}

function randomHex(bytes: number): string {
  const b = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** A span id that is not all zeros (the spec's invalid value). */
function newSpanId(): string {
  for (;;) {
    const id = randomHex(8);
    if (!/^0+$/.test(id)) return id;
  }
}

/**
 * The execution's trace from the caller's headers: a child of a valid
 * `traceparent`, else a new trace (an invalid one is ignored, as the spec
 * says; so is a `tracestate` without a valid `traceparent`).
 */
export function acceptTrace(traceparent: string | null | undefined, tracestate: string | null | undefined): TraceContext {
  const parent = traceparent ? parseTraceParent(traceparent.trim()) : null;
  if (!parent) return { trace_id: randomHex(16), span_id: newSpanId(), parent_span_id: null, flags: 1, tracestate: null };
  const state = tracestate ? new TraceState(tracestate).serialize() : "";
  return { trace_id: parent.traceId, span_id: newSpanId(), parent_span_id: parent.spanId, flags: parent.traceFlags, tracestate: state || null };
}

export function formatTraceparent(traceId: string, spanId: string, flags: number): string {
  return `00-${traceId}-${spanId}-${flags.toString(16).padStart(2, "0")}`;
}

const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;
const MASK_64 = (1n << 64n) - 1n;

/**
 * The span of one stage attempt: derived (64-bit FNV-1a of the execution's
 * span, the stage and the attempt), so every call of the attempt, every
 * restart of the object and the status document agree on it with no storage.
 */
export function attemptSpanId(trace: Pick<TraceContext, "span_id">, stageId: string, attempt: number): string {
  let h = FNV_OFFSET;
  for (const ch of `${trace.span_id}|${stageId}|${attempt}`) h = ((h ^ BigInt(ch.charCodeAt(0))) * FNV_PRIME) & MASK_64;
  return h === 0n ? "0000000000000001" : h.toString(16).padStart(16, "0");
}

/** The headers of a call made for a stage attempt. */
export function attemptHeaders(trace: TraceContext, stageId: string, attempt: number): Record<string, string> {
  const headers: Record<string, string> = { traceparent: formatTraceparent(trace.trace_id, attemptSpanId(trace, stageId, attempt), trace.flags) };
  if (trace.tracestate) headers.tracestate = trace.tracestate;
  return headers;
}

/**
 * The trace fields of a log line: `trace_id`, and `span_id` the attempt's
 * span when the line names a stage and an attempt (`parent_span_id` the
 * execution's), else the execution's span (`parent_span_id` the caller's).
 */
export function traceLogFields(
  trace: TraceContext | null,
  fields: Record<string, unknown>,
): { trace_id?: string; span_id?: string; parent_span_id?: string } {
  if (!trace) return {};
  const { stage_id, attempt } = fields;
  if (typeof stage_id === "string" && typeof attempt === "number" && attempt > 0) {
    return { trace_id: trace.trace_id, span_id: attemptSpanId(trace, stage_id, attempt), parent_span_id: trace.span_id };
  }
  return { trace_id: trace.trace_id, span_id: trace.span_id, ...(trace.parent_span_id ? { parent_span_id: trace.parent_span_id } : {}) };
}

/** A `traceparent` header's trace and parent span ids, or null when it is missing or invalid. */
export function readTraceparent(header: string | null): { trace_id: string; span_id: string } | null {
  const p = header ? parseTraceParent(header.trim()) : null;
  return p ? { trace_id: p.traceId, span_id: p.spanId } : null;
}
