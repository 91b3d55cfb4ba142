#!/usr/bin/env node
// Ledger benchmark (bench/ledger-worker.mjs is its worker): one ResourceLedger object in local workerd (Miniflare from
// node_modules, on 127.0.0.1 only), driven with concurrent reserve+settle
// pairs, against the ceiling of a no-op Durable Object RPC measured in the
// same run. Prints a table and one JSON line {"bench":"ledger",...}.
//
//   npm run bench:ledger            (defaults)
//   node bench/ledger.mjs --pairs 20000 --rounds 3 --concurrency 16,64
//   npm run bench:ledger -- --shards 1,2,4,8 [--multi 0,0.25,0.5,1] [--rate 200] [--seconds 6]
//
// --shards: the sharded ledger instead (bench/worker/ledger-shards.ts): the same
// offered load (stages per second, open loop) against 1, 2, 4, 8 ledger objects,
// with a share of stages whose pools span two shards; per configuration the
// requests per second the busiest object receives and the stages per second
// overall, and the capacity at 500 writing requests/s per object (docs/scaling.md).
//
// Bounded: a fixed number of pairs per round and a hard deadline; everything
// it starts (workerd, temp files) is stopped/removed before it exits.
import { build } from "esbuild";
import { Miniflare, Log, LogLevel, convertV4MiniflareOptions } from "miniflare";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1] : fallback;
}
const PAIRS = Math.min(200_000, Number(arg("pairs", 20_000)));
const ROUNDS = Math.min(10, Number(arg("rounds", 3)));
const CONCURRENCY = String(arg("concurrency", "1,16,64,128")).split(",").map(Number).filter((n) => n > 0);
const DEADLINE_MS = Number(arg("deadline-ms", 480_000));
const SHARDS = process.argv.includes("--shards") ? String(arg("shards", "1,2,4,8")).split(",").map(Number).filter((n) => Number.isInteger(n) && n >= 1 && n <= 256) : null;
const MULTI = String(arg("multi", "0,0.25,0.5,1")).split(",").map(Number).filter((f) => f >= 0 && f <= 1);
const RATE = Number(arg("rate", 200));
const SECONDS = Number(arg("seconds", 6));
/** The per-object write rate the capacity table is stated at (Cloudflare's soft limit for writing requests, docs/scaling.md). */
const PER_OBJECT_WRITES = 500;

const tmp = mkdtempSync(path.join(os.tmpdir(), "ledger-bench-"));
// The objects' SQLite files: under the OS temp dir (on disk here), or BENCH_DO_DIR (e.g. /dev/shm).
const doDir = mkdtempSync(path.join(process.env.BENCH_DO_DIR || tmp, "do-"));
let mf;
const deadline = setTimeout(() => {
  console.error(`bench: deadline of ${DEADLINE_MS} ms reached, stopping`);
  void cleanup().then(() => process.exit(2));
}, DEADLINE_MS);

async function cleanup() {
  try {
    await mf?.dispose();
  } catch {}
  rmSync(doDir, { recursive: true, force: true });
  rmSync(tmp, { recursive: true, force: true });
}

