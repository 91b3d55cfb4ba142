import type { DataReference } from "../schemas/data";
import { configOf } from "./config";
import { hex, sha256Hex } from "./hash";
import { TimeoutError, withTimeout } from "./outbound";

/**
 * Where stage data lives, chosen by size (docs/protocol.md, "Data"):
 * - inline in the Execution's own row up to `inlineMaxBytes`;
 * - KV (`DATA_REFS`) up to `kvMaxBytes`;
 * - R2 (`DATA`) above that, and for every worker upload.
 * A key is `{kind}/{execution_id}/{stage_id}/{name}`: the kind says which store
 * holds it, and everything of one execution is one prefix per store, so
 * retention deletes by prefix. Every object carries its SHA-256; reads verify it.
 */
export const DATA_LIMITS = {
  inlineMaxBytes: 64 * 1024,
  kvMaxBytes: 1024 * 1024,
  /** Largest upload a worker may PUT (streamed to R2). */
  maxUploadBytes: 64 * 1024 * 1024,
};

export type DataKind = DataReference["kind"];

export function dataKey(kind: DataKind, executionId: string, stageId: string, name: string): string {
  return `${kind}/${executionId}/${stageId}/${name}`;
}

/** `{kind}/{execution_id}/...` -> its parts, or null for a key of no known shape. */
export function parseDataKey(key: string): { kind: DataKind; executionId: string; rest: string } | null {
  const m = /^(kv|r2)\/(exec_[A-Za-z0-9_-]+)\/([A-Za-z0-9_./-]+)$/.exec(key);
  if (!m || key.includes("..")) return null;
  return { kind: m[1] as DataKind, executionId: m[2], rest: m[3] };
}

/** The KV calls stage data makes, and the R2 calls. */
type DataKv = Pick<KVNamespace, "put" | "getWithMetadata" | "list" | "delete">;
type DataR2 = Pick<R2Bucket, "put" | "get" | "list" | "delete">;

/**
 * The stores, through the bindings `DATA_KV_BINDING` and `DATA_R2_BINDING`
 * name (DATA_REFS and DATA by default): the fault tests put a real stand-in
 * that stalls or fails there (test/support/faulty-store), as LEDGER_BINDING
 * does for the ledger.
 */
export function kvOf(env: Env): DataKv {
  return bound<DataKv>(env, configOf(env).dataKvBinding, "DATA_KV_BINDING");
}
export function r2Of(env: Env): DataR2 {
  return bound<DataR2>(env, configOf(env).dataR2Binding, "DATA_R2_BINDING");
}
function bound<T>(env: Env, name: string, variable: string): T {
  const b = (env as unknown as Record<string, T | undefined>)[name];
  if (!b) throw new Error(`${variable} names no binding (${name})`);
  return b;
}

/** Stores bytes in KV or R2 by size (inline is the caller's business). */
export async function putBytes(env: Env, executionId: string, stageId: string, name: string, bytes: Uint8Array, contentType: string): Promise<DataReference> {
  const sha256 = await sha256Hex(bytes);
  if (bytes.byteLength <= DATA_LIMITS.kvMaxBytes) {
    const key = dataKey("kv", executionId, stageId, name);
    await kvOf(env).put(key, bytes, { metadata: { sha256, contentType, size: bytes.byteLength } });
    return { kind: "kv", key, size: bytes.byteLength, sha256, contentType };
  }
  const key = dataKey("r2", executionId, stageId, name);
  await r2Of(env).put(key, bytes, { httpMetadata: { contentType }, sha256 });
  return { kind: "r2", key, size: bytes.byteLength, sha256, contentType };
}

export class UploadError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Streams a worker's upload to R2 without buffering it: the body goes through a
 * fixed-length stream (R2 needs the length) while a digest stream hashes it.
 * R2's put is atomic, so a body that is cut short or runs long stores nothing.
 */
export async function putStream(env: Env, key: string, body: ReadableStream<Uint8Array>, size: number, contentType: string): Promise<DataReference> {
  const ms = configOf(env).tuning.storageCallTimeoutMs;
  const fixed = new FixedLengthStream(size);
  const digest = new crypto.DigestStream("SHA-256");
  const put = r2Of(env).put(key, fixed.readable, { httpMetadata: { contentType } });
  // Settled here whatever happens below, so a put given up on never becomes an unhandled rejection.
  const putDone = Promise.resolve(put).then(
    () => null,
    (err: unknown) => err,
  );
  const reader = body.getReader();
  const store = fixed.writable.getWriter();
  const hash = digest.getWriter();
  try {
    // One chunk at a time, each step with its own deadline: a client that stops sending and a store that
    // stops taking are told apart (408 and 503), and neither holds the request open (docs/reliability.md).
    for (;;) {
      const { done, value } = await withTimeout(reader.read(), ms, "the upload's body").catch((err) => {
        throw err instanceof TimeoutError ? new UploadError(408, "upload_stalled", `no bytes of the upload arrived for ${ms} ms`) : new UploadError(400, "upload_incomplete", `the body could not be read: ${String(err)}`);
      });
      if (done) break;
      await hash.write(value);
      await withTimeout(store.write(value), ms, "r2.put").catch((err) => {
        throw err instanceof TimeoutError ? new UploadError(503, "unavailable", `the data store took no bytes for ${ms} ms`) : new UploadError(400, "upload_incomplete", `the body did not match its Content-Length of ${size} bytes`);
      });
    }
    await store.close().catch(() => {
      throw new UploadError(400, "upload_incomplete", `the body did not match its Content-Length of ${size} bytes`);
    });
    const failed = await withTimeout(putDone, ms, "r2.put").catch(() => {
      throw new UploadError(503, "unavailable", `the data store did not confirm the upload within ${ms} ms`);
    });
    if (failed) throw new UploadError(400, "upload_incomplete", `the body did not match its Content-Length of ${size} bytes`);
    await hash.close();
  } catch (err) {
    // R2's put is atomic: a body cut short stores nothing. The delete covers a put that did land late.
    reader.cancel().catch(() => {});
    store.abort(err).catch(() => {});
    // An aborted digest rejects its result too; nothing reads it after a failure.
    digest.digest.catch(() => {});
    hash.abort(err).catch(() => {});
    await withTimeout(r2Of(env).delete(key), ms, "r2.delete").catch(() => {});
    throw err instanceof UploadError ? err : new UploadError(400, "upload_incomplete", `the upload failed: ${String(err)}`);
  }
  // The checksum is ours, computed from the bytes as they went by; the
  // Execution records it, and every later read is verified against it.
  return { kind: "r2", key, size, sha256: hex(await digest.digest), contentType };
}

