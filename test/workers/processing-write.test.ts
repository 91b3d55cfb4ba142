import { describe, expect, it } from "vitest";
import { JSON_HEADERS, KAM, OPS, call, ended, waitFor } from "../support/api";
import { TEST_TUNING } from "../support/constants";

/**
 * `processing` is written only for a worker that has not called back within
 * `pollInitialMs` of accepting `process` (actors/execution/steps.ts handshake):
 * a quick worker's stage costs no commit, no poll timer and no alarm for it.
 * Until then the stage stays `handshaking`; its processing time still counts
 * from the acceptance.
 */
async function start(parameters: Record<string, unknown>): Promise<string> {
  const res = await call("/execute", {
    method: "POST",
    headers: { ...KAM, ...JSON_HEADERS },
    body: JSON.stringify({ template_name: "quick_summary", parameters, client_id: "client_processing_write" }),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

describe("processing written only for slow workers", () => {
  it("a worker that has not called back: processing appears once its first poll is due, counted from process's acceptance", async () => {
    const id = await start({ fault: { mode: "hang" } });
    const doc = await waitFor(id, (d) => d.stages[0]?.status === "processing");
    // Written no earlier than pollInitialMs after the acceptance its time counts from.
    expect(doc.stages[0].processing_ms).toBeGreaterThanOrEqual(TEST_TUNING.pollInitialMs);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
  });

  it("a worker that calls back goes on to the end with its processing time recorded", async () => {
    const id = await start({ steps: 1, step_ms: 0 });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const spans = (await (await call(`/executions/${id}/spans`, { headers: OPS })).json()) as { spans: { processing_at: string | null; ended_at: string | null }[] };
    // The worker called back after accepting process: its attempt has a processing phase, whether or not processing was written.
    expect(spans.spans[0].processing_at).not.toBeNull();
    expect(Date.parse(spans.spans[0].ended_at!)).toBeGreaterThanOrEqual(Date.parse(spans.spans[0].processing_at!));
  });
});
