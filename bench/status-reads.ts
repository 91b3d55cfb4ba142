/**
 * Status reads (issue 17, target 3): `npm run bench -- --status-reads`.
 * Closed-loop GETs at `--read-concurrency` in flight for `--read-seconds`
 * each, against `GET /health` (the reference: routing and nothing else), a
 * running execution's `GET /executions/:id`, an ended one's, and the ended
 * one's with `If-None-Match` on its current version (304). Every round runs
 * all four, the order rotated each round so the machine's drift falls on all;
 * the ratios are taken per round against that round's health figure.
 */
import { type ChildProcess, spawn } from "node:child_process";
import type { Bench } from "./e2e";
import { cpuSecondsOf } from "./lib/proc-stats";

export interface StatusReadOptions {
  seconds: number;
  concurrency: number;
  rounds: number;
  /** The session's processes (workerd runtime, proxy, wrangler's node): CPU ms each spends per answered read. */
  pids: Record<string, number>;
  /** `--perf-record DIR`: `perf record -g` of the workerd runtime during each read, one file per read and round. */
  perfDir: string | null;
}

const ENDED = new Set(["completed", "failed", "cancelled"]);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const r2 = (x: number) => Number(x.toFixed(2));
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** One execution of the bench pipeline; `workMs` per stage (60 s keeps it running through a round). */
async function start(b: Bench, workMs: number): Promise<string> {
  const r = await b.client.request<{ execution_id?: string }>("POST", "/execute", {
    headers: { ...b.kam, "content-type": "application/json" },
    body: { template_name: "bench_three_stage", parameters: { bench_work_ms: workMs }, client_id: "client_bench" },
    timeoutMs: 30_000,
  });
  if (r.status !== 202 || !r.body.execution_id) throw new Error(`POST /execute answered ${r.status}`);
  return r.body.execution_id;
}

async function statusOf(b: Bench, id: string): Promise<{ status: string }> {
  const r = await b.client.request<{ status: string }>("GET", `/executions/${id}`, { headers: b.kam, timeoutMs: 10_000 });
  if (r.status !== 200) throw new Error(`GET /executions/${id} answered ${r.status}`);
  return r.body;
}

/** Closed loop: `concurrency` readers for `seconds`; answers per second, and how many were not the expected status. */
async function hammer(b: Bench, path: string, headers: Record<string, string>, expect: number, seconds: number, concurrency: number, pids: Record<string, number> = {}) {
  const cpu0 = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSecondsOf(pid)]));
  const self0 = process.cpuUsage();
  const until = performance.now() + seconds * 1000;
  let ok = 0;
  let bad = 0;
  const lat: number[] = [];
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < until) {
        const s = performance.now();
        const r = await b.client.request("GET", path, { headers, timeoutMs: 30_000 }).catch(() => null);
        lat.push(performance.now() - s);
        if (r?.status === expect) ok++;
        else bad++;
      }
    }),
  );
  const wall = (performance.now() - t0) / 1000;
  const self = process.cpuUsage(self0);
  // CPU ms per answered read, per process: what a read costs, less exposed to the machine's other load than the rate.
  const cpu_ms: Record<string, number> = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, r2(((cpuSecondsOf(pid) - cpu0[k]) * 1000) / Math.max(1, ok))]));
  cpu_ms.bench_client = r2((self.user + self.system) / 1000 / Math.max(1, ok));
  return { per_s: ok / wall, ok, bad, p50_ms: r2(median(lat)), cpu_ms };
}

/** The current ETag of an execution (read with the raw client: the JSON client drops headers). */
async function etagOf(b: Bench, id: string): Promise<string | null> {
  const http = await import("node:http");
  const u = new URL(b.session.url);
  return new Promise((resolve) => {
    const req = http.request({ host: u.hostname, port: Number(u.port), path: `/executions/${id}`, headers: b.kam, agent: b.client.agent, timeout: 10_000 }, (res) => {
      res.resume();
      res.on("end", () => resolve((res.headers.etag as string | undefined) ?? null));
    });
    req.on("error", () => resolve(null));
    req.end();
  });
}

