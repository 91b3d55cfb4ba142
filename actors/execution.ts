import { DurableObject } from "cloudflare:workers";
import type { ExecutionStatus, StageDocument, StageStatus, StatusDocument } from "../schemas/api";
import type { ErrorInfo, Priority } from "../schemas/common";
import type { DataReference } from "../schemas/data";
import type { GrantNotice, ReserveResult } from "../schemas/ledger";
import type { IndexEntry } from "../schemas/index-entry";
import type { MasterTemplate } from "../schemas/template";
import type { CompleteCallback, FailCallback, ProgressCallback, ProgressResponse } from "../schemas/worker-protocol";
import { issueCallbackToken } from "../src/auth";
import { type Config, configOf } from "../src/config";
import { addUsage, costOf } from "../src/cost";
import { DATA_LIMITS, deleteExecutionData, putBytes, verifyStored } from "../src/data-store";
import { estimateTotalMs } from "../src/estimates";
import { sha256Hex } from "../src/hash";
import { stageIdFor } from "../src/ids";
import { ledgerFor } from "../src/ledger-routing";
import { log, setLogLevel } from "../src/log";
import { withTimeout } from "../src/outbound";
import { indexFor } from "../src/index-routing";
import { loadTemplate } from "../src/template-source";
import { WorkerClient } from "../src/worker-client";
import { type Sql, sqlOf } from "./sql";
import {
  type StageFailure,
  canMoveExecution,
  canMoveStage,
  isOnWorker,
  isTerminalExecution,
  isTerminalStage,
  mergeProgress,
  nextPollInterval,
  retryDelayMs,
  shouldRetry,
} from "./stage-machine";

/**
 * One execution of a pipeline. It owns its stage state machine, persists
 * everything in its own SQLite, and moves forward on three kinds of events:
 * RPC calls (start, callbacks, grant notices, cancel), and its alarm, which
 * multiplexes every timer in the `timers` table (next poll, stage deadline,
 * lease renewal, ledger re-ask, retry backoff, outbox redelivery).
 *
 * Concurrency rules:
 * - every state transition is a run of synchronous `sql` calls with no
 *   `await` inside, so the input gate makes it atomic;
 * - outbound I/O (ledger, worker) happens between transitions, and after each
 *   await the stage is re-read and the answer applied only if the stage is
 *   still in the state (and attempt) that made the call;
 * - `drive()` passes are serialised through one promise chain, so a callback,
 *   a grant notice and the alarm never run two passes at once;
 * - side effects on other systems that must not be lost (ledger settle and
 *   release, worker cancel) are written to an outbox in the same transition
 *   and delivered at least once; the ledger's methods are idempotent.
 */

interface ExecutionRow {
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
  template_source: "kam" | "cache" | null;
  template_attempts: number;
  error: string | null;
  cost: string | null;
  output: string | null;
  output_ref: string | null;
  alarm_failures: number;
  data_expired_at: number | null;
  index_version: number;
}

interface StageRow {
  stage_id: string;
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
}

/** A stage's output as stored: small JSON inline in the row, anything larger as a data reference. */
type StoredOutput = { inline: string; ref: null } | { inline: null; ref: DataReference };

export interface StartInput {
  execution_id: string;
  template_name: string;
  parameters: Record<string, unknown>;
  client_id: string;
  request_id: string | null;
  request_hash: string | null;
  priority: Priority;
}

export interface StartResult {
  created: boolean;
  status: ExecutionStatus;
  estimated_completion_ms: number;
  estimated_completion_at: string;
  request_hash: string | null;
}

export type ResultState =
  | { state: "missing" }
  | { state: "not_completed"; status: ExecutionStatus }
  | { state: "expired"; at: number }
  | { state: "completed"; output: unknown; outputRef: DataReference | null; cost: StatusDocument["cost"] };
export type CancelState =
  | { state: "missing" }
  | { state: "already_terminal"; status: StatusDocument }
  | { state: "cancelled"; status: StatusDocument };

