import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { createTables } from "../../actors/execution/schema";
import { migrate } from "../../actors/execution/store";
import { beforeEach, describe, expect, it } from "vitest";
import type { ItemsPage, StageDocument, StatusDocument } from "../../schemas/api";
import { OPS, call, ended, executionStub, expectNoLiveReservations, waitFor, waitForLedger } from "../support/api";
import { GRAPH_WORKER as WORKER, type Gathered, deliverable as result, graphStats as stats, resetGraphStats, startGraph as start } from "../support/graph";

/**
 * The pipeline graph end to end: depends_on, fan-out over a list (for_each),
 * max_parallel, fan-in, failures and eviction, against a granulator instance
 * of its own (vitest.config.ts), whose counters see only these tests' jobs.
 */

async function items(id: string, stageId: string, query = ""): Promise<ItemsPage> {
  const res = await call(`/executions/${id}/stages/${stageId}/items${query}`, { headers: OPS });
  expect(res.status).toBe(200);
  return res.json();
}

/** Every item of a fan-out stage, page by page. */
async function allItems(id: string, stageId: string, limit: number): Promise<StageDocument[]> {
  const out: StageDocument[] = [];
  let cursor: string | null = null;
  do {
    const page: ItemsPage = await items(id, stageId, `?limit=${limit}${cursor ? `&cursor=${cursor}` : ""}`);
    expect(page.items.length).toBeLessThanOrEqual(limit);
    out.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return out;
}

/** Nothing left reserved in the ledger, and the graph worker's pool is whole again. */
async function expectNothingLeaked(id: string) {
  await expectNoLiveReservations(id);
  await waitForLedger((s) => (s.pools.find((p) => p.name === `worker:${WORKER}`)?.in_use ?? 0) === 0);
}

const stage = (doc: StatusDocument, n: number) => doc.stages.find((s) => s.stage_id === `stage_${n}`)!;

describe("pipeline graph", () => {
  beforeEach(async () => {
    await resetGraphStats();
  });

  it("a diamond runs stages 2 and 3 at the same time, and 4 receives both outputs in inputs", async () => {
    const id = await start("graph_diamond", { steps: 3, step_ms: 150 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => s.depends_on)).toEqual([[], ["stage_1"], ["stage_1"], ["stage_2", "stage_3"]]);
    // Stages 1 and 4 run alone; two at once can only have been 2 and 3.
    const s = await stats();
    expect(s.max_concurrent).toBe(2);
    expect(s.completed).toBe(4);

    const out = (await result(id)) as Gathered;
    expect(out.stage).toBe("stage_4");
    expect(Object.keys(out.inputs).sort()).toEqual(["stage_2", "stage_3"]);
    const two = out.inputs.stage_2 as Gathered;
    const three = out.inputs.stage_3 as Gathered;
    expect(two.stage).toBe("stage_2");
    expect(three.stage).toBe("stage_3");
    // Each of them received stage 1's output, which itself had no inputs.
    expect(two.inputs).toEqual({ stage_1: { stage: "stage_1", inputs: {} } });
    expect(three.inputs).toEqual({ stage_1: { stage: "stage_1", inputs: {} } });
    await expectNothingLeaked(id);
  });

  it("fans out 25 items, never more than 5 at once at the worker; the merge gets 25 outputs in order and the cost adds up", async () => {
    const id = await start("graph_fan_out", { items: 25, steps: 2, step_ms: 40 });
    const doc = await waitFor(id, ended, 60_000);
    expect(doc.status).toBe("completed");
    const s = await stats();
    expect(s.max_concurrent).toBe(5);
    expect(s.completed).toBe(27);

    const fan = stage(doc, 2);
    expect(fan.depends_on).toEqual(["stage_1"]);
    expect(fan.items).toEqual({ total: 25, pending: 0, running: 0, completed: 25, failed: 0, cancelled: 0 });

    const merge = (await result(id)) as Gathered;
    expect(merge.stage).toBe("stage_3");
    const outputs = merge.inputs.stage_2 as Gathered[];
    expect(outputs.map((o) => o.stage)).toEqual(Array.from({ length: 25 }, (_, i) => `stage_2.${i}`));
    expect(outputs.map((o) => o.item_index)).toEqual(Array.from({ length: 25 }, (_, i) => i));
    expect(outputs[7].item).toEqual({ index: 7, label: "item 7" });

    // Items, paged in item order, each with its own usage; the stage's usage and cost are their sum.
    const list = await allItems(id, "stage_2", 10);
    expect(list.map((i) => i.stage_id)).toEqual(outputs.map((o) => o.stage));
    expect(list.every((i) => i.status === "completed" && i.attempts === 1 && i.usage !== null)).toBe(true);
    for (const pool of ["tokens:openai", "compute_ms"]) {
      expect(fan.usage![pool]).toBe(list.reduce((sum, i) => sum + (i.usage![pool] ?? 0), 0));
    }
    // Each item's cost is rounded to a millionth on its own: the sum may differ by that much per item.
    const itemCost = list.reduce((sum, i) => sum + i.cost!, 0);
    expect(Math.abs(doc.cost!.by_stage.stage_2 - itemCost)).toBeLessThanOrEqual(25 * 1e-6);
    expect(doc.cost!.by_stage.stage_2).toBeGreaterThan(20 * Math.min(...list.map((i) => i.cost!)));
    expect(doc.cost!.total).toBeCloseTo(doc.cost!.by_stage.stage_1 + doc.cost!.by_stage.stage_2 + doc.cost!.by_stage.stage_3, 6);
    await expectNothingLeaked(id);
  });

  it("an item failing for good fails the execution naming it, cancels the other items and leaks nothing", async () => {
    const id = await start("graph_fan_out", { items: 12, steps: 3, step_ms: 300, fault: { stage: 2, item: 3, mode: "refuse" } });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ stage_id: "stage_2.3", code: "handshake_refused" });
    expect(stage(doc, 2).status).toBe("failed");
    expect(stage(doc, 3)).toMatchObject({ status: "cancelled", error: { code: "upstream_failed" } });
    const list = await allItems(id, "stage_2", 100);
    expect(list.find((i) => i.stage_id === "stage_2.3")).toMatchObject({ status: "failed", error: { code: "handshake_refused" } });
    const others = list.filter((i) => i.stage_id !== "stage_2.3");
    expect(others).toHaveLength(11);
    expect(others.every((i) => i.status === "cancelled")).toBe(true);
    expect(stage(doc, 2).items).toEqual({ total: 12, pending: 0, running: 0, completed: 0, failed: 1, cancelled: 11 });
    await expectNothingLeaked(id);
    // The items that were on the worker were told to cancel: none is left processing there.
    const deadline = Date.now() + 10_000;
    while ((await stats()).processing > 0 && Date.now() < deadline) await scheduler.wait(25);
    expect((await stats()).processing).toBe(0);
  });

  it("an item whose worker crashes is retried alone; the other items run once", async () => {
    const id = await start("graph_fan_out", { items: 6, steps: 2, step_ms: 30, fault: { stage: 2, item: 1, mode: "crash_once" } });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const list = await allItems(id, "stage_2", 100);
    expect(list.map((i) => [i.stage_id, i.attempts])).toEqual([
      ["stage_2.0", 1],
      ["stage_2.1", 2],
      ["stage_2.2", 1],
      ["stage_2.3", 1],
      ["stage_2.4", 1],
      ["stage_2.5", 1],
    ]);
    expect(list[1].last_error).toMatchObject({ stage_id: "stage_2.1", attempt: 1 });
    // Stage 1, six items, one more attempt of item 1, stage 3.
    const s = await stats();
    expect(s.started).toBe(9);
    expect(s.completed).toBe(8);
    const merge = (await result(id)) as Gathered;
    expect((merge.inputs.stage_2 as Gathered[]).map((o) => o.stage)).toEqual(list.map((i) => i.stage_id));
    await expectNothingLeaked(id);
  });

  it("resumes a fan-out after the Execution is evicted, with no item run twice and the output complete", async () => {
    const id = await start("graph_fan_out", { items: 8, steps: 3, step_ms: 120 });
    await waitFor(id, (d) => (d.stages[1]?.items?.completed ?? 0) >= 1 && (d.stages[1]?.items?.completed ?? 0) < 8, 30_000);
    await evictDurableObject(executionStub(id));
    const doc = await waitFor(id, ended, 60_000);
    expect(doc.status).toBe("completed");
    const list = await allItems(id, "stage_2", 100);
    expect(list.every((i) => i.status === "completed" && i.attempts === 1)).toBe(true);
    const s = await stats();
    expect(s.started).toBe(10);
    expect(s.completed).toBe(10);
    const merge = (await result(id)) as Gathered;
    expect((merge.inputs.stage_2 as Gathered[]).map((o) => o.item_index)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    await expectNothingLeaked(id);
  });

  it("cancelling mid fan-out stops every item: reservations released, workers told, the rest cancelled", async () => {
    const id = await start("graph_fan_out", { items: 10, steps: 4, step_ms: 400 });
    // Five items processing, as the worker counts them (max_parallel 5).
    const until = Date.now() + 30_000;
    while ((await stats()).processing < 5 && Date.now() < until) await scheduler.wait(25);
    expect((await stats()).processing).toBe(5);
    const res = await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
    expect(res.status).toBe(200);
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("cancelled");
    expect(stage(doc, 2)).toMatchObject({ status: "cancelled", items: { total: 10, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 10 } });
    expect(stage(doc, 3).status).toBe("cancelled");
    await expectNothingLeaked(id);
    // The five items on the worker were told to cancel: none is left processing there, none completed.
    const deadline = Date.now() + 10_000;
    while ((await stats()).processing > 0 && Date.now() < deadline) await scheduler.wait(25);
    const s = await stats();
    expect(s.processing).toBe(0);
    expect(s.cancelled).toBe(5);
    expect(s.completed).toBe(1);
  });

  it("an empty list completes the fan-out stage at once with []", async () => {
    const id = await start("graph_fan_out", { items: 0, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(stage(doc, 2)).toMatchObject({ status: "completed", items: { total: 0, completed: 0 } });
    const merge = (await result(id)) as Gathered;
    expect(merge.inputs).toEqual({ stage_2: [] });
    expect((await stats()).started).toBe(2);
  });

  it("with several stages nothing depends on, the deliverable maps each one's id to its output", async () => {
    const id = await start("graph_two_sinks", { items: 2, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const out = (await result(id)) as Record<string, Gathered>;
    expect(Object.keys(out).sort()).toEqual(["stage_2", "stage_3"]);
    expect(out.stage_2.stage).toBe("stage_2");
    expect(out.stage_3.stage).toBe("stage_3");
  });

  it("the demo's course_parallel: outline, one chapter per module in parallel, quiz and summary side by side, assembled", async () => {
    const id = await start("course_parallel", { topic: "Rust", modules: 6, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => [s.stage_id, s.action, s.depends_on])).toEqual([
      ["stage_1", "outline", []],
      ["stage_2", "write_chapter", ["stage_1"]],
      ["stage_3", "quiz", ["stage_2"]],
      ["stage_4", "summary", ["stage_2"]],
      ["stage_5", "assemble", ["stage_2", "stage_3", "stage_4"]],
    ]);
    expect(stage(doc, 2).items).toMatchObject({ total: 6, completed: 6 });
    const chapters = (await allItems(id, "stage_2", 100)).map((i) => i.stage_id);
    expect(chapters).toEqual(["stage_2.0", "stage_2.1", "stage_2.2", "stage_2.3", "stage_2.4", "stage_2.5"]);
    const course = (await result(id)) as {
      summary: string;
      quiz: { chapter: string; question: string; answer: string }[];
      chapters: { index: number; title: string; text: string }[];
      text: string;
      from: string[];
    };
    expect(course.from).toEqual(["stage_2", "stage_3", "stage_4"]);
    expect(course.quiz).toHaveLength(6);
    expect(course.summary.length).toBeGreaterThan(0);
    // Every chapter of the outline, in order, each with its own text, in the assembled course.
    expect(course.chapters.map((c) => c.index)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(new Set(course.chapters.map((c) => c.title)).size).toBe(6);
    const at = course.chapters.map((c) => {
      expect(c.text.split(/\s+/).length, c.title).toBe(60);
      return course.text.indexOf(`## Chapter ${c.index}: ${c.title}\n\n${c.text}`);
    });
    expect(at.every((p) => p > 0)).toBe(true);
    expect([...at].sort((a, b) => a - b)).toEqual(at);
    expect(course.text.indexOf("## Summary")).toBeLessThan(at[0]);
    expect(course.text.indexOf("## Quiz")).toBeGreaterThan(at[5]);
  });

  it("course_parallel with long chapters: the chapters' array is stored by reference, and assemble reads it among its several inputs", async () => {
    // Four chapters of 3,000 words: their array (over 64 KiB) is stored in KV, so assemble (three dependencies) gets a { $ref } for it.
    const id = await start("course_parallel", { topic: "Rust", modules: 4, chapter_words: 3000, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const chaptersRef = await runInDurableObject(executionStub(id), (_i, state) =>
      state.storage.sql.exec("SELECT output_ref FROM stages WHERE stage_id = 'stage_2'").one().output_ref as string | null,
    );
    expect(chaptersRef).not.toBeNull();
    const content = await call(`/executions/${id}/result/content`, { headers: OPS });
    expect(content.status).toBe(200);
    const course = (await content.json()) as { chapters: { index: number; text: string }[]; quiz: unknown[]; from: string[] };
    expect(course.from).toEqual(["stage_2", "stage_3", "stage_4"]);
    // The chapters came out of the stored array: all four, each its 3,000 words.
    expect(course.chapters.map((c) => c.index)).toEqual([1, 2, 3, 4]);
    for (const c of course.chapters) expect(c.text.split(/\s+/).length).toBe(3000);
    expect(course.quiz).toHaveLength(4);
  });

  it("migrate() brings an Execution's tables from before the graph up to the schema, the running stage keeping its timers", async () => {
    // A fresh object with no execution (nothing runs in it), its tables rebuilt in the old shape with an old row set.
    const stub = env.EXECUTION.get(env.EXECUTION.newUniqueId());
    const after = await runInDurableObject(stub, (_i, state) => {
      const sql = state.storage.sql;
      // A new object gets its tables with its first statement (schema.ts withTables); here first by hand.
      createTables(state.storage);
      sql.exec(`DROP INDEX stages_by_parent;
        ALTER TABLE stages DROP COLUMN depends_on; ALTER TABLE stages DROP COLUMN for_each; ALTER TABLE stages DROP COLUMN max_parallel;
        ALTER TABLE stages DROP COLUMN items_total; ALTER TABLE stages DROP COLUMN parent; ALTER TABLE stages DROP COLUMN item_index;
        ALTER TABLE stages DROP COLUMN item;
        DROP TABLE timers; CREATE TABLE timers (name TEXT PRIMARY KEY, due_at INTEGER NOT NULL);`);
      for (const [id, ord, status] of [["stage_1", 1, "completed"], ["stage_2", 2, "processing"], ["stage_3", 3, "pending"]] as const) {
        sql.exec("INSERT INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, status) VALUES (?, ?, 'w', 't', 'a', 1000, 1, ?)", id, ord, status);
      }
      for (const [name, due] of [["poll", 10], ["deadline", 20], ["watchdog", 30], ["outbox", 40]] as const) sql.exec("INSERT INTO timers (name, due_at) VALUES (?, ?)", name, due);
      migrate(state.storage);
      return {
        stages: sql.exec("SELECT stage_id, depends_on, parent FROM stages ORDER BY ord").toArray(),
        timers: sql.exec("SELECT name, unit, due_at FROM timers ORDER BY due_at").toArray(),
        indexes: sql.exec("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'stages_by_parent'").toArray().length,
      };
    });
    expect(after.stages).toEqual([
      { stage_id: "stage_1", depends_on: "[]", parent: null },
      { stage_id: "stage_2", depends_on: '["stage_1"]', parent: null },
      { stage_id: "stage_3", depends_on: '["stage_2"]', parent: null },
    ]);
    // The per-stage timers belong to the stage that was running; the execution's own stay its own.
    expect(after.timers).toEqual([
      { name: "poll", unit: "stage_2", due_at: 10 },
      { name: "deadline", unit: "stage_2", due_at: 20 },
      { name: "watchdog", unit: "", due_at: 30 },
      { name: "outbox", unit: "", due_at: 40 },
    ]);
    expect(after.indexes).toBe(1);
  });

  it.each([
    ["graph_cycle", "cycle: stage 2 -> stage 4 -> stage 3 -> stage 2"],
    ["graph_unknown_dependency", "stage 2 depends on stage 7, which is not a stage of the template"],
    ["graph_for_each_two_deps", "stage 3 has for_each but 2 dependencies (stage 1, stage 2); for_each needs exactly one"],
  ])("%s fails with invalid_template naming the stages, and reserves nothing", async (template, reason) => {
    const id = await start(template, {});
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("invalid_template");
    expect(doc.error?.message).toContain(reason);
    expect(doc.stages).toEqual([]);
    expect(await expectNoLiveReservations(id)).toBe(0);
    expect((await stats()).started).toBe(0);
  });

  it.each([
    ["graph_for_each_scalar", { items: 3 }, 'for_each "/count" points at number, not an array'],
    ["graph_fan_out", { items: 1001 }, 'for_each "/items" gives 1001 items, more than maxFanOutItems (1000)'],
  ])("%s with %j fails the fan-out stage with fan_out_invalid, and leaks nothing", async (template, parameters, reason) => {
    const id = await start(template, { ...parameters, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "fan_out_invalid", stage_id: "stage_2" });
    expect(doc.error?.message).toContain(reason);
    expect(stage(doc, 1).status).toBe("completed");
    expect(stage(doc, 2)).toMatchObject({ status: "failed", items: null });
    await expectNothingLeaked(id);
    // Only the list ran on the worker.
    expect((await stats()).started).toBe(1);
  });

  it("the items route pages in item order and refuses what is not a fan-out stage", async () => {
    const id = await start("graph_fan_out", { items: 5, steps: 1, step_ms: 0 });
    await waitFor(id, ended);
    const first = await items(id, "stage_2", "?limit=2");
    expect(first).toMatchObject({ execution_id: id, stage_id: "stage_2", total: 5, next_cursor: "2" });
    expect(first.items.map((i) => [i.stage_id, i.item_index, i.order, i.depends_on])).toEqual([
      ["stage_2.0", 0, 2, ["stage_1"]],
      ["stage_2.1", 1, 2, ["stage_1"]],
    ]);
    const last = await items(id, "stage_2", "?limit=2&cursor=4");
    expect(last.items.map((i) => i.stage_id)).toEqual(["stage_2.4"]);
    expect(last.next_cursor).toBeNull();

    const notFanOut = await call(`/executions/${id}/stages/stage_1/items`, { headers: OPS });
    expect(notFanOut.status).toBe(409);
    expect(((await notFanOut.json()) as { error: { code: string } }).error.code).toBe("not_fan_out");
    const unknown = await call(`/executions/${id}/stages/stage_9/items`, { headers: OPS });
    expect(unknown.status).toBe(404);
    const bad = await call(`/executions/${id}/stages/stage_2/items?limit=0`, { headers: OPS });
    expect(bad.status).toBe(400);
    const noToken = await call(`/executions/${id}/stages/stage_2/items`);
    expect(noToken.status).toBe(401);
  });
});
