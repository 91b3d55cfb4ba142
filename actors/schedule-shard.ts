import { DurableObject } from "cloudflare:workers";
import { TERMINAL_STATUSES } from "../schemas/api";
import {
  type FireState,
  type PatchScheduleRequest,
  type ScheduleDocument,
  type ScheduleRun,
  ScheduleSpec,
} from "../schemas/schedule";
import { configOf } from "../src/config";
import { cancelExecution, getStatus, startExecution } from "../src/execution-service";
import { ApiError } from "../src/http";
import { log, setLogLevel } from "../src/log";
import { emit } from "../src/metrics";
import { fireExpired, fireRequest, fireRetryDelay, nextFireTime, nextFireTimes, overlapAction, planFire } from "./schedule-rules";
import { type Sql, execScript, sqlOf } from "./sql";

/**
 * One shard of the schedules (which shard holds a schedule is decided in
 * src/schedule-routing.ts only): a row per schedule with its next fire time,
 * and a row per fire. The object's one alarm is the earliest of the next fire
 * times and the retries of fires not yet started.
 *
 * A fire happens in two steps, so a crash between them loses nothing and
 * repeats nothing:
 * 1. one synchronous transition records the fire (primary key: schedule and
 *    fire time, so an alarm that runs again records nothing new) and moves
 *    the schedule to its next time;
 * 2. then, outside any transition, the fire's execution is started with a
 *    `request_id` derived from the schedule and the fire time: a fire started
 *    again after a crash gets the same execution from the RequestRegistry.
 * A fire still pending after its deadline fails with `fire_deadline`.
 */
const SCHEMA = `
CREATE TABLE IF NOT EXISTS schedules (
  schedule_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, spec TEXT NOT NULL, paused INTEGER NOT NULL,
  created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, next_fire_at INTEGER
);
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_fire_at) WHERE paused = 0;
CREATE TABLE IF NOT EXISTS fires (
  schedule_id TEXT NOT NULL, fire_at INTEGER NOT NULL, state TEXT NOT NULL, request TEXT NOT NULL,
  execution_id TEXT, reason TEXT, message TEXT, attempts INTEGER NOT NULL, next_try_at INTEGER,
  PRIMARY KEY (schedule_id, fire_at)
);
CREATE INDEX IF NOT EXISTS fires_pending ON fires (next_try_at) WHERE state = 'pending';
`;

/** Schedules planned and fires started per alarm pass; more re-arm the alarm at once. */
const PASS_LIMIT = 20;
const NEXT_RUNS_SHOWN = 5;
const LAST_RUNS_SHOWN = 10;

interface ScheduleRow {
  schedule_id: string;
  spec: string;
  paused: number;
  created_at: number;
  updated_at: number;
  next_fire_at: number | null;
}

interface FireRow {
  schedule_id: string;
  fire_at: number;
  state: FireState;
  request: string;
  execution_id: string | null;
  reason: string | null;
  message: string | null;
  attempts: number;
}

export type CreateOutcome = { outcome: "created" | "existing" | "conflict"; schedule: ScheduleDocument };

/** What one attempt at a fire came to. */
type Attempt =
  | { state: "started"; executionId: string; message: string | null }
  | { state: "skipped" | "failed"; reason: string; message: string }
  | { state: "retry"; reason: string; message: string };

