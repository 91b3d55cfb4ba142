import type { ExecutionEvent, EventType, NotificationsDocument } from "../../schemas/api";
import type { ErrorInfo } from "../../schemas/common";
import { emit } from "../../src/metrics";
import { SIGNATURE_HEADER, signatureHeader } from "../../src/notify-signature";
import { secretPair } from "../../src/secrets";
import { retryDelayMs } from "../stage-machine";
import type { Core } from "./store";

/**
 * Event notifications to KAM (docs/protocol.md, "Event notifications"): the
 * event outbox. An event is a row of `events`, written in the transition that
 * decides it (same synchronous run, so it is durable exactly when the state
 * change is), with its body fixed at that moment: a redelivery sends the same
 * bytes and the same `event_id`, only the signature's `t` is new.
 *
 * Delivery is one at a time, oldest first, so KAM sees an execution's events in
 * order: the next is sent only once the one before it was answered 2xx (or,
 * after `notifyRetryWindowMs` of failures, recorded as undeliverable). A row
 * being sent is claimed (due again only after the call timeout), so an object
 * evicted mid-call sends it again from its alarm: at least once.
 */
export const EVENTS_SCHEMA = `
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, body TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
  next_at INTEGER NOT NULL, delivered_at INTEGER, last_error TEXT
);
`;

interface EventRow {
  seq: number;
  event_id: string;
  type: EventType;
  body: string;
  state: "pending" | "delivered" | "undeliverable";
  attempts: number;
  created_at: number;
  next_at: number;
  delivered_at: number | null;
  last_error: string | null;
}

export interface EventFields {
  stage_id?: string;
  error?: ErrorInfo | null;
  cost?: ExecutionEvent["cost"];
  result_url?: string;
}

export class Notifier {
  readonly #c: Omit<Core, "notifier" | "outbox">;
  /** The event this instance is sending now (one at a time: order per execution). */
  #inFlight: number | null = null;

  constructor(core: Omit<Core, "notifier" | "outbox">) {
    this.#c = core;
  }

