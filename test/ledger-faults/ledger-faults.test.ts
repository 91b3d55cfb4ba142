import { env } from "cloudflare:workers";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { LedgerSnapshot } from "../../schemas/ledger";
import { fromDataPoint } from "../../src/metrics";
import { layoutOf, shardName, shardOfPool } from "../../src/ledger-routing";
import { JSON_HEADERS, KAM, OPS, call, ended, expectNoLiveReservations, reservedSets, startExecution, status, until, waitFor } from "../support/api";

/**
 * The ledger made slow, unreachable, or losing its answers for real: in this
 * project the Execution reaches it through LEDGER_BINDING, which names a real
 * object in front of the ledger (test/support/faulty-ledger). Leases here are
 * 3 s, a waiting stage re-asks only every 20 s (it relies on the grant
 * notice), and a message is undeliverable after 2 s (vitest.config.ts).
 *
 * The same file runs with one ledger object (`ledger-faults`) and with 4
 * shards (`ledger-faults-shards`), every shard behind its own faulty object:
 * a fault is set on every shard (each shard applies its `times` to its own
 * calls), the calls are every shard's in time order, and "the ledger" is every
 * shard's tables (a pool's, its owner's).
 */
type Method = "reserve" | "renew" | "settle" | "settleAndReserve" | "release" | "status" | "estimate" | "snapshot" | "putPool" | "admitStart" | "acquireSlot" | "releaseSlot";
interface FaultyLedgerStub {
  setFault(methods: Method[] | "all", fault: { mode: "stall" | "down" | "lose_answer" | "corrupt"; stallMs?: number; times?: number }): Promise<void>;
  clearFaults(): Promise<void>;
  calls(method?: Method): Promise<{ method: Method; at: number; fault: string | null; names: string[] }[]>;
  resetCalls(): Promise<void>;
}
type Call = { method: Method; at: number; fault: string | null; names: string[] };
const layout = layoutOf(env);
const SHARD_NAMES = Array.from({ length: layout.count }, (_, i) => shardName(layout, i));
const faultyNamed = (name: string) => {
  const ns = (env as unknown as { FAULTY_LEDGER: DurableObjectNamespace }).FAULTY_LEDGER;
  return ns.get(ns.idFromName(name)) as unknown as FaultyLedgerStub;
};
/** The calls each shard's faulty object saw, by shard name. */
const callsByShard = async (method?: Method) => new Map(await Promise.all(SHARD_NAMES.map(async (n) => [n, await faultyNamed(n).calls(method)] as const)));
/** Every shard's faulty object at once. */
const gate = () => ({
  setFault: async (methods: Method[] | "all", fault: Parameters<FaultyLedgerStub["setFault"]>[1]) => {
    for (const n of SHARD_NAMES) await faultyNamed(n).setFault(methods, fault);
  },
  clearFaults: async () => {
    for (const n of SHARD_NAMES) await faultyNamed(n).clearFaults();
  },
  resetCalls: async () => {
    for (const n of SHARD_NAMES) await faultyNamed(n).resetCalls();
  },
  /** Every shard's calls, in time order. */
  calls: async (method?: Method): Promise<Call[]> => [...(await callsByShard(method)).values()].flat().sort((a, b) => a.at - b.at),
});
/** A real ledger object, past the faulty one. */
const realNamed = (name: string) => env.RESOURCE_LEDGER.get(env.RESOURCE_LEDGER.idFromName(name));
/** Leases and waiters summed over every shard's own tables. */
async function ledgerTotals(): Promise<{ leases: number; waiters: number }> {
  const snaps = await Promise.all(SHARD_NAMES.map((n) => realNamed(n).snapshot()));
  return { leases: snaps.reduce((a, s) => a + s.leases, 0), waiters: snaps.reduce((a, s) => a + s.waiters, 0) };
}
const quick = { steps: 2, step_ms: 5, echo: { hello: "world" } };
const CAPPED = "worker:bitware-capped-granulator";

