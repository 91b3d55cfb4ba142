import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import type { DataReference } from "../../schemas/data";
import { JSON_HEADERS, KAM, call, ended, mintToken, startExecution, waitFor } from "../support/api";
import { TEST_WORKER_SECRETS } from "../support/constants";

/**
 * The worker kit (packages/worker-kit), through the granulator built on it:
 * protocol calls made directly to the worker (as the orchestrator makes them),
 * and whole executions where the kit calls the orchestrator back.
 */

const SECRET = { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` };

function granulator(path: string, init: RequestInit = {}): Promise<Response> {
  return env.CONTENT_GRANULATOR.fetch(`https://bitware-content-granulator.internal${path}`, init);
}

async function post(path: string, body: unknown, headers: Record<string, string> = SECRET): Promise<Response> {
  return granulator(path, { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: typeof body === "string" ? body : JSON.stringify(body) });
}

async function get(path: string): Promise<{ status: number; body: any }> {
  const res = await granulator(path, { headers: SECRET });
  return { status: res.status, body: await res.json() };
}

const inspect = (id: string, stageId = "stage_1") => get(`/api/jobs/${id}?stageId=${stageId}`);
const progressOf = (id: string, stageId = "stage_1") => get(`/api/progress/${id}?stageId=${stageId}`);

let n = 0;
/** A fresh, well-formed execution id the orchestrator does not know (callbacks for it answer 404). */
function newId(): string {
  return `exec_${Date.now()}_kittest${String(++n).padStart(6, "0")}`;
}

async function handshakeBody(executionId: string, attempt: number, parameters: Record<string, unknown> = {}) {
  const token = await mintToken({ executionId, stageId: "stage_1", attempt });
  return {
    executionId,
    stageId: "stage_1",
    attempt,
    action: "echo",
    inputData: { parameters: { echo: { hello: "kit" }, steps: 2, step_ms: 20, ...parameters }, template_ref: "kit_v1", previousOutput: null },
    resourceRequirements: { estimatedTokens: 10, timeoutMs: 60_000 },
    validationConfig: {},
    callback: { url: `http://orchestrator-v2.internal/executions/${executionId}/stages/stage_1`, token },
  };
}

/** Reads the job's progress answer until `done`, with a deadline. */
async function waitForProgress(id: string, done: (p: any) => boolean, timeoutMs = 10_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown = null;
  while (Date.now() < deadline) {
    const p = await progressOf(id);
    last = p.body;
    if (p.status === 200 && done(p.body)) return p.body;
    await scheduler.wait(20);
  }
  throw new Error(`progress condition not reached within ${timeoutMs} ms; last: ${JSON.stringify(last)}`);
}

type LogEntry = { what: string; status: number; detail: string | null; attempt: number };

/** The job object of one stage, through the test-only KIT_JOBS binding (vitest.config.ts). */
interface JobHooks {
  loseAlarm(): Promise<{ lost: boolean }>;
  alarmAt(): Promise<number | null>;
}
function jobObject(id: string, stageId = "stage_1"): JobHooks {
  const ns = (env as unknown as { KIT_JOBS: DurableObjectNamespace }).KIT_JOBS;
  return ns.get(ns.idFromName(`${id}:${stageId}`)) as unknown as JobHooks;
}

