/**
 * Clients in the ledger: quotas enforced in the same decision as the pools
 * (running stages, per-client rate, monthly budget), starts (max_priority,
 * spent budget, starts per minute), defaults, fair sharing between clients by
 * weight, "why is it waiting", the budget race, and a restart mid-run.
 * Each test uses its own ledger object and a hand-driven clock.
 */
import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ledgerTestHooks, type ResourceLedger } from "../../actors/resource-ledger";
import { readPersistedClients } from "../../actors/ledger/client-journal";
import { sqlOf } from "../../actors/sql";
import type { ReserveRequest, ReserveResult } from "../../schemas/ledger";
import { attach, expectWithinCapacity, fresh, prng, req, id, type LedgerStub } from "./ledger-support";

/** tokens:openai is priced at 0.000002 per token (wrangler.toml PRICES): 1,000,000 tokens cost 2. */
const TOK = "tokens:openai";

function creq(clientId: string, over: Partial<ReserveRequest> = {}): ReserveRequest {
  return { ...req(over), clientId };
}
async function state(ledger: LedgerStub, rid: string) {
  return (await ledger.status(rid)).state;
}

describe("client quotas", () => {
  it("max_running_stages: beyond it a stage waits (client_quota) while other clients go on; a settle lets it go", async () => {
    const { ledger, notices } = await fresh("cq-stages");
    await ledger.putClientQuotas("acme", { max_running_stages: 2 });
    const a1 = await ledger.reserve(creq("acme"));
    const a2 = await ledger.reserve(creq("acme"));
    const a3 = await ledger.reserve(creq("acme"));
    expect([a1.status, a2.status]).toEqual(["granted", "granted"]);
    expect(a3).toMatchObject({ status: "waiting", waitingOn: { reason: "client_quota", pools: [], position: 1 } });
    // Another client, and a request with no client, are not held back by acme's quota.
    expect((await ledger.reserve(creq("globex"))).status).toBe("granted");
    expect((await ledger.reserve(req())).status).toBe("granted");
    const doc = await ledger.client("acme");
    expect(doc.usage).toMatchObject({ running_stages: 2, waiting_stages: 1, running_executions: 2 });
    const snap = await ledger.snapshot();
    expect(snap.queue).toEqual([expect.objectContaining({ reservation_id: id(a3), client_id: "acme", waiting_on: expect.objectContaining({ reason: "client_quota" }) })]);

    await ledger.settle(id(a1), {});
    expect(await state(ledger, id(a3))).toBe("granted");
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(a3)]);
    expect((await ledger.client("acme")).usage).toMatchObject({ running_stages: 2, waiting_stages: 0 });
    await expectWithinCapacity(ledger);
  });

  it("rate: a per-client bucket on top of the pool; the refill grants the waiter through the alarm", async () => {
    const { ledger, clock } = await fresh("cq-rate");
    await ledger.putPool("tok", { kind: "rate", capacity: 10_000, refill_per_second: 1000 });
    await ledger.putClientQuotas("acme", { rate: { tok: { per_minute: 60 } } });
    expect((await ledger.reserve(creq("acme", { requirements: { tok: 40 } }))).status).toBe("granted");
    const w = await ledger.reserve(creq("acme", { requirements: { tok: 40 } }));
    expect(w).toMatchObject({ status: "waiting", waitingOn: { reason: "client_rate", pools: ["tok"] } });
    // The pool itself has plenty: another client is granted at once.
    expect((await ledger.reserve(creq("globex", { requirements: { tok: 500 } }))).status).toBe("granted");
    // More than the client's bucket holds can never be granted: refused at once.
    expect(await ledger.reserve(creq("acme", { requirements: { tok: 61 } }))).toMatchObject({ status: "refused", code: "resource_unsatisfiable" });
    // 20 tokens left of 60, one per second: 20 s until 40 are there.
    clock.now += 19_000;
    await runDurableObjectAlarm(ledger);
    expect(await state(ledger, id(w))).toBe("waiting");
    clock.now += 2_000;
    await runDurableObjectAlarm(ledger);
    expect(await state(ledger, id(w))).toBe("granted");
  });

  it("monthly_budget: stages wait on what remains (estimate held), then fail budget_exhausted once nothing runs", async () => {
    // usageMaxFactor 1: running stages count at their estimates (budgetFits), so two of 2 fit in 5.
    const { ledger } = await fresh("cq-budget", { usageMaxFactor: 1 });
    await ledger.putClientQuotas("acme", { monthly_budget: 5 });
    const need = { requirements: { [TOK]: 1_000_000 } }; // estimated cost 2 each
    const a = await ledger.reserve(creq("acme", need));
    const b = await ledger.reserve(creq("acme", need));
    const c = await ledger.reserve(creq("acme", need));
    expect([a.status, b.status]).toEqual(["granted", "granted"]);
    expect(c).toMatchObject({ status: "waiting", waitingOn: { reason: "client_budget" } });
    expect((await ledger.client("acme")).usage).toMatchObject({ spent: 0, held: 4, remaining: 1 });

    await ledger.settle(id(a), { [TOK]: 1_500_000 }); // actual cost 3
    expect(await state(ledger, id(c))).toBe("waiting"); // 3 spent + 2 held + 2 > 5
    await ledger.settle(id(b), { [TOK]: 500_000 }); // actual cost 1: spent 4, nothing runs
    expect(await ledger.status(id(c))).toMatchObject({ state: "refused" });
    // The Execution's re-ask (a repeated reserve) learns it as a typed refusal.
    expect(await ledger.reserve(creq("acme", { ...reqOf(c), ...need }))).toMatchObject({ status: "refused", code: "budget_exhausted" });
    expect((await ledger.client("acme")).usage).toMatchObject({ spent: 4, held: 0, remaining: 1, running_stages: 0, waiting_stages: 0 });
    // A new stage that cannot fit with nothing running is refused at once; one that fits is granted.
    expect(await ledger.reserve(creq("acme", need))).toMatchObject({ status: "refused", code: "budget_exhausted" });
    expect((await ledger.reserve(creq("acme", { requirements: { [TOK]: 400_000 } }))).status).toBe("granted");
    await expectWithinCapacity(ledger);
  });

  it("a raised budget lets a waiting stage go at once", async () => {
    const { ledger, notices } = await fresh("cq-raise", { usageMaxFactor: 1 });
    await ledger.putClientQuotas("acme", { monthly_budget: 3 });
    const need = { requirements: { [TOK]: 1_000_000 } };
    expect((await ledger.reserve(creq("acme", need))).status).toBe("granted");
    const w = await ledger.reserve(creq("acme", need));
    expect(w.status).toBe("waiting");
    const doc = await ledger.putClientQuotas("acme", { monthly_budget: 10 });
    expect(doc.quotas.monthly_budget).toBe(10);
    expect(await state(ledger, id(w))).toBe("granted");
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(w)]);
  });

  it("starts: max_priority, a spent budget and max_starts_per_minute with the time to retry", async () => {
    const { ledger, clock } = await fresh("cq-starts");
    await ledger.putClientQuotas("acme", { max_priority: "normal", max_starts_per_minute: 2, monthly_budget: 1 });
    expect(await ledger.admitStart("acme", "high")).toMatchObject({ ok: false, code: "priority_not_allowed" });
    // A start rate and a budget: each answer may change with the next start, so none is steady (the front Worker asks every time).
    expect(await ledger.admitStart("acme", "normal")).toEqual({ ok: true, slot: "free", steady: false });
    expect(await ledger.admitStart("acme", "low")).toEqual({ ok: true, slot: "free", steady: false });
    const limited = await ledger.admitStart("acme", "normal");
    expect(limited).toMatchObject({ ok: false, code: "rate_limited", retryAfterMs: 30_000 });
    clock.now += 30_000;
    expect(await ledger.admitStart("acme", "normal")).toEqual({ ok: true, slot: "free", steady: false });
    // Spend the budget: then every start is refused.
    const r = await ledger.reserve(creq("acme", { requirements: { [TOK]: 400_000 } }));
    await ledger.settle(id(r), { [TOK]: 600_000 }); // cost 1.2 >= 1
    clock.now += 60_000;
    expect(await ledger.admitStart("acme", "normal")).toMatchObject({ ok: false, code: "budget_exhausted" });
  });

  it("an admitted start says whether its execution takes a counted slot: counted with max_running_executions (own or default), free without", async () => {
    const { ledger } = await fresh("cq-admit-slot");
    expect(await ledger.admitStart("plain", "normal")).toEqual({ ok: true, slot: "free", steady: true });
    await ledger.putClientQuotas("quota", { max_running_executions: 2 });
    expect(await ledger.admitStart("quota", "normal")).toEqual({ ok: true, slot: "counted", steady: true });
    // The quota removed: free again, as acquireSlot would answer `counted: false` now.
    await ledger.putClientQuotas("quota", {});
    expect(await ledger.admitStart("quota", "normal")).toEqual({ ok: true, slot: "free", steady: true });
    await runInDurableObject(ledger, (i: ResourceLedger) => ledgerTestHooks(i).setClientDefaults({ max_running_executions: 1 }));
    expect(await ledger.admitStart("plain", "normal")).toEqual({ ok: true, slot: "counted", steady: true });
    expect(await ledger.acquireSlot("plain", "exec_1764000000000_AAAAAAAAAAAAAAAA")).toEqual({ status: "granted", counted: true });
  });

  it("CLIENT_DEFAULTS apply to clients without their own; a client's own fields win", async () => {
    const { ledger } = await fresh("cq-defaults");
    await runInDurableObject(ledger, (i: ResourceLedger) => ledgerTestHooks(i).setClientDefaults({ max_running_stages: 1, weight: 2 }));
    expect((await ledger.reserve(creq("plain"))).status).toBe("granted");
    expect((await ledger.reserve(creq("plain"))).status).toBe("waiting");
    expect((await ledger.client("plain")).quotas).toEqual({ max_running_stages: 1, weight: 2 });
    const own = await ledger.putClientQuotas("vip", { max_running_stages: 3 });
    expect(own).toMatchObject({ quotas: { max_running_stages: 3, weight: 2 }, own_quotas: { max_running_stages: 3 } });
    for (let i = 0; i < 3; i++) expect((await ledger.reserve(creq("vip"))).status).toBe("granted");
    expect((await ledger.clients()).map((c) => c.client_id)).toEqual(["plain", "vip"]);
  });
});

