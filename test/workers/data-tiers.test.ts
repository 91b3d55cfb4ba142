import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { DataReference } from "../../schemas/data";
import type { StatusDocument } from "../../schemas/api";
import { JSON_HEADERS, KAM, OPS, call, ended, executionStub, startExecution, waitFor, mintToken } from "../support/api";
import { TEST_WORKER_SECRETS } from "../support/constants";

/**
 * Data between stages (issue 5): the orchestrator keeps a stage's output inline,
 * in KV or in R2 by size, hands it to the next stage by reference, and checks
 * it on every read. The `blob` stages of the granulator produce exactly
 * `output_bytes[stage]` bytes of a known pattern, so every hop can be checked
 * byte for byte against a recomputation here.
 */

const MiB = 1024 * 1024;
const fast = { steps: 1, step_ms: 0 };

/** demo/content-granulator/work.ts, blobByte: byte i of stage_n is (i + 31n + 7 floor(i/256)) mod 256. Recomputed, not imported. */
function pattern(stageId: string, size: number): Uint8Array {
  const n = Number(stageId.replace("stage_", ""));
  const out = new Uint8Array(size);
  for (let i = 0; i < size; i++) out[i] = (i + 31 * n + 7 * Math.floor(i / 256)) & 255;
  return out;
}

async function sha256(data: ArrayBuffer | Uint8Array): Promise<string> {
  return [...new Uint8Array(await crypto.subtle.digest("SHA-256", data))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

/** The kit's inline form of small binary outputs. */
interface InlineBytes {
  encoding: "base64";
  contentType: string;
  size: number;
  sha256: string;
  data: string;
  input?: { size: number; sha256: string };
}

const kvKeys = async (id: string, stage: string) => (await env.DATA_REFS.list({ prefix: `kv/${id}/${stage}/` })).keys.map((k) => k.name);
const r2Objects = async (id: string, stage: string) => (await env.DATA.list({ prefix: `r2/${id}/${stage}/` })).objects;

/** What the Execution object stored for a stage: inline JSON text or a reference. */
async function storedOutput(id: string, stageId: string): Promise<{ output: string | null; output_ref: string | null }> {
  return runInDurableObject(executionStub(id), (_instance, state) =>
    state.storage.sql.exec("SELECT output, output_ref FROM stages WHERE stage_id = ?", stageId).one(),
  ) as Promise<{ output: string | null; output_ref: string | null }>;
}

/**
 * waitFor(id, ended), except that a 503 `unavailable` status read counts as "not yet". In vitest the front
 * Worker, the Execution object and this test share one isolate, and streaming 30 MB through it (tee, hash,
 * R2) can starve that isolate for seconds, so a status read may pass its 10 s object-call deadline. The
 * deadline here still bounds the wait.
 */
async function waitForEnd(id: string, timeoutMs: number): Promise<StatusDocument> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    const res = await call(`/executions/${id}`, { headers: OPS });
    last = await res.text();
    if (res.status === 200) {
      const doc = JSON.parse(last) as StatusDocument;
      if (ended(doc)) return doc;
    } else if (res.status !== 503) {
      throw new Error(`status ${res.status}: ${last}`);
    }
    await scheduler.wait(50);
  }
  throw new Error(`execution ${id} did not end within ${timeoutMs} ms; last answer: ${last}`);
}

async function runPipeline(sizes: Record<string, number>, timeoutMs = 30_000) {
  const { res, body } = await startExecution({ template_name: "data_pipeline", parameters: { ...fast, output_bytes: sizes }, client_id: "client_data" });
  expect(res.status).toBe(202);
  const id = body.execution_id as string;
  const doc = await waitForEnd(id, timeoutMs);
  return { id, doc };
}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