/** What the orchestrator wrote to its Analytics Engine dataset (a real worker that keeps the points, vitest.config.ts). */
async function metricPoints(): Promise<Record<string, string | number>[]> {
  const res = await (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK.fetch("http://sink/");
  return ((await res.json()) as AnalyticsEngineDataPoint[]).map(fromDataPoint);
}

const capped = (name: string) =>
  realNamed(shardName(layout, shardOfPool(layout, name)))
    .snapshot()
    .then((s: LedgerSnapshot) => s.pools.find((p) => p.name === name));

async function capCapped(capacity: number) {
  const res = await call(`/resources/pools/${encodeURIComponent(CAPPED)}`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity }) });
  expect(res.status).toBe(200);
}

/** An execution whose one stage holds the capped worker's only slot until it is cancelled. */
async function holdTheSlot(): Promise<string> {
  const { body } = await startExecution({ template_name: "capped_pipeline", parameters: { ...quick, fault: { stage: 1, mode: "hang" } }, client_id: "client_lf" });
  await waitFor(body.execution_id, (d) => d.stages[0]?.status === "processing");
  return body.execution_id;
}

beforeEach(async () => {
  await gate().clearFaults();
  await gate().resetCalls();
});
afterEach(async () => {
  await gate().clearFaults();
});

