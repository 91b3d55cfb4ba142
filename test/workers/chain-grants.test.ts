import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ledgerTestHooks, type ResourceLedger } from "../../actors/resource-ledger";
import { ledgerShard } from "../../src/ledger-routing";
import { env } from "cloudflare:workers";
import type { StatusDocument } from "../../schemas/api";
import { JSON_HEADERS, OPS, call, ended, executionStub, expectNoLiveReservations, startExecution, waitFor } from "../support/api";
import { type LedgerStub, fresh, pool, readState, req } from "./ledger-support";

/**
 * Chain grants (docs/ledger.md, "Chain grants"): a stage asks for the stages
 * after it on the same worker with it; when nobody waits and all of it fits,
 * one reservation covers them all, handed from stage to stage, and settled
 * once; a waiter that does not fit cuts it, so its holder gives the units
 * back at the end of the stage it is running.
 */

const TOK = "tokens:openai";
const chain = [
  { stageId: "stage_2", requirements: { [TOK]: 20 } },
  { stageId: "stage_3", requirements: { [TOK]: 30 } },
];

/** The chain-cut notices the ledger sends, captured (the object runs in this isolate). */
async function captureCuts(ledger: LedgerStub): Promise<{ executionId: string; reservationId: string }[]> {
  const list: { executionId: string; reservationId: string }[] = [];
  await runInDurableObject(ledger, (instance: ResourceLedger) => {
    ledgerTestHooks(instance).setCutNotifier((executionId, reservationId) => list.push({ executionId, reservationId }));
  });
  return list;
}

async function workerStats(ledger: LedgerStub, worker: string) {
  return runInDurableObject(ledger, (_i, st) => st.storage.sql.exec<{ dur_avg: number; dur_n: number }>("SELECT dur_avg, dur_n FROM worker_stats WHERE worker = ?", worker).toArray()[0]);
}

describe("chain grants in the ledger", () => {
  it("grants a stage and the stages after it in one reservation when nobody waits and all of it fits, and learns each stage from its settle", async () => {
    const { ledger } = await fresh("chain-whole");
    await pool(ledger, TOK, { kind: "rate", capacity: 100, refill_per_second: 0.001 });
    await pool(ledger, "worker:w", { kind: "concurrency", capacity: 1 });
    const r = await ledger.reserve({ ...req({ requirements: { [TOK]: 10 } }), chain });
    expect(r).toMatchObject({ status: "granted", requirements: { [TOK]: 10, "worker:w": 1 }, chain: ["stage_2", "stage_3"] });
    // The one worker slot for the whole chain, the tokens of all three stages.
    const held = await readState(ledger);
    expect(held.held.get(TOK)).toBe(60);
    expect(held.held.get("worker:w")).toBe(1);
    expect(held.problems).toEqual([]);

    const id = (r as { reservationId: string }).reservationId;
    expect(await ledger.settle(id, { [TOK]: 45 }, 300, undefined, 3)).toMatchObject({ ok: true, state: "settled" });
    const after = await readState(ledger);
    expect(after.held.get(TOK) ?? 0).toBe(0);
    expect(after.granted).toBe(0);
    // 100 - 45 used (the 15 reserved and not used are back).
    expect(after.pools.get(TOK)!.tokens).toBeCloseTo(55, 0);
    expect(await workerStats(ledger, "w")).toEqual({ dur_avg: 100, dur_n: 3 });
  });

  it("grants the stage alone when its chain does not fit, and while anyone waits", async () => {
    const { ledger } = await fresh("chain-alone");
    await pool(ledger, TOK, { kind: "rate", capacity: 40, refill_per_second: 0.001 });
    await pool(ledger, "worker:w", { kind: "concurrency", capacity: 1 });
    await pool(ledger, "worker:v", { kind: "concurrency", capacity: 1 });
    const alone = await ledger.reserve({ ...req({ requirements: { [TOK]: 10 } }), chain });
    expect(alone.status).toBe("granted");
    expect("chain" in alone).toBe(false);
    expect((await readState(ledger)).held.get(TOK)).toBe(10);

    // worker:w is taken, so the next stage on w waits; a stage on v then fits, but is granted alone.
    const waiting = await ledger.reserve(req({ requirements: { [TOK]: 1 } }));
    expect(waiting.status).toBe("waiting");
    const other = await ledger.reserve({ ...req({ worker: "v", requirements: { [TOK]: 1 } }), chain: [{ stageId: "stage_2", requirements: { [TOK]: 1 } }] });
    expect(other.status).toBe("granted");
    expect("chain" in other).toBe(false);
  });

  it("a waiter cuts the chain grants holding a pool it does not fit in, not the others; renew and a replayed reserve say so", async () => {
    const { ledger, notices } = await fresh("chain-cut");
    const cuts = await captureCuts(ledger);
    await pool(ledger, TOK, { kind: "rate", capacity: 1e9, refill_per_second: 1e6 });
    await pool(ledger, "worker:w", { kind: "concurrency", capacity: 1 });
    await pool(ledger, "worker:v", { kind: "concurrency", capacity: 1 });
    const onW = req({ requirements: { [TOK]: 10 } });
    const a = await ledger.reserve({ ...onW, chain });
    const onV = req({ worker: "v", requirements: { [TOK]: 10 } });
    const b = await ledger.reserve({ ...onV, chain });
    expect([a.status, b.status, "chain" in a, "chain" in b]).toEqual(["granted", "granted", true, true]);
    const aId = (a as { reservationId: string }).reservationId;

    // A waiter on w: only the chain holding w is cut, and its execution is told.
    const waiter = await ledger.reserve(req({ requirements: { [TOK]: 1 } }));
    expect(waiter.status).toBe("waiting");
    expect(cuts).toEqual([{ executionId: onW.executionId, reservationId: aId }]);
    expect(await ledger.renew(aId, 60_000)).toMatchObject({ ok: true, chainCut: true });
    expect(await ledger.renew((b as { reservationId: string }).reservationId, 60_000)).not.toHaveProperty("chainCut");
    // A replay (an Execution that lost the answer) is told the stage's own needs and no chain to hand on.
    const replay = await ledger.reserve({ ...onW, chain });
    expect(replay).toMatchObject({ status: "granted", reservationId: aId, requirements: { [TOK]: 10, "worker:w": 1 } });
    expect("chain" in replay).toBe(false);

    // The holder settles at the end of its running stage: every unit of the chain is back, the waiter is granted.
    expect(await ledger.settle(aId, { [TOK]: 8 }, 50)).toMatchObject({ ok: true, state: "settled" });
    expect(notices.map((n) => n.notice.reservationId)).toEqual([(waiter as { reservationId: string }).reservationId]);
    expect((await readState(ledger)).problems).toEqual([]);
  });
});

