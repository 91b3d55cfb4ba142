import {
  OpenAPIRegistry,
  OpenApiGeneratorV31,
  type ResponseConfig,
  type RouteConfig,
  zodToOpenAPIRegistry,
} from "@asteasolutions/zod-to-openapi";
import type { OpenAPIDefinitions } from "@asteasolutions/zod-to-openapi/dist/openapi-registry";
import { z } from "zod";
import pkg from "../package.json";
import {
  Cost,
  DecisionRequest,
  EventType,
  ExecuteRequest,
  ExecuteResponse,
  ExecutionEvent,
  ExecutionStatus,
  ItemCounts,
  ItemsPage,
  ItemsQuery,
  LiveMessage,
  LiveTicket,
  NotificationsDocument,
  RerunRequest,
  RerunResponse,
  ResultDocument,
  RetryUndeliverableRequest,
  RetryUndeliverableResult,
  StageDocument,
  StageStatus,
  SpanDocument,
  SpansDocument,
  StatusDocument,
  StatusQuery,
  UndeliverableList,
  UndeliverableMessage,
} from "../schemas/api";
import { SeriesDocument, SeriesQuery } from "../schemas/series";
import { ClientId, ErrorEnvelope, ErrorInfo, ExecutionId, PoolAmounts, PoolName, StageId } from "../schemas/common";
import { DataReference } from "../schemas/data";
import { CountsQuery, ExecutionCounts, ExecutionList, ExecutionSummary, IndexEntry, ListQuery } from "../schemas/index-entry";
import { ClientDocument, ClientList, ClientQuotas, WaitingOn } from "../schemas/clients";
import { LedgerSnapshot, PoolSnapshot, PoolSpec } from "../schemas/ledger";
import { PoolConflict, ResourcesDocument, ShardAnswerStatus, ShardedClientList, ShardedPoolSnapshot, ShardedWaiter } from "../schemas/resources";
import { CreateScheduleRequest, PatchScheduleRequest, ScheduleDocument, ScheduleId, ScheduleList, ScheduleListQuery, ScheduleRun } from "../schemas/schedule";
import { ApprovalStage, MasterTemplateResponse, TemplateStage, WorkerStage } from "../schemas/template";
import {
  CancelRequest,
  CompleteCallback,
  FailCallback,
  HandshakeRequest,
  HandshakeResponse,
  ProcessRequest,
  ProgressCallback,
  ProgressResponse,
} from "../schemas/worker-protocol";

/**
 * The OpenAPI document, built from the zod schemas in schemas/ (the same ones
 * the routes validate with) by @asteasolutions/zod-to-openapi. `npm run
 * openapi` writes it to docs/openapi.json, which the Worker serves at
 * `GET /openapi.json`; a test checks the committed file is current, that
 * every route of the router is here, and that every example of
 * docs/protocol.md validates against these components.
 *
 * Not imported by the Worker: the generator stays out of the bundle.
 */

// ---- schemas of the HTTP layer alone -----------------------------------------

const Health = z.object({
  status: z.enum(["ok", "misconfigured"]),
  service: z.string(),
  time: z.string(),
  /** With `misconfigured`: the names (never the values) of the missing or unusable secrets. */
  missing: z.array(z.string()).optional(),
  /** With `misconfigured`: what the ledger routing refuses in LEDGER_SHARDS / LEDGER_SHARD_MAP (every other route answers 503 `config_invalid`). */
  config_invalid: z.array(z.string()).optional(),
});

const CallbackAccepted = z.object({ ok: z.literal(true), stage_status: StageStatus, duplicate: z.boolean().optional() });

// ---- registry -------------------------------------------------------------

/**
 * Names a schema as a component. The name is attached to the schema object
 * itself (not to a copy, as `registry.register` would), so every other schema
 * that embeds it gets a `$ref` instead of an inline copy.
 */
function namer(defs: OpenAPIDefinitions[]) {
  return <T extends z.ZodType>(refId: string, schema: T): T => {
    const current = zodToOpenAPIRegistry.get(schema);
    zodToOpenAPIRegistry.add(schema, { ...current, _internal: { ...current?._internal, refId } });
    defs.push({ type: "schema", schema });
    return schema;
  };
}

type Security = Record<string, string[]>[];

