/**
 * Clients over HTTP: PUT /clients/:client_id/quotas, GET /clients/:client_id
 * and GET /clients, and the quotas POST /execute enforces (403
 * priority_not_allowed, 429 rate_limited with Retry-After, 429
 * budget_exhausted), plus a stage that fails budget_exhausted mid-run. Real
 * Worker, real ledger and Execution objects; each test uses its own client id.
 */
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { layoutOf, ledgerShard, partsOf, shardOfPool } from "../../src/ledger-routing";
import { JSON_HEADERS, KAM, OPS, call, ended, startExecution, waitFor } from "../support/api";

const fast = { topic: "React", targetAudience: "beginners", steps: 2, step_ms: 5 };

async function putQuotas(client: string, quotas: unknown, headers: Record<string, string> = OPS) {
  const res = await call(`/clients/${client}/quotas`, { method: "PUT", headers: { ...headers, ...JSON_HEADERS }, body: JSON.stringify(quotas) });
  return { res, body: (await res.json()) as Record<string, any> };
}

/**
 * Spends `usage` as one settled stage of `clientId` does, through the ledger objects the routing module
 * gives its parts (src/ledger-routing.ts, partsOf): with one shard one reservation there; with several one
 * part per shard, each holding and settling its own pools, the client's part judged on the whole stage and
 * charged its whole usage (as actors/execution/parts.ts settles a multi-shard stage).
 */
async function settledStage(o: { executionId: string; clientId: string; requirements: Record<string, number>; usage: Record<string, number> }) {
  const worker = "bitware-content-granulator";
  const layout = layoutOf(env);
  const parts = partsOf(layout, o.requirements, { worker, clientId: o.clientId, executionId: o.executionId });
  const shards = parts.map((p) => p.shard);
  const request = { executionId: o.executionId, stageId: "stage_1", attempt: 1, priority: "normal" as const, leaseMs: 60_000, worker, clientId: o.clientId };
  const ids: string[] = [];
  // In the routing's order, as an Execution acquires a set (nothing else contends here, so each is granted at once).
  for (const p of parts) {
    const r = await ledgerShard(env, p.shard).reserve(
      parts.length === 1
        ? { ...request, requirements: o.requirements }
        : { ...request, requirements: p.requirements, part: { shard: p.shard, shards, worker: p.worker, client: p.client, ...(p.client ? { stageNeeds: o.requirements } : {}) } },
    );
    if (r.status !== "granted") throw new Error(`expected a grant on shard ${p.shard}, got ${r.status}`);
    ids.push(r.reservationId);
  }
  for (const [i, p] of parts.entries()) {
    const own = Object.fromEntries(Object.entries(o.usage).filter(([pool]) => shardOfPool(layout, pool) === p.shard));
    const settled = await ledgerShard(env, p.shard).settle(ids[i], parts.length === 1 ? o.usage : own, undefined, parts.length > 1 && p.client ? o.usage : undefined);
    if (!settled.ok) throw new Error(`settle on shard ${p.shard}: ${settled.state}`);
  }
}

describe("client routes", () => {
  it("PUT quotas answers the client document; GET shows quotas and usage to OPS and KAM; GET /clients lists it", async () => {
    const put = await putQuotas("client_routes", { max_running_stages: 4, monthly_budget: 12.5, weight: 3, rate: { "tokens:openai": { per_minute: 1000 } } });
    expect(put.res.status).toBe(200);
    expect(put.body).toMatchObject({
      client_id: "client_routes",
      quotas: { max_running_stages: 4, monthly_budget: 12.5, weight: 3 },
      own_quotas: { max_running_stages: 4 },
      currency: "USD",
      usage: { running_stages: 0, running_executions: 0, spent: 0, remaining: 12.5, waiting_stages: 0 },
    });
    for (const headers of [OPS, KAM]) {
      const got = await call("/clients/client_routes", { headers });
      expect(got.status).toBe(200);
      expect(await got.json()).toEqual(put.body);
    }
    const list = (await (await call("/clients", { headers: OPS })).json()) as { clients: { client_id: string }[] };
    expect(list.clients.map((c) => c.client_id)).toContain("client_routes");
  });

  it("bad quotas are a 400 naming the fields and change nothing; KAM may not set quotas", async () => {
    await putQuotas("client_bad", { weight: 2 });
    const bad = await putQuotas("client_bad", { weight: 101, max_priority: "urgent", extra: 1 });
    expect(bad.res.status).toBe(400);
    expect(bad.body.error.code).toBe("invalid_request");
    const fields = (bad.body.error.details as { path: string }[]).map((d) => d.path);
    expect(fields).toEqual(expect.arrayContaining(["weight", "max_priority"]));
    expect((await putQuotas("client_bad", { weight: 5 }, KAM)).res.status).toBe(401);
    const doc = (await (await call("/clients/client_bad", { headers: OPS })).json()) as { quotas: unknown };
    expect(doc.quotas).toEqual({ weight: 2 });
    expect((await call("/clients/bad%20id", { headers: OPS })).status).toBe(400);
  });
});

