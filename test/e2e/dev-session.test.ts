import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDevSession } from "../../scripts/dev-session.mjs";
import { TEST_SECRETS } from "../support/constants";
import { SHARDINGS, expectRouted, startEach } from "./shardings";

/**
 * The same multi-worker `wrangler dev` session as `npm start` (orchestrator,
 * demo KAM, demo granulator), on a free port, driven over real HTTP: once with
 * one ledger object and once with 4 ledger shards (./shardings.ts), both at once.
 */
type Session = Awaited<ReturnType<typeof startDevSession>>;
let sessions: Session[] = [];
let stopAll: () => Promise<void> = async () => {};
const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}`, "content-type": "application/json" };

beforeAll(async () => {
  ({ sessions, stop: stopAll } = await startEach((s, persistTo) => startDevSession({ secrets: TEST_SECRETS, vars: s.vars, persistTo })));
});
afterAll(async () => {
  await stopAll();
});

describe.each(SHARDINGS.map((s, i) => ({ ...s, i })))("wrangler dev session (orchestrator + demo KAM + demo granulator), $label", (sharding) => {
  const url = () => sessions[sharding.i].url;

  async function execute(body: unknown, headers: Record<string, string> = KAM) {
    const res = await fetch(`${url()}/execute`, { method: "POST", headers, body: JSON.stringify(body) });
    return { res, body: (await res.json()) as Record<string, any> };
  }

  async function waitEnded(id: string, timeoutMs = 60_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const doc = (await (await fetch(`${url()}/executions/${id}`, { headers: KAM })).json()) as Record<string, any>;
      if (["completed", "failed", "cancelled"].includes(doc.status)) return doc;
      if (Date.now() > deadline) throw new Error(`not ended: ${JSON.stringify(doc)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  it("routes to its ledger shards, every one answering, each pool on its shard", async () => {
    await expectRouted(url(), sharding);
  });

  it("runs course_creation through every stage to completed with usage and a cost", async () => {
    const { res, body } = await execute({
      template_name: "course_creation",
      parameters: { topic: "React", targetAudience: "beginners" },
      client_id: "client_e2e",
    });
    expect(res.status).toBe(202);
    const doc = await waitEnded(body.execution_id);
    expect(doc.status, JSON.stringify(doc.error)).toBe("completed");
    expect(doc.stages).toHaveLength(3);
    for (const s of doc.stages) {
      expect(s.status).toBe("completed");
      expect(Object.values(s.usage as Record<string, number>).some((v) => v > 0)).toBe(true);
    }
    expect(doc.cost.total).toBeGreaterThan(0);
  });

  it("fails an unknown template with template_not_found", async () => {
    const { body } = await execute({ template_name: "nope_nothing", parameters: {}, client_id: "client_e2e" });
    const doc = await waitEnded(body.execution_id);
    expect(doc.status).toBe("failed");
    expect(doc.error.code).toBe("template_not_found");
  });

  it("answers bad input with 400 and a missing token with 401", async () => {
    const bad = await execute({ template_name: "course_creation", client_id: "c" });
    expect(bad.res.status).toBe(400);
    expect(bad.body.error.code).toBe("invalid_request");
    const unauth = await execute({ template_name: "course_creation", parameters: {}, client_id: "c" }, { "content-type": "application/json" });
    expect(unauth.res.status).toBe(401);
    expect(unauth.body.error.code).toBe("unauthorized");
  });
});
