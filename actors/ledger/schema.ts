/**
 * The ledger's SQLite schema and its in-place migration (./store.ts opens it).
 * Columns added after the first release are added with ALTER TABLE, so an
 * existing ledger keeps its state across a deploy.
 */
import { execScript, sqlOf } from "../sql";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pools (
  name TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  capacity REAL NOT NULL,
  refill_per_second REAL NOT NULL DEFAULT 0,
  tokens REAL NOT NULL DEFAULT 0,
  tokens_at INTEGER NOT NULL DEFAULT 0,
  consumed REAL NOT NULL DEFAULT 0,
  est_avg REAL,
  est_n INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
  id TEXT PRIMARY KEY,
  execution_id TEXT NOT NULL,
  stage_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  worker TEXT NOT NULL,
  rank INTEGER NOT NULL,
  eff_rank INTEGER NOT NULL,
  age_at INTEGER,
  seq INTEGER NOT NULL,
  state TEXT NOT NULL,
  req TEXT NOT NULL,
  lease_ms INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  granted_at INTEGER,
  expires_at INTEGER,
  passed INTEGER NOT NULL DEFAULT 0,
  parked INTEGER NOT NULL DEFAULT 0,
  usage TEXT,
  duration_ms REAL,
  ended_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_ageing ON reservations (age_at) WHERE state = 'waiting' AND age_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_ended ON reservations (ended_at) WHERE ended_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS worker_stats (
  worker TEXT PRIMARY KEY,
  dur_avg REAL,
  dur_n INTEGER NOT NULL DEFAULT 0,
  usage TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS clients (
  client_id TEXT PRIMARY KEY,
  quotas TEXT,
  month TEXT NOT NULL,
  spent REAL NOT NULL DEFAULT 0,
  buckets TEXT NOT NULL DEFAULT '{}',
  starts TEXT,
  last_tag REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unknown_usage (
  pool TEXT PRIMARY KEY,
  total REAL NOT NULL,
  events INTEGER NOT NULL,
  last_at INTEGER NOT NULL
) WITHOUT ROWID;
`;

/** Columns added after the first release: added in place, so an existing ledger keeps its state. */
const ADDED_COLUMNS: [table: string, column: string, type: string][] = [
  ["reservations", "client_id", "TEXT"],
  ["reservations", "cost_est", "REAL NOT NULL DEFAULT 0"],
  ["reservations", "tag", "REAL NOT NULL DEFAULT 0"],
  ["pools", "paused_until", "INTEGER"],
  // The client journal (./client-journal.ts): change number and the client's state after it.
  ["reservations", "cseq", "INTEGER NOT NULL DEFAULT 0"],
  ["reservations", "cstate", "TEXT"],
  /** A multi-shard stage's part (ReservePart as JSON); null: the whole stage is on this object. */
  ["reservations", "part", "TEXT"],
  /** A chain grant's later stages and whether it was cut (ChainState as JSON); null: one stage (docs/ledger.md, "Chain grants"). */
  ["reservations", "chain", "TEXT"],
];
const INDEXES = `
DROP INDEX IF EXISTS reservations_queue;
CREATE INDEX IF NOT EXISTS reservations_fair_queue ON reservations (parked, eff_rank DESC, tag, seq) WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS reservations_client ON reservations (client_id, parked) WHERE state = 'waiting';
DROP INDEX IF EXISTS reservations_journal;
DROP INDEX IF EXISTS reservations_leases;
`;

/*
 * Indexes that served only the load, dropped above (each cost a row written per
 * reservation write it covered): `reservations_journal` on `cseq` (every write
 * changes it; the client journal's read, ./client-journal.ts) and
 * `reservations_leases` on the granted rows (every grant; the live leases are
 * in memory after the load, ./store.ts `live`). The load scans the table
 * instead, once per object start.
 */
/** Creates the tables, adds the later columns where missing, (re)creates the indexes. Idempotent. */
export function migrate(storage: DurableObjectStorage): void {
  const sql = sqlOf(storage);
  execScript(storage, SCHEMA);
  for (const [table, col, type] of ADDED_COLUMNS) {
    const have = sql<{ name: string }>`SELECT name FROM pragma_table_info(${table}) WHERE name = ${col}`.length > 0;
    if (!have) execScript(storage, `ALTER TABLE ${table} ADD COLUMN ${col} ${type}`);
  }
  execScript(storage, INDEXES);
}
