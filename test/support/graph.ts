import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { expect } from "vitest";
import type { StatsSnapshot } from "../../demo/content-granulator/stats";
import type { DataReference } from "../../schemas/data";
import { OPS, call, executionStub, startExecution } from "./api";
import { TEST_WORKER_SECRETS } from "./constants";

/**
 * The pipeline graph tests' granulator instance (vitest.config.ts), whose
 * counters see only their jobs, and the helpers they share.
 */
export const GRAPH_WORKER = "bitware-graph-granulator";
const graphWorker = (env as unknown as { GRAPH_GRANULATOR: Fetcher }).GRAPH_GRANULATOR;
const AUTH = { authorization: `Bearer ${TEST_WORKER_SECRETS[GRAPH_WORKER]}` };

/** The graph worker's own counters (processing now, most at once, started, completed). */
export const graphStats = async () => (await (await graphWorker.fetch("https://graph.internal/api/stats", { headers: AUTH })).json()) as StatsSnapshot;

export async function resetGraphStats(): Promise<void> {
  await graphWorker.fetch("https://graph.internal/api/stats/reset", { method: "POST", headers: AUTH });
}

/** What the `gather` action reports: the stage that ran, what it received, and for an item its element. */
export interface Gathered {
  stage: string;
  inputs: Record<string, unknown>;
  item?: unknown;
  item_index?: number;
  /** Each stored input it read (size, SHA-256 of the bytes), or the status that refused a key it was not given. */
  read?: Record<string, { size: number; sha256: string } | { refused: number }>;
  /** With `read`: the length of the data token the stage read with. */
  data_token_bytes?: number;
}

export async function startGraph(template_name: string, parameters: Record<string, unknown>): Promise<string> {
  const { res, body } = await startExecution({ template_name, parameters, client_id: "client_graph" });
  expect(res.status).toBe(202);
  return body.execution_id as string;
}

/** The execution's deliverable (`GET /executions/:id/result` `output`). */
export async function deliverable(id: string): Promise<unknown> {
  const res = await call(`/executions/${id}/result`, { headers: OPS });
  expect(res.status).toBe(200);
  return ((await res.json()) as { output: unknown }).output;
}

/** What the Execution object keeps for each stage and item: inline JSON text or a reference. */
export async function stored(id: string): Promise<Map<string, { output: string | null; ref: DataReference | null }>> {
  const rows = await runInDurableObject(executionStub(id), (_i, state) =>
    state.storage.sql.exec("SELECT stage_id, output, output_ref FROM stages").toArray(),
  );
  return new Map(rows.map((r) => [r.stage_id as string, { output: r.output as string | null, ref: r.output_ref ? (JSON.parse(r.output_ref as string) as DataReference) : null }]));
}
