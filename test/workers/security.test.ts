import { env } from "cloudflare:workers";
import { createExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { issueStageTokens, tokenExpiry, verifyToken } from "../../src/auth";
import { DEFAULT_TUNING } from "../../src/config";
import { ApiError } from "../../src/http";
import { KamApi } from "../../src/index";
import { handle } from "../../src/routes";
import { missingSecrets, workerSecret } from "../../src/secrets";
import { JSON_HEADERS, KAM, OPS, call, ended, mintToken, startExecution, status, waitFor } from "../support/api";
import { TEST_PREVIOUS_SECRETS, TEST_PREVIOUS_WORKER_SECRET, TEST_SECRETS, TEST_WORKER_SECRETS } from "../support/constants";

/**
 * Least privilege (issue 11): each worker has its own secret, tokens are keyed
 * by CALLBACK_SECRET and say what they are for and until when, every secret
 * rotates, a missing secret stops the service, stored bytes are served inert.
 */

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
const codeOf = async (res: Response) => ((await res.json()) as { error: { code: string } }).error.code;

/** A stage that stays `processing` until cancelled: a live target for callbacks. */
async function hangingStage() {
  const { body } = await startExecution({ template_name: "data_gated", parameters: { steps: 1, step_ms: 0, output_bytes: 10, fault: { stage: 1, mode: "hang" } }, client_id: "client_security" });
  const id = body.execution_id as string;
  const doc = await waitFor(id, (d) => d.stages[0].status === "processing");
  return { id, doc };
}

function complete(id: string, token: string, body: unknown = { output: { forged: true } }) {
  return call(`/executions/${id}/stages/stage_1/complete`, { method: "POST", headers: { ...bearer(token), ...JSON_HEADERS }, body: JSON.stringify(body) });
}

/** The status document without the fields that move while a stage runs on its own. */
function still(doc: Awaited<ReturnType<typeof status>>) {
  return doc.stages.map((s) => ({ stage_id: s.stage_id, status: s.status, attempts: s.attempts, output: (s as { output?: unknown }).output ?? null }));
}

async function cancel(id: string) {
  expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  await waitFor(id, ended);
}

const envWith = (vars: Record<string, string | undefined>) => ({ ...env, ...vars }) as unknown as Env;

describe("each stage worker has its own secret", () => {
  it("one worker's secret opens no other worker, and the orchestrator sends each its own", async () => {
    const stats = (worker: Fetcher, secret: string) => worker.fetch("https://worker.internal/api/stats", { headers: bearer(secret) });
    const capped = (env as unknown as { CAPPED_GRANULATOR: Fetcher }).CAPPED_GRANULATOR;
    const a = TEST_WORKER_SECRETS["bitware-content-granulator"];
    const b = TEST_WORKER_SECRETS["bitware-capped-granulator"];
    expect((await stats(env.CONTENT_GRANULATOR, a)).status).toBe(200);
    expect((await stats(capped, b)).status).toBe(200);
    const aOnB = await stats(capped, a);
    expect(aOnB.status).toBe(401);
    expect(await codeOf(aOnB)).toBe("unauthorized");
    expect((await stats(env.CONTENT_GRANULATOR, b)).status).toBe(401);
    // What the orchestrator sends: each worker's entry in WORKER_SECRETS, with no shared secret configured at all.
    expect((env as unknown as Record<string, unknown>).WORKER_SECRET).toBeUndefined();
    expect(workerSecret(env, "bitware-content-granulator")).toBe(a);
    expect(workerSecret(env, "bitware-capped-granulator")).toBe(b);
    // And with it a real execution runs on the granulator.
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_security" });
    expect((await waitFor(body.execution_id, ended)).status).toBe("completed");
  });

  it("falls back to the shared WORKER_SECRET for a worker WORKER_SECRETS does not name (migration)", () => {
    const migrating = envWith({ WORKER_SECRETS: JSON.stringify({ "bitware-capped-granulator": "own-secret" }), WORKER_SECRET: "shared-secret" });
    expect(workerSecret(migrating, "bitware-capped-granulator")).toBe("own-secret");
    expect(workerSecret(migrating, "bitware-content-granulator")).toBe("shared-secret");
    expect(workerSecret(envWith({ WORKER_SECRETS: "{}", WORKER_SECRET: undefined }), "bitware-content-granulator")).toBeNull();
  });

  it("a worker's secret cannot mint callback tokens: a token signed with it is refused and the stage is unaffected", async () => {
    const { id } = await hangingStage();
    const before = still(await status(id));
    for (const secret of Object.values(TEST_WORKER_SECRETS)) {
      const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 }, secret);
      const res = await complete(id, token);
      expect(res.status).toBe(401);
      expect(await codeOf(res)).toBe("unauthorized");
    }
    expect(still(await status(id))).toEqual(before);
    expect(before[0]).toMatchObject({ status: "processing", attempts: 1 });
    await cancel(id);
  });
});

