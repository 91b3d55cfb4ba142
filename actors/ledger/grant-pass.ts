/**
 * The grant pass: after anything that frees capacity (a settle, release,
 * expiry, resize or refill) and after a reserve that queues, waiters are
 * granted in queue order with bounded backfilling (docs/ledger.md, "The
 * queue"). It runs inside the caller's step and decides synchronously.
 */
import type { GrantNotice } from "../../schemas/ledger";
import type { ClientQuotas, WaitReason } from "../../schemas/clients";
import {
  budgetExhausted,
  clientBlock,
  clientBucket,
  clientRateReadyAt,
  effectiveRank,
  isPaused,
  fits,
  nextAgeingAt,
  refillReadyAt,
  satisfiable,
  type Amounts,
  type ClientState,
  type LedgerRules,
  type PoolState,
} from "../ledger-rules";
import type { Accounts } from "./accounts";
import { clientNeedsOf, HELD, holdsClient, needsOf, PARKED, type LedgerStore, type ResRow } from "./store";

/** The quotas of a reservation that does not hold its client (another shard's part): none. */
export const NO_QUOTAS: ClientQuotas = {};

/** One synchronous decision: what it granted and the earliest timer it needs. */
export interface Step {
  now: number;
  grants: { executionId: string; notice: GrantNotice }[];
  /** Executions given a client execution slot in this step (./slots.ts), to be told. */
  slots: string[];
  /** Chain grants cut in this step (decisions.ts), whose executions are to be told. */
  cuts: { executionId: string; reservationId: string }[];
  timer: number | null;
}

export function timer(s: Step, at: number | null): void {
  if (at !== null && (s.timer === null || at < s.timer)) s.timer = at;
}

export function fitsAll(pools: Map<string, PoolState>, needs: Amounts, now: number): boolean {
  for (const n in needs) if (!fits(pools.get(n)!, needs[n], now)) return false;
  return true;
}

export class GrantPass {
  /** Earliest time a rate-pool refill lets a blocked waiter fit (from the last pass). */
  refillWakeAt: number | null = null;

  constructor(
    private readonly store: LedgerStore,
    private readonly accounts: Accounts,
    private readonly rules: LedgerRules,
    private readonly quotasOf: (c: ClientState) => ClientQuotas,
    /** The shard a part's grant notice names (which part of its stage was granted). */
    private readonly shardOf: (row: ResRow) => number,
  ) {}

  /** The row's client, the quotas that apply to the row, and the amounts its client's buckets judge. */
  clientOf(row: ResRow, now: number): { c: ClientState; q: ClientQuotas; cneeds: Amounts } {
    const c = this.store.client(row.client_id, now);
    if (!holdsClient(row)) return { c, q: NO_QUOTAS, cneeds: {} };
    return { c, q: this.quotasOf(c), cneeds: clientNeedsOf(row) };
  }


