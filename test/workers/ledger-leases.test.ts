/**
 * Leases and restarts: a grant that is never settled gives its capacity back
 * at expiresAt through the ledger's alarm; renew, settle and release around an
 * expiry; the alarm is idempotent; and evicting the object mid-run keeps every
 * grant, waiter, lease and queue position.
 */
import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { ReserveResult } from "../../schemas/ledger";
import { attach, expectWithinCapacity, fresh, req, id, type LedgerStub } from "./ledger-support";

const MIN = 60_000;

async function gpu(ledger: LedgerStub) {
  return (await ledger.snapshot()).pools.find((p) => p.name === "gpu")!;
}
async function scheduledAlarm(ledger: LedgerStub): Promise<number | null> {
  return runInDurableObject(ledger, (_i, state) => state.storage.getAlarm());
}

describe("leases", () => {
  it("a grant never settled returns its capacity at expiresAt through the alarm, and the waiter behind it is granted", async () => {
    const { ledger, clock } = await fresh("lease-expiry");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = await ledger.reserve(req({ requirements: { gpu: 1 }, leaseMs: 10 * MIN }));
    expect(a.status).toBe("granted");
    if (a.status !== "granted") return;
    const w = await ledger.reserve(req({ requirements: { gpu: 1 }, leaseMs: 10 * MIN }));
    expect(w.status).toBe("waiting");
    expect(await scheduledAlarm(ledger)).toBe(a.expiresAt);

    // An alarm run before the expiry changes nothing.
    clock.now += 9 * MIN;
    expect(await runDurableObjectAlarm(ledger)).toBe(true);
    expect((await ledger.status(id(a))).state).toBe("granted");
    expect((await ledger.snapshot()).leases).toBe(1);

    clock.now = a.expiresAt;
    expect(await runDurableObjectAlarm(ledger)).toBe(true);
    expect((await ledger.status(id(a))).state).toBe("expired");
    const ws = await ledger.status(id(w));
    expect(ws).toMatchObject({ state: "granted", expiresAt: a.expiresAt + 10 * MIN });
    expect(await gpu(ledger)).toMatchObject({ in_use: 1, waiting: 0 });
    expect(await scheduledAlarm(ledger)).toBe(ws.expiresAt);

    // Twice is harmless.
    const before = await ledger.snapshot();
    await runDurableObjectAlarm(ledger);
    expect(await ledger.snapshot()).toEqual(before);
    await expectWithinCapacity(ledger);
  });

  it("expiry is effective from expiresAt even before the alarm runs", async () => {
    const { ledger, clock } = await fresh("lease-lazy");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const a = await ledger.reserve(req({ requirements: { gpu: 1 }, leaseMs: 10 * MIN }));
    const w = await ledger.reserve(req({ requirements: { gpu: 1 } }));
    clock.now += 10 * MIN;
    expect(await ledger.status(id(a))).toMatchObject({ state: "expired" });
    expect((await ledger.status(id(w))).state).toBe("granted");
  });

  it("renew extends a live lease; renew and settle after expiry answer ok:false expired", async () => {
    const { ledger, clock } = await fresh("lease-renew");
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 1 });
    const t0 = clock.now;
    const a = await ledger.reserve(req({ requirements: { gpu: 1 }, leaseMs: 10 * MIN }));
    clock.now = t0 + 5 * MIN;
    expect(await ledger.renew(id(a), 10 * MIN)).toEqual({ ok: true, state: "granted", expiresAt: t0 + 15 * MIN });
    clock.now = t0 + 12 * MIN;
    await runDurableObjectAlarm(ledger);
    expect((await ledger.status(id(a))).state).toBe("granted");
    clock.now = t0 + 15 * MIN;
    await runDurableObjectAlarm(ledger);
    expect((await ledger.status(id(a))).state).toBe("expired");
    expect(await ledger.renew(id(a), 10 * MIN)).toEqual({ ok: false, state: "expired" });
    expect(await ledger.settle(id(a), {})).toEqual({ ok: false, state: "expired", unknownPools: [] });
    expect(await ledger.release(id(a))).toEqual({ ok: true, state: "expired" });
    expect(await gpu(ledger)).toMatchObject({ in_use: 0, available: 1 });
    // A reserve replay of an ended reservation is a typed "ended" answer, not a new grant.
    const replay = await ledger.reserve(req({ ...reqOf(a), requirements: { gpu: 1 } }));
    expect(replay).toMatchObject({ status: "ended", code: "reservation_ended", state: "expired", reservationId: id(a) });
    expect(await gpu(ledger)).toMatchObject({ in_use: 0, available: 1 });
  });

  it("a settle after expiry still records usage once: budget consumption, rate excess and estimates", async () => {
    const { ledger, clock } = await fresh("lease-late-settle");
    await ledger.putPool("usd", { kind: "budget", capacity: 1_000 });
    await ledger.putPool("tok", { kind: "rate", capacity: 1_000, refill_per_second: 1 });
    const a = await ledger.reserve(req({ worker: "late", requirements: { usd: 100, tok: 100 }, leaseMs: MIN }));
    clock.now += MIN;
    await runDurableObjectAlarm(ledger);
    let snap = await ledger.snapshot();
    // Expiry: the budget hold is dropped unconsumed; the rate tokens stay spent (900 + 60 s of refill).
    expect(snap.pools.find((p) => p.name === "usd")).toMatchObject({ in_use: 0, consumed: 0, available: 1_000 });
    expect(snap.pools.find((p) => p.name === "tok")!.available).toBe(960);

    expect(await ledger.settle(id(a), { usd: 40, tok: 150 })).toEqual({ ok: false, state: "expired", unknownPools: [] });
    snap = await ledger.snapshot();
    expect(snap.pools.find((p) => p.name === "usd")).toMatchObject({ consumed: 40, available: 960 });
    expect(snap.pools.find((p) => p.name === "tok")!.available).toBe(910); // only the 50 over the reservation
    expect(snap.pools.find((p) => p.name === "usd")!.estimates).toEqual({ avg_usage_per_stage: 40, samples: 1 });

    expect(await ledger.settle(id(a), { usd: 40, tok: 150 })).toEqual({ ok: false, state: "expired", unknownPools: [] });
    expect(await ledger.snapshot()).toEqual(snap);
  });
});

