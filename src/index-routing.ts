import { type ExecutionIndex, type IndexAttempt, type IndexSeries, type IndexStatsGroup, emptyCounts } from "../actors/execution-index";
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
import { askObject } from "./outbound";

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
/**
 * The walk starts this far in the future when `until` is not given (clocks of
 * two machines differ a little), and a given `until` is clamped to it: nothing
 * can be created later, and an `until` centuries ahead must not mean a walk
 * through every month up to it.
 */
export const CLOCK_SKEW_MS = 5 * 60_000;

/**
 * A cursor that says "continue below this month" when a request stopped at
 * `maxIndexShardsPerRequest` shards: the last millisecond before the oldest
 * month read, with an id above any real one, so every entry of that
 * millisecond and older comes next (cursors compare (created_at, execution_id)).
 */
const BOUNDARY_ID = `exec_9999999999999_${"z".repeat(32)}`;

function boundaryCursor(oldestBucketRead: string): string {
  const [y, m] = oldestBucketRead.split("-").map(Number);
  return encodeCursor({ created_at: Date.UTC(y, m - 1, 1) - 1, execution_id: BOUNDARY_ID });
}

/** `[since, until)` as the walk uses it: `until` at most now + skew, `since` at least the epoch. */
export function clampWindow(since: number | undefined, until: number | undefined, now: number): { since: number; until: number } {
  const ceiling = now + CLOCK_SKEW_MS;
  return { since: Math.max(since ?? INDEX_EPOCH_MS, INDEX_EPOCH_MS), until: Math.min(until ?? ceiling, ceiling) };
}

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

/** The buckets that may hold entries created in [since, until), newest first; at most `max` of them. */
export function bucketsNewestFirst(sinceMs: number, untilMs: number, max = Number.POSITIVE_INFINITY): string[] {
  const bottom = Math.max(sinceMs, INDEX_EPOCH_MS);
  if (!(untilMs > bottom)) return [];
  const out: string[] = [];
  for (let m = monthStart(untilMs - 1); m >= monthStart(bottom) && out.length < max; m = previousMonth(m)) out.push(indexBucket(m));
  return out;
}

function cursorPosition(cursor: string | null | undefined) {
  const at = cursor ? decodeCursor(cursor) : null;
  if (cursor && !at) throw new ApiError(400, "invalid_request", "invalid cursor", [{ path: "cursor", message: "not a cursor from this API" }]);
  return at;
}

function ask<T>(env: Env, promise: Promise<T>, bucket: string): Promise<T> {
  return askObject(promise, configOf(env).tuning.objectCallTimeoutMs, `the execution index (${bucket})`);
}

/**
 * Newest first across shards, reading at most `maxIndexShardsPerRequest` of
 * them. `next_cursor` is set when another matching entry exists (the walk
 * looks one entry ahead), or when the walk stopped at the shard bound with
 * months left to read: that page may be short, and the cursor goes on below it.
 */
export async function queryIndex(env: Env, filter: IndexFilter, now = Date.now()): Promise<{ items: IndexEntry[]; next_cursor: string | null }> {
  const at = cursorPosition(filter.cursor);
  const limit = filter.limit;
  const window = clampWindow(filter.since, filter.until, now);
  const top = at ? Math.min(window.until, at.created_at + 1) : window.until;
  const bound = configOf(env).tuning.maxIndexShardsPerRequest;
  const buckets = bucketsNewestFirst(window.since, top, bound + 1);
  const items: IndexEntry[] = [];
  for (const bucket of buckets.slice(0, bound)) {
    const want = limit + 1 - items.length;
    const page = await ask(env, shard(env, bucket).query({ ...filter, until: window.until, limit: want }), bucket);
    // Over RPC the attempts' tuples are typed as plain arrays; they are the same values.
    items.push(...(page.items as IndexEntry[]));
    if (items.length > limit) {
      const full = items.slice(0, limit);
      return { items: full, next_cursor: encodeCursor(full[full.length - 1]) };
    }
  }
  return { items, next_cursor: buckets.length > bound ? boundaryCursor(buckets[bound - 1]) : null };
}

/**
 * Entries per status created in [since, until) (all time when not given),
 * from at most `maxIndexShardsPerRequest` shards, newest first; `next_cursor`
 * continues with the older months (add its counts to these).
 */