describe("worker kit: the protocol endpoints", () => {
  it("a job whose alarm was lost with work due is re-armed by the next progress poll, and finishes", async () => {
    const id = newId();
    // 60 steps of 100 ms: each step runs from the job's alarm.
    expect((await post("/api/handshake", await handshakeBody(id, 1, { steps: 60, step_ms: 100 }))).status).toBe(200);
    expect((await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 1 })).status).toBe(202);
    await waitForProgress(id, (p) => p.status === "processing" && p.progress > 0);
    const job = jobObject(id);
    // Drop the alarm at a moment no alarm handler runs (one would set it again at its end), and keep it
    // dropped only once it has stayed lost for four step times with nobody polling (an alarm already on its
    // way when it was dropped may still fire once and set the next one): the job has not moved meanwhile.
    // An alarm handler runs while it delivers the job's progress callbacks, which a loaded machine makes slow: try for a while.
    let stuck = false;
    for (const until = Date.now() + 5_000; !stuck && Date.now() < until; ) {
      if (!(await job.loseAlarm()).lost) {
        await scheduler.wait(10);
        continue;
      }
      const before = (await inspect(id)).body;
      await scheduler.wait(400);
      const after = (await inspect(id)).body;
      stuck = after.status === "processing" && after.progress === before.progress && (await job.alarmAt()) === null;
    }
    expect(stuck).toBe(true);
    // One progress poll, as the orchestrator makes them, re-arms it; the job then runs to its end.
    expect((await progressOf(id)).body).toMatchObject({ status: "processing" });
    expect(await job.alarmAt()).not.toBeNull();
    const done = await waitForProgress(id, (p) => p.status === "completed");
    expect(done).toMatchObject({ status: "completed", progress: 100 });
  });

  it("checks WORKER_SECRET on every /api call and validates bodies with the protocol schemas", async () => {
    const id = newId();
    const body = await handshakeBody(id, 1);
    expect((await post("/api/handshake", body, {})).status).toBe(401);
    const wrong = await post("/api/handshake", body, { authorization: "Bearer not-the-secret" });
    expect(wrong.status).toBe(401);
    expect(await wrong.json()).toMatchObject({ error: { code: "unauthorized" } });
    expect((await granulator(`/api/progress/${id}?stageId=stage_1`)).status).toBe(401);

    const broken = await post("/api/handshake", "not json{");
    expect(broken.status).toBe(400);
    expect(await broken.json()).toMatchObject({ error: { code: "invalid_json" } });
    const invalid = await post("/api/handshake", { ...body, executionId: "exec_nope", attempt: 0 });
    expect(invalid.status).toBe(400);
    const err = ((await invalid.json()) as { error: { code: string; details: { path: string[] }[] } }).error;
    expect(err.code).toBe("invalid_request");
    expect(err.details.map((d) => d.path.join("."))).toEqual(expect.arrayContaining(["executionId", "attempt"]));

    const method = await granulator("/api/handshake", { headers: SECRET });
    expect(method.status).toBe(405);
    expect(method.headers.get("allow")).toBe("POST");
    await method.body?.cancel();
    expect((await granulator("/health")).status).toBe(200);
    // Nothing was created by the refused calls.
    expect((await inspect(id)).status).toBe(404);
  });

  it("answers a repeated handshake for the same attempt with the same answer, without restarting the job", async () => {
    const id = newId();
    const body = await handshakeBody(id, 1);
    const first = await post("/api/handshake", body);
    expect(first.status).toBe(200);
    const answer = await first.json();
    expect(answer).toMatchObject({ executionId: id, workerId: "bitware-content-granulator", accepted: true });
    expect((answer as { capabilities: { actions: string[] } }).capabilities.actions).toEqual(["outline", "chapters", "summary", "echo", "list", "gather", "write_chapter", "quiz", "assemble", "blob"]);

    expect((await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 1 })).status).toBe(202);
    const done = await waitForProgress(id, (p) => p.status === "completed");
    expect(done).toMatchObject({ status: "completed", progress: 100, output: { hello: "kit" } });
    expect(done.usage["tokens:openai"]).toBeGreaterThan(0);

    // The orchestrator repeats an interrupted handshake: same answer, and the finished job stays finished.
    const again = await post("/api/handshake", body);
    expect(await again.json()).toEqual(answer);
    const job = await inspect(id);
    expect(job.body).toMatchObject({ attempt: 1, status: "completed", progress: 100 });
    expect(await (await progressOf(id)).body).toEqual(done);
    // A repeated process is a no-op too.
    expect((await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 1 })).status).toBe(202);
    expect((await inspect(id)).body.status).toBe("completed");
  });

  it("lets a higher attempt replace the job, refuses a lower one, and ignores process and cancel for an older attempt", async () => {
    const id = newId();
    expect((await post("/api/handshake", await handshakeBody(id, 1, { steps: 5, step_ms: 200 }))).status).toBe(200);
    expect((await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 1 })).status).toBe(202);
    expect((await inspect(id)).body).toMatchObject({ attempt: 1, status: "processing" });

    const second = (await (await post("/api/handshake", await handshakeBody(id, 2, { echo: "second" }))).json()) as { accepted: boolean };
    expect(second.accepted).toBe(true);
    expect((await inspect(id)).body).toMatchObject({ attempt: 2, status: "accepted", progress: 0 });

    const late = (await (await post("/api/handshake", await handshakeBody(id, 1))).json()) as { accepted: boolean; retryable: boolean; reason: string };
    expect(late).toMatchObject({ accepted: false, retryable: false });
    expect(late.reason).toContain("superseded by attempt 2");

    const oldProcess = await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 1 });
    expect(oldProcess.status).toBe(409);
    expect(await oldProcess.json()).toMatchObject({ error: { code: "stale_attempt" } });
    const oldCancel = await post("/api/cancel", { executionId: id, stageId: "stage_1", attempt: 1 });
    expect(oldCancel.status).toBe(409);
    await oldCancel.body?.cancel();
    // Neither touched attempt 2: it still waits for its own process.
    expect((await inspect(id)).body).toMatchObject({ attempt: 2, status: "accepted" });
    expect((await progressOf(id)).body).toMatchObject({ status: "processing", progress: 0 });
    const future = await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 3 });
    expect(future.status).toBe(404);
    await future.body?.cancel();

    expect((await post("/api/process", { executionId: id, stageId: "stage_1", attempt: 2 })).status).toBe(202);
    const done = await waitForProgress(id, (p) => p.status === "completed");
    expect(done.output).toBe("second");
  });

  it("cancels a running job: it reports cancelled, drops its queued callbacks, and refuses a later process", async () => {
    const id = newId();
    await post("/api/handshake", await handshakeBody(id, 1, { fault: { mode: "hang" } }));
    expect((await post("/api/process", { executionId: id, stageId: "stage_1" })).status).toBe(202);
    expect((await inspect(id)).body.status).toBe("processing");
    const cancel = await post("/api/cancel", { executionId: id, stageId: "stage_1", attempt: 1 });
    expect(await cancel.json()).toEqual({ cancelled: true });
    expect((await progressOf(id)).body).toMatchObject({ status: "failed", error: { code: "cancelled" }, retryable: false });
    expect((await inspect(id)).body).toMatchObject({ status: "cancelled", pending_callbacks: 0, lifecycle: { active: false } });
    const process = await post("/api/process", { executionId: id, stageId: "stage_1" });
    expect(process.status).toBe(409);
    await process.body?.cancel();
  });

  it("runs the fault hooks off the happy path: process_500_once, malformed progress, refuse_retryable", async () => {
    const id = newId();
    await post("/api/handshake", await handshakeBody(id, 1, { fault: { mode: "process_500_once" } }));
    expect((await post("/api/process", { executionId: id, stageId: "stage_1" })).status).toBe(500);
    expect((await inspect(id)).body.status).toBe("accepted");
    expect((await post("/api/process", { executionId: id, stageId: "stage_1" })).status).toBe(202);
    await waitForProgress(id, (p) => p.status === "completed");

    const bad = newId();
    await post("/api/handshake", await handshakeBody(bad, 1, { fault: { mode: "malformed" } }));
    await post("/api/process", { executionId: bad, stageId: "stage_1" });
    const raw = await granulator(`/api/progress/${bad}?stageId=stage_1`, { headers: SECRET });
    expect(await raw.text()).toBe("not json{");
    await post("/api/cancel", { executionId: bad, stageId: "stage_1" });

    const busy = newId();
    const refused = await (await post("/api/handshake", await handshakeBody(busy, 1, { fault: { mode: "refuse_retryable" } }))).json();
    expect(refused).toMatchObject({ accepted: false, retryable: true });
    expect((await inspect(busy)).status).toBe(404); // a refusal creates no job
    const accepted = await (await post("/api/handshake", await handshakeBody(busy, 2, { fault: { mode: "refuse_retryable" } }))).json();
    expect(accepted).toMatchObject({ accepted: true });
  });

  it("fails an output over the 64 MiB upload limit with output_too_large, without uploading", async () => {
    const id = newId();
    const body = await handshakeBody(id, 1, { steps: 1, step_ms: 0, output_bytes: 64 * 1024 * 1024 + 1 });
    await post("/api/handshake", { ...body, action: "blob" });
    expect((await post("/api/process", { executionId: id, stageId: "stage_1" })).status).toBe(202);
    const failed = await waitForProgress(id, (p) => p.status === "failed");
    expect(failed).toMatchObject({ status: "failed", error: { code: "output_too_large" }, retryable: false });
    expect(failed.usage.compute_ms).toBeGreaterThan(0);
    const log = (await inspect(id)).body.log as LogEntry[];
    expect(log.some((e) => e.what === "upload")).toBe(false);
    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects).toEqual([]);
  });

  it("counts jobs in GET /api/stats as the worker sees them", async () => {
    const before = (await get("/api/stats")).body as Record<string, number>;
    expect(Object.keys(before).sort()).toEqual(["cancelled", "completed", "failed", "max_concurrent", "processing", "started"]);
    const id = newId();
    await post("/api/handshake", await handshakeBody(id, 1));
    await post("/api/process", { executionId: id, stageId: "stage_1" });
    await waitForProgress(id, (p) => p.status === "completed");
    const after = (await get("/api/stats")).body as Record<string, number>;
    // Other test files share the worker: only growth can be asserted.
    expect(after.started).toBeGreaterThanOrEqual(before.started + 1);
    expect(after.completed).toBeGreaterThanOrEqual(before.completed + 1);
    expect(after.max_concurrent).toBeGreaterThanOrEqual(1);
  });
});