export class ScheduleShard extends DurableObject<Env> {
  readonly #sql: Sql;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.#sql = sqlOf(ctx.storage);
    setLogLevel(env);
    void ctx.blockConcurrencyWhile(async () => execScript(ctx.storage, SCHEMA));
  }

  get #tuning() {
    return configOf(this.env).tuning;
  }

  /** Idempotent by id: the same spec again answers `existing`, another spec under that id `conflict`. */
  async create(input: ScheduleSpec): Promise<CreateOutcome> {
    const spec = ScheduleSpec.parse(input);
    const now = Date.now();
    const row = this.#row(spec.schedule_id);
    if (row) {
      const same = row.spec === JSON.stringify(spec);
      return { outcome: same ? "existing" : "conflict", schedule: this.#document(row, now) };
    }
    const next = spec.paused ? null : nextFireTime(spec, now);
    this.#sql`INSERT INTO schedules (schedule_id, client_id, spec, paused, created_at, updated_at, next_fire_at)
      VALUES (${spec.schedule_id}, ${spec.client_id}, ${JSON.stringify(spec)}, ${spec.paused ? 1 : 0}, ${now}, ${now}, ${next})`;
    this.#arm();
    log("info", "schedule_created", { schedule_id: spec.schedule_id, cron: spec.cron, timezone: spec.timezone, next_fire_at: next });
    return { outcome: "created", schedule: this.#document(this.#row(spec.schedule_id)!, now) };
  }

  async get(scheduleId: string): Promise<ScheduleDocument | null> {
    const row = this.#row(scheduleId);
    return row ? this.#document(row, Date.now()) : null;
  }

  /** Schedules after `after` (by id), at most `limit`, optionally of one client. */
  async list(query: { client_id?: string; after?: string; limit: number }): Promise<ScheduleDocument[]> {
    const limit = Math.min(Math.max(1, query.limit), 200);
    const after = query.after ?? "";
    const rows = query.client_id
      ? this.#sql<ScheduleRow>`SELECT * FROM schedules WHERE client_id = ${query.client_id} AND schedule_id > ${after} ORDER BY schedule_id LIMIT ${limit}`
      : this.#sql<ScheduleRow>`SELECT * FROM schedules WHERE schedule_id > ${after} ORDER BY schedule_id LIMIT ${limit}`;
    const now = Date.now();
    return rows.map((r) => this.#document(r, now));
  }

  /**
   * Changes fields; a change of `cron` or `timezone`, and a resume, plan the
   * next fire from now (times passed while paused are not fired). Fires
   * already recorded keep the request they were recorded with.
   */
  async patch(scheduleId: string, patch: PatchScheduleRequest): Promise<ScheduleDocument | null> {
    const row = this.#row(scheduleId);
    if (!row) return null;
    const before = ScheduleSpec.parse(JSON.parse(row.spec));
    const spec = ScheduleSpec.parse({ ...before, ...patch, schedule_id: before.schedule_id });
    const now = Date.now();
    const replan = spec.cron !== before.cron || spec.timezone !== before.timezone || spec.paused !== before.paused;
    const next = spec.paused ? null : replan ? nextFireTime(spec, now) : row.next_fire_at;
    this.#sql`UPDATE schedules SET client_id = ${spec.client_id}, spec = ${JSON.stringify(spec)}, paused = ${spec.paused ? 1 : 0},
      updated_at = ${now}, next_fire_at = ${next} WHERE schedule_id = ${scheduleId}`;
    this.#arm();
    log("info", "schedule_changed", { schedule_id: scheduleId, fields: Object.keys(patch), paused: spec.paused, next_fire_at: next });
    return this.#document(this.#row(scheduleId)!, now);
  }

  /** Deletes the schedule and its fires; a fire not yet started is dropped. */
  async remove(scheduleId: string): Promise<boolean> {
    if (!this.#row(scheduleId)) return false;
    this.#sql`DELETE FROM fires WHERE schedule_id = ${scheduleId}`;
    this.#sql`DELETE FROM schedules WHERE schedule_id = ${scheduleId}`;
    this.#arm();
    log("info", "schedule_deleted", { schedule_id: scheduleId });
    return true;
  }

  /** Schedules active and paused, and the fires kept per state, for `GET /metrics`. */
  async stats(): Promise<{ active: number; paused: number; fires: Record<string, number> }> {
    const s = this.#sql<{ paused: number; n: number }>`SELECT paused, COUNT(*) AS n FROM schedules GROUP BY paused`;
    const f = this.#sql<{ state: string; n: number }>`SELECT state, COUNT(*) AS n FROM fires GROUP BY state`;
    return {
      active: Number(s.find((r) => r.paused === 0)?.n ?? 0),
      paused: Number(s.find((r) => r.paused === 1)?.n ?? 0),
      fires: Object.fromEntries(f.map((r) => [r.state, Number(r.n)])),
    };
  }

  override async alarm(): Promise<void> {
    const now = Date.now();
    this.#recordDueFires(now);
    await this.#startPendingFires(now);
    this.#arm();
  }

  // ---- transitions (synchronous) ------------------------------------------

  /** Step 1 of a fire: record it and move the schedule on, in one transition. */
  #recordDueFires(now: number): void {
    const due = this.#sql<ScheduleRow>`SELECT * FROM schedules WHERE paused = 0 AND next_fire_at <= ${now} ORDER BY next_fire_at LIMIT ${PASS_LIMIT}`;
    for (const row of due) {
      const spec = ScheduleSpec.parse(JSON.parse(row.spec));
      const plan = planFire(spec, row.next_fire_at!, now, this.#tuning.scheduleGraceMs);
      if (plan.fire) {
        const request = JSON.stringify(fireRequest(spec, row.created_at, plan.fire.at));
        const passedOver = plan.missed ? `${plan.missed} earlier fire time(s) passed over` : null;
        const state: FireState = plan.fire.run ? "pending" : "skipped";
        const reason = plan.fire.run ? null : "missed";
        const message = plan.fire.run ? passedOver : `${now - plan.fire.at} ms late (missed_fires: skip)${passedOver ? `; ${passedOver}` : ""}`;
        // OR IGNORE: a fire time already recorded (the alarm ran again) is not recorded twice.
        this.#sql`INSERT OR IGNORE INTO fires (schedule_id, fire_at, state, request, execution_id, reason, message, attempts, next_try_at)
          VALUES (${row.schedule_id}, ${plan.fire.at}, ${state}, ${request}, NULL, ${reason}, ${message}, 0, ${plan.fire.run ? now : null})`;
        this.#pruneFires(row.schedule_id);
        if (!plan.fire.run) this.#fireMetric({ schedule_id: row.schedule_id, request }, "skipped", "missed");
        log("info", "schedule_fire_recorded", { schedule_id: row.schedule_id, fire_at: plan.fire.at, state, missed: plan.missed });
      }
      this.#sql`UPDATE schedules SET next_fire_at = ${plan.next} WHERE schedule_id = ${row.schedule_id}`;
    }
  }

  #pruneFires(scheduleId: string): void {
    const kept = this.#tuning.scheduleRunsKept;
    this.#sql`DELETE FROM fires WHERE schedule_id = ${scheduleId} AND state != 'pending' AND fire_at NOT IN
      (SELECT fire_at FROM fires WHERE schedule_id = ${scheduleId} ORDER BY fire_at DESC LIMIT ${kept})`;
  }

  /** The outcome of an attempt, applied only if the fire is still the pending one that attempt claimed. */
  #settle(fire: FireRow, attempt: number, outcome: Attempt, now: number): void {
    const current = this.#sql<FireRow>`SELECT * FROM fires WHERE schedule_id = ${fire.schedule_id} AND fire_at = ${fire.fire_at}`[0];
    if (current?.state !== "pending" || current.attempts !== attempt) return;
    if (outcome.state === "retry") {
      if (fireExpired(fire.fire_at, now, this.#tuning.scheduleFireDeadlineMs)) {
        outcome = { state: "failed", reason: "fire_deadline", message: `not started within ${this.#tuning.scheduleFireDeadlineMs} ms: ${outcome.message}` };
      } else {
        const at = now + fireRetryDelay(attempt, this.#tuning.retryBaseMs, this.#tuning.retryCapMs);
        this.#sql`UPDATE fires SET next_try_at = ${at}, reason = ${outcome.reason}, message = ${outcome.message}
          WHERE schedule_id = ${fire.schedule_id} AND fire_at = ${fire.fire_at}`;
        log("warn", "schedule_fire_retry", { schedule_id: fire.schedule_id, fire_at: fire.fire_at, attempt, code: outcome.reason });
        return;
      }
    }
    const executionId = outcome.state === "started" ? outcome.executionId : null;
    const reason = outcome.state === "started" ? null : outcome.reason;
    this.#sql`UPDATE fires SET state = ${outcome.state}, execution_id = ${executionId}, reason = ${reason},
      message = ${outcome.message ?? current.message}, next_try_at = NULL WHERE schedule_id = ${fire.schedule_id} AND fire_at = ${fire.fire_at}`;
    this.#fireMetric(fire, outcome.state, reason);
    log(outcome.state === "failed" ? "warn" : "info", "schedule_fire", {
      schedule_id: fire.schedule_id,
      fire_at: fire.fire_at,
      state: outcome.state,
      execution_id: executionId,
      code: reason,
    });
  }

  #fireMetric(fire: Pick<FireRow, "schedule_id" | "request">, state: FireState, code: string | null): void {
    const r = JSON.parse(fire.request) as { template_name: string; client_id: string };
    emit(this.env, { event: "schedule_fire", schedule_id: fire.schedule_id, template_name: r.template_name, client_id: r.client_id, outcome: state, code });
  }

  /** The alarm: the earliest next fire time of an active schedule or retry of a pending fire. */
  #arm(): void {
    const a = this.#sql<{ t: number | null }>`SELECT MIN(next_fire_at) AS t FROM schedules WHERE paused = 0`[0]?.t ?? null;
    const b = this.#sql<{ t: number | null }>`SELECT MIN(next_try_at) AS t FROM fires WHERE state = 'pending'`[0]?.t ?? null;
    const at = a === null ? b : b === null ? a : Math.min(a, b);
    const done = at === null ? this.ctx.storage.deleteAlarm() : this.ctx.storage.setAlarm(at);
    done.catch((err) => log("error", "schedule_alarm_not_set", { error: String(err) }));
  }

  // ---- step 2: starting fires (outbound I/O between transitions) ----------

  async #startPendingFires(now: number): Promise<void> {
    const pending = this.#sql<FireRow>`SELECT * FROM fires WHERE state = 'pending' AND next_try_at <= ${now} ORDER BY fire_at LIMIT ${PASS_LIMIT}`;
    // Claimed for longer than the calls below may take, so a pass cut short by an eviction is retried by the alarm.
    const claimMs = 5 * this.#tuning.objectCallTimeoutMs;
    for (const fire of pending) {
      const attempt = fire.attempts + 1;
      this.#sql`UPDATE fires SET attempts = ${attempt}, next_try_at = ${now + claimMs} WHERE schedule_id = ${fire.schedule_id} AND fire_at = ${fire.fire_at}`;
      const outcome = await this.#attempt(fire);
      this.#settle(fire, attempt, outcome, Date.now());
    }
  }

  /** Never throws: every failure is an outcome with a code. */
  async #attempt(fire: FireRow): Promise<Attempt> {
    try {
      const row = this.#row(fire.schedule_id);
      if (!row) return { state: "failed", reason: "schedule_deleted", message: "the schedule was deleted" };
      const spec = ScheduleSpec.parse(JSON.parse(row.spec));
      let note: string | null = fire.message;
      const previous = this.#sql<{ execution_id: string }>`SELECT execution_id FROM fires
        WHERE schedule_id = ${fire.schedule_id} AND state = 'started' AND fire_at < ${fire.fire_at} ORDER BY fire_at DESC LIMIT 1`[0];
      if (previous && spec.overlap !== "allow") {
        const status = await this.#statusOf(previous.execution_id);
        const action = overlapAction(spec.overlap, status !== null);
        if (action === "skip") return { state: "skipped", reason: "overlap", message: `the previous run ${previous.execution_id} is still ${status}` };
        if (action === "cancel_then_start") {
          await this.#cancel(previous.execution_id);
          note = `cancelled the previous run ${previous.execution_id}`;
        }
      }
      const out = await startExecution(this.env, JSON.parse(fire.request), configOf(this.env).publicUrl);
      return { state: "started", executionId: out.body.execution_id, message: note };
    } catch (err) {
      if (err instanceof ApiError) {
        const transient = err.status >= 500 || err.status === 408 || err.status === 429;
        return { state: transient ? "retry" : "failed", reason: err.code, message: err.message };
      }
      return { state: "retry", reason: "internal_error", message: err instanceof Error ? err.message : String(err) };
    }
  }

  /** The status of a previous run while it is not terminal; null once it ended (or is gone). */
  async #statusOf(executionId: string): Promise<string | null> {
    try {
      const doc = await getStatus(this.env, executionId);
      return TERMINAL_STATUSES.includes(doc.status) ? null : doc.status;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return null;
      throw err;
    }
  }

  async #cancel(executionId: string): Promise<void> {
    try {
      await cancelExecution(this.env, executionId);
    } catch (err) {
      // It ended (or went) between the status read and the cancel: nothing left to cancel.
      if (err instanceof ApiError && (err.code === "already_terminal" || err.status === 404)) return;
      throw err;
    }
  }

  // ---- reads --------------------------------------------------------------

  #row(scheduleId: string): ScheduleRow | undefined {
    return this.#sql<ScheduleRow>`SELECT * FROM schedules WHERE schedule_id = ${scheduleId}`[0];
  }

  #document(row: ScheduleRow, now: number): ScheduleDocument {
    const spec = ScheduleSpec.parse(JSON.parse(row.spec));
    const fires = this.#sql<FireRow>`SELECT * FROM fires WHERE schedule_id = ${row.schedule_id} ORDER BY fire_at DESC LIMIT ${LAST_RUNS_SHOWN}`;
    const iso = (ms: number) => new Date(ms).toISOString();
    const nextRuns = spec.paused ? [] : nextFireTimes(spec, now, NEXT_RUNS_SHOWN);
    // A fire time already due but not yet recorded (the alarm is about to run) is still a next run.
    if (row.next_fire_at !== null && row.next_fire_at <= now && !spec.paused) nextRuns.unshift(row.next_fire_at);
    return {
      ...spec,
      created_at: iso(row.created_at),
      updated_at: iso(row.updated_at),
      next_runs: nextRuns.slice(0, NEXT_RUNS_SHOWN).map(iso),
      last_runs: fires.map(
        (f): ScheduleRun => ({
          fire_at: iso(f.fire_at),
          state: f.state,
          request_id: (JSON.parse(f.request) as { request_id: string }).request_id,
          execution_id: f.execution_id,
          reason: f.reason,
          message: f.message,
          attempts: f.attempts,
        }),
      ),
    };
  }
}
