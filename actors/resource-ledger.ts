/**
 * ResourceLedger: one SQLite-backed Durable Object that reserves a stage's
 * resources atomically, with leases, a priority queue with ageing and bounded
 * backfilling, and grant notices to the waiting Execution. The rules are in
 * ./ledger-rules.ts and docs/ledger.md.
 *
 * Every public method reads and decides synchronously (no await inside a
 * critical section) and replies only after its writes are executed; SQLite
 * writes in a Durable Object are durable before the output gate lets a reply
 * out, so a grant is acknowledged only once written. Pool state is kept in
 * memory and mirrored to SQL; reservations live in SQL (indexed), with live
 * counters derived from them at load.
 *
 * Group commit: the hot paths (a reserve granted at once with nobody queued; a
 * settle, release or renew of a live grant with nobody queued) apply their
 * decision to memory and queue their SQL writes; the queue is executed as one
 * transaction at once when no commit is in flight, else as soon as the one in
 * flight is durable (`storage.sync()`), so concurrent calls share a commit.
 * Their replies wait for that. Every other step first executes the queue, then
 * runs as one synchronous transaction. Writes are executed in decision order,
 * so what is durable is always a prefix of what was decided, and nothing is
 * acknowledged before it is durable.
 */
import { DurableObject } from "cloudflare:workers";
import { z } from "zod";
import { PoolName, PoolAmounts, Priority } from "../schemas/common";
import {
  PoolSpec,
  ReserveRequest,
  type GrantNotice,
  type LedgerSnapshot,
  type PoolSnapshot,
  type ReservationState,
  type ReserveResult,
} from "../schemas/ledger";
import { configOf, type Tuning } from "../src/config";
import {
  chargeExtra,
  effectiveRank,
  estimatedNeeds,
  ewma,
  expireInto,
  fits,
  newPool,
  nextAgeingAt,
  nonZero,
  poolSnapshot,
  queueWaitMs,
  rankOf,
  refill,
  refillReadyAt,
  releaseInto,
  rulesFromTuning,
  satisfiable,
  settleInto,
  take,
  type Amounts,
  type LedgerRules,
  type PoolState,
  type WorkerStats,
} from "./ledger-rules";
import { execScript, sqlOf, type Sql } from "./sql";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pools (
  name TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  capacity REAL NOT NULL,
  refill_per_second REAL NOT NULL DEFAULT 0,
  tokens REAL NOT NULL DEFAULT 0,
  tokens_at INTEGER NOT NULL DEFAULT 0,
  consumed REAL NOT NULL DEFAULT 0,
  est_avg REAL,
  est_n INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
  id TEXT PRIMARY KEY,
  execution_id TEXT NOT NULL,
  stage_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  worker TEXT NOT NULL,
  rank INTEGER NOT NULL,
  eff_rank INTEGER NOT NULL,
  age_at INTEGER,
  seq INTEGER NOT NULL,
  state TEXT NOT NULL,
  req TEXT NOT NULL,
  lease_ms INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  granted_at INTEGER,
  expires_at INTEGER,
  passed INTEGER NOT NULL DEFAULT 0,
  parked INTEGER NOT NULL DEFAULT 0,
  usage TEXT,
  duration_ms REAL,
  ended_at INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_queue ON reservations (parked, eff_rank DESC, seq) WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS reservations_ageing ON reservations (age_at) WHERE state = 'waiting' AND age_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_leases ON reservations (expires_at) WHERE state = 'granted';
CREATE INDEX IF NOT EXISTS reservations_ended ON reservations (ended_at) WHERE ended_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS worker_stats (
  worker TEXT PRIMARY KEY,
  dur_avg REAL,
  dur_n INTEGER NOT NULL DEFAULT 0,
  usage TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unknown_usage (
  pool TEXT PRIMARY KEY,
  total REAL NOT NULL,
  events INTEGER NOT NULL,
  last_at INTEGER NOT NULL
) WITHOUT ROWID;
`;

interface ResRow extends Record<string, SqlStorageValue> {
  id: string;
  execution_id: string;
  stage_id: string;
  attempt: number;
  worker: string;
  rank: number;
  eff_rank: number;
  age_at: number | null;
  seq: number;
  state: string;
  req: string;
  lease_ms: number;
  created_at: number;
  granted_at: number | null;
  expires_at: number | null;
  passed: number;
  parked: number;
  usage: string | null;
  duration_ms: number | null;
  ended_at: number | null;
}


interface Grant {
  executionId: string;
  notice: GrantNotice;
}

/** One synchronous critical section: what it granted and which timers it created. */
interface Step {
  now: number;
  grants: Grant[];
  timer: number | null;
}

/** A hot-path step that cannot stay on the hot path answers this and changes nothing. */
const SLOW: unique symbol = Symbol("slow");
type Slow = typeof SLOW;

/** A reserve replay of a reservation that ended: answered as `status: "ended"` after the step. */
class Ended {
  constructor(readonly id: string, readonly state: ReservationState) {}
}

export interface RenewResult {
  ok: boolean;
  state: ReservationState;
  expiresAt?: number;
}
export interface SettleResult {
  ok: boolean;
  state: ReservationState;
  unknownPools: string[];
}
export interface ReleaseResult {
  ok: boolean;
  state: ReservationState;
}
export interface StatusResult {
  state: ReservationState;
  expiresAt?: number;
  position?: number;
  requirements?: Record<string, number>;
}
export interface EstimateResult {
  stages: { requirements: Record<string, number>; durationMs: number }[];
  queueAheadMs: number;
  totalMs: number;
}

/** What the ledger calls on an Execution (typed loosely: no import of that class). */
interface GrantNoticeTarget {
  onGrant(notice: GrantNotice): Promise<void>;
}

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
}
export function ledgerTestHooks(instance: unknown): LedgerTestHooks {
  const hooks = (instance as Record<symbol, LedgerTestHooks | undefined>)[TEST_HOOKS];
  if (!hooks) throw new Error("not a ResourceLedger instance");
  return hooks;
}

const ReservationId = z.string().min(1).max(256);
const LeaseMs = z.number().int().min(1000).max(24 * 3600 * 1000);
const DurationMs = z.number().finite().nonnegative().optional();
const EstimateStages = z
  .array(z.object({ worker: z.string().min(1).max(63), resources: PoolAmounts.optional() }))
  .max(500);

function invalid(message: string): Error {
  return new Error(`invalid_request: ${message}`);
}
function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const detail = r.error.issues.map((i) => `${i.path.length ? `${i.path.join(".")}: ` : ""}${i.message}`).join("; ");
  throw invalid(`${what}: ${detail}`);
}

export function reservationIdOf(executionId: string, stageId: string, attempt: number): string {
  return `${executionId}:${stageId}:${attempt}`;
}

export class ResourceLedger extends DurableObject<Env> {
  private readonly sql: Sql;
  private readonly tuning: Tuning;
  private readonly rules: LedgerRules;
  private readonly pools = new Map<string, PoolState>();
  private readonly stats = new Map<string, WorkerStats>();
  /** Live counters, derived from the reservations table at load. */
  private leases = 0;
  private waiters = 0;
  private parked = 0;
  private seq = 0;
  /** The alarm time as last set (null: none). */
  private alarmAt: number | null = null;
  /** Earliest time a rate-pool refill lets a blocked waiter fit (from the last grant pass). */
  private refillWakeAt: number | null = null;
  private clock: () => number = Date.now;
  private notifier: ((executionId: string, notice: GrantNotice) => void) | null = null;
  private noticeFailures = 0;
  /** Group commit: SQL writes decided on the hot path, not yet executed, in decision order. */
  private pending: (() => void)[] = [];
  private acks: { resolve: () => void; reject: (err: unknown) => void }[] = [];
  /** Latest version of reservation rows with a pending write (read before SQL). */
  private readonly dirtyRows = new Map<string, ResRow>();
  /** Granted reservations (live leases), as decided: loaded at start, kept in step with every change. */
  private readonly live = new Map<string, ResRow>();
  /** Pools and estimates changed since their rows were last written (written once per commit). */
  private readonly dirtyPools = new Set<PoolState>();
  private readonly dirtyStats = new Set<WorkerStats>();
  /** A commit is in flight (between executing writes and storage.sync() resolving). */
  private committing = false;
  /** Inside a direct step's transaction (writes run at once, not queued). */
  private inStep = false;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.sql = sqlOf(ctx.storage);
    const config = configOf(env);
    this.tuning = config.tuning;
    this.rules = rulesFromTuning(config.tuning);
    const hooks: LedgerTestHooks = {
      setClock: (clock) => {
        this.clock = clock ?? Date.now;
      },
      rules: this.rules,
      selfCheck: () => {
        this.flushPending();
        return this.selfCheck();
      },
      setNotifier: (fn) => {
        this.notifier = fn;
      },
    };
    Object.defineProperty(this, TEST_HOOKS, { value: hooks, enumerable: false });
    void ctx.blockConcurrencyWhile(async () => {
      execScript(ctx.storage, SCHEMA);
      const seeded = this.sql<{ value: string }>`SELECT value FROM meta WHERE key = 'seeded'`.length > 0;
      if (!seeded) {
        const now = this.clock();
        ctx.storage.transactionSync(() => {
          for (const spec of config.pools) {
            const p = newPool(spec.name, spec.kind, spec.capacity, spec.refill_per_second ?? 0, now);
            this.savePool(p);
          }
          this.sql`INSERT INTO meta (key, value) VALUES ('seeded', ${String(now)})`;
        });
      }
      this.load();
      this.alarmAt = await ctx.storage.getAlarm();
    });
  }

  // -------------------------------------------------------------------------
  // RPC surface

  /** Reserve a stage's resources; idempotent on (executionId, stageId, attempt). */
  async reserve(request: ReserveRequest): Promise<ReserveResult> {
    const req = parse(ReserveRequest, request, "reserve");
    const workerPool = `worker:${req.worker}`;
    if (!PoolName.safeParse(workerPool).success) {
      throw invalid(`reserve: worker "${req.worker}" does not make a valid pool name ("${workerPool}")`);
    }
    const id = reservationIdOf(req.executionId, req.stageId, req.attempt);
    const fast = this.reserveFast(req, id, workerPool);
    if (fast !== SLOW) return fast;
    const result = this.step((s): ReserveResult | Ended => {
      const existing = this.row(id);
      if (existing) return this.replayReserve(existing, s);
      const plan = this.plan(req, id, workerPool);
      if ("status" in plan) return plan;
      const { needs } = plan;
      if (!this.pools.has(workerPool)) {
        const p = newPool(workerPool, "concurrency", this.tuning.defaultWorkerConcurrency, 0, s.now);
        this.pools.set(workerPool, p);
        this.savePool(p);
      }
      const never = this.unsatisfiable(id, needs);
      if (never) return never;

      const rank = rankOf(req.priority);
      const seq = ++this.seq;
      const ageAt = nextAgeingAt(rank, s.now, rank, this.rules.agingMs);
      const reqJson = JSON.stringify(needs);
      if (this.waiters - this.parked === 0 && this.fitsAll(needs, s.now)) {
        for (const [n, a] of Object.entries(needs)) this.take(this.pools.get(n)!, a, s.now);
        const expiresAt = s.now + req.leaseMs;
        this.insertRow(this.newRow(req, id, rank, seq, reqJson, s.now, expiresAt));
        this.leases++;
        this.timer(s, expiresAt);
        return { status: "granted", reservationId: id, expiresAt, requirements: needs };
      }
      this.sql`INSERT INTO reservations
        (id, execution_id, stage_id, attempt, worker, rank, eff_rank, age_at, seq, state, req, lease_ms, created_at)
        VALUES (${id}, ${req.executionId}, ${req.stageId}, ${req.attempt}, ${req.worker}, ${rank}, ${rank}, ${ageAt}, ${seq},
                'waiting', ${reqJson}, ${req.leaseMs}, ${s.now})`;
      this.waiters++;
      for (const n of Object.keys(needs)) this.pools.get(n)!.waiting++;
      this.pump(s);
      const mine = s.grants.findIndex((g) => g.notice.reservationId === id);
      if (mine >= 0) {
        const [g] = s.grants.splice(mine, 1); // the caller learns it from the reply, not a notice
        return { status: "granted", reservationId: id, expiresAt: g.notice.expiresAt, requirements: needs };
      }
      const row = this.row(id)!;
      if (row.state !== "waiting") throw new Error(`internal: new reservation ${id} is ${row.state}`);
      return this.waitingResult(row);
    });
    if (result instanceof Ended) {
      return {
        status: "ended",
        reservationId: result.id,
        state: result.state,
        code: "reservation_ended",
        message: `reservation ${result.id} is ${result.state}; reserve again with a new attempt number`,
      };
    }
    return result;
  }

  /** Extend a live lease to now + leaseMs. */
  async renew(reservationId: string, leaseMs: number): Promise<RenewResult> {
    const id = parse(ReservationId, reservationId, "renew reservationId");
    const ms = parse(LeaseMs, leaseMs, "renew leaseMs");
    const fast = this.onLiveGrant(id, (row, now): RenewResult => {
      const expiresAt = now + ms;
      this.updateRow({ ...row, expires_at: expiresAt });
      this.arm(expiresAt);
      return { ok: true, state: "granted", expiresAt };
    });
    if (fast !== SLOW) return fast;
    return this.step((s): RenewResult => {
      const row = this.liveRow(id, s);
      if (!row) return { ok: false, state: "unknown" };
      if (row.state !== "granted") return { ok: false, state: row.state as ReservationState };
      const expiresAt = s.now + ms;
      this.writeRow({ ...row, expires_at: expiresAt });
      this.timer(s, expiresAt);
      return { ok: true, state: "granted", expiresAt };
    });
  }

  /** Record actual usage, refund the unreserved part, free slots; idempotent. */
  async settle(reservationId: string, usage: Record<string, number>, durationMs?: number): Promise<SettleResult> {
    const id = parse(ReservationId, reservationId, "settle reservationId");
    const used = parse(PoolAmounts, usage ?? {}, "settle usage");
    const duration = parse(DurationMs, durationMs, "settle durationMs");
    const unknownPools = () => Object.keys(used).filter((n) => !this.pools.has(n));
    const fast = this.onLiveGrant(id, (row, now): SettleResult => {
      this.updateRow(this.settleGrant(row, used, duration, now));
      this.arm(now + this.rules.doneRetentionMs);
      return { ok: true, state: "settled", unknownPools: unknownPools() };
    });
    if (fast !== SLOW) return fast;
    return this.step((s): SettleResult => {
      const row = this.liveRow(id, s);
      if (!row) return { ok: false, state: "unknown", unknownPools: unknownPools() };
      switch (row.state) {
        case "granted": {
          this.writeRow(this.settleGrant(row, used, duration, s.now));
          this.timer(s, s.now + this.rules.doneRetentionMs);
          this.pump(s);
          return { ok: true, state: "settled", unknownPools: unknownPools() };
        }
        case "expired": {
          // The lease lapsed: the settle is refused, but what was used is still
          // real: it counts for estimates, budgets and (beyond what the expiry
          // kept) rate buckets, once.
          if (row.usage === null) {
            const needs = JSON.parse(row.req) as Amounts;
            for (const [n, amount] of Object.entries(used)) {
              const p = this.pools.get(n);
              if (!p) continue;
              const covered = p.kind === "rate" ? (needs[n] ?? 0) : 0;
              this.change(p, () => chargeExtra(p, amount - covered, s.now));
            }
            const dur = duration ?? Math.max(0, (row.ended_at ?? s.now) - (row.granted_at ?? s.now));
            this.learn(row.worker, used, dur, s.now);
            this.sql`UPDATE reservations SET usage = ${JSON.stringify(used)}, duration_ms = ${dur} WHERE id = ${id}`;
          }
          return { ok: false, state: "expired", unknownPools: unknownPools() };
        }
        case "settled":
        case "released":
          return { ok: true, state: row.state, unknownPools: unknownPools() };
        default:
          return { ok: false, state: row.state as ReservationState, unknownPools: unknownPools() };
      }
    });
  }

  /**
   * A stage's settle and the next stage's reserve in one call, the hot path of
   * an execution moving on: one round trip instead of two. Both decide
   * synchronously, the settle first, so the reserve sees the slots it freed,
   * and both answer after the same group commit. A refused settle (unknown or
   * malformed) does not stop the reserve: `settled` is then null and the caller
   * settles again on its own; a reserve that throws throws here.
   */
  async settleAndReserve(
    settle: { reservationId: string; usage: Record<string, number>; durationMs?: number },
    request: ReserveRequest,
  ): Promise<{ settled: SettleResult | null; reserved: ReserveResult }> {
    const [settled, reserved] = await Promise.allSettled([this.settle(settle.reservationId, settle.usage, settle.durationMs), this.reserve(request)]);
    if (reserved.status === "rejected") throw reserved.reason;
    return { settled: settled.status === "fulfilled" ? settled.value : null, reserved: reserved.value };
  }

  /** Give everything back (a waiter leaves the queue); idempotent. */
  async release(reservationId: string): Promise<ReleaseResult> {
    const id = parse(ReservationId, reservationId, "release reservationId");
    const fast = this.onLiveGrant(id, (row, now): ReleaseResult => {
      this.updateRow(this.releaseGrant(row, now));
      this.arm(now + this.rules.doneRetentionMs);
      return { ok: true, state: "released" };
    });
    if (fast !== SLOW) return fast;
    return this.step((s): ReleaseResult => {
      const row = this.liveRow(id, s);
      if (!row) return { ok: false, state: "unknown" };
      if (row.state === "granted") {
        this.writeRow(this.releaseGrant(row, s.now));
      } else if (row.state === "waiting") {
        this.dequeue(row, JSON.parse(row.req) as Amounts);
        this.sql`UPDATE reservations SET state = 'released', age_at = NULL, ended_at = ${s.now} WHERE id = ${id}`;
      } else {
        return { ok: true, state: row.state as ReservationState };
      }
      this.timer(s, s.now + this.rules.doneRetentionMs);
      this.pump(s);
      return { ok: true, state: "released" };
    });
  }

  /** A reservation's state (an Execution asks when a grant notice may have been lost). */
  async status(reservationId: string): Promise<StatusResult> {
    const id = parse(ReservationId, reservationId, "status reservationId");
    return this.step((s): StatusResult => {
      const row = this.liveRow(id, s);
      if (!row) return { state: "unknown" };
      const requirements = JSON.parse(row.req) as Amounts;
      if (row.state === "granted") return { state: "granted", expiresAt: row.expires_at!, requirements };
      if (row.state === "waiting") {
        this.applyAgeing(s.now);
        const fresh = this.row(id)!;
        return { state: "waiting", position: this.aheadOf(fresh).position, requirements };
      }
      return { state: row.state as ReservationState, requirements };
    });
  }

  /** Requirements and durations per stage, plus the expected wait of the queue ahead. */
  async estimate(stages: { worker: string; resources?: Record<string, number> }[], priority: Priority): Promise<EstimateResult> {
    const list = parse(EstimateStages, stages, "estimate stages");
    const prio = parse(Priority, priority, "estimate priority");
    return this.step((s): EstimateResult => {
      const out = list.map((st) => {
        const wp = `worker:${st.worker}`;
        const requirements = st.resources ? nonZero(st.resources) : estimatedNeeds(this.stats.get(st.worker), this.pools, wp);
        requirements[wp] = Math.max(requirements[wp] ?? 0, 1);
        return { requirements, durationMs: this.durationOf(st.worker) };
      });
      let queueAheadMs = 0;
      if (this.waiters - this.parked > 0 && list.length) {
        this.applyAgeing(s.now);
        const rank = rankOf(prio);
        const counts = new Map<string, number>();
        for (const r of this.sql<{ worker: string; n: number }>`SELECT worker, COUNT(*) AS n FROM reservations
            WHERE state = 'waiting' AND parked = 0 AND eff_rank >= ${rank} GROUP BY worker`) {
          counts.set(r.worker, r.n);
        }
        for (const worker of new Set(list.map((st) => st.worker))) {
          const wait = queueWaitMs(counts.get(worker) ?? 0, this.slotsOf(worker), this.durationOf(worker));
          queueAheadMs = Math.max(queueAheadMs, wait);
        }
      }
      const totalMs = queueAheadMs + out.reduce((a, st) => a + st.durationMs, 0);
      return { stages: out, queueAheadMs, totalMs };
    });
  }

  async snapshot(): Promise<LedgerSnapshot> {
    const now = this.clock();
    const pools = [...this.pools.values()].sort((a, b) => (a.name < b.name ? -1 : 1)).map((p) => poolSnapshot(p, now));
    const snap = { pools, leases: this.leases, waiters: this.waiters };
    // Reported only once what it shows is written.
    return this.pending.length ? this.ack(snap) : snap;
  }

  /** Create or resize a pool; never revokes a grant; grants waiters that now fit. */
  async putPool(name: string, spec: PoolSpec): Promise<PoolSnapshot> {
    const poolName = parse(PoolName, name, "putPool name");
    const ps = parse(PoolSpec, spec, "putPool spec");
    const existing = this.pools.get(poolName);
    if (existing && existing.kind !== ps.kind) {
      throw invalid(`putPool: pool ${poolName} is a ${existing.kind} pool; its kind cannot change`);
    }
    return this.step((s): PoolSnapshot => {
      let p = existing;
      if (!p) {
        p = newPool(poolName, ps.kind, ps.capacity, ps.refill_per_second ?? 0, s.now);
        this.pools.set(poolName, p);
      } else {
        if (p.kind === "rate") {
          refill(p, s.now);
          const grown = Math.max(0, ps.capacity - p.capacity);
          p.tokens = Math.min(ps.capacity, p.tokens + grown);
          if (ps.refill_per_second !== undefined) p.refillPerSecond = ps.refill_per_second;
        }
        if (p.kind === "budget" && ps.refill) p.consumed = 0;
        p.capacity = ps.capacity;
      }
      this.savePool(p);
      if (this.parked > 0) {
        // Waiters parked as never-satisfiable get another look under the new sizes.
        this.sql`UPDATE reservations SET parked = 0 WHERE state = 'waiting' AND parked = 1`;
        this.parked = 0;
      }
      this.pump(s);
      return poolSnapshot(p, s.now);
    });
  }

  /** Due timers: lease expiries, refills that may unblock waiters, purge of old rows. Idempotent. */
  override async alarm(): Promise<void> {
    this.alarmAt = null;
    this.step((s) => {
      for (;;) {
        const due = this.sql<ResRow>`SELECT * FROM reservations WHERE state = 'granted' AND expires_at <= ${s.now}
          ORDER BY expires_at LIMIT ${this.rules.expireBatch}`;
        for (const row of due) this.expire(row, s);
        if (due.length < this.rules.expireBatch) break;
      }
      this.pump(s);
      this.sql`DELETE FROM reservations WHERE id IN (SELECT id FROM reservations WHERE ended_at IS NOT NULL
        AND ended_at < ${s.now - this.rules.doneRetentionMs} ORDER BY ended_at LIMIT ${this.rules.purgeBatch})`;
      this.timer(s, this.nextTimer(s.now));
    });
  }

  // -------------------------------------------------------------------------
  // Critical sections

  /**
   * A direct step: executes the group-commit queue, then runs `fn` as one
   * synchronous transaction (rolled back, and memory rebuilt from SQL, if it
   * throws); then arms timers and sends grant notices.
   */
  private step<T>(fn: (s: Step) => T): T {
    this.flushPending();
    const s: Step = { now: this.clock(), grants: [], timer: null };
    let result: T;
    try {
      result = this.ctx.storage.transactionSync(() => {
        this.inStep = true;
        const r = fn(s);
        this.writeDirty();
        return r;
      });
    } catch (err) {
      this.load();
      throw err;
    } finally {
      this.inStep = false;
    }
    this.trackCommit();
    if (s.timer !== null) this.arm(s.timer);
    this.notify(s.grants);
    return result;
  }

  /**
   * The hot path for a live grant with nobody queued (nothing to grant after
   * it): `fn` decides and changes memory, queueing its writes; the reply waits
   * for their commit. Anything else goes the direct way.
   */
  private onLiveGrant<T>(id: string, fn: (row: ResRow, now: number) => T): Promise<T> | Slow {
    if (this.waiters - this.parked !== 0) return SLOW;
    const row = this.row(id);
    const now = this.clock();
    if (row?.state !== "granted" || row.expires_at === null || row.expires_at <= now) return SLOW;
    return this.ack(fn(row, now));
  }

  /** A reserve that is granted at once with nobody queued, on the hot path; refusals answer at once. */
  private reserveFast(req: ReserveRequest, id: string, workerPool: string): Promise<ReserveResult> | ReserveResult | Slow {
    if (this.waiters - this.parked !== 0 || this.row(id)) return SLOW;
    const plan = this.plan(req, id, workerPool);
    if ("status" in plan) return plan;
    if (!this.pools.has(workerPool)) return SLOW;
    const never = this.unsatisfiable(id, plan.needs);
    if (never) return never;
    const now = this.clock();
    const { needs } = plan;
    if (!this.fitsAll(needs, now)) return SLOW;
    for (const [n, a] of Object.entries(needs)) this.take(this.pools.get(n)!, a, now);
    const expiresAt = now + req.leaseMs;
    const rank = rankOf(req.priority);
    const row = this.newRow(req, id, rank, ++this.seq, JSON.stringify(needs), now, expiresAt);
    this.track(row);
    this.dirtyRows.set(id, row);
    this.pending.push(() => this.sqlInsert(row));
    this.leases++;
    this.arm(expiresAt);
    return this.ack({ status: "granted", reservationId: id, expiresAt, requirements: needs });
  }

  /** Resolves with `result` once the queued writes are executed (the output gate then holds the reply until they are durable). */
  private ack<T>(result: T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.acks.push({ resolve: () => resolve(result), reject });
      if (!this.committing) this.flushPending();
    });
  }

  /** Executes the queued writes as one transaction, in decision order. */
  private flushPending(): void {
    if (this.pending.length === 0 && this.acks.length === 0) return;
    const writes = this.pending;
    const acks = this.acks;
    this.pending = [];
    this.acks = [];
    try {
      this.ctx.storage.transactionSync(() => {
        for (const w of writes) w();
        this.writeDirty();
      });
    } catch (err) {
      // Nothing of this batch was written and nothing of it acknowledged: memory goes back to SQL.
      this.load();
      for (const a of acks) a.reject(err);
      return;
    }
    this.dirtyRows.clear();
    for (const a of acks) a.resolve();
    this.trackCommit();
  }

  /** Notes a commit in flight; hot-path writes made meanwhile wait and share the next one. */
  private trackCommit(): void {
    if (this.committing) return;
    this.committing = true;
    const done = () => {
      this.committing = false;
      if (this.pending.length || this.acks.length) this.flushPending();
    };
    this.ctx.storage.sync().then(done, done);
  }

  /** Pool and estimate rows changed since last written, once each. */
  private writeDirty(): void {
    for (const p of this.dirtyPools) this.savePool(p);
    for (const w of this.dirtyStats) this.saveStats(w);
    this.dirtyPools.clear();
    this.dirtyStats.clear();
  }

  private timer(s: Step, at: number | null): void {
    if (at !== null && (s.timer === null || at < s.timer)) s.timer = at;
  }

  private arm(at: number): void {
    if (this.alarmAt !== null && this.alarmAt <= at) return;
    this.alarmAt = at;
    this.ctx.storage.setAlarm(at).catch((err) => {
      this.alarmAt = null;
      console.error("resource-ledger: setAlarm failed", err);
    });
  }

  private nextTimer(now: number): number | null {
    const lease = this.sql<{ t: number | null }>`SELECT MIN(expires_at) AS t FROM reservations WHERE state = 'granted'`[0]?.t ?? null;
    const ended = this.sql<{ t: number | null }>`SELECT MIN(ended_at) AS t FROM reservations WHERE ended_at IS NOT NULL`[0]?.t ?? null;
    const times = [lease, this.refillWakeAt, ended === null ? null : Math.max(now, ended + this.rules.doneRetentionMs)];
    const real = times.filter((t): t is number => t !== null);
    return real.length ? Math.min(...real) : null;
  }

  // -------------------------------------------------------------------------
  // Grant pass

  /**
   * Grants waiters in queue order (effective rank desc, then arrival), with
   * bounded backfilling: a waiter that does not fit may be passed by later ones
   * that take from a pool it needs at most `backfillLimit` times; from then on
   * its pools are held back for it. Waiters that can never fit under the
   * current sizes are parked until the next putPool.
   */
  private pump(s: Step): void {
    this.refillWakeAt = null;
    if (this.waiters - this.parked <= 0) return;
    this.applyAgeing(s.now);
    const rows = this.sql<ResRow>`SELECT * FROM reservations
      WHERE state = 'waiting' AND parked = 0 ORDER BY eff_rank DESC, seq LIMIT ${this.rules.scanLimit}`;
    const locked = new Set<string>();
    const blocked: { id: string; names: string[]; passed: number; dirty: boolean }[] = [];
    const limit = this.rules.backfillLimit;
    let wake: number | null = null;
    for (const row of rows) {
      const needs = JSON.parse(row.req) as Amounts;
      const names = Object.keys(needs);
      if (names.some((n) => !satisfiable(this.pools.get(n)!, needs[n]))) {
        this.sql`UPDATE reservations SET parked = 1 WHERE id = ${row.id}`;
        this.parked++;
        continue;
      }
      const behindLock = names.some((n) => locked.has(n));
      if (!behindLock && this.fitsAll(needs, s.now)) {
        for (const b of blocked) {
          if (!b.names.some((n) => n in needs)) continue;
          b.passed++;
          b.dirty = true;
          if (b.passed >= limit) for (const n of b.names) locked.add(n);
        }
        this.grantWaiter(row, needs, s);
        continue;
      }
      blocked.push({ id: row.id, names, passed: row.passed, dirty: false });
      if (row.passed >= limit) for (const n of names) locked.add(n);
      if (!behindLock) {
        const t = refillReadyAt(this.pools, needs, s.now);
        if (t !== null && (wake === null || t < wake)) wake = t;
      }
    }
    for (const b of blocked) if (b.dirty) this.sql`UPDATE reservations SET passed = ${b.passed} WHERE id = ${b.id}`;
    this.refillWakeAt = wake;
    this.timer(s, wake);
  }

  private grantWaiter(row: ResRow, needs: Amounts, s: Step): void {
    for (const [n, a] of Object.entries(needs)) {
      const p = this.pools.get(n)!;
      this.take(p, a, s.now);
      p.waiting--;
    }
    const expiresAt = s.now + row.lease_ms;
    this.writeRow({ ...row, state: "granted", granted_at: s.now, expires_at: expiresAt, age_at: null });
    this.waiters--;
    this.leases++;
    this.timer(s, expiresAt);
    s.grants.push({
      executionId: row.execution_id,
      notice: { reservationId: row.id, requirements: needs, stageId: row.stage_id, attempt: row.attempt, expiresAt },
    });
  }

  /** Raises the stored effective rank of waiters whose next ageing step is due. */
  private applyAgeing(now: number): void {
    const due = this.sql<{ id: string; rank: number; created_at: number }>`SELECT id, rank, created_at FROM reservations
      WHERE state = 'waiting' AND age_at IS NOT NULL AND age_at <= ${now} LIMIT 1000`;
    for (const r of due) {
      const eff = effectiveRank(r.rank, r.created_at, now, this.rules.agingMs);
      const at = nextAgeingAt(r.rank, r.created_at, eff, this.rules.agingMs);
      this.sql`UPDATE reservations SET eff_rank = ${eff}, age_at = ${at} WHERE id = ${r.id}`;
    }
  }

  // -------------------------------------------------------------------------
  // Reservations

  /** A reservation as decided: a queued (not yet executed) write wins over SQL. */
  private row(id: string): ResRow | undefined {
    return this.dirtyRows.get(id) ?? this.live.get(id) ?? this.sql<ResRow>`SELECT * FROM reservations WHERE id = ${id}`[0];
  }

  private newRow(req: ReserveRequest, id: string, rank: number, seq: number, reqJson: string, now: number, expiresAt: number): ResRow {
    return {
      id,
      execution_id: req.executionId,
      stage_id: req.stageId,
      attempt: req.attempt,
      worker: req.worker,
      rank,
      eff_rank: rank,
      age_at: null,
      seq,
      state: "granted",
      req: reqJson,
      lease_ms: req.leaseMs,
      created_at: now,
      granted_at: now,
      expires_at: expiresAt,
      passed: 0,
      parked: 0,
      usage: null,
      duration_ms: null,
      ended_at: null,
    };
  }

  private insertRow(r: ResRow): void {
    this.track(r);
    this.sqlInsert(r);
  }

  private sqlInsert(r: ResRow): void {
    this.sql`INSERT INTO reservations
      (id, execution_id, stage_id, attempt, worker, rank, eff_rank, age_at, seq, state, req, lease_ms, created_at,
       granted_at, expires_at, passed, parked, usage, duration_ms, ended_at)
      VALUES (${r.id}, ${r.execution_id}, ${r.stage_id}, ${r.attempt}, ${r.worker}, ${r.rank}, ${r.eff_rank}, ${r.age_at},
              ${r.seq}, ${r.state}, ${r.req}, ${r.lease_ms}, ${r.created_at}, ${r.granted_at}, ${r.expires_at}, ${r.passed},
              ${r.parked}, ${r.usage}, ${r.duration_ms}, ${r.ended_at})`;
  }

  /** Keeps the live-lease map in step with a row's new version. */
  private track(r: ResRow): void {
    if (r.state === "granted") this.live.set(r.id, r);
    else this.live.delete(r.id);
  }

  /** Writes the mutable columns of a row now. */
  private writeRow(r: ResRow): void {
    this.track(r);
    this.sqlUpdate(r);
  }

  private sqlUpdate(r: ResRow): void {
    this.sql`UPDATE reservations SET state = ${r.state}, eff_rank = ${r.eff_rank}, age_at = ${r.age_at},
      granted_at = ${r.granted_at}, expires_at = ${r.expires_at}, passed = ${r.passed}, parked = ${r.parked},
      usage = ${r.usage}, duration_ms = ${r.duration_ms}, ended_at = ${r.ended_at} WHERE id = ${r.id}`;
  }

  /** Hot path: the row as decided now, written with the next group commit. */
  private updateRow(r: ResRow): void {
    this.track(r);
    this.dirtyRows.set(r.id, r);
    this.pending.push(() => this.sqlUpdate(r));
  }

  /** A write now inside a direct step, else queued for the next group commit. */
  private queueWrite(write: () => void): void {
    if (this.inStep) write();
    else this.pending.push(write);
  }

  /** Requirements for a request, or a refusal for a pool that does not exist. */
  private plan(req: ReserveRequest, id: string, workerPool: string): { needs: Amounts } | ReserveResult {
    const needs = req.requirements
      ? nonZero(req.requirements)
      : estimatedNeeds(this.stats.get(req.worker), this.pools, workerPool);
    needs[workerPool] = Math.max(needs[workerPool] ?? 0, 1);
    const unknown = Object.keys(needs).filter((n) => n !== workerPool && !this.pools.has(n));
    if (unknown.length) {
      return { status: "refused", reservationId: id, code: "unknown_pool", message: `unknown pool(s): ${unknown.join(", ")}` };
    }
    return { needs };
  }

  /** A refusal when some amount can never be granted under the current sizes (all pools exist). */
  private unsatisfiable(id: string, needs: Amounts): ReserveResult | null {
    const never = Object.entries(needs).filter(([n, a]) => !satisfiable(this.pools.get(n)!, a));
    if (!never.length) return null;
    const what = never
      .map(([n, a]) => {
        const p = this.pools.get(n)!;
        const limit = p.kind === "budget" ? `${p.capacity - p.consumed} left of budget ${p.capacity}` : `capacity ${p.capacity}`;
        return `${n}: ${a} > ${limit}`;
      })
      .join("; ");
    return { status: "refused", reservationId: id, code: "resource_unsatisfiable", message: `can never be granted: ${what}` };
  }

  /** The row, with a lapsed lease expired first (so every reply sees `expired` from expiresAt on). */
  private liveRow(id: string, s: Step): ResRow | undefined {
    const row = this.row(id);
    if (row && row.state === "granted" && row.expires_at !== null && row.expires_at <= s.now) {
      this.expire(row, s);
      this.pump(s);
      return this.row(id);
    }
    return row;
  }

  private expire(row: ResRow, s: Step): void {
    const needs = JSON.parse(row.req) as Amounts;
    for (const [n, reserved] of Object.entries(needs)) {
      const p = this.pools.get(n);
      if (p) this.change(p, () => expireInto(p, reserved));
    }
    this.writeRow({ ...row, state: "expired", ended_at: s.now });
    this.leases--;
    this.timer(s, s.now + this.rules.doneRetentionMs);
  }

  private dequeue(row: ResRow, needs: Amounts): void {
    for (const n of Object.keys(needs)) {
      const p = this.pools.get(n);
      if (p) p.waiting--;
    }
    this.waiters--;
    if (row.parked) this.parked--;
  }

  private replayReserve(row: ResRow, s: Step): ReserveResult | Ended {
    const live = row.state === "granted" ? this.liveRow(row.id, s)! : row;
    if (live.state === "granted") {
      return { status: "granted", reservationId: live.id, expiresAt: live.expires_at!, requirements: JSON.parse(live.req) };
    }
    if (live.state === "waiting") {
      this.applyAgeing(s.now);
      return this.waitingResult(this.row(live.id)!);
    }
    return new Ended(live.id, live.state as ReservationState);
  }

  private waitingResult(row: ResRow): ReserveResult {
    const { position, sameWorkerAhead } = this.aheadOf(row);
    const estimatedWaitMs = queueWaitMs(sameWorkerAhead + 1, this.slotsOf(row.worker), this.durationOf(row.worker));
    return { status: "waiting", reservationId: row.id, position, estimatedWaitMs };
  }

  /** 1-based place in the queue; a parked waiter counts as behind every active one. */
  private aheadOf(row: ResRow): { position: number; sameWorkerAhead: number } {
    if (row.parked) return { position: this.waiters - this.parked + 1, sameWorkerAhead: 0 };
    const r = this.sql<{ n: number; same: number | null }>`SELECT COUNT(*) AS n, SUM(worker = ${row.worker}) AS same
      FROM reservations WHERE state = 'waiting' AND parked = 0
      AND (eff_rank > ${row.eff_rank} OR (eff_rank = ${row.eff_rank} AND seq < ${row.seq}))`[0];
    return { position: (r?.n ?? 0) + 1, sameWorkerAhead: r?.same ?? 0 };
  }

  // -------------------------------------------------------------------------
  // Pools and estimates

  private fitsAll(needs: Amounts, now: number): boolean {
    for (const n in needs) if (!fits(this.pools.get(n)!, needs[n], now)) return false;
    return true;
  }

  private take(p: PoolState, amount: number, now: number): void {
    this.change(p, () => take(p, amount, now));
  }

  /** Applies a change to a pool and marks it for writing when its persisted fields moved. */
  private change(p: PoolState, fn: () => void): void {
    fn();
    if (p.kind !== "concurrency") this.dirtyPools.add(p);
  }

  /** Moving averages of usage per (worker, pool) and per pool, and of duration per worker. */
  private learn(worker: string, used: Amounts, durationMs: number, now: number): void {
    let w = this.stats.get(worker);
    if (!w) {
      w = { worker, durAvg: null, durSamples: 0, usage: {} };
      this.stats.set(worker, w);
    }
    const alpha = this.rules.ewmaAlpha;
    [w.durAvg, w.durSamples] = ewma(w.durAvg, w.durSamples, durationMs, alpha);
    for (const [n, amount] of Object.entries(used)) {
      const prev = w.usage[n];
      w.usage[n] = ewma(prev ? prev[0] : null, prev ? prev[1] : 0, amount, alpha);
      const p = this.pools.get(n);
      if (p) {
        [p.estAvg, p.estSamples] = ewma(p.estAvg, p.estSamples, amount, alpha);
        this.dirtyPools.add(p);
      } else {
        const write = () => this.sql`INSERT INTO unknown_usage (pool, total, events, last_at) VALUES (${n}, ${amount}, 1, ${now})
          ON CONFLICT (pool) DO UPDATE SET total = total + excluded.total, events = events + 1, last_at = excluded.last_at`;
        this.queueWrite(write);
      }
    }
    this.dirtyStats.add(w);
  }

  /** Settles a live grant in memory: pools, estimates, counters. Returns the row as it becomes. */
  private settleGrant(row: ResRow, used: Amounts, duration: number | undefined, now: number): ResRow {
    const needs = JSON.parse(row.req) as Amounts;
    for (const [n, reserved] of Object.entries(needs)) {
      const p = this.pools.get(n);
      if (p) this.change(p, () => settleInto(p, reserved, used[n] ?? 0, now));
    }
    for (const [n, amount] of Object.entries(used)) {
      const p = this.pools.get(n);
      if (p && !(n in needs)) this.change(p, () => chargeExtra(p, amount, now));
    }
    const dur = duration ?? Math.max(0, now - (row.granted_at ?? now));
    this.learn(row.worker, used, dur, now);
    this.leases--;
    return { ...row, state: "settled", usage: JSON.stringify(used), duration_ms: dur, ended_at: now };
  }

  /** Releases a live grant in memory. Returns the row as it becomes. */
  private releaseGrant(row: ResRow, now: number): ResRow {
    for (const [n, reserved] of Object.entries(JSON.parse(row.req) as Amounts)) {
      const p = this.pools.get(n);
      if (p) this.change(p, () => releaseInto(p, reserved, now));
    }
    this.leases--;
    return { ...row, state: "released", ended_at: now };
  }

  private durationOf(worker: string): number {
    return this.stats.get(worker)?.durAvg ?? this.tuning.defaultStageDurationMs;
  }

  private slotsOf(worker: string): number {
    return this.pools.get(`worker:${worker}`)?.capacity ?? this.tuning.defaultWorkerConcurrency;
  }

  // -------------------------------------------------------------------------
  // Persistence

  private savePool(p: PoolState): void {
    this.sql`INSERT INTO pools (name, kind, capacity, refill_per_second, tokens, tokens_at, consumed, est_avg, est_n)
      VALUES (${p.name}, ${p.kind}, ${p.capacity}, ${p.refillPerSecond}, ${p.tokens}, ${p.tokensAt}, ${p.consumed},
              ${p.estAvg}, ${p.estSamples})
      ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, capacity = excluded.capacity,
        refill_per_second = excluded.refill_per_second, tokens = excluded.tokens, tokens_at = excluded.tokens_at,
        consumed = excluded.consumed, est_avg = excluded.est_avg, est_n = excluded.est_n`;
  }

  private saveStats(w: WorkerStats): void {
    this.sql`INSERT INTO worker_stats (worker, dur_avg, dur_n, usage)
      VALUES (${w.worker}, ${w.durAvg}, ${w.durSamples}, ${JSON.stringify(w.usage)})
      ON CONFLICT (worker) DO UPDATE SET dur_avg = excluded.dur_avg, dur_n = excluded.dur_n, usage = excluded.usage`;
  }

  /** (Re)builds memory from SQL: pools, estimates, and the counters derived from live reservations. */
  private load(): void {
    this.pools.clear();
    this.stats.clear();
    this.dirtyRows.clear();
    this.dirtyPools.clear();
    this.dirtyStats.clear();
    type PoolRow = {
      name: string;
      kind: PoolState["kind"];
      capacity: number;
      refill_per_second: number;
      tokens: number;
      tokens_at: number;
      consumed: number;
      est_avg: number | null;
      est_n: number;
    };
    for (const r of this.sql<PoolRow>`SELECT * FROM pools`) {
      this.pools.set(r.name, {
        name: r.name,
        kind: r.kind,
        capacity: r.capacity,
        refillPerSecond: r.refill_per_second,
        tokens: r.tokens,
        tokensAt: r.tokens_at,
        held: 0,
        consumed: r.consumed,
        estAvg: r.est_avg,
        estSamples: r.est_n,
        waiting: 0,
      });
    }
    for (const r of this.sql<{ worker: string; dur_avg: number | null; dur_n: number; usage: string }>`SELECT * FROM worker_stats`) {
      this.stats.set(r.worker, { worker: r.worker, durAvg: r.dur_avg, durSamples: r.dur_n, usage: JSON.parse(r.usage) });
    }
    this.leases = 0;
    this.live.clear();
    for (const r of this.sql<ResRow>`SELECT * FROM reservations WHERE state = 'granted'`) {
      this.live.set(r.id, r);
      for (const [n, a] of Object.entries(JSON.parse(r.req) as Amounts)) {
        const p = this.pools.get(n);
        if (p) p.held += a;
      }
      this.leases++;
    }
    this.waiters = 0;
    this.parked = 0;
    this.seq = 0;
    for (const r of this.sql<{ req: string; parked: number; seq: number }>`SELECT req, parked, seq FROM reservations
        WHERE state = 'waiting'`) {
      for (const n of Object.keys(JSON.parse(r.req) as Amounts)) {
        const p = this.pools.get(n);
        if (p) p.waiting++;
      }
      this.waiters++;
      if (r.parked) this.parked++;
      if (r.seq > this.seq) this.seq = r.seq;
    }
  }

  /** Memory against SQL, for tests: held amounts, counters, persisted pool fields. */
  private selfCheck(): string[] {
    const problems: string[] = [];
    const held = new Map<string, number>();
    const waiting = new Map<string, number>();
    let leases = 0;
    let waiters = 0;
    for (const r of this.sql<{ req: string; state: string }>`SELECT req, state FROM reservations WHERE state IN ('granted', 'waiting')`) {
      const needs = JSON.parse(r.req) as Amounts;
      if (r.state === "granted") leases++;
      else waiters++;
      for (const [n, a] of Object.entries(needs)) {
        const m = r.state === "granted" ? held : waiting;
        m.set(n, (m.get(n) ?? 0) + (r.state === "granted" ? a : 1));
      }
    }
    if (leases !== this.leases) problems.push(`leases: memory ${this.leases}, sql ${leases}`);
    if (this.live.size !== leases) problems.push(`live map: ${this.live.size} rows, sql ${leases} granted`);
    for (const r of this.live.values()) {
      const sqlRow = this.sql<ResRow>`SELECT * FROM reservations WHERE id = ${r.id}`[0];
      if (sqlRow?.state !== "granted" || sqlRow.expires_at !== r.expires_at) problems.push(`live map row ${r.id} differs from sql`);
    }
    if (waiters !== this.waiters) problems.push(`waiters: memory ${this.waiters}, sql ${waiters}`);
    for (const p of this.pools.values()) {
      const h = held.get(p.name) ?? 0;
      if (Math.abs(h - p.held) > 1e-6) problems.push(`${p.name}: held memory ${p.held}, sql ${h}`);
      const w = waiting.get(p.name) ?? 0;
      if (w !== p.waiting) problems.push(`${p.name}: waiting memory ${p.waiting}, sql ${w}`);
      const row = this.sql<{ tokens: number; consumed: number; capacity: number }>`SELECT tokens, consumed, capacity FROM pools
        WHERE name = ${p.name}`[0];
      if (!row) problems.push(`${p.name}: no row`);
      else if (row.capacity !== p.capacity || row.consumed !== p.consumed) problems.push(`${p.name}: row differs from memory`);
    }
    return problems;
  }

  // -------------------------------------------------------------------------
  // Grant notices

  /** Fire-and-forget, after the state change is written; a lost notice is covered by the Execution's status() poll. */
  private notify(grants: Grant[]): void {
    if (!grants.length) return;
    if (this.notifier) {
      for (const g of grants) this.notifier(g.executionId, g.notice);
      return;
    }
    const ns = (this.env as unknown as { EXECUTION?: DurableObjectNamespace }).EXECUTION;
    if (!ns) return;
    for (const g of grants) {
      try {
        const stub = ns.get(ns.idFromName(g.executionId)) as unknown as GrantNoticeTarget;
        Promise.resolve(stub.onGrant(g.notice)).catch((err) => this.noticeFailed(g, err));
      } catch (err) {
        this.noticeFailed(g, err);
      }
    }
  }

  private noticeFailed(g: Grant, err: unknown): void {
    this.noticeFailures++;
    // Logged sparingly: a burst of failures (e.g. Executions gone) must not flood the log.
    if (this.noticeFailures <= 3 || this.noticeFailures % 1000 === 0) {
      console.warn(
        `resource-ledger: grant notice for ${g.notice.reservationId} failed (${this.noticeFailures} so far):`,
        err instanceof Error ? err.message : String(err),
      );
    }
  }
}
