/**
 * Client execution slots: `max_running_executions` (docs/ledger.md,
 * "Execution slots"). An Execution takes a slot before its first stage and
 * gives it back when it ends; beyond the quota it stays `queued`, FIFO within
 * its client, until a slot of that client frees (or the quota rises).
 *
 * The slot's id is the execution's id, so every call is idempotent and a
 * release needs no answer from the acquire: an Execution that ends (or is
 * cancelled while its acquire is in flight) releases by its id through its
 * outbox, which frees whatever the ledger holds for it, a slot or a place in
 * the line, and nothing else. A slot is therefore never leaked by a lost
 * answer, an eviction of either object, or a crash: the release is durable in
 * the Execution's outbox before it ends, and every execution ends (its
 * `execution_timeout_ms`).
 *
 * SQL only, no memory copy: every call runs inside the ledger's direct step
 * (one transaction), so a failed step leaves nothing half-decided. Clients
 * without the quota are answered without touching the table (`counted: false`:
 * nothing to release).
 */
import type { SlotResult } from "../../schemas/ledger";
import { execScript, sqlOf, type Sql } from "../sql";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS client_slots (
  execution_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, state TEXT NOT NULL, seq INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS client_slots_by_client ON client_slots (client_id, state, seq);
`;

type SlotState = "running" | "waiting";

export class ExecutionSlots {
  readonly #sql: Sql;

  constructor(private readonly storage: DurableObjectStorage) {
    this.#sql = sqlOf(storage);
  }

  open(): void {
    execScript(this.storage, SCHEMA);
  }

  /**
   * The slot for `executionId`: granted at once while the client runs fewer
   * than `max` and nobody of it waits before; else a place in its line.
   * `estimate(position)` is the expected wait of that place.
   */
  acquire(clientId: string, executionId: string, max: number | undefined, now: number, estimate: (position: number) => number): SlotResult {
    const mine = this.#sql<{ state: SlotState; seq: number }>`SELECT state, seq FROM client_slots WHERE execution_id = ${executionId}`[0];
    if (mine?.state === "running") return { status: "granted", counted: true };
    if (mine) return this.#waiting(clientId, mine.seq, estimate);
    if (max === undefined) return { status: "granted", counted: false };
    const running = this.#count(clientId, "running");
    const queued = this.#count(clientId, "waiting");
    const seq = (this.#sql<{ s: number | null }>`SELECT MAX(seq) AS s FROM client_slots`[0].s ?? 0) + 1;
    const state: SlotState = running < max && queued === 0 ? "running" : "waiting";
    this.#sql`INSERT INTO client_slots (execution_id, client_id, state, seq, created_at) VALUES (${executionId}, ${clientId}, ${state}, ${seq}, ${now})`;
    return state === "running" ? { status: "granted", counted: true } : this.#waiting(clientId, seq, estimate);
  }

  /**
   * Gives back what `executionId` holds (a slot, or its place in the line;
   * idempotent). Returns the client whose slot freed, if one did.
   */
  release(executionId: string): string | null {
    const row = this.#sql<{ client_id: string; state: SlotState }>`DELETE FROM client_slots WHERE execution_id = ${executionId} RETURNING client_id, state`[0];
    return row?.state === "running" ? row.client_id : null;
  }

  /** Moves the client's oldest waiters into free slots (all of them without a quota); returns their execution ids. */
  promote(clientId: string, max: number | undefined): string[] {
    const free = max === undefined ? Number.MAX_SAFE_INTEGER : max - this.#count(clientId, "running");
    if (free <= 0) return [];
    return this.#sql<{ execution_id: string }>`UPDATE client_slots SET state = 'running' WHERE execution_id IN (
        SELECT execution_id FROM client_slots WHERE client_id = ${clientId} AND state = 'waiting' ORDER BY seq LIMIT ${Math.min(free, 1_000_000)})
      RETURNING execution_id`.map((r) => r.execution_id);
  }

  /** Executions of the client holding a slot. */
  running(clientId: string): number {
    return this.#count(clientId, "running");
  }

  #count(clientId: string, state: SlotState): number {
    return this.#sql<{ n: number }>`SELECT COUNT(*) AS n FROM client_slots WHERE client_id = ${clientId} AND state = ${state}`[0].n;
  }

  #waiting(clientId: string, seq: number, estimate: (position: number) => number): SlotResult {
    const ahead = this.#sql<{ n: number }>`SELECT COUNT(*) AS n FROM client_slots WHERE client_id = ${clientId} AND state = 'waiting' AND seq < ${seq}`[0].n;
    const position = ahead + 1;
    return { status: "waiting", waitingOn: { pools: [], reason: "client_quota", position, estimated_wait_ms: estimate(position) } };
  }
}
