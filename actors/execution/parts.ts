import type { Tuning } from "../../src/config";
import { type RequirementPart, type ShardLayout, layoutOf, partsOf, shardOfPool, subPoolOf } from "../../src/ledger-routing";
import { reservationIdOf } from "../resource-ledger";
import { retryDelayMs } from "../stage-machine";
import { carryOf, endCarry, stopCarry } from "./chain";
import type { Core, StageRow } from "./store";

/**
 * A stage whose pools live on several ledger shards (docs/scaling.md, "Past
 * one object"): the decisions of its acquisition, pure and synchronous, and
 * the few state changes around them. The awaited calls are in acquire.ts.
 *
 * The parts are acquired one by one in `partsOf` order (by shard index, the
 * one global order, so no two stages can each hold what the other waits for),
 * each with a short lease while the set is incomplete. A part that keeps the
 * stage waiting past the earliest held part's short lease (`part_deadline`),
 * a part refused for a reason that may pass, or a part whose reservation
 * ended, makes the stage release every part (through the outbox, each to its
 * shard) and try again after a jittered backoff (`reacquire`) in round + 1.
 * The stage starts only once every part is granted and renewed to `leaseMs`.
 */

export type Amounts = Record<string, number>;

/** A RequirementPart (its shard, explicit pools, whether it holds the worker slot and the client's limits) with its state. */
export interface Part extends RequirementPart {
  /** new: not asked in this round (or its answer is not in); waiting: queued on its shard; granted: held. */
  state: "new" | "waiting" | "granted";
  /** While granted: when its lease ends (the short lease until the set is complete). */
  expiresAt?: number;
  /** What the shard granted (its pools and the worker slot). */
  granted?: Amounts;
}

/** A stage attempt's acquisition: its round (0 first; +1 at every back-off) and its parts in acquisition order. */
export interface Acquisition {
  stage_id: string;
  attempt: number;
  round: number;
  /** Implicit requirements: the estimate's needs were asked of the shards (acquire.ts estimateNeeds). */
  estimated: boolean;
  parts: Part[];
}

/** The Execution's table of acquisitions: one row per stage or item (the current attempt's). */
export const PARTS_SCHEMA = `
CREATE TABLE IF NOT EXISTS acquisitions (
  stage_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL, round INTEGER NOT NULL,
  estimated INTEGER NOT NULL DEFAULT 0, parts TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS part_reservations (
  reservation_id TEXT NOT NULL, shard INTEGER NOT NULL, stage_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at INTEGER NOT NULL,
  PRIMARY KEY (reservation_id, shard)
) WITHOUT ROWID;
`;

/** Refusals that asking again cannot change: the attempt fails with the code, as a single-shard stage's does. */
const FINAL_REFUSALS = new Set(["resource_unsatisfiable", "unknown_pool", "budget_exhausted"]);
export const isFinalRefusal = (code: string) => FINAL_REFUSALS.has(code);

// ------------------------------------------------------------- pure rules ----

/** Whether the layout can make any stage span shards (one shard and no split pool: today's single path, untouched). */
export const isSharded = (layout: ShardLayout) => layout.count > 1 || Object.keys(layout.splits).length > 0;

/** The shard of a single-shard stage: the shard of its worker's pool (every stage has a part there). */
export const workerShard = (layout: ShardLayout, worker: string) => shardOfPool(layout, `worker:${worker}`);

/**
 * A stage's needs split into parts (`partsOf` order). The client's shard always
 * gets a part: the client's limits (running stages, rate, budget) can be set
 * at any time (PUT /clients/:id/quotas), so they are always held with the stage.
 * An explicit amount for the worker's own pool stays with the worker's part.
 */
export function planParts(layout: ShardLayout, needs: Amounts, o: { worker: string; clientId: string; executionId: string }): Part[] {
  const parts = partsOf(layout, needs, o).map((p: RequirementPart): Part => ({ ...p, requirements: { ...p.requirements }, state: "new" }));
  const own = needs[`worker:${o.worker}`];
  if (own !== undefined) {
    const wp = parts.find((p) => p.worker)!;
    wp.requirements[`worker:${o.worker}`] = own;
  }
  return parts;
}

