import { DurableObject } from "cloudflare:workers";
import { configOf } from "../src/config";
import { resourcesDocument } from "../src/ledger-fanout";
import { log, setLogLevel } from "../src/log";
import { type Sql, execScript, sqlOf } from "./sql";

/**
 * Queue length over time, for the charts on `/ui` (src/ops-series.ts): the
 * ledger knows only its queue now, so one object (`QUEUE_SAMPLES`, named
 * `global`) reads every ledger shard's snapshot every `queueSampleMs` (1 min) from its
 * own alarm and keeps one row per pool per sample, for `queueSampleRetentionMs`
 * (8 days). That is one extra read of each ledger shard a minute, never on a request's path.
 *
 * The front Worker calls `ensure()` once per isolate (src/routes.ts), which
 * arms the alarm if none is set; the alarm re-arms itself, so sampling goes
 * on with no traffic. A sample whose ledger read fails is skipped (logged),
 * never retried: the next one comes a minute later anyway.
 */
const SCHEMA = `
CREATE TABLE IF NOT EXISTS samples (
  at INTEGER NOT NULL, pool TEXT NOT NULL, waiting INTEGER NOT NULL, in_use REAL NOT NULL, capacity REAL NOT NULL,
  PRIMARY KEY (at, pool)
);
`;

export const QUEUE_SAMPLER_NAME = "global";

export interface QueueSample {
  at: number;
  pool: string;
  waiting: number;
  in_use: number;
  capacity: number;
}

/** At most this many rows per read (8 days of 1-minute samples of 15 pools fit, with room). */
const MAX_ROWS = 200_000;

export class QueueSampler extends DurableObject<Env> {
  readonly #sql: Sql;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.#sql = sqlOf(ctx.storage);
    setLogLevel(env);
    execScript(ctx.storage, SCHEMA);
  }

  /** Arms the sampling alarm unless it is armed already. */
  async ensure(): Promise<void> {
    if ((await this.ctx.storage.getAlarm()) === null) await this.ctx.storage.setAlarm(Date.now());
  }

  /** Samples in `[since, until)`, oldest first; `truncated` when more matched than one read returns. */
  async samples(since: number, until: number): Promise<{ samples: QueueSample[]; truncated: boolean }> {
    const rows = this.#sql<QueueSample>`SELECT at, pool, waiting, in_use, capacity FROM samples
      WHERE at >= ${since} AND at < ${until} ORDER BY at, pool LIMIT ${MAX_ROWS + 1}`;
    return { samples: rows.slice(0, MAX_ROWS), truncated: rows.length > MAX_ROWS };
  }

  /** Takes one sample now (the alarm's work; tests call it to sample at a moment they choose). */
  async sample(): Promise<number> {
    const t = configOf(this.env).tuning;
    const now = Date.now();
    // Every shard's pools (bounded, src/ledger-fanout.ts); a shard that does not answer misses this sample.
    const { doc: snap, answered } = await resourcesDocument(this.env);
    if (answered === 0) throw new Error("no ledger shard answered the snapshot");
    for (const p of snap.pools) {
      this.#sql`INSERT OR REPLACE INTO samples (at, pool, waiting, in_use, capacity) VALUES (${now}, ${p.name}, ${p.waiting}, ${p.in_use}, ${p.capacity})`;
    }
    this.#sql`DELETE FROM samples WHERE at < ${now - t.queueSampleRetentionMs}`;
    return now;
  }

  override async alarm(): Promise<void> {
    const t = configOf(this.env).tuning;
    // Re-armed first: a failed sample must not stop the series.
    await this.ctx.storage.setAlarm(Date.now() + t.queueSampleMs);
    try {
      await this.sample();
    } catch (err) {
      log("warn", "queue_sample_failed", { error: err instanceof Error ? err.message : String(err) });
    }
  }
}
