import { DurableObject } from "cloudflare:workers";
import { STAGE_POOLS, type StageStart, startStage, type Waiter, waitIn } from "./stage-driver";
import { BENCH_STAGES, bearer, error, json, SINK_ORIGIN, STAGE_USAGE } from "./shared";
import { sameSecret } from "./same-secret";

/**
 * The contract floor (`npm run bench -- --vs-workflows`; issue 17, target 1):
 * the least work any implementation of the orchestrator's contract does per
 * execution in this runtime, run in the orchestrator's own shape so the bench
 * drives it exactly as it drives ours and Workflows (`POST` answered at once,
 * completion learnt from the stage worker, then the status read; or the status
 * polled). It is the durable floor plus what the contract adds and no design
 * can leave out:
 *
 * - the execution answers its `POST` once its start is durable (one commit),
 *   and its status is read from it (from memory: no SQL on a read);
 * - one reservation in a ledger object before the first handshake (one RPC,
 *   one row written), covering all the stages as the chain grants do, and one
 *   settle of the stages' usage after the last (one RPC, one row deleted and
 *   the pool's usage written);
 * - one commit per stage on the callback path, the last one also ending the
 *   execution.
 *
 * What it leaves out, each in the floor's favour: the execution index (its
 * summaries could be batched across executions), the admission (cacheable for
 * a steady client), the template fetch (cacheable), HMAC callback tokens
 * (a random token, compared in constant time as the KAM token is), schema validation of callbacks, deadlines,
 * alarms, fencing, the outbox, spans, logs and metrics. So a design's
 * throughput here is an upper bound on any implementation of the contract: a
 * target above it cannot be met by code.
 *
 * Routes of the bench worker (reached through the bench gateway):
 * - `POST /bench/contract/execute` `{ parameters }` (Bearer KAM_TOKEN): 202 `{ execution_id }`;
 * - `GET /bench/contract/executions/:id` (Bearer KAM_TOKEN): `{ execution_id, status }`;
 * - `POST /bench/sink/contract/:id/stages/:stageId/complete` (Bearer the stage's token): the callback.
 */

interface Fetcher {
  fetch(input: Request | string, init?: RequestInit): Promise<Response>;
}
export interface ContractEnv {
  WORKER_SECRET: string;
  KAM_TOKEN: string;
  SELF: Fetcher;
  CONTRACT_RUN: DurableObjectNamespace<ContractRun>;
  CONTRACT_LEDGER: DurableObjectNamespace<ContractLedger>;
}

type RunStatus = "running" | "completed" | "failed";

const CONTRACT_PATHS = {
  execute: "/bench/contract/execute",
  status: /^\/bench\/contract\/executions\/([A-Za-z0-9_-]{1,100})$/,
  sink: /^\/bench\/sink\/contract\/([A-Za-z0-9_-]{1,100})\/stages\/(stage_\d{1,3})\/(complete|progress|fail)$/,
};

