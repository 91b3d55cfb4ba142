import { DataReference } from "../../schemas/data";
import type { HandshakeRequest } from "../../schemas/worker-protocol";
import type { KitOptions, Usage } from "./types";

/** A failure `run` reports as such: `fail` with this code, message, retryable flag and usage. */
export class StageError extends Error {
  readonly retryable: boolean;
  readonly usage: Usage | undefined;
  /** A provider's answer that caused the failure (e.g. a 429) and its pool: its rate-limit headers go out with the fail callback. */
  readonly provider: { response: Response; pool: string } | undefined;
  constructor(
    readonly code: string,
    message: string,
    options: { retryable?: boolean; usage?: Usage; provider?: { response: Response; pool: string } } = {},
  ) {
    super(message);
    this.retryable = options.retryable ?? false;
    this.usage = options.usage;
    this.provider = options.provider;
  }
}

/** Binary output with its length and type, for streams (whose length the upload must know) or a content type. */
export class BytesOutput {
  constructor(
    readonly body: ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer | Blob,
    readonly size: number,
    readonly contentType: string,
    /** Merged into the inline JSON form; dropped when the bytes are uploaded. */
    readonly extra: Record<string, unknown> | undefined,
  ) {}
}

/** Wraps bytes as an output: `bytes(stream, { size })`; a Uint8Array, ArrayBuffer or Blob knows its size. */
export function bytes(
  body: ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer | Blob,
  options: { size?: number; contentType?: string; extra?: Record<string, unknown> } = {},
): BytesOutput {
  const known = body instanceof Uint8Array || body instanceof ArrayBuffer ? body.byteLength : body instanceof Blob ? body.size : undefined;
  const size = options.size ?? known;
  if (size === undefined || !Number.isInteger(size) || size < 0) throw new Error("bytes(): a stream needs { size }");
  if (known !== undefined && known !== size) throw new Error(`bytes(): size ${size} does not match the body's ${known} bytes`);
  const contentType = options.contentType ?? (body instanceof Blob && body.type ? body.type : "application/octet-stream");
  return new BytesOutput(body, size, contentType, options.extra);
}

/** The inline JSON form of small binary outputs. */
export interface InlineBytes {
  encoding: "base64";
  contentType: string;
  size: number;
  sha256: string;
  data: string;
  [extra: string]: unknown;
}

export function isInlineBytes(value: unknown): value is InlineBytes {
  const v = value as Partial<InlineBytes> | null;
  return typeof v === "object" && v !== null && v.encoding === "base64" && typeof v.data === "string" && typeof v.size === "number";
}

/** The bytes of an inline-bytes value, or null for anything else. */
export function bytesOf(value: unknown): Uint8Array | null {
  if (!isInlineBytes(value)) return null;
  const out = fromBase64(value.data);
  if (out.byteLength !== value.size) throw new Error(`inline bytes: ${out.byteLength} bytes, expected ${value.size}`);
  return out;
}

export function toBase64(u8: Uint8Array): string {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
  return btoa(s);
}

export function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

