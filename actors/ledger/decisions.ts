/**
 * The ledger's decisions on one reservation, inside a ResourceLedger step
 * (../resource-ledger.ts runs them; the rules are in ../ledger-rules.ts): a
 * new or replayed reserve, a settle, what a stage needs, why and where a
 * waiter waits, and the expiry of a lapsed lease.
 */
import type { ClientQuotas, WaitingOn } from "../../schemas/clients";
import type { ReservationState, ReserveRequest, ReserveResult, SettleResult } from "../../schemas/ledger";
import type { Tuning } from "../../src/config";
import {
  budgetExhausted,
  clientBlock,
  fits,
  clientRateUnsatisfiable,
  effectiveRank,
  estimatedNeeds,
  fairTag,
  newPool,
  nextAgeingAt,
  nonZero,
  queueWaitMs,
  rankOf,
  satisfiable,
  type Amounts,
  type ClientState,
  type LedgerRules,
} from "../ledger-rules";
import type { Accounts } from "./accounts";
import { fitsAll, NO_QUOTAS, timer, type GrantPass, type Step } from "./grant-pass";
import type { Ownership } from "./ownership";
import { chainOf, needsOf, PARKED, type ChainState, type LedgerStore, type ResRow } from "./store";

/** A reserve replay of a reservation that ended, or of a round its set has left: answered as `status: "ended"` after the step. */
export class Ended {
  constructor(
    readonly id: string,
    readonly state: ReservationState,
    readonly why?: string,
  ) {}
}

/** `{execution}:{stage}:{attempt}`, plus `@{round}` for a multi-shard acquisition's later rounds. */
export function reservationIdOf(executionId: string, stageId: string, attempt: number, round = 0): string {
  return round > 0 ? `${executionId}:${stageId}:${attempt}@${round}` : `${executionId}:${stageId}:${attempt}`;
}

export class Decisions {
  constructor(
    private readonly store: LedgerStore,
    private readonly accounts: Accounts,
    private readonly pass: GrantPass,
    private readonly rules: LedgerRules,
    private readonly tuning: Tuning,
    private readonly quotasOf: (c: ClientState) => ClientQuotas,
    /** The ledger's clock (tests replace it). */
    private readonly clock: () => number,
    private readonly own: Ownership,
  ) {}

