import { DurableObject } from "cloudflare:workers";
import { configOf } from "../src/config";
import { type Sql, sqlOf } from "./sql";
import { setLogLevel } from "../src/log";

/**
 * Idempotent starts: one object per client_id maps each request_id to the
 * execution it started and the hash of the request body. `claim` is one
 * synchronous read-decide-write, so concurrent duplicates of a request_id all
 * get the same execution id.
 *
 * Entries expire `requestIdRetentionMs` (7 days) after their first claim,
 * far longer than any client's retry window: the alarm deletes them, and a
 * claim treats an entry past it as gone (the same request_id then starts a new
 * execution). The object's storage stays bounded by what one week brings.
 */
export type ClaimResult =
  | { outcome: "claimed"; executionId: string }
  | { outcome: "existing"; executionId: string }
  | { outcome: "conflict"; executionId: string };

/** Whether an entry claimed at `createdAt` still holds at `now` (pure, for the claim and the alarm). */
export function requestEntryLive(createdAt: number, now: number, retentionMs: number): boolean {
  return now < createdAt + retentionMs;
}

export class RequestRegistry extends DurableObject<Env> {
  readonly #sql: Sql;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    setLogLevel(env);
    this.#sql = sqlOf(ctx.storage);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(`CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY, execution_id TEXT NOT NULL, body_hash TEXT NOT NULL, created_at INTEGER NOT NULL)`);
      ctx.storage.sql.exec("CREATE INDEX IF NOT EXISTS requests_by_age ON requests (created_at)");
    });
  }

  get #retentionMs(): number {
    return configOf(this.env).tuning.requestIdRetentionMs;
  }

  async claim(requestId: string, bodyHash: string, candidateExecutionId: string): Promise<ClaimResult> {
    const now = Date.now();
    const row = this.#sql<{ execution_id: string; body_hash: string; created_at: number }>`
      SELECT execution_id, body_hash, created_at FROM requests WHERE request_id = ${requestId}`[0];
    if (row && requestEntryLive(row.created_at, now, this.#retentionMs)) {
      return { outcome: row.body_hash === bodyHash ? "existing" : "conflict", executionId: row.execution_id };
    }
    // New, or expired and not yet swept by the alarm: this claim starts afresh.
    this.#sql`INSERT OR REPLACE INTO requests (request_id, execution_id, body_hash, created_at)
      VALUES (${requestId}, ${candidateExecutionId}, ${bodyHash}, ${now})`;
    // The decision above is already written; arming the sweep may interleave with another claim, harmlessly.
    if ((await this.ctx.storage.getAlarm()) === null) await this.ctx.storage.setAlarm(now + this.#retentionMs);
    return { outcome: "claimed", executionId: candidateExecutionId };
  }

  /** Deletes the expired entries, then sleeps until the oldest one left expires. */
  override async alarm(): Promise<void> {
    const now = Date.now();
    const retention = this.#retentionMs;
    this.#sql`DELETE FROM requests WHERE created_at <= ${now - retention}`;
    const oldest = this.#sql<{ created_at: number }>`SELECT created_at FROM requests ORDER BY created_at LIMIT 1`[0];
    if (oldest) await this.ctx.storage.setAlarm(oldest.created_at + retention);
  }
}
