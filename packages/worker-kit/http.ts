import type { z } from "zod";
import { ExecutionId, StageId } from "../../schemas/common";
import { CancelRequest, HandshakeRequest, ProcessRequest } from "../../schemas/worker-protocol";
import { parseTraceParent } from "@opentelemetry/core";
import type { KitEnv, Reply, TraceHeaders, WorkerDefinition } from "./types";

/** The job object's calls, as the fetch handler sees them over RPC. */
export interface JobStub {
  handshake(req: HandshakeRequest, trace?: TraceHeaders | null): Promise<Reply>;
  process(req: ProcessRequest, trace?: TraceHeaders | null): Promise<Reply>;
  progress(trace?: TraceHeaders | null): Promise<Reply>;
  cancel(req: CancelRequest, trace?: TraceHeaders | null): Promise<Reply>;
  inspect(): Promise<Reply>;
}

const PROGRESS_PATH = /^\/api\/progress\/([^/]+)$/;
const JOBS_PATH = /^\/api\/jobs\/([^/]+)$/;

/**
 * The worker's fetch handler: `GET /health` without auth; everything under
 * `/api/` needs `Authorization: Bearer <WORKER_SECRET>` (or, while the secret is
 * rotated, `WORKER_SECRET_PREVIOUS`; constant-time checks),
 * bodies are validated with the protocol's zod schemas, and each call goes to
 * the stage's job object.
 */
export function createFetch<E extends KitEnv>(def: WorkerDefinition<E>): (request: Request, env: E) => Promise<Response> {
  return async (request, env) => {
    const url = new URL(request.url);
    if (url.pathname === "/health") return json(200, { status: "ok" });
    if (!url.pathname.startsWith("/api/")) return error(404, "not_found", `no route for ${url.pathname}`);
    if (!env.WORKER_SECRET) return error(500, "not_configured", "WORKER_SECRET is not set");
    // During a rotation WORKER_SECRET_PREVIOUS still opens the door (docs/operations.md).
    const secrets = [env.WORKER_SECRET, env.WORKER_SECRET_PREVIOUS].filter((s): s is string => !!s);
    const checks = await Promise.all(secrets.map((s) => authorized(request, s)));
    if (!checks.includes(true)) return error(401, "unauthorized", "missing or wrong bearer token");
    try {
      return await route(def, request, url, env);
    } catch (err) {
      console.error(`${request.method} ${url.pathname} failed`, err);
      return error(500, "internal_error", err instanceof Error ? err.message : String(err));
    }
  };
}

async function route<E extends KitEnv>(def: WorkerDefinition<E>, request: Request, url: URL, env: E): Promise<Response> {
  const method = request.method;
  const path = url.pathname;
  const job = (executionId: string, stageId: string) => jobStub(def, env, executionId, stageId);
  const trace = traceOf(request);

  if (path === "/api/handshake") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, HandshakeRequest);
    if (body instanceof Response) return body;
    return reply(await job(body.executionId, body.stageId).handshake(body, trace));
  }
  if (path === "/api/process") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, ProcessRequest);
    if (body instanceof Response) return body;
    return reply(await job(body.executionId, body.stageId).process(body, trace));
  }
  if (path === "/api/cancel") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, CancelRequest);
    if (body instanceof Response) return body;
    return reply(await job(body.executionId, body.stageId).cancel(body, trace));
  }
  const byId = PROGRESS_PATH.exec(path) ?? JOBS_PATH.exec(path);
  if (byId) {
    if (method !== "GET") return notAllowed(method, "GET");
    const executionId = ExecutionId.safeParse(safeDecode(byId[1]));
    const stageId = StageId.safeParse(url.searchParams.get("stageId"));
    if (!executionId.success || !stageId.success) {
      return error(400, "invalid_request", "needs a valid execution id in the path and ?stageId=stage_{n}");
    }
    const stub = job(executionId.data, stageId.data);
    return reply(await (path.startsWith("/api/progress/") ? stub.progress(trace) : stub.inspect()));
  }
  const extra = await def.routes?.(request, env, url);
  if (extra) return extra;
  return error(404, "not_found", `no route for ${path}`);
}

/** The request's W3C trace context, when its `traceparent` is valid (parsed by @opentelemetry/core). */
export function traceOf(request: Request): TraceHeaders | null {
  const traceparent = request.headers.get("traceparent")?.trim();
  if (!traceparent || !parseTraceParent(traceparent)) return null;
  const tracestate = request.headers.get("tracestate")?.trim();
  return tracestate ? { traceparent, tracestate } : { traceparent };
}

function jobStub<E extends KitEnv>(def: WorkerDefinition<E>, env: E, executionId: string, stageId: string): JobStub {
  const ns = env[def.binding] as unknown as DurableObjectNamespace;
  return ns.get(ns.idFromName(`${executionId}:${stageId}`)) as unknown as JobStub;
}

/** Constant-time: both sides are hashed first, so neither content nor length leaks through timing. */
export async function authorized(request: Request, secret: string): Promise<boolean> {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.get("authorization") ?? "");
  const given = match?.[1] ?? "";
  const encoder = new TextEncoder();
  const [a, b] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(given)),
    crypto.subtle.digest("SHA-256", encoder.encode(secret)),
  ]);
  return crypto.subtle.timingSafeEqual(a, b) && given !== "";
}

/** The JSON body validated by `schema`, or the 400 answer. */
async function parse<S extends z.ZodType>(request: Request, schema: S): Promise<z.infer<S> | Response> {
  let raw: unknown;
  try {
    raw = await request.json();
  } catch {
    return error(400, "invalid_json", "the body is not valid JSON");
  }
  const result = schema.safeParse(raw);
  if (!result.success) return error(400, "invalid_request", "the body does not match the protocol", result.error.issues);
  return result.data;
}

function reply(r: Reply): Response {
  const res = r.text !== undefined ? new Response(r.text, { status: r.status, headers: { "content-type": "application/json" } }) : json(r.status, r.body ?? null);
  for (const [k, v] of Object.entries(r.headers ?? {})) res.headers.set(k, v);
  return res;
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

function notAllowed(method: string, allow: string): Response {
  const res = error(405, "method_not_allowed", `${method} is not supported here`);
  res.headers.set("allow", allow);
  return res;
}

export function json(status: number, body: unknown): Response {
  return Response.json(body, { status });
}

export function error(status: number, code: string, message: string, details?: unknown): Response {
  return json(status, { error: { code, message, ...(details === undefined ? {} : { details }) } });
}
