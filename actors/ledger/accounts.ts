/**
 * The ledger's bookkeeping for one reservation at a time: what a grant takes,
 * what a settle, release or expiry gives back, what joins and leaves the
 * queue, and the estimates learnt from settles. Each method applies the rules
 * of ../ledger-rules.ts to the store's memory and writes the row's new
 * version; the caller decides when (inside one step). A change to the
 * client's spend or buckets needs no write of its own: the row's write that
 * follows it in the step carries it (./client-journal.ts).
 */
import type { ClientQuotas } from "../../schemas/clients";
import {
  chargeExtra,
  clientBucket,
  costOfAmounts,
  ewma,
  expireInto,
  holdCost,
  releaseInto,
  rollMonth,
  settleInto,
  take,
  type Amounts,
  type ClientState,
  type LedgerRules,
  type PoolState,
} from "../ledger-rules";
import { clientNeedsOf, HELD, holdsClient, needsOf, type LedgerStore, type ResRow } from "./store";

export class Accounts {
  constructor(
    private readonly store: LedgerStore,
    private readonly rules: LedgerRules,
    private readonly prices: Record<string, number>,
    private readonly quotasOf: (c: ClientState) => ClientQuotas,
  ) {}

  /** Estimated cost of a stage's needs at the price table (held against its client's budget while granted). */
  costOf(amounts: Amounts): number {
    return costOfAmounts(amounts, this.prices);
  }

  /** Takes `needs` from the pools and the client's buckets, and writes the row as a live grant. */
  grant(row: ResRow, needs: Amounts, now: number): ResRow {
    for (const [n, a] of Object.entries(needs)) {
      const p = this.store.pools.get(n)!;
      this.#change(p, () => take(p, a, now));
    }
    const c = this.store.client(row.client_id, now);
    if (holdsClient(row)) {
      holdCost(c, row.cost_est, true);
      const cneeds = clientNeedsOf(row);
      for (const [n, r] of Object.entries(this.quotasOf(c).rate ?? {})) {
        if (cneeds[n]) take(clientBucket(c, n, r.per_minute, now), cneeds[n], now);
      }
    }
    this.store.advanceVirtualTime(row.tag);
    const granted: ResRow = { ...row, state: "granted", granted_at: now, expires_at: now + row.lease_ms, age_at: null, parked: 0 };
    this.store.putRow(granted);
    this.store.leases++;
    return granted;
  }

  enqueue(row: ResRow, needs: Amounts): void {
    this.store.putRow(row);
    this.store.waiters++;
    this.store.client(row.client_id, row.created_at).waiting++;
    for (const n of Object.keys(needs)) this.store.pools.get(n)!.waiting++;
  }

  /** A waiter leaves the queue (granted, released or refused); the caller writes its new state. */
  dequeue(row: ResRow): void {
    for (const n of Object.keys(needsOf(row))) {
      const p = this.store.pools.get(n);
      if (p) p.waiting--;
    }
    this.store.waiters--;
    const c = this.store.client(row.client_id, row.created_at);
    c.waiting--;
    if (row.parked === HELD) c.held--;
    else if (row.parked) this.store.parked--;
  }

  /**
   * A live grant of the client ends: its slot, estimated cost and bucket amounts come back as `back` says.
   * Null for a part that holds nothing of its client (another shard's part of the stage).
   */
  #endForClient(row: ResRow, now: number, back: (b: PoolState, reserved: number, pool: string) => void): ClientState | null {
    if (!holdsClient(row)) return null;
    const needs = clientNeedsOf(row);
    const c = this.store.client(row.client_id, now);
    holdCost(c, row.cost_est, false);
    for (const [n, b] of c.rate) if (needs[n]) back(b, needs[n], n);
    // Its waiters held by a quota get another look in this step's grant pass.
    this.store.unholdClient(c);
    return c;
  }

  /** Settled usage is the client's spend this month (calendar month, UTC, of the settle). */
  #spend(c: ClientState, used: Amounts, now: number): void {
    rollMonth(c, now);
    c.spent += this.costOf(used);
  }

  /**
   * The usage the client is charged for: a part holding the client is charged the whole stage's
   * (`stageUsage`, when the Execution sends it), every other row its own.
   */
  #clientUsage(row: ResRow, used: Amounts, stageUsage: Amounts | undefined): Amounts {
    return row.part !== null && stageUsage ? stageUsage : used;
  }

  /** Settles a live grant: pools, estimates, counters. Returns the row as it becomes. */
  settleGrant(row: ResRow, used: Amounts, duration: number | undefined, now: number, stageUsage?: Amounts, stages = 1): ResRow {
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
    this.#learnEach(row.worker, used, dur, stages, now);
    const charged = this.#clientUsage(row, used, stageUsage);
    const c = this.#endForClient(row, now, (b, reserved, pool) => settleInto(b, reserved, charged[pool] ?? 0, now));
    if (c) this.#spend(c, charged, now);
    this.store.leases--;
    return { ...row, state: "settled", usage: JSON.stringify(used), duration_ms: dur, ended_at: now };
  }

  /**
   * A settle after the lease expired: refused, but the usage still counts once,
   * for estimates, budgets and (beyond the tokens the expiry kept) rate buckets.
   */
  lateSettle(row: ResRow, used: Amounts, duration: number | undefined, now: number, stageUsage?: Amounts, stages = 1): ResRow {
    const needs = needsOf(row);
    for (const [n, amount] of Object.entries(used)) {
      const p = this.store.pools.get(n);
      if (!p) continue;
      const covered = p.kind === "rate" ? (needs[n] ?? 0) : 0;
      this.#change(p, () => chargeExtra(p, amount - covered, now));
    }
    const dur = duration ?? Math.max(0, (row.ended_at ?? now) - (row.granted_at ?? now));
    this.#learnEach(row.worker, used, dur, stages, now);
    if (holdsClient(row)) this.#spend(this.store.client(row.client_id, now), this.#clientUsage(row, used, stageUsage), now);
    return { ...row, usage: JSON.stringify(used), duration_ms: dur };
  }

  releaseGrant(row: ResRow, now: number): ResRow {
    const needs = needsOf(row);
    for (const [n, reserved] of Object.entries(needs)) {
      const p = this.store.pools.get(n);
      if (p) this.#change(p, () => releaseInto(p, reserved, now));
    }
    this.#endForClient(row, now, (b, reserved) => releaseInto(b, reserved, now));
    this.store.leases--;
    return { ...row, state: "released", ended_at: now };
  }

  expireGrant(row: ResRow, now: number): ResRow {
    const needs = needsOf(row);
    for (const [n, reserved] of Object.entries(needs)) {
      const p = this.store.pools.get(n);
      if (p) this.#change(p, () => expireInto(p, reserved));
    }
    this.#endForClient(row, now, (b, reserved) => expireInto(b, reserved));
    this.store.leases--;
    return { ...row, state: "expired", ended_at: now };
  }

  /** Applies a change to a pool and marks it for writing when its persisted fields moved. */
  #change(p: PoolState, fn: () => void): void {
    fn();
    if (p.kind !== "concurrency") this.store.touchPool(p);
  }

  /** A settle of `stages` stages of one chain grant: each counts as one sample of the worker's averages, an equal share of the whole. */
  #learnEach(worker: string, used: Amounts, durationMs: number, stages: number, now: number): void {
    if (stages <= 1) {
      this.#learn(worker, used, durationMs, now);
      return;
    }
    const share = Object.fromEntries(Object.entries(used).map(([n, a]) => [n, a / stages]));
    for (let i = 0; i < stages; i++) this.#learn(worker, share, durationMs / stages, now);
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
