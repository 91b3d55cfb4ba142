/**
 * The ledger's side of sharding (docs/ledger.md, "Parts" and "Ownership"): a
 * part of a multi-shard stage holds only its own requirements, the worker slot
 * only on the worker's part, the client's running count, rate buckets and
 * budget only on the client's part (judged on the whole stage's needs, charged
 * the whole stage's usage); round ids; a shard object refuses what the routing
 * layout places on another shard; snapshots and notices name the shard.
 */
import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { ledgerTestHooks, type ResourceLedger } from "../../actors/resource-ledger";
import type { RoutingVars } from "../../actors/ledger/ownership";
import type { ReservePart, ReserveRequest } from "../../schemas/ledger";
import { layoutOf, ledgerShard, shardName, shardOfClient, shardOfPool } from "../../src/ledger-routing";
import { attach, expectWithinCapacity, failure, fresh, id, newClock, req, type LedgerStub, type Notices } from "./ledger-support";

/** tokens:openai is priced at 0.000002 per token (wrangler.toml PRICES): 1,000,000 tokens cost 2. */
const TOK = "tokens:openai";

function part(over: Partial<ReservePart> = {}): ReservePart {
  return { shard: 0, shards: [0, 1], worker: false, client: false, ...over };
}
function preq(clientId: string | null, p: ReservePart, over: Partial<ReserveRequest> = {}): ReserveRequest {
  return { ...req(over), ...(clientId ? { clientId } : {}), part: p, ...(over.round !== undefined ? { round: over.round } : {}), ...(over.clientWeight ? { clientWeight: over.clientWeight } : {}) };
}
/** A fresh ledger whose one gpu unit a whole stage holds, and a set's round fields needing that unit. */
async function heldUnit(name: string) {
  const { ledger, notices } = await fresh(name);
  await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
  const holder = await ledger.reserve(req({ requirements: { gpu: 1 } }));
  const set = { executionId: req().executionId, stageId: "stage_1", attempt: 1, requirements: { gpu: 1 } };
  return { ledger, notices, holder, set };
}
/** A fresh ledger with one gpu unit, granted to round 0 of a one-part set. */
async function grantedRound0(name: string) {
  const { ledger, notices } = await fresh(name);
  await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
  const set = { executionId: req().executionId, stageId: "stage_1", attempt: 1, requirements: { gpu: 1 } };
  const r0 = await ledger.reserve(preq(null, part(), { ...set, round: 0 }));
  expect(r0.status).toBe("granted");
  return { ledger, notices, set, r0 };
}
async function poolOf(ledger: LedgerStub, name: string) {
  return (await ledger.snapshot()).pools.find((p) => p.name === name);
}

