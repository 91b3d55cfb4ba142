import { execFileSync } from "node:child_process";
import path from "node:path";

/**
 * Builds the demo stand-ins into single scripts for the vitest plugin's
 * auxiliary workers (they take a built script, not a wrangler config).
 */
export default function setup(): void {
  const root = path.resolve(import.meta.dirname, "../..");
  for (const name of ["kam", "content-granulator"]) {
    execFileSync(
      process.execPath,
      [
        "scripts/wrangler.mjs",
        "deploy",
        "--dry-run",
        // Absolute: wrangler resolves a relative --outdir against the config's folder.
        "--outdir",
        path.join(root, `dist/test-workers/${name}`),
        "-c",
        `demo/${name}/wrangler.toml`,
      ],
      { cwd: root, stdio: ["ignore", "ignore", "inherit"] },
    );
  }
}
