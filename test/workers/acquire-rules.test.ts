import { describe, expect, it } from "vitest";
import {
  type Acquisition,
  type Part,
  grantedSet,
  heldParts,
  nextPart,
  nextRound,
  partDeadlineAt,
  partReservationId,
  planParts,
  reacquireDelayMs,
  stageNeeds,
  usageShares,
} from "../../actors/execution/parts";
import { parseShardLayout, shardOfClient, subPoolOf } from "../../src/ledger-routing";

/** The pure rules of a multi-shard acquisition (actors/execution/parts.ts). */

const layout = parseShardLayout(4, JSON.stringify({ "gate:a*": 0, "gate:b*": 1, "gate:c*": 2, "worker:*": 0, "tokens:openai": { split: [2, 3] } }));
/** A client id whose own shard is `shard` under the layout (found, not assumed). */
const clientOn = (shard: number) => {
  for (let i = 0; ; i++) if (shardOfClient(layout, `client_${i}`) === shard) return `client_${i}`;
};
const t = { ledgerCallTimeoutMs: 2_000, ledgerShortLeaseMs: 15_000, ledgerRetryBaseMs: 500, ledgerRetryCapMs: 30_000 };
const acq = (parts: Partial<Part>[], round = 0): Acquisition => ({
  stage_id: "stage_1",
  attempt: 1,
  round,
  estimated: false,
  parts: parts.map((p, i) => ({ shard: i, requirements: {}, worker: i === 0, client: false, state: "new", ...p })),
});

describe("a stage's needs split into parts in the one global order", () => {
  it("sorts parts by shard, puts the worker slot and the client's limits on their shards, and keeps an explicit worker amount", () => {
    const parts = planParts(layout, { "gate:b1": 1, "gate:a1": 2, "worker:w": 3 }, { worker: "w", clientId: clientOn(2), executionId: "e1" });
    expect(parts.map((p) => p.shard)).toEqual([0, 1, 2]);
    expect(parts[0]).toMatchObject({ shard: 0, worker: true, client: false, requirements: { "gate:a1": 2, "worker:w": 3 }, state: "new" });
    expect(parts[1]).toMatchObject({ shard: 1, worker: false, client: false, requirements: { "gate:b1": 1 } });
    // The client's shard holds no pool of the stage, but its part holds the client's limits.
    expect(parts[2]).toMatchObject({ shard: 2, worker: false, client: true, requirements: {} });
  });

  it("is one part when the worker, the client and every pool share a shard", () => {
    const parts = planParts(layout, { "gate:a1": 1 }, { worker: "w", clientId: clientOn(0), executionId: "e1" });
    expect(parts).toHaveLength(1);
    expect(parts[0]).toMatchObject({ shard: 0, worker: true, client: true });
  });

  it("maps a split pool to the execution's sub-pool on that sub-pool's shard", () => {
    const sub = subPoolOf(layout, "tokens:openai", "exec-split");
    const parts = planParts(layout, { "tokens:openai": 100 }, { worker: "w", clientId: clientOn(0), executionId: "exec-split" });
    const shard = sub.endsWith("#0") ? 2 : 3;
    expect(parts.find((p) => p.shard === shard)?.requirements).toEqual({ [sub]: 100 });
  });
});

describe("part reservation ids and rounds", () => {
  it("is the attempt's id in round 0 and carries @round after a back-off", () => {
    expect(partReservationId("ex", "stage_1", 2, 0)).toBe("ex:stage_1:2");
    expect(partReservationId("ex", "stage_1", 2, 3)).toBe("ex:stage_1:2@3");
  });

  it("starts the next round with every part new and nothing held", () => {
    const a = acq([{ state: "granted", expiresAt: 10, granted: { x: 1 } }, { state: "waiting" }], 1);
    const b = nextRound(a);
    expect(b.round).toBe(2);
    expect(b.parts.map((p) => p.state)).toEqual(["new", "new"]);
    expect(b.parts.some((p) => p.expiresAt !== undefined || p.granted !== undefined)).toBe(false);
  });
});

