/**
 * `npm run bench -- --memory` (issue 17, target 7): the runtime's memory
 * growth over the same executions, ours against the durable floor, each
 * phase in a fresh workerd runtime of its own, one after the other in the
 * same run.
 *
 * Why fresh runtimes: the runtime does not give memory back, so a phase
 * that runs on a heap an earlier phase grew is charged only for what it
 * adds above that plateau (docs/performance.md, "Against the durable
 * floor"). Each phase here starts a new `wrangler dev` session (new local
 * state, new runtime process), warms it with `--warmup` executions of its
 * own kind, waits `--settle-ms` (idle objects are evicted after 10 s), takes
 * the runtime's RSS as its baseline, runs `--n` executions at
 * `--concurrency`, waits `--settle-ms` again and takes the RSS again. The
 * growth is the second reading minus the baseline; the checkpoints (RSS and
 * open file descriptors every tenth of the run) show whether it is a
 * plateau (the objects alive at once) or grows with every execution.
 * Each worker isolate's JavaScript heap is read through the runtime's
 * inspector at the baseline, at the end and settled, to tell JavaScript from
 * the runtime's own memory in the growth.
 *
 * Options: --n (10000 with --soak) --concurrency --warmup --settle-ms
 * --orchestrated-first (default: the durable floor first) --local-observability
 * --tree. Prints a table and one JSON line ({"bench":"e2e-memory",...}),
 * written to bench/results/.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { type Bench, mib, type OpenSession, type Options, type PhaseReport, report, sleep, versions, workload } from "./e2e";
import { inspectorSession, inspectorTargets } from "./lib/inspector.mjs";
import { memoryOf, openFds } from "./lib/proc-stats";

type Kind = "durable-floor" | "orchestrated";

type Heap = { used: number | null; total: number | null };

export interface MemoryPhase {
  name: Kind;
  runtime_pid: number;
  /** RSS after the warm-up and the settle: what the phase's growth is counted from. */
  baseline_mib: number | null;
  peak_mib: number | null;
  end_mib: number | null;
  settled_mib: number | null;
  growth_mib: number | null;
  growth_per_execution_bytes: number | null;
  hwm_mib: number | null;
  fds: { baseline: number | null; settled: number | null };
  checkpoints: { completed: number; rss_mib: number | null; fds: number | null }[];
  /**
   * Each worker isolate's JavaScript heap (used and held), at the baseline, the end and settled:
   * how much of the RSS growth is JavaScript, and whose. The rest is the runtime's own memory
   * (SQLite databases and their caches, sockets, the allocator's high-water mark).
   */
  js_heap_mib: { baseline: Record<string, Heap | null>; end: Record<string, Heap | null>; settled: Record<string, Heap | null> };
  /** Requests sent again after a reset on a reused idle socket (bench/lib/http-keepalive.ts). */
  resent: number;
  report: PhaseReport;
}

function runOne(b: Bench, kind: Kind): (item: ReturnType<typeof workload>[number], i: number) => ReturnType<Bench["orchestrated"]> {
  return kind === "orchestrated" ? (it) => b.orchestrated(it) : (it, i) => b.floor(it, i, true);
}

/**
 * Each worker isolate's JavaScript heap in MiB: used, and what V8 holds for it (null where the
 * inspector gave none). Not after a forced collection: `HeapProfiler.collectGarbage` went
 * unanswered on most isolates of a bench session (2026-12-02), so these include garbage not yet
 * collected, an upper bound of the JavaScript part.
 */
async function jsHeaps(pid: number): Promise<Record<string, Heap | null>> {
  const out: Record<string, Heap | null> = {};
  for (const t of await inspectorTargets(pid)) {
    out[t.worker] = null;
    let s: Awaited<ReturnType<typeof inspectorSession>> | null = null;
    try {
      s = await inspectorSession(t.url, "Runtime.getHeapUsage", { tries: 3 });
      const usage = (await s.send("Runtime.getHeapUsage", {}, 10_000)) as { usedSize: number; totalSize: number };
      out[t.worker] = { used: mib(usage.usedSize), total: mib(usage.totalSize) };
    } catch (err) {
      console.error(`js heap of ${t.worker}: ${(err as Error).message}`);
    } finally {
      s?.close();
    }
  }
  return out;
}

