/**
 * ResourceLedger basics: grants, idempotency, refusals, pool kinds, resizing,
 * estimates and usage in unknown pools. Each test uses its own ledger object.
 */
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { ResourceLedger } from "../../actors/resource-ledger";
import { DEFAULT_TUNING } from "../../src/config";
import type { PoolSnapshot } from "../../schemas/ledger";
import { countingTransactions } from "../support/commits";
import { execId, expectWithinCapacity, failure, fresh, req, type LedgerStub } from "./ledger-support";

function granted<T extends { status: string }>(r: T): Extract<T, { status: "granted" }> {
  expect(r.status).toBe("granted");
  return r as Extract<T, { status: "granted" }>;
}
function waiting<T extends { status: string }>(r: T): Extract<T, { status: "waiting" }> {
  expect(r.status).toBe("waiting");
  return r as Extract<T, { status: "waiting" }>;
}

async function poolOf(ledger: LedgerStub, name: string): Promise<PoolSnapshot> {
  const snap = await ledger.snapshot();
  const p = snap.pools.find((x) => x.name === name);
  if (!p) throw new Error(`no pool ${name}`);
  return p;
}

describe("reserve", () => {
  it("grants what fits, always adding one slot of worker:{worker}", async () => {
    const { ledger, clock } = await fresh("grant");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    const r = granted(await ledger.reserve(req({ worker: "w1", requirements: { gpu: 2 }, leaseMs: 60_000 })));
    expect(r.requirements).toEqual({ gpu: 2, "worker:w1": 1 });
    expect(r.expiresAt).toBe(clock.now + 60_000);
    expect((await poolOf(ledger, "gpu")).in_use).toBe(2);
    expect((await poolOf(ledger, "worker:w1")).in_use).toBe(1);
    const s = await ledger.status(r.reservationId);
    expect(s).toEqual({ state: "granted", expiresAt: clock.now + 60_000, requirements: { gpu: 2, "worker:w1": 1 } });
    await expectWithinCapacity(ledger);
  });

  it("auto-creates a worker pool with defaultWorkerConcurrency slots and queues past it", async () => {
    const { ledger } = await fresh("auto-worker");
    const n = DEFAULT_TUNING.defaultWorkerConcurrency;
    for (let i = 0; i < n; i++) granted(await ledger.reserve(req({ worker: "auto" })));
    const p = await poolOf(ledger, "worker:auto");
    expect(p).toMatchObject({ kind: "concurrency", capacity: n, in_use: n, available: 0 });
    const w = waiting(await ledger.reserve(req({ worker: "auto" })));
    expect(w.position).toBe(1);
    expect(w.estimatedWaitMs).toBe(DEFAULT_TUNING.defaultStageDurationMs);
    await expectWithinCapacity(ledger);
  });

  it("keeps config pools seeded at first start", async () => {
    const { ledger } = await fresh("seeded");
    const names = (await ledger.snapshot()).pools.map((p) => p.name);
    expect(names).toEqual(expect.arrayContaining(["tokens:openai", "compute_ms"]));
  });

  it("is idempotent on (executionId, stageId, attempt)", async () => {
    const { ledger, clock } = await fresh("idem-reserve");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = req({ requirements: { gpu: 1 } });
    const first = granted(await ledger.reserve(a));
    clock.now += 1000;
    const again = granted(await ledger.reserve({ ...a, requirements: { gpu: 1 }, priority: "critical" }));
    expect(again).toEqual(first);
    expect((await poolOf(ledger, "gpu")).in_use).toBe(1);

    const b = req({ requirements: { gpu: 1 } });
    const w1 = waiting(await ledger.reserve(b));
    const w2 = waiting(await ledger.reserve(b));
    expect(w2.reservationId).toBe(w1.reservationId);
    expect(w2.position).toBe(1);
    expect((await ledger.snapshot()).waiters).toBe(1);
    // A new attempt is a new reservation.
    const b2 = waiting(await ledger.reserve({ ...b, attempt: 2 }));
    expect(b2.reservationId).not.toBe(w1.reservationId);
    expect(b2.position).toBe(2);
  });

  it("refuses an unknown pool at once, without queueing or storing it", async () => {
    const { ledger } = await fresh("unknown-pool");
    const r = await ledger.reserve(req({ requirements: { "no-such-pool": 1 } }));
    expect(r).toMatchObject({ status: "refused", code: "unknown_pool" });
    if (r.status !== "refused") return;
    expect(r.message).toContain("no-such-pool");
    expect((await ledger.snapshot()).waiters).toBe(0);
    expect(await ledger.status(r.reservationId)).toEqual({ state: "unknown" });
  });

  it("refuses what can never fit: more than a pool's capacity, or than a budget has left", async () => {
    const { ledger } = await fresh("unsatisfiable");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    await ledger.putPool("usd", { kind: "budget", capacity: 100 });
    const r = await ledger.reserve(req({ requirements: { gpu: 3 } }));
    expect(r).toMatchObject({ status: "refused", code: "resource_unsatisfiable" });
    expect((await ledger.snapshot()).waiters).toBe(0);

    const spend = granted(await ledger.reserve(req({ requirements: { usd: 80 } })));
    await ledger.settle(spend.reservationId, { usd: 80 });
    const over = await ledger.reserve(req({ requirements: { usd: 30 } }));
    expect(over).toMatchObject({ status: "refused", code: "resource_unsatisfiable" });
    granted(await ledger.reserve(req({ requirements: { usd: 20 } })));
    await expectWithinCapacity(ledger);
  });

  it("rejects malformed requests with invalid_request", async () => {
    const { ledger } = await fresh("invalid");
    // reserve answers a typed refusal (never a throw, which would read like a ledger that is down) and makes no reservation.
    const cases: [Parameters<typeof ledger.reserve>[0], RegExp][] = [
      [{ ...req(), executionId: "nope" }, /executionId/],
      [req({ requirements: { gpu: -1 } }), /requirements\.gpu/],
      [{ ...req(), leaseMs: 10 }, /leaseMs/],
      [{ ...req(), worker: "Bad Worker" }, /worker/],
    ];
    for (const [request, field] of cases) {
      const r = await ledger.reserve(request);
      expect(r).toMatchObject({ status: "invalid", code: "invalid_request" });
      expect(r.status === "invalid" && r.message).toMatch(field);
    }
    expect(await ledger.snapshot()).toMatchObject({ leases: 0, waiters: 0 });
    expect(await failure(() => ledger.settle("x", { gpu: Number.NaN }))).toMatch(/^invalid_request:/);
    expect(await failure(() => ledger.renew("x", 5))).toMatch(/^invalid_request:/);
    expect(await failure(() => ledger.putPool("r", { kind: "rate", capacity: 10 }))).toMatch(/^invalid_request:/);
    expect(await failure(() => ledger.estimate([{ worker: "w" }], "urgent" as never))).toMatch(/^invalid_request:/);
  });
});

