import { type IRequest, Router } from "itty-router";
import { z } from "zod";
import { RetryUndeliverableRequest } from "../schemas/api";
import { PoolName } from "../schemas/common";
import { ClientQuotas } from "../schemas/clients";
import { PoolSpec } from "../schemas/ledger";
import openapiDocument from "../docs/openapi.json";
import { type Principal, authorize, inScope, requireClient, requireUnscoped, requireVisibleExecution, visibleClients } from "./api-keys";
import { missingSecrets } from "./secrets";
import { clientIdOf, getClient, listClients, putQuotas } from "./clients";
import { configOf } from "./config";
import {
  cancelExecution,
  decideStage,
  liveTicket,
  openLive,
  pauseExecution,
  resumeExecution,
  checkExecutionId,
  getResult,
  getResultContent,
  getItems,
  getSpans,
  readStatus,
  isCallbackKind,
  readData,
  startExecution,
  workerCallback,
  writeData,
} from "./execution-service";
import { ApiError, type JsonLimits, errorResponse, json, parseWith, readJson } from "./http";
import { countExecutions, listExecutions } from "./index-routing";
import { resourcesDocument } from "./ledger-fanout";
import { ShardConfigError, layoutOf } from "./ledger-routing";
import { checkPoolTarget, putPoolAt } from "./pool-admin";
import { rerunExecution } from "./rerun-service";
import { log } from "./log";
import { withTimeout } from "./outbound";
import { metricsResponse } from "./prometheus";
import { samplerOf, seriesDocument } from "./ops-series";
import { listUndeliverable, retryUndeliverable } from "./undeliverable";
import { createSchedule, deleteSchedule, getSchedule, listSchedules, patchSchedule } from "./schedule-service";
import { wantsHtml } from "./ui/common";
import { clientsPage } from "./ui/clients-page";
import { executionPage } from "./ui/execution-page";
import { resourcesPage } from "./ui/resources-page";
import { overviewPage } from "./ui/overview-page";

/**
 * The front Worker's HTTP API (docs/protocol.md). Handlers stay thin: auth,
 * parse, call the service or the right object, answer JSON. Every error is
 * `{ error: { code, message, details? } }`; nothing leaks a stack or a secret.
 */
type Args = [env: Env, ctx: ExecutionContext];

/** Method and path pattern of every route, for 405 answers and the OpenAPI check. */
export const ROUTES: { method: string; path: string }[] = [];

const router = Router<IRequest, Args>({
  catch: (err: unknown) => {
    if (err instanceof ApiError) return errorResponse(err);
    log("error", "unhandled_error", { error: err instanceof Error ? err.message : String(err) });
    return errorResponse(new ApiError(500, "internal_error", "internal error"));
  },
});

function route(method: "get" | "post" | "put" | "patch" | "delete", path: string, handler: (req: IRequest, env: Env, ctx: ExecutionContext) => Promise<Response> | Response) {
  ROUTES.push({ method: method.toUpperCase(), path });
  router[method](path, handler);
}

/**
 * The caller of a route on one execution (KAM, operators, scoped keys), once
 * that execution is one it may see: another client's answers 404 as if it did not exist.
 */
async function visible(req: IRequest, env: Env): Promise<Principal> {
  const who = await authorize(req, env, ["kam", "ops", "client"]);
  await requireVisibleExecution(env, who, req.params.id);
  return who;
}

const origin = (req: IRequest) => new URL(req.url).origin;

/** A body's limits from TUNING; a worker's callback may be larger than a request. */
function bodyLimits(env: Env, kind: "request" | "callback" = "request"): JsonLimits {
  const t = configOf(env).tuning;
  return { maxBytes: kind === "callback" ? t.maxCallbackBodyBytes : t.maxBodyBytes, maxJsonDepth: t.maxJsonDepth, maxJsonKeys: t.maxJsonKeys };
}

