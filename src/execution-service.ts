import { z } from "zod";
import { DecisionRequest, ExecuteRequest, StatusQuery, type ExecuteResponse, ItemsQuery, type ItemsPage, type LiveTicket, type ResultDocument, type SpansDocument, type StatusDocument } from "../schemas/api";
import { ExecutionId, StageId } from "../schemas/common";
import { CompleteCallback, FailCallback, ProgressCallback } from "../schemas/worker-protocol";
import type { CallbackKind, CancelState, DecideState, Execution, InputRead, ItemsState, PauseState, ResultState, ResumeState, SpansState, StartResult, StatusRead } from "../actors/execution/index";
import type { RateLimitReport } from "../schemas/worker-protocol";
import type { ClaimResult, RequestRegistry } from "../actors/request-registry";
import type { DataReference } from "../schemas/data";
import { type Role, verifyToken } from "./auth";
import { DATA_LIMITS, UploadError, dataKey, openStream, parseDataKey, putStream, r2Of, verifying } from "./data-store";
import { admitStart } from "./clients";
import { configOf } from "./config";
import { reportRateLimits } from "./pacing";
import { sha256Hex } from "./hash";
import { ApiError, parseParam, parseWith } from "./http";
import { newExecutionId, uploadNonce } from "./ids";
import { log } from "./log";
import { emit } from "./metrics";
import { LIVE_PROTOCOL, TICKET_PREFIX, TICKET_USE_HEADER, issueLiveTicket, verifyLiveTicket } from "./live-ticket";
import { askObject, withTimeout } from "./outbound";
import { remember } from "./bounded-memo";
import { acceptTrace, readTraceparent } from "./trace";

/**
 * What the HTTP routes and the RPC entrypoint both do: validate, find the
 * right object, call it with a deadline. Errors are ApiErrors with a status
 * and a code; the callers turn them into responses or RPC results.
 */

export function executionStub(env: Env, id: string): DurableObjectStub<Execution> {
  const ns = env.EXECUTION as unknown as DurableObjectNamespace<Execution>;
  return ns.get(ns.idFromName(id));
}

/** Validates an execution id before any object is touched. */
export function checkExecutionId(id: unknown): string {
  return parseParam(ExecutionId, id, "id", "execution id");
}

function objectTimeout(env: Env): number {
  return configOf(env).tuning.objectCallTimeoutMs;
}

export function call<T>(env: Env, promise: PromiseLike<T>, what: string): Promise<T> {
  return askObject(promise, objectTimeout(env), what);
}

/** Canonical JSON (sorted keys) so the same request body always hashes the same. */
export function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}


/** A worker's name for its upload: one path segment of safe characters. */
const DataName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/, "letters, digits, '_', '.', '-' only");

export interface StartOutcome {
  status: 200 | 202;
  body: ExecuteResponse;
}

/**
 * A new execution id, or with a `request_id` the one this client's request
 * already has; 409 `idempotency_conflict` when it came with another body.
 */
export async function claimExecutionId(
  env: Env,
  clientId: string,
  requestId: string | null,
  requestHash: string | null,
): Promise<{ executionId: string }> {
  const fresh = newExecutionId();
  if (!requestId || !requestHash) return { executionId: fresh };
  const ns = env.REQUEST_REGISTRY as unknown as DurableObjectNamespace<RequestRegistry>;
  const registry = ns.get(ns.idFromName(clientId));
  const claim = await call<ClaimResult>(env, registry.claim(requestId, requestHash, fresh), "request registry");
  if (claim.outcome === "conflict") {
    throw new ApiError(409, "idempotency_conflict", "this request_id was already used with a different body", { execution_id: claim.executionId });
  }
  return { executionId: claim.executionId };
}

