import { mkdtempSync, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { BrowserContext, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDevSession } from "../../scripts/dev-session.mjs";
import type { ClientDocument } from "../../schemas/clients";
import type { LedgerSnapshot } from "../../schemas/ledger";
import type { ResourcesDocument } from "../../schemas/resources";
import type { StatusDocument } from "../../schemas/api";
import { MISSING, RESULTS, launchChromium, watchPage } from "../support/browser";
import { TEST_SECRETS } from "../support/constants";

/**
 * `/ui/clients` and `/ui/resources` in the system Chromium, against a real
 * `wrangler dev` session on a fresh state: a client with quotas has one stage
 * running and two waiting on a one-slot worker pool, and a provider's 429
 * paused another pool. Every number the pages show is read back from the API
 * (`GET /clients`, `GET /resources`) and must match; the pages follow a change
 * (a cancel frees the slot) without a reload; the execution page shows a
 * waiting stage's `waiting_on`. Screenshots go to test-results/.
 */
const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}`, "content-type": "application/json" };
const OPS = { authorization: `Bearer ${TEST_SECRETS.OPS_TOKEN}`, "content-type": "application/json" };
const WORKER_POOL = "worker:bitware-content-granulator";
const PAUSED_POOL = "tokens:ui-pages";
const CLIENT = "client_pages";

let session: Awaited<ReturnType<typeof startDevSession>> | undefined;
let context: BrowserContext | undefined;
const temps: string[] = [];
const problems: string[] = [];


beforeAll(async () => {
  if (MISSING) return;
  const state = mkdtempSync(path.join(os.tmpdir(), "orch-pages-state-"));
  const profile = mkdtempSync(path.join(os.tmpdir(), "orch-chromium-"));
  temps.push(state, profile);
  // A state of its own: the pool resized here must not outlive the test.
  session = await startDevSession({ secrets: TEST_SECRETS, persistTo: state });
  context = await launchChromium(profile);
});

afterAll(async () => {
  await context?.close().catch(() => {});
  await session?.stop();
  for (const t of temps) rmSync(t, { recursive: true, force: true });
});

async function api<T>(p: string, init: RequestInit = {}): Promise<T> {
  const res = await fetch(`${session!.url}${p}`, { headers: OPS, ...init });
  if (!res.ok) throw new Error(`${init.method ?? "GET"} ${p}: ${res.status} ${await res.text()}`);
  return (await res.json()) as T;
}

async function start(template_name: string, parameters: Record<string, unknown>): Promise<string> {
  const res = await fetch(`${session!.url}/execute`, { method: "POST", headers: KAM, body: JSON.stringify({ template_name, parameters, client_id: CLIENT }) });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

async function until<T>(read: () => Promise<T>, done: (v: T) => boolean, what: string, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  while (Date.now() < deadline) {
    last = await read();
    if (done(last)) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`${what} not reached; last: ${JSON.stringify(last)}`);
}

async function signIn(page: Page, url: string): Promise<void> {
  watchPage(page, problems);
  const res = await page.goto(url);
  expect(res?.status()).toBe(200);
  await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
  await page.locator("#signin").click();
}

/**
 * What the page shows equals `expected` (computed from an API read): waits for
 * the page's next polls to show it, re-reading the API while the two differ,
 * since both move on their own.
 */
async function pageMatchesApi<T>(page: Page, shown: () => Promise<T>, fromApi: () => Promise<T>, what: string): Promise<T> {
  const deadline = Date.now() + 30_000;
  let seen: T | undefined;
  let want: T | undefined;
  while (Date.now() < deadline) {
    want = await fromApi();
    seen = await shown();
    if (JSON.stringify(seen) === JSON.stringify(want)) return want;
    await page.waitForTimeout(250);
  }
  throw new Error(`${what}: the page shows ${JSON.stringify(seen)}, the API ${JSON.stringify(want)}`);
}

async function shoot(page: Page, name: string): Promise<void> {
  const file = path.join(RESULTS, name);
  rmSync(file, { force: true });
  await page.screenshot({ path: file, fullPage: true });
  expect(statSync(file).size).toBeGreaterThan(5_000);
}

describe("operator pages for clients and resources in Chromium", () => {
  it("show the quotas, usage, pools, waiters and a provider pause as the API has them, live", async () => {
    if (MISSING) throw new Error(MISSING);
    await api(`/clients/${CLIENT}/quotas`, {
      method: "PUT",
      body: JSON.stringify({ max_running_stages: 2, monthly_budget: 50, weight: 3, max_priority: "high", rate: { "tokens:openai": { per_minute: 100000 } }, max_starts_per_minute: 100 }),
    });
    // A provider 429 on a pool of its own pauses it for a minute (the stage's retry waits as long).
    await api(`/resources/pools/${PAUSED_POOL}`, { method: "PUT", body: JSON.stringify({ kind: "rate", capacity: 5000, refill_per_second: 10 }) });
    const throttled = await start("fault_single", { steps: 1, step_ms: 0, fault: { mode: "provider_429_once", pool: PAUSED_POOL, retry_after_ms: 60_000 } });
    await until(() => api<StatusDocument>(`/executions/${throttled}`), (d) => d.stages[0].last_error?.code === "provider_rate_limited", "the provider 429");
    // One worker slot: one slow stage runs, two wait for it.
    await api(`/resources/pools/${encodeURIComponent(WORKER_POOL)}`, { method: "PUT", body: JSON.stringify({ kind: "concurrency", capacity: 1 }) });
    // data_relay: stages of a minute's timeout; 50 steps of a second each keep the slot taken for the test.
    const slow = { steps: 50, step_ms: 1000 };
    const ids = [await start("data_relay", slow), await start("data_relay", slow), await start("data_relay", slow)];
    const snap0 = await until(() => api<LedgerSnapshot>("/resources"), (s) => s.queue.filter((w) => ids.includes(w.execution_id)).length === 2, "two waiters");

    // ---- /ui/resources
    const resources = await context!.newPage();
    await signIn(resources, `${session!.url}/ui/resources`);
    await resources.locator(`tr[data-pool="${WORKER_POOL}"]`).waitFor();
    const poolCells = (name: string) =>
      resources.locator(`tr[data-pool="${name}"]`).evaluate((tr) => ({
        capacity: tr.querySelector("[data-role=capacity]")?.textContent,
        in_use: (tr.querySelector("[data-role=in-use]") as HTMLElement).dataset.value,
        max: (tr.querySelector("[data-role=in-use]") as HTMLElement).dataset.max,
        waiting: tr.querySelector("[data-role=waiting]")?.textContent,
        paused_until: (tr.querySelector("[data-role=paused-until]") as HTMLElement).dataset.value,
        shard: tr.querySelector("[data-role=shard]")?.textContent,
      }));
    const poolFromApi = async (name: string) => {
      const p = (await api<ResourcesDocument>("/resources")).pools.find((x) => x.name === name)!;
      return {
        capacity: p.capacity.toLocaleString("en-US"),
        in_use: String(p.in_use),
        max: String(p.capacity),
        waiting: String(p.waiting),
        paused_until: p.paused_until === undefined ? "" : String(p.paused_until),
        shard: String(p.shard),
      };
    };
    const worker = await pageMatchesApi(resources, () => poolCells(WORKER_POOL), () => poolFromApi(WORKER_POOL), WORKER_POOL);
    expect(worker).toMatchObject({ capacity: "1", in_use: "1", max: "1", shard: "0" });
    // Every shard (the one object of this session) answered: none is listed as down.
    const shards = (await api<ResourcesDocument>("/resources")).shards;
    expect(await resources.locator("#shards-up").textContent()).toBe(`${shards.length} of ${shards.length}`);
    expect(await resources.locator("#shards-down li").count()).toBe(0);
    expect(Number(worker.waiting)).toBeGreaterThanOrEqual(2);
    const paused = await pageMatchesApi(resources, () => poolCells(PAUSED_POOL), () => poolFromApi(PAUSED_POOL), PAUSED_POOL);
    expect(Number(paused.paused_until)).toBeGreaterThan(Date.now());
    expect(await resources.locator(`tr[data-pool="${PAUSED_POOL}"] [data-role=paused-until]`).getAttribute("class")).toContain("paused");
    // The waiters in queue order, each with its reason, as the snapshot lists them.
    const queueShown = () =>
      resources.locator("#waiter-rows tr").evaluateAll((trs) => trs.map((tr) => ({ id: (tr as HTMLElement).dataset.reservationId, reason: (tr as HTMLElement).dataset.reason })));
    const queueFromApi = async () => (await api<LedgerSnapshot>("/resources")).queue.map((w) => ({ id: w.reservation_id, reason: w.waiting_on.reason }));
    const queue = await pageMatchesApi(resources, queueShown, queueFromApi, "the waiters");
    expect(queue.length).toBe(snap0.queue.length);
    expect(queue.map((w) => w.reason)).toContain("capacity");
    await shoot(resources, "resources-page.png");

    // ---- /ui/clients
    const clients = await context!.newPage();
    await signIn(clients, `${session!.url}/ui/clients`);
    await clients.locator(`tr[data-client-id="${CLIENT}"]`).waitFor();
    const clientCells = () =>
      clients.locator(`tr[data-client-id="${CLIENT}"]`).evaluate((tr) => {
        const data = (role: string) => tr.querySelector(`[data-role=${role}]`) as HTMLElement;
        return {
          weight: data("weight").textContent,
          max_priority: data("max-priority").textContent,
          running_stages: data("running-stages").dataset.value,
          max_running_stages: data("running-stages").dataset.max,
          running_executions: data("running-executions").dataset.value,
          spend: data("spend").dataset.value,
          budget: data("spend").dataset.max,
          waiting: data("waiting").textContent,
        };
      });
    const clientFromApi = async () => {
      const c = (await api<{ clients: ClientDocument[] }>("/clients")).clients.find((x) => x.client_id === CLIENT)!;
      return {
        weight: String(c.quotas.weight),
        max_priority: c.quotas.max_priority!,
        running_stages: String(c.usage.running_stages),
        max_running_stages: String(c.quotas.max_running_stages),
        running_executions: String(c.usage.running_executions),
        spend: String(c.usage.spent + c.usage.held),
        budget: String(c.quotas.monthly_budget),
        waiting: String(c.usage.waiting_stages),
      };
    };
    const row = await pageMatchesApi(clients, clientCells, clientFromApi, CLIENT);
    expect(row).toMatchObject({ weight: "3", max_priority: "high", running_stages: "1", max_running_stages: "2", budget: "50" });
    expect(Number(row.waiting)).toBeGreaterThanOrEqual(2);
    await shoot(clients, "clients-page.png");

    // ---- waiting_on on the execution page: a waiting stage says what it waits for, as the status document does.
    const waitingId = snap0.queue.find((w) => ids.includes(w.execution_id))!.execution_id;
    const execution = await context!.newPage();
    await signIn(execution, `${session!.url}/ui/executions/${waitingId}`);
    const waitShown = () =>
      execution.locator('#stages-body tr[data-stage-id="stage_1"] [data-role=waiting-on]').evaluate((n) => ({
        reason: (n as HTMLElement).dataset.reason,
        position: (n as HTMLElement).dataset.position,
        pools: (n as HTMLElement).dataset.pools,
      }));
    const waitFromApi = async () => {
      const w = (await api<StatusDocument>(`/executions/${waitingId}`)).stages[0].waiting_on!;
      return { reason: w.reason, position: String(w.position), pools: w.pools.join(",") };
    };
    await execution.locator('#stages-body tr[data-stage-id="stage_1"] [data-role=waiting-on]').waitFor();
    const wait = await pageMatchesApi(execution, waitShown, waitFromApi, "waiting_on");
    expect(wait.reason).toBe("capacity");
    expect(wait.pools).toContain(WORKER_POOL);
    await shoot(execution, "execution-waiting-on.png");

    // ---- an execution queued by its client's max_running_executions says so in the summary.
    const QUEUED_CLIENT = "client_pages_queued";
    await api(`/clients/${QUEUED_CLIENT}/quotas`, { method: "PUT", body: JSON.stringify({ max_running_executions: 1 }) });
    const startFor = async (template_name: string) => {
      const res = await fetch(`${session!.url}/execute`, { method: "POST", headers: KAM, body: JSON.stringify({ template_name, parameters: slow, client_id: QUEUED_CLIENT }) });
      return ((await res.json()) as { execution_id: string }).execution_id;
    };
    const holder = await startFor("data_relay");
    const queued = await startFor("data_relay");
    await until(() => api<StatusDocument>(`/executions/${queued}`), (d) => d.waiting_on?.reason === "client_quota", "queued for a slot");
    const queuedPage = await context!.newPage();
    await signIn(queuedPage, `${session!.url}/ui/executions/${queued}`);
    await queuedPage.locator("#exec-waiting-on [data-role=waiting-on]").waitFor();
    const queuedShown = () =>
      queuedPage.locator("#exec-waiting-on [data-role=waiting-on]").evaluate((n) => ({ reason: (n as HTMLElement).dataset.reason, position: (n as HTMLElement).dataset.position }));
    const queuedFromApi = async () => {
      const w = (await api<StatusDocument>(`/executions/${queued}`)).waiting_on!;
      return { reason: w.reason, position: String(w.position) };
    };
    expect(await pageMatchesApi(queuedPage, queuedShown, queuedFromApi, "the execution's waiting_on")).toEqual({ reason: "client_quota", position: "1" });
    expect(await queuedPage.locator('#exec-status').getAttribute("data-status")).toBe("queued");
    await shoot(queuedPage, "execution-queued-for-slot.png");
    const others = [holder, queued];

    // ---- live: cancelling the running one hands the slot on; both pages follow without a reload.
    const poolBefore = await pageMatchesApi(resources, () => poolCells(WORKER_POOL), () => poolFromApi(WORKER_POOL), `${WORKER_POOL} before the cancel`);
    const running = (await Promise.all(ids.map((id) => api<StatusDocument>(`/executions/${id}`)))).find((d) => d.stages[0].status === "processing")!;
    let reloads = 0;
    for (const p of [resources, clients]) p.on("load", () => reloads++);
    await api(`/executions/${running.execution_id}/cancel`, { method: "POST" });
    await until(() => api<LedgerSnapshot>("/resources"), (s) => s.queue.filter((w) => ids.includes(w.execution_id)).length === 1, "one waiter left");
    const after = await pageMatchesApi(resources, () => poolCells(WORKER_POOL), () => poolFromApi(WORKER_POOL), `${WORKER_POOL} after the cancel`);
    expect(Number(after.waiting)).toBeLessThan(Number(poolBefore.waiting));
    const rowAfter = await pageMatchesApi(clients, clientCells, clientFromApi, `${CLIENT} after the cancel`);
    expect(Number(rowAfter.waiting)).toBeLessThan(Number(row.waiting));
    expect(reloads).toBe(0);

    for (const id of [...ids, ...others, throttled]) await fetch(`${session!.url}/executions/${id}/cancel`, { method: "POST", headers: OPS });
    expect(problems).toEqual([]);
  });
});
