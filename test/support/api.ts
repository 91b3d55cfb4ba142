import { env, exports } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { expect } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { type TokenClaims, issueToken } from "../../src/auth";
import { everyShard, layoutOf, ledgerShard, partsOf } from "../../src/ledger-routing";
import { TEST_SECRETS } from "./constants";

/** Test helpers that talk to the orchestrator the way KAM and operators do: over its fetch handler. */
export const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}` };
export const OPS = { authorization: `Bearer ${TEST_SECRETS.OPS_TOKEN}` };
export const JSON_HEADERS = { "content-type": "application/json" };

export function call(path: string, init: RequestInit = {}): Promise<Response> {
  return (exports as unknown as { default: Fetcher }).default.fetch(`http://orchestrator.test${path}`, init);
}

export async function startExecution(body: Record<string, unknown>, headers: Record<string, string> = KAM) {
  const res = await call("/execute", { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: JSON.stringify(body) });
  return { res, body: (await res.json()) as Record<string, any> };
}

export async function status(id: string): Promise<StatusDocument> {
  const res = await call(`/executions/${id}`, { headers: OPS });
  if (res.status !== 200) throw new Error(`status ${res.status}: ${await res.text()}`);
  return res.json();
}

/**
 * Waits for a condition on the status document, reading it until the deadline.
 * The execution advances on its own (worker callbacks, alarms); this only observes.
 */
export async function waitFor(id: string, done: (d: StatusDocument) => boolean, timeoutMs = 20_000): Promise<StatusDocument> {
  const deadline = Date.now() + timeoutMs;
  let last: StatusDocument | null = null;
  while (Date.now() < deadline) {
    last = await status(id);
    if (done(last)) return last;
    await scheduler.wait(25);
  }
  throw new Error(`condition not reached within ${timeoutMs} ms; last status: ${JSON.stringify(last, null, 1)}`);
}

export const ended = (d: StatusDocument) => d.status === "completed" || d.status === "failed" || d.status === "cancelled";

export function executionStub(id: string) {
  return env.EXECUTION.get(env.EXECUTION.idFromName(id));
}

/**
 * Runs the execution's alarm handler now, to its end. Not runDurableObjectAlarm:
 * that does nothing when no alarm is set, which is also the case while the
 * object's own alarm is running (an outbox delivery after a cancel, say), so a
 * timer a test made due then went untaken and the test raced that alarm.
 * The handler serialises its drive passes, so this one starts after any in flight.
 */
export async function fireAlarm(id: string): Promise<void> {
  await runInDurableObject(executionStub(id), async (instance: { alarm(): Promise<void> }, state) => {
    await state.storage.deleteAlarm();
    await instance.alarm();
  });
}

export interface Snapshot {
  pools: { name: string; kind: string; capacity: number; in_use: number; available: number; waiting: number }[];
  leases: number;
  waiters: number;
}

/** Reads the ledger snapshot (as an operator) until the condition holds or the deadline passes. */
export async function waitForLedger(done: (s: Snapshot) => boolean, timeoutMs = 10_000): Promise<Snapshot> {
  const deadline = Date.now() + timeoutMs;
  let last: Snapshot | null = null;
  while (Date.now() < deadline) {
    last = (await (await call("/resources", { headers: OPS })).json()) as Snapshot;
    if (done(last)) return last;
    await scheduler.wait(25);
  }
  throw new Error(`ledger condition not reached within ${timeoutMs} ms; last: ${JSON.stringify(last)}`);
}

/**
 * No leaked capacity: every reservation the execution was ever given has been
 * settled, released or has expired in the ledger (releases travel through the
 * execution's outbox, so this waits for them with a deadline). Each id is asked
 * of every ledger shard, so a part left on any shard counts.
 */
export async function expectNoLiveReservations(id: string, timeoutMs = 10_000): Promise<number> {
  const stub = executionStub(id);
  const shards = everyShard(env);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ids = await stub.reservationIds();
    const states = await Promise.all(
      ids.flatMap((r) => shards.map(async ({ name, stub: ledger }) => ({ shard: name, ...(await ledger.status(r.reservation_id)) }))),
    );
    const live = states.filter((s) => s.state === "waiting" || s.state === "granted");
    if (live.length === 0) return ids.length;
    if (Date.now() > deadline) throw new Error(`live reservations remain for ${id}: ${JSON.stringify(live)}`);
    await scheduler.wait(25);
  }
}

/**
 * The shards of a stage's set as the routing module decides them
 * (src/ledger-routing.ts, partsOf), in acquisition order: its worker's, its
 * client's and each pool's. `[0]` with one shard: the one reservation.
 */
