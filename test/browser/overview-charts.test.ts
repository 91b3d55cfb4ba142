import { mkdtempSync, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { BrowserContext, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDevSession } from "../../scripts/dev-session.mjs";
import { MISSING, RESULTS, launchChromium, watchPage } from "../support/browser";
import { TEST_SECRETS } from "../support/constants";

/**
 * The charts on `/ui` and the waterfall on the execution page, in the system
 * Chromium over a `wrangler dev` session of their own (the queue sampler
 * samples every second there). A known workload of one client (three
 * completed executions, one failed, one cancelled) and a queue of two in
 * front of a pool of one slot: the numbers under each chart must be what the
 * API says (status documents, the ledger's /resources), and the waterfall
 * must have one bar per attempt with its worker and phases, as
 * /executions/{id}/spans and the status document say.
 */
const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}`, "content-type": "application/json" };
const OPS = { authorization: `Bearer ${TEST_SECRETS.OPS_TOKEN}`, "content-type": "application/json" };
const CLIENT = `client_charts_${Date.now()}`;
const QUEUE_CLIENT = `client_charts_queue_${Date.now()}`;
const POOL = "gate:series";
const WORKER = "bitware-content-granulator";

type Stage = { stage_id: string; status: string; worker: string; attempts: number; waiting_ms: number; processing_ms: number; started_at: string; completed_at: string | null; span_id: string | null };
type Doc = { execution_id: string; status: string; completed_at: string | null; cost: { total: number } | null; stages: Stage[] };
type Snapshot = { pools: { name: string; waiting: number }[] };

let session: Awaited<ReturnType<typeof startDevSession>> | undefined;
let context: BrowserContext | undefined;
const temps: string[] = [];
const problems: string[] = [];
const docs: Doc[] = [];
const queued: string[] = [];

async function get<T>(p: string, headers: Record<string, string> = OPS): Promise<T> {
  const res = await fetch(`${session!.url}${p}`, { headers });
  if (res.status !== 200) throw new Error(`${p}: ${res.status} ${await res.text()}`);
  return res.json() as Promise<T>;
}

async function start(body: Record<string, unknown>): Promise<string> {
  const res = await fetch(`${session!.url}/execute`, { method: "POST", headers: KAM, body: JSON.stringify(body) });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

async function until<T>(what: string, read: () => Promise<T>, done: (v: T) => boolean, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await read();
    if (done(v)) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not reached within ${timeoutMs} ms; last: ${JSON.stringify(v).slice(0, 2000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const ended = (d: Doc) => ["completed", "failed", "cancelled"].includes(d.status);
const waitEnded = (id: string) => until(`${id} ended`, () => get<Doc>(`/executions/${id}`), ended, 90_000);
const waiting = (s: Snapshot) => s.pools.find((p) => p.name === POOL)?.waiting;

function nearestRank(values: number[], q: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.ceil(q * sorted.length) - 1];
}

beforeAll(async () => {
  if (MISSING) return;
  const state = mkdtempSync(path.join(os.tmpdir(), "orch-charts-state-"));
  const profile = mkdtempSync(path.join(os.tmpdir(), "orch-chromium-"));
  temps.push(state, profile);
  // A state of its own (the charts count everything in it), sampling the queue every second.
  session = await startDevSession({ secrets: TEST_SECRETS, persistTo: state, vars: { TUNING: JSON.stringify({ queueSampleMs: 1000 }) } });
  context = await launchChromium(profile);

  // The workload: three completed, one failed (no binding for its worker), one cancelled while it runs.
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) ids.push(await start({ template_name: "quick_summary", parameters: { topic: `Charts ${i}`, steps: 2, step_ms: 20 }, client_id: CLIENT }));
  ids.push(await start({ template_name: "unbound_worker", parameters: {}, client_id: CLIENT }));
  const hanging = await start({ template_name: "quick_summary", parameters: { fault: { mode: "hang" } }, client_id: CLIENT });
  await until("hanging runs", () => get<Doc>(`/executions/${hanging}`), (d) => d.stages[0]?.status === "processing");
  expect((await fetch(`${session.url}/executions/${hanging}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
  ids.push(hanging);
  for (const id of ids) docs.push(await waitEnded(id));

  // A queue: one slot, three executions that hang on it; two wait.
  const put = await fetch(`${session.url}/resources/pools/${POOL}`, { method: "PUT", headers: OPS, body: JSON.stringify({ kind: "concurrency", capacity: 1 }) });
  expect(put.status).toBe(200);
  for (let i = 0; i < 3; i++) queued.push(await start({ template_name: "series_gated", parameters: { fault: { mode: "hang" } }, client_id: QUEUE_CLIENT }));
  await until("two wait for the gate", () => get<Snapshot>("/resources"), (s) => waiting(s) === 2);
}, 240_000);

