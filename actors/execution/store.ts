import type { ExecutionStatus, StageStatus } from "../../schemas/api";
import type { Priority } from "../../schemas/common";
import type { DataReference } from "../../schemas/data";
import type { Config } from "../../src/config";
import { log } from "../../src/log";
import { type TraceContext, attemptHeaders, formatTraceparent, traceLogFields } from "../../src/trace";
import type { Sql } from "../sql";
import type { HeldGrants } from "./grant";
import type { ReadCache } from "./read-cache";
import type { Notifier } from "./notify";
import type { Outbox } from "./outbox";
import type { Timers } from "./timers";

/**
 * The execution's own SQLite: one `execution` row, its stages, and the bookkeeping around them.
 * A new object creates its tables at the latest version (every column the
 * migrations below add to an older object's; schema.ts), so it runs
 * no ALTER TABLE: each costs a row written and a reparse of the schema. Tables
 * whose only index is their primary key are WITHOUT ROWID (one b-tree for the rows, so a row
 * inserted or deleted is one row written, not two; `stages` too, whose insert
 * then writes its row and its `ord` entry, not also a key entry); an older
 * object keeps the rowid tables it has, which answer the same SQL. A new object's outbox
 * ids are not AUTOINCREMENT (no `sqlite_sequence` row per message): an id is
 * reused only after its row was deleted, and nothing refers to a deleted row
 * (the outbox forgets a delivered id when it deletes the row).
 */
export const TIMERS_TABLE = "CREATE TABLE IF NOT EXISTS timers (name TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', due_at INTEGER NOT NULL, PRIMARY KEY (name, unit)) WITHOUT ROWID;";
export const SCHEMA = `
CREATE TABLE IF NOT EXISTS execution (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  execution_id TEXT NOT NULL, template_name TEXT NOT NULL, client_id TEXT NOT NULL,
  request_id TEXT, request_hash TEXT, priority TEXT NOT NULL, parameters TEXT NOT NULL,
  status TEXT NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER, completed_at INTEGER,
  estimated_completion_at INTEGER, template_id TEXT, template_source TEXT,
  template_attempts INTEGER NOT NULL DEFAULT 0, error TEXT, cost TEXT, output TEXT, output_ref TEXT,
  alarm_failures INTEGER NOT NULL DEFAULT 0, data_expired_at INTEGER, index_version INTEGER NOT NULL DEFAULT 0,
  deadline_at INTEGER, status_version INTEGER NOT NULL DEFAULT 0, status_hash TEXT, status_shown_ended INTEGER,
  slot TEXT, slot_wait TEXT, slot_failures INTEGER NOT NULL DEFAULT 0, client_weight INTEGER,
  notify INTEGER NOT NULL DEFAULT 0, paused_from TEXT, paused_at INTEGER, paused_ms INTEGER NOT NULL DEFAULT 0,
  rerun_of TEXT, retention_waiting INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS stages (
  stage_id TEXT PRIMARY KEY, ord INTEGER NOT NULL UNIQUE, worker TEXT NOT NULL,
  template_ref TEXT NOT NULL, action TEXT NOT NULL, timeout_ms INTEGER NOT NULL,
  max_attempts INTEGER NOT NULL, resources TEXT, status TEXT NOT NULL,
  attempt INTEGER NOT NULL DEFAULT 0, progress REAL NOT NULL DEFAULT 0, message TEXT,
  reservation_id TEXT, reservation TEXT, requirements TEXT, lease_expires_at INTEGER,
  started_at INTEGER, completed_at INTEGER, waiting_since INTEGER, waiting_ms INTEGER NOT NULL DEFAULT 0,
  processing_since INTEGER, processing_ms INTEGER NOT NULL DEFAULT 0, deadline_at INTEGER,
  poll_interval_ms INTEGER, poll_failures INTEGER NOT NULL DEFAULT 0, polls INTEGER NOT NULL DEFAULT 0, error TEXT, last_error TEXT,
  usage TEXT, output TEXT, output_ref TEXT, complete_hash TEXT,
  depends_on TEXT, for_each TEXT, max_parallel INTEGER, items_total INTEGER,
  parent TEXT, item_index INTEGER, item TEXT,
  queue_timeout_ms INTEGER, ledger_failures INTEGER NOT NULL DEFAULT 0, attempt_at INTEGER, granted_at INTEGER,
  waiting_on TEXT, kind TEXT, decision TEXT, reused_from TEXT, carry TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
  reservation_id TEXT PRIMARY KEY, stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS data_objects (
  key TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
  content_type TEXT NOT NULL, stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at INTEGER NOT NULL
) WITHOUT ROWID;
${TIMERS_TABLE}
CREATE TABLE IF NOT EXISTS trace (
  id INTEGER PRIMARY KEY CHECK (id = 1), trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT,
  flags INTEGER NOT NULL, tracestate TEXT
);
CREATE TABLE IF NOT EXISTS spans (
  stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker TEXT NOT NULL, parent TEXT,
  queued_at INTEGER NOT NULL, granted_at INTEGER, processing_at INTEGER, ended_at INTEGER NOT NULL,
  outcome TEXT NOT NULL, tokens REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (stage_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL,
  created_at INTEGER, undeliverable_at INTEGER, last_error TEXT, listed INTEGER NOT NULL DEFAULT 0
);
`;

