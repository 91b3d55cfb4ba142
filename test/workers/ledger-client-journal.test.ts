/**
 * How the ledger persists its clients' changing state (actors/ledger/client-journal.ts):
 * spend, rate buckets and fair-queue tags travel with the reservation rows, the
 * `clients` table is a checkpoint. These tests run one script on two ledger
 * objects with the same clock, one of them evicted (restarted) between its
 * phases, and require everything each answers and stores to be the same: a
 * restart loses nothing and changes no decision.
 */
import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { readPersistedClients } from "../../actors/ledger/client-journal";
import type { LedgerRules } from "../../actors/ledger-rules";
import { sqlOf } from "../../actors/sql";
import type { ReserveRequest } from "../../schemas/ledger";
import { attach, expectWithinCapacity, fresh, id, req, type Clock, type LedgerStub, type Notices } from "./ledger-support";

/** tokens:openai costs 0.000002 per token (wrangler.toml PRICES): 1,000,000 tokens cost 2. */
const TOK = "tokens:openai";
const M = 1_000_000;

interface Run {
  ledger: LedgerStub;
  clock: Clock;
  notices: Notices;
  rules: Partial<LedgerRules>;
  /** What every call answered, in order. */
  seen: unknown[];
  settled: Set<string>;
}

async function start(name: string, rules: Partial<LedgerRules>, t0: number): Promise<Run> {
  const { ledger, clock, notices } = await fresh(name, rules);
  clock.now = t0;
  return { ledger, clock, notices, rules, seen: [], settled: new Set() };
}

async function restart(run: Run): Promise<void> {
  await evictDurableObject(run.ledger);
  await attach(run.ledger, run.clock, run.rules, run.notices);
}

/** The reserve request of step `n` of the script (the same ids on both objects). */
function step(n: number, clientId: string | null, over: Partial<ReserveRequest> = {}): ReserveRequest {
  const executionId = `exec_1700000000000_journal${String(n).padStart(6, "0")}`;
  return { ...req({ executionId, worker: "j", ...over }), ...(clientId ? { clientId } : {}) };
}

/** Settles the oldest notified grant not settled yet, up to `rounds` times (the grant order is part of what is compared). */
async function drain(run: Run, rounds: number, usage: Record<string, number>): Promise<void> {
  for (let i = 0; i < rounds; i++) {
    const next = run.notices.find((n) => !run.settled.has(n.notice.reservationId));
    if (!next) return;
    run.settled.add(next.notice.reservationId);
    run.seen.push(await run.ledger.settle(next.notice.reservationId, usage));
  }
}

/** Everything observable and stored that a restart could change. */
async function observe(run: Run) {
  const tables = await runInDurableObject(run.ledger, (_i, st) => {
    const sql = st.storage.sql;
    const rows = sql
      .exec("SELECT id, state, tag, eff_rank, parked, passed, granted_at, expires_at, usage, ended_at, cost_est FROM reservations ORDER BY id")
      .toArray();
    const persisted = readPersistedClients(sqlOf(st.storage));
    return { rows, clients: [...persisted.clients].map(([k, v]) => [k, { ...v, buckets: [...v.buckets] }]), virtualTime: persisted.virtualTime };
  });
  return {
    seen: run.seen,
    notices: run.notices.map((n) => n.notice.reservationId),
    snapshot: await run.ledger.snapshot(),
    clients: await run.ledger.clients(),
    tables,
  };
}

/**
 * Phase 1: two clients and requests without one contend for a 2-slot worker;
 * client a has a per-client rate, a budget and a start rate, b has weight 3;
 * it ends with b's waiter released (its tag past the virtual time). Phase 2,
 * the next month: only a and requests without a client. Phase 3: b again, and
 * a's bucket drained to the token.
 */
