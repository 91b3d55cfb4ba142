import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ReadCache } from "../../actors/execution/read-cache";
import { createTables } from "../../actors/execution/schema";
import { Timers } from "../../actors/execution/timers";
import { type Sql, sqlOf } from "../../actors/sql";
import { executionStub } from "../support/api";

/**
 * The Execution's timers with the set kept in memory (actors/execution/timers.ts):
 * what is known not to be set, or already due earlier, costs no statement;
 * what is set still goes to SQL, which alone decides whether a timer is due.
 * On a fresh Execution's own database, with its tables, counting the
 * statements that reach SQLite.
 */
async function withTimers<T>(body: (t: { timers: Timers; statements: () => string[]; raw: SqlStorage }) => T | Promise<T>): Promise<T> {
  return runInDurableObject(executionStub(`timers-memory-${crypto.randomUUID()}`), (_i, state) => {
    createTables(state.storage);
    const seen: string[] = [];
    const base = sqlOf(state.storage);
    const counted = ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
      seen.push(strings.join("?").trim().split(/\s+/).slice(0, 2).join(" "));
      return base(strings, ...values);
    }) as Sql;
    const reads = new ReadCache(false);
    const timers = new Timers(reads.watch(counted), state.storage, reads);
    const statements = () => seen.splice(0);
    return body({ timers, statements, raw: state.storage.sql });
  });
}

describe("the Execution's timers, their set kept in memory", () => {
  it("a clear, a take or a has of a timer that is not set, and a later setNoLaterThan, run no statement after the first read", async () => {
    const seen = await withTimers(({ timers, statements }) => {
      timers.clear("poll", "stage_1"); // the set's one read
      const first = statements();
      timers.clear("poll", "stage_1");
      timers.clearUnit("stage_2");
      timers.clearMany(["advance", "retry"]);
      const taken = timers.take("deadline", "stage_1");
      const has = timers.has("lease", "stage_1");
      const unset = statements();
      timers.set("deadline", Date.now() + 60_000, "stage_1");
      const set = statements();
      timers.setNoLaterThan("deadline", Date.now() + 120_000, "stage_1"); // already due earlier
      const later = statements();
      timers.setNoLaterThan("deadline", Date.now() + 1_000, "stage_1"); // earlier: written
      const earlier = statements();
      return { first, unset, taken, has, set, later, earlier };
    });
    expect(seen.first).toEqual(["SELECT name,"]);
    expect(seen.unset).toEqual([]);
    expect(seen.taken).toBe(false);
    expect(seen.has).toBe(false);
    expect(seen.set).toEqual(["INSERT INTO"]);
    expect(seen.later).toEqual([]);
    expect(seen.earlier).toEqual(["INSERT INTO"]);
  });

  it("a take of a timer that is set asks SQL, which takes it only once it is due", async () => {
    const seen = await withTimers(({ timers, statements }) => {
      timers.set("retry", Date.now() + 60_000, "stage_1");
      statements();
      const early = timers.take("retry", "stage_1");
      const asked = statements();
      timers.set("retry", Date.now() - 1, "stage_1");
      statements();
      const due = timers.take("retry", "stage_1");
      const again = timers.take("retry", "stage_1");
      return { early, asked, due, again, after: statements() };
    });
    expect(seen.early).toBe(false);
    expect(seen.asked).toEqual(["DELETE FROM"]);
    expect(seen.due).toBe(true);
    // Taken once: the second take knows it is gone and runs nothing.
    expect(seen.again).toBe(false);
    expect(seen.after).toEqual(["DELETE FROM"]);
  });
});
