/**
 * The ledger's bookkeeping for one reservation at a time: what a grant takes,
 * what a settle, release or expiry gives back, what joins and leaves the
 * queue, and the estimates learnt from settles. Each method applies the rules
 * of ../ledger-rules.ts to the store's memory and writes the row's new
 * version; the caller decides when (inside one step).
 */
import {
  chargeExtra,
  ewma,
  expireInto,
  releaseInto,
  settleInto,
  take,
  type Amounts,
  type LedgerRules,
  type PoolState,
} from "../ledger-rules";
import { needsOf, type LedgerStore, type ResRow } from "./store";

export class Accounts {
  constructor(
    private readonly store: LedgerStore,
    private readonly rules: LedgerRules,
  ) {}

  /** Takes `needs` from the pools and writes the row as a live grant. */
  grant(row: ResRow, needs: Amounts, now: number): ResRow {
    for (const [n, a] of Object.entries(needs)) {
      const p = this.store.pools.get(n)!;
      this.#change(p, () => take(p, a, now));
    }
    const granted: ResRow = { ...row, state: "granted", granted_at: now, expires_at: now + row.lease_ms, age_at: null };
    this.store.putRow(granted);
    this.store.leases++;
    return granted;
  }

  enqueue(row: ResRow, needs: Amounts): void {
    this.store.putRow(row);
    this.store.waiters++;
    for (const n of Object.keys(needs)) this.store.pools.get(n)!.waiting++;
  }

  /** A waiter leaves the queue (granted or released); the caller writes its new state. */
  dequeue(row: ResRow): void {
    for (const n of Object.keys(needsOf(row))) {
      const p = this.store.pools.get(n);
      if (p) p.waiting--;
    }
    this.store.waiters--;
    if (row.parked) this.store.parked--;
  }

  /** Settles a live grant: pools, estimates, counters. Returns the row as it becomes. */
  settleGrant(row: ResRow, used: Amounts, duration: number | undefined, now: number): ResRow {
    const needs = needsOf(row);
    for (const [n, reserved] of Object.entries(needs)) {
      const p = this.store.pools.get(n);
      if (p) this.#change(p, () => settleInto(p, reserved, used[n] ?? 0, now));
    }
    for (const [n, amount] of Object.entries(used)) {
      const p = this.store.pools.get(n);
      if (p && !(n in needs)) this.#change(p, () => chargeExtra(p, amount, now));
    }
    const dur = duration ?? Math.max(0, now - (row.granted_at ?? now));
    this.#learn(row.worker, used, dur, now);
    this.store.leases--;
    return { ...row, state: "settled", usage: JSON.stringify(used), duration_ms: dur, ended_at: now };
  }

  /**
   * A settle after the lease expired: refused, but the usage still counts once,
   * for estimates, budgets and (beyond the tokens the expiry kept) rate buckets.
   */
  lateSettle(row: ResRow, used: Amounts, duration: number | undefined, now: number): ResRow {
    const needs = needsOf(row);
    for (const [n, amount] of Object.entries(used)) {
      const p = this.store.pools.get(n);
      if (!p) continue;
      const covered = p.kind === "rate" ? (needs[n] ?? 0) : 0;
      this.#change(p, () => chargeExtra(p, amount - covered, now));
    }
    const dur = duration ?? Math.max(0, (row.ended_at ?? now) - (row.granted_at ?? now));
    this.#learn(row.worker, used, dur, now);
    return { ...row, usage: JSON.stringify(used), duration_ms: dur };
  }

  releaseGrant(row: ResRow, now: number): ResRow {
    for (const [n, reserved] of Object.entries(needsOf(row))) {
      const p = this.store.pools.get(n);
      if (p) this.#change(p, () => releaseInto(p, reserved, now));
    }
    this.store.leases--;
    return { ...row, state: "released", ended_at: now };
  }

  expireGrant(row: ResRow, now: number): ResRow {
    for (const [n, reserved] of Object.entries(needsOf(row))) {
      const p = this.store.pools.get(n);
      if (p) this.#change(p, () => expireInto(p, reserved));
    }
    this.store.leases--;
    return { ...row, state: "expired", ended_at: now };
  }

  /** Applies a change to a pool and marks it for writing when its persisted fields moved. */
  #change(p: PoolState, fn: () => void): void {
    fn();
    if (p.kind !== "concurrency") this.store.touchPool(p);
  }

  /** Moving averages of usage per (worker, pool) and per pool, and of duration per worker. */
  #learn(worker: string, used: Amounts, durationMs: number, now: number): void {
    let w = this.store.stats.get(worker);
    if (!w) {
      w = { worker, durAvg: null, durSamples: 0, usage: {} };
      this.store.stats.set(worker, w);
    }
    const alpha = this.rules.ewmaAlpha;
    [w.durAvg, w.durSamples] = ewma(w.durAvg, w.durSamples, durationMs, alpha);
    for (const [n, amount] of Object.entries(used)) {
      const prev = w.usage[n];
      w.usage[n] = ewma(prev ? prev[0] : null, prev ? prev[1] : 0, amount, alpha);
      const p = this.store.pools.get(n);
      if (p) {
        [p.estAvg, p.estSamples] = ewma(p.estAvg, p.estSamples, amount, alpha);
        this.store.touchPool(p);
      } else {
        this.store.recordUnknownUsage(n, amount, now);
      }
    }
    this.store.touchStats(w);
  }
}
