/**
 * The fan-out workload (issue 12), `npm run bench -- --fan-out`: for N items
 * (--fan-items, default 10,100,1000), one execution of `bench_fan_out` (stage 1
 * lists N items, stage 2 runs once per item, at most 100 at once, stage 3 merges)
 * against the same N items run as a straight line (`bench_fan_out_serial`: the
 * same template with max_parallel 1, so one item after another; a template of
 * 1,000 stages is not allowed, 50 is the limit). Each item's worker takes
 * --fan-work-ms (50) between `process` and its `complete`. Both run in the same
 * session, alternating, --fan-rounds times (2); the report takes each N's median.
 *
 * Per N it reports: wall time of each (POST /execute to `completed` seen), their
 * ratio, and the orchestration overhead per item: for the straight line
 * (wall - N x work) / N, the time the orchestrator adds around each item; for
 * the fan-out (wall - waves x work) / N with waves = ceil(N / 100), the time per
 * item the parallel run spends that is not the items' own work.
 */
import { performance } from "node:perf_hooks";
import { type Bench, cpuDelta, cpuSnapshot, type Options } from "./e2e";
import { quantile } from "./lib/quantiles";
import { BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL, type ExecTimings, type WaitAnswer } from "./worker/shared";

const MAX_PARALLEL = 100;

export interface FanOutOptions {
  items: number[];
  workMs: number;
  rounds: number;
  /** The straight line runs only for N up to this. */
  lineMax: number;
}

interface Run {
  ok: boolean;
  wallMs: number;
  error?: string;
  /** The items' timings as the bench worker saw them (its clock, epoch ms). */
  timings?: ExecTimings | null;
}

/**
 * What bounds a fan-out, from the items' timings at the bench worker: how many
 * items were on the worker at once (between `process` arriving and `complete`
 * sent, i.e. doing their work), how fast the orchestrator handed out items
 * (handshakes per second), and each item's time at the worker that is not its
 * work (handshake -> process, complete sent -> acknowledged).
 */
export interface ItemProfile {
  items: number;
  /** Most items doing their work at the same moment. */
  on_worker_max: number;
  /** Items doing their work, averaged over the span from the first handshake to the last item's acknowledgment. */
  on_worker_mean: number;
  /** (last item handshake - first) / (items - 1): the orchestrator's pace of starting items. */
  start_interval_ms: number;
  /** handshake arrived -> process arrived, p50 / p99 (the orchestrator's handshake answer handling and process call). */
  hs_to_process_ms: [number, number];
  /** complete sent -> acknowledged, p50 / p99 (the callback through the front Worker into the Execution). */
  callback_rtt_ms: [number, number];
  /** Straight line only: an item's complete sent -> the next item's handshake, p50 / p99. */
  between_items_ms: [number, number] | null;
}

const ITEM_STAGE = /\.\d+$/;

export function itemProfile(t: ExecTimings | null | undefined, serial: boolean): ItemProfile | null {
  if (!t) return null;
  // The last attempt of each item.
  const byItem = new Map<string, ExecTimings["stages"][number]>();
  for (const s of t.stages) if (ITEM_STAGE.test(s.stage) && (byItem.get(s.stage)?.attempt ?? -1) < s.attempt) byItem.set(s.stage, s);
  const items = [...byItem.values()].filter((s) => s.pr !== null && s.cs !== null && s.ca !== null);
  if (items.length === 0) return null;
  const events: [number, number][] = [];
  for (const s of items) events.push([s.pr!, 1], [s.cs!, -1]);
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let cur = 0;
  let max = 0;
  for (const [, d] of events) {
    cur += d;
    max = Math.max(max, cur);
  }
  const hs = items.map((s) => s.hs).sort((a, b) => a - b);
  const span = Math.max(1, Math.max(...items.map((s) => s.ca!)) - hs[0]);
  const busy = items.reduce((sum, s) => sum + (s.cs! - s.pr!), 0);
  const q = (xs: number[]): [number, number] => {
    const sorted = [...xs].sort((a, b) => a - b);
    return [r1(quantile(sorted, 0.5)), r1(quantile(sorted, 0.99))];
  };
  let between: [number, number] | null = null;
  if (serial) {
    const ordered = [...items].sort((a, b) => a.hs - b.hs);
    between = q(ordered.slice(1).map((s, i) => s.hs - ordered[i].cs!));
  }
  return {
    items: items.length,
    on_worker_max: max,
    on_worker_mean: r1(busy / span),
    start_interval_ms: items.length > 1 ? r2((hs[hs.length - 1] - hs[0]) / (items.length - 1)) : 0,
    hs_to_process_ms: q(items.map((s) => s.pr! - s.hs)),
    callback_rtt_ms: q(items.map((s) => s.ca! - s.cs!)),
    between_items_ms: between,
  };
}

