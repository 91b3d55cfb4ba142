/**
 * Benchmark KAM (`bitware-key-account-manager` in the bench session only):
 * serves `bench_three_stage`, three stages on `bitware-bench-worker`, each with
 * explicit `resources` so the ledger reserves exactly that and never estimates.
 * Read-only, no state; the orchestrator caches the template in KV after the
 * first fetch.
 */
import { BENCH_STAGES, BENCH_TEMPLATE, BENCH_WORKER } from "./shared";

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

export default {
  async fetch(request: Request): Promise<Response> {
    const { pathname } = new URL(request.url);
    if (pathname === "/health") return Response.json({ status: "ok" });
    if (request.method === "GET" && pathname === `/api/master-templates/${BENCH_TEMPLATE}`) return Response.json(TEMPLATE);
    return Response.json({ error: { code: "not_found", message: `no route for ${request.method} ${pathname}` } }, { status: 404 });
  },
};
