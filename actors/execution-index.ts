import { DurableObject } from "cloudflare:workers";
import { ExecutionStatus as ExecutionStatusSchema } from "../schemas/api";
import {
  IndexEntry,
  type IndexFilter,
  type IndexPage,
  type StatusCounts,
  decodeCursor,
  encodeCursor,
} from "../schemas/index-entry";
import { configOf } from "../src/config";
import { zodIssues } from "../src/http";
import { log, setLogLevel } from "../src/log";
import { GroupCommit } from "./ledger/group-commit";
import { type Sql, execScript, sqlOf } from "./sql";

/**
 * One shard of the execution index: a summary row per execution created in
 * this shard's time bucket (which bucket is decided in src/index-routing.ts
 * only). Executions write here on every status change, at least once and
 * possibly out of order; `upsert` keeps the highest `version` and is one
 * statement, so a repeat or a late older entry changes nothing.
 *
 * Group commit (tuning `indexCommitMs`, the ledger's GroupCommit.ackLater):
 * the upserts that arrive within the window after the first one are written
 * together in one transaction, one commit for all of them instead of one each
 * (docs/performance.md, target 4); a batch that fails is refused whole, and
 * each sender's outbox sends again.
 * An upsert is answered only once its entry is written (and, by the output
 * gate, durable), so a caller's outbox keeps a summary until it is stored:
 * an eviction or crash inside the window loses nothing the sender was told
 * is stored. Every read writes what is waiting first, so it sees each upsert
 * that arrived before it.
 *
 * The table is created by the first write: a shard that is only ever read
 * (the query walks empty months too) stores nothing. It is WITHOUT ROWID (the
 * rows in the key's b-tree: an entry's insert writes no separate key entry); a
 * shard created before keeps its rowid table, which answers the same SQL.
 */
const SCHEMA = `
CREATE TABLE IF NOT EXISTS entries (
  execution_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, template_name TEXT NOT NULL,
  status TEXT NOT NULL, priority TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
  completed_at INTEGER, error_code TEXT, cost_total REAL,
  stages_total INTEGER NOT NULL, stages_completed INTEGER NOT NULL, version INTEGER NOT NULL, rerun_of TEXT, attempts TEXT, tokens_total REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_created ON entries (created_at DESC, execution_id DESC);
CREATE INDEX IF NOT EXISTS entries_by_client ON entries (client_id, created_at DESC, execution_id DESC);
CREATE INDEX IF NOT EXISTS entries_by_template ON entries (template_name, created_at DESC, execution_id DESC);
CREATE INDEX IF NOT EXISTS entries_by_status ON entries (status, created_at DESC, execution_id DESC);
`;

/** Reruns and ends (added later: a shard created before gets them, and the columns, with its first call, #hasSchema). */
const LATER_INDEXES = `CREATE INDEX IF NOT EXISTS entries_by_rerun ON entries (rerun_of, created_at DESC, execution_id DESC) WHERE rerun_of IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_completed ON entries (completed_at) WHERE completed_at IS NOT NULL;`;

const COLUMNS =
  "execution_id, client_id, template_name, status, priority, created_at, updated_at, completed_at, error_code, cost_total, stages_total, stages_completed, version, rerun_of";

/** At most this many rows per call, whatever the caller asks. */
const MAX_ROWS = 1000;
/** At most this many groups and attempts per `series` call. */
const MAX_SERIES_GROUPS = 5000;
const MAX_SERIES_ATTEMPTS = 20_000;