async function script(run: Run, between: (phase: number) => Promise<void>): Promise<void> {
  const { ledger, clock, seen } = run;
  const settle = async (r: unknown, usage: Record<string, number>) => seen.push(await ledger.settle(id(r as never), usage));
  // The global token pool never limits here: a's own bucket does.
  await ledger.putPool(TOK, { kind: "rate", capacity: 1e12, refill_per_second: 1e9 });
  await ledger.putPool("worker:j", { kind: "concurrency", capacity: 2 });
  await ledger.putClientQuotas("a", { rate: { [TOK]: { per_minute: 6 * M } }, monthly_budget: 20, max_starts_per_minute: 3 });
  await ledger.putClientQuotas("b", { weight: 3 });
  seen.push(await ledger.admitStart("a", "normal"));
  const a1 = await ledger.reserve(step(1, "a", { requirements: { [TOK]: 2 * M } }));
  seen.push(a1, await ledger.reserve(step(2, "a", { requirements: { [TOK]: 2 * M } })));
  const b3 = await ledger.reserve(step(3, "b", { requirements: {} }));
  seen.push(b3);
  for (let n = 4; n < 7; n++) seen.push(await ledger.reserve(step(n, "b", { requirements: {} })));
  for (let n = 7; n < 9; n++) seen.push(await ledger.reserve(step(n, null, { requirements: {} })));
  await settle(a1, { [TOK]: 3 * M }); // over its estimate: cost 6, and 1 M more out of a's bucket
  clock.now += 1_500;
  await settle(b3, { [TOK]: M / 4 });
  await drain(run, 4, { [TOK]: M / 4 });
  seen.push(await ledger.admitStart("a", "normal"));
  // A waiter of b that leaves without a grant: its tag stays b's last (past the virtual time).
  const late = await ledger.reserve(step(9, "b", { requirements: {} }));
  expect(late.status).toBe("waiting");
  seen.push(late, await ledger.release(id(late)));
  // Then one more stage of b, which spends: b's last change of phase 1.
  await drain(run, 1, {});
  const b16 = await ledger.reserve(step(16, "b", { requirements: {} }));
  seen.push(b16);
  await settle(b16, { [TOK]: M });
  await between(1);

  clock.now = Date.UTC(2027, 1, 1, 0, 0, 5); // a new month: a's spend starts again at 0
  seen.push(await ledger.admitStart("a", "normal"));
  await drain(run, 2, { [TOK]: M });
  const a10 = await ledger.reserve(step(10, "a", { requirements: { [TOK]: M } }));
  const n11 = await ledger.reserve(step(11, null, { requirements: {} }));
  seen.push(a10, n11);
  await settle(a10, { [TOK]: M / 2 });
  await settle(n11, {});
  seen.push(await ledger.client("a"));
  await between(2);

  for (const n of [12, 13]) {
    const b = await ledger.reserve(step(n, "b", { requirements: {} }));
    seen.push(b);
    await settle(b, { [TOK]: M / 4 });
  }
  // a's bucket, drained exactly: what it holds now is granted, two tokens more wait on client_rate.
  seen.push(await ledger.client("a"));
  const [tokens, at, capacity] = await runInDurableObject(ledger, (_i, st) => readPersistedClients(sqlOf(st.storage)).clients.get("a")!.buckets.get(TOK)!);
  const left = Math.floor(Math.min(capacity, tokens + ((clock.now - at) * capacity) / 60_000));
  seen.push(left);
  seen.push(await ledger.reserve(step(14, "a", { requirements: { [TOK]: left } })));
  seen.push(await ledger.reserve(step(15, "a", { requirements: { [TOK]: 2 } })));
  await runDurableObjectAlarm(ledger);
}

async function twins(name: string, rules: Partial<LedgerRules>, checks: (phase: number, run: Run) => Promise<void> = async () => {}) {
  const t0 = Date.UTC(2027, 0, 31, 23, 50);
  const plain = await start(`${name}-plain`, rules, t0);
  const restarted = await start(`${name}-restarted`, rules, t0);
  await script(plain, async () => {});
  await script(restarted, async (phase) => {
    await checks(phase, restarted);
    await expectWithinCapacity(restarted.ledger);
    await restart(restarted);
    await expectWithinCapacity(restarted.ledger);
  });
  await expectWithinCapacity(plain.ledger);
  await expectWithinCapacity(restarted.ledger);
  const a = await observe(plain);
  const b = await observe(restarted);
  expect(b).toEqual(a);
  return a;
}

/** Rows written after the checkpoint, per client, and whether the `clients` table alone is behind memory. */
async function pastCheckpoint(run: Run) {
  return runInDurableObject(run.ledger, (_i, st) => {
    const sql = st.storage.sql;
    const checkpoint = Number(sql.exec<{ value: string }>("SELECT value FROM meta WHERE key = 'client_checkpoint'").toArray()[0]?.value ?? 0);
    const rows = sql
      .exec<{ client: string; n: number }>("SELECT COALESCE(client_id, '') AS client, COUNT(*) AS n FROM reservations WHERE cseq > ? GROUP BY client", checkpoint)
      .toArray();
    return new Map(rows.map((r) => [r.client, r.n]));
  });
}

/** The spend in the client's `clients` row alone (the checkpoint). */
async function tableSpent(run: Run, client: string): Promise<number> {
  return runInDurableObject(run.ledger, (_i, st) =>
    st.storage.sql.exec<{ spent: number }>("SELECT spent FROM clients WHERE client_id = ?", client).one().spent,
  );
}

/** Client a with a budget, and three grants settled at half their estimate (spent 3). */
async function spendThree(ledger: LedgerStub): Promise<void> {
  await ledger.putClientQuotas("a", { monthly_budget: 100 });
  for (let i = 0; i < 3; i++) {
    const r = await ledger.reserve({ ...req({ requirements: { [TOK]: M } }), clientId: "a" });
    await ledger.settle(id(r), { [TOK]: M / 2 });
  }
}

