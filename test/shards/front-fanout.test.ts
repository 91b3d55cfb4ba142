/**
 * The front Worker over four ledger shards (the `shards` project: LEDGER_SHARDS
 * 4, `worker:*` on 0, `tokens:*` on 1, `gate:*` on 2, other pools and clients by
 * hash). `GET /resources` and `GET /clients` ask every shard and merge; a shard
 * that fails or stalls is listed and the answer comes without it; `PUT
 * /resources/pools/:name` and the client routes reach the owning shard alone;
 * a split pool's sub-pool is set on its own shard; the estimate at a start asks
 * the shards of the stages' workers only. A shard is made to fail or stall for
 * real: the test points LEDGER_BINDING at the faulty ledger
 * (test/support/faulty-ledger), which forwards to the real shard of the same
 * name unless a fault is set, and runs the front Worker's handler under that env.
 */
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it } from "vitest";
import type { QueueSampler } from "../../actors/queue-sampler";
import type { ClientDocument } from "../../schemas/clients";
import type { ResourcesDocument, ShardedClientList } from "../../schemas/resources";
import { configOf } from "../../src/config";
import { estimateTotalMs } from "../../src/estimates";
import { ledgerShard } from "../../src/ledger-routing";
import { handle } from "../../src/routes";
import { JSON_HEADERS, OPS, call, startExecution } from "../support/api";

type Method = "snapshot" | "clients" | "client" | "estimate";
interface FaultyLedgerStub {
  setFault(methods: Method[], fault: { mode: "down" | "stall"; stallMs?: number }): Promise<void>;
  clearFaults(): Promise<void>;
  calls(method?: Method): Promise<{ method: Method }[]>;
  resetCalls(): Promise<void>;
}
const faultyNs = (env as unknown as { FAULTY_LEDGER: DurableObjectNamespace }).FAULTY_LEDGER;
const faulty = (shard: number) => faultyNs.get(faultyNs.idFromName(`ledger-${shard}`)) as unknown as FaultyLedgerStub;
const SHARDS = [0, 1, 2, 3];

/** The env with the ledger reached through the faulty ledger (and any other vars changed). */
const throughFaulty = (vars: Record<string, string> = {}) => ({ ...env, LEDGER_BINDING: "FAULTY_LEDGER", ...vars }) as Env;

