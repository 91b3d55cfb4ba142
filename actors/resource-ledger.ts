/**
 * ResourceLedger: one SQLite-backed Durable Object that reserves a stage's
 * resources atomically, with leases, a priority queue with ageing and bounded
 * backfilling, and grant notices to the waiting Execution. The rules are in
 * ./ledger-rules.ts and docs/ledger.md; state and persistence in
 * ./ledger/store.ts; how writes land in ./ledger/group-commit.ts; the
 * decisions on one reservation in ./ledger/decisions.ts; the client calls
 * (quotas, documents, starts, execution slots) in ./ledger/client-desk.ts.
 * This class keeps the RPC surface, the steps and the alarm.
 *
 * Every public method validates, then decides once, synchronously, in one
 * step (no await inside it) and replies only after the step's writes are
 * executed. How the writes land is the only difference between steps: with
 * no active waiter no grant pass can have work and nothing reads the queue
 * from SQL, so the writes join the group commit; otherwise (and for the
 * alarm, resizes and reads) the queue is executed first and the step runs as
 * one synchronous transaction.
 */
import { DurableObject } from "cloudflare:workers";
import type { z } from "zod";
import { ClientId, ExecutionId, PoolAmounts, PoolName, PRIORITIES, Priority } from "../schemas/common";
import { ClientQuotas, type ClientDocument, type StartAdmission, } from "../schemas/clients";
import {
  DurationMs,
  EstimateStages,
  LeaseMs,
  PoolSpec,
  ReservationId,
  ReserveRequest,
  SettledStages,
  type EstimateResult,
  type GrantNotice,
  type LedgerSnapshot,
  type PaceResult,
  type PoolSnapshot,
  type ReleaseResult,
  type RenewResult,
  type ReservationState,
  type ReserveResult,
  type SettleAndReserveResult,
  type SettleInput,
  type SettleResult,
  type SlotResult,
  type StatusResult,
} from "../schemas/ledger";
import type { PutPoolResult } from "../schemas/resources";
import { configOf, type Tuning } from "../src/config";
import { log, setLogLevel } from "../src/log";
import { RateLimits, type RateLimitReport } from "../schemas/worker-protocol";
import {
  applyRateLimit,
  monthOf,
  resizePool,
  quotasOf,
  type ClientState,
  newPool,
  poolSnapshot,
  queueWaitMs,
  rankOf,
  rulesFromTuning,
  type LedgerRules,
} from "./ledger-rules";
import { Accounts } from "./ledger/accounts";
import { GrantPass, timer, type Step } from "./ledger/grant-pass";
import { GrantNotices } from "./ledger/notices";
import { ClientDesk } from "./ledger/client-desk";
import { Decisions, Ended } from "./ledger/decisions";
import { ExecutionSlots } from "./ledger/slots";
import { chainOf, LedgerStore, needsOf, NO_CLIENT, partOf } from "./ledger/store";
import { Ownership, type RoutingVars } from "./ledger/ownership";

/** Waiters the snapshot lists (queue order). */
const SNAPSHOT_QUEUE_LIMIT = 100;

export type { EstimateResult, ReleaseResult, RenewResult, SettleResult, StatusResult } from "../schemas/ledger";
export { reservationIdOf } from "./ledger/decisions";


/**
 * Test hooks, reachable only in-process (e.g. through runInDurableObject), never
 * over RPC: a symbol-keyed own property, not a method.
 */
