/**
 * `npm run bench:object-memory` (issue 17, target 7): what one live SQLite
 * Durable Object costs the runtime in memory, by how many tables it has and
 * how many distinct statements it has run, measured on the runtime itself.
 *
 * Why: over the same executions the orchestrator's runtime grows about
 * twice the durable floor's, and its worker isolates' JavaScript heaps are a
 * small part of it (`--memory` reads them: docs/performance.md, "Memory,
 * each phase in a fresh runtime"). The rest is the runtime's own memory per
 * live object: its SQLite connection, the schema parsed for it, the pages it
 * read, and the statements the runtime keeps prepared for it (every distinct
 * statement text the object ran). An Execution object has a few dozen
 * tables and indexes and runs well over a hundred distinct statements; the
 * durable floor's object has one table and a handful.
 *
 * Each variant runs in a fresh `wrangler dev` session of a probe worker
 * written to a temporary folder: `--objects` objects (all alive at once: the
 * runtime keeps an object 10 s after its last request, and the run takes
 * less), each creating `tables` tables and running `statements` distinct
 * statements once. The growth of the runtime's RSS over the variant, divided
 * by the objects, is the cost of one live object; the variants' differences
 * give the cost of a table and of a statement.
 *
 * Options: --objects (300) --concurrency (50). Prints a table and one JSON
 * line ({"bench":"object-memory",...}), written to bench/results/.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { sleep, startProbe } from "./lib/probe-worker";
import { memoryOf } from "./lib/proc-stats";

const args = process.argv.slice(2);
const opt = (name: string, dflt: number) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const OBJECTS = opt("--objects", 300);
const CONCURRENCY = opt("--concurrency", 50);
const MiB = 1024 * 1024;

/** Table and statement counts: the durable floor's shape, an Execution's tables, and its statements on top. */
const VARIANTS = [
  { name: "1 table, 4 statements", tables: 1, statements: 4 },
  { name: "20 tables, 20 statements", tables: 20, statements: 20 },
  { name: "20 tables, 150 statements", tables: 20, statements: 150 },
];

const PROBE = `
import { DurableObject } from "cloudflare:workers";
export class Probe extends DurableObject {
  run(tables, statements) {
    const sql = this.ctx.storage.sql;
    for (let t = 0; t < tables; t++) {
      sql.exec("CREATE TABLE IF NOT EXISTS t" + t + " (id INTEGER PRIMARY KEY, name TEXT NOT NULL, status TEXT, attempt INTEGER, due_at INTEGER, body TEXT)");
      sql.exec("INSERT INTO t" + t + " (name, status, attempt, due_at, body) VALUES (?, 'pending', 0, ?, ?)", "row", Date.now(), "x".repeat(200));
    }
    // Each text distinct, so the runtime prepares (and keeps) each one.
    for (let s = 0; s < statements; s++) {
      const t = s % tables;
      sql.exec("SELECT id, name, status, attempt, due_at, body FROM t" + t + " WHERE id = ? AND attempt >= " + s + " ORDER BY due_at LIMIT 10", 1).toArray();
    }
    return 1;
  }
}
export default {
  async fetch(req, env) {
    const u = new URL(req.url);
    if (u.pathname === "/health") return new Response("ok");
    const stub = env.PROBE.get(env.PROBE.idFromName(u.searchParams.get("id")));
    await stub.run(Number(u.searchParams.get("tables")), Number(u.searchParams.get("statements")));
    return new Response("ok");
  },
};
`;


async function hit(url: string, count: number, prefix: string, v: (typeof VARIANTS)[number]): Promise<void> {
  let next = 0;
  const one = async () => {
    while (next < count) {
      const i = next++;
      const res = await fetch(`${url}/run?id=${prefix}-${i}&tables=${v.tables}&statements=${v.statements}`, { signal: AbortSignal.timeout(30_000) });
      if (!res.ok) throw new Error(`probe ${i}: ${res.status} ${await res.text()}`);
      await res.arrayBuffer();
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, one));
}

async function variant(v: (typeof VARIANTS)[number]) {
  const probe = await startProbe("object-memory", PROBE);
  try {
    // A warm-up of the same shape, then its objects left to be evicted: the baseline is a runtime that has run this code.
    await hit(probe.url, 20, "warm", v);
    await sleep(12_000);
    const before = memoryOf(probe.runtime)?.rss ?? Number.NaN;
    const started = Date.now();
    await hit(probe.url, OBJECTS, "run", v);
    const seconds = (Date.now() - started) / 1000;
    await sleep(500);
    const after = memoryOf(probe.runtime)?.rss ?? Number.NaN;
    const perObject = (after - before) / OBJECTS;
    return { ...v, seconds: Number(seconds.toFixed(1)), rss_before_mib: Number((before / MiB).toFixed(1)), rss_after_mib: Number((after / MiB).toFixed(1)), per_object_kib: Math.round(perObject / 1024) };
  } finally {
    await probe.stop();
  }
}

const startedAt = new Date();
const rows = [];
for (const v of VARIANTS) {
  console.error(`${v.name}: ${OBJECTS} objects at ${CONCURRENCY} in flight...`);
  rows.push(await variant(v));
}
const [small, tables, statements] = rows;
const perTable = (tables.per_object_kib - small.per_object_kib) / (tables.tables - small.tables);
const perStatement = (statements.per_object_kib - tables.per_object_kib) / (statements.statements - tables.statements);
console.log(`\none live SQLite object's share of the runtime's RSS (${OBJECTS} objects, all alive at once):`);
for (const r of rows) console.log(`  ${r.name.padEnd(28)} ${String(r.per_object_kib).padStart(6)} KiB per object (RSS ${r.rss_before_mib} -> ${r.rss_after_mib} MiB in ${r.seconds} s)`);
console.log(`  about ${perTable.toFixed(1)} KiB per table (with its row) and ${perStatement.toFixed(1)} KiB per distinct statement run`);
const line = JSON.stringify({
  bench: "object-memory",
  date: startedAt.toISOString(),
  objects: OBJECTS,
  concurrency: CONCURRENCY,
  variants: rows,
  per_table_kib: Number(perTable.toFixed(1)),
  per_statement_kib: Number(perStatement.toFixed(1)),
  loadavg: os.loadavg(),
});
console.log(line);
const out = path.join(path.dirname(new URL(import.meta.url).pathname), "results", `object-memory-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
mkdirSync(path.dirname(out), { recursive: true });
writeFileSync(out, `${line}\n`);
console.error(`wrote ${out}`);
