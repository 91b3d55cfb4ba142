// `npm start`: creates .dev.vars from .dev.vars.example when missing (for the
// orchestrator and the demo granulator, which must share WORKER_SECRET), then
// runs the orchestrator and both stand-ins in one `wrangler dev` session.
import { spawn } from "node:child_process";
import { copyFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { DEMO_CONFIGS, ROOT } from "./dev-session.mjs";

const example = path.join(ROOT, ".dev.vars.example");
const main = path.join(ROOT, ".dev.vars");
if (!existsSync(main)) {
  copyFileSync(example, main);
  console.log("created .dev.vars from .dev.vars.example");
}
const secret = /^WORKER_SECRET=(.*)$/m.exec(readFileSync(main, "utf8"))?.[1];
const granulatorVars = path.join(ROOT, "demo/content-granulator/.dev.vars");
if (secret && !existsSync(granulatorVars)) writeFileSync(granulatorVars, `WORKER_SECRET=${secret}\n`);

const port = process.env.PORT ?? "8787";
const kam = /^KAM_TOKEN=(.*)$/m.exec(readFileSync(main, "utf8"))?.[1] ?? "<KAM_TOKEN>";
console.log(`
Orchestrator v2 on http://127.0.0.1:${port} (with demo KAM and bitware-content-granulator)
  curl -s -X POST http://127.0.0.1:${port}/execute -H 'authorization: Bearer ${kam}' -H 'content-type: application/json' \\
    -d '{"template_name":"course_creation","parameters":{"topic":"React","targetAudience":"beginners"},"client_id":"client_demo"}'
  curl -s http://127.0.0.1:${port}/executions/<execution_id> -H 'authorization: Bearer ${kam}'
`);
const args = ["scripts/wrangler.mjs", "dev", "--ip", "127.0.0.1", "--port", port];
for (const c of DEMO_CONFIGS) args.push("-c", c);
const child = spawn(process.execPath, args, { cwd: ROOT, stdio: "inherit" });
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => child.kill(sig));
child.on("exit", (code) => process.exit(code ?? 0));