/** `trace`: the caller's `traceparent` and `tracestate` headers, if any (src/trace.ts); a new trace otherwise. */
export async function startExecution(
  env: Env,
  raw: unknown,
  origin: string,
  trace: { traceparent?: string | null; tracestate?: string | null } = {},
  /** Throws when the caller may not start for this client (a scoped key: 403, src/api-keys.ts). */
  mayStartFor: (clientId: string) => void = () => {},
): Promise<StartOutcome> {
  const input = parseWith(ExecuteRequest, raw, "body");
  mayStartFor(input.client_id);
  // The client's quotas first (403 priority_not_allowed, 429 budget_exhausted / rate_limited): nothing is created when refused.
  const admitted = await admitStart(env, input.client_id, input.priority);
  const requestHash = input.request_id
    ? await sha256Hex(canonical({ template_name: input.template_name, parameters: input.parameters, priority: input.priority }))
    : null;
  const { executionId } = await claimExecutionId(env, input.client_id, input.request_id ?? null, requestHash);
  // start() is idempotent too, so a duplicate whose first attempt never reached the object still creates it.
  const result = await call(
    env,
    executionStub(env, executionId).start({
      execution_id: executionId,
      template_name: input.template_name,
      parameters: input.parameters,
      client_id: input.client_id,
      request_id: input.request_id ?? null,
      request_hash: requestHash,
      priority: input.priority,
      notify: input.notify ?? configOf(env).notifyDefault,
      trace: acceptTrace(trace.traceparent, trace.tracestate),
      execution_timeout_ms: input.execution_timeout_ms ?? null,
      ...admitted,
    }),
    "execution start",
  );
  return startAnswer(executionId, result, origin);
}

/**
 * The start summary: 202 from the one start() call that created the execution,
 * 200 from every other. Not from the registry's claim: a duplicate's start()
 * can reach the object before the claimer's (the claimer still arms the
 * registry's alarm), and then the claim's answer would give no caller the 202.
 */
export function startAnswer(executionId: string, result: StartResult, origin: string): StartOutcome {
  return {
    status: result.created ? 202 : 200,
    body: {
      execution_id: executionId,
      status: result.status,
      estimated_completion_ms: result.estimated_completion_ms,
      estimated_completion_at: result.estimated_completion_at,
      status_url: `${origin}/executions/${executionId}`,
    },
  };
}

export async function getStatus(env: Env, id: unknown): Promise<StatusDocument> {
  const executionId = checkExecutionId(id);
  const doc = await call(env, executionStub(env, executionId).getStatus(), "execution status");
  if (!doc) throw new ApiError(404, "not_found", `no execution ${executionId}`);
  return doc;
}

/** The status document's `ETag`: weak, as running durations grow without a new version. */
export const statusEtag = (executionId: string, version: number) => `W/"${executionId}.${version}"`;

/** The version an `If-None-Match` names for this execution (the last such tag), or null. */
function etagVersion(header: string | null, executionId: string): number | null {
  let found: number | null = null;
  for (const m of (header ?? "").matchAll(/(?:W\/)?"([^"]*)"/g)) {
    const dot = m[1].lastIndexOf(".");
    if (dot > 0 && m[1].slice(0, dot) === executionId && /^\d{1,15}$/.test(m[1].slice(dot + 1))) found = Number(m[1].slice(dot + 1));
  }
  return found;
}

/** An ended execution's document this isolate holds a lease on (status-cache.ts): it does not change before `until`. */
interface Leased {
  version: number;
  client_id: string;
  body: string;
  until: number;
}
const leased = new Map<string, Leased>();
/** Bounded: at most this many documents (a few KB each) per isolate, the least recently leased dropped first. */
const MAX_LEASED = 1_000;

/**
 * `GET /executions/:id` (docs/protocol.md, "Status reads"): the document from
 * the execution's memory with its `ETag`, 304 when `If-None-Match` names the
 * current version, and a long poll with `wait_ms` and `since`. `visible`: the
 * caller may see this client's executions (another client's is 404). A read
 * that does not wait is answered from this isolate's memory while it holds a
 * lease on the document (an ended execution's, for `statusLeaseMs`).
 */
