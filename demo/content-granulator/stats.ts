import { DurableObject } from "cloudflare:workers";
import { execScript, sqlOf, type Sql } from "../../actors/sql";
import type { GranulatorEnv } from "./index";

export interface StatsSnapshot {
  processing: number;
  max_concurrent: number;
  started: number;
  completed: number;
  failed: number;
  cancelled: number;
}

export type JobOutcome = "completed" | "failed" | "cancelled";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS job (
  key TEXT PRIMARY KEY,           -- one per job attempt: "{executionId}:{stageId}#{attempt}"
  state TEXT NOT NULL,            -- active | ended
  at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
`;

// Ended rows are kept a while so a begin that arrives after its end is ignored.
const ENDED_KEEP_MS = 3600_000;

/**
 * Concurrency as the worker itself sees it (single instance "global"): how many
 * jobs are processing right now and the most ever at once, so tests can check
 * the orchestrator's concurrency limits from the worker's side. begin/end are
 * idempotent per key and order-independent.
 */
export class GranulatorStats extends DurableObject<GranulatorEnv> {
  private sql: Sql;

  constructor(ctx: DurableObjectState, env: GranulatorEnv) {
    super(ctx, env);
    this.sql = sqlOf(ctx.storage);
    ctx.blockConcurrencyWhile(async () => execScript(ctx.storage, SCHEMA));
  }

  begin(key: string): StatsSnapshot {
    if (this.sql`SELECT key FROM job WHERE key = ${key}`.length === 0) {
      this.sql`INSERT INTO job (key, state, at) VALUES (${key}, 'active', ${Date.now()})`;
      this.bump("started");
      const processing = this.processing();
      if (processing > this.counter("max_concurrent")) this.set("max_concurrent", processing);
    }
    return this.snapshot();
  }

  end(key: string, outcome: JobOutcome): StatsSnapshot {
    const now = Date.now();
    const row = this.sql<{ state: string }>`SELECT state FROM job WHERE key = ${key}`[0];
    if (!row) {
      this.sql`INSERT INTO job (key, state, at) VALUES (${key}, 'ended', ${now})`;
    } else if (row.state === "active") {
      this.sql`UPDATE job SET state = 'ended', at = ${now} WHERE key = ${key}`;
      this.bump(outcome);
    }
    this.sql`DELETE FROM job WHERE state = 'ended' AND at < ${now - ENDED_KEEP_MS}`;
    return this.snapshot();
  }

  snapshot(): StatsSnapshot {
    return {
      processing: this.processing(),
      max_concurrent: this.counter("max_concurrent"),
      started: this.counter("started"),
      completed: this.counter("completed"),
      failed: this.counter("failed"),
      cancelled: this.counter("cancelled"),
    };
  }

  /** The jobs processing right now, each with when it began (`{executionId}:{stageId}#{attempt}`, epoch ms). */
  active(): { key: string; began: number }[] {
    return this.sql<{ key: string; began: number }>`SELECT key, at AS began FROM job WHERE state = 'active' ORDER BY at`;
  }

  /** Forgets everything, including jobs still running (their later end is then a no-op). */
  reset(): StatsSnapshot {
    this.sql`DELETE FROM job`;
    this.sql`DELETE FROM counter`;
    return this.snapshot();
  }

  private processing(): number {
    return this.sql<{ n: number }>`SELECT COUNT(*) AS n FROM job WHERE state = 'active'`[0].n;
  }

  private counter(name: string): number {
    return this.sql<{ n: number }>`SELECT n FROM counter WHERE name = ${name}`[0]?.n ?? 0;
  }

  private set(name: string, n: number): void {
    this.sql`INSERT INTO counter (name, n) VALUES (${name}, ${n}) ON CONFLICT (name) DO UPDATE SET n = excluded.n`;
  }

  private bump(name: string): void {
    this.sql`INSERT INTO counter (name, n) VALUES (${name}, 1) ON CONFLICT (name) DO UPDATE SET n = n + 1`;
  }
}