describe("client state across a restart", () => {
  it("with no checkpoint since the quotas, the rows alone carry spend, buckets and fair tags: a restart changes nothing", async () => {
    const seen = await twins("journal-rows", {}, async (phase, run) => {
      if (phase !== 1) return;
      // Only the quotas were written to `clients`: spend, buckets and tags are in the reservation rows.
      const table = await runInDurableObject(run.ledger, (_i, st) =>
        st.storage.sql.exec<{ spent: number; last_tag: number }>("SELECT spent, last_tag FROM clients WHERE client_id = 'a'").one(),
      );
      expect(table).toEqual({ spent: 0, last_tag: 0 });
      expect((await run.ledger.client("a")).usage.spent).toBe(6.5);
    });
    // The script did what it is meant to: a spent over its estimate, rolled into a new month, and was held by its bucket.
    const docs = seen.seen.filter((x): x is { client_id: string; usage: { month: string; spent: number } } => (x as { client_id?: string })?.client_id === "a");
    expect(docs.map((d) => d.usage.month)).toEqual(["2027-02", "2027-02"]);
    expect(seen.seen.at(-1)).toMatchObject({ status: "waiting", waitingOn: { reason: "client_rate" } });
    expect(seen.seen.at(-2)).toMatchObject({ status: "granted" });
  });

  it("with a checkpoint every 3 rows, twice restarted: a client with rows past the checkpoint at a restart and none after it keeps its state", async () => {
    await twins("journal-checkpoints", { clientCheckpointRows: 3 }, async (phase, run) => {
      // At the first restart b's last change (a spend) is only in its rows past the checkpoint, not in `clients`...
      if (phase === 1) {
        expect((await pastCheckpoint(run)).get("b")).toBeGreaterThan(0);
        expect(await tableSpent(run, "b")).toBeLessThan((await run.ledger.client("b")).usage.spent);
      }
      // ...and phase 2 writes none of b's rows but checkpoints past them.
      if (phase === 2) expect((await pastCheckpoint(run)).get("b")).toBeUndefined();
    });
  });

  it("an object from before has its load-only indexes (cseq, granted rows) dropped at its next load, and the scans without them load the same state", async () => {
    const { ledger, clock } = await fresh("journal-no-index", { clientCheckpointRows: 1_000 });
    await spendThree(ledger);
    // A fourth waits (the pool's tokens are spent) and a fifth, needing nothing, holds a grant: a waiting and a live row.
    expect((await ledger.reserve({ ...req({ requirements: { [TOK]: M } }), clientId: "a" })).status).toBe("waiting");
    const live = await ledger.reserve({ ...req(), clientId: "a" });
    expect(live.status).toBe("granted");
    const before = await ledger.client("a");
    expect(before.usage).toMatchObject({ spent: 3, waiting_stages: 1, running_stages: 1 });
    const leasesBefore = (await ledger.snapshot()).leases;
    expect(leasesBefore).toBe(1);
    const indexes = () =>
      runInDurableObject(ledger, (_i, st) =>
        st.storage.sql.exec<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'reservations' ORDER BY name").toArray().map((r) => r.name),
      );
    expect(await indexes()).not.toContain("reservations_journal");
    expect(await indexes()).not.toContain("reservations_leases");
    // The object as the schema before left it: the same rows, and the indexes.
    await runInDurableObject(ledger, (_i, st) => {
      st.storage.sql.exec("CREATE INDEX reservations_journal ON reservations (cseq)");
      st.storage.sql.exec("CREATE INDEX reservations_leases ON reservations (expires_at) WHERE state = 'granted'");
    });
    expect(await indexes()).toEqual(expect.arrayContaining(["reservations_journal", "reservations_leases"]));
    await evictDurableObject(ledger);
    await attach(ledger, clock, { clientCheckpointRows: 1_000 });
    expect(await ledger.client("a")).toEqual(before);
    expect((await ledger.snapshot()).leases).toBe(1);
    const after = await indexes();
    expect(after).not.toContain("reservations_journal");
    expect(after).not.toContain("reservations_leases");
    // The lease loaded from the scan is live: its settle is taken.
    expect((await ledger.settle(id(live), {})).ok).toBe(true);
    // All five rows are past the checkpoint (none was written since the quotas): the spend came from the journal's scan.
    const persisted = await runInDurableObject(ledger, (_i, st) => readPersistedClients(sqlOf(st.storage)));
    expect(persisted.pastCheckpoint).toBe(5);
    expect(persisted.clients.get("a")?.spent).toBe(3);
    await expectWithinCapacity(ledger);
  });

  it("rows past the checkpoint are purged only with a checkpoint in the same transaction: the spend survives the purge and a restart", async () => {
    const { ledger, clock } = await fresh("journal-purge", { doneRetentionMs: 1_000 });
    await spendThree(ledger);
    expect((await ledger.client("a")).usage.spent).toBe(3);
    clock.now += 2_000;
    await runDurableObjectAlarm(ledger);
    const left = await runInDurableObject(ledger, (_i, st) =>
      st.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM reservations").one().n,
    );
    expect(left).toBe(0);
    await evictDurableObject(ledger);
    await attach(ledger, clock, { doneRetentionMs: 1_000 });
    expect((await ledger.client("a")).usage.spent).toBe(3);
    await expectWithinCapacity(ledger);
  });
});
