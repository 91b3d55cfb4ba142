import type { StatusDocument } from "../../schemas/api";
import { LIVE_PROTOCOL } from "../../src/live-ticket";
import { isTerminalExecution } from "../stage-machine";
import type { ExecutionRow, Store } from "./store";

/**
 * The live status push (docs/protocol.md, "Live updates"): sockets accepted
 * through the Hibernation API, so an idle one does not keep the object in
 * memory and `ping` is answered by the runtime without waking it. Every change
 * the status document shows is pushed once per turn, however many rows the
 * transition moved.
 */
export class Live {
  readonly #ctx: DurableObjectState;
  readonly #store: Store;
  readonly #document: (ex: ExecutionRow) => StatusDocument;
  /** A push is queued for the end of this turn. */
  #queued = false;

  constructor(ctx: DurableObjectState, store: Store, document: (ex: ExecutionRow) => StatusDocument) {
    this.#ctx = ctx;
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

  /** Opens a socket (the caller is already authenticated by the front Worker's ticket check). */
  open(request: Request): Response {
    const ex = this.#store.row();
    if (!ex) return Response.json({ error: { code: "not_found", message: "no such execution" } }, { status: 404 });
    if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return Response.json({ error: { code: "upgrade_required", message: "connect with a WebSocket" } }, { status: 426 });
    }
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
