/**
 * The job object's SQLite tables. Synchronous calls: a run of them with no
 * `await` in between is one atomic step under the object's input gate.
 */

export type Sql = <T = Record<string, SqlStorageValue>>(strings: TemplateStringsArray, ...values: SqlStorageValue[]) => T[];

export function sqlOf(storage: DurableObjectStorage): Sql {
  return <T>(strings: TemplateStringsArray, ...values: SqlStorageValue[]) =>
    storage.sql.exec(strings.join("?"), ...values).toArray() as T[];
}

export type JobStatus = "accepted" | "processing" | "completed" | "failed" | "cancelled";
export type CallbackKind = "progress" | "complete" | "fail";
export type Outcome = "completed" | "failed" | "cancelled";

export interface JobRow {
  execution_id: string;
  stage_id: string;
  attempt: number;
  action: string;
  status: JobStatus;
  progress: number;
  message: string | null;
  /** When the alarm runs (or resumes) the work; null: not scheduled (not started, ended, or asleep for ever). */
  run_at: number | null;
  /** Transient failures in a row while finishing (upload); bounded by `uploadMaxTries`. */
  run_failures: number;
  usage: string | null;
  error: string | null;
  retryable: number | null;
  data_ref: string | null;
  /** 1 while `lifecycle.onBegin` has run and `onEnd` has not. */
  active: number;
  /** An `onEnd` outcome still owed (its call failed); the alarm tries again. */
  end_owed: string | null;
  response: string;
  updated_at: number;
}

export interface OutboxRow {
  seq: number;
  kind: CallbackKind;
  body: string | null;
  /** A token to send instead of the real one (fault hooks); null: the handshake's token. */
  token: string | null;
  tries: number;
  next_at: number;
}

export const SCHEMA = `
CREATE TABLE IF NOT EXISTS kit_job (
  id INTEGER PRIMARY KEY CHECK (id = 1),   -- one job, the latest attempt, per object
  execution_id TEXT NOT NULL,
  stage_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  action TEXT NOT NULL,
  status TEXT NOT NULL,                    -- accepted | processing | completed | failed | cancelled
  progress REAL NOT NULL DEFAULT 0,
  message TEXT,
  run_at INTEGER,
  run_failures INTEGER NOT NULL DEFAULT 0,
  usage TEXT,                              -- JSON, once ended
  error TEXT,                              -- JSON {code, message}, when failed
  retryable INTEGER,
  data_ref TEXT,                           -- JSON DataReference of an uploaded output
  active INTEGER NOT NULL DEFAULT 0,
  end_owed TEXT,
  response TEXT NOT NULL,                  -- the handshake answer, replayed for a repeated handshake
  updated_at INTEGER NOT NULL
);
-- Handshake, inline output and memoised run state; chunked, since SQLite refuses values over 2 MB.
CREATE TABLE IF NOT EXISTS kit_blob (name TEXT NOT NULL, seq INTEGER NOT NULL, chunk TEXT NOT NULL, PRIMARY KEY (name, seq));
-- Callbacks still to send, strictly in order; complete/fail bodies are built at send time.
CREATE TABLE IF NOT EXISTS kit_outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  body TEXT,
  token TEXT,
  tries INTEGER NOT NULL DEFAULT 0,
  next_at INTEGER NOT NULL
);
-- Per-stage counters that survive a new attempt replacing the job.
CREATE TABLE IF NOT EXISTS kit_counter (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
-- What the job sent and what it got back (callbacks, uploads), for GET /api/jobs.
CREATE TABLE IF NOT EXISTS kit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, attempt INTEGER NOT NULL,
  what TEXT NOT NULL, status INTEGER NOT NULL, detail TEXT);
`;

/** UTF-16 units per chunk: at most 1.5 MB of UTF-8. */
const CHUNK_CHARS = 500_000;
const LOG_KEEP = 100;

export class Store {
  constructor(readonly sql: Sql) {}

  row(): JobRow | undefined {
    return this.sql<JobRow>`SELECT * FROM kit_job WHERE id = 1`[0];
  }

  /** Forgets the job (not the counters): a new attempt starts clean. */
  clearJob(): void {
    this.sql`DELETE FROM kit_job`;
    this.sql`DELETE FROM kit_blob`;
    this.sql`DELETE FROM kit_outbox`;
  }

  putBlob(name: string, text: string): void {
    this.sql`DELETE FROM kit_blob WHERE name = ${name}`;
    let seq = 0;
    let at = 0;
    do {
      let end = Math.min(text.length, at + CHUNK_CHARS);
      // Never split a surrogate pair: half of one does not survive the trip through UTF-8.
      const last = text.charCodeAt(end - 1);
      if (end < text.length && last >= 0xd800 && last <= 0xdbff) end--;
      this.sql`INSERT INTO kit_blob (name, seq, chunk) VALUES (${name}, ${seq++}, ${text.slice(at, end)})`;
      at = end;
    } while (at < text.length);
  }

  deleteBlob(name: string): void {
    this.sql`DELETE FROM kit_blob WHERE name = ${name}`;
  }

  getBlob(name: string): string | null {
    const rows = this.sql<{ chunk: string }>`SELECT chunk FROM kit_blob WHERE name = ${name} ORDER BY seq`;
    return rows.length === 0 ? null : rows.map((r) => r.chunk).join("");
  }

  count(name: string): number {
    return this.sql<{ n: number }>`SELECT n FROM kit_counter WHERE name = ${name}`[0]?.n ?? 0;
  }

  bump(name: string): number {
    return this.sql<{ n: number }>`INSERT INTO kit_counter (name, n) VALUES (${name}, 1)
      ON CONFLICT (name) DO UPDATE SET n = n + 1 RETURNING n`[0].n;
  }

  enqueue(kind: CallbackKind, body: string | null, token: string | null = null): void {
    this.sql`INSERT INTO kit_outbox (kind, body, token, next_at) VALUES (${kind}, ${body}, ${token}, ${Date.now()})`;
  }

  outboxHead(): OutboxRow | undefined {
    return this.sql<OutboxRow>`SELECT * FROM kit_outbox ORDER BY seq LIMIT 1`[0];
  }

  hasAfter(seq: number): boolean {
    return this.sql`SELECT seq FROM kit_outbox WHERE seq > ${seq} LIMIT 1`.length > 0;
  }

  log(attempt: number, what: string, status: number, detail: string | null = null): void {
    this.sql`INSERT INTO kit_log (at, attempt, what, status, detail) VALUES (${Date.now()}, ${attempt}, ${what}, ${status}, ${detail})`;
    this.sql`DELETE FROM kit_log WHERE seq <= (SELECT MAX(seq) FROM kit_log) - ${LOG_KEEP}`;
  }

  logEntries(): { at: number; attempt: number; what: string; status: number; detail: string | null }[] {
    return this.sql`SELECT at, attempt, what, status, detail FROM kit_log ORDER BY seq`;
  }
}
