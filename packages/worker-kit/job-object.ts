import { DurableObject } from "cloudflare:workers";
import type { DataReference } from "../../schemas/data";
import type { CancelRequest, HandshakeRequest, HandshakeResponse, ProcessRequest, ProgressResponse } from "../../schemas/worker-protocol";
import { Aborted, RunContext, type RunHost } from "./context";
import { StageError, messageOf, openInput, openRef, prepareOutput, readValue, upload, type PreparedOutput } from "./data";
import { Callbacks, withRateLimits } from "./callbacks";
import { error, notFound, ok, staleAttempt, withTimeout } from "./replies";
import { type RateLimitReport, rateLimitsFrom } from "./rate-limits";
import { SCHEMA, Store, sqlOf, type CallbackKind, type JobRow, type Outcome } from "./store";
import type { Acceptance, Counters, JobInfo, KitEnv, KitOptions, Reply, RunResult, TraceHeaders, Usage, WorkerDefinition } from "./types";

interface Failure {
  code: string;
  message: string;
  retryable: boolean;
  usage?: Usage;
  /** From the provider's answer that caused it (StageError `provider`): sent with the fail callback. */
  rateLimits?: RateLimitReport[];
}

const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/**
 * The Durable Object behind every job: one object per execution stage (named
 * `{executionId}:{stageId}`), holding the latest attempt in SQLite. `process`
 * schedules the alarm; the alarm runs (and resumes) the author's `run`, then
 * sends the queued callbacks in order. Nothing waits on the work in a request,
 * and the state survives eviction.
 */
export class KitJobObject<E extends KitEnv> extends DurableObject<E> {
  private readonly store: Store;
  private readonly counters: Counters;
  private readonly callbacks: Callbacks;
  private loaded: { attempt: number; handshake: HandshakeRequest } | null = null;
  /** An alarm handler is running (getAlarm() then answers null although the handler re-arms at its end). */
  private inAlarm = false;
  private inputCache: { attempt: number; value: Promise<unknown> } | null = null;

