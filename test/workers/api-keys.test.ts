import { env } from "cloudflare:workers";
import { createExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { sha256Hex } from "../../src/hash";
import { handle } from "../../src/routes";
import { missingSecrets } from "../../src/secrets";
import { JSON_HEADERS, KAM, OPS, call, ended, startExecution, status, waitFor } from "../support/api";
import { TEST_API_KEYS } from "../support/constants";

/**
 * Scoped API keys (issue 14, "Scoped API keys"): a key from API_KEYS sees only
 * its own clients' executions. Another client's execution answers 404 on every
 * route, exactly as one that does not exist, and nothing about it changes;
 * starting for another client is 403; lists and counts hold only its clients.
 */

const bearer = (key: string) => ({ authorization: `Bearer ${key}` });
const ALPHA = bearer(TEST_API_KEYS.alpha.key);
const BETA = bearer(TEST_API_KEYS.beta.key);
const PAIR = bearer(TEST_API_KEYS.pair.key);
const OPS_ALPHA = bearer(TEST_API_KEYS.opsAlpha.key);

const errorOf = async (res: Response) => ((await res.json()) as { error: { code: string; message: string } }).error;
const post = (path: string, headers: Record<string, string>, body: unknown = {}) =>
  call(path, { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: JSON.stringify(body) });

/** Every route on one execution, as a caller would send it. */
function executionRoutes(id: string): { name: string; send: (h: Record<string, string>) => Promise<Response> }[] {
  const get = (path: string) => (h: Record<string, string>) => call(path, { headers: h });
  const send = (path: string) => (h: Record<string, string>) => post(path, h);
  return [
    { name: "status", send: get(`/executions/${id}`) },
    { name: "result", send: get(`/executions/${id}/result`) },
    { name: "result content", send: get(`/executions/${id}/result/content`) },
    { name: "items", send: get(`/executions/${id}/stages/stage_1/items`) },
    { name: "spans", send: get(`/executions/${id}/spans`) },
    { name: "cancel", send: send(`/executions/${id}/cancel`) },
    { name: "pause", send: send(`/executions/${id}/pause`) },
    { name: "resume", send: send(`/executions/${id}/resume`) },
    { name: "rerun", send: send(`/executions/${id}/rerun`) },
    { name: "approve", send: send(`/executions/${id}/stages/stage_2/approve`) },
    { name: "reject", send: send(`/executions/${id}/stages/stage_2/reject`) },
    { name: "live ticket", send: send(`/executions/${id}/live-ticket`) },
  ];
}

/** An execution of `client` waiting on its approval stage (stage_2): it stays there until decided. */
async function awaitingApproval(client: string, headers: Record<string, string>): Promise<StatusDocument> {
  const { res, body } = await startExecution({ template_name: "approval_pipeline", parameters: { steps: 1, step_ms: 0 }, client_id: client }, headers);
  expect(res.status).toBe(202);
  return waitFor(body.execution_id, (d) => d.stages[1]?.status === "awaiting_approval");
}

/** The parts of a status document a refused call must not change. */
const still = (d: StatusDocument) => ({ status: d.status, stages: d.stages.map((s) => ({ id: s.stage_id, status: s.status, decision: s.decision ?? null })) });

describe("scoped API keys", () => {
  it("another client's execution is 404 on every route, like one that does not exist, and is left as it was", async () => {
    const theirs = await awaitingApproval("client_beta", BETA);
    const before = still(await status(theirs.execution_id));
    const missing = `exec_${Date.now()}_NoSuchExecution00`;
    for (const route of executionRoutes(theirs.execution_id)) {
      const res = await route.send(ALPHA);
      expect(res.status, route.name).toBe(404);
      const err = await errorOf(res);
      // The same answer as for an id that does not exist, with the id swapped.
      const none = await errorOf(await executionRoutes(missing).find((r) => r.name === route.name)!.send(ALPHA));
      expect(err, route.name).toEqual({ code: "not_found", message: none.message.replace(missing, theirs.execution_id) });
    }
    expect(still(await status(theirs.execution_id))).toEqual(before);

    // The owner's key reaches each route: what it gets is the route's own answer, not a 404.
    const owner: Record<string, number> = {};
    for (const route of executionRoutes(theirs.execution_id)) {
      if (route.name === "cancel" || route.name === "pause" || route.name === "approve" || route.name === "reject") continue;
      owner[route.name] = (await route.send(BETA)).status;
    }
    expect(owner).toEqual({ status: 200, result: 409, "result content": 409, items: 409, spans: 200, resume: 409, rerun: 409, "live ticket": 200 });
    expect((await post(`/executions/${theirs.execution_id}/stages/stage_2/approve`, BETA)).status).toBe(200);
    const done = await waitFor(theirs.execution_id, ended);
    expect(done.status).toBe("completed");
    expect(done.stages[1].decision?.by).toBe("client");
    // Completed, its result is the owner's to read and still nobody else's.
    expect((await call(`/executions/${theirs.execution_id}/result`, { headers: BETA })).status).toBe(200);
    expect((await call(`/executions/${theirs.execution_id}/result/content`, { headers: BETA })).status).toBe(200);
    for (const path of ["result", "result/content"]) {
      const res = await call(`/executions/${theirs.execution_id}/${path}`, { headers: ALPHA });
      expect(res.status, path).toBe(404);
    }
  });

  it("a client key pauses, resumes, rejects and cancels its own executions", async () => {
    const mine = await awaitingApproval("client_alpha", ALPHA);
    const id = mine.execution_id;
    expect(((await (await post(`/executions/${id}/pause`, ALPHA)).json()) as StatusDocument).status).toBe("paused");
    expect(((await (await post(`/executions/${id}/resume`, ALPHA)).json()) as StatusDocument).status).not.toBe("paused");
    const other = await awaitingApproval("client_alpha", ALPHA);
    expect((await post(`/executions/${other.execution_id}/stages/stage_2/reject`, ALPHA)).status).toBe(200);
    expect((await waitFor(other.execution_id, ended)).status).toBe("failed");
    expect((await post(`/executions/${id}/cancel`, ALPHA)).status).toBe(200);
    expect((await waitFor(id, ended)).status).toBe("cancelled");
  });

  it("POST /execute for another client is 403 and creates nothing; for its own it starts", async () => {
    const since = Date.now() - 1;
    const refused = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_beta", request_id: "scoped-403" }, ALPHA);
    expect(refused.res.status).toBe(403);
    expect(refused.body.error.code).toBe("forbidden");
    expect(refused.body.error.details).toEqual({ client_id: "client_beta" });
    const list = (await (await call(`/executions?client_id=client_beta&since=${since}`, { headers: OPS })).json()) as { items: unknown[] };
    expect(list.items).toEqual([]);
    // The request_id was not claimed either: the owner may use it.
    const owner = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_beta", request_id: "scoped-403" }, BETA);
    expect(owner.res.status).toBe(202);
    const mine = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_alpha" }, ALPHA);
    expect(mine.res.status).toBe(202);
    await waitFor(owner.body.execution_id, ended);
    await waitFor(mine.body.execution_id, ended);
  });

  it("lists and counts hold only the key's clients, also when the query names another", async () => {
    const since = Date.now() - 1;
    const started: Record<string, string[]> = { client_alpha: [], client_beta: [], client_gamma: [] };
    for (const [client, headers] of [
      ["client_alpha", ALPHA],
      ["client_alpha", ALPHA],
      ["client_beta", BETA],
      ["client_gamma", KAM],
    ] as const) {
      const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: client }, headers);
      started[client].push(body.execution_id);
    }
    for (const ids of Object.values(started)) for (const id of ids) await waitFor(id, ended);
    const ids = async (headers: Record<string, string>, query = "") =>
      ((await (await call(`/executions?since=${since}${query}`, { headers })).json()) as { items: { execution_id: string }[] }).items.map((i) => i.execution_id).sort();
    const total = async (headers: Record<string, string>, query = "") =>
      ((await (await call(`/executions/counts?since=${since}${query}`, { headers })).json()) as { total: number }).total;

    expect(await ids(ALPHA)).toEqual([...started.client_alpha].sort());
    expect(await ids(ALPHA, "&client_id=client_beta")).toEqual([]);
    expect(await ids(PAIR)).toEqual([...started.client_alpha, ...started.client_gamma].sort());
    expect(await ids(PAIR, "&client_id=client_gamma")).toEqual(started.client_gamma);
    expect(await ids(KAM)).toEqual(Object.values(started).flat().sort());
    expect(await total(ALPHA)).toBe(2);
    expect(await total(ALPHA, "&client_id=client_beta")).toBe(0);
    expect(await total(BETA)).toBe(1);
    expect(await total(PAIR)).toBe(3);
    expect(await total(OPS)).toBe(4);
  });

  it("a key opens only its role's routes; a scoped operator key only its clients' quotas and no route that spans every client", async () => {
    // A client key is not an operator and has no schedules: 401, as for KAM_TOKEN on an operator route.
    expect((await call("/resources", { headers: ALPHA })).status).toBe(401);
    expect((await call("/schedules", { headers: ALPHA })).status).toBe(401);
    expect((await call("/clients/client_alpha", { headers: ALPHA })).status).toBe(200);
    const other = await call("/clients/client_beta", { headers: ALPHA });
    expect(other.status).toBe(403);
    expect((await errorOf(other)).code).toBe("forbidden");
    // A scoped KAM-role key may not use schedules (they span every client).
    expect((await call("/schedules", { headers: PAIR })).status).toBe(403);
    // An operator key for client_alpha: its quotas yes, another's no, global routes no.
    expect((await call("/clients/client_alpha/quotas", { method: "PUT", headers: { ...OPS_ALPHA, ...JSON_HEADERS }, body: JSON.stringify({ weight: 2 }) })).status).toBe(200);
    expect((await call("/clients/client_beta/quotas", { method: "PUT", headers: { ...OPS_ALPHA, ...JSON_HEADERS }, body: JSON.stringify({ weight: 2 }) })).status).toBe(403);
    for (const path of ["/resources", "/metrics", "/resources/undeliverable"]) {
      const res = await call(path, { headers: OPS_ALPHA });
      expect(res.status, path).toBe(403);
    }
    await call("/clients/client_beta/quotas", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ weight: 1 }) });
    const listed = (await (await call("/clients", { headers: OPS_ALPHA })).json()) as { clients: { client_id: string }[] };
    expect(listed.clients.map((c) => c.client_id)).toEqual(["client_alpha"]);
    const all = (await (await call("/clients", { headers: OPS })).json()) as { clients: { client_id: string }[] };
    expect(all.clients.map((c) => c.client_id)).toContain("client_beta");
    // An operator key cannot start executions (POST /execute is KAM's and clients').
    expect((await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_alpha" }, OPS_ALPHA)).res.status).toBe(401);
    // A key that is not in API_KEYS, and the hash itself sent as a key, open nothing.
    expect((await call("/executions", { headers: bearer("test-api-key-unknown-0123456789") })).status).toBe(401);
    expect((await call("/executions", { headers: bearer(await sha256Hex(TEST_API_KEYS.alpha.key)) })).status).toBe(401);
  });
});