describe("parts: what a part holds", () => {
  it("holds only its requirements; the worker slot only on the worker's part; no worker pool is made for the others", async () => {
    const { ledger } = await fresh("parts-worker");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    await ledger.putPool("worker:pw", { kind: "concurrency", capacity: 1 });
    const other = await ledger.reserve(preq(null, part({ worker: false }), { worker: "pw", requirements: { gpu: 1 } }));
    expect(other).toMatchObject({ status: "granted", requirements: { gpu: 1 } });
    expect(await poolOf(ledger, "worker:pw")).toMatchObject({ in_use: 0 });
    // The worker's part takes the one slot; a second worker's part then waits for it.
    const mine = await ledger.reserve(preq(null, part({ worker: true }), { worker: "pw", requirements: { gpu: 1 } }));
    expect(mine).toMatchObject({ status: "granted", requirements: { gpu: 1, "worker:pw": 1 } });
    expect((await ledger.reserve(preq(null, part({ worker: true }), { worker: "pw" }))).status).toBe("waiting");
    // A part that is not the worker's names no worker pool, so none is created for it.
    expect((await ledger.reserve(preq(null, part({ worker: false }), { worker: "nowhere" }))).status).toBe("granted");
    expect(await poolOf(ledger, "worker:nowhere")).toBeUndefined();
    // Without `part`, today's behaviour: the worker slot is always added (and the pool created).
    expect(await ledger.reserve(req({ worker: "nowhere" }))).toMatchObject({ status: "granted", requirements: { "worker:nowhere": 1 } });
    await expectWithinCapacity(ledger);
  });

  it("max_running_stages counts only the client's part", async () => {
    const { ledger } = await fresh("parts-running");
    await ledger.putClientQuotas("acme", { max_running_stages: 1 });
    const a = await ledger.reserve(preq("acme", part({ client: false })));
    const b = await ledger.reserve(preq("acme", part({ client: false })));
    expect([a.status, b.status]).toEqual(["granted", "granted"]);
    expect((await ledger.client("acme")).usage.running_stages).toBe(0);
    const c = await ledger.reserve(preq("acme", part({ client: true })));
    expect(c.status).toBe("granted");
    expect((await ledger.client("acme")).usage.running_stages).toBe(1);
    expect(await ledger.reserve(preq("acme", part({ client: true })))).toMatchObject({ status: "waiting", waitingOn: { reason: "client_quota" } });
    // Still not limited: another shard's part.
    expect((await ledger.reserve(preq("acme", part({ client: false })))).status).toBe("granted");
    // Ending the non-client parts frees nothing of the client's; ending the client's part lets the waiter go.
    await ledger.release(id(a));
    await ledger.settle(id(b), {});
    expect((await ledger.client("acme")).usage).toMatchObject({ running_stages: 1, waiting_stages: 1 });
    await ledger.settle(id(c), {});
    expect((await ledger.client("acme")).usage).toMatchObject({ running_stages: 1, waiting_stages: 0 });
    await expectWithinCapacity(ledger);
  });

  it("the budget is judged on stageNeeds on the client's part and not at all on the others; spend is the stageUsage of the client's part", async () => {
    const { ledger } = await fresh("parts-budget");
    await ledger.putPool(TOK, { kind: "rate", capacity: 10_000_000, refill_per_second: 1 });
    await ledger.putClientQuotas("acme", { monthly_budget: 1 }); // 500,000 tokens
    // The client's part holds no tokens here, but the stage needs 600,000 (cost 1.2 > 1): refused at once.
    const over = await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { [TOK]: 600_000 } })));
    expect(over).toMatchObject({ status: "refused", code: "budget_exhausted" });
    // The tokens' own part (not the client's) is not judged against the budget at all.
    const tokPart = await ledger.reserve(preq("acme", part({ client: false }), { requirements: { [TOK]: 600_000 } }));
    expect(tokPart.status).toBe("granted");
    expect((await ledger.client("acme")).usage).toMatchObject({ held: 0, spent: 0 });
    // Within budget: the client's part holds the whole stage's estimated cost.
    const cp = await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { [TOK]: 400_000 } })));
    expect(cp.status).toBe("granted");
    expect((await ledger.client("acme")).usage).toMatchObject({ held: 0.8, running_stages: 1 });
    // Settles: the tokens' part records its pool's usage and charges the client nothing;
    // the client's part records nothing in pools and charges the whole stage's usage.
    await ledger.settle(id(tokPart), { [TOK]: 300_000 });
    expect((await ledger.client("acme")).usage.spent).toBe(0);
    const tok = await poolOf(ledger, TOK);
    expect(tok!.estimates).toEqual({ avg_usage_per_stage: 300_000, samples: 1 });
    expect(await ledger.settle(id(cp), {}, undefined, { [TOK]: 350_000 })).toEqual({ ok: true, state: "settled", unknownPools: [] });
    expect((await ledger.client("acme")).usage).toMatchObject({ spent: 0.7, held: 0, running_stages: 0 });
    expect((await poolOf(ledger, TOK))!.estimates).toEqual({ avg_usage_per_stage: 300_000, samples: 1 });
    // A whole stage (no part) is charged its own usage, as before; stageUsage is ignored there.
    const whole = await ledger.reserve({ ...req({ requirements: { [TOK]: 10_000 } }), clientId: "acme" });
    await ledger.settle(id(whole), { [TOK]: 10_000 }, undefined, { [TOK]: 999_999 });
    expect((await ledger.client("acme")).usage.spent).toBeCloseTo(0.72, 9);
    await expectWithinCapacity(ledger);
  });

  it("the client rate is judged on stageNeeds and taken only on the client's part", async () => {
    const { ledger } = await fresh("parts-rate");
    await ledger.putPool("tok", { kind: "rate", capacity: 10_000, refill_per_second: 1000 });
    await ledger.putClientQuotas("acme", { rate: { tok: { per_minute: 100 } } });
    expect(await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { tok: 150 } })))).toMatchObject({
      status: "refused",
      code: "resource_unsatisfiable",
    });
    // Another shard's part is not held by the client's bucket, however much it takes from the pool.
    expect((await ledger.reserve(preq("acme", part({ client: false }), { requirements: { tok: 500 } }))).status).toBe("granted");
    const first = await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { tok: 80 } })));
    expect(first.status).toBe("granted");
    expect(await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { tok: 30 } })))).toMatchObject({
      status: "waiting",
      waitingOn: { reason: "client_rate", pools: ["tok"] },
    });
    // The settle refunds the bucket from the whole stage's usage (80 reserved, 10 used: 70 back), so 30 fits.
    await ledger.settle(id(first), {}, undefined, { tok: 10 });
    const snap = await ledger.snapshot();
    expect(snap.waiters).toBe(0);
    await expectWithinCapacity(ledger);
  });

  it("a restart keeps what each part holds: the client's hold comes back only from the client's part", async () => {
    const { ledger } = await fresh("parts-restart");
    await ledger.putClientQuotas("acme", { max_running_stages: 1 });
    await ledger.reserve(preq("acme", part({ client: false })));
    const cp = await ledger.reserve(preq("acme", part({ client: true, stageNeeds: { [TOK]: 100_000 } })));
    expect(cp.status).toBe("granted");
    const before = (await ledger.client("acme")).usage;
    await evictDurableObject(ledger);
    await attach(ledger, newClock());
    expect((await ledger.client("acme")).usage).toEqual(before);
    expect(before).toMatchObject({ running_stages: 1, held: 0.2 });
    await expectWithinCapacity(ledger);
  });
});