describe("tokens say what they are for and expire", () => {
  it("an expired token is 401 token_expired and changes nothing", async () => {
    const { id } = await hangingStage();
    const before = still(await status(id));
    const expired = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1, expiresAt: Date.now() - 1 });
    const res = await complete(id, expired);
    expect(res.status).toBe(401);
    expect(await res.json()).toMatchObject({ error: { code: "token_expired" } });
    const progress = await call(`/executions/${id}/stages/stage_1/progress`, { method: "POST", headers: { ...bearer(expired), ...JSON_HEADERS }, body: JSON.stringify({ progress: 99 }) });
    expect(await codeOf(progress)).toBe("token_expired");
    expect(still(await status(id))).toEqual(before);
    // The same claims, not yet expired, are accepted: the expiry alone made the difference.
    const live = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1, expiresAt: Date.now() + 60_000 });
    const ok = await call(`/executions/${id}/stages/stage_1/progress`, { method: "POST", headers: { ...bearer(live), ...JSON_HEADERS }, body: JSON.stringify({ progress: 42 }) });
    expect(ok.status).toBe(200);
    expect((await status(id)).stages[0].progress).toBe(42);
    await cancel(id);
  });

  it("lives for the attempt's longest run plus the documented margin", () => {
    const now = 1_800_000_000_000;
    const t = { workerCallTimeoutMs: 10_000, callbackTokenMarginMs: DEFAULT_TUNING.callbackTokenMarginMs };
    expect(DEFAULT_TUNING.callbackTokenMarginMs).toBe(5 * 60_000);
    expect(tokenExpiry(now, 60_000, t)).toBe(now + 2 * 10_000 + 60_000 + 5 * 60_000);
  });

  it("a data token cannot call back (the other way round: the next test)", async () => {
    const { id } = await hangingStage();
    const before = still(await status(id));
    const data = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1, use: "data" });
    const res = await complete(id, data);
    expect(res.status).toBe(403);
    expect(await codeOf(res)).toBe("forbidden");
    expect(still(await status(id))).toEqual(before);
    await cancel(id);
  });

  it("a data token reads only the inputs of the stage it was issued for", async () => {
    const { body } = await startExecution({ template_name: "data_pipeline", parameters: { steps: 1, step_ms: 0, output_bytes: { stage_1: 100_000, stage_2: 100_000, stage_3: 10 } }, client_id: "client_security" });
    const id = body.execution_id as string;
    expect((await waitFor(id, ended)).status).toBe("completed");
    // Each stored output has a key of its own (attempt, nonce, name).
    const keyOf = async (stage: string) => (await env.DATA_REFS.list({ prefix: `kv/${id}/${stage}/a1-` })).keys.map((k) => k.name)[0];
    const key1 = await keyOf("stage_1");
    const key2 = await keyOf("stage_2");
    expect(await env.DATA_REFS.get(key1)).not.toBeNull();
    expect(await env.DATA_REFS.get(key2)).not.toBeNull();
    // Stage 3's input is stage 2's output.
    const stage3 = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" });
    const own = await call(`/data/${key2}`, { headers: bearer(stage3) });
    expect(own.status).toBe(200);
    expect(new Uint8Array(await own.arrayBuffer())).toEqual(new Uint8Array((await env.DATA_REFS.get(key2, "arrayBuffer"))!));
    const other = await call(`/data/${key1}`, { headers: bearer(stage3) });
    expect(other.status).toBe(403);
    expect(await other.json()).toMatchObject({ error: { code: "forbidden", message: expect.stringContaining("inputs of stage_3") } });
    // The stage's callback token, genuine and live, is not a read token.
    const callbackToken = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1 });
    const withCallback = await call(`/data/${key2}`, { headers: bearer(callbackToken) });
    expect(withCallback.status).toBe(403);
    expect(await codeOf(withCallback)).toBe("forbidden");
    const expired = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data", expiresAt: Date.now() - 1 });
    expect(await codeOf(await call(`/data/${key2}`, { headers: bearer(expired) }))).toBe("token_expired");
  });

  it("issues a stage's callback and data tokens with its claims and an expiry, signed with the current CALLBACK_SECRET only", async () => {
    const now = Date.now();
    const stage = { executionId: "exec_1764000000000_V1StGXR8Z5jdHi6B", stageId: "stage_2", attempt: 3, timeoutMs: 60_000 };
    const { token, dataToken } = await issueStageTokens(env, stage, now);
    const req = (t: string) => new Request("https://x.internal/", { headers: bearer(t) });
    const currentOnly = envWith({ CALLBACK_SECRET: TEST_SECRETS.CALLBACK_SECRET, CALLBACK_SECRET_PREVIOUS: undefined });
    const previousOnly = envWith({ CALLBACK_SECRET: TEST_PREVIOUS_SECRETS.CALLBACK_SECRET_PREVIOUS, CALLBACK_SECRET_PREVIOUS: undefined });
    const expiresAt = tokenExpiry(now, 60_000, env.TUNING ? { ...DEFAULT_TUNING, ...JSON.parse(env.TUNING) } : DEFAULT_TUNING);
    expect(await verifyToken(req(token), currentOnly, { executionId: stage.executionId, stageId: "stage_2", use: "callback" }, now)).toEqual({
      executionId: stage.executionId,
      stageId: "stage_2",
      attempt: 3,
      expiresAt,
      use: "callback",
    });
    expect(await verifyToken(req(dataToken), currentOnly, { executionId: stage.executionId, use: "data" }, now)).toEqual({ executionId: stage.executionId, stageId: "stage_2", attempt: 3, expiresAt, use: "data" });
    for (const t of [token, dataToken]) {
      try {
        await verifyToken(req(t), previousOnly, { executionId: stage.executionId, use: t === token ? "callback" : "data" }, now);
        expect.unreachable("a token the previous secret verifies was signed with it");
      } catch (err) {
        expect(err).toBeInstanceOf(ApiError);
        expect((err as ApiError).code).toBe("unauthorized");
      }
    }
    // Past its expiry the same token is refused with token_expired.
    try {
      await verifyToken(req(token), currentOnly, { executionId: stage.executionId, use: "callback" }, expiresAt);
      expect.unreachable("an expired token verified");
    } catch (err) {
      expect((err as ApiError).code).toBe("token_expired");
    }
  });
});

