import type { Sql } from "../sql";

/** A statement that writes one named table (anything else that is not a read invalidates every table). */
const WRITES = /^\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+(\w+)/i;
const READS = /^\s*SELECT/i;

/**
 * Reads of the execution's SQLite kept in memory until a write to their
 * tables (docs/performance.md, "CPU per execution"): a drive pass reads the
 * execution row, the stages and the timers again after every await, and the
 * status document is rebuilt from them after every turn that wrote, while
 * most of those tables did not change in between.
 *
 * Why memory never disagrees with SQL: every statement of the object passes
 * `watch` (the object's one sql helper is built on it), and one that is not a
 * SELECT counts as a change of the table it names before it runs (of every
 * table when it names none we know: a script, a schema change), so a memoized
 * read is used only while no statement since may have changed its tables.
 * The execution has no triggers, foreign keys or transactions that roll back
 * in the object (a failed commit resets the instance, and this memory with
 * it; a new instance starts empty). Cached results are frozen: a caller that
 * changed one would change what the next caller reads.
 *
 * A write drops the entries of its table at once (a stale entry is never
 * valid again, and a 1,000-item fan-out would otherwise keep a frozen row
 * per item read, outputs up to 64 KiB inline, for the object's life), so
 * what is kept is only what is valid now.
 *
 * `check` (tuning `readCacheCheck`, on in the test suite): every hit is read
 * again from SQL and compared, and a difference throws.
 */
export class ReadCache {
  readonly #memo = new Map<string, unknown>();
  /** The keys read from each table (a key is under every table it reads). */
  readonly #keys = new Map<string, Set<string>>();
  readonly #check: boolean;

  constructor(check = false) {
    this.#check = check;
  }

  /** The check mode is on: a shortcut that answers without SQL reads SQL too and compares. */
  get checking(): boolean {
    return this.#check;
  }

  /** The helper every statement of the object goes through. */
  watch(sql: Sql): Sql {
    return ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
      const head = strings[0];
      if (!READS.test(head)) {
        const table = WRITES.exec(head)?.[1];
        if (table) this.#drop(table);
        else this.#clear();
      }
      return sql(strings, ...values);
    }) as Sql;
  }

  /** `value`, which another read in memory answered; in the check mode compared with `read()` first. */
  checked<T>(key: string, value: T, read: () => T): T {
    if (this.#check && !same(value, read())) throw new Error(`read cache: ${key} differs from SQL`);
    return value;
  }

  /** `read()`, or its result from memory while none of `tables` was written since. */
  memo<T>(key: string, tables: readonly string[], read: () => T): T {
    if (this.#memo.has(key)) return this.checked(key, this.#memo.get(key) as T, read);
    const value = freeze(read());
    this.seed(key, tables, value);
    return value;
  }

  /**
   * `key` holds `value` from now on, as if read: for a write whose result is known exactly (the
   * execution row's one UPDATE writes every column it may change, so the row it wrote is the row in
   * memory with the change over it). Only right after that write; the check mode compares it with SQL at its next hit.
   */
  seed<T>(key: string, tables: readonly string[], value: T): void {
    this.#memo.set(key, freeze(value));
    for (const t of tables) {
      const keys = this.#keys.get(t);
      if (keys) keys.add(key);
      else this.#keys.set(t, new Set([key]));
    }
  }

  /** How many reads are kept (for tests: a write leaves none of its table's). */
  get size(): number {
    return this.#memo.size;
  }

  #drop(table: string): void {
    const keys = this.#keys.get(table);
    if (!keys) return;
    // A key under another table too stays in that table's set; deleting a key that is gone is a no-op.
    for (const k of keys) this.#memo.delete(k);
    keys.clear();
  }

  #clear(): void {
    this.#memo.clear();
    this.#keys.clear();
  }
}

function freeze<T>(value: T): T {
  if (Array.isArray(value)) for (const v of value) if (v && typeof v === "object") Object.freeze(v);
  // A Map cannot be frozen (its set and delete still work); its values can, and callers get it as ReadonlyMap.
  if (value instanceof Map) {
    for (const v of value.values()) if (v && typeof v === "object") Object.freeze(v);
    return value;
  }
  return value && typeof value === "object" ? Object.freeze(value) : value;
}

const same = (a: unknown, b: unknown) => JSON.stringify(a, mapsAsEntries) === JSON.stringify(b, mapsAsEntries);
const mapsAsEntries = (_: string, v: unknown) => (v instanceof Map ? [...v] : v);
