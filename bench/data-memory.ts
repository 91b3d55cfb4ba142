/**
 * `npm run bench:data-memory`: how much memory moving a large payload through
 * a pipeline costs the runtime. Runs `data_pipeline` (three `blob` stages of
 * the demo granulator) with a 30 MB last stage through `wrangler dev`, samples
 * the workerd runtime's resident memory every 10 ms, and reports the peak
 * above the baseline taken after a small warm-up pipeline. The runtime hosts
 * the orchestrator *and* the granulator (which makes the 30 MB and uploads
 * them), so the figure is an upper bound for the orchestrator's share.
 *
 *   npm run bench:data-memory -- [--mb 30] [--runs 3]
 */
import os from "node:os";
import { demoSecrets, flagArgs, runMain, startDemoSession } from "./lib/demo-session";
import { workerdProcesses } from "./lib/e2e-session";
import { RssSampler, memoryOf } from "./lib/proc-stats";

const args = flagArgs();
const MB = Number(args.get("mb") ?? 30);
const RUNS = Number(args.get("runs") ?? 3);
const SECRETS = demoSecrets("mem");
const KAM = { authorization: `Bearer ${SECRETS.KAM_TOKEN}`, "content-type": "application/json" };
const MiB = 1024 * 1024;

async function run(url: string, sizes: Record<string, number>): Promise<{ status: string; ms: number; bytes: number }> {
  const started = Date.now();
  const res = await fetch(`${url}/execute`, {
    method: "POST",
    headers: KAM,
    body: JSON.stringify({ template_name: "data_pipeline", parameters: { steps: 1, step_ms: 0, output_bytes: sizes }, client_id: "bench_memory" }),
  });
  const { execution_id } = (await res.json()) as { execution_id: string };
  const deadline = Date.now() + 180_000;
  for (;;) {
    const r = await fetch(`${url}/executions/${execution_id}`, { headers: KAM });
    const doc = r.ok ? ((await r.json()) as { status: string }) : { status: "unknown" };
    if (["completed", "failed", "cancelled"].includes(doc.status) || Date.now() > deadline) {
      // Read the deliverable back as a client would, streamed.
      let bytes = 0;
      if (doc.status === "completed") {
        const content = await fetch(`${url}/executions/${execution_id}/result/content`, { headers: KAM });
        for await (const chunk of content.body as unknown as AsyncIterable<Uint8Array>) bytes += chunk.byteLength;
      }
      return { status: doc.status, ms: Date.now() - started, bytes };
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function main() {
  const session = await startDemoSession({
    secrets: SECRETS,
    vars: { LOG_LEVEL: "error" },
  });
  try {
    const { runtime } = workerdProcesses(session.pid);
    if (!runtime) throw new Error("could not tell the workerd runtime process");
    await run(session.url, { stage_1: 100, stage_2: 200_000, stage_3: 2 * MiB });
    const results: { run: number; status: string; ms: number; bytes: number; baseline_mib: number; peak_mib: number; peak_above_baseline_mib: number }[] = [];
    for (let i = 1; i <= RUNS; i++) {
      await new Promise((r) => setTimeout(r, 2000));
      const baseline = memoryOf(runtime)?.rss ?? Number.NaN;
      const sampler = new RssSampler([runtime], 10).start();
      const r = await run(session.url, { stage_1: 100, stage_2: 200_000, stage_3: MB * 1_000_000 });
      sampler.stop();
      const peak = sampler.peak(runtime);
      results.push({
        run: i,
        ...r,
        baseline_mib: +(baseline / MiB).toFixed(1),
        peak_mib: +(peak / MiB).toFixed(1),
        peak_above_baseline_mib: +((peak - baseline) / MiB).toFixed(1),
      });
    }
    console.table(results);
    const worst = Math.max(...results.map((r) => r.peak_above_baseline_mib));
    const report = { bench: "data-memory", payload_mb: MB, runs: results, worst_peak_above_baseline_mib: worst, payload_mib: +((MB * 1_000_000) / MiB).toFixed(1), cores: os.cpus().length, node: process.version };
    console.log(`peak runtime memory above baseline while moving ${MB} MB: ${worst} MiB (payload ${report.payload_mib} MiB)`);
    console.log(JSON.stringify(report));
    if (results.some((r) => r.status !== "completed" || r.bytes !== MB * 1_000_000)) process.exitCode = 1;
  } finally {
    await session.stop();
  }
}

runMain(main);
