import { WorkflowEntrypoint, type WorkflowEvent, type WorkflowStep } from "cloudflare:workers";
import { NonRetryableError } from "cloudflare:workflows";
import { CompleteCallback, FailCallback } from "../../schemas/worker-protocol";
import { BENCH_STAGES, bearer, error, json, WF_ORIGIN } from "./shared";
import { sameSecret } from "./same-secret";
import { startStage } from "./stage-driver";

/**
 * bitware-bench-workflows: the same three-stage pipeline as `bench_three_stage`,
 * written on Cloudflare Workflows, for `npm run bench -- --vs-workflows`
 * (issue 17, target 1). It drives the same bench stage worker with the same
 * protocol as the orchestrator:
 *
 * - per stage, one `step.do` sends the handshake and the process (both through
 *   the BENCH service binding; the protocol makes a replayed handshake and
 *   process idempotent per attempt, so a retried step is safe);
 * - then `step.waitForEvent` waits for the stage's completion, which the stage
 *   worker's `complete` callback delivers: the callback route checks the
 *   stage's token (HMAC of the instance and stage, compared in constant time
 *   by `crypto.subtle.verify`), validates the body with the protocol's zod
 *   schema and hands it to the instance with `instance.sendEvent`;
 * - the status is the instance's (`instance.status()`).
 *
 * Routes (reached through the bench gateway under /wf/):
 * - `POST /wf/execute` `{ parameters }` (Bearer KAM_TOKEN): creates an
 *   instance, 202 `{ execution_id }`;
 * - `GET /wf/executions/:id` (Bearer KAM_TOKEN): `{ execution_id, status }`
 *   with the orchestrator's status words (queued, running, completed, failed);
 * - `POST /wf/executions/:id/stages/:stageId/{complete,fail,progress}` (Bearer
 *   the stage's callback token): the worker's callbacks.
 *
 * What this leaves out compared with the orchestrator (and the bench says so
 * next to its figures): the resource ledger, the execution index, fencing of
 * late callbacks by attempt, the progress poll of a silent worker and the
 * per-stage deadline beyond the event's timeout.
 */
interface Fetcher {
  fetch(input: Request | string, init?: RequestInit): Promise<Response>;
}
export interface WorkflowsEnv {
  WORKER_SECRET: string;
  KAM_TOKEN: string;
  BENCH: Fetcher;
  PIPELINE: Workflow<PipelineParams>;
}

export interface PipelineParams {
  parameters: Record<string, unknown>;
}

/** The event a stage's callback delivers. */
type StageEvent = { kind: "complete"; output_json: string } | { kind: "fail"; code: string; message: string };

/** Per-stage wait for the worker's callback; the orchestrator's bench template gives each stage 60 s. */
const STAGE_TIMEOUT = "60 seconds";

export class BenchPipeline extends WorkflowEntrypoint<WorkflowsEnv, PipelineParams> {
  override async run(event: Readonly<WorkflowEvent<PipelineParams>>, step: WorkflowStep): Promise<{ output: unknown }> {
    const executionId = event.instanceId;
    const parameters = event.payload.parameters;
    const total = Number(parameters.bench_stages ?? BENCH_STAGES);
    let previousOutput: unknown = null;
    for (let i = 1; i <= total; i++) {
      const stageId = `stage_${i}`;
      const input = previousOutput;
      await step.do(`${stageId}: handshake and process`, { retries: { limit: 2, delay: "1 second", backoff: "constant" }, timeout: "30 seconds" }, async () => {
        await this.#start(executionId, stageId, i, parameters, input);
        return true;
      });
      const done = await step.waitForEvent<StageEvent>(`${stageId}: completion`, { type: stageId, timeout: STAGE_TIMEOUT });
      if (done.payload.kind === "fail") throw new NonRetryableError(`${stageId} failed: ${done.payload.code}: ${done.payload.message}`);
      previousOutput = JSON.parse(done.payload.output_json);
    }
    return { output: previousOutput };
  }

  /** Handshake, then process, as the orchestrator sends them (attempt 1: a step retry repeats the same attempt). */
  async #start(executionId: string, stageId: string, n: number, parameters: Record<string, unknown>, previousOutput: unknown): Promise<void> {
    const callbackUrl = `${WF_ORIGIN}/wf/executions/${executionId}/stages/${stageId}`;
    const token = await callbackToken(this.env.WORKER_SECRET, executionId, stageId);
    const failed = await startStage(this.env.BENCH, this.env.WORKER_SECRET, { executionId, n, parameters, previousOutput, callbackUrl, token });
    if (failed) throw new Error(failed);
  }
}