/** Pools large enough that only the client's budget limits (worker:w is the stages' worker slot). */
async function roomy(ledger: LedgerStub) {
  await ledger.putPool(TOK, { kind: "rate", capacity: 1e12, refill_per_second: 1e9 });
  await ledger.putPool("worker:w", { kind: "concurrency", capacity: 1000 });
}

function reqOf(r: ReserveResult): Partial<ReserveRequest> {
  const [executionId, stageId, attempt] = id(r).split(":");
  return { executionId, stageId, attempt: Number(attempt) };
}

/**
 * The client's spend as a restart would load it (the `clients` checkpoint and the reservation rows past it), and
 * its settled stages' excess over their estimates, from the `reservations` table.
 */
async function budgetTables(ledger: LedgerStub, client: string) {
  return runInDurableObject(ledger, (_i, st) => {
    const sql = st.storage.sql;
    const spent = readPersistedClients(sqlOf(st.storage)).clients.get(client)!.spent;
    let recorded = 0;
    let sumExcess = 0;
    let maxExcess = 0;
    let settled = 0;
    for (const r of sql.exec<{ usage: string; cost_est: number }>("SELECT usage, cost_est FROM reservations WHERE client_id = ? AND state = 'settled'", client)) {
      const cost = Math.round((JSON.parse(r.usage)[TOK] ?? 0) * 0.000002 * 1e6) / 1e6;
      recorded += cost;
      sumExcess += Math.max(0, cost - r.cost_est);
      maxExcess = Math.max(maxExcess, cost - r.cost_est);
      settled++;
    }
    const left = sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM reservations WHERE client_id = ? AND state IN ('granted', 'waiting')", client).one().n;
    return { spent, recorded, sumExcess, maxExcess, settled, left };
  });
}

