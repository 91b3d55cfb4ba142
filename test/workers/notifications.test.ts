import { env } from "cloudflare:workers";
import { createExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ExecutionEvent } from "../../schemas/api";
import { signatureHeader } from "../../src/notify-signature";
import { handle } from "../../src/routes";
import { JSON_HEADERS, KAM, OPS, call, ended, startExecution, status, waitFor } from "../support/api";
import { TEST_SECRETS } from "../support/constants";
import { received, waitForEvents } from "../support/kam-events";

const fast = { topic: "notify", steps: 1, step_ms: 5 };

async function hmacHex(secret: string, text: string): Promise<string> {
  const key = await crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(text));
  return [...new Uint8Array(mac)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function postEvent(body: string, signature: string | null): Promise<Response> {
  return env.KAM.fetch("https://kam.internal/api/orchestrator/events", {
    method: "POST",
    headers: { "content-type": "application/json", ...(signature ? { "x-orchestrator-signature": signature } : {}) },
    body,
  });
}

describe("event notifications to KAM", () => {
  it("signs t=<ms>,v1=<hex HMAC-SHA256 of '<t>.<body>'> with NOTIFY_SECRET", async () => {
    const body = JSON.stringify({ hello: "kam" });
    const header = await signatureHeader(TEST_SECRETS.NOTIFY_SECRET, body, 1_700_000_000_123);
    expect(header).toBe(`t=1700000000123,v1=${await hmacHex(TEST_SECRETS.NOTIFY_SECRET, `1700000000123.${body}`)}`);
  });

  it("the demo KAM refuses a forged, tampered or stale signature, and changes nothing", async () => {
    const id = "exec_00000000000000000000000000";
    const body = JSON.stringify({ event_id: "evt_forged", type: "execution.completed", execution_id: id, client_id: "c", status: "completed" });
    const now = Date.now();
    const good = await signatureHeader(TEST_SECRETS.NOTIFY_SECRET, body, now);
    const cases: [string, string, string | null][] = [
      ["no signature", body, null],
      ["wrong secret", body, await signatureHeader("another-secret-0123456789abcdef", body, now)],
      ["tampered body", body.replace("completed", "failed"), good],
      ["older than 5 minutes", body, await signatureHeader(TEST_SECRETS.NOTIFY_SECRET, body, now - 5 * 60_000 - 1_000)],
    ];
    for (const [name, sent, signature] of cases) {
      const res = await postEvent(sent, signature);
      expect(res.status, name).toBe(401);
    }
    expect((await received(id)).receipts).toEqual([]);
  });

  it("a completed execution's event reaches KAM signed, with status, cost and result_url", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_notify", notify: true });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    const got = await waitForEvents(body.execution_id, (r) => r.events.length === 1);
    const event = ExecutionEvent.parse(got.events[0]);
    expect(event).toMatchObject({
      type: "execution.completed",
      execution_id: body.execution_id,
      client_id: "client_notify",
      request_id: null,
      status: "completed",
      cost: doc.cost,
      result_url: `http://orchestrator-v2.internal/executions/${body.execution_id}/result`,
    });
    expect(event.event_id).toMatch(/^evt_[0-9a-f]{32}$/);
    expect(Date.parse(event.occurred_at)).toBe(Date.parse(doc.completed_at!));
    // The demo KAM records only deliveries whose signature verified.
    expect(got.receipts.map((r) => r.answered)).toEqual([200]);
    const after = await waitFor(body.execution_id, (d) => d.notifications.delivered === 1);
    expect(after.notifications).toEqual({ enabled: true, delivered: 1, pending: 0, undeliverable: [] });
  });

  it("a KAM that answers 500 three times still gets the event, the same event_id each time, once after de-duplication", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "kam-flaky-3-retry", notify: true });
    await waitFor(body.execution_id, ended);
    const got = await waitForEvents(body.execution_id, (r) => r.events.length === 1);
    expect(got.receipts.map((r) => r.answered)).toEqual([500, 500, 500, 200]);
    expect(new Set(got.receipts.map((r) => r.event_id))).toEqual(new Set([got.events[0].event_id]));
    // Every redelivery is signed anew: `t` moves on, the body stays.
    const ts = got.receipts.map((r) => r.t);
    expect([...ts].sort((a, b) => a - b)).toEqual(ts);
    expect(new Set(ts).size).toBe(4);
    const doc = await waitFor(body.execution_id, (d) => d.notifications.delivered === 1);
    expect(doc.notifications.pending).toBe(0);
  });

  it("a KAM that answers 500 three times gets every event of an execution exactly once, in order", async () => {
    // Four events: the approval stage waits, the execution is paused, resumed (after the approval), and completes.
    const { body } = await startExecution({ template_name: "approval_pipeline", parameters: { echo: "ordered" }, client_id: "kam-flaky-3-order", notify: true });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[1]?.status === "awaiting_approval");
    const ops = { ...OPS, ...JSON_HEADERS };
    expect((await call(`/executions/${id}/pause`, { method: "POST", headers: ops })).status).toBe(200);
    expect((await call(`/executions/${id}/stages/stage_2/approve`, { method: "POST", headers: ops, body: "{}" })).status).toBe(200);
    expect((await call(`/executions/${id}/resume`, { method: "POST", headers: ops })).status).toBe(200);
    expect((await waitFor(id, ended)).status).toBe("completed");
    const types = ["stage.awaiting_approval", "execution.paused", "execution.resumed", "execution.completed"];
    const got = await waitForEvents(id, (r) => r.events.length === 4);
    expect(got.events.map((e) => e.type)).toEqual(types);
    // The first event is refused three times and holds the others back: nothing overtakes it, nothing is repeated.
    expect(got.receipts.map((r) => [r.type, r.answered])).toEqual([
      [types[0], 500],
      [types[0], 500],
      [types[0], 500],
      [types[0], 200],
      [types[1], 200],
      [types[2], 200],
      [types[3], 200],
    ]);
    expect(new Set(got.events.map((e) => e.event_id)).size).toBe(4);
    expect((await waitFor(id, (d) => d.notifications.delivered === 4)).notifications.pending).toBe(0);
  });

  it("failed and cancelled executions send execution.failed (with the error) and execution.cancelled", async () => {
    const failed = await startExecution({ template_name: "no_such_template", parameters: {}, client_id: "client_notify", notify: true });
    const f = await waitForEvents(failed.body.execution_id, (r) => r.events.length === 1);
    expect(f.events[0]).toMatchObject({ type: "execution.failed", status: "failed", error: { code: "template_not_found" } });

    const slow = await startExecution({ template_name: "quick_summary", parameters: { steps: 50, step_ms: 200 }, client_id: "client_notify", notify: true, request_id: "notify-cancel-1" });
    await call(`/executions/${slow.body.execution_id}/cancel`, { method: "POST", headers: KAM });
    const c = await waitForEvents(slow.body.execution_id, (r) => r.events.length === 1);
    expect(c.events[0]).toMatchObject({ type: "execution.cancelled", status: "cancelled", request_id: "notify-cancel-1", error: { code: "cancelled" } });
  });

  it("an event KAM never accepts is kept trying for the retry window, then shown as undeliverable", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "kam-flaky-100000-down", notify: true });
    const doc = await waitFor(body.execution_id, (d) => d.notifications.undeliverable.length === 1, 25_000);
    const got = await received(body.execution_id);
    expect(got.events).toEqual([]);
    expect(doc.notifications.undeliverable[0]).toMatchObject({ type: "execution.completed", attempts: got.receipts.length, last_error: "KAM answered 500" });
    expect(got.receipts.length).toBeGreaterThan(1);
    expect(doc.notifications.pending).toBe(0);
  });

  it("sends nothing when notify is off (the NOTIFY_DEFAULT here is false)", async () => {
    const quiet = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_notify" });
    const doc = await waitFor(quiet.body.execution_id, ended);
    expect(doc.notifications).toEqual({ enabled: false, delivered: 0, pending: 0, undeliverable: [] });
    // A later execution with notify on is delivered, so delivery had time to happen for the first one too.
    const loud = await startExecution({ template_name: "quick_summary", parameters: fast, client_id: "client_notify", notify: true });
    await waitForEvents(loud.body.execution_id, (r) => r.events.length === 1);
    expect((await received(quiet.body.execution_id)).receipts).toEqual([]);
    expect((await status(quiet.body.execution_id)).notifications.delivered).toBe(0);
  });

  it("NOTIFY_DEFAULT = \"true\" turns notify on for a request that does not say; notify: false still turns it off", async () => {
    // The front Worker with that var (the executions' objects are the same ones).
    const front = { ...env, NOTIFY_DEFAULT: "true" } as unknown as Env;
    const start = async (extra: Record<string, unknown>) => {
      const req = new Request("http://orchestrator.test/execute", {
        method: "POST",
        headers: { ...KAM, ...JSON_HEADERS },
        body: JSON.stringify({ template_name: "quick_summary", parameters: fast, client_id: "client_notify", ...extra }),
      });
      const res = await handle(req, front, createExecutionContext());
      expect(res.status).toBe(202);
      return ((await res.json()) as { execution_id: string }).execution_id;
    };
    const byDefault = await start({});
    const off = await start({ notify: false });
    expect((await waitForEvents(byDefault, (r) => r.events.length === 1)).events[0].type).toBe("execution.completed");
    expect((await status(byDefault)).notifications.enabled).toBe(true);
    const quiet = await waitFor(off, ended);
    expect(quiet.notifications.enabled).toBe(false);
    expect((await received(off)).receipts).toEqual([]);
  });

  it("refuses a notify that is not a boolean, with the field named", async () => {
    const { res, body } = await startExecution({ template_name: "quick_summary", parameters: {}, client_id: "client_notify", notify: "yes" });
    expect(res.status).toBe(400);
    expect(body.error.code).toBe("invalid_request");
    expect(JSON.stringify(body.error.details)).toContain("notify");
  });
});
