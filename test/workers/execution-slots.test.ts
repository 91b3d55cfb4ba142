import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { ledgerForClient } from "../../src/ledger-routing";
import { JSON_HEADERS, KAM, OPS, call, ended, startExecution, status, waitFor } from "../support/api";

/**
 * max_running_executions through the API (issue 14): an execution beyond the
 * client's quota stays `queued`, with `waiting_on` (client_quota), until one
 * of the client's executions ends; a cancelled queued one frees nothing it did
 * not hold; a raised quota lets it go at once; no slot is left behind.
 */

const putQuotas = (client: string, quotas: unknown) =>
  call(`/clients/${client}/quotas`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify(quotas) });

/** An execution that holds its slot until its approval stage is decided. */
async function holding(client: string): Promise<string> {
  const { body } = await startExecution({ template_name: "approval_pipeline", parameters: { steps: 1, step_ms: 0 }, client_id: client });
  await waitFor(body.execution_id, (d) => d.stages[1]?.status === "awaiting_approval");
  return body.execution_id;
}

async function quick(client: string): Promise<string> {
  const { res, body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: client });
  expect(res.status).toBe(202);
  return body.execution_id;
}

/** Queued for a slot: the document says so, and no stage has started. */
const queuedForSlot = (d: StatusDocument) => d.status === "queued" && d.waiting_on?.reason === "client_quota" && d.stages.length > 0;

async function slotRows(client: string): Promise<{ execution_id: string; state: string }[]> {
  const ledger = ledgerForClient(env, client);
  return runInDurableObject(ledger, (_i, st) =>
    st.storage.sql.exec<{ execution_id: string; state: string }>("SELECT execution_id, state FROM client_slots WHERE client_id = ? ORDER BY seq", client).toArray(),
  );
}

describe("max_running_executions", () => {
  it("a quota of 1: the second execution stays queued until the first ends, then runs; a cancelled queued one frees nothing", async () => {
    const client = "client_slots_one";
    expect((await putQuotas(client, { max_running_executions: 1 })).status).toBe(200);
    const first = await holding(client);
    const second = await quick(client);
    const third = await quick(client);
    const waiting = await waitFor(second, queuedForSlot);
    expect(waiting.waiting_on).toMatchObject({ reason: "client_quota", pools: [], position: 1 });
    expect(waiting.stages.every((s) => s.status === "pending" && s.attempts === 0)).toBe(true);
    expect((await waitFor(third, queuedForSlot)).waiting_on?.position).toBe(2);
    const client1 = (await (await call(`/clients/${client}`, { headers: OPS })).json()) as { usage: { running_executions: number } };
    expect(client1.usage.running_executions).toBe(1);

    // The third, cancelled while it waits, gives back its place only: the second is still queued, the first runs.
    expect((await call(`/executions/${third}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    expect((await waitFor(third, ended)).status).toBe("cancelled");
    const afterCancel = await waitFor(second, queuedForSlot);
    expect(afterCancel.waiting_on?.position).toBe(1);
    expect((await status(first)).status).toBe("running");

    // The first ends: the second gets the slot and runs to the end.
    expect((await call(`/executions/${first}/stages/stage_2/approve`, { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: "{}" })).status).toBe(200);
    expect((await waitFor(first, ended)).status).toBe("completed");
    const done = await waitFor(second, ended);
    expect(done.status).toBe("completed");
    expect(done.waiting_on).toBeUndefined();
    // Every slot and place went back through the outbox: nothing is left in the ledger.
    const deadline = Date.now() + 10_000;
    let rows = await slotRows(client);
    while (rows.length && Date.now() < deadline) {
      await scheduler.wait(50);
      rows = await slotRows(client);
    }
    expect(rows).toEqual([]);
  });

  it("a raised quota lets a queued execution go at once", async () => {
    const client = "client_slots_raise";
    expect((await putQuotas(client, { max_running_executions: 1 })).status).toBe(200);
    const first = await holding(client);
    const second = await quick(client);
    await waitFor(second, queuedForSlot);
    expect((await putQuotas(client, { max_running_executions: 2 })).status).toBe(200);
    // It runs while the first still holds its slot.
    expect((await waitFor(second, ended)).status).toBe("completed");
    expect((await status(first)).stages[1].status).toBe("awaiting_approval");
    expect((await slotRows(client)).map((r) => r.state)).toEqual(["running"]);
    expect((await call(`/executions/${first}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    await waitFor(first, ended);
  });
});