describe("parts: round ids and the usual calls on them", () => {
  it("round > 0 adds @round; settle, release, renew and status work on part ids; each round is its own reservation", async () => {
    const { ledger } = await fresh("parts-round");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const base = { executionId: req().executionId, stageId: "stage_3", attempt: 2, requirements: { gpu: 1 } };
    const r0 = await ledger.reserve(preq(null, part(), { ...base, round: 0 }));
    expect(id(r0)).toBe(`${base.executionId}:stage_3:2`);
    expect((await ledger.renew(id(r0), 60_000)).ok).toBe(true);
    expect(await ledger.release(id(r0))).toEqual({ ok: true, state: "released" });
    const r1 = await ledger.reserve(preq(null, part(), { ...base, round: 1 }));
    expect(id(r1)).toBe(`${base.executionId}:stage_3:2@1`);
    expect(r1.status).toBe("granted");
    // The same round again is a replay, not a second reservation; an ended round answers ended.
    expect(await ledger.reserve(preq(null, part(), { ...base, round: 1 }))).toMatchObject({ status: "granted", reservationId: id(r1) });
    expect(await ledger.reserve(preq(null, part(), { ...base, round: 0 }))).toMatchObject({ status: "ended", state: "released" });
    expect(await ledger.settle(id(r1), { gpu: 1 })).toMatchObject({ ok: true, state: "settled" });
    const r2 = await ledger.reserve(preq(null, part(), { ...base, round: 2 }));
    expect(r2).toMatchObject({ status: "granted", reservationId: `${base.executionId}:stage_3:2@2` });
    expect(await ledger.status(id(r2))).toMatchObject({ state: "granted", requirements: { gpu: 1 } });
    await ledger.settle(id(r2), {});
    await expectWithinCapacity(ledger);
  });

  it("a later round comes back to its set's place in the queue: ahead of later arrivals, with its ageing kept", async () => {
    const { ledger, clock, notices } = await fresh("parts-place", { agingMs: 10_000 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const holder = await ledger.reserve(req({ requirements: { gpu: 1 } }));
    const set = { executionId: req().executionId, stageId: "stage_1", attempt: 1, requirements: { gpu: 1 } };
    const r0 = await ledger.reserve(preq(null, part(), { ...set, priority: "low", round: 0 }));
    expect(r0).toMatchObject({ status: "waiting", position: 1 });
    // Two rank levels of ageing (20 s at agingMs 10 s) pass, then two normal stages arrive.
    clock.now += 20_000;
    const later = [await ledger.reserve(req({ requirements: { gpu: 1 } })), await ledger.reserve(req({ requirements: { gpu: 1 } }))];
    // A set that never queued here, in its round 1: no earlier place, so behind them.
    const stranger = await ledger.reserve(preq(null, part(), { requirements: { gpu: 1 }, priority: "low", round: 1 }));
    expect(stranger).toMatchObject({ status: "waiting", position: 4 });
    // The set gives round 0 up (a later shard kept it waiting) and asks again in round 1.
    await ledger.release(id(r0));
    const r1 = await ledger.reserve(preq(null, part(), { ...set, priority: "low", round: 1 }));
    // Its place is round 0's: low aged two levels (high) and first by arrival, ahead of the normal stages.
    expect(r1).toMatchObject({ status: "waiting", position: 1 });
    await ledger.settle(id(holder), {});
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(r1)]);
    for (const r of [r1, ...later]) {
      await ledger.settle(id(r), {});
    }
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(r1), ...later.map(id), id(stranger)]);
    await ledger.settle(id(stranger), {});
    await expectWithinCapacity(ledger);
  });

  it("a later round ends its set's earlier round still queued here (its release still on its way): one row holds the place", async () => {
    const { ledger, notices, holder, set } = await heldUnit("parts-place-live");
    const r0 = await ledger.reserve(preq(null, part(), { ...set, round: 0 }));
    expect(r0).toMatchObject({ status: "waiting", position: 1 });
    // Round 1 arrives before round 0's release: round 0 is released, round 1 waits in its place, alone.
    const r1 = await ledger.reserve(preq(null, part(), { ...set, round: 1 }));
    expect(r1).toMatchObject({ status: "waiting", position: 1 });
    expect(await ledger.status(id(r0))).toMatchObject({ state: "released" });
    expect((await poolOf(ledger, "gpu"))).toMatchObject({ waiting: 1 });
    // The release arriving late changes nothing; the freed unit goes to round 1 only.
    expect(await ledger.release(id(r0))).toEqual({ ok: true, state: "released" });
    await ledger.settle(id(holder), {});
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(r1)]);
    await ledger.settle(id(r1), {});
    await expectWithinCapacity(ledger);
  });

  it("a later round ends its set's earlier round before the admission checks: a spent budget is refused, not queued behind the round's own hold", async () => {
    const { ledger } = await fresh("parts-round-budget");
    await ledger.putPool(TOK, { kind: "rate", capacity: 10_000_000, refill_per_second: 1 });
    await ledger.putClientQuotas("acme", { monthly_budget: 1 }); // 500,000 tokens
    const other = await ledger.reserve({ ...req({ requirements: { [TOK]: 1_000 } }), clientId: "acme" });
    const set = { executionId: req().executionId, stageId: "stage_1", attempt: 1 };
    const clientPart = part({ client: true, stageNeeds: { [TOK]: 300_000 } }); // cost 0.6
    expect((await ledger.reserve(preq("acme", clientPart, { ...set, round: 0 }))).status).toBe("granted");
    // The client's other stage spends 0.6: with round 0 given back, 0.6 more can never fit this month.
    await ledger.settle(id(other), { [TOK]: 300_000 });
    const r1 = await ledger.reserve(preq("acme", clientPart, { ...set, round: 1 }));
    expect(r1).toMatchObject({ status: "refused", code: "budget_exhausted" });
    expect((await ledger.client("acme")).usage).toMatchObject({ running_stages: 0, waiting_stages: 0, held: 0 });
    await expectWithinCapacity(ledger);
  });

  it("a later round refused after ending its set's earlier round gives what that round held to the stage waiting behind it", async () => {
    const { ledger, notices, set, r0 } = await grantedRound0("parts-round-refused");
    const behind = await ledger.reserve(req({ requirements: { gpu: 1 } }));
    expect(behind).toMatchObject({ status: "waiting", position: 1 });
    // Round 1 ends round 0 here, then is refused (a pool this shard does not have): the freed unit is granted at once.
    const r1 = await ledger.reserve(preq(null, part(), { ...set, requirements: { gpu: 1, no_such_pool: 1 }, round: 1 }));
    expect(r1).toMatchObject({ status: "refused", code: "unknown_pool" });
    expect(await ledger.status(id(r0))).toMatchObject({ state: "released" });
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(behind)]);
    expect(await ledger.status(id(behind))).toMatchObject({ state: "granted" });
    await ledger.settle(id(behind), {});
    await expectWithinCapacity(ledger);
  });

  it("a round's reserve that arrives after its set's next round (each call on its own stub) is answered ended and makes nothing", async () => {
    const { ledger, notices, holder, set } = await heldUnit("parts-round-stale");
    const r2 = await ledger.reserve(preq(null, part(), { ...set, round: 2 }));
    expect(r2).toMatchObject({ status: "waiting", position: 1 });
    // Rounds 0 and 1 arrive late (round 1 never reached this shard before round 2): no second row for the set.
    for (const round of [0, 1]) {
      const stale = await ledger.reserve(preq(null, part(), { ...set, round }));
      expect(stale).toMatchObject({ status: "ended", state: "released", code: "reservation_ended", reservationId: round ? `${set.executionId}:stage_1:1@1` : `${set.executionId}:stage_1:1` });
      expect(await ledger.status(id(stale))).toMatchObject({ state: "unknown" });
    }
    expect((await poolOf(ledger, "gpu"))).toMatchObject({ waiting: 1 });
    await ledger.settle(id(holder), {});
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(r2)]);
    await ledger.settle(id(r2), {});
    await expectWithinCapacity(ledger);
  });

  it("a later round gives back what its set's earlier round still holds here", async () => {
    const { ledger, set, r0 } = await grantedRound0("parts-round-held");
    // Round 0 was given up elsewhere; round 1 comes first: it takes the unit round 0 held.
    const r1 = await ledger.reserve(preq(null, part(), { ...set, round: 1 }));
    expect(r1.status).toBe("granted");
    expect(await ledger.status(id(r0))).toMatchObject({ state: "released" });
    await ledger.settle(id(r1), {});
    await expectWithinCapacity(ledger);
  });

  it("a part granted later is told with its shard; a whole stage's notice names none", async () => {
    const { ledger, notices } = await fresh("parts-notice");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const held = await ledger.reserve(req({ requirements: { gpu: 1 } }));
    const p = await ledger.reserve(preq(null, part({ shard: 3, shards: [1, 3] }), { requirements: { gpu: 1 }, round: 4 }));
    const w = await ledger.reserve(req({ requirements: { gpu: 1 } }));
    await ledger.settle(id(held), {});
    expect(notices.map((n) => n.notice)).toEqual([expect.objectContaining({ reservationId: id(p), shard: 3 })]);
    await ledger.settle(id(p), {});
    expect(notices[1].notice.reservationId).toBe(id(w));
    expect(notices[1].notice).not.toHaveProperty("shard");
  });

  it("on a shard that is not the client's, fair sharing uses the clientWeight the request carries", async () => {
    async function grantOrder(weightA: number | undefined): Promise<string[]> {
      const { ledger, notices } = await fresh(`parts-fair-${weightA ?? "none"}`);
      await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
      const holder = await ledger.reserve(req({ requirements: { gpu: 1 } }));
      const who = new Map<string, string>();
      for (const [client, weight] of [["beta", undefined], ["beta", undefined], ["alfa", weightA], ["alfa", weightA]] as const) {
        const r = await ledger.reserve(preq(client, part({ client: false }), { requirements: { gpu: 1 }, ...(weight ? { clientWeight: weight } : {}) }));
        who.set(id(r), client);
      }
      let last = id(holder);
      for (let i = 0; i < 4; i++) {
        await ledger.settle(last, {});
        last = notices[i].notice.reservationId;
      }
      await ledger.settle(last, {});
      return notices.map((n) => who.get(n.notice.reservationId)!);
    }
    // Weight 3 from the request: alfa's tags are 1/3 apart and both go before beta's second.
    expect(await grantOrder(3)).toEqual(["alfa", "alfa", "beta", "beta"]);
    // Without it, alfa is weighted 1 like beta: strict alternation by tag.
    expect(await grantOrder(undefined)).toEqual(["beta", "alfa", "beta", "alfa"]);
  });
});

