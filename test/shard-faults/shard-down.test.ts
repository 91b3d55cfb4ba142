/**
 * One ledger shard down for longer than the short lease (issue 15, "Proof"):
 * the faulty object in front of shard 3 stalls every call 10 s (the
 * Execution's ledger calls give up after 2 s; the short lease is 2 s). Stages
 * whose set needs a pool on shard 3 wait and then fail by their queue deadline;
 * stages that do not need shard 3 run to completion meanwhile; and the parts the
 * waiting stages took on the other shards are given back, so nothing stays held
 * there, and no part of theirs was ever renewed to the normal lease.
 */
import { describe, expect, it } from "vitest";
import { ended, startExecution, status, until, waitFor } from "../support/api";
import { clientOn, faulty, poolsOn, putPool, resetWorkerStats, shardRows, WORKER, workerStats } from "./shard-support";

const DOWN = 3;
const QUEUE_MS = 6000;
const SHORT_LEASE_MS = 2000;
const LEASE_MS = 20_000;

describe("a ledger shard down for longer than the short lease", () => {
  it("stages needing it fail by their queue deadline, the others run, nothing stays held on the other shards", async () => {
    const [down] = poolsOn(DOWN, 1, "sd");
    const [up] = poolsOn(1, 1, "su");
    // The client's own state and the worker's slot on shards that stay up (the worker's is shard 0).
    const client = clientOn(2, "down");
    for (const p of [down, up]) await putPool(`set:${p}`, 10);
    await putPool(`worker:${WORKER}`, 16);
    await resetWorkerStats();

    await faulty(DOWN).setFault("all", { mode: "stall", stallMs: 10_000 });
    const stuck: string[] = [];
    const free: string[] = [];
    for (let i = 0; i < 3; i++) {
      // Sets spanning shards 0, 1, 2 (client) and 3 (down): reserved in that order, stopped at shard 3.
      const a = await startExecution({ template_name: `needs${QUEUE_MS}_${up}.${down}_sd${i}`, parameters: { step_ms: 0 }, client_id: client });
      expect(a.res.status).toBe(202);
      stuck.push(a.body.execution_id);
      // The same shards but 3: shards 0, 1, 2 (no queue timeout of their own: a loaded machine may be slow).
      const b = await startExecution({ template_name: `needs_${up}_su${i}`, parameters: { step_ms: 0 }, client_id: client });
      expect(b.res.status).toBe(202);
      free.push(b.body.execution_id);
    }

    // The stages that do not need shard 3 complete while it is down.
    for (const id of free) {
      const doc = await waitFor(id, ended, 30_000);
      expect(doc.status, `${id}: ${JSON.stringify(doc.error)}`).toBe("completed");
    }
    expect((await faulty(DOWN).calls()).filter((c) => c.fault === "stall").length).toBeGreaterThan(0);

    // Those that need it fail by their queue deadline, having waited for it.
    for (const id of stuck) {
      const doc = await waitFor(id, ended, 30_000);
      expect(doc.status, id).toBe("failed");
      expect(doc.error?.code, id).toBe("queue_timeout");
      expect(doc.stages[0].waiting_ms, id).toBeGreaterThanOrEqual(QUEUE_MS);
    }
    // None of them ever reached the worker: only the three free ones began there.
    expect((await workerStats()).started).toBe(3);

    // On the shards that stayed up, the stuck stages' parts are all given back (through the
    // outbox), and every one of them was only ever held under the short lease.
    const ids = new Set(stuck);
    for (const shard of [0, 1, 2]) {
      const rows = await until(
        `shard ${shard}: no part of the stuck stages held or waiting`,
        () => shardRows(shard, ids),
        (rs) => rs.every((r) => r.state !== "granted" && r.state !== "waiting"),
        15_000,
      );
      expect(rows.length, `shard ${shard} saw the stuck stages' parts`).toBeGreaterThan(0);
      for (const r of rows) {
        expect(r.lease_ms, r.id).toBeLessThanOrEqual(SHORT_LEASE_MS);
        if (r.granted_at !== null && r.expires_at !== null) expect(r.expires_at - r.granted_at, r.id).toBeLessThan(LEASE_MS);
      }
    }
    // The free stages' usage of `up` is settled: the pool is whole again.
    const upRows = await shardRows(1, new Set(free));
    expect(upRows.filter((r) => r.state === "settled").length).toBe(3);

    // Shard 3 back: the calls that were stalled land late; whatever they granted there expires
    // after one short lease (nobody renews it), so nothing stays held on shard 3 either.
    await faulty(DOWN).clearFaults();
    await until(
      "shard 3: nothing of the stuck stages held or waiting",
      () => shardRows(DOWN, ids),
      (rs) => rs.every((r) => r.state !== "granted" && r.state !== "waiting"),
      30_000,
    );
    // And a set needing shard 3 runs again.
    const again = await startExecution({ template_name: `needs${QUEUE_MS}_${up}.${down}_sdagain`, parameters: { step_ms: 0 }, client_id: client });
    expect((await waitFor(again.body.execution_id, ended, 30_000)).status).toBe("completed");
    expect((await status(again.body.execution_id)).stages[0].status).toBe("completed");
  });
});