export async function readStatus(env: Env, id: unknown, query: URLSearchParams, ifNoneMatch: string | null, visible: (clientId: string) => boolean): Promise<Response> {
  const executionId = checkExecutionId(id);
  const q = parseWith(StatusQuery, Object.fromEntries(query), "query");
  const max = configOf(env).tuning.statusWaitMaxMs;
  if ((q.wait_ms ?? 0) > max) {
    throw new ApiError(400, "invalid_request", "invalid query: wait_ms", [{ path: "wait_ms", message: `at most ${max} (statusWaitMaxMs)` }]);
  }
  const waitMs = q.wait_ms ?? 0;
  const known = etagVersion(ifNoneMatch, executionId);
  // Taken before the call: the lease runs from the object's answer, which is later, so it ends here first.
  const asked = Date.now();
  const held = waitMs === 0 ? leased.get(executionId) : undefined;
  let r: { version: number; client_id: string; body: string | null };
  if (held && asked < held.until) r = held;
  else {
    const stub = executionStub(env, executionId);
    const answer = await askObject<StatusRead>(stub.readStatus({ wait_ms: waitMs, since: q.since ?? null, if_none_match: known }), waitMs + objectTimeout(env), "execution status");
    if (answer.state === "missing") throw new ApiError(404, "not_found", `no execution ${executionId}`);
    if (answer.lease_ms > 0 && answer.body !== null) {
      remember(leased, executionId, { version: answer.version, client_id: answer.client_id, body: answer.body, until: asked + answer.lease_ms }, MAX_LEASED);
    } else leased.delete(executionId);
    r = answer;
  }
  // Another client's execution answers as if it did not exist.
  if (!visible(r.client_id)) throw new ApiError(404, "not_found", `no execution ${executionId}`);
  const headers = { etag: statusEtag(executionId, r.version), vary: "Accept", "cache-control": "no-cache" };
  if (r.body === null || known === r.version) return new Response(null, { status: 304, headers });
  return new Response(r.body, { status: 200, headers: { ...headers, "content-type": "application/json; charset=utf-8" } });
}

/** A page of a fan-out stage's items (404 for an unknown stage, 409 for a stage that is not a fan-out). */
export async function getItems(env: Env, id: unknown, stageId: unknown, query: URLSearchParams): Promise<ItemsPage> {
  const executionId = checkExecutionId(id);
  const stage = parseParam(StageId, stageId, "stage_id", "stage id");
  const q = parseWith(ItemsQuery, Object.fromEntries(query), "query");
  const r = await call<ItemsState>(env, executionStub(env, executionId).getItems(stage, Number(q.cursor ?? 0), q.limit), "execution items");
  if (r.state === "missing") throw new ApiError(404, "not_found", `no stage ${stage} in execution ${executionId}`);
  if (r.state === "not_fan_out") throw new ApiError(409, "not_fan_out", `${stage} has no items: it has no for_each`);
  return { execution_id: executionId, stage_id: stage, total: r.total, items: r.items, next_cursor: r.next_cursor };
}

/** `GET /executions/{id}/spans`: every stage and item attempt as a span. */
export async function getSpans(env: Env, id: unknown): Promise<SpansDocument> {
  const executionId = checkExecutionId(id);
  const r = await call<SpansState>(env, executionStub(env, executionId).getSpans(), "execution spans");
  if (r.state === "missing") throw new ApiError(404, "not_found", `no execution ${executionId}`);
  return r.document;
}

/** The completed execution's result, or the 404 / 409 / 410 that explains why there is none. */
async function completedResult(env: Env, executionId: string): Promise<Extract<ResultState, { state: "completed" }>> {
  const r = await call<ResultState>(env, executionStub(env, executionId).getResult(), "execution result");
  if (r.state === "missing") throw new ApiError(404, "not_found", `no execution ${executionId}`);
  if (r.state === "not_completed") throw new ApiError(409, "not_completed", `the execution is ${r.status}`, { status: r.status });
  if (r.state === "expired") throw new ApiError(410, "data_expired", `the result was deleted at ${new Date(r.at).toISOString()} (retention)`);
  return r;
}

