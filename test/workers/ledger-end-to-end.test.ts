import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { JSON_HEADERS, KAM, OPS, call, ended, expectNoLiveReservations, startExecution, status, waitFor } from "../support/api";

/**
 * Ten executions against a `worker:` pool of capacity 2: all complete, and the
 * worker itself (its own counter, not the orchestrator's) never sees more than
 * two stages processing at once. The worker is a second granulator instance,
 * so no other test shares its pool or its counter. Then the same pool with one
 * slot held by the test: a stage's `waiting_ms` lies between the time the test
 * held the slot and the time from its POST to its start.
 */
const WORKER = "bitware-capped-granulator";
/** A test-only binding (vitest.config.ts) to the second granulator instance. */
const capped = (env as unknown as { CAPPED_GRANULATOR: Fetcher }).CAPPED_GRANULATOR;
const stats = async () =>
  (await (await capped.fetch("https://capped.internal/api/stats", { headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-capped-granulator"]}` } })).json()) as {
    processing: number;
    max_concurrent: number;
    completed: number;
  };

async function capacity(slots: number): Promise<void> {
  const put = await call(`/resources/pools/${encodeURIComponent(`worker:${WORKER}`)}`, {
    method: "PUT",
    headers: { ...OPS, ...JSON_HEADERS },
    body: JSON.stringify({ kind: "concurrency", capacity: slots }),
  });
  expect(put.status).toBe(200);
}

describe("the ledger caps a worker's concurrency end to end", () => {
  it("runs ten three-stage executions through a pool of two slots, never more than two at once at the worker", async () => {
    await capacity(2);
    await capped.fetch("https://capped.internal/api/stats/reset", { method: "POST", headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-capped-granulator"]}` } });

    const posted = Date.now();
    const starts = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        startExecution({ template_name: "capped_pipeline", parameters: { steps: 3, step_ms: 20, topic: `t${i}` }, client_id: "client_capped" }),
      ),
    );
    const ids = starts.map((s) => s.body.execution_id as string);
    // Some stages must have waited for a slot: with 10 executions and 2 slots they cannot all run at once.
    const docs = await Promise.all(ids.map((id) => waitFor(id, ended, 60_000)));
    const allEnded = Date.now();
    for (const d of docs) {
      expect(d.status).toBe("completed");
      expect(d.stages.every((s) => s.status === "completed")).toBe(true);
    }
    // No stage can have waited longer than the test saw its execution exist (the exact bound: the next test).
    for (const st of docs.flatMap((d) => d.stages)) {
      expect(st.waiting_ms).toBeGreaterThanOrEqual(0);
      expect(st.waiting_ms).toBeLessThanOrEqual(allEnded - posted);
    }

    const s = await stats();
    expect(s.completed).toBe(30);
    expect(s.max_concurrent).toBeGreaterThanOrEqual(1);
    expect(s.max_concurrent).toBeLessThanOrEqual(2);
    for (const id of ids) await expectNoLiveReservations(id);
  });

  it("waiting_ms is the time a stage waited for its slot: at least the time the test held the slot, at most from its POST to its start", async () => {
    await capacity(1);
    // The holder's first stage takes the one slot and keeps it (it hangs) until the test cancels it.
    const holder = await startExecution({ template_name: "capped_pipeline", parameters: { steps: 1, step_ms: 0, fault: { stage: 1, mode: "hang" } }, client_id: "client_capped" });
    const holderId = holder.body.execution_id as string;
    await waitFor(holderId, (d) => d.stages[0]?.status === "processing");

    const posted = Date.now();
    const { body } = await startExecution({ template_name: "capped_pipeline", parameters: { steps: 1, step_ms: 0 }, client_id: "client_capped" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0]?.status === "waiting_resources");
    const heldFrom = Date.now();
    // The test holds the slot for at least 300 ms by its own clock; meanwhile every read shows the stage
    // still waiting and its waiting_ms never going down.
    let last = 0;
    while (Date.now() - heldFrom < 300) {
      const d = await status(id);
      expect(d.stages[0].status).toBe("waiting_resources");
      expect(d.stages[0].waiting_ms).toBeGreaterThanOrEqual(last);
      last = d.stages[0].waiting_ms;
      await scheduler.wait(25);
    }
    const released = Date.now();
    expect((await call(`/executions/${holderId}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    await waitFor(id, (d) => !["pending", "waiting_resources"].includes(d.stages[0].status));
    const startedBy = Date.now();

    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const waited = doc.stages[0].waiting_ms;
    expect(waited).toBeGreaterThanOrEqual(released - heldFrom);
    expect(waited).toBeLessThanOrEqual(startedBy - posted);
    await expectNoLiveReservations(id);
    await expectNoLiveReservations(holderId);
  });
});
