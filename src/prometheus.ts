import type { ResourcesDocument } from "../schemas/resources";
import { configOf } from "./config";
import { attemptOutcome } from "../actors/execution-index";
import { seriesIndex, statsIndex } from "./index-routing";
import { quantile } from "./ops-series";
import { resourcesDocument } from "./ledger-fanout";
import { SCHEDULE_SHARDS, call, shardAt } from "./schedule-service";

/**
 * `GET /metrics`: the current counters and gauges in the Prometheus text
 * exposition format (version 0.0.4, which OpenMetrics scrapers read too),
 * computed at scrape time from the objects that own the numbers:
 * - the execution index (one GROUP BY per month object, at most
 *   METRICS_GROUP_LIMIT groups each): executions by status, template and
 *   client, and the summed cost and tokens of the ended ones; and the stage
 *   latency per worker (waiting, handshake, processing: p50 and p95) of the
 *   completed attempts of the executions that ended in the last
 *   LATENCY_WINDOW_MS (the month objects that may hold them, bounded as the
 *   charts' series are);
 * - the ledger snapshot of every shard (src/ledger-fanout.ts): capacity,
 *   use, room and queue length per pool with its shard, and which shards
 *   answered (a shard down costs its pools' gauges, not the scrape);
 * - the eight schedule shards: schedules and their kept fires.
 * The cost of a scrape is bounded: one call per index month, one per ledger
 * shard, eight to the schedule shards, each with its timeout.
 * Per-event series (rates, stage latency per worker, ledger grants) are in
 * Analytics Engine (src/metrics.ts). docs/operations.md lists every series.
 */
export const METRICS_GROUP_LIMIT = 1000;
/** The stage latency gauges cover the attempts of executions that ended this long ago at most. */
export const LATENCY_WINDOW_MS = 3_600_000;

type Labels = Record<string, string>;
interface Family {
  name: string;
  help: string;
  type: "gauge" | "counter";
  samples: { labels: Labels; value: number }[];
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Number.POSITIVE_INFINITY) return "+Inf";
  if (v === Number.NEGATIVE_INFINITY) return "-Inf";
  return String(v);
}

