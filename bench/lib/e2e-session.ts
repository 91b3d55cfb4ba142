import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { ROOT, startDevSession } from "../../scripts/dev-session.mjs";
import { commandLineOf, descendants } from "./proc-stats";

/**
 * The bench session: one `wrangler dev` with four workers, on a free
 * 127.0.0.1 port, with fresh local state in a temporary directory:
 *
 * 1. bench gateway (primary: the only worker wrangler exposes on the port);
 * 2. the orchestrator, from a generated copy of the root wrangler.toml: `main`
 *    is the real src/index.ts (absolute path), one more service binding
 *    (BENCH_WORKER -> bitware-bench-worker) and the bench's vars
 *    (WORKER_BINDINGS, POOLS, TUNING, LOG_LEVEL) over the root's;
 * 3. bitware-bench-worker (bench/worker/wrangler.toml);
 * 4. the bench KAM (bench/worker/kam.wrangler.toml).
 *
 * `--var` would only reach the primary worker, hence the generated config.
 */
export interface BenchSession {
  url: string;
  port: number;
  pid: number;
  dir: string;
  generatedConfig: string;
  logs: () => string;
  stop: () => Promise<void>;
}

export const BENCH_BINDING = "BENCH_WORKER";

export function writeOrchestratorConfig(dir: string, vars: Record<string, string>): string {
  const require = createRequire(import.meta.url);
  const wrangler = require(path.join(ROOT, "node_modules/wrangler/wrangler-dist/cli.js")) as {
    experimental_readRawConfig: (args: { config: string }) => { rawConfig: Record<string, any> };
  };
  const { rawConfig } = wrangler.experimental_readRawConfig({ config: path.join(ROOT, "wrangler.toml") });
  const config = structuredClone(rawConfig);
  config.main = path.join(ROOT, String(config.main));
  config.services = [...(config.services ?? []), { binding: BENCH_BINDING, service: "bitware-bench-worker" }];
  config.vars = { ...(config.vars ?? {}), ...vars };
  const out = path.join(dir, "orchestrator");
  mkdirSync(out, { recursive: true });
  const file = path.join(out, "wrangler.json");
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

export async function startBenchSession(opts: { vars: Record<string, string>; secrets: Record<string, string>; quiet?: boolean }): Promise<BenchSession> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "orch-bench-"));
  const generatedConfig = writeOrchestratorConfig(dir, opts.vars);
  const configs = [
    path.join(ROOT, "bench/worker/gateway.wrangler.toml"),
    generatedConfig,
    path.join(ROOT, "bench/worker/wrangler.toml"),
    path.join(ROOT, "bench/worker/kam.wrangler.toml"),
  ];
  let session;
  try {
    session = await startDevSession({ configs, secrets: opts.secrets, persistTo: path.join(dir, "state"), quiet: opts.quiet ?? true, readyTimeoutMs: 120_000 });
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    ...session,
    dir,
    generatedConfig,
    stop: async () => {
      await session.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The session's workerd processes. wrangler runs two: its proxy (which owns
 * the public port and forwards every request) and the runtime that hosts the
 * workers (orchestrator included). The runtime is the one started with an
 * inspector address for the workers; if that cannot be told, the larger one.
 */
export function workerdProcesses(sessionPid: number): { runtime: number | null; proxy: number[]; all: number[] } {
  const all = descendants(sessionPid)
    .filter((p) => p.comm === "workerd")
    .map((p) => p.pid);
  const withInspector = all.filter((pid) => commandLineOf(pid).some((a) => a.startsWith("--inspector-addr")));
  const runtime = withInspector.length === 1 ? withInspector[0] : null;
  return { runtime, proxy: all.filter((p) => p !== runtime), all };
}
