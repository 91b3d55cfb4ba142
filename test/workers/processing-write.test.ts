import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { everyShard } from "../../src/ledger-routing";
import { JSON_HEADERS, KAM, OPS, call, ended, executionStub, expectNoLiveReservations, mintToken, until, waitFor } from "../support/api";
import { TEST_TUNING, TEST_WORKER_SECRETS } from "../support/constants";
import { crash } from "../shard-faults/shard-support";

/**
 * `processing` is written only for a worker that has not called back within
 * `pollInitialMs` of accepting `process` (actors/execution/steps.ts handshake):
 * a quick worker's stage costs no commit, no poll timer and no alarm for it.
 * Until then the stage stays `handshaking`; its processing time still counts
 * from the acceptance.
 */
async function start(parameters: Record<string, unknown>): Promise<string> {
  const res = await call("/execute", {
    method: "POST",
    headers: { ...KAM, ...JSON_HEADERS },
    body: JSON.stringify({ template_name: "quick_summary", parameters, client_id: "client_processing_write" }),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

describe("processing written only for slow workers", () => {
  it("a worker that has not called back: processing appears once its first poll is due, counted from process's acceptance", async () => {
    const id = await start({ fault: { mode: "hang" } });
    const doc = await waitFor(id, (d) => d.stages[0]?.status === "processing");
    // Written no earlier than pollInitialMs after the acceptance its time counts from.
    expect(doc.stages[0].processing_ms).toBeGreaterThanOrEqual(TEST_TUNING.pollInitialMs);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
  });

  it("a worker that calls back goes on to the end with its processing time recorded", async () => {
    const id = await start({ steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const spans = (await (await call(`/executions/${id}/spans`, { headers: OPS })).json()) as { spans: { processing_at: string | null; ended_at: string | null }[] };
    // The worker called back after accepting process: its attempt has a processing phase, whether or not processing was written.
    expect(spans.spans[0].processing_at).not.toBeNull();
    expect(Date.parse(spans.spans[0].ended_at!)).toBeGreaterThanOrEqual(Date.parse(spans.spans[0].processing_at!));
  });
});

/**
 * The grant is not written before the handshake (steps.ts askLedger, grant.ts
 * HeldGrants): the ledger's answer is kept in memory and written by the next
 * write (the callback, `processing`, a failure), so the handshake goes out with
 * no commit of its own. The first handshake of these stages stalls at the
 * worker (`stall_handshake`), which holds the moment it arrived open.
 */
type Call = { attempt: number; what: string; status: number };
/** The stage's job object in the demo granulator, through the test-only KIT_JOBS binding (vitest.config.ts). */
function jobCalls(id: string, stageId = "stage_1"): Promise<Call[]> {
  const ns = (env as unknown as { KIT_JOBS: DurableObjectNamespace }).KIT_JOBS;
  return (ns.get(ns.idFromName(`${id}:${stageId}`)) as unknown as { calls(): Promise<Call[]> }).calls();
}
const count = (calls: Call[], what: string) => calls.filter((c) => c.attempt === 1 && c.what === what).length;

async function startStalled(template = "fault_single", extra: Record<string, unknown> = {}): Promise<string> {
  const res = await call("/execute", {
    method: "POST",
    headers: { ...KAM, ...JSON_HEADERS },
    body: JSON.stringify({
      template_name: template,
      parameters: { steps: 1, step_ms: 0, fault: { stage: 1, mode: "stall_handshake" }, stall_ms: 1_200, ...extra },
      client_id: "client_processing_write",
    }),
  });
  expect(res.status).toBe(202);
  const id = ((await res.json()) as { execution_id: string }).execution_id;
  // The handshake has reached the worker (its job logs the call on arrival, before the stall).
  await until("the first handshake at the worker", () => jobCalls(id), (calls) => count(calls, "traceparent:handshake") === 1);
  return id;
}

/**
 * ctx.abort() while the handshake is at the worker: the instance and its held grant are gone, its
 * handshake call cut off (evictDurableObject would wait for it). Then every timer (the outbox's
 * claim, the watchdog) and the alarm an hour on, so only what the test sends wakes the new instance.
 */
async function crashAndSilence(id: string): Promise<void> {
  await crash(executionStub(id));
  await runInDurableObject(executionStub(id), async (_i, state) => {
    state.storage.sql.exec("UPDATE timers SET due_at = due_at + 3600000");
    await state.storage.setAlarm(Date.now() + 3_600_000);
  });
  // Written behind the instance that read the timers: a restart makes the next one read them (read-cache.ts).
  await crash(executionStub(id));
}

/** The worker's `complete` for attempt 1 to an instance that stores the stage waiting for resources: refused 409 stage_waiting. */
async function refusedAsWaiting(id: string): Promise<void> {
  const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
  const early = await call(`/executions/${id}/stages/stage_1/complete`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, ...JSON_HEADERS },
    body: JSON.stringify({ output: { early: true }, usage: {} }),
  });
  expect(early.status).toBe(409);
  expect(((await early.json()) as { error: { code: string } }).error.code).toBe("stage_waiting");
}

describe("the grant is written with the next write, not before the handshake", () => {
  it("while the handshake is at the worker, the ledger holds the grant and the stored stage still waits for resources, under the watchdog", async () => {
    const id = await startStalled();
    const rid = `${id}:stage_1:1`;
    expect(await everyShard(env)[0].stub.status(rid)).toMatchObject({ state: "granted" });
    const stored = await runInDurableObject(executionStub(id), (_i, state) => ({
      stage: state.storage.sql.exec("SELECT status, attempt, reservation, reservation_id, granted_at, waiting_since FROM stages WHERE stage_id = 'stage_1'").one(),
      reservations: state.storage.sql.exec("SELECT COUNT(*) AS n FROM reservations").one().n,
      timers: state.storage.sql.exec("SELECT name, unit FROM timers WHERE name IN ('watchdog', 'queue', 'deadline', 'lease') ORDER BY name").toArray(),
    }));
    expect(stored.stage).toMatchObject({ status: "waiting_resources", attempt: 1, reservation: "requested", reservation_id: null, granted_at: null });
    expect(stored.reservations).toBe(0);
    // What bounds the stage as stored: the watchdog brings a pass within 30 s, which checks its queue
    // deadline from waiting_since (its `queue` timer is written only once it waits); no handshake deadline or lease yet.
    expect(stored.timers).toEqual([{ name: "watchdog", unit: "" }]);
    expect(stored.stage.waiting_since).not.toBeNull();
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // Written with the callback, as of the grant: the reservation is recorded, the span has its grant.
    const after = await runInDurableObject(executionStub(id), (_i, state) => ({
      reservations: state.storage.sql.exec("SELECT reservation_id, attempt FROM reservations").toArray(),
      granted: state.storage.sql.exec("SELECT granted_at FROM spans WHERE stage_id = 'stage_1'").one().granted_at,
    }));
    expect(after.reservations).toEqual([{ reservation_id: rid, attempt: 1 }]);
    expect(after.granted).not.toBeNull();
    expect(await expectNoLiveReservations(id)).toBe(1);
  });

  it("an Execution that crashes between the grant and the handshake's answer asks again under the same reservation, and the worker runs the attempt once", async () => {
    const id = await startStalled();
    // Nothing but the callback below wakes the new instance.
    await crashAndSilence(id);
    // The worker finishes and calls back to the new instance, which never wrote the grant: refused as
    // not on a worker (the stored stage waits for resources), and the ledger is asked again at once.
    await refusedAsWaiting(id);
    // The refused callback started the pass that asked again (no timer would for an hour).
    const doc = await waitFor(id, ended, 15_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // The output is the worker's run (the refused callback's body was not taken).
    expect(doc.stages[0].status).toBe("completed");
    const result = (await (await call(`/executions/${id}/result`, { headers: KAM })).json()) as { output: unknown };
    expect(result.output).not.toEqual({ early: true });
    // The ledger gave the same grant again: one reservation for the stage, settled, nothing held.
    expect((await executionStub(id).reservationIds()).map((r) => r.reservation_id)).toEqual([`${id}:stage_1:1`]);
    expect(await everyShard(env)[0].stub.status(`${id}:stage_1:1`)).toMatchObject({ state: "settled" });
    await expectNoLiveReservations(id);
    // The worker saw the handshake of attempt 1 twice and answered the second as the first; it was
    // started (process) once and called back once.
    const calls = await jobCalls(id);
    expect(count(calls, "traceparent:handshake")).toBe(2);
    expect(count(calls, "traceparent:process")).toBe(1);
    expect(count(calls, "callback:complete")).toBe(1);
  });

  it("a stage stored as queued (its grant came on a re-ask, held and lost) asks again at once on such a refused callback, not at its re-ask timer", async () => {
    const id = await startStalled();
    const rid = `${id}:stage_1:1`;
    await crashAndSilence(id);
    // As a stage that queued first and was granted by its re-ask is stored: reserved and waiting, its
    // `reask` timer (set before the re-ask went out) an hour away like every other timer.
    await runInDurableObject(executionStub(id), (_i, state) => {
      const sql = state.storage.sql;
      sql.exec("UPDATE stages SET reservation = 'waiting', reservation_id = ? WHERE stage_id = 'stage_1'", rid);
      sql.exec("INSERT INTO reservations (reservation_id, stage_id, attempt, created_at) VALUES (?, 'stage_1', 1, ?)", rid, Date.now());
      sql.exec("INSERT INTO timers (name, unit, due_at) VALUES ('reask', 'stage_1', ?)", Date.now() + 3_600_000);
    });
    // Written behind the object's back: a restart makes the instance read it (it keeps its reads in memory, read-cache.ts).
    await crash(executionStub(id));
    await refusedAsWaiting(id);
    // Asked again at once (the re-ask timer would wait an hour): the same grant, the replayed attempt runs to the end.
    const doc = await waitFor(id, ended, 15_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    expect(await everyShard(env)[0].stub.status(rid)).toMatchObject({ state: "settled" });
    expect(count(await jobCalls(id), "traceparent:handshake")).toBe(2);
  });

  it("such a refused callback leaves the backoff timer of a failed ledger call as it is, instead of bringing the re-ask to now", async () => {
    const id = await startStalled();
    await crashAndSilence(id);
    // As a stage whose re-ask in the new instance failed is stored: one failure in a row, its backoff timer due later.
    const backoffEnds = Date.now() + 3_600_000;
    await runInDurableObject(executionStub(id), (_i, state) => {
      state.storage.sql.exec("UPDATE stages SET ledger_failures = 1 WHERE stage_id = 'stage_1'");
      state.storage.sql.exec("INSERT INTO timers (name, unit, due_at) VALUES ('reask', 'stage_1', ?)", backoffEnds);
    });
    await crash(executionStub(id));
    await refusedAsWaiting(id);
    // Still the backoff's timer (brought to now, the pass would have taken it and asked at once).
    const reask = await runInDurableObject(executionStub(id), (_i, state) => state.storage.sql.exec("SELECT due_at FROM timers WHERE name = 'reask' AND unit = 'stage_1'").toArray());
    expect(reask).toEqual([{ due_at: backoffEnds }]);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  });

  it("an upload refused in that window (409 stage_waiting) makes the object ask again at once, and the worker kit uploads again later instead of giving the attempt up", async () => {
    // Stage 1 of data_retried is a blob over the kit's upload threshold (512 KiB): its output is uploaded.
    const id = await startStalled("data_retried", { output_bytes: { stage_1: 600_000 } });
    // Nothing but the upload below wakes the new instance.
    await crashAndSilence(id);
    // The process call the lost instance had sent before it died (the grant was still held, so the stored
    // stage waits for resources): the worker runs the attempt, once its stalled handshake is done.
    const process = () => env.CONTENT_GRANULATOR.fetch("https://bitware-content-granulator.internal/api/process", {
      method: "POST",
      headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}`, ...JSON_HEADERS },
      body: JSON.stringify({ executionId: id, stageId: "stage_1", attempt: 1 }),
    });
    await until("process accepted by the worker", async () => (await process()).status, (status) => status === 202);
    // Its upload is refused 409 stage_waiting, which asks the ledger again at once (no timer would for an hour):
    // the same grant, the replayed handshake and process; the kit's next try (uploadBackoffMs later) is taken.
    const doc = await waitFor(id, ended, 15_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    const calls = await jobCalls(id);
    expect(calls.filter((c) => c.what === "upload").map((c) => c.status)).toEqual([409, 201]);
    expect(count(calls, "traceparent:handshake")).toBe(2);
    expect(await everyShard(env)[0].stub.status(`${id}:stage_1:1`)).toMatchObject({ state: "settled" });
  });

  it("an execution cancelled after such a crash, before it asked again, tells the worker to stop the attempt its handshake reached", async () => {
    const id = await startStalled();
    // Nothing but the cancel below wakes the new instance.
    await crashAndSilence(id);
    // As stored, the stage still waits for resources: the new instance cannot know the handshake went out.
    const res = await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { status: string }).status).toBe("cancelled");
    // The cancel reaches the worker for attempt 1 (through the outbox), and nothing stays held.
    await until("the worker told to cancel", () => jobCalls(id), (calls) => count(calls, "traceparent:cancel") === 1);
    await expectNoLiveReservations(id);
  });
});
