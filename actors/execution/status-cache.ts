import type { StatusDocument } from "../../schemas/api";
import type { Sql } from "../sql";
import { isTerminalExecution } from "../stage-machine";
import { statusDocument } from "./documents";
import { rerunsOf } from "./rerun";
import type { Core, StageRow } from "./store";

/**
 * The status document, kept in the object's memory (docs/protocol.md,
 * "Status reads"): `GET /executions/:id` reads it with no SQL, `version`
 * counts its changes, and long polls wait here for the next one.
 *
 * How it stays true:
 * - Every write the object makes goes through its one `sql` helper, which
 *   calls `touched()` (`watchWrites` below); a turn that wrote rebuilds the
 *   document from SQL once, in a microtask after the turn's synchronous
 *   transition, or at once when a read comes first. Nothing is
 *   invalidated by hand, so a transition cannot forget to. The reads go
 *   through the object's read cache (read-cache.ts), which answers from
 *   memory what no statement since changed; built from the same reads, the
 *   document is the one it was, and is not projected or hashed again.
 * - It never shows a state that was not committed: it is built from the same
 *   rows a SQL read would see, and any answer built from it (a read, a woken
 *   long poll) leaves the object through the output gate, which holds it until
 *   those rows are durable; if the commit fails the instance is reset and this
 *   memory goes with it.
 * - The version never goes backwards and never names two documents anyone
 *   saw: it rises by one with each change, in memory, and is stored with a
 *   hash of the document (and whether it had ended) when a version is first
 *   shown (a read, a long poll's answer, a live update, a control call's
 *   answer), in the turn that shows it, so the output gate holds that answer
 *   until it is durable. A change nobody was shown costs no write (most
 *   changes of an execution that nobody polls; issue 17, target 8), but an
 *   ended document's, which are stored as they happen (the end's in the end's
 *   own turn: every caller reads it next). After an
 *   eviction or a restart the new instance rebuilds the document and, if it
 *   does not hash to the last one shown, takes the next version: versions
 *   that were never shown may be counted again, for other documents, and no
 *   reader can tell.
 *
 * Durations that run (a stage's `waiting_ms`/`processing_ms`, `paused_ms`)
 * are kept as "stored total - since" (the document built at time 0) and the
 * read adds its `now`: they grow with time and are not changes of the document.
 *
 * Leases (docs/protocol.md, "Status reads"): a read of an ended, settled
 * document (no notification pending) may be given a lease of `leaseMs`, and
 * the front Worker's isolate then answers that document from its own memory
 * until the lease ends, without calling this object. In exchange the object
 * shows no change of that document until every lease it gave has ended: a
 * change stored meanwhile (a rerun's link, retention's `data_expired_at`, a
 * message become undeliverable) is held back and becomes the next version
 * when the last lease ends, for every reader at once, so no reader sees an
 * older document after another saw a newer one. No lease is given while a
 * change is held back, so reads cannot postpone it forever. A new instance
 * does not know the leases its predecessor gave: if the last document shown
 * had ended (so a lease may have been given on it) and its document is not
 * that one (a change was held back, or not shown yet, when the old one went),
 * the object waits `leaseMs` before it serves anything (`holdMs`).
 */

/** Writes to these tables never change the status document (no rebuild after them). */
const NOT_IN_DOCUMENT = /^\s*(?:INSERT\s+INTO|DELETE\s+FROM|UPDATE)\s+(?:timers|reservations|spans|data_objects|live_tickets)\b/i;

/** The object's sql helper, telling `onWrite` of every statement that may change the document. */
export function watchWrites(sql: Sql, onWrite: () => void): Sql {
  return ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
    const head = strings[0];
    if (!/^\s*SELECT/i.test(head) && !NOT_IN_DOCUMENT.test(head)) onWrite();
    return sql(strings, ...values);
  }) as Sql;
}

/** The document as built: at time 0, with the stages whose clocks run. */
export interface Built {
  doc: Omit<StatusDocument, "version">;
  rows: readonly StageRow[];
  paused: boolean;
  /** What it was built from: the read cache's results (the same objects while their tables were not written) and the small parts' JSON. */
  from: readonly unknown[];
}

/**
 * The document from SQL, at time 0 (`StatusCache`); null before `start()`.
 * `prev` is returned as it is when it was built from the same reads: a turn
 * that wrote only what the document does not show (an outbox message's
 * delivery, most often) costs no projection and no hash.
 */