/**
 * The items of fan-out stages by stage (only items are in it: a stage's own
 * status changes write no index row).
 */
export const STAGES_BY_PARENT = "CREATE INDEX IF NOT EXISTS stages_by_parent ON stages (parent, status, item_index) WHERE parent IS NOT NULL;";

/** An item's `ord`: after its stage's, unique (items per stage stay below this). */
export const ITEM_ORD_STRIDE = 100_000;

/** Columns added by hardening (deadlines, ledger backoff, the outbox's undeliverable marks), for older objects. */
const ADDED_COLUMNS: [table: string, column: string, type: string][] = [
  ["execution", "deadline_at", "INTEGER"],
  ["stages", "queue_timeout_ms", "INTEGER"],
  ["stages", "ledger_failures", "INTEGER NOT NULL DEFAULT 0"],
  // The current attempt's span (spans.ts): when it began waiting, when it was granted.
  ["stages", "attempt_at", "INTEGER"],
  ["stages", "granted_at", "INTEGER"],
  ["outbox", "created_at", "INTEGER"],
  ["outbox", "undeliverable_at", "INTEGER"],
  ["outbox", "last_error", "TEXT"],
  ["outbox", "listed", "INTEGER NOT NULL DEFAULT 0"],
  // The client execution slot (max_running_executions; steps.ts askSlot) and, while waiting for it, why.
  ["execution", "slot", "TEXT"],
  ["execution", "slot_wait", "TEXT"],
  ["execution", "slot_failures", "INTEGER NOT NULL DEFAULT 0"],
  // The status document's version and the hash of the document it names (status-cache.ts).
  ["execution", "status_version", "INTEGER NOT NULL DEFAULT 0"],
  ["execution", "status_hash", "TEXT"],
  // Whether the last document shown had ended (status-cache.ts: a lease may be out on it); null in rows stored before.
  ["execution", "status_shown_ended", "INTEGER"],
  // The client's fair-share weight from its slot answer, for its stages' parts on other ledger shards (acquire.ts).
  ["execution", "client_weight", "INTEGER"],
  // A chain grant this stage runs under or is handed next (chain.ts Carry as JSON).
  ["stages", "carry", "TEXT"],
];

/** Columns added by the pipeline graph, for objects whose tables predate it. */
const GRAPH_COLUMNS = ["depends_on TEXT", "for_each TEXT", "max_parallel INTEGER", "items_total INTEGER", "parent TEXT", "item_index INTEGER", "item TEXT"];

