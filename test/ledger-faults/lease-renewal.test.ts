import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { TEST_TUNING } from "../support/constants";
import { ended, executionStub, startExecution, until, waitFor } from "../support/api";

/**
 * A lease renewal whose ledger call fails after its stage ended (steps.ts renewLease): the ended
 * attempt's end cleared its timers, and the failed call must not write its `lease` timer back,
 * since nothing takes a lease timer of a stage that is off its worker (it would stay due, firing
 * the alarm, until the execution ends). This project's leases are 3 s (renewed 1.5 s after the
 * grant), the ledger call times out after 2 s (vitest.config.ts LEDGER_FAULTS_TUNING), one
 * ledger object behind the faulty one (`global`).
 */
type Call = { method: string; at: number; fault: string | null };
interface FaultyLedgerStub {
  setFault(methods: string[], fault: { mode: "stall"; stallMs: number; times: number }): Promise<void>;
  clearFaults(): Promise<void>;
  calls(method?: string): Promise<Call[]>;
}
const faulty = () => {
  const ns = (env as unknown as { FAULTY_LEDGER: DurableObjectNamespace }).FAULTY_LEDGER;
  return ns.get(ns.idFromName("global")) as unknown as FaultyLedgerStub;
};

describe("a lease renewal that fails after its stage ended", () => {
  it("leaves no lease timer for the ended stage while the next one runs", async () => {
    // The first renewal (stage 1's, 1.5 s after its grant) is held past the call's timeout; stage 1
    // completes meanwhile (it runs 2.5 s), and stage 2 runs as long.
    await faulty().setFault(["renew"], { mode: "stall", stallMs: 5000, times: 1 });
    try {
      const since = Date.now();
      const { body } = await startExecution({ template_name: "fault_two_stage_long", parameters: { steps: 1, step_ms: 2500 }, client_id: "client_lease_renewal" });
      const id = body.execution_id as string;
      const stalled = (await until("stage 1's renewal stalled", () => faulty().calls("renew"), (cs) => cs.some((c) => c.fault === "stall" && c.at >= since)))
        .find((c) => c.fault === "stall")!;
      await waitFor(id, (d) => d.stages[0]?.status === "completed");
      // Stage 2's renewal sent well after stage 1's call timed out: the object has taken that timeout by then.
      await until(
        "a renewal after the stalled call's timeout",
        () => faulty().calls("renew"),
        (cs) => cs.some((c) => c.fault === null && c.at > stalled.at + TEST_TUNING.ledgerCallTimeoutMs + 500),
        15_000,
      );
      const stored = await runInDurableObject(executionStub(id), (_i, state) => ({
        leases: state.storage.sql.exec("SELECT unit FROM timers WHERE name = 'lease' ORDER BY unit").toArray().map((r) => r.unit),
      }));
      // Stage 2 still runs (the execution's end would clear every timer), with its own lease timer only.
      expect(stored.leases).toEqual(["stage_2"]);
      expect((await waitFor(id, ended, 20_000)).status).toBe("completed");
    } finally {
      await faulty().clearFaults();
    }
  });
});