/** One execution: POST /execute, the bench worker's word that stage_3 was acknowledged, then the status saying completed. */
async function runOnce(b: Bench, template: string, items: number, workMs: number, timeoutMs: number): Promise<Run> {
  const t0 = performance.now();
  const deadline = t0 + timeoutMs;
  const started = await b.client.request<{ execution_id?: string }>("POST", "/execute", {
    headers: { ...b.kam, "content-type": "application/json" },
    body: { template_name: template, parameters: { bench_items: items, bench_work_ms: workMs }, client_id: "client_bench" },
    timeoutMs: 30_000,
  });
  const id = started.body?.execution_id;
  if (started.status !== 202 || !id) return { ok: false, wallMs: performance.now() - t0, error: `POST /execute ${started.status}` };
  let timings: ExecTimings | null = null;
  while (performance.now() < deadline) {
    const left = Math.max(50, Math.min(30_000, deadline - performance.now()));
    const w = await b.client.request<WaitAnswer>("GET", `/bench/wait/${id}?timeout_ms=${Math.round(left)}`, { headers: b.worker, timeoutMs: left + 5_000 }).catch(() => null);
    if (w?.body?.timings) timings = w.body.timings;
    const st = await b.client.request<{ status: string; error?: { code: string; message: string } | null }>("GET", `/executions/${id}`, { headers: b.kam, timeoutMs: 10_000 }).catch(() => null);
    const status = st?.body?.status;
    if (status === "completed") return { ok: true, wallMs: performance.now() - t0, timings };
    if (status === "failed" || status === "cancelled") return { ok: false, wallMs: performance.now() - t0, error: `${status}: ${st?.body?.error?.code} ${st?.body?.error?.message}` };
    // Acknowledged but not yet completed in the status: read it again shortly.
    if (w?.body?.done) await new Promise((r) => setTimeout(r, 5));
  }
  return { ok: false, wallMs: performance.now() - t0, error: `stuck: ${id} not completed after ${timeoutMs} ms` };
}

