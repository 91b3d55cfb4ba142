import type { Sql } from "../sql";
import type { ReadCache } from "./read-cache";

/**
 * Timer names: one row each in `timers` per unit, one alarm for the earliest.
 * The execution's own timers have unit `""`; a stage's or item's (poll,
 * deadline, lease, reask, retry, approval) carry its stage id, so parallel stages and
 * the items of a fan-out each keep their own.
 */
export type TimerName =
  | "advance" | "poll" | "deadline" | "lease" | "reask" | "retry" | "outbox" | "watchdog" | "retention" | "notify" | "approval" | "queue" | "execution" | "slot"
  // A multi-shard acquisition (parts.ts): the round's deadline while a later part waits, and the backoff before the next round.
  | "part_deadline" | "reacquire";
export type UnitTimer = "poll" | "deadline" | "lease" | "reask" | "retry" | "queue" | "part_deadline" | "reacquire";
export const UNIT_TIMERS: readonly UnitTimer[] = ["poll", "deadline", "lease", "reask", "retry", "queue", "part_deadline", "reacquire"];

/** While an execution is live, its alarm is never further away than this, so an eviction mid-call heals. */
export const WATCHDOG_MS = 30_000;

/**
 * The `timers` table behind the object's one alarm. A handler *takes* its
 * timer (deletes it where due) before acting, so an alarm that fires twice
 * does nothing twice.
 */
export class Timers {
  readonly #sql: Sql;
  readonly #storage: DurableObjectStorage;
  readonly #reads: ReadCache;
  /** The alarm as this instance knows it (null: none; undefined: unknown), read at start and kept in step. */
  #armedAt: number | null | undefined = undefined;
  /** The last rearm() found no timer (so no alarm is the right alarm). */
  #noTimers = false;

  constructor(sql: Sql, storage: DurableObjectStorage, reads: ReadCache) {
    this.#sql = sql;
    this.#storage = storage;
    this.#reads = reads;
  }

  /** The alarm as read from storage when the object starts. */
  known(at: number | null): void {
    this.#armedAt = at;
  }

  /** The alarm that fired is spent: the next rearm() sets one whatever it was. */
  fired(): void {
    this.#armedAt = null;
  }

  set(name: TimerName, dueAt: number, unit = ""): void {
    this.#sql`INSERT INTO timers (name, unit, due_at) VALUES (${name}, ${unit}, ${dueAt})
      ON CONFLICT(name, unit) DO UPDATE SET due_at = excluded.due_at`;
  }

  /** Sets the timer unless it is already due earlier (then nothing is written). */
  setNoLaterThan(name: TimerName, dueAt: number, unit = ""): void {
    this.#sql`INSERT INTO timers (name, unit, due_at) VALUES (${name}, ${unit}, ${dueAt})
      ON CONFLICT(name, unit) DO UPDATE SET due_at = excluded.due_at WHERE excluded.due_at < timers.due_at`;
  }

  clear(name: TimerName, unit = ""): void {
    this.#sql`DELETE FROM timers WHERE name = ${name} AND unit = ${unit}`;
  }

  /** Clears these timers of every unit, in one statement (each statement costs a round through SQLite). */
  clearMany(names: TimerName[]): void {
    this.#sql`DELETE FROM timers WHERE name IN (SELECT value FROM json_each(${JSON.stringify(names)}))`;
  }

  /** Clears a stage's or item's own timers, but for its retry. */
  clearUnit(unit: string): void {
    this.#sql`DELETE FROM timers WHERE unit = ${unit} AND name IN ('poll', 'deadline', 'lease', 'reask', 'part_deadline', 'reacquire')`;
  }

  /** When the timer is due, or null when it is not set. */
  dueAt(name: TimerName, unit = ""): number | null {
    return this.#sql<{ due_at: number }>`SELECT due_at FROM timers WHERE name = ${name} AND unit = ${unit}`[0]?.due_at ?? null;
  }

  has(name: TimerName, unit = ""): boolean {
    return this.#reads.memo(`timer:${name}:${unit}`, ["timers"], () => this.#sql`SELECT 1 FROM timers WHERE name = ${name} AND unit = ${unit}`.length > 0);
  }

  /** Consumes a due timer: true once per firing, so a second alarm does nothing twice. */
  take(name: TimerName, unit = ""): boolean {
    return this.#sql`DELETE FROM timers WHERE name = ${name} AND unit = ${unit} AND due_at <= ${Date.now()} RETURNING name`.length > 0;
  }

  /** Consumes the wake-up timers (`advance`, `watchdog`): the drive pass that runs is the wake-up. */
  takeWakeUps(now: number): void {
    this.#sql`DELETE FROM timers WHERE name IN ('advance', 'watchdog', 'execution') AND unit = '' AND due_at <= ${now}`;
  }

  any(): boolean {
    return this.#sql`SELECT 1 FROM timers LIMIT 1`.length > 0;
  }

  /**
   * Makes sure the alarm fires no later than the earliest timer (while `live`,
   * a watchdog keeps the execution from ever sleeping unobserved). It only ever
   * moves the alarm earlier: an alarm that fires before anything is due finds
   * nothing to do and re-arms (every handler checks its own timer), whereas
   * moving it later each time a timer is cleared would cost a storage write per stage.
   */
  async rearm(live: boolean): Promise<void> {
    if (live && !this.has("watchdog")) this.set("watchdog", Date.now() + WATCHDOG_MS);
    const next = this.#reads.memo("timers:next", ["timers"], () => this.#sql<{ at: number | null }>`SELECT MIN(due_at) AS at FROM timers`[0]?.at ?? null);
    this.#noTimers = next === null;
    if (next === null) {
      if (this.#armedAt === null) return;
      this.#armedAt = null;
      await this.#storage.deleteAlarm();
      return;
    }
    if (this.#armedAt !== undefined && this.#armedAt !== null && this.#armedAt <= next) return;
    this.#armedAt = next;
    await this.#storage.setAlarm(next);
  }

  /**
   * heal() for status reads, with no SQL while the alarm is as this instance
   * left it: the runtime's alarm is compared with the one it set (or with none,
   * when its last rearm found no timer); only a difference (a lost alarm)
   * reads the timers and re-arms.
   */
  async healOnRead(live: boolean): Promise<void> {
    const actual = await this.#storage.getAlarm();
    if (actual !== null ? actual === this.#armedAt : this.#armedAt === null && this.#noTimers) return;
    if (actual === null) this.#armedAt = undefined;
    await this.rearm(live);
  }

  /** Checks the alarm is really set, so a lost alarm heals on the next read. */
  async heal(live: boolean): Promise<void> {
    if (!live && !this.any()) return;
    const actual = await this.#storage.getAlarm();
    if (actual === null) this.#armedAt = undefined;
    await this.rearm(live);
  }
}
