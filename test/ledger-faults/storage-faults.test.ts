import { env } from "cloudflare:workers";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { StoreCall, StoreFault } from "../support/faulty-store/index";
import { KAM, call, ended, expectNoLiveReservations, expireNow, mintToken, startExecution, status, until, waitFor } from "../support/api";

/**
 * The stage-data stores made slow or failing for real: in this project the
 * orchestrator reaches KV and R2 through DATA_KV_BINDING and DATA_R2_BINDING,
 * which name real entrypoints in front of the same namespace and bucket
 * (test/support/faulty-store). A KV or R2 call inside a drive pass gives up
 * after storageCallTimeoutMs (2 s here), retention after 6 x that (12 s).
 * A stall here lasts 120 s, twice the test's own timeout: an execution that
 * moves on while one is outstanding was not blocked by it.
 */
interface FaultyStore {
  setFault(fault: StoreFault): Promise<void>;
  clearFaults(store?: StoreFault["store"], method?: string): Promise<void>;
  calls(store?: StoreFault["store"], method?: string): Promise<StoreCall[]>;
  resetCalls(): Promise<void>;
}
const store = () => (env as unknown as { FAULTY_STORE: FaultyStore }).FAULTY_STORE;
const STALL_MS = 120_000;

/** The real namespace and bucket, past the stand-in. */
const kvKeys = async (id: string) => (await env.DATA_REFS.list({ prefix: `kv/${id}/` })).keys.length;
const r2Objects = async (id: string) => (await env.DATA.list({ prefix: `r2/${id}/` })).objects.length;

/** A completed data_pipeline execution with 200 KB in KV (stage 2) and 2 MiB in R2 (stage 3, a worker upload). */
async function completedWithData(): Promise<string> {
  const sizes = { stage_1: 100, stage_2: 200_000, stage_3: 2 * 1024 * 1024 };
  const { body } = await startExecution({ template_name: "data_pipeline", parameters: { steps: 1, step_ms: 0, output_bytes: sizes }, client_id: "client_lf" });
  const id = body.execution_id as string;
  const doc = await waitFor(id, ended, 40_000);
  expect(doc.status).toBe("completed");
  expect(await kvKeys(id)).toBe(1);
  expect(await r2Objects(id)).toBe(1);
  return id;
}

beforeEach(async () => {
  await store().clearFaults();
  await store().resetCalls();
});
afterEach(async () => {
  await store().clearFaults();
});

describe("stage data behind a faulty store", () => {
  it("retention that fails is retried on its own until it succeeds, and deletes everything; nothing is dropped meanwhile", async () => {
    const id = await completedWithData();
    // Every KV delete of this execution fails until the fault is lifted.
    await store().setFault({ store: "kv", method: "delete", match: id, mode: "fail" });
    await expireNow(id);
    // Retried by its own timer (the test fires only the first pass).
    const failed = await until("two failed retention passes", () => store().calls("kv", "delete"), (c) => c.filter((x) => x.key.includes(id) && x.fault === "fail").length >= 2, 30_000);
    expect(failed.length).toBeGreaterThanOrEqual(2);
    // Nothing lost while it fails: the data is all there and still served.
    expect((await status(id)).data_expired_at).toBeNull();
    expect(await kvKeys(id)).toBe(1);
    expect(await r2Objects(id)).toBe(1);
    expect((await call(`/executions/${id}/result`, { headers: KAM })).status).toBe(200);
    // Then R2 fails once while KV works again (the R2 fault is set first, so no pass runs without it).
    await store().setFault({ store: "r2", method: "delete", match: id, mode: "fail", times: 1 });
    await store().clearFaults("kv", "delete");
    const after = await waitFor(id, (d) => d.data_expired_at !== null, 30_000);
    expect(after.status).toBe("completed");
    expect(await kvKeys(id)).toBe(0);
    expect(await r2Objects(id)).toBe(0);
    const r2Deletes = (await store().calls("r2", "delete")).filter((c) => c.key.includes(id));
    expect(r2Deletes.map((c) => c.fault)).toEqual(["fail", null]);
    expect((await call(`/executions/${id}/result`, { headers: KAM })).status).toBe(410);
  });

  it("an R2 list that stalls during retention does not hold the alarm: the pass gives up, and the retry deletes everything", async () => {
    const id = await completedWithData();
    await store().setFault({ store: "r2", method: "list", match: id, mode: "stall", stallMs: STALL_MS, times: 1 });
    await expireNow(id);
    const after = await waitFor(id, (d) => d.data_expired_at !== null, 40_000);
    expect(after.status).toBe("completed");
    expect(await r2Objects(id)).toBe(0);
    expect(await kvKeys(id)).toBe(0);
    const lists = (await store().calls("r2", "list")).filter((c) => c.key.includes(id));
    expect(lists.map((c) => c.fault)).toEqual(["stall", null]);
  });

  it("a KV read that stalls in a drive pass (the input check before a handshake) fails the attempt data_unavailable, and the retry completes", async () => {
    // The first read of stage 1's output (200 KB in KV) stalls: it is the check before stage 2's handshake.
    await store().setFault({ store: "kv", method: "getWithMetadata", match: "/stage_1/", mode: "stall", stallMs: STALL_MS, times: 1 });
    const { body } = await startExecution({
      template_name: "data_retried",
      parameters: { steps: 1, step_ms: 0, output_bytes: { stage_1: 200_000, stage_2: 100 } },
      client_id: "client_lf",
    });
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 40_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[1]).toMatchObject({ status: "completed", attempts: 2, last_error: { code: "data_unavailable", attempt: 1 } });
    const reads = (await store().calls("kv", "getWithMetadata")).filter((c) => c.key.includes(`${id}/stage_1/`));
    expect(reads[0].fault).toBe("stall");
    await expectNoLiveReservations(id);
  });

  it("a KV read that stalls while a fan-out reads its list does not hold the alarm: the pass is retried and the execution completes", async () => {
    // Four entries of 20,000 characters: the list (about 80 KB) is stored in KV; the fan-out's first read of it stalls.
    await store().setFault({ store: "kv", method: "getWithMetadata", match: "/stage_1/", mode: "stall", stallMs: STALL_MS, times: 1 });
    const { body } = await startExecution({ template_name: "graph_fan_out", parameters: { items: 4, item_pad: 20_000, steps: 1, step_ms: 0 }, client_id: "client_lf" });
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 40_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[1].items).toMatchObject({ total: 4, completed: 4 });
    const reads = (await store().calls("kv", "getWithMetadata")).filter((c) => c.key.includes(`${id}/stage_1/`));
    expect(reads[0].fault).toBe("stall");
    expect(reads.length).toBeGreaterThan(1);
    await expectNoLiveReservations(id);
  });
});

