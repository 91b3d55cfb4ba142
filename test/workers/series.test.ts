import { env } from "cloudflare:workers";
import { beforeAll, describe, expect, it } from "vitest";
import type { QueueSampler } from "../../actors/queue-sampler";
import type { StatusDocument } from "../../schemas/api";
import type { SeriesDocument } from "../../schemas/series";
import { knownWorkload } from "../support/workload";
import { JSON_HEADERS, OPS, call, ended, startExecution, waitFor, waitForLedger } from "../support/api";

/**
 * The numbers behind the charts (`GET /metrics/series`) for a known workload
 * of one client: three completed executions, one failed, one cancelled. Each
 * series must say exactly what the status documents say: which bucket each
 * execution ended in and with which status, its cost, and the waiting,
 * handshake and processing time of each completed attempt. The queue series
 * is checked against the ledger's own snapshot at the moment it was sampled.
 */
const CLIENT = `client_series_${Date.now()}`;
const QUICK = { topic: "Series", targetAudience: "ops", steps: 2, step_ms: 15 };
const docs: StatusDocument[] = [];
const ms = (iso: string | null) => Date.parse(iso!);

async function series(query: string): Promise<SeriesDocument> {
  const res = await call(`/metrics/series?${query}`, { headers: OPS });
  expect(res.status).toBe(200);
  return res.json();
}

/** Nearest-rank quantile, written out here (not imported) so the test does not share the code it checks. */
function nearestRank(values: number[], q: number): number | null {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.ceil(q * sorted.length) - 1];
}

beforeAll(async () => {
  docs.push(...(await knownWorkload(CLIENT, QUICK)));
  // The index is written through each execution's outbox: wait until every end is there.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const s = await series(`window=1h&client_id=${CLIENT}`);
    const n = s.executions.completed.concat(s.executions.failed, s.executions.cancelled).reduce((a, b) => a + b, 0);
    if (n === docs.length && s.latency.reduce((a, w) => a + w.attempts, 0) === 3) break;
    if (Date.now() > deadline) throw new Error(`index not caught up: ${JSON.stringify(s.executions)}`);
    await scheduler.wait(50);
  }
}, 60_000);