export type CallbackKind = "progress" | "complete" | "fail";
export interface CallbackAnswer {
  status: 200 | 404 | 409;
  body: { ok: true; stage_status: StageStatus; duplicate?: boolean } | { error: { code: string; message: string } };
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS execution (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  execution_id TEXT NOT NULL, template_name TEXT NOT NULL, client_id TEXT NOT NULL,
  request_id TEXT, request_hash TEXT, priority TEXT NOT NULL, parameters TEXT NOT NULL,
  status TEXT NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER, completed_at INTEGER,
  estimated_completion_at INTEGER, template_id TEXT, template_source TEXT,
  template_attempts INTEGER NOT NULL DEFAULT 0, error TEXT, cost TEXT, output TEXT, output_ref TEXT,
  alarm_failures INTEGER NOT NULL DEFAULT 0, data_expired_at INTEGER, index_version INTEGER NOT NULL DEFAULT 0
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
  usage TEXT, output TEXT, output_ref TEXT, complete_hash TEXT
);
CREATE TABLE IF NOT EXISTS reservations (
  reservation_id TEXT PRIMARY KEY, stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS data_objects (
  key TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
  content_type TEXT NOT NULL, stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS timers (name TEXT PRIMARY KEY, due_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL
);
`;

/** Timer names: one row each in `timers`, one alarm for the earliest. */
type TimerName = "advance" | "poll" | "deadline" | "lease" | "reask" | "retry" | "outbox" | "watchdog" | "retention";

type OutboxItem =
  | { kind: "ledger_settle"; reservationId: string; usage: Record<string, number>; durationMs: number }
  | { kind: "ledger_release"; reservationId: string }
  | { kind: "worker_cancel"; worker: string; stageId: string; attempt: number }
  | { kind: "index_upsert"; entry: IndexEntry };

const ISO = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
const parse = <T>(text: string | null): T | null => (text === null ? null : (JSON.parse(text) as T));

/** While an execution is live, its alarm is never further away than this, so an eviction mid-call heals. */
const WATCHDOG_MS = 30_000;
/** Outbox messages that keep failing are dropped after this many tries (ledger leases expire on their own). */
const OUTBOX_MAX_ATTEMPTS = 30;

export class Execution extends DurableObject<Env> {
  private readonly sql: Sql;
  private readonly config: Config;
  /** The alarm as this instance knows it (null: none; undefined: unknown), read at start and kept in step. */
  private armedAt: number | null | undefined = undefined;
  /** Outbox rows this instance is delivering now (a flush does not claim them again). */
  private readonly inFlight = new Set<number>();
  /**
   * Outbox rows delivered whose DELETE waits for the next write of a live
   * execution, so a delivery costs no commit of its own. Lost with an eviction,
   * the rows are delivered again when their claim runs out: every delivery is
   * idempotent (ledger settle and release, versioned index updates, cancels).
   */
  private delivered: number[] = [];
  /**
   * A completed stage's settle, written to the outbox but held back so that it
   * rides on the next stage's reserve (one ledger round trip instead of two).
   * Whatever is still held when a drive pass ends is sent on its own.
   */
  private held: { id: number; item: Extract<OutboxItem, { kind: "ledger_settle" }> } | null = null;
  /** Serialises drive() passes: the tail of the chain and a queued-but-not-started pass to share. */
  private tail: Promise<void> = Promise.resolve();
  private queued: Promise<void> | null = null;
  /** Our own id, read from storage once (never from ctx.id.name). */
  private executionId: string | undefined;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = sqlOf(ctx.storage);
    this.config = configOf(env);
    setLogLevel((env as unknown as { LOG_LEVEL?: string }).LOG_LEVEL);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(SCHEMA);
      this.armedAt = await ctx.storage.getAlarm();
    });
  }

  // ---------------------------------------------------------------- RPC ----

  /** Creates the execution (idempotent: a second call returns the first one's summary). */
  async start(input: StartInput): Promise<StartResult> {
    const existing = this.row();
    if (existing) return this.startSummary(existing, false);

    const now = Date.now();
    this.sql`INSERT INTO execution (id, execution_id, template_name, client_id, request_id, request_hash, priority, parameters, status, created_at)
      VALUES (1, ${input.execution_id}, ${input.template_name}, ${input.client_id}, ${input.request_id}, ${input.request_hash},
              ${input.priority}, ${JSON.stringify(input.parameters)}, 'queued', ${now})`;
    this.setTimer("watchdog", now + WATCHDOG_MS);
    this.indexUpdate(now);
    this.log("info", "execution_created", { template_name: input.template_name, client_id: input.client_id, priority: input.priority });

    // Load the template now (cache first, KAM bounded by its timeout) so the
    // estimate can count the stages; a transient failure is retried by the alarm.
    await this.loadTemplateStep();
    // The first stage starts now; the estimate for the answer is asked for meanwhile.
    this.kick();
    await this.estimateCompletion();
    await this.rearm();
    return this.startSummary(this.row()!, true);
  }

  async getStatus(): Promise<StatusDocument | null> {
    const ex = this.row();
    if (!ex) return null;
    await this.healAlarm(ex);
    return this.document(ex);
  }

  async getResult(): Promise<ResultState> {
    const ex = this.row();
    if (!ex) return { state: "missing" };
    if (ex.status !== "completed") return { state: "not_completed", status: ex.status };
    if (ex.data_expired_at !== null) return { state: "expired", at: ex.data_expired_at };
    return { state: "completed", output: parse(ex.output), outputRef: parse<DataReference>(ex.output_ref), cost: parse(ex.cost) };
  }

  /** Stops the execution at any state; tells a running stage's worker, releases every reservation. */
  async cancel(): Promise<CancelState> {
    const ex = this.row();
    if (!ex) return { state: "missing" };
    if (isTerminalExecution(ex.status)) return { state: "already_terminal", status: this.document(ex) };
    const now = Date.now();
    this.stopStages("cancelled", now, { code: "cancelled", message: "the execution was cancelled" });
    this.finishExecution("cancelled", now, { code: "cancelled", message: "cancelled by request" });
    this.kick();
    await this.rearm();
    return { state: "cancelled", status: this.document(this.row()!) };
  }

  /** A stage worker's callback, already authenticated by its token (execution, stage, attempt). */
  async callback(kind: CallbackKind, stageId: string, attempt: number, body: ProgressCallback | CompleteCallback | FailCallback): Promise<CallbackAnswer> {
    const hash = kind === "complete" ? await sha256Hex(JSON.stringify(body)) : null;
    const early = this.refuseCallback(kind, stageId, attempt, hash);
    if (early) return early;
    // A large inline output is stored (KV or R2) before the transition; then the
    // checks run again, since the stage may have moved during the await.
    let stored: StoredOutput | StageFailure | null = null;
    if (kind === "complete") {
      const c = body as CompleteCallback;
      stored = await this.storeOutput(stageId, attempt, c.output, c.dataReference);
      const again = this.refuseCallback(kind, stageId, attempt, hash);
      if (again) return again;
    }
    // From here to the end: synchronous, so the checks and the transition are one atomic step.
    const st = this.stage(stageId)!;
    const now = Date.now();
    this.log("info", "callback", { stage_id: stageId, attempt, kind });
    if (kind === "progress") {
      const p = body as ProgressCallback;
      const progress = mergeProgress(st.progress, p.progress);
      this.sql`UPDATE stages SET progress = ${progress}, message = ${p.message ?? st.message} WHERE stage_id = ${stageId}`;
      return { status: 200, body: { ok: true, stage_status: st.status } };
    }
    if (kind === "complete") {
      const c = body as CompleteCallback;
      if (stored && "code" in stored) this.failAttempt(st, stored, now, c.usage);
      else this.completeStage(st, stored!, c.usage, now, hash);
    } else {
      const f = body as FailCallback;
      this.failAttempt(st, { code: f.error.code, message: f.error.message, retryable: f.retryable ?? false }, now, f.usage);
    }
    this.kick();
    await this.rearm();
    return { status: 200, body: { ok: true, stage_status: this.stage(stageId)!.status } };
  }

  /** Why a callback cannot act now (404/409), or null when it may. Synchronous. */
  private refuseCallback(kind: CallbackKind, stageId: string, attempt: number, hash: string | null): CallbackAnswer | null {
    const ex = this.row();
    const st = ex ? this.stage(stageId) : null;
    if (!ex || !st) return { status: 404, body: { error: { code: "not_found", message: "no such execution or stage" } } };
    const conflict = (code: string, message: string): CallbackAnswer => ({ status: 409, body: { error: { code, message } } });
    if (ex.status === "cancelled" || st.status === "cancelled") return conflict("execution_cancelled", "the execution was cancelled");
    if (attempt !== st.attempt) return conflict("stale_attempt", `this token is for attempt ${attempt}; the stage is on attempt ${st.attempt}`);
    if (st.status === "completed") {
      if (kind === "complete" && hash === st.complete_hash) return { status: 200, body: { ok: true, stage_status: st.status, duplicate: true } };
      return conflict("stage_ended", "the stage has already completed");
    }
    if (!isOnWorker(st.status)) return conflict("stage_ended", `the stage is ${st.status}`);
    return null;
  }

  /** Records a worker's upload (streamed to R2 by the front Worker) so a later `complete` may name it. */
  async registerUpload(stageId: string, attempt: number, ref: DataReference): Promise<{ ok: true } | { ok: false; code: string; message: string }> {
    const st = this.stage(stageId);
    if (!st || st.attempt !== attempt || !isOnWorker(st.status)) {
      return { ok: false, code: "stage_ended", message: "the stage is not running this attempt" };
    }
    this.recordObject(ref, stageId, attempt, Date.now());
    return { ok: true };
  }

  /** The checksum and size we recorded for a stored object, for reads through `GET /data/...`. */
  async dataRef(key: string): Promise<DataReference | null> {
    const ex = this.row();
    if (!ex || ex.data_expired_at !== null) return null;
    const r = this.sql<{ kind: "kv" | "r2"; size: number; sha256: string; content_type: string }>`
      SELECT kind, size, sha256, content_type FROM data_objects WHERE key = ${key}`[0];
    return r ? { kind: r.kind, key, size: r.size, sha256: r.sha256, contentType: r.content_type } : null;
  }

  /** Every reservation this execution was given, for operators and leak checks. */
  async reservationIds(): Promise<{ reservation_id: string; stage_id: string; attempt: number }[]> {
    return this.sql<{ reservation_id: string; stage_id: string; attempt: number }>`
      SELECT reservation_id, stage_id, attempt FROM reservations ORDER BY created_at`;
  }

  /** The ledger granted a waiting reservation. A notice for a stage that moved on is handed back. */
  async onGrant(notice: GrantNotice): Promise<void> {
    const st = this.stage(notice.stageId);
    const now = Date.now();
    if (st && st.status === "waiting_resources" && st.attempt === notice.attempt && st.reservation_id === notice.reservationId) {
      this.granted(st, notice.expiresAt, notice.requirements, now);
      this.kick();
    } else if (!st || st.reservation_id !== notice.reservationId || isTerminalStage(st.status)) {
      this.enqueue({ kind: "ledger_release", reservationId: notice.reservationId }, now);
      this.kick();
    }
    await this.rearm();
  }

  /** One alarm for every timer. Safe to fire twice: each handler re-checks state. */
  override async alarm(info?: AlarmInvocationInfo): Promise<void> {
    // The alarm that fired is spent: the next rearm() sets one whatever it was.
    this.armedAt = null;
    try {
      await this.schedule();
      if (this.row()?.alarm_failures) this.sql`UPDATE execution SET alarm_failures = 0`;
    } catch (err) {
      // Rethrow so the platform retries the alarm, until it has failed too often in a row.
      if (this.recordFailure(err, info?.retryCount ?? 0)) throw err;
    } finally {
      await this.rearm();
    }
  }

  // ------------------------------------------------------------- driving ----

  /** Starts a drive pass in the background (coalesced with one already queued). */
  private kick(): void {
    this.schedule()
      .catch((err) => this.recordFailure(err, 0))
      .finally(() => this.rearm().catch(() => {}));
  }

  private schedule(): Promise<void> {
    if (this.queued) return this.queued;
    const run = this.tail.then(() => {
      this.queued = null;
      return this.drive();
    });
    this.queued = run;
    this.tail = run.catch(() => {});
    return run;
  }

  /** Records a failed pass; returns true while the platform should keep retrying. */
  private recordFailure(err: unknown, retryCount: number): boolean {
    const ex = this.row();
    if (!ex || isTerminalExecution(ex.status)) return false;
    const failures = ex.alarm_failures + 1;
    const message = err instanceof Error ? err.message : String(err);
    this.sql`UPDATE execution SET alarm_failures = ${failures}`;
    this.log("error", "drive_failed", { failures, error: message });
    if (failures >= this.config.tuning.maxAlarmFailures || retryCount >= this.config.tuning.maxAlarmFailures) {
      const now = Date.now();
      this.stopStages("failed", now, { code: "internal_error", message });
      this.finishExecution("failed", now, { code: "internal_error", message: `gave up after ${failures} failed attempts to advance: ${message}` });
      return false;
    }
    this.setTimer("advance", Date.now() + retryDelayMs(failures, this.config.tuning.retryBaseMs, this.config.tuning.retryCapMs));
    return true;
  }

  /** Moves the execution as far as it can go now; returns when it must wait for an event or a timer. */
  private async drive(): Promise<void> {
    try {
      await this.drivePass();
    } finally {
      this.sendHeld();
    }
  }

  private async drivePass(): Promise<void> {
    // Both only exist to wake the object; this pass is the wake-up.
    this.sql`DELETE FROM timers WHERE name IN ('advance', 'watchdog') AND due_at <= ${Date.now()}`;
    // New outbox messages go out as they are written (enqueue); this picks up redeliveries that are due.
    this.flushOutbox();
    for (let guard = 0; guard < 100; guard++) {
      const ex = this.row();
      if (!ex) return;
      if (isTerminalExecution(ex.status)) {
        if (this.takeTimer("retention")) await this.expireData();
        return;
      }
      if (!ex.template_id) {
        if (!(await this.loadTemplateStep())) return;
        continue;
      }
      const st = this.stages().find((s) => s.status !== "completed");
      if (!st) {
        this.completeExecution(Date.now());
        continue;
      }
      if (!(await this.stepStage(st))) return;
    }
  }

  /** One step of the current stage. Returns true when it changed something and the loop should go on. */
  private async stepStage(st: StageRow): Promise<boolean> {
    const now = Date.now();
    switch (st.status) {
      case "pending": {
        if (st.attempt > 0 && !this.takeTimer("retry")) return false;
        this.beginAttempt(st, now);
        return true;
      }
      case "waiting_resources":
        return this.askLedger(st);
      case "handshaking":
        return this.handshake(st);
      case "processing": {
        if (st.deadline_at !== null && now >= st.deadline_at) {
          this.takeTimer("deadline");
          this.failAttempt(st, { code: "stage_timeout", message: `no result within ${st.timeout_ms} ms`, retryable: true }, now);
          return true;
        }
        // The renewal goes out beside the poll: a slow ledger must not hold up the stage's progress.
        if (this.takeTimer("lease")) void this.renewLease(st);
        if (this.takeTimer("poll")) return this.poll(st);
        return false;
      }
      default:
        return false;
    }
  }

  private async askLedger(st: StageRow): Promise<boolean> {
    if (st.reservation === "waiting" && !this.takeTimer("reask")) return false;
    if (st.reservation === "requested" && this.hasTimer("reask") && !this.takeTimer("reask")) return false;
    const ex = this.row()!;
    const ledger = ledgerFor(this.env);
    const t = this.config.tuning;
    const request = {
      executionId: ex.execution_id,
      stageId: st.stage_id,
      attempt: st.attempt,
      priority: ex.priority,
      requirements: parse<Record<string, number>>(st.resources) ?? undefined,
      leaseMs: t.leaseMs,
      worker: st.worker,
    };
    // The previous stage's settle, if still held, goes in the same call.
    const ride = this.held;
    this.held = null;
    if (ride) this.inFlight.add(ride.id);
    let result: ReserveResult;
    try {
      if (ride) {
        const { reservationId, usage, durationMs } = ride.item;
        const both = await withTimeout(ledger.settleAndReserve({ reservationId, usage, durationMs }, request), t.ledgerCallTimeoutMs, "ledger.settleAndReserve");
        this.settled(ride, both.settled);
        result = both.reserved;
      } else {
        result = await withTimeout<ReserveResult>(ledger.reserve(request), t.ledgerCallTimeoutMs, "ledger.reserve");
      }
    } catch (err) {
      // Whether the settle got through is unknown: it goes again on its own (settles are idempotent).
      if (ride) this.settled(ride, null);
      const cur = this.stage(st.stage_id)!;
      if (String(err).includes("reservation_ended") && cur.status === "waiting_resources" && cur.attempt === st.attempt) {
        // The grant was made and expired before this attempt could use it (its notice was lost for a whole
        // lease): this attempt cannot get it back, so it fails as transient and the next one asks anew.
        this.failAttempt(cur, { code: "lease_expired", message: "the reservation expired before the stage started", retryable: true }, Date.now());
        return true;
      }
      // The ledger is slow or down: keep waiting, ask again later.
      this.log("warn", "ledger_reserve_failed", { stage_id: st.stage_id, attempt: st.attempt, error: String(err) });
      this.setTimer("reask", Date.now() + t.ledgerReaskMs);
      return false;
    }
    const now = Date.now();
    const cur = this.stage(st.stage_id)!;
    if (cur.status !== "waiting_resources" || cur.attempt !== st.attempt) {
      // Moved on meanwhile (cancelled, or a grant notice overtook this answer).
      if (cur.reservation_id !== result.reservationId || isTerminalStage(cur.status)) {
        this.enqueue({ kind: "ledger_release", reservationId: result.reservationId }, now);
      }
      return true;
    }
    this.sql`UPDATE stages SET reservation_id = ${result.reservationId} WHERE stage_id = ${st.stage_id}`;
    this.sql`INSERT OR IGNORE INTO reservations (reservation_id, stage_id, attempt, created_at) VALUES (${result.reservationId}, ${st.stage_id}, ${st.attempt}, ${now})`;
    if (result.status === "granted") {
      this.granted(cur, result.expiresAt, result.requirements, now);
      return true;
    }
    if (result.status === "waiting") {
      this.sql`UPDATE stages SET reservation = 'waiting', message = ${`waiting for resources (position ${result.position})`} WHERE stage_id = ${st.stage_id}`;
      this.setTimer("reask", now + t.ledgerReaskMs);
      return false;
    }
    this.failAttempt(this.stage(st.stage_id)!, { code: result.code, message: result.message, retryable: false }, now);
    return true;
  }

  private async handshake(st: StageRow): Promise<boolean> {
    const ex = this.row()!;
    const now = Date.now();
    const client = WorkerClient.for(this.env, st.worker);
    if (!client) {
      this.failAttempt(st, { code: "worker_not_bound", message: `no service binding serves worker ${st.worker} (see WORKER_BINDINGS)`, retryable: false }, now);
      return true;
    }
    const prev = this.stages().find((s) => s.ord === st.ord - 1) ?? null;
    const prevRef = prev ? parse<DataReference>(prev.output_ref) : null;
    if (prevRef) {
      // A large input is handed over by reference; check it is whole before a worker spends time on it.
      const check = await verifyStored(this.env, prevRef);
      if (!this.stillAt(st, "handshaking")) return true;
      if (!check.ok) {
        this.failAttempt(st, { code: "data_corrupt", message: `input of ${st.stage_id}: ${check.reason}`, retryable: false }, Date.now());
        return true;
      }
    }
    const requirements = parse<Record<string, number>>(st.requirements) ?? {};
    const estimatedTokens = Object.entries(requirements)
      .filter(([pool]) => pool.startsWith("tokens:"))
      .reduce((sum, [, v]) => sum + v, 0);
    const token = await issueCallbackToken(this.env.WORKER_SECRET, { executionId: ex.execution_id, stageId: st.stage_id, attempt: st.attempt });
    const hs = await client.handshake({
      executionId: ex.execution_id,
      stageId: st.stage_id,
      attempt: st.attempt,
      action: st.action,
      inputData: {
        parameters: JSON.parse(ex.parameters),
        template_ref: st.template_ref,
        // By reference, previousOutput is a small summary and dataReference says where the bytes are.
        previousOutput: prevRef ? { $ref: prevRef.key, size: prevRef.size, contentType: prevRef.contentType } : prev ? parse(prev.output) : null,
      },
      dataReference: prevRef ?? undefined,
      resourceRequirements: { estimatedTokens, timeoutMs: st.timeout_ms, pools: requirements },
      validationConfig: {},
      callback: { url: `${this.config.publicUrl}/executions/${ex.execution_id}/stages/${st.stage_id}`, token },
    });
    this.logCall("worker_handshake", st, hs.ms, hs.ok ? (hs.value.accepted ? "accepted" : "refused") : hs.error.code);
    if (!this.stillAt(st, "handshaking")) return true;
    if (!hs.ok) {
      this.failAttempt(st, hs.error, Date.now());
      return true;
    }
    if (!hs.value.accepted) {
      const reason = hs.value.reason ?? "no reason given";
      this.failAttempt(st, { code: "handshake_refused", message: `worker refused the stage: ${reason}`, retryable: hs.value.retryable ?? false }, Date.now());
      return true;
    }
    const pr = await client.process({ executionId: ex.execution_id, stageId: st.stage_id, attempt: st.attempt });
    this.logCall("worker_process", st, pr.ms, pr.ok ? "ok" : pr.error.code);
    // A fast worker may have called back `complete` before process() answered: then we are done here.
    if (!this.stillAt(st, "handshaking")) return true;
    const at = Date.now();
    if (!pr.ok) {
      this.failAttempt(st, pr.error, at);
      return true;
    }
    const poll = nextPollInterval(null, this.config.tuning.pollInitialMs, this.config.tuning.pollMaxMs);
    this.moveStage(st, "processing", at, {});
    this.sql`UPDATE stages SET processing_since = ${at}, deadline_at = ${at + st.timeout_ms}, poll_interval_ms = ${poll}, poll_failures = 0
      WHERE stage_id = ${st.stage_id}`;
    this.setTimer("deadline", at + st.timeout_ms);
    this.setTimer("poll", at + poll);
    return true;
  }

  private async poll(st: StageRow): Promise<boolean> {
    const ex = this.row()!;
    const client = WorkerClient.for(this.env, st.worker);
    if (!client) {
      this.failAttempt(st, { code: "worker_not_bound", message: `no service binding serves worker ${st.worker}`, retryable: false }, Date.now());
      return true;
    }
    this.sql`UPDATE stages SET polls = polls + 1 WHERE stage_id = ${st.stage_id}`;
    const res = await client.progress(ex.execution_id, st.stage_id);
    this.logCall("worker_progress", st, res.ms, res.ok ? res.value.status : res.error.code);
    if (!this.stillAt(st, "processing")) return true;
    const now = Date.now();
    const cur = this.stage(st.stage_id)!;
    if (!res.ok) {
      const failures = cur.poll_failures + 1;
      if (failures >= this.config.tuning.maxPollFailures || !res.error.retryable) {
        this.failAttempt(cur, { ...res.error, message: `progress polls failing (${failures} in a row): ${res.error.message}`, retryable: true }, now);
        return true;
      }
      const interval = nextPollInterval(cur.poll_interval_ms, this.config.tuning.pollInitialMs, this.config.tuning.pollMaxMs);
      this.sql`UPDATE stages SET poll_failures = ${failures}, poll_interval_ms = ${interval} WHERE stage_id = ${st.stage_id}`;
      this.setTimer("poll", now + interval);
      return false;
    }
    return await this.applyProgress(cur, res.value, now);
  }

  private async applyProgress(st: StageRow, p: ProgressResponse, now: number): Promise<boolean> {
    if (p.status === "completed") {
      const stored = await this.storeOutput(st.stage_id, st.attempt, p.output, p.dataReference);
      if (!this.stillAt(st, "processing")) return true;
      const cur = this.stage(st.stage_id)!;
      if ("code" in stored) this.failAttempt(cur, stored, Date.now(), p.usage);
      else this.completeStage(cur, stored, p.usage, Date.now(), null);
      return true;
    }
    if (p.status === "failed") {
      const e = p.error ?? { code: "worker_failed", message: "the worker reported a failure without details" };
      this.failAttempt(st, { code: e.code, message: e.message, retryable: p.retryable ?? false }, now, p.usage);
      return true;
    }
    const interval = nextPollInterval(st.poll_interval_ms, this.config.tuning.pollInitialMs, this.config.tuning.pollMaxMs);
    this.sql`UPDATE stages SET progress = ${mergeProgress(st.progress, p.progress)}, message = ${p.message ?? st.message},
      poll_failures = 0, poll_interval_ms = ${interval} WHERE stage_id = ${st.stage_id}`;
    this.setTimer("poll", now + interval);
    return false;
  }

  /** Polls are the lease heartbeat; the `lease` timer covers stages that report only by callback. */
  private async renewLease(st: StageRow): Promise<void> {
    if (!st.reservation_id) return;
    const t = this.config.tuning;
    try {
      const r = await withTimeout(ledgerFor(this.env).renew(st.reservation_id, t.leaseMs), t.ledgerCallTimeoutMs, "ledger.renew");
      if (!this.stillAt(st, st.status)) return;
      if (r.ok && r.expiresAt) {
        this.sql`UPDATE stages SET lease_expires_at = ${r.expiresAt} WHERE stage_id = ${st.stage_id}`;
        this.setTimer("lease", r.expiresAt - Math.floor(t.leaseMs / 2));
      } else {
        this.log("warn", "lease_lost", { stage_id: st.stage_id, attempt: st.attempt, state: r.state });
      }
    } catch (err) {
      this.log("warn", "lease_renew_failed", { stage_id: st.stage_id, error: String(err) });
      this.setTimer("lease", Date.now() + t.ledgerReaskMs);
    }
    await this.rearm().catch(() => {});
  }

  private async loadTemplateStep(): Promise<boolean> {
    const ex = this.row()!;
    if (ex.template_id || isTerminalExecution(ex.status)) return true;
    const t = this.config.tuning;
    const res = await loadTemplate(this.env, ex.template_name);
    const now = Date.now();
    const cur = this.row()!;
    if (cur.template_id || isTerminalExecution(cur.status)) return true;
    const attempts = cur.template_attempts + 1;
    if (res.ok) {
      this.createStages(res.template, res.source);
      return true;
    }
    if (res.retryable && attempts < t.kamMaxAttempts) {
      this.sql`UPDATE execution SET template_attempts = ${attempts} WHERE id = 1`;
      this.setTimer("advance", now + retryDelayMs(attempts, t.kamRetryBaseMs, t.retryCapMs));
      this.log("warn", "template_retry", { code: res.code, attempts });
      return false;
    }
    this.sql`UPDATE execution SET template_attempts = ${attempts} WHERE id = 1`;
    this.finishExecution("failed", now, { code: res.code, message: res.message });
    return false;
  }

  private async estimateCompletion(): Promise<void> {
    const ex = this.row()!;
    const stages = this.stages().map((s) => ({ worker: s.worker, resources: parse<Record<string, number>>(s.resources) ?? undefined }));
    const totalMs = await estimateTotalMs(this.env, stages, ex.priority);
    this.sql`UPDATE execution SET estimated_completion_at = ${ex.created_at + Math.round(totalMs)} WHERE id = 1`;
  }

  // --------------------------------------------------- transitions (sync) ----

  private createStages(template: MasterTemplate, source: "kam" | "cache"): void {
    const t = this.config.tuning;
    template.stages.forEach((s, i) => {
      this.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status)
        VALUES (${stageIdFor(i + 1)}, ${i + 1}, ${s.worker}, ${s.template_ref}, ${s.action ?? "process"},
                ${s.timeout_ms ?? t.defaultStageTimeoutMs}, ${s.max_attempts ?? t.defaultMaxAttempts},
                ${s.resources ? JSON.stringify(s.resources) : null}, 'pending')`;
    });
    this.sql`UPDATE execution SET template_id = ${template.template_id}, template_source = ${source} WHERE id = 1`;
    this.log("info", "template_loaded", { template_id: template.template_id, source, stages: template.stages.length });
  }

  private beginAttempt(st: StageRow, now: number): void {
    const ex = this.row()!;
    if (ex.status === "queued") {
      this.sql`UPDATE execution SET status = 'running', started_at = ${now} WHERE id = 1`;
      this.indexUpdate(now);
      this.log("info", "execution_status", { status: "running" });
    }
    this.moveStage(st, "waiting_resources", now, {});
    this.sql`UPDATE stages SET attempt = ${st.attempt + 1}, reservation = 'requested', reservation_id = NULL, requirements = NULL,
      waiting_since = ${now}, started_at = COALESCE(started_at, ${now}), progress = 0, poll_interval_ms = NULL, poll_failures = 0
      WHERE stage_id = ${st.stage_id}`;
    this.clearTimer("reask");
  }

  private granted(st: StageRow, expiresAt: number, requirements: Record<string, number>, now: number): void {
    this.moveStage(st, "handshaking", now, {});
    this.sql`UPDATE stages SET reservation = 'granted', requirements = ${JSON.stringify(requirements)}, lease_expires_at = ${expiresAt},
      waiting_ms = waiting_ms + ${now - (st.waiting_since ?? now)}, waiting_since = NULL, message = NULL WHERE stage_id = ${st.stage_id}`;
    this.clearTimer("reask");
    this.setTimer("lease", expiresAt - Math.floor(this.config.tuning.leaseMs / 2));
  }

  /**
   * Turns a worker's result into what the row keeps: small JSON inline, larger
   * JSON in KV or R2 by size, and a worker's own upload checked against the
   * checksum the front Worker computed when it streamed it in.
   */
  private async storeOutput(stageId: string, attempt: number, output: unknown, ref: DataReference | undefined): Promise<StoredOutput | StageFailure> {
    const ex = this.row()!;
    if (ref) {
      const known = await this.dataRef(ref.key);
      if (!known || known.sha256 !== ref.sha256 || known.size !== ref.size) {
        return { code: "data_corrupt", message: `the output reference ${ref.key} does not match a stored upload`, retryable: false };
      }
      return { inline: null, ref: known };
    }
    const text = JSON.stringify(output ?? null);
    const bytes = new TextEncoder().encode(text);
    if (bytes.byteLength <= DATA_LIMITS.inlineMaxBytes) return { inline: text, ref: null };
    const stored = await putBytes(this.env, ex.execution_id, stageId, `a${attempt}-output.json`, bytes, "application/json");
    this.recordObject(stored, stageId, attempt, Date.now());
    return { inline: null, ref: stored };
  }

  private recordObject(ref: DataReference, stageId: string, attempt: number, now: number): void {
    this.sql`INSERT OR REPLACE INTO data_objects (key, kind, size, sha256, content_type, stage_id, attempt, created_at)
      VALUES (${ref.key}, ${ref.kind}, ${ref.size}, ${ref.sha256}, ${ref.contentType}, ${stageId}, ${attempt}, ${now})`;
  }

  private completeStage(st: StageRow, output: StoredOutput, usage: Record<string, number> | undefined, now: number, hash: string | null): void {
    const worked = st.processing_since !== null ? now - st.processing_since : 0;
    this.moveStage(st, "completed", now, {});
    this.sql`UPDATE stages SET progress = 100, message = NULL, completed_at = ${now}, processing_ms = processing_ms + ${worked}, processing_since = NULL,
      usage = ${JSON.stringify(addUsage(parse(st.usage), usage) ?? {})}, output = ${output.inline},
      output_ref = ${output.ref ? JSON.stringify(output.ref) : null},
      complete_hash = ${hash}, reservation = NULL, deadline_at = NULL WHERE stage_id = ${st.stage_id}`;
    if (st.reservation_id) {
      this.enqueue({ kind: "ledger_settle", reservationId: st.reservation_id, usage: usage ?? {}, durationMs: worked }, now, { hold: true });
    }
    this.clearStageTimers();
  }

  /** One attempt failed: settle what it used, then retry after a backoff or fail the stage and the execution. */
  private failAttempt(st: StageRow, failure: StageFailure, now: number, usage?: Record<string, number>): void {
    const worked = st.processing_since !== null ? now - st.processing_since : 0;
    if (st.reservation_id && st.reservation === "granted") {
      this.enqueue({ kind: "ledger_settle", reservationId: st.reservation_id, usage: usage ?? {}, durationMs: worked }, now);
    } else {
      this.releaseReservation(st, now);
    }
    if (isOnWorker(st.status) && failure.code === "stage_timeout") {
      this.enqueue({ kind: "worker_cancel", worker: st.worker, stageId: st.stage_id, attempt: st.attempt }, now);
    }
    const info: ErrorInfo = { code: failure.code, message: failure.message, stage_id: st.stage_id };
    this.sql`UPDATE stages SET last_error = ${JSON.stringify({ ...info, attempt: st.attempt })}, usage = ${JSON.stringify(addUsage(parse(st.usage), usage))},
      processing_ms = processing_ms + ${worked}, processing_since = NULL, deadline_at = NULL, reservation = NULL,
      waiting_ms = waiting_ms + ${st.waiting_since !== null ? now - st.waiting_since : 0}, waiting_since = NULL
      WHERE stage_id = ${st.stage_id}`;
    this.clearStageTimers();
    this.log("warn", "stage_attempt_failed", { stage_id: st.stage_id, attempt: st.attempt, code: failure.code, retryable: failure.retryable });
    if (shouldRetry(failure, st.attempt, st.max_attempts)) {
      this.moveStage(st, "pending", now, { message: `retrying after ${failure.code}` });
      const t = this.config.tuning;
      this.setTimer("retry", now + retryDelayMs(st.attempt, t.retryBaseMs, t.retryCapMs, failure.retryAfterMs));
      return;
    }
    this.moveStage(st, "failed", now, { error: info });
    for (const later of this.stages()) {
      if (later.ord > st.ord && !isTerminalStage(later.status)) {
        this.moveStage(later, "cancelled", now, { error: { code: "upstream_failed", message: `${st.stage_id} failed` } });
      }
    }
    this.finishExecution("failed", now, info);
  }

  private completeExecution(now: number): void {
    const stages = this.stages();
    const last = stages[stages.length - 1];
    this.sql`UPDATE execution SET output = ${last?.output ?? null}, output_ref = ${last?.output_ref ?? null} WHERE id = 1`;
    this.finishExecution("completed", now, null);
  }

  private finishExecution(status: ExecutionStatus, now: number, error: ErrorInfo | null): void {
    const ex = this.row()!;
    if (!canMoveExecution(ex.status, status)) return;
    const stages = this.stages();
    const cost = costOf(
      stages.map((s) => ({ stage_id: s.stage_id, usage: parse<Record<string, number>>(s.usage) })),
      this.config.prices,
    );
    this.sql`UPDATE execution SET status = ${status}, completed_at = ${now}, started_at = COALESCE(started_at, ${now}),
      error = ${error ? JSON.stringify(error) : null}, cost = ${JSON.stringify(cost)} WHERE id = 1`;
    this.clearTimers(["advance", "poll", "deadline", "lease", "reask", "retry", "watchdog"]);
    this.indexUpdate(now);
    // Ended executions keep their data for the retention period, then their alarm deletes it.
    this.setTimer("retention", now + this.config.tuning.retentionMs);
    this.log(status === "failed" ? "warn" : "info", "execution_status", {
      status,
      error_code: error?.code,
      duration_ms: now - ex.created_at,
      cost_total: cost.total,
    });
  }

  private moveStage(st: StageRow, to: StageStatus, now: number, extra: { error?: ErrorInfo; message?: string }): void {
    const cur = this.stage(st.stage_id)!;
    if (cur.status === to) return;
    if (!canMoveStage(cur.status, to)) throw new Error(`illegal stage transition ${cur.status} -> ${to} for ${st.stage_id}`);
    const ended = isTerminalStage(to) ? now : null;
    this.sql`UPDATE stages SET status = ${to}, completed_at = COALESCE(${ended}, completed_at),
      error = COALESCE(${extra.error ? JSON.stringify(extra.error) : null}, error),
      message = COALESCE(${extra.message ?? null}, message) WHERE stage_id = ${st.stage_id}`;
    this.log("info", "stage_status", { stage_id: st.stage_id, attempt: cur.attempt, from: cur.status, to });
  }

  /** Ends every stage still open: tells a worker that has one to cancel, gives back every reservation. */
  private stopStages(to: "cancelled" | "failed", now: number, error: ErrorInfo): void {
    for (const st of this.stages()) {
      if (isTerminalStage(st.status)) continue;
      if (isOnWorker(st.status)) this.enqueue({ kind: "worker_cancel", worker: st.worker, stageId: st.stage_id, attempt: st.attempt }, now);
      this.releaseReservation(st, now);
      this.moveStage(st, to, now, { error });
    }
  }

  private releaseReservation(st: StageRow, now: number): void {
    if (st.reservation_id) this.enqueue({ kind: "ledger_release", reservationId: st.reservation_id }, now);
    this.sql`UPDATE stages SET reservation = NULL WHERE stage_id = ${st.stage_id}`;
  }

  private clearStageTimers(): void {
    this.clearTimers(["poll", "deadline", "lease", "reask"]);
  }

  /** Retention: deletes the execution's KV and R2 data and inline outputs; the summary stays. */
  private async expireData(): Promise<void> {
    const ex = this.row()!;
    const deleted = await deleteExecutionData(this.env, ex.execution_id);
    const now = Date.now();
    this.sql`UPDATE execution SET data_expired_at = ${now}, output = NULL, output_ref = NULL WHERE id = 1`;
    this.sql`UPDATE stages SET output = NULL, output_ref = NULL`;
    this.sql`DELETE FROM data_objects`;
    this.log("info", "data_expired", { kv_keys: deleted.kv, r2_objects: deleted.r2 });
  }

  // ------------------------------------------------------------- outbox ----

  /**
   * Sends this execution's summary to the execution index (through the outbox).
   * Every summary carries a version, and the index ignores older ones, so they
   * may arrive in any order and more than once.
   */
  private indexUpdate(now: number): void {
    const ex = this.row()!;
    const stages = this.stages();
    const version = ex.index_version + 1;
    this.sql`UPDATE execution SET index_version = ${version} WHERE id = 1`;
    const cost = parse<{ total: number }>(ex.cost);
    const entry: IndexEntry = {
      execution_id: ex.execution_id,
      client_id: ex.client_id,
      template_name: ex.template_name,
      status: ex.status,
      priority: ex.priority,
      created_at: ex.created_at,
      updated_at: now,
      completed_at: ex.completed_at,
      error_code: parse<ErrorInfo>(ex.error)?.code ?? null,
      cost_total: cost?.total ?? null,
      stages_total: stages.length,
      stages_completed: stages.filter((s) => s.status === "completed").length,
      version,
    };
    this.enqueue({ kind: "index_upsert", entry }, now);
  }

  /**
   * Writes a message to the outbox and starts delivering it. The row is written
   * claimed (due again only after the longest call timeout) in the same
   * transaction as the transition that made it, and the output gate holds the
   * call until that transaction is durable: the message goes out at least once,
   * and if this instance is evicted mid-delivery the outbox timer sends it again.
   */
  private enqueue(item: OutboxItem, now: number, opts: { hold?: boolean } = {}): void {
    this.purgeDelivered();
    const due = now + this.claimMs();
    const row = this.sql<{ id: number }>`INSERT INTO outbox (kind, payload, next_at) VALUES (${item.kind}, ${JSON.stringify(item)}, ${due}) RETURNING id`[0];
    this.setTimerNoLaterThan("outbox", due);
    if (opts.hold && item.kind === "ledger_settle") {
      this.sendHeld(); // at most one held: an older one goes now
      this.held = { id: row.id, item };
      return;
    }
    this.deliverInBackground(row.id, item, 0);
  }

  /** Sends the held settle on its own (the drive pass ended without a reserve to ride on). */
  private sendHeld(): void {
    const h = this.held;
    if (!h) return;
    this.held = null;
    this.deliverInBackground(h.id, h.item, 0);
  }

  /** The answer to a settle that rode on a reserve: delivered, or (null: refused or unknown) sent again on its own. */
  private settled(ride: { id: number; item: OutboxItem }, result: { ok: boolean; unknownPools: string[] } | null): void {
    this.inFlight.delete(ride.id);
    if (result === null) {
      this.deliverInBackground(ride.id, ride.item, 0);
      return;
    }
    this.noteSettle(result);
    this.delivered.push(ride.id);
  }

  /** Usage the ledger has no pool for is recorded there; we say so once per settle. */
  private noteSettle(result: { unknownPools: string[] }): void {
    if (result.unknownPools.length) this.log("warn", "usage_in_unknown_pools", { pools: result.unknownPools });
  }

  /** How long a message being delivered stays claimed: past the longest call timeout. */
  private claimMs(): number {
    const t = this.config.tuning;
    return Math.max(t.ledgerCallTimeoutMs, t.workerCallTimeoutMs, t.objectCallTimeoutMs) + 1_000;
  }

  /** Redelivers due outbox messages (failed earlier, or claimed by an instance that was evicted), in the background. */
  private flushOutbox(): void {
    const purged = this.purgeDelivered();
    const now = Date.now();
    const busy = JSON.stringify([...this.inFlight]);
    const due = this.sql<{ id: number; payload: string; attempts: number }>`
      UPDATE outbox SET next_at = ${now + this.claimMs()}
      WHERE next_at <= ${now} AND id NOT IN (SELECT value FROM json_each(${busy})) RETURNING id, payload, attempts`;
    for (const row of due) this.deliverInBackground(row.id, JSON.parse(row.payload) as OutboxItem, row.attempts);
    if (purged || due.length > 0) this.armOutboxTimer();
  }

  /** Deletes the rows of delivered messages; true when there were any. */
  private purgeDelivered(): boolean {
    if (this.delivered.length === 0) return false;
    this.sql`DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(${JSON.stringify(this.delivered)}))`;
    this.delivered = [];
    return true;
  }

  private armOutboxTimer(): void {
    const next = this.sql<{ at: number | null }>`SELECT MIN(next_at) AS at FROM outbox`[0]?.at ?? null;
    if (next === null) this.clearTimer("outbox");
    else this.setTimer("outbox", next);
  }

  private deliverInBackground(id: number, item: OutboxItem, attempts: number): void {
    this.inFlight.add(id);
    this.deliver(item)
      .catch((err) => {
        this.log("warn", "outbox_delivery_failed", { kind: item.kind, attempts: attempts + 1, error: String(err) });
        return false;
      })
      .then(async (ok) => {
        this.inFlight.delete(id);
        if (ok || attempts + 1 >= OUTBOX_MAX_ATTEMPTS) {
          if (!ok) this.log("error", "outbox_dropped", { kind: item.kind, attempts: attempts + 1 });
          this.delivered.push(id);
          // A live execution writes again soon (its next transition, or the outbox
          // timer at the latest) and deletes the row then; an ended one does it now.
          const ex = this.row();
          if (ex && !isTerminalExecution(ex.status)) return;
          this.purgeDelivered();
        } else {
          const next = Date.now() + retryDelayMs(attempts + 1, this.config.tuning.outboxRetryMs, 60_000);
          this.sql`UPDATE outbox SET attempts = attempts + 1, next_at = ${next} WHERE id = ${id}`;
        }
        this.armOutboxTimer();
        await this.rearm();
      })
      .catch(() => {});
  }

  private async deliver(item: OutboxItem): Promise<boolean> {
    const t = this.config.tuning;
    const ledger = ledgerFor(this.env);
    switch (item.kind) {
      case "ledger_settle": {
        this.noteSettle(await withTimeout(ledger.settle(item.reservationId, item.usage, item.durationMs), t.ledgerCallTimeoutMs, "ledger.settle"));
        return true;
      }
      case "ledger_release":
        await withTimeout(ledger.release(item.reservationId), t.ledgerCallTimeoutMs, "ledger.release");
        return true;
      case "index_upsert":
        await withTimeout(indexFor(this.env, item.entry.created_at).upsert(item.entry), t.objectCallTimeoutMs, "index.upsert");
        return true;
      case "worker_cancel": {
        const client = WorkerClient.for(this.env, item.worker);
        if (!client) return true;
        const r = await client.cancel({ executionId: this.row()!.execution_id, stageId: item.stageId, attempt: item.attempt });
        // Best effort: a worker that no longer knows the stage is as good as cancelled.
        return r.ok || !r.error.retryable;
      }
    }
  }

  // ------------------------------------------------------------- timers ----

  private setTimer(name: TimerName, dueAt: number): void {
    this.sql`INSERT INTO timers (name, due_at) VALUES (${name}, ${dueAt}) ON CONFLICT(name) DO UPDATE SET due_at = excluded.due_at`;
  }

  /** Sets the timer unless it is already due earlier. */
  private setTimerNoLaterThan(name: TimerName, dueAt: number): void {
    this.sql`INSERT INTO timers (name, due_at) VALUES (${name}, ${dueAt}) ON CONFLICT(name) DO UPDATE SET due_at = MIN(due_at, excluded.due_at)`;
  }

  private clearTimer(name: TimerName): void {
    this.sql`DELETE FROM timers WHERE name = ${name}`;
  }

  /** One statement for several timers (each statement costs a round through SQLite). */
  private clearTimers(names: TimerName[]): void {
    this.sql`DELETE FROM timers WHERE name IN (SELECT value FROM json_each(${JSON.stringify(names)}))`;
  }

  private hasTimer(name: TimerName): boolean {
    return this.sql`SELECT 1 FROM timers WHERE name = ${name}`.length > 0;
  }

  /** Consumes a due timer: true once per firing, so a second alarm does nothing twice. */
  private takeTimer(name: TimerName): boolean {
    return this.sql`DELETE FROM timers WHERE name = ${name} AND due_at <= ${Date.now()} RETURNING name`.length > 0;
  }

  /**
   * Makes sure the alarm fires no later than the earliest timer (a watchdog
   * keeps a live execution from ever sleeping unobserved). It only ever moves
   * the alarm earlier: an alarm that fires before anything is due finds nothing
   * to do and re-arms (every handler checks its own timer), whereas moving it
   * later each time a timer is cleared would cost a storage write per stage.
   */
  private async rearm(): Promise<void> {
    const ex = this.row();
    if (ex && !isTerminalExecution(ex.status) && !this.hasTimer("watchdog")) this.setTimer("watchdog", Date.now() + WATCHDOG_MS);
    const next = this.sql<{ at: number | null }>`SELECT MIN(due_at) AS at FROM timers`[0]?.at ?? null;
    if (next === null) {
      if (this.armedAt === null) return;
      this.armedAt = null;
      await this.ctx.storage.deleteAlarm();
      return;
    }
    if (this.armedAt !== undefined && this.armedAt !== null && this.armedAt <= next) return;
    this.armedAt = next;
    await this.ctx.storage.setAlarm(next);
  }

  /** Every read also checks the alarm is really set, so a lost alarm heals on the next request. */
  private async healAlarm(ex: ExecutionRow): Promise<void> {
    if (isTerminalExecution(ex.status) && this.sql`SELECT 1 FROM timers LIMIT 1`.length === 0) return;
    const actual = await this.ctx.storage.getAlarm();
    if (actual === null) this.armedAt = undefined;
    await this.rearm();
  }

  // -------------------------------------------------------------- reads ----

  private row(): ExecutionRow | null {
    return this.sql<ExecutionRow>`SELECT * FROM execution WHERE id = 1`[0] ?? null;
  }

  private stages(): StageRow[] {
    return this.sql<StageRow>`SELECT * FROM stages ORDER BY ord`;
  }

  private stage(stageId: string): StageRow | null {
    return this.sql<StageRow>`SELECT * FROM stages WHERE stage_id = ${stageId}`[0] ?? null;
  }

  /** After an await: is the stage still where the call left it (same status, same attempt)? */
  private stillAt(st: StageRow, status: StageStatus): boolean {
    const cur = this.stage(st.stage_id);
    return !!cur && cur.status === status && cur.attempt === st.attempt;
  }

  private startSummary(ex: ExecutionRow, created: boolean): StartResult {
    const at = ex.estimated_completion_at ?? ex.created_at + this.config.tuning.defaultStageDurationMs;
    return {
      created,
      status: ex.status,
      estimated_completion_ms: Math.max(0, at - ex.created_at),
      estimated_completion_at: new Date(at).toISOString(),
      request_hash: ex.request_hash,
    };
  }

  private document(ex: ExecutionRow): StatusDocument {
    const now = Date.now();
    const prices = this.config.prices;
    const cost = parse<StatusDocument["cost"]>(ex.cost);
    const stages: StageDocument[] = this.stages().map((s) => {
      const usage = parse<Record<string, number>>(s.usage);
      return {
        stage_id: s.stage_id,
        order: s.ord,
        worker: s.worker,
        template_ref: s.template_ref,
        action: s.action,
        status: s.status,
        attempts: s.attempt,
        max_attempts: s.max_attempts,
        progress: s.progress,
        message: s.message,
        started_at: ISO(s.started_at),
        completed_at: ISO(s.completed_at),
        waiting_ms: s.waiting_ms + (s.waiting_since !== null ? now - s.waiting_since : 0),
        processing_ms: s.processing_ms + (s.processing_since !== null ? now - s.processing_since : 0),
        error: parse<ErrorInfo>(s.error) ?? (s.status === "pending" ? parse<ErrorInfo>(s.last_error) : null),
        last_error: parse<ErrorInfo>(s.last_error),
        usage,
        cost: usage ? costOf([{ stage_id: s.stage_id, usage }], prices).total : null,
      };
    });
    return {
      execution_id: ex.execution_id,
      status: ex.status,
      template_name: ex.template_name,
      template_id: ex.template_id,
      template_source: ex.template_source,
      client_id: ex.client_id,
      request_id: ex.request_id,
      priority: ex.priority,
      created_at: ISO(ex.created_at)!,
      started_at: ISO(ex.started_at),
      completed_at: ISO(ex.completed_at),
      estimated_completion_at: ISO(ex.estimated_completion_at),
      data_expired_at: ISO(ex.data_expired_at),
      error: parse<ErrorInfo>(ex.error),
      cost,
      stages,
    };
  }

  private log(level: "debug" | "info" | "warn" | "error", event: string, fields: Record<string, unknown>): void {
    this.executionId ??= this.sql<{ execution_id: string }>`SELECT execution_id FROM execution WHERE id = 1`[0]?.execution_id;
    log(level, event, { execution_id: this.executionId, ...fields });
  }

  private logCall(event: string, st: StageRow, ms: number, outcome: string): void {
    this.log("info", event, { stage_id: st.stage_id, attempt: st.attempt, worker: st.worker, duration_ms: ms, outcome });
  }
}