describe("POST /execute under a client's quotas", () => {
  it("above max_priority: 403 priority_not_allowed, nothing started", async () => {
    await putQuotas("client_prio", { max_priority: "normal" });
    const { res, body } = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_prio", priority: "critical" });
    expect(res.status).toBe(403);
    expect(body.error.code).toBe("priority_not_allowed");
    const counts = (await (await call("/executions/counts?client_id=client_prio", { headers: OPS })).json()) as { total: number };
    expect(counts.total).toBe(0);
  });

  it("over max_starts_per_minute: 429 rate_limited with Retry-After", async () => {
    await putQuotas("client_starts", { max_starts_per_minute: 1 });
    const first = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_starts" });
    expect(first.res.status).toBe(202);
    const second = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_starts" });
    expect(second.res.status).toBe(429);
    expect(second.body.error.code).toBe("rate_limited");
    const retry = Number(second.res.headers.get("retry-after"));
    expect(retry).toBeGreaterThan(0);
    expect(retry).toBeLessThanOrEqual(60);
    await waitFor(first.body.execution_id, ended);
  });

  it("a stage whose estimated cost the budget cannot cover fails budget_exhausted; once spent, POST /execute is 429", async () => {
    // course_creation's first stage reserves 2,000 tokens:openai: estimated cost 0.004 > 0.003.
    await putQuotas("client_budget", { monthly_budget: 0.003 });
    const { res, body } = await startExecution({ template_name: "course_creation", parameters: fast, client_id: "client_budget" });
    expect(res.status).toBe(202);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("budget_exhausted");

    // Spend the budget through the ledger itself (a settled stage of this client, on the shards its parts live on), then starts are refused.
    await settledStage({
      executionId: "exec_1700000000000_clientbudget01",
      clientId: "client_budget",
      requirements: { "tokens:openai": 1000 },
      usage: { "tokens:openai": 2000 },
    });
    const spent = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_budget" });
    expect(spent.res.status).toBe(429);
    expect(spent.body.error.code).toBe("budget_exhausted");
    const client = (await (await call("/clients/client_budget", { headers: KAM })).json()) as { usage: { spent: number; remaining: number } };
    expect(client.usage).toMatchObject({ spent: 0.004, remaining: 0 });
  });

  it("a stage held by its client's quota shows waiting_on in the status document; raising the quota lets it run at once", async () => {
    await putQuotas("client_held", { max_running_stages: 0 });
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_held" });
    const id = body.execution_id as string;
    const waiting = await waitFor(id, (d) => d.stages[0].status === "waiting_resources" && d.stages[0].waiting_on !== undefined);
    expect(waiting.stages[0].waiting_on).toMatchObject({ reason: "client_quota", position: 1 });
    const snap = (await (await call("/resources", { headers: OPS })).json()) as { queue: { execution_id: string; client_id: string; waiting_on: { reason: string } }[] };
    expect(snap.queue.find((q) => q.execution_id === id)).toMatchObject({ client_id: "client_held", waiting_on: { reason: "client_quota" } });
    await putQuotas("client_held", { max_running_stages: 1 });
    const done = await waitFor(id, ended);
    expect(done.status).toBe("completed");
    expect(done.stages[0].waiting_on).toBeUndefined();
  });
});