/** Settles every granted reservation at once (usage from `use`), round after round, until none is granted or waiting. */
async function settleAll(ledger: LedgerStub, use: (id: string) => number): Promise<number> {
  let widest = 0;
  for (let round = 0; round < 500; round++) {
    const open = await runInDurableObject(ledger, (_i, st) =>
      st.storage.sql.exec<{ id: string }>("SELECT id FROM reservations WHERE state = 'granted'").toArray(),
    );
    if (!open.length) return widest;
    widest = Math.max(widest, open.length);
    await Promise.all(open.map((r) => ledger.settle(r.id, { [TOK]: use(r.id) })));
  }
  throw new Error("stages still granted after 500 rounds");
}

describe("budget race", () => {
  it("200 stages of one client settling at once never overspend by more than one stage's excess over its estimate (from the ledger's tables)", async () => {
    // The default usageMaxFactor (10): a stage may use up to 10x what it reserved.
    const { ledger } = await fresh("cq-race");
    const rnd = prng(14);
    const budget = 150;
    await roomy(ledger);
    await ledger.putClientQuotas("acme", { monthly_budget: budget });
    // Each stage is estimated at 1 (500,000 tokens); actual usage 0 .. 10x the estimate, a third of them at the full 10x.
    const reserved = await Promise.all(
      Array.from({ length: 200 }, () => ledger.reserve(creq("acme", { requirements: { [TOK]: 500_000 } }))),
    );
    // spent + 10 x (held + 1) - 9 x 1 <= 150: 15 at once, not 150.
    expect(reserved.filter((r) => r.status === "granted").length).toBe(15);
    const widest = await settleAll(ledger, () => (rnd() < 1 / 3 ? 5_000_000 : Math.round(rnd() * 5_000_000)));
    const t = await budgetTables(ledger, "acme");
    expect(t.left).toBe(0);
    expect(t.spent).toBeCloseTo(t.recorded, 6);
    expect(widest).toBeGreaterThan(1);
    // The guarantee: past the budget by at most one stage's actual excess...
    expect(t.spent).toBeLessThanOrEqual(budget + t.maxExcess + 1e-6);
    // ...which is less than the weaker bound of every settled stage's excess together, here by far.
    expect(t.sumExcess).toBeGreaterThan(5 * t.maxExcess);
    await expectWithinCapacity(ledger);
  });

  it("with usageMaxFactor 1 (usage never above what was reserved), concurrent settles never spend past the budget at all", async () => {
    const { ledger } = await fresh("cq-race-exact", { usageMaxFactor: 1 });
    await roomy(ledger);
    await ledger.putClientQuotas("acme", { monthly_budget: 50 });
    const reserved = await Promise.all(Array.from({ length: 200 }, () => ledger.reserve(creq("acme", { requirements: { [TOK]: 500_000 } }))));
    // spent + held + 1 <= 50: every stage counts at its estimate.
    expect(reserved.filter((r) => r.status === "granted").length).toBe(50);
    await settleAll(ledger, () => 500_000);
    const t = await budgetTables(ledger, "acme");
    expect(t.spent).toBeCloseTo(50, 6);
    expect(t.settled).toBe(50);
  });
});

