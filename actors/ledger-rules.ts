/**
 * The resource ledger's rules as plain functions over plain state: pool
 * arithmetic per kind, queue ranks with ageing, moving averages and the
 * estimate formulas. Nothing here reads a clock or touches storage; every
 * function that depends on time takes `now` (unix ms), so tests drive time by
 * hand. docs/ledger.md states the same rules in prose.
 */
import { PRIORITIES, type Priority } from "../schemas/common";
import type { ClientQuotas } from "../schemas/clients";
import type { PoolKind, PoolSnapshot } from "../schemas/ledger";

/** Rank of the highest priority (critical). Ageing never lifts a waiter above it. */
export const TOP_RANK = PRIORITIES.length - 1;

export interface LedgerRules {
  /** A waiter's effective rank rises one level per `agingMs` waited, up to TOP_RANK. */
  agingMs: number;
  /**
   * Bounded backfilling: a waiter that does not fit may be passed by later
   * waiters that take from a pool it needs at most this many times; after that
   * its pools are reserved for it (nothing behind it takes from them).
   */
  backfillLimit: number;
  /** Waiters examined per grant pass, from the head of the queue. */
  scanLimit: number;
  /** Finished reservations are kept this long (idempotent replies), then purged by the alarm. */
  doneRetentionMs: number;
  /** Rows purged per alarm run. */
  purgeBatch: number;
  /** Expired leases processed per alarm run (the alarm re-arms at once if more are due). */
  expireBatch: number;
  /** Weight of a new sample in the moving averages once `1 / ewmaAlpha` samples exist. */
  ewmaAlpha: number;
  /**
   * The most a stage may use per pool, as a multiple of what it reserved (the
   * Execution refuses more: `usage_out_of_bounds`); the budget admission counts
   * running stages at this worst case (budgetFits).
   */
  usageMaxFactor: number;
  /**
   * Reservation writes between two checkpoints of the `clients` table (the
   * rows carry their client's state meanwhile: ledger/client-journal.ts). A
   * restart reads at most about this many rows past the checkpoint.
   */
  clientCheckpointRows: number;
}

export const DEFAULT_LEDGER_RULES: LedgerRules = {
  agingMs: 30_000,
  backfillLimit: 8,
  scanLimit: 256,
  doneRetentionMs: 24 * 3600_000,
  purgeBatch: 2_000,
  expireBatch: 1_000,
  ewmaAlpha: 0.2,
  usageMaxFactor: 10,
  clientCheckpointRows: 2_000,
};

/**
 * Rules from the tuning object: `ledgerAgingMs`, `ledgerBackfillLimit`,
 * `ledgerScanLimit`, `ledgerDoneRetentionMs` override the defaults when set
 * (they pass through the TUNING var even before src/config.ts names them).
 */
export function rulesFromTuning(tuning: object): LedgerRules {
  const t = tuning as Record<string, unknown>;
  const num = (v: unknown, d: number, min: number) =>
    typeof v === "number" && Number.isFinite(v) && v >= min ? v : d;
  return {
    ...DEFAULT_LEDGER_RULES,
    agingMs: num(t.ledgerAgingMs, DEFAULT_LEDGER_RULES.agingMs, 1),
    backfillLimit: Math.floor(num(t.ledgerBackfillLimit, DEFAULT_LEDGER_RULES.backfillLimit, 0)),
    scanLimit: Math.floor(num(t.ledgerScanLimit, DEFAULT_LEDGER_RULES.scanLimit, 1)),
    doneRetentionMs: num(t.ledgerDoneRetentionMs, DEFAULT_LEDGER_RULES.doneRetentionMs, 0),
    usageMaxFactor: num(t.usageMaxFactor, DEFAULT_LEDGER_RULES.usageMaxFactor, 1),
  };
}

// ---------------------------------------------------------------------------
// Queue ranks and ageing

export function rankOf(priority: Priority): number {
  return PRIORITIES.indexOf(priority);
}

/** min(TOP_RANK, base + floor(waited / agingMs)); a clock that went backwards counts as no wait. */
export function effectiveRank(base: number, enqueuedAt: number, now: number, agingMs: number): number {
  const waited = Math.max(0, now - enqueuedAt);
  return Math.min(TOP_RANK, base + Math.floor(waited / agingMs));
}