export function hex(buf: ArrayBuffer): string {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256Hex(data: Uint8Array | string): Promise<string> {
  return hex(await crypto.subtle.digest("SHA-256", typeof data === "string" ? new TextEncoder().encode(data) : data));
}

/** What to do with a run's output: send it inline (JSON text) or upload it. */
export type PreparedOutput =
  | { kind: "inline"; json: string }
  | { kind: "upload"; name: string; body: ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer | Blob; size: number; contentType: string };

function asBytesOutput(output: unknown): BytesOutput | null {
  if (output instanceof BytesOutput) return output;
  if (output instanceof Uint8Array || output instanceof ArrayBuffer || output instanceof Blob) return bytes(output);
  if (output instanceof ReadableStream) throw new Error("a ReadableStream output needs its length: return bytes(stream, { size })");
  return null;
}

/** Small outputs stay inline; JSON text or bytes over the threshold are uploaded. */
export async function prepareOutput(output: unknown, options: KitOptions): Promise<PreparedOutput> {
  const bin = asBytesOutput(output);
  const tooLarge = (size: number) =>
    new StageError("output_too_large", `the output has ${size} bytes; uploads are limited to ${options.maxUploadBytes}`, { retryable: false });
  if (bin) {
    if (bin.size > options.uploadThresholdBytes) {
      if (bin.size > options.maxUploadBytes) throw tooLarge(bin.size);
      return { kind: "upload", name: "output.bin", body: bin.body, size: bin.size, contentType: bin.contentType };
    }
    const u8 = await readAll(bin.body, bin.size);
    const inline: InlineBytes = {
      ...bin.extra,
      encoding: "base64",
      contentType: bin.contentType,
      size: u8.byteLength,
      sha256: await sha256Hex(u8),
      data: toBase64(u8),
    };
    return { kind: "inline", json: JSON.stringify(inline) };
  }
  const json = JSON.stringify(output ?? null);
  // UTF-8 is at most 3 bytes per UTF-16 unit: only measure when it could be over.
  if (json.length * 3 <= options.uploadThresholdBytes) return { kind: "inline", json };
  const encoded = new TextEncoder().encode(json);
  if (encoded.byteLength <= options.uploadThresholdBytes) return { kind: "inline", json };
  if (encoded.byteLength > options.maxUploadBytes) throw tooLarge(encoded.byteLength);
  return { kind: "upload", name: "output.json", body: encoded, size: encoded.byteLength, contentType: "application/json" };
}

async function readAll(body: BytesOutput["body"], size: number): Promise<Uint8Array> {
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  const buf = new Uint8Array(await new Response(body).arrayBuffer());
  if (buf.byteLength !== size) throw new Error(`the output stream gave ${buf.byteLength} bytes, expected ${size}`);
  return buf;
}

export type UploadResult =
  | { ok: true; ref: DataReference; status: number }
  | { ok: false; status: number; transient: boolean; message: string; /** The orchestrator's error code, when it gave one. */ code?: string };

/**
 * `PUT {callback origin}/data/{executionId}/{stageId}/{name}` with the callback
 * token, streamed with its Content-Length; 201 answers the DataReference.
 */
export async function upload(
  orchestrator: Fetcher,
  handshake: HandshakeRequest,
  out: Extract<PreparedOutput, { kind: "upload" }>,
  timeoutMs: number,
): Promise<UploadResult> {
  const url = `${originOf(handshake)}/data/${encodeURIComponent(handshake.executionId)}/${encodeURIComponent(handshake.stageId)}/${out.name}`;
  let body: ReadableStream<Uint8Array> | Uint8Array | ArrayBuffer | Blob = out.body;
  let piping: Promise<void> | null = null;
  const stopPiping = new AbortController();
  if (body instanceof ReadableStream) {
    // A fixed-length stream lets the request carry Content-Length while the body streams.
    const fixed = new FixedLengthStream(out.size);
    piping = body.pipeTo(fixed.writable, { signal: stopPiping.signal }).catch(() => {});
    body = fixed.readable;
  }
  try {
    const res = await orchestrator.fetch(url, {
      method: "PUT",
      headers: {
        authorization: `Bearer ${handshake.callback.token}`,
        "content-type": out.contentType,
        "content-length": String(out.size),
      },
      body,
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await res.text();
    if (res.status !== 201) {
      const code = errorCodeOf(text);
      // 409 stage_waiting: the orchestrator lost the grant this attempt runs on (a crash) and is asking
      // for it again; the attempt goes on, so the upload is tried again later like a transient failure.
      const transient = res.status >= 500 || res.status === 408 || res.status === 429 || (res.status === 409 && code === "stage_waiting");
      return { ok: false, status: res.status, transient, message: `upload answered ${res.status}: ${text.slice(0, 300)}`, ...(code && { code }) };
    }
    const parsed = DataReference.safeParse(safeJson(text));
    if (!parsed.success || parsed.data.size !== out.size) {
      return { ok: false, status: res.status, transient: false, message: `upload answered an unusable reference: ${text.slice(0, 300)}` };
    }
    return { ok: true, ref: parsed.data, status: res.status };
  } catch (err) {
    return { ok: false, status: 0, transient: true, message: `upload failed: ${messageOf(err)}` };
  } finally {
    // Answered without reading it all (401, 409...): stop feeding the body. A no-op after a full upload.
    stopPiping.abort();
    await piping;
  }
}

/** A stored input as a stage receives it in `inputs` / `previousOutput`: `{ $ref: key, size, contentType }`. */
export interface StoredRef {
  $ref: string;
  size: number;
  contentType: string;
}

export function isStoredRef(value: unknown): value is StoredRef {
  const v = value as Partial<StoredRef> | null;
  return typeof v === "object" && v !== null && !Array.isArray(v) && typeof v.$ref === "string" && typeof v.size === "number";
}

/** A failed read of stored data: `data_unavailable` (retryable), with the orchestrator's HTTP status (0: no answer). */
export class DataReadError extends StageError {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super("data_unavailable", message, { retryable: true });
  }
}

/**
 * `GET {callback origin}/data/{key}` with the stage's data token (the callback
 * token from an orchestrator that issues no data token). The orchestrator
 * verifies the checksum while streaming and errors the stream at its end on a
 * mismatch; this also checks the length. Errors are `data_unavailable` StageErrors.
 */
export async function openInput(orchestrator: Fetcher, handshake: HandshakeRequest, timeoutMs: number): Promise<ReadableStream<Uint8Array> | null> {
  const ref = handshake.dataReference;
  if (!ref) return null;
  return openKey(orchestrator, handshake, ref.key, ref.size, timeoutMs);
}

/**
 * Any stored input the stage received (a `{ $ref }` in `inputs` or
 * `previousOutput`: several dependencies, a fan-out's stored item outputs), read
 * like `openInput`. The data token reads only the stage's own inputs: another
 * key answers 403. A reference over `maxBytes` is refused before it is asked for.
 */
export async function openRef(
  orchestrator: Fetcher,
  handshake: HandshakeRequest,
  ref: StoredRef,
  options: { timeoutMs: number; maxBytes: number },
): Promise<ReadableStream<Uint8Array>> {
  if (!isStoredRef(ref)) throw new StageError("invalid_input", "not a stored reference: expected { $ref, size, contentType }", { retryable: false });
  if (ref.size > options.maxBytes) {
    throw new StageError("input_too_large", `${ref.$ref} has ${ref.size} bytes; reads are limited to ${options.maxBytes}`, { retryable: false });
  }
  return openKey(orchestrator, handshake, ref.$ref, ref.size, options.timeoutMs);
}

async function openKey(orchestrator: Fetcher, handshake: HandshakeRequest, key: string, size: number, timeoutMs: number): Promise<ReadableStream<Uint8Array>> {
  const unavailable = (message: string, status = 0) => new DataReadError(message, status);
  const path = key.split("/").map(encodeURIComponent).join("/");
  let res: Response;
  try {
    res = await orchestrator.fetch(`${originOf(handshake)}/data/${path}`, {
      headers: { authorization: `Bearer ${handshake.callback.dataToken ?? handshake.callback.token}` },
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw unavailable(`GET /data/${key} failed: ${messageOf(err)}`);
  }
  if (!res.ok || !res.body) {
    const text = await res.text().catch(() => "");
    throw unavailable(`GET /data/${key} answered ${res.status}: ${text.slice(0, 300)}`, res.status);
  }
  const reader = res.body.getReader();
  let seen = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch (err) {
        controller.error(unavailable(`reading ${key} failed (checksum or transfer): ${messageOf(err)}`, res.status));
        return;
      }
      if (chunk.done) {
        if (seen !== size) controller.error(unavailable(`${key}: ${seen} bytes, expected ${size}`, res.status));
        else controller.close();
        return;
      }
      seen += chunk.value.byteLength;
      if (seen > size) {
        // More than the reference says: stop reading now, the rest is never buffered.
        void reader.cancel().catch(() => {});
        controller.error(unavailable(`${key}: more than the ${size} bytes expected`, res.status));
        return;
      }
      controller.enqueue(chunk.value);
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
}

/** A read stream in full, as a value: JSON parsed for a JSON content type, else the bytes. */
export async function readValue(stream: ReadableStream<Uint8Array>, key: string, contentType: string): Promise<unknown> {
  let buf: Uint8Array;
  try {
    buf = new Uint8Array(await new Response(stream).arrayBuffer());
  } catch (err) {
    if (err instanceof StageError) throw err;
    throw new StageError("data_unavailable", `reading ${key} failed: ${messageOf(err)}`, { retryable: true });
  }
  if (!isJsonType(contentType)) return buf;
  try {
    return JSON.parse(new TextDecoder().decode(buf));
  } catch (err) {
    throw new StageError("invalid_input", `${key} is not valid JSON: ${messageOf(err)}`, { retryable: false });
  }
}

/** Every `{ $ref }` in a value (arrays and objects walked, at most `limit` found), in document order. */
export function storedRefsIn(value: unknown, limit = 10_000): StoredRef[] {
  const found: StoredRef[] = [];
  const walk = (v: unknown, depth: number) => {
    if (found.length >= limit || depth > 64 || typeof v !== "object" || v === null) return;
    if (isStoredRef(v)) {
      found.push(v);
      return;
    }
    for (const child of Array.isArray(v) ? v : Object.values(v)) walk(child, depth + 1);
  };
  walk(value, 0);
  return found;
}

/** A copy of `value` with every `{ $ref }` replaced by what `read` gives for it. */
export async function replaceRefs(value: unknown, read: (ref: StoredRef) => Promise<unknown>): Promise<unknown> {
  if (typeof value !== "object" || value === null) return value;
  if (isStoredRef(value)) return read(value);
  if (Array.isArray(value)) {
    const out: unknown[] = [];
    for (const v of value) out.push(await replaceRefs(v, read));
    return out;
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = await replaceRefs(v, read);
  return out;
}

export function originOf(handshake: HandshakeRequest): string {
  return new URL(handshake.callback.url).origin;
}

export function isJsonType(contentType: string): boolean {
  return /[/+]json\b/i.test(contentType);
}

/** `error.code` of an orchestrator's error answer, if it is one. */
function errorCodeOf(text: string): string | undefined {
  const code = (safeJson(text) as { error?: { code?: unknown } } | null)?.error?.code;
  return typeof code === "string" ? code : undefined;
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
