/**
 * The ledger's queue: priority order, FIFO within a priority, ageing (a low
 * request is not starved by a steady stream of higher ones), bounded
 * backfilling past a head that does not fit, parking of waiters that can never
 * fit, and rate-pool refills granting waiters through the alarm.
 */
import { runDurableObjectAlarm } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { DEFAULT_LEDGER_RULES } from "../../actors/ledger-rules";
import { expectWithinCapacity, fresh, req, id, type LedgerStub } from "./ledger-support";

async function state(ledger: LedgerStub, rid: string) {
  return (await ledger.status(rid)).state;
}

describe("priority", () => {
  it("a critical request queued behind low ones is granted first; FIFO within a priority", async () => {
    const { ledger, notices } = await fresh("prio");
    await ledger.putPool("worker:p", { kind: "concurrency", capacity: 1 });
    const holder = await ledger.reserve(req({ worker: "p" }));
    expect(holder.status).toBe("granted");
    const lows = [];
    for (let i = 0; i < 3; i++) lows.push(await ledger.reserve(req({ worker: "p", priority: "low" })));
    const crit = await ledger.reserve(req({ worker: "p", priority: "critical" }));
    expect(crit).toMatchObject({ status: "waiting", position: 1 });
    expect(await ledger.status(id(lows[0]))).toMatchObject({ state: "waiting", position: 2 });

    await ledger.settle(id(holder), {});
    expect(await state(ledger, id(crit))).toBe("granted");
    expect(notices.map((n) => n.notice.reservationId)).toEqual([id(crit)]);
    for (const l of lows) expect(await state(ledger, id(l))).toBe("waiting");

    await ledger.settle(id(crit), {});
    expect(await state(ledger, id(lows[0]))).toBe("granted");
    expect(await state(ledger, id(lows[1]))).toBe("waiting");
    await ledger.release(id(lows[0]));
    expect(await state(ledger, id(lows[1]))).toBe("granted");
    expect(await state(ledger, id(lows[2]))).toBe("waiting");
  });
});

describe("ageing", () => {
  /**
   * One slot; a low request waits while, every `stepMs`, a high request
   * arrives and the running stage finishes. Returns when (ms after the low
   * arrived) the low was granted, or null if never within `horizonMs`.
   */
  async function lowUnderHighStream(name: string, agingMs: number, horizonMs: number): Promise<number | null> {
    const { ledger, clock } = await fresh(name, { agingMs });
    await ledger.putPool("worker:s", { kind: "concurrency", capacity: 1 });
    const stepMs = agingMs / 12;
    let running = id(await ledger.reserve(req({ worker: "s", priority: "high" })));
    const t0 = clock.now;
    const low = id(await ledger.reserve(req({ worker: "s", priority: "low" })));
    let queued: string[] = [];
    for (let t = stepMs; t <= horizonMs; t += stepMs) {
      clock.now = t0 + t;
      queued.push(id(await ledger.reserve(req({ worker: "s", priority: "high" }))));
      await ledger.settle(running, {});
      if ((await state(ledger, low)) === "granted") return t;
      const next = [];
      for (const q of queued) {
        if ((await state(ledger, q)) === "granted") running = q;
        else next.push(q);
      }
      queued = next;
      expect((await ledger.snapshot()).leases).toBe(1);
    }
    return null;
  }

  it("a low request is granted within 3 x agingMs under a steady stream of high ones", async () => {
    const agingMs = 6_000; // the default is DEFAULT_LEDGER_RULES.agingMs; a shorter one keeps the run short
    const grantedAfter = await lowUnderHighStream("ageing", agingMs, 4 * agingMs);
    expect(grantedAfter).not.toBeNull();
    // Rank low -> high takes 2 ageing steps; then it is ahead of every high that came after it.
    expect(grantedAfter!).toBeGreaterThanOrEqual(2 * agingMs);
    expect(grantedAfter!).toBeLessThanOrEqual(3 * agingMs);
  });

  it("without ageing the same stream starves the low request (control)", async () => {
    expect(await lowUnderHighStream("no-ageing", 1e12, 4 * 6_000)).toBeNull();
  });
});

