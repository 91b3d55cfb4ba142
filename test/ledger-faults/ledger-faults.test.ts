import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it } from "vitest";
import { ended, expectNoLiveReservations, startExecution, waitFor } from "../support/api";

/**
 * The ledger made slow, unreachable, or losing its answers for real: the
 * Execution reaches it through LEDGER_BINDING, which in this project names a
 * real object in front of the ledger (test/support/faulty-ledger).
 */
type Method = "reserve" | "renew" | "settle" | "settleAndReserve" | "release" | "status" | "estimate" | "snapshot" | "putPool";
interface FaultyLedgerStub {
  setFault(methods: Method[] | "all", fault: { mode: "stall" | "down" | "lose_answer"; stallMs?: number; times?: number }): Promise<void>;
  clearFaults(): Promise<void>;
  calls(method?: Method): Promise<{ method: Method; at: number; fault: string | null }[]>;
  resetCalls(): Promise<void>;
}
const gate = () => {
  const ns = (env as unknown as { FAULTY_LEDGER: DurableObjectNamespace }).FAULTY_LEDGER;
  return ns.get(ns.idFromName("global")) as unknown as FaultyLedgerStub;
};
const quick = { steps: 2, step_ms: 5, echo: { hello: "world" } };

afterEach(async () => {
  await gate().clearFaults();
  await gate().resetCalls();
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
});
