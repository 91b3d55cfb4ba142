import { env } from "cloudflare:workers";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { DEFAULT_TUNING } from "../../src/config";
import { ApiError } from "../../src/http";
import { indexFor } from "../../src/index-routing";
import { askObject } from "../../src/outbound";
import { ended, startExecution, waitFor } from "../support/api";

/** Bounds on input (issue 11): what a peer answers, what a 503 says, how long a request_id is remembered. */

describe("answers from KAM are read with a size limit", () => {
  it("fails an execution whose template answer is over maxKamAnswerBytes with invalid_template", async () => {
    // The demo KAM pads this template's answer with 1 MiB; the template itself is the valid quick_summary.
    expect(DEFAULT_TUNING.maxKamAnswerBytes).toBeLessThan(1024 * 1024);
    const { res, body } = await startExecution({ template_name: "oversize_quick", parameters: { steps: 1, step_ms: 0 }, client_id: "client_bounds" });
    expect(res.status).toBe(202);
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("failed");
    expect(doc.error?.code).toBe("invalid_template");
    expect(doc.error?.message).toContain(`more than ${DEFAULT_TUNING.maxKamAnswerBytes} bytes`);
  });
});

describe("a 503 says what was unavailable, never an internal message", () => {
  it("turns an object's internal failure into 503 unavailable naming the object only", async () => {
    const t = Date.UTC(2026, 0, 7);
    const shard = indexFor(env, t);
    // A real object failing for real: the index object throws on a cursor it did not make.
    await shard.upsert({
      execution_id: `exec_${t}_boundsunavail01`,
      client_id: "client_bounds",
      template_name: "quick_summary",
      status: "queued",
      priority: "normal",
      created_at: t,
      updated_at: t,
      completed_at: null,
      error_code: null,
      cost_total: null,
      stages_total: 1,
      stages_completed: 0,
      version: 1,
    });
    try {
      await askObject(shard.query({ limit: 1, cursor: "garbage" }), 2_000, "the execution index (2026-01)");
      expect.unreachable("the object's failure was not turned into a 503");
    } catch (err) {
      expect(err).toBeInstanceOf(ApiError);
      const e = err as ApiError;
      expect([e.status, e.code]).toEqual([503, "unavailable"]);
      expect(e.message).toContain("the execution index (2026-01)");
      expect(e.message).not.toContain("invalid cursor");
    }
  });
});

describe("RequestRegistry entries expire", () => {
  const registry = (clientId: string) => env.REQUEST_REGISTRY.get(env.REQUEST_REGISTRY.idFromName(clientId));
  const request = (client: string, requestId: string) => ({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: client, request_id: requestId });

  it("arms a sweep at the first claim, deletes entries past requestIdRetentionMs, and keeps the younger ones", async () => {
    const client = `client_registry_${Date.now()}`;
    const first = await startExecution(request(client, "req-old"));
    expect(first.res.status).toBe(202);
    await waitFor(first.body.execution_id, ended);
    const stub = registry(client);
    const retention = DEFAULT_TUNING.requestIdRetentionMs;
    const { created, alarm } = await runInDurableObject(stub, async (_i, state) => ({
      created: Number(state.storage.sql.exec("SELECT created_at FROM requests WHERE request_id = 'req-old'").one().created_at),
      alarm: await state.storage.getAlarm(),
    }));
    expect(alarm).toBe(created + retention);

    // The same request again within the window: the same execution.
    const again = await startExecution(request(client, "req-old"));
    expect([again.res.status, again.body.execution_id]).toEqual([200, first.body.execution_id]);

    // Age the first entry past the retention (as if a week went by), add a young one, run the sweep.
    await runInDurableObject(stub, (_i, state) => {
      state.storage.sql.exec("UPDATE requests SET created_at = created_at - ? WHERE request_id = 'req-old'", retention + 1);
    });
    const young = await startExecution(request(client, "req-young"));
    expect(young.res.status).toBe(202);
    expect(await runDurableObjectAlarm(stub)).toBe(true);
    const left = await runInDurableObject(stub, async (_i, state) => ({
      ids: state.storage.sql.exec("SELECT request_id, created_at FROM requests ORDER BY request_id").toArray(),
      alarm: await state.storage.getAlarm(),
    }));
    expect(left.ids.map((r) => r.request_id)).toEqual(["req-young"]);
    expect(left.alarm).toBe(Number(left.ids[0].created_at) + retention);

    // Past the window the old request_id is forgotten: it starts a new execution.
    const late = await startExecution(request(client, "req-old"));
    expect(late.res.status).toBe(202);
    expect(late.body.execution_id).not.toBe(first.body.execution_id);
    await waitFor(late.body.execution_id, ended);
    await waitFor(young.body.execution_id, ended);
  });

  it("treats an entry past its retention as gone even before the sweep ran", async () => {
    const client = `client_registry_late_${Date.now()}`;
    const first = await startExecution(request(client, "req-1"));
    await waitFor(first.body.execution_id, ended);
    const stub = registry(client);
    await runInDurableObject(stub, (_i, state) => {
      state.storage.sql.exec("UPDATE requests SET created_at = created_at - ?", DEFAULT_TUNING.requestIdRetentionMs);
    });
    const late = await stub.claim("req-1", "another-body-hash", "exec_1764000000000_boundsregistry1");
    expect(late).toEqual({ outcome: "claimed", executionId: "exec_1764000000000_boundsregistry1" });
  });
});