describe("fair sharing", () => {
  it("a client arriving behind another's 40 waiters gets its first grant after at most one of theirs", async () => {
    const { ledger, notices } = await fresh("fair-bound");
    await ledger.putPool("worker:f", { kind: "concurrency", capacity: 1 });
    let running = id(await ledger.reserve(creq("a", { worker: "f" })));
    for (let i = 0; i < 40; i++) await ledger.reserve(creq("a", { worker: "f" }));
    // Two of a's run before b arrives.
    for (let i = 0; i < 2; i++) {
      await ledger.settle(running, {});
      running = notices[notices.length - 1].notice.reservationId;
    }
    const b = [id(await ledger.reserve(creq("b", { worker: "f" }))), id(await ledger.reserve(creq("b", { worker: "f" })))];
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      await ledger.settle(running, {});
      running = notices[notices.length - 1].notice.reservationId;
      order.push(b.includes(running) ? "b" : "a");
    }
    // One other waiting client: at most one grant of a before b's first.
    expect(order.indexOf("b")).toBeLessThanOrEqual(1);
    expect(order.filter((x) => x === "b").length).toBe(2);
    expect(order).toEqual(["a", "b", "a", "b", "a", "a"]);
  });

  it("weights 3:1 give 3:1 grants over a long run, FIFO within each client", async () => {
    const { ledger, notices } = await fresh("fair-weights");
    await ledger.putPool("worker:g", { kind: "concurrency", capacity: 1 });
    await ledger.putClientQuotas("heavy", { weight: 3 });
    await ledger.putClientQuotas("light", { weight: 1 });
    let running = id(await ledger.reserve(creq("heavy", { worker: "g" })));
    const mine = new Map<string, string[]>([["heavy", []], ["light", []]]);
    for (let i = 0; i < 150; i++) {
      for (const c of ["heavy", "light"]) mine.get(c)!.push(id(await ledger.reserve(creq(c, { worker: "g" }))));
    }
    const granted: string[] = [];
    for (let i = 0; i < 120; i++) {
      await ledger.settle(running, {});
      running = notices[notices.length - 1].notice.reservationId;
      granted.push(running);
    }
    const heavy = granted.filter((g) => mine.get("heavy")!.includes(g));
    const light = granted.filter((g) => mine.get("light")!.includes(g));
    // 3:1 to within one grant of either client.
    expect(heavy.length).toBeGreaterThanOrEqual(89);
    expect(heavy.length).toBeLessThanOrEqual(91);
    expect(heavy.length + light.length).toBe(120);
    // FIFO within a client: each client's grants come in its arrival order.
    expect(heavy).toEqual(mine.get("heavy")!.slice(0, heavy.length));
    expect(light).toEqual(mine.get("light")!.slice(0, light.length));
  });

  it("priorities still come first across clients", async () => {
    const { ledger, notices } = await fresh("fair-prio");
    await ledger.putPool("worker:h", { kind: "concurrency", capacity: 1 });
    const run = id(await ledger.reserve(creq("a", { worker: "h" })));
    for (let i = 0; i < 5; i++) await ledger.reserve(creq("a", { worker: "h" }));
    const crit = id(await ledger.reserve(creq("b", { worker: "h", priority: "critical" })));
    await ledger.settle(run, {});
    expect(notices.map((n) => n.notice.reservationId)).toEqual([crit]);
  });
});

