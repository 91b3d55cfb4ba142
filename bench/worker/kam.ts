/**
 * Benchmark KAM (`bitware-key-account-manager` in the bench session only):
 * serves `bench_three_stage` (and the fan-out workload's two templates below), three stages on `bitware-bench-worker`, each with
 * explicit `resources` so the ledger reserves exactly that and never estimates.
 * Read-only, no state; the orchestrator caches the template in KV after the
 * first fetch.
 */
import { BENCH_FAN_OUT, BENCH_FAN_OUT_SERIAL, BENCH_STAGES, BENCH_TEMPLATE, BENCH_WORKER } from "./shared";

const stages = Array.from({ length: BENCH_STAGES }, (_, i) => ({
  stage: i + 1,
  worker: BENCH_WORKER,
  template_ref: "bench_v1",
  action: `bench_${i + 1}`,
  timeout_ms: 60_000,
  max_attempts: 3,
  resources: { "tokens:openai": 10 },
}));

const TEMPLATE = { template_id: "mt_bench_001", template_name: BENCH_TEMPLATE, pipeline_stages: JSON.stringify(stages) };

/**
 * The fan-out workload (bench/fan-out.ts): stage 1 lists `parameters.bench_items` items, stage 2 runs
 * once per item, stage 3 merges. `bench_fan_out` runs up to 100 items at once; `bench_fan_out_serial`
 * the same items one after another (max_parallel 1), the straight line it is measured against.
 */
function fanOut(name: string, id: string, maxParallel: number) {
  const at = (n: number) => ({ stage: n, worker: BENCH_WORKER, template_ref: "bench_v1", action: `bench_${n}`, timeout_ms: 60_000, max_attempts: 3, resources: { "tokens:openai": 10 } });
  const pipeline = [at(1), { ...at(2), for_each: "/items", max_parallel: maxParallel }, at(3)];
  return { template_id: id, template_name: name, pipeline_stages: JSON.stringify(pipeline) };
}
const TEMPLATES = new Map(
  [TEMPLATE, fanOut(BENCH_FAN_OUT, "mt_bench_fan_out_001", 100), fanOut(BENCH_FAN_OUT_SERIAL, "mt_bench_fan_out_002", 1)].map((t) => [t.template_name, t]),
);

export default {
  async fetch(request: Request): Promise<Response> {
    const { pathname } = new URL(request.url);
    if (pathname === "/health") return Response.json({ status: "ok" });
    const found = request.method === "GET" && pathname.startsWith("/api/master-templates/") ? TEMPLATES.get(decodeURIComponent(pathname.slice(22))) : undefined;
    if (found) return Response.json(found);
    return Response.json({ error: { code: "not_found", message: `no route for ${request.method} ${pathname}` } }, { status: 404 });
  },
};
