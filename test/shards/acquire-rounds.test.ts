import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { ended, executionStub, startExecution, status, until } from "../support/api";
import { type Row, clientOn, heldGate, layout, liveRows, rowsOf, tuning, workerShard } from "./support";

/**
 * The failure paths of a multi-shard acquisition, for real over the `shards`
 * project's 4 ledger objects: a later shard that keeps the stage waiting past
 * the short lease of the part it holds makes it give every part back (through
 * the outbox) and ask again in round + 1, without spending its attempt; an
 * Execution that dies mid-acquisition holds nothing for longer than one short
 * lease, with no word from it. Read from each shard's own tables.
 */

const ofRound = (rows: Row[], executionId: string, round: number) => rows.filter((r) => r.id === `${executionId}:stage_1:1${round > 0 ? `@${round}` : ""}`);

describe("a multi-shard acquisition that cannot complete", () => {
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
    // Released before its short lease ran out, and nothing of the stage was held on the worker's shard until round 1 was
    // granted. Round 1 came back to round 0's place there (its arrival and ageing origin are round 0's).
    expect(held.ended_at!).toBeLessThan(held.expires_at!);
    const [again] = ofRound(rows[0], id, 1);
    expect(again.granted_at).not.toBeNull();
    expect(again.granted_at!).toBeGreaterThanOrEqual(held.ended_at!);
    expect(again.created_at).toBe(held.created_at);

    await gate.free();
    const doc = await until("the execution ended", () => status(id), ended, 40_000);
    // The round did not spend the stage's only attempt.
    expect(doc.status).toBe("completed");
    expect(doc.stages[0].attempts).toBe(1);
    // The last settle goes through the outbox after the end: awaited, not read once.
    for (const shard of [workerShard, gate.shard]) {
      expect(await until(`shard ${shard} holds nothing of it`, () => liveRows(shard, id), (rows) => rows.length === 0), `shard ${shard}`).toEqual([]);
    }
  }, 90_000);


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
    // The last settle goes through the outbox after the end: awaited, not read once.
    for (let shard = 0; shard < layout.count; shard++) {
      expect(await until(`shard ${shard} holds nothing of it`, () => liveRows(shard, id), (rows) => rows.length === 0), `shard ${shard}`).toEqual([]);
    }
  }, 90_000);
});
