import type { IndexEntry } from "../../schemas/index-entry";
import { indexFor } from "../../src/index-routing";
import { ledgerForClient, ledgerShard } from "../../src/ledger-routing";
import { emit } from "../../src/metrics";
import { withTimeout } from "../../src/outbound";
import { WorkerClient } from "../../src/worker-client";
import { isTerminalExecution, retryDelayMs } from "../stage-machine";
import type { Execution } from "./index";
import type { Core } from "./store";

/**
 * `shard`: the ledger shard the message goes to (ledger-routing.ts); rows
 * written before sharding have none and go to shard 0 (`global` with one shard).
 */
export type OutboxItem =
  | { kind: "ledger_settle"; shard?: number; reservationId: string; usage: Record<string, number>; durationMs: number; stageUsage?: Record<string, number>; stages?: number }
  | { kind: "ledger_release"; shard?: number; reservationId: string }
  | { kind: "slot_release"; executionId: string }
  | { kind: "worker_cancel"; worker: string; stageId: string; attempt: number }
  | { kind: "index_upsert"; entry: IndexEntry }
  | { kind: "rerun_link"; of: string; executionId: string }
  | { kind: "data_release"; owner: string; holder: string };

export type SettleItem = Extract<OutboxItem, { kind: "ledger_settle" }>;
/** A held settle taken to ride on a reserve: its outbox row and message. */
export interface Ride {
  id: number;
  item: SettleItem;
}

/** A message marked undeliverable, as the status document and `GET /resources/undeliverable` show it. */
export interface Undeliverable {
  outbox_id: number;
  kind: OutboxItem["kind"];
  since: string;
  attempts: number;
  last_error: string | null;
}

/** The KV key under which an undeliverable message is listed for operators (`EXECUTION_CACHE`). */
export const undeliverableKey = (executionId: string, outboxId: number) => `undeliverable:${executionId}:${outboxId}`;

/**
 * Durable at-least-once messages to other systems (ledger settle and release,
 * worker cancel, the index summary), written in the transition that decides
 * them and delivered in the background: the execution path never waits on them.
 */
export class Outbox {
  readonly #c: Omit<Core, "outbox">;
  /** Outbox rows this instance is delivering now (a flush does not claim them again). */
  readonly #inFlight = new Set<number>();
  /**
   * Outbox rows delivered whose DELETE waits for the object's next write (an
   * ended execution's: its alarm at the outbox timer), so a delivery costs no commit of its own. Lost with an eviction,
   * the rows are delivered again when their claim runs out: every delivery is
   * idempotent (ledger settle and release, versioned index updates, cancels).
   */
  #delivered: number[] = [];
  /**
   * A completed stage's settle, written to the outbox but held back so that it
   * rides on the next stage's reserve (one ledger round trip instead of two).
   * Whatever is still held when a drive pass ends is sent on its own.
   */
  #held: Ride | null = null;
  /**
   * A live execution's index summary, written to the outbox and held back for `indexHoldMs`: a newer
   * summary written meanwhile takes its row and goes in its place, one delivery for both (an ended
   * execution's at once). Lost with an eviction, the row is delivered when its claim runs out.
   */
  #heldIndex: { id: number; item: OutboxItem; timer: ReturnType<typeof setTimeout> } | null = null;
  /**
   * No message is marked undeliverable (a read found none since): only #failed marks one, so
   * until it does the list costs no statement after each outbox write.
   */
  #noneUndeliverable = false;
  /**
   * Check mode (readCacheCheck): a shortcut of a background delivery found wrong. Nothing awaits that
   * delivery, so a throw there would be lost; the next status build's `undeliverable()` throws it.
   */
  #mismatch: string | null = null;

  constructor(core: Omit<Core, "outbox">) {
    this.#c = core;
  }