describe("backfilling past a head that does not fit", () => {
  it(`smaller waiters pass the head at most backfillLimit (${DEFAULT_LEDGER_RULES.backfillLimit}) times; then freed capacity is kept for the head`, async () => {
    const { ledger } = await fresh("backfill");
    const K = DEFAULT_LEDGER_RULES.backfillLimit;
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 4 });
    const big = await ledger.reserve(req({ worker: "a", requirements: { gpu: 3 } }));
    const head = await ledger.reserve(req({ worker: "h", requirements: { gpu: 4 } }));
    expect(head).toMatchObject({ status: "waiting", position: 1 });
    // Each small one fits in the one free slot and passes the head.
    for (let i = 0; i < K; i++) {
      const s = await ledger.reserve(req({ worker: "s", requirements: { gpu: 1 } }));
      expect(s.status, `small #${i + 1}`).toBe("granted");
      await ledger.settle(id(s), {});
    }
    // The head has been passed K times: the next small one waits although a slot is free.
    const late = await ledger.reserve(req({ worker: "s", requirements: { gpu: 1 } }));
    expect(late.status).toBe("waiting");
    expect((await ledger.snapshot()).pools.find((p) => p.name === "gpu")).toMatchObject({ in_use: 3, available: 1 });
    // Capacity frees: the head is granted before the small one behind it.
    await ledger.settle(id(big), {});
    expect(await state(ledger, id(head))).toBe("granted");
    expect(await state(ledger, id(late))).toBe("waiting");
    await ledger.settle(id(head), {});
    expect(await state(ledger, id(late))).toBe("granted");
    await expectWithinCapacity(ledger);
  });

  it("a waiter that needs none of the head's pools is never held back by it", async () => {
    const { ledger } = await fresh("backfill-disjoint", { backfillLimit: 0 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    await ledger.putPool("cpu", { kind: "concurrency", capacity: 1 });
    await ledger.reserve(req({ worker: "a", requirements: { gpu: 1 } }));
    const head = await ledger.reserve(req({ worker: "h", requirements: { gpu: 2 } }));
    expect(head.status).toBe("waiting");
    const other = await ledger.reserve(req({ worker: "o", requirements: { cpu: 1 } }));
    expect(other.status).toBe("granted");
  });

  it("with backfillLimit 0 the order is strict: nothing that shares a pool passes the head", async () => {
    const { ledger } = await fresh("backfill-strict", { backfillLimit: 0 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 4 });
    const big = await ledger.reserve(req({ worker: "a", requirements: { gpu: 3 } }));
    const head = await ledger.reserve(req({ worker: "h", requirements: { gpu: 4 } }));
    const small = await ledger.reserve(req({ worker: "s", requirements: { gpu: 1 } }));
    expect([head.status, small.status]).toEqual(["waiting", "waiting"]);
    await ledger.settle(id(big), {});
    expect(await state(ledger, id(head))).toBe("granted");
    expect(await state(ledger, id(small))).toBe("waiting");
  });

  it("a waiter that can never fit after a shrink is parked and does not hold anyone back; a grow brings it back", async () => {
    const { ledger } = await fresh("parked", { backfillLimit: 0 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 4 });
    const a = await ledger.reserve(req({ worker: "a", requirements: { gpu: 4 } }));
    const head = await ledger.reserve(req({ worker: "h", requirements: { gpu: 4 } }));
    const small = await ledger.reserve(req({ worker: "s", requirements: { gpu: 1 } }));
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 2 });
    await ledger.settle(id(a), {});
    // The head (4 > capacity 2) is parked; the small one behind it is granted.
    expect(await state(ledger, id(small))).toBe("granted");
    expect(await ledger.status(id(head))).toMatchObject({ state: "waiting", position: 1 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 5 });
    expect(await state(ledger, id(head))).toBe("granted");
    await expectWithinCapacity(ledger);
  });
});

describe("rate-pool refill", () => {
  it("a waiter blocked only by an empty bucket is granted by the alarm once the refill covers it", async () => {
    const { ledger, clock } = await fresh("refill-wake");
    await ledger.putPool("tok", { kind: "rate", capacity: 100, refill_per_second: 10 });
    await ledger.reserve(req({ worker: "a", requirements: { tok: 100 } }));
    const w = await ledger.reserve(req({ worker: "b", requirements: { tok: 50 } }));
    expect(w.status).toBe("waiting");
    clock.now += 4_000; // 40 tokens: not yet
    await runDurableObjectAlarm(ledger);
    expect(await state(ledger, id(w))).toBe("waiting");
    clock.now += 1_100; // 51 tokens
    expect(await runDurableObjectAlarm(ledger)).toBe(true);
    expect(await state(ledger, id(w))).toBe("granted");
    await expectWithinCapacity(ledger);
  });
});