/** When the effective rank next rises, or null once it is TOP_RANK. */
export function nextAgeingAt(base: number, enqueuedAt: number, eff: number, agingMs: number): number | null {
  if (eff >= TOP_RANK) return null;
  return enqueuedAt + (eff - base + 1) * agingMs;
}

// ---------------------------------------------------------------------------
// Pools

export interface PoolState {
  name: string;
  kind: PoolKind;
  capacity: number;
  /** rate pools only; 0 otherwise. */
  refillPerSecond: number;
  /** rate pools: tokens in the bucket as of `tokensAt`. */
  tokens: number;
  tokensAt: number;
  /** Sum reserved by live (granted, unexpired) reservations. Derived from them at load. */
  held: number;
  /** budget pools: consumed by settled usage since the last operator refill. */
  consumed: number;
  /** Moving average of settled usage per stage that reported this pool. */
  estAvg: number | null;
  estSamples: number;
  /** Waiters (parked or not) whose requirements name this pool. Derived at load. */
  waiting: number;
  /** Provider backoff: nothing is granted from the pool before this time (null: not paused). */
  pausedUntil?: number | null;
}

export type Amounts = Record<string, number>;

const EPS = 1e-9;
function tidy(x: number): number {
  return Math.abs(x) < EPS ? 0 : x;
}

export function newPool(name: string, kind: PoolKind, capacity: number, refillPerSecond: number, now: number): PoolState {
  return {
    name,
    kind,
    capacity,
    refillPerSecond: kind === "rate" ? refillPerSecond : 0,
    tokens: kind === "rate" ? capacity : 0,
    tokensAt: now,
    held: 0,
    consumed: 0,
    estAvg: null,
    estSamples: 0,
    waiting: 0,
  };
}

/**
 * An operator's change of an existing pool of the same kind (putPool): the
 * capacity; a rate pool's bucket grows by what the capacity grew, and its
 * refill rate when given; a budget's consumption goes back to 0 on `refill`.
 */
export function resizePool(p: PoolState, spec: { capacity: number; refill_per_second?: number; refill?: boolean }, now: number): PoolState {
  if (p.kind === "rate") {
    refill(p, now);
    const grown = Math.max(0, spec.capacity - p.capacity);
    p.tokens = Math.min(spec.capacity, p.tokens + grown);
    if (spec.refill_per_second !== undefined) p.refillPerSecond = spec.refill_per_second;
  }
  if (p.kind === "budget" && spec.refill) p.consumed = 0;
  p.capacity = spec.capacity;
  return p;
}

/**
 * Lazy token-bucket refill. Refilling in memory without persisting is safe:
 * the bucket is a pure function of (tokens, tokensAt, now), capped at capacity.
 */
export function refill(p: PoolState, now: number): void {
  if (p.kind !== "rate" || now <= p.tokensAt) return;
  p.tokens = Math.min(p.capacity, p.tokens + ((now - p.tokensAt) * p.refillPerSecond) / 1000);
  p.tokensAt = now;
}

/** What a new grant could take right now. */
export function available(p: PoolState, now: number): number {
  switch (p.kind) {
    case "concurrency":
      return Math.max(0, p.capacity - p.held);
    case "budget":
      return Math.max(0, p.capacity - p.consumed - p.held);
    case "rate":
      refill(p, now);
      return Math.max(0, p.tokens);
  }
}

/** Concurrency and budget: held by live leases. Rate: tokens out of the bucket (capacity - tokens). */
export function inUse(p: PoolState, now: number): number {
  if (p.kind === "rate") {
    refill(p, now);
    return tidy(p.capacity - p.tokens);
  }
  return tidy(p.held);
}

/**
 * Whether `amount` could ever be granted without an operator's action: not
 * more than the capacity, and for a budget not more than what is left of it
 * (consumption only grows until `putPool(..., { refill: true })`).
 */
export function satisfiable(p: PoolState, amount: number): boolean {
  if (p.kind === "budget") return amount <= p.capacity - p.consumed + EPS;
  return amount <= p.capacity + EPS;
}

export function fits(p: PoolState, amount: number, now: number): boolean {
  if (isPaused(p, now)) return false;
  return amount <= available(p, now) + EPS;
}