/**
 * A stored object's body with a deadline on every chunk the store owes: a
 * store that stops sending errors the stream instead of holding the reader
 * forever. A slow reader is not timed (the store is only asked when it pulls).
 */
function chunkDeadline(body: ReadableStream<Uint8Array>, ms: number, what: string): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await withTimeout(reader.read(), ms, what);
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
}

/** Opens a stored object as a stream, or null when it is gone. */
export async function openStream(env: Env, ref: Pick<DataReference, "kind" | "key">): Promise<{ body: ReadableStream<Uint8Array>; size: number | null; contentType: string } | null> {
  const ms = configOf(env).tuning.storageCallTimeoutMs;
  if (ref.kind === "kv") {
    const { value, metadata } = await withTimeout(kvOf(env).getWithMetadata<{ contentType?: string; size?: number }>(ref.key, "stream"), ms, "kv.get");
    if (!value) return null;
    return { body: chunkDeadline(value, ms, "kv.get body"), size: metadata?.size ?? null, contentType: metadata?.contentType ?? "application/octet-stream" };
  }
  const obj = await withTimeout(r2Of(env).get(ref.key), ms, "r2.get");
  if (!obj) return null;
  return { body: chunkDeadline(obj.body, ms, "r2.get body"), size: obj.size, contentType: obj.httpMetadata?.contentType ?? "application/octet-stream" };
}

/**
 * Passes a stream through while hashing it; errors the stream at its end when
 * the bytes do not match `sha256`, so a reader never takes tampered data as whole.
 */
export function verifying(body: ReadableStream<Uint8Array>, sha256: string, onMismatch?: () => void): ReadableStream<Uint8Array> {
  const digest = new crypto.DigestStream("SHA-256");
  const writer = digest.getWriter();
  return body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      async transform(chunk, controller) {
        await writer.write(chunk);
        controller.enqueue(chunk);
      },
      async flush(controller) {
        await writer.close();
        if (hex(await digest.digest) !== sha256) {
          onMismatch?.();
          controller.error(new Error("data_corrupt: checksum mismatch"));
        }
      },
    }),
  );
}

/** Re-reads a stored object end to end and checks size and checksum (memory stays one chunk). */
export async function verifyStored(env: Env, ref: DataReference): Promise<{ ok: true } | { ok: false; reason: string }> {
  const opened = await openStream(env, ref);
  if (!opened) return { ok: false, reason: `${ref.key} is missing` };
  const digest = new crypto.DigestStream("SHA-256");
  await opened.body.pipeTo(digest);
  const size = Number(digest.bytesWritten);
  if (size !== ref.size) return { ok: false, reason: `${ref.key} has ${size} bytes, expected ${ref.size}` };
  const sha = hex(await digest.digest);
  if (sha !== ref.sha256) return { ok: false, reason: `${ref.key} checksum mismatch` };
  return { ok: true };
}

/** Reads a small stored object (KV tier) back into memory as text. */
export async function readText(env: Env, ref: DataReference): Promise<string | null> {
  const opened = await openStream(env, ref);
  return opened ? new Response(opened.body).text() : null;
}

/** Deletes everything stored for one execution (retention). */
export async function deleteExecutionData(env: Env, executionId: string): Promise<{ kv: number; r2: number }> {
  let kv = 0;
  let r2 = 0;
  let cursor: string | undefined;
  do {
    const page = await kvOf(env).list({ prefix: `kv/${executionId}/`, cursor });
    await Promise.all(page.keys.map((k) => kvOf(env).delete(k.name)));
    kv += page.keys.length;
    cursor = page.list_complete ? undefined : page.cursor;
  } while (cursor);
  let r2cursor: string | undefined;
  do {
    const page = await r2Of(env).list({ prefix: `r2/${executionId}/`, cursor: r2cursor });
    if (page.objects.length) await r2Of(env).delete(page.objects.map((o) => o.key));
    r2 += page.objects.length;
    r2cursor = page.truncated ? page.cursor : undefined;
  } while (r2cursor);
  return { kv, r2 };
}
