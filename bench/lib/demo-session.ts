import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { DEMO_CONFIGS, startDevSession } from "../../scripts/dev-session.mjs";
import { snapshotTree } from "./e2e-session";

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
