import { describe, expect, it } from "vitest";
import { call, ended, fireAlarm, OPS, rpcThrough, startExecution, status, waitFor } from "../support/api";
import { received } from "../support/kam-events";

/**
 * Pause and resume where no ledger call decides what is asserted: fan-out items, an execution
 * still queued, the execution-wide deadline, refusals, rights and KAM's RPC entrypoint. The
 * `workers` project only; what the ledger holds while an execution is paused (no reservation for
 * a stage that does not start, a waiting reservation given back on every shard, a retry's
 * reservation only after resume) is pause-resume.test.ts, which `shards` runs again.
 */
const post = (path: string, headers: Record<string, string> = OPS) => call(path, { method: "POST", headers });

describe("pause and resume", () => {
  it("pauses mid fan-out: running items complete, no pending item starts; resume runs the rest", async () => {
    // course_parallel: an outline, then one write_chapter item per module (four at once), then quiz, summary, assemble.
    const { body } = await startExecution({ template_name: "course_parallel", parameters: { topic: "pause", modules: 8, steps: 3, step_ms: 300 }, client_id: "client_control" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => (d.stages[1]?.items?.running ?? 0) >= 1 && (d.stages[1]?.items?.pending ?? 0) >= 1, 30_000);
    expect((await post(`/executions/${id}/pause`)).status).toBe(200);
    // The items on the worker run to their end; then nothing moves.
    const quiet = await waitFor(id, (d) => d.stages[1].items!.running === 0 || ended(d), 30_000);
    expect(quiet.status).toBe("paused");
    const counts = quiet.stages[1].items!;
    expect(counts.pending).toBeGreaterThanOrEqual(1);
    expect(counts.completed + counts.pending).toBe(8);
    await fireAlarm(id);
    const still = await status(id);
    expect(still.status).toBe("paused");
    expect(still.stages[1].items).toEqual(counts);
    expect(still.stages.slice(2).map((s) => s.status)).toEqual(["pending", "pending", "pending"]);

    expect((await post(`/executions/${id}/resume`)).status).toBe(200);
    const end = await waitFor(id, ended, 60_000);
    expect(end.status).toBe("completed");
    expect(end.stages[1].items).toMatchObject({ total: 8, completed: 8 });
  });

  it("paused while still queued (its template loading): resume answers queued, and it runs to completed", async () => {
    // The demo KAM answers `slow1500_*` after 1.5 s: the execution is queued until then.
    const { body } = await startExecution({ template_name: "slow1500_quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_control" });
    const id = body.execution_id as string;
    const paused = (await (await post(`/executions/${id}/pause`)).json()) as Record<string, any>;
    expect(paused.status).toBe("paused");
    expect(paused.stages).toEqual([]);
    const resumed = await post(`/executions/${id}/resume`);
    expect(resumed.status).toBe(200);
    const doc = (await resumed.json()) as Record<string, any>;
    expect(doc.status).toBe("queued");
    expect(doc.started_at).toBeNull();
    const end = await waitFor(id, ended);
    expect(end.status).toBe("completed");
  });


  // The execution-wide deadline does not count paused time. Stage 1 takes about 4 s on the worker,
  // the deadline is 2.5 s. Time passes by the worker's own steps (the stage completing), not by sleeping.
  const DEADLINE_MS = 2_500;
  const longStage = { template_name: "quick_summary", parameters: { steps: 10, step_ms: 400 }, client_id: "client_control", execution_timeout_ms: DEADLINE_MS };

  it("an execution-wide deadline does not count paused time: paused past it, resumed, it completes", async () => {
    const { body } = await startExecution(longStage);
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    const paused = (await (await post(`/executions/${id}/pause`)).json()) as Record<string, any>;
    expect(paused.status).toBe("paused");
    // The stage runs to its end while paused, well past the deadline by the clock.
    const done = await waitFor(id, (d) => d.stages[0].status === "completed" || ended(d), 20_000);
    expect(done.error).toBeNull();
    expect(done.status).toBe("paused");
    const created = Date.parse(done.created_at);
    expect(Date.parse(done.stages[0].completed_at!) - created).toBeGreaterThan(DEADLINE_MS);
    // The execution's own timer (armed for the deadline) has fired by now: a drive pass while paused fails nothing.
    await fireAlarm(id);
    expect((await status(id)).status).toBe("paused");

    expect((await post(`/executions/${id}/resume`)).status).toBe(200);
    const end = await waitFor(id, ended);
    expect(end.error).toBeNull();
    expect(end.status).toBe("completed");
    // Counted by the clock it ran past the deadline; less the time paused, it did not.
    const took = Date.parse(end.completed_at!) - created;
    expect(took).toBeGreaterThan(DEADLINE_MS);
    expect(took - end.paused_ms).toBeLessThan(DEADLINE_MS);
  });

  it("the same execution, not paused, fails with execution_timeout at the deadline (the control case)", async () => {
    const { body } = await startExecution(longStage);
    const id = body.execution_id as string;
    const end = await waitFor(id, ended, 30_000);
    expect(end.status).toBe("failed");
    expect(end.error).toMatchObject({ code: "execution_timeout" });
    expect(end.paused_ms).toBe(0);
    expect(end.stages[0].status).not.toBe("completed");
  });

  it("refuses pause of an ended execution (already_terminal), resume of a running one (not_paused), and changes nothing", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_control" });
    const id = body.execution_id as string;
    const running = await post(`/executions/${id}/resume`);
    expect(running.status).toBe(409);
    expect(((await running.json()) as any).error.code).toBe("not_paused");
    const done = await waitFor(id, ended);
    const res = await post(`/executions/${id}/pause`);
    expect(res.status).toBe(409);
    expect(((await res.json()) as any).error).toMatchObject({ code: "already_terminal", details: { status: "completed" } });
    expect(await status(id)).toEqual(done);
    expect((await received(id)).receipts).toEqual([]);
  });

  it("needs KAM or OPS rights, a valid id and an existing execution", async () => {
    const unknown = "exec_1700000000000_AAAAAAAAAAAAAAAA";
    for (const action of ["pause", "resume"]) {
      expect((await post(`/executions/${unknown}/${action}`, {})).status).toBe(401);
      expect((await post(`/executions/${unknown}/${action}`, { authorization: "Bearer nope" })).status).toBe(401);
      const bad = await post(`/executions/not-an-id/${action}`);
      expect(bad.status).toBe(400);
      const error = ((await bad.json()) as any).error;
      expect(error.code).toBe("invalid_request");
      // The offending field is the path's id.
      expect(error.details.map((d: { path: string }) => d.path)).toEqual(["id"]);
      const missing = await post(`/executions/${unknown}/${action}`);
      expect(missing.status).toBe(404);
      expect(((await missing.json()) as any).error.code).toBe("not_found");
    }
  });

  it("KAM's RPC entrypoint has pause(id) and resume(id)", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 20, step_ms: 100 }, client_id: "client_control" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    const p = await rpcThrough("kam", "pause", id);
    expect(p).toMatchObject({ called: true, value: { ok: true, status: 200, data: { status: "paused" } } });
    const r = await rpcThrough("kam", "resume", id);
    expect(r).toMatchObject({ called: true, value: { ok: true, status: 200, data: { status: "running" } } });
    const again = await rpcThrough("kam", "resume", id);
    expect(again).toMatchObject({ called: true, value: { ok: false, status: 409, error: { code: "not_paused" } } });
    await post(`/executions/${id}/cancel`);
  });});