describe("the front Worker's own store calls behind a faulty store", () => {
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

  it("a deliverable read whose R2 get stalls answers 503 unavailable within the store timeout; the next read streams it whole", async () => {
    const id = await completedWithData();
    await store().setFault({ store: "r2", method: "get", match: id, mode: "stall", stallMs: STALL_MS, times: 1 });
    const stalled = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(stalled.status).toBe(503);
    expect(await stalled.json()).toMatchObject({ error: { code: "unavailable" } });
    expect((await store().calls("r2", "get")).filter((c) => c.key.includes(id)).map((c) => c.fault)).toEqual(["stall"]);
    const served = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(served.status).toBe(200);
    expect((await served.arrayBuffer()).byteLength).toBe(2 * 1024 * 1024);
  });

  /** A live stage whose token may upload (stage 1 hangs on the worker). */
  async function liveUploader(): Promise<{ id: string; put: (name: string, init: RequestInit) => Promise<Response> }> {
    const { body } = await startExecution({
      template_name: "data_gated",
      parameters: { steps: 1, step_ms: 0, output_bytes: 10, fault: { stage: 1, mode: "hang" } },
      client_id: "client_lf",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    const put = (name: string, init: RequestInit) =>
      call(`/data/${id}/stage_1/${name}`, { method: "PUT", ...init, headers: { ...bearer(token), "content-type": "application/octet-stream", ...(init.headers as Record<string, string>) } });
    return { id, put };
  }

  it("an upload whose R2 put stalls answers 503 unavailable within the store timeout and stores nothing; the same upload then lands", async () => {
    const { id, put } = await liveUploader();
    await store().setFault({ store: "r2", method: "put", match: `r2/${id}/`, mode: "stall", stallMs: STALL_MS, times: 1 });
    const stalled = await put("out.bin", { body: new Uint8Array(300_000) });
    expect(stalled.status).toBe(503);
    expect(await stalled.json()).toMatchObject({ error: { code: "unavailable" } });
    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects).toEqual([]);
    const landed = await put("out.bin", { body: new Uint8Array(300_000) });
    expect(landed.status).toBe(201);
    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects.map((o) => o.size)).toEqual([300_000]);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  });

  it("an upload whose client stops sending answers 408 upload_stalled within the store timeout and stores nothing", async () => {
    const { id, put } = await liveUploader();
    // 1,000 of the announced 5,000 bytes, then silence: the body never ends.
    let sent!: () => void;
    const firstChunkSent = new Promise<void>((resolve) => {
      sent = resolve;
    });
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new Uint8Array(1000));
        sent();
      },
    });
    const res = await put("half.bin", { headers: { "content-length": "5000" }, body });
    await firstChunkSent;
    expect(res.status).toBe(408);
    expect(await res.json()).toMatchObject({ error: { code: "upload_stalled" } });
    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects).toEqual([]);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  });
});