describe("worker kit: callbacks and data through the orchestrator", () => {
  it("sends progress and complete callbacks with the stage's callback token", async () => {
    // Steps of 300 ms: each progress callback goes out right after its step, long before the work can end.
    const { body } = await startExecution({ template_name: "data_relay", parameters: { echo: "hi", steps: 3, step_ms: 300 }, client_id: "client_kit" });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    const job = await inspect(body.execution_id);
    const log = job.body.log as LogEntry[];
    // Two progress callbacks between three steps, accepted with the genuine token (a wrong one is 401).
    expect(log.filter((e) => e.what === "callback:progress").map((e) => e.status)).toEqual([200, 200]);
    const complete = log.filter((e) => e.what === "callback:complete");
    expect(complete).toHaveLength(1);
    // 200, or 409 in the rare case where a progress poll saw the result first; never 401/403.
    expect([200, 409]).toContain(complete[0].status);
  });

  it("a forged token is refused (401) and the real one is accepted (wrong_token fault)", async () => {
    const { body } = await startExecution({
      template_name: "fault_single_long",
      parameters: { echo: "hi", steps: 1, step_ms: 0, fault: { mode: "wrong_token" } },
      client_id: "client_kit",
    });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // The stage may end by a poll before the kit's callbacks are answered and logged: wait for both entries.
    const complete = await vi.waitFor(
      async () => {
        const entries = ((await inspect(body.execution_id)).body.log as LogEntry[]).filter((e) => e.what === "callback:complete");
        if (entries.length < 2) throw new Error(`${entries.length} complete callbacks logged so far`);
        return entries;
      },
      { timeout: 10_000, interval: 50 },
    );
    expect(complete.map((e) => e.detail)).toEqual(["alternate token", null]);
    expect(complete[0].status).toBe(401);
    expect([200, 409]).toContain(complete[1].status);
  });

  it("uploads an output over the threshold, reports it by reference, and the next stage reads it through the orchestrator", async () => {
    const size = 2 * 1024 * 1024;
    const { body } = await startExecution({
      template_name: "data_relay",
      parameters: { steps: 1, step_ms: 0, output_bytes: size, fault: { stage: 1, mode: "large_output" } },
      client_id: "client_kit",
    });
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");

    // Stage 1: its 2 MiB JSON string went up with PUT /data (201) and the complete named the reference.
    const s1 = (await inspect(id, "stage_1")).body;
    const ref1 = s1.dataReference as DataReference;
    expect(ref1).toMatchObject({ kind: "r2", contentType: "application/json", size: size + 2 });
    expect(ref1.key).toMatch(new RegExp(`^r2/${id}/stage_1/a1-[A-Za-z0-9]{12}-output\\.json$`));
    expect((s1.log as LogEntry[]).find((e) => e.what === "upload")).toMatchObject({ status: 201 });
    const p1 = (await progressOf(id, "stage_1")).body;
    expect(p1).toEqual({ status: "completed", progress: 100, dataReference: ref1, usage: s1.usage });
    const stored = await env.DATA.get(ref1.key);
    expect(stored?.size).toBe(ref1.size);
    await stored?.body.cancel();

    // Stage 2 (echo) read stage 1's output by reference and produced the same bytes, uploaded again.
    const ref2 = (await inspect(id, "stage_2")).body.dataReference as DataReference;
    expect(ref2).toMatchObject({ kind: "r2", size: ref1.size, sha256: ref1.sha256 });
    expect(ref2.key).toMatch(new RegExp(`^r2/${id}/stage_2/a1-[A-Za-z0-9]{12}-output\\.json$`));

    const result = (await (await call(`/executions/${id}/result`, { headers: KAM })).json()) as { output_reference: DataReference };
    expect(result.output_reference).toEqual(ref2);
    const text = (await (await call(`/executions/${id}/result/content`, { headers: KAM })).json()) as string;
    expect(typeof text).toBe("string");
    expect(text.length).toBe(size);
  });
});
