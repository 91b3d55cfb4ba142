import type { z } from "zod";
import { ExecutionId, StageId } from "../../schemas/common";
import { CancelRequest, HandshakeRequest, ProcessRequest } from "../../schemas/worker-protocol";
import type { GranulatorJob, Reply } from "./job";
import type { GranulatorStats } from "./stats";

export { GranulatorJob } from "./job";
export { GranulatorStats } from "./stats";

/**
 * Local stand-in for the bitware-content-granulator stage worker: the worker
 * protocol (handshake, process, progress, cancel) for real, with the work done
 * asynchronously in one GranulatorJob object per execution stage.
 */
export interface GranulatorEnv {
  WORKER_SECRET: string;
  JOBS: DurableObjectNamespace<GranulatorJob>;
  STATS: DurableObjectNamespace<GranulatorStats>;
  ORCHESTRATOR: Fetcher;
}

const PROGRESS_PATH = /^\/api\/progress\/([^/]+)$/;

export default {
  async fetch(request: Request, env: GranulatorEnv): Promise<Response> {
    const url = new URL(request.url);
    if (url.pathname === "/health") return json(200, { status: "ok" });
    if (!url.pathname.startsWith("/api/")) return error(404, "not_found", `no route for ${url.pathname}`);
    if (!env.WORKER_SECRET) return error(500, "not_configured", "WORKER_SECRET is not set");
    if (!(await authorized(request, env.WORKER_SECRET))) return error(401, "unauthorized", "missing or wrong bearer token");
    try {
      return await route(request, url, env);
    } catch (err) {
      console.error(`${request.method} ${url.pathname} failed`, err);
      return error(500, "internal_error", err instanceof Error ? err.message : String(err));
    }
  },
} satisfies ExportedHandler<GranulatorEnv>;

async function route(request: Request, url: URL, env: GranulatorEnv): Promise<Response> {
  const method = request.method;
  const path = url.pathname;

  if (path === "/api/handshake") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, HandshakeRequest);
    if (body instanceof Response) return body;
    return reply(await job(env, body.executionId, body.stageId).handshake(body));
  }
  if (path === "/api/process") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, ProcessRequest);
    if (body instanceof Response) return body;
    return reply(await job(env, body.executionId, body.stageId).process());
  }
  if (path === "/api/cancel") {
    if (method !== "POST") return notAllowed(method, "POST");
    const body = await parse(request, CancelRequest);
    if (body instanceof Response) return body;
    return reply(await job(env, body.executionId, body.stageId).cancel());
  }
  const progress = PROGRESS_PATH.exec(path);
  if (progress) {
    if (method !== "GET") return notAllowed(method, "GET");
    const executionId = ExecutionId.safeParse(safeDecode(progress[1]));
    const stageId = StageId.safeParse(url.searchParams.get("stageId"));
    if (!executionId.success || !stageId.success) {
      return error(400, "invalid_request", "needs a valid execution id in the path and ?stageId=stage_{n}");
    }
    return reply(await job(env, executionId.data, stageId.data).progress());
  }
  if (path === "/api/stats") {
    if (method !== "GET") return notAllowed(method, "GET");
    return json(200, await stats(env).snapshot());
  }
  if (path === "/api/stats/reset") {
    if (method !== "POST") return notAllowed(method, "POST");
    return json(200, await stats(env).reset());
  }
  return error(404, "not_found", `no route for ${path}`);
}

function job(env: GranulatorEnv, executionId: string, stageId: string) {
  return env.JOBS.get(env.JOBS.idFromName(`${executionId}:${stageId}`));
}

function stats(env: GranulatorEnv) {
  return env.STATS.get(env.STATS.idFromName("global"));
}

/** Constant-time: both sides are hashed first, so neither content nor length leaks through timing. */
async function authorized(request: Request, secret: string): Promise<boolean> {
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
  if (r.text !== undefined) return new Response(r.text, { status: r.status, headers: { "content-type": "application/json" } });
  return json(r.status, r.body ?? null);
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

function json(status: number, body: unknown): Response {
  return Response.json(body, { status });
}

function error(status: number, code: string, message: string, details?: unknown): Response {
  return json(status, { error: { code, message, ...(details === undefined ? {} : { details }) } });
}