describe("a fan-out item's tokens are its own", () => {
  const graphWorker = (env as unknown as { GRAPH_GRANULATOR: Fetcher }).GRAPH_GRANULATOR;
  const itemDoc = async (id: string, itemId: string) => {
    const res = await call(`/executions/${id}/stages/stage_2/items`, { headers: OPS });
    const page = (await res.json()) as { items: { stage_id: string; status: string; attempts: number; output?: unknown }[] };
    return page.items.find((i) => i.stage_id === itemId)!;
  };
  const completeItem = (id: string, itemId: string, token: string) =>
    call(`/executions/${id}/stages/${itemId}/complete`, { method: "POST", headers: { ...bearer(token), ...JSON_HEADERS }, body: JSON.stringify({ output: { by: "test" } }) });

  it("the tokens an item is issued name the item: its worker's callbacks on the item's own route are accepted", async () => {
    // Three steps each: the items call back `progress` while they still run.
    const { body } = await startExecution({ template_name: "graph_fan_out", parameters: { items: 2, steps: 3, step_ms: 100 }, client_id: "client_security" });
    const id = body.execution_id as string;
    expect((await waitFor(id, ended)).status).toBe("completed");
    // The worker called back with the tokens its handshake carried; the route checks the token's stage
    // against the path, so a progress answered 200 on /stages/stage_2.{i}/progress means the token named that item.
    for (const itemId of ["stage_2.0", "stage_2.1"]) {
      const res = await graphWorker.fetch(`https://graph.internal/api/jobs/${id}?stageId=${itemId}`, { headers: bearer(TEST_WORKER_SECRETS["bitware-graph-granulator"]) });
      const job = (await res.json()) as { log: { what: string; status: number }[] };
      const callbacks = job.log.filter((e) => e.what.startsWith("callback:"));
      expect(callbacks.some((e) => e.what === "callback:progress" && e.status === 200), itemId).toBe(true);
      expect(callbacks.filter((e) => e.status === 401 || e.status === 403), itemId).toEqual([]);
    }
  });

  it("another item's token, or the fan-out stage's, is refused (403) on an item and changes nothing; the item's own is accepted", async () => {
    // Both items hang (they stay processing until the test acts).
    const { body } = await startExecution({ template_name: "graph_fan_out", parameters: { items: 2, steps: 1, step_ms: 0, fault: { stage: 2, mode: "hang" } }, client_id: "client_security" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[1]?.items?.running === 2);
    // On their worker, and `processing` once pollInitialMs passed without a callback (steps.ts handshake).
    for (const item of ["stage_2.0", "stage_2.1"]) {
      const deadline = Date.now() + 10_000;
      while ((await itemDoc(id, item)).status !== "processing" && Date.now() < deadline) await scheduler.wait(25);
    }
    for (const other of ["stage_2.0", "stage_2"]) {
      const token = await mintToken({ executionId: id, stageId: other, attempt: 1 });
      const res = await completeItem(id, "stage_2.1", token);
      expect(res.status, other).toBe(403);
      expect(await res.json()).toMatchObject({ error: { code: "forbidden", message: expect.stringContaining("another execution or stage") } });
    }
    expect(await itemDoc(id, "stage_2.1")).toMatchObject({ status: "processing", attempts: 1 });
    // The same claims with the item's own id: accepted, and only that item moves.
    const own = await completeItem(id, "stage_2.1", await mintToken({ executionId: id, stageId: "stage_2.1", attempt: 1 }));
    expect(own.status).toBe(200);
    expect(await itemDoc(id, "stage_2.1")).toMatchObject({ status: "completed" });
    expect(await itemDoc(id, "stage_2.0")).toMatchObject({ status: "processing" });
    await cancel(id);
  });
});

describe("execution control needs KAM or OPS rights", () => {
  it("pause, resume, cancel, rerun, approve, reject and live tickets refuse anyone else with 401, and change nothing", async () => {
    const { body } = await startExecution({ template_name: "approval_pipeline", parameters: { echo: { draft: "v1" } }, client_id: "client_security" });
    const id = body.execution_id as string;
    const before = await waitFor(id, (d) => d.stages[1]?.status === "awaiting_approval");
    // What a stage worker holds (its callback and data tokens) and what a page gets (a live ticket) are no rights here.
    const callback = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    const data = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" });
    const ticket = ((await (await call(`/executions/${id}/live-ticket`, { method: "POST", headers: OPS })).json()) as { ticket: string }).ticket;
    const callers: [string, Record<string, string>][] = [
      ["no token", {}],
      ["a wrong token", bearer("nope")],
      ["a stage's callback token", bearer(callback)],
      ["a stage's data token", bearer(data)],
      ["a live ticket", bearer(ticket)],
      ["the CALLBACK_SECRET itself", bearer(TEST_SECRETS.CALLBACK_SECRET)],
    ];
    const routes = ["pause", "resume", "cancel", "rerun", "stages/stage_2/approve", "stages/stage_2/reject", "live-ticket"];
    for (const [who, headers] of callers) {
      for (const route of routes) {
        const res = await call(`/executions/${id}/${route}`, { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: "{}" });
        expect(res.status, `${route} with ${who}`).toBe(401);
        expect(await codeOf(res), `${route} with ${who}`).toBe("unauthorized");
      }
    }
    const after = await status(id);
    expect(after.status).toBe("running");
    expect(still(after)).toEqual(still(before));
    expect(after.stages[1].decision).toBeUndefined();
    expect(after.reruns).toEqual([]);
    await cancel(id);
  });
});

describe("every secret rotates: the current and the previous value verify", () => {
  it("a callback token signed with CALLBACK_SECRET_PREVIOUS is still accepted", async () => {
    const { id } = await hangingStage();
    const old = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 }, TEST_PREVIOUS_SECRETS.CALLBACK_SECRET_PREVIOUS);
    const res = await call(`/executions/${id}/stages/stage_1/progress`, { method: "POST", headers: { ...bearer(old), ...JSON_HEADERS }, body: JSON.stringify({ progress: 37 }) });
    expect(res.status).toBe(200);
    expect((await status(id)).stages[0].progress).toBe(37);
    // A secret that is neither is not.
    const neither = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 }, "some-other-secret-0123456789abcdef0123");
    expect(await codeOf(await call(`/executions/${id}/stages/stage_1/progress`, { method: "POST", headers: { ...bearer(neither), ...JSON_HEADERS }, body: JSON.stringify({ progress: 50 }) }))).toBe("unauthorized");
    expect((await status(id)).stages[0].progress).toBe(37);
    await cancel(id);
  });

  it("KAM_TOKEN_PREVIOUS and OPS_TOKEN_PREVIOUS still authenticate, each for its own role", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_security" }, bearer(TEST_PREVIOUS_SECRETS.KAM_TOKEN_PREVIOUS));
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended);
    const read = await call(`/executions/${id}`, { headers: bearer(TEST_PREVIOUS_SECRETS.OPS_TOKEN_PREVIOUS) });
    expect(read.status).toBe(200);
    expect(await read.json()).toEqual(doc);
    const pools = await call("/resources", { headers: bearer(TEST_PREVIOUS_SECRETS.OPS_TOKEN_PREVIOUS) });
    expect(pools.status).toBe(200);
    expect(((await pools.json()) as { pools: unknown[] }).pools.length).toBeGreaterThan(0);
    // The previous KAM token is KAM's, not an operator's.
    expect((await call("/resources", { headers: bearer(TEST_PREVIOUS_SECRETS.KAM_TOKEN_PREVIOUS) })).status).toBe(401);
  });

  it("the worker kit accepts WORKER_SECRET_PREVIOUS while a worker's secret is rotated", async () => {
    const stats = (secret: string) => env.CONTENT_GRANULATOR.fetch("https://worker.internal/api/stats", { headers: bearer(secret) });
    expect((await stats(TEST_WORKER_SECRETS["bitware-content-granulator"])).status).toBe(200);
    expect((await stats(TEST_PREVIOUS_WORKER_SECRET)).status).toBe(200);
    expect((await stats("not-the-secret-0123456789abcdef")).status).toBe(401);
  });
});

