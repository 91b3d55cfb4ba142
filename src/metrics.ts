import { log } from "./log";

/**
 * Events, counted where they happen, written to Workers Analytics Engine as
 * one data point each (`METRICS`, `[[analytics_engine_datasets]]` in
 * wrangler.toml). Analytics Engine aggregates them (no object of ours is in
 * the path, so no hot spot), and its SQL API answers per-minute rates and
 * quantiles over them. docs/operations.md ("Metrics") lists the schema.
 *
 * Writing is fire-and-forget: `writeDataPoint` does no I/O the caller waits
 * on, so it is safe inside a synchronous transition, and a failed write never
 * fails the work it describes. Locally `wrangler dev` gives miniflare's
 * dataset (it accepts and drops the points); the workerd tests bind `METRICS`
 * to a worker that keeps them (vitest.config.ts), so the same code runs
 * everywhere.
 */
export const METRIC_EVENTS = [
  "execution_started",
  "execution_ended",
  "stage_attempt",
  "callback_refused",
  "outbox_redelivery",
  "schedule_fire",
  "notification",
  "ledger_answer",
] as const;
export type MetricEventName = (typeof METRIC_EVENTS)[number];

export interface MetricEvent {
  event: MetricEventName;
  execution_id?: string;
  template_name?: string;
  client_id?: string;
  worker?: string;
  stage_id?: string;
  /** `completed`/`failed`/`cancelled` for executions, `completed` or the error code for attempts, the fire state for schedules. */
  outcome?: string;
  code?: string | null;
  kind?: string;
  schedule_id?: string;
  /** W3C trace context: a `stage_attempt` point is the attempt's span (src/trace.ts). */
  trace_id?: string;
  span_id?: string;
  parent_span_id?: string;
  /** A ledger pool (`ledger_answer`). */
  pool?: string;
  attempt?: number;
  duration_ms?: number;
  waiting_ms?: number;
  processing_ms?: number;
  /** `stage_attempt`: from the grant to `process` accepted (input check, handshake and process calls). */
  handshake_ms?: number;
  cost?: number;
  tokens?: number;
}

/** Blob and double positions of a data point: the order is the schema (blob1 = event, ...). Append only. */
export const BLOBS = [
  "event",
  "template_name",
  "client_id",
  "worker",
  "outcome",
  "code",
  "execution_id",
  "stage_id",
  "schedule_id",
  "kind",
  "trace_id",
  "span_id",
  "parent_span_id",
  "pool",
] as const;
export const DOUBLES = ["count", "attempt", "duration_ms", "waiting_ms", "processing_ms", "cost", "tokens", "handshake_ms"] as const;

/** The data point of an event: the event name is the index (Analytics Engine samples per index). */
export function dataPoint(e: MetricEvent): AnalyticsEngineDataPoint {
  const fields = e as unknown as Record<string, string | number | null | undefined>;
  return {
    indexes: [e.event],
    blobs: BLOBS.map((k) => (fields[k] === undefined || fields[k] === null ? "" : String(fields[k]))),
    doubles: DOUBLES.map((k) => (k === "count" ? 1 : Number(fields[k] ?? 0))),
  };
}

/** Inverse of dataPoint, for reading points back (tests, and anyone reading the dataset's rows). */
export function fromDataPoint(p: AnalyticsEngineDataPoint): Record<string, string | number> {
  const out: Record<string, string | number> = {};
  BLOBS.forEach((k, i) => {
    const v = p.blobs?.[i];
    if (v !== undefined && v !== "") out[k] = String(v);
  });
  DOUBLES.forEach((k, i) => {
    out[k] = Number(p.doubles?.[i] ?? 0);
  });
  return out;
}

export function emit(env: Env, e: MetricEvent): void {
  const dataset = (env as { METRICS?: AnalyticsEngineDataset }).METRICS;
  if (!dataset) return;
  try {
    const r: unknown = dataset.writeDataPoint(dataPoint(e));
    // The tests' dataset is a worker answering over RPC: its promise must not be left unhandled.
    if (r && typeof (r as PromiseLike<unknown>).then === "function") {
      (r as Promise<unknown>).catch((err) => log("warn", "metric_write_failed", { event: e.event, error: String(err) }));
    }
  } catch (err) {
    log("warn", "metric_write_failed", { event: e.event, error: String(err) });
  }
}

/** Token usage of a usage map: the amounts of every `tokens:` pool. */
export function tokensOf(usage: Record<string, number> | null | undefined): number {
  let n = 0;
  for (const [pool, amount] of Object.entries(usage ?? {})) if (pool.startsWith("tokens:")) n += amount;
  return n;
}
