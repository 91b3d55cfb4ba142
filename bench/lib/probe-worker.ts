import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { startDevSession } from "../../scripts/dev-session.mjs";
import { workerdProcesses } from "./e2e-session";

/**
 * A probe worker for the object benches (object-memory, object-fsyncs): `source` (an ES module
 * exporting a SQLite Durable Object class `Probe`, bound as `PROBE`, and a default fetch handler)
 * written to a temporary folder and run in a `wrangler dev` session of its own, with a private dev
 * registry. `stop()` ends the session and removes the folder.
 */
export async function startProbe(name: string, source: string): Promise<{ url: string; runtime: number; stop: () => Promise<void> }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), `${name}-`));
  writeFileSync(path.join(dir, "index.js"), source);
  writeFileSync(
    path.join(dir, "wrangler.toml"),
    `name = "${name}-probe"
main = "index.js"
compatibility_date = "2026-11-01"

[[durable_objects.bindings]]
name = "PROBE"
class_name = "Probe"

[[migrations]]
tag = "v1"
new_sqlite_classes = ["Probe"]
`,
  );
  process.env.WRANGLER_REGISTRY_PATH = path.join(dir, "registry");
  const s = await startDevSession({ configs: [path.join(dir, "wrangler.toml")], persistTo: path.join(dir, "state") });
  const stop = async () => {
    await s.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  const runtime = workerdProcesses(s.pid).runtime;
  if (!runtime) {
    await stop();
    throw new Error("no workerd runtime process found");
  }
  return { url: s.url, runtime, stop };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