export async function getResult(env: Env, id: unknown, origin: string): Promise<ResultDocument> {
  const executionId = checkExecutionId(id);
  const r = await completedResult(env, executionId);
  return {
    execution_id: executionId,
    status: "completed",
    output: r.outputRef ? null : r.output,
    output_reference: r.outputRef,
    content_url: `${origin}/executions/${executionId}/result/content`,
    cost: r.cost,
  };
}

/**
 * Stored bytes are whatever a worker produced: a browser must neither sniff
 * them into something runnable nor render them in our origin.
 */
export const STORED_CONTENT_HEADERS = {
  "x-content-type-options": "nosniff",
  "content-disposition": "attachment",
  "content-security-policy": "default-src 'none'",
} as const;

/** The deliverable's bytes: JSON text when inline, else streamed from KV or R2 and verified on the way. */
export async function getResultContent(env: Env, id: unknown): Promise<Response> {
  const r = await completedResult(env, checkExecutionId(id));
  if (!r.outputRef) return new Response(JSON.stringify(r.output), { headers: { "content-type": "application/json", ...STORED_CONTENT_HEADERS } });
  return streamReference(env, r.outputRef);
}

export async function streamReference(env: Env, ref: DataReference): Promise<Response> {
  // openStream bounds the store's answer (storageCallTimeoutMs) and every chunk of the body after it.
  const opened = await openStream(env, ref).catch((err) => {
    log("warn", "data_store_unavailable", { key: ref.key, error: err instanceof Error ? err.message : String(err) });
    throw new ApiError(503, "unavailable", `the data store did not answer within ${configOf(env).tuning.storageCallTimeoutMs} ms, or it failed`);
  });
  if (!opened) throw new ApiError(410, "data_expired", `${ref.key} is gone`);
  return new Response(verifying(opened.body, ref.sha256), {
    headers: { "content-type": ref.contentType, "content-length": String(ref.size), "x-content-sha256": ref.sha256, ...STORED_CONTENT_HEADERS },
  });
}

/** `GET /data/{key}`: a stage worker reads one of its stage's inputs with the stage's data token. */
export async function readData(env: Env, request: Request, key: string): Promise<Response> {
  if (!parseDataKey(key)) throw new ApiError(400, "invalid_request", "not a data key", [{ path: "key", message: "expected {kv|r2}/{execution_id}/..." }]);
  const claims = await verifyToken(request, env, { use: "data" });
  // The token names no keys (its size must not grow with the inputs): the Execution it names answers whether
  // the key is a stored input of that stage's attempt, by its records, never by the key's text. That covers the
  // keys a rerun took over by reference from the original (their key names the original; the rerun holds their
  // records) and nothing of any other execution, which this Execution never recorded as an input.
  const read = await call<InputRead>(env, executionStub(env, claims.executionId).inputRef(claims.stageId, claims.attempt, key), "execution data");
  if (read.state === "not_input") throw new ApiError(403, "forbidden", `this token reads only the inputs of ${claims.stageId} (attempt ${claims.attempt})`);
  if (read.state === "gone") throw new ApiError(404, "not_found", `no data at ${key}`);
  return streamReference(env, read.ref);
}

