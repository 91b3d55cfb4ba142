// `npm start`: creates .dev.vars from .dev.vars.example when missing (and adds
// the example's keys an older .dev.vars lacks), then runs the orchestrator and
// both stand-ins in one `wrangler dev` session. The orchestrator reads .dev.vars;
// the demo granulator (whose WORKER_SECRET must match its entry in
// WORKER_SECRETS) gets the same values through the process environment.
import { spawn } from "node:child_process";
import { appendFileSync, copyFileSync, existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { DEMO_CONFIGS, ROOT } from "./dev-session.mjs";

const example = path.join(ROOT, ".dev.vars.example");
const main = path.join(ROOT, ".dev.vars");
if (!existsSync(main)) {
  copyFileSync(example, main);
  console.log("created .dev.vars from .dev.vars.example");
}
const readVars = (file) =>
  Object.fromEntries(
    readFileSync(file, "utf8")
      .split("\n")
      .map((l) => /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(l.trim()))
      .filter(Boolean)
      .map((m) => [m[1], m[2]]),
  );
const defaults = readVars(example);
const added = Object.keys(defaults).filter((k) => !(k in readVars(main)));
if (added.length) {
  appendFileSync(main, `\n${added.map((k) => `${k}=${defaults[k]}`).join("\n")}\n`);
  console.log(`added ${added.join(", ")} to .dev.vars from .dev.vars.example`);
}
const secrets = readVars(main);

const port = process.env.PORT ?? "8787";
const kam = secrets.KAM_TOKEN ?? "<KAM_TOKEN>";
console.log(`
Orchestrator v2 on http://127.0.0.1:${port} (with demo KAM and bitware-content-granulator)
  curl -s -X POST http://127.0.0.1:${port}/execute -H 'authorization: Bearer ${kam}' -H 'content-type: application/json' \\
    -d '{"template_name":"course_creation","parameters":{"topic":"React","targetAudience":"beginners"},"client_id":"client_demo"}'
  curl -s http://127.0.0.1:${port}/executions/<execution_id> -H 'authorization: Bearer ${kam}'
`);
const args = ["scripts/wrangler.mjs", "dev", "--ip", "127.0.0.1", "--port", port];
for (const c of DEMO_CONFIGS) args.push("-c", c);
const child = spawn(process.execPath, args, { cwd: ROOT, stdio: "inherit", env: { ...process.env, ...secrets } });
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => child.kill(sig));
child.on("exit", (code) => process.exit(code ?? 0));