afterAll(async () => {
  await context?.close().catch(() => {});
  await session?.stop();
  for (const t of temps) rmSync(t, { recursive: true, force: true });
});

const watch = (page: Page) => watchPage(page, problems);

/** The table under a chart, as rows of `data-*` of the row and `data-role -> data-value` of its cells. */
function table(page: Page, chart: string) {
  return page.locator(`#chart-${chart} table.numbers tbody tr`).evaluateAll((trs) =>
    trs.map((tr) => ({
      key: { ...(tr as HTMLElement).dataset },
      values: Object.fromEntries(Array.from(tr.querySelectorAll<HTMLElement>("td[data-role]")).map((td) => [td.dataset.role!, td.dataset.value === "null" ? null : Number(td.dataset.value)])),
    })),
  );
}

describe("charts on /ui", () => {
  it("draws the four charts, and the numbers under each are the API's for the workload", async () => {
    if (MISSING) throw new Error(MISSING);
    const page = await context!.newPage();
    watch(page);
    await page.goto(`${session!.url}/ui?client_id=${CLIENT}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();

    // Executions: each ended execution in the bucket of its completed_at, under its status.
    const expectedBuckets = (until: number) => {
      const since = until - 3_600_000;
      const m = new Map<string, Record<string, number>>();
      for (const d of docs) {
        const at = new Date(since + Math.floor((Date.parse(d.completed_at!) - since) / 60_000) * 60_000).toISOString();
        const row = m.get(at) ?? { completed: 0, failed: 0, cancelled: 0 };
        row[d.status] += 1;
        m.set(at, row);
      }
      return [...m.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([bucket, values]) => ({ key: { bucket }, values }));
    };
    await expect
      .poll(async () => {
        const until = await page.locator("#charts").getAttribute("data-until");
        return until ? { rows: await table(page, "executions"), expected: expectedBuckets(Date.parse(until)) } : null;
      }, { timeout: 30_000 })
      .toSatisfy((v) => v !== null && JSON.stringify(v.rows) === JSON.stringify(v.expected));
    expect(docs.map((d) => d.status).sort()).toEqual(["cancelled", "completed", "completed", "completed", "failed"]);

    // Cost per client: the status documents' costs, summed.
    const cost = await table(page, "cost");
    expect(cost.map((r) => r.key.client)).toEqual([CLIENT]);
    expect(cost[0].values.total).toBeCloseTo(docs.reduce((n, d) => n + (d.cost?.total ?? 0), 0), 12);

    // Latency per worker: nearest-rank p50/p95 of the three completed attempts, as the status documents time them.
    const stages = docs.filter((d) => d.status === "completed").flatMap((d) => d.stages);
    const phases = {
      waiting_ms: stages.map((s) => s.waiting_ms),
      handshake_ms: stages.map((s) => Date.parse(s.completed_at!) - Date.parse(s.started_at) - s.waiting_ms - s.processing_ms),
      processing_ms: stages.map((s) => s.processing_ms),
    };
    const latency = await table(page, "latency");
    expect(latency).toEqual([
      {
        key: { worker: WORKER },
        values: Object.fromEntries([
          ["attempts", 3],
          ...Object.entries(phases).flatMap(([k, v]) => [
            [`${k}-p50`, nearestRank(v, 0.5)],
            [`${k}-p95`, nearestRank(v, 0.95)],
          ]),
        ]),
      },
    ]);

    // Queue length: the sampler saw the two waiting in front of the gate, and every pool of the ledger has a row.
    const pools = (await get<Snapshot>("/resources")).pools.map((p) => p.name).sort();
    await expect.poll(async () => (await table(page, "queue")).find((r) => r.key.pool === POOL)?.values.max, { timeout: 20_000 }).toBe(2);
    expect((await table(page, "queue")).map((r) => r.key.pool).sort()).toEqual(pools);

    // Each chart is drawn: a canvas with a size, and one series per row of its numbers (two per worker for latency).
    type Drawn = { series: number; width: number; height: number; numbersBelow: boolean };
    const drawn: Record<string, Drawn> = await page.evaluate(() =>
      Object.fromEntries(
        Array.from(document.querySelectorAll<HTMLElement>(".chart")).map((c) => {
          const canvas = c.querySelector("canvas");
          const numbers = c.querySelector("table.numbers")!;
          return [
            c.dataset.chart,
            {
              series: Number(c.querySelector<HTMLElement>(".plot")!.dataset.series),
              width: canvas?.width ?? 0,
              height: canvas?.height ?? 0,
              // The numbers are a visible table under the canvas.
              numbersBelow: !!canvas && numbers.getBoundingClientRect().top >= canvas.getBoundingClientRect().bottom && numbers.querySelectorAll("tbody tr").length > 0,
            },
          ];
        }),
      ),
    );
    expect(Object.keys(drawn).sort()).toEqual(["cost", "executions", "latency", "queue"]);
    expect(drawn.executions.series).toBe(3);
    expect(drawn.latency.series).toBe(2);
    expect(drawn.queue.series).toBe(pools.length);
    expect(drawn.cost.series).toBe(1);
    for (const d of Object.values(drawn)) {
      expect(d.width * d.height).toBeGreaterThan(0);
      expect(d.numbersBelow).toBe(true);
    }
    const shot = path.join(RESULTS, "overview-charts.png");
    rmSync(shot, { force: true });
    await page.screenshot({ path: shot, fullPage: true });
    expect(statSync(shot).size).toBeGreaterThan(5_000);

    // The queue drains: the latest sample shows what /resources shows.
    for (const id of queued) expect((await fetch(`${session!.url}/executions/${id}/cancel`, { method: "POST", headers: OPS })).status).toBe(200);
    await until("the gate's queue is empty", () => get<Snapshot>("/resources"), (s) => waiting(s) === 0);
    await expect.poll(async () => (await table(page, "queue")).find((r) => r.key.pool === POOL)?.values.latest, { timeout: 20_000 }).toBe(0);

    // Another window: the same executions, in hour buckets.
    await page.locator("#c-window").selectOption("7d");
    await expect.poll(() => page.locator("#charts").getAttribute("data-window"), { timeout: 10_000 }).toBe("7d");
    const week = await table(page, "executions");
    const sum = (k: string) => week.reduce((n, r) => n + (r.values[k] ?? 0), 0);
    expect([sum("completed"), sum("failed"), sum("cancelled")]).toEqual([3, 1, 1]);
    expect(await page.locator("#charts").getAttribute("data-bucket-ms")).toBe("3600000");
    expect(problems).toEqual([]);
    await page.close();
  });
});

describe("the waterfall on the execution page", () => {
  it("has one bar per attempt with its worker, span and phases, as the spans and the status document say", async () => {
    if (MISSING) throw new Error(MISSING);
    // Stage 2 fails once (retryable) and completes on its second attempt: four attempts over three stages.
    const id = await start({ template_name: "course_creation", parameters: { topic: "Waterfall", steps: 3, step_ms: 100, fault: { stage: 2, mode: "fail_retryable_once" } }, client_id: CLIENT });
    const page = await context!.newPage();
    watch(page);
    await page.goto(`${session!.url}/ui/executions/${id}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();
    const doc = await waitEnded(id);
    expect(doc.status).toBe("completed");
    const spans = await get<{ spans: { stage_id: string; attempt: number; worker: string; span_id: string; outcome: string; waiting_ms: number; handshake_ms: number; processing_ms: number }[] }>(
      `/executions/${id}/spans`,
    );
    const bars = () =>
      page.locator("#wf-rows .wf-row").evaluateAll((rows) =>
        rows.map((r) => {
          const d = (r as HTMLElement).dataset;
          const seg = (phase: string) => Number(r.querySelector<HTMLElement>(`.wf-seg[data-phase=${phase}]`)?.dataset.ms);
          return { stage_id: d.stageId, attempt: Number(d.attempt), worker: d.worker, span_id: d.spanId, outcome: d.outcome, waiting_ms: seg("waiting"), handshake_ms: seg("handshake"), processing_ms: seg("processing") };
        }),
      );
    await expect.poll(bars, { timeout: 20_000 }).toEqual(spans.spans.map((s) => ({ stage_id: s.stage_id, attempt: s.attempt, worker: s.worker, span_id: s.span_id, outcome: s.outcome, waiting_ms: s.waiting_ms, handshake_ms: s.handshake_ms, processing_ms: s.processing_ms })));
    // As many bars per stage as the status document counts attempts, the last one with the stage's span.
    const drawn = await bars();
    for (const st of doc.stages) {
      const mine = drawn.filter((b) => b.stage_id === st.stage_id);
      expect(mine.map((b) => b.attempt)).toEqual(Array.from({ length: st.attempts }, (_, i) => i + 1));
      expect(mine.every((b) => b.worker === st.worker)).toBe(true);
      expect(mine[mine.length - 1].span_id).toBe(st.span_id);
    }
    expect(drawn.map((b) => b.outcome)).toEqual(["completed", spans.spans[1].outcome, "completed", "completed"]);
    expect(spans.spans[1].outcome).not.toBe("completed");
    // Three shades: the phases are drawn in different colours (opacities of the outcome's colour).
    const shades = await page.evaluate(() =>
      ["waiting", "handshake", "processing"].map((p) => getComputedStyle(document.querySelector(`.wf-bar.o-completed .wf-seg[data-phase=${p}]`)!).opacity),
    );
    expect(new Set(shades).size).toBe(3);
    const shot = path.join(RESULTS, "execution-waterfall.png");
    await page.locator("#waterfall").screenshot({ path: shot });
    expect(statSync(shot).size).toBeGreaterThan(2_000);
    expect(problems).toEqual([]);
    await page.close();
  });
});
