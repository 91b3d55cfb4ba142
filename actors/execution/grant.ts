import type { GrantNotice } from "../../schemas/ledger";
import { layoutOf } from "../../src/ledger-routing";
import { isTerminalStage } from "../stage-machine";
import { type Acquisition, multiOf, partAnswered, partReservationId, recordPart, workerShard } from "./parts";
import type { Sql } from "../sql";
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
    if (!st.reservation_id) tx.recordReservation(c, st, notice.reservationId, now);
    tx.granted(c, st, notice.expiresAt, notice.requirements, now, false, notice.reservationId);
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

/**
 * A ledger grant for a stage's attempt, kept in memory until the next write
 * instead of being written (and committed) before the handshake goes out.
 * The handshake and process are idempotent per attempt (docs/protocol.md) and
 * the ledger's reserve is idempotent per reservation id (derived from
 * execution, stage and attempt), so a grant lost with the instance is asked
 * for again and given again, the worker answering the replayed handshake as
 * the first. Until it is written the stage's stored state is
 * `waiting_resources` with its queue deadline and the watchdog.
 */
export interface HeldGrant {
  stage_id: string;
  attempt: number;
  reservationId: string;
  expiresAt: number;
  requirements: Record<string, number>;
  /** When the ledger's answer arrived: the grant is written as of then. */
  at: number;
  /** When its lease is due for renewal (half of leaseMs before it ends): it is written by then at the latest. */
  renewAt: number;
  /** A chain grant's later stages (chain.ts): written with the grant as the stage's `carry`. */
  chain?: string[];
}

/**
 * The grants held in memory (at most one per stage). Every write the object
 * makes writes them first, in the same transaction (`beforeWrites`), and
 * `stage()` reads a held stage as written (`overlay`), so no decision can see
 * the stage otherwise than as the written grant would show it: a callback, a
 * cancel, a failure or `processing` writes the grant in its own commit.
 */
export class HeldGrants {
  readonly #held = new Map<string, HeldGrant>();
  /** Per held grant, the in-memory timer that writes it when its lease is due for renewal. */
  readonly #renewals = new Map<string, ReturnType<typeof setTimeout>>();
  /** Other writes that may be lost with the instance (deferWrite). */
  #deferred: (() => void)[] = [];
  #write: ((g: HeldGrant, ending: boolean) => void) | null = null;
  #written: () => void = () => {};

  /**
   * How a held grant is written (transitions.ts writeGrant), once the Core exists; `written` runs after
   * a grant was written by its renewal timer (it re-arms the alarm, which renews the lease).
   */
  attach(write: (g: HeldGrant, ending: boolean) => void, written: () => void = () => {}): void {
    this.#write = write;
    this.#written = written;
  }

  /**
   * Holds the grant. Nothing renews a lease that is not written (the alarm renews stages stored on a
   * worker), so a grant still held when its lease is due for renewal (a handshake or process that
   * takes long) is written then, by an in-memory timer: from there the alarm renews it as any other.
   */
  hold(g: HeldGrant): void {
    this.#held.set(g.stage_id, g);
    this.#clearRenewal(g.stage_id);
    this.#renewals.set(
      g.stage_id,
      setTimeout(() => {
        this.#renewals.delete(g.stage_id);
        if (this.#held.get(g.stage_id) !== g) return;
        this.writeOne(g.stage_id);
        this.#written();
      }, Math.max(0, g.renewAt - Date.now())),
    );
  }

  #clearRenewal(stageId: string): void {
    const t = this.#renewals.get(stageId);
    if (t !== undefined) clearTimeout(t);
    this.#renewals.delete(stageId);
  }

  /** The grant held for this attempt of the stage, if any. */
  of(st: Pick<StageRow, "stage_id" | "attempt">): HeldGrant | null {
    const g = this.#held.get(st.stage_id);
    return g && g.attempt === st.attempt ? g : null;
  }

  /**
   * A write nothing depends on durably (the completion estimate): made before the next write, in
   * its commit, instead of in a commit of its own; lost with the instance, the document lacks it.
   */
  deferWrite(write: () => void): void {
    this.#deferred.push(write);
  }

  /** Writes every held grant and deferred write (before any other write, and where a decision reads stages in bulk). */
  writeAll(): void {
    if (this.#deferred.length > 0) for (const w of this.#deferred.splice(0)) w();
    if (this.#held.size === 0 || !this.#write) return;
    const all = [...this.#held.values()];
    // Taken out first: the writes below pass through beforeWrites again.
    this.#held.clear();
    for (const g of all) {
      this.#clearRenewal(g.stage_id);
      this.#write(g, false);
    }
  }

  /** Writes the stage's held grant, if any; `ending`: its attempt ends in the same synchronous step (no timers for it). */
  writeOne(stageId: string, ending = false): void {
    const g = this.#held.get(stageId);
    if (!g || !this.#write) return;
    this.#held.delete(stageId);
    this.#clearRenewal(stageId);
    this.#write(g, ending);
  }

  /**
   * The stored row of a stage with a held grant, as the written grant would
   * make it (transitions.ts reserved and granted); any other row as stored.
   */
  overlay(row: StageRow | null, handshakeTimeoutMs: number): StageRow | null {
    if (!row) return row;
    const g = this.#held.get(row.stage_id);
    if (!g || g.attempt !== row.attempt || row.status !== "waiting_resources") return row;
    return {
      ...row,
      status: "handshaking",
      reservation: "granted",
      reservation_id: g.reservationId,
      requirements: JSON.stringify(g.requirements),
      lease_expires_at: g.expiresAt,
      waiting_ms: row.waiting_ms + (g.at - (row.waiting_since ?? g.at)),
      waiting_since: null,
      message: null,
      ledger_failures: 0,
      deadline_at: g.at + handshakeTimeoutMs,
      granted_at: g.at,
    };
  }

  /** The object's sql helper, writing the held grants before any statement that is not a read. */
  beforeWrites(sql: Sql): Sql {
    return ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
      if ((this.#held.size > 0 || this.#deferred.length > 0) && !/^\s*SELECT/i.test(strings[0])) this.writeAll();
      return sql(strings, ...values);
    }) as Sql;
  }
}