// The one route that answers when secrets are missing or the shard config is refused, and says which (names, never values).
route("get", "/health", (_req, env) => {
  const missing = missingSecrets(env);
  const invalid = shardConfigProblems(env);
  const time = new Date().toISOString();
  if (missing.length || invalid.length) {
    return json({ status: "misconfigured", service: "orchestrator-v2", time, missing, ...(invalid.length ? { config_invalid: invalid } : {}) }, 503);
  }
  return json({ status: "ok", service: "orchestrator-v2", time });
});

// The API description (docs/openapi.json, generated from the zod schemas by `npm run openapi`).
route("get", "/openapi.json", () => json(openapiDocument));

// Operator pages (src/ui/): they hold no data, so no token; their scripts read with the OPS token.
route("get", "/ui", () => overviewPage());
route("get", "/ui/executions/:id", (req) => executionPage(checkExecutionId(req.params.id)));
route("get", "/ui/clients", () => clientsPage());
route("get", "/ui/resources", () => resourcesPage());

route("post", "/execute", async (req, env) => {
  const who = await authorize(req, env, ["kam", "client"]);
  const body = await readJson(req, z.unknown(), bodyLimits(env));
  const trace = { traceparent: req.headers.get("traceparent"), tracestate: req.headers.get("tracestate") };
  const out = await startExecution(env, body, origin(req), trace, (clientId) => requireClient(who, clientId));
  return json(out.body, out.status);
});

// The execution index (src/index-routing.ts); registered before /executions/:id.
route("get", "/executions", async (req, env) => {
  if (wantsHtml(req)) return overviewPage();
  const who = await authorize(req, env, ["kam", "ops", "client"]);
  return json(await listExecutions(env, new URL(req.url), (asked) => visibleClients(who, asked)));
});

route("get", "/executions/counts", async (req, env) => {
  const who = await authorize(req, env, ["kam", "ops", "client"]);
  return json(await countExecutions(env, new URL(req.url), Date.now(), (asked) => visibleClients(who, asked)));
});

route("get", "/executions/:id", async (req, env) => {
  if (wantsHtml(req)) return executionPage(checkExecutionId(req.params.id));
  const who = await authorize(req, env, ["kam", "ops", "client"]);
  return readStatus(env, req.params.id, new URL(req.url).searchParams, req.headers.get("if-none-match"), (clientId) => inScope(who, clientId));
});

route("get", "/executions/:id/result", async (req, env) => {
  await visible(req, env);
  return json(await getResult(env, req.params.id, origin(req)));
});

route("get", "/executions/:id/result/content", async (req, env) => {
  await visible(req, env);
  return getResultContent(env, req.params.id);
});

route("get", "/executions/:id/stages/:stageId/items", async (req, env) => {
  await visible(req, env);
  return json(await getItems(env, req.params.id, req.params.stageId, new URL(req.url).searchParams));
});

route("get", "/executions/:id/spans", async (req, env) => {
  await visible(req, env);
  return json(await getSpans(env, req.params.id));
});

route("post", "/executions/:id/cancel", async (req, env) => {
  await visible(req, env);
  return json(await cancelExecution(env, req.params.id));
});

// Live updates (docs/protocol.md, "Live updates"): a ticket from an authenticated request opens the socket.
route("post", "/executions/:id/live-ticket", async (req, env) => {
  const who = await visible(req, env);
  return json(await liveTicket(env, req.params.id, who.role, origin(req)));
});

route("get", "/executions/:id/live", (req, env) => openLive(env, req, req.params.id));

route("post", "/executions/:id/rerun", async (req, env) => {
  await visible(req, env);
  const body = req.body ? await readJson(req, z.unknown(), bodyLimits(env)) : {};
  const out = await rerunExecution(env, req.params.id, body, origin(req));
  return json(out.body, out.status);
});

route("post", "/executions/:id/pause", async (req, env) => {
  await visible(req, env);
  return json(await pauseExecution(env, req.params.id));
});

route("post", "/executions/:id/resume", async (req, env) => {
  await visible(req, env);
  return json(await resumeExecution(env, req.params.id));
});