const TEST_HOOKS = Symbol.for("orchestrator-v2.resource-ledger.test-hooks");
export interface LedgerTestHooks {
  /** Replace the clock (unix ms) the ledger decides with; null restores Date.now. */
  setClock(clock: (() => number) | null): void;
  /** The live rules object (tests may change e.g. backfillLimit for one object). */
  rules: LedgerRules;
  /** Memory-vs-SQL consistency problems, [] when none. */
  selfCheck(): string[];
  /** Deliver grant notices to `fn` instead of the Execution objects; null restores the RPCs. */
  setNotifier(fn: ((executionId: string, notice: GrantNotice) => void) | null): void;
  /** Deliver slot notices (the execution ids given a slot) to `fn`; null restores the RPCs. */
  setSlotNotifier(fn: ((executionId: string) => void) | null): void;
  /** Deliver chain-cut notices to `fn`; null restores the RPCs. */
  setCutNotifier(fn: ((executionId: string, reservationId: string) => void) | null): void;
  /** Replace the CLIENT_DEFAULTS this object applies (tests of the defaults). */
  setClientDefaults(defaults: ClientQuotas): void;
  /** Judge ownership under these routing vars (and as if named `name`) instead of the env's (null restores them). */
  setRouting(routing: { vars: RoutingVars; name?: string } | null): void;
}
export function ledgerTestHooks(instance: unknown): LedgerTestHooks {
  const hooks = (instance as Record<symbol, LedgerTestHooks | undefined>)[TEST_HOOKS];
  if (!hooks) throw new Error("not a ResourceLedger instance");
  return hooks;
}

