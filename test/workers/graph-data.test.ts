import { env, exports } from "cloudflare:workers";
import { beforeEach, describe, expect, it } from "vitest";
import { DataReadError, type StageError } from "../../packages/worker-kit";
import { openRef } from "../../packages/worker-kit/data";
import type { DataReference } from "../../schemas/data";
import type { HandshakeRequest } from "../../schemas/worker-protocol";
import { call, ended, expectNoLiveReservations, mintToken, waitFor } from "../support/api";
import { TEST_TUNING } from "../support/constants";
import { type Gathered, deliverable as result, graphStats as stats, resetGraphStats, startGraph as start, stored } from "../support/graph";

/**
 * The pipeline graph with data passed by reference (fan-out over a stored
 * list, items' stored outputs in the fan-in) and the execution's bound on
 * running items across fan-outs side by side, on the graph granulator
 * instance (vitest.config.ts) whose counters see only these tests' jobs.
 */

/** What a stage receives for an output stored by reference (actors/execution/steps.ts, outputAsInput). */
interface RefSummary {
  $ref: string;
  size: number;
  contentType: string;
}

async function sha256Of(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A JSON output stored in KV, read back. */
async function kvJson(ref: DataReference): Promise<unknown> {
  expect(ref.kind).toBe("kv");
  return JSON.parse((await env.DATA_REFS.get(ref.key, "text"))!);
}

describe("pipeline graph with data by reference and the per-execution item bound", () => {
  beforeEach(async () => {
    await resetGraphStats();
  });

  it("a fan-out over a list stored by reference expands into its items, each with its own element", async () => {
    // Four entries of 20,000 characters each: the list (about 80 KB) is over the inline limit (64 KiB) and goes to KV.
    const id = await start("graph_fan_out", { items: 4, item_pad: 20_000, steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const rows = await stored(id);
    const listRef = rows.get("stage_1")!.ref!;
    expect(rows.get("stage_1")!.output).toBeNull();
    expect(listRef.key.startsWith(`kv/${id}/stage_1/`)).toBe(true);
    const list = (await kvJson(listRef)) as { items: { index: number; label: string; pad: string }[] };
    expect(list.items).toHaveLength(4);

    expect(doc.stages[1].items).toEqual({ total: 4, pending: 0, running: 0, completed: 4, failed: 0, cancelled: 0 });
    for (let i = 0; i < 4; i++) {
      const item = rows.get(`stage_2.${i}`)!;
      expect(item.ref).toBeNull();
      const out = JSON.parse(item.output!) as Gathered;
      expect(out.stage).toBe(`stage_2.${i}`);
      expect(out.item_index).toBe(i);
      // The element of the stored list at its position, whole.
      expect(out.item).toEqual({ index: i, label: `item ${i}`, pad: `${i}`.padEnd(20_000, "p") });
      expect(out.item).toEqual(list.items[i]);
      // Its inputs carry the list as the reference it is, not a copy.
      expect(out.inputs).toEqual({ stage_1: { $ref: listRef.key, size: listRef.size, contentType: "application/json" } });
    }
    expect((await stats()).started).toBe(6);
    await expectNoLiveReservations(id);
  });

  it("items' outputs stored by reference stay references in the fan-out's output and in the merge's inputs", async () => {
    // Each item's output is a 100,000-byte string: over the inline limit, so each is stored in KV on its own.
    const id = await start("graph_fan_out", { items: 3, steps: 1, step_ms: 0, output_bytes: 100_000, fault: { stage: 2, mode: "large_output" } });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const rows = await stored(id);
    const itemRefs = [0, 1, 2].map((i) => {
      const row = rows.get(`stage_2.${i}`)!;
      expect(row.output).toBeNull();
      expect(row.ref!.key.startsWith(`kv/${id}/stage_2.${i}/`)).toBe(true);
      return row.ref!;
    });
    expect(new Set(itemRefs.map((r) => r.key)).size).toBe(3);
    for (const ref of itemRefs) {
      const text = await kvJson(ref);
      expect(typeof text).toBe("string");
      expect((text as string).length).toBe(100_000);
    }
    const summaries: RefSummary[] = itemRefs.map((r) => ({ $ref: r.key, size: r.size, contentType: "application/json" }));

    // The fan-out stage's output: the three references in item order, small enough to stay inline (no copy of 300 KB).
    const fan = rows.get("stage_2")!;
    expect(fan.ref).toBeNull();
    expect(JSON.parse(fan.output!)).toEqual(summaries);
    expect(fan.output!.length).toBeLessThan(2_000);

    // The merge received exactly those references in its inputs.
    const merge = (await result(id)) as Gathered;
    expect(merge.stage).toBe("stage_3");
    expect(merge.inputs).toEqual({ stage_2: summaries });
    await expectNoLiveReservations(id);
  });

  it("a merge after a fan-out reads every item's stored output through its data token", async () => {
    // Each item's output (100,000 bytes) is stored on its own; the fan-out's output is the inline array of their references.
    const id = await start("graph_fan_out", { items: 3, steps: 1, step_ms: 0, output_bytes: 100_000, fault: { stage: 2, mode: "large_output" } });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const rows = await stored(id);
    expect(rows.get("stage_2")!.ref).toBeNull();
    const itemRefs = [0, 1, 2].map((i) => rows.get(`stage_2.${i}`)!.ref!);
    const merge = (await result(id)) as Gathered;
    expect(merge.stage).toBe("stage_3");
    // The merge read each item's bytes: the digests it computed are those of the bytes in KV.
    const expected: Record<string, { size: number; sha256: string }> = {};
    for (const ref of itemRefs) {
      const text = (await env.DATA_REFS.get(ref.key, "text"))!;
      expect(text.length).toBe(100_002); // the 100,000-character string, as JSON
      expected[ref.key] = { size: text.length, sha256: await sha256Of(text) };
    }
    expect(merge.read).toEqual(expected);
    expect(itemRefs.map((r) => r.sha256)).toEqual(Object.values(expected).map((e) => e.sha256));
    await expectNoLiveReservations(id);
  });

  it("a fan-in of two stored outputs reads both; its data token refuses a stored key that is not one of its inputs (403)", async () => {
    // Each stage's output is padded over the inline limit: stages 1, 2 and 3 are stored by reference.
    const pad = { stage_1: 70_000, stage_2: 70_000, stage_3: 70_000 };
    const id = await start("graph_diamond", { steps: 1, step_ms: 0, gather_pad: pad });
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const rows = await stored(id);
    const [one, two, three] = ["stage_1", "stage_2", "stage_3"].map((s) => rows.get(s)!.ref!);
    for (const ref of [one, two, three]) expect(ref.kind).toBe("kv");

    // Stage 2 names stage 1's reference in its own stored output (its inputs, as it received them).
    const second = (await kvJson(two)) as Gathered;
    expect(second.inputs).toEqual({ stage_1: { $ref: one.key, size: one.size, contentType: "application/json" } });

    const sink = (await result(id)) as Gathered;
    expect(sink.stage).toBe("stage_4");
    expect(sink.inputs).toEqual({
      stage_2: { $ref: two.key, size: two.size, contentType: "application/json" },
      stage_3: { $ref: three.key, size: three.size, contentType: "application/json" },
    });
    expect(sink.read).toEqual({
      // Both of its inputs, read in full...
      [two.key]: { size: two.size, sha256: await sha256Of((await env.DATA_REFS.get(two.key, "text"))!) },
      [three.key]: { size: three.size, sha256: await sha256Of((await env.DATA_REFS.get(three.key, "text"))!) },
      // ...and stage 1's output, found inside them but not an input of stage 4: the orchestrator refused it.
      [one.key]: { refused: 403 },
    });
    await expectNoLiveReservations(id);
  });

  it("the kit's openRef reads a stored input within its bounds: over maxBytes input_too_large, a body longer than the reference cut off, another key 403", async () => {
    const id = await start("graph_fan_out", { items: 3, steps: 1, step_ms: 0, output_bytes: 100_000, fault: { stage: 2, mode: "large_output" } });
    expect((await waitFor(id, ended, 30_000)).status).toBe("completed");
    const rows = await stored(id);
    const [a, b, c] = [0, 1, 2].map((i) => rows.get(`stage_2.${i}`)!.ref!);
    // The merge's data token, as the orchestrator would issue it; the real front Worker serves the reads.
    const dataToken = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" });
    const handshake = { executionId: id, stageId: "stage_3", attempt: 1, callback: { url: `http://orchestrator.test/executions/${id}/stages/stage_3`, token: "unused", dataToken } } as unknown as HandshakeRequest;
    const orchestrator = (exports as unknown as { default: Fetcher }).default;
    const summary = (r: DataReference) => ({ $ref: r.key, size: r.size, contentType: r.contentType });
    const bounds = { timeoutMs: 10_000, maxBytes: 1024 * 1024 };
    const failureOf = async (p: Promise<unknown>) => {
      try {
        await p;
      } catch (err) {
        return err as StageError & { status?: number };
      }
      throw new Error("expected the read to fail");
    };

    const text = await new Response(await openRef(orchestrator, handshake, summary(a), bounds)).text();
    expect(text).toBe((await env.DATA_REFS.get(a.key, "text"))!);

    const tooLarge = await failureOf(openRef(orchestrator, handshake, summary(b), { ...bounds, maxBytes: 1000 }));
    expect([tooLarge.code, tooLarge.retryable]).toEqual(["input_too_large", false]);

    // A reference that claims fewer bytes than the store holds: the read stops at once.
    const stream = await openRef(orchestrator, handshake, { ...summary(b), size: 10 }, bounds);
    const longer = await failureOf(new Response(stream).arrayBuffer());
    expect(longer).toBeInstanceOf(DataReadError);
    expect(longer.message).toContain("more than the 10 bytes expected");

    // Item 0's data token: item 2's output is no input of it.
    const itemToken = await mintToken({ executionId: id, stageId: "stage_2.0", attempt: 1, use: "data" });
    const ofItem = { ...handshake, stageId: "stage_2.0", callback: { ...handshake.callback, dataToken: itemToken } } as HandshakeRequest;
    const other = await failureOf(openRef(orchestrator, ofItem, summary(c), bounds));
    expect(other).toBeInstanceOf(DataReadError);
    expect([other.code, other.status]).toEqual(["data_unavailable", 403]);
  });

  it("an item's data token reads its own inputs only: not another item's output, not its own, not at another attempt; nor does another execution's", async () => {
    // Four entries of 20,000 characters: the list is stored (KV), and so is each item's 100,000-character output.
    const id = await start("graph_fan_out", { items: 4, item_pad: 20_000, steps: 1, step_ms: 0, output_bytes: 100_000, fault: { stage: 2, mode: "large_output" } });
    expect((await waitFor(id, ended, 30_000)).status).toBe("completed");
    const other = await start("graph_fan_out", { items: 1, steps: 1, step_ms: 0 });
    expect((await waitFor(other, ended, 30_000)).status).toBe("completed");
    const rows = await stored(id);
    const list = rows.get("stage_1")!.ref!;
    const [item0, item1] = [0, 1].map((i) => rows.get(`stage_2.${i}`)!.ref!);
    const token = (executionId: string, stageId: string, attempt = 1) => mintToken({ executionId, stageId, attempt, use: "data" });
    const read = async (key: string, t: string) => {
      const res = await call(`/data/${key}`, { headers: { authorization: `Bearer ${t}` } });
      return { status: res.status, body: res.status === 200 ? await res.text() : ((await res.json()) as { error: { code: string; message: string } }).error };
    };

    // Item 0's input is the fan-out's dependency's output: the stored list.
    const ofItem0 = await token(id, "stage_2.0");
    expect(await read(list.key, ofItem0)).toEqual({ status: 200, body: (await env.DATA_REFS.get(list.key, "text"))! });
    const refused = { status: 403, body: { code: "forbidden", message: "this token reads only the inputs of stage_2.0 (attempt 1)" } };
    expect(await read(item1.key, ofItem0)).toEqual(refused);
    expect(await read(item0.key, ofItem0)).toEqual(refused);
    // The item is at attempt 1: a token of attempt 2 reads nothing, not even the list.
    expect((await read(list.key, await token(id, "stage_2.0", 2))).status).toBe(403);
    // The merge's token reads item 1's output (an input of it), not the list (an input of the fan-out only).
    const ofMerge = await token(id, "stage_3");
    expect(await read(item1.key, ofMerge)).toEqual({ status: 200, body: (await env.DATA_REFS.get(item1.key, "text"))! });
    expect((await read(list.key, ofMerge)).status).toBe(403);
    // Genuine, live tokens of the same stages of another execution read none of this one's data.
    for (const stageId of ["stage_2.0", "stage_3"]) {
      const foreign = await token(other, stageId);
      for (const key of [list.key, item1.key]) expect((await read(key, foreign)).body).toMatchObject({ code: "forbidden" });
    }
  });

  it("two fan-outs side by side never run more items at once than maxRunningItems, though their max_parallel adds up to more", async () => {
    // max_parallel 5 + 5 = 10, within the worker's pool (10); the execution's bound is lower.
    expect(TEST_TUNING.maxRunningItems).toBe(6);
    const id = await start("graph_side_by_side", { items: 10, steps: 3, step_ms: 120 });
    const doc = await waitFor(id, ended, 60_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => [s.stage_id, s.depends_on])).toEqual([
      ["stage_1", []],
      ["stage_2", ["stage_1"]],
      ["stage_3", ["stage_1"]],
      ["stage_4", ["stage_2", "stage_3"]],
    ]);
    const s = await stats();
    expect(s.max_concurrent).toBe(TEST_TUNING.maxRunningItems);
    expect(s.completed).toBe(22);
    const merge = (await result(id)) as Gathered;
    expect((merge.inputs.stage_2 as Gathered[]).map((o) => o.stage)).toEqual(Array.from({ length: 10 }, (_, i) => `stage_2.${i}`));
    expect((merge.inputs.stage_3 as Gathered[]).map((o) => o.stage)).toEqual(Array.from({ length: 10 }, (_, i) => `stage_3.${i}`));
    await expectNoLiveReservations(id);
  });
});
