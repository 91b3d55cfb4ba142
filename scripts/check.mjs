#!/usr/bin/env node
// `npm run check`: what must hold before a deploy, with no network.
//  1. tsc --noEmit over tsconfig.json (Worker, objects, demo, workerd tests) and tsconfig.node.json (Node side);
//  2. biome: lint only (biome.json: recommended rules, formatter off);
//  3. worker-configuration.d.ts is what `npm run types` generates from wrangler.toml;
//  4. docs/openapi.json is what `npm run openapi` generates from the zod schemas, and
//     src/ui/vendor/uplot.ts what scripts/vendor-ui.mjs makes from the pinned uplot package;
//  5. `wrangler deploy --dry-run` bundles the orchestrator, and the bundle is at most 3 MB gzipped.
// Every step runs; the exit code is 1 if any failed. `--only name,name` runs some of them.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const BIN = (name) => path.join(ROOT, "node_modules", ".bin", name);
const MAX_GZIP_BYTES = 3 * 1024 * 1024;
const env = { ...process.env, WRANGLER_SEND_METRICS: "false", NO_COLOR: "1", FORCE_COLOR: "0" };

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: ROOT, env, stdio: "inherit" });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${path.basename(cmd)} ${args.join(" ")} exited with ${r.status ?? r.signal}`);
}

function filesUnder(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((d) => {
    const p = path.join(dir, d.name);
    return d.isDirectory() ? filesUnder(p) : [p];
  });
}

const steps = {
  tsc: () => {
    run(process.execPath, [path.join(ROOT, "node_modules/typescript/bin/tsc"), "--noEmit", "-p", "tsconfig.json"]);
    run(process.execPath, [path.join(ROOT, "node_modules/typescript/bin/tsc"), "--noEmit", "-p", "tsconfig.node.json"]);
  },
  lint: () => run(BIN("biome"), ["ci", "--colors=off", "."]),
  types: () => run(process.execPath, ["scripts/wrangler.mjs", "types", "--env-interface", "Env", "worker-configuration.d.ts", "--check"]),
  openapi: () => run(BIN("tsx"), ["scripts/openapi.ts", "--check"]),
  vendor: () => run(process.execPath, ["scripts/vendor-ui.mjs", "--check"]),
  bundle: () => {
    // Absolute: wrangler resolves a relative --outdir against the config's folder.
    const outdir = mkdtempSync(path.join(os.tmpdir(), "orch-bundle-"));
    try {
      run(process.execPath, ["scripts/wrangler.mjs", "deploy", "--dry-run", "--outdir", outdir, "-c", "wrangler.toml"]);
      const files = filesUnder(outdir).filter((f) => !f.endsWith(".map"));
      if (!files.length) throw new Error("wrangler wrote no bundle");
      const raw = files.reduce((n, f) => n + statSync(f).size, 0);
      const gz = files.reduce((n, f) => n + gzipSync(readFileSync(f), { level: 9 }).byteLength, 0);
      const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
      console.log(`bundle: ${files.length} file(s), ${kib(raw)}, ${kib(gz)} gzipped (limit ${kib(MAX_GZIP_BYTES)})`);
      if (gz > MAX_GZIP_BYTES) throw new Error(`the bundle is ${kib(gz)} gzipped, over the ${kib(MAX_GZIP_BYTES)} limit`);
    } finally {
      rmSync(outdir, { recursive: true, force: true });
    }
  },
};

const onlyArg = process.argv.indexOf("--only");
const selected = onlyArg > 0 ? process.argv[onlyArg + 1].split(",") : Object.keys(steps);
const failed = [];
for (const name of selected) {
  if (!steps[name]) throw new Error(`unknown step ${name}; steps: ${Object.keys(steps).join(", ")}`);
  const started = Date.now();
  console.log(`\n== check: ${name}`);
  try {
    steps[name]();
    console.log(`== check: ${name} ok (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  } catch (err) {
    failed.push(name);
    console.error(`== check: ${name} FAILED: ${err instanceof Error ? err.message : String(err)}`);
  }
}
if (failed.length) {
  console.error(`\ncheck failed: ${failed.join(", ")}`);
  process.exit(1);
}
console.log("\ncheck passed");
