import type { StatusDocument } from "../../schemas/api";
import { LIVE_PROTOCOL, TICKET_USE_HEADER } from "../../src/live-ticket";
import type { Sql } from "../sql";
import { isTerminalExecution } from "../stage-machine";
import type { ExecutionRow, Store } from "./store";

/**
 * The live status push (docs/protocol.md, "Live updates"): sockets accepted
 * through the Hibernation API, so an idle one does not keep the object in
 * memory and `ping` is answered by the runtime without waking it. Every change
 * the status document shows is pushed once per turn, however many rows the
 * transition moved. A ticket opens one socket: its nonce is kept in
 * `live_tickets` until the ticket expires, and a second use is refused.
 */
export const LIVE_TICKETS_SCHEMA = "CREATE TABLE IF NOT EXISTS live_tickets (nonce TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;";

const TICKET_USE = /^([A-Za-z0-9_-]{22})\.(\d{1,15})$/;

export class Live {
  readonly #ctx: DurableObjectState;
  readonly #sql: Sql;
  readonly #store: Store;
  readonly #document: (ex: ExecutionRow) => StatusDocument;
  /** A push is queued for the end of this turn. */
  #queued = false;

  constructor(ctx: DurableObjectState, sql: Sql, store: Store, document: (ex: ExecutionRow) => StatusDocument) {
    this.#ctx = ctx;
    this.#sql = sql;
    this.#store = store;
    this.#document = document;
  }

  changed(): void {
    if (this.#queued) return;
    this.#queued = true;
    // After the synchronous transition that called this: the document is whole by then.
    queueMicrotask(() => {
      this.#queued = false;
      const ex = this.#store.row();
      const sockets = this.#ctx.getWebSockets();
      if (ex && sockets.length > 0) this.#pushTo(sockets, ex);
    });
  }

  /** Opens a socket (the caller is already authenticated by the front Worker's ticket check), once per ticket. */
  open(request: Request, now: number): Response {
    const ex = this.#store.row();
    if (!ex) return Response.json({ error: { code: "not_found", message: "no such execution" } }, { status: 404 });
    if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return Response.json({ error: { code: "upgrade_required", message: "connect with a WebSocket" } }, { status: 426 });
    }
    const use = TICKET_USE.exec(request.headers.get(TICKET_USE_HEADER) ?? "");
    if (!use) return Response.json({ error: { code: "unauthorized", message: "missing live ticket" } }, { status: 401 });
    // Synchronous from the check to the insert: two sockets racing with one ticket cannot both pass.
    this.#sql`DELETE FROM live_tickets WHERE expires_at <= ${now}`;
    if (this.#sql`SELECT 1 FROM live_tickets WHERE nonce = ${use[1]}`.length > 0) {
      return Response.json({ error: { code: "ticket_used", message: "this live ticket was used already: ask for a new one" } }, { status: 401 });
    }
    this.#sql`INSERT INTO live_tickets (nonce, expires_at) VALUES (${use[1]}, ${Number(use[2])})`;
    const { 0: client, 1: server } = new WebSocketPair();
    this.#ctx.acceptWebSocket(server);
    this.#ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair("ping", "pong"));
    this.#pushTo([server], ex);
    return new Response(null, { status: 101, webSocket: client, headers: { "sec-websocket-protocol": LIVE_PROTOCOL } });
  }

  /** A client may ask for the document again with `{"type":"status"}`; anything else is ignored. */
  message(ws: WebSocket, message: string | ArrayBuffer): void {
    const ex = this.#store.row();
    if (ex && typeof message === "string" && message.includes('"status"')) this.#pushTo([ws], ex);
  }

  static closed(ws: WebSocket, code: number, reason: string): void {
    try {
      ws.close(code, reason);
    } catch {
      // already closed
    }
  }

  /** Sends the status document; an ended execution's sockets are closed after it (nothing more will change). */
  #pushTo(sockets: WebSocket[], ex: ExecutionRow): void {
    const text = JSON.stringify({ type: "status", document: this.#document(ex) });
    for (const ws of sockets) {
      try {
        ws.send(text);
        if (isTerminalExecution(ex.status)) ws.close(1000, "execution ended");
      } catch {
        // The socket went away meanwhile; the runtime drops it.
      }
    }
  }
}
