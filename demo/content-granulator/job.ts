import { DurableObject } from "cloudflare:workers";
import { execScript, sqlOf, type Sql } from "../../actors/sql";
import type { HandshakeRequest, HandshakeResponse, ProgressResponse } from "../../schemas/worker-protocol";
import {
  COUNTERS,
  completeCallbacks,
  faultFor,
  faultOutput,
  forgeToken,
  handshakeRefusal,
  outcomeOf,
  processCallFails,
  progressAt,
  runsSteps,
  stalledProgress,
  stepCount,
  type Fault,
  type Outcome,
} from "./faults";
import type { GranulatorEnv } from "./index";
import type { JobOutcome } from "./stats";
import { ACTIONS, intParam, isAction, prepare, usageOf, type Action, type Work } from "./work";

export const WORKER_ID = "bitware-content-granulator";

/** What the job answers; the front worker turns it into an HTTP response. */
export interface Reply {
  status: number;
  body?: unknown;
  /** Raw body instead of JSON (the `malformed` fault). */
  text?: string;
}

type Status = "accepted" | "processing" | "completed" | "failed" | "cancelled";
type CallbackKind = "progress" | "complete" | "fail";

interface JobRow {
  job_key: string;
  attempt: number;
  action: string;
  status: Status;
  steps: number;
  step_ms: number;
  step: number;
  next_step_at: number | null;
  progress: number;
  message: string | null;
  words: number;
  work_ms: number;
  usage: string | null;
  error: string | null;
  retryable: number | null;
  stats_key: string | null;
  response: string;
  updated_at: number;
}