/** A part's reservation id on its shard: the attempt's, plus `@round` after a back-off (as the ledger derives it). */
export const partReservationId = reservationIdOf;

/** The next part to ask: the first not granted (-1: every part is granted). Parts after a waiting one wait their turn. */
export const nextPart = (a: Acquisition) => a.parts.findIndex((p) => p.state !== "granted");

/**
 * The parts that may hold something on their shard: every granted one and the
 * first not granted (asked, or its answer lost). Later parts were never asked.
 */
export function heldParts(a: Acquisition): Part[] {
  const k = nextPart(a);
  return k < 0 ? a.parts : a.parts.slice(0, k + 1);
}

/**
 * While a later part keeps the stage waiting, the earliest held short lease
 * bounds the wait: the stage gives the round up this long before it ends, so
 * it never renews a part that lapsed and never holds a part past its lease.
 */
export function partDeadlineAt(a: Acquisition, t: Pick<Tuning, "ledgerCallTimeoutMs" | "ledgerShortLeaseMs">): number | null {
  if (nextPart(a) < 0) return null;
  const held = a.parts.filter((p) => p.state === "granted" && p.expiresAt !== undefined).map((p) => p.expiresAt!);
  if (held.length === 0) return null;
  return Math.min(...held) - Math.min(t.ledgerCallTimeoutMs, Math.floor(t.ledgerShortLeaseMs / 3));
}

/**
 * The backoff before round `round` (1, 2, ...): full jitter on the ledger's
 * retry curve, so contending stages spread out, capped at one short lease. A
 * round comes back to its set's place in each shard's queue (the ledger keeps
 * it), so waiting longer only leaves capacity idle.
 */
export function reacquireDelayMs(round: number, t: Pick<Tuning, "ledgerRetryBaseMs" | "ledgerRetryCapMs" | "ledgerShortLeaseMs">, random = Math.random): number {
  return Math.max(1, retryDelayMs(round, t.ledgerRetryBaseMs, Math.min(t.ledgerRetryCapMs, t.ledgerShortLeaseMs), 0, random));
}

/** The next round: every part asked again from the start, nothing held. */
export function nextRound(a: Acquisition): Acquisition {
  return { ...a, round: a.round + 1, parts: a.parts.map(({ expiresAt: _e, granted: _g, ...p }) => ({ ...p, state: "new" })) };
}

/** The whole stage's needs, every part's together (the client's shard judges budget and rate on them). */
export function stageNeeds(a: Acquisition): Amounts {
  const out: Amounts = {};
  for (const p of a.parts) for (const [k, v] of Object.entries(p.requirements)) out[k] = (out[k] ?? 0) + v;
  return out;
}

/** What every part's shard granted, as one set (the stage's `requirements`). */
export function grantedSet(a: Acquisition): Amounts {
  const out: Amounts = {};
  for (const p of a.parts) for (const [k, v] of Object.entries(p.granted ?? p.requirements)) out[k] = (out[k] ?? 0) + v;
  return out;
}

/**
 * A settle's usage split by shard, one share per part (in part order): a
 * pool's usage goes to the part on the shard that owns it (a split pool's to
 * this execution's sub-pool), anything else to the worker's part, whose shard
 * keeps the worker's averages and records what it does not know.
 */
export function usageShares(layout: ShardLayout, parts: Pick<Part, "shard" | "worker">[], usage: Amounts, executionId: string): Amounts[] {
  const shares = parts.map((): Amounts => ({}));
  const workerIndex = Math.max(0, parts.findIndex((p) => p.worker));
  for (const [pool, amount] of Object.entries(usage)) {
    const name = subPoolOf(layout, pool, executionId);
    const i = parts.findIndex((p) => p.shard === shardOfPool(layout, name));
    const share = shares[i >= 0 ? i : workerIndex];
    share[name] = (share[name] ?? 0) + amount;
  }
  return shares;
}

/** Usage names as the shards know them (a split pool's usage goes to this execution's sub-pool). */
export function mappedUsage(layout: ShardLayout, usage: Amounts, executionId: string): Amounts {
  if (Object.keys(layout.splits).length === 0) return usage;
  const out: Amounts = {};
  for (const [pool, amount] of Object.entries(usage)) {
    const name = subPoolOf(layout, pool, executionId);
    out[name] = (out[name] ?? 0) + amount;
  }
  return out;
}

