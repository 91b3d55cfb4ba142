import type { ResourcesDocument } from "../../schemas/resources";
import { env } from "cloudflare:workers";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { beforeAll, describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { fromDataPoint } from "../../src/metrics";
import { scheduleShardIndex } from "../../src/schedule-service";
import { knownWorkload } from "../support/workload";
import { JSON_HEADERS, KAM, OPS, call, startExecution, status, waitFor } from "../support/api";
import { waitForEvents } from "../support/kam-events";

/**
 * Metrics for a known workload: five executions of one client (three
 * completed, one failed, one cancelled). The data points its code wrote
 * reach the tests' Analytics Engine dataset (a real worker behind `METRICS`,
 * vitest.config.ts), and `GET /metrics` is read with a Prometheus text parser;
 * both must say exactly what the API says.
 */
type Family = { name: string; help: string; type: string; metrics: { value: string; labels?: Record<string, string> }[] };
type Point = Record<string, string | number>;

const CLIENT = `client_metrics_${Date.now()}`;
const QUICK = { topic: "Metrics", targetAudience: "ops", steps: 1, step_ms: 5 };
const docs: StatusDocument[] = [];

async function points(): Promise<Point[]> {
  const res = await (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK.fetch("http://sink/");
  return ((await res.json()) as AnalyticsEngineDataPoint[]).map(fromDataPoint);
}

/** The sink's points once `done` holds (they are written without the caller waiting), with a deadline. */
async function pointsWhen(done: (p: Point[]) => boolean, timeoutMs = 10_000): Promise<Point[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const p = await points();
    if (done(p) || Date.now() > deadline) return p;
    await scheduler.wait(50);
  }
}

async function scrape(): Promise<Family[]> {
  const res = await call("/metrics", { headers: OPS });
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8");
  return parsePrometheusTextFormat(await res.text()) as Family[];
}

function sample(families: Family[], name: string, labels: Record<string, string>): number | undefined {
  const f = families.find((x) => x.name === name);
  const m = f?.metrics.find((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  return m ? Number(m.value) : undefined;
}

beforeAll(async () => {
  docs.push(...(await knownWorkload(CLIENT, QUICK)));
  // The index is written through each execution's outbox: wait until it has every end.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const counts = (await (await call(`/executions/counts?client_id=${CLIENT}`, { headers: OPS })).json()) as { counts: Record<string, number> };
    if (counts.counts.completed === 3 && counts.counts.failed === 1 && counts.counts.cancelled === 1) break;
    if (Date.now() > deadline) throw new Error(`index not caught up: ${JSON.stringify(counts)}`);
    await scheduler.wait(50);
  }
}, 60_000);

describe("Analytics Engine data points", () => {
  it("one execution_started and one execution_ended per execution, with the status, cost and tokens of its status document", async () => {
    const mine = (p: Point) => p.client_id === CLIENT;
    const all = await pointsWhen((p) => p.filter((x) => mine(x) && x.event === "execution_ended").length >= docs.length);
    for (const d of docs) {
      const started = all.filter((p) => p.event === "execution_started" && p.execution_id === d.execution_id);
      const endedPoints = all.filter((p) => p.event === "execution_ended" && p.execution_id === d.execution_id);
      expect(started).toHaveLength(1);
      expect(started[0]).toMatchObject({ template_name: d.template_name, client_id: CLIENT, count: 1 });
      expect(endedPoints).toHaveLength(1);
      const tokens = d.stages.reduce((n, s) => n + Object.entries(s.usage ?? {}).reduce((m, [k, v]) => m + (k.startsWith("tokens:") ? v : 0), 0), 0);
      expect(endedPoints[0]).toMatchObject({ outcome: d.status, cost: d.cost?.total ?? 0, tokens });
      expect(endedPoints[0].code).toBe(d.error?.code);
    }
  });

  it("one stage_attempt per attempt the status documents count (a cancelled one too), with its worker, outcome and phases", async () => {
    const attempts = docs.flatMap((d) => d.stages.filter((s) => s.attempts > 0).map((s) => ({ d, s })));
    const all = await pointsWhen((p) => p.filter((x) => x.event === "stage_attempt" && x.client_id === CLIENT).length >= attempts.length);
    const mine = all.filter((p) => p.event === "stage_attempt" && p.client_id === CLIENT);
    expect(mine).toHaveLength(attempts.length);
    for (const { d, s } of attempts) {
      const p = mine.find((x) => x.execution_id === d.execution_id && x.stage_id === s.stage_id);
      expect(p).toMatchObject({ worker: s.worker, attempt: s.attempts, outcome: s.status === "completed" ? "completed" : s.error?.code });
      if (s.status === "completed") {
        expect(p?.processing_ms).toBe(s.processing_ms);
        // One attempt: its waiting, handshake and processing add up to the stage's duration.
        const handshake = Date.parse(s.completed_at!) - Date.parse(s.started_at!) - s.waiting_ms - s.processing_ms;
        expect(handshake).toBeGreaterThan(0);
        expect(p?.handshake_ms).toBe(handshake);
      }
    }
    expect(mine.filter((p) => p.outcome === "worker_not_bound")).toHaveLength(1);
    expect(mine.filter((p) => p.outcome === "cancelled")).toHaveLength(1);
  });

  it("one ledger_answer per pool a grant names, with the wait the status document shows", async () => {
    const completed = docs.filter((d) => d.status === "completed");
    const all = await pointsWhen((p) => completed.every((d) => p.some((x) => x.event === "ledger_answer" && x.execution_id === d.execution_id)));
    for (const d of completed) {
      const mine = all.filter((p) => p.event === "ledger_answer" && p.execution_id === d.execution_id);
      const workerPool = mine.filter((p) => p.pool === "worker:bitware-content-granulator");
      expect(workerPool).toEqual([expect.objectContaining({ outcome: "granted", stage_id: "stage_1", attempt: 1, waiting_ms: d.stages[0].waiting_ms })]);
      // Every pool of the grant once, all granted.
      expect(new Set(mine.map((p) => p.pool)).size).toBe(mine.length);
      for (const p of mine) expect(p.outcome).toBe("granted");
    }
  });

  it("one notification point per delivery to KAM, with its HTTP status, attempt and event type", async () => {
    // The demo KAM answers 500 to the first two deliveries of a client named kam-flaky-2-...
    const { body } = await startExecution({ template_name: "quick_summary", parameters: QUICK, client_id: "kam-flaky-2-metrics", notify: true });
    const id = body.execution_id as string;
    const got = await waitForEvents(id, (r) => r.events.length === 1);
    const all = await pointsWhen((p) => p.filter((x) => x.event === "notification" && x.execution_id === id).length >= got.receipts.length);
    const mine = all.filter((x) => x.event === "notification" && x.execution_id === id);
    expect(got.receipts.map((r) => r.answered)).toEqual([500, 500, 200]);
    expect(mine.map((p) => [p.kind, p.outcome, p.attempt])).toEqual(got.receipts.map((r, i) => [r.type, String(r.answered), i + 1]));
    for (const p of mine) expect(p.duration_ms).toBeGreaterThanOrEqual(0);
    await waitFor(id, (d) => d.notifications.delivered === 1);
  });

  it("a refused callback is a callback_refused point with its code", async () => {
    const id = docs[0].execution_id;
    const res = await call(`/executions/${id}/stages/stage_1/complete`, { method: "POST", headers: { authorization: "Bearer abc.def", ...JSON_HEADERS }, body: "{}" });
    expect(res.status).toBe(401);
    const all = await pointsWhen((p) => p.some((x) => x.event === "callback_refused" && x.execution_id === id));
    expect(all.filter((x) => x.event === "callback_refused" && x.execution_id === id)).toEqual([
      expect.objectContaining({ code: "unauthorized", kind: "complete", stage_id: "stage_1" }),
    ]);
  });
});

describe("GET /metrics", () => {
  const SERIES = [
    ["orchestrator_executions", "GAUGE"],
    ["orchestrator_execution_cost_total", "COUNTER"],
    ["orchestrator_execution_tokens_total", "COUNTER"],
    ["orchestrator_stage_latency_ms", "GAUGE"],
    ["orchestrator_stage_latency_attempts", "GAUGE"],
    ["orchestrator_stage_attempts", "GAUGE"],
    ["orchestrator_pool_capacity", "GAUGE"],
    ["orchestrator_pool_in_use", "GAUGE"],
    ["orchestrator_pool_available", "GAUGE"],
    ["orchestrator_pool_waiting", "GAUGE"],
    ["orchestrator_ledger_leases", "GAUGE"],
    ["orchestrator_ledger_waiters", "GAUGE"],
    ["orchestrator_ledger_shard_up", "GAUGE"],
    ["orchestrator_ledger_pool_conflicts", "GAUGE"],
    ["orchestrator_schedules", "GAUGE"],
    ["orchestrator_schedule_fires", "GAUGE"],
    ["orchestrator_metrics_truncated", "GAUGE"],
  ];

  it("parses as Prometheus text and carries every documented series with its type and help", async () => {
    const families = await scrape();
    expect(families.map((f) => [f.name, f.type])).toEqual(SERIES);
    for (const f of families) expect(f.help.length).toBeGreaterThan(10);
  });

  it("counts the workload's executions by status and its cost exactly as the API reports them", async () => {
    const families = await scrape();
    const counts = (await (await call(`/executions/counts?client_id=${CLIENT}`, { headers: OPS })).json()) as { counts: Record<string, number> };
    for (const [st, template] of [["completed", "quick_summary"], ["failed", "unbound_worker"], ["cancelled", "quick_summary"]] as const) {
      const expected = docs.filter((d) => d.status === st && d.template_name === template).length;
      expect(sample(families, "orchestrator_executions", { client_id: CLIENT, status: st, template_name: template })).toBe(expected);
    }
    const total = families.find((f) => f.name === "orchestrator_executions")!.metrics.filter((m) => m.labels?.client_id === CLIENT);
    expect(total.reduce((n, m) => n + Number(m.value), 0)).toBe(Object.values(counts.counts).reduce((a, b) => a + b, 0));
    for (const template of ["quick_summary", "unbound_worker"]) {
      const apiCost = docs.filter((d) => d.template_name === template).reduce((n, d) => n + (d.cost?.total ?? 0), 0);
      expect(sample(families, "orchestrator_execution_cost_total", { client_id: CLIENT, template_name: template, currency: "USD" })).toBeCloseTo(apiCost, 15);
    }
  });

  it("sums the workload's tokens per client and template, and has each worker's stage latency as the status documents time it", async () => {
    const families = await scrape();
    const tokensOfDoc = (d: StatusDocument) => d.stages.reduce((n, s) => n + Object.entries(s.usage ?? {}).reduce((m, [k, v]) => m + (k.startsWith("tokens:") ? v : 0), 0), 0);
    for (const template of ["quick_summary", "unbound_worker"]) {
      const expected = docs.filter((d) => d.template_name === template).reduce((n, d) => n + tokensOfDoc(d), 0);
      expect(sample(families, "orchestrator_execution_tokens_total", { client_id: CLIENT, template_name: template })).toBe(expected);
    }
    expect(docs.reduce((n, d) => n + tokensOfDoc(d), 0)).toBeGreaterThan(0);
    // Storage is this file's own: the completed attempts of the last hour are the workload's three (and the notification test's, if it ran first).
    const stages = (await Promise.all(docs.map((d) => status(d.execution_id))))
      .filter((d) => d.status === "completed")
      .flatMap((d) => d.stages);
    const extra = await call(`/executions?client_id=kam-flaky-2-metrics`, { headers: OPS });
    const others = ((await extra.json()) as { items: { execution_id: string; status: string }[] }).items.filter((x) => x.status === "completed");
    for (const o of others) stages.push(...(await status(o.execution_id)).stages);
    const phase = {
      waiting: stages.map((s) => s.waiting_ms),
      handshake: stages.map((s) => Date.parse(s.completed_at!) - Date.parse(s.started_at!) - s.waiting_ms - s.processing_ms),
      processing: stages.map((s) => s.processing_ms),
    };
    const rank = (v: number[], q: number) => [...v].sort((a, b) => a - b)[Math.ceil(q * v.length) - 1];
    const worker = "bitware-content-granulator";
    expect(sample(families, "orchestrator_stage_latency_attempts", { worker })).toBe(stages.length);
    for (const [name, values] of Object.entries(phase)) {
      for (const q of [0.5, 0.95]) expect(sample(families, "orchestrator_stage_latency_ms", { worker, phase: name, quantile: String(q) }), `${name} ${q}`).toBe(rank(values, q));
    }
    // Every attempt of the hour by worker and outcome: the completed ones, the unbound worker's, the cancelled one.
    const all = [...(await Promise.all(docs.map((d) => status(d.execution_id)))), ...(await Promise.all(others.map((o) => status(o.execution_id))))];
    const expected = new Map<string, number>();
    for (const st of all.flatMap((d) => d.stages).filter((st) => st.attempts > 0)) {
      expect(st.attempts).toBe(1);
      const key = `${st.worker} ${st.status === "completed" ? "completed" : st.error!.code}`;
      expected.set(key, (expected.get(key) ?? 0) + 1);
    }
    const got = families.find((f) => f.name === "orchestrator_stage_attempts")!.metrics.map((m) => [`${m.labels!.worker} ${m.labels!.outcome}`, Number(m.value)]);
    expect(Object.fromEntries(got)).toEqual(Object.fromEntries(expected));
    expect(expected.get(`${worker} cancelled`)).toBe(1);
    expect([...expected.keys()].some((k) => k.endsWith(" worker_not_bound"))).toBe(true);
  });

  it("has the ledger's pools as /resources shows them, each with its shard, and every shard up; counts schedules", async () => {
    const snap = (await (await call("/resources", { headers: OPS })).json()) as ResourcesDocument;
    const families = await scrape();
    for (const p of snap.pools) expect(sample(families, "orchestrator_pool_capacity", { pool: p.name, kind: p.kind, shard: String(p.shard) })).toBe(p.capacity);
    expect(families.find((f) => f.name === "orchestrator_pool_capacity")!.metrics).toHaveLength(snap.pools.length);
    const up = families.find((f) => f.name === "orchestrator_ledger_shard_up")!.metrics.map((m) => [m.labels!.shard, m.labels!.name, Number(m.value)]);
    expect(up).toEqual(snap.shards.map((s) => [String(s.shard), s.name, 1]));
    expect(sample(families, "orchestrator_ledger_pool_conflicts", {})).toBe(snap.conflicts.length);
    // Schedules: a paused one counts in its shard's stats, which the scrape sums over all eight shards.
    const id = `metrics-paused-${Date.now()}`;
    const shard = env.SCHEDULES.get(env.SCHEDULES.idFromName(`schedules:${scheduleShardIndex(id)}`));
    const before = await shard.stats();
    const res = await call("/schedules", {
      method: "POST",
      headers: { ...KAM, ...JSON_HEADERS },
      body: JSON.stringify({ schedule_id: id, cron: "0 6 29 2 *", template_name: "quick_summary", parameters: {}, client_id: CLIENT, overlap: "skip", paused: true }),
    });
    expect(res.status).toBe(201);
    expect((await shard.stats()).paused).toBe(before.paused + 1);
    expect(sample(await scrape(), "orchestrator_schedules", { state: "paused" })).toBeGreaterThanOrEqual(1);
  });

  it("is for operators only", async () => {
    expect((await call("/metrics")).status).toBe(401);
    expect((await call("/metrics", { headers: KAM })).status).toBe(401);
    await status(docs[0].execution_id);
  });
});