/** The contract floor's routes; null for any other path. */
export async function onContract(request: Request, env: ContractEnv, path: string): Promise<Response | null> {
  const sink = CONTRACT_PATHS.sink.exec(path);
  if (sink) {
    if (request.method !== "POST") return error(405, "method_not_allowed", "POST only");
    const body = (await request.json().catch(() => null)) as { output?: unknown } | null;
    if (!body || typeof body !== "object") return error(400, "invalid_json", "the body is not valid JSON");
    if (sink[3] !== "complete") return json(200, { ok: true, stage_status: "processing" });
    const status = await runOf(env, sink[1]).complete(sink[2], bearer(request), body.output ?? null);
    if (status === 404) return error(404, "not_found", "no such stage");
    if (status === 401) return error(401, "unauthorized", "missing or invalid callback token");
    return json(200, { ok: true, stage_status: "completed" });
  }
  const status = CONTRACT_PATHS.status.exec(path);
  if (path !== CONTRACT_PATHS.execute && !status) return null;
  if (!(await sameSecret(bearer(request), env.KAM_TOKEN))) return error(401, "unauthorized", "missing or wrong bearer token");
  if (status && request.method === "GET") {
    const s = await runOf(env, status[1]).status();
    return s ? json(200, { execution_id: status[1], status: s }) : error(404, "not_found", "no such execution");
  }
  if (!status && request.method === "POST") {
    const body = (await request.json().catch(() => null)) as { parameters?: Record<string, unknown> } | null;
    if (!body || typeof body.parameters !== "object" || body.parameters === null) return error(400, "invalid_request", "parameters: an object is required");
    const executionId = `exec_${Date.now()}_contract${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
    await runOf(env, executionId).start(executionId, body.parameters);
    return json(202, { execution_id: executionId, status: "running" });
  }
  return error(405, "method_not_allowed", `${request.method} not allowed here`);
}

function runOf(env: ContractEnv, executionId: string): DurableObjectStub<ContractRun> {
  return env.CONTRACT_RUN.get(env.CONTRACT_RUN.idFromName(executionId));
}

/** One execution of the contract floor: its row and its stages in its own SQLite, its status in memory. */
export class ContractRun extends DurableObject<ContractEnv> {
  #status: RunStatus | null = null;
  /** The run's stage count, known to the instance that drives it. */
  #total = BENCH_STAGES;
  /** Stage completions awaited by the drive, resolved inside the object (see FloorRun). */
  readonly #waiters = new Map<string, Waiter>();

  constructor(ctx: DurableObjectState, env: ContractEnv) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      const sql = ctx.storage.sql;
      sql.exec("CREATE TABLE IF NOT EXISTS run (id TEXT PRIMARY KEY, status TEXT NOT NULL, parameters TEXT NOT NULL, at INTEGER NOT NULL)");
      sql.exec("CREATE TABLE IF NOT EXISTS stages (stage_id TEXT PRIMARY KEY, output TEXT, at INTEGER NOT NULL)");
      const row = sql.exec<{ status: RunStatus }>("SELECT status FROM run").toArray()[0];
      this.#status = row?.status ?? null;
    });
  }

  /** Records the start (its commit precedes the answer and the first call out), then drives the stages in the background. */
  async start(executionId: string, parameters: Record<string, unknown>): Promise<{ created: boolean }> {
    if (this.#status) return { created: false };
    this.ctx.storage.sql.exec("INSERT INTO run (id, status, parameters, at) VALUES (?, 'running', ?, ?)", executionId, JSON.stringify(parameters), Date.now());
    this.#status = "running";
    this.#total = Number(parameters.bench_stages ?? BENCH_STAGES);
    void this.#drive(executionId, parameters).catch((err) => this.#end("failed", String(err)));
    return { created: true };
  }

  async status(): Promise<RunStatus | null> {
    return this.#status;
  }

  /** A stage's completion: one write (the last stage's also ends the run), then the drive goes on. */
  async complete(stageId: string, token: string, output: unknown): Promise<200 | 401 | 404> {
    const waiter = this.#waiters.get(stageId);
    if (!waiter) return 404;
    if (!(await sameSecret(token, waiter.token))) return 401;
    // Taken again after the await: only the call that still finds this waiter completes the stage.
    if (this.#waiters.get(stageId) !== waiter) return 404;
    const sql = this.ctx.storage.sql;
    sql.exec("INSERT OR REPLACE INTO stages (stage_id, output, at) VALUES (?, ?, ?)", stageId, JSON.stringify(output ?? null), Date.now());
    if (stageId === `stage_${this.#total}`) {
      sql.exec("UPDATE run SET status = 'completed', at = ?", Date.now());
      this.#status = "completed";
    }
    this.#waiters.delete(stageId);
    waiter.resolve({ output });
    return 200;
  }

  async #drive(executionId: string, parameters: Record<string, unknown>): Promise<void> {
    const ledger = this.env.CONTRACT_LEDGER.get(this.env.CONTRACT_LEDGER.idFromName("ledger"));
    const total = this.#total;
    await ledger.reserve(executionId, STAGE_POOLS);
    let previousOutput: unknown = null;
    try {
      for (let n = 1; n <= total; n++) {
        const stageId = `stage_${n}`;
        const token = `contract.${crypto.randomUUID()}`;
        const completed = waitIn(this.#waiters, stageId, token);
        const s: StageStart = { executionId, n, parameters, previousOutput, callbackUrl: `${SINK_ORIGIN}/bench/sink/contract/${executionId}/stages/${stageId}`, token };
        const failed = await startStage(this.env.SELF, this.env.WORKER_SECRET, s).catch((err: unknown) => String(err));
        if (failed) {
          completed.cancel();
          return this.#end("failed", failed);
        }
        const body = await completed.done;
        if (!body) return this.#end("failed", `${stageId}: no completion within 30 s`);
        previousOutput = body.output ?? null;
      }
    } finally {
      // The stages' usage, settled whatever the end: the ledger holds nothing for an ended run.
      await ledger.settle(executionId, Object.fromEntries(Object.entries(STAGE_USAGE).map(([k, v]) => [k, v * total])));
    }
  }

  #end(status: RunStatus, message: string): void {
    if (this.#status !== "running") return;
    this.ctx.storage.sql.exec("UPDATE run SET status = ?, at = ?", status, Date.now());
    this.#status = status;
    console.log(JSON.stringify({ level: "warn", event: "contract_run_ended", status, message }));
  }
}

/** The contract floor's ledger: one object, a lease row per execution and a row per pool. */
export class ContractLedger extends DurableObject<ContractEnv> {
  constructor(ctx: DurableObjectState, env: ContractEnv) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS leases (execution_id TEXT PRIMARY KEY, pools TEXT NOT NULL, at INTEGER NOT NULL)");
      ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS pools (pool TEXT PRIMARY KEY, used REAL NOT NULL)");
    });
  }

  /** One lease for the whole run (as a chain grant is); replayed, the same lease. */
  async reserve(executionId: string, pools: Record<string, number>): Promise<{ granted: true }> {
    this.ctx.storage.sql.exec("INSERT OR IGNORE INTO leases (execution_id, pools, at) VALUES (?, ?, ?)", executionId, JSON.stringify(pools), Date.now());
    return { granted: true };
  }

  /** Ends the lease and adds the usage to the pools' totals, in one turn (one commit). */
  async settle(executionId: string, usage: Record<string, number>): Promise<{ settled: boolean }> {
    const sql = this.ctx.storage.sql;
    const gone = sql.exec("DELETE FROM leases WHERE execution_id = ?", executionId).rowsWritten > 0;
    if (gone) {
      for (const [pool, used] of Object.entries(usage)) {
        sql.exec("INSERT INTO pools (pool, used) VALUES (?, ?) ON CONFLICT (pool) DO UPDATE SET used = used + excluded.used", pool, used);
      }
    }
    return { settled: gone };
  }
}
