import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { ended, startExecution, waitFor } from "../support/api";

/**
 * Costs end to end: three stages, two pools (tokens:openai and compute_ms),
 * every complete callback sent twice. The total must equal the usage each
 * stage's worker reported once, priced with the PRICES var, to the cent.
 */
describe("costs from settled usage", () => {
  it("prices three stages across two pools exactly once each, even when every callback is repeated", async () => {
    const { body } = await startExecution({
      template_name: "course_creation",
      parameters: { steps: 2, step_ms: 5, fault: { mode: "double_callback" } },
      client_id: "client_costs",
    });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");

    const prices = JSON.parse(env.PRICES as string) as { currency: string; per_unit: Record<string, number> };
    let expected = 0;
    let terms = 0;
    const pools = new Set<string>();
    for (const s of doc.stages) {
      const res = await env.CONTENT_GRANULATOR.fetch(`https://granulator.internal/api/progress/${doc.execution_id}?stageId=${s.stage_id}`, {
        headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` },
      });
      const reported = ((await res.json()) as { usage: Record<string, number> }).usage;
      expect(s.usage).toEqual(reported);
      for (const [pool, amount] of Object.entries(reported)) {
        pools.add(pool);
        expected += amount * prices.per_unit[pool];
        terms++;
      }
    }
    expect([...pools].sort()).toEqual(["compute_ms", "tokens:openai"]);
    expect(doc.cost?.currency).toBe(prices.currency);
    expect(doc.cost?.total.toFixed(2)).toBe(expected.toFixed(2));
    // Each stage's amount in each pool is priced in micro-units, rounded (src/cost.ts,
    // docs/ledger.md): at most half a micro-unit from the hand sum per term. compute_ms is
    // the work's elapsed time, so under load it lands off whole micro-units (14 ms is
    // 1.4); three such stages were 1.2e-6 off, past toBeCloseTo(expected, 6)'s 5e-7.
    expect(Math.abs((doc.cost?.total ?? 0) - expected)).toBeLessThanOrEqual(terms * 0.5e-6 + 1e-12);
    // Counting any stage twice would add at least its tokens once more.
    const smallestStage = Math.min(...doc.stages.map((s) => (s.usage?.["tokens:openai"] ?? 0) * prices.per_unit["tokens:openai"]));
    expect(Math.abs((doc.cost?.total ?? 0) - expected)).toBeLessThan(smallestStage);
  });
});
