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
 * `check` (tuning `readCacheCheck`, on in the test suite): every hit is read
 * again from SQL and compared, and a difference throws.
 */
export class ReadCache {
  readonly #gen = new Map<string, number>();
  #all = 0;
  readonly #memo = new Map<string, { stamp: number; value: unknown }>();
  readonly #check: boolean;

  constructor(check = false) {
    this.#check = check;
  }

  /** The helper every statement of the object goes through. */
  watch(sql: Sql): Sql {
    return ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
      const head = strings[0];
      if (!READS.test(head)) {
        const table = WRITES.exec(head)?.[1];
        if (table) this.#gen.set(table, (this.#gen.get(table) ?? 0) + 1);
        else this.#all += 1;
      }
      return sql(strings, ...values);
    }) as Sql;
  }

  /** `read()`, or its result from memory while none of `tables` was written since. */
  memo<T>(key: string, tables: readonly string[], read: () => T): T {
    // Generations only grow, so their sum is unchanged exactly when none of them changed.
    let stamp = this.#all;
    for (const t of tables) stamp += this.#gen.get(t) ?? 0;
    const hit = this.#memo.get(key);
    if (hit && hit.stamp === stamp) {
      if (this.#check && !same(hit.value, read())) throw new Error(`read cache: ${key} differs from SQL`);
      return hit.value as T;
    }
    const value = freeze(read());
    this.#memo.set(key, { stamp, value });
    return value;
  }
}

function freeze<T>(value: T): T {
  if (Array.isArray(value)) for (const v of value) if (v && typeof v === "object") Object.freeze(v);
  return value && typeof value === "object" && !(value instanceof Map) ? Object.freeze(value) : value;
}

const same = (a: unknown, b: unknown) => JSON.stringify(a, mapsAsEntries) === JSON.stringify(b, mapsAsEntries);
const mapsAsEntries = (_: string, v: unknown) => (v instanceof Map ? [...v] : v);
