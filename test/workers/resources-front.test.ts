/**
 * The front Worker's side of ledger sharding with one shard (the `shards`
 * project runs test/shards/front-fanout.test.ts with four): `GET /resources`
 * names each pool's shard and which shards answered; a pool's kind change and
 * a sub-pool of a pool that is not split are typed 4xx; a LEDGER_SHARDS or
 * LEDGER_SHARD_MAP the routing refuses makes every route answer 503
 * `config_invalid` naming the problem, and routes nothing. The merge of
 * several shards' snapshots (conflicts, sums) is checked on its own.
 */
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { LedgerSnapshot } from "../../schemas/ledger";
import type { ResourcesDocument } from "../../schemas/resources";
import { type ShardAnswer, mergeSnapshots } from "../../src/ledger-fanout";
import { ledgerShard } from "../../src/ledger-routing";
import { KamApi } from "../../src/index";
import { handle } from "../../src/routes";
import { JSON_HEADERS, KAM, OPS, call, ended, waitFor } from "../support/api";

/** The front Worker's own fetch handler under `env` with these vars changed (a config a deployment could have). */
async function withVars(vars: Record<string, string>, path: string, init: RequestInit = {}): Promise<Response> {
  const ctx = createExecutionContext();
  const res = await handle(new Request(`http://orchestrator.test${path}`, init), { ...env, ...vars } as Env, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

const putPool = (name: string, spec: unknown) =>
  call(`/resources/pools/${encodeURIComponent(name)}`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify(spec) });

describe("GET /resources with one ledger shard", () => {
  it("lists every pool of the one object with shard 0, the shard as answering, and no conflicts", async () => {
    expect((await putPool("gate:fanout-one", { kind: "concurrency", capacity: 3 })).status).toBe(200);
    const res = await call("/resources", { headers: OPS });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as ResourcesDocument;
    expect(doc.shards).toEqual([{ shard: 0, name: "global", ok: true }]);
    expect(doc.conflicts).toEqual([]);
    // The same pools the object itself lists, each with its shard.
    const own = await ledgerShard(env, 0).snapshot();
    expect(doc.pools.map((p) => p.name)).toEqual(own.pools.map((p) => p.name));
    expect(new Set(doc.pools.map((p) => p.shard))).toEqual(new Set([0]));
    expect(doc.pools.find((p) => p.name === "gate:fanout-one")).toMatchObject({ capacity: 3, shard: 0 });
  });
});

describe("PUT /resources/pools/:name", () => {
  it("answers the pool with its shard; a kind change is 409 pool_kind_immutable and changes nothing", async () => {
    const made = await putPool("gate:fanout-kind", { kind: "concurrency", capacity: 2 });
    expect(made.status).toBe(200);
    expect(await made.json()).toMatchObject({ name: "gate:fanout-kind", kind: "concurrency", capacity: 2, shard: 0 });
    const changed = await putPool("gate:fanout-kind", { kind: "rate", capacity: 50, refill_per_second: 1 });
    expect(changed.status).toBe(409);
    const err = ((await changed.json()) as { error: { code: string; message: string; details: { path: string }[] } }).error;
    expect(err.code).toBe("pool_kind_immutable");
    expect(err.message).toContain("concurrency");
    expect(err.details[0].path).toBe("kind");
    const pool = (await ledgerShard(env, 0).snapshot()).pools.find((p) => p.name === "gate:fanout-kind");
    expect(pool).toMatchObject({ kind: "concurrency", capacity: 2 });
  });

  it("a sub-pool of a pool that is not split is 400 naming the field, and creates nothing", async () => {
    const res = await putPool("gate:fanout-sub#1", { kind: "concurrency", capacity: 2 });
    expect(res.status).toBe(400);
    const err = ((await res.json()) as { error: { code: string; details: { path: string; message: string }[] } }).error;
    expect(err.code).toBe("invalid_request");
    expect(err.details).toEqual([{ path: "name", message: expect.stringContaining("gate:fanout-sub is not split") }]);
    expect((await ledgerShard(env, 0).snapshot()).pools.some((p) => p.name.startsWith("gate:fanout-sub"))).toBe(false);
  });
});

describe("a shard config the routing refuses", () => {
  const refused: [string, Record<string, string>, string][] = [
    ["LEDGER_SHARDS out of range", { LEDGER_SHARDS: "300" }, "LEDGER_SHARDS must be an integer from 1 to 256"],
    ["two entries claiming one pool", { LEDGER_SHARDS: "4", LEDGER_SHARD_MAP: JSON.stringify({ "tokens:*": 1, "tokens:openai": 2 }) }, "both claim some pools"],
    ["a shard out of range in the map", { LEDGER_SHARDS: "2", LEDGER_SHARD_MAP: JSON.stringify({ "gate:x": 5 }) }, "must name a shard from 0 to 1"],
  ];
  for (const [name, vars, problem] of refused) {
    it(`${name}: every route answers 503 config_invalid naming it; /health names it too`, async () => {
      for (const [path, init] of [
        ["/resources", { headers: OPS }],
        ["/clients", { headers: OPS }],
        ["/executions", { headers: KAM }],
      ] as const) {
        const res = await withVars(vars, path, init);
        expect(res.status).toBe(503);
        const err = ((await res.json()) as { error: { code: string; message: string; details: { problems: string[] } } }).error;
        expect(err.code).toBe("config_invalid");
        expect(err.message).toContain(problem);
        expect(err.details.problems.some((p) => p.includes(problem))).toBe(true);
      }
      const health = await withVars(vars, "/health");
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ status: "misconfigured", missing: [], config_invalid: [expect.stringContaining(problem)] });
    });
  }

  it("KAM's RPC methods answer config_invalid too, and start nothing", async () => {
    const api = new KamApi(createExecutionContext() as never, { ...env, LEDGER_SHARD_MAP: "{not json" } as Env);
    const answer = await api.execute({ request_id: "req_fanout_refused_rpc", template_name: "quick_summary", parameters: {}, client_id: "client_fanout" });
    expect(answer).toMatchObject({ ok: false, status: 503, error: { code: "config_invalid", message: expect.stringContaining("LEDGER_SHARD_MAP is not JSON") } });
    const started = await call("/execute", { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: JSON.stringify({ request_id: "req_fanout_refused_rpc", template_name: "quick_summary", parameters: {}, client_id: "client_fanout" }) });
    expect(started.status).toBe(202);
    // Run to its end inside the test: an execution still running when the file ends is torn down mid-flight.
    await waitFor(((await started.json()) as { execution_id: string }).execution_id, ended);
  });

  it("routes nothing: a start under the refused config is 503 config_invalid and claims nothing", async () => {
    const body = { request_id: "req_fanout_refused_start", template_name: "quick_summary", parameters: {}, client_id: "client_fanout" };
    const init = () => ({ method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: JSON.stringify(body) });
    const res = await withVars({ LEDGER_SHARDS: "0" }, "/execute", init());
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("config_invalid");
    // Under the valid config the same request id starts a new execution (202, not a replay's 200): the refused start claimed nothing.
    const started = await call("/execute", init());
    expect(started.status).toBe(202);
    await waitFor(((await started.json()) as { execution_id: string }).execution_id, ended);
  });
});

