import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { JSON_HEADERS, OPS, call, ended, expectNoLiveReservations, startExecution, waitFor } from "../support/api";

/**
 * Ten executions against a `worker:` pool of capacity 2: all complete, and the
 * worker itself (its own counter, not the orchestrator's) never sees more than
 * two stages processing at once. The worker is a second granulator instance,
 * so no other test shares its pool or its counter.
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

describe("the ledger caps a worker's concurrency end to end", () => {
  it("runs ten three-stage executions through a pool of two slots, never more than two at once at the worker", async () => {
    const put = await call(`/resources/pools/${encodeURIComponent(`worker:${WORKER}`)}`, {
      method: "PUT",
      headers: { ...OPS, ...JSON_HEADERS },
      body: JSON.stringify({ kind: "concurrency", capacity: 2 }),
    });
    expect(put.status).toBe(200);
    await capped.fetch("https://capped.internal/api/stats/reset", { method: "POST", headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-capped-granulator"]}` } });

    const starts = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        startExecution({ template_name: "capped_pipeline", parameters: { steps: 3, step_ms: 20, topic: `t${i}` }, client_id: "client_capped" }),
      ),
    );
    const ids = starts.map((s) => s.body.execution_id as string);
    // Some stages must have waited for a slot: with 10 executions and 2 slots they cannot all run at once.
    const docs = await Promise.all(ids.map((id) => waitFor(id, ended, 60_000)));
    for (const d of docs) {
      expect(d.status).toBe("completed");
      expect(d.stages.every((s) => s.status === "completed")).toBe(true);
    }
    const waited = docs.flatMap((d) => d.stages).filter((s) => s.waiting_ms > 0).length;
    expect(waited).toBeGreaterThan(0);

    const s = await stats();
    expect(s.completed).toBe(30);
    expect(s.max_concurrent).toBeGreaterThanOrEqual(1);
    expect(s.max_concurrent).toBeLessThanOrEqual(2);
    for (const id of ids) await expectNoLiveReservations(id);
  });
});
