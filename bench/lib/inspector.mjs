/**
 * The workerd runtime's own inspector (not wrangler's proxy, which attaches to
 * the primary worker only): the worker isolates of a running bench session, by
 * the runtime's pid, and a DevTools protocol session on one of them. Used by
 * bench/cpu-profile.mjs (a CPU profile) and bench/memory.ts (each isolate's
 * JavaScript heap).
 */
import { execFileSync } from "node:child_process";

/** The inspector targets (`core:user:<worker>`) of the runtime `pid`, from the socket whose /json/list names them. */
export async function inspectorTargets(pid) {
  const ports = execFileSync("ss", ["-ltnpH"], { encoding: "utf8" })
    .split("\n")
    .filter((l) => l.includes(`pid=${pid},`))
    .map((l) => Number(l.trim().split(/\s+/)[3].split(":").pop()));
  for (const port of ports) {
    try {
      const list = await (await fetch(`http://127.0.0.1:${port}/json/list`, { signal: AbortSignal.timeout(2000) })).json();
      const workers = list.filter((t) => typeof t.id === "string" && t.id.startsWith("core:user:"));
      if (workers.length) return workers.map((t) => ({ worker: t.id.slice("core:user:".length), url: t.webSocketDebuggerUrl }));
    } catch {}
  }
  return [];
}

/**
 * A session on one isolate, `first` its first method (e.g. Profiler.enable).
 * The first session opened on an isolate in a bench session often gets no
 * answer at all (or is closed at once), while the next one works (seen
 * 2026-12-02: unanswered for 60-120 s, then a second connection answered in
 * under 300 ms): so ask `first` with a short deadline and on no answer close
 * and connect again, up to `tries` times.
 */
export async function inspectorSession(url, first, { tries = 5, firstMs = 5_000, log = console.error } = {}) {
  if (typeof WebSocket === "undefined") throw new Error("no WebSocket: run with node --experimental-websocket (Node 20) or Node >= 22");
  for (let attempt = 1; ; attempt++) {
    const ws = new WebSocket(url);
    let nextId = 1;
    const pending = new Map();
    ws.onmessage = (ev) => {
      const msg = JSON.parse(typeof ev.data === "string" ? ev.data : Buffer.from(ev.data).toString());
      if (msg.id && pending.has(msg.id)) {
        pending.get(msg.id)(msg);
        pending.delete(msg.id);
      }
    };
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
    try {
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no open in 10 s")), 10_000);
        ws.onopen = () => {
          clearTimeout(timer);
          resolve();
        };
        ws.onerror = () => reject(new Error("websocket error"));
        ws.onclose = () => reject(new Error("closed before open"));
      });
      ws.onclose = null;
      await send(first, {}, firstMs);
      return { send, close: () => ws.close() };
    } catch (err) {
      ws.onclose = null;
      ws.close();
      if (attempt >= tries) throw new Error(`no inspector session after ${attempt} tries: ${err.message}`);
      log(`inspector attempt ${attempt}: ${err.message}; connecting again`);
    }
  }
}
