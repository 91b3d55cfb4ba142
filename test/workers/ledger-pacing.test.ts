/**
 * Provider pacing: a rate-limit report lowers a rate pool's bucket and, with
 * `retry_after_ms`, pauses the pool for every execution (and no other pool)
 * until the time has passed; the snapshot shows `paused_until` and waiters say
 * `provider_backoff`. Also the worker kit's header mapping.
 */
import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { parseDurationMs, rateLimitsFrom } from "../../packages/worker-kit/index";
import { JSON_HEADERS, KAM, OPS, call, executionStub, mintToken, startExecution, status, waitFor } from "../support/api";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { attach, expectWithinCapacity, fresh, id, req } from "./ledger-support";

describe("provider pacing in the ledger", () => {
  it("retry_after_ms on one execution holds every execution's grants on that pool, and no others, until it has passed", async () => {
    const { ledger, clock, notices } = await fresh("pace-pause");
    await ledger.putPool("tok", { kind: "rate", capacity: 1000, refill_per_second: 100 });
    await ledger.putPool("gpu", { kind: "concurrency", capacity: 4 });
    const first = await ledger.reserve(req({ requirements: { tok: 10 } }));
    expect(first.status).toBe("granted");
    // The first execution's worker got a 429 with retry-after: 10 s.
    expect(await ledger.pace([{ pool: "tok", retry_after_ms: 10_000 }, { pool: "nope", retry_after_ms: 5 }])).toEqual({ applied: ["tok"], ignored: ["nope"] });
    const snap = await ledger.snapshot();
    expect(snap.pools.find((p) => p.name === "tok")).toMatchObject({ paused_until: clock.now + 10_000 });
    expect(snap.pools.find((p) => p.name === "gpu")?.paused_until).toBeUndefined();

    const others = [await ledger.reserve(req({ requirements: { tok: 10 } })), await ledger.reserve(req({ requirements: { tok: 1, gpu: 1 } }))];
    for (const w of others) expect(w).toMatchObject({ status: "waiting", waitingOn: { reason: "provider_backoff", pools: ["tok"] } });
    // A stage that does not need the paused pool is not held back.
    expect((await ledger.reserve(req({ requirements: { gpu: 1 } }))).status).toBe("granted");

    clock.now += 9_999;
    await runDurableObjectAlarm(ledger);
    for (const w of others) expect((await ledger.status(id(w))).state).toBe("waiting");
    // The pause survives a restart.
    await evictDurableObject(ledger);
    await attach(ledger, clock, undefined, notices);
    clock.now += 2;
    await runDurableObjectAlarm(ledger);
    for (const w of others) expect((await ledger.status(id(w))).state).toBe("granted");
    expect((await ledger.snapshot()).pools.find((p) => p.name === "tok")?.paused_until).toBeUndefined();
    await expectWithinCapacity(ledger);
  });

  it("remaining lowers the bucket (never raises it); remaining 0 with reset_ms pauses until the reset", async () => {
    const { ledger, clock } = await fresh("pace-remaining");
    await ledger.putPool("tok", { kind: "rate", capacity: 1000, refill_per_second: 1 });
    await ledger.pace([{ pool: "tok", remaining: 300 }]);
    expect((await ledger.snapshot()).pools.find((p) => p.name === "tok")).toMatchObject({ available: 300 });
    await ledger.pace([{ pool: "tok", remaining: 900 }]);
    expect((await ledger.snapshot()).pools.find((p) => p.name === "tok")).toMatchObject({ available: 300 });
    expect((await ledger.reserve(req({ requirements: { tok: 301 } }))).status).toBe("waiting");
    await ledger.pace([{ pool: "tok", remaining: 0, reset_ms: 4_000 }]);
    expect((await ledger.snapshot()).pools.find((p) => p.name === "tok")).toMatchObject({ available: 0, paused_until: clock.now + 4_000 });
  });

  it("refuses malformed reports with invalid_request", async () => {
    const { ledger } = await fresh("pace-bad");
    let message = "";
    try {
      await ledger.pace([{ pool: "Tok!", retry_after_ms: -1 }]);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toMatch(/^invalid_request: pace reports/);
  });
});

describe("worker kit: rateLimitsFrom", () => {
  const now = Date.parse("2026-12-01T10:00:00Z");
  it("maps OpenAI's headers", () => {
    const res = new Response(null, { headers: { "x-ratelimit-remaining-tokens": "1200", "x-ratelimit-reset-tokens": "6m0s" } });
    expect(rateLimitsFrom(res, "tokens:openai", now)).toEqual([{ pool: "tokens:openai", remaining: 1200, reset_ms: 360_000 }]);
    expect(parseDurationMs("1h2m3.5s")).toBe(3_723_500);
    expect(parseDurationMs("20ms")).toBe(20);
    expect(parseDurationMs("soon")).toBeUndefined();
  });
  it("maps Anthropic's headers and retry-after (seconds or a date)", () => {
    const res = new Response(null, {
      status: 429,
      headers: { "anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "2026-12-01T10:00:30Z", "retry-after": "7" },
    });
    expect(rateLimitsFrom(res, "tokens:anthropic", now)).toEqual([{ pool: "tokens:anthropic", remaining: 0, reset_ms: 30_000, retry_after_ms: 7_000 }]);
    const dated = new Response(null, { status: 429, headers: { "retry-after": "Tue, 01 Dec 2026 10:01:00 GMT" } });
    expect(rateLimitsFrom(dated, "p", now)).toEqual([{ pool: "p", retry_after_ms: 60_000 }]);
    expect(rateLimitsFrom(new Response("ok"), "p", now)).toEqual([]);
  });
});

/** A pool as GET /resources shows it. */
async function poolNamed(name: string): Promise<{ name: string; paused_until?: number; available: number }> {
  const snap = (await (await call("/resources", { headers: OPS })).json()) as { pools: { name: string; paused_until?: number; available: number }[] };
  return snap.pools.find((p) => p.name === name)!;
}

/** When the execution's retry timer is due (unix ms). */
function retryTimer(id: string): Promise<number> {
  return runInDurableObject(executionStub(id), (_i, st) => st.storage.sql.exec<{ due_at: number }>("SELECT due_at FROM timers WHERE name = 'retry'").one().due_at);
}

describe("provider pacing through a worker's callback", () => {
  it("a fail callback with retry_after_ms pauses the pool in the ledger and the stage retries no sooner", async () => {
    // Its own pool, so the pause cannot touch other tests' stages.
    expect((await call("/resources/pools/tokens:pace-e2e", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "rate", capacity: 1000, refill_per_second: 10 }) })).status).toBe(200);
    const { body } = await startExecution({ template_name: "fault_single", parameters: { steps: 1, step_ms: 0, fault: { mode: "hang" } }, client_id: "client_pacing" });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].status === "processing");
    const token = await mintToken({ executionId: id, stageId: "stage_1", attempt: 1 });
    const sentAt = Date.now();
    const res = await call(`/executions/${id}/stages/stage_1/fail`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, ...JSON_HEADERS },
      body: JSON.stringify({
        error: { code: "provider_rate_limited", message: "429 from the provider" },
        retryable: true,
        rate_limits: [{ pool: "tokens:pace-e2e", remaining: 0, retry_after_ms: 1_500 }],
      }),
    });
    expect(res.status).toBe(200);
    const pool = await poolNamed("tokens:pace-e2e");
    expect(pool.paused_until).toBeGreaterThanOrEqual(sentAt + 1_500);
    expect(pool.available).toBe(0);
    // The retry timer is at least the provider's retry-after away: the tests' generic backoff is at most
    // retryCapMs (200 ms); a retry-after is honoured up to 10x that cap (actors/stage-machine.ts).
    const retryAt = await retryTimer(id);
    expect(retryAt).toBeGreaterThanOrEqual(sentAt + 1_500);
    expect((await status(id)).stages[0]).toMatchObject({ status: "pending", attempts: 1, last_error: expect.objectContaining({ code: "provider_rate_limited" }) });
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  });
});

