import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { parseTemplate } from "../../src/template-source";
import { call, ended, fireAlarm, JSON_HEADERS, KAM, OPS, rpcThrough, stagesReserved, startExecution, status, waitFor } from "../support/api";
import { waitForEvents } from "../support/kam-events";

const decide = (id: string, stage: string, action: string, body: unknown, headers: Record<string, string> = OPS) =>
  call(`/executions/${id}/stages/${stage}/${action}`, { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: body === undefined ? undefined : JSON.stringify(body) });

async function awaiting(template: string, client = "client_approval", notify = false): Promise<{ id: string; doc: StatusDocument }> {
  const { body } = await startExecution({ template_name: template, parameters: { echo: { draft: "v1" } }, client_id: client, notify });
  const id = body.execution_id as string;
  const doc = await waitFor(id, (d) => d.stages[1]?.status === "awaiting_approval");
  return { id, doc };
}

describe("approval stages", () => {
  it("waits for approval without a worker or a reservation; approve passes the output on and the pipeline completes", async () => {
    const { id, doc } = await awaiting("approval_pipeline", "kam-flaky-1-approval", true);
    expect(doc.status).toBe("running");
    expect(doc.stages[1]).toMatchObject({ stage_id: "stage_2", type: "approval", status: "awaiting_approval", worker: "", attempts: 1, usage: null });
    expect(doc.stages[2]).toMatchObject({ status: "pending", attempts: 0 });
    // It reserves nothing: only stage 1 ever held a reservation.
    expect(await stagesReserved(id)).toEqual(["stage_1"]);

    const res = await decide(id, "stage_2", "approve", { comment: "looks right" }, KAM);
    expect(res.status).toBe(200);
    const after = (await res.json()) as StatusDocument;
    expect(after.stages[1]).toMatchObject({ status: "completed", usage: {}, cost: 0, decision: { approved: true, by: "kam", comment: "looks right" } });
    expect(Date.parse(after.stages[1].decision!.at)).toBeGreaterThan(0);

    const end = await waitFor(id, ended);
    expect(end.status).toBe("completed");
    const result = (await (await call(`/executions/${id}/result`, { headers: KAM })).json()) as { output: unknown };
    expect(result.output).toEqual({ draft: "v1" });
    // A second decision: the stage is no longer awaiting one.
    const again = await decide(id, "stage_2", "reject", {});
    expect(again.status).toBe(409);
    expect(((await again.json()) as any).error).toMatchObject({ code: "not_awaiting_approval", details: { stage_status: "completed" } });

    const got = await waitForEvents(id, (r) => r.events.length === 2);
    expect(got.events.map((e) => [e.type, e.stage_id ?? null])).toEqual([
      ["stage.awaiting_approval", "stage_2"],
      ["execution.completed", null],
    ]);
  });

  it("an approval with several dependencies passes on their outputs as `inputs`, stage id -> output", async () => {
    const { body } = await startExecution({ template_name: "approval_join", parameters: { echo: { draft: "v1" }, items: 2 }, client_id: "client_approval" });
    const id = body.execution_id as string;
    const doc = await waitFor(id, (d) => d.stages[2]?.status === "awaiting_approval");
    expect(doc.stages.map((s) => [s.stage_id, s.status, s.depends_on])).toEqual([
      ["stage_1", "completed", []],
      ["stage_2", "completed", []],
      ["stage_3", "awaiting_approval", ["stage_1", "stage_2"]],
      ["stage_4", "pending", ["stage_3"]],
    ]);
    expect((await decide(id, "stage_3", "approve", {})).status).toBe(200);
    expect((await waitFor(id, ended)).status).toBe("completed");
    // Stage 4 echoes what the approval passed on: both outputs, by stage id.
    const result = (await (await call(`/executions/${id}/result`, { headers: KAM })).json()) as { output: unknown };
    expect(result.output).toEqual({
      stage_1: { draft: "v1" },
      stage_2: { items: [{ index: 0, label: "item 0" }, { index: 1, label: "item 1" }], count: 2 },
    });
  });

  it("through an approval with several stored dependencies, the next stage reads each of them (its data token lists their keys)", async () => {
    // Stage 1 echoes 70,000 characters and stage 2 lists two 40,000-character entries: both over the inline limit, stored in KV.
    const text = "e".repeat(70_000);
    const { body } = await startExecution({ template_name: "approval_join", parameters: { echo: text, items: 2, item_pad: 40_000 }, client_id: "client_approval" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[2]?.status === "awaiting_approval");
    expect((await decide(id, "stage_3", "approve", {})).status).toBe(200);
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    // Stage 4's echo read both references the approval passed on and returned their values, whole.
    const content = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(content.status).toBe(200);
    const output = (await content.json()) as { stage_1: string; stage_2: { items: { index: number; pad: string }[]; count: number } };
    expect(Object.keys(output).sort()).toEqual(["stage_1", "stage_2"]);
    expect(output.stage_1).toBe(text);
    expect(output.stage_2.count).toBe(2);
    expect(output.stage_2.items.map((i) => i.pad)).toEqual(["0".padEnd(40_000, "p"), "1".padEnd(40_000, "p")]);
  });

  it("reject fails the execution with approval_rejected, naming the stage, with the comment", async () => {
    const { id } = await awaiting("approval_pipeline");
    const res = await decide(id, "stage_2", "reject", { comment: "wrong tone" });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as StatusDocument;
    expect(doc.status).toBe("failed");
    expect(doc.error).toEqual({ code: "approval_rejected", message: "stage_2 was rejected by ops: wrong tone", stage_id: "stage_2" });
    expect(doc.stages.map((s) => s.status)).toEqual(["completed", "failed", "cancelled"]);
    expect(doc.stages[1].decision).toMatchObject({ approved: false, by: "ops", comment: "wrong tone" });
  });

  it("no decision within timeout_ms: approval_timeout", async () => {
    const { id } = await awaiting("approval_short");
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "approval_timeout", stage_id: "stage_2" });
    expect(doc.stages[1]).toMatchObject({ status: "failed", error: { code: "approval_timeout" } });
    expect(doc.stages[1].decision).toBeUndefined();
  });

  it("a paused execution can be approved; the next stage starts on resume", async () => {
    const { id } = await awaiting("approval_pipeline");
    expect((await call(`/executions/${id}/pause`, { method: "POST", headers: OPS })).status).toBe(200);
    const res = await decide(id, "stage_2", "approve", undefined);
    expect(res.status).toBe(200);
    const doc = (await res.json()) as StatusDocument;
    expect(doc.status).toBe("paused");
    expect(doc.stages.map((s) => [s.status, s.attempts])).toEqual([
      ["completed", 1],
      ["completed", 1],
      ["pending", 0],
    ]);
    expect(doc.stages[1].decision).toMatchObject({ approved: true, by: "ops", comment: null });
    // A drive pass (the alarm) after the decision finds stage 3 ready and does not start it while paused.
    await fireAlarm(id);
    const still = await status(id);
    expect(still.status).toBe("paused");
    expect(still.stages[2]).toMatchObject({ status: "pending", attempts: 0 });
    expect(await stagesReserved(id)).toEqual(["stage_1"]);
    expect((await call(`/executions/${id}/resume`, { method: "POST", headers: OPS })).status).toBe(200);
    const end = await waitFor(id, ended);
    expect(end.status).toBe("completed");
    expect(end.stages[2]).toMatchObject({ status: "completed", attempts: 1 });
  });

  it("a template's approval stage takes no worker, resources or for_each, and a timeout_ms of 1 s to 30 days", () => {
    const template = (approval: Record<string, unknown>) =>
      parseTemplate({
        template_id: "mt_t",
        template_name: "t",
        pipeline_stages: [{ stage: 1, worker: "bitware-content-granulator", template_ref: "v1", action: "echo" }, { stage: 2, type: "approval", ...approval }],
      });
    expect(template({ timeout_ms: 1_000, depends_on: [1] })).toMatchObject({ stages: [{ stage: 1 }, { stage: 2, type: "approval", timeout_ms: 1_000 }] });
    for (const bad of [
      { worker: "bitware-content-granulator", template_ref: "v1" },
      { resources: { "tokens:openai": 10 } },
      { for_each: "/items" },
      { timeout_ms: 999 },
      { timeout_ms: 30 * 24 * 3600 * 1000 + 1 },
    ]) {
      expect(typeof template(bad), JSON.stringify(bad)).toBe("string");
    }
  });

  it("refuses bad decisions with a code and the offending field, and changes nothing", async () => {
    const { id, doc } = await awaiting("approval_pipeline");
    const cases: [string, Promise<Response>, number, string][] = [
      ["comment over 2,000 characters", decide(id, "stage_2", "approve", { comment: "x".repeat(2_001) }), 400, "invalid_request"],
      ["unknown field", decide(id, "stage_2", "approve", { approved: true }), 400, "invalid_request"],
      ["a worker stage", decide(id, "stage_1", "approve", {}), 409, "not_awaiting_approval"],
      ["a stage that does not exist", decide(id, "stage_9", "approve", {}), 404, "not_found"],
      ["not a stage id", decide(id, "nope", "approve", {}), 400, "invalid_request"],
      ["no token", decide(id, "stage_2", "approve", {}, {}), 401, "unauthorized"],
      ["a wrong token", decide(id, "stage_2", "reject", {}, { authorization: "Bearer nope" }), 401, "unauthorized"],
    ];
    for (const [name, pending, code, errorCode] of cases) {
      const res = await pending;
      expect(res.status, name).toBe(code);
      const body = (await res.json()) as any;
      expect(body.error.code, name).toBe(errorCode);
      if (name.startsWith("comment")) expect(JSON.stringify(body.error.details)).toContain("comment");
      if (name === "not a stage id") expect(body.error.details.map((d: { path: string }) => d.path)).toEqual(["stage_id"]);
    }
    const now = await status(id);
    expect(now.stages[1]).toMatchObject({ status: "awaiting_approval", attempts: 1 });
    expect(now.stages[1].decision).toBeUndefined();
    expect(now.status).toBe(doc.status);
    // KAM's RPC approve(id, stage_id) validates like the route: no stage id, 400.
    const rpc = await rpcThrough("kam", "approve", id);
    expect(rpc).toMatchObject({ called: true, value: { ok: false, status: 400, error: { code: "invalid_request" } } });
    await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
  });
});