export async function runStatusReads(b: Bench, o: StatusReadOptions) {
  const ended = await start(b, 0);
  for (let i = 0; i < 600; i++) {
    if (ENDED.has((await statusOf(b, ended)).status)) break;
    await sleep(100);
  }
  const endedStatus = (await statusOf(b, ended)).status;
  if (endedStatus !== "completed") throw new Error(`the ended execution is ${endedStatus}`);
  const etag = await etagOf(b, ended);
  const kinds = ["health", "running", "ended", "ended_304"] as const;
  const per: Record<(typeof kinds)[number], number[]> = { health: [], running: [], ended: [], ended_304: [] };
  const p50: Record<string, number[]> = { health: [], running: [], ended: [], ended_304: [] };
  const cpu: Record<string, Record<string, number>[]> = { health: [], running: [], ended: [], ended_304: [] };
  let bad = 0;
  // Warm-up: each path once at low load.
  for (const path of ["/health", `/executions/${ended}`]) await hammer(b, path, b.kam, 200, 1, 4);
  for (let round = 0; round < o.rounds; round++) {
    // A fresh running execution per round: its first stage works for 60 s, longer than the round.
    const running = await start(b, 60_000);
    await sleep(500);
    if ((await statusOf(b, running)).status !== "running") throw new Error("the running execution is not running");
    const order = kinds.map((_, i) => kinds[(i + round) % kinds.length]);
    for (const k of order) {
      console.error(`status reads: round ${round + 1}/${o.rounds}, ${k}...`);
      const perf = o.perfDir && o.pids.workerd_runtime ? perfRecord(o.pids.workerd_runtime, `${o.perfDir}/${k}-${round + 1}.perf.data`) : null;
      const run = (path: string, headers: Record<string, string>, expect: number) => hammer(b, path, headers, expect, o.seconds, o.concurrency, o.pids);
      const r =
        k === "health"
          ? await run("/health", {}, 200)
          : k === "running"
            ? await run(`/executions/${running}`, b.kam, 200)
            : k === "ended"
              ? await run(`/executions/${ended}`, b.kam, 200)
              : await run(`/executions/${ended}`, { ...b.kam, "if-none-match": etag ?? "none" }, etag ? 304 : 200);
      if (perf) await stopPerf(perf);
      per[k].push(r.per_s);
      p50[k].push(r.p50_ms);
      cpu[k].push(r.cpu_ms);
      bad += r.bad;
    }
    // It has done its part: cancel it so nothing is left running.
    await b.client.request("POST", `/executions/${running}/cancel`, { headers: b.kam, timeoutMs: 10_000 }).catch(() => null);
  }
  const ratio = (k: (typeof kinds)[number]) => r2(median(per[k].map((v, i) => v / per.health[i])));
  const procs = Object.keys(cpu.health[0] ?? {});
  const cpuMedian = (k: (typeof kinds)[number]) => Object.fromEntries(procs.map((p) => [p, r2(median(cpu[k].map((c) => c[p])))]));
  const rows = kinds.map((k) => ({ read: k, per_s: r2(median(per[k])), p50_ms: r2(median(p50[k])), vs_health: ratio(k), per_round: per[k].map(r2), cpu_ms_per_read: cpuMedian(k) }));
  console.log("");
  console.log(`status reads: ${o.concurrency} in flight, ${o.seconds} s each, ${o.rounds} rounds (order rotated); median per round; CPU ms per answered read by process`);
  console.log(`  read         per s   p50 ms  x health  ${procs.map((p) => p.padStart(15)).join(" ")}`);
  for (const r of rows) {
    const c = procs.map((p) => String(r.cpu_ms_per_read[p]).padStart(15)).join(" ");
    console.log(`  ${r.read.padEnd(10)} ${String(r.per_s).padStart(8)} ${String(r.p50_ms).padStart(8)} ${String(r.vs_health).padStart(9)}  ${c}`);
  }
  const targets = (["running", "ended"] as const).map((k) => ({ name: `GET /executions/:id (${k}) at least 0.8x GET /health`, measured: `${ratio(k)}x`, met: ratio(k) >= 0.8 }));
  for (const t of targets) console.log(`  ${t.met ? "MET " : "MISS"} ${t.name}: ${t.measured}`);
  console.log(`  answers other than expected: ${bad}; 304s used the ETag ${etag ?? "(none: this tree sends no ETag, so 200s were counted)"}`);
  const result = { bench: "e2e-status-reads", concurrency: o.concurrency, seconds: o.seconds, rounds: o.rounds, rows, targets, unexpected: bad, etag_support: etag !== null };
  console.log(JSON.stringify(result));
  return result;
}

/** `perf record -g` of one process until stopped (SIGINT makes perf write its file). */
function perfRecord(pid: number, file: string): ChildProcess {
  return spawn("perf", ["record", "-g", "-F", "499", "-p", String(pid), "-o", file], { stdio: "ignore" });
}

function stopPerf(p: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (p.exitCode !== null) return resolve();
    const timer = setTimeout(() => {
      p.kill("SIGKILL");
      resolve();
    }, 30_000);
    p.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    p.kill("SIGINT");
  });
}