async function handleUnder(e: Env, path: string): Promise<Response> {
  const ctx = createExecutionContext();
  const res = await handle(new Request(`http://orchestrator.test${path}`, { headers: OPS }), e, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

const putPool = (name: string, spec: unknown) =>
  call(`/resources/pools/${encodeURIComponent(name)}`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify(spec) });
const namesOn = async (shard: number) => (await ledgerShard(env, shard).snapshot()).pools.map((p) => p.name);

// Pools with known shards: three by the map's pins, one by the hash of its name (FNV-1a 32 % 4 = 3).
const OWN_POOLS: [string, number][] = [
  ["worker:front-fanout", 0],
  ["tokens:front-fanout", 1],
  ["gate:front-fanout", 2],
  ["front-pool-1", 3],
];

afterEach(async () => {
  for (const s of SHARDS) {
    await faulty(s).clearFaults();
    await faulty(s).resetCalls();
  }
});

describe("GET /resources and PUT /resources/pools/:name over four shards", () => {
  it("PUT reaches the owning shard alone; GET lists every pool of every shard once, with the shard that holds it", async () => {
    for (const [name, shard] of OWN_POOLS) {
      const res = await putPool(name, { kind: "concurrency", capacity: 5 + shard });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ name, capacity: 5 + shard, shard });
    }
    const held = await Promise.all(SHARDS.map(namesOn));
    for (const [name, shard] of OWN_POOLS) expect(SHARDS.filter((s) => held[s].includes(name))).toEqual([shard]);

    const res = await call("/resources", { headers: OPS });
    expect(res.status).toBe(200);
    const doc = (await res.json()) as ResourcesDocument;
    expect(doc.shards).toEqual(SHARDS.map((s) => ({ shard: s, name: `ledger-${s}`, ok: true })));
    // Every pool any shard holds, once, each with a shard that holds it.
    expect(doc.pools.map((p) => p.name)).toEqual([...new Set(held.flat())].sort());
    for (const p of doc.pools) expect(held[p.shard]).toContain(p.name);
    for (const [name, shard] of OWN_POOLS) expect(doc.pools.find((p) => p.name === name)).toMatchObject({ shard, capacity: 5 + shard });
    expect(doc.conflicts.filter((c) => OWN_POOLS.some(([n]) => n === c.pool))).toEqual([]);
    // Sums over the shards, as each reports itself.
    const snaps = await Promise.all(SHARDS.map((s) => ledgerShard(env, s).snapshot()));
    expect(doc.leases).toBe(snaps.reduce((n, s) => n + s.leases, 0));
  });

  it("a shard that fails and one that stalls are listed as not answering; the answer comes with the other shards' pools", async () => {
    for (const [name, shard] of OWN_POOLS) await putPool(name, { kind: "concurrency", capacity: 5 + shard });
    await faulty(2).setFault(["snapshot"], { mode: "down" });
    await faulty(3).setFault(["snapshot"], { mode: "stall", stallMs: 4 * configOf(env).tuning.ledgerCallTimeoutMs });
    const res = await handleUnder(throughFaulty(), "/resources");
    expect(res.status).toBe(200);
    const doc = (await res.json()) as ResourcesDocument;
    expect(doc.shards.map((s) => [s.name, s.ok])).toEqual([
      ["ledger-0", true],
      ["ledger-1", true],
      ["ledger-2", false],
      ["ledger-3", false],
    ]);
    expect(doc.shards[2].error).toMatch(/no answer within \d+ ms, or it failed/);
    expect(doc.shards[3].error).toMatch(/no answer within \d+ ms, or it failed/);
    expect(new Set(doc.pools.map((p) => p.shard))).toEqual(new Set([0, 1]));
    const names = doc.pools.map((p) => p.name);
    expect(names).toEqual(expect.arrayContaining(["worker:front-fanout", "tokens:front-fanout"]));
    expect(names).not.toContain("gate:front-fanout");
    expect(names).not.toContain("front-pool-1");
    // Shards 0 and 1 were asked through the faulty ledger, which forwards to the real shard of its name.
    expect(names).toEqual(expect.arrayContaining(await namesOn(1)));
    for (const p of doc.pools.filter((x) => x.shard === 1)) expect(await namesOn(1)).toContain(p.name);
  });

  it("with no shard answering, 503 unavailable", async () => {
    for (const s of SHARDS) await faulty(s).setFault(["snapshot"], { mode: "down" });
    const res = await handleUnder(throughFaulty(), "/resources");
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("unavailable");
  });

  it("a split pool's sub-pool is set on its own shard alone; the pool's own name and a sub-pool past the last are 400", async () => {
    // front-hot split over shards 1, 2, 3 (sub-pool i on the shard its name also hashes to, so the objects, which route by the project's map, agree).
    const split = { LEDGER_SHARD_MAP: JSON.stringify({ "worker:*": 0, "tokens:*": 1, "gate:*": 2, "front-hot": { split: [1, 2, 3] } }) };
    const e = { ...env, ...split } as Env;
    const put = async (name: string, capacity: number) => {
      const ctx = createExecutionContext();
      const req = new Request(`http://orchestrator.test/resources/pools/${encodeURIComponent(name)}`, {
        method: "PUT",
        headers: { ...OPS, ...JSON_HEADERS },
        body: JSON.stringify({ kind: "concurrency", capacity }),
      });
      const res = await handle(req, e, ctx);
      await waitOnExecutionContext(ctx);
      return { status: res.status, body: (await res.json()) as Record<string, any> };
    };
    for (const [i, shard] of [1, 2, 3].entries()) expect(await put(`front-hot#${i}`, 10)).toMatchObject({ status: 200, body: { name: `front-hot#${i}`, shard } });
    // Rebalancing: one sub-pool raised, another lowered, each on its shard; the third untouched.
    expect((await put("front-hot#0", 15)).body).toMatchObject({ capacity: 15, shard: 1 });
    expect((await put("front-hot#2", 5)).body).toMatchObject({ capacity: 5, shard: 3 });
    const capacityOn = async (shard: number, name: string) => (await ledgerShard(env, shard).snapshot()).pools.find((p) => p.name === name)?.capacity;
    expect([await capacityOn(1, "front-hot#0"), await capacityOn(2, "front-hot#1"), await capacityOn(3, "front-hot#2")]).toEqual([15, 10, 5]);
    expect(await capacityOn(0, "front-hot#0")).toBeUndefined();
    const whole = await put("front-hot", 30);
    expect(whole.status).toBe(400);
    expect(whole.body.error.details[0]).toEqual({ path: "name", message: expect.stringContaining("front-hot#0, front-hot#1, front-hot#2") });
    expect((await put("front-hot#3", 30)).status).toBe(400);
    expect(await Promise.all(SHARDS.map(async (s) => (await namesOn(s)).includes("front-hot")))).toEqual([false, false, false, false]);
  });
});

