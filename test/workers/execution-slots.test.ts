import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { newExecutionId } from "../../src/ids";
import { layoutOf, ledgerForClient } from "../../src/ledger-routing";
import { JSON_HEADERS, KAM, OPS, call, ended, executionStub, startExecution, status, waitFor } from "../support/api";

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

  it("a quota set between a start's admission and its start(): that execution runs without a slot, is not counted, and its end frees none", async () => {
    const client = "client_slots_late_quota";
    // Admitted while the client has no quota: the admission says the slot is free.
    const admitted = await ledgerForClient(env, client).admitStart(client, "normal");
    expect(admitted).toMatchObject({ ok: true, slot: "free" });
    expect((await putQuotas(client, { max_running_executions: 1 })).status).toBe(200);
    // Its start() comes after the quota, with the admission's answer, as the front Worker passes it.
    const early = newExecutionId();
    const started = await executionStub(early).start({
      execution_id: early,
      template_name: "approval_pipeline",
      parameters: { steps: 1, step_ms: 0 },
      client_id: client,
      request_id: null,
      request_hash: null,
      priority: "normal",
      notify: false,
      slot: "free",
      client_weight: admitted.ok ? (admitted.weight ?? null) : null,
    });
    expect(started).toMatchObject({ created: true, status: "queued" });
    await waitFor(early, (d) => d.stages[1]?.status === "awaiting_approval");
    expect(await slotRows(client)).toEqual([]);
    // The quota's one slot is still there for the next execution, and the one after it waits.
    const counted = await holding(client);
    const third = await quick(client);
    expect((await waitFor(third, queuedForSlot)).waiting_on?.position).toBe(1);
    expect((await slotRows(client)).map((r) => [r.execution_id, r.state])).toEqual([
      [counted, "running"],
      [third, "waiting"],
    ]);
    // The uncounted one ends: it held no slot, so the third still waits.
    expect((await call(`/executions/${early}/stages/stage_2/approve`, { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: "{}" })).status).toBe(200);
    expect((await waitFor(early, ended)).status).toBe("completed");
    expect((await waitFor(third, queuedForSlot)).waiting_on?.position).toBe(1);
    expect((await call(`/executions/${counted}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    expect((await waitFor(third, ended)).status).toBe("completed");
  });

  it("a rerun takes its client's slot like a start: queued while the quota is full, running once it frees", async () => {
    const client = "client_slots_rerun";
    expect((await putQuotas(client, { max_running_executions: 1 })).status).toBe(200);
    const original = await quick(client);
    expect((await waitFor(original, ended)).status).toBe("completed");
    const holder = await holding(client);
    const res = await call(`/executions/${original}/rerun`, { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: "{}" });
    expect(res.status).toBe(202);
    const again = ((await res.json()) as { execution_id: string }).execution_id;
    expect((await waitFor(again, queuedForSlot)).waiting_on?.position).toBe(1);
    expect((await call(`/executions/${holder}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    expect((await waitFor(again, ended)).status).toBe("completed");
  });

  it("a start admitted free stores its slot as free, and on a sharded ledger the admission's weight for its parts on other shards", async () => {
    const client = "client_slots_free";
    expect((await putQuotas(client, { weight: 3 })).status).toBe(200);
    const id = await quick(client);
    expect((await waitFor(id, ended)).status).toBe("completed");
    const row = await runInDurableObject(executionStub(id), (_i, st) =>
      st.storage.sql.exec<{ slot: string | null; client_weight: number | null }>("SELECT slot, client_weight FROM execution").one(),
    );
    // One shard keeps the client's quotas beside every pool: no copy of the weight is needed there.
    expect(row).toEqual({ slot: "free", client_weight: layoutOf(env).count > 1 ? 3 : null });
  });
});