describe("data between stages: inline, KV, R2", () => {
  it("passes 100 B inline, 200 KB through KV and 30 MB through R2, and delivers the last stage's bytes exactly", { timeout: 90_000 }, async () => {
    const sizes = { stage_1: 100, stage_2: 200_000, stage_3: 30_000_000 };
    const { id, doc } = await runPipeline(sizes, 80_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => [s.stage_id, s.status, s.attempts])).toEqual([
      ["stage_1", "completed", 1],
      ["stage_2", "completed", 1],
      ["stage_3", "completed", 1],
    ]);

    // stage_1, 100 bytes: inline in the Execution's row, nothing in KV or R2.
    expect(await kvKeys(id, "stage_1")).toEqual([]);
    expect(await r2Objects(id, "stage_1")).toEqual([]);
    const s1 = await storedOutput(id, "stage_1");
    expect(s1.output_ref).toBeNull();
    const inline1 = JSON.parse(s1.output!) as InlineBytes;
    expect(inline1).toMatchObject({ encoding: "base64", size: 100, contentType: "application/octet-stream" });
    expect(fromBase64(inline1.data)).toEqual(pattern("stage_1", 100));
    expect(inline1.input).toBeUndefined(); // the first stage has no input

    // stage_2, 200 KB: sent inline by the worker (base64, under the kit's 512 KiB threshold); the orchestrator put it in KV.
    expect(await r2Objects(id, "stage_2")).toEqual([]);
    const kv2 = await kvKeys(id, "stage_2");
    // One key per write: attempt, a nonce, the name.
    expect(kv2).toHaveLength(1);
    expect(kv2[0]).toMatch(new RegExp(`^kv/${id}/stage_2/a1-[A-Za-z0-9]{12}-output\\.json$`));
    const s2ref = JSON.parse((await storedOutput(id, "stage_2")).output_ref!) as DataReference;
    expect(s2ref).toMatchObject({ kind: "kv", key: kv2[0], contentType: "application/json" });
    const kvText = (await env.DATA_REFS.get(kv2[0], "text"))!;
    expect(await sha256(new TextEncoder().encode(kvText))).toBe(s2ref.sha256);
    const inline2 = JSON.parse(kvText) as InlineBytes;
    expect(inline2.size).toBe(200_000);
    expect(await sha256(fromBase64(inline2.data))).toBe(await sha256(pattern("stage_2", 200_000)));
    // It read stage_1's inline output as its input.
    expect(inline2.input).toEqual({ size: 100, sha256: await sha256(pattern("stage_1", 100)) });

    // stage_3, 30 MB: uploaded by the worker, streamed to R2; nothing in KV.
    expect(await kvKeys(id, "stage_3")).toEqual([]);
    const r2 = await r2Objects(id, "stage_3");
    expect(r2.map((o) => o.size)).toEqual([30_000_000]);
    expect(r2[0].key).toMatch(new RegExp(`^r2/${id}/stage_3/a1-[A-Za-z0-9]{12}-output\\.bin$`));

    // The deliverable: a reference to the R2 object and its bytes, equal to the pattern byte for byte.
    const expected = await sha256(pattern("stage_3", 30_000_000));
    const result = await call(`/executions/${id}/result`, { headers: KAM });
    expect(result.status).toBe(200);
    const r = (await result.json()) as { output: unknown; output_reference: DataReference; content_url: string };
    expect(r.output).toBeNull();
    expect(r.output_reference).toEqual({ kind: "r2", key: r2[0].key, size: 30_000_000, sha256: expected, contentType: "application/octet-stream" });
    expect(r.content_url).toBe(`http://orchestrator.test/executions/${id}/result/content`);

    const content = await call(`/executions/${id}/result/content`, { headers: KAM });
    expect(content.status).toBe(200);
    expect(content.headers.get("content-length")).toBe("30000000");
    expect(content.headers.get("content-type")).toBe("application/octet-stream");
    const digest = new crypto.DigestStream("SHA-256");
    await content.body!.pipeTo(digest);
    expect(Number(digest.bytesWritten)).toBe(30_000_000);
    expect([...new Uint8Array(await digest.digest)].map((b) => b.toString(16).padStart(2, "0")).join("")).toBe(expected);
  });

  it("refuses a data read with a missing or forged token (401) and with a genuine token of another execution (403)", async () => {
    const { id, doc } = await runPipeline({ stage_1: 10, stage_2: 100_000, stage_3: 10 });
    expect(doc.status).toBe("completed");
    const [key] = await kvKeys(id, "stage_2");
    expect(key).toMatch(new RegExp(`^kv/${id}/stage_2/a1-[A-Za-z0-9]{12}-output\\.json$`));

    const own = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" });
    const forged = own.slice(0, -1) + (own.endsWith("A") ? "B" : "A");
    const other = await startExecution({ template_name: "data_pipeline", parameters: { ...fast, output_bytes: 1 }, client_id: "client_data" });
    const otherToken = await mintToken({ executionId: other.body.execution_id, stageId: "stage_3", attempt: 1, use: "data" });

    const read = (headers: Record<string, string>) => call(`/data/${key}`, { headers });
    const none = await read({});
    expect(none.status).toBe(401);
    expect(((await none.json()) as { error: { code: string } }).error.code).toBe("unauthorized");
    const bad = await read(bearer(forged));
    expect(bad.status).toBe(401);
    await bad.body?.cancel();
    const foreign = await read(bearer(otherToken));
    expect(foreign.status).toBe(403);
    expect(((await foreign.json()) as { error: { code: string } }).error.code).toBe("forbidden");

    // The same route with the stage's own token gives the bytes, with their checksum.
    const good = await read(bearer(own));
    expect(good.status).toBe(200);
    const bytes = new Uint8Array(await good.arrayBuffer());
    expect(await sha256(bytes)).toBe(good.headers.get("x-content-sha256"));
    expect(bytes).toEqual(new Uint8Array(await (await env.DATA_REFS.get(key, "arrayBuffer"))!));
    await waitFor(other.body.execution_id, ended);
  });

  it("fails the next stage with data_corrupt when its input was tampered with before the handshake", async () => {
    // The gate pool has one slot. Execution A takes it with a stage 2 that hangs; B's stage 2 then waits in
    // waiting_resources with stage 1's output stored, for as long as A holds the slot: a window with no timing in it.
    const pool = await call("/resources/pools/gate:data-tamper", {
      method: "PUT",
      headers: { ...OPS, ...JSON_HEADERS },
      body: JSON.stringify({ kind: "concurrency", capacity: 1 }),
    });
    expect(pool.status).toBe(200);
    const a = await startExecution({
      template_name: "data_gated",
      parameters: { ...fast, output_bytes: 10, fault: { stage: 2, mode: "hang" } },
      client_id: "client_data",
    });
    const aId = a.body.execution_id as string;
    await waitFor(aId, (d) => d.stages[1].status === "processing");

    const b = await startExecution({ template_name: "data_gated", parameters: { ...fast, output_bytes: { stage_1: 200_000, stage_2: 10 } }, client_id: "client_data" });
    const bId = b.body.execution_id as string;
    await waitFor(bId, (d) => d.stages[0].status === "completed" && d.stages[1].status === "waiting_resources");

    // Same length, one bit different: only the checksum can tell.
    const [key] = await kvKeys(bId, "stage_1");
    const stored = await env.DATA_REFS.getWithMetadata<Record<string, unknown>>(key, "arrayBuffer");
    expect(stored.value).not.toBeNull();
    const tampered = new Uint8Array(stored.value!);
    tampered[tampered.length >> 1] ^= 1;
    await env.DATA_REFS.put(key, tampered, { metadata: stored.metadata });

    // A's cancel releases the slot; B's stage 2 is granted and checks its input before the handshake.
    expect((await call(`/executions/${aId}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    const doc = await waitFor(bId, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "data_corrupt", stage_id: "stage_2" });
    expect(doc.error?.message).toContain("checksum mismatch");
    expect(doc.stages[1]).toMatchObject({ status: "failed", attempts: 1 });

    // The worker never got a handshake for it: no job exists for B's stage 2.
    const job = await env.CONTENT_GRANULATOR.fetch(`https://granulator.test/api/jobs/${bId}?stageId=stage_2`, {
      headers: bearer(TEST_WORKER_SECRETS["bitware-content-granulator"]),
    });
    expect(job.status).toBe(404);
    await job.body?.cancel();
  });

  it("errors a reader's stream at its end when a stored object no longer matches its checksum", async () => {
    // 600 KB is over the kit's upload threshold: stage 2's and stage 3's outputs are R2 uploads.
    const { id, doc } = await runPipeline({ stage_1: 10, stage_2: 600_000, stage_3: 600_000 });
    expect(doc.status).toBe("completed");
    // After the run, both change in the store: stage 2's (an input of stage 3) and stage 3's (the deliverable).
    for (const stage of ["stage_2", "stage_3"]) {
      const [obj] = await r2Objects(id, stage);
      expect(obj.size).toBe(600_000);
      const tampered = new Uint8Array(await (await env.DATA.get(obj.key))!.arrayBuffer());
      tampered[300_000] ^= 0xff;
      await env.DATA.put(obj.key, tampered);
    }

    const [input] = await r2Objects(id, "stage_2");
    const token = await mintToken({ executionId: id, stageId: "stage_3", attempt: 1, use: "data" });
    const res = await call(`/data/${input.key}`, { headers: bearer(token) });
    expect(res.status).toBe(200); // headers go out before the end of the stream is hashed
    await expect(res.arrayBuffer()).rejects.toThrow();
    // The deliverable is streamed the same way.
    const content = await call(`/executions/${id}/result/content`, { headers: KAM });
    await expect(content.arrayBuffer()).rejects.toThrow();
  });

  it("answers 413 to an upload over 64 MiB and stores nothing; 411 without a length", async () => {
    // A live stage (stage 1 hangs), so its token could upload: the refusal is about the size alone.
    const { body } = await startExecution({
      template_name: "data_gated",
      parameters: { ...fast, output_bytes: 10, fault: { stage: 1, mode: "hang" } },
      client_id: "client_data",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    const put = (name: string, init: RequestInit) => call(`/data/${id}/stage_1/${name}`, { method: "PUT", ...init });

    const size = 64 * MiB + 1;
    const fixed = new FixedLengthStream(size);
    const big = await put("big.bin", {
      headers: { ...bearer(token), "content-type": "application/octet-stream", "content-length": String(size) },
      body: fixed.readable,
    });
    expect(big.status).toBe(413);
    expect(await big.json()).toMatchObject({ error: { code: "payload_too_large", details: { max_bytes: 64 * MiB } } });
    await fixed.writable.abort().catch(() => {});

    // No length at all: a stream of unknown size.
    const unknown = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new Uint8Array(16));
        controller.close();
      },
    });
    const noLength = await put("nolength.bin", { headers: { ...bearer(token), "content-type": "application/octet-stream" }, body: unknown });
    expect(noLength.status).toBe(411);
    await noLength.body?.cancel();

    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects).toEqual([]);

    // The same token and stage within the limit is stored: the 413 was about the size.
    const small = await put("small.bin", { headers: { ...bearer(token), "content-type": "application/octet-stream" }, body: new Uint8Array(1000) });
    expect(small.status).toBe(201);
    const ref = (await small.json()) as DataReference;
    expect(ref).toMatchObject({ kind: "r2", size: 1000 });
    // A key of its own per upload: attempt, a nonce, the name.
    expect(ref.key).toMatch(new RegExp(`^r2/${id}/stage_1/a1-[A-Za-z0-9]{12}-small\\.bin$`));
    expect((await env.DATA.list({ prefix: `r2/${id}/` })).objects.map((o) => o.key)).toEqual([ref.key]);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  });
});
