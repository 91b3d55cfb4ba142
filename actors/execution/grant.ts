import type { GrantNotice } from "../../schemas/ledger";
import { layoutOf } from "../../src/ledger-routing";
import { isTerminalStage } from "../stage-machine";
import { type Acquisition, multiOf, partAnswered, partReservationId, recordPart, workerShard } from "./parts";
import type { Core, StageRow } from "./store";
import * as tx from "./transitions";

/**
 * A ledger grant notice for a waiting reservation, applied synchronously. A
 * notice for the stage's current attempt is taken even when the answer to its
 * reserve call never arrived (the reservation id is derived from execution,
 * stage and attempt); a notice for a stage that moved on is handed back
 * through the outbox, to the shard that sent it. A notice for one part of a
 * multi-shard stage is applied to that part (parts.ts). Returns true when a
 * drive pass should run.
 */
export function applyGrant(c: Core, notice: GrantNotice, now: number): boolean {
  const st = c.store.stage(notice.stageId);
  const multi = st ? multiOf(c, st) : null;
  if (st && multi) return applyPartGrant(c, st, multi, notice, now);
  const shard = notice.shard ?? (st ? workerShard(layoutOf(c.env), st.worker) : 0);
  const expected = st ? (st.reservation_id ?? tx.expectedReservationId(c, st)) : null;
  if (st && st.status === "waiting_resources" && st.attempt === notice.attempt && notice.reservationId === expected) {
    if (!st.reservation_id) tx.reserved(c, st, notice.reservationId, now);
    tx.granted(c, c.store.stage(st.stage_id)!, notice.expiresAt, notice.requirements, now);
    return true;
  }
  if (!st || expected !== notice.reservationId || isTerminalStage(st.status)) {
    c.outbox.enqueue({ kind: "ledger_release", shard, reservationId: notice.reservationId }, now);
    return true;
  }
  return false;
}

/** A notice for a part: taken while that part of the current round waits; one of another round or attempt goes back. */
function applyPartGrant(c: Core, st: StageRow, a: Acquisition, notice: GrantNotice, now: number): boolean {
  // Parts are asked in order, so at most one waits: a notice that names no shard is that part's.
  const shard = notice.shard ?? a.parts.find((p) => p.state === "waiting")?.shard ?? 0;
  const expected = partReservationId(c.store.row()!.execution_id, st.stage_id, st.attempt, a.round);
  const part = a.parts.find((p) => p.shard === shard);
  const current = !!part && notice.reservationId === expected && st.attempt === notice.attempt;
  if (current && st.status === "waiting_resources" && !c.timers.has("reacquire", st.stage_id)) {
    if (part.state === "granted") return false; // a repeat
    recordPart(c, st, notice.reservationId, shard, now);
    partAnswered(c, a, shard, { granted: true, expiresAt: notice.expiresAt, requirements: notice.requirements });
    return true;
  }
  if (current && !isTerminalStage(st.status) && st.status !== "waiting_resources") return false; // a repeat after the stage started
  c.outbox.enqueue({ kind: "ledger_release", shard, reservationId: notice.reservationId }, now);
  return true;
}
