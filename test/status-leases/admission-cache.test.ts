import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { ledgerForClient } from "../../src/ledger-routing";
import { JSON_HEADERS, OPS, call, startExecution } from "../support/api";

/**
 * Steady admissions reused by the front Worker (src/clients.ts, tuning
 * `admissionCacheMs`; 60 s in this project, vitest.config.ts, off in the
 * others): a start of a client with neither a monthly budget nor a start rate
 * asks the ledger only when its answer is not in the isolate's memory, and a
 * quota change made over HTTP through this isolate is seen at once.
 */
const MS = (JSON.parse(env.TUNING) as { admissionCacheMs: number }).admissionCacheMs;
const run = Math.random().toString(36).slice(2, 8);
const start = (client: string) =>
  startExecution({ template_name: "quick_summary", parameters: { topic: "Admission", targetAudience: "ops", steps: 1, step_ms: 5 }, client_id: client, priority: "high" });
const putQuotas = (client: string, quotas: Record<string, unknown>) =>
  call(`/clients/${client}/quotas`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify(quotas) });

describe("admission of a start", () => {
  it("a steady client's next start is admitted from the front Worker's memory; a quota change over HTTP is seen by the start after it", async () => {
    expect(MS).toBeGreaterThanOrEqual(60_000);
    const client = `client_steady_${run}`;
    expect((await start(client)).res.status).toBe(202);
    // Behind the front Worker's back: the client may now ask for at most `low`. Its remembered admission still answers.
    await ledgerForClient(env, client).putClientQuotas(client, { max_priority: "low" });
    expect((await start(client)).res.status).toBe(202);
    // The same change over HTTP drops what this isolate remembers: the ledger refuses the next one.
    expect((await putQuotas(client, { max_priority: "low" })).status).toBe(200);
    const refused = await start(client);
    expect(refused.res.status).toBe(403);
    expect(refused.body.error.code).toBe("priority_not_allowed");
  });

  it("a client with a start rate is asked every time: its second start within the minute is refused", async () => {
    const client = `client_rated_${run}`;
    expect((await putQuotas(client, { max_starts_per_minute: 1 })).status).toBe(200);
    expect((await start(client)).res.status).toBe(202);
    const second = await start(client);
    expect(second.res.status).toBe(429);
    expect(second.body.error.code).toBe("rate_limited");
  });
});
