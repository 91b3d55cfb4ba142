import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { expect } from "vitest";
import { configOf } from "../../src/config";
import { newExecutionId } from "../../src/ids";
import { layoutOf, ledgerShard, shardOfClient, shardOfPool } from "../../src/ledger-routing";
import { until } from "../support/api";

/** Helpers of the `shards` project's tests: the layout in force and each shard's own tables. */

export const WORKER = "bitware-content-granulator";
export const layout = layoutOf(env);
export const tuning = configOf(env).tuning;
export const workerShard = shardOfPool(layout, `worker:${WORKER}`);

/** A client id whose own shard is one of `shards` (found under the layout, not assumed). */
export function clientOn(shards: number[], tag: string): string {
  for (let i = 0; ; i++) if (shards.includes(shardOfClient(layout, `client_${tag}_${i}`))) return `client_${tag}_${i}`;
}

export interface Row {
  id: string;
  state: string;
  usage: string | null;
  lease_ms: number;
  granted_at: number | null;
  expires_at: number | null;
  created_at: number;
  ended_at: number | null;
}

/** The reservations a shard keeps for an execution, from its own table, oldest first. */
/**
 * The execution's rows on a shard once none is live: an execution's last settles leave with its
 * outbox after it ended, and a settle's writes wait for the ledger's next commit (ledgerSettleCommitMs),
 * so a status that says `completed` comes before them.
 */
export function endedRowsOf(shard: number, executionId: string): Promise<Row[]> {
  return until(`${executionId}'s rows on shard ${shard} ended`, () => rowsOf(shard, executionId), (rows) => rows.length > 0 && rows.every((r) => r.state !== "granted" && r.state !== "waiting"));
}

export function rowsOf(shard: number, executionId: string): Promise<Row[]> {
  return runInDurableObject(ledgerShard(env, shard), (_i, state) =>
    state.storage.sql
      .exec<Row & Record<string, SqlStorageValue>>(
        "SELECT id, state, usage, lease_ms, granted_at, expires_at, created_at, ended_at FROM reservations WHERE execution_id = ? ORDER BY created_at, id",
        executionId,
      )
      .toArray(),
  );
}

/** Rows of an execution still granted or waiting on a shard. */
export const liveRows = async (shard: number, executionId: string) =>
  (await rowsOf(shard, executionId)).filter((r) => r.state === "granted" || r.state === "waiting");

/** A gate of capacity 1 on its own shard, taken by a holder outside any execution; returns how to give it back. */
export async function heldGate(name: string): Promise<{ shard: number; free: () => Promise<unknown> }> {
  const shard = shardOfPool(layout, name);
  const ledger = ledgerShard(env, shard);
  await ledger.putPool(name, { kind: "concurrency", capacity: 1 });
  const r = await ledger.reserve({
    executionId: newExecutionId(),
    stageId: "stage_1",
    attempt: 1,
    priority: "normal",
    requirements: { [name]: 1 },
    leaseMs: 600_000,
    worker: "gate-holder",
    part: { shard, shards: [shard], worker: false, client: false },
  } as Parameters<typeof ledger.reserve>[0]);
  expect(r).toMatchObject({ status: "granted" });
  const id = (r as { reservationId: string }).reservationId;
  return { shard, free: () => ledger.release(id) };
}
