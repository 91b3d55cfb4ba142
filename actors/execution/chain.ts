import { layoutOf } from "../../src/ledger-routing";
import { addUsage } from "../../src/cost";
import { isSharded, workerShard } from "./parts";
import { type Core, type StageRow, dependsOn, isFanOut, parse } from "./store";
import { renewalDue } from "./transitions";

/**
 * Chain grants (docs/ledger.md, "Chain grants"). A stage whose next stages
 * run one after another on the same worker asks the ledger for them with it;
 * granted whole, the one reservation is handed from each stage to the next
 * when it completes, and the stages in between make no ledger call: the last
 * one settles the usage of all of them. The hand-over is written on the next
 * stage's row (`carry`) in the transition that completes the stage, so it is
 * durable with the completion, and every way a stage can end settles it.
 */

/** A chain grant a stage runs under, or is handed to run under next. */
export interface Carry {
  reservationId: string;
  expiresAt: number;
  /** The later stages the grant still covers after this one, in order. */
  chain: string[];
  /** The usage and working time of the chain's stages that ended before this one, and how many they are. */
  usage: Record<string, number>;
  durationMs: number;
  stages: number;
  /** A waiter asked for the units (the ledger's cut): this stage settles at its end, it hands nothing on. */
  cut: boolean;
}

export const carryOf = (st: Pick<StageRow, "carry">): Carry | null => parse<Carry>(st.carry);

/** A new chain grant, as the stage that asked for it holds it (grant.ts writes it with the grant). */
export function newCarry(reservationId: string, expiresAt: number, chain: string[]): Carry {
  return { reservationId, expiresAt, chain, usage: {}, durationMs: 0, stages: 0, cut: false };
}

/**
 * The stages that follow `st` one after another on its worker, which its
 * reserve may ask for with it: each the only stage depending on the one
 * before, depending on nothing else, a worker stage that has not run (no
 * approval, no fan-out). None for an item, a fan-out stage, a sharded ledger
 * (a chain lives on one ledger object), or with chain grants off.
 */
export function chainAfter(c: Core, st: StageRow): { stageId: string; requirements?: Record<string, number> }[] | undefined {
  const max = c.config.tuning.chainGrantStages;
  if (max <= 0 || st.parent !== null || isFanOut(st) || isSharded(layoutOf(c.env))) return undefined;
  const stages = c.store.stages();
  const out: { stageId: string; requirements?: Record<string, number> }[] = [];
  let cur: StageRow = st;
  while (out.length < max) {
    const id = cur.stage_id;
    const after = stages.filter((s) => dependsOn(s).includes(id));
    if (after.length !== 1) break;
    const next = after[0];
    if (dependsOn(next).length !== 1 || next.kind === "approval" || isFanOut(next) || next.worker !== st.worker || next.status !== "pending" || next.attempt !== 0) break;
    const requirements = parse<Record<string, number>>(next.resources);
    out.push(requirements ? { stageId: next.stage_id, requirements } : { stageId: next.stage_id });
    cur = next;
  }
  return out.length > 0 ? out : undefined;
}

/**
 * A stage handed a chain grant, at the start of its attempt: the grant is
 * held for it (grant.ts, as a reserve's answer would be) and no ledger call is
 * made. A grant that was cut, or whose lease is close to its end (an
 * instance was lost between the stages for that long), is settled instead,
 * riding on the reserve the stage now makes. True: held.
 */
export function useCarry(c: Core, st: StageRow, now: number): boolean {
  const carry = carryOf(st);
  if (!carry) return false;
  const t = c.config.tuning;
  if (!carry.cut && carry.expiresAt - now > t.leaseMs / 4) {
    const requirements = { ...(parse<Record<string, number>>(st.resources) ?? {}), [`worker:${st.worker}`]: 1 };
    c.grants.hold({
      stage_id: st.stage_id,
      attempt: st.attempt,
      reservationId: carry.reservationId,
      expiresAt: carry.expiresAt,
      requirements,
      at: now,
      renewAt: renewalDue(c, carry.expiresAt),
    });
    c.store.log("info", "chain_grant_carried", { stage_id: st.stage_id, attempt: st.attempt, reservation_id: carry.reservationId, stages_before: carry.stages });
    return true;
  }
  settleCarried(c, st, carry, now, true);
  c.store.updateStage(st.stage_id, { carry: null });
  return false;
}

/**
 * A stage under a chain grant ended (`completed`: it completed; else it
 * failed): its usage joins the chain's. A completed stage hands the grant to
 * the next stage of the chain when that one is still to run, nothing cut the
 * grant and the execution is not paused (a paused one would hold the units
 * for nobody); otherwise the whole chain's usage is settled (held to ride on
 * the next reserve when `hold`). The caller's UPDATE of the stage clears its `carry`.
 */
export function endCarry(c: Core, st: StageRow, carry: Carry, usage: Record<string, number>, durationMs: number, now: number, hold: boolean, completed: boolean): void {
  const ended: Carry = { ...carry, usage: addUsage(carry.usage, usage) ?? {}, durationMs: carry.durationMs + durationMs, stages: carry.stages + 1 };
  const handOn = completed && !carry.cut && carry.chain.length > 0 && c.store.row()!.status !== "paused";
  const next = handOn ? c.store.stage(carry.chain[0]) : null;
  if (next && next.status === "pending" && next.attempt === 0 && next.carry === null) {
    const expiresAt = st.lease_expires_at ?? carry.expiresAt;
    c.store.updateStage(next.stage_id, { carry: JSON.stringify({ ...ended, expiresAt, chain: carry.chain.slice(1) } satisfies Carry) });
    return;
  }
  settleCarried(c, st, ended, now, hold);
}

/**
 * A stage holding or handed a chain grant is stopped (cancelled, or its
 * attempt ends without a usage): the usage of the chain's stages that ended
 * is settled; a grant no stage ended under yet is released, as any other.
 */
export function stopCarry(c: Core, st: StageRow, carry: Carry, now: number): void {
  if (carry.stages > 0) settleCarried(c, st, carry, now, false);
  else c.outbox.enqueue({ kind: "ledger_release", shard: workerShard(layoutOf(c.env), st.worker), reservationId: carry.reservationId }, now);
}

function settleCarried(c: Core, st: StageRow, carry: Carry, now: number, hold: boolean): void {
  const shard = workerShard(layoutOf(c.env), st.worker);
  const stages = carry.stages > 1 ? { stages: carry.stages } : {};
  c.outbox.enqueue({ kind: "ledger_settle", shard, reservationId: carry.reservationId, usage: carry.usage, durationMs: carry.durationMs, ...stages }, now, { hold });
}

/**
 * The ledger cut a chain grant (its notice, or a renew's answer): the stage
 * that holds it or is handed it settles at the end of the stage now running.
 */
export function chainCut(c: Core, reservationId: string): void {
  c.grants.writeAll();
  for (const s of c.store.stages()) {
    const carry = carryOf(s);
    if (carry?.reservationId !== reservationId || carry.cut) continue;
    c.store.updateStage(s.stage_id, { carry: JSON.stringify({ ...carry, cut: true } satisfies Carry) });
  }
}
