import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { layoutOf, ledgerShard, shardOfPool } from "../../src/ledger-routing";
import { isSharded } from "../../actors/execution/parts";
import { call, ended, executionStub, expectNoLiveReservations, fireAlarm, JSON_HEADERS, KAM, OPS, reservedSets, shardsOfSet, stagesReserved, startExecution, status, waitFor, waitForLedger } from "../support/api";
import { waitForEvents } from "../support/kam-events";

/**
 * Pause and resume as the ledger sees them: a stage that does not start while paused reserves
 * nothing, a waiting reservation is given back on every shard it was asked on, and a retry due
 * while paused reserves only after resume. In SHARDED_AGAIN (vitest.config.ts): `shards` runs it
 * again with 4 ledger shards. The cases no ledger call decides are pause-resume-api.test.ts.
 */
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
    // Nothing stays held while paused: stage 1's reservation (a chain grant for the rest with one ledger object) is settled, not handed on.
    await expectNoLiveReservations(id);

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
      // With one ledger object stage 2 runs under stage 1's chain grant and asks nothing (docs/ledger.md, "Chain grants").
      // Sharded, it asks its own: no `resources`, so its set is its worker's and client's shards and those of the pools it holds (its estimate).
      ...(isSharded(layoutOf(env)) ? [["stage_2", 1, sets[2]?.routed]] : []),
    ]);
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


});