/** `PUT /data/{execution_id}/{stage_id}/{name}`: a stage worker uploads a large output, streamed to R2. */
export async function writeData(env: Env, request: Request, id: string, stageId: string, name: string): Promise<DataReference> {
  const executionId = checkExecutionId(id);
  parseParam(StageId, stageId, "stage_id", "stage id");
  parseWith(DataName, name, "data name");
  const claims = await verifyToken(request, env, { executionId, stageId, use: "callback" });
  const length = Number(request.headers.get("content-length") ?? "NaN");
  if (!Number.isInteger(length) || length < 0) throw new ApiError(411, "length_required", "send Content-Length with the upload");
  if (length > DATA_LIMITS.maxUploadBytes) {
    throw new ApiError(413, "payload_too_large", `uploads are limited to ${DATA_LIMITS.maxUploadBytes} bytes`, { max_bytes: DATA_LIMITS.maxUploadBytes });
  }
  if (!request.body) throw new ApiError(400, "invalid_request", "the upload has no body");
  type Check = { ok: true } | { ok: false; code: string; message: string };
  const stub = executionStub(env, executionId);
  // The stage and attempt are checked before a byte is written: a replayed or late upload stores nothing.
  const allowed = await call<Check>(env, stub.uploadAllowed(stageId, claims.attempt), "execution data");
  if (!allowed.ok) throw new ApiError(409, allowed.code, allowed.message);
  // A key of its own per upload (the nonce): an upload can never overwrite one the Execution recorded.
  const key = dataKey("r2", executionId, stageId, `a${claims.attempt}-${uploadNonce()}-${name}`);
  let ref: DataReference;
  try {
    ref = await putStream(env, key, request.body, length, request.headers.get("content-type") ?? "application/octet-stream");
  } catch (err) {
    if (err instanceof UploadError) throw new ApiError(err.status, err.code, err.message);
    throw err;
  }
  const registered = await call<Check>(env, stub.registerUpload(stageId, claims.attempt, ref), "execution data");
  if (!registered.ok) {
    // Only this upload's own key, which nothing recorded, is removed.
    await withTimeout(r2Of(env).delete(key), objectTimeout(env), "r2.delete").catch(() => {});
    throw new ApiError(409, registered.code, registered.message);
  }
  return ref;
}

/** Cancel and pause answer alike: 404 for a missing execution, 409 `already_terminal` for an ended one. */
function stoppedOrThrow(r: { state: "missing" } | { state: string; status: StatusDocument }, executionId: string): StatusDocument {
  if (!("status" in r)) throw new ApiError(404, "not_found", `no execution ${executionId}`);
  if (r.state === "already_terminal") {
    throw new ApiError(409, "already_terminal", `the execution is already ${r.status.status}`, { status: r.status.status });
  }
  return r.status;
}

export async function cancelExecution(env: Env, id: unknown): Promise<StatusDocument> {
  const executionId = checkExecutionId(id);
  const r = await call<CancelState>(env, executionStub(env, executionId).cancel(), "execution cancel");
  return stoppedOrThrow(r, executionId);
}

/** `POST /executions/:id/pause`: 200 paused (also when it already was); 409 `already_terminal`. */
export async function pauseExecution(env: Env, id: unknown): Promise<StatusDocument> {
  const executionId = checkExecutionId(id);
  const r = await call<PauseState>(env, executionStub(env, executionId).pause(), "execution pause");
  return stoppedOrThrow(r, executionId);
}

/** `POST /executions/:id/resume`: 200 back to running (or queued); 409 `not_paused`. */
export async function resumeExecution(env: Env, id: unknown): Promise<StatusDocument> {
  const executionId = checkExecutionId(id);
  const r = await call<ResumeState>(env, executionStub(env, executionId).resume(), "execution resume");
  if (r.state === "missing") throw new ApiError(404, "not_found", `no execution ${executionId}`);
  if (r.state === "not_paused") throw new ApiError(409, "not_paused", `the execution is ${r.status.status}, not paused`, { status: r.status.status });
  return r.status;
}

/** `POST /executions/:id/live-ticket`: a minute's ticket for the live socket of an execution that exists. */
export async function liveTicket(env: Env, id: unknown, role: Role, origin: string): Promise<LiveTicket> {
  const doc = await getStatus(env, id);
  const { ticket, expires_at } = await issueLiveTicket(env, doc.execution_id, role, Date.now());
  return { ticket, expires_at, url: `${origin.replace(/^http/, "ws")}/executions/${doc.execution_id}/live`, protocols: [LIVE_PROTOCOL, `${TICKET_PREFIX}${ticket}`] };
}

