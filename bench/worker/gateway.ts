/**
 * Benchmark gateway, the primary worker of the bench session: `wrangler dev`
 * exposes only the first config's worker on its port, so this worker forwards
 * `/bench/*` to the bench worker, `/wf/*` to the Workflows implementation
 * (bench/worker/workflows.ts) and every other path to the orchestrator, all
 * through service bindings. The orchestrated run and the floor run both
 * pay this one in-process hop per request from the bench script.
 */
interface Fetcher {
  fetch(input: Request | string, init?: RequestInit): Promise<Response>;
}
interface GatewayEnv {
  ORCHESTRATOR: Fetcher;
  BENCH: Fetcher;
  /** The Workflows implementation (--vs-workflows sessions only). */
  WORKFLOWS: Fetcher;
}

export default {
  fetch(request: Request, env: GatewayEnv): Promise<Response> {
    const { pathname } = new URL(request.url);
    const target = pathname.startsWith("/bench/") ? env.BENCH : pathname.startsWith("/wf/") ? env.WORKFLOWS : env.ORCHESTRATOR;
    return target.fetch(request);
  },
};
