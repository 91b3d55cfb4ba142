import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { layoutOf, ledgerShard, shardOfPool } from "../../src/ledger-routing";
import { call, ended, executionStub, fireAlarm, JSON_HEADERS, KAM, OPS, reservedSets, rpcThrough, shardsOfSet, stagesReserved, startExecution, status, waitFor, waitForLedger } from "../support/api";
import { received, waitForEvents } from "../support/kam-events";

const post = (path: string, headers: Record<string, string> = OPS) => call(path, { method: "POST", headers });

/** What an execution reserved, per stage attempt: `[stage_id, attempt, shards asked]` (test/support/api.ts, reservedSets). */
const reserved = async (id: string) => (await reservedSets(id)).map((s) => [s.stage_id, s.attempt, s.shards]);

describe("pause and resume", () => {
  it("pauses mid-pipeline: the running stage completes, nothing else starts; resume runs the rest to completed", async () => {
    const { body } = await startExecution({
      template_name: "course_creation",
      parameters: { topic: "pause", steps: 6, step_ms: 200 },
      client_id: "kam-flaky-2-pause",
      notify: true,
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");

    const paused = await post(`/executions/${id}/pause`, KAM);
    expect(paused.status).toBe(200);
    const doc = (await paused.json()) as Record<string, any>;
    expect(doc.status).toBe("paused");
    expect(Date.parse(doc.paused_at)).toBeGreaterThan(0);

    // Pausing again: 200, nothing changes.
    const again = await post(`/executions/${id}/pause`);
    expect(again.status).toBe(200);
    expect(((await again.json()) as Record<string, any>).paused_at).toBe(doc.paused_at);

    // The stage that was on the worker runs to its end and its result is applied.
    const done1 = await waitFor(id, (d) => d.stages[0].status === "completed");
    expect(done1.status).toBe("paused");
    // A drive pass (the alarm) finds stage 2 ready and does not start it: no attempt, no reservation.
    await fireAlarm(id);
    const still = await status(id);
    expect(still.status).toBe("paused");
    expect(still.stages.map((s) => [s.status, s.attempts])).toEqual([
      ["completed", 1],
      ["pending", 0],
      ["pending", 0],
    ]);
    expect(await reserved(id)).toEqual([["stage_1", 1, shardsOfSet({ "tokens:openai": 2000 }, { clientId: "kam-flaky-2-pause", executionId: id })]]);

    const resumed = await post(`/executions/${id}/resume`, KAM);
    expect(resumed.status).toBe(200);
    const r = (await resumed.json()) as Record<string, any>;
    expect(r.status).toBe("running");
    expect(r.paused_at).toBeNull();
    expect(r.paused_ms).toBeGreaterThan(0);

    const end = await waitFor(id, ended);
    expect(end.status).toBe("completed");
    expect(end.stages.map((s) => [s.status, s.attempts])).toEqual([
      ["completed", 1],
      ["completed", 1],
      ["completed", 1],
    ]);
    // Resuming a completed execution: not paused.
    const late = await post(`/executions/${id}/resume`);
    expect(late.status).toBe(409);
    expect(((await late.json()) as any).error.code).toBe("not_paused");

    // KAM (answering 500 twice first) gets paused, resumed, completed: in order, once each.
    const got = await waitForEvents(id, (x) => x.events.length === 3);
    expect(got.events.map((e) => [e.type, e.status])).toEqual([
      ["execution.paused", "paused"],
      ["execution.resumed", "running"],
      ["execution.completed", "completed"],
    ]);
    expect(got.receipts.map((x) => [x.type, x.answered])).toEqual([
      ["execution.paused", 500],
      ["execution.paused", 500],
      ["execution.paused", 200],
      ["execution.resumed", 200],
      ["execution.completed", 200],
    ]);
  });

  it("pausing a stage that waits for the ledger gives the reservation back; resume asks again and completes", async () => {
    const pool = await call("/resources/pools/gate:control", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }) });
    expect(pool.status).toBe(200);
    // A holds the one slot of the gate (its stage 1 hangs); B's stage 1 waits behind it.
    const a = await startExecution({ template_name: "control_gated", parameters: { fault: { stage: 1, mode: "hang" } }, client_id: "client_control" });
    await waitFor(a.body.execution_id, (d) => d.stages[0].status === "processing");
    const b = await startExecution({ template_name: "control_gated", parameters: { steps: 1, step_ms: 5 }, client_id: "client_control" });
    const id = b.body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "waiting_resources");
    await waitForLedger((s) => s.pools.find((p) => p.name === "gate:control")?.waiting === 1);
    // Its set's parts were asked in shard order up to the gate's, which waits (one reservation with one shard).
    const gateSet = shardsOfSet({ "gate:control": 1 }, { clientId: "client_control", executionId: id });
    const asked = gateSet.slice(0, gateSet.indexOf(shardOfPool(layoutOf(env), "gate:control")) + 1);
    expect(await reserved(id)).toEqual([["stage_1", 1, asked]]);
    const held = await executionStub(id).reservationIds();

    const paused = await post(`/executions/${id}/pause`);
    expect(paused.status).toBe(200);
    const doc = (await paused.json()) as Record<string, any>;
    expect(doc.stages[0]).toMatchObject({ status: "pending", attempts: 1, max_attempts: 2 });
    // The reservation is released (through the outbox): the ledger's queue for the gate is empty, and every part is released on its shard.
    await waitForLedger((s) => s.pools.find((p) => p.name === "gate:control")?.waiting === 0);
    for (const r of held) expect((await ledgerShard(env, r.shard).status(r.reservation_id)).state).toBe("released");

    // A's slot frees up while B is paused: B does not take it.
    await post(`/executions/${a.body.execution_id}/cancel`);
    await waitForLedger((s) => s.pools.find((p) => p.name === "gate:control")?.in_use === 0);
    await fireAlarm(id);
    expect((await status(id)).stages[0]).toMatchObject({ status: "pending", attempts: 1 });
    expect(await reserved(id)).toEqual([["stage_1", 1, asked]]);

    expect((await post(`/executions/${id}/resume`)).status).toBe(200);
    const end = await waitFor(id, ended);
    expect(end.status).toBe("completed");
    // Asked again as a new attempt; the given-back one does not count against max_attempts.
    expect(end.stages[0]).toMatchObject({ status: "completed", attempts: 2, max_attempts: 2 });
    const sets = await reservedSets(id);
    expect(sets.map((s) => [s.stage_id, s.attempt, s.shards])).toEqual([
      ["stage_1", 1, asked],
      ["stage_1", 2, gateSet],
      // No `resources`: its set is its worker's and client's shards and those of the pools it holds (its estimate).
      ["stage_2", 1, sets[2]?.routed],
    ]);
  });

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

  it("stage deadlines keep running while paused: a hanging stage times out paused, and its retry waits for resume", async () => {
    // fault_single: timeout_ms 1500, two attempts; the worker never answers.
    const { body } = await startExecution({ template_name: "fault_single", parameters: { fault: { mode: "hang" } }, client_id: "client_control" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    expect((await post(`/executions/${id}/pause`)).status).toBe(200);
    const timedOut = await waitFor(id, (d) => d.stages[0].last_error !== null || ended(d));
    expect(timedOut.status).toBe("paused");
    expect(timedOut.stages[0]).toMatchObject({ status: "pending", attempts: 1, last_error: { code: "stage_timeout", attempt: 1 } });
    // Its retry is due, and a drive pass while paused does not start it.
    await fireAlarm(id);
    expect((await status(id)).stages[0]).toMatchObject({ status: "pending", attempts: 1 });
    expect(await stagesReserved(id)).toEqual(["stage_1"]);
    expect((await reserved(id)).map(([, attempt]) => attempt)).toEqual([1]);

    expect((await post(`/executions/${id}/resume`)).status).toBe(200);
    const end = await waitFor(id, ended);
    // The second attempt ran after resume, and timed out in its turn.
    expect(end.status).toBe("failed");
    expect(end.stages[0]).toMatchObject({ status: "failed", attempts: 2, error: { code: "stage_timeout" } });
    expect(await stagesReserved(id)).toEqual(["stage_1", "stage_1"]);
    expect((await reserved(id)).map(([, attempt]) => attempt)).toEqual([1, 2]);
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
  });
});
