import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
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
 * 4. the bench KAM (bench/worker/kam.wrangler.toml);
 * 5. with `--vs-workflows`, the same pipeline on Cloudflare Workflows
 *    (bench/worker/workflows.wrangler.toml).
 *
 * `--var` would only reach the primary worker, hence the generated config.
 * The session uses a private dev registry (WRANGLER_REGISTRY_PATH), so other
 * wrangler sessions on the machine cannot make it reload.
 *
 * Every worker, and wrangler itself, runs from a snapshot of the tree taken at
 * start (the working tree, a commit such as `tree: "HEAD"`, or another
 * checkout's directory) in the temporary directory, with node_modules
 * hard-linked: `wrangler dev` watches its sources and restarts the workers when
 * a file changes, which would break a run in a tree that others are editing,
 * and the figures belong to one known version of the code.
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

/**
 * Copies the tree into `dir`/tree with node_modules linked: for "worktree", every
 * file git tracks or would track (untracked but not ignored) as it is on disk;
 * otherwise the commit `tree` names (`git archive`).
 */
export function snapshotTree(dir: string, tree: string): string {
  const out = path.join(dir, "tree");
  mkdirSync(out, { recursive: true });
  // A directory (e.g. a `git worktree` with an experimental change) is copied like the working tree.
  const from = tree === "worktree" ? ROOT : existsSync(tree) && statSync(tree).isDirectory() ? path.resolve(tree) : null;
  if (from) {
    const files = execFileSync("git", ["ls-files", "-z", "--cached", "--others", "--exclude-standard"], { cwd: from, encoding: "utf8", maxBuffer: 64 * 1024 * 1024 })
      .split("\0")
      .filter(Boolean);
    for (const f of files) {
      if (!existsSync(path.join(from, f))) continue; // deleted in the working tree
      mkdirSync(path.dirname(path.join(out, f)), { recursive: true });
      cpSync(path.join(from, f), path.join(out, f));
    }
  } else {
    const tar = execFileSync("git", ["archive", "--format=tar", tree], { cwd: ROOT, maxBuffer: 512 * 1024 * 1024 });
    execFileSync("tar", ["-x", "-C", out], { input: tar, maxBuffer: 64 * 1024 * 1024 });
  }
  // node_modules: every file hard-linked (copied if /tmp is another filesystem), and the session
  // runs wrangler from here. wrangler's esbuild watches every file it bundles, its own middleware
  // templates in node_modules/wrangler included, and rebuilds (restarting the workers, failing the
  // requests in flight) when one changes; an `npm ci` or `npm install` in the checkout writes new
  // files, which leaves these links on the old ones. A symlinked node_modules did not: see
  // docs/performance.md ("At 200 in flight wrangler reloads the runtime").
  const nm = path.join(out, "node_modules");
  try {
    execFileSync("cp", ["-al", path.join(ROOT, "node_modules"), nm]);
  } catch {
    rmSync(nm, { recursive: true, force: true });
    cpSync(path.join(ROOT, "node_modules"), nm, { recursive: true, verbatimSymlinks: true });
  }
  return out;
}

export function writeOrchestratorConfig(dir: string, tree: string, vars: Record<string, string>, overrides: Record<string, unknown> = {}): string {
  const require = createRequire(import.meta.url);
  const wrangler = require(path.join(ROOT, "node_modules/wrangler/wrangler-dist/cli.js")) as {
    experimental_readRawConfig: (args: { config: string }) => { rawConfig: Record<string, any> };
  };
  const { rawConfig } = wrangler.experimental_readRawConfig({ config: path.join(tree, "wrangler.toml") });
  const config = structuredClone(rawConfig);
  config.main = path.join(tree, String(config.main));
  config.services = [...(config.services ?? []), { binding: BENCH_BINDING, service: "bitware-bench-worker" }];
  config.vars = { ...(config.vars ?? {}), ...vars };
  Object.assign(config, overrides);
  const out = path.join(dir, "orchestrator");
  mkdirSync(out, { recursive: true });
  const file = path.join(out, "wrangler.json");
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

export async function startBenchSession(opts: {
  vars: Record<string, string>;
  secrets: Record<string, string>;
  quiet?: boolean;
  tree?: string;
  /** Top-level fields replaced in the orchestrator's generated config, e.g. `{ observability: { enabled: false } }`. */
  overrides?: Record<string, unknown>;
  /** wrangler's local observability (traces of every invocation to its local store; X_LOCAL_OBSERVABILITY, on by default). */
  localObservability?: boolean;
  /** More workers' configs, relative to the tree (e.g. the Workflows implementation for `--vs-workflows`). */
  extraConfigs?: string[];
}): Promise<BenchSession> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "orch-bench-"));
  let session;
  let generatedConfig: string;
  try {
    const tree = snapshotTree(dir, opts.tree ?? "worktree");
    generatedConfig = writeOrchestratorConfig(dir, tree, opts.vars, opts.overrides);
    // A private dev registry: other `wrangler dev` sessions on the machine (tests,
    // npm start) register and unregister workers there, and every change makes a
    // session reload its workers, cancelling the requests in flight.
    process.env.WRANGLER_REGISTRY_PATH = path.join(dir, "registry");
    process.env.X_LOCAL_OBSERVABILITY = opts.localObservability === false ? "false" : "true";
    const configs = [
      path.join(tree, "bench/worker/gateway.wrangler.toml"),
      generatedConfig,
      path.join(tree, "bench/worker/wrangler.toml"),
      path.join(tree, "bench/worker/kam.wrangler.toml"),
      ...(opts.extraConfigs ?? []).map((c) => path.join(tree, c)),
    ];
    session = await startDevSession({ configs, secrets: opts.secrets, persistTo: path.join(dir, "state"), quiet: opts.quiet ?? true, readyTimeoutMs: 90_000, cwd: tree });
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