// Approval stages: registered before the worker callbacks, whose last segment is also a name.
for (const [action, approved] of [["approve", true], ["reject", false]] as const) {
  route("post", `/executions/:id/stages/:stageId/${action}`, async (req, env) => {
    const by = (await visible(req, env)).role;
    const body = req.body ? await readJson(req, z.unknown(), bodyLimits(env)) : {};
    return json(await decideStage(env, req.params.id, req.params.stageId, approved, by, body));
  });
}

route("post", "/executions/:id/stages/:stageId/:kind", async (req, env) => {
  const { id, stageId, kind } = req.params;
  if (!isCallbackKind(kind)) throw new ApiError(404, "not_found", `no callback named ${kind}`);
  const answer = await workerCallback(env, req, id, stageId, kind, () =>
    readJson(req, z.unknown(), bodyLimits(env, "callback")),
  );
  return json(answer.body, answer.status);
});

// Data references (docs/protocol.md, "Data"): stage workers read and upload with their callback token.
route("get", "/data/:kind/:executionId/:stageId/:name", async (req, env) => {
  const { kind, executionId, stageId, name } = req.params;
  return readData(env, req, `${kind}/${executionId}/${stageId}/${name}`);
});

route("put", "/data/:executionId/:stageId/:name", async (req, env) => {
  const { executionId, stageId, name } = req.params;
  return json(await writeData(env, req, executionId, stageId, name), 201);
});

// Every shard's snapshot merged (src/ledger-fanout.ts); 503 only when no shard answered.
route("get", "/resources", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  const { doc, answered } = await resourcesDocument(env);
  if (answered === 0) throw new ApiError(503, "unavailable", "the resource ledger is unavailable: no shard answered in time, or each failed");
  return json(doc);
});

// Messages executions could not deliver for longer than outboxUndeliverableMs (src/undeliverable.ts).
route("get", "/resources/undeliverable", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  return json(await listUndeliverable(env, new URL(req.url)));
});

route("post", "/resources/undeliverable/retry", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  const body = await readJson(req, RetryUndeliverableRequest, bodyLimits(env));
  return json(await retryUndeliverable(env, body));
});

route("put", "/resources/pools/:name", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  const name = checkPoolTarget(layoutOf(env), parseWith(PoolName, decodeURIComponent(req.params.name), "pool name"));
  const spec = await readJson(req, PoolSpec, bodyLimits(env));
  return json(await putPoolAt(env, name, spec));
});

// Current counters and gauges in the Prometheus text format (src/prometheus.ts).
route("get", "/metrics", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  return metricsResponse(env);
});

// The numbers behind the charts on /ui (src/ops-series.ts).
route("get", "/metrics/series", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["ops"]));
  return json(await seriesDocument(env, new URL(req.url)));
});

// Scheduled executions (src/schedule-service.ts, actors/schedule-shard.ts).
route("post", "/schedules", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["kam", "ops"]));
  const out = await createSchedule(env, await readJson(req, z.unknown(), bodyLimits(env)));
  return json(out.body, out.status);
});

route("get", "/schedules", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["kam", "ops"]));
  return json(await listSchedules(env, new URL(req.url)));
});

route("get", "/schedules/:id", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["kam", "ops"]));
  return json(await getSchedule(env, req.params.id));
});

route("patch", "/schedules/:id", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["kam", "ops"]));
  return json(await patchSchedule(env, req.params.id, await readJson(req, z.unknown(), bodyLimits(env))));
});

route("delete", "/schedules/:id", async (req, env) => {
  requireUnscoped(await authorize(req, env, ["kam", "ops"]));
  await deleteSchedule(env, req.params.id);
  return new Response(null, { status: 204 });
});

// Clients (src/clients.ts): quotas in force and usage, kept by the ledger.
route("put", "/clients/:client_id/quotas", async (req, env) => {
  const who = await authorize(req, env, ["ops"]);
  const clientId = clientIdOf(req.params.client_id);
  requireClient(who, clientId);
  const quotas = await readJson(req, ClientQuotas, bodyLimits(env));
  return json(await putQuotas(env, clientId, quotas));
});