  /**
   * Records an event for KAM when the execution asked for notifications, and
   * sends it now unless an earlier one is still on its way. Synchronous: call it
   * inside the transition that decides the event.
   */
  emit(type: EventType, fields: EventFields, now: number): void {
    const ex = this.#c.store.row();
    if (!ex?.notify) return;
    const event: ExecutionEvent = {
      event_id: `evt_${crypto.randomUUID().replaceAll("-", "")}`,
      type,
      execution_id: ex.execution_id,
      client_id: ex.client_id,
      request_id: ex.request_id,
      status: ex.status,
      ...(fields.stage_id ? { stage_id: fields.stage_id } : {}),
      ...(fields.error ? { error: fields.error } : {}),
      ...(fields.cost ? { cost: fields.cost } : {}),
      ...(fields.result_url ? { result_url: fields.result_url } : {}),
      occurred_at: new Date(now).toISOString(),
    };
    this.#c.sql`INSERT INTO events (event_id, type, body, created_at, next_at)
      VALUES (${event.event_id}, ${type}, ${JSON.stringify(event)}, ${now}, ${now})`;
    this.#c.store.log("info", "event_recorded", { event_id: event.event_id, type });
    this.pump(now);
  }

  /** Sends the oldest pending event if it is due and none is on its way (the drive pass calls this too). */
  pump(now: number): void {
    if (this.#inFlight !== null) return;
    const head = this.#head();
    if (!head) {
      this.#c.timers.clear("notify");
      return;
    }
    if (head.next_at > now) {
      this.#c.timers.set("notify", head.next_at);
      return;
    }
    // Claimed past the call timeout: an instance evicted mid-call leaves it to the alarm.
    const claim = now + this.#c.config.tuning.notifyTimeoutMs + 1_000;
    this.#c.sql`UPDATE events SET next_at = ${claim} WHERE seq = ${head.seq}`;
    this.#c.timers.set("notify", claim);
    this.#inFlight = head.seq;
    this.#send(head)
      .catch((err: unknown) => ({ ok: false, error: err instanceof Error ? err.message : String(err) }))
      .then(async (r) => {
        this.#inFlight = null;
        this.#answered(head, r, Date.now());
        this.pump(Date.now());
        await this.#c.rearm();
      })
      .catch(() => {});
  }

  /** What the status document shows: counts, and every event given up on. */
  document(): NotificationsDocument {
    if (this.#none()) return { enabled: false, delivered: 0, pending: 0, undeliverable: [] };
    const counts = this.#c.reads.memo("events:counts", ["events"], () => this.#c.sql<{ state: EventRow["state"]; n: number }>`SELECT state, COUNT(*) AS n FROM events GROUP BY state`);
    const n = (state: EventRow["state"]) => counts.find((r) => r.state === state)?.n ?? 0;
    const rows = this.#c.reads.memo("events:undeliverable", ["events"], () => this.#c.sql<EventRow>`SELECT * FROM events WHERE state = 'undeliverable' ORDER BY seq`);
    const undeliverable = rows.map((r) => ({
      event_id: r.event_id,
      type: r.type,
      attempts: r.attempts,
      last_error: r.last_error ?? "",
      occurred_at: new Date(r.created_at).toISOString(),
    }));
    return { enabled: !!this.#c.store.row()?.notify, delivered: n("delivered"), pending: n("pending"), undeliverable };
  }

  /** The oldest pending event, from memory until the next write to `events` (every drive pass asks). */
  #head(): EventRow | null {
    if (this.#none()) return null;
    return this.#c.reads.memo("events:head", ["events"], () => this.#c.sql<EventRow>`SELECT * FROM events WHERE state = 'pending' ORDER BY seq LIMIT 1`[0] ?? null);
  }

  /**
   * An execution that did not ask for notifications has no events (emit writes none, and `notify` is
   * fixed at start), so its reads of them run no statement (docs/performance.md, "Fewer distinct
   * statements"); the check mode asks SQL that the table is empty.
   */
  #none(): boolean {
    const ex = this.#c.store.row();
    if (ex?.notify) return false;
    if (ex && this.#c.reads.checking && this.#c.sql`SELECT 1 FROM events LIMIT 1`.length > 0) throw new Error("read cache: events of an execution without notifications");
    return true;
  }

  async #send(row: EventRow): Promise<{ ok: boolean; error?: string }> {
    const secret = secretPair(this.#c.env, "NOTIFY_SECRET")?.current;
    if (!secret) return { ok: false, error: "NOTIFY_SECRET is not set" };
    const started = Date.now();
    const res = await this.#c.env.KAM.fetch("https://kam.internal/api/orchestrator/events", {
      method: "POST",
      headers: {
        ...this.#c.store.executionTraceHeaders(),
        "content-type": "application/json",
        [SIGNATURE_HEADER]: await signatureHeader(secret, row.body, Date.now()),
      },
      body: row.body,
      signal: AbortSignal.timeout(this.#c.config.tuning.notifyTimeoutMs),
    });
    // The answer's body is not used; reading it frees the connection.
    await res.body?.cancel();
    this.#c.store.log("info", "event_delivery", { event_id: row.event_id, type: row.type, attempt: row.attempts + 1, http_status: res.status, duration_ms: Date.now() - started });
    emit(this.#c.env, { event: "notification", execution_id: this.#c.store.row()?.execution_id, kind: row.type, outcome: String(res.status), attempt: row.attempts + 1, duration_ms: Date.now() - started });
    return res.ok ? { ok: true } : { ok: false, error: `KAM answered ${res.status}` };
  }

  /** Applies a delivery's answer: delivered, retry after a backoff, or (past the retry window) undeliverable. */
  #answered(row: EventRow, r: { ok: boolean; error?: string }, now: number): void {
    const attempts = row.attempts + 1;
    if (r.ok) {
      this.#c.sql`UPDATE events SET state = 'delivered', attempts = ${attempts}, delivered_at = ${now} WHERE seq = ${row.seq}`;
      return;
    }
    const t = this.#c.config.tuning;
    if (now - row.created_at >= t.notifyRetryWindowMs) {
      this.#c.sql`UPDATE events SET state = 'undeliverable', attempts = ${attempts}, last_error = ${r.error ?? null} WHERE seq = ${row.seq}`;
      this.#c.store.log("error", "event_undeliverable", { event_id: row.event_id, type: row.type, attempts, error: r.error });
      return;
    }
    const next = now + Math.max(1, retryDelayMs(attempts, t.notifyRetryBaseMs, t.notifyRetryCapMs));
    this.#c.sql`UPDATE events SET attempts = ${attempts}, last_error = ${r.error ?? null}, next_at = ${next} WHERE seq = ${row.seq}`;
    this.#c.store.log("warn", "event_delivery_failed", { event_id: row.event_id, type: row.type, attempts, error: r.error });
  }
}
