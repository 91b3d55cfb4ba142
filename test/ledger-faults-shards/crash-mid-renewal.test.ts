/**
 * An Execution that dies while the lease renewal of its alarm is out (the
 * renewal half of test/shard-faults/crash-mid-call.test.ts): the `lease` timer
 * that call was made for was already taken, and the answer dies with the
 * instance. The call re-arms its own timer first (steps.ts renewLease, a
 * quarter of the lease later), so the restarted object renews again; nothing
 * else renews the lease, which would lapse under a stage that is still running.
 *
 * It runs in `ledger-faults-shards` for that project's 3 s lease (renewed 1.5 s
 * after the grant, the re-armed try 0.75 s after that): the `shard-faults`
 * project's 20 s lease made the stage run 22 s. The same sharded layout
 * (TEST_SHARDS) with every shard behind its own faulty object; a one-shard
 * stage (the pool, the worker's slot and the client all on shard 0), the crash
 * while shard 0's faulty object stalls the renewal.
 */
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { startExecution, status, until } from "../support/api";
import { WORKER, clientOn, crashDuringStalled, faulty, poolsOn, putPool, shardRows } from "../shard-faults/shard-support";

/** The project's lease (vitest.config.ts LEDGER_FAULTS_TUNING), as the worker under test reads it. */
const LEASE_MS = (JSON.parse(env.TUNING) as { leaseMs: number }).leaseMs;

describe("an Execution that crashes while a ledger call of its alarm is out", () => {
  it("renews the lease of a running stage whose renewal died with it", async () => {
    // What the timings below are laid out for.
    expect(LEASE_MS).toBe(3000);
    const [p] = poolsOn(0, 1, "cml");
    const client = clientOn(0, "cml");
    await putPool(`set:${p}`, 2);
    await putPool(`worker:${WORKER}`, 16);
    // The stage runs 4.5 s, past the 3 s lease: its lease must be renewed. The first renewal
    // (1.5 s after the grant) is held back 10 s, past the lease's end, so only a second one can.
    await faulty(0).setFault(["renew"], { mode: "stall", stallMs: 10_000, times: 1 });
    try {
      const since = Date.now();
      const { body } = await startExecution({ template_name: `needs_${p}_cml`, parameters: { steps: 1, step_ms: 4500 }, client_id: client });
      const id = body.execution_id as string;
      // The Execution dies while that renewal is out.
      await crashDuringStalled(id, "renew", since);

      const doc = await until("the execution ended", () => status(id), (d) => d.status !== "running" && d.status !== "queued", 30_000);
      expect(doc.status, JSON.stringify(doc.stages[0].error)).toBe("completed");
      // The settle goes out through the outbox after the stage completed: awaited, not read once.
      const [row] = await until("the reservation settled", () => shardRows(0, new Set([id])), (rows) => rows[0]?.state === "settled");
      expect(row.expires_at! - row.granted_at!).toBeGreaterThan(LEASE_MS);
    } finally {
      await faulty(0).clearFaults();
    }
  });
});