export function renderPrometheus(families: Family[]): string {
  const lines: string[] = [];
  for (const f of families) {
    lines.push(`# HELP ${f.name} ${f.help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`);
    lines.push(`# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      const labels = Object.entries(s.labels);
      const text = labels.length ? `{${labels.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}` : "";
      lines.push(`${f.name}${text} ${formatValue(s.value)}`);
    }
  }
  return `${lines.join("\n")}\n`;
}

function family(name: string, type: Family["type"], help: string, samples: Family["samples"] = []): Family {
  return { name, type, help, samples };
}

export async function gatherMetrics(env: Env, now = Date.now()): Promise<Family[]> {
  const currency = configOf(env).prices.currency;
  const [index, recent, ledger, shards] = await Promise.all([
    statsIndex(env, METRICS_GROUP_LIMIT),
    seriesIndex(env, now - LATENCY_WINDOW_MS, now + 1, LATENCY_WINDOW_MS),
    resourcesDocument(env).then((r) => r.doc),
    Promise.all(Array.from({ length: SCHEDULE_SHARDS }, (_, i) => call(env, shardAt(env, i).stats(), "schedule stats"))),
  ]);

  const executions = family("orchestrator_executions", "gauge", "Executions in the index, by current status, template and client.");
  const cost = family("orchestrator_execution_cost_total", "counter", "Summed cost of the executions in the index, by template and client.");
  const sums = new Map<string, { labels: Labels; count: number; cost: number }>();
  const costs = new Map<string, { labels: Labels; value: number }>();
  const tokens = new Map<string, { labels: Labels; value: number }>();
  // One execution sits in one month's object only, so summing the months double-counts nothing.
  for (const g of index.groups) {
    const key = JSON.stringify([g.status, g.template_name, g.client_id]);
    const e = sums.get(key) ?? { labels: { status: g.status, template_name: g.template_name, client_id: g.client_id }, count: 0, cost: 0 };
    e.count += g.count;
    sums.set(key, e);
    const ckey = JSON.stringify([g.template_name, g.client_id]);
    const c = costs.get(ckey) ?? { labels: { template_name: g.template_name, client_id: g.client_id, currency }, value: 0 };
    c.value += g.cost;
    costs.set(ckey, c);
    const t = tokens.get(ckey) ?? { labels: { template_name: g.template_name, client_id: g.client_id }, value: 0 };
    t.value += g.tokens;
    tokens.set(ckey, t);
  }
  for (const e of [...sums.values()].sort(byLabels)) executions.samples.push({ labels: e.labels, value: e.count });
  for (const c of [...costs.values()].sort(byLabels)) cost.samples.push(c);
  const tokenFamily = family("orchestrator_execution_tokens_total", "counter", "Summed usage of every tokens: pool by the executions in the index, by template and client.", [
    ...[...tokens.values()].sort(byLabels),
  ]);

  const phases = new Map<string, { waiting: number[]; handshake: number[]; processing: number[] }>();
  const outcomes = new Map<string, { labels: Labels; value: number }>();
  for (const a of recent.attempts) {
    const [worker, , waiting, handshake, processing] = a;
    const outcome = attemptOutcome(a);
    const key = JSON.stringify([worker, outcome]);
    const o = outcomes.get(key) ?? { labels: { worker, outcome }, value: 0 };
    o.value += 1;
    outcomes.set(key, o);
    if (outcome !== "completed") continue;
    const w = phases.get(worker) ?? { waiting: [], handshake: [], processing: [] };
    w.waiting.push(waiting);
    w.handshake.push(handshake);
    w.processing.push(processing);
    phases.set(worker, w);
  }
  const latency = family(
    "orchestrator_stage_latency_ms",
    "gauge",
    "Stage latency per worker and phase (waiting for resources, handshake, processing), nearest-rank quantiles of the completed attempts of the executions that ended in the last hour.",
  );
  const attempts = family("orchestrator_stage_latency_attempts", "gauge", "Completed attempts the stage latency gauges are computed from, per worker.");
  for (const [worker, w] of [...phases.entries()].sort(([a], [b]) => (a < b ? -1 : 1))) {
    attempts.samples.push({ labels: { worker }, value: w.processing.length });
    for (const phase of ["waiting", "handshake", "processing"] as const) {
      const sorted = [...w[phase]].sort((a, b) => a - b);
      for (const q of [0.5, 0.95]) latency.samples.push({ labels: { worker, phase, quantile: String(q) }, value: quantile(sorted, q) ?? 0 });
    }
  }

  const pool = (name: string, help: string, pick: (p: ResourcesDocument["pools"][number]) => number) =>
    family(name, "gauge", help, ledger.pools.map((p) => ({ labels: { pool: p.name, kind: p.kind, shard: String(p.shard) }, value: pick(p) })));

  const fireStates = new Map<string, number>();
  for (const s of shards) for (const [state, n] of Object.entries(s.fires)) fireStates.set(state, (fireStates.get(state) ?? 0) + n);

  const attemptOutcomes = family(
    "orchestrator_stage_attempts",
    "gauge",
    "Stage and item attempts of the executions that ended in the last hour, per worker and outcome (completed or the error code).",
    [...outcomes.values()].sort(byLabels),
  );

  return [
    executions,
    cost,
    tokenFamily,
    latency,
    attempts,
    attemptOutcomes,
    pool("orchestrator_pool_capacity", "Capacity of each ledger pool.", (p) => p.capacity),
    pool("orchestrator_pool_in_use", "Amount of each pool held by grants now.", (p) => p.in_use),
    pool("orchestrator_pool_available", "Amount of each pool free now.", (p) => p.available),
    pool("orchestrator_pool_waiting", "Reservations waiting in the ledger's queue for each pool (queue length).", (p) => p.waiting),
    family("orchestrator_ledger_leases", "gauge", "Grants the ledger holds now, summed over the shards that answered (a stage with parts on k shards counts k).", [
      { labels: {}, value: ledger.leases },
    ]),
    family("orchestrator_ledger_waiters", "gauge", "Reservations waiting in the ledger's queues, summed over the shards that answered (a stage with parts on k shards counts k).", [
      { labels: {}, value: ledger.waiters },
    ]),
    family(
      "orchestrator_ledger_shard_up",
      "gauge",
      "1 when the ledger shard answered this scrape's snapshot within ledgerCallTimeoutMs, else 0 (its pools are then missing from the pool gauges).",
      ledger.shards.map((s) => ({ labels: { shard: String(s.shard), name: s.name }, value: s.ok ? 1 : 0 })),
    ),
    family("orchestrator_ledger_pool_conflicts", "gauge", "Pools more than one ledger shard has state for (GET /resources lists them in conflicts).", [
      { labels: {}, value: ledger.conflicts.length },
    ]),
    family("orchestrator_schedules", "gauge", "Schedules, active or paused.", [
      { labels: { state: "active" }, value: shards.reduce((n, s) => n + s.active, 0) },
      { labels: { state: "paused" }, value: shards.reduce((n, s) => n + s.paused, 0) },
    ]),
    family(
      "orchestrator_schedule_fires",
      "gauge",
      "Fires kept by the schedules (the newest scheduleRunsKept each), by state.",
      [...fireStates.entries()].sort().map(([state, n]) => ({ labels: { state }, value: n })),
    ),
    family("orchestrator_metrics_truncated", "gauge", "1 when an index month had more groups than the scrape reads (METRICS_GROUP_LIMIT).", [
      { labels: {}, value: index.truncated || recent.truncated ? 1 : 0 },
    ]),
  ];
}

function byLabels(a: { labels: Labels }, b: { labels: Labels }): number {
  const x = JSON.stringify(Object.values(a.labels));
  const y = JSON.stringify(Object.values(b.labels));
  return x < y ? -1 : x > y ? 1 : 0;
}

export async function metricsResponse(env: Env): Promise<Response> {
  return new Response(renderPrometheus(await gatherMetrics(env)), {
    headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8", "cache-control": "no-store" },
  });
}
