/**
 * An Execution that dies while a ledger call of its alarm is out (found by the
 * property test, shard-property.test.ts): the timer that call was made for was
 * already taken, and the answer dies with the instance. Each call re-arms its
 * own timer first, so the restarted object asks again:
 * - a waiting reservation's re-ask: the lost answer may be the grant (its
 *   notice was lost too), and nothing else would wake the stage before its
 *   queue timeout;
 * - a lease renewal: nothing else renews the lease, which would lapse under a
 *   stage that is still running. That case is in
 *   test/ledger-faults-shards/crash-mid-renewal.test.ts, under that project's
 *   3 s lease (this project's is 20 s, and the stage must outlive a renewal).
 * One-shard stages (the pool, the worker's slot and the client all on shard 0),
 * the crash while shard 0's faulty object stalls that call.
 */
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ledgerTestHooks, type ResourceLedger } from "../../actors/resource-ledger";
import { executionStub, startExecution, status, until } from "../support/api";
import { WORKER, clientOn, crashDuringStalled, faulty, poolsOn, putPool, realShard, shardRows } from "./shard-support";

/** Shard 0's grant notices go nowhere while `fn` runs (as if each notice were lost). */
async function withoutNotices(fn: () => Promise<void>): Promise<void> {
  await runInDurableObject(realShard(0), (i: ResourceLedger) => ledgerTestHooks(i).setNotifier(() => {}));
  try {
    await fn();
  } finally {
    await runInDurableObject(realShard(0), (i: ResourceLedger) => ledgerTestHooks(i).setNotifier(null));
  }
}

describe("an Execution that crashes while a ledger call of its alarm is out", () => {
  // One-shard: the stage's one reservation waits. Two shards: its first part (shard 0) waits, holding nothing, so no part deadline either.
  it.each([
    ["a one-shard stage", 0],
    ["the first part of a two-shard stage", 1],
  ])("%s asks again for a waiting reservation whose re-ask answer (a grant, with its notice lost) died with it", async (_what, more) => {
    const [p] = poolsOn(0, 1, `cmw${more}`);
    const later = poolsOn(1, more, `cmw${more}`);
    const client = clientOn(0, "cmw");
    await putPool(`set:${p}`, 1);
    for (const q of later) await putPool(`set:${q}`, 1);
    await putPool(`worker:${WORKER}`, 16);
    // The test holds the pool, so the stage waits in shard 0's queue.
    const blocker = await realShard(0).reserve({ executionId: `exec_${Date.now()}_crashMidCallBlocker`, stageId: "stage_1", attempt: 1, priority: "normal", requirements: { [`set:${p}`]: 1 }, leaseMs: 60_000, worker: WORKER });
    // Narrowed by a throw, not a branch: the release below must run.
    if (blocker.status !== "granted") throw new Error(`the blocker was not granted: ${JSON.stringify(blocker)}`);
    // Its queue timeout (30 s) and the watchdog (30 s) are past the bound below.
    const { body } = await startExecution({ template_name: `needs30000_${[p, ...later].join(".")}_cmw${more}`, parameters: { steps: 1, step_ms: 0 }, client_id: client });
    const id = body.execution_id as string;
    await until("waiting on shard 0", () => shardRows(0, new Set([id])), (rows) => rows.some((r) => r.state === "waiting"));

    await withoutNotices(async () => {
      // Granted by the ledger with no word to the Execution.
      await realShard(0).release(blocker.reservationId);
      await until("granted on shard 0", () => shardRows(0, new Set([id])), (rows) => rows.some((r) => r.state === "granted"));
    });
    // Its re-ask goes out now from its alarm and is stalled; the Execution dies meanwhile.
    await faulty(0).setFault(["reserve"], { mode: "stall", stallMs: 1500, times: 1 });
    const since = Date.now();
    await runInDurableObject(executionStub(id), async (_i, state) => {
      state.storage.sql.exec("UPDATE timers SET due_at = 0 WHERE name = 'reask'");
      await state.storage.setAlarm(Date.now());
    });
    await crashDuringStalled(id, "reserve", since);

    const doc = await until("the execution ended", () => status(id), (d) => d.status !== "running" && d.status !== "queued", 20_000);
    expect(doc.status).toBe("completed");
    // It ran once, on shard 0 under the reservation the lost answer granted (a one-shard stage's
    // lease outlasts the stall), or under a later round's (a part's short lease lapsed meanwhile).
    // (The settle goes out through the outbox after the stage completed: awaited, not read once.)
    const rows = await until("a reservation settled", () => shardRows(0, new Set([id])), (rs) => rs.some((r) => r.state === "settled"));
    expect(rows.filter((r) => r.state === "settled")).toHaveLength(1);
    if (more === 0) expect(rows.map((r) => [r.id, r.state])).toEqual([[`${id}:stage_1:1`, "settled"]]);
  });
});