describe("merging shard snapshots", () => {
  const pool = (name: string, capacity: number): LedgerSnapshot["pools"][number] => ({ name, kind: "concurrency", capacity, in_use: 0, available: capacity, waiting: 0 });
  const waiter = (id: string): LedgerSnapshot["queue"][number] => ({
    reservation_id: id,
    execution_id: "exec_1",
    stage_id: "s1",
    client_id: null,
    priority: "normal",
    effective_priority: "normal",
    waiting_on: { pools: ["a"], reason: "capacity", position: 1, estimated_wait_ms: 0 },
  });
  it("lists each pool once from its owner, reports one on two shards as a conflict, sums leases and waiters of the shards that answered", () => {
    const answers: ShardAnswer<LedgerSnapshot>[] = [
      { shard: 0, name: "ledger-0", ok: true, value: { pools: [pool("a", 1), pool("moved", 10)], leases: 2, waiters: 1, queue: [waiter("r0")] } },
      { shard: 1, name: "ledger-1", ok: false, error: "no answer within 2000 ms, or it failed" },
      { shard: 2, name: "ledger-2", ok: true, value: { pools: [pool("moved", 20), pool("b", 3)], leases: 3, waiters: 1, queue: [waiter("r2")] } },
    ];
    const doc = mergeSnapshots(answers, (p) => (p === "moved" ? 2 : 0));
    expect(doc.pools.map((p) => [p.name, p.shard, p.capacity])).toEqual([
      ["a", 0, 1],
      ["b", 2, 3],
      ["moved", 2, 20],
    ]);
    expect(doc.conflicts).toEqual([{ pool: "moved", shards: [0, 2], owner: 2 }]);
    expect([doc.leases, doc.waiters]).toEqual([5, 2]);
    expect(doc.queue.map((w) => [w.reservation_id, w.shard])).toEqual([
      ["r0", 0],
      ["r2", 2],
    ]);
    expect(doc.shards).toEqual([
      { shard: 0, name: "ledger-0", ok: true },
      { shard: 1, name: "ledger-1", ok: false, error: "no answer within 2000 ms, or it failed" },
      { shard: 2, name: "ledger-2", ok: true },
    ]);
  });
});
