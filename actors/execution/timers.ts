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

const key = (name: string, unit: string) => `${name}\u0000${unit}`;
/** What clearUnit clears (a stage's or item's timers, but for its retry). */
const UNIT_CLEARED: ReadonlySet<TimerName> = new Set(["poll", "deadline", "lease", "reask", "part_deadline", "reacquire"]);
/** What takeWakeUps takes. */
const WAKE_UPS: ReadonlySet<TimerName> = new Set(["advance", "watchdog", "execution"]);

/**
 * The `timers` table behind the object's one alarm. A handler *takes* its
 * timer (deletes it where due) before acting, so an alarm that fires twice
 * does nothing twice.
 *
 * Which timers exist (and the due time this instance wrote) is also kept in
 * memory, read once from the table at the first use (docs/performance.md,
 * "CPU per execution"): every write to `timers` is made here, so a clear of a
 * timer that is not set, a take of one that is not set, a `has` and a
 * `setNoLaterThan` already due earlier cost no statement (most of a three-stage
 * execution's timer statements were such no-ops). Whether a timer is due is
 * still decided by SQL (`take`), so only presence is trusted to memory. A
 * write left out still runs `beforeWrite` first, as its statement would have
 * (the held grants are written by the next write, grant.ts, and writing one
 * may set timers), so they are written where they were before. With
 * `check` (tuning `readCacheCheck`) every answer from memory is compared with
 * the table, and a difference throws.
 */
export class Timers {
  readonly #sql: Sql;
  readonly #storage: DurableObjectStorage;
  readonly #reads: ReadCache;
  readonly #check: boolean;
  readonly #beforeWrite: () => void;
  /** The alarm as this instance knows it (null: none; undefined: unknown), read at start and kept in step. */
  #armedAt: number | null | undefined = undefined;
  /** The last rearm() found no timer (so no alarm is the right alarm). */
  #noTimers = false;
  /** The timers set, by `name unit`, with the due time as last written here; null until first read. */
  #set: Map<string, { name: TimerName; unit: string; dueAt: number }> | null = null;

  constructor(sql: Sql, storage: DurableObjectStorage, reads: ReadCache, opts: { check?: boolean; beforeWrite?: () => void } = {}) {
    this.#sql = sql;
    this.#storage = storage;
    this.#reads = reads;
    this.#check = opts.check ?? false;
    this.#beforeWrite = opts.beforeWrite ?? (() => {});
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
    this.#write(name, unit, dueAt, false);
  }

