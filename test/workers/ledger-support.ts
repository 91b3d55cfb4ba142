/**
 * Shared helpers for the ledger tests (test/workers/ledger*.test.ts): a fresh
 * ledger object per test, a hand-driven clock, ids, a seeded PRNG and the
 * invariant check read from the ledger's own tables.
 */
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { expect } from "vitest";
import { ledgerTestHooks, type ResourceLedger } from "../../actors/resource-ledger";
import type { LedgerRules } from "../../actors/ledger-rules";
import type { GrantNotice, PoolSpec, ReserveRequest, ReserveResult } from "../../schemas/ledger";

export type LedgerStub = DurableObjectStub<ResourceLedger>;

export function ledgerNamed(name: string): LedgerStub {
  const ns = env.RESOURCE_LEDGER as unknown as DurableObjectNamespace<ResourceLedger>;
  return ns.get(ns.idFromName(`test-${name}`));
}

/**
 * A clock the test moves by hand. It starts a day ahead of real time so that
 * the alarms the ledger sets (at lease expiries, refills) never fire by
 * themselves during a test: tests run them with runDurableObjectAlarm.
 */
export interface Clock {
  now: number;
}
export function newClock(): Clock {
  return { now: Date.now() + 86_400_000 };
}

/** Grant notices a ledger sent, in order (when captured instead of sent to Execution objects). */
export type Notices = { executionId: string; notice: GrantNotice }[];

/**
 * Points the ledger instance at `clock` (again after an eviction), optionally
 * adjusts its rules, and captures its grant notices into `notices` (pass null
 * to let them go to the Execution objects as in production).
 */
export async function attach(
  stub: LedgerStub,
  clock: Clock,
  rules?: Partial<LedgerRules>,
  notices: Notices | null = [],
): Promise<void> {
  await runInDurableObject(stub, (instance: ResourceLedger) => {
    const hooks = ledgerTestHooks(instance);
    hooks.setClock(() => clock.now);
    if (rules) Object.assign(hooks.rules, rules);
    hooks.setNotifier(notices ? (executionId, notice) => notices.push({ executionId, notice }) : null);
  });
}

export async function fresh(
  name: string,
  rules?: Partial<LedgerRules>,
  opts: { realNotices?: boolean } = {},
): Promise<{ ledger: LedgerStub; clock: Clock; notices: Notices }> {
  const ledger = ledgerNamed(name);
  const clock = newClock();
  const notices: Notices = [];
  await attach(ledger, clock, rules, opts.realNotices ? null : notices);
  return { ledger, clock, notices };
}

let execCounter = 0;
/** A valid execution id, unique within the test run. */
export function execId(tag = "x"): string {
  execCounter++;
  const suffix = `${tag}${String(execCounter).padStart(12, "0")}`.replace(/[^A-Za-z0-9_-]/g, "_").slice(-32);
  return `exec_1700000000000_${suffix.padStart(12, "0")}`;
}

export function req(over: Partial<ReserveRequest> & { worker?: string } = {}): ReserveRequest {
  return {
    executionId: over.executionId ?? execId(),
    stageId: over.stageId ?? "stage_1",
    attempt: over.attempt ?? 1,
    priority: over.priority ?? "normal",
    leaseMs: over.leaseMs ?? 3_600_000,
    worker: over.worker ?? "w",
    ...(over.requirements ? { requirements: over.requirements } : {}),
  };
}

export async function pool(stub: LedgerStub, name: string, spec: PoolSpec) {
  return stub.putPool(name, spec);
}

/** The bench's seeded PRNG (mulberry32), so a failing random run can be replayed. */
export { mulberry32 as prng } from "../../bench/lib/mulberry32";

export interface LedgerState {
  pools: Map<string, { kind: string; capacity: number; tokens: number; consumed: number }>;
  /** Sum of requirements of granted reservations per pool, from the reservations table. */
  held: Map<string, number>;
  granted: number;
  waiting: number;
  problems: string[];
}

/** Reads the ledger's own tables (not a counter the test keeps). */
export async function readState(stub: LedgerStub): Promise<LedgerState> {
  return runInDurableObject(stub, (instance: ResourceLedger, state) => {
    const sql = state.storage.sql;
    const pools = new Map<string, { kind: string; capacity: number; tokens: number; consumed: number }>();
    for (const r of sql.exec<{ name: string; kind: string; capacity: number; tokens: number; consumed: number }>(
      "SELECT name, kind, capacity, tokens, consumed FROM pools",
    )) {
      pools.set(r.name, { kind: r.kind, capacity: r.capacity, tokens: r.tokens, consumed: r.consumed });
    }
    const held = new Map<string, number>();
    let granted = 0;
    let waiting = 0;
    for (const r of sql.exec<{ state: string; req: string }>(
      "SELECT state, req FROM reservations WHERE state IN ('granted', 'waiting')",
    )) {
      if (r.state === "waiting") {
        waiting++;
        continue;
      }
      granted++;
      for (const [n, a] of Object.entries(JSON.parse(r.req) as Record<string, number>)) held.set(n, (held.get(n) ?? 0) + a);
    }
    return { pools, held, granted, waiting, problems: ledgerTestHooks(instance).selfCheck() };
  });
}

/**
 * No pool over capacity, judged from the ledger's tables and its snapshot:
 * concurrency and budget holds of granted reservations <= capacity (budget:
 * plus consumed), rate buckets within [0, capacity]; memory agrees with SQL.
 */
export async function expectWithinCapacity(stub: LedgerStub): Promise<LedgerState> {
  const st = await readState(stub);
  expect(st.problems).toEqual([]);
  for (const [name, p] of st.pools) {
    const held = st.held.get(name) ?? 0;
    if (p.kind === "concurrency") expect(held, name).toBeLessThanOrEqual(p.capacity);
    if (p.kind === "budget") expect(held + p.consumed, name).toBeLessThanOrEqual(p.capacity + 1e-6);
    if (p.kind === "rate") {
      expect(p.tokens, name).toBeGreaterThanOrEqual(0);
      expect(p.tokens, name).toBeLessThanOrEqual(p.capacity + 1e-6);
    }
  }
  const snap = await stub.snapshot();
  for (const p of snap.pools) {
    expect(p.in_use, p.name).toBeGreaterThanOrEqual(0);
    expect(p.available, p.name).toBeGreaterThanOrEqual(0);
    if (p.kind !== "budget") expect(p.in_use + p.available, p.name).toBeLessThanOrEqual(p.capacity + 1e-6);
  }
  expect(snap.leases).toBe(st.granted);
  expect(snap.waiters).toBe(st.waiting);
  return st;
}

/**
 * The message a call fails with, or null. (Awaiting the RPC promise inside a
 * try keeps the rejection handled; `expect(rpcPromise).rejects` leaves an
 * unhandled one behind.)
 */
export async function failure(call: () => Promise<unknown>): Promise<string | null> {
  try {
    await call();
    return null;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

/** The reservation id of a reserve answer; a malformed request (`invalid`, no reservation) fails the test. */
export function id(r: ReserveResult): string {
  if (r.status === "invalid") throw new Error(`reserve answered invalid_request: ${r.message}`);
  return r.reservationId;
}