  /**
   * Grants waiters in queue order (effective rank desc, then fair tag, then
   * arrival), within their clients' quotas, with
   * bounded backfilling: a waiter that does not fit may be passed by later ones
   * that take from a pool it needs at most `backfillLimit` times; from then on
   * its pools are held back for it. Waiters that can never fit under the
   * current sizes are parked until the next putPool.
   */
  run(s: Step): void {
    this.refillWakeAt = null;
    const store = this.store;
    if (store.activeWaiters <= 0) return;
    this.applyAgeing(s.now);
    const rows = store.queueHead(this.rules.scanLimit);
    const locked = new Set<string>();
    const blocked: { row: ResRow; names: string[]; passed: number }[] = [];
    const limit = this.rules.backfillLimit;
    let wake: number | null = null;
    for (const row of rows) {
      const needs = needsOf(row);
      const names = Object.keys(needs);
      if (names.some((n) => !satisfiable(store.pools.get(n)!, needs[n]))) {
        store.putRow({ ...row, parked: PARKED });
        store.parked++;
        continue;
      }
      // The client's own limits first. A waiter its client holds back is not
      // a head: it holds nobody else back and is passed without a count.
      const { c, q, cneeds } = this.clientOf(row, s.now);
      if (budgetExhausted(q, c, row.cost_est, s.now)) {
        this.accounts.dequeue(row);
        store.putRow({ ...row, state: "refused", age_at: null, ended_at: s.now });
        timer(s, s.now + this.rules.doneRetentionMs);
        continue;
      }
      const why = clientBlock(q, c, cneeds, row.cost_est, s.now, this.rules.usageMaxFactor);
      if (why === "client_rate") {
        const t = clientRateReadyAt(q, c, cneeds, s.now);
        if (t !== null && (wake === null || t < wake)) wake = t;
        continue;
      }
      if (why) {
        // Held until one of the client's grants ends or its quota changes (both unhold it).
        store.putRow({ ...row, parked: HELD });
        c.held++;
        continue;
      }
      // A provider backoff holds this waiter, not the others' pools: no head, no pass count; wake when it ends.
      const pausedUntil = names.reduce((t, n) => {
        const p = store.pools.get(n)!;
        return isPaused(p, s.now) ? Math.max(t, p.pausedUntil!) : t;
      }, 0);
      if (pausedUntil > 0) {
        if (wake === null || pausedUntil < wake) wake = pausedUntil;
        continue;
      }
      const behindLock = names.some((n) => locked.has(n));
      if (!behindLock && fitsAll(store.pools, needs, s.now)) {
        for (const b of blocked) {
          if (!b.names.some((n) => n in needs)) continue;
          b.passed++;
          if (b.passed >= limit) for (const n of b.names) locked.add(n);
        }
        this.#grantWaiter(row, needs, s);
        continue;
      }
      blocked.push({ row, names, passed: row.passed });
      if (row.passed >= limit) for (const n of names) locked.add(n);
      if (!behindLock) {
        const t = refillReadyAt(store.pools, needs, s.now);
        if (t !== null && (wake === null || t < wake)) wake = t;
      }
    }
    for (const b of blocked) if (b.passed !== b.row.passed) store.putRow({ ...b.row, passed: b.passed });
    this.refillWakeAt = wake;
    timer(s, wake);
  }

  #grantWaiter(row: ResRow, needs: Amounts, s: Step): void {
    this.accounts.dequeue(row);
    const granted = this.accounts.grant(row, needs, s.now);
    const expiresAt = granted.expires_at!;
    timer(s, expiresAt);
    const notice: GrantNotice = { reservationId: row.id, requirements: needs, stageId: row.stage_id, attempt: row.attempt, expiresAt };
    if (row.part !== null) notice.shard = this.shardOf(row);
    s.grants.push({ executionId: row.execution_id, notice });
  }

  /** Raises the stored effective rank of waiters whose next ageing step is due. */
  applyAgeing(now: number): void {
    for (const r of this.store.dueAgeing(now, 1000)) {
      const eff = effectiveRank(r.rank, r.created_at, now, this.rules.agingMs);
      this.store.putRow({ ...r, eff_rank: eff, age_at: nextAgeingAt(r.rank, r.created_at, eff, this.rules.agingMs) });
    }
  }

  /** Why a waiter waits, as the grant pass would judge it now: its client's limit first, then the pools short. */
  reasonOf(row: ResRow, now: number): { reason: WaitReason; pools: string[] } {
    const needs = needsOf(row);
    const { c, q, cneeds } = this.clientOf(row, now);
    const why = clientBlock(q, c, cneeds, row.cost_est, now, this.rules.usageMaxFactor);
    if (why === "client_rate") {
      const pools = Object.keys(q.rate ?? {}).filter((n) => cneeds[n] && !fits(clientBucket(c, n, q.rate![n].per_minute, now), cneeds[n], now));
      return { reason: why, pools };
    }
    if (why) return { reason: why, pools: [] };
    const paused = Object.keys(needs).filter((n) => isPaused(this.store.pools.get(n)!, now));
    if (paused.length) return { reason: "provider_backoff", pools: paused };
    const short = Object.keys(needs).filter((n) => !fits(this.store.pools.get(n)!, needs[n], now));
    return { reason: "capacity", pools: short.length ? short : Object.keys(needs) };
  }
}