route("get", "/clients/:client_id", async (req, env) => {
  // KAM_TOKEN acts for every client, so it may read each one's quotas and usage; a scoped key its own clients'.
  const who = await authorize(req, env, ["ops", "kam", "client"]);
  const clientId = clientIdOf(req.params.client_id);
  requireClient(who, clientId);
  return json(await getClient(env, clientId));
});

route("get", "/clients", async (req, env) => {
  const who = await authorize(req, env, ["ops"]);
  const { clients, shards } = await listClients(env);
  return json({ clients: clients.filter((c) => inScope(who, c.client_id)), shards });
});

/** A known path with another method is 405 (with Allow); anything else 404. */
router.all("*", (req) => {
  const path = new URL(req.url).pathname;
  const allowed = ROUTES.filter((r) => matches(r.path, path)).map((r) => r.method);
  if (allowed.length) {
    const res = errorResponse(new ApiError(405, "method_not_allowed", `use ${allowed.join(" or ")} for ${path}`));
    res.headers.set("allow", allowed.join(", "));
    return res;
  }
  return errorResponse(new ApiError(404, "not_found", `no route for ${req.method} ${path}`));
});

function matches(pattern: string, path: string): boolean {
  const re = new RegExp(`^${pattern.replace(/:[^/]+/g, "[^/]+")}/?$`);
  return re.test(path);
}

/**
 * 503 `misconfigured` while a secret is missing or unusable (src/secrets.ts): never serve with a guessable key.
 * 503 `config_invalid` while the ledger routing refuses LEDGER_SHARDS / LEDGER_SHARD_MAP: routing anything
 * under a layout where two shards could claim one pool could grant it twice.
 */
export function requireConfigured(env: Env): void {
  if (missingSecrets(env).length) {
    throw new ApiError(503, "misconfigured", "the orchestrator is missing secrets or has unusable ones (GET /health names them)");
  }
  const problems = shardConfigProblems(env);
  if (problems.length) throw new ApiError(503, "config_invalid", `the ledger shard config is refused: ${problems.join("; ")}`, { problems });
}

/** What the ledger routing refuses in LEDGER_SHARDS / LEDGER_SHARD_MAP (empty: the layout is valid). */
function shardConfigProblems(env: Env): string[] {
  try {
    layoutOf(env);
    return [];
  } catch (err) {
    if (err instanceof ShardConfigError) return err.problems;
    throw err;
  }
}

/** 400 for a path segment that is not valid percent-encoding, before any route reads it. */
function checkPathEncoding(pathname: string): void {
  for (const segment of pathname.split("/")) {
    try {
      decodeURIComponent(segment);
    } catch {
      throw new ApiError(400, "invalid_request", "a path segment is not valid percent-encoding", [{ path: "path", message: "malformed percent-escape" }]);
    }
  }
}

export async function handle(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
  try {
    const { pathname } = new URL(request.url);
    checkPathEncoding(pathname);
    if (pathname !== "/health") requireConfigured(env);
  } catch (err) {
    if (err instanceof ApiError) return errorResponse(err);
    throw err;
  }
  startSampler(env, ctx);
  return router.fetch(request, env, ctx);
}

/**
 * The queue sampler (actors/queue-sampler.ts) runs on its own alarm once
 * armed; each isolate makes sure of that once, off the request's path.
 */
let samplerStarted = false;
function startSampler(env: Env, ctx: ExecutionContext): void {
  if (samplerStarted || !env.QUEUE_SAMPLES) return;
  samplerStarted = true;
  ctx.waitUntil(
    withTimeout(samplerOf(env).ensure(), configOf(env).tuning.objectCallTimeoutMs, "queue sampler").catch((err) => {
      samplerStarted = false;
      log("warn", "queue_sampler_start_failed", { error: err instanceof Error ? err.message : String(err) });
    }),
  );
}