// ------------------------------------------------------------------ state ----

/** The current attempt's acquisition of a stage, or null (a single-shard stage has none unless it was estimated). */
export function acquisitionOf(c: Core, st: Pick<StageRow, "stage_id" | "attempt">): Acquisition | null {
  const r = c.sql<{ stage_id: string; attempt: number; round: number; estimated: number; parts: string }>`
    SELECT stage_id, attempt, round, estimated, parts FROM acquisitions WHERE stage_id = ${st.stage_id} AND attempt = ${st.attempt}`[0];
  return r ? { stage_id: r.stage_id, attempt: r.attempt, round: r.round, estimated: r.estimated === 1, parts: JSON.parse(r.parts) as Part[] } : null;
}

/** A multi-shard acquisition of the stage's current attempt (null: the stage reserves in one call). */
export function multiOf(c: Core, st: Pick<StageRow, "stage_id" | "attempt">): Acquisition | null {
  if (!isSharded(layoutOf(c.env))) return null;
  const a = acquisitionOf(c, st);
  return a && a.parts.length > 1 ? a : null;
}

/** A part's reservation, kept for operators and leak checks (Execution.reservationIds). */
export function recordPart(c: Core, st: StageRow, reservationId: string, shard: number, now: number): void {
  c.sql`INSERT OR IGNORE INTO part_reservations (reservation_id, shard, stage_id, attempt, created_at)
    VALUES (${reservationId}, ${shard}, ${st.stage_id}, ${st.attempt}, ${now})`;
}

/** Every reservation the execution was given, with its shard: single-shard ones on their worker's shard, then the parts. */
export function reservationList(c: Core): { reservation_id: string; stage_id: string; attempt: number; shard: number }[] {
  const layout = layoutOf(c.env);
  const single = c.sql<{ reservation_id: string; stage_id: string; attempt: number; created_at: number; worker: string }>`
    SELECT r.reservation_id, r.stage_id, r.attempt, r.created_at, s.worker FROM reservations r JOIN stages s ON s.stage_id = r.stage_id`
    .map(({ worker, ...r }) => ({ ...r, shard: workerShard(layout, worker) }));
  const parts = c.sql<{ reservation_id: string; stage_id: string; attempt: number; created_at: number; shard: number }>`
    SELECT reservation_id, stage_id, attempt, created_at, shard FROM part_reservations`;
  return [...single, ...parts].sort((x, y) => x.created_at - y.created_at).map(({ created_at: _c, ...r }) => r);
}

export function saveAcquisition(c: Core, a: Acquisition): void {
  c.sql`INSERT INTO acquisitions (stage_id, attempt, round, estimated, parts) VALUES (${a.stage_id}, ${a.attempt}, ${a.round}, ${a.estimated ? 1 : 0}, ${JSON.stringify(a.parts)})
    ON CONFLICT(stage_id) DO UPDATE SET attempt = excluded.attempt, round = excluded.round, estimated = excluded.estimated, parts = excluded.parts`;
}

/** Enqueues a release of every part that may hold something, each to its shard. */
export function releaseParts(c: Core, a: Acquisition, now: number): void {
  const ex = c.store.row()!;
  for (const p of heldParts(a)) {
    c.outbox.enqueue({ kind: "ledger_release", shard: p.shard, reservationId: partReservationId(ex.execution_id, a.stage_id, a.attempt, a.round) }, now);
  }
}

/**
 * Gives the round up (a later part kept it waiting past the short lease, a
 * part was refused for a reason that may pass, or a part's reservation
 * ended): every part is released through the outbox and the stage asks again
 * from the first part after a jittered backoff, in round + 1 (the attempt is not spent).
 */