  /**
   * Writes a message to the outbox and starts delivering it. The row is written
   * claimed (due again only after the longest call timeout) in the same
   * transaction as the transition that made it, and the output gate holds the
   * call until that transaction is durable: the message goes out at least once,
   * and if this instance is evicted mid-delivery the outbox timer sends it again.
   */
  enqueue(item: OutboxItem, now: number, opts: { hold?: boolean } = {}): void {
    const ended = item.kind === "index_upsert" && isTerminalExecution(item.entry.status);
    const held = item.kind === "index_upsert" ? this.#heldIndex : null;
    if (held) {
      // The newer summary takes the held one's row (its claim and timer stay): one delivery for both.
      this.#c.sql`UPDATE outbox SET payload = ${JSON.stringify(item)} WHERE id = ${held.id}`;
      held.item = item;
      if (ended) this.#sendHeldIndex();
      return;
    }
    this.#purgeDelivered();
    const due = now + this.#claimMs();
    const row = this.#c.sql<{ id: number }>`INSERT INTO outbox (kind, payload, next_at, created_at)
      VALUES (${item.kind}, ${JSON.stringify(item)}, ${due}, ${now}) RETURNING id`[0];
    this.#c.timers.setNoLaterThan("outbox", due);
    if (opts.hold && item.kind === "ledger_settle") {
      this.sendHeld(); // at most one held: an older one goes now
      this.#held = { id: row.id, item };
      return;
    }
    const holdMs = this.#c.config.tuning.indexHoldMs;
    if (item.kind === "index_upsert" && !ended && holdMs > 0) {
      // Claimed as in flight meanwhile, so a flush does not send it around the hold.
      this.#inFlight.add(row.id);
      this.#heldIndex = { id: row.id, item, timer: setTimeout(() => this.#sendHeldIndex(), holdMs) };
      return;
    }
    this.#deliverInBackground(row.id, item, 0);
  }

  /** Sends the held index summary (its hold ran out, or an ended execution's summary took its row). */
  #sendHeldIndex(): void {
    const h = this.#heldIndex;
    if (!h) return;
    this.#heldIndex = null;
    clearTimeout(h.timer);
    this.#deliverInBackground(h.id, h.item, 0);
  }

  /** Sends the held settle on its own (the drive pass ended without a reserve to ride on). */
  sendHeld(): void {
    const h = this.#held;
    if (!h) return;
    this.#held = null;
    this.#deliverInBackground(h.id, h.item, 0);
  }

  /** Takes the held settle to ride on a reserve to `shard` (only one for that shard rides); the caller reports the answer with `settled`. */
  takeHeld(shard: number): Ride | null {
    const ride = this.#held;
    if (ride && (ride.item.shard ?? 0) !== shard) return null;
    this.#held = null;
    if (ride) this.#inFlight.add(ride.id);
    return ride;
  }

  /** The answer to a settle that rode on a reserve: delivered, or (null: refused or unknown) sent again on its own. */
  settled(ride: Ride, result: { ok: boolean; unknownPools: string[] } | null): void {
    this.#inFlight.delete(ride.id);
    if (result === null) {
      this.#deliverInBackground(ride.id, ride.item, 0);
      return;
    }
    this.#noteSettle(result);
    this.#delivered.push(ride.id);
  }

  /** Redelivers due outbox messages (failed earlier, or claimed by an instance that was evicted), in the background. */
  flush(): void {
    const purged = this.#purgeDelivered();
    const now = Date.now();
    const busy = JSON.stringify([...this.#inFlight]);
    const due = this.#c.sql<{ id: number; payload: string; attempts: number }>`
      UPDATE outbox SET next_at = ${now + this.#claimMs()}
      WHERE next_at <= ${now} AND id NOT IN (SELECT value FROM json_each(${busy})) RETURNING id, payload, attempts`;
    for (const row of due) this.#deliverInBackground(row.id, JSON.parse(row.payload) as OutboxItem, row.attempts);
    if (purged || due.length > 0) this.#armTimer();
  }

  /** Usage the ledger has no pool for is recorded there; we say so once per settle. */
  #noteSettle(result: { unknownPools: string[] }): void {
    if (result.unknownPools.length) this.#c.store.log("warn", "usage_in_unknown_pools", { pools: result.unknownPools });
  }

  /** How long a message being delivered stays claimed: past the longest call timeout. */
  #claimMs(): number {
    const t = this.#c.config.tuning;
    return Math.max(t.ledgerCallTimeoutMs, t.workerCallTimeoutMs, t.objectCallTimeoutMs) + 1_000;
  }

  /** Deletes the rows of delivered messages; true when there were any. */
  #purgeDelivered(): boolean {
    if (this.#delivered.length === 0) return false;
    this.#c.sql`DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(${JSON.stringify(this.#delivered)}))`;
    this.#delivered = [];
    return true;
  }

  #armTimer(): void {
    const next = this.#c.sql<{ at: number | null }>`SELECT MIN(next_at) AS at FROM outbox`[0]?.at ?? null;
    if (next === null) this.#c.timers.clear("outbox");
    else this.#c.timers.set("outbox", next);
  }

  /**
   * Delivers one message. A failure is never dropped: the message is tried
   * again with a capped backoff for as long as the execution exists, and once
   * it has failed for `outboxUndeliverableMs` it is marked undeliverable (the
   * status document, an error log line, and the operators' list), still retried.
   */
  #deliverInBackground(id: number, item: OutboxItem, attempts: number): void {
    this.#inFlight.add(id);
    let failure: string | null = null;
    this.#deliver(item)
      .catch((err) => {
        failure = String(err);
        return false;
      })
      .then(async (ok) => {
        this.#inFlight.delete(id);
        if (ok) {
          this.#delivered.push(id);
          // A message that never failed (attempts 0) was never marked undeliverable nor listed (#failed does both): no read.
          const row = attempts > 0 || this.#c.reads.checking ? this.#c.sql<{ listed: number; undeliverable_at: number | null }>`SELECT listed, undeliverable_at FROM outbox WHERE id = ${id}`[0] : undefined;
          if (attempts === 0 && (row?.listed || row?.undeliverable_at != null)) {
            this.#mismatch = `outbox: message ${id} never failed, but is marked`;
            this.#c.changed(); // the next read rebuilds the document, and undeliverable() throws it
          }
          // An undeliverable message leaves the status document now, before its row is deleted.
          if (row?.undeliverable_at != null) this.#c.changed();
          const listed = row?.listed === 1;
          if (listed) void this.#unlist(id);
          // Deleted with the object's next write: a live execution's next transition, an
          // ended one's alarm at the outbox timer (set for the rows' claims) at the latest,
          // which fires anyway, so the end's deliveries cost no commit of their own.
          return;
        } else {
          this.#failed(id, item, attempts + 1, failure ?? "refused");
        }
        this.#armTimer();
        await this.#c.rearm();
      })
      .catch(() => {});
  }

  #failed(id: number, item: OutboxItem, attempts: number, error: string): void {
    const t = this.#c.config.tuning;
    const now = Date.now();
    const next = now + t.outboxRetryMs + retryDelayMs(attempts, t.outboxRetryMs, t.outboxRetryCapMs);
    const row = this.#c.sql<{ created_at: number | null; undeliverable_at: number | null; listed: number }>`
      UPDATE outbox SET attempts = ${attempts}, next_at = ${next}, last_error = ${error.slice(0, 500)} WHERE id = ${id}
      RETURNING created_at, undeliverable_at, listed`[0];
    if (!row) return;
    this.#c.store.log("warn", "outbox_delivery_failed", { kind: item.kind, attempts, error });
    // One point per failed delivery: the message will be delivered again (thrown or refused alike).
    emit(this.#c.env, { event: "outbox_redelivery", kind: item.kind, attempt: attempts, execution_id: this.#c.store.row()?.execution_id });
    if (row.undeliverable_at === null && now - (row.created_at ?? now) >= t.outboxUndeliverableMs) {
      this.#noneUndeliverable = false;
      this.#c.sql`UPDATE outbox SET undeliverable_at = ${now} WHERE id = ${id}`;
      this.#c.store.log("error", "outbox_undeliverable", { kind: item.kind, outbox_id: id, attempts, error, since_ms: now - (row.created_at ?? now) });
    }
    if ((row.undeliverable_at !== null || now - (row.created_at ?? now) >= t.outboxUndeliverableMs) && row.listed === 0) void this.#list(id);
  }

  /** Lists an undeliverable message for operators (KV, best effort: tried again at its next failure). */
  async #list(id: number): Promise<void> {
    const u = this.undeliverable().find((x) => x.outbox_id === id);
    const ex = this.#c.store.row();
    if (!u || !ex) return;
    try {
      await withTimeout(
        this.#c.env.EXECUTION_CACHE.put(undeliverableKey(ex.execution_id, id), "1", { metadata: { execution_id: ex.execution_id, ...u } }),
        this.#c.config.tuning.storageCallTimeoutMs,
        "kv.put",
      );
      this.#c.sql`UPDATE outbox SET listed = 1 WHERE id = ${id}`;
    } catch (err) {
      this.#c.store.log("warn", "undeliverable_list_failed", { outbox_id: id, error: String(err) });
    }
  }

  async #unlist(id: number): Promise<void> {
    const ex = this.#c.store.row();
    if (!ex) return;
    await withTimeout(this.#c.env.EXECUTION_CACHE.delete(undeliverableKey(ex.execution_id, id)), this.#c.config.tuning.storageCallTimeoutMs, "kv.delete").catch(
      (err) => this.#c.store.log("warn", "undeliverable_unlist_failed", { outbox_id: id, error: String(err) }),
    );
  }

  /** Messages marked undeliverable and not yet delivered. */
  undeliverable(): Undeliverable[] {
    if (this.#mismatch) throw new Error(this.#mismatch);
    if (this.#noneUndeliverable && !this.#c.reads.checking) return [];
    const marked = this.#c.reads.memo("outbox:undeliverable", ["outbox"], () =>
      this.#c.sql<{ id: number; kind: OutboxItem["kind"]; undeliverable_at: number; attempts: number; last_error: string | null }>`
      SELECT id, kind, undeliverable_at, attempts, last_error FROM outbox WHERE undeliverable_at IS NOT NULL ORDER BY id`,
    );
    if (this.#noneUndeliverable && marked.length > 0) throw new Error("outbox: a message is marked undeliverable, but memory says none is");
    if (marked.length === 0) this.#noneUndeliverable = true;
    return marked
      .filter((r) => !this.#delivered.includes(r.id))
      .map((r) => ({ outbox_id: r.id, kind: r.kind, since: new Date(r.undeliverable_at).toISOString(), attempts: r.attempts, last_error: r.last_error }));
  }

  /** An operator's retry: every undeliverable message is due now. Returns how many. */
  retryUndeliverable(): number {
    const n = this.#c.sql<{ id: number }>`UPDATE outbox SET next_at = 0 WHERE undeliverable_at IS NOT NULL RETURNING id`.length;
    this.flush();
    return n;
  }

  async #deliver(item: OutboxItem): Promise<boolean> {
    const t = this.#c.config.tuning;
    const ledger = () => ledgerShard(this.#c.env, "shard" in item ? (item.shard ?? 0) : 0);
    switch (item.kind) {
      case "ledger_settle": {
        this.#noteSettle(await withTimeout(ledger().settle(item.reservationId, item.usage, item.durationMs, item.stageUsage, item.stages), t.ledgerCallTimeoutMs, "ledger.settle"));
        return true;
      }
      case "ledger_release":
        await withTimeout(ledger().release(item.reservationId), t.ledgerCallTimeoutMs, "ledger.release");
        return true;
      case "slot_release":
        // The slot is kept on the client's shard (ledger-routing.ts shardOfClient).
        await withTimeout(ledgerForClient(this.#c.env, this.#c.store.row()!.client_id).releaseSlot(item.executionId), t.ledgerCallTimeoutMs, "ledger.releaseSlot");
        return true;
      case "index_upsert":
        await withTimeout(indexFor(this.#c.env, item.entry.created_at).upsert(item.entry), t.objectCallTimeoutMs, "index.upsert");
        return true;
      case "rerun_link": {
        const ns = this.#c.env.EXECUTION as unknown as DurableObjectNamespace<Execution>;
        await withTimeout(ns.get(ns.idFromName(item.of)).recordRerun(item.executionId), t.objectCallTimeoutMs, "execution.recordRerun");
        return true;
      }
      case "data_release": {
        const ns = this.#c.env.EXECUTION as unknown as DurableObjectNamespace<Execution>;
        await withTimeout(ns.get(ns.idFromName(item.owner)).releaseData(item.holder), t.objectCallTimeoutMs, "execution.releaseData");
        return true;
      }
      case "worker_cancel": {
        const client = WorkerClient.for(this.#c.env, item.worker, this.#c.store.traceHeaders(item.stageId, item.attempt));
        if (!client) return true;
        const r = await client.cancel({ executionId: this.#c.store.row()!.execution_id, stageId: item.stageId, attempt: item.attempt });
        // Best effort: a worker that no longer knows the stage is as good as cancelled.
        return r.ok || !r.error.retryable;
      }
    }
  }
}
