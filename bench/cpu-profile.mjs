#!/usr/bin/env node
/**
 * A V8 CPU profile of one worker in a running bench session (JavaScript and the
 * runtime calls it makes, e.g. SQL, as seen from the isolate), from the workerd
 * runtime's inspector: `node --experimental-websocket bench/cpu-profile.mjs --pid <workerd runtime pid>
 * [--worker orchestrator-v2] [--seconds 20] [--out file.cpuprofile] [--top 40]`.
 *
 * The runtime pid is the one the bench prints ("workerd runtime pid ..."). The
 * script finds the runtime's inspector port (the listening socket whose
 * /json/list names the workers), profiles the worker for --seconds, prints the
 * functions by self time and by self + callees (total), and writes the
 * profile (open it in Chrome DevTools) if --out is given. Time spent outside
 * the isolate (the runtime's own C++ work: commits, fsync, tracing) is not in
 * it; it shows as "(idle)" or "(program)".
 */
import { writeFileSync } from "node:fs";
import { inspectorSession, inspectorTargets } from "./lib/inspector.mjs";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const pid = Number(opt("--pid"));
const worker = opt("--worker", "orchestrator-v2");
const seconds = Number(opt("--seconds", "20"));
const out = opt("--out", null);
const top = Number(opt("--top", "40"));
if (!pid) {
  console.error("usage: node --experimental-websocket bench/cpu-profile.mjs --pid <workerd runtime pid> [--worker orchestrator-v2] [--seconds 20] [--out f.cpuprofile]");
  process.exit(2);
}
if (typeof WebSocket === "undefined") {
  console.error("run with node --experimental-websocket (Node 20) or Node >= 22");
  process.exit(2);
}

const target = (await inspectorTargets(pid)).find((t) => t.worker === worker);
if (!target) {
  console.error(`no inspector target for ${worker} on pid ${pid}`);
  process.exit(2);
}
let session;
try {
  session = await inspectorSession(target.url, "Profiler.enable");
} catch (err) {
  console.error(`${worker}: ${err.message}`);
  process.exit(2);
}
const { send } = session;
await send("Profiler.setSamplingInterval", { interval: 500 });
await send("Profiler.start");
console.error(`profiling ${worker} for ${seconds} s...`);
await new Promise((r) => setTimeout(r, seconds * 1000));
const { profile } = await send("Profiler.stop");
session.close();
if (out) writeFileSync(out, JSON.stringify(profile));

// Self time per node from the samples, then per function (name + url + line) and total (self + callees).
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map();
for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const selfUs = new Map();
for (let i = 0; i < profile.samples.length; i++) {
  const dt = profile.timeDeltas[i + 1] ?? 0;
  selfUs.set(profile.samples[i], (selfUs.get(profile.samples[i]) ?? 0) + dt);
}
const key = (n) => {
  const f = n.callFrame;
  const file = f.url ? f.url.split("/").slice(-2).join("/") : "";
  return `${f.functionName || "(anonymous)"} ${file}${f.url ? `:${f.lineNumber + 1}` : ""}`;
};
const self = new Map();
const total = new Map();
let all = 0;
for (const [id, us] of selfUs) {
  all += us;
  const n = byId.get(id);
  self.set(key(n), (self.get(key(n)) ?? 0) + us);
  // Each function counted once per stack (recursion).
  const seen = new Set();
  for (let cur = id; cur !== undefined; cur = parent.get(cur)) {
    const k = key(byId.get(cur));
    if (seen.has(k)) continue;
    seen.add(k);
    total.set(k, (total.get(k) ?? 0) + us);
  }
}
const idle = [...self].filter(([k]) => k.startsWith("(idle)")).reduce((s, [, v]) => s + v, 0);
const busy = all - idle;
console.log(`${worker}: ${(all / 1e6).toFixed(1)} s sampled, ${(busy / 1e6).toFixed(2)} s not idle (${((busy / all) * 100).toFixed(0)}%)`);
const show = (title, m) => {
  console.log(`\n${title} (share of the non-idle time)`);
  for (const [k, us] of [...m].filter(([k]) => !k.startsWith("(idle)") && !k.startsWith("(root)")).sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`  ${((us / busy) * 100).toFixed(1).padStart(5)}%  ${(us / 1000).toFixed(0).padStart(7)} ms  ${k}`);
  }
};
show("self time", self);
show("total time (self + callees)", total);