function invalid(message: string): Error {
  return new Error(`invalid_request: ${message}`);
}
function issuesOf(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.length ? `${i.path.join(".")}: ` : ""}${i.message}`).join("; ");
}
function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  throw invalid(`${what}: ${issuesOf(r.error)}`);
}


export class ResourceLedger extends DurableObject<Env> {
  readonly #store: LedgerStore;
  readonly #accounts: Accounts;
  readonly #notices: GrantNotices;
  readonly #pass: GrantPass;
  readonly #slots: ExecutionSlots;
  readonly #desk: ClientDesk;
  readonly #decide: Decisions;
  readonly #tuning: Tuning;
  readonly #rules: LedgerRules;
  readonly #own: Ownership;
  /** The alarm time as last set (null: none). */
  #alarmAt: number | null = null;
  #clock: () => number = Date.now;
  #clientDefaults: ClientQuotas;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    setLogLevel(env);
    const config = configOf(env);
    this.#tuning = config.tuning;
    this.#rules = rulesFromTuning(config.tuning);
    this.#store = new LedgerStore(ctx.storage, this.#rules);
    this.#own = new Ownership(ctx.id.name, env);
    this.#clientDefaults = config.clientDefaults;
    const quotas = (c: ClientState) => (c.id === NO_CLIENT ? {} : quotasOf(this.#clientDefaults, c.own));
    this.#accounts = new Accounts(this.#store, this.#rules, config.prices.per_unit, quotas);
    this.#notices = new GrantNotices(env);
    // A notice names the shard that granted; outside a layout (a test's ledger), the part's own shard.
    const noticeShard = (row: Parameters<typeof partOf>[0]) => this.#own.index ?? partOf(row)?.shard ?? 0;
    this.#pass = new GrantPass(this.#store, this.#accounts, this.#rules, quotas, noticeShard);
    this.#decide = new Decisions(this.#store, this.#accounts, this.#pass, this.#rules, this.#tuning, quotas, () => this.#clock(), this.#own);
    this.#slots = new ExecutionSlots(ctx.storage);
    this.#desk = new ClientDesk(this.#store, this.#pass, this.#slots, quotas, config.prices.currency, () => this.#tuning.defaultStageDurationMs, this.#own);
    const hooks: LedgerTestHooks = {
      setClock: (clock) => {
        this.#clock = clock ?? Date.now;
      },
      rules: this.#rules,
      selfCheck: () => this.#store.selfCheck(),
      setNotifier: (fn) => this.#notices.redirect(fn),
      setSlotNotifier: (fn) => this.#notices.redirectSlots(fn),
      setCutNotifier: (fn) => this.#notices.redirectCuts(fn),
      setClientDefaults: (d) => {
        this.#clientDefaults = d;
      },
      setRouting: (routing) => this.#own.setRouting(routing),
    };
    Object.defineProperty(this, TEST_HOOKS, { value: hooks, enumerable: false });
    void ctx.blockConcurrencyWhile(async () => {
      // A shard seeds only the configured pools it owns: no two shards ever both hold a pool.
      this.#store.open(config.pools.filter((p) => this.#own.owns(p.name)), this.#clock());
      this.#slots.open();
      this.#alarmAt = await ctx.storage.getAlarm();
    });
  }

  // -------------------------------------------------------------------------
  // RPC surface

  /** Reserve a stage's resources; idempotent on (executionId, stageId, attempt). */
  async reserve(request: ReserveRequest): Promise<ReserveResult> {
    // A malformed request is a typed answer, not a throw: a throw reads like a ledger that is down
    // (the caller would ask again), while this request can never succeed.
    const parsed = ReserveRequest.safeParse(request);
    if (!parsed.success) return { status: "invalid", code: "invalid_request", message: `reserve: ${issuesOf(parsed.error)}` };
    const req = parsed.data;
    const workerPool = `worker:${req.worker}`;
    if (!PoolName.safeParse(workerPool).success) {
      return { status: "invalid", code: "invalid_request", message: `reserve: worker "${req.worker}" does not make a valid pool name ("${workerPool}")` };
    }
    const result = await this.#step((s) => this.#decide.reserve(req, workerPool, s));
    if (result instanceof Ended) {
      return {
        status: "ended",
        reservationId: result.id,
        state: result.state,
        code: "reservation_ended",
        message: result.why ?? `reservation ${result.id} is ${result.state}; reserve again with a new attempt number`,
      };
    }
    return result;
  }

  /** Extend a live lease to now + leaseMs. */
  async renew(reservationId: string, leaseMs: number): Promise<RenewResult> {
    const id = parse(ReservationId, reservationId, "renew reservationId");
    const ms = parse(LeaseMs, leaseMs, "renew leaseMs");
    return this.#step((s): RenewResult => {
      const row = this.#decide.liveRow(id, s);
      if (!row) return { ok: false, state: "unknown" };
      if (row.state !== "granted") return { ok: false, state: row.state as ReservationState };
      const expiresAt = s.now + ms;
      this.#store.putRow({ ...row, expires_at: expiresAt });
      timer(s, expiresAt);
      return { ok: true, state: "granted", expiresAt, ...(chainOf(row)?.cut ? { chainCut: true as const } : {}) };
    });
  }

  /**
   * Record actual usage, refund the unreserved part, free slots; idempotent. A part of a multi-shard
   * stage is settled with its own pools' usage; the client's part also gets `stageUsage`, the whole
   * stage's, which is what the client is charged (docs/ledger.md, "Parts").
   */
  async settle(reservationId: string, usage: Record<string, number>, durationMs?: number, stageUsage?: Record<string, number>, stages?: number): Promise<SettleResult> {
    const id = parse(ReservationId, reservationId, "settle reservationId");
    const used = parse(PoolAmounts, usage ?? {}, "settle usage");
    const duration = parse(DurationMs, durationMs, "settle durationMs");
    const whole = stageUsage === undefined ? undefined : parse(PoolAmounts, stageUsage, "settle stageUsage");
    const count = parse(SettledStages, stages, "settle stages") ?? 1;
    // Nobody waits on a settle's answer to go on (the Execution's outbox sends it after the stage),
    // so without a waiter to grant it starts no commit: its writes ride on the next step's.
    return this.#step((s) => this.#decide.settle(id, used, duration, s, whole, count), { later: true });
  }

  /**
   * A stage's settle and the next stage's reserve in one call, the hot path of
   * an execution moving on: one round trip instead of two. Both decide
   * synchronously, the settle first, so the reserve sees the slots it freed,
   * and both answer after the same group commit. A refused settle (unknown or
   * malformed) does not stop the reserve: `settled` is then null and the caller
   * settles again on its own; a malformed reserve answers `invalid` as reserve() does.
   */
  async settleAndReserve(settle: SettleInput, request: ReserveRequest): Promise<SettleAndReserveResult> {
    // Both decide before either's writes execute: one commit for the two (group-commit.ts, together).
    const [settled, reserved] = await this.#store.commit.together(() =>
      Promise.allSettled([this.settle(settle.reservationId, settle.usage, settle.durationMs, settle.stageUsage, settle.stages), this.reserve(request)]),
    );
    if (reserved.status === "rejected") throw reserved.reason;
    return { settled: settled.status === "fulfilled" ? settled.value : null, reserved: reserved.value };
  }

  /** Give everything back (a waiter leaves the queue); idempotent. */
  async release(reservationId: string): Promise<ReleaseResult> {
    const id = parse(ReservationId, reservationId, "release reservationId");
    return this.#step((s): ReleaseResult => {
      const row = this.#decide.liveRow(id, s);
      if (!row) return { ok: false, state: "unknown" };
      if (!this.#decide.endRow(row, s)) return { ok: true, state: row.state as ReservationState };
      this.#pass.run(s);
      return { ok: true, state: "released" };
    });
  }

  /** A reservation's state (an Execution asks when a grant notice may have been lost). */
  async status(reservationId: string): Promise<StatusResult> {
    const id = parse(ReservationId, reservationId, "status reservationId");
    return this.#step((s): StatusResult => {
      const row = this.#decide.liveRow(id, s);
      if (!row) return { state: "unknown" };
      const requirements = needsOf(row);
      if (row.state === "granted") return { state: "granted", expiresAt: row.expires_at!, requirements };
      if (row.state === "waiting") {
        this.#pass.applyAgeing(s.now);
        const fresh = this.#store.row(id)!;
        const position = this.#decide.aheadOf(fresh).position;
        return { state: "waiting", position, requirements, waitingOn: this.#decide.waitingOn(fresh, s.now) };
      }
      return { state: row.state as ReservationState, requirements };
    });
  }

  /** Requirements and durations per stage (this shard's pools only), plus the expected wait of the queue ahead. */
  async estimate(stages: EstimateStages, priority: Priority): Promise<EstimateResult> {
    const list = parse(EstimateStages, stages, "estimate stages");
    const prio = parse(Priority, priority, "estimate priority");
    return this.#step((s): EstimateResult => {
      // The averages live with the pools they describe: a shard answers for its own pools.
      const own = (needs: Record<string, number>) => Object.fromEntries(Object.entries(needs).filter(([n]) => this.#own.owns(n)));
      const out = list.map((st) => ({
        requirements: own(this.#decide.needs(st.worker, st.resources)),
        durationMs: this.#decide.durationOf(st.worker),
      }));
      let queueAheadMs = 0;
      if (this.#store.activeWaiters > 0 && list.length) {
        this.#pass.applyAgeing(s.now);
        const counts = this.#store.waitingByWorker(rankOf(prio));
        for (const worker of new Set(list.map((st) => st.worker))) {
          const wait = queueWaitMs(counts.get(worker) ?? 0, this.#decide.slotsOf(worker), this.#decide.durationOf(worker));
          queueAheadMs = Math.max(queueAheadMs, wait);
        }
      }
      const totalMs = queueAheadMs + out.reduce((a, st) => a + st.durationMs, 0);
      return { stages: out, queueAheadMs, totalMs };
    });
  }

  async snapshot(): Promise<LedgerSnapshot> {
    const now = this.#clock();
    const st = this.#store;
    const shard = this.#own.shard;
    const pools = [...st.pools.values()].sort((a, b) => (a.name < b.name ? -1 : 1)).map((p) => poolSnapshot(p, now, shard));
    // Reported only once what it shows is written.
    const queue = st.queueList(SNAPSHOT_QUEUE_LIMIT).map((r) => ({
      reservation_id: r.id,
      execution_id: r.execution_id,
      stage_id: r.stage_id,
      client_id: r.client_id,
      priority: PRIORITIES[r.rank],
      effective_priority: PRIORITIES[r.eff_rank],
      waiting_on: this.#decide.waitingOn(r, now),
    }));
    // The name only on a shard of the layout (a test's fresh ledger is no shard: its snapshot is its state alone).
    const name = this.#own.index === null ? {} : { name: this.#own.name };
    const snap = { shard, ...name, pools, leases: st.leases, waiters: st.waiters, queue };
    return st.commit.idle ? snap : st.commit.ack(snap);
  }

  /**
   * putPool for `PUT /resources/pools/:name`: a kind change, or a pool the routing layout places on
   * another shard, is a typed refusal (409), not a thrown error; nothing changes.
   */
  async definePool(name: string, spec: PoolSpec): Promise<PutPoolResult> {
    const poolName = parse(PoolName, name, "definePool name");
    const ps = parse(PoolSpec, spec, "definePool spec");
    const misplaced = this.#own.misplaced([poolName], null, null);
    if (misplaced) return { ok: false, code: "wrong_shard", message: misplaced };
    const existing = this.#store.pools.get(poolName);
    if (existing && existing.kind !== ps.kind) {
      return { ok: false, code: "pool_kind_immutable", kind: existing.kind, message: `pool ${poolName} is a ${existing.kind} pool; its kind cannot change` };
    }
    // No await between the check and putPool's own: the kind cannot change in between.
    return { ok: true, pool: await this.putPool(poolName, ps) };
  }

  /** Create or resize a pool; never revokes a grant; grants waiters that now fit. Refusals throw (definePool answers them typed). */
  async putPool(name: string, spec: PoolSpec): Promise<PoolSnapshot> {
    const poolName = parse(PoolName, name, "putPool name");
    const ps = parse(PoolSpec, spec, "putPool spec");
    const misplaced = this.#own.misplaced([poolName], null, null);
    if (misplaced) throw invalid(`putPool: wrong_shard: ${misplaced}`);
    const existing = this.#store.pools.get(poolName);
    if (existing && existing.kind !== ps.kind) {
      throw invalid(`putPool: pool ${poolName} is a ${existing.kind} pool; its kind cannot change`);
    }
    return this.#step(
      (s): PoolSnapshot => {
        const p = existing ? resizePool(existing, ps, s.now) : newPool(poolName, ps.kind, ps.capacity, ps.refill_per_second ?? 0, s.now);
        this.#store.addPool(p);
        // Waiters parked as never-satisfiable get another look under the new sizes.
        this.#store.unparkAll();
        this.#pass.run(s);
        return poolSnapshot(p, s.now, this.#own.shard);
      },
      { direct: true },
    );
  }

  /** Due timers: lease expiries, refills that may unblock waiters, purge of old rows. Idempotent. */
  override async alarm(): Promise<void> {
    this.#alarmAt = null;
    await this.#step(
      (s) => {
        for (;;) {
          const due = this.#store.dueLeases(s.now, this.#rules.expireBatch);
          for (const row of due) this.#decide.expire(row, s);
          if (due.length < this.#rules.expireBatch) break;
        }
        // A new month: waiters held by their client's budget get another look.
        for (const c of this.#store.clients.values()) if (c.held > 0 && monthOf(s.now) !== c.month) this.#store.unholdClient(c);
        this.#pass.run(s);
        this.#store.purge(s.now - this.#rules.doneRetentionMs, this.#rules.purgeBatch);
        timer(s, this.#nextTimer(s.now));
      },
      { direct: true },
    );
  }

  /**
   * Provider pacing: rate-limit reports from a worker's provider responses.
   * Each lowers its rate pool's bucket and may pause the pool (ledger-rules
   * applyRateLimit), for every execution at once; reports on unknown pools are
   * ignored (and named). A pause ends by itself: the alarm wakes the waiters.
   */
  async pace(reports: RateLimitReport[]): Promise<PaceResult> {
    const list = parse(RateLimits, reports, "pace reports");
    return this.#step(
      (s): PaceResult => {
        const applied: string[] = [];
        const ignored: string[] = [];
        for (const r of list) {
          const p = this.#store.pools.get(r.pool);
          if (!p) {
            ignored.push(r.pool);
            continue;
          }
          if (applyRateLimit(p, r, s.now)) this.#store.touchPool(p);
          applied.push(r.pool);
          if (p.pausedUntil != null && p.pausedUntil > s.now) timer(s, p.pausedUntil);
        }
        if (applied.length) log("info", "ledger_paced", { pools: applied, reports: list.length });
        this.#pass.run(s);
        return { applied, ignored };
      },
      { direct: true },
    );
  }

  // -------------------------------------------------------------------------
  // Clients

  /** Replace a client's own quotas; they apply at once, also to its waiting stages and executions. */
  async putClientQuotas(clientId: string, quotas: ClientQuotas): Promise<ClientDocument> {
    const id = parse(ClientId, clientId, "putClientQuotas clientId");
    const own = parse(ClientQuotas, quotas, "putClientQuotas quotas");
    return this.#step((s) => this.#desk.putQuotas(id, own, s), { direct: true });
  }

  async client(clientId: string): Promise<ClientDocument> {
    const id = parse(ClientId, clientId, "client clientId");
    return this.#step((s) => this.#desk.document(this.#store.client(id, s.now), s.now));
  }

  /** Every client the ledger knows (own quotas or any reservation), by id. */
  async clients(): Promise<ClientDocument[]> {
    return this.#step((s) => this.#desk.list(s.now));
  }

  /** A client's start (POST /execute): max_priority, a spent budget and max_starts_per_minute, decided and counted at once. */
  async admitStart(clientId: string, priority: Priority): Promise<StartAdmission> {
    const id = parse(ClientId, clientId, "admitStart clientId");
    const prio = parse(Priority, priority, "admitStart priority");
    return this.#step((s) => this.#desk.admit(id, prio, s.now));
  }

  /** An execution's slot under its client's max_running_executions (./ledger/slots.ts); idempotent on the execution id. */
  async acquireSlot(clientId: string, executionId: string): Promise<SlotResult> {
    const client = parse(ClientId, clientId, "acquireSlot clientId");
    const id = parse(ExecutionId, executionId, "acquireSlot executionId");
    // Only a client with the quota writes a slot: the others are answered in a step that writes nothing.
    return this.#step((s) => this.#desk.acquireSlot(client, id, s), { direct: this.#desk.countsExecutions(client) });
  }

  /** Gives back an execution's slot or its place in the line; idempotent. The next waiter of the client is told. */
  async releaseSlot(executionId: string): Promise<{ released: boolean }> {
    const id = parse(ExecutionId, executionId, "releaseSlot executionId");
    return this.#step((s) => this.#desk.releaseSlot(id, s), { direct: true });
  }

  // -------------------------------------------------------------------------
  // Steps

  /**
   * Runs one decision. With an active waiter (or when asked) the group-commit
   * queue is executed first and `fn` runs as one transaction; otherwise its
   * writes join the queue. Either way the reply waits for its writes. In a
   * queued step nothing is granted from the queue (it has no active waiter;
   * a reserve that queues is not granted by the pass it starts), so grant
   * notices only ever follow a direct step, whose writes are executed.
   */
  #step<T>(fn: (s: Step) => T, opts: { direct?: boolean; later?: boolean } = {}): Promise<T> {
    const store = this.#store;
    const s: Step = { now: this.#clock(), grants: [], slots: [], cuts: [], timer: null };
    let result: T;
    if (opts.direct || store.activeWaiters > 0) {
      result = store.commit.direct(() => fn(s));
    } else {
      try {
        result = fn(s);
      } catch (err) {
        // Memory may hold half a decision: write what was decided, then take memory back from SQL.
        store.commit.flush();
        store.load();
        throw err;
      }
    }
    if (s.timer !== null) this.#arm(s.timer);
    this.#notices.send(s.grants);
    this.#notices.sendSlots(s.slots);
    this.#notices.sendCuts(s.cuts);
    if (store.commit.idle) return Promise.resolve(result);
    // A direct step's writes are executed already; a queued one with `later` waits for the next commit (group-commit.ts).
    return opts.later && this.#tuning.ledgerSettleCommitMs > 0 ? store.commit.ackLater(result, this.#tuning.ledgerSettleCommitMs) : store.commit.ack(result);
  }

  #arm(at: number): void {
    if (this.#alarmAt !== null && this.#alarmAt <= at) return;
    this.#alarmAt = at;
    this.ctx.storage.setAlarm(at).catch((err) => {
      this.#alarmAt = null;
      log("error", "ledger_set_alarm_failed", { at, error: err instanceof Error ? err.message : String(err) });
    });
  }

  #nextTimer(now: number): number | null {
    const ended = this.#store.earliestEnded();
    const times = [this.#store.earliestLease(), this.#pass.refillWakeAt, ended === null ? null : Math.max(now, ended + this.#rules.doneRetentionMs)];
    const real = times.filter((t): t is number => t !== null);
    return real.length ? Math.min(...real) : null;
  }
}