async function main() {
  const script = path.join(tmp, "worker.mjs");
  await build({
    // The worker = the bench's objects and handler + the real ResourceLedger.
    stdin: {
      contents: [
        'export { ResourceLedger } from "./actors/resource-ledger.ts";',
        'import bench, { NoopObject, Execution } from "./bench/ledger-worker.mjs";',
        'import { shardBench } from "./bench/worker/ledger-shards.ts";',
        "export { NoopObject, Execution };",
        "export default { fetch(request, env) { const u = new URL(request.url); return u.pathname === \"/shards\" ? shardBench(u, env) : bench.fetch(request, env); } };",
      ].join("\n"),
      resolveDir: root,
      sourcefile: "ledger-bench-entry.js",
      loader: "js",
    },
    outfile: script,
    bundle: true,
    format: "esm",
    platform: "neutral",
    target: "es2022",
    conditions: ["workerd", "worker", "browser"],
    mainFields: ["module", "main"],
    external: ["cloudflare:*", "node:*"],
    logLevel: "error",
  });
  const pools = [
    { name: "worker:bench", kind: "concurrency", capacity: 100_000 },
    { name: "tokens:bench", kind: "rate", capacity: 1e12, refill_per_second: 1e9 },
  ];
  mf = new Miniflare(convertV4MiniflareOptions({
    log: new Log(LogLevel.WARN),
    host: "127.0.0.1",
    cf: false,
    port: 0,
    modules: true,
    scriptPath: script,
    modulesRoot: tmp,
    compatibilityDate: "2026-11-01",
    compatibilityFlags: ["nodejs_compat"],
    durableObjects: {
      RESOURCE_LEDGER: { className: "ResourceLedger", useSQLite: true },
      NOOP: { className: "NoopObject", useSQLite: true },
      EXECUTION: { className: "Execution", useSQLite: true },
    },
    // On disk, so the ledger's writes are real SQLite writes.
    durableObjectsPersist: doDir,
    bindings: { POOLS: JSON.stringify(pools), TUNING: "{}", PRICES: JSON.stringify({ currency: "USD", per_unit: { "tokens:bench": 0.000001 } }) },
  }));
  const base = await mf.ready;
  if (base.hostname !== "127.0.0.1" && base.hostname !== "localhost") throw new Error(`unexpected address ${base}`);

  async function run(target, pairs, concurrency) {
    const u = new URL("/run", base);
    u.searchParams.set("target", target);
    u.searchParams.set("pairs", String(pairs));
    u.searchParams.set("concurrency", String(concurrency));
    u.searchParams.set("object", `bench-${target === "clients" ? "clients-" : ""}${concurrency}`);
    const t0 = performance.now();
    const res = await fetch(u);
    const wallMs = performance.now() - t0;
    if (!res.ok) throw new Error(`${target}: HTTP ${res.status} ${await res.text()}`);
    const r = await res.json();
    if (r.errors) throw new Error(`${target}: ${r.errors} errors, first: ${r.firstError}`);
    return { ...r, wallMs, pairsPerSec: (r.pairs * 1000) / Math.max(1, r.elapsedMs) };
  }

  if (SHARDS) return shards(base);

  // Warm up both objects (isolate start, schema creation, JIT).
  for (const c of CONCURRENCY) {
    await run("noop", 2_000, c);
    await run("ledger", 2_000, c);
    await run("clients", 2_000, c);
  }

  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const results = [];
  for (const c of CONCURRENCY) {
    const noop = [];
    const ledger = [];
    const clients = [];
    for (let r = 0; r < ROUNDS; r++) {
      const pairs = Math.min(PAIRS, c * 2_000);
      noop.push(await run("noop", pairs, c));
      ledger.push(await run("ledger", pairs, c));
      clients.push(await run("clients", pairs, c));
    }
    const pick = (rs) => {
      const m = median(rs.map((x) => x.pairsPerSec));
      return rs.find((x) => x.pairsPerSec === m);
    };
    const n = pick(noop);
    const l = pick(ledger);
    const q = pick(clients);
    // The two objects of one round ran back to back: their ratio is the least exposed to a shared machine's swings.
    const paired = clients.map((x, i) => x.pairsPerSec / ledger[i].pairsPerSec);
    results.push({
      concurrency: c,
      ledger_pairs_per_sec: Math.round(l.pairsPerSec),
      ledger_p50_ms: l.p50Ms,
      ledger_p99_ms: l.p99Ms,
      ledger_mean_ms: Number(l.meanMs.toFixed(3)),
      noop_pairs_per_sec: Math.round(n.pairsPerSec),
      noop_rpc_per_sec: Math.round(n.pairsPerSec * 2),
      noop_p50_ms: n.p50Ms,
      noop_p99_ms: n.p99Ms,
      ratio_to_noop: Number((l.pairsPerSec / n.pairsPerSec).toFixed(3)),
      clients_pairs_per_sec: Math.round(q.pairsPerSec),
      clients_p99_ms: q.p99Ms,
      clients_ratio_to_ledger: Number((q.pairsPerSec / l.pairsPerSec).toFixed(3)),
      clients_ratio_per_round: paired.map((x) => Number(x.toFixed(3))),
      clients_ratio_paired_median: Number(median(paired).toFixed(3)),
    });
  }

  const best = results.reduce((a, b) => (b.ledger_pairs_per_sec > a.ledger_pairs_per_sec ? b : a));
  console.log("");
  console.log(`ledger bench: up to ${PAIRS} reserve+settle pairs per round (2,000 per lane in flight), median of ${ROUNDS} rounds, ${os.cpus().length} cores, node ${process.version}, load average ${os.loadavg().map((x) => x.toFixed(1)).join(" ")}`);
  console.log("");
  console.log("| in flight | ledger pairs/s | p50 ms | p99 ms | no-op pairs/s (RPC/s) | p50 ms | p99 ms | ledger / no-op | 100 clients pairs/s | p99 ms | clients / ledger | per round (median) |");
  console.log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const r of results) {
    console.log(
      `| ${r.concurrency} | ${r.ledger_pairs_per_sec} | ${r.ledger_p50_ms} | ${r.ledger_p99_ms} | ${r.noop_pairs_per_sec} (${r.noop_rpc_per_sec}) | ${r.noop_p50_ms} | ${r.noop_p99_ms} | ${(r.ratio_to_noop * 100).toFixed(0)}% | ${r.clients_pairs_per_sec} | ${r.clients_p99_ms} | ${(r.clients_ratio_to_ledger * 100).toFixed(0)}% | ${r.clients_ratio_per_round.map((x) => `${(x * 100).toFixed(0)}%`).join(", ")} (${(r.clients_ratio_paired_median * 100).toFixed(0)}%) |`,
    );
  }
  console.log("");
  console.log(
    JSON.stringify({
      bench: "ledger",
      pairs_per_round: PAIRS,
      rounds: ROUNDS,
      cores: os.cpus().length,
      load_average: os.loadavg().map((x) => Number(x.toFixed(2))),
      node: process.version,
      best_concurrency: best.concurrency,
      pairs_per_sec: best.ledger_pairs_per_sec,
      p50_ms: best.ledger_p50_ms,
      p99_ms: best.ledger_p99_ms,
      noop_pairs_per_sec: best.noop_pairs_per_sec,
      ratio_to_noop: best.ratio_to_noop,
      clients_ratio_to_ledger: best.clients_ratio_to_ledger,
      clients_target_ratio: 0.8,
      target_pairs_per_sec: 10_000,
      target_ratio: 0.3,
      pass: best.ledger_pairs_per_sec >= 10_000 && best.ratio_to_noop >= 0.3,
      results,
    }),
  );
}