describe("the ledger behind a faulty object", () => {
  it("runs an execution through the object when no fault is set", async () => {
    const { res, body } = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf" });
    expect(res.status).toBe(202);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    const calls = await gate().calls();
    expect(calls.some((c) => c.method === "reserve" || c.method === "settleAndReserve")).toBe(true);
    await expectNoLiveReservations(body.execution_id);
  });

  it("a client without max_running_executions: its execution asks no acquireSlot and sends no releaseSlot; with the quota it asks and releases by its id", async () => {
    const free = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf_free" });
    expect(free.res.status).toBe(202);
    expect((await waitFor(free.body.execution_id, ended)).status).toBe("completed");
    const quota = await call("/clients/client_lf_quota/quotas", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ max_running_executions: 3 }) });
    expect(quota.status).toBe(200);
    const counted = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf_quota" });
    expect((await waitFor(counted.body.execution_id, ended)).status).toBe("completed");
    const slotCalls = (id: string, calls: Call[]) => calls.filter((c) => (c.method === "acquireSlot" || c.method === "releaseSlot") && c.names.includes(id)).map((c) => c.method);
    // The release goes through the outbox after the end.
    const calls = await until("the counted slot's release", () => gate().calls(), (cs) => slotCalls(counted.body.execution_id, cs).includes("releaseSlot"));
    expect(slotCalls(counted.body.execution_id, calls)).toEqual(["acquireSlot", "releaseSlot"]);
    // The free one was admitted (one admitStart of its client) and asked for no slot nor gave one back, though it ended first.
    expect(calls.filter((c) => c.method === "admitStart" && c.names.includes("client_lf_free"))).toHaveLength(1);
    expect(slotCalls(free.body.execution_id, calls)).toEqual([]);
    await expectNoLiveReservations(free.body.execution_id);
  });

  it("ledger slow: a reserve that outlasts the call timeout is asked again after a short backoff, and no attempt is lost", async () => {
    // 3 s > ledgerCallTimeoutMs (2 s), once.
    await gate().setFault(["reserve"], { mode: "stall", stallMs: 3000, times: 1 });
    const { body } = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf" });
    const doc = await waitFor(body.execution_id, ended, 20_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0]).toMatchObject({ attempts: 1, last_error: null });
    const reserves = (await gate().calls("reserve")).filter((c) => c.at >= Date.parse(doc.created_at));
    expect(reserves[0].fault).toBe("stall");
    // Asked again once the 2 s call timeout passed, with a backoff of at most ledgerRetryBaseMs (500 ms), not at the
    // 20 s re-ask: the bound sits between the two (2.5 s plus room for a late alarm on a loaded machine, where files
    // run two at a time), not at the backoff's own end.
    expect(reserves.length).toBeGreaterThanOrEqual(2);
    expect(reserves[1].at - reserves[0].at).toBeLessThan(10_000);
    await expectNoLiveReservations(body.execution_id);
  });

  it("ledger down for longer than a lease: the stage fails lease_lost (retryable) and the retry completes", async () => {
    // A stage that works for about 4 s, longer than the 3 s lease.
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 8, step_ms: 500 }, client_id: "client_lf" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "processing");
    await gate().setFault("all", { mode: "down" });
    // Unreachable until the real ledger has let the lease lapse.
    await until("the lease lapsed", ledgerTotals, (s) => s.leases === 0, 15_000);
    await gate().clearFaults();
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(2);
    expect(doc.stages[0].last_error).toMatchObject({ code: "lease_lost", attempt: 1 });
    await expectNoLiveReservations(id);
  });

  it("a lost reserve answer burns no attempt: the grant notice for the current attempt is taken", async () => {
    await capCapped(1);
    const holder = await holdTheSlot();
    // The next reserve reaches the ledger (a waiter is queued) but its answer is lost.
    await gate().setFault(["reserve"], { mode: "lose_answer", times: 1 });
    const { body } = await startExecution({ template_name: "capped_pipeline", parameters: quick, client_id: "client_lf" });
    const id = body.execution_id as string;
    await until("the answer was lost", () => gate().calls("reserve"), (c) => c.some((x) => x.fault === "lose_answer"));
    await until("queued in the ledger", () => capped(CAPPED), (p) => (p?.waiting ?? 0) === 1);
    // The slot frees: the ledger grants the waiter and sends its notice, well before the 20 s re-ask.
    expect((await call(`/executions/${holder}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0]).toMatchObject({ attempts: 1, last_error: null });
    await expectNoLiveReservations(id);
    await expectNoLiveReservations(holder);
  });

  it("a cancel releases a waiter whose reserve answer was lost, so nobody stays queued", async () => {
    await capCapped(1);
    const holder = await holdTheSlot();
    await gate().setFault(["reserve"], { mode: "lose_answer", times: 1 });
    const { body } = await startExecution({ template_name: "capped_pipeline", parameters: quick, client_id: "client_lf" });
    const id = body.execution_id as string;
    await until("queued in the ledger", () => capped(CAPPED), (p) => (p?.waiting ?? 0) === 1);
    expect((await status(id)).stages[0]).toMatchObject({ status: "waiting_resources" });
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    // Released by the id derived from execution, stage and attempt.
    await until("the waiter left the queue", ledgerTotals, (s) => s.waiters === 0);
    expect((await call(`/executions/${holder}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    await expectNoLiveReservations(holder);
  });

  it("queue_timeout: a stage that waits longer than its queue_timeout_ms fails, and its place in the queue is given back", async () => {
    await capCapped(1);
    const holder = await holdTheSlot();
    // queue_bounded: one capped stage with queue_timeout_ms 1500.
    const { body } = await startExecution({ template_name: "queue_bounded", parameters: quick, client_id: "client_lf" });
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 15_000);
    expect(doc.status).toBe("failed");
    expect(doc.error).toMatchObject({ code: "queue_timeout", stage_id: "stage_1" });
    expect(doc.stages[0]).toMatchObject({ status: "failed", attempts: 1 });
    expect(doc.stages[0].waiting_ms).toBeGreaterThanOrEqual(1500);
    await until("the waiter left the queue", ledgerTotals, (s) => s.waiters === 0);
    expect((await call(`/executions/${holder}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    await expectNoLiveReservations(holder);
  });

  it("a settle the ledger cannot take is never dropped: marked undeliverable, listed for operators, and delivered on retry", async () => {
    await gate().setFault(["settle", "settleAndReserve"], { mode: "down" });
    const { body } = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf" });
    const id = body.execution_id as string;
    await waitFor(id, ended);
    // One settle per reservation part: each stage's set asked in full on the shards the routing module gives
    // what it needs (one with one shard; one per shard the set spans with 4), so parts is their sum.
    const sets = await reservedSets(id);
    expect(sets.map((s) => s.stage_id)).toEqual((await status(id)).stages.map((s) => s.stage_id));
    for (const s of sets) expect(s.shards, `${s.stage_id}: the shards of its parts`).toEqual(s.routed);
    const parts = sets.reduce((n, s) => n + s.routed.length, 0);
    // Past outboxUndeliverableMs (2 s) of failures: in the status document and in the operators' list.
    const doc = await waitFor(id, (d) => (d.undeliverable ?? []).length === parts, 15_000);
    expect(doc.status).toBe("completed");
    expect(doc.undeliverable![0]).toMatchObject({ kind: "ledger_settle", last_error: expect.stringContaining("ledger unreachable") });
    const listed = await until(
      "listed",
      async () => (await (await call("/resources/undeliverable", { headers: OPS })).json()) as { items: { execution_id: string; kind: string }[] },
      (l) => l.items.some((i) => i.execution_id === id),
    );
    expect(listed.items.find((i) => i.execution_id === id)).toMatchObject({ kind: "ledger_settle" });
    // Every settle so far was refused by the fault: none reached the ledger.
    expect((await gate().calls("settle")).every((c) => c.fault === "down")).toBe(true);

    await gate().clearFaults();
    const retry = await call("/resources/undeliverable/retry", { method: "POST", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ execution_id: id }) });
    expect(retry.status).toBe(200);
    expect(await retry.json()).toMatchObject({ executions: 1, retried: parts });
    await waitFor(id, (d) => (d.undeliverable ?? []).length === 0);
    await expectNoLiveReservations(id);
    // Delivered: a settle went through to the ledger once the fault was gone.
    expect((await gate().calls("settle")).some((c) => c.fault === null)).toBe(true);
    await until(
      "unlisted",
      async () => (await (await call("/resources/undeliverable", { headers: OPS })).json()) as { items: { execution_id: string }[] },
      (l) => !l.items.some((i) => i.execution_id === id),
    );
    // Each refused settle is one outbox_redelivery data point (the tests' Analytics Engine dataset), numbered by
    // attempt: each part's settle went to its own shard, so each shard's refusals are one message's attempts 1..n.
    const refusedByShard = [...(await callsByShard("settle")).values()].map((calls) => calls.filter((c) => c.fault === "down").length).filter((n) => n > 0);
    expect(refusedByShard.length).toBe(parts);
    const refused = refusedByShard.reduce((a, n) => a + n, 0);
    expect(Math.min(...refusedByShard)).toBeGreaterThan(1);
    const points = await until(
      "redelivery points",
      async () => (await metricPoints()).filter((p) => p.event === "outbox_redelivery" && p.execution_id === id),
      (p) => p.length >= refused,
    );
    const attempts = (n: number) => Array.from({ length: n }, (_, i) => i + 1);
    expect(points.map((p) => p.kind).every((k) => k === "ledger_settle")).toBe(true);
    expect(points.map((p) => Number(p.attempt)).sort((a, b) => a - b)).toEqual(refusedByShard.flatMap(attempts).sort((a, b) => a - b));
  });
});

describe("the handshaking deadline", () => {
  it("handshake_timeout: a worker that stalls on /api/handshake fails the attempt at the handshaking deadline, and the retry completes", async () => {
    // The first handshake answers after 10 s; handshakeTimeoutMs is 3 s, one worker call's timeout 6 s.
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { ...quick, fault: { stage: 1, mode: "stall_handshake" }, stall_ms: 10_000 }, client_id: "client_lf" });
    const doc = await waitFor(body.execution_id, ended, 30_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(2);
    expect(doc.stages[0].last_error).toMatchObject({ code: "handshake_timeout", attempt: 1 });
    await expectNoLiveReservations(body.execution_id);
  });
});

describe("a ledger answer that can never be satisfied", () => {
  it("invalid_request from the ledger is permanent: the attempt fails for good after one ask", async () => {
    await gate().setFault(["reserve"], { mode: "corrupt" });
    const { body } = await startExecution({ template_name: "quick_summary", parameters: quick, client_id: "client_lf" });
    const doc = await waitFor(body.execution_id, ended, 20_000);
    expect(doc.status).toBe("failed");
    expect(doc.stages[0]).toMatchObject({ attempts: 1, last_error: { code: "invalid_request" } });
    expect((await gate().calls("reserve")).length).toBe(1);
  });
});
