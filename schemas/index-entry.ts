import { z } from "zod";
import { ExecutionStatus } from "./api";
import { ClientId, ExecutionId, Priority, TemplateName } from "./common";

/**
 * The execution index (actors/execution-index.ts): one summary row per
 * execution, written by the Execution on every status change (through its
 * outbox, at least once, possibly out of order) and read by operators through
 * `GET /executions`. `version` orders the writes of one execution: an entry
 * with a version lower than or equal to the stored one changes nothing.
 */
const Ms = z.number().int().nonnegative();

export const IndexEntry = z.object({
  execution_id: ExecutionId,
  client_id: ClientId,
  template_name: TemplateName,
  status: ExecutionStatus,
  priority: Priority,
  /** Unix ms; decides the index shard (src/index-routing.ts), so it never changes for an execution. */
  created_at: Ms,
  updated_at: Ms,
  completed_at: Ms.nullable(),
  error_code: z.string().min(1).max(64).nullable(),
  cost_total: z.number().finite().nonnegative().nullable(),
  /** Usage in every `tokens:` pool, summed over the stages (absent in entries written before it existed). */
  tokens_total: z.number().finite().nonnegative().optional(),
  stages_total: z.number().int().nonnegative(),
  stages_completed: z.number().int().nonnegative(),
  version: z.number().int().nonnegative(),
  /** The execution this one reruns (absent: not a rerun). */
  rerun_of: ExecutionId.nullable().optional(),
  /**
   * Set once the execution ended: its ended stage and item attempts (the
   * first INDEX_ATTEMPTS_KEPT), each `[worker, ended_at, waiting_ms,
   * handshake_ms, processing_ms, outcome]` (`outcome`: `completed` or the
   * attempt's error code; entries written before it have completed attempts
   * only, without it), for the latency charts (src/ops-series.ts) and /metrics.
   */
  attempts: z
    .array(z.tuple([z.string().min(1).max(128), Ms, Ms, Ms, Ms, z.string().min(1).max(64).optional()]))
    .max(100)
    .optional(),
});
export type IndexEntry = z.infer<typeof IndexEntry>;
/** Ended attempts an ended execution's index entry carries (a fan-out's items beyond it are not sampled). */
export const INDEX_ATTEMPTS_KEPT = 100;

/** Where a page ended: newest first is `(created_at DESC, execution_id DESC)`, so this pair is a total order. */
export interface IndexPosition {
  created_at: number;
  execution_id: string;
}

/** What the index object answers; times are unix ms, bounds `since` inclusive and `until` exclusive. */
export interface IndexFilter {
  client_id?: string;
  /** Only these clients' entries (a scoped key's listing, src/api-keys.ts); at most MAX_KEY_CLIENTS. */
  client_ids?: string[];
  template_name?: string;
  status?: ExecutionStatus;
  rerun_of?: string;
  since?: number;
  until?: number;
  limit: number;
  /** An opaque cursor from a previous page: only entries after it (older) are returned. */
  cursor?: string | null;
}

export interface IndexPage {
  items: IndexEntry[];
  /** Set when more entries match after the last item; pass it back as `cursor`. */
  next_cursor: string | null;
}

export type StatusCounts = Record<ExecutionStatus, number>;

/**
 * Cursors are `base64url(JSON [created_at, execution_id])` of the last item
 * returned: stateless, stable while new executions arrive, and they name the
 * shard to resume from.
 */
export function encodeCursor(p: IndexPosition): string {
  const bytes = new TextEncoder().encode(JSON.stringify([p.created_at, p.execution_id]));
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const CursorValue = z.tuple([Ms, ExecutionId]);

/** Null for anything that is not a cursor we made. */
export function decodeCursor(cursor: string): IndexPosition | null {
  if (!/^[A-Za-z0-9_-]{1,400}$/.test(cursor)) return null;
  try {
    const text = atob(cursor.replace(/-/g, "+").replace(/_/g, "/"));
    const parsed = CursorValue.safeParse(JSON.parse(text));
    return parsed.success ? { created_at: parsed.data[0], execution_id: parsed.data[1] } : null;
  } catch {
    return null;
  }
}

// ---- HTTP: GET /executions and GET /executions/counts ----------------------

/** A point in time in a query string: unix ms, or an ISO 8601 date-time. */
export const Instant = z
  .string()
  .max(40)
  .regex(/^(\d{1,15}|\d{4}-\d{2}-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?)$/, "unix ms or an ISO 8601 date-time")
  .refine((s) => Number.isFinite(/^\d+$/.test(s) ? Number(s) : Date.parse(s)), "not a valid date")
  .transform((s) => (/^\d+$/.test(s) ? Number(s) : Date.parse(s)));

export const MAX_LIST_LIMIT = 200;
export const DEFAULT_LIST_LIMIT = 50;

/** Unknown parameters are refused, like unknown body fields, so a typo is not silently ignored. */
export const CountsQuery = z
  .object({
    client_id: ClientId.optional(),
    template_name: TemplateName.optional(),
    since: Instant.optional(),
    until: Instant.optional(),
    /** From a previous answer's `next_cursor`: continue with the older months. */
    cursor: z.string().min(1).max(400).optional(),
  })
  .strict();

export const ListQuery = CountsQuery.extend({
  status: ExecutionStatus.optional(),
  /** Only the reruns of this execution. */
  rerun_of: ExecutionId.optional(),
  limit: z
    .string()
    .regex(/^\d{1,4}$/, "an integer")
    .transform(Number)
    .pipe(z.number().int().min(1).max(MAX_LIST_LIMIT))
    .optional(),
}).strict();

/** One row of `GET /executions`: the index entry with ISO times. */
export const ExecutionSummary = z.object({
  execution_id: z.string(),
  client_id: z.string(),
  template_name: z.string(),
  status: ExecutionStatus,
  priority: Priority,
  created_at: z.string(),
  updated_at: z.string(),
  completed_at: z.string().nullable(),
  error_code: z.string().nullable(),
  cost_total: z.number().nullable(),
  stages_total: z.number().int(),
  stages_completed: z.number().int(),
  rerun_of: z.string().nullable(),
});
export type ExecutionSummary = z.infer<typeof ExecutionSummary>;

export const ExecutionList = z.object({
  items: z.array(ExecutionSummary),
  next_cursor: z.string().nullable(),
});
export type ExecutionList = z.infer<typeof ExecutionList>;

export const ExecutionCounts = z.object({
  counts: z.object({
    queued: z.number().int(),
    running: z.number().int(),
    paused: z.number().int(),
    completed: z.number().int(),
    failed: z.number().int(),
    cancelled: z.number().int(),
  }),
  total: z.number().int(),
  since: z.string().nullable(),
  /** A given `until` as applied (clamped to now + 5 min), else null. */
  until: z.string().nullable(),
  /**
   * Set when the answer stopped at `maxIndexShardsPerRequest` months with older
   * months left: pass it back as `cursor` (same filters) and add those counts.
   */
  next_cursor: z.string().nullable(),
});
export type ExecutionCounts = z.infer<typeof ExecutionCounts>;