export class ExecutionIndex extends DurableObject<Env> {
  readonly #sql: Sql;
  readonly #commitMs: number;
  /** The ledger's group commit: upserts queue their writes and share one transaction (ackLater). */
  readonly #commit: GroupCommit;
  #ready = false;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.#sql = sqlOf(ctx.storage);
    this.#commitMs = configOf(env).tuning.indexCommitMs;
    // Nothing is kept in memory beside the queued writes: a failed batch has nothing to rebuild (its callers' outboxes send again).
    this.#commit = new GroupCommit(ctx.storage, { beforeCommit() {}, afterCommit() {}, onFailure() {} });
    setLogLevel(env);
  }

  /**
   * Idempotent; ignores an entry whose version is not higher than the stored
   * one. An entry that breaks the schema is logged and dropped: the caller's
   * outbox retries failures, and no retry would fix that one. An update sets
   * only what changes over an execution's life: its client, template,
   * priority, creation time and rerun_of are fixed at its start, and leaving
   * them out leaves the indexes on them alone (each index an UPDATE rewrites is a
   * row written more).
   */
  async upsert(entry: IndexEntry): Promise<void> {
    const parsed = IndexEntry.safeParse(entry);
    if (!parsed.success) {
      log("error", "index_entry_invalid", { execution_id: String(entry?.execution_id).slice(0, 80), issues: zodIssues(parsed.error) });
      return;
    }
    const e = parsed.data;
    this.#commit.write(() => this.#write(e));
    // Answered once written: with the next read's or the window's commit, at most indexCommitMs after the window's first upsert.
    return this.#commitMs > 0 ? this.#commit.ackLater(undefined, this.#commitMs) : this.#commit.ack(undefined);
  }

  #write(e: IndexEntry): void {
    this.#ensureSchema();
    this.#sql`INSERT INTO entries (execution_id, client_id, template_name, status, priority, created_at, updated_at,
        completed_at, error_code, cost_total, stages_total, stages_completed, version, rerun_of, attempts, tokens_total)
      VALUES (${e.execution_id}, ${e.client_id}, ${e.template_name}, ${e.status}, ${e.priority}, ${e.created_at}, ${e.updated_at},
        ${e.completed_at}, ${e.error_code}, ${e.cost_total}, ${e.stages_total}, ${e.stages_completed}, ${e.version}, ${e.rerun_of ?? null},
        ${e.attempts ? JSON.stringify(e.attempts) : null}, ${e.tokens_total ?? null})
      ON CONFLICT (execution_id) DO UPDATE SET
        status = excluded.status, updated_at = excluded.updated_at,
        completed_at = excluded.completed_at, error_code = excluded.error_code, cost_total = excluded.cost_total,
        stages_total = excluded.stages_total, stages_completed = excluded.stages_completed, version = excluded.version,
        attempts = excluded.attempts, tokens_total = excluded.tokens_total
      WHERE excluded.version > entries.version`;
  }

  /** One entry, for tests and operators. */
  async get(executionId: string): Promise<IndexEntry | null> {
    if (!this.#readable()) return null;
    return this.#sql`SELECT * FROM entries WHERE execution_id = ${executionId}`.map(toEntry)[0] ?? null;
  }

  /** Newest first; `next_cursor` is set when this shard holds more matches after the last item. */
  async query(filter: IndexFilter): Promise<IndexPage> {
    if (!this.#readable()) return { items: [], next_cursor: null };
    const limit = Math.max(1, Math.min(MAX_ROWS, Math.floor(filter.limit)));
    const { where, args } = conditions(filter, true);
    // Only constant fragments are joined here; every value is a bound parameter.
    const rows = this.ctx.storage.sql
      .exec(`SELECT ${COLUMNS} FROM entries${where} ORDER BY created_at DESC, execution_id DESC LIMIT ?`, ...args, limit + 1)
      .toArray()
      .map(toEntry);
    const more = rows.length > limit;
    const items = more ? rows.slice(0, limit) : rows;
    const last = items[items.length - 1];
    return { items, next_cursor: more && last ? encodeCursor(last) : null };
  }

  /** Matches per status (the status filter and the cursor are ignored). */
  async counts(filter: Omit<IndexFilter, "limit" | "status" | "cursor">): Promise<StatusCounts> {
    const counts = emptyCounts();
    if (!this.#readable()) return counts;
    const { where, args } = conditions({ ...filter, status: undefined, cursor: null, limit: 0 }, false);
    const rows = this.ctx.storage.sql.exec(`SELECT status, COUNT(*) AS n FROM entries${where} GROUP BY status`, ...args).toArray();
    for (const r of rows) {
      const status = ExecutionStatusSchema.safeParse(r.status);
      if (status.success) counts[status.data] = Number(r.n);
    }
    return counts;
  }

  /**
   * Entries and their summed cost per (status, template, client), for
   * `GET /metrics`: at most `limit` groups, the largest first, and whether
   * more exist.
   */
  async stats(limit: number): Promise<{ groups: IndexStatsGroup[]; truncated: boolean }> {
    if (!this.#readable()) return { groups: [], truncated: false };
    const n = Math.max(1, Math.min(MAX_ROWS, Math.floor(limit)));
    const rows = this.#sql<IndexStatsGroup>`SELECT status, template_name, client_id, COUNT(*) AS count, COALESCE(SUM(cost_total), 0) AS cost,
        COALESCE(SUM(tokens_total), 0) AS tokens
      FROM entries GROUP BY status, template_name, client_id ORDER BY count DESC, status, template_name, client_id LIMIT ${n + 1}`;
    return { groups: rows.slice(0, n).map((r) => ({ ...r, count: Number(r.count), cost: Number(r.cost), tokens: Number(r.tokens) })), truncated: rows.length > n };
  }

  /**
   * The charts' numbers (src/ops-series.ts) for the executions that ended in
   * `[since, until)` (of one client, when given): count and summed cost per
   * (bucket of `completed_at`, status, client), and the ended attempts their entries carry, at most
   * MAX_SERIES_GROUPS and MAX_SERIES_ATTEMPTS (`truncated` says when more matched).
   */
  async series(since: number, until: number, bucketMs: number, clientId?: string): Promise<IndexSeries> {
    if (!this.#readable()) return { groups: [], attempts: [], truncated: false };
    const bucket = Math.max(1, Math.floor(bucketMs));
    const groups = this.#sql<IndexSeriesGroup>`SELECT CAST((completed_at - ${since}) / ${bucket} AS INTEGER) AS bucket, status, client_id,
        COUNT(*) AS count, COALESCE(SUM(cost_total), 0) AS cost
      FROM entries WHERE completed_at >= ${since} AND completed_at < ${until} AND (${clientId ?? null} IS NULL OR client_id = ${clientId ?? null})
      GROUP BY bucket, status, client_id ORDER BY bucket, status, client_id LIMIT ${MAX_SERIES_GROUPS + 1}`;
    const attempts = this.#sql<{ a: string }>`SELECT j.value AS a FROM entries, json_each(entries.attempts) AS j
      WHERE entries.completed_at >= ${since} AND entries.completed_at < ${until} AND entries.attempts IS NOT NULL
        AND (${clientId ?? null} IS NULL OR entries.client_id = ${clientId ?? null})
      LIMIT ${MAX_SERIES_ATTEMPTS + 1}`;
    return {
      groups: groups.slice(0, MAX_SERIES_GROUPS).map((g) => ({ ...g, bucket: Number(g.bucket), count: Number(g.count), cost: Number(g.cost) })),
      attempts: attempts.slice(0, MAX_SERIES_ATTEMPTS).map((r) => JSON.parse(r.a) as IndexAttempt),
      truncated: groups.length > MAX_SERIES_GROUPS || attempts.length > MAX_SERIES_ATTEMPTS,
    };
  }

  #ensureSchema(): void {
    if (this.#ready) return;
    execScript(this.ctx.storage, SCHEMA);
    const columns = this.ctx.storage.sql.exec("PRAGMA table_info(entries)").toArray().map((r) => String(r.name));
    if (!columns.includes("rerun_of")) this.ctx.storage.sql.exec("ALTER TABLE entries ADD COLUMN rerun_of TEXT");
    if (!columns.includes("attempts")) this.ctx.storage.sql.exec("ALTER TABLE entries ADD COLUMN attempts TEXT");
    if (!columns.includes("tokens_total")) this.ctx.storage.sql.exec("ALTER TABLE entries ADD COLUMN tokens_total REAL");
    execScript(this.ctx.storage, LATER_INDEXES);
    this.#ready = true;
  }

  /** Before a read: the upserts waiting for their commit are written first, so the read sees them. */
  #readable(): boolean {
    this.#commit.flush();
    return this.#hasSchema();
  }

  #hasSchema(): boolean {
    if (this.#ready) return true;
    if (this.#sql`SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = 'entries'`.length === 0) return false;
    // A shard created before the later columns: the read that finds its table migrates it, or every later
    // upsert (and stats, series) would fail on a column it lacks, the instance taking it as migrated.
    this.#ensureSchema();
    return true;
  }
}

export interface IndexStatsGroup {
  status: string;
  template_name: string;
  client_id: string;
  count: number;
  cost: number;
  tokens: number;
}

/** `[worker, ended_at, waiting_ms, handshake_ms, processing_ms, outcome]` of one ended attempt (no outcome: completed, an older entry). */
export type IndexAttempt = [worker: string, endedAt: number, waitingMs: number, handshakeMs: number, processingMs: number, outcome?: string];

/** An attempt's outcome (entries written before outcomes were kept hold completed attempts only). */
export const attemptOutcome = (a: IndexAttempt): string => a[5] ?? "completed";

export interface IndexSeriesGroup {
  /** `floor((completed_at - since) / bucketMs)`. */
  bucket: number;
  status: string;
  client_id: string;
  count: number;
  cost: number;
}

export interface IndexSeries {
  groups: IndexSeriesGroup[];
  attempts: IndexAttempt[];
  truncated: boolean;
}

export function emptyCounts(): StatusCounts {
  return { queued: 0, running: 0, paused: 0, completed: 0, failed: 0, cancelled: 0 };
}

/** Each filter field and the clause it adds (values are bound, never spliced). */
const FILTER_CLAUSES = [
  ["client_id", "client_id = ?"],
  ["template_name", "template_name = ?"],
  ["status", "status = ?"],
  ["rerun_of", "rerun_of = ?"],
  ["since", "created_at >= ?"],
  ["until", "created_at < ?"],
] as const satisfies readonly (readonly [keyof IndexFilter, string])[];

function conditions(filter: IndexFilter, withCursor: boolean): { where: string; args: SqlStorageValue[] } {
  const parts: string[] = [];
  const args: SqlStorageValue[] = [];
  for (const [field, clause] of FILTER_CLAUSES) {
    const value = filter[field];
    if (value === undefined) continue;
    parts.push(clause);
    args.push(value);
  }
  if (filter.client_ids) {
    // Bounded by the key's client list (MAX_KEY_CLIENTS), well within SQLite's bound parameters.
    parts.push(`client_id IN (${filter.client_ids.map(() => "?").join(", ") || "NULL"})`);
    args.push(...filter.client_ids);
  }
  const at = withCursor && filter.cursor ? decodeCursor(filter.cursor) : null;
  if (withCursor && filter.cursor && !at) throw new Error("invalid cursor");
  if (at) {
    parts.push("(created_at, execution_id) < (?, ?)");
    args.push(at.created_at, at.execution_id);
  }
  return { where: parts.length ? ` WHERE ${parts.join(" AND ")}` : "", args };
}

function toEntry(row: Record<string, SqlStorageValue>): IndexEntry {
  return {
    execution_id: String(row.execution_id),
    client_id: String(row.client_id),
    template_name: String(row.template_name),
    status: row.status as IndexEntry["status"],
    priority: row.priority as IndexEntry["priority"],
    created_at: Number(row.created_at),
    updated_at: Number(row.updated_at),
    completed_at: row.completed_at === null ? null : Number(row.completed_at),
    error_code: row.error_code === null ? null : String(row.error_code),
    cost_total: row.cost_total === null ? null : Number(row.cost_total),
    stages_total: Number(row.stages_total),
    stages_completed: Number(row.stages_completed),
    version: Number(row.version),
    ...(row.rerun_of ? { rerun_of: String(row.rerun_of) } : {}),
    ...(row.attempts ? { attempts: JSON.parse(String(row.attempts)) as IndexAttempt[] } : {}),
    ...(row.tokens_total !== null && row.tokens_total !== undefined ? { tokens_total: Number(row.tokens_total) } : {}),
  };
}