/**
 * A test's own object standing for shard `i` of a 4-shard layout: judged under
 * LEDGER_SHARDS=4 as if named `ledger-{i}` (the real shard objects, which other
 * test files of a sharded project use, are not touched).
 */
const FOUR: RoutingVars = { LEDGER_SHARDS: "4" };
const layout = layoutOf(FOUR as unknown as Env);
async function shard(i: number, tag: string): Promise<{ ledger: LedgerStub; notices: Notices }> {
  const { ledger, notices } = await fresh(`parts-shard-${tag}`);
  await runInDurableObject(ledger, (instance: ResourceLedger) => ledgerTestHooks(instance).setRouting({ vars: FOUR, name: `ledger-${i}` }));
  return { ledger, notices };
}
/** A name `${prefix}-{n}` that the layout places on shard `on` (or, with `not`, anywhere but there). */
function nameOn(prefix: string, on: number, of: (n: string) => number, not = false): string {
  for (let n = 0; n < 10_000; n++) {
    const name = `${prefix}-${n}`;
    if ((of(name) === on) !== not) return name;
  }
  throw new Error("no such name");
}
const poolShard = (p: string) => shardOfPool(layout, p);
const clientShard = (c: string) => shardOfClient(layout, c);

describe("ownership: a shard refuses what the layout places elsewhere", () => {
  it("knows its own name and index; pools and snapshot carry the shard; a pool of another shard is refused wrong_shard", async () => {
    const { ledger } = await shard(1, "pools");
    const mine = nameOn("own-gpu", 1, poolShard);
    const theirs = nameOn("their-gpu", 2, poolShard);
    expect(await ledger.definePool(mine, { kind: "concurrency", capacity: 2 })).toMatchObject({ ok: true, pool: { name: mine, shard: 1 } });
    expect(await ledger.definePool(theirs, { kind: "concurrency", capacity: 2 })).toMatchObject({
      ok: false,
      code: "wrong_shard",
      message: expect.stringContaining("ledger-2"),
    });
    // putPool (scripts, tests) refuses it too, by a throw.
    expect(await failure(() => ledger.putPool(theirs, { kind: "concurrency", capacity: 2 }))).toMatch(/^invalid_request: putPool: wrong_shard:/);
    const snap = await ledger.snapshot();
    expect(snap).toMatchObject({ shard: 1, name: "ledger-1" });
    expect(snap.pools.find((p) => p.name === mine)).toMatchObject({ shard: 1, capacity: 2 });
    expect(snap.pools.find((p) => p.name === theirs)).toBeUndefined();

    // A reserve naming the other shard's pool: refused, nothing stored.
    const worker = nameOn("w", 1, (w) => poolShard(`worker:${w}`));
    const r = await ledger.reserve(preq(null, part({ shard: 1, shards: [1, 2] }), { worker, requirements: { [mine]: 1, [theirs]: 1 } }));
    expect(r).toMatchObject({ status: "refused", code: "wrong_shard", message: expect.stringContaining(`pool ${theirs} belongs to ledger-2`) });
    expect(await ledger.status(id(r))).toEqual({ state: "unknown" });
    // A part addressed to another shard, and a worker's part whose worker slot lives elsewhere, likewise.
    expect(await ledger.reserve(preq(null, part({ shard: 2, shards: [1, 2] }), { worker, requirements: { [mine]: 1 } }))).toMatchObject({
      status: "refused",
      code: "wrong_shard",
    });
    const elsewhere = nameOn("w", 1, (w) => poolShard(`worker:${w}`), true);
    expect(await ledger.reserve(preq(null, part({ shard: 1, shards: [1, 2], worker: true }), { worker: elsewhere, requirements: { [mine]: 1 } }))).toMatchObject({
      status: "refused",
      code: "wrong_shard",
      message: expect.stringContaining(`pool worker:${elsewhere} belongs to`),
    });
    // A whole stage (no part) whose worker slot lives elsewhere, likewise.
    expect(await ledger.reserve(req({ worker: elsewhere, requirements: { [mine]: 1 } }))).toMatchObject({ status: "refused", code: "wrong_shard" });
    // What it owns is granted, in a part and as a whole stage.
    expect(await ledger.reserve(preq(null, part({ shard: 1, shards: [1, 2], worker: true }), { worker, requirements: { [mine]: 1 } }))).toMatchObject({
      status: "granted",
      requirements: { [mine]: 1, [`worker:${worker}`]: 1 },
    });
    expect((await ledger.reserve(req({ worker, requirements: { [mine]: 1 } }))).status).toBe("granted");
  });

  it("the client's holds only on the client's shard: a client part, or a whole stage, of a client homed elsewhere is refused", async () => {
    const { ledger } = await shard(3, "clients");
    const pool = nameOn("own-slot", 3, poolShard);
    await ledger.putPool(pool, { kind: "concurrency", capacity: 10 });
    const home = nameOn("homed", 3, clientShard);
    const away = nameOn("away", 3, clientShard, true);
    const p = (client: boolean) => part({ shard: 3, shards: [0, 3], client });
    expect(await ledger.reserve(preq(away, p(true), { requirements: { [pool]: 1 } }))).toMatchObject({
      status: "refused",
      code: "wrong_shard",
      message: expect.stringContaining(`client ${away} belongs to ledger-${clientShard(away)}`),
    });
    const worker = nameOn("cw", 3, (w) => poolShard(`worker:${w}`));
    expect(await ledger.reserve({ ...req({ worker, requirements: { [pool]: 1 } }), clientId: away })).toMatchObject({ status: "refused", code: "wrong_shard" });
    expect((await ledger.reserve({ ...req({ worker, requirements: { [pool]: 1 } }), clientId: home })).status).toBe("granted");
    expect((await ledger.reserve(preq(away, p(false), { requirements: { [pool]: 1 } }))).status).toBe("granted");
    expect((await ledger.reserve(preq(home, p(true), { requirements: { [pool]: 1 } }))).status).toBe("granted");
    // The client list of a shard holds only the clients it is home to (away has a fair-queue lane here, nothing more).
    const listed = (await ledger.clients()).map((c) => c.client_id);
    expect(listed).toContain(home);
    expect(listed).not.toContain(away);
    // With more than one shard, a slot answer carries the client's weight for its parts elsewhere.
    await ledger.putClientQuotas(home, { weight: 4 });
    expect(await ledger.acquireSlot(home, req().executionId)).toEqual({ status: "granted", counted: false, weight: 4 });
    // And so does a start's admission, which then tells the Execution its slot is free.
    expect(await ledger.admitStart(home, "normal")).toEqual({ ok: true, slot: "free", weight: 4, steady: true });
  });

  it("estimate answers for the shard's own pools only; a part's grant notice names the shard", async () => {
    const { ledger, notices } = await shard(2, "estimate");
    const mine = nameOn("own-est", 2, poolShard);
    const worker = nameOn("ew", 2, (w) => poolShard(`worker:${w}`), true);
    await ledger.putPool(mine, { kind: "concurrency", capacity: 1 });
    const est = await ledger.estimate([{ worker, resources: { [mine]: 1, [nameOn("their-est", 2, poolShard, true)]: 5 } }], "normal");
    expect(est.stages[0].requirements).toEqual({ [mine]: 1 });
    const held = await ledger.reserve(preq(null, part({ shard: 2, shards: [2, 3] }), { worker, requirements: { [mine]: 1 } }));
    const w = await ledger.reserve(preq(null, part({ shard: 2, shards: [2, 3] }), { worker, requirements: { [mine]: 1 } }));
    expect(w.status).toBe("waiting");
    await ledger.settle(id(held), {});
    expect(notices.map((n) => n.notice)).toEqual([expect.objectContaining({ reservationId: id(w), shard: 2 })]);
    await ledger.settle(id(w), {});
  });

  it("a test's fresh ledger (its ctx.id.name is no shard name) checks nothing and reports shard 0, no name", async () => {
    const { ledger } = await fresh("parts-unsharded");
    await runInDurableObject(ledger, (instance: ResourceLedger) => ledgerTestHooks(instance).setRouting({ vars: FOUR }));
    const theirs = nameOn("any-gpu", 2, poolShard);
    expect(await ledger.definePool(theirs, { kind: "concurrency", capacity: 1 })).toMatchObject({ ok: true, pool: { shard: 0 } });
    expect((await ledger.reserve(preq(null, part({ shard: 2, shards: [2] }), { requirements: { [theirs]: 1 } }))).status).toBe("granted");
    const snap = await ledger.snapshot();
    expect(snap.shard).toBe(0);
    expect(snap).not.toHaveProperty("name");
  });

  it("the real shard 0 knows its name from ctx.id.name (global with one shard, ledger-0 with more)", async () => {
    const snap = await ledgerShard(env, 0).snapshot();
    expect(snap).toMatchObject({ shard: 0, name: shardName(layoutOf(env), 0) });
  });
});
