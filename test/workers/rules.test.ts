import { describe, expect, it } from "vitest";
import { z } from "zod";
import {
  STAGE_TRANSITIONS,
  canMoveStage,
  lostGrantReaskAt,
  mergeProgress,
  nextPollInterval,
  retryDelayMs,
  shouldRetry,
} from "../../actors/stage-machine";
import { costOf } from "../../src/cost";
import { callJson } from "../../src/outbound";

/** A peer that answers one fixed response: a stand-in stage worker for the classification rules. */
const peer = (res: () => Response | Promise<Response>) => ({ fetch: async () => res() }) as unknown as Fetcher;
const ask = (fetcher: Fetcher, timeoutMs = 1000, maxAnswerBytes = 1024 * 1024) =>
  callJson({ fetcher, url: "https://w.internal/api/x", method: "GET", schema: z.object({ ok: z.boolean() }), timeoutMs, peer: "worker", maxAnswerBytes });

describe("outbound calls classify failures as transient or permanent", () => {
  it("retries 5xx, 408 and 429 (with Retry-After), not other 4xx", async () => {
    const r500 = await ask(peer(() => new Response("boom", { status: 500 })));
    expect(r500).toMatchObject({ ok: false, error: { code: "worker_http_500", retryable: true } });
    const r429 = await ask(peer(() => new Response("slow down", { status: 429, headers: { "retry-after": "3" } })));
    expect(r429).toMatchObject({ ok: false, error: { retryable: true, retryAfterMs: 3000 } });
    const r408 = await ask(peer(() => new Response("", { status: 408 })));
    expect(r408).toMatchObject({ ok: false, error: { retryable: true } });
    const r400 = await ask(peer(() => new Response("bad", { status: 400 })));
    expect(r400).toMatchObject({ ok: false, error: { code: "worker_http_400", retryable: false } });
  });

  it("gives up on a peer that does not answer within the timeout", async () => {
    const started = Date.now();
    const r = await ask({ fetch: (_u: string, init: RequestInit) => new Promise((_, reject) => init.signal?.addEventListener("abort", () => reject(init.signal?.reason))) } as unknown as Fetcher, 50);
    expect(r).toMatchObject({ ok: false, error: { code: "worker_timeout", retryable: true } });
    expect(Date.now() - started).toBeLessThan(5000);
  });

  it("treats a body that is not JSON as retryable and a body that breaks the schema as permanent", async () => {
    expect(await ask(peer(() => new Response("not json{")))).toMatchObject({ ok: false, error: { code: "worker_protocol_error", retryable: true } });
    expect(await ask(peer(() => Response.json({ ok: "yes" })))).toMatchObject({ ok: false, error: { code: "worker_protocol_error", retryable: false } });
    expect(await ask(peer(() => Response.json({ ok: true })))).toMatchObject({ ok: true, value: { ok: true } });
  });
});

describe("answers from peers are read with a size limit", () => {
  it("refuses an answer past maxAnswerBytes, and stops reading it there", async () => {
    // 64 chunks of 64 KiB (4 MiB) offered one by one, without Content-Length: the reader must stop on its own.
    let pulled = 0;
    const endless = () =>
      new Response(
        new ReadableStream<Uint8Array>({
          pull(controller) {
            if (++pulled > 64) return controller.close();
            controller.enqueue(new Uint8Array(64 * 1024).fill(32));
          },
        }),
      );
    const r = await ask(peer(endless), 1000, 256 * 1024);
    expect(r).toMatchObject({ ok: false, error: { code: "worker_answer_too_large", retryable: false } });
    expect(pulled).toBeLessThan(10);
    // A declared length over the limit is refused before reading anything.
    const declared = await ask(peer(() => new Response("{}", { headers: { "content-length": String(10 * 1024 * 1024) } })), 1000, 256 * 1024);
    expect(declared).toMatchObject({ ok: false, error: { code: "worker_answer_too_large" } });
    // Under the limit, the same answer path reads it whole.
    expect(await ask(peer(() => Response.json({ ok: true, pad: " ".repeat(200 * 1024) })), 1000, 256 * 1024)).toMatchObject({ ok: true, value: { ok: true } });
  });
});