  reserve(req: ReserveRequest, workerPool: string, s: Step): ReserveResult | Ended {
    const id = reservationIdOf(req.executionId, req.stageId, req.attempt, req.round ?? 0);
    const existing = this.store.row(id);
    if (existing) return this.#replayReserve(existing, s);
    const part = req.part ?? null;
    // A set asks one round at a time, but every call goes out on a new stub, so nothing orders them on
    // the way: a round's reserve can arrive after the next round's. Stale, it makes nothing (a second
    // live row for the set, that no release would ever name) and is answered as ended.
    const newer = part ? this.store.laterRound(reservationIdOf(req.executionId, req.stageId, req.attempt), req.round ?? 0) : undefined;
    if (newer) return new Ended(id, "released", `round ${req.round ?? 0} of this set is superseded here by ${newer}`);
    // A later round of a part comes back to the place its set had on this shard (docs/ledger.md, "Queues across shards").
    const place = part ? this.#earlierPlace(req) : undefined;
    // That round was given up (the set asks one round at a time): its release may still be on its way
    // through the Execution's outbox. It ends here now, so no two rows share the place or hold for one set,
    // and before the checks below: a client part still granted would count as running, and a stage whose
    // budget is spent would queue (client_budget) instead of being refused budget_exhausted.
    const earlier = place ? this.liveRow(place.id, s) : undefined;
    if (earlier) this.endRow(earlier, s);
    // endRow runs no grant pass: a refusal below must give what it freed to the others waiting here (queued,
    // the new round runs the pass itself, after it has taken the earlier round's place).
    const refused = <R extends ReserveResult>(r: R): R => {
      if (earlier) this.pass.run(s);
      return r;
    };
    // A part holds exactly its requirements, plus the worker slot when it is the worker's part.
    const needs = part ? this.#partNeeds(req.worker, req.requirements, part.worker) : this.needs(req.worker, req.requirements);
    // Whether this reservation holds the client's running count, rate buckets and budget (the whole stage, or the client's part).
    const holds = !part || part.client;
    const misplaced = this.own.misplaced(Object.keys(needs), holds ? (req.clientId ?? null) : null, part?.shard ?? null);
    if (misplaced) return refused({ status: "refused", reservationId: id, code: "wrong_shard", message: misplaced });
    const unknown = Object.keys(needs).filter((n) => n !== workerPool && !this.store.pools.has(n));
    if (unknown.length) {
      return refused({ status: "refused", reservationId: id, code: "unknown_pool", message: `unknown pool(s): ${unknown.join(", ")}` });
    }
    if (workerPool in needs && !this.store.pools.has(workerPool)) {
      this.store.addPool(newPool(workerPool, "concurrency", this.tuning.defaultWorkerConcurrency, 0, s.now));
    }
    const never = this.#unsatisfiable(id, needs);
    if (never) return refused(never);
    const c = this.store.client(req.clientId ?? null, s.now);
    const q = holds ? this.quotasOf(c) : NO_QUOTAS;
    // The client's part is judged on the whole stage (its cost and its client rate), the other parts not at all.
    const clientNeeds = part?.client && part.stageNeeds ? nonZero(part.stageNeeds) : needs;
    const overRate = clientRateUnsatisfiable(q, clientNeeds);
    if (overRate) return refused({ status: "refused", reservationId: id, code: "resource_unsatisfiable", message: `can never be granted: ${overRate}` });
    const cost = holds ? this.accounts.costOf(clientNeeds) : 0;
    if (budgetExhausted(q, c, cost, s.now)) {
      return refused({ status: "refused", reservationId: id, code: "budget_exhausted", message: `client ${c.id} has no budget left for this stage this month` });
    }

    const rank = rankOf(req.priority);
    const since = place?.created_at ?? s.now;
    const row: ResRow = {
      id,
      execution_id: req.executionId,
      stage_id: req.stageId,
      attempt: req.attempt,
      worker: req.worker,
      rank,
      eff_rank: effectiveRank(rank, since, s.now, this.rules.agingMs),
      age_at: null,
      seq: place?.seq ?? ++this.store.seq,
      state: "waiting",
      req: JSON.stringify(needs),
      lease_ms: req.leaseMs,
      created_at: since,
      granted_at: null,
      expires_at: null,
      passed: 0,
      parked: 0,
      usage: null,
      duration_ms: null,
      ended_at: null,
      client_id: req.clientId ?? null,
      cost_est: cost,
      // On a shard that is not the client's, its weight comes with the request (docs/ledger.md, "Fair sharing").
      tag: place?.tag ?? fairTag(this.store.virtualTime, c.lastTag, (holds ? q.weight : (req.clientWeight ?? this.quotasOf(c).weight)) ?? 1),
      part: part ? JSON.stringify(part) : null,
      chain: null,
    };
    // A client's tags only grow: a kept place's older tag does not move its later stages back.
    c.lastTag = Math.max(c.lastTag, row.tag);
    if (this.store.activeWaiters === 0) {
      // Nobody queued: the stage and the chain after it in one grant when all of it fits, else the stage alone when it fits (no notice).
      const chain = this.#chain(id, req, needs, workerPool, q, c, s);
      if (chain) {
        const state: ChainState = { stages: chain.stages, cut: false, own: needs };
        const granted = this.accounts.grant({ ...row, req: JSON.stringify(chain.needs), cost_est: chain.cost, chain: JSON.stringify(state) }, chain.needs, s.now);
        timer(s, granted.expires_at);
        return { status: "granted", reservationId: id, expiresAt: granted.expires_at!, requirements: needs, chain: chain.stages };
      }
      if (fitsAll(this.store.pools, needs, s.now) && !clientBlock(q, c, clientNeeds, cost, s.now, this.rules.usageMaxFactor)) {
        // Nobody queued and everything fits: granted in the reply, no notice.
        const granted = this.accounts.grant(row, needs, s.now);
        timer(s, granted.expires_at);
        return { status: "granted", reservationId: id, expiresAt: granted.expires_at!, requirements: needs };
      }
    }
    this.accounts.enqueue({ ...row, age_at: nextAgeingAt(rank, since, row.eff_rank, this.rules.agingMs) }, needs);
    this.pass.run(s);
    const mine = s.grants.findIndex((g) => g.notice.reservationId === id);
    if (mine >= 0) {
      const [g] = s.grants.splice(mine, 1); // the caller learns it from the reply, not a notice
      return { status: "granted", reservationId: id, expiresAt: g.notice.expiresAt, requirements: needs };
    }
    const now = this.store.row(id)!;
    if (now.state !== "waiting") throw new Error(`internal: new reservation ${id} is ${now.state}`);
    this.#cutChains(needs, s);
    return this.#waitingResult(now);
  }