describe("provider pacing from the worker kit", () => {
  it("a provider's 429 goes out with the kit's fail callback (the stage retries after its retry-after, not the generic backoff) and later headers with its next callback", async () => {
    // Its own pool: full at 1,000 and refilling slowly, so what the reports did to it shows.
    expect((await call("/resources/pools/tokens:pace-kit", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "rate", capacity: 1000, refill_per_second: 1 }) })).status).toBe(200);
    const startedAt = Date.now();
    const { body } = await startExecution({
      template_name: "fault_single",
      // The tests' generic backoff is at most retryCapMs (200 ms); a retry-after is honoured up to 10x that cap.
      parameters: { steps: 3, step_ms: 50, fault: { mode: "provider_429_once", pool: "tokens:pace-kit", retry_after_ms: 2000 } },
      client_id: "client_pacing_kit",
    });
    const id = body.execution_id as string;
    const failed = await waitFor(id, (d) => d.stages[0].last_error?.code === "provider_rate_limited");
    expect(failed.stages[0]).toMatchObject({ status: "pending", attempts: 1 });
    // Only the kit's fail callback can have said so: the pool is paused for every execution...
    const paused = await poolNamed("tokens:pace-kit");
    expect(paused.paused_until).toBeGreaterThanOrEqual(startedAt + 2000);
    expect(paused.available).toBe(0);
    // ...and the stage's retry is the provider's retry-after away.
    const retryAt = await retryTimer(id);
    expect(retryAt).toBeGreaterThanOrEqual(startedAt + 2000);

    // The second attempt's provider call answers 200 with 777 tokens left: the next callback carries it,
    // and the ledger lowers the full bucket to it (refilling at 1 per second since).
    const done = await waitFor(id, (d) => d.status === "completed", 20_000);
    expect(done.stages[0].attempts).toBe(2);
    const pool = await poolNamed("tokens:pace-kit");
    expect(pool.paused_until).toBeUndefined();
    expect(pool.available).toBeGreaterThanOrEqual(777);
    expect(pool.available).toBeLessThan(800);
  });
});