export function buildDefinitions(): OpenAPIDefinitions[] {
  const r = new OpenAPIRegistry();
  const schemas: OpenAPIDefinitions[] = [];
  const name = namer(schemas);

  const kamOrOps: Security = [{ kamToken: [] }, { opsToken: [] }, { apiKey: [] }];
  const opsOnly: Security = [{ opsToken: [] }, { apiKey: [] }];
  const callbackOnly: Security = [{ callbackToken: [] }];
  const dataOnly: Security = [{ dataToken: [] }];
  r.registerComponent("securitySchemes", "kamToken", { type: "http", scheme: "bearer", description: "KAM_TOKEN (or KAM_TOKEN_PREVIOUS during a rotation): start and read executions." });
  r.registerComponent("securitySchemes", "opsToken", { type: "http", scheme: "bearer", description: "OPS_TOKEN (or OPS_TOKEN_PREVIOUS during a rotation): operators (resources, pools, any execution)." });
  r.registerComponent("securitySchemes", "apiKey", {
    type: "http",
    scheme: "bearer",
    description:
      "A key from API_KEYS (stored as its SHA-256), with a role (kam, ops or client) and the clients it sees: another client's execution is 404 on every execution route, " +
      "lists and counts hold only its clients, POST /execute for another client is 403; routes that span every client need `clients: \"*\"` (docs/operations.md, \"API keys\").",
  });
  r.registerComponent("securitySchemes", "callbackToken", {
    type: "http",
    scheme: "bearer",
    description:
      "`callback.token` from the handshake (use `callback`): one attempt of one stage, callbacks and uploads, until it expires (then 401 `token_expired`). " +
      "Signed with CALLBACK_SECRET, which never leaves the orchestrator; the orchestrator's own bearer to each worker is that worker's entry of WORKER_SECRETS (else WORKER_SECRET).",
  });
  r.registerComponent("securitySchemes", "dataToken", {
    type: "http",
    scheme: "bearer",
    description: "`callback.dataToken` from the handshake (use `data`): reads the inputs of one attempt of one stage, until it expires.",
  });

  // Components: the orchestrator's API, the index, the ledger, KAM's templates and the worker protocol.
  // The codes an execution's or a stage's `error` carries (the HTTP error codes are listed per route).
  zodToOpenAPIRegistry.add(ErrorInfo, {
    ...zodToOpenAPIRegistry.get(ErrorInfo),
    description:
      "An execution's or a stage's error. Codes of the pipeline include `stage_timeout`, `handshake_timeout`, `queue_timeout` (the stage's `queue_timeout_ms`, else config `maxQueueMs`), " +
      "`execution_timeout` (`execution_timeout_ms`), `lease_lost` (retryable), `invalid_template`, `fan_out_invalid` (a `for_each` list that is not an array or longer than config `maxFanOutItems`), " +
      "`approval_rejected` and `approval_timeout`; `stage_id` names the stage or item (`stage_{n}.{i}`).",
  });
  const S = {
    ErrorEnvelope: name("ErrorEnvelope", ErrorEnvelope),
    ErrorInfo: name("ErrorInfo", ErrorInfo),
    ExecutionStatus: name("ExecutionStatus", ExecutionStatus),
    StageStatus: name("StageStatus", StageStatus),
    PoolAmounts: name("PoolAmounts", PoolAmounts),
    ExecuteRequest: name("ExecuteRequest", ExecuteRequest),
    ExecuteResponse: name("ExecuteResponse", ExecuteResponse),
    Cost: name("Cost", Cost),
    DataReference: name("DataReference", DataReference),
    ItemCounts: name("ItemCounts", ItemCounts),
    StageDocument: name("StageDocument", StageDocument),
    EventType: name("EventType", EventType),
    LiveTicket: name("LiveTicket", LiveTicket),
    DecisionRequest: name("DecisionRequest", DecisionRequest),
    RerunRequest: name("RerunRequest", RerunRequest),
    RerunResponse: name("RerunResponse", RerunResponse),
    LiveMessage: name("LiveMessage", LiveMessage),
    ExecutionEvent: name("ExecutionEvent", ExecutionEvent),
    NotificationsDocument: name("NotificationsDocument", NotificationsDocument),
    ItemsPage: name("ItemsPage", ItemsPage),
    StatusDocument: name("StatusDocument", StatusDocument),
    ResultDocument: name("ResultDocument", ResultDocument),
    ExecutionSummary: name("ExecutionSummary", ExecutionSummary),
    ExecutionList: name("ExecutionList", ExecutionList),
    ExecutionCounts: name("ExecutionCounts", ExecutionCounts),
    IndexEntry: name("IndexEntry", IndexEntry),
    PoolSpec: name("PoolSpec", PoolSpec),
    PoolSnapshot: name("PoolSnapshot", PoolSnapshot),
    LedgerSnapshot: name("LedgerSnapshot", LedgerSnapshot),
    ShardAnswerStatus: name("ShardAnswerStatus", ShardAnswerStatus),
    PoolConflict: name("PoolConflict", PoolConflict),
    ShardedPoolSnapshot: name("ShardedPoolSnapshot", ShardedPoolSnapshot),
    ShardedWaiter: name("ShardedWaiter", ShardedWaiter),
    ResourcesDocument: name("ResourcesDocument", ResourcesDocument),
    ShardedClientList: name("ShardedClientList", ShardedClientList),
    ClientQuotas: name("ClientQuotas", ClientQuotas),
    ClientDocument: name("ClientDocument", ClientDocument),
    ClientList: name("ClientList", ClientList),
    WaitingOn: name("WaitingOn", WaitingOn),
    UndeliverableMessage: name("UndeliverableMessage", UndeliverableMessage),
    UndeliverableList: name("UndeliverableList", UndeliverableList),
    RetryUndeliverableRequest: name("RetryUndeliverableRequest", RetryUndeliverableRequest),
    RetryUndeliverableResult: name("RetryUndeliverableResult", RetryUndeliverableResult),
    Health: name("Health", Health),
    ProgressCallback: name("ProgressCallback", ProgressCallback),
    CompleteCallback: name("CompleteCallback", CompleteCallback),
    FailCallback: name("FailCallback", FailCallback),
    CallbackAccepted: name("CallbackAccepted", CallbackAccepted),
    HandshakeRequest: name("HandshakeRequest", HandshakeRequest),
    HandshakeResponse: name("HandshakeResponse", HandshakeResponse),
    ProcessRequest: name("ProcessRequest", ProcessRequest),
    CancelRequest: name("CancelRequest", CancelRequest),
    ProgressResponse: name("ProgressResponse", ProgressResponse),
    MasterTemplateResponse: name("MasterTemplateResponse", MasterTemplateResponse),
    WorkerStage: name("WorkerStage", WorkerStage),
    ApprovalStage: name("ApprovalStage", ApprovalStage),
    TemplateStage: name("TemplateStage", TemplateStage),
    CreateScheduleRequest: name("CreateScheduleRequest", CreateScheduleRequest),
    PatchScheduleRequest: name("PatchScheduleRequest", PatchScheduleRequest),
    ScheduleRun: name("ScheduleRun", ScheduleRun),
    ScheduleDocument: name("ScheduleDocument", ScheduleDocument),
    ScheduleList: name("ScheduleList", ScheduleList),
    SeriesDocument: name("SeriesDocument", SeriesDocument),
    SpanDocument: name("SpanDocument", SpanDocument),
    SpansDocument: name("SpansDocument", SpansDocument),
  };

  const jsonBody = (schema: z.ZodType, description: string): ResponseConfig => ({
    description,
    content: { "application/json": { schema } },
  });
  const error = (description: string): ResponseConfig => jsonBody(S.ErrorEnvelope, description);
  const html = (description: string): ResponseConfig => ({ description, content: { "text/html": { schema: z.string() } } });
  const body = (schema: z.ZodType) => ({ required: true, content: { "application/json": { schema } } });

  const common = {
    "400": error(
      "invalid_request: an id, a parameter or the body does not match its schema (`details` names the fields), or a path segment is not valid percent-encoding; " +
        "invalid_json: the body is not JSON, or nests deeper than maxJsonDepth (32) or has more than maxJsonKeys (10,000) keys",
    ),
    "401": error("unauthorized: missing or invalid bearer token, or one whose role does not open this route"),
    "503": error(
      "unavailable: an object did not answer within objectCallTimeoutMs (the message names which); misconfigured: a secret is missing (GET /health names it); " +
        "config_invalid: the ledger routing refuses LEDGER_SHARDS / LEDGER_SHARD_MAP (`details.problems` lists why; nothing is routed)",
    ),
  };
  /** A scoped API key (src/api-keys.ts) on a route outside what it sees. */
  const scopedOut = { "403": error("forbidden: a scoped API key for another client, or on a route that spans every client") };
  const tokenErrors = {
    "401": error("unauthorized: missing or forged token; token_expired: past its expiry"),
    "403": error("forbidden: a genuine token of another use, execution or stage (or, for data, not an input of its stage)"),
  };
  const stored = "Served with `x-content-type-options: nosniff`, `content-disposition: attachment` and `content-security-policy: default-src 'none'`.";
  const idParams = z.object({ id: ExecutionId });
  const scheduleParams = z.object({ id: ScheduleId });

  const paths: RouteConfig[] = [
    {
      method: "get",
      path: "/health",
      summary: "Liveness",
      responses: {
        "200": jsonBody(S.Health, "the Worker answers and its secrets are set"),
        "503": jsonBody(S.Health, "misconfigured: `missing` names the secrets that are missing or unusable; every other route answers 503 misconfigured"),
      },
    },
    {
      method: "get",
      path: "/openapi.json",
      summary: "This document",
      responses: { "200": { description: "the OpenAPI document", content: { "application/json": { schema: z.record(z.string(), z.unknown()) } } } },
    },
    {
      method: "post",
      path: "/execute",
      summary: "Start an execution",
      description:
        "With a `request_id`, the same body again from the same `client_id` answers 200 with the same execution. " +
        "`notify` defaults to the NOTIFY_DEFAULT var (false). A W3C `traceparent` (and `tracestate`) header makes the execution's trace a child of the caller's; without one a new trace starts.",
      security: [{ kamToken: [] }, { apiKey: [] }],
      request: {
        body: body(S.ExecuteRequest),
        headers: z.object({ traceparent: z.string().optional(), tracestate: z.string().optional() }),
      },
      responses: {
        "200": jsonBody(S.ExecuteResponse, "the execution this request_id already started"),
        "202": jsonBody(S.ExecuteResponse, "started"),
        ...common,
        "403": error("priority_not_allowed: above the client's max_priority (docs/ledger.md, \"Clients\"); forbidden: a scoped API key starting for a client outside its `clients`"),
        "409": error("idempotency_conflict: this request_id was used with a different body"),
        "413": error("payload_too_large"),
        "415": error("unsupported_media_type"),
        "429": {
          ...error("budget_exhausted: the client's monthly budget is spent; rate_limited: over max_starts_per_minute (with `Retry-After`, seconds)"),
          headers: { "retry-after": { description: "seconds until the next start is admitted (rate_limited only)", schema: { type: "integer" } } },
        },
      },
    },
    {
      method: "get",
      path: "/executions",
      summary: "List executions from the index, newest first",
      description:
        "Filters combine with AND; `since` is inclusive and `until` exclusive, on `created_at`, each as unix ms or ISO 8601. " +
        "Pass `next_cursor` back as `cursor`, with the same filters, for the next page (a page may be short when the request stopped at `maxIndexShardsPerRequest` month shards; `until` is clamped to now + 5 minutes). With `Accept: text/html` this path serves the overview page instead.",
      security: kamOrOps,
      request: { query: ListQuery },
      responses: { "200": jsonBody(S.ExecutionList, "one page"), ...common },
    },
    {
      method: "get",
      path: "/executions/counts",
      summary: "Executions per status in a window, from the index",
      description:
        "`until` is clamped to now + 5 minutes. One request reads at most `maxIndexShardsPerRequest` month shards, newest first; " +
        "when older months remain, `next_cursor` is set: pass it back as `cursor` (same filters) and add its counts.",
      security: kamOrOps,
      request: { query: CountsQuery },
      responses: { "200": jsonBody(S.ExecutionCounts, "counts per status"), ...common },
    },
    {
      method: "get",
      path: "/executions/{id}",
      summary: "Status document",
      description:
        "With `Accept: text/html` (preferred over JSON), the execution page instead, without a token: the page reads the data with the OPS token. " +
        'The document is served from the execution\'s memory with `ETag: W/"<execution_id>.<version>"`; `If-None-Match` naming the current version is 304. ' +
        "An ended execution's document is leased for `statusLeaseMs` (1 s) to the front instance that read it, which answers it from its memory meanwhile; a change of an ended execution shows when the leases end. " +
        "Long poll: with `wait_ms` (at most `statusWaitMaxMs`, 30 s) it answers once `version` > `since` (absent: the version at arrival), or when the wait ends, with the current document (docs/protocol.md, \"Status reads\").",
      security: kamOrOps,
      request: { params: idParams, query: StatusQuery, headers: z.object({ "if-none-match": z.string().optional() }) },
      responses: {
        "200": {
          description: "the status document, or the execution page",
          headers: { etag: { description: 'W/"<execution_id>.<version>"', schema: { type: "string" } } },
          content: { "application/json": { schema: S.StatusDocument }, "text/html": { schema: z.string() } },
        },
        "304": { description: "If-None-Match named the current version: no body", headers: { etag: { description: 'W/"<execution_id>.<version>"', schema: { type: "string" } } } },
        ...common,
        "400": error("invalid_request: a malformed id, wait_ms (a whole number of ms, at most statusWaitMaxMs) or since (a version)"),
        "404": error("not_found"),
      },
    },
    {
      method: "get",
      path: "/executions/{id}/result",
      summary: "Result of a completed execution",
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": jsonBody(S.ResultDocument, "the deliverable (inline, or a reference and a content URL)"),
        ...common,
        "404": error("not_found"),
        "409": error("not_completed"),
        "410": error("data_expired: retention deleted the result"),
      },
    },
    {
      method: "get",
      path: "/executions/{id}/result/content",
      summary: "The deliverable's bytes",
      description: stored,
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": { description: "the output: JSON when inline, else the stored bytes with their content type and `x-content-sha256`" },
        ...common,
        "404": error("not_found"),
        "409": error("not_completed"),
        "410": error("data_expired"),
      },
    },
    {
      method: "get",
      path: "/executions/{id}/stages/{stageId}/items",
      summary: "Items of a fan-out stage",
      description:
        "A page of the items of a stage with `for_each`, in item order, each with the fields of a stage document (`stage_id` is the item id `stage_{n}.{i}`). Pass `next_cursor` as `cursor` for the next page.",
      security: kamOrOps,
      request: { params: z.object({ id: ExecutionId, stageId: StageId }), query: ItemsQuery },
      responses: {
        "200": jsonBody(S.ItemsPage, "the page"),
        ...common,
        "404": error("not_found: no such execution or stage"),
        "409": error("not_fan_out: the stage has no for_each"),
      },
    },
    {
      method: "get",
      path: "/executions/{id}/spans",
      summary: "Every stage and item attempt as a span",
      description:
        "The attempts of the execution, oldest first (at most 2000): each with its span id, worker and the times it waited for resources, handshook and processed. " +
        "The execution page draws its timeline from it; docs/operations.md, \"Traces\".",
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": jsonBody(S.SpansDocument, "the spans"),
        ...common,
        "404": error("not_found"),
      },
    },
    {
      method: "post",
      path: "/executions/{id}/cancel",
      summary: "Cancel an execution",
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": jsonBody(S.StatusDocument, "cancelled: the status document"),
        ...common,
        "404": error("not_found"),
        "409": error("already_terminal"),
      },
    },
    ...(["approve", "reject"] as const).map(
      (action): RouteConfig => ({
        method: "post",
        path: `/executions/{id}/stages/{stageId}/${action}`,
        summary: action === "approve" ? "Approve an approval stage" : "Reject an approval stage (the execution fails with approval_rejected)",
        description:
          action === "approve"
            ? "The stage completes with its dependency's output passed on unchanged (several dependencies: their outputs as `inputs`, stage id -> output); `decision` records who and when. Also RPC `approve(id, stageId, body)` on KamApi."
            : "The stage fails, the execution fails with `approval_rejected` naming the stage, with the comment. Also RPC `reject(id, stageId, body)` on KamApi.",
        security: kamOrOps,
        request: { params: z.object({ id: ExecutionId, stageId: StageId }), body: { required: false, content: { "application/json": { schema: S.DecisionRequest } } } },
        responses: {
          "200": jsonBody(S.StatusDocument, "decided: the status document"),
          ...common,
          "404": error("not_found: no such execution or stage"),
          "409": error("not_awaiting_approval"),
          "413": error("payload_too_large"),
          "415": error("unsupported_media_type"),
        },
      }),
    ),
    {
      method: "post",
      path: "/executions/{id}/live-ticket",
      summary: "A single-use ticket for the execution's live socket (valid one minute)",
      description: "Connect to `url` offering `protocols` as the WebSocket subprotocols; no token goes in the URL.",
      security: kamOrOps,
      request: { params: idParams },
      responses: { "200": jsonBody(S.LiveTicket, "the ticket"), ...common, "404": error("not_found") },
    },
    {
      method: "get",
      path: "/executions/{id}/live",
      summary: "Live status socket (WebSocket)",
      description:
        "Upgrade to a WebSocket offering the subprotocols `orchestrator-live.v1` and `ticket.<ticket>` (from POST /executions/{id}/live-ticket). " +
        "The server sends LiveMessage: the status document on connect and after every change; after the final document of an ended execution it closes with 1000. " +
        "Send `ping` for `pong`, or `{\"type\":\"status\"}` for the document again.",
      request: { params: idParams },
      responses: {
        "101": { description: "switching protocols: the socket (subprotocol `orchestrator-live.v1`)" },
        "400": error("invalid_request: the subprotocol orchestrator-live.v1 was not offered"),
        "401": error("unauthorized or token_expired: no valid ticket; ticket_used: the ticket opened a socket already (single-use)"),
        "403": error("forbidden: a ticket of another execution"),
        "404": error("not_found"),
        "426": error("upgrade_required: not a WebSocket request"),
      },
    },
    {
      method: "post",
      path: "/executions/{id}/rerun",
      summary: "Rerun an ended execution from a stage (a new execution)",
      description:
        "The original's template snapshot, client and priority; its parameters unless `parameters` is given. " +
        "Every stage that `from_stage` does not depend on, directly or through others, and that completed, is reused (`reused_from`, its output taken over, no usage, cost 0). " +
        "`request_id` makes it idempotent like POST /execute. Also RPC `rerun(id, request)` on KamApi.",
      security: kamOrOps,
      request: { params: idParams, body: { required: false, content: { "application/json": { schema: S.RerunRequest } } } },
      responses: {
        "202": jsonBody(S.RerunResponse, "the new execution"),
        "200": jsonBody(S.RerunResponse, "the rerun this request_id already started"),
        ...common,
        "404": error("not_found"),
        "409": error("not_terminal (running or paused), or idempotency_conflict"),
        "410": error("data_expired: the original's data was deleted (retention)"),
        "413": error("payload_too_large"),
        "415": error("unsupported_media_type"),
      },
    },
    {
      method: "post",
      path: "/executions/{id}/pause",
      summary: "Pause an execution",
      description:
        "No stage starts a new attempt or asks the ledger until resume; work already on a worker runs to its end and its callbacks apply; " +
        "a stage waiting for resources gives its reservation back. Pausing a paused execution answers 200 and changes nothing. Also RPC `pause(id)` on KamApi.",
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": jsonBody(S.StatusDocument, "paused: the status document"),
        ...common,
        "404": error("not_found"),
        "409": error("already_terminal"),
      },
    },
    {
      method: "post",
      path: "/executions/{id}/resume",
      summary: "Resume a paused execution",
      description: "Back to `running` (or `queued` if no stage had started); ready stages start. Also RPC `resume(id)` on KamApi.",
      security: kamOrOps,
      request: { params: idParams },
      responses: {
        "200": jsonBody(S.StatusDocument, "resumed: the status document"),
        ...common,
        "404": error("not_found"),
        "409": error("not_paused"),
      },
    },
    {
      method: "post",
      path: "/executions/{id}/stages/{stageId}/{kind}",
      summary: "Stage worker callback (progress, complete, fail)",
      description: "`progress` takes ProgressCallback, `complete` CompleteCallback, `fail` FailCallback.",
      security: callbackOnly,
      request: {
        params: z.object({ id: ExecutionId, stageId: StageId, kind: z.enum(["progress", "complete", "fail"]) }),
        body: body(z.union([S.ProgressCallback, S.CompleteCallback, S.FailCallback])),
      },
      responses: {
        "200": jsonBody(S.CallbackAccepted, "accepted (or the same complete again: `duplicate: true`)"),
        ...common,
        ...tokenErrors,
        "404": error("not_found: unknown execution, stage or callback kind"),
        "409": error("stale_attempt, stage_ended, stage_waiting (the stage is stored waiting for resources: a grant lost with the instance is being asked for again) or execution_cancelled"),
        "413": error("payload_too_large"),
        "415": error("unsupported_media_type"),
        "422": error("usage_out_of_bounds: usage over `usageMaxFactor` x the stage's reservation, or in a pool it may not report; nothing is charged"),
      },
    },
    {
      method: "get",
      path: "/data/{kind}/{executionId}/{stageId}/{name}",
      summary: "A stage worker reads one of its stage's inputs",
      description: stored,
      security: dataOnly,
      request: { params: z.object({ kind: z.enum(["kv", "r2"]), executionId: ExecutionId, stageId: StageId, name: z.string() }) },
      responses: {
        "200": { description: "the bytes, verified against their sha256 on the way" },
        ...common,
        ...tokenErrors,
        "404": error("not_found"),
        "410": error("data_expired"),
        "503": error("unavailable: the data store did not answer within `storageCallTimeoutMs`; a body whose store stops sending for that long is cut off"),
      },
    },
    {
      method: "put",
      path: "/data/{executionId}/{stageId}/{name}",
      summary: "A stage worker uploads a large output (streamed to R2)",
      security: callbackOnly,
      request: {
        params: z.object({ executionId: ExecutionId, stageId: StageId, name: z.string() }),
        body: { required: true, content: { "application/octet-stream": { schema: z.string() } } },
      },
      responses: {
        "201": jsonBody(S.DataReference, "stored: name it in the complete callback as `dataReference`"),
        ...common,
        ...tokenErrors,
        "408": error("upload_stalled: no bytes of the body arrived for `storageCallTimeoutMs`; nothing is stored"),
        "409": error("stage_ended, or stage_waiting (the stage is stored waiting for resources: a grant lost with the instance is being asked for again; upload again later)"),
        "411": error("length_required"),
        "413": error("payload_too_large"),
        "503": error("unavailable: R2 took no bytes, or did not confirm the put, for `storageCallTimeoutMs`; nothing is stored"),
      },
    },
    {
      method: "get",
      path: "/resources",
      summary: "Ledger snapshot of every shard",
      description:
        "Every ledger shard is asked at once (at most 16 at a time, each within ledgerCallTimeoutMs, all within ledgerFanOutDeadlineMs). " +
        "Each pool is listed once with its `shard`; `shards` says which shards answered (a shard that did not is listed with `ok: false` and its pools and waiters are missing); " +
        "`conflicts` lists pools more than one shard has state for. `leases` and `waiters` are summed over the shards: a stage with parts on k shards counts k times.",
      security: opsOnly,
      responses: {
        "200": jsonBody(S.ResourcesDocument, "pools with their shard, leases, waiters, the shards and conflicts"),
        ...common,
        ...scopedOut,
        "503": error("unavailable: no ledger shard answered; config_invalid: the shard config is refused"),
      },
    },
    {
      method: "get",
      path: "/resources/undeliverable",
      summary: "Messages executions could not deliver",
      description:
        "Ledger settles and releases, worker cancels and index updates that failed for longer than `outboxUndeliverableMs` (24 h by default). " +
        "Each is still retried by its execution; the entry goes once it is delivered.",
      security: opsOnly,
      request: { query: z.object({ limit: z.number().int().min(1).max(1000).optional(), cursor: z.string().optional() }) },
      responses: { "200": jsonBody(S.UndeliverableList, "a page of undeliverable messages"), ...common, ...scopedOut },
    },
    {
      method: "post",
      path: "/resources/undeliverable/retry",
      summary: "Retry undeliverable messages now",
      description: "`{}` retries the executions of the first hundred listed messages; `{ execution_id }` one execution's.",
      security: opsOnly,
      request: { body: body(S.RetryUndeliverableRequest) },
      responses: { "200": jsonBody(S.RetryUndeliverableResult, "how many executions were asked, and how many messages are due now"), ...common, ...scopedOut, "415": error("unsupported_media_type") },
    },
    {
      method: "put",
      path: "/resources/pools/{name}",
      summary: "Create or resize a pool",
      description:
        "Goes to the ledger shard that owns the pool. A pool split by LEDGER_SHARD_MAP is set per sub-pool (`tokens:openai#2`: that sub-pool's capacity, which is how capacity is moved between sub-pools); " +
        "its own name is then 400, as is a sub-pool of a pool that is not split. A pool's kind never changes: 409 pool_kind_immutable.",
      security: opsOnly,
      request: { params: z.object({ name: PoolName }), body: body(S.PoolSpec) },
      responses: {
        "200": jsonBody(S.ShardedPoolSnapshot, "the pool after the change, with its shard"),
        ...common,
        ...scopedOut,
        "409": error("pool_kind_immutable: the pool exists with another kind (`details` names `kind`); wrong_shard: the ledger shard reached does not own the pool under its layout (`details` names `name`); nothing changed"),
        "413": error("payload_too_large"),
        "415": error("unsupported_media_type"),
      },
    },
    {
      method: "put",
      path: "/clients/{client_id}/quotas",
      summary: "Set a client's own quotas",
      description: "Replaces the client's own quotas (every field optional; a field left out comes from CLIENT_DEFAULTS). Applies at once, also to the client's waiting stages.",
      security: opsOnly,
      request: { params: z.object({ client_id: ClientId }), body: body(S.ClientQuotas) },
      responses: { "200": jsonBody(S.ClientDocument, "the client after the change"), ...common, ...scopedOut, "413": error("payload_too_large"), "415": error("unsupported_media_type") },
    },
    {
      method: "get",
      path: "/clients/{client_id}",
      summary: "A client's quotas in force and usage",
      security: kamOrOps,
      request: { params: z.object({ client_id: ClientId }) },
      responses: { "200": jsonBody(S.ClientDocument, "quotas, running executions and stages, this month's spend and what remains, waiting stages"), ...common, ...scopedOut },
    },
    {
      method: "get",
      path: "/clients",
      summary: "Every client the ledger knows",
      description: "Every ledger shard is asked as for GET /resources; each client is listed once, as the shard of its client id keeps it; `shards` says which shards answered.",
      security: opsOnly,
      responses: { "200": jsonBody(S.ShardedClientList, "clients by id, and the shards that answered"), ...common },
    },
    {
      method: "get",
      path: "/metrics",
      summary: "Current counters and gauges, in the Prometheus text format",
      description: "Computed at scrape time from the execution index, the ledger snapshot and the schedule shards; docs/operations.md lists the series.",
      security: opsOnly,
      responses: {
        "200": { description: "Prometheus text exposition format 0.0.4", content: { "text/plain": { schema: z.string() } } },
        "401": error("unauthorized"),
        ...scopedOut,
        "503": error("unavailable: an object did not answer within objectCallTimeoutMs"),
      },
    },
    {
      method: "get",
      path: "/metrics/series",
      summary: "The numbers behind the charts on /ui",
      description:
        "Over the last hour (1-minute buckets, the default), day (10 minutes) or week (1 hour): executions ended per bucket by status, stage latency per worker, " +
        "queue length per pool (sampled from the ledger) and cost per client. docs/operations.md, \"Charts\".",
      security: opsOnly,
      request: { query: SeriesQuery },
      responses: {
        "200": jsonBody(S.SeriesDocument, "the series"),
        ...common,
      },
    },
    {
      method: "post",
      path: "/schedules",
      summary: "Create a schedule",
      description:
        "Each fire time of `cron` in `timezone` starts an execution with `request_id` `sched:{schedule_id}:{created ms}:{fire ms}`. " +
        "The same body again under the same `schedule_id` answers 200 with the schedule.",
      security: kamOrOps,
      request: { body: body(S.CreateScheduleRequest) },
      responses: {
        "201": jsonBody(S.ScheduleDocument, "created"),
        "200": jsonBody(S.ScheduleDocument, "this schedule_id already exists with this definition"),
        ...common, ...scopedOut,
        "409": error("schedule_exists: this schedule_id exists with another definition"),
        "413": error("payload_too_large"),
        "415": error("unsupported_media_type"),
      },
    },
    {
      method: "get",
      path: "/schedules",
      summary: "List schedules by id",
      description: "Pass `next_cursor` back as `cursor`, with the same filters, for the next page.",
      security: kamOrOps,
      request: { query: ScheduleListQuery },
      responses: { "200": jsonBody(S.ScheduleList, "one page"), ...common, ...scopedOut },
    },
    {
      method: "get",
      path: "/schedules/{id}",
      summary: "A schedule with its next runs and its last fires",
      security: kamOrOps,
      request: { params: scheduleParams },
      responses: { "200": jsonBody(S.ScheduleDocument, "the schedule"), ...common, ...scopedOut, "404": error("not_found") },
    },
    {
      method: "patch",
      path: "/schedules/{id}",
      summary: "Pause, resume or change a schedule",
      description: "A change of `cron` or `timezone`, and a resume, plan the next fire from now: times passed while paused are not fired.",
      security: kamOrOps,
      request: { params: scheduleParams, body: body(S.PatchScheduleRequest) },
      responses: { "200": jsonBody(S.ScheduleDocument, "the schedule after the change"), ...common, ...scopedOut, "404": error("not_found"), "415": error("unsupported_media_type") },
    },
    {
      method: "delete",
      path: "/schedules/{id}",
      summary: "Delete a schedule (a fire not yet started is dropped; started executions go on)",
      security: kamOrOps,
      request: { params: scheduleParams },
      responses: { "204": { description: "deleted" }, ...common, ...scopedOut, "404": error("not_found") },
    },
    {
      method: "get",
      path: "/ui",
      summary: "Operators' overview page (recent executions, counts by status)",
      responses: { "200": html("a self-contained page; it reads the index with the OPS token") },
    },
    {
      method: "get",
      path: "/ui/executions/{id}",
      summary: "Execution page (timeline of stages, live)",
      request: { params: idParams },
      responses: { "200": html("a self-contained page; it polls the status document with the OPS token"), "400": error("invalid_request: not an execution id") },
    },
    {
      method: "get",
      path: "/ui/clients",
      summary: "Clients page (quotas, usage bars for running executions, stages and spend against the budget, waiting stages)",
      responses: { "200": html("a self-contained page; it reads GET /clients with the OPS token every 2 s") },
    },
    {
      method: "get",
      path: "/ui/resources",
      summary: "Resources page (every pool's capacity, use, waiters and provider pause; the waiters with their waiting_on)",
      responses: { "200": html("a self-contained page; it reads GET /resources with the OPS token every 2 s") },
    },
  ];
  for (const p of paths) r.registerPath(p);

  // What the orchestrator sends KAM (through its KAM binding) for an execution started with `notify`.
  r.registerWebhook({
    method: "post",
    path: "/api/orchestrator/events",
    summary: "Event notification to KAM (execution ended, paused, resumed; a stage awaits approval)",
    description:
      "Signed: `x-orchestrator-signature: t=<unix ms>,v1=<hex HMAC-SHA256 of \"<t>.<raw body>\" with NOTIFY_SECRET>`; reject a `t` older than 5 minutes. " +
      "Delivered at least once and in order per execution, retried with backoff on anything but a 2xx for `notifyRetryWindowMs` (24 h), " +
      "with the same body and `event_id` each time: de-duplicate on `event_id`.",
    request: {
      headers: z.object({ "x-orchestrator-signature": z.string() }),
      body: body(S.ExecutionEvent),
    },
    responses: { "200": { description: "any 2xx: received (the next event of the execution follows)" } },
  });
  return [...schemas, ...r.definitions];
}

