import type { z } from "zod";

/**
 * HTTP plumbing shared by every route: one error type, one error shape
 * (`{ error: { code, message, details? } }`), and body parsing with a size
 * limit and zod validation that names the offending fields.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: unknown,
    /** Extra response headers (e.g. Retry-After on a 429). */
    readonly headers?: Record<string, string>,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export function json(body: unknown, status = 200, headers: HeadersInit = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...headers },
  });
}

export function errorBody(code: string, message: string, details?: unknown) {
  return { error: details === undefined ? { code, message } : { code, message, details } };
}

export function errorResponse(err: ApiError): Response {
  return json(errorBody(err.code, err.message, err.details), err.status, err.headers);
}

/** Zod issues as `[{ path: "a.b", message }]`: the offending fields, never the input values. */
export function zodIssues(error: z.ZodError): { path: string; message: string }[] {
  return error.issues.map((i) => ({ path: i.path.map(String).join(".") || "(body)", message: i.message }));
}

export function invalid(error: z.ZodError, what = "request"): ApiError {
  const issues = zodIssues(error);
  return new ApiError(400, "invalid_request", `invalid ${what}: ${issues.map((i) => i.path).join(", ")}`, issues);
}

/** A path parameter: a refusal names it (`field`) as the offending field, not the body. */
export function parseParam<S extends z.ZodType>(schema: S, value: unknown, field: string, what = field): z.output<S> {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issues = zodIssues(parsed.error).map((i) => ({ ...i, path: i.path === "(body)" ? field : `${field}.${i.path}` }));
  throw new ApiError(400, "invalid_request", `invalid ${what}: ${issues.map((i) => i.path).join(", ")}`, issues);
}

export function parseWith<S extends z.ZodType>(schema: S, value: unknown, what?: string): z.output<S> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw invalid(parsed.error, what);
  return parsed.data;
}

/** Reads a body as text, refusing more than `maxBytes` without buffering past the limit. */
export async function readText(request: Request, maxBytes: number): Promise<string> {
  const text = await readLimited(request, maxBytes);
  if (text === null) throw tooLarge(maxBytes);
  return text;
}

/**
 * A request's or response's body as text, or null when it is (or declares
 * itself) larger than `maxBytes`: never buffers past the limit, and stops
 * reading (cancels the stream) the moment it is passed.
 */
export async function readLimited(message: Request | Response, maxBytes: number): Promise<string | null> {
  const declared = Number(message.headers.get("content-length") ?? "NaN");
  if (Number.isFinite(declared) && declared > maxBytes) {
    await message.body?.cancel();
    return null;
  }
  if (!message.body) return "";
  const reader = message.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > maxBytes) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.byteLength;
  }
  return new TextDecoder().decode(all);
}

function tooLarge(maxBytes: number): ApiError {
  return new ApiError(413, "payload_too_large", `body is larger than ${maxBytes} bytes`, { max_bytes: maxBytes });
}

export interface JsonLimits {
  /** Bytes of the body. */
  maxBytes: number;
  /** Nesting of objects and arrays (the body itself is depth 1). */
  maxJsonDepth: number;
  /** Object keys in the whole body. */
  maxJsonKeys: number;
}

/**
 * The depth and key count of a parsed value, walked without recursion so a
 * deep body cannot exhaust the stack; stops at the first limit passed.
 */
export function jsonShapeProblem(value: unknown, limits: Pick<JsonLimits, "maxJsonDepth" | "maxJsonKeys">): string | null {
  const stack: [unknown, number][] = [[value, 1]];
  let keys = 0;
  while (stack.length) {
    const [v, depth] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    if (depth > limits.maxJsonDepth) return `nested deeper than ${limits.maxJsonDepth} levels`;
    const children = Array.isArray(v) ? v : Object.values(v);
    if (!Array.isArray(v)) {
      keys += children.length;
      if (keys > limits.maxJsonKeys) return `more than ${limits.maxJsonKeys} keys`;
    }
    for (const c of children) if (c !== null && typeof c === "object") stack.push([c, depth + 1]);
  }
  return null;
}

/** JSON body: 415 unless JSON, 413 over the size limit, 400 for bad JSON, a body past the depth or key limits, or a schema mismatch. */
export async function readJson<S extends z.ZodType>(request: Request, schema: S, limits: JsonLimits): Promise<z.output<S>> {
  const type = request.headers.get("content-type") ?? "";
  if (!/^application\/(?:[\w.+-]+\+)?json\b/i.test(type)) {
    throw new ApiError(415, "unsupported_media_type", "send the body as application/json");
  }
  const text = await readText(request, limits.maxBytes);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new ApiError(400, "invalid_json", "the body is not valid JSON");
  }
  const problem = jsonShapeProblem(value, limits);
  if (problem) {
    throw new ApiError(400, "invalid_json", `the body is ${problem}`, { max_depth: limits.maxJsonDepth, max_keys: limits.maxJsonKeys });
  }
  return parseWith(schema, value, "body");
}
