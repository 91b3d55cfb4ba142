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
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";

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

const ports = execFileSync("ss", ["-ltnpH"], { encoding: "utf8" })
  .split("\n")
  .filter((l) => l.includes(`pid=${pid},`))
  .map((l) => Number(l.trim().split(/\s+/)[3].split(":").pop()));
let target = null;
for (const port of ports) {
  try {
    const list = await (await fetch(`http://127.0.0.1:${port}/json/list`, { signal: AbortSignal.timeout(2000) })).json();
    target = list.find((t) => t.id === `core:user:${worker}`) ?? null;
    if (target) break;
  } catch {}
}
if (!target) {
  console.error(`no inspector target for ${worker} on pid ${pid} (ports ${ports.join(",")})`);
  process.exit(2);
}

// The first inspector session opened on a worker's isolate in a bench session often gets no answer
// at all (or is closed at once), while the next one works (seen 2026-12-02: Profiler.enable unanswered
// for 60-120 s, then a second connection answered in under 300 ms). Not the wrangler session: its
// inspector proxy attaches to the primary worker only (the bench gateway). So: connect, ask for
// Profiler.enable with a short deadline, and on no answer close and connect again.
let ws;
let nextId = 1;
const pending = new Map();
const send = (method, params = {}, ms = 180_000) =>
  new Promise((resolve, reject) => {
    const id = nextId++;
    const timer = setTimeout(() => {
      pending.delete(id);
      reject(new Error(`${method}: no answer in ${ms / 1000} s`));
    }, ms);
    pending.set(id, (m) => {
      clearTimeout(timer);
      if (m.error) reject(new Error(`${method}: ${JSON.stringify(m.error)}`));
      else resolve(m.result);
    });
    ws.send(JSON.stringify({ id, method, params }));
  });
for (let attempt = 1; ; attempt++) {
  ws = new WebSocket(target.webSocketDebuggerUrl);
  ws.onmessage = (ev) => {
    const msg = JSON.parse(typeof ev.data === "string" ? ev.data : Buffer.from(ev.data).toString());
    if (msg.id && pending.has(msg.id)) {
      pending.get(msg.id)(msg);
      pending.delete(msg.id);
    }
  };
  try {
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("websocket error"));
      ws.onclose = () => reject(new Error("closed before open"));
    });
    ws.onclose = null;
    await send("Profiler.enable", {}, 5_000);
    break;
  } catch (err) {
    ws.onclose = null;
    ws.close();
    if (attempt >= 5) {
      console.error(`no inspector session for ${worker} after ${attempt} tries: ${err.message}`);
      process.exit(2);
    }
    console.error(`inspector attempt ${attempt}: ${err.message}; connecting again`);
  }
}
await send("Profiler.setSamplingInterval", { interval: 500 });
await send("Profiler.start");
console.error(`profiling ${worker} for ${seconds} s...`);
await new Promise((r) => setTimeout(r, seconds * 1000));
const { profile } = await send("Profiler.stop");
ws.close();
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
