import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { type BrowserContext, type Page, chromium } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ROOT, startDevSession } from "../../scripts/dev-session.mjs";
import { TEST_SECRETS } from "../support/constants";

/**
 * The operator pages in a real browser: the system Chromium (Debian package
 * `chromium`, installed by .ci/run) driven by playwright-core, against the
 * same `wrangler dev` session as `npm start`. An operator signs in with the
 * OPS token on an execution's page and watches its stages reach `completed`
 * without reloading; then finds it on the overview page. The operator's
 * buttons (pause, resume, cancel, rerun, approve, reject) are clicked against
 * real executions and what they did is read back through the API. Screenshots go to
 * test-results/ (kept as CI artifacts, ignored by git).
 */
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const RESULTS = path.join(ROOT, "test-results");
const KAM = { authorization: `Bearer ${TEST_SECRETS.KAM_TOKEN}`, "content-type": "application/json" };

let session: Awaited<ReturnType<typeof startDevSession>> | undefined;
let context: BrowserContext | undefined;
let userDataDir: string | undefined;
const problems: string[] = [];

const MISSING = existsSync(CHROMIUM)
  ? null
  : `no Chromium at ${CHROMIUM}: install it with \`apt-get update && apt-get install -y chromium\` (.ci/run does this when it is missing), or set CHROMIUM_PATH`;

/** Fail, never skip: a missing browser must not pass as green. */
function requireBrowser(): void {
  if (MISSING) throw new Error(MISSING);
}

beforeAll(async () => {
  if (MISSING) return;
  mkdirSync(RESULTS, { recursive: true });
  session = await startDevSession({ secrets: TEST_SECRETS });
  userDataDir = mkdtempSync(path.join(os.tmpdir(), "orch-chromium-"));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1440, height: 900 },
    timeout: 60_000,
  });
});

afterAll(async () => {
  await context?.close().catch(() => {});
  await session?.stop();
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
});

function watch(page: Page) {
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
}

