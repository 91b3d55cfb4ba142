import { attemptOutcome } from "../actors/execution-index";
import { QUEUE_SAMPLER_NAME, type QueueSampler } from "../actors/queue-sampler";
import { SERIES_WINDOWS, type SeriesDocument, SeriesQuery, type SeriesWindow } from "../schemas/series";
import { configOf } from "./config";
import { parseWith } from "./http";
import { seriesIndex } from "./index-routing";
import { askObject } from "./outbound";

/**
 * `GET /metrics/series`: the numbers behind the charts on `/ui`, over the
 * last hour (1-minute buckets), day (10 minutes) or week (1 hour):
 * - executions ended per bucket by status, and their cost per client, from
 *   the execution index (one GROUP BY per month object that may hold them);
 * - stage latency per worker, from the completed attempts the ended
 *   executions' index entries carry (their spans' waiting, handshake and
 *   processing times);
 * - queue length per pool, from the queue sampler's samples.
 * Bounded: each index month answers at most 5000 groups and 20000 attempts,
 * the sampler 200000 samples; `truncated` says when a bound was hit.
 */
export function samplerOf(env: Env): DurableObjectStub<QueueSampler> {
  const ns = env.QUEUE_SAMPLES as unknown as DurableObjectNamespace<QueueSampler>;
  return ns.get(ns.idFromName(QUEUE_SAMPLER_NAME));
}

/** Nearest-rank quantile of sorted values (null for none). */
export function quantile(sorted: number[], q: number): number | null {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

const quantiles = (values: number[]) => {
  const s = [...values].sort((a, b) => a - b);
  return { p50: quantile(s, 0.5), p95: quantile(s, 0.95) };
};

export async function seriesDocument(env: Env, url: URL, now = Date.now()): Promise<SeriesDocument> {
  const q = parseWith(SeriesQuery, Object.fromEntries(url.searchParams.entries()), "query");
  const window: SeriesWindow = q.window ?? "1h";
  const { ms, bucketMs } = SERIES_WINDOWS[window];
  // Buckets end at the next bucket boundary after now, so the last one is the current one.
  const until = Math.ceil((now + 1) / bucketMs) * bucketMs;
  const since = until - ms;
  const n = ms / bucketMs;
  const timeout = configOf(env).tuning.objectCallTimeoutMs;
  const [index, queue] = await Promise.all([
    seriesIndex(env, since, until, bucketMs, q.client_id),
    askObject(samplerOf(env).samples(since, until), timeout, "the queue sampler"),
  ]);
  const zeros = () => new Array<number>(n).fill(0);
  const at = (t: number) => Math.floor((t - since) / bucketMs);

  const executions = { completed: zeros(), failed: zeros(), cancelled: zeros() };
  const costs = new Map<string, number[]>();
  for (const g of index.groups) {
    if (g.bucket < 0 || g.bucket >= n) continue;
    if (g.status === "completed" || g.status === "failed" || g.status === "cancelled") executions[g.status][g.bucket] += g.count;
    const c = costs.get(g.client_id) ?? zeros();
    c[g.bucket] += g.cost;
    costs.set(g.client_id, c);
  }

  const byWorker = new Map<string, { waiting: number[]; handshake: number[]; processing: number[]; perBucket: number[][] }>();
  for (const a of index.attempts) {
    const [worker, endedAt, waiting, handshake, processing] = a;
    const b = at(endedAt);
    if (attemptOutcome(a) !== "completed") continue;
    if (b < 0 || b >= n) continue;
    const w = byWorker.get(worker) ?? { waiting: [], handshake: [], processing: [], perBucket: Array.from({ length: n }, () => []) };
    w.waiting.push(waiting);
    w.handshake.push(handshake);
    w.processing.push(processing);
    w.perBucket[b].push(processing);
    byWorker.set(worker, w);
  }

  const pools = new Map<string, { waiting: (number | null)[]; samples: number; latest: { at: number; waiting: number } }>();
  for (const s of queue.samples) {
    const b = at(s.at);
    if (b < 0 || b >= n) continue;
    const p = pools.get(s.pool) ?? { waiting: new Array<number | null>(n).fill(null), samples: 0, latest: s };
    p.waiting[b] = Math.max(p.waiting[b] ?? 0, s.waiting);
    p.samples += 1;
    // Samples come oldest first.
    p.latest = { at: s.at, waiting: s.waiting };
    pools.set(s.pool, p);
  }

  const sorted = <T>(m: Map<string, T>) => [...m.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return {
    window,
    client_id: q.client_id ?? null,
    since: new Date(since).toISOString(),
    until: new Date(until).toISOString(),
    bucket_ms: bucketMs,
    buckets: Array.from({ length: n }, (_, i) => new Date(since + i * bucketMs).toISOString()),
    currency: configOf(env).prices.currency,
    executions,
    latency: sorted(byWorker).map(([worker, w]) => {
      const per = w.perBucket.map((v) => quantiles(v));
      return {
        worker,
        attempts: w.processing.length,
        waiting_ms: quantiles(w.waiting),
        handshake_ms: quantiles(w.handshake),
        processing_ms: quantiles(w.processing),
        processing_p50: per.map((x) => x.p50),
        processing_p95: per.map((x) => x.p95),
      };
    }),
    queue: sorted(pools).map(([pool, p]) => ({ pool, waiting: p.waiting, samples: p.samples, latest: { at: new Date(p.latest.at).toISOString(), waiting: p.latest.waiting } })),
    cost: sorted(costs).map(([client_id, cost]) => ({ client_id, cost, total: cost.reduce((a, b) => a + b, 0) })),
    truncated: index.truncated || queue.truncated,
  };
}
