import { DurableObject } from "cloudflare:workers";
import type { ExecutionStatus, StageDocument, StageStatus, StatusDocument } from "../../schemas/api";
import type { Priority } from "../../schemas/common";
import type { DataReference } from "../../schemas/data";
import type { GrantNotice } from "../../schemas/ledger";
import type { CompleteCallback, FailCallback, ProgressCallback } from "../../schemas/worker-protocol";
import { retryAfterOf } from "../../src/pacing";
import { type Config, configOf } from "../../src/config";
import { sha256Hex } from "../../src/hash";
import { LIVE_PROTOCOL } from "../../src/live-ticket";
import { setLogLevel } from "../../src/log";
import type { TraceContext } from "../../src/trace";
import { emit } from "../../src/metrics";
import { sqlOf } from "../sql";
import { type StageFailure, isOnWorker, isTerminalExecution, isTerminalStage } from "../stage-machine";
import { type Decision, approvalTimedOut, awaitApproval, decideApproval, migrateControl, pauseExecution, resumeExecution } from "./control";
import { stageDocument, startSummary, statusDocument } from "./documents";
import { EVENTS_SCHEMA, Notifier } from "./notify";
import {
  HOLDS_SCHEMA,
  type RerunSource,
  type RerunSourceState,
  createFromSnapshot,
  heldOwners,
  holdData,
  isDataHeld,
  recordRerun,
  releaseData,
  releaseHeldData,
  rerunSource,
  rerunsOf,
} from "./rerun";
import { Outbox } from "./outbox";
import * as step from "./steps";
import { DEFAULT_MAX_PARALLEL, itemSlots, readyStages } from "./graph";
import { type Core, type ExecutionRow, SCHEMA, type StageRow, Store, type StoredOutput, dependsOn, isFanOut, migrate, parse } from "./store";
import { Timers, WATCHDOG_MS } from "./timers";
import * as tx from "./transitions";

/**
 * One execution of a pipeline. It owns its stage state machine, persists
 * everything in its own SQLite, and moves forward on three kinds of events:
 * RPC calls (start, callbacks, grant notices, cancel), and its alarm, which
 * multiplexes every timer in the `timers` table (next poll, stage deadline,
 * lease renewal, ledger re-ask, retry backoff, outbox redelivery).
 *
 * The parts: `store` (schema, rows), `timers` (the alarm), `outbox`
 * (at-least-once messages), `transitions` (synchronous state changes),
 * `steps` (one awaited step per stage state), `documents` (pure projections).
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

export interface StartInput {
  execution_id: string;
  template_name: string;
  parameters: Record<string, unknown>;
  client_id: string;
  request_id: string | null;
  request_hash: string | null;
  priority: Priority;
  /** Deliver this execution's events to KAM (docs/protocol.md, "Event notifications"). */
  notify: boolean;
  /** W3C trace context (src/trace.ts): the caller's, continued, or a new trace. */
  trace?: TraceContext | null;
  /** A rerun: the original's snapshot and what it takes over (rerun.ts). */
  rerun?: RerunSource;
  /** The execution-wide deadline from now; absent or null: `executionTimeoutMs`. */
  execution_timeout_ms?: number | null;
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

export type PauseState =
  | { state: "missing" }
  | { state: "already_terminal"; status: StatusDocument }
  | { state: "paused"; status: StatusDocument };
export type ResumeState = { state: "missing" } | { state: "not_paused"; status: StatusDocument } | { state: "resumed"; status: StatusDocument };
export type ItemsState =
  | { state: "missing" }
  | { state: "not_fan_out" }
  | { state: "ok"; total: number | null; items: StageDocument[]; next_cursor: string | null };

export type DecideState =
  | { state: "missing" }
  | { state: "missing_stage" }
  | { state: "not_awaiting_approval"; stage_status: StageStatus; status: StatusDocument }
  | { state: "decided"; status: StatusDocument };

export type CallbackKind = "progress" | "complete" | "fail";
export type UploadCheck = { ok: true } | { ok: false; code: string; message: string };
export interface CallbackAnswer {
  status: 200 | 404 | 409 | 422;
  body: { ok: true; stage_status: StageStatus; duplicate?: boolean } | { error: { code: string; message: string } };
}

