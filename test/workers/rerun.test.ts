import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { call, ended, executionStub, fireAlarm, JSON_HEADERS, KAM, OPS, rpcThrough, stagesReserved, startExecution, status, waitFor } from "../support/api";
import { waitForEvents } from "../support/kam-events";

/** Makes the execution's retention due and fires its alarm (as retention.test.ts does). */
async function expire(id: string): Promise<void> {
  await runInDurableObject(executionStub(id), (_i, state) => state.storage.sql.exec("UPDATE timers SET due_at = 0 WHERE name = 'retention'"));
  await fireAlarm(id);
}

const rerun = (id: string, body: unknown, headers: Record<string, string> = KAM) =>
  call(`/executions/${id}/rerun`, { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: JSON.stringify(body) });

async function result(id: string): Promise<unknown> {
  return ((await (await call(`/executions/${id}/result`, { headers: KAM })).json()) as { output: unknown }).output;
}

/** An original that failed at stage 2 of 2 (a permanent worker failure) after stage 1 completed with `echo`. */
async function failedAtStage2(client: string): Promise<StatusDocument> {
  const { body } = await startExecution({
    template_name: "fault_two_stage",
    parameters: { echo: { chapter: "one" }, fault: { stage: 2, mode: "fail" } },
    client_id: client,
  });
  const doc = await waitFor(body.execution_id, ended);
  expect(doc.status).toBe("failed");
  expect(doc.stages.map((s) => s.status)).toEqual(["completed", "failed"]);
  return doc;
}

