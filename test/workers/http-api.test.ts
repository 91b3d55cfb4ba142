import { env } from "cloudflare:workers";
import { listDurableObjectIds, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { hasTables } from "../../actors/execution/schema";
import { JSON_HEADERS, KAM, OPS, call, ended, startExecution, waitFor } from "../support/api";

const VALID_ID = "exec_1732412345678_abcdefghijklmnop";
const good = { template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_http" };
const big = "x".repeat(300 * 1024);
/** 40 levels of nesting, past the default limit of 32, in a body well under the size limit. */
const deep = { ...good, parameters: { nest: JSON.parse(`${"[".repeat(40)}1${"]".repeat(40)}`) } };
/** 10,001 keys, past the default limit of 10,000. */
const wide = { ...good, parameters: Object.fromEntries(Array.from({ length: 10_001 }, (_, i) => [`k${i}`, 0])) };

interface Case {
  name: string;
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
  status: number;
  code: string;
  field?: string;
}

const post = (body: unknown): Pick<Case, "method" | "path" | "headers" | "body"> => ({
  method: "POST",
  path: "/execute",
  headers: { ...KAM, ...JSON_HEADERS },
  body: typeof body === "string" ? body : JSON.stringify(body),
});

/** Malformed requests across the routes: each gets the right status and code, and none creates anything. */
const CASES: Case[] = [
  { name: "no token", ...post(good), headers: JSON_HEADERS, status: 401, code: "unauthorized" },
  { name: "wrong token", ...post(good), headers: { authorization: "Bearer nope", ...JSON_HEADERS }, status: 401, code: "unauthorized" },
  { name: "ops token cannot start", ...post(good), headers: { ...OPS, ...JSON_HEADERS }, status: 401, code: "unauthorized" },
  { name: "basic auth scheme", ...post(good), headers: { authorization: "Basic dGVzdA==", ...JSON_HEADERS }, status: 401, code: "unauthorized" },
  { name: "not JSON content type", ...post(good), headers: { ...KAM, "content-type": "text/plain" }, status: 415, code: "unsupported_media_type" },
  { name: "no content type", ...post(good), headers: KAM, status: 415, code: "unsupported_media_type" },
  { name: "broken JSON", ...post("{not json"), status: 400, code: "invalid_json" },
  { name: "empty body", ...post(""), status: 400, code: "invalid_json" },
  { name: "JSON array", ...post([good]), status: 400, code: "invalid_request" },
  { name: "JSON null", ...post("null"), status: 400, code: "invalid_request" },
  { name: "missing template_name", ...post({ parameters: {}, client_id: "c" }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "missing parameters", ...post({ template_name: "t", client_id: "c" }), status: 400, code: "invalid_request", field: "parameters" },
  { name: "missing client_id", ...post({ template_name: "t", parameters: {} }), status: 400, code: "invalid_request", field: "client_id" },
  { name: "template_name not a string", ...post({ ...good, template_name: 42 }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "template_name empty", ...post({ ...good, template_name: "" }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "template_name too long", ...post({ ...good, template_name: "a".repeat(65) }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "template_name with a slash", ...post({ ...good, template_name: "../etc" }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "template_name with a space", ...post({ ...good, template_name: "a b" }), status: 400, code: "invalid_request", field: "template_name" },
  { name: "parameters is an array", ...post({ ...good, parameters: [1] }), status: 400, code: "invalid_request", field: "parameters" },
  { name: "parameters is a string", ...post({ ...good, parameters: "x" }), status: 400, code: "invalid_request", field: "parameters" },
  { name: "client_id empty", ...post({ ...good, client_id: "" }), status: 400, code: "invalid_request", field: "client_id" },
  { name: "client_id with a newline", ...post({ ...good, client_id: "a\nb" }), status: 400, code: "invalid_request", field: "client_id" },
  { name: "request_id a number", ...post({ ...good, request_id: 7 }), status: 400, code: "invalid_request", field: "request_id" },
  { name: "request_id too long", ...post({ ...good, request_id: "r".repeat(129) }), status: 400, code: "invalid_request", field: "request_id" },
  { name: "unknown priority", ...post({ ...good, priority: "urgent" }), status: 400, code: "invalid_request", field: "priority" },
  { name: "unknown field", ...post({ ...good, prio: "high" }), status: 400, code: "invalid_request" },
  { name: "body over the limit", ...post({ ...good, parameters: { big } }), status: 413, code: "payload_too_large" },
  { name: "body nested past the depth limit", ...post(deep), status: 400, code: "invalid_json" },
  { name: "body with more keys than the limit", ...post(wide), status: 400, code: "invalid_json" },
  { name: "malformed percent-escape in an execution id", method: "GET", path: "/executions/%E0%A4%A", headers: KAM, status: 400, code: "invalid_request" },
  { name: "malformed percent-escape in a pool name", method: "PUT", path: "/resources/pools/%ZZ", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }), status: 400, code: "invalid_request" },
  { name: "malformed percent-escape in a data key", method: "GET", path: `/data/kv/${VALID_ID}/stage_1/%C3%28%`, status: 400, code: "invalid_request" },
  { name: "malformed percent-escape in an upload name", method: "PUT", path: `/data/${VALID_ID}/stage_1/a%`, status: 400, code: "invalid_request" },
  { name: "malformed percent-escape in an unknown route", method: "GET", path: "/nope/%", status: 400, code: "invalid_request" },
  { name: "status without token", method: "GET", path: `/executions/${VALID_ID}`, status: 401, code: "unauthorized" },
  { name: "status of a malformed id", method: "GET", path: "/executions/not-an-id", headers: KAM, status: 400, code: "invalid_request" },
  { name: "status of an id with a bad timestamp", method: "GET", path: "/executions/exec_12_abcdefghijklmnop", headers: KAM, status: 400, code: "invalid_request" },
  { name: "status of an unknown id", method: "GET", path: `/executions/${VALID_ID}`, headers: KAM, status: 404, code: "not_found" },
  { name: "result of an unknown id", method: "GET", path: `/executions/${VALID_ID}/result`, headers: KAM, status: 404, code: "not_found" },
  { name: "result of a malformed id", method: "GET", path: "/executions/zzz/result", headers: KAM, status: 400, code: "invalid_request" },
  { name: "cancel of an unknown id", method: "POST", path: `/executions/${VALID_ID}/cancel`, headers: KAM, status: 404, code: "not_found" },
  { name: "cancel without token", method: "POST", path: `/executions/${VALID_ID}/cancel`, status: 401, code: "unauthorized" },
  { name: "callback without token", method: "POST", path: `/executions/${VALID_ID}/stages/stage_1/complete`, headers: JSON_HEADERS, body: "{}", status: 401, code: "unauthorized" },
  { name: "callback with a forged token", method: "POST", path: `/executions/${VALID_ID}/stages/stage_1/complete`, headers: { authorization: "Bearer abc.def", ...JSON_HEADERS }, body: "{}", status: 401, code: "unauthorized" },
  { name: "callback to an unknown kind", method: "POST", path: `/executions/${VALID_ID}/stages/stage_1/explode`, headers: JSON_HEADERS, body: "{}", status: 404, code: "not_found" },
  { name: "callback with a malformed stage id", method: "POST", path: `/executions/${VALID_ID}/stages/first/complete`, headers: JSON_HEADERS, body: "{}", status: 400, code: "invalid_request" },
  { name: "resources without token", method: "GET", path: "/resources", status: 401, code: "unauthorized" },
  { name: "resources with the KAM token", method: "GET", path: "/resources", headers: KAM, status: 401, code: "unauthorized" },
  { name: "pool with a bad name", method: "PUT", path: "/resources/pools/Bad%20Name", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }), status: 400, code: "invalid_request" },
  { name: "pool with a bad kind", method: "PUT", path: "/resources/pools/p1", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "magic", capacity: 1 }), status: 400, code: "invalid_request", field: "kind" },
  { name: "pool with negative capacity", method: "PUT", path: "/resources/pools/p1", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: -1 }), status: 400, code: "invalid_request", field: "capacity" },
  { name: "rate pool without refill", method: "PUT", path: "/resources/pools/p1", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "rate", capacity: 10 }), status: 400, code: "invalid_request", field: "refill_per_second" },
  { name: "unknown route", method: "GET", path: "/nope", status: 404, code: "not_found" },
  { name: "wrong method on /execute", method: "GET", path: "/execute", headers: KAM, status: 405, code: "method_not_allowed" },
  { name: "wrong method on status", method: "DELETE", path: `/executions/${VALID_ID}`, headers: KAM, status: 405, code: "method_not_allowed" },
  { name: "wrong method on health", method: "POST", path: "/health", status: 405, code: "method_not_allowed" },
];