export function buildStatus(c: Core, prev: Built | null): Built | null {
  const ex = c.store.row();
  if (!ex) return null;
  const rows = c.store.stages();
  const counts = c.store.itemCounts();
  const notifications = c.notifier.document();
  const trace = c.store.trace();
  const reruns = rerunsOf(c);
  const undeliverable = c.outbox.undeliverable();
  const from = [ex, rows, counts, trace, reruns, JSON.stringify(notifications), JSON.stringify(undeliverable)];
  if (prev && from.every((v, i) => v === prev.from[i])) return prev;
  const doc = statusDocument(ex, rows, 0, c.config.prices, counts, notifications, trace, reruns, undeliverable);
  return { doc, rows, paused: ex.paused_at !== null, from };
}

/** An answer to a status read: the document's JSON (built here once when nothing in it runs). */
export interface StatusAnswer {
  version: number;
  execution_id: string;
  client_id: string;
  ended: boolean;
}

export class StatusCache {
  readonly #build: (prev: Built | null) => Built | null;
  readonly #raw: Sql;
  #built: Built | null = null;
  /** The hash of the document `#version` names. */
  #hash: string | null = null;
  /** The answer's JSON when no clock runs (an ended execution, most of the time), made by the first read that needs it. */
  #still: string | null = null;
  #running = true;
  #version = 0;
  /** The last version stored: shown, or of an ended document (`status_shown_ended` says whether it had ended). */
  #shown = 0;
  #dirty = true;
  #queued = false;
  #waiters = new Set<() => void>();
  #onChange: () => void;
  readonly #leaseMs: number;
  /** The end of the last lease given (ms); changes of the document wait for it. */
  #leaseUntil = 0;
  #leaseTimer: ReturnType<typeof setTimeout> | null = null;

  /** `raw`: the unwatched sql helper (the version's own write must not count as a change); `leaseMs`: 0 gives none. */
  constructor(raw: Sql, build: (prev: Built | null) => Built | null, onChange: () => void, leaseMs = 0) {
    this.#raw = raw;
    this.#build = build;
    this.#onChange = onChange;
    this.#leaseMs = leaseMs;
  }