describe("restart", () => {
  it("evicting the ledger keeps grants, waiters, leases, queue order and backfill counts", async () => {
    const { ledger, clock, notices } = await fresh("restart", { backfillLimit: 1 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 3 });
    await ledger.putPool("tok", { kind: "rate", capacity: 100, refill_per_second: 1 });
    await ledger.putPool("usd", { kind: "budget", capacity: 500 });
    const t0 = clock.now;
    const g1 = await ledger.reserve(req({ worker: "a", requirements: { gpu: 2, tok: 30, usd: 50 }, leaseMs: 10 * MIN }));
    const g2 = await ledger.reserve(req({ worker: "b", requirements: { usd: 20 }, leaseMs: 20 * MIN }));
    const head = await ledger.reserve(req({ worker: "c", requirements: { gpu: 3 }, priority: "high" }));
    const pass = await ledger.reserve(req({ worker: "d", requirements: { gpu: 1 }, priority: "low" })); // passes the head once
    const low = await ledger.reserve(req({ worker: "e", requirements: { gpu: 1 }, priority: "low" }));
    const crit = await ledger.reserve(req({ worker: "f", requirements: { tok: 90 }, priority: "critical" }));
    expect([g1, g2, head, pass, low, crit].map((r) => r.status)).toEqual([
      "granted", "granted", "waiting", "granted", "waiting", "waiting",
    ]);
    const ids = [g1, g2, head, pass, low, crit].map(id);
    const statuses = await Promise.all(ids.map((x) => ledger.status(x)));
    const snap = await ledger.snapshot();
    const alarm = await scheduledAlarm(ledger);
    expect(alarm).not.toBeNull();

    await evictDurableObject(ledger);
    await attach(ledger, clock, { backfillLimit: 1 }, notices);

    expect(await ledger.snapshot()).toEqual(snap);
    expect(await Promise.all(ids.map((x) => ledger.status(x)))).toEqual(statuses);
    expect(await scheduledAlarm(ledger)).toBe(alarm);
    await expectWithinCapacity(ledger);

    // The head was passed once before the restart: the low one behind it stays queued.
    await ledger.settle(id(pass), {});
    expect((await ledger.status(id(low))).state).toBe("waiting");
    // The leases still expire through the alarm, and the head gets the slots.
    clock.now = t0 + 10 * MIN;
    await runDurableObjectAlarm(ledger);
    expect((await ledger.status(id(g1))).state).toBe("expired");
    expect((await ledger.status(id(head))).state).toBe("granted");
    expect((await ledger.status(id(low))).state).toBe("waiting");
    expect(notices.map((n) => n.notice.reservationId).sort()).toEqual([id(crit), id(head)].sort());
    await expectWithinCapacity(ledger);
  });
});

function reqOf(r: ReserveResult) {
  const [executionId, stageId, attempt] = id(r).split(":");
  return { executionId, stageId, attempt: Number(attempt) };
}