/**
 * Brings an object created before the pipeline graph up to the schema: the
 * stage columns are added (a linear stage depends on the one before it), and
 * the timers table gains its `unit` column, the running stage's timers moving to it.
 */
export function migrate(storage: DurableObjectStorage): void {
  const columns = (table: string) => new Set(storage.sql.exec(`PRAGMA table_info(${table})`).toArray().map((r) => String(r.name)));
  const stageColumns = columns("stages");
  if (!stageColumns.has("depends_on")) {
    for (const col of GRAPH_COLUMNS) if (!stageColumns.has(col.split(" ")[0])) storage.sql.exec(`ALTER TABLE stages ADD COLUMN ${col}`);
    storage.sql.exec(`UPDATE stages SET depends_on = CASE WHEN ord = 1 THEN '[]' ELSE json_array('stage_' || (ord - 1)) END WHERE depends_on IS NULL`);
  }
  // Why a stage waits for resources (the ledger's waitingOn), for the status document.
  if (!stageColumns.has("waiting_on")) storage.sql.exec("ALTER TABLE stages ADD COLUMN waiting_on TEXT");
  storage.sql.exec(STAGES_BY_PARENT);
  if (!columns("timers").has("unit")) {
    storage.sql.exec(`ALTER TABLE timers RENAME TO timers_v1;
      ${TIMERS_TABLE}
      INSERT INTO timers (name, unit, due_at) SELECT name,
        CASE WHEN name IN ('poll', 'deadline', 'lease', 'reask', 'retry')
          THEN COALESCE((SELECT stage_id FROM stages WHERE status != 'completed' ORDER BY ord LIMIT 1), '') ELSE '' END, due_at
      FROM timers_v1;
      DROP TABLE timers_v1;`);
  }
  for (const [table, column, type] of ADDED_COLUMNS) {
    if (!columns(table).has(column)) storage.sql.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${type}`);
  }
}

export interface ExecutionRow {
  execution_id: string;
  template_name: string;
  client_id: string;
  request_id: string | null;
  request_hash: string | null;
  priority: Priority;
  parameters: string;
  status: ExecutionStatus;
  created_at: number;
  started_at: number | null;
  completed_at: number | null;
  estimated_completion_at: number | null;
  template_id: string | null;
  template_source: "kam" | "cache" | "snapshot" | null;
  template_attempts: number;
  error: string | null;
  cost: string | null;
  output: string | null;
  output_ref: string | null;
  alarm_failures: number;
  data_expired_at: number | null;
  index_version: number;
  /** 1: events go to KAM (notify.ts). */
  notify: number;
  /** While paused: the status to resume to, and since when (control.ts). */
  paused_from: ExecutionStatus | null;
  paused_at: number | null;
  /** Time spent paused before the current pause. */
  paused_ms: number;
  /** The execution this one reruns (rerun.ts). */
  rerun_of: string | null;
  /** 1: retention came due while reruns still held this execution's data (rerun.ts). */
  retention_waiting: number;
  /** The execution-wide deadline (`execution_timeout_ms`), from its start. */
  deadline_at: number | null;
  /**
   * The client execution slot (docs/ledger.md, "Execution slots"): null not
   * asked yet; `asked` (the answer is not in: released at the end in case it
   * was granted), `waiting`, `granted` (released at the end), or `free` (the
   * client has no max_running_executions: nothing to release).
   */
  slot: "asked" | "waiting" | "granted" | "free" | null;
  /** While `waiting`: the ledger's waitingOn (JSON), for the status document. */
  slot_wait: string | null;
  /** Failed acquireSlot calls in a row (the backoff before the next). */
  slot_failures: number;
  /** The client's fair-share weight as its shard answered the slot (sharded ledgers only; null: not known). */
  client_weight?: number | null;
}

/** What a transition changes of the execution row (Store.update); the rest is fixed at start(), the status document's version is status-cache.ts's. */
export type RowChange = Partial<
  Pick<
    ExecutionRow,
    | "status" | "started_at" | "completed_at" | "estimated_completion_at" | "template_id" | "template_source" | "template_attempts"
    | "error" | "cost" | "output" | "output_ref" | "alarm_failures" | "data_expired_at" | "index_version" | "slot" | "slot_wait"
    | "slot_failures" | "client_weight" | "paused_from" | "paused_at" | "paused_ms" | "rerun_of" | "retention_waiting"
  >
>;

export interface StageRow {
  stage_id: string;
  /** The ledger's last `waitingOn` for this stage's reservation (JSON), while it waits for resources. */
  waiting_on?: string | null;
  ord: number;
  worker: string;
  template_ref: string;
  action: string;
  timeout_ms: number;
  max_attempts: number;
  resources: string | null;
  status: StageStatus;
  attempt: number;
  progress: number;
  message: string | null;
  reservation_id: string | null;
  /** null | requested | waiting | granted */
  reservation: string | null;
  requirements: string | null;
  lease_expires_at: number | null;
  started_at: number | null;
  completed_at: number | null;
  waiting_since: number | null;
  waiting_ms: number;
  processing_since: number | null;
  processing_ms: number;
  deadline_at: number | null;
  poll_interval_ms: number | null;
  poll_failures: number;
  polls: number;
  error: string | null;
  last_error: string | null;
  usage: string | null;
  output: string | null;
  output_ref: string | null;
  complete_hash: string | null;
  /** null or 'worker': a stage worker runs it; 'approval': it waits for a decision (control.ts). */
  kind: string | null;
  /** An approval stage's decision, JSON `{ approved, by, comment, at }`. */
  decision: string | null;
  /** JSON array of stage ids (stages only). */
  depends_on: string | null;
  /** A fan-out stage's JSON Pointer; null for other stages and for items. */
  for_each: string | null;
  max_parallel: number | null;
  /** A fan-out stage's item count, once its dependency completed. */
  items_total: number | null;
  /** An item's stage id; null for a stage. */
  parent: string | null;
  item_index: number | null;
  /** An item's element of the list, as JSON. */
  item: string | null;
  /** Rerun: the execution whose completed stage this one took over. */
  reused_from: string | null;
  /** A chain grant this stage runs under, or is handed to run under next (chain.ts Carry as JSON); null: none. */
  carry: string | null;
  /** This stage's wait for resources is bounded by this (template `queue_timeout_ms`, else `maxQueueMs`). */
  queue_timeout_ms: number | null;
  /** Ledger calls that failed in a row while waiting for resources (the re-ask backs off on it). */
  ledger_failures: number;
  /** The current attempt's start (it waits for resources from then) and its grant (spans.ts). */
  attempt_at: number | null;
  granted_at: number | null;
}

/** What a transition changes of a stage's or item's row (Store.updateStage); the rest is the template's, fixed when the row is made. */
export type StageChange = Partial<
  Pick<
    StageRow,
    | "status" | "attempt" | "max_attempts" | "progress" | "message" | "reservation_id" | "reservation" | "requirements" | "lease_expires_at"
    | "started_at" | "completed_at" | "waiting_since" | "waiting_ms" | "processing_since" | "processing_ms" | "deadline_at" | "poll_interval_ms"
    | "poll_failures" | "polls" | "error" | "last_error" | "usage" | "output" | "output_ref" | "complete_hash" | "items_total"
    | "ledger_failures" | "attempt_at" | "granted_at" | "waiting_on" | "decision" | "carry"
  >
>;

/** What a drive pass's plan reads of an item (plan.ts): which it is and where it stands. */
export type ItemKey = Pick<StageRow, "stage_id" | "status" | "attempt" | "reservation" | "item_index">;

/** A stage that runs as items (its own row holds no attempt, no reservation, no worker call). */
export const isFanOut = (st: StageRow) => st.for_each !== null && st.parent === null;
export const dependsOn = (st: StageRow): string[] => parse<string[]>(st.depends_on) ?? [];

/** Item counts of a fan-out stage, as the status document shows them. */
export interface ItemCounts {
  total: number;
  pending: number;
  running: number;
  completed: number;
  failed: number;
  cancelled: number;
}

/** A stage's output as stored: small JSON inline in the row, anything larger as a data reference. */
export type StoredOutput = { inline: string; ref: null } | { inline: null; ref: DataReference };

export const ISO = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
export const parse = <T>(text: string | null): T | null => (text === null ? null : (JSON.parse(text) as T));

/** A completed stage's output as the next stage sees it: the value, or for stored data a small summary of the reference. */
export function outputAsInput(st: StageRow): unknown {
  const ref = parse<DataReference>(st.output_ref);
  return ref ? { $ref: ref.key, size: ref.size, contentType: ref.contentType } : parse(st.output);
}

type Level = "debug" | "info" | "warn" | "error";

/** Row readers over the execution's SQLite, and its structured log (every line carries the execution id). */
export class Store {
  readonly #sql: Sql;
  readonly #reads: ReadCache;
  /** Our own id, read from storage once (never from ctx.id.name). */
  #executionId: string | undefined;
  #trace: TraceContext | null | undefined;
  /** Stage ids seen in stages(): the template's stages (an item is never one; no stage is deleted or moved). */
  readonly #topLevel = new Set<string>();
  /** Grants held in memory (grant.ts): `stage()` reads a held stage as its written grant would leave it. */
  readonly #held: { grants: HeldGrants; handshakeTimeoutMs: number } | null;

  /** Whether the object has its tables (schema.ts withTables); without them there is no execution row. */
  readonly #exists: () => boolean;

  constructor(sql: Sql, reads: ReadCache, held: { grants: HeldGrants; handshakeTimeoutMs: number } | null = null, exists: () => boolean = () => true) {
    this.#sql = sql;
    this.#reads = reads;
    this.#held = held;
    this.#exists = exists;
  }

  /**
   * The execution row, from memory until the next write to it (read-cache.ts);
   * not the status document's version and hash, which it writes on its own.
   */
  row(): Readonly<ExecutionRow> | null {
    // A new object before its first write: no row, and no statement that would create the tables to find none.
    if (!this.#exists()) return null;
    return this.#reads.memo(
      "row",
      ["execution"],
      () =>
        this.#sql<ExecutionRow>`SELECT execution_id, template_name, client_id, request_id, request_hash, priority, parameters, status, created_at, started_at, completed_at,
        estimated_completion_at, template_id, template_source, template_attempts, error, cost, output, output_ref, alarm_failures, data_expired_at,
        index_version, deadline_at, slot, slot_wait, slot_failures, client_weight, notify, paused_from, paused_at, paused_ms, rerun_of, retention_waiting
        FROM execution WHERE id = 1`[0] ?? null,
    );
  }

  /**
   * Changes the execution row: every change is this one statement, the row in
   * memory with `change` over it (docs/performance.md, "Fewer distinct
   * statements": each distinct statement text stays prepared in the runtime for
   * the object's life, about 5 KiB each). A held grant or a deferred write goes
   * first, as before any write (grant.ts), so the row it merges is the one they left.
   */
  update(change: RowChange): void {
    this.#held?.grants.writeAll();
    const ex = this.row();
    if (!ex) throw new Error("execution row missing: nothing to update");
    const r = { ...ex, ...change };
    this.#sql`UPDATE execution SET status = ${r.status}, started_at = ${r.started_at}, completed_at = ${r.completed_at},
      estimated_completion_at = ${r.estimated_completion_at}, template_id = ${r.template_id}, template_source = ${r.template_source},
      template_attempts = ${r.template_attempts}, error = ${r.error}, cost = ${r.cost}, output = ${r.output}, output_ref = ${r.output_ref},
      alarm_failures = ${r.alarm_failures}, data_expired_at = ${r.data_expired_at}, index_version = ${r.index_version},
      slot = ${r.slot}, slot_wait = ${r.slot_wait}, slot_failures = ${r.slot_failures}, client_weight = ${r.client_weight ?? null},
      paused_from = ${r.paused_from}, paused_at = ${r.paused_at}, paused_ms = ${r.paused_ms}, rerun_of = ${r.rerun_of},
      retention_waiting = ${r.retention_waiting} WHERE id = 1`;
    // The row now is exactly `r`: no read again (the check mode compares it with SQL at the next hit).
    this.#reads.seed("row", ["execution"], r);
  }

  /**
   * Changes one stage's or item's row: every change is this one statement, the
   * stored row with the change over it (`change` may read that row, for what the
   * statement computed from it before: a sum, a default). As `update`: a held
   * grant or a deferred write goes first, and the row written stays in memory.
   */
  updateStage(stageId: string, change: StageChange | ((cur: Readonly<StageRow>) => StageChange)): void {
    this.#held?.grants.writeAll();
    const top = this.#topLevel.has(stageId);
    const cur = this.stage(stageId);
    if (!cur) throw new Error(`stage ${stageId} missing: nothing to update`);
    const list = top ? this.stages() : null;
    const r: StageRow = { ...cur, ...(typeof change === "function" ? change(cur) : change) };
    this.#sql`UPDATE stages SET status = ${r.status}, attempt = ${r.attempt}, max_attempts = ${r.max_attempts}, progress = ${r.progress},
      message = ${r.message}, reservation_id = ${r.reservation_id}, reservation = ${r.reservation}, requirements = ${r.requirements},
      lease_expires_at = ${r.lease_expires_at}, started_at = ${r.started_at}, completed_at = ${r.completed_at}, waiting_since = ${r.waiting_since},
      waiting_ms = ${r.waiting_ms}, processing_since = ${r.processing_since}, processing_ms = ${r.processing_ms}, deadline_at = ${r.deadline_at},
      poll_interval_ms = ${r.poll_interval_ms}, poll_failures = ${r.poll_failures}, polls = ${r.polls}, error = ${r.error}, last_error = ${r.last_error},
      usage = ${r.usage}, output = ${r.output}, output_ref = ${r.output_ref}, complete_hash = ${r.complete_hash}, items_total = ${r.items_total},
      ledger_failures = ${r.ledger_failures}, attempt_at = ${r.attempt_at}, granted_at = ${r.granted_at}, waiting_on = ${r.waiting_on ?? null},
      decision = ${r.decision}, carry = ${r.carry ?? null} WHERE stage_id = ${stageId}`;
    // The row now is exactly `r` (the check mode compares it with SQL at the next hit): a stage in the stages' list, an item on its own.
    if (list) this.#reads.seed("stages", ["stages"], list.map((s) => (s.stage_id === stageId ? r : s)));
    else this.#reads.seed(`stage:${stageId}`, ["stages"], r);
  }

  /** The template's stages, in order (not the items of fan-out stages). */
  stages(): readonly Readonly<StageRow>[] {
    return this.#reads.memo("stages", ["stages"], () => {
      const rows = this.#sql<StageRow>`SELECT * FROM stages WHERE parent IS NULL ORDER BY ord`;
      for (const r of rows) this.#topLevel.add(r.stage_id);
      return rows;
    });
  }

  /** Items of a fan-out stage from `fromIndex`, in item order. */
  items(parent: string, fromIndex = 0, limit = 1_000_000): StageRow[] {
    return this.#sql<StageRow>`SELECT * FROM stages WHERE parent = ${parent} AND item_index >= ${fromIndex} ORDER BY item_index LIMIT ${limit}`;
  }

  /** Whether an item of `parent` has the stored output `key` (its recorded `output_ref`, never the key's text). */
  itemStored(parent: string, key: string): boolean {
    return this.#sql<{ one: number }>`SELECT 1 AS one FROM stages WHERE parent = ${parent} AND json_extract(output_ref, '$.key') = ${key} LIMIT 1`.length > 0;
  }

  /**
   * A fan-out stage's items that hold a slot of max_parallel (they have begun
   * an attempt or wait to retry one), in item order, with only what a plan
   * needs. Each half is a lookup on stages_by_parent (parent, status), so a
   * drive pass's plan reads the open items, not every item of the stage: a
   * scan per plan made a 1,000-item fan-out quadratic.
   */
  openItems(parent: string): ItemKey[] {
    return this.#sql<ItemKey>`SELECT stage_id, status, attempt, reservation, item_index FROM stages
      WHERE parent = ${parent} AND status IN ('waiting_resources', 'handshaking', 'processing')
      UNION ALL SELECT stage_id, status, attempt, reservation, item_index FROM stages
      WHERE parent = ${parent} AND status = 'pending' AND attempt > 0 ORDER BY item_index`;
  }

  /** Up to `limit` items of a fan-out stage that have not started yet, in item order. */
  freshItems(parent: string, limit: number): ItemKey[] {
    if (limit <= 0) return [];
    return this.#sql<ItemKey>`SELECT stage_id, status, attempt, reservation, item_index FROM stages
      WHERE parent = ${parent} AND status = 'pending' AND attempt = 0 ORDER BY item_index LIMIT ${limit}`;
  }

  /**
   * What goes on while paused: stages and items whose attempt is on a worker
   * (handshaking or processing; not fan-out stages' own rows), and approval
   * stages awaiting their decision (their deadline runs).
   */
  onWorker(): readonly Readonly<StageRow>[] {
    return this.#reads.memo(
      "on_worker",
      ["stages"],
      () => this.#sql<StageRow>`SELECT * FROM stages WHERE (status IN ('handshaking', 'processing') AND NOT (for_each IS NOT NULL AND parent IS NULL))
      OR status = 'awaiting_approval' ORDER BY ord`,
    );
  }

  /** Stages and items in a given state (fan-out stages' own rows included), in order. */
  unitsIn(status: StageStatus): StageRow[] {
    return this.#sql<StageRow>`SELECT * FROM stages WHERE status = ${status} ORDER BY ord`;
  }

  /**
   * Item counts per fan-out stage. Items exist only under a stage with a
   * `for_each`, so a pipeline with none has none, and its counts cost no
   * statement (the stages are read anyway, and kept in memory).
   */
  itemCounts(): ReadonlyMap<string, Readonly<ItemCounts>> {
    return this.#reads.memo("item_counts", ["stages"], () => {
      if (this.stages().some(isFanOut)) return this.#itemCounts();
      if (this.#reads.checking && this.#itemCounts().size > 0) throw new Error("read cache: items without a fan-out stage");
      return new Map();
    });
  }

  #itemCounts(): Map<string, ItemCounts> {
    const out = new Map<string, ItemCounts>();
    const rows = this.#sql<{ parent: string; status: StageStatus; n: number }>`
      SELECT parent, status, COUNT(*) AS n FROM stages WHERE parent IS NOT NULL GROUP BY parent, status`;
    for (const r of rows) {
      const c = out.get(r.parent) ?? { total: 0, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 };
      c.total += r.n;
      if (r.status === "pending" || r.status === "completed" || r.status === "failed" || r.status === "cancelled") c[r.status] += r.n;
      else c.running += r.n;
      out.set(r.parent, c);
    }
    return out;
  }

  stage(stageId: string): Readonly<StageRow> | null {
    const read = () => this.#sql<StageRow>`SELECT * FROM stages WHERE stage_id = ${stageId}`[0] ?? null;
    // A stage of the template comes from the stages' one read (a drive pass reads them all after each write anyway); an item on its own.
    const row = this.#topLevel.has(stageId)
      ? this.#reads.checked(`stage:${stageId}`, this.stages().find((s) => s.stage_id === stageId) ?? null, read)
      : this.#reads.memo(`stage:${stageId}`, ["stages"], read);
    return this.#held ? this.#held.grants.overlay(row, this.#held.handshakeTimeoutMs) : row;
  }

  /** After an await: is the stage still where the call left it (same status, same attempt)? */
  stillAt(st: StageRow, status: StageStatus): boolean {
    const cur = this.stage(st.stage_id);
    return !!cur && cur.status === status && cur.attempt === st.attempt;
  }

  /** The checksum and size we recorded for a stored object (null once the data expired). */
  dataRef(key: string): DataReference | null {
    const ex = this.row();
    if (!ex || ex.data_expired_at !== null) return null;
    const r = this.#sql<{ kind: "kv" | "r2"; size: number; sha256: string; content_type: string }>`
      SELECT kind, size, sha256, content_type FROM data_objects WHERE key = ${key}`[0];
    return r ? { kind: r.kind, key, size: r.size, sha256: r.sha256, contentType: r.content_type } : null;
  }

  /** The execution's trace context (null for an execution created before traces). */
  trace(): TraceContext | null {
    if (this.#trace === undefined) {
      const t = this.#sql<TraceContext>`SELECT trace_id, span_id, parent_span_id, flags, tracestate FROM trace WHERE id = 1`[0];
      // Only a stored trace is kept: one read before start() wrote it must not stick as null.
      if (!t) return null;
      this.#trace = t;
    }
    return this.#trace;
  }

  /** The `traceparent` (and `tracestate`) of a call made for the execution itself (event notifications). */
  executionTraceHeaders(): Record<string, string> {
    const t = this.trace();
    if (!t) return {};
    const headers: Record<string, string> = { traceparent: formatTraceparent(t.trace_id, t.span_id, t.flags) };
    if (t.tracestate) headers.tracestate = t.tracestate;
    return headers;
  }

  /** The `traceparent` (and `tracestate`) of a call made for one attempt of a stage. */
  traceHeaders(stageId: string, attempt: number): Record<string, string> {
    const t = this.trace();
    return t ? attemptHeaders(t, stageId, attempt) : {};
  }

  /** Every line carries the execution id and its trace: `span_id` is the attempt's when the line names one, else the execution's. */
  log(level: Level, event: string, fields: Record<string, unknown>): void {
    this.#executionId ??= this.row()?.execution_id;
    log(level, event, { execution_id: this.#executionId, ...traceLogFields(this.trace(), fields), ...fields });
  }

  logCall(event: string, st: StageRow, ms: number, outcome: string): void {
    this.log("info", event, { stage_id: st.stage_id, attempt: st.attempt, worker: st.worker, duration_ms: ms, outcome });
  }
}

/** What the modules of one Execution share: its storage, readers, timers and outbox. */
export interface Core {
  readonly env: Env;
  readonly config: Config;
  readonly sql: Sql;
  readonly store: Store;
  /** Reads kept in memory until a write to their tables (read-cache.ts). */
  readonly reads: ReadCache;
  readonly timers: Timers;
  readonly outbox: Outbox;
  /** Events for KAM, delivered in order (notify.ts). */
  readonly notifier: Notifier;
  /** Makes sure the alarm fires no later than the earliest timer (see Timers.rearm). */
  rearm(): Promise<void>;
  /** Something the status document shows changed: connected live sockets get it pushed (coalesced per turn). */
  changed(): void;
  /** Resolves at the next change of the status document, or after `waitMs` (status-cache.ts changeAfter). */
  nextChange(waitMs: number): Promise<void>;
  /**
   * When `process` was accepted, by `stage_id#attempt`, for an attempt whose
   * `processing` is not written yet (steps.ts handshake): in memory only, so a
   * quick callback still records its processing time; lost with the instance.
   */
  readonly accepted: Map<string, number>;
  /** Ledger grants not written yet (grant.ts HeldGrants): written by the next write, whatever it is. */
  readonly grants: HeldGrants;
}