describe("restart", () => {
  it("an evicted ledger keeps quotas, usage and the fair-queue state, and carries on in the same order", async () => {
    const { ledger, clock, notices } = await fresh("cq-restart");
    await ledger.putPool("worker:r", { kind: "concurrency", capacity: 1 });
    await ledger.putClientQuotas("a", { weight: 2, max_running_stages: 5, monthly_budget: 100 });
    let running = id(await ledger.reserve(creq("a", { worker: "r", requirements: { [TOK]: 1_000_000 } })));
    // Explicit (empty) requirements: the worker's learnt token estimate must not make these wait on tokens.
    for (let i = 0; i < 6; i++) await ledger.reserve(creq("a", { worker: "r", requirements: {} }));
    await ledger.settle(running, { [TOK]: 2_000_000 });
    running = notices[notices.length - 1].notice.reservationId;
    for (let i = 0; i < 3; i++) await ledger.reserve(creq("b", { worker: "r", requirements: {} }));
    const before = { a: await ledger.client("a"), b: await ledger.client("b"), snap: await ledger.snapshot() };
    const fairBefore = await runInDurableObject(ledger, (_i, st) =>
      st.storage.sql.exec("SELECT id, tag FROM reservations WHERE state = 'waiting' ORDER BY id").toArray(),
    );

    await evictDurableObject(ledger);
    await attach(ledger, clock, undefined, notices);

    expect(await ledger.client("a")).toEqual(before.a);
    expect(await ledger.client("b")).toEqual(before.b);
    expect(await ledger.snapshot()).toEqual(before.snap);
    expect(before.a.usage).toMatchObject({ spent: 4, running_stages: 1, waiting_stages: 5 });
    expect(before.a.own_quotas).toEqual({ weight: 2, max_running_stages: 5, monthly_budget: 100 });
    const fairAfter = await runInDurableObject(ledger, (_i, st) =>
      st.storage.sql.exec("SELECT id, tag FROM reservations WHERE state = 'waiting' ORDER BY id").toArray(),
    );
    expect(fairAfter).toEqual(fairBefore);
    // New waiters after the restart are tagged from the persisted virtual time: the order goes on 2:1.
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      await ledger.settle(running, {});
      running = notices[notices.length - 1].notice.reservationId;
      order.push(before.snap.queue.find((q) => q.reservation_id === running)!.client_id!);
    }
    expect(order).toEqual(["a", "a", "b", "a", "a", "b"]);
    await expectWithinCapacity(ledger);
  });
});

