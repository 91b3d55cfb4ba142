import { runInDurableObject } from "cloudflare:test";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ended, executionStub, startExecution, waitFor } from "../support/api";
import { startGraph } from "../support/graph";

/**
 * The distinct statement texts one Execution object runs (docs/performance.md,
 * "Fewer distinct statements"): the runtime keeps every distinct text an object
 * ran prepared, keyed by the text, for as long as the object lives (a few KiB
 * each), so a write of one row is one statement whatever it changes.
 *
 * Counted where the runtime sees them: every `sql.exec` of the objects of this
 * test's isolate is recorded by its storage (the text, then the runtime's own
 * exec, unchanged), from before the object exists.
 */
const seen = new WeakMap<object, Set<string>>();
let restore: () => void = () => {};

beforeAll(async () => {
  await runInDurableObject(executionStub(`statement-texts-${crypto.randomUUID()}`), (_i, state) => {
    const proto = Object.getPrototypeOf(state.storage.sql) as { exec: (this: object, query: string, ...bindings: unknown[]) => unknown };
    const exec = proto.exec;
    proto.exec = function (this: object, query: string, ...bindings: unknown[]) {
      const texts = seen.get(this) ?? new Set<string>();
      seen.set(this, texts.add(query));
      return exec.call(this, query, ...bindings);
    };
    restore = () => {
      proto.exec = exec;
    };
  });
});
afterAll(() => restore());

/** The texts the execution's object ran, once it ended and its last writes (the outbox's) are done. */
async function textsOf(id: string): Promise<string[]> {
  await waitFor(id, ended, 30_000);
  return runInDurableObject(executionStub(id), (_i, state) => [...(seen.get(state.storage.sql) ?? [])].map((t) => t.replace(/\s+/g, " ").trim()));
}

/** The texts that write `table` with `verb` (UPDATE, DELETE FROM, INSERT ... INTO). */
const writes = (texts: string[], verb: RegExp, table: string) => texts.filter((t) => new RegExp(`^${verb.source}\\s+${table}\\b`, "i").test(t));

describe("the statements an Execution runs", () => {
  it("a three-stage execution and a fan-out change the execution row, a stage or item, and take, clear and set timers, each with one statement, and read no events without notifications", async () => {
    const { body } = await startExecution({ template_name: "course_creation", parameters: { topic: "React", steps: 2, step_ms: 5 }, client_id: "client_e2e" });
    const line = await textsOf(body.execution_id);
    const fan = await textsOf(await startGraph("graph_fan_out", { items: 4, steps: 1, step_ms: 10 }));
    for (const texts of [line, fan]) {
      // The status document's version and hash are written on their own (status-cache.ts), and no cached read holds them.
      const rowWrites = writes(texts, /UPDATE/, "execution");
      expect(rowWrites.filter((t) => !/^UPDATE execution SET status_version/.test(t))).toHaveLength(1);
      expect(writes(texts, /UPDATE/, "stages")).toHaveLength(1);
      expect(writes(texts, /DELETE FROM/, "timers")).toHaveLength(1);
      expect(writes(texts, /INSERT(?:\s+OR\s+\w+)?\s+INTO/, "timers")).toHaveLength(1);
    }
    // Neither asked for notifications: nothing reads the events they cannot have (but the check mode's look that there are none).
    for (const texts of [line, fan]) expect(texts.filter((t) => /\bFROM events\b/.test(t) && t !== "SELECT 1 FROM events LIMIT 1")).toEqual([]);
    // The same statement in both: none is built per execution, stage or item.
    expect(writes(fan, /UPDATE/, "execution")).toEqual(writes(line, /UPDATE/, "execution"));
    expect(writes(fan, /UPDATE/, "stages")).toEqual(writes(line, /UPDATE/, "stages"));
  });
});
