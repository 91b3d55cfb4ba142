import { DurableObject } from "cloudflare:workers";

/**
 * The demo KAM's receiver of the orchestrator's event notifications
 * (`POST /api/orchestrator/events`): it verifies the signature exactly as
 * docs/protocol.md shows a receiver should, records every delivery attempt and
 * each event once (by `event_id`), and answers 2xx. One `KamEvents` object per
 * execution keeps what arrived, in arrival order.
 *
 * A fault knob for the orchestrator's tests: an execution whose `client_id`
 * starts with `kam-flaky-<n>-` is answered 500 for its first n deliveries.
 */

export interface EventsEnv {
  NOTIFY_SECRET: string;
  EVENTS: DurableObjectNamespace<KamEvents>;
}

/** Rejects a signature older than this (replays), and one from too far in the future. */
export const SIGNATURE_TOLERANCE_MS = 5 * 60_000;

const encoder = new TextEncoder();

/** Verifies `t=<unix ms>,v1=<hex HMAC-SHA256("<t>.<raw body>")>`; returns why not, or null. */
export async function verifySignature(secret: string, header: string | null, rawBody: string, now: number): Promise<string | null> {
  if (!header) return "missing signature";
  const parts = new Map(header.split(",").map((p) => p.trim().split("=", 2) as [string, string]));
  const t = Number(parts.get("t"));
  const v1 = parts.get("v1") ?? "";
  if (!Number.isInteger(t) || !/^[0-9a-f]{64}$/.test(v1)) return "malformed signature";
  if (Math.abs(now - t) > SIGNATURE_TOLERANCE_MS) return "signature timestamp outside the tolerance";
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const expected = new Uint8Array(await crypto.subtle.sign("HMAC", key, encoder.encode(`${t}.${rawBody}`)));
  const given = new Uint8Array(v1.match(/../g)!.map((h) => Number.parseInt(h, 16)));
  // Constant time: the comparison does not say how much of the MAC matched.
  return crypto.subtle.timingSafeEqual(expected, given) ? null : "signature mismatch";
}

interface Receipt {
  event_id: string;
  type: string;
  answered: number;
  t: number;
}

export class KamEvents extends DurableObject<EventsEnv> {
  constructor(ctx: DurableObjectState, env: EventsEnv) {
    super(ctx, env);
    ctx.blockConcurrencyWhile(async () => {
      ctx.storage.sql.exec(`
        CREATE TABLE IF NOT EXISTS receipts (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, type TEXT NOT NULL, answered INTEGER NOT NULL, t INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, n INTEGER NOT NULL, body TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS traces (n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, traceparent TEXT);
        CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, n INTEGER NOT NULL);`);
    });
  }

  /** The revision a `revised_{name}` template answers with: one more on every fetch (index.ts). */
  revise(name: string): number {
    return this.ctx.storage.sql.exec<{ n: number }>("INSERT INTO revisions (name, n) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET n = n + 1 RETURNING n", name).one().n;
  }

  /** One verified delivery: answers 500 while the flaky knob says so, else records the event once. */
  receive(event: { event_id: string; type: string; client_id: string }, body: string, t: number, traceparent: string | null = null): number {
    const sql = this.ctx.storage.sql;
    sql.exec("INSERT INTO traces (event_id, traceparent) VALUES (?, ?)", event.event_id, traceparent);
    const failFirst = Number(/^kam-flaky-(\d+)-/.exec(event.client_id)?.[1] ?? 0);
    const seen = sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM receipts").one().n;
    const answered = seen < failFirst ? 500 : 200;
    sql.exec("INSERT INTO receipts (event_id, type, answered, t) VALUES (?, ?, ?, ?)", event.event_id, event.type, answered, t);
    if (answered === 200) {
      const n = sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM events").one().n;
      sql.exec("INSERT OR IGNORE INTO events (event_id, n, body) VALUES (?, ?, ?)", event.event_id, n + 1, body);
    }
    return answered;
  }

  /** Every delivery attempt, and the events de-duplicated by `event_id`, in arrival order. */
  received(): { receipts: Receipt[]; events: unknown[]; traceparents: (string | null)[] } {
    const sql = this.ctx.storage.sql;
    return {
      // The W3C traceparent each delivery carried, in arrival order.
      traceparents: sql.exec<{ traceparent: string | null }>("SELECT traceparent FROM traces ORDER BY n").toArray().map((r) => r.traceparent),
      receipts: sql.exec<Receipt & Record<string, SqlStorageValue>>("SELECT event_id, type, answered, t FROM receipts ORDER BY n").toArray(),
      events: sql.exec<{ body: string }>("SELECT body FROM events ORDER BY n").toArray().map((r) => JSON.parse(r.body)),
    };
  }
}

function json(status: number, body: unknown): Response {
  return Response.json(body, { status });
}

/** `POST /api/orchestrator/events` (from the orchestrator) and `GET ...?execution_id=` (what arrived, for tests and demos). */
export async function handleEvents(request: Request, env: EventsEnv): Promise<Response> {
  if (request.method === "GET") {
    const id = new URL(request.url).searchParams.get("execution_id");
    if (!id) return json(400, { error: { code: "bad_request", message: "execution_id is required" } });
    return json(200, await env.EVENTS.get(env.EVENTS.idFromName(id)).received());
  }
  const raw = await request.text();
  const why = await verifySignature(env.NOTIFY_SECRET, request.headers.get("x-orchestrator-signature"), raw, Date.now());
  if (why) return json(401, { error: { code: "bad_signature", message: why } });
  let event: { event_id: string; type: string; execution_id: string; client_id: string };
  try {
    event = JSON.parse(raw);
  } catch {
    return json(400, { error: { code: "bad_request", message: "not JSON" } });
  }
  const t = Number(/t=(\d+)/.exec(request.headers.get("x-orchestrator-signature") ?? "")?.[1]);
  const answered = await env.EVENTS.get(env.EVENTS.idFromName(event.execution_id)).receive(event, raw, t, request.headers.get("traceparent"));
  return json(answered, answered === 200 ? { ok: true } : { error: { code: "flaky", message: "the demo KAM fails this delivery on purpose" } });
}