describe("execution slots (max_running_executions)", () => {
  async function slotNotices(ledger: LedgerStub): Promise<string[]> {
    const seen: string[] = [];
    await runInDurableObject(ledger, (i: ResourceLedger) => ledgerTestHooks(i).setSlotNotifier((executionId) => seen.push(executionId)));
    return seen;
  }
  const ex = (n: number) => `exec_1700000000000_slots${String(n).padStart(8, "0")}`;

  it("a quota of 1: the second execution waits its turn, FIFO; a release hands the slot on with a notice; a cancelled waiter frees nothing it did not hold", async () => {
    const { ledger } = await fresh("slots-one");
    const seen = await slotNotices(ledger);
    await ledger.putClientQuotas("acme", { max_running_executions: 1 });
    expect(await ledger.acquireSlot("acme", ex(1))).toEqual({ status: "granted", counted: true });
    expect(await ledger.acquireSlot("acme", ex(2))).toMatchObject({ status: "waiting", waitingOn: { reason: "client_quota", pools: [], position: 1 } });
    expect(await ledger.acquireSlot("acme", ex(3))).toMatchObject({ status: "waiting", waitingOn: { position: 2 } });
    // Idempotent on the execution id: asking again keeps the place.
    expect(await ledger.acquireSlot("acme", ex(2))).toMatchObject({ status: "waiting", waitingOn: { position: 1 } });
    expect(await ledger.acquireSlot("acme", ex(1))).toEqual({ status: "granted", counted: true });
    // Another client is not held back.
    expect(await ledger.acquireSlot("globex", ex(9))).toEqual({ status: "granted", counted: false });
    expect((await ledger.client("acme")).usage.running_executions).toBe(1);

    // The third is cancelled while it waits: it gave back its place, no slot; the first still runs.
    expect(await ledger.releaseSlot(ex(3))).toEqual({ released: false });
    expect(seen).toEqual([]);
    expect((await ledger.client("acme")).usage.running_executions).toBe(1);
    // The first ends: the second gets the slot, and is told.
    expect(await ledger.releaseSlot(ex(1))).toEqual({ released: true });
    expect(seen).toEqual([ex(2)]);
    expect(await ledger.acquireSlot("acme", ex(2))).toEqual({ status: "granted", counted: true });
    // Releases are idempotent: again, nothing moves.
    expect(await ledger.releaseSlot(ex(1))).toEqual({ released: false });
    expect((await ledger.client("acme")).usage.running_executions).toBe(1);
  });

  it("a raised quota lets waiting executions go at once; slots survive a restart of the ledger", async () => {
    const { ledger, clock } = await fresh("slots-raise");
    const seen = await slotNotices(ledger);
    await ledger.putClientQuotas("acme", { max_running_executions: 1 });
    await ledger.acquireSlot("acme", ex(11));
    await ledger.acquireSlot("acme", ex(12));
    await ledger.acquireSlot("acme", ex(13));
    await evictDurableObject(ledger);
    await attach(ledger, clock);
    const again = await slotNotices(ledger);
    expect(await ledger.acquireSlot("acme", ex(13))).toMatchObject({ status: "waiting", waitingOn: { position: 2 } });
    await ledger.putClientQuotas("acme", { max_running_executions: 3 });
    expect([...seen, ...again]).toEqual([ex(12), ex(13)]);
    expect((await ledger.client("acme")).usage.running_executions).toBe(3);
    // Without the quota nothing is counted: nothing to release.
    await ledger.putClientQuotas("acme", {});
    expect(await ledger.acquireSlot("acme", ex(14))).toEqual({ status: "granted", counted: false });
  });
});