describe("bad input gets a clear 4xx with a code and the offending fields, and changes nothing", () => {
  it(`answers ${CASES.length} malformed requests correctly without creating any object`, async () => {
    expect(CASES.length).toBeGreaterThanOrEqual(40);
    const before = new Set((await listDurableObjectIds(env.EXECUTION)).map((id) => id.toString()));
    for (const c of CASES) {
      const res = await call(c.path, { method: c.method, headers: c.headers, body: c.body });
      const text = await res.text();
      expect.soft(res.status, `${c.name}: ${text}`).toBe(c.status);
      const body = JSON.parse(text) as { error: { code: string; message: string; details?: { path: string }[] } };
      expect.soft(body.error.code, c.name).toBe(c.code);
      expect.soft(body.error.message.length, c.name).toBeGreaterThan(0);
      if (c.field) expect.soft(body.error.details?.map((d) => d.path) ?? [], c.name).toContain(c.field);
      expect.soft(text, c.name).not.toMatch(/at \w+ \(|test-kam-token|test-ops-token|test-callback-secret|test-granulator-secret|test-capped-secret/);
    }
    // None of them created an execution: reading an unknown id may wake an empty object, but it writes nothing, not even its tables.
    const after = (await listDurableObjectIds(env.EXECUTION)).filter((id) => !before.has(id.toString()));
    for (const id of after) expect(await runInDurableObject(env.EXECUTION.get(id), (_i, state) => hasTables(state.storage))).toBe(false);
  });

  it("answers /health without auth", async () => {
    const res = await call("/health");
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: "ok" });
  });

  it("lets OPS and KAM tokens read an execution, and refuses cancel of a terminal one with 409", async () => {
    const { body } = await startExecution(good);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc).toMatchObject({ execution_id: body.execution_id, status: "completed", template_name: "quick_summary", client_id: "client_http" });
    for (const h of [KAM, OPS]) {
      const res = await call(`/executions/${body.execution_id}`, { headers: h });
      expect(res.status).toBe(200);
      // Both read the same document, the execution's own.
      expect(await res.json()).toEqual(doc);
      const result = await call(`/executions/${body.execution_id}/result`, { headers: h });
      expect(result.status).toBe(200);
      expect(await result.json()).toMatchObject({ execution_id: body.execution_id, status: "completed", cost: doc.cost });
    }
    const res = await call(`/executions/${body.execution_id}/cancel`, { method: "POST", headers: OPS });
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("already_terminal");
  });

  it("answers 409 not_completed for the result of an execution that is still running", async () => {
    const { body } = await startExecution({ ...good, parameters: { steps: 3, step_ms: 2000 } });
    const res = await call(`/executions/${body.execution_id}/result`, { headers: KAM });
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("not_completed");
    await call(`/executions/${body.execution_id}/cancel`, { method: "POST", headers: KAM });
  });
});