export function isPaused(p: PoolState, now: number): boolean {
  return p.pausedUntil != null && now < p.pausedUntil;
}

/**
 * A provider's rate-limit report on a rate pool: the bucket is lowered to
 * `remaining` (never raised), and `retry_after_ms` (or `remaining: 0` with
 * `reset_ms`) pauses the pool until then (a later pause never shortens an
 * earlier one). Returns whether anything changed.
 */
export function applyRateLimit(
  p: PoolState,
  r: { remaining?: number; reset_ms?: number; retry_after_ms?: number },
  now: number,
): boolean {
  let changed = false;
  if (r.remaining !== undefined && p.kind === "rate") {
    refill(p, now);
    if (r.remaining < p.tokens) {
      p.tokens = tidy(Math.max(0, r.remaining));
      changed = true;
    }
  }
  const pauseMs = r.retry_after_ms ?? (r.remaining === 0 ? r.reset_ms : undefined);
  if (pauseMs !== undefined && pauseMs > 0) {
    const until = now + pauseMs;
    if (p.pausedUntil == null || p.pausedUntil < until) {
      p.pausedUntil = until;
      changed = true;
    }
  }
  return changed;
}

/** A grant: a concurrency slot or budget amount is held; a rate pool's tokens are taken. */
export function take(p: PoolState, amount: number, now: number): void {
  p.held += amount;
  if (p.kind === "rate") {
    refill(p, now);
    p.tokens = tidy(Math.max(0, p.tokens - amount));
  }
}

/**
 * Settle of a live grant: the hold ends; a budget consumes `used`; a rate pool
 * gets `reserved - used` back (never above capacity) or, when more was used
 * than reserved, gives up the excess (never below 0: the bucket has no debt).
 */
export function settleInto(p: PoolState, reserved: number, used: number, now: number): void {
  p.held = tidy(p.held - reserved);
  if (p.kind === "budget") p.consumed += used;
  if (p.kind === "rate") {
    refill(p, now);
    p.tokens = tidy(Math.min(p.capacity, Math.max(0, p.tokens + reserved - used)));
  }
}

/** Release of a live grant: everything back (rate tokens up to capacity). */
export function releaseInto(p: PoolState, reserved: number, now: number): void {
  p.held = tidy(p.held - reserved);
  if (p.kind === "rate") {
    refill(p, now);
    p.tokens = Math.min(p.capacity, p.tokens + reserved);
  }
}

/** Expiry: slots and budget holds return; a rate pool's tokens stay spent (usage unknown). */
export function expireInto(p: PoolState, reserved: number): void {
  p.held = tidy(p.held - reserved);
}

/**
 * Usage that no live hold covers: a settle after expiry, or usage of a pool
 * that was not reserved. Budgets consume it; rate pools lose `extra` tokens
 * (down to 0); concurrency pools have nothing to charge.
 */
export function chargeExtra(p: PoolState, extra: number, now: number): void {
  if (extra <= 0) return;
  if (p.kind === "budget") p.consumed += extra;
  if (p.kind === "rate") {
    refill(p, now);
    p.tokens = tidy(Math.max(0, p.tokens - extra));
  }
}

/**
 * When a rate-only shortfall of `needs` is over by refill alone, or null when
 * some non-rate pool is short (capacity then returns through a settle, release
 * or expiry, each of which runs a grant pass anyway).
 */
export function refillReadyAt(pools: Map<string, PoolState>, needs: Amounts, now: number): number | null {
  let at = now;
  for (const [name, amount] of Object.entries(needs)) {
    const p = pools.get(name);
    if (!p) return null;
    if (fits(p, amount, now)) continue;
    if (isPaused(p, now)) {
      // A provider backoff ends by itself: wake then (and look at the rest of the shortfall again).
      at = Math.max(at, p.pausedUntil!);
      if (amount <= available(p, now) + EPS) continue;
    }
    if (p.kind !== "rate" || p.refillPerSecond <= 0) return null;
    const missing = amount - p.tokens;
    at = Math.max(at, now + Math.ceil((missing * 1000) / p.refillPerSecond) + 1);
  }
  return at > now ? at : null;
}