  /**
   * The needs and cost of the stage with the chain its request carries, when
   * chain grants are on and all of it can be granted now: every pool known and
   * on this shard, nothing beyond the pools' sizes, the client's rate and
   * budget, and everything fitting. The worker slot is one for the whole chain
   * (its stages run one after another). Null: the stage alone is judged.
   */
  #chain(id: string, req: ReserveRequest, needs: Amounts, workerPool: string, q: ClientQuotas, c: ClientState, s: Step): { needs: Amounts; cost: number; stages: string[] } | null {
    const max = this.tuning.chainGrantStages;
    if (!req.chain || req.part || max <= 0) return null;
    const later = req.chain.slice(0, max);
    const total: Amounts = { ...needs };
    for (const st of later) {
      for (const [n, a] of Object.entries(this.needs(req.worker, st.requirements))) if (n !== workerPool) total[n] = (total[n] ?? 0) + a;
    }
    if (Object.keys(total).some((n) => !this.store.pools.has(n))) return null;
    if (this.own.misplaced(Object.keys(total), req.clientId ?? null, null)) return null;
    if (this.#unsatisfiable(id, total)) return null;
    if (clientRateUnsatisfiable(q, total)) return null;
    const cost = this.accounts.costOf(total);
    if (budgetExhausted(q, c, cost, s.now)) return null;
    if (!fitsAll(this.store.pools, total, s.now) || clientBlock(q, c, total, cost, s.now, this.rules.usageMaxFactor)) return null;
    return { needs: total, cost, stages: later.map((st) => st.stageId) };
  }