/** `GET /executions/:id/live`: the ticket is checked here, then the execution's object takes the socket. */
export async function openLive(env: Env, request: Request, id: unknown): Promise<Response> {
  const executionId = checkExecutionId(id);
  if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
    throw new ApiError(426, "upgrade_required", "connect with a WebSocket (Upgrade: websocket)");
  }
  const use = await verifyLiveTicket(env, request, executionId, Date.now());
  // Set here, over whatever the caller sent: the object trusts it as the verified ticket's use.
  const headers = new Headers(request.headers);
  headers.set(TICKET_USE_HEADER, `${use.nonce}.${use.expiresAt}`);
  const res = await call(env, executionStub(env, executionId).fetch(new Request(request, { headers })), "execution live");
  if (res.status === 404) throw new ApiError(404, "not_found", `no execution ${executionId}`);
  return res;
}

/** `POST /executions/:id/stages/:stage_id/approve|reject`: 200 with the status document; 409 `not_awaiting_approval`. */
export async function decideStage(env: Env, id: unknown, stageId: unknown, approved: boolean, by: Role, body: unknown): Promise<StatusDocument> {
  const executionId = checkExecutionId(id);
  const stage = parseParam(StageId, stageId, "stage_id", "stage id");
  const { comment } = parseWith(DecisionRequest, body ?? {}, "body");
  const r = await call<DecideState>(env, executionStub(env, executionId).decide(stage, approved, by, comment ?? null), "execution decision");
  if (r.state === "missing") throw new ApiError(404, "not_found", `no execution ${executionId}`);
  if (r.state === "missing_stage") throw new ApiError(404, "not_found", `execution ${executionId} has no stage ${stage}`);
  if (r.state === "not_awaiting_approval") {
    throw new ApiError(409, "not_awaiting_approval", `${stage} is ${r.stage_status}, not awaiting approval`, { stage_status: r.stage_status });
  }
  return r.status;
}

const CALLBACK_SCHEMAS = { progress: ProgressCallback, complete: CompleteCallback, fail: FailCallback } as const;

export function isCallbackKind(kind: string): kind is CallbackKind {
  return kind in CALLBACK_SCHEMAS;
}

/** A worker callback: the token is checked here (stateless HMAC) before the object is touched. */
export async function workerCallback(
  env: Env,
  request: Request,
  id: string,
  stageId: string,
  kind: CallbackKind,
  readBody: () => Promise<unknown>,
) {
  const refused = (code: string) => emit(env, { event: "callback_refused", code, kind, stage_id: stageId, execution_id: String(id).slice(0, 64) });
  try {
    const executionId = checkExecutionId(id);
    parseParam(StageId, stageId, "stage_id", "stage id");
    const claims = await verifyToken(request, env, { executionId, stageId, use: "callback" });
    const payload = parseWith(CALLBACK_SCHEMAS[kind], await readBody(), "body");
    const answer = await call(env, executionStub(env, executionId).callback(kind, stageId, claims.attempt, payload), "execution callback");
    // The worker sends the attempt's traceparent back: the line joins its span in any trace backend.
    const tp = readTraceparent(request.headers.get("traceparent"));
    log("info", "callback_received", { execution_id: executionId, stage_id: stageId, attempt: claims.attempt, kind, trace_id: tp?.trace_id, span_id: tp?.span_id, status: answer.status });
    // A genuine callback's rate-limit reports pace the pool for every execution (even when the callback itself was late).
    await reportRateLimits(env, (payload as { rate_limits?: RateLimitReport[] }).rate_limits, { execution_id: executionId, stage_id: stageId });
    if (answer.status >= 400) refused((answer.body as { error?: { code?: string } }).error?.code ?? `http_${answer.status}`);
    return answer;
  } catch (err) {
    if (err instanceof ApiError) refused(err.code);
    throw err;
  }
}
