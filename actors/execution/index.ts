import { DurableObject } from "cloudflare:workers";
import type { StatusDocument } from "../../schemas/api";
import type { DataReference } from "../../schemas/data";
import { type GrantNotice, ReservationId } from "../../schemas/ledger";
import type { CompleteCallback, FailCallback, ProgressCallback } from "../../schemas/worker-protocol";
import { type Config, configOf } from "../../src/config";
import { setLogLevel } from "../../src/log";
import { emit } from "../../src/metrics";
import { sqlOf } from "../sql";
import { isTerminalExecution } from "../stage-machine";
import { type CallbackAnswer, type CallbackKind, type UploadCheck, applyCallback, askAgainIfLost, registerUpload, uploadCheck } from "./callbacks";
import { type Decision, decideApproval, executionDeadlineAt, pauseExecution, resumeExecution } from "./control";
import { stageDocument, startSummary } from "./documents";
import { spansDocument } from "./spans";
import { chainCut } from "./chain";
import { HeldGrants, applyGrant } from "./grant";
import { Live } from "./live";
import { Notifier } from "./notify";
import { Outbox } from "./outbox";
import { ReadCache } from "./read-cache";
import { reservationList } from "./parts";
import { MAX_PLANS_PER_PASS, plan, signature, slotWork, templateWork } from "./plan";
import {
  type RerunSourceState,
  createFromSnapshot,
  heldOwners,
  holdData,
  isDataHeld,
  recordRerun,
  releaseData,
  releaseHeldData,
  rerunSource,
} from "./rerun";
import type { CancelState, DecideState, InputRead, ItemsState, PauseState, ResultState, ResumeState, SpansState, StartInput, StartResult, StatusRead, StatusReadQuery } from "./rpc-types";
import { StatusCache, buildStatus, watchWrites } from "./status-cache";
import * as step from "./steps";
import { hasTables, withTables } from "./schema";
import { type Core, type ExecutionRow, Store, isFanOut, parse } from "./store";
import { Timers, WATCHDOG_MS } from "./timers";
import * as tx from "./transitions";

