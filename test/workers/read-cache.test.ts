import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ReadCache } from "../../actors/execution/read-cache";
import { sqlOf } from "../../actors/sql";
import { executionStub } from "../support/api";

/**
 * The Execution's read cache (actors/execution/read-cache.ts) on a real
 * object's SQLite: a table of its own in a fresh Execution's database, which
 * nothing else of the object reads.
 */
async function withCache<T>(check: boolean, body: (c: { cache: ReadCache; sql: ReturnType<typeof sqlOf>; raw: SqlStorage }) => T): Promise<T> {
  return runInDurableObject(executionStub(`read-cache-${crypto.randomUUID()}`), (_i, state) => {
    const raw = state.storage.sql;
    raw.exec("CREATE TABLE rc_items (id TEXT PRIMARY KEY, v INTEGER NOT NULL)");
    raw.exec("CREATE TABLE rc_other (id TEXT PRIMARY KEY)");
    const cache = new ReadCache(check);
    return body({ cache, sql: cache.watch(sqlOf(state.storage)), raw });
  });
}

describe("the Execution's read cache", () => {
  it("serves a read from memory until a write to its table, then reads SQL again", async () => {
    const seen = await withCache(false, ({ cache, sql }) => {
      let reads = 0;
      const item = () =>
        cache.memo("item:a", ["rc_items"], () => {
          reads++;
          return sql<{ v: number }>`SELECT v FROM rc_items WHERE id = 'a'`[0] ?? null;
        });
      sql`INSERT INTO rc_items (id, v) VALUES ('a', 1)`;
      const first = item();
      const again = item();
      sql`INSERT INTO rc_other (id) VALUES ('x')`; // another table: still from memory
      const afterOther = item();
      sql`UPDATE rc_items SET v = 2 WHERE id = 'a'`;
      const afterWrite = item();
      return { first, again, afterOther, afterWrite, reads };
    });
    expect(seen.first).toEqual({ v: 1 });
    expect(seen.again).toBe(seen.first);
    expect(seen.afterOther).toEqual({ v: 1 });
    expect(seen.afterWrite).toEqual({ v: 2 });
    expect(seen.reads).toBe(2);
  });

  it("keeps no entry of a table once it is written (a fan-out's item reads do not pile up)", async () => {
    const sizes = await withCache(false, ({ cache, sql }) => {
      for (let i = 0; i < 100; i++) sql`INSERT INTO rc_items (id, v) VALUES (${`i${i}`}, ${i})`;
      for (let i = 0; i < 100; i++) cache.memo(`item:${i}`, ["rc_items"], () => sql`SELECT v FROM rc_items WHERE id = ${`i${i}`}`[0]);
      cache.memo("other", ["rc_other"], () => sql`SELECT COUNT(*) AS n FROM rc_other`[0]);
      const before = cache.size;
      sql`UPDATE rc_items SET v = v + 1 WHERE id = 'i0'`;
      const afterItems = cache.size;
      sql`DELETE FROM rc_other`;
      return { before, afterItems, afterOther: cache.size };
    });
    expect(sizes).toEqual({ before: 101, afterItems: 1, afterOther: 0 });
  });

  it("hands out frozen results, the values of a Map among them", async () => {
    const frozen = await withCache(false, ({ cache, sql }) => {
      sql`INSERT INTO rc_items (id, v) VALUES ('a', 1)`;
      const rows = cache.memo("rows", ["rc_items"], () => sql<{ id: string; v: number }>`SELECT id, v FROM rc_items`);
      const counts = cache.memo("counts", ["rc_items"], () => new Map(rows.map((r) => [r.id, { n: r.v }])));
      return { array: Object.isFrozen(rows), row: Object.isFrozen(rows[0]), mapValue: Object.isFrozen(counts.get("a")) };
    });
    expect(frozen).toEqual({ array: true, row: true, mapValue: true });
  });

  it("in check mode, a hit that differs from SQL (a write that did not pass the helper) fails the read", async () => {
    const outcome = await withCache(true, ({ cache, sql, raw }) => {
      sql`INSERT INTO rc_items (id, v) VALUES ('a', 1)`;
      const read = () => cache.memo("item:a", ["rc_items"], () => sql<{ v: number }>`SELECT v FROM rc_items WHERE id = 'a'`[0]);
      read();
      const agreeing = read();
      raw.exec("UPDATE rc_items SET v = 5 WHERE id = 'a'"); // behind the cache's back
      try {
        read();
        return { agreeing, error: null };
      } catch (e) {
        return { agreeing, error: (e as Error).message };
      }
    });
    expect(outcome.agreeing).toEqual({ v: 1 });
    expect(outcome.error).toBe("read cache: item:a differs from SQL");
  });

  it("a statement that names no table it knows (a script, a schema change) empties it", async () => {
    const size = await withCache(false, ({ cache, sql }) => {
      cache.memo("items", ["rc_items"], () => sql`SELECT COUNT(*) AS n FROM rc_items`[0]);
      cache.memo("other", ["rc_other"], () => sql`SELECT COUNT(*) AS n FROM rc_other`[0]);
      const before = cache.size;
      sql`CREATE INDEX rc_items_v ON rc_items (v)`;
      return { before, after: cache.size };
    });
    expect(size).toEqual({ before: 2, after: 0 });
  });
});
