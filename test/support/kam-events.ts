import { env } from "cloudflare:workers";
import type { ExecutionEvent } from "../../schemas/api";

/** What the demo KAM (demo/kam/events.ts) received for one execution: every delivery, and the events once each. */
export interface Received {
  receipts: { event_id: string; type: string; answered: number; t: number }[];
  events: ExecutionEvent[];
  /** The W3C traceparent each delivery carried, in arrival order. */
  traceparents: (string | null)[];
}

export async function received(executionId: string): Promise<Received> {
  const res = await env.KAM.fetch(`https://kam.internal/api/orchestrator/events?execution_id=${executionId}`);
  if (res.status !== 200) throw new Error(`demo KAM answered ${res.status}: ${await res.text()}`);
  return res.json();
}

/** Reads what the demo KAM received until the condition holds (delivery runs in the execution's background). */
export async function waitForEvents(executionId: string, done: (r: Received) => boolean, timeoutMs = 20_000): Promise<Received> {
  const deadline = Date.now() + timeoutMs;
  let last: Received | null = null;
  while (Date.now() < deadline) {
    last = await received(executionId);
    if (done(last)) return last;
    await scheduler.wait(25);
  }
  throw new Error(`events condition not reached within ${timeoutMs} ms; last: ${JSON.stringify(last)}`);
}
