import { env } from "cloudflare:workers";
import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { canonical } from "../../src/execution-service";
import { sha256Hex } from "../../src/hash";
import { newExecutionId } from "../../src/ids";
import { TEST_WORKER_SECRETS } from "../support/constants";
import {
  JSON_HEADERS,
  KAM,
  call,
  ended,
  executionStub,
  expectNoLiveReservations,
  mintToken,
  startExecution,
  status,
  waitFor,
} from "../support/api";

/**
 * Fault injection: the demo granulator misbehaves on request
 * (`parameters.fault = { mode, stage?, times? }`, demo/README.md). For each
 * fault, the documented outcome (docs/reliability.md), no execution left
 * running, and no reservation left live in the ledger.
 */
const quick = { steps: 2, step_ms: 5, echo: { hello: "world" } };

/** A fault run to its end; by default under a deadline no fault test meets (fault_single_long), so only `hang` uses fault_single's 1.5 s. */
async function runFault(mode: string, extra: Record<string, unknown> = {}, template = "fault_single_long"): Promise<StatusDocument> {
  const { res, body } = await startExecution({
    template_name: template,
    parameters: { ...quick, fault: { mode, ...extra } },
    client_id: "client_faults",
  });
  expect(res.status).toBe(202);
  const doc = await waitFor(body.execution_id, ended, 25_000);
  await expectNoLiveReservations(body.execution_id);
  return doc;
}

async function callback(id: string, stageId: string, attempt: number, kind: string, body: unknown, tokenFor = { executionId: id, stageId, attempt }) {
  const token = await mintToken(tokenFor);
  return call(`/executions/${id}/stages/${stageId}/${kind}`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, ...JSON_HEADERS },
    body: JSON.stringify(body),
  });
}

