// Starts the local multi-worker session (orchestrator + the demo stand-ins, or
// other stage workers) with `wrangler dev -c ... -c ...` on a free localhost
// port, waits until it answers, and stops it (process group) on demand.
// Used by `npm start`, the e2e tests and the benchmarks.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const DEMO_CONFIGS = ["wrangler.toml", "demo/kam/wrangler.toml", "demo/content-granulator/wrangler.toml"];

/** A free TCP port on 127.0.0.1. */
export async function freePort() {
  const srv = net.createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const { port } = /** @type {net.AddressInfo} */ (srv.address());
  srv.close();
  await once(srv, "close");
  return port;
}

/**
 * Secrets: wrangler gives the first worker the `--env-file` (so a developer's
 * .dev.vars is not used) and the others `process.env` (their configs list the
 * secrets they require), so both carry the same values.
 * `cwd`: the checkout to run from (its scripts/wrangler.mjs and node_modules);
 * the benchmarks pass a snapshot so that nothing done to this checkout during a
 * run (an edit, an `npm ci`) makes wrangler rebuild and restart the workers.
 * @param {{ configs?: string[], port?: number, vars?: Record<string,string>, secrets?: Record<string,string>, quiet?: boolean, persistTo?: string, readyTimeoutMs?: number, cwd?: string }} [opts]
 * @returns {Promise<{ url: string, port: number, pid: number, logs: () => string, stop: () => Promise<void>, kill: () => Promise<void> }>}
 */
export async function startDevSession(opts = {}) {
  const configs = opts.configs ?? DEMO_CONFIGS;
  const port = opts.port ?? (await freePort());
  const inspectorPort = await freePort();
  const args = ["scripts/wrangler.mjs", "dev", "--ip", "127.0.0.1", "--port", String(port), "--inspector-port", String(inspectorPort), "--show-interactive-dev-session=false", "--log-level", opts.quiet === false ? "log" : "warn"];
  for (const c of configs) args.push("-c", c);
  /** Temporary folders this session made (env file, dev registry), removed when it stops. */
  const temps = [];
  if (opts.secrets) {
    const envFile = writeEnvFile(opts.secrets);
    temps.push(path.dirname(envFile));
    args.push("--env-file", envFile);
  }
  let registry = process.env.WRANGLER_REGISTRY_PATH;
  if (!registry) {
    registry = mkdtempSync(path.join(os.tmpdir(), "orch-registry-"));
    temps.push(registry);
  }
  if (opts.persistTo) args.push("--persist-to", opts.persistTo);
  for (const [k, v] of Object.entries(opts.vars ?? {})) args.push("--var", `${k}:${v}`);
  let out = "";
  const child = spawn(process.execPath, args, {
    cwd: opts.cwd ?? ROOT,
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
    // A private dev registry: other `wrangler dev` sessions on the machine register
    // workers in the shared one, and every change there makes this session reload.
    env: {
      ...process.env,
      ...opts.secrets,
      WRANGLER_REGISTRY_PATH: registry,
      WRANGLER_SEND_METRICS: "false",
      CI: "true",
      NO_COLOR: "1",
    },
  });
  const keep = (d) => {
    out += d.toString();
    if (out.length > 200_000) out = out.slice(-100_000);
  };
  child.stdout.on("data", keep);
  child.stderr.on("data", keep);
  const url = `http://127.0.0.1:${port}`;
  const cleanup = () => {
    for (const dir of temps) rmSync(dir, { recursive: true, force: true });
  };
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return cleanup();
    try {
      process.kill(-child.pid, "SIGTERM");
    } catch {}
    const t = setTimeout(() => {
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {}
    }, 5000);
    await once(child, "exit").catch(() => {});
    clearTimeout(t);
    cleanup();
  };
  /** A hard crash: SIGKILL to the whole process group (wrangler, both workerd processes), no chance to flush anything. */
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(-child.pid, "SIGKILL");
      } catch {}
      await once(child, "exit").catch(() => {});
    }
    cleanup();
  };
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 90_000);
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`wrangler dev exited with ${child.exitCode}:\n${out.slice(-4000)}`);
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
      if (res.ok) return { url, port, pid: child.pid, logs: () => out, stop, kill };
    } catch {}
    await new Promise((r) => setTimeout(r, 250));
  }
  await stop();
  throw new Error(`wrangler dev did not answer on ${url} within the deadline:\n${out.slice(-4000)}`);
}

/** Writes a temporary env file with the given secrets for a session (so tests never touch .dev.vars). */
export function writeEnvFile(values) {
  const dir = mkdtempSync(path.join(os.tmpdir(), "orch-env-"));
  const file = path.join(dir, ".env");
  const lines = Object.entries(values).map(([k, v]) => `${k}=${v}\n`);
  writeFileSync(file, lines.join(""));
  return file;
}
