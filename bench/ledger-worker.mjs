// The ledger benchmark's worker, bundled by bench/ledger.mjs together with
// actors/resource-ledger.ts and run in local workerd.
//
// GET /run?target=ledger|clients|noop&pairs=N&concurrency=C&object=NAME runs N
// reserve+settle pairs with C in flight against one Durable Object and answers
// the timings. `clients` is `ledger` with each reserve naming one of 100 clients with quotas. `noop` makes the same two calls, with the same arguments, to an
// object whose methods do nothing: the RPC ceiling of this machine.
//
// (Plain JS: the Node-side type check, tsconfig.node.json, covers bench/ and
// must not pull the Worker code in.)
import { DurableObject } from "cloudflare:workers";

/** Same method names and argument shapes as the ledger, no work, no writes. */
export class NoopObject extends DurableObject {
  async reserve(req) {
    return { status: "granted", reservationId: `${req.executionId}:${req.stageId}:${req.attempt}`, expiresAt: 0, requirements: {} };
  }
  async settle(_id, _usage, _durationMs) {
    return { ok: true, state: "settled", unknownPools: [] };
  }
}

/** Receives grant notices (none are expected: the bench pools never make anyone wait). */
export class Execution extends DurableObject {
  async onGrant(_notice) {}
}

let runCounter = 0;
const CLIENTS = 100;

function percentile(sorted, p) {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    if (url.pathname !== "/run") return new Response("not found", { status: 404 });
    const t = url.searchParams.get("target");
    const target = t === "noop" ? "noop" : t === "clients" ? "clients" : "ledger";
    const pairs = Math.min(1_000_000, Number(url.searchParams.get("pairs") ?? 1000));
    const concurrency = Math.max(1, Math.min(1024, Number(url.searchParams.get("concurrency") ?? 32)));
    const object = url.searchParams.get("object") ?? "bench";
    const ns = target === "noop" ? env.NOOP : env.RESOURCE_LEDGER;
    const stub = ns.get(ns.idFromName(object));
    // `clients`: every reserve names one of CLIENTS clients, each with quotas that are checked on every grant
    // (running stages, a per-client rate bucket, a monthly budget at the price table, a weight) but do not bind.
    if (target === "clients") {
      for (let k = 0; k < CLIENTS; k++) {
        await stub.putClientQuotas(`client_${k}`, {
          max_running_stages: 10_000,
          rate: { "tokens:bench": { per_minute: 1e12 } },
          monthly_budget: 1e12,
          weight: 1 + (k % 100),
        });
      }
    }
    const run = ++runCounter;
    const latencies = new Array(pairs);
    let next = 0;
    let errors = 0;
    let firstError;
    const started = Date.now();
    async function lane() {
      for (;;) {
        const i = next++;
        if (i >= pairs) return;
        const t0 = Date.now();
        try {
          const r = await stub.reserve({
            executionId: `exec_1700000000000_r${String(run).padStart(4, "0")}n${String(i).padStart(10, "0")}`,
            stageId: "stage_1",
            attempt: 1,
            priority: "normal",
            requirements: { "tokens:bench": 100 },
            leaseMs: 60_000,
            worker: "bench",
            ...(target === "clients" ? { clientId: `client_${i % CLIENTS}` } : {}),
          });
          if (r.status !== "granted") throw new Error(`reserve answered ${r.status}`);
          const s = await stub.settle(r.reservationId, { "tokens:bench": 80 }, 5);
          if (!s.ok) throw new Error("settle not ok");
        } catch (err) {
          errors++;
          firstError ??= String(err);
        }
        latencies[i] = Date.now() - t0;
      }
    }
    await Promise.all(Array.from({ length: concurrency }, () => lane()));
    const elapsedMs = Date.now() - started;
    latencies.sort((a, b) => a - b);
    const mean = latencies.reduce((a, b) => a + b, 0) / Math.max(1, pairs);
    return Response.json({
      target,
      pairs,
      concurrency,
      elapsedMs,
      errors,
      firstError,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      meanMs: mean,
    });
  },
};