/** The ledger's row of a reservation (the one ledger object of this project). */
async function ledgerRow(id: string) {
  return runInDurableObject(ledgerShard(env, 0), (_i, st) =>
    st.storage.sql
      .exec<{ id: string; state: string; usage: string | null; chain: string | null; granted_at: number | null; ended_at: number | null }>(
        "SELECT id, state, usage, chain, granted_at, ended_at FROM reservations WHERE id = ?",
        id,
      )
      .toArray()[0],
  );
}

/** Each stage's reservation id, as the execution stores it. */
async function stageReservations(id: string): Promise<(string | null)[]> {
  return runInDurableObject(executionStub(id), (_i, st) =>
    st.storage.sql.exec<{ reservation_id: string | null }>("SELECT reservation_id FROM stages WHERE parent IS NULL ORDER BY ord").toArray().map((r) => r.reservation_id),
  );
}

/** Starts `course_creation` (three stages on one worker, nobody waiting) with these parameters. */
async function startCourse(parameters: Record<string, unknown>): Promise<string> {
  const { body } = await startExecution({ template_name: "course_creation", parameters: { topic: "chains", steps: 1, step_ms: 0, ...parameters }, client_id: "client_chain" });
  return body.execution_id as string;
}

/** What the stages reported, summed per pool. */
function usageOf(doc: StatusDocument, stages: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const s of doc.stages.filter((s) => stages.includes(s.stage_id))) for (const [k, v] of Object.entries(s.usage ?? {})) out[k] = (out[k] ?? 0) + v;
  return out;
}

