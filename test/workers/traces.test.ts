import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { fromDataPoint } from "../../src/metrics";
import { acceptTrace, attemptSpanId, traceLogFields } from "../../src/trace";
import { JSON_HEADERS, KAM, OPS, call, ended, waitFor } from "../support/api";
import { TEST_WORKER_SECRETS } from "../support/constants";
import { waitForEvents } from "../support/kam-events";

/**
 * W3C trace context across the workers of a pipeline: the traceparent sent
 * with POST /execute is the parent of the execution's span, each stage
 * attempt is a span under it, every call to the stage worker carries the
 * attempt's span as its parent, and the worker (on the kit) sends it back on
 * its callbacks. The worker's job log (GET /api/jobs) records the
 * traceparent of every call it received and sent.
 */
type Job = { pending_callbacks: number; log: { what: string; status: number; detail: string | null }[] };

const TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN = "00f067aa0ba902b7";

async function start(body: Record<string, unknown>, headers: Record<string, string> = {}) {
  const res = await call("/execute", { method: "POST", headers: { ...KAM, ...JSON_HEADERS, ...headers }, body: JSON.stringify(body) });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

/** The worker's log for one stage, once it has sent everything it owed. */
async function jobLog(executionId: string, stageId: string): Promise<Job["log"]> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const res = await env.CONTENT_GRANULATOR.fetch(`https://granulator.internal/api/jobs/${executionId}?stageId=${stageId}`, {
      headers: { authorization: `Bearer ${TEST_WORKER_SECRETS["bitware-content-granulator"]}` },
    });
    const job = (await res.json()) as Job;
    if (job.pending_callbacks === 0 || Date.now() > deadline) return job.log;
    await scheduler.wait(25);
  }
}