  /**
   * At start (blockConcurrencyWhile): the stored version, moved on if the
   * document is not the one it was stored for. Returns how long to wait before
   * serving: `leaseMs` when an ended document moved on (a lease the previous
   * instance gave may still be out), else 0.
   */
  load(): number {
    const row = this.#raw<{ status_version: number; status_hash: string | null; status_shown_ended: number | null }>`
      SELECT status_version, status_hash, status_shown_ended FROM execution WHERE id = 1`[0];
    this.#version = row?.status_version ?? 0;
    this.#shown = this.#version;
    this.#hash = row?.status_hash ?? null;
    this.#dirty = false;
    const stored = this.#version;
    this.#rebuild(this.#hash);
    const moved = stored > 0 && this.#version !== stored;
    // Stored before `status_shown_ended` (null): every change was stored, and a moved ended document was held back.
    const leasable = row?.status_shown_ended === null ? !!this.#built && isTerminalExecution(this.#built.doc.status) : row?.status_shown_ended === 1;
    return moved && leasable ? this.#leaseMs : 0;
  }

  /**
   * A lease on the document as it is now, for a read at `now`: its length in
   * ms, 0 when none is given (leases off, not ended, a notification pending,
   * or a change already held back).
   */
  lease(now: number): number {
    this.#refresh();
    const b = this.#built;
    if (this.#leaseMs <= 0 || this.#dirty || !b || !isTerminalExecution(b.doc.status) || b.doc.notifications.pending > 0) return 0;
    this.#leaseUntil = Math.max(this.#leaseUntil, now + this.#leaseMs);
    return this.#leaseMs;
  }

  /** A write that may change the document: rebuilt once, after the turn. */
  touched(): void {
    this.#dirty = true;
    if (this.#queued) return;
    this.#queued = true;
    queueMicrotask(() => {
      this.#queued = false;
      this.#refresh();
    });
  }

  get version(): number {
    this.#refresh();
    return this.#version;
  }

  /** Whether the execution ended; null: there is none. */
  ended(): boolean | null {
    this.#refresh();
    return this.#built ? isTerminalExecution(this.#built.doc.status) : null;
  }

  /** The document as of `now` (null: no execution), to be shown: its version is stored first. */
  document(now: number): StatusDocument | null {
    this.#refresh();
    if (!this.#built) return null;
    this.#show();
    return this.#at(now);
  }

  /** The answer for `GET /executions/:id`: its metadata, and its JSON unless the caller's copy is current. */
  answer(now: number, notModifiedAt: number | null): (StatusAnswer & { body: string | null }) | null {
    this.#refresh();
    const b = this.#built;
    if (!b) return null;
    this.#show();
    const meta = { version: this.#version, execution_id: b.doc.execution_id, client_id: b.doc.client_id, ended: isTerminalExecution(b.doc.status) };
    if (notModifiedAt === this.#version) return { ...meta, body: null };
    if (this.#running) return { ...meta, body: JSON.stringify(this.#at(now)) };
    this.#still ??= JSON.stringify({ ...b.doc, version: this.#version });
    return { ...meta, body: this.#still };
  }

  /**
   * Resolves when the version is past `since`, or after `waitMs`. The promise
   * is resolved here, by the object's own turn that changed the document (or
   * its own timer), so the waiting request continues in the object.
   */
  changeAfter(since: number, waitMs: number): Promise<void> {
    if (this.version > since || waitMs <= 0) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(check);
        resolve();
      };
      const check = () => {
        if (this.#version > since) done();
      };
      const timer = setTimeout(done, waitMs);
      this.#waiters.add(check);
    });
  }

  #refresh(): void {
    if (!this.#dirty || this.#held()) return;
    this.#dirty = false;
    const before = this.#version;
    try {
      this.#rebuild(this.#hash);
    } catch (err) {
      // Still to rebuild: the next read tries again (and fails as loudly), instead of serving what it had.
      this.#dirty = true;
      throw err;
    }
    if (this.#version === before) return;
    // An ended document is the one every caller reads next: its version is stored now, in the
    // turn (and commit) that ended it, not by that first read in a commit of its own.
    if (this.#built && isTerminalExecution(this.#built.doc.status)) this.#show();
    for (const check of [...this.#waiters]) check();
    this.#onChange();
  }

  /**
   * Whether a lease given on the current document is still out: the change
   * waits, and is taken up by a timer when the lease ends (the object's own
   * timer, so the turn that shows it is the object's).
   */
  #held(): boolean {
    const wait = this.#leaseUntil - Date.now();
    if (wait <= 0) return false;
    this.#leaseTimer ??= setTimeout(() => {
      this.#leaseTimer = null;
      this.#refresh();
    }, wait);
    return true;
  }

  /** Rebuilds from SQL; a document other than the one `knownHash` names is the next version, stored in this turn. */
  #rebuild(knownHash: string | null): void {
    const prev = this.#built;
    const built = this.#build(prev);
    this.#built = built;
    if (!built || (built === prev && this.#version > 0)) return;
    const hash = cyrb53(JSON.stringify(built.doc));
    // A new version in memory; stored only when it is shown (#show).
    if (hash !== knownHash || this.#version === 0) this.#version += 1;
    this.#hash = hash;
    this.#running = built.paused || built.rows.some((s) => s.waiting_since !== null || s.processing_since !== null);
    this.#still = null;
  }

  /**
   * The current version is about to leave the object: stored with its hash,
   * in this turn (a restart must never name another document with it). Once
   * per version, so a poll of a document that did not change writes nothing.
   */
  #show(): void {
    const b = this.#built;
    if (!b || this.#version <= this.#shown) return;
    this.#shown = this.#version;
    this.#raw`UPDATE execution SET status_version = ${this.#version}, status_hash = ${this.#hash}, status_shown_ended = ${isTerminalExecution(b.doc.status) ? 1 : 0} WHERE id = 1`;
  }

  /** The document as of `now`: running durations get their time since they started. */
  #at(now: number): StatusDocument {
    const { doc, rows, paused } = this.#built!;
    const stages = doc.stages.map((s, i) => {
      const r = rows[i];
      if (r.waiting_since === null && r.processing_since === null) return s;
      return {
        ...s,
        waiting_ms: r.waiting_since !== null ? s.waiting_ms + now : s.waiting_ms,
        processing_ms: r.processing_since !== null ? s.processing_ms + now : s.processing_ms,
      };
    });
    return { ...doc, paused_ms: paused ? doc.paused_ms + now : doc.paused_ms, stages, version: this.#version };
  }
}

/** A 53-bit string hash (cyrb53): tells whether a rebuilt document is the one a version was stored for. */
function cyrb53(text: string): string {
  let h1 = 0xdeadbeef;
  let h2 = 0x41c6ce57;
  for (let i = 0; i < text.length; i++) {
    const ch = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ ch, 2654435761);
    h2 = Math.imul(h2 ^ ch, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return (4294967296 * (2097151 & h2) + (h1 >>> 0)).toString(36);
}