describe("settle and release", () => {
  it("settle is idempotent: a second settle or a release changes nothing and answers ok with the final state", async () => {
    const { ledger } = await fresh("idem-settle");
    await ledger.putPool("tok", { kind: "rate", capacity: 100, refill_per_second: 1 });
    const r = granted(await ledger.reserve(req({ requirements: { tok: 40 } })));
    expect((await poolOf(ledger, "tok")).available).toBe(60);
    expect(await ledger.settle(r.reservationId, { tok: 10 })).toEqual({ ok: true, state: "settled", unknownPools: [] });
    const after = await ledger.snapshot();
    expect((await poolOf(ledger, "tok")).available).toBe(90);
    expect(await ledger.settle(r.reservationId, { tok: 10 })).toEqual({ ok: true, state: "settled", unknownPools: [] });
    expect(await ledger.release(r.reservationId)).toEqual({ ok: true, state: "settled" });
    expect(await ledger.snapshot()).toEqual(after);
  });

  it("release gives everything back once, also for a waiter, and is idempotent", async () => {
    const { ledger } = await fresh("idem-release");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = granted(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    const b = waiting(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    const c = waiting(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    expect(await ledger.release(b.reservationId)).toEqual({ ok: true, state: "released" });
    expect((await ledger.status(c.reservationId)).position).toBe(1);
    expect(await ledger.release(b.reservationId)).toEqual({ ok: true, state: "released" });
    expect(await ledger.release(a.reservationId)).toEqual({ ok: true, state: "released" });
    // c got a's slot; a second release of a does not free it again.
    expect((await ledger.status(c.reservationId)).state).toBe("granted");
    expect(await ledger.release(a.reservationId)).toEqual({ ok: true, state: "released" });
    expect(await ledger.settle(a.reservationId, {})).toEqual({ ok: true, state: "released", unknownPools: [] });
    expect((await poolOf(ledger, "gpu")).in_use).toBe(1);
    expect(await ledger.release("exec_1700000000000_nonexistent00:stage_1:1")).toEqual({ ok: false, state: "unknown" });
    await expectWithinCapacity(ledger);
  });

  it("a settle of a waiter is refused and changes nothing", async () => {
    const { ledger } = await fresh("settle-waiter");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    granted(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    const w = waiting(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    expect(await ledger.settle(w.reservationId, { gpu: 1 })).toEqual({ ok: false, state: "waiting", unknownPools: [] });
    expect((await ledger.snapshot()).waiters).toBe(1);
  });

  it("settleAndReserve settles first, so the reserve gets the slot the settle freed, in one call", async () => {
    const { ledger } = await fresh("settle-and-reserve");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = granted(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    // Without the settle the pool is full: the next stage would wait.
    const probe = waiting(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    expect(await ledger.release(probe.reservationId)).toEqual({ ok: true, state: "released" });

    const next = req({ executionId: a.reservationId.split(":")[0], stageId: "stage_2", requirements: { gpu: 1 } });
    const both = await ledger.settleAndReserve({ reservationId: a.reservationId, usage: { gpu: 1 }, durationMs: 5 }, next);
    expect(both.settled).toEqual({ ok: true, state: "settled", unknownPools: [] });
    const b = granted(both.reserved);
    expect((await ledger.status(a.reservationId)).state).toBe("settled");
    expect((await ledger.status(b.reservationId)).state).toBe("granted");
    expect((await poolOf(ledger, "gpu")).in_use).toBe(1);

    // Idempotent like its parts: the same call again changes nothing.
    const again = await ledger.settleAndReserve({ reservationId: a.reservationId, usage: { gpu: 1 }, durationMs: 5 }, next);
    expect(again.settled).toEqual({ ok: true, state: "settled", unknownPools: [] });
    expect(again.reserved).toEqual(both.reserved);
    expect((await poolOf(ledger, "gpu")).in_use).toBe(1);
    await expectWithinCapacity(ledger);
  });

  it("settleAndReserve writes the settle and the reserve in one commit (issue 17, target 4)", async () => {
    const { ledger } = await fresh("settle-and-reserve-one-commit");
    const a = granted(await ledger.reserve(req({ worker: "one" })));
    const next = req({ executionId: a.reservationId.split(":")[0], worker: "one", stageId: "stage_2" });
    // The real storage's transactionSync, counted: every group commit of the ledger is one of them.
    const commits = await runInDurableObject(ledger, (instance: ResourceLedger, state) =>
      countingTransactions(state.storage, async (n) => {
        const both = await instance.settleAndReserve({ reservationId: a.reservationId, usage: {}, durationMs: 5 }, next);
        expect(both.settled).toMatchObject({ ok: true, state: "settled" });
        granted(both.reserved);
        return n();
      }),
    );
    expect(commits).toBe(1);
    expect((await ledger.status(a.reservationId)).state).toBe("settled");
  });

  it("a settle with nobody waiting starts no commit: its writes go with the next call's, and it is answered with it (issue 17, target 4)", async () => {
    const { ledger } = await fresh("settle-rides-next-commit");
    const a = granted(await ledger.reserve(req({ worker: "lazy" })));
    const counted = await runInDurableObject(ledger, (instance: ResourceLedger, state) =>
      countingTransactions(state.storage, async (n) => {
        let settledFirst = false;
        const settle = instance.settle(a.reservationId, {}).then((r) => {
          settledFirst = true;
          return r;
        });
        // Another execution's reserve arrives: the settle's writes go in its commit.
        await scheduler.wait(1);
        const before = { settledFirst, commits: n() };
        const [settled, reserved] = await Promise.all([settle, instance.reserve(req({ worker: "lazy", stageId: "stage_9" }))]);
        expect(settled).toMatchObject({ ok: true, state: "settled" });
        granted(reserved);
        return { before, commits: n() };
      }),
    );
    // Without the change: the settle commits at once (1 before the reserve), and the reserve has a commit of its own (2).
    expect(counted).toEqual({ before: { settledFirst: false, commits: 0 }, commits: 1 });
    expect((await ledger.status(a.reservationId)).state).toBe("settled");
  });

  it("a settle alone is answered within ledgerSettleCommitMs, by a commit of its own", async () => {
    const { ledger } = await fresh("settle-alone");
    const a = granted(await ledger.reserve(req({ worker: "alone" })));
    expect(await ledger.settle(a.reservationId, { "worker:alone": 1 })).toMatchObject({ ok: true, state: "settled" });
    const stored = await runInDurableObject(ledger, (_i: ResourceLedger, state) =>
      state.storage.sql.exec("SELECT state FROM reservations WHERE id = ?", a.reservationId).toArray(),
    );
    expect(stored).toEqual([{ state: "settled" }]);
  });

  it("settleAndReserve still reserves when the settle is refused, and says so", async () => {
    const { ledger } = await fresh("settle-and-reserve-refused");
    const first = granted(await ledger.reserve(req({ worker: "sr" })));
    // A malformed settle (negative usage) is refused; the reserve beside it is still made.
    const both = await ledger.settleAndReserve({ reservationId: first.reservationId, usage: { "worker:sr": -1 } }, req({ worker: "sr", stageId: "stage_2" }));
    expect(both.settled).toBeNull();
    granted(both.reserved);
    expect((await ledger.status(first.reservationId)).state).toBe("granted");
    // A malformed reserve answers invalid_request, as reserve() does; the settle beside it is still made.
    const bad = await ledger.settleAndReserve({ reservationId: first.reservationId, usage: {} }, { ...req(), leaseMs: -1 });
    expect(bad).toMatchObject({ settled: { ok: true, state: "settled" }, reserved: { status: "invalid", code: "invalid_request" } });
  });

  it("records usage in a pool that does not exist and reports it", async () => {
    const { ledger } = await fresh("unknown-usage");
    const r = granted(await ledger.reserve(req({ worker: "u" })));
    const res = await ledger.settle(r.reservationId, { "tokens:mystery": 123, "worker:u": 1 });
    expect(res).toEqual({ ok: true, state: "settled", unknownPools: ["tokens:mystery"] });
    const rows = await runInDurableObject(ledger, (_i, state) => ({
      usage: state.storage.sql.exec<{ usage: string }>("SELECT usage FROM reservations WHERE id = ?", r.reservationId).one().usage,
      unknown: state.storage.sql.exec("SELECT pool, total, events FROM unknown_usage").toArray(),
    }));
    expect(JSON.parse(rows.usage)).toEqual({ "tokens:mystery": 123, "worker:u": 1 });
    expect(rows.unknown).toEqual([{ pool: "tokens:mystery", total: 123, events: 1 }]);
  });
});

describe("pool kinds", () => {
  it("rate: a grant takes tokens, settle refunds reserved minus used, excess usage empties the bucket but never below 0, refill is lazy and capped", async () => {
    const { ledger, clock } = await fresh("rate");
    await ledger.putPool("tok", { kind: "rate", capacity: 100, refill_per_second: 10 });
    const a = granted(await ledger.reserve(req({ requirements: { tok: 50 } })));
    const b = granted(await ledger.reserve(req({ requirements: { tok: 30 } })));
    expect(await poolOf(ledger, "tok")).toMatchObject({ available: 20, in_use: 80, refill_per_second: 10 });
    await ledger.settle(a.reservationId, { tok: 20 }); // refund 30
    expect((await poolOf(ledger, "tok")).available).toBe(50);
    await ledger.settle(b.reservationId, { tok: 130 }); // 100 over: takes the remaining 50, stops at 0
    expect((await poolOf(ledger, "tok")).available).toBe(0);
    clock.now += 2_000;
    expect((await poolOf(ledger, "tok")).available).toBe(20);
    clock.now += 60_000;
    expect((await poolOf(ledger, "tok")).available).toBe(100);
    await expectWithinCapacity(ledger);
  });

  it("budget: available = capacity - consumed - held; settle consumes actual usage; refill resets consumed", async () => {
    const { ledger } = await fresh("budget");
    await ledger.putPool("usd", { kind: "budget", capacity: 100 });
    const a = granted(await ledger.reserve(req({ requirements: { usd: 30 } })));
    expect(await poolOf(ledger, "usd")).toMatchObject({ in_use: 30, available: 70, consumed: 0 });
    await ledger.settle(a.reservationId, { usd: 12 });
    expect(await poolOf(ledger, "usd")).toMatchObject({ in_use: 0, available: 88, consumed: 12 });
    const b = granted(await ledger.reserve(req({ requirements: { usd: 50 } })));
    await ledger.release(b.reservationId);
    expect(await poolOf(ledger, "usd")).toMatchObject({ available: 88, consumed: 12 });
    const refilled = await ledger.putPool("usd", { kind: "budget", capacity: 100, refill: true });
    expect(refilled).toMatchObject({ consumed: 0, available: 100 });
  });

  it("concurrency: slots are held from grant to settle", async () => {
    const { ledger } = await fresh("concurrency");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    const a = granted(await ledger.reserve(req({ requirements: { gpu: 2 } })));
    await ledger.settle(a.reservationId, { gpu: 7 }); // usage of slots changes nothing
    expect(await poolOf(ledger, "gpu")).toMatchObject({ in_use: 0, available: 2 });
  });
});

describe("putPool", () => {
  it("shrinking below in-use keeps grants and only stops new ones; growing grants waiters that now fit", async () => {
    const { ledger } = await fresh("resize");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 3 });
    const held = [];
    for (let i = 0; i < 3; i++) held.push(granted(await ledger.reserve(req({ requirements: { gpu: 1 } }))));
    const shrunk = await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    expect(shrunk).toMatchObject({ capacity: 1, in_use: 3, available: 0 });
    for (const h of held) expect((await ledger.status(h.reservationId)).state).toBe("granted");
    const w = waiting(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    await ledger.settle(held[0].reservationId, {});
    await ledger.settle(held[1].reservationId, {});
    expect((await ledger.status(w.reservationId)).state).toBe("waiting"); // 1 in use = capacity 1
    const grown = await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    expect(grown).toMatchObject({ capacity: 2, in_use: 2, waiting: 0 });
    expect((await ledger.status(w.reservationId)).state).toBe("granted");
  });

  it("refuses to change a pool's kind", async () => {
    const { ledger } = await fresh("kind-change");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 3 });
    expect(await failure(() => ledger.putPool("gpu", { kind: "budget", capacity: 3 }))).toMatch(/^invalid_request:/);
  });

  it("growing a rate pool adds the difference to the bucket", async () => {
    const { ledger } = await fresh("rate-grow");
    await ledger.putPool("tok", { kind: "rate", capacity: 20, refill_per_second: 1 });
    granted(await ledger.reserve(req({ requirements: { tok: 20 } })));
    const w = waiting(await ledger.reserve(req({ requirements: { tok: 15 } })));
    expect(await ledger.putPool("tok", { kind: "rate", capacity: 30, refill_per_second: 1 })).toMatchObject({ available: 10 });
    expect((await ledger.status(w.reservationId)).state).toBe("waiting");
    expect(await ledger.putPool("tok", { kind: "rate", capacity: 40, refill_per_second: 1 })).toMatchObject({ available: 5 });
    expect((await ledger.status(w.reservationId)).state).toBe("granted");
  });
});

describe("estimates", () => {
  it("with no history reserves only the worker slot; then moving averages of settled usage per worker", async () => {
    const { ledger } = await fresh("estimates");
    await ledger.putPool("tok", { kind: "rate", capacity: 10_000, refill_per_second: 100 });
    const first = granted(await ledger.reserve(req({ worker: "est" })));
    expect(first.requirements).toEqual({ "worker:est": 1 });
    await ledger.settle(first.reservationId, { tok: 100 }, 2_000);
    const second = granted(await ledger.reserve(req({ worker: "est" })));
    expect(second.requirements).toEqual({ tok: 100, "worker:est": 1 });
    await ledger.settle(second.reservationId, { tok: 201 }, 4_000);
    const third = granted(await ledger.reserve(req({ worker: "est" })));
    expect(third.requirements).toEqual({ tok: 151, "worker:est": 1 }); // ceil(mean(100, 201))
    // Another worker's history does not count.
    expect(granted(await ledger.reserve(req({ worker: "other" }))).requirements).toEqual({ "worker:other": 1 });

    const tok = await poolOf(ledger, "tok");
    expect(tok.estimates).toEqual({ avg_usage_per_stage: 150.5, samples: 2 });

    const est = await ledger.estimate([{ worker: "est" }, { worker: "new", resources: { tok: 5 } }], "normal");
    expect(est.stages).toEqual([
      { requirements: { tok: 151, "worker:est": 1 }, durationMs: 3_000 },
      { requirements: { tok: 5, "worker:new": 1 }, durationMs: DEFAULT_TUNING.defaultStageDurationMs },
    ]);
    expect(est.queueAheadMs).toBe(0);
    expect(est.totalMs).toBe(3_000 + DEFAULT_TUNING.defaultStageDurationMs);
  });

  it("caps an estimate at the pool's capacity instead of refusing it", async () => {
    const { ledger, clock } = await fresh("estimate-cap");
    await ledger.putPool("tok", { kind: "rate", capacity: 1_000, refill_per_second: 100 });
    const a = granted(await ledger.reserve(req({ worker: "big" })));
    await ledger.settle(a.reservationId, { tok: 5_000 }); // unreserved usage empties the bucket
    clock.now += 10_000; // refilled
    expect(granted(await ledger.reserve(req({ worker: "big" }))).requirements).toEqual({ tok: 1_000, "worker:big": 1 });
  });

  it("queueAheadMs = ceil(waiters ahead for the worker at >= that priority / its slots) x its average duration", async () => {
    const { ledger } = await fresh("estimate-queue");
    await ledger.putPool("worker:q", { kind: "concurrency", capacity: 2 });
    for (let i = 0; i < 2; i++) granted(await ledger.reserve(req({ worker: "q" })));
    for (let i = 0; i < 3; i++) waiting(await ledger.reserve(req({ worker: "q", priority: "high" })));
    waiting(await ledger.reserve(req({ worker: "q", priority: "low" })));
    const d = DEFAULT_TUNING.defaultStageDurationMs;
    expect((await ledger.estimate([{ worker: "q" }], "normal")).queueAheadMs).toBe(2 * d); // 3 ahead / 2 slots
    expect((await ledger.estimate([{ worker: "q" }], "low")).queueAheadMs).toBe(2 * d); // 4 ahead / 2 slots
    expect((await ledger.estimate([{ worker: "q" }], "critical")).queueAheadMs).toBe(0);
    const e = await ledger.estimate([{ worker: "q" }, { worker: "q" }], "high");
    expect(e).toMatchObject({ queueAheadMs: 2 * d, totalMs: 4 * d });
  });
});

describe("grant notices", () => {
  it("a waiter granted later gets exactly one notice; a reserve granted at once gets none", async () => {
    const { ledger, notices } = await fresh("notice-once");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = granted(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    const w = waiting(await ledger.reserve(req({ stageId: "stage_7", attempt: 2, requirements: { gpu: 1 } })));
    expect(notices).toEqual([]);
    await ledger.settle(a.reservationId, {});
    expect(notices).toHaveLength(1);
    const s = await ledger.status(w.reservationId);
    expect(notices[0]).toEqual({
      executionId: w.reservationId.split(":")[0],
      notice: { reservationId: w.reservationId, requirements: { gpu: 1, "worker:w": 1 }, stageId: "stage_7", attempt: 2, expiresAt: s.expiresAt },
    });
    await ledger.settle(w.reservationId, {});
    expect(notices).toHaveLength(1);
  });

  it("a notice to an Execution that cannot take it does not disturb the ledger", async () => {
    const { ledger } = await fresh("notice-harmless", undefined, { realNotices: true });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = granted(await ledger.reserve(req({ requirements: { gpu: 1 } })));
    const w = waiting(await ledger.reserve(req({ executionId: execId("nobody"), requirements: { gpu: 1 } })));
    expect(await ledger.settle(a.reservationId, {})).toMatchObject({ ok: true, state: "settled" });
    expect((await ledger.status(w.reservationId)).state).toBe("granted");
    expect(await ledger.settle(w.reservationId, {})).toMatchObject({ ok: true, state: "settled" });
    await expectWithinCapacity(ledger);
  });
});