/**
 * One execution of a pipeline. It owns its stage state machine, persists
 * everything in its own SQLite, and moves forward on three kinds of events:
 * RPC calls (start, callbacks, grant notices, cancel), and its alarm, which
 * multiplexes every timer in the `timers` table (next poll, stage deadline,
 * lease renewal, ledger re-ask, retry backoff, outbox redelivery).
 *
 * This class is the RPC surface, the alarm and the drive loop; the parts:
 * `store` (schema, rows), `timers` (the alarm), `outbox` (at-least-once
 * messages), `transitions` (synchronous state changes), `plan` (what a drive
 * pass runs, and one unit's steps), `steps` (one awaited step per stage
 * state), `graph` (pure dependency and fan-out rules), `documents` (pure
 * projections), `callbacks` (worker callbacks and uploads), `grant` (ledger
 * grant notices), `control` (pause, resume, approvals), `rerun`, `notify`
 * (events for KAM) and `live` (the pushed status socket).
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

export type { CallbackAnswer, CallbackKind, UploadCheck } from "./callbacks";
export type { CancelState, DecideState, InputRead, ItemsState, PauseState, ResultState, ResumeState, SpansState, StartInput, StartResult, StatusRead, StatusReadQuery } from "./rpc-types";

export class Execution extends DurableObject<Env> {
  readonly #config: Config;
  readonly #store: Store;
  readonly #timers: Timers;
  readonly #c: Core;
  readonly #live: Live;
  /** The status document in memory, its version and its long polls (status-cache.ts). */
  readonly #status: StatusCache;
  /** Serialises drive() passes: the tail of the chain and a queued-but-not-started pass to share. */
  #tail: Promise<void> = Promise.resolve();
  #queued: Promise<void> | null = null;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.#config = configOf(env);
    // Every statement passes the read cache's watch (read-cache.ts), but the status document's own
    // version and hash, which no cached read reads (StatusCache writes them with `raw`).
    // A read of an id nobody started (a 404, a stray callback) finds no execution without creating the tables: no write, no commit.
    const existed = hasTables(ctx.storage);
    const tabled = withTables(sqlOf(ctx.storage), ctx.storage, existed);
    const raw = tabled.sql;
    const reads = new ReadCache(this.#config.tuning.readCacheCheck === 1);
    const grants = new HeldGrants();
    // Every write the object makes passes here: a grant held in memory is written first (grant.ts),
    // and the status document is rebuilt after the turn that wrote.
    const sql = grants.beforeWrites(watchWrites(reads.watch(raw), () => this.#status.touched()));
    this.#store = new Store(sql, reads, { grants, handshakeTimeoutMs: this.#config.tuning.handshakeTimeoutMs }, tabled.exists);
    // A timer write left out because memory shows it changes nothing still writes the held grants first, as the statement would have.
    this.#timers = new Timers(sql, ctx.storage, reads, { check: this.#config.tuning.readCacheCheck === 1, beforeWrite: () => grants.writeAll() });
    this.#live = new Live(ctx, raw, this.#store, () => this.#document());
    this.#status = new StatusCache(raw, (prev) => buildStatus(this.#c, prev), () => this.#live.changed(), this.#config.tuning.statusLeaseMs);
    const base = {
      env,
      config: this.#config,
      sql,
      store: this.#store,
      reads,
      timers: this.#timers,
      rearm: () => this.#rearm(),
      changed: () => this.#status.touched(),
      nextChange: (waitMs: number) => this.#status.changeAfter(this.#status.version, waitMs),
      accepted: new Map<string, number>(),
      grants,
    };
    const notifier = new Notifier(base);
    this.#c = { ...base, notifier, outbox: new Outbox({ ...base, notifier }) };
    grants.attach(
      (g, ending) => tx.writeGrant(this.#c, g, ending),
      () => void this.#rearm(),
    );
    setLogLevel(env);
    ctx.blockConcurrencyWhile(async () => {
      // A new object has nothing to load: its tables come with its first statement (withTables), in start()'s commit.
      const holdMs = existed ? this.#status.load() : 0;
      this.#timers.known(await ctx.storage.getAlarm());
      // A change held back for leases the previous instance gave, which may still be out: nothing is served until they end.
      if (holdMs > 0) await new Promise((resolve) => setTimeout(resolve, holdMs));
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
    // A client without max_running_executions (the admission's `free`) takes no slot: the first
    // stage starts in this commit, with no acquireSlot before it and no release after the end.
    const free = input.slot === "free";
    this.#c.sql`INSERT INTO execution (id, execution_id, template_name, client_id, request_id, request_hash, priority, parameters, status, created_at, notify, deadline_at, slot, client_weight)
      VALUES (1, ${input.execution_id}, ${input.template_name}, ${input.client_id}, ${input.request_id}, ${input.request_hash},
              ${input.priority}, ${JSON.stringify(input.parameters)}, 'queued', ${now}, ${input.notify ? 1 : 0}, ${deadline},
              ${free ? "free" : null}, ${free ? (input.client_weight ?? null) : null})`;
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
    // The answer says `queued`, as created: the first drive pass may start the first stage before the commit.
    const summary = this.#summary(this.#store.row()!, true);
    this.#kick();
    await this.#rearm();
    return summary;
  }

  /** The status document, from memory (status-cache.ts); null: no such execution. */
  async getStatus(): Promise<StatusDocument | null> {
    const doc = this.#status.document(Date.now());
    if (doc) await this.#timers.healOnRead(!isTerminalExecution(doc.status));
    return doc;
  }

  /**
   * `GET /executions/:id`: the document's JSON from memory, none when the
   * caller's copy (`if_none_match`) is current; with `wait_ms`, once the
   * version is past `since` or the wait is over (docs/protocol.md, "Status reads").
   * A read that does not wait may be given a lease (`lease_ms`, status-cache.ts):
   * the JSON is then always sent, as the caller keeps it.
   */
  async readStatus(q: StatusReadQuery): Promise<StatusRead> {
    const ended = this.#status.ended();
    if (ended === null) return { state: "missing" };
    await this.#timers.healOnRead(!ended);
    await this.#status.changeAfter(q.since ?? this.#status.version, Math.min(q.wait_ms, this.#config.tuning.statusWaitMaxMs));
    const now = Date.now();
    const leaseMs = q.wait_ms === 0 ? this.#status.lease(now) : 0;
    return { state: "ok", ...this.#status.answer(now, leaseMs > 0 ? null : q.if_none_match)!, lease_ms: leaseMs };
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
    if (isTerminalExecution(ex.status)) return { state: "already_terminal", status: this.#document() };
    tx.stopExecution(
      this.#c,
      "cancelled",
      Date.now(),
      { code: "cancelled", message: "the execution was cancelled" },
      { code: "cancelled", message: "cancelled by request" },
    );
    this.#kick();
    await this.#rearm();
    return { state: "cancelled", status: this.#document() };
  }

  /** Stops new work (docs/protocol.md, "Pause and resume"); pausing a paused execution changes nothing. */
  async pause(): Promise<PauseState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (isTerminalExecution(ex.status)) return { state: "already_terminal", status: this.#document() };
    pauseExecution(this.#c, Date.now());
    await this.#rearm();
    return { state: "paused", status: this.#document() };
  }

  async resume(): Promise<ResumeState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    if (ex.status !== "paused") return { state: "not_paused", status: this.#document() };
    resumeExecution(this.#c, Date.now());
    this.#kick();
    await this.#rearm();
    return { state: "resumed", status: this.#document() };
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
  async decide(stageId: string, approved: boolean, by: "kam" | "ops" | "client", comment: string | null): Promise<DecideState> {
    const ex = this.#store.row();
    if (!ex) return { state: "missing" };
    const st = this.#store.stage(stageId);
    if (!st) return { state: "missing_stage" };
    if (st.status !== "awaiting_approval") return { state: "not_awaiting_approval", stage_status: st.status, status: this.#document() };
    const now = Date.now();
    const decision: Decision = { approved, by, comment, at: new Date(now).toISOString() };
    decideApproval(this.#c, st, decision, now);
    this.#kick();
    await this.#rearm();
    return { state: "decided", status: this.#document() };
  }

  /** A stage worker's callback, already authenticated by its token (execution, stage, attempt). */
  async callback(kind: CallbackKind, stageId: string, attempt: number, body: ProgressCallback | CompleteCallback | FailCallback): Promise<CallbackAnswer> {
    const outcome = await applyCallback(this.#c, kind, stageId, attempt, body);
    if ("answer" in outcome) {
      // A callback for an attempt whose grant this instance never wrote (lost with the one before): ask again now.
      if (outcome.regrant) this.#kick();
      return outcome.answer;
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

  /** Every stage and item attempt as a span (spans.ts): the execution page's timeline. */
  async getSpans(): Promise<SpansState> {
    const ex = this.#store.row();
    return ex ? { state: "ok", document: spansDocument(this.#c.sql, ex, this.#store.trace(), Date.now()) } : { state: "missing" };
  }

  /** Whether a worker may upload for this stage and attempt now (asked before any byte is written). */
  async uploadAllowed(stageId: string, attempt: number): Promise<UploadCheck> {
    return this.#uploadAnswer(stageId, attempt, uploadCheck(this.#c, stageId, attempt));
  }

  /**
   * Records a worker's upload (streamed to R2 by the front Worker, under a key
   * of its own) so a later `complete` may name it. The check and the record are
   * one synchronous step; a key already recorded is never replaced.
   */
  async registerUpload(stageId: string, attempt: number, ref: DataReference): Promise<UploadCheck> {
    return this.#uploadAnswer(stageId, attempt, registerUpload(this.#c, stageId, attempt, ref, Date.now()));
  }

  /** An upload refused in the lost-grant window (callbacks.ts uploadCheck) makes the object ask the ledger again now, as a refused callback does. */
  #uploadAnswer(stageId: string, attempt: number, check: UploadCheck): UploadCheck {
    if (!check.ok && askAgainIfLost(this.#c, stageId, attempt)) this.#kick();
    return check;
  }

  /** A read through `GET /data/...` with the data token of `stageId`'s `attempt`: the key's record when it is one of its inputs. */
  async inputRef(stageId: string, attempt: number, key: string): Promise<InputRead> {
    return step.inputRead(this.#c, stageId, attempt, key);
  }

  /** An operator's retry of this execution's undeliverable messages (`POST /resources/undeliverable/retry`). */
  async retryUndeliverable(): Promise<{ retried: number }> {
    if (!this.#store.row()) return { retried: 0 };
    const retried = this.#c.outbox.retryUndeliverable();
    await this.#rearm();
    return { retried };
  }

  /** Every reservation this execution was given, with its ledger shard (parts.ts), for operators and leak checks. */
  async reservationIds(): Promise<{ reservation_id: string; stage_id: string; attempt: number; shard: number }[]> {
    return reservationList(this.#c);
  }

  /** The ledger granted a waiting reservation (grant.ts: taken, or handed back when the stage moved on). */
  /** The ledger's notice that this queued execution holds its client execution slot now. */
  async onSlot(): Promise<void> {
    if (tx.slotGranted(this.#c)) this.#kick();
    await this.#rearm();
  }

  async onGrant(notice: GrantNotice): Promise<void> {
    if (applyGrant(this.#c, notice, Date.now())) this.#kick();
    await this.#rearm();
  }

  /** The ledger cut a chain grant of this execution (chain.ts): it is settled at the end of the stage now running. */
  async onChainCut(reservationId: string): Promise<void> {
    if (ReservationId.safeParse(reservationId).success) chainCut(this.#c, reservationId);
  }

  /**
   * The live status socket (docs/protocol.md, "Live updates"), already
   * authenticated by the front Worker's ticket check (live.ts).
   */
  override async fetch(request: Request): Promise<Response> {
    return this.#live.open(request, Date.now());
  }

  override async webSocketMessage(ws: WebSocket, message: string | ArrayBuffer): Promise<void> {
    this.#live.message(ws, message);
  }

  override async webSocketClose(ws: WebSocket, code: number, reason: string): Promise<void> {
    Live.closed(ws, code, reason);
  }

  /** One alarm for every timer. Safe to fire twice: each handler re-checks state. */
  override async alarm(info?: AlarmInvocationInfo): Promise<void> {
    this.#timers.fired();
    // A due lease renewal goes out first, beside the drive pass: a pass awaiting a slow
    // worker (a handshake, a poll) must not let the stage's lease lapse.
    for (const st of this.#store.onWorker()) if (this.#timers.take("lease", st.stage_id)) void step.renewLease(this.#c, st);
    try {
      await this.#schedule();
      if (this.#store.row()?.alarm_failures) this.#store.update({ alarm_failures: 0 });
    } catch (err) {
      // Rethrow so the platform retries the alarm, until it has failed too often in a row.
      if (this.#recordFailure(err, info?.retryCount ?? 0)) throw err;
    } finally {
      await this.#rearm();
    }
  }

  // ------------------------------------------------------------- driving ----

  #rearm(): Promise<void> {
    const ex = this.#store.row();
    return this.#timers.rearm(!!ex && !isTerminalExecution(ex.status));
  }

  #summary(ex: ExecutionRow, created: boolean): StartResult {
    return startSummary(ex, created, this.#config.tuning.defaultStageDurationMs);
  }

  #document(): StatusDocument {
    return this.#status.document(Date.now())!;
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
      this.#store.update({ alarm_failures: failures });
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
      // Paused time does not count against it (control.ts, executionDeadlineAt).
      const deadline = ex ? executionDeadlineAt(ex) : null;
      if (ex && !isTerminalExecution(ex.status) && deadline !== null && Date.now() >= deadline) {
        const limit = deadline - ex.paused_ms - ex.created_at;
        tx.stopExecution(
          this.#c,
          "failed",
          Date.now(),
          { code: "execution_timeout", message: `the execution's deadline of ${limit} ms passed` },
          { code: "execution_timeout", message: `the execution did not end within ${limit} ms` },
        );
      }
      if (ex && !isTerminalExecution(ex.status) && !failure) {
        // The template first, then the client's execution slot (max_running_executions), then the stages.
        for (const work of !ex.template_id ? [templateWork(this.#c)] : tx.needsSlot(ex) ? [slotWork(this.#c)] : plan(this.#c)) {
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
      idle.set(done, signature(this.#c, done));
    }
    await Promise.all(running.values());
    if (failure) throw (failure as { err: unknown }).err;
    const ex = this.#store.row();
    if (ex && isTerminalExecution(ex.status) && this.#timers.take("retention")) {
      // Reruns still read outputs of this one by reference: the data waits for the last of them (rerun.ts).
      if (isDataHeld(this.#c)) {
        this.#store.update({ retention_waiting: 1 });
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
}
