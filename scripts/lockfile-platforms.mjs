// Keeps `npm ci` working from our registry mirror: the mirror does not carry
// every platform build of workerd, so `npm install` leaves those optional
// packages out of package-lock.json and `npm ci` then calls the lockfile out of
// sync. This adds an entry (version, os, cpu, optional) for each platform
// package workerd names that the lockfile lacks; npm skips them on other
// platforms without fetching. Run after `npm install`: `node scripts/lockfile-platforms.mjs`.
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const lockPath = path.join(root, "package-lock.json");
const lock = JSON.parse(readFileSync(lockPath, "utf8"));
const workerd = lock.packages["node_modules/workerd"];
const PLATFORM = { "darwin-64": ["darwin", "x64"], "darwin-arm64": ["darwin", "arm64"], "linux-64": ["linux", "x64"], "linux-arm64": ["linux", "arm64"], "windows-64": ["win32", "x64"] };
let added = 0;
for (const [name, version] of Object.entries(workerd?.optionalDependencies ?? {})) {
  const key = `node_modules/${name}`;
  if (lock.packages[key]) continue;
  const [os, cpu] = PLATFORM[name.replace("@cloudflare/workerd-", "")] ?? [];
  if (!os) continue;
  lock.packages[key] = { version, cpu: [cpu], dev: true, license: "Apache-2.0", optional: true, os: [os], engines: { node: ">=16" } };
  added++;
}
if (added) {
  const [rootEntry, ...rest] = Object.entries(lock.packages);
  lock.packages = Object.fromEntries([rootEntry, ...rest.sort(([a], [b]) => a.localeCompare(b))]);
  writeFileSync(lockPath, `${JSON.stringify(lock, null, 2)}\n`);
}
console.log(added ? `package-lock.json: added ${added} platform entries for workerd` : "package-lock.json: complete");
