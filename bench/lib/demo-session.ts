import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { DEMO_CONFIGS, startDevSession } from "../../scripts/dev-session.mjs";
import { snapshotTree } from "./e2e-session";

/**
 * Secrets for a demo session, fixed per benchmark (`prefix`), never real: the
 * orchestrator's CALLBACK_SECRET, NOTIFY_SECRET and tokens, and the demo
 * granulator's own secret as WORKER_SECRET and under its name in WORKER_SECRETS.
 */
export function demoSecrets(prefix: string): Record<string, string> {
  const worker = `${prefix}-worker-secret-0123456789abcdef`;
  return {
    CALLBACK_SECRET: `${prefix}-callback-secret-0123456789abcdef0123`,
    WORKER_SECRETS: JSON.stringify({ "bitware-content-granulator": worker }),
    WORKER_SECRET: worker,
    KAM_TOKEN: `${prefix}-kam`,
    OPS_TOKEN: `${prefix}-ops`,
    NOTIFY_SECRET: `${prefix}-notify-secret-0123456789abcdef`,
  };
}

/**
 * The demo system (orchestrator, demo KAM, demo granulator) in `wrangler dev`,
 * run from a snapshot of the tree with fresh state, so edits elsewhere cannot
 * make wrangler reload the workers mid-run. `stop()` removes everything.
 */
export async function startDemoSession(opts: { secrets: Record<string, string>; vars?: Record<string, string> }) {
  const dir = mkdtempSync(path.join(os.tmpdir(), "orch-demo-"));
  try {
    const tree = snapshotTree(dir, "worktree");
    const session = await startDevSession({
      configs: DEMO_CONFIGS.map((c) => path.join(tree, c)),
      secrets: opts.secrets,
      persistTo: path.join(dir, "state"),
      vars: opts.vars,
      cwd: tree,
    });
    return {
      ...session,
      stop: async () => {
        await session.stop();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/** `--name value` and bare `--flag` arguments. */
export function flagArgs(argv = process.argv.slice(2)): Map<string, string> {
  const args = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith("--")) args.set(a.slice(2), argv[i + 1] !== undefined && !argv[i + 1].startsWith("--") ? argv[++i] : "true");
  }
  return args;
}

/** Runs a bench's main, exiting 1 on an error it did not handle. */
export function runMain(main: () => Promise<void>): void {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
