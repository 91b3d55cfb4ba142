import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { indexFor } from "../../src/index-routing";
import { ended, executionStub, startExecution, waitFor } from "../support/api";

/**
 * The index summary of a live execution, held back `indexHoldMs` in its
 * outbox (docs/architecture.md): a newer summary takes the held one's place,
 * so an execution that runs soon after it starts sends the index one summary
 * for both. In this project the hold is 4 s (vitest.config.ts), so the test's
 * look inside it has seconds of room, not the workers project's 1 s.
 */
const HOLD_MS = (JSON.parse(env.TUNING) as { indexHoldMs: number }).indexHoldMs;

describe("a real execution in the index", () => {
  it("is listed as running once it runs: its queued summary, held back, is replaced by the running one, and the index gets one summary for both", async () => {
    expect(HOLD_MS).toBeGreaterThanOrEqual(4000);
    // One step longer than the hold: the running summary goes when the hold runs out, not with the end.
    const { body } = await startExecution({
      template_name: "quick_summary",
      parameters: { topic: "Index", targetAudience: "ops", steps: 1, step_ms: HOLD_MS + 1_500 },
      client_id: "client_index_hold",
    });
    const id: string = body.execution_id;
    const stored = async () =>
      runInDurableObject(executionStub(id), (_i, state) => state.storage.sql.exec<{ status: string; created_at: number }>("SELECT status, created_at FROM execution").toArray()[0]);
    const deadline = Date.now() + 20_000;
    while ((await stored())?.status !== "running" && Date.now() < deadline) await scheduler.wait(5);
    const row = await stored();
    expect(row?.status).toBe("running");
    const created = row!.created_at;
    // Within the hold: nothing was sent yet (without the hold the queued summary goes at once, and the index has it by now).
    expect(await indexFor(env, created).get(id)).toBeNull();
    let entry: { status: string; version: number } | null = null;
    while (Date.now() < deadline && entry?.status !== "running") {
      entry = await indexFor(env, created).get(id);
      await scheduler.wait(25);
    }
    // Version 2: the running summary, the first and only one the index got while the stage runs.
    expect(entry).toMatchObject({ execution_id: id, status: "running", version: 2 });
    await waitFor(id, ended, 20_000);
  });
});