describe("chain grants through an execution", () => {
  it("a three-stage pipeline on one worker reserves once, hands the grant from stage to stage, and settles the usage of all three once", async () => {
    const id = await startCourse({});
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const ids = (await executionStub(id).reservationIds()).map((r) => r.reservation_id);
    expect(ids).toEqual([`${id}:stage_1:1`]);
    expect(await stageReservations(id)).toEqual([`${id}:stage_1:1`, `${id}:stage_1:1`, `${id}:stage_1:1`]);
    await expectNoLiveReservations(id);
    const row = await ledgerRow(`${id}:stage_1:1`);
    expect(row.state).toBe("settled");
    expect(JSON.parse(row.chain!)).toMatchObject({ stages: ["stage_2", "stage_3"], cut: false });
    expect(JSON.parse(row.usage!)).toEqual(usageOf(doc, ["stage_1", "stage_2", "stage_3"]));
  });

  it("a stage that fails under the grant settles the chain's usage so far, and its retry asks for a chain of its own", async () => {
    const id = await startCourse({ fault: { stage: 2, mode: "fail_retryable_once" } });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect((await executionStub(id).reservationIds()).map((r) => r.reservation_id)).toEqual([`${id}:stage_1:1`, `${id}:stage_2:2`]);
    await expectNoLiveReservations(id);
    const first = await ledgerRow(`${id}:stage_1:1`);
    const second = await ledgerRow(`${id}:stage_2:2`);
    expect([first.state, second.state]).toEqual(["settled", "settled"]);
    expect(JSON.parse(second.chain!)).toMatchObject({ stages: ["stage_3"] });
    // Stage 1's usage (and what the failed attempt reported) on the first; the retry's and stage 3's on the second.
    const total = usageOf(doc, ["stage_1", "stage_2", "stage_3"]);
    const settled: Record<string, number> = {};
    for (const u of [JSON.parse(first.usage!), JSON.parse(second.usage!)] as Record<string, number>[]) for (const [k, v] of Object.entries(u)) settled[k] = (settled[k] ?? 0) + v;
    expect(settled).toEqual(total);
    expect(JSON.parse(first.usage!)[TOK]).toBeGreaterThanOrEqual(usageOf(doc, ["stage_1"])[TOK]);
  });

  it("cancelled while a later stage runs under the grant: the usage of the stages that ended is settled, nothing stays held", async () => {
    const id = await startCourse({ fault: { stage: 2, mode: "hang" } });
    await waitFor(id, (d) => d.stages[1]?.status === "processing");
    expect((await stageReservations(id))[1]).toBe(`${id}:stage_1:1`);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("cancelled");
    await expectNoLiveReservations(id);
    const row = await ledgerRow(`${id}:stage_1:1`);
    // Settled, not released: the client is charged for stage 1.
    expect(row.state).toBe("settled");
    expect(JSON.parse(row.usage!)).toEqual(usageOf(doc, ["stage_1"]));
  });

  it("a waiter's cut ends the chain at the running stage's end: the waiter is granted before the holder's next stage", async () => {
    const worker = "worker:bitware-capped-granulator";
    const put = await call(`/resources/pools/${encodeURIComponent(worker)}`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }) });
    expect(put.status).toBe(200);
    // The holder's stages take about 2 s each, so the waiter queues while the holder's stage 1 runs.
    const holder = (await startExecution({ template_name: "capped_pipeline", parameters: { steps: 2, step_ms: 1000 }, client_id: "client_chain" })).body.execution_id as string;
    const first = await waitFor(holder, (d) => d.stages[0]?.status === "processing");
    expect(first.stages[1].status).toBe("pending");
    const waiter = (await startExecution({ template_name: "capped_pipeline", parameters: { steps: 1, step_ms: 0 }, client_id: "client_chain" })).body.execution_id as string;
    const queued = await waitFor(waiter, (d) => d.stages[0]?.status === "waiting_resources" && d.stages[0].attempts === 1);
    expect(queued.stages[0].status).toBe("waiting_resources");
    expect((await waitFor(holder, () => true)).stages[0].status).toBe("processing");

    const [h, w] = await Promise.all([waitFor(holder, ended, 60_000), waitFor(waiter, ended, 60_000)]);
    expect([h.status, w.status]).toEqual(["completed", "completed"]);
    const cut = await ledgerRow(`${holder}:stage_1:1`);
    expect(JSON.parse(cut.chain!)).toMatchObject({ stages: ["stage_2", "stage_3"], cut: true });
    // The holder settled after its stage 1 and asked again for stage 2, behind the waiter.
    const waiterGrant = await ledgerRow(`${waiter}:stage_1:1`);
    const holderNext = await ledgerRow(`${holder}:stage_2:1`);
    expect(holderNext.state).toBe("settled");
    expect(waiterGrant.granted_at!).toBeLessThan(holderNext.granted_at!);
    expect(cut.ended_at!).toBeLessThanOrEqual(waiterGrant.granted_at!);
    await expectNoLiveReservations(holder);
    await expectNoLiveReservations(waiter);
  });
});
