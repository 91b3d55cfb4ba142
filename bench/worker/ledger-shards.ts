/**
 * The sharded-ledger benchmark's driver (bench/ledger.mjs --shards), bundled
 * with the real ResourceLedger and src/ledger-routing.ts and run in local workerd.
 *
 * GET /shards?shards=N&multi=F&rate=R&seconds=S&inflight=M&run=K offers R
 * stages per second for S seconds (open loop: stage i starts at i/R s, at most
 * M in flight) to N ledger objects. Each stage is one tenant's: its worker's
 * slot `worker:b{j}` and `tokens:b{j}`, both pinned to shard j % N, so it lives
 * on one shard; a share F of the stages take the next tenant's tokens instead
 * (`tokens:b{j+1}`, on shard (j+1) % N), so with N > 1 they span two shards.
 * The parts come from the routing itself (partsOf) and are driven as the
 * Execution drives them (docs/scaling.md): a one-shard stage is one reserve and
 * one settle; a multi-shard stage reserves each part in shard order under the
 * short lease, renews each to the normal lease once all are granted, and
 * settles each with its share of the usage. It counts the calls each object
 * receives, so the answer gives the busiest object's request rate beside the
 * stages per second overall.
 */
import { parseShardLayout, partsOf } from "../../src/ledger-routing";
import type { ResourceLedger } from "../../actors/resource-ledger";
import type { ReserveRequest } from "../../schemas/ledger";
import { mulberry32 } from "../lib/mulberry32";

/** Tenants (worker + tokens pool pairs); a multiple of every shard count benched, so each shard gets as many. */
export const TENANTS = 16;
const SHORT_LEASE_MS = 15_000;
const LEASE_MS = 60_000;

interface BenchEnv {
  RESOURCE_LEDGER: DurableObjectNamespace<ResourceLedger>;
}

function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

export async function shardBench(url: URL, env: BenchEnv): Promise<Response> {
  const n = Math.max(1, Math.min(256, Number(url.searchParams.get("shards") ?? 1)));
  const multi = Math.max(0, Math.min(1, Number(url.searchParams.get("multi") ?? 0)));
  const rate = Math.max(1, Math.min(100_000, Number(url.searchParams.get("rate") ?? 500)));
  const seconds = Math.max(0.1, Math.min(120, Number(url.searchParams.get("seconds") ?? 10)));
  const inflight = Math.max(1, Math.min(4096, Number(url.searchParams.get("inflight") ?? 512)));
  const run = url.searchParams.get("run") ?? "0";
  const map: Record<string, number> = {};
  for (let j = 0; j < TENANTS; j++) {
    map[`worker:b${j}`] = j % n;
    map[`tokens:b${j}`] = j % n;
  }
  const layout = parseShardLayout(String(n), JSON.stringify(map));
  // Fresh objects per run (names outside the layout, so state never carries over between configurations).
  const stubs = Array.from({ length: n }, (_, i) => env.RESOURCE_LEDGER.get(env.RESOURCE_LEDGER.idFromName(`bench-${run}-n${n}-s${i}`)));
  const calls = new Array<number>(n).fill(0);
  /** The stub of a shard, counting one call to it. */
  const at = (shard: number) => {
    calls[shard]++;
    return stubs[shard];
  };
  for (let j = 0; j < TENANTS; j++) {
    await stubs[j % n].putPool(`worker:b${j}`, { kind: "concurrency", capacity: 1_000_000 });
    await stubs[j % n].putPool(`tokens:b${j}`, { kind: "rate", capacity: 1e12, refill_per_second: 1e9 });
  }
  calls.fill(0);

  const total = Math.round(rate * seconds);
  // Seeded: every shard count sees the same sequence of stages.
  const rnd = mulberry32(42);
  const plan = Array.from({ length: total }, () => ({ tenant: Math.floor(rnd() * TENANTS), multi: rnd() < multi }));
  const latencies: number[] = [];
  let errors = 0;
  let firstError: string | undefined;
  let multiShard = 0;
  let active = 0;
  let waitSlot: (() => void) | null = null;

  async function stage(i: number): Promise<void> {
    const { tenant, multi: cross } = plan[i];
    const worker = `b${tenant}`;
    const tokens = `tokens:b${cross ? (tenant + 1) % TENANTS : tenant}`;
    const executionId = `exec_1700000000000_${run.padStart(3, "0")}n${String(n).padStart(3, "0")}i${String(i).padStart(9, "0")}`;
    const needs = { [tokens]: 100 };
    const base: ReserveRequest = { executionId, stageId: "stage_1", attempt: 1, priority: "normal", leaseMs: LEASE_MS, worker };
    const parts = partsOf(layout, needs, { worker, executionId });
    const t0 = Date.now();
    try {
      if (parts.length === 1) {
        const s = parts[0].shard;
        const r = await at(s).reserve({ ...base, requirements: needs });
        if (r.status !== "granted") throw new Error(`reserve answered ${r.status}`);
        const done = await at(s).settle(r.reservationId, { [tokens]: 80 }, 5);
        if (!done.ok) throw new Error("settle not ok");
      } else {
        multiShard++;
        const shards = parts.map((p) => p.shard);
        const ids: string[] = [];
        for (const p of parts) {
          const r = await at(p.shard).reserve({
            ...base,
            leaseMs: SHORT_LEASE_MS,
            requirements: p.requirements,
            part: { shard: p.shard, shards, worker: p.worker, client: false, stageNeeds: needs },
          } as ReserveRequest);
          if (r.status !== "granted") throw new Error(`part reserve answered ${r.status}`);
          ids.push(r.reservationId);
        }
        const renewed = await Promise.all(parts.map((p, k) => at(p.shard).renew(ids[k], LEASE_MS)));
        if (!renewed.every((x) => x.ok)) throw new Error("renew not ok");
        const settled = await Promise.all(
          parts.map((p, k) => at(p.shard).settle(ids[k], p.requirements[tokens] !== undefined ? { [tokens]: 80 } : {}, 5)),
        );
        if (!settled.every((x) => x.ok)) throw new Error("settle not ok");
      }
    } catch (err) {
      errors++;
      firstError ??= String(err);
    }
    latencies.push(Date.now() - t0);
  }

  const started = Date.now();
  const running: Promise<void>[] = [];
  for (let i = 0; i < total; i++) {
    const due = started + (i * 1000) / rate;
    const wait = due - Date.now();
    if (wait > 0) await scheduler.wait(wait);
    // At most `inflight` at once: past it the offered load is not met, and the answer says so (pairs/s below rate).
    while (active >= inflight) await new Promise<void>((r) => (waitSlot = r));
    active++;
    running.push(
      stage(i).finally(() => {
        active--;
        const w = waitSlot;
        waitSlot = null;
        w?.();
      }),
    );
  }
  await Promise.all(running);
  const elapsedMs = Date.now() - started;
  latencies.sort((a, b) => a - b);
  const busiest = Math.max(...calls);
  return Response.json({
    shards: n,
    multi,
    offered_per_sec: rate,
    stages: total,
    multi_shard_stages: multiShard,
    elapsedMs,
    errors,
    firstError,
    calls,
    p50Ms: percentile(latencies, 50),
    p99Ms: percentile(latencies, 99),
    busiest_calls: busiest,
  });
}