describe("missing or empty secrets: the orchestrator refuses to serve", () => {
  const ctx = () => createExecutionContext();
  const get = (e: Env, path: string, init: RequestInit = {}) => handle(new Request(`http://orchestrator.test${path}`, init), e, ctx());

  it("answers 503 misconfigured on every route but /health, which names what is missing and no value", async () => {
    const broken = envWith({ CALLBACK_SECRET: "", OPS_TOKEN: undefined });
    expect(missingSecrets(broken)).toEqual(["CALLBACK_SECRET", "OPS_TOKEN"]);
    for (const [path, init] of [
      ["/executions", { headers: KAM }],
      ["/execute", { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: "{}" }],
      ["/executions/exec_1764000000000_V1StGXR8Z5jdHi6B", { headers: KAM }],
      ["/executions/exec_1764000000000_V1StGXR8Z5jdHi6B/stages/stage_1/complete", { method: "POST", headers: JSON_HEADERS, body: "{}" }],
      ["/data/kv/exec_1764000000000_V1StGXR8Z5jdHi6B/stage_1/x", {}],
      ["/resources", { headers: OPS }],
      ["/ui", {}],
      ["/nope", {}],
    ] as [string, RequestInit][]) {
      const res = await get(broken, path, init);
      expect(res.status, path).toBe(503);
      expect(await res.json(), path).toMatchObject({ error: { code: "misconfigured" } });
    }
    const health = await get(broken, "/health");
    expect(health.status).toBe(503);
    const text = await health.text();
    expect(JSON.parse(text)).toMatchObject({ status: "misconfigured", missing: ["CALLBACK_SECRET", "OPS_TOKEN"] });
    for (const value of [TEST_SECRETS.KAM_TOKEN, TEST_SECRETS.CALLBACK_SECRET, ...Object.values(TEST_WORKER_SECRETS)]) expect(text).not.toContain(value);
    // The same env with its secrets serves.
    expect((await get(env, "/health")).status).toBe(200);
    expect((await get(env, "/executions", { headers: KAM })).status).toBe(200);
  });

  it("refuses KAM's RPC methods with misconfigured too", async () => {
    const broken = envWith({ CALLBACK_SECRET: "" });
    const api = new KamApi(ctx() as never, broken);
    const answer = await api.getStatus("exec_1764000000000_V1StGXR8Z5jdHi6B");
    expect(answer).toMatchObject({ ok: false, status: 503, error: { code: "misconfigured" } });
    // The same entrypoint with the real env answers (here: no such execution).
    expect(await new KamApi(ctx() as never, env).getStatus("exec_1764000000000_V1StGXR8Z5jdHi6B")).toMatchObject({ ok: false, status: 404 });
  });

  it("counts a short CALLBACK_SECRET, a bound worker with no secret and an unreadable WORKER_SECRETS as missing", () => {
    expect(missingSecrets(envWith({ CALLBACK_SECRET: "short" }))).toEqual(["CALLBACK_SECRET (shorter than 32 characters)"]);
    expect(missingSecrets(envWith({ WORKER_SECRETS: JSON.stringify({ "bitware-content-granulator": "s" }) }))).toEqual([
      "WORKER_SECRETS.bitware-capped-granulator (or WORKER_SECRET)",
      "WORKER_SECRETS.bitware-graph-granulator (or WORKER_SECRET)",
    ]);
    expect(missingSecrets(envWith({ WORKER_SECRETS: "{not json" }))).toEqual(["WORKER_SECRETS (not a JSON object of non-empty strings)"]);
    expect(missingSecrets(envWith({ WORKER_SECRETS: JSON.stringify({ "bitware-content-granulator": " " }) }))).toEqual([
      "WORKER_SECRETS (not a JSON object of non-empty strings)",
    ]);
    expect(missingSecrets(envWith({ KAM_TOKEN: "   " }))).toEqual(["KAM_TOKEN"]);
    expect(missingSecrets(env)).toEqual([]);
  });
});

