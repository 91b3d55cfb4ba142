import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, it } from "vitest";
import { CrashSystem, crashRound } from "../../bench/lib/crash";
import { snapshotTree } from "../../bench/lib/e2e-session";
import { TEST_SECRETS } from "../support/constants";
import { SHARDINGS, type Sharding, expectRouted } from "./shardings";

/**
 * A hard crash: the same multi-worker `wrangler dev` session as `npm start`
 * (orchestrator, demo KAM, demo granulator) on a persisted state directory,
 * killed with SIGKILL (the whole process group) while stages are on workers,
 * then started again on the same state. Once with one ledger object and once
 * with 4 ledger shards (./shardings.ts): two systems, started at once, crashed one after the other.
 */
const systems: CrashSystem[] = [];
let dir: string;

beforeAll(async () => {
  // From a snapshot of the tree: an edit elsewhere must not make wrangler reload the workers mid-test.
  dir = mkdtempSync(path.join(os.tmpdir(), "orch-crash-test-"));
  const cwd = snapshotTree(dir, "worktree");
  for (const s of SHARDINGS) {
    systems.push(
      new CrashSystem({
        cwd,
        secrets: TEST_SECRETS,
        vars: {
          LOG_LEVEL: "warn",
          // Room for every execution to have a stage on the worker at the kill.
          POOLS: JSON.stringify([
            { name: "worker:bitware-content-granulator", kind: "concurrency", capacity: 64 },
            { name: "tokens:openai", kind: "rate", capacity: 2_000_000, refill_per_second: 33_333 },
            { name: "compute_ms", kind: "budget", capacity: 1e12 },
          ]),
          ...s.vars,
        },
      }),
    );
  }
  await Promise.all(systems.map((s) => s.start()));
});
afterAll(async () => {
  await Promise.all(systems.map((s) => s.dispose()));
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("a hard crash of the whole runtime", () => {
  // One round after the other (both systems were started at once): two rounds side by side on a loaded
  // machine slowed the POSTs past 30 s, and the kill found no stage on the worker (killed_below_target).
  it.for(SHARDINGS.map((s, i): Sharding & { i: number } => ({ ...s, i })))(
    "$label: loses no execution: each ends, a repeated request_id answers the same one, and the ledger ends empty",
    { timeout: 240_000 },
    async (sharding, { expect }) => {
      const system = systems[sharding.i];
      await expectRouted(system.url, sharding);
      const { report, outcomes } = await crashRound(system, {
        round: 1,
        // Two waves of 8: the kill comes in the first (6 on the worker), the rest go after the restart.
        n: 16,
        concurrency: 8,
        killWhenOnWorkers: 6,
        // Far below any stage deadline (10 min by default): an execution still running 60 s after the last
        // POST (an execution that waits for its deadline, or a worker job whose alarm is gone) fails the test.
        endDeadlineMs: 60_000,
        ledgerDeadlineMs: 60_000,
        // 6 s per stage: on a loaded machine the POSTs come slowly, and shorter executions end before 6 overlap.
        shape: { steps: 10, stepMs: 600 },
      });
      const detail = JSON.stringify(report);
      expect(report.on_workers_at_kill, detail).toBeGreaterThanOrEqual(6);
      expect(report.killed_below_target, detail).toBe(false);
      // Every planned execution ran: those the kill kept from being sent went after the restart.
      expect(report.start_failures, detail).toBe(0);
      expect(outcomes.length, detail).toBe(16);
      expect(report.lost, detail).toBe(0);
      expect(report.stuck, detail).toEqual([]);
      expect(report.repeat_mismatches, detail).toBe(0);
      for (const o of outcomes) {
        if (o.status === "failed") expect(o.code, detail).toMatch(/^[a-z_]+$/);
        else expect(o.status, detail).toBe("completed");
      }
      // Nothing held or waiting on any shard, every shard answering (awaitLedgerClean).
      expect(report.ledger_clean, detail).toBe(true);
    },
  );
});
