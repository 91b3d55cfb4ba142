import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { LiveMessage, LiveTicket, type StatusDocument } from "../../schemas/api";
import { KAM, OPS, call, executionStub, startExecution, status } from "../support/api";

const socketCount = (id: string) => runInDurableObject(executionStub(id), (_o, state) => state.getWebSockets().length);

async function ticketFor(id: string, headers: Record<string, string> = OPS): Promise<LiveTicket> {
  const res = await call(`/executions/${id}/live-ticket`, { method: "POST", headers });
  expect(res.status).toBe(200);
  return LiveTicket.parse(await res.json());
}

function connect(id: string, protocols: string[], extra: Record<string, string> = {}): Promise<Response> {
  return call(`/executions/${id}/live`, { headers: { upgrade: "websocket", "sec-websocket-protocol": protocols.join(", "), ...extra } });
}

/** Every document the socket pushes, until it closes (the execution ended). */
function collect(ws: WebSocket): { docs: StatusDocument[]; closed: Promise<{ code: number; reason: string }> } {
  const docs: StatusDocument[] = [];
  ws.addEventListener("message", (e) => docs.push(LiveMessage.parse(JSON.parse(e.data as string)).document));
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.addEventListener("close", (e) => resolve({ code: e.code, reason: e.reason })));
  ws.accept();
  return { docs, closed };
}

/** The states one stage went through as the pushes show them (repeats collapsed). */
function path(docs: StatusDocument[], pick: (d: StatusDocument) => string | undefined): string[] {
  const out: string[] = [];
  for (const d of docs) {
    const v = pick(d);
    if (v !== undefined && out[out.length - 1] !== v) out.push(v);
  }
  return out;
}