describe("trace context", () => {
  it("continues the caller's trace: execution span, one span per attempt, every worker call and callback under it", async () => {
    const id = await start(
      { template_name: "course_creation", parameters: { topic: "Traces", targetAudience: "ops", steps: 2, step_ms: 20 }, client_id: "client_trace" },
      { traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01`, tracestate: "vendor=abc,other=1" },
    );
    const d: StatusDocument = await waitFor(id, ended);
    expect(d.status).toBe("completed");
    expect(d.trace_id).toBe(TRACE_ID);
    expect(d.parent_span_id).toBe(CALLER_SPAN);
    expect(d.span_id).toMatch(/^[0-9a-f]{16}$/);
    expect(d.span_id).not.toBe(CALLER_SPAN);
    const spans = new Set<string>([d.span_id!]);
    for (const s of d.stages) {
      expect(s.span_id).toBe(attemptSpanId({ span_id: d.span_id! }, s.stage_id, s.attempts));
      spans.add(s.span_id!);
      const expected = `00-${TRACE_ID}-${s.span_id}-01`;
      const log = await jobLog(id, s.stage_id);
      const traced = log.filter((e) => e.what.startsWith("traceparent:"));
      // Every call the worker got, and every callback it sent, carried the attempt's span as the parent.
      expect(traced.map((e) => e.what)).toEqual(expect.arrayContaining(["traceparent:handshake", "traceparent:process", "traceparent:callback:complete"]));
      for (const e of traced) expect(e.detail, e.what).toBe(expected);
      expect(log.find((e) => e.what === "tracestate:handshake")?.detail).toBe("vendor=abc,other=1");
    }
    // The execution's span and the three attempts' spans are distinct.
    expect(spans.size).toBe(4);
  });

  it("each stage attempt is a span in Analytics Engine: its trace, span, parent, worker, attempt, outcome and timings", async () => {
    const id = await start(
      { template_name: "quick_summary", parameters: { topic: "Span", targetAudience: "ops", steps: 1, step_ms: 5 }, client_id: "client_trace" },
      { traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01` },
    );
    const d = await waitFor(id, ended);
    const sink = (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK;
    const deadline = Date.now() + 10_000;
    let span: Record<string, string | number> | undefined;
    while (!span && Date.now() < deadline) {
      const points = ((await (await sink.fetch("http://sink/")).json()) as AnalyticsEngineDataPoint[]).map(fromDataPoint);
      span = points.find((p) => p.event === "stage_attempt" && p.execution_id === id);
      if (!span) await scheduler.wait(50);
    }
    expect(span).toMatchObject({
      trace_id: TRACE_ID,
      span_id: d.stages[0].span_id!,
      parent_span_id: d.span_id!,
      worker: "bitware-content-granulator",
      attempt: 1,
      outcome: "completed",
      processing_ms: d.stages[0].processing_ms,
    });
  });

  it("every item of a fan-out stage is an attempt span of its own, and its worker calls carry it", async () => {
    const id = await start(
      { template_name: "course_parallel", parameters: { topic: "Traces", modules: 3, steps: 1, step_ms: 0 }, client_id: "client_trace" },
      { traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01` },
    );
    const d = await waitFor(id, ended, 30_000);
    expect(d.status).toBe("completed");
    const res = await call(`/executions/${id}/stages/stage_2/items?limit=10`, { headers: OPS });
    const items = ((await res.json()) as { items: StatusDocument["stages"] }).items;
    expect(items.map((i) => i.stage_id)).toEqual(["stage_2.0", "stage_2.1", "stage_2.2"]);
    const spans = new Set<string>();
    for (const item of items) {
      expect(item.span_id).toBe(attemptSpanId({ span_id: d.span_id! }, item.stage_id, item.attempts));
      spans.add(item.span_id!);
      const log = await jobLog(id, item.stage_id);
      expect(log.find((e) => e.what === "traceparent:handshake")?.detail).toBe(`00-${TRACE_ID}-${item.span_id}-01`);
    }
    expect(spans.size).toBe(3);
  });

  it("event notifications to KAM carry the execution's span as their parent", async () => {
    const id = await start(
      { template_name: "quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_trace", notify: true },
      { traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01` },
    );
    const d = await waitFor(id, ended);
    const got = await waitForEvents(id, (r) => r.events.some((e) => e.type === "execution.completed"));
    expect(got.traceparents.length).toBe(got.receipts.length);
    expect(got.traceparents.length).toBeGreaterThan(0);
    for (const tp of got.traceparents) expect(tp).toBe(`00-${TRACE_ID}-${d.span_id}-01`);
  });

  it("starts a new trace without a traceparent, or with an invalid one", async () => {
    const variants: Record<string, string>[] = [{}, { traceparent: "00-zzzz-not-a-traceparent-01" }, { traceparent: `00-${"0".repeat(32)}-${CALLER_SPAN}-01` }];
    for (const headers of variants) {
      const id = await start({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 5 }, client_id: "client_trace" }, headers);
      const d = await waitFor(id, ended);
      expect(d.trace_id).toMatch(/^[0-9a-f]{32}$/);
      expect(d.trace_id).not.toBe("0".repeat(32));
      expect(d.parent_span_id).toBeNull();
      const log = await jobLog(id, "stage_1");
      expect(log.find((e) => e.what === "traceparent:handshake")?.detail).toBe(`00-${d.trace_id}-${d.stages[0].span_id}-01`);
    }
  });

  it("a cancel reaches the worker with the attempt's traceparent", async () => {
    const id = await start(
      { template_name: "quick_summary", parameters: { fault: { mode: "hang" } }, client_id: "client_trace" },
      { traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-00` },
    );
    const running = await waitFor(id, (d) => d.stages[0]?.status === "processing");
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
    const expected = `00-${TRACE_ID}-${running.stages[0].span_id}-00`;
    const deadline = Date.now() + 10_000;
    let cancel: string | null | undefined;
    while (cancel === undefined && Date.now() < deadline) {
      cancel = (await jobLog(id, "stage_1")).find((e) => e.what === "traceparent:cancel")?.detail;
      if (cancel === undefined) await scheduler.wait(25);
    }
    // The flags (not sampled here) are passed on as the caller sent them.
    expect(cancel).toBe(expected);
  });

  it("log lines carry the trace: the attempt's span for a line about an attempt, else the execution's", () => {
    const t = acceptTrace(`00-${TRACE_ID}-${CALLER_SPAN}-01`, null);
    expect(traceLogFields(t, { stage_id: "stage_2", attempt: 3, duration_ms: 5 })).toEqual({
      trace_id: TRACE_ID,
      span_id: attemptSpanId(t, "stage_2", 3),
      parent_span_id: t.span_id,
    });
    expect(traceLogFields(t, { status: "running" })).toEqual({ trace_id: TRACE_ID, span_id: t.span_id, parent_span_id: CALLER_SPAN });
    expect(traceLogFields(null, { status: "running" })).toEqual({});
  });
});

/**
 * `GET /executions/{id}/spans`: the spans the execution page's timeline is
 * drawn from. One per attempt, with the span id every call of that attempt
 * carried, its worker, and waiting, handshake and processing times that are
 * the status document's own (and the `stage_attempt` data point's).
 */
describe("the spans of an execution", () => {
  type Span = {
    stage_id: string;
    parent_stage_id: string | null;
    attempt: number;
    worker: string;
    span_id: string;
    parent_span_id: string;
    queued_at: string;
    granted_at: string | null;
    processing_at: string | null;
    ended_at: string | null;
    outcome: string | null;
    waiting_ms: number;
    handshake_ms: number;
    processing_ms: number;
  };
  type Spans = { execution_id: string; trace_id: string; span_id: string; spans: Span[]; truncated: boolean };
  const spansOf = async (id: string) => {
    const res = await call(`/executions/${id}/spans`, { headers: OPS });
    expect(res.status).toBe(200);
    return (await res.json()) as Spans;
  };
  const ms = (iso: string | null) => Date.parse(iso!);

  it("has one span per attempt with its worker and span id, and phases that are the status document's times", async () => {
    // Stage 2's first attempt fails (retryable), its second completes: four attempts over three stages.
    const id = await start({ template_name: "course_creation", parameters: { topic: "Spans", steps: 2, step_ms: 10, fault: { stage: 2, mode: "fail_retryable_once" } }, client_id: "client_spans" }, {
      traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01`,
    });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    expect(doc.stages.map((s) => s.attempts)).toEqual([1, 2, 1]);
    const s = await spansOf(id);
    expect(s).toMatchObject({ execution_id: id, trace_id: TRACE_ID, span_id: doc.span_id, truncated: false });
    expect(s.spans.map((x) => `${x.stage_id}#${x.attempt}:${x.outcome}`)).toEqual([
      "stage_1#1:completed",
      `stage_2#1:${doc.stages[1].last_error!.code}`,
      "stage_2#2:completed",
      "stage_3#1:completed",
    ]);
    const trace = { span_id: doc.span_id! };
    for (const x of s.spans) {
      const stage = doc.stages.find((st) => st.stage_id === x.stage_id)!;
      expect(x).toMatchObject({ worker: stage.worker, parent_stage_id: null, parent_span_id: doc.span_id, span_id: attemptSpanId(trace, x.stage_id, x.attempt) });
      // The three phases cover the attempt from its queueing to its end, in order.
      expect(x.waiting_ms + x.handshake_ms + x.processing_ms).toBe(ms(x.ended_at) - ms(x.queued_at));
      expect(x.handshake_ms).toBe(ms(x.processing_at) - ms(x.granted_at));
      expect(x.processing_ms).toBe(ms(x.ended_at) - ms(x.processing_at));
    }
    // The current attempt's span is the status document's; each stage's times are the sum of its attempts'.
    for (const stage of doc.stages) {
      const mine = s.spans.filter((x) => x.stage_id === stage.stage_id);
      expect(mine[mine.length - 1].span_id).toBe(stage.span_id);
      expect(mine.reduce((n, x) => n + x.waiting_ms, 0)).toBe(stage.waiting_ms);
      expect(mine.reduce((n, x) => n + x.processing_ms, 0)).toBe(stage.processing_ms);
      expect(mine[0].queued_at).toBe(stage.started_at);
      expect(mine[mine.length - 1].ended_at).toBe(stage.completed_at);
    }
    // The same spans as stage_attempt data points: ids, outcomes and handshake times.
    const deadline = Date.now() + 10_000;
    let points: Record<string, string | number>[] = [];
    while (points.length < 4 && Date.now() < deadline) {
      const res = await (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK.fetch("http://sink/");
      points = ((await res.json()) as AnalyticsEngineDataPoint[]).map(fromDataPoint).filter((p) => p.event === "stage_attempt" && p.execution_id === id);
      if (points.length < 4) await scheduler.wait(50);
    }
    expect(points.map((p) => [p.stage_id, p.attempt, p.span_id, p.outcome, p.handshake_ms])).toEqual(
      s.spans.map((x) => [x.stage_id, x.attempt, x.span_id, x.outcome, x.handshake_ms]),
    );
  });

  it("an attempt given back by a pause is a span with outcome paused; resume's attempt is the next span", async () => {
    const gate = await call("/resources/pools/gate:control", { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ kind: "concurrency", capacity: 1 }) });
    expect(gate.status).toBe(200);
    // A holds the gate's one slot (it hangs); B's stage 1 waits behind it.
    const a = await start({ template_name: "control_gated", parameters: { fault: { stage: 1, mode: "hang" } }, client_id: "client_spans" });
    await waitFor(a, (d) => d.stages[0]?.status === "processing");
    const b = await start({ template_name: "control_gated", parameters: { steps: 1, step_ms: 5 }, client_id: "client_spans" });
    await waitFor(b, (d) => d.stages[0]?.status === "waiting_resources");
    expect((await call(`/executions/${b}/pause`, { method: "POST", headers: OPS })).status).toBe(200);
    const paused = (await spansOf(b)).spans;
    expect(paused).toEqual([expect.objectContaining({ stage_id: "stage_1", attempt: 1, outcome: "paused", granted_at: null, handshake_ms: 0, processing_ms: 0 })]);
    expect(paused[0].waiting_ms).toBe(ms(paused[0].ended_at) - ms(paused[0].queued_at));
    expect((await call(`/executions/${b}/resume`, { method: "POST", headers: OPS })).status).toBe(200);
    expect((await call(`/executions/${a}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
    const doc = await waitFor(b, ended);
    expect(doc.status).toBe("completed");
    expect((await spansOf(b)).spans.map((x) => `${x.stage_id}#${x.attempt}:${x.outcome}`)).toEqual(["stage_1#1:paused", "stage_1#2:completed", "stage_2#1:completed"]);
  });

  it("has a span for each item of a fan-out, under its stage, and the open attempt of a running stage", async () => {
    const id = await start({ template_name: "course_parallel", parameters: { topic: "Items", modules: 3, steps: 1, step_ms: 5 }, client_id: "client_spans" });
    const doc = await waitFor(id, ended);
    expect(doc.status).toBe("completed");
    const s = await spansOf(id);
    const items = s.spans.filter((x) => x.parent_stage_id === "stage_2");
    expect(items.map((x) => x.stage_id).sort()).toEqual(["stage_2.0", "stage_2.1", "stage_2.2"]);
    for (const x of items) expect(x).toMatchObject({ attempt: 1, outcome: "completed", worker: "bitware-content-granulator" });
    // The fan-out stage itself runs no attempt of its own: its items do.
    expect(s.spans.filter((x) => x.stage_id === "stage_2")).toEqual([]);
    expect(s.spans.filter((x) => x.parent_stage_id === null).map((x) => x.stage_id).sort()).toEqual(["stage_1", "stage_3", "stage_4", "stage_5"]);
    expect(s.spans).toHaveLength(7);

    const hanging = await start({ template_name: "quick_summary", parameters: { fault: { mode: "hang" } }, client_id: "client_spans" });
    const running = await waitFor(hanging, (d) => d.stages[0]?.status === "processing");
    const open = (await spansOf(hanging)).spans;
    expect(open).toEqual([expect.objectContaining({ stage_id: "stage_1", attempt: 1, outcome: null, ended_at: null, span_id: running.stages[0].span_id })]);
    expect(open[0].processing_at).not.toBeNull();
    await call(`/executions/${hanging}/cancel`, { method: "POST", headers: OPS });
    const cancelled = (await spansOf(hanging)).spans;
    expect(cancelled).toEqual([expect.objectContaining({ stage_id: "stage_1", attempt: 1, outcome: "cancelled" })]);
    expect((await call("/executions/exec_1796131276048_nothingHereAtAll/spans", { headers: OPS })).status).toBe(404);
  });
});