describe("which part goes next, what may be held, and the round's deadline", () => {
  it("asks parts in order and counts as held every granted part and the first one asked", () => {
    const a = acq([{ state: "granted", expiresAt: 20_000 }, { state: "waiting" }, { state: "new" }]);
    expect(nextPart(a)).toBe(1);
    expect(heldParts(a).map((p) => p.shard)).toEqual([0, 1]);
    const done = acq([{ state: "granted" }, { state: "granted" }]);
    expect(nextPart(done)).toBe(-1);
    expect(heldParts(done)).toHaveLength(2);
  });

  it("sets the deadline before the earliest held short lease ends, and none when nothing is held or the set is complete", () => {
    const a = acq([{ state: "granted", expiresAt: 40_000 }, { state: "granted", expiresAt: 30_000 }, { state: "waiting" }]);
    // The earliest lease less the margin: one ledger call (2 s), at most a third of the short lease.
    expect(partDeadlineAt(a, t)).toBe(28_000);
    expect(partDeadlineAt(acq([{ state: "waiting" }, { state: "new" }]), t)).toBeNull();
    expect(partDeadlineAt(acq([{ state: "granted", expiresAt: 5 }, { state: "granted", expiresAt: 6 }]), t)).toBeNull();
  });

  it("backs off with full jitter on the ledger's retry curve, capped at one short lease, never zero", () => {
    expect(reacquireDelayMs(1, t, () => 0)).toBe(1);
    expect(reacquireDelayMs(1, t, () => 1)).toBe(500);
    expect(reacquireDelayMs(3, t, () => 1)).toBe(2_000);
    // Past the short lease (15 s) the ledger's retry cap (30 s) no longer applies: the set keeps its place, waiting longer gains nothing.
    expect(reacquireDelayMs(20, t, () => 1)).toBe(15_000);
    expect(reacquireDelayMs(20, { ...t, ledgerRetryCapMs: 8_000 }, () => 1)).toBe(8_000);
    expect(reacquireDelayMs(3, t, () => 0.5)).toBe(1_000);
  });
});

describe("a settle's usage split by shard", () => {
  it("gives each pool's usage to the part on its shard, a pool with no part to the worker's part, and every part a share", () => {
    const parts = [
      { shard: 0, worker: false },
      { shard: 1, worker: true },
      { shard: 3, worker: false },
    ];
    // gate:c1 lives on shard 2, where the stage has no part: the worker's part (shard 1) reports it.
    const shares = usageShares(layout, parts, { "gate:a1": 1, "gate:b1": 5, "gate:c1": 7 }, "e1");
    expect(shares).toEqual([{ "gate:a1": 1 }, { "gate:b1": 5, "gate:c1": 7 }, {}]);
  });

  it("charges a split pool's usage to the execution's sub-pool", () => {
    const sub = subPoolOf(layout, "tokens:openai", "e9");
    const shard = sub.endsWith("#0") ? 2 : 3;
    const parts = [
      { shard: 0, worker: true },
      { shard, worker: false },
    ];
    const shares = usageShares(layout, parts, { "tokens:openai": 70 }, "e9");
    expect(shares[1]).toEqual({ [sub]: 70 });
    expect(shares[0]).toEqual({});
  });
});

describe("the whole stage's needs and its granted set", () => {
  it("adds up every part's requirements, and what the shards granted once granted", () => {
    const a = acq([
      { requirements: { "gate:a1": 1 }, state: "granted", granted: { "gate:a1": 1, "worker:w": 1 } },
      { requirements: { "gate:b1": 2 }, state: "granted", granted: { "gate:b1": 2 } },
    ]);
    expect(stageNeeds(a)).toEqual({ "gate:a1": 1, "gate:b1": 2 });
    expect(grantedSet(a)).toEqual({ "gate:a1": 1, "worker:w": 1, "gate:b1": 2 });
  });
});
