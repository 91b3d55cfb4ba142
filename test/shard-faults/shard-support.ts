/**
 * Shared helpers for the sharded-ledger fault tests (vitest project
 * `shard-faults`): every ledger shard behind its own faulty object
 * (test/support/faulty-ledger), pools named so they land on chosen shards,
 * reads of each shard's own tables, and the graph granulator's own view of
 * what is running.
 */
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { expect } from "vitest";
import type { ResourceLedger } from "../../actors/resource-ledger";
import { layoutOf, shardName, shardOfClient, shardOfPool } from "../../src/ledger-routing";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { JSON_HEADERS, OPS, call, executionStub, until } from "../support/api";
import { type LedgerState, readState } from "../workers/ledger-support";

type Method = "reserve" | "renew" | "settle" | "settleAndReserve" | "release" | "status" | "estimate" | "snapshot" | "acquireSlot" | "releaseSlot";
export interface FaultyLedgerStub {
  setFault(methods: Method[] | "all", fault: { mode: "stall" | "down" | "lose_answer" | "duplicate"; stallMs?: number; times?: number }): Promise<void>;
  clearFaults(): Promise<void>;
  calls(method?: Method): Promise<{ method: Method; at: number; fault: string | null }[]>;
}

export const layout = () => layoutOf(env);
export const SHARDS = () => layout().count;

/** The faulty object standing in front of shard i (the binding the orchestrator reaches the ledger through). */
export function faulty(shard: number): FaultyLedgerStub {
  const ns = (env as unknown as { FAULTY_LEDGER: DurableObjectNamespace }).FAULTY_LEDGER;
  return ns.get(ns.idFromName(shardName(layout(), shard))) as unknown as FaultyLedgerStub;
}

/** The real ledger object of shard i (its own tables). */
export function realShard(shard: number): DurableObjectStub<ResourceLedger> {
  return env.RESOURCE_LEDGER.get(env.RESOURCE_LEDGER.idFromName(shardName(layout(), shard)));
}

/** `count` pool tokens t (pools `set:{t}`, see demo KAM's `needs` knob) that the layout puts on `shard`. */
export function poolsOn(shard: number, count: number, tag: string): string[] {
  const out: string[] = [];
  for (let k = 0; out.length < count; k++) if (shardOfPool(layout(), `set:${tag}${k}`) === shard) out.push(`${tag}${k}`);
  return out;
}

/** A client id whose own state lives on `shard`. */
export function clientOn(shard: number, tag: string): string {
  for (let k = 0; ; k++) if (shardOfClient(layout(), `client_${tag}${k}`) === shard) return `client_${tag}${k}`;
}

export async function putPool(name: string, capacity: number): Promise<void> {
  const res = await call(`/resources/pools/${encodeURIComponent(name)}`, {
    method: "PUT",
    headers: { ...OPS, ...JSON_HEADERS },
    body: JSON.stringify({ kind: "concurrency", capacity }),
  });
  if (res.status !== 200) throw new Error(`PUT pool ${name}: ${res.status} ${await res.text()}`);
}

export const WORKER = "bitware-graph-granulator";
const graph = () => (env as unknown as { GRAPH_GRANULATOR: Fetcher }).GRAPH_GRANULATOR;
const auth = { authorization: `Bearer ${TEST_WORKER_SECRETS[WORKER]}` };

/** The worker's own counters (not the orchestrator's). */
export async function workerStats(): Promise<{ processing: number; max_concurrent: number; started: number; completed: number }> {
  return (await graph().fetch("https://graph.internal/api/stats", { headers: auth })).json();
}
export async function resetWorkerStats(): Promise<void> {
  await graph().fetch("https://graph.internal/api/stats/reset", { method: "POST", headers: auth });
}
/** The jobs the worker is processing right now, each with when it began. */
export async function workerJobs(): Promise<{ key: string; began: number }[]> {
  return ((await (await graph().fetch("https://graph.internal/api/stats/jobs", { headers: auth })).json()) as { jobs: { key: string; began: number }[] }).jobs;
}

export interface ShardRow {
  id: string;
  execution_id: string;
  stage_id: string;
  attempt: number;
  state: string;
  req: Record<string, number>;
  lease_ms: number;
  granted_at: number | null;
  expires_at: number | null;
  ended_at: number | null;
}

/** Reservation rows of one shard's own table, optionally only those of some executions, or only the granted ones. */
export async function shardRows(shard: number, executions?: Set<string>, onlyGranted = false): Promise<ShardRow[]> {
  const rows = await runInDurableObject(realShard(shard), (_i: ResourceLedger, state) =>
    state.storage.sql
      .exec<Omit<ShardRow, "req"> & { req: string }>(
        `SELECT id, execution_id, stage_id, attempt, state, req, lease_ms, granted_at, expires_at, ended_at FROM reservations${onlyGranted ? " WHERE state = 'granted'" : ""}`,
      )
      .toArray(),
  );
  return rows.filter((r) => !executions || executions.has(r.execution_id)).map((r) => ({ ...r, req: JSON.parse(r.req) as Record<string, number> }));
}

/**
 * No pool of a shard over capacity, from one read of its own tables (the
 * ledger's SQL and its in-memory view checked against each other in the same
 * synchronous step, so a live system cannot move between the two reads).
 */
export async function expectShardWithinCapacity(shard: number): Promise<LedgerState> {
  const st = await readState(realShard(shard));
  expect(st.problems, `shard ${shard}`).toEqual([]);
  for (const [name, p] of st.pools) {
    const held = st.held.get(name) ?? 0;
    if (p.kind === "concurrency") expect(held, `shard ${shard} ${name}`).toBeLessThanOrEqual(p.capacity);
    if (p.kind === "budget") expect(held + p.consumed, `shard ${shard} ${name}`).toBeLessThanOrEqual(p.capacity + 1e-6);
    if (p.kind === "rate") expect(p.tokens, `shard ${shard} ${name}`).toBeGreaterThanOrEqual(0);
  }
  return st;
}

/**
 * Restarts an object as a crash would (`ctx.abort()`): in-flight calls fail,
 * memory is gone, the next call starts it again from storage. (evictDurableObject
 * waits for an idle object, which a live one under load seldom is.)
 */
export async function crash(stub: DurableObjectStub): Promise<void> {
  try {
    await runInDurableObject(stub, (_i, state) => state.abort("test: crashed"));
  } catch {
    // The abort fails the call that carried it: that is the crash.
  }
}

/** Waits for the faulty object of shard 0 to hold a stalled call of `method` made after `since`, then crashes the Execution. */
export async function crashDuringStalled(id: string, method: "reserve" | "renew", since: number): Promise<void> {
  await until(`a stalled ${method}`, () => faulty(0).calls(method), (calls) => calls.some((c) => c.fault === "stall" && c.at >= since), 40_000);
  await crash(executionStub(id));
}

declare module "vitest" {
  export interface ProvidedContext {
    /** The property test's seed (vitest.config.ts, SHARD_SEED). */
    shardSeed: number;
  }
}
