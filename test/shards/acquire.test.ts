import { env } from "cloudflare:workers";
import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { configOf } from "../../src/config";
import { newExecutionId } from "../../src/ids";
import { layoutOf, ledgerShard, shardOfClient, shardOfPool } from "../../src/ledger-routing";
import { ended, executionStub, startExecution, status, until } from "../support/api";

/**
 * A stage whose pools live on several ledger shards (docs/scaling.md, "Past
 * one object"), run for real through the `shards` project's 4 ledger objects:
 * it starts only once every part is granted, a later shard that keeps it
 * waiting past the short lease makes it give back what it holds and try again
 * in round + 1, its settle reaches every shard with that shard's share, and an
 * Execution that dies mid-acquisition holds nothing for longer than one short lease.
 * Everything is read from each shard's own tables.
 */

const WORKER = "bitware-content-granulator";
const layout = layoutOf(env);
const tuning = configOf(env).tuning;
const workerShard = shardOfPool(layout, `worker:${WORKER}`);

/** A client id whose own shard is one of `shards` (found under the layout, not assumed). */
function clientOn(shards: number[], tag: string): string {
  for (let i = 0; ; i++) if (shards.includes(shardOfClient(layout, `client_${tag}_${i}`))) return `client_${tag}_${i}`;
}

