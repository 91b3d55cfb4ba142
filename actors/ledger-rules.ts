/**
 * The resource ledger's rules as plain functions over plain state: pool
 * arithmetic per kind, queue ranks with ageing, moving averages and the
 * estimate formulas. Nothing here reads a clock or touches storage; every
 * function that depends on time takes `now` (unix ms), so tests drive time by
 * hand. docs/ledger.md states the same rules in prose.
 */
import { PRIORITIES, type Priority } from "../schemas/common";
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
}

export const DEFAULT_LEDGER_RULES: LedgerRules = {
  agingMs: 30_000,
  backfillLimit: 8,
  scanLimit: 256,
  doneRetentionMs: 24 * 3600_000,
  purgeBatch: 2_000,
  expireBatch: 1_000,
  ewmaAlpha: 0.2,
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
  return amount <= available(p, now) + EPS;
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
    if (p.kind !== "rate" || p.refillPerSecond <= 0) return null;
    const missing = amount - p.tokens;
    at = Math.max(at, now + Math.ceil((missing * 1000) / p.refillPerSecond) + 1);
  }
  return at > now ? at : null;
}

export function poolSnapshot(p: PoolState, now: number): PoolSnapshot {
  const s: PoolSnapshot = {
    name: p.name,
    kind: p.kind,
    capacity: p.capacity,
    in_use: inUse(p, now),
    available: available(p, now),
    waiting: p.waiting,
    estimates: { avg_usage_per_stage: p.estAvg, samples: p.estSamples },
  };
  if (p.kind === "rate") s.refill_per_second = p.refillPerSecond;
  if (p.kind === "budget") s.consumed = p.consumed;
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