describe("stored bytes are served inert", () => {
  const INERT = { "x-content-type-options": "nosniff", "content-disposition": "attachment", "content-security-policy": "default-src 'none'" };
  const headersOf = (res: Response) => Object.fromEntries(Object.keys(INERT).map((k) => [k, res.headers.get(k)]));

  it("result/content (inline and by reference) and /data answers carry nosniff, attachment and default-src 'none'", async () => {
    const inline = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_security" });
    await waitFor(inline.body.execution_id, ended);
    const small = await call(`/executions/${inline.body.execution_id}/result/content`, { headers: KAM });
    expect(small.status).toBe(200);
    expect(headersOf(small)).toEqual(INERT);
    await small.body?.cancel();

    const { body } = await startExecution({ template_name: "data_pipeline", parameters: { steps: 1, step_ms: 0, output_bytes: { stage_1: 10, stage_2: 100_000, stage_3: 100_000 } }, client_id: "client_security" });
    const id = body.execution_id as string;
    expect((await waitFor(id, ended)).status).toBe("completed");
    const content = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(content.status).toBe(200);
    expect(headersOf(content)).toEqual(INERT);
    expect((await content.arrayBuffer()).byteLength).toBeGreaterThan(64 * 1024);
    const key = (await env.DATA_REFS.list({ prefix: `kv/${id}/stage_2/a1-` })).keys.map((k) => k.name)[0];
    const data = await call(`/data/${key}`, { headers: bearer(await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" })) });
    expect(data.status).toBe(200);
    expect(headersOf(data)).toEqual(INERT);
    await data.body?.cancel();
  });
});