interface Row {
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
function rowsOf(shard: number, executionId: string): Promise<Row[]> {
  return runInDurableObject(ledgerShard(env, shard), (_i, state) =>
    state.storage.sql
      .exec<Row & Record<string, SqlStorageValue>>(
        "SELECT id, state, usage, lease_ms, granted_at, expires_at, created_at, ended_at FROM reservations WHERE execution_id = ? ORDER BY created_at, id",
        executionId,
      )
      .toArray(),
  );
}

/** A gate of capacity 1 on its own shard, taken by a holder outside any execution; returns how to give it back. */
async function heldGate(name: string): Promise<{ shard: number; free: () => Promise<unknown> }> {
  const shard = shardOfPool(layout, name);
  const ledger = ledgerShard(env, shard);
  await ledger.putPool(name, { kind: "concurrency", capacity: 1 });
  const holder = newExecutionId();
  const r = await ledger.reserve({
    executionId: holder,
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

const ofRound = (rows: Row[], executionId: string, round: number) => rows.filter((r) => r.id === `${executionId}:stage_1:1${round > 0 ? `@${round}` : ""}`);

describe("a stage whose pools span ledger shards", () => {
  it("runs only after both shards grant, and then holds both on the full lease", async () => {
    const gate = await heldGate("gate:shard-pair");
    expect(gate.shard).not.toBe(workerShard); // the precondition: two shards
    const client = clientOn([workerShard, gate.shard], "pair");
    const { body } = await startExecution({ template_name: "shard_pair", parameters: { echo: "pair" }, client_id: client });
    const id = body.execution_id as string;

    // The worker's shard grants its part on the short lease; the gate's shard queues the other.
    const [first] = await until("the worker's part granted", () => rowsOf(workerShard, id), (r) => r[0]?.state === "granted");
    await until("the gate's part waiting", () => rowsOf(gate.shard, id), (r) => r[0]?.state === "waiting");
    expect(first.lease_ms).toBe(tuning.ledgerShortLeaseMs);
    expect((await status(id)).stages[0].status).toBe("waiting_resources");

    await gate.free();
    const doc = await until("the execution ended", () => status(id), ended, 20_000);
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // Both parts were renewed past the short lease before the stage started, and both are settled.
    for (const shard of [workerShard, gate.shard]) {
      const rows = await rowsOf(shard, id);
      expect(rows.map((r) => r.state), `shard ${shard}`).toEqual(["settled"]);
      expect(rows[0].expires_at! - rows[0].granted_at!, `shard ${shard}`).toBeGreaterThan(tuning.ledgerShortLeaseMs);
    }
  });

  it("gives every part back when a later shard keeps it waiting past the short lease, and tries again in round + 1", async () => {
    const gate = await heldGate("gate:shard-deadline");
    const client = clientOn([workerShard, gate.shard], "deadline");
    const { body } = await startExecution({ template_name: "shard_deadline", parameters: { echo: "deadline" }, client_id: client });
    const id = body.execution_id as string;
    await until("the worker's part granted", () => rowsOf(workerShard, id), (r) => r[0]?.state === "granted");

    // Past the short lease of the part it holds, the stage releases both parts (round 0) and asks again (round 1).
    const rows = await until("round 1 asked on both shards", async () => [await rowsOf(workerShard, id), await rowsOf(gate.shard, id)] as const,
      ([w, g]) => ofRound(w, id, 1).length === 1 && ofRound(g, id, 1).length === 1, 40_000);
    const [held] = ofRound(rows[0], id, 0);
    const [queued] = ofRound(rows[1], id, 0);
    expect(held.state).toBe("released");
    expect(queued.state).toBe("released");
    // Released before its short lease ran out, and nothing of the stage was held on the worker's shard until round 1 began.
    expect(held.ended_at!).toBeLessThan(held.expires_at!);
    expect(ofRound(rows[0], id, 1)[0].created_at).toBeGreaterThanOrEqual(held.ended_at!);

    await gate.free();
    const doc = await until("the execution ended", () => status(id), ended, 40_000);
    // The round did not spend the stage's only attempt.
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    for (const shard of [workerShard, gate.shard]) {
      const live = (await rowsOf(shard, id)).filter((r) => r.state === "granted" || r.state === "waiting");
      expect(live, `shard ${shard}`).toEqual([]);
    }
  }, 90_000);

  it("settles on every shard of the set, each with its share of the usage", async () => {
    const gateShard = shardOfPool(layout, "gate:shard-trio");
    await ledgerShard(env, gateShard).putPool("gate:shard-trio", { kind: "concurrency", capacity: 1 });
    const tokensShard = shardOfPool(layout, "tokens:openai");
    const shards = [...new Set([workerShard, tokensShard, gateShard])];
    expect(shards).toHaveLength(3);
    const client = clientOn(shards, "trio");
    const { body } = await startExecution({ template_name: "shard_trio", parameters: { echo: "three shards settle their own share" }, client_id: client });
    const id = body.execution_id as string;
    const doc = await until("the execution ended", () => status(id), ended, 20_000);
    expect(doc.status).toBe("completed");
    const usage = doc.stages[0].usage as Record<string, number>;
    expect(usage["tokens:openai"]).toBeGreaterThan(0);

    const settled = new Map<number, Record<string, number>>();
    for (const shard of shards) {
      const rows = await rowsOf(shard, id);
      expect(rows.map((r) => r.state), `shard ${shard}`).toEqual(["settled"]);
      settled.set(shard, JSON.parse(rows[0].usage ?? "null"));
    }
    // Each pool's usage on the shard that owns it; a pool with no part of the stage on its shard, on the worker's.
    const expected = new Map<number, Record<string, number>>(shards.map((s) => [s, {}]));
    for (const [pool, amount] of Object.entries(usage)) {
      const owner = shards.includes(shardOfPool(layout, pool)) ? shardOfPool(layout, pool) : workerShard;
      expected.get(owner)![pool] = amount;
    }
    expect(settled).toEqual(expected);
  });

  it("asks every shard's estimate for a stage with no resources and reserves on the shards it is estimated to use", async () => {
    // shard_trio (above) settled tokens:openai usage of this worker on the tokens shard: its averages live there.
    const tokensShard = shardOfPool(layout, "tokens:openai");
    expect(tokensShard).not.toBe(workerShard);
    const before = await ledgerShard(env, tokensShard).estimate([{ worker: WORKER }], "low");
    expect(before.stages[0].requirements["tokens:openai"]).toBeGreaterThan(0);
    const client = clientOn([workerShard, tokensShard], "implicit");
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { echo: "implicit" }, client_id: client, priority: "low" });
    const id = body.execution_id as string;
    const doc = await until("the execution ended", () => status(id), ended, 20_000);
    expect(doc.status).toBe("completed");
    // The tokens shard held an explicit part of the estimate; the worker's shard the worker slot.
    const [tokensRow] = await rowsOf(tokensShard, id);
    expect(tokensRow.state).toBe("settled");
    const req = await runInDurableObject(ledgerShard(env, tokensShard), (_i, state) =>
      JSON.parse(String(state.storage.sql.exec<{ req: string }>("SELECT req FROM reservations WHERE id = ?", tokensRow.id).one().req)),
    );
    expect(req["tokens:openai"]).toBeGreaterThan(0);
    expect((await rowsOf(workerShard, id)).map((r) => r.state)).toEqual(["settled"]);
  });

  it("strands nothing past one short lease when its Execution dies mid-acquisition", async () => {
    const gate = await heldGate("gate:shard-evict");
    const client = clientOn([workerShard, gate.shard], "evict");
    const { body } = await startExecution({ template_name: "shard_evict", parameters: { echo: "evict" }, client_id: client });
    const id = body.execution_id as string;
    const [held] = await until("the worker's part granted", () => rowsOf(workerShard, id), (r) => r[0]?.state === "granted");
    await until("the gate's part waiting", () => rowsOf(gate.shard, id), (r) => r[0]?.state === "waiting");

    // The Execution goes away with no alarm left: nothing of it will act until a notice wakes it.
    await runInDurableObject(executionStub(id), (_i, state) => state.storage.deleteAlarm());
    await evictDurableObject(executionStub(id));
    expect(held.expires_at! - held.granted_at!).toBe(tuning.ledgerShortLeaseMs);
    // The worker's shard lets the part go by itself when its short lease ends.
    const [lapsed] = await until("the held part lapsed", () => rowsOf(workerShard, id), (r) => r[0]?.state === "expired", tuning.ledgerShortLeaseMs + 15_000);
    expect(lapsed.ended_at!).toBeGreaterThanOrEqual(held.expires_at!);

    // The gate frees: its grant notice wakes the Execution, which starts over and completes; nothing stays held anywhere.
    await gate.free();
    const doc = await until("the execution ended", () => status(id), ended, 40_000);
    expect(doc.status).toBe("completed");
    for (let shard = 0; shard < layout.count; shard++) {
      const live = (await rowsOf(shard, id)).filter((r) => r.state === "granted" || r.state === "waiting");
      expect(live, `shard ${shard}`).toEqual([]);
    }
  }, 90_000);
});
