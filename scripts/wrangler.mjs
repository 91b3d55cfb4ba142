#!/usr/bin/env node
// Runs the project's pinned wrangler CLI on the Node this machine has.
// wrangler's bin stub refuses Node < 22, but its CLI bundle runs on Node 20
// (our CI exercises `dev`, `types` and `deploy --dry-run` with it), so we start
// the bundle directly instead of upgrading the machines' Node.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const cli = path.join(path.dirname(require.resolve("wrangler/package.json")), "wrangler-dist", "cli.js");

const child = spawn(process.execPath, ["--no-warnings", cli, ...process.argv.slice(2)], {
  stdio: "inherit",
  env: { WRANGLER_SEND_METRICS: "false", ...process.env },
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => child.kill(sig));
child.on("exit", (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