describe("rerun from a stage", () => {
  it("runs the original's template snapshot even after KAM changed the template: KAM is not asked again", async () => {
    // revised{k}_fault_two_stage: KAM answers revision n on the n-th fetch of any k; from revision 2 on it has
    // a third stage. Each k is its own name, so the orchestrator's template cache never answers for another.
    const start = (k: number, parameters: Record<string, unknown>) => startExecution({ template_name: `revised${k}_fault_two_stage`, parameters, client_id: "client_rerun_revised" });
    const original = await waitFor((await start(1, { echo: { chapter: "one" }, fault: { stage: 2, mode: "fail" } })).body.execution_id, ended);
    expect(original).toMatchObject({ status: "failed", template_id: "mt_fault_002_r1", template_source: "kam" });
    expect(original.stages).toHaveLength(2);

    // KAM has changed the template since: a new start gets revision 2, with three stages.
    const changed = await waitFor((await start(2, { echo: { chapter: "two" } })).body.execution_id, ended);
    expect(changed).toMatchObject({ status: "completed", template_id: "mt_fault_002_r2", template_source: "kam" });
    expect(changed.stages).toHaveLength(3);

    // The rerun runs the original's two stages as they were.
    const res = await rerun(original.execution_id, { parameters: { echo: { chapter: "one" } } });
    expect(res.status).toBe(202);
    const doc = await waitFor(((await res.json()) as { execution_id: string }).execution_id, ended);
    expect(doc).toMatchObject({ status: "completed", template_id: "mt_fault_002_r1", template_source: "snapshot", rerun_of: original.execution_id });
    expect(doc.stages.map((s) => s.stage_id)).toEqual(["stage_1", "stage_2"]);
    expect(doc.stages[0]).toMatchObject({ reused_from: original.execution_id, attempts: 0 });
    // KAM's next answer is revision 3: the rerun did not fetch the template.
    expect((await waitFor((await start(3, { echo: { chapter: "three" } })).body.execution_id, ended)).template_id).toBe("mt_fault_002_r3");
  });

  it("reruns from the failed stage: the completed stage is reused (not handshaked, no cost), the output is right, both link", async () => {
    const original = await failedAtStage2("client_rerun");
    const res = await rerun(original.execution_id, { parameters: { echo: { chapter: "ignored: stage 1 is reused" } } });
    expect(res.status).toBe(202);
    const started = (await res.json()) as Record<string, any>;
    expect(started).toMatchObject({ rerun_of: original.execution_id, from_stage: "stage_2", reused: ["stage_1"] });
    expect(started.execution_id).not.toBe(original.execution_id);

    const doc = await waitFor(started.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.rerun_of).toBe(original.execution_id);
    expect(doc.template_source).toBe("snapshot");
    expect(doc.template_id).toBe(original.template_id);
    expect(doc.client_id).toBe(original.client_id);
    expect(doc.priority).toBe(original.priority);
    expect(doc.stages[0]).toMatchObject({ status: "completed", reused_from: original.execution_id, attempts: 0, usage: {}, cost: 0 });
    expect(doc.stages[1]).toMatchObject({ status: "completed", attempts: 1 });
    expect(doc.stages[1].reused_from).toBeUndefined();
    // Stage 1 never reached the ledger or a worker in the rerun: only stage 2 was reserved (and so handshaked).
    expect(await stagesReserved(doc.execution_id)).toEqual(["stage_2"]);
    expect(Object.keys(doc.cost!.by_stage).filter((s) => doc.cost!.by_stage[s] > 0)).not.toContain("stage_1");
    // Stage 1's output, taken over, went through stage 2 (echo) to the result.
    expect(await result(doc.execution_id)).toEqual({ chapter: "one" });
    // The original lists its rerun (told through the outbox).
    const old = await waitFor(original.execution_id, (d) => d.reruns.length === 1);
    expect(old.reruns).toEqual([doc.execution_id]);
    expect(old.rerun_of).toBeNull();
  });

  it("reruns a completed execution with new parameters, from the first stage by default or from a chosen one", async () => {
    const { body } = await startExecution({ template_name: "fault_two_stage", parameters: { echo: "first" }, client_id: "client_rerun" });
    const original = await waitFor(body.execution_id, ended);
    expect(original.status).toBe("completed");

    const all = (await (await rerun(original.execution_id, { parameters: { echo: "second" } })).json()) as Record<string, any>;
    expect(all).toMatchObject({ from_stage: "stage_1", reused: [] });
    const a = await waitFor(all.execution_id, ended);
    expect(a.stages.map((s) => [s.status, s.attempts, s.reused_from ?? null])).toEqual([
      ["completed", 1, null],
      ["completed", 1, null],
    ]);
    expect(await result(a.execution_id)).toBe("second");

    const part = (await (await rerun(original.execution_id, { from_stage: "stage_2", parameters: { echo: "third" } }, OPS)).json()) as Record<string, any>;
    expect(part).toMatchObject({ from_stage: "stage_2", reused: ["stage_1"] });
    const b = await waitFor(part.execution_id, ended);
    // Stage 1 is the original's ("first"); only stage 2 ran again.
    expect(await result(b.execution_id)).toBe("first");
    const old = await waitFor(original.execution_id, (d) => d.reruns.length === 2);
    expect(old.reruns).toEqual([b.execution_id, a.execution_id]);
    // The index filters on rerun_of (newest first), and its rows carry the link.
    const list = (await (await call(`/executions?rerun_of=${original.execution_id}`, { headers: OPS })).json()) as { items: { execution_id: string; rerun_of: string | null }[] };
    expect(list.items.map((i) => [i.execution_id, i.rerun_of])).toEqual([
      [b.execution_id, original.execution_id],
      [a.execution_id, original.execution_id],
    ]);
    const bad = await call("/executions?rerun_of=nope", { headers: OPS });
    expect(bad.status).toBe(400);
  });

  it("reruns a cancelled execution: the original's client, priority and notify, the cancelled stage and those after it run again", async () => {
    // Stage 2 hangs until cancelled; the original runs at priority high with notify on.
    const { body } = await startExecution({
      template_name: "fault_two_stage",
      parameters: { echo: "kept", fault: { stage: 2, mode: "hang" } },
      client_id: "client_rerun_cancel",
      priority: "high",
      notify: true,
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[1].status === "processing");
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
    const original = await waitFor(id, ended);
    expect(original.stages.map((s) => s.status)).toEqual(["completed", "cancelled"]);

    // The rerun's own parameters leave out the fault; stage 1 is reused, so its output is still "kept".
    const res = await rerun(id, { parameters: { echo: "not used" } });
    expect(res.status).toBe(202);
    const started = (await res.json()) as Record<string, any>;
    expect(started).toMatchObject({ rerun_of: id, from_stage: "stage_2", reused: ["stage_1"] });
    const doc = await waitFor(started.execution_id, ended);
    expect(doc).toMatchObject({ status: "completed", rerun_of: id, client_id: "client_rerun_cancel", priority: "high", template_source: "snapshot" });
    expect(doc.notifications.enabled).toBe(true);
    expect(doc.stages.map((s) => [s.status, s.reused_from ?? null, s.attempts])).toEqual([
      ["completed", id, 0],
      ["completed", null, 1],
    ]);
    expect(await result(doc.execution_id)).toBe("kept");
    // The original's notify carried over: KAM hears of the rerun's end.
    const got = await waitForEvents(doc.execution_id, (r) => r.events.length === 1);
    expect(got.events.map((e) => [e.type, e.execution_id])).toEqual([["execution.completed", doc.execution_id]]);
  });

  it("on a pipeline graph, reuses every stage from_stage does not depend on, directly or through others", async () => {
    // The diamond: 1 -> 2 and 3 -> 4. From stage 2: 1 and 3 are reused, 2 and 4 (which depends on 2) run again.
    const { body } = await startExecution({ template_name: "graph_diamond", parameters: { steps: 1, step_ms: 5 }, client_id: "client_rerun" });
    const original = await waitFor(body.execution_id, ended);
    expect(original.status).toBe("completed");
    const started = (await (await rerun(original.execution_id, { from_stage: "stage_2" })).json()) as Record<string, any>;
    expect(started).toMatchObject({ from_stage: "stage_2", reused: ["stage_1", "stage_3"] });
    const doc = await waitFor(started.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => [s.stage_id, s.reused_from ?? null, s.depends_on])).toEqual([
      ["stage_1", original.execution_id, []],
      ["stage_2", null, ["stage_1"]],
      ["stage_3", original.execution_id, ["stage_1"]],
      ["stage_4", null, ["stage_2", "stage_3"]],
    ]);
    expect((await stagesReserved(doc.execution_id)).sort()).toEqual(["stage_2", "stage_4"]);
    expect(await result(doc.execution_id)).toEqual(await result(original.execution_id));
  });

  it("a reused fan-out keeps its items: the original's counts, its items listed as reused, their stored outputs read by the rerun's merge", async () => {
    // Each item's output (100,000 bytes) is stored by reference; the fan-out's own output is their inline array.
    const { body } = await startExecution({
      template_name: "graph_fan_out",
      parameters: { items: 3, steps: 1, step_ms: 0, output_bytes: 100_000, fault: { stage: 2, mode: "large_output" } },
      client_id: "client_rerun_items",
    });
    const original = await waitFor(body.execution_id, ended, 30_000);
    expect(original.status).toBe("completed");
    const counts = { total: 3, pending: 0, running: 0, completed: 3, failed: 0, cancelled: 0 };
    expect(original.stages[1].items).toEqual(counts);

    const started = (await (await rerun(original.execution_id, { from_stage: "stage_3" })).json()) as Record<string, any>;
    expect(started.reused).toEqual(["stage_1", "stage_2"]);
    const doc = await waitFor(started.execution_id, ended, 30_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[1]).toMatchObject({ stage_id: "stage_2", status: "completed", reused_from: original.execution_id, items: counts, cost: 0 });

    const page = (await (await call(`/executions/${doc.execution_id}/stages/stage_2/items`, { headers: OPS })).json()) as { total: number; items: any[] };
    expect(page.total).toBe(3);
    expect(page.items.map((i) => [i.stage_id, i.item_index, i.status, i.reused_from, i.attempts, i.usage, i.cost])).toEqual(
      [0, 1, 2].map((i) => [`stage_2.${i}`, i, "completed", original.execution_id, 0, {}, 0]),
    );
    // Only the merge ran again, and it read the original's stored item outputs with its own data token.
    expect(await stagesReserved(doc.execution_id)).toEqual(["stage_3"]);
    const keys = (await env.DATA_REFS.list({ prefix: `kv/${original.execution_id}/stage_2.` })).keys.map((k) => k.name).sort();
    expect(keys).toHaveLength(3);
    const merge = (await result(doc.execution_id)) as { stage: string; read: Record<string, { size: number }> };
    expect(merge.stage).toBe("stage_3");
    expect(Object.keys(merge.read).sort()).toEqual(keys);
    for (const key of keys) expect(merge.read[key].size).toBe(100_002);

    // The original's retention waits for the rerun: its items' data is held like a stored stage output.
    await expire(original.execution_id);
    expect((await status(original.execution_id)).data_expired_at).toBeNull();
    expect(await env.DATA_REFS.get(keys[0])).not.toBeNull();
  });

  it("takes a stored output over by reference, and the original keeps it until the rerun's own data expires", async () => {
    const size = 700 * 1024;
    const { body } = await startExecution({
      template_name: "data_relay",
      parameters: { steps: 1, step_ms: 0, output_bytes: size, fault: { stage: 1, mode: "large_output" } },
      client_id: "client_rerun_data",
    });
    const original = await waitFor(body.execution_id, ended, 30_000);
    expect(original.status).toBe("completed");
    // Stored under a key of its own (attempt, nonce, name).
    const key = (await env.DATA.list({ prefix: `r2/${original.execution_id}/stage_1/a1-` })).objects.map((o) => o.key)[0];
    expect(await env.DATA.head(key)).not.toBeNull();

    const started = (await (await rerun(original.execution_id, { from_stage: "stage_2" })).json()) as Record<string, any>;
    expect(started.reused).toEqual(["stage_1"]);
    const doc = await waitFor(started.execution_id, ended, 30_000);
    expect(doc.status).toBe("completed");
    // Stage 2 of the rerun read the original's object (same key, nothing copied) with its own data token.
    const r2Keys = async (id: string) => (await env.DATA.list({ prefix: `r2/${id}/` })).objects.map((o) => o.key);
    const own = await r2Keys(doc.execution_id);
    expect(own).toHaveLength(1);
    expect(own[0]).toMatch(new RegExp(`^r2/${doc.execution_id}/stage_2/a1-[A-Za-z0-9]{12}-output\\.json$`));
    const mine = (await (await call(`/executions/${doc.execution_id}/result`, { headers: KAM })).json()) as { output_reference: { sha256: string } };
    const theirs = (await (await call(`/executions/${original.execution_id}/result`, { headers: KAM })).json()) as { output_reference: { sha256: string } };
    expect(mine.output_reference.sha256).toBe(theirs.output_reference.sha256);

    // The original's retention comes due while the rerun holds its data: nothing is deleted.
    await expire(original.execution_id);
    expect((await status(original.execution_id)).data_expired_at).toBeNull();
    expect(await env.DATA.head(key)).not.toBeNull();
    // The rerun's retention: its data goes, it lets go of the original's, and the original's waiting retention runs.
    await expire(doc.execution_id);
    expect((await status(doc.execution_id)).data_expired_at).not.toBeNull();
    const gone = await waitFor(original.execution_id, (d) => d.data_expired_at !== null);
    expect(gone.data_expired_at).not.toBeNull();
    expect(await env.DATA.head(key)).toBeNull();
  });

  it("is idempotent with a request_id, like POST /execute", async () => {
    const original = await failedAtStage2("client_rerun_idem");
    const first = await rerun(original.execution_id, { request_id: "rerun-1" });
    expect(first.status).toBe(202);
    const a = (await first.json()) as Record<string, any>;
    const second = await rerun(original.execution_id, { request_id: "rerun-1" });
    expect(second.status).toBe(200);
    expect(((await second.json()) as Record<string, any>).execution_id).toBe(a.execution_id);
    const other = await rerun(original.execution_id, { request_id: "rerun-1", parameters: { echo: "other" } });
    expect(other.status).toBe(409);
    expect(((await other.json()) as any).error).toMatchObject({ code: "idempotency_conflict", details: { execution_id: a.execution_id } });
    await waitFor(a.execution_id, ended);
    const old = await waitFor(original.execution_id, (d) => d.reruns.length === 1);
    expect(old.reruns).toEqual([a.execution_id]);
    // KAM's RPC rerun(id, request) answers the same.
    const rpc = await rpcThrough("kam", "rerun", original.execution_id);
    expect(rpc).toMatchObject({ called: true, value: { ok: true, status: 202, data: { rerun_of: original.execution_id } } });
  });

  it("refuses a running execution (not_terminal), an unknown stage (400), bad bodies, no rights, and expired data (410); nothing is created", async () => {
    const running = await startExecution({ template_name: "quick_summary", parameters: { steps: 30, step_ms: 100 }, client_id: "client_rerun_bad" });
    const runId = running.body.execution_id as string;
    await waitFor(runId, (d) => d.status === "running");
    const notTerminal = await rerun(runId, {});
    expect(notTerminal.status).toBe(409);
    expect(((await notTerminal.json()) as any).error).toMatchObject({ code: "not_terminal", details: { status: "running" } });
    await call(`/executions/${runId}/pause`, { method: "POST", headers: OPS });
    expect(((await (await rerun(runId, {})).json()) as any).error.code).toBe("not_terminal");
    await call(`/executions/${runId}/cancel`, { method: "POST", headers: OPS });

    const original = await failedAtStage2("client_rerun_bad");
    const id = original.execution_id;
    const cases: [string, Promise<Response>, number, string, string?][] = [
      ["unknown stage", rerun(id, { from_stage: "stage_9" }), 400, "invalid_request", "from_stage"],
      ["not a stage id", rerun(id, { from_stage: "three" }), 400, "invalid_request", "from_stage"],
      ["unknown field", rerun(id, { priority: "high" }), 400, "invalid_request"],
      ["parameters not an object", rerun(id, { parameters: [1] }), 400, "invalid_request", "parameters"],
      ["unknown execution", rerun("exec_1700000000000_AAAAAAAAAAAAAAAA", {}), 404, "not_found"],
      ["no token", rerun(id, {}, {}), 401, "unauthorized"],
    ];
    for (const [name, pending, code, errorCode, field] of cases) {
      const res = await pending;
      expect(res.status, name).toBe(code);
      const body = (await res.json()) as any;
      expect(body.error.code, name).toBe(errorCode);
      if (field) expect(JSON.stringify(body.error.details), name).toContain(field);
    }
    // Retention deleted the original's data: its outputs cannot be reused.
    await expire(id);
    expect((await status(id)).data_expired_at).not.toBeNull();
    const expired = await rerun(id, {});
    expect(expired.status).toBe(410);
    expect(((await expired.json()) as any).error.code).toBe("data_expired");
    expect((await status(id)).reruns).toEqual([]);
    const list = (await (await call("/executions?client_id=client_rerun_bad", { headers: OPS })).json()) as { items: { execution_id: string }[] };
    expect(list.items.map((i) => i.execution_id).sort()).toEqual([id, runId].sort());
  });
});