/** The pool as the snapshot shows it; `shard` is the ledger shard that keeps it. */
export function poolSnapshot(p: PoolState, now: number, shard = 0): PoolSnapshot {
  const s: PoolSnapshot = {
    name: p.name,
    shard,
    kind: p.kind,
    capacity: p.capacity,
    in_use: inUse(p, now),
    available: available(p, now),
    waiting: p.waiting,
    estimates: { avg_usage_per_stage: p.estAvg, samples: p.estSamples },
  };
  if (p.kind === "rate") s.refill_per_second = p.refillPerSecond;
  if (p.kind === "budget") s.consumed = p.consumed;
  if (isPaused(p, now)) {
    // Nothing can be granted from a paused pool, whatever its bucket holds.
    s.paused_until = p.pausedUntil!;
    s.available = 0;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Moving averages and estimates

/** Cumulative mean for the first 1/alpha samples, then an exponential moving average. */
export function ewma(avg: number | null, samples: number, sample: number, alpha: number): [number, number] {
  const n = samples + 1;
  if (avg === null) return [sample, n];
  const w = Math.max(1 / n, alpha);
  return [avg + w * (sample - avg), n];
}

export interface WorkerStats {
  worker: string;
  durAvg: number | null;
  durSamples: number;
  /** pool -> [average usage per stage, samples] */
  usage: Record<string, [number, number]>;
}

/**
 * What to reserve for a stage of `worker` that names no requirements: for each
 * existing pool the worker's past settles reported, the moving average rounded
 * up and capped at the pool's capacity (an estimate is never refused as
 * unsatisfiable by capacity alone). No history: nothing (the caller adds the
 * worker slot).
 */
export function estimatedNeeds(stats: WorkerStats | undefined, pools: Map<string, PoolState>, workerPool: string): Amounts {
  const needs: Amounts = {};
  if (!stats) return needs;
  for (const [pool, [avg]] of Object.entries(stats.usage)) {
    const p = pools.get(pool);
    if (!p || pool === workerPool || !(avg > 0)) continue;
    needs[pool] = Math.min(Math.ceil(avg), p.capacity);
  }
  return needs;
}

/**
 * Expected wait of a request for `worker` with `ahead` waiters of the same
 * worker queued before it: ceil(ahead / slots) waves of the worker's average
 * stage duration, where slots is the capacity of `worker:{worker}`.
 */
export function queueWaitMs(ahead: number, slots: number, durationMs: number): number {
  if (ahead <= 0) return 0;
  return Math.ceil(ahead / Math.max(1, slots)) * durationMs;
}

/** Drops zero amounts; returns a fresh object. */
export function nonZero(amounts: Amounts): Amounts {
  const out: Amounts = {};
  for (const [k, v] of Object.entries(amounts)) if (v > 0) out[k] = v;
  return out;
}

// ---------------------------------------------------------------------------
// Clients: quotas, budgets and fair sharing

export interface ClientState {
  id: string;
  /** The client's own quotas (null: defaults only). */
  own: ClientQuotas | null;
  /** Calendar month (UTC) of `spent`, `YYYY-MM`. */
  month: string;
  /** Settled cost this month at the price table. */
  spent: number;
  /** Per-pool token buckets of the client's `rate` quota, `client:{id}:{pool}`; created on first use. */
  rate: Map<string, PoolState>;
  /** Start bucket of `max_starts_per_minute` (null until first used). */
  starts: PoolState | null;
  /** Fair queue: virtual finish tag of the client's last queued waiter. */
  lastTag: number;
  /** Derived from the reservations at load: granted stages, their estimated cost, waiters, waiters held by a quota. */
  running: number;
  heldCost: number;
  /** The estimated costs of the running stages: estimate -> how many run with it (for the largest, budgetFits). */
  heldCosts: Map<number, number>;
  waiting: number;
  held: number;
}

export function newClient(id: string, now: number): ClientState {
  return { id, own: null, month: monthOf(now), spent: 0, rate: new Map(), starts: null, lastTag: 0, running: 0, heldCost: 0, heldCosts: new Map(), waiting: 0, held: 0 };
}

/** The quotas in force: the client's own fields over the defaults' (a client's `rate` replaces the defaults' whole). */
export function quotasOf(defaults: ClientQuotas, own: ClientQuotas | null): ClientQuotas {
  return { ...defaults, ...(own ?? {}) };
}

/** A stage of the client's starts (true) or stops (false) running with estimated cost `cost`. */
export function holdCost(c: ClientState, cost: number, on: boolean): void {
  const n = (c.heldCosts.get(cost) ?? 0) + (on ? 1 : -1);
  if (n > 0) c.heldCosts.set(cost, n);
  else c.heldCosts.delete(cost);
  c.running += on ? 1 : -1;
  c.heldCost = on ? c.heldCost + cost : Math.max(0, c.heldCost - cost);
}

/** The largest estimated cost among the client's running stages (0 when none runs). */
export function largestHeld(c: ClientState): number {
  let max = 0;
  for (const cost of c.heldCosts.keys()) if (cost > max) max = cost;
  return max;
}

/**
 * Budget admission (docs/ledger.md, "Budget guarantee"). A stage may use up to
 * F = usageMaxFactor times its estimate (the Execution refuses more), so a
 * running stage can cost at most F x estimate: its worst excess is (F - 1) x
 * estimate. A new stage with estimate `cost` is admitted only if the budget
 * covers every running stage and the new one at their worst, except the one
 * whose worst excess is the largest, which counts at its estimate:
 *
 *   spent + F x (held + cost) - (F - 1) x max(largest held, cost) <= budget
 *
 * Alone (nothing running) that is spent + cost <= budget. Then whatever the
 * stages running at a grant really use, the spend once they all settled is at
 * most the budget plus one stage's actual excess over its estimate.
 */
export function budgetFits(budget: number, spent: number, held: number, largest: number, cost: number, factor: number): boolean {
  const worst = spent + factor * (held + cost) - (factor - 1) * Math.max(largest, cost);
  return worst <= budget + EPS;
}

/** `YYYY-MM` of a unix-ms time, UTC. */
export function monthOf(now: number): string {
  return new Date(now).toISOString().slice(0, 7);
}

/** A new calendar month starts the spend at 0. */
export function rollMonth(c: ClientState, now: number): void {
  const m = monthOf(now);
  if (m !== c.month) {
    c.month = m;
    c.spent = 0;
  }
}

/** Cost of amounts at the price table (pools without a price cost nothing). Micro-units, rounded once, like src/cost.ts. */
export function costOfAmounts(amounts: Amounts, perUnit: Record<string, number>): number {
  let micros = 0;
  for (const [pool, a] of Object.entries(amounts)) {
    const price = perUnit[pool];
    if (price !== undefined) micros += Math.round(a * price * 1_000_000);
  }
  return micros / 1_000_000;
}

/** The client's bucket for `pool` under a `per_minute` quota (full when new; resized when the quota changed). */
export function clientBucket(c: ClientState, pool: string, perMinute: number, now: number): PoolState {
  let b = c.rate.get(pool);
  if (!b) {
    b = newPool(`client:${c.id}:${pool}`, "rate", perMinute, perMinute / 60, now);
    c.rate.set(pool, b);
  } else if (b.capacity !== perMinute) {
    refill(b, now);
    b.tokens = Math.min(perMinute, b.tokens + Math.max(0, perMinute - b.capacity));
    b.capacity = perMinute;
    b.refillPerSecond = perMinute / 60;
  }
  return b;
}

/**
 * Why a client's quota keeps a stage with `needs` (estimated cost `cost`)
 * from being granted now, or null. Checked in the same decision as the pools,
 * so a grant never exceeds either. Order: running stages, budget, rate.
 */
export function clientBlock(
  q: ClientQuotas,
  c: ClientState,
  needs: Amounts,
  cost: number,
  now: number,
  /** usageMaxFactor (budgetFits); 1 counts running stages at their estimates only. */
  factor = 1,
): "client_quota" | "client_budget" | "client_rate" | null {
  if (q.max_running_stages !== undefined && c.running + 1 > q.max_running_stages) return "client_quota";
  if (q.monthly_budget !== undefined) {
    rollMonth(c, now);
    if (!budgetFits(q.monthly_budget, c.spent, c.heldCost, largestHeld(c), cost, factor)) return "client_budget";
  }
  for (const [pool, r] of Object.entries(q.rate ?? {})) {
    const a = needs[pool];
    if (a && !fits(clientBucket(c, pool, r.per_minute, now), a, now)) return "client_rate";
  }
  return null;
}

/**
 * The budget can never cover the stage while nothing of the client's runs:
 * nothing will settle or be given back, so only an operator (a raised budget)
 * or the next month helps. Such a stage fails `budget_exhausted`.
 */
export function budgetExhausted(q: ClientQuotas, c: ClientState, cost: number, now: number): boolean {
  if (q.monthly_budget === undefined || c.running > 0) return false;
  rollMonth(c, now);
  return c.spent + cost > q.monthly_budget + EPS;
}

/** A stage that can never fit the client's rate quota (more than a bucket holds). */
export function clientRateUnsatisfiable(q: ClientQuotas, needs: Amounts): string | null {
  for (const [pool, r] of Object.entries(q.rate ?? {})) {
    if ((needs[pool] ?? 0) > r.per_minute + EPS) return `${pool}: ${needs[pool]} > client rate ${r.per_minute}/min`;
  }
  return null;
}

/**
 * Weighted fair queueing within a priority level: a new waiter's tag is
 * max(virtual time, the client's last tag) + 1 / weight, and the queue within
 * one effective rank is ordered by tag, then arrival. The virtual time is the
 * largest tag granted so far. So a client's waiters are FIFO (its tags only
 * grow), and a client that starts waiting is tagged just past what was granted
 * last, never behind another client's backlog: with equal weights its first
 * waiter is behind at most one waiter of each other waiting client.
 */
export function fairTag(virtualTime: number, lastTag: number, weight: number): number {
  return Math.max(virtualTime, lastTag) + 1 / Math.max(1, weight);
}

/** Order of two waiters: effective rank desc, then fair tag, then arrival. */
export function queueOrder(a: { eff_rank: number; tag: number; seq: number }, b: { eff_rank: number; tag: number; seq: number }): number {
  return b.eff_rank - a.eff_rank || a.tag - b.tag || a.seq - b.seq;
}

/**
 * A start (POST /execute) of a client: refused above `max_priority`, when the
 * month's budget is already spent, or over `max_starts_per_minute` (a token
 * bucket of that many starts refilled per minute; `retryAfterMs` is when the
 * next token is there). Takes the start's token when admitted.
 */
export function admitStart(
  q: ClientQuotas,
  c: ClientState,
  priority: Priority,
  now: number,
):
  | { ok: true }
  | { ok: false; code: "priority_not_allowed" | "budget_exhausted" | "rate_limited"; message: string; retryAfterMs?: number } {
  if (q.max_priority !== undefined && rankOf(priority) > rankOf(q.max_priority)) {
    return { ok: false, code: "priority_not_allowed", message: `client ${c.id} may ask for at most priority ${q.max_priority}` };
  }
  if (q.monthly_budget !== undefined) {
    rollMonth(c, now);
    if (c.spent >= q.monthly_budget - EPS) {
      return { ok: false, code: "budget_exhausted", message: `client ${c.id} has spent its monthly budget of ${q.monthly_budget} (${c.spent} in ${c.month})` };
    }
  }
  if (q.max_starts_per_minute !== undefined) {
    const per = q.max_starts_per_minute;
    if (!c.starts || c.starts.capacity !== per) c.starts = newPool(`client:${c.id}:starts`, "rate", per, per / 60, now);
    if (!fits(c.starts, 1, now)) {
      const retryAfterMs = Math.max(1, Math.ceil(((1 - c.starts.tokens) * 1000) / c.starts.refillPerSecond));
      return { ok: false, code: "rate_limited", message: `client ${c.id} may start at most ${per} executions per minute`, retryAfterMs };
    }
    take(c.starts, 1, now);
    c.starts.held = 0; // a start holds nothing: the token is just spent
  }
  return { ok: true };
}

/** When the client's rate buckets hold enough for `needs` again (null: they already do). */
export function clientRateReadyAt(q: ClientQuotas, c: ClientState, needs: Amounts, now: number): number | null {
  let at: number | null = null;
  for (const [pool, r] of Object.entries(q.rate ?? {})) {
    const a = needs[pool];
    if (!a) continue;
    const b = clientBucket(c, pool, r.per_minute, now);
    if (fits(b, a, now)) continue;
    const t = now + Math.ceil(((a - b.tokens) * 1000) / b.refillPerSecond) + 1;
    at = at === null ? t : Math.max(at, t);
  }
  return at;
}