export function shardsOfSet(needs: Record<string, number>, o: { worker?: string; clientId: string; executionId: string }): number[] {
  return partsOf(layoutOf(env), needs, { worker: o.worker ?? "bitware-content-granulator", clientId: o.clientId, executionId: o.executionId }).map((p) => p.shard);
}

export interface ReservedSet {
  stage_id: string;
  attempt: number;
  /** The shards the set was asked on, in order. */
  shards: number[];
  /** The shards the routing module gives a set holding what those parts hold. */
  routed: number[];
}

/**
 * An execution's reservations, one entry per stage attempt (a fan-out item is
 * a stage of its own) in the order they were made. `shards`: where it was
 * asked (reservationIds lists one id per part; a round after a back-off asks
 * the same shards again under a new id, counted once here). `routed`: the
 * shards the routing module gives a set that needs what those parts hold, as
 * each shard's ledger says (for a stage without `resources`, its estimate).
 * With one shard both are `[0]`, one reservation per attempt; a set asked in
 * full has `shards` equal to `routed`.
 */
export async function reservedSets(id: string): Promise<ReservedSet[]> {
  const doc = await status(id);
  const workerOf = new Map(doc.stages.map((s) => [s.stage_id, s.worker]));
  const sets = new Map<string, ReservedSet & { needs: Record<string, number> }>();
  for (const r of await executionStub(id).reservationIds()) {
    const key = `${r.stage_id}:${r.attempt}`;
    const set = sets.get(key) ?? { stage_id: r.stage_id, attempt: r.attempt, shards: [], routed: [], needs: {} };
    sets.set(key, set);
    if (set.shards.includes(r.shard)) continue;
    set.shards.push(r.shard);
    const held = await ledgerShard(env, r.shard).status(r.reservation_id);
    Object.assign(set.needs, held.requirements);
  }
  return [...sets.values()].map(({ needs, ...s }) => ({
    ...s,
    // An item's worker is its fan-out stage's (`stage_2.0` is an item of `stage_2`).
    routed: shardsOfSet(needs, { worker: workerOf.get(s.stage_id.split(".")[0]), clientId: doc.client_id, executionId: id }),
  }));
}

/** The stages an execution reserved, one per attempt in order, each checked to hold exactly the parts its set routes to (reservedSets). */
export async function stagesReserved(id: string): Promise<string[]> {
  const sets = await reservedSets(id);
  for (const s of sets) expect(s.shards, `${s.stage_id} attempt ${s.attempt}: the shards of its parts`).toEqual(s.routed);
  return sets.map((s) => s.stage_id);
}

type ProbeAnswer = { called: true; value: any } | { called: false; error: string };

/**
 * Calls an orchestrator RPC method from another worker (test/support/rpc-probe-worker.js)
 * through a stage worker's kind of binding (`worker`) or KAM's (`kam`).
 */
export async function rpcThrough(binding: "worker" | "kam", method: string, arg: unknown): Promise<ProbeAnswer> {
  const probe = (env as unknown as { RPC_PROBE: Fetcher }).RPC_PROBE;
  const res = await probe.fetch("https://rpc-probe.internal/", {
    method: "POST",
    body: JSON.stringify({ binding: binding === "kam" ? "AS_KAM" : "AS_WORKER", method, arg }),
  });
  return res.json();
}

/**
 * A token as the orchestrator issues it (src/auth.ts), signed with the test
 * CALLBACK_SECRET: use `callback` and an hour of life unless told otherwise.
 */
export function mintToken(
  claims: { executionId: string; stageId: string; attempt: number } & Partial<Omit<TokenClaims, "executionId" | "stageId" | "attempt">>,
  secret: string = TEST_SECRETS.CALLBACK_SECRET,
): Promise<string> {
  return issueToken({ current: secret, previous: null }, { use: "callback", expiresAt: Date.now() + 3600_000, ...claims });
}

/** Reads `read` until `done` holds, with a deadline (the error names `what` and the last value). */
export async function until<T>(what: string, read: () => Promise<T>, done: (v: T) => boolean, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await read();
    if (done(v)) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not reached within ${timeoutMs} ms; last: ${JSON.stringify(v)}`);
    await scheduler.wait(25);
  }
}

/** Makes an ended execution's retention timer due and fires its alarm (instead of waiting `retentionMs`). */
export async function expireNow(id: string): Promise<void> {
  const stub = executionStub(id);
  await runInDurableObject(stub, (_i, state) => state.storage.sql.exec("UPDATE timers SET due_at = 0 WHERE name = 'retention'"));
  await fireAlarm(id);
}