describe("live updates over a WebSocket to the execution's object", () => {
  it("pushes every transition of a running execution, then the final document, then closes", async () => {
    // data_relay: two stages of one attempt and a minute's timeout. With fault_two_stage's
    // 1.5 s timeout and two attempts, a loaded machine (stages took 0.5-0.8 s at load 11)
    // once retried stage 1, and its path showed pending..processing a second time.
    const { body } = await startExecution({ template_name: "data_relay", parameters: { steps: 3, step_ms: 80 }, client_id: "client_live" });
    const id = body.execution_id as string;
    const t = await ticketFor(id);
    expect(t.url).toBe(`ws://orchestrator.test/executions/${id}/live`);
    const res = await connect(id, t.protocols);
    expect(res.status).toBe(101);
    expect(res.headers.get("sec-websocket-protocol")).toBe("orchestrator-live.v1");
    const { docs, closed } = collect(res.webSocket!);

    // The socket is a hibernatable one: the object holds it through the Hibernation API, not in memory.
    expect(await runInDurableObject(executionStub(id), (_o, state) => state.getWebSockets().length)).toBe(1);

    expect(await closed).toEqual({ code: 1000, reason: "execution ended" });
    expect(path(docs, (d) => d.status).at(-1)).toBe("completed");
    // The pushes never go back to an older document. (Not one push per version: a push carries the document as
    // it is when it is sent, so two versions can be one push, and two pushes can carry one version; CI saw 4, 6, 6, 7.)
    const versions = docs.map((d) => d.version);
    expect(versions).toEqual([...versions].sort((a, b) => a - b));
    // Each stage's states in the order of the stage machine. `handshaking` is a committed state only when
    // something else is written while the handshake is out (the grant is held in memory until the next write,
    // docs/protocol.md "Status document"), so it is left out of the chain the pushes must follow.
    const chain = ["pending", "waiting_resources", "processing", "completed"];
    const committed = (stage: string) => path(docs, (d) => d.stages.find((s) => s.stage_id === stage)?.status).filter((s) => s !== "handshaking");
    // Stage 1 was already under way at connect: from there on, every state it went through reached the socket.
    const one = committed("stage_1");
    expect(one).toEqual(chain.slice(chain.indexOf(one[0])));
    // Stage 2 was pending at connect: each of its transitions reached the socket, in order.
    expect(committed("stage_2")).toEqual(chain);
    // The last push is the final document.
    expect(docs.at(-1)).toEqual(await status(id));
  });

  it("pushes pause and resume, and answers a client's request for the document", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 30, step_ms: 100 }, client_id: "client_live" });
    const id = body.execution_id as string;
    const res = await connect(id, (await ticketFor(id, KAM)).protocols);
    const ws = res.webSocket!;
    const { docs, closed } = collect(ws);
    /** The first document pushed after the n-th that satisfies `ok` (progress pushes come in between). */
    let seen = 0;
    const until = async (ok: (d: StatusDocument) => boolean) => {
      for (;;) {
        while (docs.length <= seen) await new Promise((r) => ws.addEventListener("message", r, { once: true }));
        const d = docs[seen++];
        if (ok(d)) return d;
      }
    };
    const first = await until(() => true);
    ws.send(JSON.stringify({ type: "status" }));
    expect((await until(() => true)).execution_id).toBe(first.execution_id);
    await call(`/executions/${id}/pause`, { method: "POST", headers: OPS });
    expect((await until((d) => d.status !== "running" && d.status !== "queued")).status).toBe("paused");
    await call(`/executions/${id}/resume`, { method: "POST", headers: OPS });
    expect((await until((d) => d.status !== "paused")).status).toBe("running");
    await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
    expect((await closed).code).toBe(1000);
    expect(docs.at(-1)?.status).toBe("cancelled");
  });

  it("a ticket opens one socket: a second use within its minute is refused (ticket_used), also when two race", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 30, step_ms: 100 }, client_id: "client_live" });
    const id = body.execution_id as string;
    const t = await ticketFor(id);
    const first = await connect(id, t.protocols);
    expect(first.status).toBe(101);
    first.webSocket!.accept();
    const again = await connect(id, t.protocols);
    expect(again.status).toBe(401);
    expect(((await again.json()) as any).error.code).toBe("ticket_used");
    // The caller cannot name another use: the front sets the header from the verified ticket.
    const smuggled = await connect(id, t.protocols, { "x-orchestrator-live-ticket": `${"A".repeat(22)}.${Date.now() + 60_000}` });
    expect(smuggled.status).toBe(401);
    expect(((await smuggled.json()) as any).error.code).toBe("ticket_used");
    expect(await socketCount(id)).toBe(1);

    // Two sockets at once with one fresh ticket: exactly one opens.
    const u = await ticketFor(id);
    const raced = await Promise.all([connect(id, u.protocols), connect(id, u.protocols)]);
    expect(raced.map((r) => r.status).sort()).toEqual([101, 401]);
    for (const r of raced) if (r.status === 101) r.webSocket!.accept();
    expect(await socketCount(id)).toBe(2);
    // Used tickets are remembered until they expire, then forgotten: each open clears the expired ones.
    const used = () => runInDurableObject(executionStub(id), (_o, state) => state.storage.sql.exec("SELECT nonce, expires_at FROM live_tickets ORDER BY expires_at").toArray());
    expect((await used()).map((r) => Number(r.expires_at) > Date.now())).toEqual([true, true]);
    await runInDurableObject(executionStub(id), (_o, state) => {
      state.storage.sql.exec("INSERT INTO live_tickets (nonce, expires_at) VALUES (?, ?)", "expired-ticket-nonce-0", Date.now() - 1);
    });
    expect(await used()).toHaveLength(3);
    // A new ticket opens a new socket.
    const v = await connect(id, (await ticketFor(id)).protocols);
    expect(v.status).toBe(101);
    v.webSocket!.accept();
    expect(await socketCount(id)).toBe(3);
    const left = await used();
    expect(left).toHaveLength(3);
    expect(left.map((r) => r.nonce)).not.toContain("expired-ticket-nonce-0");
    await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
  });

  it("opens only with a valid ticket for that execution, offered as a subprotocol (never a token in the URL)", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_live" });
    const id = body.execution_id as string;
    const other = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_live" });
    const t = await ticketFor(id);
    const cases: [string, Promise<Response>, number, string][] = [
      ["no ticket", connect(id, ["orchestrator-live.v1"]), 401, "unauthorized"],
      ["forged ticket", connect(id, ["orchestrator-live.v1", `ticket.${t.ticket.slice(0, -2)}xx`]), 401, "unauthorized"],
      ["another execution's ticket", connect(other.body.execution_id, t.protocols), 403, "forbidden"],
      ["the bearer token as a ticket", connect(id, ["orchestrator-live.v1", "ticket.test-ops-token"]), 401, "unauthorized"],
      ["without the protocol", connect(id, [`ticket.${t.ticket}`]), 400, "invalid_request"],
      ["not a WebSocket", call(`/executions/${id}/live`, { headers: OPS }), 426, "upgrade_required"],
    ];
    for (const [name, pending, code, errorCode] of cases) {
      const res = await pending;
      expect(res.status, name).toBe(code);
      expect(((await res.json()) as any).error.code, name).toBe(errorCode);
    }
    expect(await runInDurableObject(executionStub(id), (_o, state) => state.getWebSockets().length)).toBe(0);
    // Tickets come only from an authenticated request, for an execution that exists.
    expect((await call(`/executions/${id}/live-ticket`, { method: "POST" })).status).toBe(401);
    expect((await call("/executions/exec_1700000000000_AAAAAAAAAAAAAAAA/live-ticket", { method: "POST", headers: OPS })).status).toBe(404);
  });
});