async function memoryPhase(opts: Options, open: () => Promise<OpenSession & { close: () => Promise<void> }>, kind: Kind): Promise<MemoryPhase> {
  const s = await open();
  try {
    const runtime = s.pids.workerd_runtime;
    const b = s.bench;
    if (opts.warmup) {
      console.error(`${kind}: warm-up ${opts.warmup} at ${Math.min(opts.concurrency, 50)} in flight...`);
      const w = await b.phase(`warmup-${kind}`, workload(opts.warmup, opts.seed + 1, opts.callback, opts.workMs), Math.min(opts.concurrency, 50), (it, i) => runOne(b, kind)(it, 1e7 + i), s.pids);
      const bad = w.records.filter((r) => !r.ok);
      if (bad.length) throw new Error(`${kind} warm-up failed: ${bad.length} of ${opts.warmup}: ${bad[0].error}`);
    }
    await b.workerStats(true);
    await sleep(opts.settleMs);
    const heapBaseline = await jsHeaps(runtime);
    const baseline = s.sampler.sample()[runtime];
    const fdsBaseline = openFds(runtime);
    const started = Date.now();
    const checkpoints: MemoryPhase["checkpoints"] = [{ completed: 0, rss_mib: mib(baseline), fds: fdsBaseline }];
    const every = Math.max(1, Math.floor(opts.n / 10));
    console.error(`${kind}: ${opts.n} at ${opts.concurrency} in flight (runtime pid ${runtime}, baseline ${mib(baseline)} MiB)...`);
    const phase = await b.phase(kind, workload(opts.n, opts.seed, opts.callback, opts.workMs), opts.concurrency, runOne(b, kind), s.pids, (done) => {
      if (done % every === 0) checkpoints.push({ completed: done, rss_mib: mib(memoryOf(runtime)?.rss), fds: openFds(runtime) });
    });
    phase.worker = await b.workerStats(true);
    const end = s.sampler.sample()[runtime];
    // At the end of the load: what the isolates held at about their largest.
    const heapEnd = await jsHeaps(runtime);
    const peak = s.sampler.peak(runtime, started);
    console.error(`${kind}: settling ${opts.settleMs} ms...`);
    await sleep(opts.settleMs);
    const settled = s.sampler.sample()[runtime];
    const heapSettled = await jsHeaps(runtime);
    const r = report(phase);
    const growth = settled - baseline;
    return {
      name: kind,
      runtime_pid: runtime,
      baseline_mib: mib(baseline),
      peak_mib: mib(peak),
      end_mib: mib(end),
      settled_mib: mib(settled),
      growth_mib: mib(growth),
      growth_per_execution_bytes: r.completed ? Math.round(growth / r.completed) : null,
      hwm_mib: mib(memoryOf(runtime)?.hwm),
      fds: { baseline: fdsBaseline, settled: openFds(runtime) },
      checkpoints,
      js_heap_mib: { baseline: heapBaseline, end: heapEnd, settled: heapSettled },
      resent: b.client.resent,
      report: r,
    };
  } finally {
    await s.close();
  }
}

export async function runMemory(opts: Options, open: () => Promise<OpenSession & { close: () => Promise<void> }>, startedAt: Date): Promise<number> {
  const order: Kind[] = opts.orchestratedFirst ? ["orchestrated", "durable-floor"] : ["durable-floor", "orchestrated"];
  const phases: Partial<Record<Kind, MemoryPhase>> = {};
  for (const kind of order) phases[kind] = await memoryPhase(opts, open, kind);
  const o = phases.orchestrated!;
  const d = phases["durable-floor"]!;
  // Judged only on a floor that grew: a settled RSS below its baseline would make any ratio meaningless.
  const ratio = o.growth_mib !== null && d.growth_mib !== null && d.growth_mib > 0 ? Number((o.growth_mib / d.growth_mib).toFixed(2)) : null;
  const judged = opts.n >= 10_000 && o.report.completed === opts.n && d.report.completed === opts.n;
  const target = {
    name: "issue 17 (7): runtime memory growth over the same executions <= 1.2x the durable floor's (judged at >= 10000, every execution completed)",
    measured: `${ratio}x (${o.growth_mib} / ${d.growth_mib} MiB over ${opts.n})`,
    met: judged && ratio !== null ? ratio <= 1.2 : null,
  };
  const result = {
    bench: "e2e-memory",
    date: startedAt.toISOString(),
    n: opts.n,
    concurrency: opts.concurrency,
    warmup: opts.warmup,
    settle_ms: opts.settleMs,
    local_observability: opts.localObservability,
    order,
    cores: os.cpus().length,
    versions: versions(opts.tree),
    phases,
    growth_ratio: ratio,
    target,
    loadavg: os.loadavg(),
  };
  console.log("");
  console.log(`memory over ${opts.n} executions at ${opts.concurrency} in flight, each phase in a fresh runtime (${order.join(", then ")}):`);
  for (const p of [d, o]) {
    const r = p.report;
    console.log(
      `  ${p.name.padEnd(14)} baseline ${p.baseline_mib} MiB, peak ${p.peak_mib}, settled ${p.settled_mib}: growth ${p.growth_mib} MiB (${p.growth_per_execution_bytes} B per execution); ` +
        `${r.completed}/${r.n} completed at ${r.throughput_per_s}/s, ${r.cpu_ms_per_execution.workerd_runtime} ms runtime CPU each; fds ${p.fds.baseline} -> ${p.fds.settled}`,
    );
    console.log(`    RSS MiB by completed: ${p.checkpoints.map((c) => `${c.completed}:${c.rss_mib}`).join(" ")}`);
    const heap = (h: Heap | null | undefined) => (h ? `${h.used}/${h.total}` : "?");
    const heaps = Object.keys(p.js_heap_mib.settled).map((w) => `${w} ${heap(p.js_heap_mib.baseline[w])} -> ${heap(p.js_heap_mib.end[w])} -> ${heap(p.js_heap_mib.settled[w])}`);
    console.log(`    JavaScript heap MiB used/held, baseline -> end -> settled: ${heaps.join(", ") || "none read"}`);
  }
  console.log(`  ${target.met === null ? "n/a " : target.met ? "MET " : "MISS"} ${target.name}: ${target.measured}`);
  const line = JSON.stringify(result);
  console.log(line);
  const out = opts.jsonOut ?? path.join(path.dirname(new URL(import.meta.url).pathname), "results", `e2e-memory-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, `${line}\n`);
  console.error(`wrote ${out}`);
  const broken = [o, d].reduce((n, p) => n + p.report.failed + p.report.stuck, 0);
  return broken > 0 ? 1 : 0;
}