  constructor(
    ctx: DurableObjectState,
    env: E,
    private readonly def: WorkerDefinition<E>,
    private readonly opts: KitOptions,
  ) {
    super(ctx, env);
    this.store = new Store(sqlOf(ctx.storage));
    this.counters = { get: (name) => this.store.count(name), bump: (name) => this.store.bump(name) };
    this.callbacks = new Callbacks(this.store, env.ORCHESTRATOR, opts, {
      handshakeOf: (job) => this.handshakeOf(job),
      traceOf: () => this.traceOf(),
      noteTrace: (attempt, call, trace) => this.noteTrace(attempt, call, trace),
    });
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(SCHEMA);
    });
  }

  // ---------------------------------------------------------------------------
  // Protocol calls (from the kit's fetch handler)

  async handshake(req: HandshakeRequest, trace: TraceHeaders | null = null): Promise<Reply> {
    this.noteTrace(req.attempt, "handshake", trace);
    const existing = this.store.row();
    // The same attempt again (an interrupted request repeated): the same answer, nothing restarts.
    if (existing?.attempt === req.attempt) return ok(JSON.parse(existing.response));
    if (existing && existing.attempt > req.attempt) return ok(this.refusal(req, `attempt ${req.attempt} is superseded by attempt ${existing.attempt}`, false));
    if (this.def.actions && !this.def.actions.includes(req.action)) return ok(this.refusal(req, `unsupported action '${req.action}'`, false));
    const verdict: Acceptance = this.def.accept ? await this.def.accept(req, { env: this.env, counters: this.counters }) : { accepted: true };
    if (!verdict.accepted) return ok(this.refusal(req, verdict.reason, verdict.retryable ?? false));
    const response: HandshakeResponse = {
      executionId: req.executionId,
      workerId: this.def.workerId,
      accepted: true,
      ...(verdict.estimatedCompletionMs !== undefined && { estimatedCompletionMs: verdict.estimatedCompletionMs }),
      ...(verdict.resourceRequirements && { resourceRequirements: verdict.resourceRequirements }),
      capabilities: verdict.capabilities ?? { actions: [...(this.def.actions ?? [])] },
    };
    return this.exclusive(async () => {
      const old = this.store.row();
      // Another handshake got in while `accept` ran: the same rules against it.
      if (old && old.attempt >= req.attempt) {
        return ok(old.attempt === req.attempt ? JSON.parse(old.response) : this.refusal(req, `attempt ${req.attempt} is superseded by attempt ${old.attempt}`, false));
      }
      // A higher attempt replaces the last one, which ends (cancelled) first.
      if (old) await this.endLifecycle(old, "cancelled");
      this.store.clearJob();
      this.sql`INSERT INTO kit_job (id, execution_id, stage_id, attempt, action, status, message, response, updated_at)
        VALUES (1, ${req.executionId}, ${req.stageId}, ${req.attempt}, ${req.action}, 'accepted', 'accepted',
                ${JSON.stringify(response)}, ${Date.now()})`;
      this.store.putBlob("handshake", JSON.stringify(req));
      if (trace) this.store.putBlob("trace", JSON.stringify(trace));
      this.loaded = { attempt: req.attempt, handshake: req };
      this.inputCache = null;
      await this.arm();
      return ok(response);
    });
  }

  async process(req: ProcessRequest, trace: TraceHeaders | null = null): Promise<Reply> {
    this.noteTrace(req.attempt ?? this.store.row()?.attempt ?? 0, "process", trace);
    return this.exclusive(async () => {
      const job = this.store.row();
      if (!job) return notFound();
      const stale = staleAttempt(job, req.attempt);
      if (stale) return stale;
      if (job.status === "cancelled") return error(409, "cancelled", "the job was cancelled");
      // Running or done: a repeat is a no-op.
      if (job.status !== "accepted") return { status: 202, body: { status: "processing" } };
      const info = this.info(job);
      const hooked = this.def.hooks?.beforeProcess?.(info, this.counters);
      if (hooked) return hooked;
      const onBegin = this.def.lifecycle?.onBegin;
      if (onBegin) await withTimeout(Promise.resolve(onBegin(info, this.env)), this.opts.hookTimeoutMs, "lifecycle onBegin");
      const now = Date.now();
      this.sql`UPDATE kit_job SET status = 'processing', active = 1, message = 'processing', run_at = ${now}, updated_at = ${now} WHERE id = 1`;
      await this.arm();
      return { status: 202, body: { status: "processing" } };
    });
  }

  async progress(trace: TraceHeaders | null = null): Promise<Reply> {
    const job = this.store.row();
    if (!job) return notFound();
    this.noteTrace(job.attempt, "progress", trace);
    await this.healAlarm(job);
    if (job.status === "processing") {
      const hooked = this.def.hooks?.progress?.(this.info(job));
      if (hooked) return hooked;
    }
    const usage = job.usage ? (JSON.parse(job.usage) as Usage) : undefined;
    // Held rate-limit reports ride on the poll answer too (the orchestrator applies them as from a
    // callback); they stay held for the next callback: a report applied twice changes nothing more.
    const reports = this.callbacks.due(Date.now());
    let body: ProgressResponse;
    switch (job.status) {
      case "accepted":
        body = { status: "processing", progress: 0, message: "accepted, waiting for process" };
        break;
      case "processing":
        body = { status: "processing", progress: job.progress, ...(job.message !== null && { message: job.message }) };
        break;
      case "completed":
        if (job.data_ref) {
          body = { status: "completed", progress: 100, dataReference: JSON.parse(job.data_ref) as DataReference, usage };
          break;
        }
        // The inline output is stored as JSON text: spliced in, not parsed and serialised again.
        return { status: 200, text: withRateLimits(`{"status":"completed","progress":100,"output":${this.store.getBlob("output") ?? "null"}${usage ? `,"usage":${JSON.stringify(usage)}` : ""}}`, reports) };
      case "failed":
        body = { status: "failed", progress: job.progress, error: JSON.parse(job.error ?? "{}"), retryable: job.retryable === 1, usage };
        break;
      case "cancelled":
        // The protocol has no "cancelled" progress status: a final failure.
        body = { status: "failed", error: { code: "cancelled", message: "the job was cancelled" }, retryable: false };
        break;
    }
    return ok(reports.length ? { ...body, rate_limits: reports } : body);
  }

  async cancel(req: CancelRequest, trace: TraceHeaders | null = null): Promise<Reply> {
    this.noteTrace(req.attempt ?? this.store.row()?.attempt ?? 0, "cancel", trace);
    return this.exclusive(async () => {
      const job = this.store.row();
      if (!job) return notFound();
      const stale = staleAttempt(job, req.attempt);
      if (stale) return stale;
      if (job.status === "completed" || job.status === "failed") return ok({ cancelled: false, status: job.status });
      if (job.status !== "cancelled") {
        this.sql`UPDATE kit_job SET status = 'cancelled', run_at = NULL, message = 'cancelled', updated_at = ${Date.now()} WHERE id = 1`;
        this.sql`DELETE FROM kit_outbox`;
        this.inputCache = null;
        await this.endLifecycle(job, "cancelled");
        await this.arm();
      }
      return ok({ cancelled: true });
    });
  }

  /** The job's state and what it sent (`GET /api/jobs/...`): for operators and tests, not part of the protocol. */
  inspect(): Reply {
    const job = this.store.row();
    if (!job) return notFound();
    return ok({
      executionId: job.execution_id,
      stageId: job.stage_id,
      attempt: job.attempt,
      action: job.action,
      status: job.status,
      progress: job.progress,
      message: job.message,
      dataReference: job.data_ref ? JSON.parse(job.data_ref) : null,
      usage: job.usage ? JSON.parse(job.usage) : null,
      error: job.error ? JSON.parse(job.error) : null,
      lifecycle: { active: job.active === 1, end_owed: job.end_owed },
      pending_callbacks: this.sql<{ n: number }>`SELECT COUNT(*) AS n FROM kit_outbox`[0].n,
      log: this.store.logEntries(),
    });
  }

  override async alarm(): Promise<void> {
    this.inAlarm = true;
    try {
      const job = this.store.row();
      if (!job) return;
      if (Date.now() >= job.updated_at + this.opts.retentionMs) return this.expire(job);
      const due = job.status === "processing" && job.run_at !== null && job.run_at <= Date.now();
      // The work and the callbacks side by side: a slow orchestrator delays the callbacks, not the work.
      // Whatever the run queued after the delivery loop ended is due at once: arm() calls the alarm back.
      await Promise.all([due ? this.drive(job) : null, this.callbacks.deliver()]);
      await this.exclusive(() => this.settleOwedEnd());
      await this.arm();
    } finally {
      this.inAlarm = false;
    }
  }

  // ---------------------------------------------------------------------------
  // Running the work

  /** Runs (or resumes) `run`, then finishes the job: inline or uploaded output, or a failure. */
  private async drive(job: JobRow): Promise<void> {
    const handshake = this.handshakeOf(job);
    const run = new RunContext<E>(this.runHost(), handshake, this.env, this.traceOf());
    let result: { ok: true; value: RunResult } | { ok: false; error: unknown };
    try {
      result = { ok: true, value: await this.def.run(run) };
    } catch (error) {
      result = { ok: false, error };
    }
    if (!this.isLive(job.attempt)) return; // cancelled or replaced meanwhile
    if (run.suspendedUntil !== null) {
      const at = Number.isFinite(run.suspendedUntil) ? run.suspendedUntil : null;
      this.sql`UPDATE kit_job SET run_at = ${at}, updated_at = ${Date.now()} WHERE id = 1 AND attempt = ${job.attempt}`;
      return;
    }
    if (!result.ok) return this.finish(job, { failure: this.failureOf(result.error) });
    const usage = result.value.usage;
    let prepared: PreparedOutput;
    try {
      prepared = await prepareOutput(result.value.output, this.opts);
    } catch (err) {
      return this.finish(job, { failure: { ...this.failureOf(err), usage } });
    }
    if (prepared.kind === "inline") return this.finish(job, { inline: prepared.json, usage });

    const up = await upload(this.env.ORCHESTRATOR, handshake, prepared, this.opts.uploadTimeoutMs);
    this.store.log(job.attempt, "upload", up.status, up.ok ? `${up.ref.kind} ${up.ref.size} bytes` : up.message.slice(0, 300));
    if (!this.isLive(job.attempt)) return;
    if (up.ok) return this.finish(job, { ref: up.ref, usage });
    if (up.status === 409 && !up.transient) {
      // The orchestrator no longer runs this attempt: nobody is listening for a callback.
      return this.finish(job, { failure: { code: "stage_ended", message: up.message, retryable: false, usage }, notify: false });
    }
    const cur = this.store.row()!;
    if (up.transient && cur.run_failures + 1 < this.opts.uploadMaxTries) {
      // The run is replayed later (its steps are memoised), producing the output again.
      const at = Date.now() + this.opts.uploadBackoffMs * 2 ** cur.run_failures;
      this.sql`UPDATE kit_job SET run_failures = run_failures + 1, run_at = ${at}, updated_at = ${Date.now()} WHERE id = 1`;
      return;
    }
    const code = up.status === 413 ? "output_too_large" : "upload_failed";
    return this.finish(job, { failure: { code, message: up.message, retryable: up.transient, usage } });
  }

  private failureOf(err: unknown): Failure {
    if (err instanceof StageError) {
      const rateLimits = err.provider ? rateLimitsFrom(err.provider.response, err.provider.pool) : undefined;
      return { code: err.code, message: err.message, retryable: err.retryable, usage: err.usage, rateLimits };
    }
    if (err instanceof Aborted) return { code: "cancelled", message: err.message, retryable: false };
    return { code: this.def.errorCode ?? "worker_error", message: messageOf(err), retryable: false };
  }

  /** Ends the job: lifecycle end first (the result must not be visible before), then the state and the callbacks. */
  private async finish(
    job: JobRow,
    end: { inline: string; usage?: Usage } | { ref: DataReference; usage?: Usage } | { failure: Failure; notify?: boolean },
  ): Promise<void> {
    await this.exclusive(async () => {
      if (!this.isLive(job.attempt)) return;
      const outcome: Outcome = "failure" in end ? "failed" : "completed";
      await this.endLifecycle(this.store.row()!, outcome);
      const now = Date.now();
      const usage = ("failure" in end ? end.failure.usage : end.usage) ?? null;
      const usageText = usage ? JSON.stringify(usage) : null;
      this.sql`DELETE FROM kit_blob WHERE name LIKE 'memo:%'`;
      this.inputCache = null;
      const info = this.info(job);
      const token = this.handshakeOf(job).callback.token;
      if ("failure" in end) {
        const f = end.failure;
        const errorText = JSON.stringify({ code: f.code.slice(0, 64), message: f.message.slice(0, 2000) });
        this.sql`UPDATE kit_job SET status = 'failed', message = 'failed', usage = ${usageText}, error = ${errorText},
          retryable = ${f.retryable ? 1 : 0}, run_at = NULL, updated_at = ${now} WHERE id = 1`;
        if (f.rateLimits?.length) this.holdRateLimits(f.rateLimits, now);
        if (end.notify !== false) this.enqueueFinal(info, "fail", token);
        return;
      }
      if ("inline" in end) this.store.putBlob("output", end.inline);
      const ref = "ref" in end ? JSON.stringify(end.ref) : null;
      this.sql`UPDATE kit_job SET status = 'completed', progress = 100, message = 'completed', usage = ${usageText},
        data_ref = ${ref}, run_at = NULL, updated_at = ${now} WHERE id = 1`;
      this.enqueueFinal(info, "complete", token);
    });
  }

  private enqueueFinal(info: JobInfo, kind: "complete" | "fail", token: string): void {
    const tokens = this.def.hooks?.callbackTokens?.(info, kind, token) ?? [token];
    for (const t of tokens) this.store.enqueue(kind, null, t === token ? null : t);
  }

  private holdRateLimits(reports: RateLimitReport[], now: number): void {
    this.callbacks.hold(reports, now);
  }

  private runHost(): RunHost {
    return {
      store: this.store,
      counters: this.counters,
      isLive: (attempt) => this.isLive(attempt),
      input: (handshake) => this.input(handshake),
      readInput: (handshake) => openInput(this.env.ORCHESTRATOR, handshake, this.opts.dataTimeoutMs),
      openRef: (handshake, ref) => openRef(this.env.ORCHESTRATOR, handshake, ref, { timeoutMs: this.opts.dataTimeoutMs, maxBytes: this.opts.maxReadBytes }),
      maxReadBytes: this.opts.maxReadBytes,
      reportProgress: (attempt, percent, message, memo) => {
        if (!this.isLive(attempt)) throw new Aborted();
        this.sql`UPDATE kit_job SET progress = ${percent}, message = ${message ?? null}, updated_at = ${Date.now()} WHERE id = 1`;
        this.store.enqueue("progress", JSON.stringify({ progress: percent, ...(message !== undefined && { message }) }));
        this.store.putBlob(memo, "1");
      },
      holdRateLimits: (attempt, reports) => {
        if (!this.isLive(attempt)) throw new Aborted();
        this.holdRateLimits(reports, Date.now());
      },
    };
  }

  /** The previous output as a value, read once per attempt while the object stays in memory. */
  private input(handshake: HandshakeRequest): Promise<unknown> {
    if (this.inputCache?.attempt !== handshake.attempt) {
      const value = this.loadInput(handshake);
      const entry = { attempt: handshake.attempt, value };
      this.inputCache = entry;
      // A failed read is not kept: a resumed run asks again.
      value.catch(() => {
        if (this.inputCache === entry) this.inputCache = null;
      });
    }
    return this.inputCache!.value;
  }

  private async loadInput(handshake: HandshakeRequest): Promise<unknown> {
    const ref = handshake.dataReference;
    if (!ref) return handshake.inputData.previousOutput;
    const stream = await openInput(this.env.ORCHESTRATOR, handshake, this.opts.dataTimeoutMs);
    return readValue(stream!, ref.key, ref.contentType);
  }

  // ---------------------------------------------------------------------------
  // Callbacks

  // ---------------------------------------------------------------------------
  // Lifecycle, alarm, storage

  /** Calls `onEnd` for an active job; a failure is owed and retried from the alarm. True when settled. */
  private async endLifecycle(job: JobRow, outcome: Outcome): Promise<boolean> {
    if (!job.active) return true;
    const onEnd = this.def.lifecycle?.onEnd;
    if (onEnd) {
      try {
        await withTimeout(Promise.resolve(onEnd(this.info(job), outcome, this.env)), this.opts.hookTimeoutMs, "lifecycle onEnd");
      } catch (err) {
        console.warn(`lifecycle onEnd failed: ${messageOf(err)}`);
        this.sql`UPDATE kit_job SET active = 0, end_owed = ${outcome} WHERE id = 1 AND attempt = ${job.attempt}`;
        return false;
      }
    }
    this.sql`UPDATE kit_job SET active = 0, end_owed = NULL WHERE id = 1 AND attempt = ${job.attempt}`;
    return true;
  }

  private async settleOwedEnd(): Promise<void> {
    const job = this.store.row();
    if (!job?.end_owed || !TERMINAL.has(job.status)) return;
    await this.endLifecycle({ ...job, active: 1 }, job.end_owed as Outcome);
  }

  /**
   * A job with work or callbacks still due must have its alarm set; every
   * progress poll checks, so a job whose alarm was lost (the runtime killed
   * mid-run) resumes at the orchestrator's next poll instead of reporting the
   * same progress until the stage's deadline.
   */
  private async healAlarm(job: JobRow): Promise<void> {
    const owed = (job.status === "processing" && job.run_at !== null) || this.store.outboxHead() !== null || job.end_owed !== null;
    if (!owed || this.inAlarm || (await this.ctx.storage.getAlarm()) !== null) return;
    console.warn(`job ${job.execution_id}:${job.stage_id} had work due and no alarm: re-armed`);
    await this.arm();
  }

  /** One alarm for everything: the next run, the next callback, an owed lifecycle end, retention. */
  private async arm(): Promise<void> {
    const job = this.store.row();
    if (!job) return this.ctx.storage.deleteAlarm();
    let at = job.updated_at + this.opts.retentionMs;
    if (job.status === "processing" && job.run_at !== null) at = Math.min(at, job.run_at);
    const head = this.store.outboxHead();
    if (head) at = Math.min(at, head.next_at);
    if (job.end_owed) at = Math.min(at, Date.now() + this.opts.endRetryMs);
    await this.ctx.storage.setAlarm(at);
  }

  private async expire(job: JobRow): Promise<void> {
    await this.endLifecycle(job, "cancelled");
    this.loaded = null;
    this.inputCache = null;
    await this.ctx.storage.deleteAlarm();
    await this.ctx.storage.deleteAll();
  }

  /**
   * Runs `fn` with no other request or alarm delivered to this object, even
   * across its awaits. Only for short calls (lifecycle hooks), never callbacks.
   */
  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const result = await this.ctx.blockConcurrencyWhile(async () => {
      // Caught here: a throw out of blockConcurrencyWhile would reset the object.
      try {
        return { ok: true as const, value: await fn() };
      } catch (error) {
        return { ok: false as const, error };
      }
    });
    if (!result.ok) throw result.error;
    return result.value;
  }

  private isLive(attempt: number): boolean {
    const now = this.store.row();
    return now?.attempt === attempt && now.status === "processing";
  }

  private handshakeOf(job: JobRow): HandshakeRequest {
    if (this.loaded?.attempt !== job.attempt) {
      this.loaded = { attempt: job.attempt, handshake: JSON.parse(this.store.getBlob("handshake") ?? "null") as HandshakeRequest };
    }
    return this.loaded.handshake;
  }

  private info(job: JobRow): JobInfo {
    const handshake = this.handshakeOf(job);
    return {
      executionId: job.execution_id,
      stageId: job.stage_id,
      attempt: job.attempt,
      action: job.action,
      parameters: handshake.inputData.parameters,
      handshake,
      trace: this.traceOf(),
    };
  }

  /** The attempt's trace context, as its handshake brought it. */
  private traceOf(): TraceHeaders | null {
    const text = this.store.getBlob("trace");
    return text ? (JSON.parse(text) as TraceHeaders) : null;
  }

  /** Each call's traceparent, received or sent back, goes to the job's log (GET /api/jobs), so every call's trace can be checked. */
  private noteTrace(attempt: number, call: string, trace: TraceHeaders | null): void {
    if (trace) this.store.log(attempt, `traceparent:${call}`, 200, trace.traceparent);
    if (trace?.tracestate) this.store.log(attempt, `tracestate:${call}`, 200, trace.tracestate);
  }

  private refusal(req: HandshakeRequest, reason: string, retryable: boolean): HandshakeResponse {
    return {
      executionId: req.executionId,
      workerId: this.def.workerId,
      accepted: false,
      reason: reason.slice(0, 500),
      retryable,
      capabilities: { actions: [...(this.def.actions ?? [])] },
    };
  }

  private get sql() {
    return this.store.sql;
  }
}
