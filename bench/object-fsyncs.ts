/**
 * `npm run bench:object-fsyncs` (issue 17, target 4): what a new SQLite
 * Durable Object costs in `fsync`s in this runtime before and beside its own
 * commits, measured on the runtime itself.
 *
 * Why: target 4 counts every `fsync` of a three-stage execution, all files.
 * Each execution is a new Execution object, and the bench's count of it
 * ("Rows written and commits" in docs/performance.md) holds the runtime's
 * cost of a new database file beside the object's own commits. This probe
 * tells the two apart: a worker written to a temporary folder whose objects
 * make one, two or three commits (one request each), with and without an
 * alarm, and one that only reads.
 *
 * Each variant runs `--objects` new objects one after the other under
 * `strace -f -y -e trace=fsync,fdatasync` attached to the runtime
 * (bench/lib/fsyncs.ts), then waits for them to be evicted (the runtime
 * closes an idle object's database about 10 s after its last request, and
 * that close checkpoints the WAL: two more `fsync`s, counted apart in the
 * `close` line). Files are told apart by name: the object's `.sqlite`,
 * `-journal` and `-wal`, its class folder (a directory sync), and the local
 * alarm store (`metadata.sqlite`); other files synced meanwhile (wrangler's
 * local trace store) are listed apart and left out of the total.
 *
 * Options: --objects (20). Prints a table and one JSON line
 * ({"bench":"object-fsyncs",...}), written to bench/results/.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { FsyncCounter } from "./lib/fsyncs";
import { sleep, startProbe } from "./lib/probe-worker";

const args = process.argv.slice(2);
const opt = (name: string, dflt: number) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const OBJECTS = opt("--objects", 20);

const VARIANTS = [
  { name: "one read, no write", commits: 0, alarm: false },
  { name: "one commit", commits: 1, alarm: false },
  { name: "two commits", commits: 2, alarm: false },
  { name: "three commits", commits: 3, alarm: false },
  { name: "one commit with setAlarm", commits: 1, alarm: true },
];

const PROBE = `
import { DurableObject } from "cloudflare:workers";
export class Probe extends DurableObject {
  // One request: a read only (n = 0) or a write, committed when the request's turn ends.
  step(n, alarm) {
    const sql = this.ctx.storage.sql;
    sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 't'").toArray();
    if (n > 0) {
      sql.exec("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)");
      sql.exec("INSERT INTO t (body) VALUES (?)", "row " + n);
    }
    if (alarm) void this.ctx.storage.setAlarm(Date.now() + 3600_000);
    return this.ctx.id.toString();
  }
  alarm() {}
}
export default {
  async fetch(req, env) {
    const u = new URL(req.url);
    if (u.pathname === "/health") return new Response("ok");
    const stub = env.PROBE.get(env.PROBE.idFromName(u.searchParams.get("id")));
    const commits = Number(u.searchParams.get("commits"));
    const alarm = u.searchParams.get("alarm") === "1";
    let id = await stub.step(commits > 0 ? 1 : 0, alarm);
    for (let i = 2; i <= commits; i++) id = await stub.step(i, false);
    return new Response(id);
  },
};
`;


type Kind = "journal" | "database" | "wal" | "directory" | "alarm store" | "other";

/** Each synced file of the trace, by kind, for the objects named in `ids` (hex ids); the others as `other`. */
function count(text: string, ids: Set<string>, others?: Set<string>): Record<Kind, number> {
  const by: Record<Kind, number> = { journal: 0, database: 0, wal: 0, directory: 0, "alarm store": 0, other: 0 };
  const other = (file: string) => {
    by.other++;
    others?.add(file.replace(/[0-9a-f]{64}/g, "<id>").replace(/^.*\/v3\//, ""));
  };
  for (const line of text.split("\n")) {
    const m = /f(?:data)?sync\(\d+<([^>]*)>\)/.exec(line);
    if (!m) continue;
    const base = path.basename(m[1]);
    const id = base.split(".")[0];
    if (base.startsWith("metadata.sqlite")) by["alarm store"]++;
    else if (!base.includes(".") && base.endsWith("-Probe")) by.directory++;
    else if (!ids.has(id)) other(m[1]);
    else if (base.endsWith(".sqlite-journal")) by.journal++;
    else if (base.endsWith(".sqlite-wal")) by.wal++;
    else if (base.endsWith(".sqlite")) by.database++;
    else other(m[1]);
  }
  return by;
}

const perObject = (by: Record<Kind, number>) => Object.fromEntries(Object.entries(by).map(([k, v]) => [k, Number((v / OBJECTS).toFixed(2))])) as Record<Kind, number>;
const total = (by: Record<Kind, number>) => Number(((by.journal + by.database + by.wal + by.directory + by["alarm store"]) / OBJECTS).toFixed(2));

const startedAt = new Date();
const rows = [];
const probe = await startProbe("object-fsyncs", PROBE);
const { runtime } = probe;
try {
  // A warm-up object: the worker's code loaded, the class folder created; then evicted.
  await (await fetch(`${probe.url}/run?id=warm&commits=1`, { signal: AbortSignal.timeout(30_000) })).text();
  await sleep(12_000);
  for (const v of VARIANTS) {
    console.error(`${v.name}: ${OBJECTS} new objects...`);
    const ids = new Set<string>();
    const run = new FsyncCounter();
    await run.start(runtime);
    for (let i = 0; i < OBJECTS; i++) {
      const res = await fetch(`${probe.url}/run?id=${encodeURIComponent(v.name)}-${i}&commits=${v.commits}&alarm=${v.alarm ? 1 : 0}`, { signal: AbortSignal.timeout(30_000) });
      if (!res.ok) throw new Error(`probe: ${res.status} ${await res.text()}`);
      ids.add(await res.text());
    }
    await sleep(300);
    const others = new Set<string>();
    const during = count(await run.rawStop(), ids, others);
    // Their closes, once the runtime evicts them.
    const close = new FsyncCounter();
    await close.start(runtime);
    await sleep(15_000);
    const closed = count(await close.rawStop(), ids);
    rows.push({ ...v, per_object: perObject(during), total_per_object: total(during), close_per_object: perObject(closed), others: [...others] });
  }
} finally {
  await probe.stop();
}

console.log(`\nfsyncs per new SQLite object (${OBJECTS} objects per variant, one request per commit):`);
console.log(`  ${"variant".padEnd(26)} ${"total".padStart(5)}  journal database directory  wal  alarm store | at close: wal database | other files`);
for (const r of rows) {
  const p = r.per_object;
  const c = r.close_per_object;
  console.log(
    `  ${r.name.padEnd(26)} ${String(r.total_per_object).padStart(5)}  ${String(p.journal).padStart(7)} ${String(p.database).padStart(8)} ${String(p.directory).padStart(9)} ${String(p.wal).padStart(4)} ${String(p["alarm store"]).padStart(12)} | ${String(c.wal).padStart(12)} ${String(c.database).padStart(8)} | ${p.other} (${r.others.join(", ")})`,
  );
}
const line = JSON.stringify({ bench: "object-fsyncs", date: startedAt.toISOString(), objects: OBJECTS, variants: rows, loadavg: os.loadavg() });
console.log(line);
const out = path.join(path.dirname(new URL(import.meta.url).pathname), "results", `object-fsyncs-${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
mkdirSync(path.dirname(out), { recursive: true });
writeFileSync(out, `${line}\n`);
console.error(`wrote ${out}`);