describe("stage rules", () => {
  it("allows only the transitions in the table", () => {
    expect(canMoveStage("processing", "completed")).toBe(true);
    expect(canMoveStage("completed", "processing")).toBe(false);
    expect(canMoveStage("pending", "processing")).toBe(false);
    for (const terminal of ["completed", "failed", "cancelled"] as const) expect(STAGE_TRANSITIONS[terminal]).toEqual([]);
  });

  it("retries only transient failures with attempts left", () => {
    expect(shouldRetry({ code: "x", message: "", retryable: true }, 1, 3)).toBe(true);
    expect(shouldRetry({ code: "x", message: "", retryable: true }, 3, 3)).toBe(false);
    expect(shouldRetry({ code: "x", message: "", retryable: false }, 1, 3)).toBe(false);
  });

  it("backs off exponentially with full jitter, capped, and never sooner than Retry-After", () => {
    expect(retryDelayMs(1, 1000, 60_000, 0, () => 1)).toBe(1000);
    expect(retryDelayMs(3, 1000, 60_000, 0, () => 1)).toBe(4000);
    expect(retryDelayMs(10, 1000, 60_000, 0, () => 1)).toBe(60_000);
    expect(retryDelayMs(3, 1000, 60_000, 0, () => 0)).toBe(0);
    expect(retryDelayMs(1, 1000, 60_000, 5000, () => 0.5)).toBe(5000);
  });

  it("a refused call after a lost grant asks again now, but never inside a failed ledger call's backoff", () => {
    const now = 1_000_000;
    // No timer, or the lost notice's re-ask due later: now.
    expect(lostGrantReaskAt(null, 0, now)).toBe(now);
    expect(lostGrantReaskAt(now + 60_000, 0, now)).toBe(now);
    // Due already: left as it is.
    expect(lostGrantReaskAt(now - 5, 0, now)).toBeNull();
    // After a failed call its backoff stands; with no timer left (the backoff's call went out) it asks now.
    expect(lostGrantReaskAt(now + 2_000, 1, now)).toBeNull();
    expect(lostGrantReaskAt(null, 3, now)).toBe(now);
  });

  it("polls start short and double up to the cap; progress never goes backwards", () => {
    expect(nextPollInterval(null, 250, 5000)).toBe(250);
    expect(nextPollInterval(250, 250, 5000)).toBe(500);
    expect(nextPollInterval(4000, 250, 5000)).toBe(5000);
    expect(mergeProgress(60, 30)).toBe(60);
    expect(mergeProgress(60, 80)).toBe(80);
    expect(mergeProgress(60, 500)).toBe(100);
    expect(mergeProgress(60, undefined)).toBe(60);
  });
});

describe("costs", () => {
  const prices = { currency: "USD", per_unit: { "tokens:openai": 0.000002, "tokens:anthropic": 0.000003 } };
  it("turns usage from three stages across two pools into totals to the cent, per pool and per stage", () => {
    const cost = costOf(
      [
        { stage_id: "stage_1", usage: { "tokens:openai": 1_000_000 } },
        { stage_id: "stage_2", usage: { "tokens:openai": 500_000, "tokens:anthropic": 1_000_000 } },
        { stage_id: "stage_3", usage: { "tokens:anthropic": 2_345_678 } },
      ],
      prices,
    );
    expect(cost.by_pool).toEqual({ "tokens:openai": 3, "tokens:anthropic": 10.037034 });
    expect(cost.by_stage).toEqual({ stage_1: 2, stage_2: 4, stage_3: 7.037034 });
    expect(cost.total).toBe(13.037034);
    expect(cost.total.toFixed(2)).toBe("13.04");
  });

  it("keeps usage in an unpriced pool and flags it instead of dropping it", () => {
    const cost = costOf([{ stage_id: "stage_1", usage: { "tokens:openai": 10, "gpu:a100": 3 } }], prices);
    expect(cost.unpriced).toEqual(["gpu:a100"]);
    expect(cost.total).toBe(0.00002);
  });
});
