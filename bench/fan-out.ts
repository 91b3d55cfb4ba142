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
import type { Bench, Options } from "./e2e";
import { BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL, type WaitAnswer } from "./worker/shared";

const MAX_PARALLEL = 100;

export interface FanOutOptions {
  items: number[];
  workMs: number;
  rounds: number;
}

interface Run {
  ok: boolean;
  wallMs: number;
  error?: string;
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
  while (performance.now() < deadline) {
    const left = Math.max(50, Math.min(30_000, deadline - performance.now()));
    const w = await b.client.request<WaitAnswer>("GET", `/bench/wait/${id}?timeout_ms=${Math.round(left)}`, { headers: b.worker, timeoutMs: left + 5_000 }).catch(() => null);
    const st = await b.client.request<{ status: string; error?: { code: string; message: string } | null }>("GET", `/executions/${id}`, { headers: b.kam, timeoutMs: 10_000 }).catch(() => null);
    const status = st?.body?.status;
    if (status === "completed") return { ok: true, wallMs: performance.now() - t0 };
    if (status === "failed" || status === "cancelled") return { ok: false, wallMs: performance.now() - t0, error: `${status}: ${st?.body?.error?.code} ${st?.body?.error?.message}` };
    // Acknowledged but not yet completed in the status: read it again shortly.
    if (w?.body?.done) await new Promise((r) => setTimeout(r, 5));
  }
  return { ok: false, wallMs: performance.now() - t0, error: `stuck: ${id} not completed after ${timeoutMs} ms` };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const r1 = (x: number) => Number(x.toFixed(1));
const r2 = (x: number) => Number(x.toFixed(2));

export async function runFanOut(b: Bench, opts: Options, fan: FanOutOptions) {
  // Warm-up: templates into the cache, the isolates and the objects' code paths.
  for (const t of [BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL]) {
    const w = await runOnce(b, t, 10, fan.workMs, 120_000);
    if (!w.ok) throw new Error(`fan-out warm-up failed (${t}): ${w.error}`);
  }
  const rows = [];
  for (const n of fan.items) {
    const fanWalls: number[] = [];
    const lineWalls: number[] = [];
    // The straight line takes at least N x work: give it room.
    const timeoutMs = Math.max(opts.execTimeoutMs, 120_000 + n * (fan.workMs + 200));
    for (let round = 0; round < fan.rounds; round++) {
      // Alternate which goes first, so drift in the machine's load falls on both.
      const order = round % 2 === 0 ? [BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL] : [BENCH_FAN_OUT_SERIAL, BENCH_FAN_OUT];
      for (const t of order) {
        console.error(`fan-out: ${n} items, ${t === BENCH_FAN_OUT ? "fan-out" : "straight line"}, round ${round + 1}/${fan.rounds}...`);
        const r = await runOnce(b, t, n, fan.workMs, timeoutMs);
        if (!r.ok) throw new Error(`${t} with ${n} items failed: ${r.error}`);
        (t === BENCH_FAN_OUT ? fanWalls : lineWalls).push(r.wallMs);
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
    });
  }
  console.log("");
  console.log(`fan-out bench: list -> N items (at most ${MAX_PARALLEL} at once) -> merge, against the same N items one by one; ${fan.workMs} ms of work per item; median of ${fan.rounds} rounds`);
  console.log("  items  fan-out ms  straight line ms  speedup  overhead/item straight ms  overhead/item fan-out ms");
  for (const r of rows) {
    console.log(
      `  ${String(r.items).padStart(5)}  ${String(r.fan_out_wall_ms).padStart(10)}  ${String(r.straight_line_wall_ms).padStart(16)}  ${String(r.speedup).padStart(7)}  ${String(r.overhead_per_item_straight_ms).padStart(25)}  ${String(r.overhead_per_item_fan_out_ms).padStart(24)}`,
    );
  }
  const hundred = rows.find((r) => r.items === 100);
  const first = rows[0];
  const lastRow = rows[rows.length - 1];
  const targets = [
    hundred ? { name: "100-item fan-out at least 10x faster than the straight line (issue 17)", measured: `${hundred.speedup}x`, met: hundred.speedup >= 10 } : null,
    rows.length > 1
      ? {
          name: `overhead per item flat from ${first.items} to ${lastRow.items} items (straight line; within 1.5x)`,
          measured: `${first.overhead_per_item_straight_ms} -> ${lastRow.overhead_per_item_straight_ms} ms`,
          met: lastRow.overhead_per_item_straight_ms <= 1.5 * Math.max(first.overhead_per_item_straight_ms, 1),
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