describe("API_KEYS as configuration", () => {
  const envWith = (vars: Record<string, string | undefined>) => ({ ...env, ...vars }) as unknown as Env;
  const get = (e: Env, path: string, key: string) => handle(new Request(`http://orchestrator.test${path}`, { headers: bearer(key) }), e, createExecutionContext());

  it("rotates: the new key works next to the old one, then the old one is removed and refused", async () => {
    const entry = { name: "alpha-app", role: "client", clients: ["client_alpha"] };
    const oldKey = "rotation-old-key-0123456789abcdef";
    const newKey = "rotation-new-key-0123456789abcdef";
    const both = envWith({ API_KEYS: JSON.stringify({ [await sha256Hex(oldKey)]: entry, [await sha256Hex(newKey)]: entry }) });
    expect((await get(both, "/executions/counts", oldKey)).status).toBe(200);
    expect((await get(both, "/executions/counts", newKey)).status).toBe(200);
    const after = envWith({ API_KEYS: JSON.stringify({ [await sha256Hex(newKey)]: entry }) });
    expect((await get(after, "/executions/counts", newKey)).status).toBe(200);
    expect((await get(after, "/executions/counts", oldKey)).status).toBe(401);
  });

  it("an unusable API_KEYS stops the service (misconfigured) and names the secret, never a value", async () => {
    for (const bad of ["not json", JSON.stringify({ NOTAHASH: { name: "x", role: "client", clients: "*" } }), JSON.stringify({ ["a".repeat(64)]: { name: "x", role: "root", clients: "*" } })]) {
      const e = envWith({ API_KEYS: bad });
      expect(missingSecrets(e)).toEqual(["API_KEYS (not a JSON object of lowercase hex SHA-256 -> { name, role, clients })"]);
      const res = await get(e, "/executions", TEST_API_KEYS.alpha.key);
      expect(res.status).toBe(503);
      expect((await errorOf(res)).code).toBe("misconfigured");
    }
    // Unset: no scoped keys, the service runs.
    expect(missingSecrets(envWith({ API_KEYS: undefined }))).toEqual([]);
  });
});