export function giveUpRound(c: Core, st: StageRow, a: Acquisition, why: string, now: number): void {
  releaseParts(c, a, now);
  const next = nextRound(a);
  saveAcquisition(c, next);
  const delay = reacquireDelayMs(next.round, c.config.tuning);
  c.timers.clear("part_deadline", st.stage_id);
  c.timers.clear("reask", st.stage_id);
  c.timers.set("reacquire", now + delay, st.stage_id);
  c.store.updateStage(st.stage_id, { reservation: "requested", message: `acquiring resources again (round ${next.round}) after ${why}` });
  c.store.log("info", "parts_released", { stage_id: st.stage_id, attempt: st.attempt, round: a.round, why, backoff_ms: delay });
  c.changed();
}

/** One part's answer (granted, or waiting in its shard's queue); a late `waiting` never undoes a grant (its notice came first). */
export function partAnswered(c: Core, a: Acquisition, shard: number, answer: { granted: true; expiresAt: number; requirements: Amounts } | { granted: false }): Acquisition {
  const parts = a.parts.map((p) => {
    if (p.shard !== shard || p.state === "granted") return p;
    return answer.granted ? { ...p, state: "granted" as const, expiresAt: answer.expiresAt, granted: answer.requirements } : { ...p, state: "waiting" as const };
  });
  const next = { ...a, parts };
  saveAcquisition(c, next);
  // A grant moves the stage on to its next part at once, not at the re-ask of the last wait.
  if (answer.granted) c.timers.clear("reask", a.stage_id);
  const deadline = partDeadlineAt(next, c.config.tuning);
  if (deadline === null) c.timers.clear("part_deadline", a.stage_id);
  else c.timers.set("part_deadline", deadline, a.stage_id);
  return next;
}

/**
 * The stage's reservation is settled (a granted attempt ended): one settle per
 * part, each to its shard with its share of the usage; a single-shard stage's
 * one settle goes to its shard (held to ride on the next reserve when `hold`).
 * False when the stage holds nothing to settle.
 */
export function settleUnit(c: Core, st: StageRow, usage: Amounts, durationMs: number, now: number, hold: boolean, completed = false): boolean {
  const layout = layoutOf(c.env);
  const ex = c.store.row()!;
  // Under a chain grant (never a multi-shard stage): handed on to the next stage, or settled for the whole chain.
  const carry = carryOf(st);
  if (carry) {
    endCarry(c, st, carry, mappedUsage(layout, usage, ex.execution_id), durationMs, now, hold, completed);
    return true;
  }
  const multi = multiOf(c, st);
  if (multi) {
    const id = partReservationId(ex.execution_id, st.stage_id, st.attempt, multi.round);
    const shares = usageShares(layout, multi.parts, usage, ex.execution_id);
    // The client's part also gets the whole stage's usage: the client's spend and rate refund are the stage's.
    const whole = mappedUsage(layout, usage, ex.execution_id);
    multi.parts.forEach((p, i) => {
      c.outbox.enqueue({ kind: "ledger_settle", shard: p.shard, reservationId: id, usage: shares[i], durationMs, ...(p.client ? { stageUsage: whole } : {}) }, now);
    });
    return true;
  }
  if (!st.reservation_id) return false;
  const item = { kind: "ledger_settle" as const, shard: workerShard(layout, st.worker), reservationId: st.reservation_id, usage: mappedUsage(layout, usage, ex.execution_id), durationMs };
  c.outbox.enqueue(item, now, { hold });
  return true;
}

/**
 * Gives back whatever the stage's attempt may hold or wait for: every part of
 * a multi-shard stage, else its one reservation (by the id derived from the
 * attempt when the reserve's answer never came), on its shard.
 */
export function releaseUnit(c: Core, st: StageRow, expectedId: string | null, now: number): void {
  const carry = carryOf(st);
  if (carry) {
    stopCarry(c, st, carry, now);
    return;
  }
  const multi = multiOf(c, st);
  if (multi) {
    releaseParts(c, multi, now);
    // The acquisition is over: its round's deadline and backoff must not hold up the next attempt.
    c.timers.clear("part_deadline", st.stage_id);
    c.timers.clear("reacquire", st.stage_id);
    return;
  }
  const id = st.reservation_id ?? expectedId;
  if (id) c.outbox.enqueue({ kind: "ledger_release", shard: workerShard(layoutOf(c.env), st.worker), reservationId: id }, now);
}
