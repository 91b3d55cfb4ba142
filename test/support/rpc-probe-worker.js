// A test-only auxiliary worker (vitest.config.ts) with two bindings to the
// orchestrator, declared exactly as a stage worker's and KAM's are:
// AS_WORKER (default entrypoint) and AS_KAM (entrypoint KamApi). POST
// { binding, method, arg } calls that method over RPC and answers what happened.
export default {
  async fetch(request, env) {
    const { binding, method, arg } = await request.json();
    try {
      const value = await env[binding][method](arg);
      return Response.json({ called: true, value });
    } catch (err) {
      return Response.json({ called: false, error: String(err instanceof Error ? err.message : err) });
    }
  },
};