  /** Sets the timer unless it is already due earlier (then nothing is written). */
  setNoLaterThan(name: TimerName, dueAt: number, unit = ""): void {
    this.#beforeWrite();
    const had = this.#timers().get(key(name, unit));
    if (had && had.dueAt <= dueAt) {
      if (this.#check) this.#verify("setNoLaterThan", { name, unit, by: dueAt });
      return;
    }
    this.#write(name, unit, dueAt, true);
  }

  /**
   * The one statement every set runs (each distinct statement text stays prepared in the runtime
   * for the object's life: docs/performance.md, target 7); `earlierOnly` keeps a due time that is earlier.
   */
  #write(name: TimerName, unit: string, dueAt: number, earlierOnly: boolean): void {
    this.#sql`INSERT INTO timers (name, unit, due_at) VALUES (${name}, ${unit}, ${dueAt})
      ON CONFLICT(name, unit) DO UPDATE SET due_at = excluded.due_at WHERE ${earlierOnly ? 1 : 0} = 0 OR excluded.due_at < timers.due_at`;
    this.#timers().set(key(name, unit), { name, unit, dueAt });
  }

  clear(name: TimerName, unit = ""): void {
    this.#clearWhere((t) => t.name === name && t.unit === unit);
  }

  /** Clears these timers of every unit, in one statement (each statement costs a round through SQLite). */
  clearMany(names: TimerName[]): void {
    this.#clearWhere((t) => names.includes(t.name));
  }

  /** Clears a stage's or item's own timers, but for its retry. */
  clearUnit(unit: string): void {
    this.#clearWhere((t) => t.unit === unit && UNIT_CLEARED.has(t.name));
  }

  /** When the timer is due, or null when it is not set. */
  dueAt(name: TimerName, unit = ""): number | null {
    return this.#sql<{ due_at: number }>`SELECT due_at FROM timers WHERE name = ${name} AND unit = ${unit}`[0]?.due_at ?? null;
  }

  has(name: TimerName, unit = ""): boolean {
    if (this.#check) this.#verify(`has ${name} ${unit}`);
    return this.#timers().has(key(name, unit));
  }

  /** Consumes a due timer: true once per firing, so a second alarm does nothing twice. */
  take(name: TimerName, unit = ""): boolean {
    this.#beforeWrite();
    if (!this.has(name, unit)) return false;
    return this.#delete([{ name, unit }], Date.now()).length > 0;
  }

  /** Consumes the wake-up timers (`advance`, `watchdog`): the drive pass that runs is the wake-up. */
  takeWakeUps(now: number): void {
    this.#beforeWrite();
    if (this.#check) this.#verify("takeWakeUps");
    const set = [...this.#timers().values()].filter((t) => t.unit === "" && WAKE_UPS.has(t.name));
    if (set.length > 0) this.#delete(set, now);
  }

  any(): boolean {
    if (this.#check) this.#verify("any");
    return this.#timers().size > 0;
  }

  /** Deletes the timers `match` picks, or runs nothing when none is set. */
  #clearWhere(match: (t: { name: TimerName; unit: string }) => boolean): void {
    this.#beforeWrite();
    if (this.#check) this.#verify("clear");
    const gone = [...this.#timers().values()].filter(match);
    if (gone.length === 0) return;
    this.#delete(gone, Number.MAX_SAFE_INTEGER);
    for (const t of gone) this.#timers().delete(key(t.name, t.unit));
  }

  /**
   * The one statement every take and clear runs: deletes these timers where due by `by` (a clear:
   * whenever due), and forgets the ones deleted. Which exist comes from memory (the check mode
   * compares it with the table); whether one is due, from SQL.
   */
  #delete(timers: readonly { name: TimerName; unit: string }[], by: number): { name: TimerName; unit: string }[] {
    const keys = JSON.stringify(timers.map((t) => [t.name, t.unit]));
    const gone = this.#sql<{ name: TimerName; unit: string }>`DELETE FROM timers
      WHERE (name, unit) IN (SELECT value ->> 0, value ->> 1 FROM json_each(${keys})) AND due_at <= ${by} RETURNING name, unit`;
    for (const t of gone) this.#timers().delete(key(t.name, t.unit));
    return gone;
  }

  #timers(): Map<string, { name: TimerName; unit: string; dueAt: number }> {
    if (this.#set === null) {
      this.#set = new Map();
      for (const t of this.#sql<{ name: TimerName; unit: string; due_at: number }>`SELECT name, unit, due_at FROM timers`) {
        this.#set.set(key(t.name, t.unit), { name: t.name, unit: t.unit, dueAt: t.due_at });
      }
    }
    return this.#set;
  }

  /**
   * The check mode: the timers set in memory are the table's (due times are not compared: a due
   * time is decided by SQL); with `due`, that this one is due no later than `by` in the table.
   */
  #verify(what: string, due?: { name: TimerName; unit: string; by: number }): void {
    const rows = this.#sql<{ name: string; unit: string; due_at: number }>`SELECT name, unit, due_at FROM timers ORDER BY name, unit`;
    const inSql = rows.map((r) => key(r.name, r.unit)).sort();
    const inMemory = [...this.#timers().keys()].sort();
    if (inSql.join("|") !== inMemory.join("|")) throw new Error(`timers: ${what}: memory ${JSON.stringify(inMemory)} differs from SQL ${JSON.stringify(inSql)}`);
    const row = due && rows.find((r) => r.name === due.name && r.unit === due.unit);
    if (due && (!row || row.due_at > due.by)) throw new Error(`timers: ${what} ${due.name} ${due.unit}: not due by ${due.by} in SQL`);
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