interface OutboxRow {
  seq: number;
  kind: CallbackKind;
  body: string | null;
  forged: number;
  tries: number;
  next_at: number;
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS job (
  id INTEGER PRIMARY KEY CHECK (id = 1),  -- one job (the latest attempt) per object
  job_key TEXT NOT NULL,                   -- "{executionId}:{stageId}", the object's name
  attempt INTEGER NOT NULL,
  action TEXT NOT NULL,
  status TEXT NOT NULL,                    -- accepted | processing | completed | failed | cancelled
  steps INTEGER NOT NULL,
  step_ms INTEGER NOT NULL,
  step INTEGER NOT NULL DEFAULT 0,         -- steps done
  next_step_at INTEGER,                    -- when the alarm runs the next step
  progress REAL NOT NULL DEFAULT 0,
  message TEXT,
  words INTEGER NOT NULL DEFAULT 0,        -- words generated so far (billed as tokens)
  work_ms REAL NOT NULL DEFAULT 0,
  usage TEXT,                              -- JSON, once ended
  error TEXT,                              -- JSON {code, message}, when failed
  retryable INTEGER,
  stats_key TEXT,                          -- set while GranulatorStats counts this attempt
  response TEXT NOT NULL,                  -- the handshake answer, replayed for a repeated handshake
  updated_at INTEGER NOT NULL
);
-- Handshake, work parts and output, chunked: SQLite refuses values over 2 MB.
CREATE TABLE IF NOT EXISTS blob (name TEXT NOT NULL, seq INTEGER NOT NULL, chunk TEXT NOT NULL, PRIMARY KEY (name, seq));
-- Callbacks still to send, strictly in order. complete/fail bodies are built at send time.
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  body TEXT,
  forged INTEGER NOT NULL DEFAULT 0,
  tries INTEGER NOT NULL DEFAULT 0,
  next_at INTEGER NOT NULL
);
-- Fault counters survive a new attempt replacing the job.
CREATE TABLE IF NOT EXISTS fault_count (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
`;

const CALLBACK_TIMEOUT_MS = 5_000;
const CALLBACK_MAX_TRIES = 3;
const CALLBACK_BACKOFF_MS = 250;
const DATA_TIMEOUT_MS = 10_000;
const STATS_TIMEOUT_MS = 5_000;
const STATS_RETRY_MS = 1_000;
/** A job untouched this long is deleted by its alarm. */
const RETENTION_MS = 24 * 3600_000;
/** UTF-16 units per chunk: at most 1.5 MB of UTF-8. */
const CHUNK_CHARS = 500_000;

/** The current attempt's handshake, parsed once per attempt while the object stays in memory. */
interface Loaded {
  attempt: number;
  handshake: HandshakeRequest;
  fault: Fault | null;
  work?: Work;
}

const TERMINAL: readonly Status[] = ["completed", "failed", "cancelled"];

/**
 * One stage job, named `{executionId}:{stageId}`. The handshake stores the
 * request, `process` starts the work, and the alarm drives it: each run does one
 * step (a slice of the work units) and sends what is due from the outbox, so
 * progress survives eviction and no request waits on the work.
 */
export class GranulatorJob extends DurableObject<GranulatorEnv> {
  private sql: Sql;
  private loaded: Loaded | null = null;

  constructor(ctx: DurableObjectState, env: GranulatorEnv) {
    super(ctx, env);
    this.sql = sqlOf(ctx.storage);
    ctx.blockConcurrencyWhile(async () => execScript(ctx.storage, SCHEMA));
  }

  async handshake(req: HandshakeRequest): Promise<Reply> {
    const existing = this.row();
    // Same attempt again (a retried request): the same answer, nothing restarts.
    if (existing?.attempt === req.attempt) return ok(JSON.parse(existing.response));
    if (existing && existing.attempt > req.attempt) {
      return ok(refusal(req, `attempt ${req.attempt} is superseded by attempt ${existing.attempt}`, false));
    }
    if (!isAction(req.action)) return ok(refusal(req, `unsupported action '${req.action}'`, false));
    const found = faultFor(req.inputData.parameters, req.stageId);
    if ("error" in found) return ok(refusal(req, found.error, false));
    const refused = handshakeRefusal(found.fault, this.count(COUNTERS.refused));
    if (refused) {
      this.bump(COUNTERS.refused);
      return ok(refusal(req, refused.reason, refused.retryable));
    }

    const params = req.inputData.parameters;
    const steps = stepCount(found.fault, intParam(params.steps, 4, 1, 50));
    const stepMs = intParam(params.step_ms, 50, 0, 60_000);
    // With the input offloaded, the work is prepared once it is fetched (first step).
    const needsData = req.inputData.previousOutput == null && req.dataReference !== undefined;
    const work = prepare(req.action, params, needsData ? null : req.inputData.previousOutput);
    const response: HandshakeResponse = {
      executionId: req.executionId,
      workerId: WORKER_ID,
      accepted: true,
      estimatedCompletionMs: steps * (stepMs + 10),
      resourceRequirements: { estimatedTokens: usageOf(work.estimatedWords, 0)["tokens:openai"] },
      capabilities: { actions: [...ACTIONS] },
    };

    return this.exclusive(async () => {
      // A higher attempt replaces the last one; the stats must see it end first.
      const old = this.row();
      if (old?.stats_key) await this.endStats(old.stats_key, "cancelled");
      this.clear();
      const now = Date.now();
      this.sql`INSERT INTO job (id, job_key, attempt, action, status, steps, step_ms, message, response, updated_at)
        VALUES (1, ${`${req.executionId}:${req.stageId}`}, ${req.attempt}, ${req.action}, 'accepted', ${steps}, ${stepMs},
                'accepted', ${JSON.stringify(response)}, ${now})`;
      this.putBlob("handshake", JSON.stringify(req));
      this.loaded = { attempt: req.attempt, handshake: req, fault: found.fault, work: needsData ? undefined : work };
      await this.arm();
      return ok(response);
    });
  }

  async process(): Promise<Reply> {
    return this.exclusive(async () => {
      const job = this.row();
      if (!job) return notFound();
      if (job.status === "cancelled") return error(409, "cancelled", "the job was cancelled");
      if (job.status !== "accepted") return { status: 202, body: { status: "processing" } }; // running or done: no-op

      const { fault } = this.load(job);
      const callsSoFar = this.count(COUNTERS.processCalls);
      this.bump(COUNTERS.processCalls);
      if (processCallFails(fault, callsSoFar)) return error(500, "internal_error", "process failed (fault injected)");

      const statsKey = `${job.job_key}#${job.attempt}`;
      await withTimeout(this.stats().begin(statsKey), STATS_TIMEOUT_MS, "stats begin");
      const now = Date.now();
      const nextStep = runsSteps(fault) ? now + job.step_ms : null;
      this.sql`UPDATE job SET status = 'processing', stats_key = ${statsKey}, message = 'processing',
        next_step_at = ${nextStep}, updated_at = ${now} WHERE id = 1`;
      await this.arm();
      return { status: 202, body: { status: "processing" } };
    });
  }

  progress(): Reply {
    const job = this.row();
    if (!job) return notFound();
    if (job.status === "processing") {
      const stalled = stalledProgress(this.load(job).fault);
      if (stalled) return stalled;
    }
    const usage = job.usage ? JSON.parse(job.usage) : undefined;
    let body: ProgressResponse;
    switch (job.status) {
      case "accepted":
        body = { status: "processing", progress: 0, message: "accepted, waiting for process" };
        break;
      case "processing":
        body = { status: "processing", progress: job.progress, message: job.message ?? undefined };
        break;
      case "completed":
        body = { status: "completed", progress: 100, output: JSON.parse(this.getBlob("output") ?? "null"), usage };
        break;
      case "failed":
        body = { status: "failed", progress: job.progress, error: JSON.parse(job.error ?? "{}"), retryable: job.retryable === 1, usage };
        break;
      case "cancelled":
        // The protocol has no "cancelled" progress status: report it as a final failure.
        body = { status: "failed", error: { code: "cancelled", message: "the job was cancelled" }, retryable: false };
        break;
    }
    return ok(body);
  }

  async cancel(): Promise<Reply> {
    return this.exclusive(async () => {
      const job = this.row();
      if (!job) return notFound();
      if (job.status === "completed" || job.status === "failed") return ok({ cancelled: false, status: job.status });
      if (job.status !== "cancelled") {
        this.sql`UPDATE job SET status = 'cancelled', next_step_at = NULL, message = 'cancelled', updated_at = ${Date.now()} WHERE id = 1`;
        this.sql`DELETE FROM outbox`;
        await this.retryStats();
        await this.arm();
      }
      return ok({ cancelled: true });
    });
  }

  override async alarm(): Promise<void> {
    const job = this.row();
    if (!job) return;
    if (Date.now() >= job.updated_at + RETENTION_MS) return this.expire(job);
    if (job.status === "processing" && job.next_step_at !== null && job.next_step_at <= Date.now()) {
      await this.step(job);
    }
    await this.deliver();
    await this.exclusive(() => this.retryStats());
    await this.arm();
  }

  // -------------------------------------------------------------------------
  // The work

  /** One step: the next slice of work units, then a progress callback, or the result after the last. */
  private async step(job: JobRow): Promise<void> {
    const started = Date.now();
    let work: Work;
    let fault: Fault | null;
    try {
      ({ work, fault } = await this.prepared(job));
    } catch (err) {
      const outcome: Outcome = { kind: "fail", code: "data_unavailable", message: messageOf(err), retryable: true };
      return this.finish(job, outcome, null, job.words, job.work_ms + Date.now() - started, null);
    }
    if (!this.isCurrent(job)) return; // cancelled or replaced while the input was fetched

    try {
      const step = job.step + 1;
      const from = Math.floor(((step - 1) * work.units) / job.steps);
      const to = Math.floor((step * work.units) / job.steps);
      let words = job.words;
      for (let i = from; i < to; i++) {
        const piece = work.unit(i);
        this.putBlob(`part:${i}`, JSON.stringify(piece.value ?? null));
        words += piece.words;
      }

      if (step < job.steps) {
        const now = Date.now();
        const progress = progressAt(fault, step, job.steps);
        const message = `step ${step}/${job.steps} (${job.action})`;
        this.sql`UPDATE job SET step = ${step}, progress = ${progress}, message = ${message}, words = ${words},
          work_ms = ${job.work_ms + now - started}, next_step_at = ${now + job.step_ms}, updated_at = ${now} WHERE id = 1`;
        this.enqueue("progress", JSON.stringify({ progress, message }));
        return;
      }

      const parts = Array.from({ length: work.units }, (_, i) => JSON.parse(this.getBlob(`part:${i}`) ?? "null"));
      const result = faultOutput(fault, this.load(job).handshake.inputData.parameters) ?? work.assemble(parts);
      const outcome = outcomeOf(fault, this.count(COUNTERS.failures));
      await this.finish(job, outcome, result.value, words + result.words, job.work_ms + Date.now() - started, fault);
    } catch (err) {
      // A bug or an input the work cannot handle: asking again would fail the same way.
      const outcome: Outcome = { kind: "fail", code: "granulation_failed", message: messageOf(err), retryable: false };
      await this.finish(job, outcome, null, job.words, job.work_ms + Date.now() - started, null);
    }
  }

  private async finish(
    job: JobRow,
    outcome: Outcome,
    output: unknown,
    words: number,
    workMs: number,
    fault: Fault | null,
  ): Promise<void> {
    await this.exclusive(async () => {
      if (!this.isCurrent(job)) return;
      const status: JobOutcome = outcome.kind === "complete" ? "completed" : "failed";
      // Stats first: once the orchestrator sees this end it may start the next job at once.
      let statsKey = this.row()?.stats_key ?? null;
      if (statsKey && (await this.endStats(statsKey, status))) statsKey = null;

      const usage = JSON.stringify(usageOf(words, workMs));
      const now = Date.now();
      if (outcome.kind === "complete") {
        this.putBlob("output", JSON.stringify(output ?? null));
        this.sql`UPDATE job SET status = 'completed', step = steps, progress = 100, message = 'completed', words = ${words},
          work_ms = ${workMs}, usage = ${usage}, next_step_at = NULL, stats_key = ${statsKey}, updated_at = ${now} WHERE id = 1`;
        for (const cb of completeCallbacks(fault)) this.enqueue("complete", null, cb.forged);
      } else {
        this.bump(COUNTERS.failures);
        const error = JSON.stringify({ code: outcome.code, message: outcome.message.slice(0, 2000) });
        this.sql`UPDATE job SET status = 'failed', message = 'failed', words = ${words}, work_ms = ${workMs}, usage = ${usage},
          error = ${error}, retryable = ${outcome.retryable ? 1 : 0}, next_step_at = NULL, stats_key = ${statsKey},
          updated_at = ${now} WHERE id = 1`;
        this.enqueue("fail", null);
      }
    });
  }

  /** The attempt's work, preparing it (and fetching an offloaded input) after an eviction. */
  private async prepared(job: JobRow): Promise<{ work: Work; fault: Fault | null }> {
    const loaded = this.load(job);
    if (loaded.work) return { work: loaded.work, fault: loaded.fault };
    const { handshake } = loaded;
    let previous: unknown = handshake.inputData.previousOutput;
    if (previous == null && handshake.dataReference) {
      const stored = this.getBlob("previous");
      if (stored !== null) {
        previous = JSON.parse(stored);
      } else {
        previous = await this.fetchData(handshake);
        if (this.isCurrent(job)) this.putBlob("previous", JSON.stringify(previous));
      }
    }
    const work = prepare(handshake.action as Action, handshake.inputData.parameters, previous);
    if (this.loaded === loaded) loaded.work = work;
    return { work, fault: loaded.fault };
  }

  /** Reads an input the orchestrator offloaded (`GET /data/:key`), checking its size and digest. */
  private async fetchData(handshake: HandshakeRequest): Promise<unknown> {
    const ref = handshake.dataReference!;
    const url = `${new URL(handshake.callback.url).origin}/data/${encodeURIComponent(ref.key)}`;
    const res = await this.env.ORCHESTRATOR.fetch(url, {
      headers: { authorization: `Bearer ${handshake.callback.token}` },
      signal: AbortSignal.timeout(DATA_TIMEOUT_MS),
    });
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(`GET /data/${ref.key} answered ${res.status}`);
    }
    const bytes = new Uint8Array(await res.arrayBuffer());
    if (bytes.byteLength !== ref.size) throw new Error(`data ${ref.key}: ${bytes.byteLength} bytes, expected ${ref.size}`);
    const digest = [...new Uint8Array(await crypto.subtle.digest("SHA-256", bytes))]
      .map((b) => b.toString(16).padStart(2, "0"))
      .join("");
    if (digest !== ref.sha256) throw new Error(`data ${ref.key}: sha256 mismatch`);
    const text = new TextDecoder().decode(bytes);
    return ref.contentType.includes("json") ? JSON.parse(text) : text;
  }

  // -------------------------------------------------------------------------
  // Callbacks

  private enqueue(kind: CallbackKind, body: string | null, forged = false): void {
    this.sql`INSERT INTO outbox (kind, body, forged, next_at) VALUES (${kind}, ${body}, ${forged ? 1 : 0}, ${Date.now()})`;
  }

  /**
   * Sends due callbacks in order. Progress is best effort (one try); complete
   * and fail get a few tries on the following alarm runs, then are dropped:
   * the result stays here and the orchestrator's polling picks it up.
   */
  private async deliver(): Promise<void> {
    for (;;) {
      const head = this.sql<OutboxRow>`SELECT * FROM outbox ORDER BY seq LIMIT 1`[0];
      if (!head || head.next_at > Date.now()) return;
      const job = this.row();
      if (!job) return;
      const { callback } = this.load(job).handshake;
      const token = head.forged ? forgeToken(callback.token) : callback.token;
      const body = head.body ?? JSON.stringify(this.resultBody(job, head.kind));
      const result = await this.post(`${callback.url.replace(/\/+$/, "")}/${head.kind}`, token, body);
      // The entry may be gone by now (cancelled or replaced): both statements are then no-ops.
      if (result === "retry" && head.kind !== "progress" && head.tries + 1 < CALLBACK_MAX_TRIES) {
        const at = Date.now() + CALLBACK_BACKOFF_MS * 2 ** head.tries;
        this.sql`UPDATE outbox SET tries = tries + 1, next_at = ${at} WHERE seq = ${head.seq}`;
      } else {
        this.sql`DELETE FROM outbox WHERE seq = ${head.seq}`;
      }
    }
  }

  private resultBody(job: JobRow, kind: CallbackKind): unknown {
    const usage = job.usage ? JSON.parse(job.usage) : undefined;
    if (kind === "complete") return { output: JSON.parse(this.getBlob("output") ?? "null"), usage };
    return { error: JSON.parse(job.error ?? "{}"), retryable: job.retryable === 1, usage };
  }

  private async post(url: string, token: string, body: string): Promise<"settled" | "retry"> {
    try {
      // The binding routes the request; the URL's host is informational.
      const res = await this.env.ORCHESTRATOR.fetch(url, {
        method: "POST",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
        body,
        signal: AbortSignal.timeout(CALLBACK_TIMEOUT_MS),
      });
      await res.body?.cancel();
      if (res.ok || res.status === 409) return "settled"; // 409: the orchestrator already has a final result
      console.warn(`callback ${url} answered ${res.status}`);
      // Asking again helps only when the orchestrator could not answer; another 4xx will not change.
      return res.status >= 500 || res.status === 408 || res.status === 429 ? "retry" : "settled";
    } catch (err) {
      console.warn(`callback ${url} failed: ${messageOf(err)}`);
      return "retry";
    }
  }

  // -------------------------------------------------------------------------
  // Stats, alarm, storage

  private stats() {
    return this.env.STATS.get(this.env.STATS.idFromName("global"));
  }

  /** Ends `key` in the stats; false (and logged) when the stats object could not be reached. */
  private async endStats(key: string, outcome: JobOutcome): Promise<boolean> {
    try {
      await withTimeout(this.stats().end(key, outcome), STATS_TIMEOUT_MS, "stats end");
      return true;
    } catch (err) {
      console.warn(`stats end ${key} failed: ${messageOf(err)}`);
      return false;
    }
  }

  /** A job that ended but whose stats end did not get through tries again (from the alarm). */
  private async retryStats(): Promise<void> {
    const job = this.row();
    if (!job?.stats_key || !TERMINAL.includes(job.status)) return;
    if (await this.endStats(job.stats_key, job.status as JobOutcome)) {
      this.sql`UPDATE job SET stats_key = NULL WHERE id = 1 AND stats_key = ${job.stats_key}`;
    }
  }

  /** One alarm for everything: the next step, the next callback, a stats retry, retention. */
  private async arm(): Promise<void> {
    const job = this.row();
    if (!job) return this.ctx.storage.deleteAlarm();
    let at = job.updated_at + RETENTION_MS;
    if (job.status === "processing" && job.next_step_at !== null) at = Math.min(at, job.next_step_at);
    const head = this.sql<{ next_at: number }>`SELECT next_at FROM outbox ORDER BY seq LIMIT 1`[0];
    if (head) at = Math.min(at, head.next_at);
    if (job.stats_key && TERMINAL.includes(job.status)) at = Math.min(at, Date.now() + STATS_RETRY_MS);
    await this.ctx.storage.setAlarm(at);
  }

  private async expire(job: JobRow): Promise<void> {
    if (job.stats_key) await this.endStats(job.stats_key, "cancelled");
    this.loaded = null;
    await this.ctx.storage.deleteAlarm();
    await this.ctx.storage.deleteAll();
  }

  /**
   * Runs `fn` with no other request or alarm delivered to this object, even
   * across its awaits. Only for short calls to the stats object, never callbacks.
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

  private row(): JobRow | undefined {
    return this.sql<JobRow>`SELECT * FROM job WHERE id = 1`[0];
  }

  /** Still the same attempt, still processing (not cancelled or replaced meanwhile). */
  private isCurrent(job: JobRow): boolean {
    const now = this.row();
    return now?.attempt === job.attempt && now.status === "processing";
  }

  private load(job: JobRow): Loaded {
    if (this.loaded?.attempt !== job.attempt) {
      const handshake = JSON.parse(this.getBlob("handshake") ?? "null") as HandshakeRequest;
      const found = faultFor(handshake.inputData.parameters, handshake.stageId);
      this.loaded = { attempt: job.attempt, handshake, fault: "fault" in found ? found.fault : null };
    }
    return this.loaded;
  }

  private clear(): void {
    this.sql`DELETE FROM job`;
    this.sql`DELETE FROM blob`;
    this.sql`DELETE FROM outbox`;
    this.loaded = null;
  }

  private count(name: string): number {
    return this.sql<{ n: number }>`SELECT n FROM fault_count WHERE name = ${name}`[0]?.n ?? 0;
  }

  private bump(name: string): void {
    this.sql`INSERT INTO fault_count (name, n) VALUES (${name}, 1) ON CONFLICT (name) DO UPDATE SET n = n + 1`;
  }

  private putBlob(name: string, text: string): void {
    this.sql`DELETE FROM blob WHERE name = ${name}`;
    let seq = 0;
    let at = 0;
    do {
      let end = Math.min(text.length, at + CHUNK_CHARS);
      // Never split a surrogate pair: half of one does not survive the trip through UTF-8.
      const last = text.charCodeAt(end - 1);
      if (end < text.length && last >= 0xd800 && last <= 0xdbff) end--;
      this.sql`INSERT INTO blob (name, seq, chunk) VALUES (${name}, ${seq++}, ${text.slice(at, end)})`;
      at = end;
    } while (at < text.length);
  }

  private getBlob(name: string): string | null {
    const rows = this.sql<{ chunk: string }>`SELECT chunk FROM blob WHERE name = ${name} ORDER BY seq`;
    return rows.length === 0 ? null : rows.map((r) => r.chunk).join("");
  }
}

function ok(body: unknown): Reply {
  return { status: 200, body };
}

function error(status: number, code: string, message: string): Reply {
  return { status, body: { error: { code, message } } };
}

function notFound(): Reply {
  return error(404, "not_found", "no job for this execution and stage");
}

function refusal(req: HandshakeRequest, reason: string, retryable: boolean): HandshakeResponse {
  return {
    executionId: req.executionId,
    workerId: WORKER_ID,
    accepted: false,
    reason: reason.slice(0, 500),
    retryable,
    capabilities: { actions: [...ACTIONS] },
  };
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** RPC calls have no timeout of their own. */
function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | null = null;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