describe("clients over four shards", () => {
  // Client ids with known shards (FNV-1a 32 of `client:{id}` % 4).
  const CLIENTS: [string, number][] = [
    ["client_front_0", 0],
    ["client_front_3", 1],
    ["client_front_2", 2],
    ["client_front_1", 3],
  ];
  const putQuotas = (id: string, weight: number) =>
    call(`/clients/${id}/quotas`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ weight }) });

  it("quotas are kept on the client's shard alone; GET /clients lists each client once as its shard has it; a shard down leaves its clients out and says so", async () => {
    for (const [id, shard] of CLIENTS) expect((await putQuotas(id, shard + 2)).status).toBe(200);
    for (const [id, shard] of CLIENTS) {
      for (const s of SHARDS) expect((await ledgerShard(env, s).client(id)).own_quotas).toEqual(s === shard ? { weight: shard + 2 } : null);
      expect(((await (await call(`/clients/${id}`, { headers: OPS })).json()) as ClientDocument).quotas.weight).toBe(shard + 2);
    }
    const list = (await (await call("/clients", { headers: OPS })).json()) as ShardedClientList;
    expect(list.shards.every((s) => s.ok)).toBe(true);
    for (const [id, shard] of CLIENTS) expect(list.clients.filter((c) => c.client_id === id).map((c) => c.quotas.weight)).toEqual([shard + 2]);
    const ids = list.clients.map((c) => c.client_id);
    expect(new Set(ids).size).toBe(ids.length);

    await faulty(3).setFault(["clients", "client"], { mode: "down" });
    const res = await handleUnder(throughFaulty(), "/clients");
    expect(res.status).toBe(200);
    const partial = (await res.json()) as ShardedClientList;
    expect(partial.shards.map((s) => s.ok)).toEqual([true, true, true, false]);
    const shown = partial.clients.map((c) => c.client_id);
    expect(shown).toEqual(expect.arrayContaining(["client_front_0", "client_front_3", "client_front_2"]));
    expect(shown).not.toContain("client_front_1");
  });
});

describe("the queue sampler over four shards", () => {
  it("samples the pools of every shard", async () => {
    for (const [name, shard] of OWN_POOLS) await putPool(name, { kind: "concurrency", capacity: 5 + shard });
    const sampler = env.QUEUE_SAMPLES.get(env.QUEUE_SAMPLES.idFromName("global")) as unknown as DurableObjectStub<QueueSampler>;
    const at = await sampler.sample();
    const { samples } = await sampler.samples(at, at + 1);
    for (const [name, shard] of OWN_POOLS) expect(samples.filter((x) => x.pool === name).map((x) => x.capacity)).toEqual([5 + shard]);
  });
});

describe("start admission over four shards", () => {
  it("is decided by the client's shard, where its quotas are", async () => {
    // client_front_5 lives on shard 3 (FNV-1a 32 of `client:client_front_5` % 4).
    const id = "client_front_5";
    expect((await call(`/clients/${id}/quotas`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ max_starts_per_minute: 1 }) })).status).toBe(200);
    expect((await ledgerShard(env, 3).client(id)).own_quotas).toEqual({ max_starts_per_minute: 1 });
    const first = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: id });
    expect(first.res.status).toBe(202);
    const second = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: id });
    expect(second.res.status).toBe(429);
    expect(second.body.error.code).toBe("rate_limited");
  });
});

describe("the estimate at a start", () => {
  // Two workers on two shards: the content granulator's pool on 0, the capped one's on 3.
  const vars = { LEDGER_SHARD_MAP: JSON.stringify({ "tokens:*": 1, "gate:*": 2, "worker:bitware-content-granulator": 0, "worker:bitware-capped-granulator": 3 }) };
  const stages = [{ worker: "bitware-content-granulator" }, { worker: "bitware-capped-granulator" }, { worker: "bitware-content-granulator" }];

  it("asks only the shards of the stages' workers, each once with its stages; a shard down counts the default for its stages", async () => {
    const e = throughFaulty(vars);
    await estimateTotalMs(e, stages, "normal");
    expect(await Promise.all(SHARDS.map(async (s) => (await faulty(s).calls("estimate")).length))).toEqual([1, 0, 0, 1]);

    await faulty(3).setFault(["estimate"], { mode: "down" });
    // A new env object: the per-isolate cache of estimates is keyed by the stages, so another priority asks again.
    const total = await estimateTotalMs(throughFaulty(vars), stages, "high");
    const shard0 = await ledgerShard(env, 0).estimate([stages[0], stages[2]], "high");
    expect(total).toBe(shard0.totalMs + configOf(env).tuning.defaultStageDurationMs);
  });
});