describe("GET /metrics/series", () => {
  it("puts each ended execution in the bucket of its completed_at, under its status, and its cost under its client", async () => {
    const s = await series(`window=1h&client_id=${CLIENT}`);
    expect(s).toMatchObject({ window: "1h", client_id: CLIENT, bucket_ms: 60_000, currency: "USD", truncated: false });
    expect(s.buckets).toHaveLength(60);
    const since = ms(s.since);
    expect(ms(s.until) - since).toBe(3_600_000);
    expect(s.buckets[0]).toBe(s.since);
    const expected = { completed: new Array(60).fill(0), failed: new Array(60).fill(0), cancelled: new Array(60).fill(0) };
    const cost = new Array(60).fill(0);
    for (const d of docs) {
      const b = Math.floor((ms(d.completed_at) - since) / 60_000);
      expected[d.status as keyof typeof expected][b] += 1;
      cost[b] += d.cost?.total ?? 0;
    }
    expect(s.executions).toEqual(expected);
    expect(expected.completed.reduce((a, b) => a + b, 0)).toBe(3);
    expect(s.cost.map((c) => c.client_id)).toEqual([CLIENT]);
    for (const [i, v] of s.cost[0].cost.entries()) expect(v, `bucket ${i}`).toBeCloseTo(cost[i], 12);
    expect(s.cost[0].total).toBeCloseTo(docs.reduce((n, d) => n + (d.cost?.total ?? 0), 0), 12);
    expect(s.cost[0].total).toBeGreaterThan(0);
  });

  it("has the waiting, handshake and processing quantiles of the completed attempts per worker, as the status documents time them", async () => {
    const s = await series(`window=1h&client_id=${CLIENT}`);
    const completed = docs.filter((d) => d.status === "completed").flatMap((d) => d.stages);
    expect(completed).toHaveLength(3);
    // One attempt each: the stage's times are its attempt's, and the three phases add up to the stage's duration.
    const waiting = completed.map((st) => st.waiting_ms);
    const processing = completed.map((st) => st.processing_ms);
    const handshake = completed.map((st) => ms(st.completed_at) - ms(st.started_at) - st.waiting_ms - st.processing_ms);
    for (const h of handshake) expect(h).toBeGreaterThan(0);
    expect(s.latency).toEqual([
      expect.objectContaining({
        worker: "bitware-content-granulator",
        attempts: 3,
        waiting_ms: { p50: nearestRank(waiting, 0.5), p95: nearestRank(waiting, 0.95) },
        handshake_ms: { p50: nearestRank(handshake, 0.5), p95: nearestRank(handshake, 0.95) },
        processing_ms: { p50: nearestRank(processing, 0.5), p95: nearestRank(processing, 0.95) },
      }),
    ]);
    // Per bucket: the processing quantiles of the attempts that ended in it.
    const since = ms(s.since);
    const perBucket = new Map<number, number[]>();
    for (const st of completed) {
      const b = Math.floor((ms(st.completed_at) - since) / 60_000);
      perBucket.set(b, [...(perBucket.get(b) ?? []), st.processing_ms]);
    }
    for (const [i, v] of s.latency[0].processing_p95.entries()) expect(v, `bucket ${i}`).toBe(nearestRank(perBucket.get(i) ?? [], 0.95));
    for (const [i, v] of s.latency[0].processing_p50.entries()) expect(v, `bucket ${i}`).toBe(nearestRank(perBucket.get(i) ?? [], 0.5));
  });

  it("takes the window from the query and refuses an unknown window or parameter", async () => {
    const day = await series(`window=24h&client_id=${CLIENT}`);
    expect(day).toMatchObject({ bucket_ms: 600_000 });
    expect(day.buckets).toHaveLength(144);
    expect(day.executions.completed.reduce((a, b) => a + b, 0)).toBe(3);
    const week = await series(`window=7d&client_id=${CLIENT}`);
    expect(week.buckets).toHaveLength(168);
    expect(week.executions.failed.reduce((a, b) => a + b, 0)).toBe(1);
    for (const q of ["window=2h", "windows=1h", `client_id=${"x".repeat(300)}`]) {
      const res = await call(`/metrics/series?${q}`, { headers: OPS });
      expect(res.status, q).toBe(400);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_request");
    }
    expect((await call("/metrics/series")).status).toBe(401);
  });

  it("has the queue length of a pool as the ledger showed it when the sampler took its sample", async () => {
    const pool = "gate:series";
    expect((await call(`/resources/pools/${pool}`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }) })).status).toBe(200);
    // One holds the slot (it hangs); two wait behind it.
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push((await startExecution({ template_name: "series_gated", parameters: { fault: { mode: "hang" } }, client_id: CLIENT })).body.execution_id);
    const before = await waitForLedger((snap) => snap.pools.find((p) => p.name === pool)?.waiting === 2);
    const sampler = env.QUEUE_SAMPLES.get(env.QUEUE_SAMPLES.idFromName("global")) as unknown as DurableObjectStub<QueueSampler>;
    const at = await sampler.sample();
    const after = await waitForLedger(() => true);
    // Nothing moved in the pool while it was sampled.
    expect(after.pools.find((p) => p.name === pool)).toEqual(before.pools.find((p) => p.name === pool));

    const s = await series("window=1h");
    const q = s.queue.find((p) => p.pool === pool);
    const b = Math.floor((at - ms(s.since)) / 60_000);
    expect(q?.waiting[b]).toBe(2);
    expect(q!.samples).toBeGreaterThanOrEqual(1);
    // Every pool of the ledger is sampled.
    expect(s.queue.map((p) => p.pool).sort()).toEqual(after.pools.map((p) => p.name).sort());

    for (const id of ids) await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
    for (const id of ids) await waitFor(id, ended);
    await waitForLedger((snap) => snap.pools.find((p) => p.name === pool)?.waiting === 0);
    const later = await sampler.sample();
    const s2 = await series("window=1h");
    const since2 = ms(s2.since);
    const b2 = Math.floor((later - since2) / 60_000);
    const samples = (await sampler.samples(since2, later + 1)).samples.filter((x) => x.pool === pool);
    expect(samples.find((x) => x.at === at)?.waiting).toBe(2);
    expect(samples[samples.length - 1]).toMatchObject({ at: later, waiting: 0 });
    expect(s2.queue.find((p) => p.pool === pool)?.latest).toEqual({ at: new Date(later).toISOString(), waiting: 0 });
    // A bucket shows the largest sample taken in it.
    const inB2 = samples.filter((x) => Math.floor((x.at - since2) / 60_000) === b2).map((x) => x.waiting);
    expect(s2.queue.find((p) => p.pool === pool)?.waiting[b2]).toBe(Math.max(...inB2));
  });
});
