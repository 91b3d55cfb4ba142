import { DurableObject } from "cloudflare:workers";
import { type Sql, sqlOf } from "./sql";

/**
 * Idempotent starts: one object per client_id maps each request_id to the
 * execution it started and the hash of the request body. `claim` is one
 * synchronous read-decide-write, so concurrent duplicates of a request_id all
 * get the same execution id.
 */
export type ClaimResult =
  | { outcome: "claimed"; executionId: string }
  | { outcome: "existing"; executionId: string }
  | { outcome: "conflict"; executionId: string };

export class RequestRegistry extends DurableObject<Env> {
  private readonly sql: Sql;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = sqlOf(ctx.storage);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(`CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY, execution_id TEXT NOT NULL, body_hash TEXT NOT NULL, created_at INTEGER NOT NULL)`);
    });
  }

  async claim(requestId: string, bodyHash: string, candidateExecutionId: string): Promise<ClaimResult> {
    const row = this.sql<{ execution_id: string; body_hash: string }>`SELECT execution_id, body_hash FROM requests WHERE request_id = ${requestId}`[0];
    if (row) return { outcome: row.body_hash === bodyHash ? "existing" : "conflict", executionId: row.execution_id };
    this.sql`INSERT INTO requests (request_id, execution_id, body_hash, created_at) VALUES (${requestId}, ${candidateExecutionId}, ${bodyHash}, ${Date.now()})`;
    return { outcome: "claimed", executionId: candidateExecutionId };
  }
}