describe("provider pacing from the worker kit's answer to a progress poll", () => {
  it("headers the kit holds go out with its poll answer, and the orchestrator lowers the pool from the poll before any callback carries them", async () => {
    expect((await call("/resources/pools/tokens:pace-poll", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "rate", capacity: 1000, refill_per_second: 1 }) })).status).toBe(200);
    const { body } = await startExecution({
      template_name: "fault_single",
      // Attempt 2's provider call answers 200 with 777 tokens left, then the stage sleeps a minute
      // before its first step: nothing calls the orchestrator back meanwhile, only polls reach the kit.
      parameters: { steps: 2, step_ms: 60_000, fault: { mode: "provider_429_once", pool: "tokens:pace-poll", retry_after_ms: 300 } },
      client_id: "client_pacing_poll",
    });
    const id = body.execution_id as string;
    await waitFor(id, (d) => d.stages[0].attempts === 2 && d.stages[0].status === "processing", 20_000);
    // Up to the first polls of attempt 2 (a loaded machine, files two at a time, stretches them), well inside the
    // stage's minute of silence; the pool is below 800 for 23 s after it is lowered (1 token a second from 777).
    const deadline = Date.now() + 30_000;
    let pool = await poolNamed("tokens:pace-poll");
    while (!(pool.available < 800) && Date.now() < deadline) {
      await scheduler.wait(50);
      pool = await poolNamed("tokens:pace-poll");
    }
    expect(pool.available).toBeGreaterThanOrEqual(777);
    expect(pool.available).toBeLessThan(800);
    // The kit's own log: attempt 2 sent no callback, so the report came with a poll answer.
    const secret = { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` };
    const job = (await (await env.CONTENT_GRANULATOR.fetch(`https://bitware-content-granulator.internal/api/jobs/${id}?stageId=stage_1`, { headers: secret })).json()) as {
      attempt: number;
      status: string;
      log: { what: string; attempt: number }[];
    };
    expect(job).toMatchObject({ attempt: 2, status: "processing" });
    expect(job.log.filter((e) => e.attempt === 2 && e.what.startsWith("callback:"))).toEqual([]);
    // And the poll answer itself carries it.
    const answer = (await (await env.CONTENT_GRANULATOR.fetch(`https://bitware-content-granulator.internal/api/progress/${id}?stageId=stage_1`, { headers: secret })).json()) as {
      rate_limits?: unknown;
    };
    expect(answer.rate_limits).toEqual([{ pool: "tokens:pace-poll", remaining: 777 }]);
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
  }, 90_000);
});
