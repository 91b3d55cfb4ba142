import type { GrantNotice } from "../../schemas/ledger";
import { isTerminalStage } from "../stage-machine";
import type { Core } from "./store";
import * as tx from "./transitions";

/**
 * A ledger grant notice for a waiting reservation, applied synchronously. A
 * notice for the stage's current attempt is taken even when the answer to its
 * reserve call never arrived (the reservation id is derived from execution,
 * stage and attempt); a notice for a stage that moved on is handed back
 * through the outbox. Returns true when a drive pass should run.
 */
export function applyGrant(c: Core, notice: GrantNotice, now: number): boolean {
  const st = c.store.stage(notice.stageId);
  const expected = st ? (st.reservation_id ?? tx.expectedReservationId(c, st)) : null;
  if (st && st.status === "waiting_resources" && st.attempt === notice.attempt && notice.reservationId === expected) {
    if (!st.reservation_id) tx.reserved(c, st, notice.reservationId, now);
    tx.granted(c, c.store.stage(st.stage_id)!, notice.expiresAt, notice.requirements, now);
    return true;
  }
  if (!st || expected !== notice.reservationId || isTerminalStage(st.status)) {
    c.outbox.enqueue({ kind: "ledger_release", reservationId: notice.reservationId }, now);
    return true;
  }
  return false;
}