/** What the granulator itself says about a stage (through its real binding, with the worker secret). */
async function workerView(id: string, stageId: string): Promise<Record<string, any>> {
  const res = await env.CONTENT_GRANULATOR.fetch(`https://granulator.internal/api/progress/${id}?stageId=${stageId}`, {
    headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` },
  });
  return res.json();
}

describe("fault injection: each fault ends as documented, with nothing left running or reserved", () => {
  it("refuse: a refused handshake fails the stage with handshake_refused and is not retried", async () => {
    const doc = await runFault("refuse");
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "handshake_refused", stage_id: "stage_1" });
    expect(doc.stages[0].attempts).toBe(1);
  });

  it("refuse_retryable: a refusal marked retryable is retried and then completes", async () => {
    const doc = await runFault("refuse_retryable", { times: 1 });
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(2);
    expect(doc.stages[0].last_error).toMatchObject({ code: "handshake_refused", attempt: 1 });
  });

  it("process_500_once: a 500 from process is transient, the next attempt completes", async () => {
    const doc = await runFault("process_500_once");
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(2);
    expect(doc.stages[0].last_error).toMatchObject({ code: "worker_http_500", attempt: 1 });
  });

  it("crash: progress answering 500 for ever fails each attempt after maxPollFailures polls", async () => {
    const doc = await runFault("crash");
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "worker_http_500", stage_id: "stage_1" });
    expect(doc.stages[0].attempts).toBe(2);
    // The attempt ended on our side (failed polls), so the worker is told to stop, not only at a deadline.
    const deadline = Date.now() + 5000;
    while ((await workerView(doc.execution_id, "stage_1")).error?.code !== "cancelled") {
      if (Date.now() > deadline) throw new Error("the worker was not told to cancel");
      await scheduler.wait(25);
    }
  });

  it("hang: a worker that never finishes fails with stage_timeout at the deadline and is told to cancel", async () => {
    const doc = await runFault("hang", {}, "fault_single");
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "stage_timeout", stage_id: "stage_1" });
    expect(doc.stages[0].attempts).toBe(2);
    // The cancel reaches the worker through the outbox.
    const deadline = Date.now() + 5000;
    let view = await workerView(doc.execution_id, "stage_1");
    while (view.error?.code !== "cancelled" && Date.now() < deadline) {
      await scheduler.wait(25);
      view = await workerView(doc.execution_id, "stage_1");
    }
    expect(view).toMatchObject({ status: "failed", error: { code: "cancelled" } });
  });

  it("malformed: a progress answer that is not JSON counts as a failed poll, then fails with worker_protocol_error", async () => {
    const doc = await runFault("malformed");
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "worker_protocol_error" });
  });

  it("double_callback: a repeated complete is a no-op, so the stage's usage is counted once", async () => {
    const doc = await runFault("double_callback");
    expect(doc.status).toBe("completed");
    const view = await workerView(doc.execution_id, "stage_1");
    expect(view.status).toBe("completed");
    expect(doc.stages[0].usage).toEqual(view.usage);
    expect(doc.cost?.by_stage.stage_1).toBe(doc.stages[0].cost);
  });

  it("wrong_token: a forged callback changes nothing; the genuine one completes the stage", async () => {
    const doc = await runFault("wrong_token");
    // The whole stage on failure: its last_error says why a second attempt ran.
    expect(doc.status).toBe("completed");
    expect(doc.stages[0], JSON.stringify(doc.stages[0])).toMatchObject({ attempts: 1 });
    // The worker's own record of its callbacks: the forged complete went first and was refused;
    // the genuine one that followed was the one accepted (had the forged been taken, it would be answered as a duplicate).
    // The worker logs the genuine callback's answer after the orchestrator acted on it: wait for its outbox to drain.
    type Job = { pending_callbacks: number; log: { what: string; status: number; detail: string | null }[] };
    let job: Job;
    for (;;) {
      const res = await env.CONTENT_GRANULATOR.fetch(`https://granulator.internal/api/jobs/${doc.execution_id}?stageId=stage_1`, {
        headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` },
      });
      job = (await res.json()) as Job;
      if (job.pending_callbacks === 0) break;
      await scheduler.wait(25);
    }
    const completes = job.log.filter((e) => e.what === "callback:complete").map((e) => [e.status, e.detail]);
    // The forged one was refused outright. (The genuine one that followed is answered 200, or 409 when a poll of
    // the worker's progress has already recorded the same completion: either way the forged one changed nothing.)
    expect(completes[0]).toEqual([401, "alternate token"]);
    expect(completes.length).toBe(2);
    expect(completes[1][1]).toBeNull();
  });

  it("wrong_token on a running stage: the forged callback is refused and the stage is exactly as before", async () => {
    const { body } = await startExecution({ template_name: "fault_single", parameters: { steps: 1, step_ms: 0, fault: { mode: "hang" } }, client_id: "client_faults" });
    const id = body.execution_id as string;
    // The hanging worker's polls answer "working" at 0 % for ever: once one has been seen, nothing moves on its own.
    const before = await waitFor(id, (d) => d.stages[0].status === "processing" && d.stages[0].message === "working");
    const genuine = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    const forged = genuine.slice(0, -1) + (genuine.endsWith("x") ? "y" : "x");
    const res = await call(`/executions/${id}/stages/stage_1/complete`, {
      method: "POST",
      headers: { authorization: `Bearer ${forged}`, ...JSON_HEADERS },
      body: JSON.stringify({ output: { forged: true }, usage: { "tokens:openai": 1_000_000 } }),
    });
    expect(res.status).toBe(401);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("unauthorized");
    const after = await status(id);
    expect(after.status).toBe("running");
    // Everything but the time it has been processing, which runs on.
    const steady = ({ processing_ms: _, ...rest }: StatusDocument["stages"][number]) => rest;
    expect(steady(after.stages[0])).toEqual(steady(before.stages[0]));
    expect(after.stages[0]).toMatchObject({ status: "processing", attempts: 1, progress: 0, usage: before.stages[0].usage });
    expect(after.cost).toEqual(before.cost);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    await waitFor(id, ended);
  });

  it("progress_backwards: while the worker reports 30 after 60, the status document still shows 60", async () => {
    // quick_summary (no short deadline): progress 60 after step 1, 30 after step 2, each step 1.2 s: the checks
    // below run while the worker is at 30 (at 400 ms a step, a loaded machine once missed that window).
    const { body } = await startExecution({
      template_name: "quick_summary",
      parameters: { steps: 3, step_ms: 1200, fault: { mode: "progress_backwards" } },
      client_id: "client_faults",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.progress === 60);
    // The worker itself now goes back to 30; caught while it is there.
    const deadline = Date.now() + 10_000;
    let view = await workerView(id, "stage_1");
    while (view.progress !== 30) {
      if (Date.now() > deadline || view.status !== "processing") throw new Error(`the worker never reported 30: ${JSON.stringify(view)}`);
      await scheduler.wait(20);
      view = await workerView(id, "stage_1");
    }
    // The orchestrator has had that report (its message is the one sent with 30) and kept 60.
    await waitFor(id, (d) => d.stages[0].message === "step 2/3 (summary)");
    expect((await status(id)).stages[0].progress).toBe(60);
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].progress).toBe(100);
    await expectNoLiveReservations(id);
  });

  it("fail: a permanent failure from the worker fails the execution with the worker's code, without retry", async () => {
    const doc = await runFault("fail");
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "granulation_failed", stage_id: "stage_1" });
    expect(doc.stages[0].attempts).toBe(1);
  });

  it("fail_retryable_once: a retryable failure is retried, and the later stage still runs", async () => {
    const doc = await runFault("fail_retryable_once", { stage: 1 }, "fault_two_stage_long");
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => [s.status, s.attempts])).toEqual([
      ["completed", 2],
      ["completed", 1],
    ]);
  });
});

describe("callbacks are fenced by execution, stage and attempt", () => {
  it("refuses a token of another stage (403), of an earlier attempt (409), and a forged one (401)", async () => {
    const doc = await runFault("fail_retryable_once", { stage: 1 }, "fault_two_stage_long");
    const id = doc.execution_id;
    const before = await status(id);

    const otherStage = await callback(id, "stage_1", 1, "complete", { output: "x" }, { executionId: id, stageId: "stage_2", attempt: 1 });
    expect(otherStage.status).toBe(403);
    const otherExecution = await callback(id, "stage_1", 1, "complete", { output: "x" }, { executionId: "exec_1700000000000_aaaaaaaaaaaaaaaa", stageId: "stage_1", attempt: 1 });
    expect(otherExecution.status).toBe(403);
    const stale = await callback(id, "stage_1", 1, "complete", { output: "late" });
    expect(stale.status).toBe(409);
    expect(((await stale.json()) as { error: { code: string } }).error.code).toBe("stale_attempt");
    const forged = await call(`/executions/${id}/stages/stage_1/complete`, {
      method: "POST",
      headers: { authorization: "Bearer Zm9vfGJhcnwx.c2lnbmF0dXJl", ...JSON_HEADERS },
      body: JSON.stringify({ output: "x" }),
    });
    expect(forged.status).toBe(401);
    const late = await callback(id, "stage_2", 1, "complete", { output: "different" });
    expect(late.status).toBe(409);

    expect(await status(id)).toEqual(before);
  });
});

describe("cancellation", () => {
  it("stops a running stage, tells the worker, releases the reservation, and refuses later callbacks", async () => {
    const { body } = await startExecution({ template_name: "fault_single", parameters: { ...quick, fault: { mode: "hang" } }, client_id: "client_faults" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    const res = await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as StatusDocument;
    expect(doc.status).toBe("cancelled");
    expect(doc.stages[0].status).toBe("cancelled");
    await expectNoLiveReservations(id);
    const deadline = Date.now() + 5000;
    while ((await workerView(id, "stage_1")).error?.code !== "cancelled") {
      if (Date.now() > deadline) throw new Error("the worker was not told to cancel");
      await scheduler.wait(25);
    }
    const late = await callback(id, "stage_1", 1, "complete", { output: "too late" });
    expect(late.status).toBe(409);
    expect(((await late.json()) as { error: { code: string } }).error.code).toBe("execution_cancelled");
    expect((await status(id)).status).toBe("cancelled");
    const again = await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    expect(again.status).toBe(409);
  });

  it("cancels an execution that is waiting to retry", async () => {
    // The first process answers 429 with retry-after 2 s: the stage sits in `pending`, waiting to retry, for 2 s.
    const { body } = await startExecution({
      template_name: "fault_single",
      parameters: { ...quick, fault: { mode: "process_429_once" } },
      client_id: "client_faults",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "pending" && d.stages[0].last_error?.code === "worker_http_429");
    const res = await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as StatusDocument;
    expect(doc.status).toBe("cancelled");
    expect(doc.stages[0]).toMatchObject({ status: "cancelled", attempts: 1 });
    await expectNoLiveReservations(id);
    // The retry never happens: still one attempt once its time has passed.
    const later = await waitFor(id, (d) => Date.now() - Date.parse(d.completed_at!) > 2500, 10_000);
    expect(later.stages[0]).toMatchObject({ status: "cancelled", attempts: 1 });
  });
});

describe("data integrity", () => {
  it("an upload replayed after the stage completed is 409 and leaves the committed output byte for byte intact", async () => {
    // large_output: 2 MiB, uploaded by the worker (PUT /data) and committed by reference.
    const doc = await runFault("large_output");
    expect(doc.status).toBe("completed");
    const id = doc.execution_id;
    const read = async () => new Uint8Array(await (await call(`/executions/${id}/result/content`, { headers: KAM })).arrayBuffer());
    const digest = async (b: Uint8Array) => [...new Uint8Array(await crypto.subtle.digest("SHA-256", b))].map((x) => x.toString(16).padStart(2, "0")).join("");
    const before = await read();
    expect(before.byteLength).toBeGreaterThan(2 * 1024 * 1024); // the 2 MiB string as JSON
    const objects = async () => (await env.DATA.list({ prefix: `r2/${id}/` })).objects.map((o) => [o.key, o.etag]);
    const stored = await objects();

    const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    for (const name of ["output.json", "output.bin"]) {
      const replay = await call(`/data/${id}/stage_1/${name}`, {
        method: "PUT",
        headers: { authorization: `Bearer ${token}`, "content-type": "application/octet-stream" },
        body: new Uint8Array(1000).fill(7),
      });
      expect(replay.status).toBe(409);
      expect(((await replay.json()) as { error: { code: string } }).error.code).toBe("stage_ended");
    }
    // Nothing written, nothing deleted, the deliverable the same bytes.
    expect(await objects()).toEqual(stored);
    const after = await read();
    expect(await digest(after)).toBe(await digest(before));
  });

  it("two complete callbacks with different bodies for one attempt: the first wins, the second is 409 and changes nothing", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { ...quick, fault: { mode: "hang" } }, client_id: "client_faults" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    // Over 64 KiB each, so the orchestrator stores them in KV: the second must not overwrite the first.
    const first = { output: { text: "a".repeat(100_000) } };
    const second = { output: { text: "b".repeat(100_000) } };
    expect((await callback(id, "stage_1", 1, "complete", first)).status).toBe(200);
    const again = await callback(id, "stage_1", 1, "complete", second);
    expect(again.status).toBe(409);
    expect(((await again.json()) as { error: { code: string } }).error.code).toBe("stage_ended");
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const content = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(await content.text()).toBe(JSON.stringify(first.output));
    // The same first body again is still the idempotent repeat.
    expect((await callback(id, "stage_1", 1, "complete", first)).status).toBe(200);
    await expectNoLiveReservations(id);
  });
});

describe("bounds on what a worker reports", () => {
  it("usage far above the reservation, or in a pool the worker may not report, is refused with 422 and never charged", async () => {
    // course_creation's stage 1 reserves tokens:openai 2000; it hangs, so only the test's callbacks report.
    const { body } = await startExecution({
      template_name: "course_creation",
      parameters: { ...quick, fault: { stage: 1, mode: "hang" } },
      client_id: "client_faults",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    const before = await status(id);
    const far = await callback(id, "stage_1", 1, "complete", { output: { ok: 1 }, usage: { "tokens:openai": 20_001 } });
    expect(far.status).toBe(422);
    expect(((await far.json()) as { error: { code: string; message: string } }).error).toMatchObject({ code: "usage_out_of_bounds", message: expect.stringContaining("tokens:openai") });
    const elsewhere = await callback(id, "stage_1", 1, "fail", { error: { code: "x", message: "y" }, usage: { "gpu:a100": 1 } });
    expect(elsewhere.status).toBe(422);
    // Nothing changed: the stage still runs, no usage, no cost (polls may still update its message and times).
    const after = await status(id);
    const charged = (d: typeof before) => ({ status: d.status, cost: d.cost, stages: d.stages.map((s) => [s.stage_id, s.status, s.attempts, s.usage, s.cost]) });
    expect(charged(after)).toEqual(charged(before));
    expect(after.stages[0]).toMatchObject({ status: "processing", usage: null, cost: null });
    // Within the bound (10 x 2000) it is taken and charged.
    expect((await callback(id, "stage_1", 1, "complete", { output: { ok: 1 }, usage: { "tokens:openai": 19_999 } })).status).toBe(200);
    const doc = await waitFor(id, (d) => d.stages[0].status === "completed");
    expect(doc.stages[0].usage).toEqual({ "tokens:openai": 19_999 });
    await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    await expectNoLiveReservations(id);
  });
});

describe("deadlines", () => {
  it("an execution past its execution_timeout_ms fails with execution_timeout, and its worker is told to cancel", async () => {
    const { res, body } = await startExecution({ template_name: "quick_summary", parameters: { ...quick, fault: { mode: "hang" } }, client_id: "client_faults", execution_timeout_ms: 1500 });
    expect(res.status).toBe(202);
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 10_000);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("execution_timeout");
    expect(doc.stages[0]).toMatchObject({ status: "failed", error: { code: "execution_timeout" } });
    expect(Date.parse(doc.completed_at!) - Date.parse(doc.created_at)).toBeGreaterThanOrEqual(1500);
    await expectNoLiveReservations(id);
    const deadline = Date.now() + 5000;
    while ((await workerView(id, "stage_1")).error?.code !== "cancelled") {
      if (Date.now() > deadline) throw new Error("the worker was not told to cancel");
      await scheduler.wait(25);
    }
  });
});

describe("the Execution object survives eviction and alarm misbehaviour", () => {
  it("completes after being evicted between handshake and completion", async () => {
    const { body } = await startExecution({ template_name: "course_creation", parameters: { steps: 3, step_ms: 120 }, client_id: "client_faults" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    await evictDurableObject(executionStub(id));
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages.every((s) => s.status === "completed" && s.attempts === 1)).toBe(true);
    await expectNoLiveReservations(id);
  });

  it("does nothing twice when its alarm fires twice in a row", async () => {
    const { body } = await startExecution({ template_name: "fault_single", parameters: { ...quick, fault: { mode: "hang" } }, client_id: "client_faults" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    // Make the next poll due now, then fire the alarm twice, in one visit: no round trip
    // between them (the object's own alarm may still fire, but its pass runs after ours).
    const polls = await runInDurableObject(executionStub(id), async (instance: { alarm(): Promise<void> }, state) => {
      const count = () => state.storage.sql.exec("SELECT polls FROM stages WHERE stage_id = 'stage_1'").one().polls as number;
      // First wait out a pass of the object's own that may be polling right now (its poll
      // would land between the counts): this firing runs after it.
      await instance.alarm();
      state.storage.sql.exec("UPDATE timers SET due_at = 0 WHERE name = 'poll'");
      const before = count();
      await instance.alarm();
      // The first firing polled and put the next poll one interval (100-500 ms here) on. A
      // loaded machine can reach the second firing later than that, when a poll is rightly
      // due: move it an hour on, from where the first firing left it, so a timer that firing
      // left due (the double effect this test is about) stays due.
      state.storage.sql.exec("UPDATE timers SET due_at = due_at + 3600000 WHERE name = 'poll'");
      const between = count();
      await instance.alarm();
      return { before, between, after: count() };
    });
    expect(polls.between).toBe(polls.before + 1);
    expect(polls.after).toBe(polls.between);
    await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    await expectNoLiveReservations(id);
  });

  it("heals a lost alarm on the next request", async () => {
    // A quiet object: an ended execution, its timers its retention (days away) and the
    // outbox timer that deletes its delivered rows (seconds away); the alarm heals to the earlier.
    const { body } = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_faults" });
    const id = body.execution_id as string;
    const stub = executionStub(id);
    await waitFor(id, ended);
    await expectNoLiveReservations(id);
    const earliest = await runInDurableObject(stub, async (_i, state) => {
      await state.storage.deleteAlarm();
      return state.storage.sql.exec("SELECT MIN(due_at) AS at FROM timers").one().at as number;
    });
    expect(await runInDurableObject(stub, (_i, state) => state.storage.getAlarm())).toBeNull();
    await status(id);
    expect(await runInDurableObject(stub, (_i, state) => state.storage.getAlarm())).toBe(earliest);
  });

  it("ends failed with the reason when its alarm keeps failing, instead of staying running", async () => {
    const { body } = await startExecution({ template_name: "fault_single", parameters: { ...quick, fault: { mode: "hang" } }, client_id: "client_faults" });
    const id = body.execution_id as string;
    const stub = executionStub(id);
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    // A fault inside the object: the statement every drive pass begins with (the take of its wake-up
    // timers: the timers' one delete, of wake-ups only, where due) throws from now on.
    const wakeUpsOnly = /^\[\["(advance|watchdog|execution)",""\](,\["(advance|watchdog|execution)",""\])*\]$/;
    await runInDurableObject(stub, (_instance, state) => {
      const sql = state.storage.sql;
      const exec = sql.exec.bind(sql);
      Object.defineProperty(sql, "exec", {
        value: (query: string, ...bindings: unknown[]) => {
          const wakeUps = /^\s*DELETE FROM timers/.test(query) && wakeUpsOnly.test(String(bindings[0])) && bindings[1] !== Number.MAX_SAFE_INTEGER;
          if (wakeUps) throw new Error("storage exploded");
          return exec(query, ...(bindings as SqlStorageValue[]));
        },
      });
    });
    for (let i = 0; i < 8 && (await status(id)).status === "running"; i++) {
      await runDurableObjectAlarm(stub).catch(() => {});
    }
    const doc = await status(id);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("internal_error");
    expect(doc.error?.message).toContain("storage exploded");
  });
});

describe("idempotent start", () => {
  it("fifty concurrent identical POST /execute with one request_id create one execution", async () => {
    const request = { template_name: "quick_summary", parameters: quick, client_id: "client_idem", request_id: `req-${crypto.randomUUID()}` };
    const answers = await Promise.all(Array.from({ length: 50 }, () => startExecution(request)));
    const ids = new Set(answers.map((a) => a.body.execution_id));
    expect(ids.size).toBe(1);
    expect(answers.filter((a) => a.res.status === 202)).toHaveLength(1);
    expect(answers.filter((a) => a.res.status === 200)).toHaveLength(49);
    const doc = await waitFor([...ids][0], ended);
    expect(doc.request_id).toBe(request.request_id);

    const conflict = await startExecution({ ...request, parameters: { ...quick, other: true } });
    expect(conflict.res.status).toBe(409);
    expect(conflict.body.error.code).toBe("idempotency_conflict");
    // The same request_id from another client is another request.
    const other = await startExecution({ ...request, client_id: "client_idem_2" });
    expect(other.res.status).toBe(202);
    expect(other.body.execution_id).not.toBe([...ids][0]);
  });

  it("the 202 goes to the start that created the execution, even when a duplicate's start reaches the object before the claimer's", async () => {
    // The first request claimed its request_id in the registry and is still on its way to
    // the Execution (the claimer arms the registry's alarm after writing; a duplicate's claim
    // does not wait for that). A duplicate then creates the execution: it, and only it, is
    // the 202. Answering from the claim instead gave the 202 to nobody under load.
    const request = { template_name: "quick_summary", parameters: quick, client_id: "client_idem", request_id: `req-${crypto.randomUUID()}` };
    const hash = await sha256Hex(canonical({ template_name: request.template_name, parameters: request.parameters, priority: "normal" }));
    const ns = env.REQUEST_REGISTRY;
    const claimed = await ns.get(ns.idFromName(request.client_id)).claim(request.request_id, hash, newExecutionId());
    expect(claimed.outcome).toBe("claimed");

    const duplicate = await startExecution(request);
    expect(duplicate.res.status).toBe(202);
    expect(duplicate.body.execution_id).toBe(claimed.executionId);
    // The claimer's start arrives after it: the execution exists, so 200.
    const claimer = await startExecution(request);
    expect(claimer.res.status).toBe(200);
    expect(claimer.body.execution_id).toBe(claimed.executionId);
    expect((await waitFor(claimed.executionId, ended)).status).toBe("completed");
  });
});

describe("template resilience", () => {
  it("uses a cached template when KAM is down, and says so", async () => {
    const name = "outage_cached";
    await env.EXECUTION_CACHE.put(
      `template:${name}`,
      JSON.stringify({
        fetched_at: Date.now() - 3_600_000,
        template: { template_id: "mt_cached_001", template_name: name, stages: [{ stage: 1, worker: "bitware-content-granulator", template_ref: "c1", action: "echo" }] },
      }),
    );
    const { body } = await startExecution({ template_name: name, parameters: quick, client_id: "client_faults" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.template_source).toBe("cache");
    expect(doc.template_id).toBe("mt_cached_001");
  });

  it("KAM slow (not down): POST /execute answers 202 before the template is loaded, and the execution still runs", async () => {
    // The demo KAM answers `slow1500_*` after 1.5 s, inside the 2 s KAM timeout of the tests.
    const { res, body } = await startExecution({ template_name: "slow1500_quick_summary", parameters: quick, client_id: "client_faults" });
    expect(res.status).toBe(202);
    expect(body.status).toBe("queued");
    // The answer came before KAM's: nothing of the template is known yet.
    const early = await status(body.execution_id);
    expect(early.template_id).toBeNull();
    expect(early.stages).toEqual([]);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.template_id).toBe("mt_quick_001");
    expect(doc.template_source).toBe("kam");
    // The estimate arrives after the 202, in the status document.
    expect(doc.estimated_completion_at).not.toBeNull();
  });

  it("fails with kam_unavailable after bounded retries when KAM is down and nothing is cached", async () => {
    const { body } = await startExecution({ template_name: "outage_uncached", parameters: quick, client_id: "client_faults" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("kam_unavailable");
  });
});
