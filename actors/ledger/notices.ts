/**
 * Grant notices: after a step's writes, each Execution whose waiter was
 * granted is told with `onGrant(notice)`. Fire and forget, never awaited
 * inside a step: a lost notice is covered by the Execution asking `status()`
 * (or repeating `reserve`) on its own timer.
 */
import type { GrantNotice } from "../../schemas/ledger";
import { log } from "../../src/log";

/** What the ledger calls on an Execution (typed loosely: no import of that class). */
interface GrantNoticeTarget {
  onGrant(notice: GrantNotice): Promise<void>;
  /** The execution was given its client execution slot (max_running_executions). */
  onSlot(): Promise<void>;
  /** A chain grant of the execution was cut: settle it at the end of the stage now running. */
  onChainCut(reservationId: string): Promise<void>;
}

type Grant = { executionId: string; notice: GrantNotice };

export class GrantNotices {
  #redirect: ((executionId: string, notice: GrantNotice) => void) | null = null;
  #slotRedirect: ((executionId: string) => void) | null = null;
  #cutRedirect: ((executionId: string, reservationId: string) => void) | null = null;
  #failures = 0;

  constructor(private readonly env: Env) {}

  /** Tests: deliver to `fn` instead of the Execution objects; null restores the RPCs. */
  redirect(fn: ((executionId: string, notice: GrantNotice) => void) | null): void {
    this.#redirect = fn;
  }

  redirectSlots(fn: ((executionId: string) => void) | null): void {
    this.#slotRedirect = fn;
  }

  redirectCuts(fn: ((executionId: string, reservationId: string) => void) | null): void {
    this.#cutRedirect = fn;
  }

  /** Tells each execution it holds its slot now; a lost notice is covered by the Execution asking again on its timer. */
  sendSlots(executionIds: string[]): void {
    if (!executionIds.length) return;
    const to = this.#slotRedirect;
    if (to) {
      for (const id of executionIds) to(id);
      return;
    }
    for (const id of executionIds) this.#tell(id, `slot:${id}`, (stub) => stub.onSlot());
  }

  /** Tells each execution its chain grant was cut; a lost notice is made up by the next renew's answer (`chainCut`). */
  sendCuts(cuts: { executionId: string; reservationId: string }[]): void {
    if (!cuts.length) return;
    const to = this.#cutRedirect;
    if (to) {
      for (const cut of cuts) to(cut.executionId, cut.reservationId);
      return;
    }
    for (const cut of cuts) this.#tell(cut.executionId, cut.reservationId, (stub) => stub.onChainCut(cut.reservationId));
  }

  send(grants: Grant[]): void {
    if (!grants.length) return;
    const to = this.#redirect;
    if (to) {
      for (const g of grants) to(g.executionId, g.notice);
      return;
    }
    for (const g of grants) this.#tell(g.executionId, g.notice.reservationId, (stub) => stub.onGrant(g.notice));
  }

  /** One notice to one Execution, fire and forget: a failure is counted and logged, never thrown. */
  #tell(executionId: string, reservationId: string, call: (stub: GrantNoticeTarget) => Promise<void>): void {
    const ns = (this.env as unknown as { EXECUTION?: DurableObjectNamespace }).EXECUTION;
    if (!ns) return;
    const failed = (err: unknown) => this.#failed(executionId, reservationId, err);
    try {
      Promise.resolve(call(ns.get(ns.idFromName(executionId)) as unknown as GrantNoticeTarget)).catch(failed);
    } catch (err) {
      failed(err);
    }
  }

  #failed(executionId: string, reservationId: string, err: unknown): void {
    this.#failures++;
    // Logged sparingly: a burst of failures (e.g. Executions gone) must not flood the log.
    if (this.#failures <= 3 || this.#failures % 1000 === 0) {
      log("warn", "ledger_grant_notice_failed", {
        reservation_id: reservationId,
        execution_id: executionId,
        failures: this.#failures,
        error: err instanceof Error ? err.message : String(err),
      });
    }
  }
}