interface RunDetail {
  wall_ms: number;
  /** workerd runtime CPU during the run / items. */
  runtime_cpu_ms_per_item: number;
  /** workerd runtime CPU / wall: 1.0 is its one thread saturated. */
  runtime_cpu_share: number;
  /** Other processes' CPU meanwhile, in cores (the machine has 2). */
  others_cores: number;
  profile: ItemProfile | null;
  /** Stage attempts the bench worker reported (null: its record was not received). */
  timing_entries: number | null;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const r1 = (x: number) => Number(x.toFixed(1));
const r2 = (x: number) => Number(x.toFixed(2));

export async function runFanOut(b: Bench, opts: Options, fan: FanOutOptions, pids: Record<string, number>) {
  // Warm-up: templates into the cache, the isolates and the objects' code paths.
  for (const t of [BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL]) {
    const w = await runOnce(b, t, 10, fan.workMs, 120_000);
    if (!w.ok) throw new Error(`fan-out warm-up failed (${t}): ${w.error}`);
  }
  const rows = [];
  for (const n of fan.items) {
    const fanWalls: number[] = [];
    const lineWalls: number[] = [];
    // Per run: the runtime's CPU per item (the one thread every item's orchestration shares), others' CPU meanwhile, the items' profile.
    const fanRuns: RunDetail[] = [];
    const lineRuns: RunDetail[] = [];
    // The straight line takes at least N x work: give it room.
    const timeoutMs = Math.max(opts.execTimeoutMs, 120_000 + n * (fan.workMs + 200));
    for (let round = 0; round < fan.rounds; round++) {
      // Alternate which goes first, so drift in the machine's load falls on both.
      const both = round % 2 === 0 ? [BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL] : [BENCH_FAN_OUT_SERIAL, BENCH_FAN_OUT];
      const order = n <= fan.lineMax ? both : [BENCH_FAN_OUT];
      for (const t of order) {
        console.error(`fan-out: ${n} items, ${t === BENCH_FAN_OUT ? "fan-out" : "straight line"}, round ${round + 1}/${fan.rounds}...`);
        const cpu0 = cpuSnapshot(pids);
        const r = await runOnce(b, t, n, fan.workMs, timeoutMs);
        const cpu = cpuDelta(cpu0, cpuSnapshot(pids));
        if (!r.ok) throw new Error(`${t} with ${n} items failed: ${r.error}`);
        (t === BENCH_FAN_OUT ? fanWalls : lineWalls).push(r.wallMs);
        (t === BENCH_FAN_OUT ? fanRuns : lineRuns).push({
          wall_ms: r1(r.wallMs),
          runtime_cpu_ms_per_item: r2((cpu.workerd_runtime * 1000) / n),
          runtime_cpu_share: r2(cpu.workerd_runtime / (r.wallMs / 1000)),
          others_cores: r2(cpu.others / (r.wallMs / 1000)),
          profile: itemProfile(r.timings, t === BENCH_FAN_OUT_SERIAL),
          timing_entries: r.timings?.stages.length ?? null,
        });
      }
    }
    const fanMs = median(fanWalls);
    const lineMs = median(lineWalls);
    const waves = Math.ceil(n / MAX_PARALLEL);
    rows.push({
      items: n,
      fan_out_wall_ms: r1(fanMs),
      straight_line_wall_ms: r1(lineMs),
      speedup: r2(lineMs / fanMs),
      overhead_per_item_straight_ms: r2((lineMs - n * fan.workMs) / n),
      overhead_per_item_fan_out_ms: r2((fanMs - waves * fan.workMs) / n),
      fan_out_walls_ms: fanWalls.map(r1),
      straight_line_walls_ms: lineWalls.map(r1),
      runtime_cpu_ms_per_item_fan_out: r2(median(fanRuns.map((x) => x.runtime_cpu_ms_per_item))),
      runtime_cpu_ms_per_item_straight: r2(median(lineRuns.map((x) => x.runtime_cpu_ms_per_item))),
      fan_out_on_worker_max: median(fanRuns.map((x) => x.profile?.on_worker_max ?? 0)),
      fan_out_on_worker_mean: r1(median(fanRuns.map((x) => x.profile?.on_worker_mean ?? 0))),
      fan_out_start_interval_ms: r2(median(fanRuns.map((x) => x.profile?.start_interval_ms ?? 0))),
      fan_out_runs: fanRuns,
      straight_line_runs: lineRuns,
    });
  }
  console.log("");
  console.log(`fan-out bench: list -> N items (at most ${MAX_PARALLEL} at once) -> merge, against the same N items one by one; ${fan.workMs} ms of work per item; median of ${fan.rounds} rounds`);
  console.log("  items  fan-out ms  straight line ms  speedup  overhead/item straight ms  overhead/item fan-out ms  CPU ms/item fan-out / straight  on worker max / mean  start interval ms");
  for (const r of rows) {
    console.log(
      `  ${String(r.items).padStart(5)}  ${String(r.fan_out_wall_ms).padStart(10)}  ${String(r.straight_line_wall_ms).padStart(16)}  ${String(r.speedup).padStart(7)}  ${String(r.overhead_per_item_straight_ms).padStart(25)}  ${String(r.overhead_per_item_fan_out_ms).padStart(24)}  ${`${r.runtime_cpu_ms_per_item_fan_out} / ${r.runtime_cpu_ms_per_item_straight}`.padStart(31)}  ${`${r.fan_out_on_worker_max} / ${r.fan_out_on_worker_mean}`.padStart(19)}  ${String(r.fan_out_start_interval_ms).padStart(17)}`,
    );
  }
  const hundred = rows.find((r) => r.items === 100);
  const first = rows[0];
  const lastRow = rows[rows.length - 1];
  const lined = rows.filter((r) => Number.isFinite(r.straight_line_wall_ms));
  const lastLined = lined[lined.length - 1];
  const targets = [
    hundred && Number.isFinite(hundred.speedup) ? { name: "100-item fan-out at least 10x faster than the straight line (issue 17)", measured: `${hundred.speedup}x`, met: hundred.speedup >= 10 } : null,
    rows.length > 1
      ? {
          name: `fan-out runtime CPU per item flat from ${first.items} to ${lastRow.items} items (within 1.5x)`,
          measured: `${first.runtime_cpu_ms_per_item_fan_out} -> ${lastRow.runtime_cpu_ms_per_item_fan_out} ms`,
          met: lastRow.runtime_cpu_ms_per_item_fan_out <= 1.5 * first.runtime_cpu_ms_per_item_fan_out,
        }
      : null,
    lined.length > 1
      ? {
          name: `overhead per item flat from ${first.items} to ${lastLined.items} items (straight line; within 1.5x)`,
          measured: `${first.overhead_per_item_straight_ms} -> ${lastLined.overhead_per_item_straight_ms} ms`,
          met: lastLined.overhead_per_item_straight_ms <= 1.5 * Math.max(first.overhead_per_item_straight_ms, 1),
        }
      : null,
    rows.length > 1
      ? {
          name: `fan-out overhead per item flat from ${first.items} to ${lastRow.items} items (within 1.5x)`,
          measured: `${first.overhead_per_item_fan_out_ms} -> ${lastRow.overhead_per_item_fan_out_ms} ms`,
          met: lastRow.overhead_per_item_fan_out_ms <= 1.5 * Math.max(first.overhead_per_item_fan_out_ms, 1),
        }
      : null,
  ].filter((t) => t !== null);
  console.log("  targets:");
  for (const t of targets) console.log(`    ${t.met ? "MET " : "MISS"} ${t.name}: ${t.measured}`);
  console.log("");
  const result = { bench: "e2e-fan-out", work_ms: fan.workMs, rounds: fan.rounds, max_parallel: MAX_PARALLEL, rows, targets };
  console.log(JSON.stringify(result));
  return result;
}
