import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { KAM, call, ended, executionStub, expireNow, startExecution, status, waitFor } from "../support/api";

/**
 * Retention (docs/protocol.md, Data): `retentionMs` after an execution ends,
 * whatever its outcome, its own alarm deletes its KV keys and R2 objects and
 * its inline outputs; the status document keeps the summary and says when the
 * data expired. The test makes the retention timer due and fires the alarm by
 * hand instead of waiting seven days.
 */
const kvKeys = async (id: string) => (await env.DATA_REFS.list({ prefix: `kv/${id}/` })).keys.length;
const r2Objects = async (id: string) => (await env.DATA.list({ prefix: `r2/${id}/` })).objects.length;

describe("retention", () => {
  it("deletes a completed execution's KV and R2 data through its alarm, and the status document says so", async () => {
    const sizes = { stage_1: 100, stage_2: 200_000, stage_3: 2 * 1024 * 1024 };
    const { body } = await startExecution({ template_name: "data_pipeline", parameters: { steps: 1, step_ms: 0, output_bytes: sizes }, client_id: "client_retention" });
    const id = body.execution_id as string;
    const before = await waitFor(id, ended, 60_000);
    expect(before.status).toBe("completed");
    expect(before.data_expired_at).toBeNull();
    expect(await kvKeys(id)).toBeGreaterThan(0);
    expect(await r2Objects(id)).toBeGreaterThan(0);
    expect((await call(`/executions/${id}/result`, { headers: KAM })).status).toBe(200);

    await expireNow(id);

    expect(await kvKeys(id)).toBe(0);
    expect(await r2Objects(id)).toBe(0);
    const after = await status(id);
    expect(after.data_expired_at).not.toBeNull();
    // The summary stays: status, stages, usage and cost.
    expect(after.status).toBe("completed");
    expect(after.cost).toEqual(before.cost);
    expect(after.stages.map((s) => [s.stage_id, s.status, s.usage])).toEqual(before.stages.map((s) => [s.stage_id, s.status, s.usage]));
    const result = await call(`/executions/${id}/result`, { headers: KAM });
    expect(result.status).toBe(410);
    expect(((await result.json()) as { error: { code: string } }).error.code).toBe("data_expired");
    const inline = await runInDurableObject(executionStub(id), (_i, state) =>
      state.storage.sql.exec("SELECT COUNT(*) AS n FROM stages WHERE output IS NOT NULL OR output_ref IS NOT NULL").one().n,
    );
    expect(inline).toBe(0);
  });

  it("cleans up a cancelled execution's intermediate data on the same schedule", async () => {
    // Stage 1 leaves 200 KB in KV; stage 2 hangs until the cancel.
    const { body } = await startExecution({
      template_name: "data_pipeline",
      parameters: { steps: 1, step_ms: 0, output_bytes: { stage_1: 200_000, stage_2: 10, stage_3: 10 }, fault: { stage: 2, mode: "hang" } },
      client_id: "client_retention",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[1]?.status === "processing", 30_000);
    expect(await kvKeys(id)).toBe(1);
    await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM });
    expect((await status(id)).status).toBe("cancelled");
    // Kept until the retention period is over...
    expect(await kvKeys(id)).toBe(1);
    await expireNow(id);
    expect(await kvKeys(id)).toBe(0);
    expect((await status(id)).data_expired_at).not.toBeNull();
  });
});
