import { describe, expect, it } from "vitest";
import { fanOutItems, itemIdFor, itemSlots, readyStages, resolveGraph, resolvePointer, sinks } from "../../actors/execution/graph";
import type { TemplateStage } from "../../schemas/template";

/**
 * The pipeline graph's rules as pure functions (actors/execution/graph.ts):
 * what a template's graph means, which stages are ready, how a list becomes
 * items, and how many items may start. The end-to-end behaviour is in graph.test.ts.
 */
const stage = (n: number, extra: Partial<TemplateStage> = {}): TemplateStage =>
  ({ stage: n, worker: "bitware-content-granulator", template_ref: "t", ...extra }) as TemplateStage;

describe("resolveGraph", () => {
  it("without depends_on, each stage waits for the next lower stage number (a straight line, ids by position)", () => {
    const g = resolveGraph([stage(10), stage(20), stage(35)]);
    expect(g).toEqual({
      ok: true,
      nodes: [
        { stage_id: "stage_1", ord: 1, depends_on: [], for_each: null, max_parallel: 10 },
        { stage_id: "stage_2", ord: 2, depends_on: ["stage_1"], for_each: null, max_parallel: 10 },
        { stage_id: "stage_3", ord: 3, depends_on: ["stage_2"], for_each: null, max_parallel: 10 },
      ],
    });
  });

  it("depends_on: [] starts at once; numbers map to the stages' ids; for_each and max_parallel are kept", () => {
    const g = resolveGraph([stage(1), stage(2, { depends_on: [] }), stage(5, { depends_on: [1, 2], for_each: undefined }), stage(7, { depends_on: [5], for_each: "/a~1b", max_parallel: 3 })]);
    expect(g.ok && g.nodes.map((n) => [n.stage_id, n.depends_on, n.for_each, n.max_parallel])).toEqual([
      ["stage_1", [], null, 10],
      ["stage_2", [], null, 10],
      ["stage_3", ["stage_1", "stage_2"], null, 10],
      ["stage_4", ["stage_3"], "/a~1b", 3],
    ]);
  });

  it("refuses unknown numbers, self-dependencies, cycles, for_each without exactly one dependency, max_parallel alone", () => {
    expect(resolveGraph([stage(1), stage(2, { depends_on: [9] })])).toEqual({ ok: false, message: "stage 2 depends on stage 9, which is not a stage of the template" });
    expect(resolveGraph([stage(1), stage(2, { depends_on: [2] })])).toEqual({ ok: false, message: "stage 2 depends on itself" });
    expect(resolveGraph([stage(1, { depends_on: [3] }), stage(2), stage(3)])).toEqual({ ok: false, message: "cycle: stage 1 -> stage 3 -> stage 2 -> stage 1" });
    expect(resolveGraph([stage(1, { for_each: "" })])).toEqual({ ok: false, message: "stage 1 has for_each but no dependency; for_each needs exactly one" });
    expect(resolveGraph([stage(1), stage(2, { depends_on: [] }), stage(3, { depends_on: [1, 2], for_each: "/x" })])).toEqual({
      ok: false,
      message: "stage 3 has for_each but 2 dependencies (stage 1, stage 2); for_each needs exactly one",
    });
    expect(resolveGraph([stage(1), stage(2, { max_parallel: 4 })])).toEqual({ ok: false, message: "stage 2 has max_parallel but no for_each" });
  });
});

describe("JSON Pointer (RFC 6901) and fan-out lists", () => {
  const doc = { foo: ["bar", "baz"], "": 0, "a/b": 1, "m~n": 8, nested: { list: [{ x: 1 }, { x: 2 }] } };

  it("resolves the RFC's examples, with ~1 and ~0 escapes and array indexes", () => {
    expect(resolvePointer(doc, "")).toEqual({ ok: true, value: doc });
    expect(resolvePointer(doc, "/foo")).toEqual({ ok: true, value: ["bar", "baz"] });
    expect(resolvePointer(doc, "/foo/0")).toEqual({ ok: true, value: "bar" });
    expect(resolvePointer(doc, "/")).toEqual({ ok: true, value: 0 });
    expect(resolvePointer(doc, "/a~1b")).toEqual({ ok: true, value: 1 });
    expect(resolvePointer(doc, "/m~0n")).toEqual({ ok: true, value: 8 });
    expect(resolvePointer(doc, "/nested/list/1/x")).toEqual({ ok: true, value: 2 });
  });

  it("says what is missing: an absent key, an index out of range or not a number", () => {
    expect(resolvePointer(doc, "/nope")).toMatchObject({ ok: false });
    expect(resolvePointer(doc, "/foo/2")).toMatchObject({ ok: false });
    expect(resolvePointer(doc, "/foo/01")).toMatchObject({ ok: false });
    expect(resolvePointer(doc, "foo")).toMatchObject({ ok: false });
  });

  it("a fan-out needs an array of at most max elements; an empty one is fine", () => {
    expect(fanOutItems(doc, "/nested/list", 2)).toEqual({ ok: true, items: [{ x: 1 }, { x: 2 }] });
    expect(fanOutItems({ items: [] }, "/items", 2)).toEqual({ ok: true, items: [] });
    expect(fanOutItems(doc, "/nested/list", 1)).toEqual({ ok: false, reason: 'for_each "/nested/list" gives 2 items, more than maxFanOutItems (1)' });
    expect(fanOutItems(doc, "/nested", 5)).toEqual({ ok: false, reason: 'for_each "/nested" points at object, not an array' });
    expect(fanOutItems({ n: null }, "/n", 5)).toEqual({ ok: false, reason: 'for_each "/n" points at null, not an array' });
  });
});

describe("ready stages, sinks and item slots", () => {
  it("a stage is ready when it is pending and every dependency completed", () => {
    const stages = [
      { stage_id: "stage_1", status: "completed" as const, depends_on: [] },
      { stage_id: "stage_2", status: "pending" as const, depends_on: ["stage_1"] },
      { stage_id: "stage_3", status: "processing" as const, depends_on: ["stage_1"] },
      { stage_id: "stage_4", status: "pending" as const, depends_on: ["stage_2", "stage_3"] },
      { stage_id: "stage_5", status: "pending" as const, depends_on: [] },
    ];
    expect(readyStages(stages).map((s) => s.stage_id)).toEqual(["stage_2", "stage_5"]);
    expect(sinks(stages).map((s) => s.stage_id)).toEqual(["stage_4", "stage_5"]);
  });

  it("items start up to max_parallel for the stage and within the execution's bound on running items", () => {
    expect(itemSlots(5, 0, 0, 100)).toBe(5);
    expect(itemSlots(5, 3, 3, 100)).toBe(2);
    expect(itemSlots(5, 5, 5, 100)).toBe(0);
    // Another fan-out stage of the execution already runs 98: two more in all.
    expect(itemSlots(5, 0, 98, 100)).toBe(2);
    expect(itemSlots(5, 0, 120, 100)).toBe(0);
    expect(itemIdFor("stage_3", 12)).toBe("stage_3.12");
  });
});