export async function countIndex(
  env: Env,
  filter: { client_id?: string; client_ids?: string[]; template_name?: string; since?: number; until?: number; cursor?: string },
  now = Date.now(),
): Promise<{ counts: StatusCounts; next_cursor: string | null }> {
  const at = cursorPosition(filter.cursor);
  const window = clampWindow(filter.since, filter.until, now);
  const top = at ? Math.min(window.until, at.created_at + 1) : window.until;
  const bound = configOf(env).tuning.maxIndexShardsPerRequest;
  const buckets = bucketsNewestFirst(window.since, top, bound + 1);
  const read = buckets.slice(0, bound);
  const within = { client_id: filter.client_id, client_ids: filter.client_ids, template_name: filter.template_name, since: window.since, until: top };
  const parts = await Promise.all(read.map((b) => ask(env, shard(env, b).counts(within), b)));
  const total = emptyCounts();
  for (const p of parts) for (const k of Object.keys(total) as ExecutionStatus[]) total[k] += p[k] ?? 0;
  return { counts: total, next_cursor: buckets.length > bound ? boundaryCursor(read[read.length - 1]) : null };
}

/** Every month's groups (actors/execution-index.ts `stats`), `limit` groups per month at most. */
export async function statsIndex(env: Env, limit: number, now = Date.now()): Promise<{ groups: IndexStatsGroup[]; truncated: boolean }> {
  const buckets = bucketsNewestFirst(INDEX_EPOCH_MS, now + CLOCK_SKEW_MS);
  const parts = await Promise.all(buckets.map((b) => ask(env, shard(env, b).stats(limit), b)));
  return { groups: parts.flatMap((p) => p.groups), truncated: parts.some((p) => p.truncated) };
}

/**
 * The charts' numbers for executions that ended in `[since, until)`: every
 * month that may hold one (an execution ends at most `executionTimeoutMs`
 * after it was created), read in parallel.
 */
export async function seriesIndex(env: Env, since: number, until: number, bucketMs: number, clientId?: string): Promise<IndexSeries> {
  const buckets = bucketsNewestFirst(since - configOf(env).tuning.executionTimeoutMs, until);
  const parts = await Promise.all(buckets.map((b) => ask(env, shard(env, b).series(since, until, bucketMs, clientId), b)));
  return { groups: parts.flatMap((p) => p.groups), attempts: parts.flatMap((p) => p.attempts as IndexAttempt[]), truncated: parts.some((p) => p.truncated) };
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
    rerun_of: e.rerun_of ?? null,
  };
}

/**
 * Which clients a caller may see among those a query asks for (src/api-keys.ts
 * `visibleClients`): `undefined` for any, else those to keep; an empty list
 * answers an empty page, as if nothing existed.
 */
export type ClientScope = (asked: string | undefined) => string[] | undefined;

const everyClient: ClientScope = () => undefined;

/** The query's `client_id` narrowed to the caller's scope; null when nothing in it is visible. */
function scoped<Q extends { client_id?: string }>(q: Q, scope: ClientScope): (Q & { client_ids?: string[] }) | null {
  const visible = scope(q.client_id);
  if (visible === undefined) return q;
  if (visible.length === 0) return null;
  return { ...q, client_id: undefined, client_ids: visible };
}

/** `GET /executions?client_id=&template_name=&status=&rerun_of=&since=&until=&limit=&cursor=` */
export async function listExecutions(env: Env, url: URL, scope: ClientScope = everyClient): Promise<ExecutionList> {
  const q = scoped(parseWith(ListQuery, params(url), "query"), scope);
  if (!q) return { items: [], next_cursor: null };
  const page = await queryIndex(env, { ...q, limit: q.limit ?? DEFAULT_LIST_LIMIT });
  return { items: page.items.map(toSummary), next_cursor: page.next_cursor };
}

/** `GET /executions/counts?client_id=&template_name=&since=&until=&cursor=` */
export async function countExecutions(env: Env, url: URL, now = Date.now(), scope: ClientScope = everyClient): Promise<ExecutionCounts> {
  const parsed = parseWith(CountsQuery, params(url), "query");
  const q = scoped(parsed, scope) ?? { ...parsed, client_id: undefined, client_ids: [] };
  const { counts, next_cursor } = q.client_ids?.length === 0 ? { counts: emptyCounts(), next_cursor: null } : await countIndex(env, q, now);
  return {
    counts,
    total: Object.values(counts).reduce((a, b) => a + b, 0),
    since: q.since === undefined ? null : iso(q.since),
    // A given `until` as it was applied: clamped to now + skew.
    until: q.until === undefined ? null : iso(clampWindow(q.since, q.until, now).until),
    next_cursor,
  };
}
