import { env } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ledgerShard, shardOfPool } from "../../src/ledger-routing";
import { OPS, call, ended, startExecution, status, until } from "../support/api";
import { WORKER, clientOn, endedRowsOf, heldGate, layout, rowsOf, tuning, workerShard } from "./support";

/**
 * A stage whose pools live on several ledger shards (docs/scaling.md, "Past
 * one object"), run for real through the `shards` project's 4 ledger objects:
 * it starts only once every part is granted, and its settle reaches every
 * shard with that shard's share; a stage with no `resources` is estimated by
 * every shard. Everything is read from each shard's own tables.
 */

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
      const rows = await endedRowsOf(shard, id);
      expect(rows.map((r) => r.state), `shard ${shard}`).toEqual(["settled"]);
      expect(rows[0].expires_at! - rows[0].granted_at!, `shard ${shard}`).toBeGreaterThan(tuning.ledgerShortLeaseMs);
    }
  });

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
      const rows = await endedRowsOf(shard, id);
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
    // The client's shard was told the whole stage's usage with its part: the client's spend is the stage's cost.
    const clientDoc = (await (await call(`/clients/${client}`, { headers: OPS })).json()) as { usage: { spent: number } };
    expect(clientDoc.usage.spent).toBeCloseTo(doc.cost!.total, 9);
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
    const [tokensRow] = await endedRowsOf(tokensShard, id);
    expect(tokensRow.state).toBe("settled");
    const req = await runInDurableObject(ledgerShard(env, tokensShard), (_i, state) =>
      JSON.parse(String(state.storage.sql.exec<{ req: string }>("SELECT req FROM reservations WHERE id = ?", tokensRow.id).one().req)),
    );
    expect(req["tokens:openai"]).toBeGreaterThan(0);
    expect((await endedRowsOf(workerShard, id)).map((r) => r.state)).toEqual(["settled"]);
  });
});