  /**
   * A waiter now queues: every live chain grant that holds a pool it does not
   * fit in is cut, so that its execution settles at the end of the stage it is
   * running and asks again for the next one, in the queue's order, instead of
   * keeping the units for the rest of its chain (docs/ledger.md, "Chain
   * grants"). The execution is told (`onChainCut`); a lost notice is made up
   * by the next renew's answer, or by the chain's end.
   */
  #cutChains(needs: Amounts, s: Step): void {
    if (this.store.chains.size === 0) return;
    const blocked = Object.keys(needs).filter((n) => !fits(this.store.pools.get(n)!, needs[n], s.now));
    if (blocked.length === 0) return;
    for (const r of [...this.store.chains.values()]) {
      const held = needsOf(r);
      if (!blocked.some((n) => n in held)) continue;
      this.store.putRow({ ...r, chain: JSON.stringify({ ...chainOf(r)!, cut: true }) });
      s.cuts.push({ executionId: r.execution_id, reservationId: r.id });
    }
  }

  /**
   * `stageUsage`: on a part holding the client, the whole stage's usage (its spend); other rows ignore it.
   * `stages`: how many stages of a chain grant the usage and duration cover (the worker's averages learn each).
   */
  settle(id: string, used: Amounts, duration: number | undefined, s: Step, stageUsage?: Amounts, stages = 1): SettleResult {
    const unknownPools = Object.keys(used).filter((n) => !this.store.pools.has(n));
    const row = this.liveRow(id, s);
    if (!row) return { ok: false, state: "unknown", unknownPools };
    switch (row.state) {
      case "granted":
        this.store.putRow(this.accounts.settleGrant(row, used, duration, s.now, stageUsage, stages));
        timer(s, s.now + this.rules.doneRetentionMs);
        this.pass.run(s);
        return { ok: true, state: "settled", unknownPools };
      case "expired":
        // The lease lapsed: the settle is refused, but what was used is still
        // real: it counts for estimates, budgets and (beyond what the expiry
        // kept) rate buckets, once.
        if (row.usage === null) this.store.putRow(this.accounts.lateSettle(row, used, duration, s.now, stageUsage, stages));
        return { ok: false, state: "expired", unknownPools };
      case "settled":
      case "released":
        return { ok: true, state: row.state, unknownPools };
      default:
        return { ok: false, state: row.state as ReservationState, unknownPools };
    }
  }

  /** What a stage reserves: the given resources or the worker's estimate, plus one worker slot. */
  needs(worker: string, resources: Amounts | undefined): Amounts {
    const wp = `worker:${worker}`;
    const needs = resources ? nonZero(resources) : estimatedNeeds(this.store.stats.get(worker), this.store.pools, wp);
    needs[wp] = Math.max(needs[wp] ?? 0, 1);
    return needs;
  }

  /**
   * The place in this shard's queue of the part's set in an earlier round of
   * the same attempt (the newest round this shard saw): its arrival order, fair
   * tag and ageing origin. A set that gave a round up (a later shard kept it
   * waiting past the short lease) so queues again ahead of everything that
   * arrived here after it, instead of at the back. Undefined in round 0, or
   * when this shard never saw the set (or purged its rows).
   */
  #earlierPlace(req: ReserveRequest): Pick<ResRow, "id" | "seq" | "tag" | "created_at"> | undefined {
    const round = req.round ?? 0;
    if (round === 0) return undefined;
    // The previous round first (it may not be in SQL yet), then every round of the attempt by one range of the key.
    const last = this.store.row(reservationIdOf(req.executionId, req.stageId, req.attempt, round - 1));
    if (last) return last;
    return this.store.earlierRounds(reservationIdOf(req.executionId, req.stageId, req.attempt), round)[0];
  }

  /** A part's needs: its explicit requirements (never an estimate), plus the worker slot when it holds it. */
  #partNeeds(worker: string, requirements: Amounts | undefined, withWorker: boolean): Amounts {
    const needs = nonZero(requirements ?? {});
    if (withWorker) needs[`worker:${worker}`] = Math.max(needs[`worker:${worker}`] ?? 0, 1);
    return needs;
  }

  /** A refusal when some amount can never be granted under the current sizes (all pools exist). */
  #unsatisfiable(id: string, needs: Amounts): ReserveResult | null {
    const pools = this.store.pools;
    const never = Object.entries(needs).filter(([n, a]) => !satisfiable(pools.get(n)!, a));
    if (!never.length) return null;
    const what = never
      .map(([n, a]) => {
        const p = pools.get(n)!;
        const limit = p.kind === "budget" ? `${p.capacity - p.consumed} left of budget ${p.capacity}` : `capacity ${p.capacity}`;
        return `${n}: ${a} > ${limit}`;
      })
      .join("; ");
    return { status: "refused", reservationId: id, code: "resource_unsatisfiable", message: `can never be granted: ${what}` };
  }

  /** Gives a live row's holds back (granted) or takes it out of the queue (waiting); false when it had ended. No grant pass: the caller runs it. */
  endRow(row: ResRow, s: Step): boolean {
    if (row.state === "granted") this.store.putRow(this.accounts.releaseGrant(row, s.now));
    else if (row.state === "waiting") {
      this.accounts.dequeue(row);
      this.store.putRow({ ...row, state: "released", age_at: null, ended_at: s.now });
    } else return false;
    timer(s, s.now + this.rules.doneRetentionMs);
    return true;
  }

  /** The row, with a lapsed lease expired first (so every reply sees `expired` from expiresAt on). */
  liveRow(id: string, s: Step): ResRow | undefined {
    const row = this.store.row(id);
    if (row && row.state === "granted" && row.expires_at !== null && row.expires_at <= s.now) {
      this.expire(row, s);
      this.pass.run(s);
      return this.store.row(id);
    }
    return row;
  }

  expire(row: ResRow, s: Step): void {
    this.store.putRow(this.accounts.expireGrant(row, s.now));
    timer(s, s.now + this.rules.doneRetentionMs);
  }

  #replayReserve(row: ResRow, s: Step): ReserveResult | Ended {
    const live = row.state === "granted" ? this.liveRow(row.id, s)! : row;
    if (live.state === "granted") {
      // A chain grant answers with the stage's own needs, and its chain while it is not cut.
      const chain = chainOf(live);
      if (chain) return { status: "granted", reservationId: live.id, expiresAt: live.expires_at!, requirements: chain.own, ...(chain.cut ? {} : { chain: chain.stages }) };
      return { status: "granted", reservationId: live.id, expiresAt: live.expires_at!, requirements: needsOf(live) };
    }
    if (live.state === "waiting") {
      this.pass.applyAgeing(s.now);
      return this.#waitingResult(this.store.row(live.id)!);
    }
    if (live.state === "refused") {
      const message = `client ${live.client_id} has no budget left for this stage this month`;
      return { status: "refused", reservationId: live.id, code: "budget_exhausted", message };
    }
    return new Ended(live.id, live.state as ReservationState);
  }

  #waitingResult(row: ResRow): ReserveResult {
    const waitingOn = this.waitingOn(row, this.clock());
    return { status: "waiting", reservationId: row.id, position: waitingOn.position, estimatedWaitMs: waitingOn.estimated_wait_ms, waitingOn };
  }

  /** Why `row` waits, its place and its expected wait (docs/ledger.md, "Why is it waiting"). */
  waitingOn(row: ResRow, now: number): WaitingOn {
    const { position, sameWorkerAhead } = this.aheadOf(row);
    const estimated_wait_ms = queueWaitMs(sameWorkerAhead + 1, this.slotsOf(row.worker), this.durationOf(row.worker));
    return { ...this.pass.reasonOf(row, now), position, estimated_wait_ms };
  }

  /** 1-based place in the queue; a parked waiter counts as behind every active one. */
  aheadOf(row: ResRow): { position: number; sameWorkerAhead: number } {
    if (row.parked === PARKED) return { position: this.store.activeWaiters + 1, sameWorkerAhead: 0 };
    const { n, same } = this.store.countAhead(row);
    return { position: n + 1, sameWorkerAhead: same };
  }

  durationOf(worker: string): number {
    return this.store.stats.get(worker)?.durAvg ?? this.tuning.defaultStageDurationMs;
  }

  slotsOf(worker: string): number {
    return this.store.pools.get(`worker:${worker}`)?.capacity ?? this.tuning.defaultWorkerConcurrency;
  }
}
