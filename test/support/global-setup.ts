import { execFileSync } from "node:child_process";
import path from "node:path";
import type { TestProject } from "vitest/node";

/**
 * Builds the auxiliary workers (the demo stand-ins, for the `ledger-faults`,
 * `ledger-faults-shards`, `shards` and `shard-faults` projects the faulty ledger, for `ledger-faults` the faulty
 * store) into single scripts for the vitest plugin (it
 * takes a built script, not a wrangler config). Each project builds into its
 * own folder: projects start at once, and two builds must not share an outdir.
 */
export default function setup(project: TestProject): void {
  const root = path.resolve(import.meta.dirname, "../..");
  const configs: Record<string, string> = { kam: "demo/kam/wrangler.toml", "content-granulator": "demo/content-granulator/wrangler.toml" };
  if (["ledger-faults", "ledger-faults-shards", "shards", "shard-faults"].includes(project.name)) configs["faulty-ledger"] = "test/support/faulty-ledger/wrangler.toml";
  if (project.name === "ledger-faults") configs["faulty-store"] = "test/support/faulty-store/wrangler.toml";
  for (const [name, config] of Object.entries(configs)) {
    execFileSync(
      process.execPath,
      [
        "scripts/wrangler.mjs",
        "deploy",
        "--dry-run",
        // Absolute: wrangler resolves a relative --outdir against the config's folder.
        "--outdir",
        path.join(root, `dist/test-workers/${project.name}/${name}`),
        "-c",
        config,
      ],
      { cwd: root, stdio: ["ignore", "ignore", "inherit"] },
    );
  }
}