/** The sharded ledger (--shards): each shard count and share of multi-shard stages, at the same offered load. */
async function shards(base) {
  let run = 0;
  async function one(n, multi, seconds) {
    const u = new URL("/shards", base);
    for (const [k, v] of Object.entries({ shards: n, multi, rate: RATE, seconds, run: ++run })) u.searchParams.set(k, String(v));
    const res = await fetch(u);
    if (!res.ok) throw new Error(`shards ${n}: HTTP ${res.status} ${await res.text()}`);
    const r = await res.json();
    if (r.errors) throw new Error(`shards ${n} multi ${multi}: ${r.errors} errors, first: ${r.firstError}`);
    return r;
  }
  // Warm-up: isolate start, schema creation, JIT.
  await one(1, 0, 2);
  await one(Math.max(...SHARDS), Math.max(...MULTI), 2);
  const rows = [];
  for (const n of SHARDS) {
    for (const multi of n === 1 ? [0] : MULTI) {
      const r = await one(n, multi, SECONDS);
      const secs = r.elapsedMs / 1000;
      const busiestPerStage = r.busiest_calls / r.stages;
      rows.push({
        shards: n,
        multi_share: multi,
        multi_shard_stages: r.multi_shard_stages,
        offered_per_sec: RATE,
        stages_per_sec: Math.round(r.stages / secs),
        requests_per_sec: Math.round(r.calls.reduce((a, b) => a + b, 0) / secs),
        busiest_requests_per_sec: Math.round(r.busiest_calls / secs),
        busiest_requests_per_stage: Number(busiestPerStage.toFixed(3)),
        requests_per_object: r.calls,
        p50_ms: r.p50Ms,
        p99_ms: r.p99Ms,
        // What one deployment carries when its busiest ledger object takes PER_OBJECT_WRITES writing requests/s.
        capacity_stages_per_sec: Math.round(PER_OBJECT_WRITES / busiestPerStage),
      });
    }
  }
  const ref = rows.find((r) => r.shards === Math.min(...SHARDS) && r.multi_share === 0) ?? rows[0];
  console.log("");
  console.log(`ledger shards bench: ${RATE} stages/s offered for ${SECONDS} s per row (open loop), ${os.cpus().length} cores, node ${process.version}, load average ${os.loadavg().map((x) => x.toFixed(1)).join(" ")}`);
  console.log("");
  console.log(`| shards | multi-shard share | stages/s | requests/s (all) | busiest object req/s | vs ${ref.shards} shard | busiest req/stage | p50 ms | p99 ms | stages/s at ${PER_OBJECT_WRITES} req/s/object |`);
  console.log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const r of rows) {
    console.log(
      `| ${r.shards} | ${(r.multi_share * 100).toFixed(0)}% | ${r.stages_per_sec} | ${r.requests_per_sec} | ${r.busiest_requests_per_sec} | ${(r.busiest_requests_per_sec / ref.busiest_requests_per_sec).toFixed(2)} | ${r.busiest_requests_per_stage} | ${r.p50_ms} | ${r.p99_ms} | ${r.capacity_stages_per_sec} |`,
    );
  }
  console.log("");
  console.log(
    JSON.stringify({
      bench: "ledger-shards",
      offered_per_sec: RATE,
      seconds: SECONDS,
      per_object_writes: PER_OBJECT_WRITES,
      cores: os.cpus().length,
      load_average: os.loadavg().map((x) => Number(x.toFixed(2))),
      node: process.version,
      rows,
    }),
  );
}

try {
  await main();
} catch (err) {
  console.error("bench failed:", err);
  process.exitCode = 1;
} finally {
  clearTimeout(deadline);
  await cleanup();
}
