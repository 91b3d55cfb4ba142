/**
 * The sharded ledger under faults, a randomized property test (issue 15,
 * "Proof"). From one seed (printed; SHARD_SEED=n npx vitest run --project
 * shard-faults reruns its plan): 4 shards, 8 small pools (3 to 5 slots, 2 on
 * each shard), a worker with 16 slots, and 200 one-stage executions started
 * at once (48 starts in flight) whose sets need 1 to 4 of those pools on
 * distinct shards (beside the worker's slot on shard 0 and the client's state
 * on the client's shard), each running 50-400 ms. While they run, a seeded
 * schedule paced in time (one fault every 100-500 ms, whatever the checks
 * cost) crashes ledger objects and Executions (`ctx.abort()`: memory gone,
 * in-flight calls failed, restarted from storage), loses answers of ledger
 * calls (the call acts, the caller sees a failure) and sends calls twice at
 * once, on every shard (test/support/faulty-ledger). The plan and the order of
 * the faults are the same for a seed; the interleaving of a real runtime is not.
 *
 * Checked at every tick, from each shard's own tables: no pool over capacity;
 * every stage the worker is running (its own record of what began when) holds a
 * granted part for each pool of its set, on that pool's shard. At the end:
 * every execution completed within the bound (no deadlock), no shard holds or
 * queues anything, and the worker never ran more than its slots. A crash and a
 * read of the same object never overlap (a read cut off by a crash is no finding).
 */
import { describe, expect, inject, it } from "vitest";
import { mulberry32 as prng } from "../../bench/lib/mulberry32";
import { shardOfClient, shardOfPool } from "../../src/ledger-routing";
import { ended, executionStub, expectNoLiveReservations, startExecution, status, until } from "../support/api";
import { SHARDS, WORKER, clientOn, crash, expectShardWithinCapacity, faulty, layout, poolsOn, putPool, realShard, resetWorkerStats, shardRows, workerJobs, workerStats } from "./shard-support";

const SEED = inject("shardSeed");
const EXECUTIONS = 200;
const WORKER_SLOTS = 16;
/** Every execution ends within this (no deadlock, nothing stuck). */
const BOUND_MS = 300_000;
const METHODS = ["reserve", "renew", "settle", "release"] as const;