const EXECUTE_PATH = "/wf/execute";
const STATUS_PATH = /^\/wf\/executions\/([A-Za-z0-9_-]{1,100})$/;
const CALLBACK_PATH = /^\/wf\/executions\/([A-Za-z0-9_-]{1,100})\/stages\/(stage_\d{1,3})\/(complete|fail|progress)$/;

/** The orchestrator's status words for a Workflows instance status. */
function statusWord(s: InstanceStatus["status"]): string {
  switch (s) {
    case "complete":
      return "completed";
    case "errored":
    case "terminated":
      return "failed";
    case "queued":
      return "queued";
    default:
      return "running";
  }
}

export default {
  async fetch(request: Request, env: WorkflowsEnv): Promise<Response> {
    const { pathname } = new URL(request.url);
    if (pathname === "/health") return json(200, { status: "ok" });
    try {
      const cb = CALLBACK_PATH.exec(pathname);
      if (cb && request.method === "POST") return await onCallback(request, env, cb[1], cb[2], cb[3]);
      if (!(await sameSecret(bearer(request), env.KAM_TOKEN))) return error(401, "unauthorized", "missing or wrong bearer token");
      if (request.method === "POST" && pathname === EXECUTE_PATH) {
        const body = (await request.json().catch(() => null)) as { parameters?: unknown } | null;
        if (!body || typeof body.parameters !== "object" || body.parameters === null) return error(400, "invalid_request", "parameters must be an object");
        // The same id shape as the orchestrator's (the stage worker's protocol schema checks it).
        const id = `exec_${Date.now()}_wf${crypto.randomUUID().replaceAll("-", "").slice(0, 14)}`;
        const instance = await env.PIPELINE.create({ id, params: { parameters: body.parameters as Record<string, unknown> } });
        return json(202, { execution_id: instance.id, status: "queued" });
      }
      const st = STATUS_PATH.exec(pathname);
      if (request.method === "GET" && st) {
        const instance = await env.PIPELINE.get(st[1]).catch(() => null);
        if (!instance) return error(404, "not_found", "no such execution");
        const s = await instance.status();
        return json(200, { execution_id: st[1], status: statusWord(s.status), ...(s.error ? { error: s.error } : {}) });
      }
      return error(404, "not_found", `no route for ${request.method} ${pathname}`);
    } catch (err) {
      return error(500, "internal_error", err instanceof Error ? err.message : String(err));
    }
  },
};

/** A stage callback: the token, the body's shape, then the event for the waiting instance. */
async function onCallback(request: Request, env: WorkflowsEnv, id: string, stageId: string, kind: string): Promise<Response> {
  if (!(await verifyToken(env.WORKER_SECRET, id, stageId, bearer(request)))) return error(401, "unauthorized", "missing or invalid callback token");
  const raw = await request.json().catch(() => undefined);
  if (raw === undefined) return error(400, "invalid_json", "the body is not valid JSON");
  if (kind === "progress") return json(200, { ok: true, stage_status: "processing" });
  let payload: StageEvent;
  if (kind === "complete") {
    const parsed = CompleteCallback.safeParse(raw);
    if (!parsed.success) return error(400, "invalid_request", "the body does not match the protocol");
    payload = { kind: "complete", output_json: JSON.stringify(parsed.data.output ?? null) };
  } else {
    const parsed = FailCallback.safeParse(raw);
    if (!parsed.success) return error(400, "invalid_request", "the body does not match the protocol");
    payload = { kind: "fail", code: parsed.data.error.code, message: parsed.data.error.message };
  }
  const instance = await env.PIPELINE.get(id).catch(() => null);
  if (!instance) return error(404, "not_found", "no such execution");
  await instance.sendEvent({ type: stageId, payload });
  return json(200, { ok: true, stage_status: kind === "complete" ? "completed" : "failed" });
}

// ------------------------------------------------------------- helpers ----

const keys = new Map<string, Promise<CryptoKey>>();
function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keys.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
    keys.set(secret, key);
  }
  return key;
}

/** The stage's callback token: HMAC-SHA256 of the instance and stage, base64url. */
async function callbackToken(secret: string, id: string, stageId: string): Promise<string> {
  const mac = await crypto.subtle.sign("HMAC", await hmacKey(secret), new TextEncoder().encode(`${id}|${stageId}`));
  return btoa(String.fromCharCode(...new Uint8Array(mac))).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

async function verifyToken(secret: string, id: string, stageId: string, token: string): Promise<boolean> {
  if (!token || !secret) return false;
  let mac: Uint8Array;
  try {
    mac = Uint8Array.from(atob(token.replaceAll("-", "+").replaceAll("_", "/")), (c) => c.charCodeAt(0));
  } catch {
    return false;
  }
  return crypto.subtle.verify("HMAC", await hmacKey(secret), mac, new TextEncoder().encode(`${id}|${stageId}`));
}
