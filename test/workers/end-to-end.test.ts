import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { EXECUTION_ID_RE } from "../../schemas/common";
import { KAM, OPS, call, ended, executionStub, expectNoLiveReservations, fireAlarm, rpcThrough, startExecution, status, waitFor, waitForLedger } from "../support/api";

const fast = { topic: "React", targetAudience: "beginners", steps: 2, step_ms: 5 };

describe("an execution runs every stage over the worker protocol", () => {
  it("course_creation reaches completed with usage, cost and the last stage's output", async () => {
    const { res, body } = await startExecution({ template_name: "course_creation", parameters: fast, client_id: "client_e2e" });
    expect(res.status).toBe(202);
    expect(body.execution_id).toMatch(EXECUTION_ID_RE);
    expect(body.status_url).toBe(`http://orchestrator.test/executions/${body.execution_id}`);
    expect(body.estimated_completion_ms).toBeGreaterThan(0);
    expect(Date.parse(body.estimated_completion_at)).toBeGreaterThan(Date.now() - 1000);

    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.template_id).toBe("mt_course_001");
    expect(doc.stages.map((s) => [s.stage_id, s.status, s.attempts])).toEqual([
      ["stage_1", "completed", 1],
      ["stage_2", "completed", 1],
      ["stage_3", "completed", 1],
    ]);
    for (const s of doc.stages) {
      expect(s.progress).toBe(100);
      expect(s.usage?.["tokens:openai"]).toBeGreaterThan(0);
      expect(s.started_at && s.completed_at).toBeTruthy();
    }
    expect(doc.cost?.total).toBeGreaterThan(0);
    expect(doc.cost?.currency).toBe("USD");
    expect(doc.cost?.by_pool["tokens:openai"]).toBeGreaterThan(0);
    expect(Object.keys(doc.cost?.by_stage ?? {})).toEqual(["stage_1", "stage_2", "stage_3"]);

    const result = await call(`/executions/${body.execution_id}/result`, { headers: KAM });
    expect(result.status).toBe(200);
    const r = (await result.json()) as { output: { summary: string; sections: unknown } ; cost: unknown };
    expect(typeof r.output.summary).toBe("string");
    expect(r.cost).toEqual(doc.cost);
  });

  it("passes each stage's output to the next as previousOutput", async () => {
    const { body } = await startExecution({ template_name: "array_stages", parameters: { ...fast, modules: 3 }, client_id: "client_e2e" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    const r = (await (await call(`/executions/${body.execution_id}/result`, { headers: KAM })).json()) as { output: { sections: number } };
    // The summary stage counts the chapters the chapters stage wrote from the outline's three modules.
    expect(r.output.sections).toBe(3);
  });

  it("fails an unknown template with template_not_found", async () => {
    const { res, body } = await startExecution({ template_name: "no_such_template", parameters: {}, client_id: "client_e2e" });
    expect(res.status).toBe(202);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("template_not_found");
  });

  it("fails a malformed template with invalid_template and the reason", async () => {
    const { body } = await startExecution({ template_name: "broken_template", parameters: {}, client_id: "client_e2e" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("invalid_template");
    expect(doc.error?.message).toContain("pipeline_stages");
  });

  it("fails a stage whose worker has no binding with worker_not_bound, and gives its slot back", async () => {
    const { body } = await startExecution({ template_name: "unbound_worker", parameters: {}, client_id: "client_e2e" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "worker_not_bound", stage_id: "stage_1" });
    // The slot was granted before the handshake found no binding; the release reaches the ledger through the outbox.
    const snap = await waitForLedger((s) => (s.pools.find((p) => p.name === "worker:bitware-not-deployed")?.in_use ?? -1) === 0);
    expect(snap.pools.find((p) => p.name === "worker:bitware-not-deployed")?.in_use).toBe(0);
  });

  it("serves the same work over KAM's RPC binding (entrypoint KamApi), with the same validation", async () => {
    const bad = await rpcThrough("kam", "execute", { template_name: "course_creation", client_id: "c" });
    expect(bad).toMatchObject({ called: true, value: { ok: false, status: 400, error: { code: "invalid_request" } } });
    expect(JSON.stringify(bad.called && bad.value.error.details)).toContain("parameters");

    const ok = await rpcThrough("kam", "execute", { template_name: "quick_summary", parameters: fast, client_id: "client_rpc" });
    expect(ok).toMatchObject({ called: true, value: { ok: true, status: 202 } });
    const id = (ok.called && ok.value.data.execution_id) as string;
    await waitFor(id, ended);
    expect(await rpcThrough("kam", "getStatus", id)).toMatchObject({ called: true, value: { ok: true, data: { status: "completed", execution_id: id } } });
    expect(await rpcThrough("kam", "getResult", id)).toMatchObject({ called: true, value: { ok: true, data: { status: "completed", execution_id: id } } });
    expect(await rpcThrough("kam", "cancel", id)).toMatchObject({ called: true, value: { ok: false, status: 409, error: { code: "already_terminal" } } });
    expect(await rpcThrough("kam", "getStatus", "exec_nope")).toMatchObject({ called: true, value: { ok: false, status: 400 } });
  });

  it("refuses every RPC method through a stage worker's binding (the default entrypoint serves fetch only)", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_rpc" });
    const id = body.execution_id as string;
    await waitFor(id, ended);
    const before = await status(id);
    for (const [method, arg] of [
      ["execute", { template_name: "quick_summary", parameters: fast, client_id: "client_rpc_worker" }],
      ["getStatus", id],
      ["getResult", id],
      ["cancel", id],
      ["pause", id],
      ["resume", id],
    ] as const) {
      const answer = await rpcThrough("worker", method, arg);
      expect(answer.called, `${method} through a worker's binding`).toBe(false);
      expect(answer.called === false && answer.error).toContain(method);
    }
    // Nothing was started or changed: the index has no execution of that client, the execution is as it was.
    const list = await call("/executions?client_id=client_rpc_worker", { headers: OPS });
    expect(((await list.json()) as { items: unknown[] }).items).toEqual([]);
    expect(await status(id)).toEqual(before);
    // The same binding still reaches the HTTP API (callbacks and data routes use it).
    expect(await rpcThrough("worker", "fetch", "http://orchestrator.test/health")).toMatchObject({ called: true });
  });

  it("an ended execution's delivered outbox rows are deleted by its alarm, which fires anyway, not in a commit of their own, and nothing is sent twice", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_e2e_outbox" });
    const id: string = body.execution_id;
    const doc = await waitFor(id, ended);
    const { runInDurableObject } = await import("cloudflare:test");
    const rows = () => runInDurableObject(executionStub(id), (_i, state) => state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM outbox").one().n);
    // Every message delivered: the settles and the slot (no live reservation), the ended summary (listed completed).
    await expectNoLiveReservations(id);
    const deadline = Date.now() + 10_000;
    let listed: { status: string; version: number } | undefined;
    while (Date.now() < deadline && listed?.status !== "completed") {
      listed = ((await (await call(`/executions?client_id=client_e2e_outbox`, { headers: OPS })).json()) as { items: { status: string; version: number }[] }).items[0];
      if (listed?.status !== "completed") await scheduler.wait(25);
    }
    expect(listed?.status).toBe("completed");
    expect(doc.status).toBe("completed");
    // Delivered, and still stored: no commit was made for their delete.
    expect(await rows()).toBeGreaterThan(0);
    // The alarm deletes them; none is claimed and sent again (a message sent again would still be stored, in flight).
    await fireAlarm(id);
    expect(await rows()).toBe(0);
  });

  it("keeps the execution's own id in its storage (never relies on ctx.id.name)", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_e2e" });
    await waitFor(body.execution_id, ended);
    const { runInDurableObject } = await import("cloudflare:test");
    const stub = env.EXECUTION.get(env.EXECUTION.idFromName(body.execution_id));
    const stored = await runInDurableObject(stub, (_i, state) => state.storage.sql.exec("SELECT execution_id FROM execution").one());
    expect(stored.execution_id).toBe(body.execution_id);
    expect((await status(body.execution_id)).execution_id).toBe(body.execution_id);
  });
});