describe("the sharded ledger under evictions, lost and duplicated answers", () => {
  it(`seed ${SEED}: no pool over capacity, no stage runs with part of its set, everything ends and nothing is left held`, async () => {
    console.log(`shard property test: seed ${SEED} (rerun with SHARD_SEED=${SEED})`);
    const rnd = prng(SEED);
    const int = (lo: number, hi: number) => lo + Math.floor(rnd() * (hi - lo + 1));
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)];
    const n = SHARDS();
    expect(n).toBe(4);

    // Two pools on each shard, one or two slots each.
    const byShard = Array.from({ length: n }, (_, s) => poolsOn(s, 2, "pq"));
    const capacity = new Map<string, number>();
    for (const p of byShard.flat()) {
      capacity.set(`set:${p}`, int(3, 5));
      await putPool(`set:${p}`, capacity.get(`set:${p}`)!);
    }
    await putPool(`worker:${WORKER}`, WORKER_SLOTS);
    await resetWorkerStats();
    const clients = Array.from({ length: n }, (_, s) => clientOn(s, "prop"));

    // The plan: each stage's set spans 1-4 distinct shards, one pool on each.
    const plan = Array.from({ length: EXECUTIONS }, (_, i) => {
      const pools = [...Array(n).keys()].sort(() => rnd() - 0.5).slice(0, int(1, 4)).map((s) => pick(byShard[s]));
      return { i, pools, client: pick(clients), stepMs: int(50, 400) };
    });
    const shardsTouched = (client: string, set: string[]) =>
      new Set([0, shardOfClient(layout(), client), ...set.map((t) => shardOfPool(layout(), `set:${t}`))]).size;
    const multi = plan.filter((p) => shardsTouched(p.client, p.pools) > 1).length;
    expect(multi).toBeGreaterThan(EXECUTIONS / 2);

    const locks = new Map<string, Promise<unknown>>();
    function exclusive<T>(key: string, fn: () => Promise<T>): Promise<T> {
      const run = (locks.get(key) ?? Promise.resolve()).then(fn, fn);
      locks.set(key, run.catch(() => {}));
      return run;
    }

    /** Each execution's stage's set. */
    const needsOf = new Map<string, string[]>();
    const started = Date.now();
    // Every start at once (at most 48 requests in flight), so the stages contend from the first moment.
    const queue = [...plan];
    await Promise.all(
      Array.from({ length: 48 }, async () => {
        for (let p = queue.shift(); p; p = queue.shift()) {
          // As a client would: a start answered 503 (a ledger call of the admission timed out on a
          // loaded machine) is sent again with the same request_id, which makes it one execution.
          let answer = { status: 0, text: "" };
          for (let k = 0; k < 8; k++) {
            const { res, body } = await startExecution({
              template_name: `needs_${p.pools.join(".")}_n${p.i}`,
              parameters: { steps: 1, step_ms: p.stepMs },
              client_id: p.client,
              request_id: `prop-${SEED}-${p.i}`,
            });
            answer = { status: res.status, text: JSON.stringify(body) };
            if (res.status === 202 || res.status === 200) break;
            if (res.status !== 503) throw new Error(`start ${p.i}: ${answer.status} ${answer.text}`);
            await scheduler.wait(250 * (k + 1));
          }
          if (answer.status !== 202 && answer.status !== 200) throw new Error(`start ${p.i}: ${answer.status} ${answer.text}`);
          needsOf.set(JSON.parse(answer.text).execution_id, p.pools.map((t) => `set:${t}`));
        }
      }),
    );
    const startedMs = Date.now() - started;
    const ids = [...needsOf.keys()];
    const open = new Set(ids);
    const faults = { lost: 0, duplicated: 0, ledgerEvictions: 0, executionEvictions: 0, partialChecks: 0 };

    /** Every stage the worker runs holds each pool of its set, granted on that pool's shard. */
    async function expectWholeSets(): Promise<void> {
      const t1 = Date.now();
      const granted = new Map<string, Set<string>>();
      for (let s = 0; s < n; s++) {
        for (const r of await exclusive(`ledger-${s}`, () => shardRows(s, undefined, true))) {
          const key = `${r.execution_id}:${r.stage_id}#${r.attempt}`;
          const held = granted.get(key) ?? new Set<string>();
          for (const pool of Object.keys(r.req)) if (shardOfPool(layout(), pool) === s) held.add(pool);
          granted.set(key, held);
        }
      }
      // A job that began before the first shard was read and is still running after the last one
      // ran through every read: each read must show its part granted.
      for (const job of await workerJobs()) {
        if (job.began >= t1) continue;
        const executionId = job.key.slice(0, job.key.indexOf(":"));
        const needs = needsOf.get(executionId);
        if (!needs) continue;
        faults.partialChecks++;
        const held = granted.get(job.key) ?? new Set<string>();
        for (const pool of needs) expect(held.has(pool), `${job.key} runs without ${pool}`).toBe(true);
        expect(held.has(`worker:${WORKER}`), `${job.key} runs without its worker slot`).toBe(true);
      }
    }

    // The faults, paced in time (one every 100-500 ms, whatever the checks below cost), until every execution ended.
    let running = true;
    const injector = (async () => {
      while (running) {
        await scheduler.wait(int(100, 500));
        if (!running) break;
        const shard = int(0, n - 1);
        const r = rnd();
        if (r < 0.3) {
          await faulty(shard).setFault([pick(METHODS)], { mode: "lose_answer", times: int(1, 2) });
          faults.lost++;
        } else if (r < 0.6) {
          await faulty(shard).setFault([pick(METHODS)], { mode: "duplicate", times: int(1, 3) });
          faults.duplicated++;
        } else if (r < 0.7) {
          await exclusive(`ledger-${shard}`, () => crash(realShard(shard)));
          faults.ledgerEvictions++;
        } else if (r < 0.85 && open.size > 0) {
          const id = pick([...open]);
          await exclusive(id, () => crash(executionStub(id)));
          faults.executionEvictions++;
        }
      }
    })();

    let tick = 0;
    const endedAt = new Map<string, number>();
    try {
      while (open.size > 0) {
        if (Date.now() - started > BOUND_MS) {
          const docs = await Promise.all([...open].slice(0, 3).map((id) => status(id)));
          throw new Error(`${open.size} still open after ${BOUND_MS} ms, e.g. ${JSON.stringify(docs.map((d) => ({ id: d.execution_id, status: d.status, stages: d.stages.map((x) => [x.status, x.message]), undeliverable: d.undeliverable })))}`);
        }
        tick++;
        for (let s = 0; s < n; s++) await exclusive(`ledger-${s}`, () => expectShardWithinCapacity(s));
        await expectWholeSets();
        expect((await workerStats()).processing).toBeLessThanOrEqual(WORKER_SLOTS);
        if (tick % 10 === 0) console.log(`shard property test: tick ${tick}, ${open.size} open after ${Date.now() - started} ms, ${JSON.stringify(faults)}`);
        // A few of the open executions per tick, in turn (reading all of them each time would be most of the load).
        for (const id of [...open].slice(0, 12)) {
          open.delete(id);
          if (!ended(await exclusive(id, () => status(id)))) open.add(id);
          else endedAt.set(id, Date.now() - started);
        }
      }
    } finally {
      running = false;
      await injector;
    }
    const times = [...endedAt.values()].sort((a, b) => a - b);
    console.log(`shard property test: started in ${startedMs} ms; ended p50 ${times[times.length >> 1]} p90 ${times[Math.floor(times.length * 0.9)]} max ${times[times.length - 1]} ms`);
    for (let s = 0; s < n; s++) await faulty(s).clearFaults();
    const calls = await Promise.all([...Array(n).keys()].map(async (s) => {
      const out: Record<string, number> = {};
      for (const c of await faulty(s).calls()) out[c.method] = (out[c.method] ?? 0) + 1;
      return out;
    }));
    console.log(`shard property test: ledger calls per shard ${JSON.stringify(calls)}`);
    console.log(`shard property test: all ended after ${Date.now() - started} ms, ${tick} ticks, ${JSON.stringify(faults)}`);

    for (const id of ids) {
      const doc = await status(id);
      if (doc.status !== "completed") {
        const rows = [];
        for (let s = 0; s < n; s++) rows.push(...(await shardRows(s, new Set([id]))).map((r) => ({ s, ...r })));
        console.log(`shard property test: ${id} ${JSON.stringify(doc.stages)} ${JSON.stringify(rows)}`);
      }
      expect(doc.status, `${id}: ${JSON.stringify(doc.error)}`).toBe("completed");
      await expectNoLiveReservations(id, 15_000);
    }
    // Nothing held or waiting on any shard, each within capacity, by its own tables.
    for (let s = 0; s < n; s++) {
      await until(`shard ${s} empty`, () => shardRows(s), (rows) => rows.every((x) => x.state !== "granted" && x.state !== "waiting"), 15_000);
      const st = await expectShardWithinCapacity(s);
      expect([st.granted, st.waiting]).toEqual([0, 0]);
    }
    const w = await workerStats();
    expect(w.max_concurrent).toBeLessThanOrEqual(WORKER_SLOTS);
    expect(w.completed).toBe(EXECUTIONS);
    // The run did what it claims: faults of each kind, and whole-set checks while stages ran.
    expect(faults.lost).toBeGreaterThan(0);
    expect(faults.duplicated).toBeGreaterThan(0);
    expect(faults.ledgerEvictions).toBeGreaterThan(0);
    expect(faults.executionEvictions).toBeGreaterThan(0);
    expect(faults.partialChecks).toBeGreaterThan(0);
    const lostSeen = (await Promise.all([...Array(n).keys()].map(async (s) => (await faulty(s).calls()).filter((c) => c.fault === "lose_answer").length))).reduce((a, b) => a + b, 0);
    expect(lostSeen).toBeGreaterThan(0);
    console.log(`shard property test: seed ${SEED}, ${EXECUTIONS} executions (${multi} multi-shard) in ${Date.now() - started} ms, ${tick} ticks, ${JSON.stringify(faults)}, ${lostSeen} answers lost`);
  }, BOUND_MS + 120_000);
});
