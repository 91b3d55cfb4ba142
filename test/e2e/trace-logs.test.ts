import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDevSession } from "../../scripts/dev-session.mjs";
import { TEST_SECRETS } from "../support/constants";
import { SHARDINGS, startEach } from "./shardings";

/**
 * "Logs of one execution all carry its trace id", shown on the real output:
 * a `wrangler dev` session (orchestrator, demo KAM, demo granulator) runs an
 * execution started with a `traceparent`, and every JSON log line of its
 * stdout/stderr that names the execution must carry that trace id and a span
 * id: the attempt's span for a line about a stage attempt (its parent the
 * execution's span), else the execution's own. Once with one ledger object and
 * once with 4 ledger shards (./shardings.ts), both sessions at once.
 */
const TRACE_ID = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN = "b7ad6b7169203331";
const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}`, "content-type": "application/json" };

type Session = Awaited<ReturnType<typeof startDevSession>>;
let sessions: Session[] = [];
let stopAll: () => Promise<void> = async () => {};

beforeAll(async () => {
  // Log level "log": wrangler passes the workers' console output through (the default session keeps only warnings).
  ({ sessions, stop: stopAll } = await startEach((s, persistTo) => startDevSession({ secrets: TEST_SECRETS, quiet: false, vars: s.vars, persistTo })));
});
afterAll(async () => {
  await stopAll();
});

type Doc = { status: string; span_id: string; trace_id: string; stages: { stage_id: string; attempts: number; span_id: string }[] };

/** Every JSON object logged on a line of the session's output (wrangler may put a prefix before it). */
function jsonLines(text: string): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of text.split("\n")) {
    const at = line.indexOf('{"ts":');
    if (at < 0) continue;
    try {
      out.push(JSON.parse(line.slice(at)) as Record<string, unknown>);
    } catch {
      // A line cut by the output buffer; the ones that matter are whole.
    }
  }
  return out;
}

describe.each(SHARDINGS.map((s, i) => ({ ...s, i })))("structured logs of a wrangler dev session, $label", ({ i }) => {
  it("every line about an execution carries its trace_id and a span_id: the attempt's for an attempt, else the execution's", async () => {
    const session = sessions[i];
    const res = await fetch(`${session.url}/execute`, {
      method: "POST",
      headers: { ...KAM, traceparent: `00-${TRACE_ID}-${CALLER_SPAN}-01` },
      body: JSON.stringify({ template_name: "course_creation", parameters: { topic: "Logs", steps: 2, step_ms: 20 }, client_id: "client_logs" }),
    });
    expect(res.status).toBe(202);
    const id = ((await res.json()) as { execution_id: string }).execution_id;
    const deadline = Date.now() + 60_000;
    let doc: Doc;
    for (;;) {
      doc = (await (await fetch(`${session.url}/executions/${id}`, { headers: KAM })).json()) as Doc;
      if (["completed", "failed", "cancelled"].includes(doc.status)) break;
      if (Date.now() > deadline) throw new Error(`not ended: ${JSON.stringify(doc)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(doc.status).toBe("completed");
    expect(doc.trace_id).toBe(TRACE_ID);

    // The last lines (the execution's end, the index write) may still be on their way to the output.
    let lines: Record<string, unknown>[] = [];
    const logDeadline = Date.now() + 20_000;
    while (Date.now() < logDeadline) {
      lines = jsonLines(session.logs()).filter((l) => l.execution_id === id);
      if (lines.some((l) => l.event === "execution_status" && l.status === "completed")) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const events = new Set(lines.map((l) => String(l.event)));
    // The execution's life is in the output: created, each stage's moves and worker calls, the callbacks, the end.
    for (const e of ["execution_created", "stage_status", "worker_handshake", "callback_received", "execution_status"]) expect(events, `no ${e} line`).toContain(e);
    expect(lines.length).toBeGreaterThan(15);

    const attemptSpan = new Map(doc.stages.map((s) => [s.stage_id, s.span_id]));
    for (const l of lines) {
      const what = JSON.stringify(l);
      expect(l.trace_id, what).toBe(TRACE_ID);
      expect(l.span_id, what).toMatch(/^[0-9a-f]{16}$/);
      if (typeof l.stage_id === "string" && typeof l.attempt === "number" && l.attempt > 0) {
        // Every stage ran one attempt here: its span is the status document's.
        expect(l.span_id, what).toBe(attemptSpan.get(l.stage_id));
        if (l.event !== "callback_received") expect(l.parent_span_id, what).toBe(doc.span_id);
      } else {
        expect(l.span_id, what).toBe(doc.span_id);
        expect(l.parent_span_id, what).toBe(CALLER_SPAN);
      }
    }
  });
});
