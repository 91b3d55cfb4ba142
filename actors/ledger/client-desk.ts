/**
 * The ledger's client calls (docs/ledger.md, "Clients"), decided inside the
 * ResourceLedger's steps: quotas, the client documents, start admission, and
 * the execution slots of `max_running_executions` (./slots.ts). The
 * ResourceLedger keeps the RPC surface and runs each of these in one step.
 */
import type { Priority } from "../../schemas/common";
import type { ClientDocument, ClientQuotas, StartAdmission } from "../../schemas/clients";
import type { SlotResult } from "../../schemas/ledger";
import { admitStart, clientBucket, newClient, queueWaitMs, type ClientState } from "../ledger-rules";
import { clientDocument } from "./client-document";
import type { GrantPass, Step } from "./grant-pass";
import type { Ownership } from "./ownership";
import type { ExecutionSlots } from "./slots";
import { NO_CLIENT, type LedgerStore } from "./store";

export class ClientDesk {
  constructor(
    private readonly store: LedgerStore,
    private readonly pass: GrantPass,
    private readonly slots: ExecutionSlots,
    private readonly quotasOf: (c: ClientState) => ClientQuotas,
    private readonly currency: string,
    /** The expected length of one execution, for a waiting slot's estimate. */
    private readonly executionMs: () => number,
    private readonly own: Ownership,
  ) {}

  /** Replaces a client's own quotas; they apply at once: to its waiting stages, and to executions waiting for a slot. */
  putQuotas(id: string, own: ClientQuotas, s: Step): ClientDocument {
    const c = this.store.client(id, s.now);
    c.own = own;
    // Buckets take the new sizes now, written with the checkpoint this asks for (no reservation row carries them here).
    for (const [pool, r] of Object.entries(this.quotasOf(c).rate ?? {})) clientBucket(c, pool, r.per_minute, s.now);
    this.store.saveClientSettings(c, true);
    this.store.unholdClient(c);
    this.pass.run(s);
    s.slots.push(...this.slots.promote(id, this.quotasOf(c).max_running_executions));
    return this.document(c, s.now);
  }

  document(c: ClientState, now: number): ClientDocument {
    // Executions holding a slot, or (started before the client had the quota) holding a stage's grant.
    const running = Math.max(this.slots.running(c.id), this.store.runningExecutions(c.id));
    return clientDocument(c, this.quotasOf(c), running, this.currency, now);
  }

  list(now: number): ClientDocument[] {
    // On a shard, only the clients it is home to: the others it knows only as fair-queue lanes of their parts.
    return [...this.store.clients.values()]
      .filter((c) => c.id !== NO_CLIENT && this.own.ownsClient(c.id))
      .sort((a, b) => (a.id < b.id ? -1 : 1))
      .map((c) => this.document(c, now));
  }

  /** A start's admission; admitted, it says whether the execution takes a counted slot (decided here as acquireSlot would). */
  admit(id: string, priority: Priority, now: number): StartAdmission {
    const c = this.store.client(id, now);
    const q = this.quotasOf(c);
    const answer = admitStart(q, c, priority, now);
    this.store.saveClientSettings(c);
    if (!answer.ok) return answer;
    // Neither a budget nor a start rate: what this answers follows from the quotas alone, whatever starts.
    const steady = q.monthly_budget === undefined && q.max_starts_per_minute === undefined;
    if (q.max_running_executions !== undefined) return { ok: true, slot: "counted", steady };
    // The weight goes with a free slot as with acquireSlot's answer (one shard needs no copy).
    return this.own.sharded ? { ok: true, slot: "free", weight: q.weight ?? 1, steady } : { ok: true, slot: "free", steady };
  }

  /** Whether the client has a max_running_executions (its executions take counted slots). */
  countsExecutions(clientId: string): boolean {
    const c = this.store.clients.get(clientId);
    // An unknown client has the defaults (looked at without adding it: this runs before the step).
    return this.quotasOf(c ?? newClient(clientId, 0)).max_running_executions !== undefined;
  }

  /** An execution's slot before its first stage: granted, or its place in its client's line. */
  acquireSlot(clientId: string, executionId: string, s: Step): SlotResult {
    const c = this.store.client(clientId, s.now);
    const max = this.quotasOf(c).max_running_executions;
    // A rough guess: each place ahead waits for about one execution of the client to end.
    const estimate = (position: number) => queueWaitMs(position, max ?? 1, this.executionMs());
    const r = this.slots.acquire(clientId, executionId, max, s.now, estimate);
    // With more than one shard the weight goes with the answer: the Execution passes it as
    // `clientWeight` to its stages' parts on the other shards (one shard needs no copy).
    if (r.status !== "granted" || !this.own.sharded) return r;
    return { ...r, weight: this.quotasOf(c).weight ?? 1 };
  }

  /** An execution ended (or was cancelled while waiting): its slot, or its place, is given back; the next in line gets the slot. */
  releaseSlot(executionId: string, s: Step): { released: boolean } {
    const clientId = this.slots.release(executionId);
    if (clientId === null) return { released: false };
    const c = this.store.client(clientId, s.now);
    s.slots.push(...this.slots.promote(clientId, this.quotasOf(c).max_running_executions));
    return { released: true };
  }
}