/**
 * zod-to-openapi 9 writes `X.nullable()` of an already generated component as
 * `allOf: [{ $ref: X }, { type: ["object", "null"] }]`, which no value
 * satisfies when it is null (the `$ref` side still requires an object). JSON
 * Schema 2020-12 says "X or null" as `anyOf: [{ $ref: X }, { type: "null" }]`.
 */
function fixNullableRefs(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(fixNullableRefs);
  if (!node || typeof node !== "object") return node;
  const o = node as Record<string, unknown>;
  const all = o.allOf;
  if (Array.isArray(all) && all.length === 2 && Object.keys(o).length === 1) {
    const [ref, extra] = all as Record<string, unknown>[];
    const type = extra?.type;
    if (typeof ref?.$ref === "string" && Object.keys(extra).length === 1 && Array.isArray(type) && type.includes("null")) {
      return { anyOf: [ref, { type: "null" }] };
    }
  }
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, fixNullableRefs(v)]));
}

export function buildOpenApiDocument() {
  const doc = new OpenApiGeneratorV31(buildDefinitions(), { sortComponents: "alphabetically" }).generateDocument({
    openapi: "3.1.0",
    info: {
      title: "Orchestrator v2",
      version: pkg.version,
      description:
        "Multi-stage AI pipelines for KAM on Cloudflare Durable Objects. Generated from the zod schemas by `npm run openapi`; " +
        "docs/protocol.md explains the contracts. Components also describe the stage worker protocol and KAM's templates, which the orchestrator calls out to.",
    },
    servers: [{ url: "/" }],
  });
  return fixNullableRefs(doc) as typeof doc;
}