/** A piece of work a drive pass runs: `key` names it, `sig` is where its stage stood when planned. */
interface Work {
  key: string;
  sig: string;
  run: () => Promise<void>;
}

/** Bounds that keep a pass from spinning (each plan follows one piece of work coming back). */
const MAX_PLANS_PER_PASS = 100_000;
const MAX_STEPS_PER_RUN = 50;

const unitSignature = (st: StageRow) => `${st.status}#${st.attempt}#${st.reservation ?? ""}`;

export class Execution extends DurableObject<Env> {
  readonly #config: Config;
  readonly #store: Store;
  readonly #timers: Timers;
  readonly #c: Core;
  /** A push to the live sockets is queued for the end of this turn (one per transition, however many rows it moved). */
  #pushQueued = false;
  /** Serialises drive() passes: the tail of the chain and a queued-but-not-started pass to share. */
  #tail: Promise<void> = Promise.resolve();
  #queued: Promise<void> | null = null;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    const sql = sqlOf(ctx.storage);
    this.#config = configOf(env);
    this.#store = new Store(sql);
    this.#timers = new Timers(sql, ctx.storage);
    const base = {
      env,
      config: this.#config,
      sql,
      store: this.#store,
      timers: this.#timers,
      rearm: () => this.#rearm(),
      changed: () => this.#changed(),
    };
    const notifier = new Notifier(base);
    this.#c = { ...base, notifier, outbox: new Outbox({ ...base, notifier }) };
    setLogLevel((env as unknown as { LOG_LEVEL?: string }).LOG_LEVEL);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(SCHEMA + EVENTS_SCHEMA);
      migrateControl(ctx.storage);
      ctx.storage.sql.exec(HOLDS_SCHEMA);
      migrate(ctx.storage);
      this.#timers.known(await ctx.storage.getAlarm());
    });
  }

  // ---------------------------------------------------------------- RPC ----

  /** Creates the execution (idempotent: a second call returns the first one's summary). */
  async start(input: StartInput): Promise<StartResult> {
    const existing = this.#store.row();
    if (existing) {
      // A repeat (e.g. after a crash cut the first answer off) also checks the execution is awake.
      await this.#timers.heal(!isTerminalExecution(existing.status));
      return this.#summary(existing, false);
    }

    const now = Date.now();
    const deadline = now + (input.execution_timeout_ms ?? this.#config.tuning.executionTimeoutMs);
    this.#c.sql`INSERT INTO execution (id, execution_id, template_name, client_id, request_id, request_hash, priority, parameters, status, created_at, notify, deadline_at)
      VALUES (1, ${input.execution_id}, ${input.template_name}, ${input.client_id}, ${input.request_id}, ${input.request_hash},
              ${input.priority}, ${JSON.stringify(input.parameters)}, 'queued', ${now}, ${input.notify ? 1 : 0}, ${deadline})`;
    if (input.trace) {
      const t = input.trace;
      this.#c.sql`INSERT OR IGNORE INTO trace (id, trace_id, span_id, parent_span_id, flags, tracestate)
        VALUES (1, ${t.trace_id}, ${t.span_id}, ${t.parent_span_id}, ${t.flags}, ${t.tracestate})`;
    }
    this.#timers.set("watchdog", now + WATCHDOG_MS);
    if (input.rerun) {
      createFromSnapshot(this.#c, input.rerun, now);
      // The original lists its reruns: told at least once, through the outbox.
      this.#c.outbox.enqueue({ kind: "rerun_link", of: input.rerun.execution_id, executionId: input.execution_id }, now);
    }
    this.#timers.set("execution", deadline);
    tx.indexUpdate(this.#c, now);
    this.#store.log("info", "execution_created", { template_name: input.template_name, client_id: input.client_id, priority: input.priority });
    emit(this.env, { event: "execution_started", execution_id: input.execution_id, template_name: input.template_name, client_id: input.client_id });

    // Answered as soon as the row is durable: the template load (KAM) and the
    // estimate run in the first drive pass, so a slow KAM or ledger never sits
    // between the caller and its 202; the estimate appears in the status document later.
    this.#kick();
    await this.#rearm();
    return this.#summary(this.#store.row()!, true);
  }

  async getStatus(): Promise<StatusDocument | null> {
    const ex = this.#store.row();
    if (!ex) return null;
    await this.#timers.heal(!isTerminalExecution(ex.status));
    return this.#document(ex);
  }

  async getResult(): Promise<ResultState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (ex.status !== "completed") return { state: "not_completed", status: ex.status };
    if (ex.data_expired_at !== null) return { state: "expired", at: ex.data_expired_at };
    return { state: "completed", output: parse(ex.output), outputRef: parse<DataReference>(ex.output_ref), cost: parse(ex.cost) };
  }

  /** Stops the execution at any state; tells a running stage's worker, releases every reservation. */
  async cancel(): Promise<CancelState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (isTerminalExecution(ex.status)) return { state: "already_terminal", status: this.#document(ex) };
    tx.stopExecution(
      this.#c,
      "cancelled",
      Date.now(),
      { code: "cancelled", message: "the execution was cancelled" },
      { code: "cancelled", message: "cancelled by request" },
    );
    this.#kick();
    await this.#rearm();
    return { state: "cancelled", status: this.#document(this.#store.row()!) };
  }

  /** Stops new work (docs/protocol.md, "Pause and resume"); pausing a paused execution changes nothing. */
  async pause(): Promise<PauseState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (isTerminalExecution(ex.status)) return { state: "already_terminal", status: this.#document(ex) };
    pauseExecution(this.#c, Date.now());
    await this.#rearm();
    return { state: "paused", status: this.#document(this.#store.row()!) };
  }

  async resume(): Promise<ResumeState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (ex.status !== "paused") return { state: "not_paused", status: this.#document(ex) };
    resumeExecution(this.#c, Date.now());
    this.#kick();
    await this.#rearm();
    return { state: "resumed", status: this.#document(this.#store.row()!) };
  }

  /** What a rerun from `fromStage` would take over and run again (docs/protocol.md, "Rerun"). */
  async rerunSource(fromStage: string | null): Promise<RerunSourceState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    return rerunSource(this.#c, ex, fromStage);
  }

  /** A rerun will read stored outputs of this execution by reference: retention waits for it. False once the data is gone. */
  async holdData(holder: string): Promise<boolean> {
    return holdData(this.#c, holder, Date.now());
  }

  /** A rerun's own data expired: it reads nothing of this execution any more. */
  async releaseData(holder: string): Promise<void> {
    releaseData(this.#c, holder, Date.now());
    this.#kick();
    await this.#rearm();
  }

  /** A rerun of this execution was created (idempotent). */
  async recordRerun(executionId: string): Promise<void> {
    recordRerun(this.#c, executionId, Date.now());
  }

  /** Approves or rejects an approval stage that awaits a decision (also while the execution is paused). */
  async decide(stageId: string, approved: boolean, by: "kam" | "ops", comment: string | null): Promise<DecideState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    const st = this.#store.stage(stageId);
    if (!st) return { state: "missing_stage" };
    if (st.status !== "awaiting_approval") return { state: "not_awaiting_approval", stage_status: st.status, status: this.#document(ex) };
    const now = Date.now();
    const decision: Decision = { approved, by, comment, at: new Date(now).toISOString() };
    decideApproval(this.#c, st, decision, now);
    this.#kick();
    await this.#rearm();
    return { state: "decided", status: this.#document(this.#store.row()!) };
  }

  /** A stage worker's callback, already authenticated by its token (execution, stage, attempt). */
  async callback(kind: CallbackKind, stageId: string, attempt: number, body: ProgressCallback | CompleteCallback | FailCallback): Promise<CallbackAnswer> {
    const hash = kind === "complete" ? await sha256Hex(JSON.stringify(body)) : null;
    const early = this.#refuseCallback(kind, stageId, attempt, hash);
    if (early) return early;
    if (kind !== "progress") {
      // Usage out of bounds is refused before anything is stored or charged; the stage goes on.
      const usage = (body as CompleteCallback | FailCallback).usage;
      const problem = tx.usageProblem(this.#c, this.#store.stage(stageId)!, usage);
      if (problem) {
        this.#store.log("error", "usage_refused", { stage_id: stageId, attempt, kind, problem, usage });
        return { status: 422, body: { error: { code: "usage_out_of_bounds", message: problem } } };
      }
    }
    // A large inline output is stored (KV or R2) before the transition; then the
    // checks run again, since the stage may have moved during the await.
    let stored: StoredOutput | StageFailure | null = null;
    if (kind === "complete") {
      const c = body as CompleteCallback;
      stored = await step.storeOutput(this.#c, stageId, attempt, c.output, c.dataReference);
      const again = this.#refuseCallback(kind, stageId, attempt, hash);
      if (again) return again;
    }
    // From here to the end: synchronous, so the checks and the transition are one atomic step.
    const st = this.#store.stage(stageId)!;
    const now = Date.now();
    this.#store.log("info", "callback", { stage_id: stageId, attempt, kind });
    if (kind === "progress") {
      const p = body as ProgressCallback;
      tx.progressCallback(this.#c, st, p.progress, p.message);
      return { status: 200, body: { ok: true, stage_status: st.status } };
    }
    if (kind === "complete") {
      const c = body as CompleteCallback;
      if (stored && "code" in stored) tx.failAttempt(this.#c, st, stored, now, c.usage);
      else tx.completeStage(this.#c, st, stored!, c.usage, now, hash);
    } else {
      const f = body as FailCallback;
      // A provider's retry-after (a 429) sets the earliest retry instead of the generic backoff alone.
      const failure = { code: f.error.code, message: f.error.message, retryable: f.retryable ?? false, retryAfterMs: retryAfterOf(f.rate_limits), fromWorker: true };
      tx.failAttempt(this.#c, st, failure, now, f.usage);
    }
    this.#kick();
    await this.#rearm();
    return { status: 200, body: { ok: true, stage_status: this.#store.stage(stageId)!.status } };
  }

  /** A fan-out stage's items from `cursor` (an item index), at most `limit`, in item order. */
  async getItems(stageId: string, cursor: number, limit: number): Promise<ItemsState> {
    const ex = this.#store.row();
    const st = ex ? this.#store.stage(stageId) : null;
    if (!ex || !st || st.parent !== null) return { state: "missing" };
    if (!isFanOut(st)) return { state: "not_fan_out" };
    const now = Date.now();
    const rows = this.#store.items(stageId, cursor, limit + 1);
    const page = rows.slice(0, limit).map((r) => stageDocument(r, now, this.#config.prices, { parent: st, trace: this.#store.trace() }));
    return { state: "ok", total: st.items_total, items: page, next_cursor: rows.length > limit ? String(rows[limit].item_index) : null };
  }

  /** Whether a worker may upload for this stage and attempt now (asked before any byte is written). */
  async uploadAllowed(stageId: string, attempt: number): Promise<UploadCheck> {
    return this.#uploadCheck(stageId, attempt);
  }

  /**
   * Records a worker's upload (streamed to R2 by the front Worker, under a key
   * of its own) so a later `complete` may name it. The check and the record are
   * one synchronous step; a key already recorded is never replaced.
   */
  async registerUpload(stageId: string, attempt: number, ref: DataReference): Promise<UploadCheck> {
    const refused = this.#uploadCheck(stageId, attempt);
    if (!refused.ok) return refused;
    if (!tx.recordObject(this.#c, ref, stageId, attempt, Date.now())) {
      return { ok: false, code: "data_exists", message: `${ref.key} is already recorded` };
    }
    return { ok: true };
  }

  #uploadCheck(stageId: string, attempt: number): UploadCheck {
    const st = this.#store.stage(stageId);
    if (!st || st.attempt !== attempt || !isOnWorker(st.status)) {
      return { ok: false, code: "stage_ended", message: "the stage is not running this attempt" };
    }
    return { ok: true };
  }

  /** The checksum and size we recorded for a stored object, for reads through `GET /data/...`. */
  async dataRef(key: string): Promise<DataReference | null> {
    return this.#store.dataRef(key);
  }

  /** An operator's retry of this execution's undeliverable messages (`POST /resources/undeliverable/retry`). */
  async retryUndeliverable(): Promise<{ retried: number }> {
    if (!this.#store.row()) return { retried: 0 };
    const retried = this.#c.outbox.retryUndeliverable();
    await this.#rearm();
    return { retried };
  }

  /** Every reservation this execution was given, for operators and leak checks. */
  async reservationIds(): Promise<{ reservation_id: string; stage_id: string; attempt: number }[]> {
    return this.#c.sql<{ reservation_id: string; stage_id: string; attempt: number }>`
      SELECT reservation_id, stage_id, attempt FROM reservations ORDER BY created_at`;
  }

  /**
   * The ledger granted a waiting reservation. A notice for the stage's current
   * attempt is taken even when the answer to its reserve call never arrived
   * (the reservation id is derived from execution, stage and attempt); a notice
   * for a stage that moved on is handed back.
   */
  async onGrant(notice: GrantNotice): Promise<void> {
    const st = this.#store.stage(notice.stageId);
    const now = Date.now();
    const expected = st ? (st.reservation_id ?? tx.expectedReservationId(this.#c, st)) : null;
    if (st && st.status === "waiting_resources" && st.attempt === notice.attempt && notice.reservationId === expected) {
      if (!st.reservation_id) tx.reserved(this.#c, st, notice.reservationId, now);
      tx.granted(this.#c, this.#store.stage(st.stage_id)!, notice.expiresAt, notice.requirements, now);
      this.#kick();
    } else if (!st || expected !== notice.reservationId || isTerminalStage(st.status)) {
      this.#c.outbox.enqueue({ kind: "ledger_release", reservationId: notice.reservationId }, now);
      this.#kick();
    }
    await this.#rearm();
  }

  /**
   * The live status socket (docs/protocol.md, "Live updates"), already
   * authenticated by the front Worker's ticket check. Accepted through the
   * Hibernation API: an idle socket does not keep the object in memory, and
   * `ping` is answered by the runtime without waking it.
   */
  override async fetch(request: Request): Promise<Response> {
    const ex = this.#store.row();
    if (!ex) return Response.json({ error: { code: "not_found", message: "no such execution" } }, { status: 404 });
    if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return Response.json({ error: { code: "upgrade_required", message: "connect with a WebSocket" } }, { status: 426 });
    }
    const { 0: client, 1: server } = new WebSocketPair();
    this.ctx.acceptWebSocket(server);
    this.ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair("ping", "pong"));
    this.#pushTo([server], ex);
    return new Response(null, { status: 101, webSocket: client, headers: { "sec-websocket-protocol": LIVE_PROTOCOL } });
  }

  /** A client may ask for the document again with `{"type":"status"}`; anything else is ignored. */
  override async webSocketMessage(ws: WebSocket, message: string | ArrayBuffer): Promise<void> {
    const ex = this.#store.row();
    if (ex && typeof message === "string" && message.includes('"status"')) this.#pushTo([ws], ex);
  }

  override async webSocketClose(ws: WebSocket, code: number, reason: string): Promise<void> {
    try {
      ws.close(code, reason);
    } catch {
      // already closed
    }
  }

  /** One alarm for every timer. Safe to fire twice: each handler re-checks state. */
  override async alarm(info?: AlarmInvocationInfo): Promise<void> {
    this.#timers.fired();
    // A due lease renewal goes out first, beside the drive pass: a pass awaiting a slow
    // worker (a handshake, a poll) must not let the stage's lease lapse.
    for (const st of this.#store.onWorker()) if (this.#timers.take("lease", st.stage_id)) void step.renewLease(this.#c, st);
    try {
      await this.#schedule();
      if (this.#store.row()?.alarm_failures) this.#c.sql`UPDATE execution SET alarm_failures = 0`;
    } catch (err) {
      // Rethrow so the platform retries the alarm, until it has failed too often in a row.
      if (this.#recordFailure(err, info?.retryCount ?? 0)) throw err;
    } finally {
      await this.#rearm();
    }
  }

  // ------------------------------------------------------------- driving ----

  /** Why a callback cannot act now (404/409), or null when it may. Synchronous. */
  #refuseCallback(kind: CallbackKind, stageId: string, attempt: number, hash: string | null): CallbackAnswer | null {
    const ex = this.#store.row();
    const st = ex ? this.#store.stage(stageId) : null;
    if (!ex || !st) return { status: 404, body: { error: { code: "not_found", message: "no such execution or stage" } } };
    // A fan-out stage runs on no worker itself: its items do, under their own ids.
    if (isFanOut(st)) return { status: 404, body: { error: { code: "not_found", message: `${stageId} runs as items (${stageId}.{i}); no worker holds it` } } };
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

  #changed(): void {
    if (this.#pushQueued) return;
    this.#pushQueued = true;
    // After the synchronous transition that called this: the document is whole by then.
    queueMicrotask(() => {
      this.#pushQueued = false;
      const ex = this.#store.row();
      const sockets = this.ctx.getWebSockets();
      if (ex && sockets.length > 0) this.#pushTo(sockets, ex);
    });
  }

  /** Sends the status document; an ended execution's sockets are closed after it (nothing more will change). */
  #pushTo(sockets: WebSocket[], ex: ExecutionRow): void {
    const text = JSON.stringify({ type: "status", document: this.#document(ex) });
    for (const ws of sockets) {
      try {
        ws.send(text);
        if (isTerminalExecution(ex.status)) ws.close(1000, "execution ended");
      } catch {
        // The socket went away meanwhile; the runtime drops it.
      }
    }
  }

  #rearm(): Promise<void> {
    const ex = this.#store.row();
    return this.#timers.rearm(!!ex && !isTerminalExecution(ex.status));
  }

  #summary(ex: ExecutionRow, created: boolean): StartResult {
    return startSummary(ex, created, this.#config.tuning.defaultStageDurationMs);
  }

  #document(ex: ExecutionRow): StatusDocument {
    return statusDocument(ex, this.#store.stages(), Date.now(), this.#config.prices, this.#store.itemCounts(), this.#c.notifier.document(), this.#store.trace(), rerunsOf(this.#c), this.#c.outbox.undeliverable());
  }

  /** Starts a drive pass in the background (coalesced with one already queued). */
  #kick(): void {
    this.#schedule()
      .catch((err) => this.#recordFailure(err, 0))
      .finally(() => this.#rearm().catch(() => {}));
  }

  #schedule(): Promise<void> {
    if (this.#queued) return this.#queued;
    const run = this.#tail.then(() => {
      this.#queued = null;
      return this.#drive();
    });
    this.#queued = run;
    this.#tail = run.catch(() => {});
    return run;
  }

  /** Records a failed pass; returns true while the platform should keep retrying. */
  #recordFailure(err: unknown, retryCount: number): boolean {
    const ex = this.#store.row();
    if (!ex || isTerminalExecution(ex.status)) return false;
    const failures = ex.alarm_failures + 1;
    const message = err instanceof Error ? err.message : String(err);
    const now = Date.now();
    this.#store.log("error", "drive_failed", { failures, error: message });
    const max = this.#config.tuning.maxAlarmFailures;
    if (failures >= max || retryCount >= max) {
      this.#c.sql`UPDATE execution SET alarm_failures = ${failures}`;
      tx.stopExecution(
        this.#c,
        "failed",
        now,
        { code: "internal_error", message },
        { code: "internal_error", message: `gave up after ${failures} failed attempts to advance: ${message}` },
      );
      return false;
    }
    tx.driveFailed(this.#c, failures, now);
    return true;
  }

  /** Moves the execution as far as it can go now; returns when it must wait for an event or a timer. */
  async #drive(): Promise<void> {
    try {
      await this.#drivePass();
    } finally {
      this.#c.outbox.sendHeld();
    }
  }

  async #drivePass(): Promise<void> {
    // Both only exist to wake the object; this pass is the wake-up.
    this.#timers.takeWakeUps(Date.now());
    // New outbox messages go out as they are written (enqueue); this picks up redeliveries that are due.
    this.#c.outbox.flush();
    this.#c.notifier.pump(Date.now());
    // Ready stages and items move concurrently: each piece of work runs its
    // own awaited steps, and the pass plans again whenever one of them comes
    // back. A piece that came back waiting (for an event or a timer) is not
    // planned again in this pass unless its stage moved meanwhile (a callback
    // or a grant notice did it); its timers wake the next pass.
    const running = new Map<string, Promise<string>>();
    const idle = new Map<string, string>();
    let failure: { err: unknown } | null = null;
    for (let guard = 0; guard < MAX_PLANS_PER_PASS; guard++) {
      const ex = this.#store.row();
      if (ex && !isTerminalExecution(ex.status) && ex.deadline_at !== null && Date.now() >= ex.deadline_at) {
        const limit = ex.deadline_at - ex.created_at;
        tx.stopExecution(
          this.#c,
          "failed",
          Date.now(),
          { code: "execution_timeout", message: `the execution's deadline of ${limit} ms passed` },
          { code: "execution_timeout", message: `the execution did not end within ${limit} ms` },
        );
      }
      if (ex && !isTerminalExecution(ex.status) && !failure) {
        for (const work of ex.template_id ? this.#plan() : [this.#templateWork()]) {
          if (running.has(work.key) || idle.get(work.key) === work.sig) continue;
          const run = work.run().then(
            () => work.key,
            (err) => {
              failure ??= { err };
              return work.key;
            },
          );
          running.set(work.key, run);
        }
      }
      if (running.size === 0) break;
      const done = await Promise.race(running.values());
      running.delete(done);
      idle.set(done, this.#signature(done));
    }
    await Promise.all(running.values());
    if (failure) throw (failure as { err: unknown }).err;
    const ex = this.#store.row();
    if (ex && isTerminalExecution(ex.status) && this.#timers.take("retention")) {
      // Reruns still read outputs of this one by reference: the data waits for the last of them (rerun.ts).
      if (isDataHeld(this.#c)) {
        this.#c.sql`UPDATE execution SET retention_waiting = 1 WHERE id = 1`;
        this.#store.log("info", "retention_held", {});
      } else {
        const owners = heldOwners(this.#c);
        // Retried after a backoff until it succeeds (a store that does not answer must not lose it).
        const expired = await step.expireData(this.#c).then(
          () => true,
          (err) => {
            tx.retentionFailed(this.#c, err, Date.now());
            return false;
          },
        );
        if (expired) releaseHeldData(this.#c, owners, Date.now());
      }
    }
  }

  #templateWork(): Work {
    return { key: "template", sig: "", run: async () => void (await step.loadTemplateStep(this.#c)) };
  }

  /**
   * What can move now (synchronous; graph.ts decides): every stage whose
   * dependencies completed, the items of running fan-out stages within their
   * `max_parallel` and the execution's `maxRunningItems`, a fan-out stage to
   * expand or to gather, and the execution's completion.
   */
  #plan(): Work[] {
    const c = this.#c;
    // Paused: only work already on a worker goes on (to its end), and an approval's deadline runs; nothing starts, nothing completes.
    if (this.#store.row()!.status === "paused") return this.#store.onWorker().map((st) => this.#unitWork(st));
    const stages = this.#store.stages();
    if (stages.every((s) => s.status === "completed")) {
      return [{ key: "complete", sig: "", run: () => step.completeExecution(c) }];
    }
    const work: Work[] = [];
    const ready = new Set(readyStages(stages.map((s) => ({ ...s, depends_on: dependsOn(s) }))).map((s) => s.stage_id));
    const t = this.#config.tuning;
    let activeInExecution = this.#store.activeItems();
    for (const st of stages) {
      if (isFanOut(st)) {
        if (st.status === "pending" && ready.has(st.stage_id)) work.push({ key: `expand:${st.stage_id}`, sig: st.status, run: () => step.expandFanOut(c, st) });
        if (st.status !== "processing") continue;
        const counts = this.#store.itemCounts().get(st.stage_id);
        if (counts && counts.completed === counts.total) {
          work.push({ key: `fan_in:${st.stage_id}`, sig: st.status, run: () => step.fanIn(c, st) });
          continue;
        }
        const slots = itemSlots(st.max_parallel ?? DEFAULT_MAX_PARALLEL, this.#store.activeItems(st.stage_id), activeInExecution, t.maxRunningItems);
        activeInExecution += slots;
        for (const item of this.#store.steppableItems(st.stage_id, slots)) work.push(this.#unitWork(item));
        continue;
      }
      if (isTerminalStage(st.status) || (st.status === "pending" && !ready.has(st.stage_id))) continue;
      work.push(this.#unitWork(st));
    }
    return work;
  }

  #unitWork(st: StageRow): Work {
    return { key: st.stage_id, sig: unitSignature(st), run: () => this.#runUnit(st.stage_id) };
  }

  /** Where a piece of work's stage stands: planning it again is worth it only once this changed. */
  #signature(key: string): string {
    if (key === "template" || key === "complete") return "";
    const st = this.#store.stage(key.includes(":") ? key.slice(key.indexOf(":") + 1) : key);
    if (!st) return "";
    return key.includes(":") ? st.status : unitSignature(st);
  }

  /** Steps one stage or item until it waits for an event or a timer. */
  async #runUnit(stageId: string): Promise<void> {
    for (let i = 0; i < MAX_STEPS_PER_RUN; i++) {
      const ex = this.#store.row();
      const st = this.#store.stage(stageId);
      if (!ex || !st || isTerminalExecution(ex.status) || isTerminalStage(st.status)) return;
      if (ex.status === "paused" && !isOnWorker(st.status) && st.status !== "awaiting_approval") return;
      if (!(await this.#stepStage(st))) return;
    }
  }

  /** One step of the current stage. Returns true when it changed something and the loop should go on. */
  async #stepStage(st: StageRow): Promise<boolean> {
    const now = Date.now();
    switch (st.status) {
      case "pending": {
        if (st.kind === "approval") {
          awaitApproval(this.#c, st, now);
          return false;
        }
        if (st.attempt > 0 && !this.#timers.take("retry", st.stage_id)) return false;
        tx.beginAttempt(this.#c, st, now);
        return true;
      }
      case "awaiting_approval": {
        if (st.deadline_at === null || now < st.deadline_at) return false;
        this.#timers.take("approval", st.stage_id);
        approvalTimedOut(this.#c, st, now);
        return true;
      }
      case "waiting_resources": {
        const limit = st.queue_timeout_ms ?? this.#config.tuning.maxQueueMs;
        if (st.waiting_since !== null && now >= st.waiting_since + limit) {
          this.#timers.take("queue", st.stage_id);
          // Not retried: waiting again would wait for the same resources.
          tx.failAttempt(this.#c, st, { code: "queue_timeout", message: `no resources granted within ${limit} ms`, retryable: false }, now);
          return true;
        }
        return step.askLedger(this.#c, st);
      }
      case "handshaking": {
        if (st.deadline_at !== null && now >= st.deadline_at) {
          this.#timers.take("deadline", st.stage_id);
          tx.failAttempt(this.#c, st, step.handshakeTimeout(this.#c), now);
          return true;
        }
        if (this.#timers.take("lease", st.stage_id)) void step.renewLease(this.#c, st);
        return step.handshake(this.#c, st);
      }
      case "processing": {
        if (st.deadline_at !== null && now >= st.deadline_at) {
          this.#timers.take("deadline", st.stage_id);
          tx.failAttempt(this.#c, st, { code: "stage_timeout", message: `no result within ${st.timeout_ms} ms`, retryable: true }, now);
          return true;
        }
        // The renewal goes out beside the poll: a slow ledger must not hold up the stage's progress.
        if (this.#timers.take("lease", st.stage_id)) void step.renewLease(this.#c, st);
        if (this.#timers.take("poll", st.stage_id)) return step.poll(this.#c, st);
        return false;
      }
      default:
        return false;
    }
  }
}
