import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { TEST_TUNING } from "../support/constants";
import { ended, executionStub, startExecution, until, waitFor } from "../support/api";

const LEASE_MS = 3000;

/** The reservation's row in the real ledger's own table (past the faulty object). */
function ledgerRow(rid: string): Promise<{ state: string; granted_at: number; expires_at: number } | undefined> {
  const real = env.RESOURCE_LEDGER.get(env.RESOURCE_LEDGER.idFromName("global"));
  return runInDurableObject(real, (_i, state) =>
    state.storage.sql.exec<{ state: string; granted_at: number; expires_at: number }>("SELECT state, granted_at, expires_at FROM reservations WHERE id = ?", rid).toArray()[0],
  );
}

/**
 * A grant held in memory (grant.ts HeldGrants) while the handshake is out is written by its renewal
 * timer when its lease is due for renewal, so the alarm renews it before the handshake answers.
 *
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
      // Stage 2's renewal sent after stage 1's call timed out: the object has taken that timeout by then
      // (the call left before it arrived). No margin beyond it: stage 2 renews once, about 2.5 s after
      // the stalled call arrived, only about 0.5 s past the timeout.
      await until(
        "a renewal after the stalled call's timeout",
        () => faulty().calls("renew"),
        (cs) => cs.some((c) => c.fault === null && c.at > stalled.at + TEST_TUNING.ledgerCallTimeoutMs),
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

describe("a grant held while the handshake is out", () => {
  it("is written when its lease is due for renewal, and the lease is renewed before the handshake answers", async () => {
    // The handshake answers 2.5 s after it arrived, inside its 3 s deadline but past the moment
    // the 3 s lease is due for renewal (1.5 s after the grant).
    const stallMs = 2500;
    const since = Date.now();
    const { body } = await startExecution({
      template_name: "fault_single",
      parameters: { steps: 1, step_ms: 0, fault: { stage: 1, mode: "stall_handshake" }, stall_ms: stallMs },
      client_id: "client_lease_renewal",
    });
    const id = body.execution_id as string;
    const rid = `${id}:stage_1:1`;
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // The settle goes out through the outbox after the stage completed: awaited, not read once.
    const row = (await until("the reservation settled", () => ledgerRow(rid), (r) => r?.state !== "granted"))!;
    // Renewed once at least, and first before the worker could have answered the handshake (it arrived
    // after the grant): the grant was written and renewed while it was held, not after the handshake.
    const renewals = (await faulty().calls("renew")).filter((c) => c.at >= since);
    expect(renewals.length).toBeGreaterThan(0);
    expect(renewals[0].at).toBeLessThan(row.granted_at + stallMs);
    // The ledger's own row: settled (a settle after the lease lapsed leaves it expired), its lease past the first one.
    expect(row).toMatchObject({ state: "settled" });
    expect(row.expires_at - row.granted_at).toBeGreaterThan(LEASE_MS);
  });
});
