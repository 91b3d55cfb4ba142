import { describe, expect, it } from "vitest";
import { basePoolOf, fnv1a, parseShardLayout, partsOf, ShardConfigError, shardIndexOf, shardName, shardOfClient, shardOfPool, subPoolOf } from "../../src/ledger-routing";

function refused(shards: unknown, map: unknown): string[] {
  try {
    parseShardLayout(shards, map);
  } catch (err) {
    if (err instanceof ShardConfigError) return err.problems;
    throw err;
  }
  return [];
}

describe("ledger routing (src/ledger-routing.ts)", () => {
  it("one shard keeps the single object's name, so an unsharded deployment's state stays valid", () => {
    const l = parseShardLayout(undefined, undefined);
    expect(l.count).toBe(1);
    expect(shardName(l, 0)).toBe("global");
    expect(shardOfPool(l, "tokens:openai")).toBe(0);
    expect(shardIndexOf(l, "global")).toBe(0);
    expect(shardIndexOf(l, "ledger-0")).toBeNull();
  });

  it("names shards ledger-0..n-1 and knows which names are its shards", () => {
    const l = parseShardLayout("4", undefined);
    expect([0, 1, 2, 3].map((i) => shardName(l, i))).toEqual(["ledger-0", "ledger-1", "ledger-2", "ledger-3"]);
    expect(shardIndexOf(l, "ledger-3")).toBe(3);
    expect(shardIndexOf(l, "ledger-4")).toBeNull();
    expect(shardIndexOf(l, "ledger-03")).toBeNull();
    expect(shardIndexOf(l, "global")).toBeNull();
  });

  it("pins exact names and prefixes, and hashes every other pool stably", () => {
    const l = parseShardLayout(8, JSON.stringify({ "worker:granulator": 3, "tokens:*": 5 }));
    expect(shardOfPool(l, "worker:granulator")).toBe(3);
    expect(shardOfPool(l, "tokens:openai")).toBe(5);
    expect(shardOfPool(l, "tokens:anthropic")).toBe(5);
    // An unpinned pool goes by FNV-1a of its name: the same on every isolate and version.
    expect(fnv1a("")).toBe(0x811c9dc5);
    expect(fnv1a("a")).toBe(0xe40c292c);
    expect(shardOfPool(l, "gpu:a100")).toBe(fnv1a("gpu:a100") % 8);
  });

  it("splits a hot pool into sub-pools and routes each execution to one of them by its id", () => {
    const l = parseShardLayout(4, { "tokens:openai": { split: [1, 2, 3] } });
    const subs = new Set<string>();
    for (let i = 0; i < 60; i++) subs.add(subPoolOf(l, "tokens:openai", `exec-${i}`));
    expect([...subs].sort()).toEqual(["tokens:openai#0", "tokens:openai#1", "tokens:openai#2"]);
    expect(subPoolOf(l, "tokens:openai", "exec-7")).toBe(subPoolOf(l, "tokens:openai", "exec-7"));
    expect([0, 1, 2].map((k) => shardOfPool(l, `tokens:openai#${k}`))).toEqual([1, 2, 3]);
    expect(basePoolOf("tokens:openai#2")).toBe("tokens:openai");
    expect(subPoolOf(l, "tokens:anthropic", "exec-7")).toBe("tokens:anthropic");
  });

  it("splits a stage's needs into parts in shard order, with the worker slot and the client where they live", () => {
    const l = parseShardLayout(4, { "worker:w": 2, "tokens:a": 0, "tokens:b": 2, "gpu:x": 3 });
    const client = ["c1", "c2", "c3", "c4", "c5"].find((c) => shardOfClient(l, c) === 1)!;
    const parts = partsOf(l, { "tokens:a": 10, "tokens:b": 5, "gpu:x": 1, "worker:w": 1 }, { worker: "w", clientId: client, executionId: "e" });
    expect(parts).toEqual([
      { shard: 0, requirements: { "tokens:a": 10 }, worker: false, client: false },
      { shard: 1, requirements: {}, worker: false, client: true },
      { shard: 2, requirements: { "tokens:b": 5 }, worker: true, client: false },
      { shard: 3, requirements: { "gpu:x": 1 }, worker: false, client: false },
    ]);
    // Without a client part and with every pool beside the worker: one part, one reserve.
    expect(partsOf(l, { "tokens:b": 5 }, { worker: "w", executionId: "e" })).toEqual([{ shard: 2, requirements: { "tokens:b": 5 }, worker: true, client: false }]);
  });

  it("refuses a configuration in which two shards would both claim a pool, and every other bad value", () => {
    expect(refused(4, { "tokens:*": 1, "tokens:openai": 2 }).join()).toMatch(/both claim/);
    expect(refused(4, { "tokens:*": 1, "tok*": 2 }).join()).toMatch(/both claim/);
    expect(refused(4, { "tokens:openai": { split: [0, 1] }, "tokens:*": 2 }).join()).toMatch(/also pins/);
    expect(refused(0, undefined).join()).toMatch(/LEDGER_SHARDS/);
    expect(refused(257, undefined).join()).toMatch(/LEDGER_SHARDS/);
    expect(refused("two", undefined).join()).toMatch(/LEDGER_SHARDS/);
    expect(refused(4, { "tokens:openai": 4 }).join()).toMatch(/from 0 to 3/);
    expect(refused(4, { "tokens:*": { split: [0, 1] } }).join()).toMatch(/only a single pool/);
    expect(refused(4, { "tokens:openai": { split: [0] } }).join()).toMatch(/split must be/);
    expect(refused(4, { "Tokens#1": 0 }).join()).toMatch(/not a pool name/);
    expect(refused(4, "[1]").join()).toMatch(/JSON object/);
    expect(refused(4, "{").join()).toMatch(/not JSON/);
    // Agreeing overlaps are not a conflict.
    expect(refused(4, { "tokens:*": 1, "tokens:openai": 1 })).toEqual([]);
    // Every problem is named at once.
    expect(refused(2, { a: 5, b: 7 })).toHaveLength(2);
  });
});