async function startExecution(): Promise<string> {
  const res = await fetch(`${session!.url}/execute`, {
    method: "POST",
    headers: KAM,
    body: JSON.stringify({
      template_name: "course_creation",
      // About a second per stage, so the page is seen moving.
      parameters: { topic: "React", targetAudience: "beginners", steps: 4, step_ms: 250 },
      client_id: "client_browser",
    }),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { execution_id: string }).execution_id;
}

describe("execution page in Chromium", () => {
  it("signs in with the OPS token and shows every stage reaching completed, live", async () => {
    requireBrowser();
    const id = await startExecution();
    const page = await context!.newPage();
    watch(page);
    let loads = 0;
    page.on("load", () => loads++);
    // Pushed, not polled: the page opens the live socket and never reads the status document by itself.
    const sockets: string[] = [];
    page.on("websocket", (ws) => sockets.push(ws.url()));
    let polls = 0;
    page.on("request", (r) => {
      if (r.resourceType() === "fetch" && r.method() === "GET" && new URL(r.url()).pathname === `/executions/${id}`) polls++;
    });

    const res = await page.goto(`${session!.url}/executions/${id}`);
    expect(res?.status()).toBe(200);
    expect(res?.headers()["content-type"]).toContain("text/html");
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();

    // Wait on the DOM, recording each execution status the page shows on the way.
    await page.waitForFunction(
      () => {
        const w = window as unknown as { __seen?: string[] };
        const status = document.getElementById("exec-status")?.dataset.status ?? "";
        const live = document.getElementById("live")?.textContent ?? "";
        const l = window as unknown as { __live?: string[] };
        l.__live = l.__live ?? [];
        if (live && l.__live[l.__live.length - 1] !== live) l.__live.push(live);
        w.__seen = w.__seen ?? [];
        if (status && w.__seen[w.__seen.length - 1] !== status) w.__seen.push(status);
        const rows = Array.from(document.querySelectorAll<HTMLElement>("#stages-body tr[data-stage-id]"));
        return status === "completed" && rows.length === 3 && rows.every((r) => r.querySelector("[data-role=status]")?.textContent === "completed");
      },
      undefined,
      { timeout: 90_000, polling: 50 },
    );
    const seen = await page.evaluate(() => (window as unknown as { __seen: string[] }).__seen);
    expect(seen[seen.length - 1]).toBe("completed");
    expect(seen.length, `statuses seen: ${seen.join(" -> ")}`).toBeGreaterThan(1);
    expect(loads).toBe(1);
    expect(await page.evaluate(() => (window as unknown as { __live: string[] }).__live[0])).toBe("live");
    expect(sockets.map((u) => new URL(u).pathname)).toEqual([`/executions/${id}/live`]);
    expect(sockets[0]).not.toContain(TEST_SECRETS.OPS_TOKEN);
    expect(polls).toBe(0);

    const rows = await page.locator("#stages-body tr").evaluateAll((trs) =>
      trs.map((tr) => ({
        stage: (tr as HTMLElement).dataset.stageId,
        status: tr.querySelector("[data-role=status]")?.textContent,
        attempts: tr.querySelector("[data-role=attempts]")?.textContent,
        progress: (tr.querySelector("progress") as HTMLProgressElement | null)?.value,
        processing: tr.querySelector("[data-role=processing]")?.textContent,
        text: tr.textContent ?? "",
      })),
    );
    expect(rows.map((r) => r.stage)).toEqual(["stage_1", "stage_2", "stage_3"]);
    for (const r of rows) {
      expect(r).toMatchObject({ status: "completed", attempts: "1 / 3", progress: 100 });
      expect(r.processing).not.toBe("–");
      expect(r.text).toContain("tokens:openai");
    }
    await expect.poll(() => page.locator("#live").textContent()).toBe("final state");
    expect(await page.locator("#cost").textContent()).toMatch(/^USD \d/);

    const shot = path.join(RESULTS, "execution-page.png");
    rmSync(shot, { force: true });
    await page.screenshot({ path: shot, fullPage: true });
    expect(existsSync(shot)).toBe(true);
    expect(statSync(shot).size).toBeGreaterThan(5_000);

    // A schedule, to see on the overview below the executions (its own id each run: a dev session may keep state).
    const scheduleId = `browser-weekly-${Date.now()}`;
    const scheduled = await fetch(`${session!.url}/schedules`, {
      method: "POST",
      headers: KAM,
      body: JSON.stringify({
        schedule_id: scheduleId,
        cron: "0 6 * * 1",
        timezone: "Europe/Berlin",
        template_name: "course_creation",
        parameters: { topic: "Weekly" },
        client_id: "client_browser",
        overlap: "skip",
      }),
    });
    expect(scheduled.status).toBe(201);
    const schedule = (await scheduled.json()) as { next_runs: string[] };

    // The overview lists it (once the Execution has written it to the index) and links to its page.
    await page.goto(`${session!.url}/ui`);
    const link = page.locator(`tr[data-execution-id="${id}"] a`);
    const listed = await link
      .waitFor({ timeout: 20_000 })
      .then(() => true)
      .catch(() => false);
    await page.screenshot({ path: path.join(RESULTS, "overview-page.png"), fullPage: true });
    expect(listed, "the execution is not on the overview page: the index has no entry for it").toBe(true);
    const scheduleRow = page.locator(`tr[data-schedule-id="${scheduleId}"]`);
    await scheduleRow.waitFor({ timeout: 10_000 });
    const nextRun = schedule.next_runs[0].replace("T", " ").replace("Z", " UTC");
    expect(await scheduleRow.locator("[data-role=next]").textContent()).toBe(nextRun);
    expect(await scheduleRow.textContent()).toContain("never fired");
    await link.click();
    await page.waitForURL(`**/ui/executions/${id}`);
    await page.locator('#exec-status[data-status="completed"]').waitFor({ timeout: 10_000 });

    expect(problems).toEqual([]);
    await page.close();
  });

  it("draws a pipeline graph: columns by depth, edges, a fan-out node's item progress live, its items on click", async () => {
    requireBrowser();
    const res = await fetch(`${session!.url}/execute`, {
      method: "POST",
      headers: KAM,
      body: JSON.stringify({
        template_name: "course_parallel",
        // Six chapters, four at once, about a second each: the fan-out is seen moving.
        parameters: { topic: "Rust", modules: 6, steps: 3, step_ms: 300 },
        client_id: "client_browser",
      }),
    });
    expect(res.status).toBe(202);
    const id = ((await res.json()) as { execution_id: string }).execution_id;
    const page = await context!.newPage();
    watch(page);
    await page.goto(`${session!.url}/ui/executions/${id}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();

    // Record every item count the fan-out node shows until the execution completes.
    await page.waitForFunction(
      () => {
        const w = window as unknown as { __items?: string[] };
        w.__items = w.__items ?? [];
        const text = document.querySelector('.g-node[data-stage-id="stage_2"] [data-role=items]')?.textContent ?? "";
        if (text && w.__items[w.__items.length - 1] !== text) w.__items.push(text);
        return document.getElementById("exec-status")?.dataset.status === "completed" && text.startsWith("6/6");
      },
      undefined,
      { timeout: 90_000, polling: 50 },
    );
    const seen = await page.evaluate(() => (window as unknown as { __items: string[] }).__items);
    // Updated live: some count between none and all was shown on the way.
    expect(seen.some((t) => /^[1-5]\/6 items/.test(t)), `item counts seen: ${seen.join(" | ")}`).toBe(true);

    const nodes = await page.locator(".g-node").evaluateAll((els) =>
      els.map((e) => ({ id: (e as HTMLElement).dataset.stageId, status: (e as HTMLElement).dataset.status, x: Math.round(e.getBoundingClientRect().left) })),
    );
    expect(nodes.map((n) => n.id).sort()).toEqual(["stage_1", "stage_2", "stage_3", "stage_4", "stage_5"]);
    expect(nodes.every((n) => n.status === "completed")).toBe(true);
    const x = Object.fromEntries(nodes.map((n) => [n.id, n.x]));
    // Columns by depth: 1 | 2 | 3 and 4 side by side | 5.
    expect(x.stage_1).toBeLessThan(x.stage_2);
    expect(x.stage_2).toBeLessThan(x.stage_3);
    expect(x.stage_3).toBe(x.stage_4);
    expect(x.stage_4).toBeLessThan(x.stage_5);
    const edges = await page.locator(".g-edges path").evaluateAll((ps) => ps.map((p) => `${(p as SVGElement).dataset.from}->${(p as SVGElement).dataset.to}`).sort());
    expect(edges).toEqual(["stage_1->stage_2", "stage_2->stage_3", "stage_2->stage_4", "stage_2->stage_5", "stage_3->stage_5", "stage_4->stage_5"]);
    expect(await page.locator('.g-node[data-stage-id="stage_2"] progress').evaluate((p) => [(p as HTMLProgressElement).value, (p as HTMLProgressElement).max])).toEqual([6, 6]);

    // Clicking the fan-out node lists its items.
    await page.locator('.g-node[data-stage-id="stage_2"]').click();
    await page.locator("#items-body tr").nth(5).waitFor({ timeout: 10_000 });
    const items = await page.locator("#items-body tr").evaluateAll((trs) => trs.map((tr) => `${(tr as HTMLElement).dataset.stageId}:${(tr as HTMLElement).dataset.status}`));
    expect(items).toEqual(Array.from({ length: 6 }, (_, i) => `stage_2.${i}:completed`));
    expect(await page.locator("#items-title").textContent()).toBe("stage_2: 6 items");
    const shot = path.join(RESULTS, "execution-page-graph.png");
    await page.screenshot({ path: shot, fullPage: true });
    expect(statSync(shot).size).toBeGreaterThan(5_000);
    expect(problems).toEqual([]);
    await page.close();
  });

  it("colours each graph node by its status, and its item bar and item list follow the API (running, cancelled, failed)", async () => {
    requireBrowser();
    const start = async (fault: Record<string, unknown>) => {
      const res = await fetch(`${session!.url}/execute`, {
        method: "POST",
        headers: KAM,
        body: JSON.stringify({ template_name: "course_parallel", parameters: { topic: "Rust", modules: 6, steps: 1, step_ms: 0, fault }, client_id: "client_browser" }),
      });
      expect(res.status).toBe(202);
      return ((await res.json()) as { execution_id: string }).execution_id;
    };
    type Doc = { status: string; stages: { stage_id: string; status: string; items?: { total: number; completed: number; running: number } | null }[] };
    const read = async (id: string) => (await (await fetch(`${session!.url}/executions/${id}`, { headers: KAM })).json()) as Doc;
    const itemsOf = async (id: string) =>
      ((await (await fetch(`${session!.url}/executions/${id}/stages/stage_2/items?limit=200`, { headers: KAM })).json()) as { items: { stage_id: string; status: string }[] }).items;
    // Each node as drawn: its status, its outline colour, and the colour the page's palette gives that status.
    const drawn = (page: Page) =>
      page.evaluate(() =>
        Array.from(document.querySelectorAll<HTMLElement>(".g-node")).map((n) => {
          const probe = document.createElement("span");
          probe.className = `st-${n.dataset.status}`;
          document.body.append(probe);
          const expected = getComputedStyle(probe).color;
          probe.remove();
          const bar = n.querySelector<HTMLProgressElement>("progress");
          return `${n.dataset.stageId} ${n.dataset.status} ${getComputedStyle(n).borderTopColor === expected ? "coloured" : `${getComputedStyle(n).borderTopColor} != ${expected}`}${bar ? ` ${bar.value}/${bar.max}` : ""}`;
        }),
      );
    const expected = (doc: Doc) =>
      doc.stages.map((s) => `${s.stage_id} ${s.status} coloured${s.stage_id === "stage_2" && s.items ? ` ${s.items.completed}/${s.items.total}` : ""}`);
    const page = await context!.newPage();
    watch(page);

    // Item 0 hangs: the other five complete and the execution holds still, stage 2 running, 3-5 pending.
    const id = await start({ stage: 2, item: 0, mode: "hang" });
    let held: Doc | undefined;
    await expect
      .poll(async () => {
        held = await read(id);
        return held.stages[1].items;
      }, { timeout: 60_000 })
      .toMatchObject({ total: 6, completed: 5, running: 1 });
    await page.goto(`${session!.url}/ui/executions/${id}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();
    await expect.poll(() => drawn(page), { timeout: 20_000 }).toEqual(expected(held!));
    expect(held!.stages.map((s) => s.status)).toEqual(["completed", "processing", "pending", "pending", "pending"]);
    // Three different colours on the page at once: green, blue and grey.
    const colours = await page.evaluate(() => Array.from(document.querySelectorAll<HTMLElement>(".g-node")).map((n) => getComputedStyle(n).borderTopColor));
    expect(new Set(colours).size).toBe(3);
    await page.locator('.g-node[data-stage-id="stage_2"]').click();
    const rows = () => page.locator("#items-body tr").evaluateAll((trs) => trs.map((tr) => `${(tr as HTMLElement).dataset.stageId} ${(tr as HTMLElement).dataset.status}`));
    await expect.poll(rows, { timeout: 10_000 }).toEqual((await itemsOf(id)).map((i) => `${i.stage_id} ${i.status}`));
    expect((await itemsOf(id)).map((i) => i.status)).toEqual(["processing", "completed", "completed", "completed", "completed", "completed"]);
    await page.screenshot({ path: path.join(RESULTS, "execution-page-graph-running.png"), fullPage: true });

    // Cancelled: every open stage and item ends cancelled, drawn as the API says, the item list too.
    expect((await fetch(`${session!.url}/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    const cancelled = await read(id);
    expect(cancelled.status).toBe("cancelled");
    await expect.poll(() => drawn(page), { timeout: 20_000 }).toEqual(expected(cancelled));
    await expect.poll(rows, { timeout: 10_000 }).toEqual((await itemsOf(id)).map((i) => `${i.stage_id} ${i.status}`));
    expect((await itemsOf(id))[0].status).toBe("cancelled");

    // Failed: item 3 fails for good; the fan-out node turns red, the stages after it are cancelled.
    const failedId = await start({ stage: 2, item: 3, mode: "fail" });
    await page.goto(`${session!.url}/ui/executions/${failedId}`);
    await page.locator('#exec-status[data-status="failed"]').waitFor({ timeout: 60_000 });
    const failed = await read(failedId);
    expect(failed.stages.map((s) => s.status)).toEqual(["completed", "failed", "cancelled", "cancelled", "cancelled"]);
    await expect.poll(() => drawn(page), { timeout: 20_000 }).toEqual(expected(failed));
    await page.locator('.g-node[data-stage-id="stage_2"]').click();
    await expect.poll(rows, { timeout: 10_000 }).toEqual((await itemsOf(failedId)).map((i) => `${i.stage_id} ${i.status}`));
    expect(await page.locator('#items-body tr[data-stage-id="stage_2.3"]').getAttribute("data-status")).toBe("failed");
    await page.screenshot({ path: path.join(RESULTS, "execution-page-graph-failed.png"), fullPage: true });
    expect(problems).toEqual([]);
    await page.close();
  });

  it("falls back to polling when the live socket drops, and says so", async () => {
    requireBrowser();
    const id = await startExecution();
    const page = await context!.newPage();
    watch(page);
    // The real socket opens and delivers its first document; then the connection drops.
    await page.routeWebSocket(/\/live$/, (ws) => {
      const server = ws.connectToServer();
      server.onMessage((m) => {
        ws.send(m);
        ws.close({ code: 1011, reason: "dropped" });
      });
    });
    await page.goto(`${session!.url}/ui/executions/${id}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();
    await expect.poll(() => page.locator("#live").textContent(), { timeout: 20_000 }).toBe("polling (live updates unavailable)");
    expect(await page.locator("#problem").textContent()).toBe("The live connection dropped; polling every second instead.");
    await page.locator('#exec-status[data-status="completed"]').waitFor({ timeout: 90_000 });
    await expect.poll(() => page.locator("#live").textContent()).toBe("final state");
    await page.screenshot({ path: path.join(RESULTS, "execution-page-polling.png"), fullPage: true });
    expect(problems).toEqual([]);
    await page.close();
  });

  it("asks for the token again when it is refused", async () => {
    requireBrowser();
    const id = await startExecution();
    const page = await context!.newPage();
    await page.goto(`${session!.url}/ui/executions/${id}`);
    // A fresh tab has its own sessionStorage: the sign-in form shows.
    await page.locator("#token").waitFor();
    await page.locator("#token").fill("not-the-token");
    await page.locator("#signin").click();
    await expect.poll(() => page.locator("#login-error").textContent(), { timeout: 10_000 }).toContain("refused");
    expect(await page.locator("#app").isHidden()).toBe(true);
    expect(await page.evaluate(() => sessionStorage.getItem("orchestrator.ops_token"))).toBeNull();
    await page.close();
  });
});

/**
 * The operator's buttons (src/ui/execution-actions.ts), each clicked in the page against real
 * executions; what each did is read back through the API, not from the page.
 */
describe("operator actions on the execution page in Chromium", () => {
  type Stage = { stage_id: string; status: string; attempts: number; reused_from?: string; decision?: { approved: boolean; by: string; comment: string | null } };
  type Doc = { status: string; rerun_of: string | null; reruns: string[]; error: { code: string; message: string; stage_id?: string } | null; stages: Stage[] };
  const read = async (id: string) => (await (await fetch(`${session!.url}/executions/${id}`, { headers: KAM })).json()) as Doc;
  const start = async (body: Record<string, unknown>) => {
    const res = await fetch(`${session!.url}/execute`, { method: "POST", headers: KAM, body: JSON.stringify({ client_id: "client_browser", ...body }) });
    expect(res.status).toBe(202);
    return ((await res.json()) as { execution_id: string }).execution_id;
  };
  const open = async (id: string) => {
    const page = await context!.newPage();
    watch(page);
    await page.goto(`${session!.url}/ui/executions/${id}`);
    await page.locator("#token").fill(TEST_SECRETS.OPS_TOKEN);
    await page.locator("#signin").click();
    return page;
  };
  /** The answer under the buttons once the click's request came back (it reads "…" while out). */
  const answered = async (page: Page) => {
    const p = page.locator("#act-answer");
    await expect.poll(async () => (await p.getAttribute("data-outcome")) !== "pending", { timeout: 30_000 }).toBe(true);
    return { outcome: await p.getAttribute("data-outcome"), code: await p.getAttribute("data-code"), text: (await p.textContent()) ?? "" };
  };
  const shoot = (page: Page, name: string) => page.screenshot({ path: path.join(RESULTS, `execution-actions-${name}.png`), fullPage: true });

  it("pause, resume (and resume refused with not_paused), cancel dismissed then confirmed, rerun refused while running", async () => {
    requireBrowser();
    // Stage 2 hangs on the worker until cancelled: the execution stays running as long as the test needs.
    const id = await start({ template_name: "course_creation", parameters: { topic: "Go", steps: 1, step_ms: 0, fault: { stage: 2, mode: "hang" } } });
    const page = await open(id);
    await page.locator('#stages-body tr[data-stage-id="stage_2"][data-status="processing"]').waitFor({ timeout: 60_000 });
    expect((await read(id)).status).toBe("running");

    await page.locator("#act-pause").click();
    expect(await answered(page)).toEqual({ outcome: "ok", code: "", text: "Paused: the execution is paused." });
    expect((await read(id)).status).toBe("paused");
    await page.locator('#exec-status[data-status="paused"]').waitFor();
    await shoot(page, "paused");

    await page.locator("#act-resume").click();
    expect(await answered(page)).toEqual({ outcome: "ok", code: "", text: "Resumed: the execution is running." });
    expect((await read(id)).status).toBe("running");

    // The server decides: resuming a running execution is refused, and the page shows the status and code.
    await page.locator("#act-resume").click();
    const refused = await answered(page);
    expect(refused).toMatchObject({ outcome: "error", code: "not_paused" });
    expect(refused.text).toMatch(/^Resume refused: 409 not_paused: /);
    expect((await read(id)).status).toBe("running");
    await shoot(page, "not-paused");

    await page.locator("#act-rerun").click();
    const notTerminal = await answered(page);
    expect(notTerminal).toMatchObject({ outcome: "error", code: "not_terminal" });
    expect(notTerminal.text).toMatch(/^Rerun refused: 409 not_terminal: /);
    expect((await read(id)).reruns).toEqual([]);

    // Cancel asks first; dismissed, nothing is sent and the execution runs on.
    const asked: string[] = [];
    page.once("dialog", (d) => {
      asked.push(`${d.type()}: ${d.message()}`);
      void d.dismiss();
    });
    await page.locator("#act-cancel").click();
    expect(asked).toEqual([`confirm: Cancel execution ${id}? Running stages are told to stop; this cannot be undone.`]);
    expect(await page.locator("#act-answer").textContent()).toBe("Cancel not confirmed: nothing was sent.");
    expect((await read(id)).status).toBe("running");

    page.once("dialog", (d) => void d.accept());
    await page.locator("#act-cancel").click();
    expect(await answered(page)).toEqual({ outcome: "ok", code: "", text: "Cancelled: the execution is cancelled." });
    const cancelled = await read(id);
    expect(cancelled.status).toBe("cancelled");
    expect(cancelled.stages.map((s) => s.status)).toEqual(["completed", "cancelled", "cancelled"]);
    await page.locator('#exec-status[data-status="cancelled"]').waitFor();
    await shoot(page, "cancelled");
    // The browser logs each refused request; those two are the ones this test asked for.
    expect(problems.splice(0)).toEqual(Array(2).fill("console: Failed to load resource: the server responded with a status of 409 (Conflict)"));
    await page.close();
  });

  it("rerun from a chosen stage: a new execution with rerun_of, the stages before it reused, the chosen one run again; linked from the page", async () => {
    requireBrowser();
    const id = await start({ template_name: "course_creation", parameters: { topic: "Elm", steps: 1, step_ms: 0 } });
    const page = await open(id);
    await page.locator('#exec-status[data-status="completed"]').waitFor({ timeout: 60_000 });
    // The stage choice lists every stage; the default is the server's (all completed: the first).
    const select = page.locator("#act-rerun-from");
    expect(await select.locator("option").evaluateAll((os) => os.map((o) => `${(o as HTMLOptionElement).value}=${o.textContent}`))).toEqual([
      "=default (stage_1)",
      "stage_1=stage_1",
      "stage_2=stage_2",
      "stage_3=stage_3",
    ]);
    await select.selectOption("stage_2");
    await page.locator("#act-rerun").click();
    const a = await answered(page);
    expect(a.outcome).toBe("ok");
    const link = page.locator("#act-rerun-link");
    const newId = (await link.getAttribute("data-execution-id"))!;
    expect(newId).not.toBe(id);
    expect(a.text).toBe(`Rerun started from stage_2 (reused: stage_1): ${newId}`);
    expect(await link.getAttribute("href")).toBe(`/ui/executions/${newId}`);
    await shoot(page, "rerun");

    // The link opens the new execution's page, signed in already (same tab), and it runs to the end.
    await link.click();
    await page.waitForURL(`**/ui/executions/${newId}`);
    await page.locator('#exec-status[data-status="completed"]').waitFor({ timeout: 60_000 });
    const rerun = await read(newId);
    expect(rerun.rerun_of).toBe(id);
    expect(rerun.stages.map((s) => [s.stage_id, s.status, s.reused_from ?? null, s.attempts])).toEqual([
      ["stage_1", "completed", id, 0],
      ["stage_2", "completed", null, 1],
      ["stage_3", "completed", null, 1],
    ]);
    expect((await read(id)).reruns).toEqual([newId]);
    await shoot(page, "rerun-completed");
    expect(problems).toEqual([]);
    await page.close();
  });

  it("approve and reject an approval stage, with a comment", async () => {
    requireBrowser();
    const approvedId = await start({ template_name: "approval_pipeline", parameters: { topic: "Approve me" } });
    const page = await open(approvedId);
    const panel = page.locator('#act-approvals .approval[data-stage-id="stage_2"]');
    await panel.waitFor({ timeout: 60_000 });
    expect((await read(approvedId)).stages[1].status).toBe("awaiting_approval");
    // A comment longer than the limit is cut at 2,000 characters by the field itself.
    await panel.locator("textarea").fill("x".repeat(2_100));
    expect(await panel.locator("textarea").evaluate((t) => (t as HTMLTextAreaElement).value.length)).toBe(2_000);
    expect(await panel.locator("[data-role=count]").textContent()).toBe("2000 / 2000");
    await panel.locator("textarea").fill("Outline checked: go.");
    await shoot(page, "approval");
    await panel.locator("button[data-action=approve]").click();
    // Answered at the decision, before stage 3 has run.
    expect(await answered(page)).toEqual({ outcome: "ok", code: "", text: "Approved stage_2: the execution is running." });
    const approved = await read(approvedId);
    expect(approved.stages[1]).toMatchObject({ status: "completed", decision: { approved: true, by: "ops", comment: "Outline checked: go." } });
    // The panel goes once the stage no longer waits; the execution runs on to the end.
    await page.locator('#exec-status[data-status="completed"]').waitFor({ timeout: 60_000 });
    expect(await panel.count()).toBe(0);
    expect((await read(approvedId)).status).toBe("completed");

    const rejectedId = await start({ template_name: "approval_pipeline", parameters: { topic: "Reject me" } });
    await page.goto(`${session!.url}/ui/executions/${rejectedId}`);
    await panel.waitFor({ timeout: 60_000 });
    await panel.locator("textarea").fill("Wrong audience: redo the outline.");
    await panel.locator("button[data-action=reject]").click();
    expect(await answered(page)).toEqual({ outcome: "ok", code: "", text: "Rejected stage_2: the execution is failed." });
    const rejected = await read(rejectedId);
    expect(rejected.status).toBe("failed");
    expect(rejected.error).toEqual({ code: "approval_rejected", message: "stage_2 was rejected by ops: Wrong audience: redo the outline.", stage_id: "stage_2" });
    expect(rejected.stages[1]).toMatchObject({ status: "failed", decision: { approved: false, by: "ops", comment: "Wrong audience: redo the outline." } });
    await page.locator('#exec-status[data-status="failed"]').waitFor();
    expect(await page.locator("#error").textContent()).toBe("approval_rejected: stage_2 was rejected by ops: Wrong audience: redo the outline. (stage_2)");
    await shoot(page, "rejected");

    expect(problems).toEqual([]);
    await page.close();
  });
});
