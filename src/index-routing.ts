import type { ExecutionIndex, IndexStatsGroup } from "../actors/execution-index";
import type { ExecutionStatus } from "../schemas/api";
import {
  CountsQuery,
  DEFAULT_LIST_LIMIT,
  type ExecutionCounts,
  type ExecutionList,
  type ExecutionSummary,
  type IndexEntry,
  type IndexFilter,
  ListQuery,
  type StatusCounts,
  decodeCursor,
  encodeCursor,
} from "../schemas/index-entry";
import { configOf } from "./config";
import { ApiError, parseWith } from "./http";
import { withTimeout } from "./outbound";

/**
 * The one place that knows which ExecutionIndex object holds an execution's
 * summary: one object per calendar month (UTC) of the execution's
 * `created_at`, named `executions:YYYY-MM`.
 *
 * Why months: a listing newest first reads the current month's object and
 * stops as soon as the page is full, so the common queries touch one or two
 * objects; each object holds one month (millions of rows fit well within a
 * SQLite object's limits), and old months are never written again. Writes all
 * go to the current month's object: one object absorbs a few hundred upserts a
 * second, far above what the single ResourceLedger lets the system run. If
 * that ever changes, split each month by a hash of the execution id here and
 * merge the sub-shards in `walk` below; nothing else changes.
 *
 * The walk goes back to INDEX_EPOCH_MS at most (nothing older can exist: the
 * service was first deployed after it). Reading a month that has no object
 * yet stores nothing (actors/execution-index.ts creates its table on the
 * first write).
 */
export const INDEX_EPOCH_MS = Date.UTC(2026, 0, 1);
/** The walk starts this far in the future when `until` is not given (clocks of two machines differ a little). */
const CLOCK_SKEW_MS = 5 * 60_000;

function monthStart(ms: number): number {
  const d = new Date(ms);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1);
}

function previousMonth(start: number): number {
  const d = new Date(start);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() - 1, 1);
}

/** `YYYY-MM` of a unix ms time, UTC. */
export function indexBucket(ms: number): string {
  const d = new Date(ms);
  return `${d.getUTCFullYear()}-${String(d.getUTCMonth() + 1).padStart(2, "0")}`;
}

function shard(env: Env, bucket: string): DurableObjectStub<ExecutionIndex> {
  const ns = env.EXECUTION_INDEX as unknown as DurableObjectNamespace<ExecutionIndex>;
  return ns.get(ns.idFromName(`executions:${bucket}`));
}

/** The shard for an execution: pass the execution's own `created_at` (unix ms) every time. */
export function indexFor(env: Env, createdAtMs: number): DurableObjectStub<ExecutionIndex> {
  return shard(env, indexBucket(createdAtMs));
}

/** The buckets that may hold entries created in [since, until), newest first. */
export function bucketsNewestFirst(sinceMs: number, untilMs: number): string[] {
  const bottom = Math.max(sinceMs, INDEX_EPOCH_MS);
  if (!(untilMs > bottom)) return [];
  const out: string[] = [];
  for (let m = monthStart(untilMs - 1); m >= monthStart(bottom); m = previousMonth(m)) out.push(indexBucket(m));
  return out;
}

async function ask<T>(env: Env, promise: Promise<T>, bucket: string): Promise<T> {
  try {
    return await withTimeout(promise, configOf(env).tuning.objectCallTimeoutMs, `execution index ${bucket}`);
  } catch (err) {
    throw new ApiError(503, "unavailable", `execution index ${bucket} failed: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/**
 * Newest first across shards. `next_cursor` is set only when another matching
 * entry exists, so the last page says so (the walk looks one entry ahead).
 */
export async function queryIndex(env: Env, filter: IndexFilter, now = Date.now()): Promise<{ items: IndexEntry[]; next_cursor: string | null }> {
  const at = filter.cursor ? decodeCursor(filter.cursor) : null;
  if (filter.cursor && !at) throw new ApiError(400, "invalid_request", "invalid cursor", [{ path: "cursor", message: "not a cursor from this API" }]);
  const limit = filter.limit;
  let top = filter.until ?? now + CLOCK_SKEW_MS;
  if (at) top = Math.min(top, at.created_at + 1);
  const items: IndexEntry[] = [];
  for (const bucket of bucketsNewestFirst(filter.since ?? INDEX_EPOCH_MS, top)) {
    const want = limit + 1 - items.length;
    const page = await ask(env, shard(env, bucket).query({ ...filter, limit: want }), bucket);
    items.push(...page.items);
    if (items.length > limit) break;
  }
  if (items.length <= limit) return { items, next_cursor: null };
  const page = items.slice(0, limit);
  return { items: page, next_cursor: encodeCursor(page[page.length - 1]) };
}

/** Entries per status created in [since, until) (all time when not given). */
export async function countIndex(
  env: Env,
  filter: { client_id?: string; template_name?: string; since?: number; until?: number },
  now = Date.now(),
): Promise<StatusCounts> {
  const buckets = bucketsNewestFirst(filter.since ?? INDEX_EPOCH_MS, filter.until ?? now + CLOCK_SKEW_MS);
  const parts = await Promise.all(buckets.map((b) => ask(env, shard(env, b).counts(filter), b)));
  const total: StatusCounts = { queued: 0, running: 0, paused: 0, completed: 0, failed: 0, cancelled: 0 };
  for (const p of parts) for (const k of Object.keys(total) as ExecutionStatus[]) total[k] += p[k] ?? 0;
  return total;
}

/** Every month's groups (actors/execution-index.ts `stats`), `limit` groups per month at most. */
export async function statsIndex(env: Env, limit: number, now = Date.now()): Promise<{ groups: IndexStatsGroup[]; truncated: boolean }> {
  const buckets = bucketsNewestFirst(INDEX_EPOCH_MS, now + CLOCK_SKEW_MS);
  const parts = await Promise.all(buckets.map((b) => ask(env, shard(env, b).stats(limit), b)));
  return { groups: parts.flatMap((p) => p.groups), truncated: parts.some((p) => p.truncated) };
}

// ---- HTTP ------------------------------------------------------------------

const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());

function params(url: URL): Record<string, string> {
  return Object.fromEntries(url.searchParams.entries());
}

export function toSummary(e: IndexEntry): ExecutionSummary {
  return {
    execution_id: e.execution_id,
    client_id: e.client_id,
    template_name: e.template_name,
    status: e.status,
    priority: e.priority,
    created_at: new Date(e.created_at).toISOString(),
    updated_at: new Date(e.updated_at).toISOString(),
    completed_at: iso(e.completed_at),
    error_code: e.error_code,
    cost_total: e.cost_total,
    stages_total: e.stages_total,
    stages_completed: e.stages_completed,
  };
}

/** `GET /executions?client_id=&template_name=&status=&since=&until=&limit=&cursor=` */
export async function listExecutions(env: Env, url: URL): Promise<ExecutionList> {
  const q = parseWith(ListQuery, params(url), "query");
  const page = await queryIndex(env, { ...q, limit: q.limit ?? DEFAULT_LIST_LIMIT });
  return { items: page.items.map(toSummary), next_cursor: page.next_cursor };
}

/** `GET /executions/counts?client_id=&template_name=&since=&until=` */
export async function countExecutions(env: Env, url: URL): Promise<ExecutionCounts> {
  const q = parseWith(CountsQuery, params(url), "query");
  const counts = await countIndex(env, q);
  return {
    counts,
    total: Object.values(counts).reduce((a, b) => a + b, 0),
    since: q.since === undefined ? null : iso(q.since),
    until: q.until === undefined ? null : iso(q.until),
  };
}
