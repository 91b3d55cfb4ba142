import { CHARTS_CSS, CHARTS_HTML, CHARTS_JS } from "./charts";
import { htmlResponse, pageFrame, pageHead, pageTail } from "./common";

/**
 * `GET /ui` (and `GET /executions` with `Accept: text/html`): recent
 * executions from the index with counts by status, filters, "load more"
 * through the cursor, and a link to each execution's page; the charts over
 * a chosen window (src/ui/charts.ts); below them the schedules with their
 * next run and last fire. Reads with the OPS token; the first page refreshes
 * itself every 5 s.
 */
const CSS = `
form.filters { display: flex; flex-wrap: wrap; align-items: flex-end; gap: 8px 0; }
.counts { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 16px; }
.count { min-width: 120px; text-align: left; padding: 10px 14px; }
.count .n { display: block; font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.count.active { outline: 2px solid var(--run); }
.scroll { overflow-x: auto; }
#more-row { margin-top: 12px; display: flex; gap: 12px; align-items: center; }
`;

const SCRIPT = `
const STATUSES = ["queued", "running", "paused", "completed", "failed", "cancelled"];
const WINDOWS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3, "all": 0 };
const FIELDS = ["client_id", "template_name", "status", "window"];
let cursor = null;
let refresh = null;
let generation = 0;

function problem(text) { $("problem").textContent = text || ""; }
function filters() {
  const f = {};
  for (const k of FIELDS) { const v = $("f-" + k).value.trim(); if (v) f[k] = v; }
  return f;
}
function loadFiltersFromUrl() {
  const q = new URLSearchParams(location.search);
  for (const k of FIELDS) if (q.has(k)) $("f-" + k).value = q.get(k);
}
function query(f, extra) {
  const q = new URLSearchParams();
  if (f.client_id) q.set("client_id", f.client_id);
  if (f.template_name) q.set("template_name", f.template_name);
  const win = WINDOWS[f.window || "7d"];
  if (win) q.set("since", String(Date.now() - win));
  for (const [k, v] of Object.entries(extra || {})) if (v !== undefined && v !== null) q.set(k, String(v));
  return q.toString();
}

function renderCounts(data, active) {
  const box = $("counts");
  const cards = [el("button", { type: "button", class: "card count" + (active ? "" : " active"), dataset: { status: "" } }, [
    el("span", { class: "n", dataset: { role: "count" }, text: data.total }), "all",
  ])];
  for (const s of STATUSES) {
    cards.push(el("button", { type: "button", class: "card count st-" + s + (active === s ? " active" : ""), dataset: { status: s } }, [
      el("span", { class: "n", dataset: { role: "count" }, text: data.counts[s] }), s,
    ]));
  }
  box.replaceChildren(...cards);
}

function row(x) {
  const link = el("a", { class: "mono", text: x.execution_id });
  link.href = "/ui/executions/" + encodeURIComponent(x.execution_id);
  return el("tr", { dataset: { executionId: x.execution_id, status: x.status } }, [
    el("td", { class: "mono", text: fmtTime(x.created_at) }),
    el("td", null, [link]),
    el("td", null, [badge(x.status)]),
    el("td", { class: "mono", text: x.client_id }),
    el("td", { text: x.template_name }),
    el("td", { text: x.priority }),
    el("td", { class: "num", text: x.stages_completed + " / " + x.stages_total }),
    el("td", { class: "num", text: fmtCost(x.cost_total) }),
    el("td", { class: x.error_code ? "error mono" : "mono", text: x.error_code || "" }),
    el("td", { class: "mono", text: fmtTime(x.updated_at) }),
  ]);
}

function scheduleRow(s) {
  const last = s.last_runs[0];
  const lastCell = el("td", null, last ? [badge(last.state), " ", last.execution_id ? (() => {
    const a = el("a", { class: "mono", text: last.execution_id });
    a.href = "/ui/executions/" + encodeURIComponent(last.execution_id);
    return a;
  })() : el("span", { class: "muted", text: last.reason || "" })] : [el("span", { class: "muted", text: "never fired" })]);
  return el("tr", { dataset: { scheduleId: s.schedule_id } }, [
    el("td", { class: "mono", text: s.schedule_id }),
    el("td", { class: "mono", text: s.cron }),
    el("td", { text: s.timezone }),
    el("td", { text: s.template_name }),
    el("td", { class: "mono", text: s.client_id }),
    el("td", { text: s.overlap }),
    el("td", { dataset: { role: "next" }, class: "mono", text: s.paused ? "paused" : fmtTime(s.next_runs[0]) }),
    lastCell,
  ]);
}

async function loadSchedules(gen) {
  const f = filters();
  const q = new URLSearchParams({ limit: "50" });
  if (f.client_id) q.set("client_id", f.client_id);
  const page = await api("/schedules?" + q);
  if (gen !== generation) return;
  $("schedule-rows").replaceChildren(...page.items.map(scheduleRow));
  $("schedules-empty").hidden = page.items.length > 0;
}

// One counts answer covers at most maxIndexShardsPerRequest months: follow its cursor and add up (a few months each).
async function allCounts(f) {
  const sum = await api("/executions/counts?" + query(f));
  for (let next = sum.next_cursor, n = 0; next && n < 50; n++) {
    const more = await api("/executions/counts?" + query(f, { cursor: next }));
    for (const k of Object.keys(sum.counts)) sum.counts[k] += more.counts[k];
    sum.total += more.total;
    next = more.next_cursor;
  }
  return sum;
}

async function load(append) {
  const gen = generation;
  const f = filters();
  try {
    const [counts, page] = await Promise.all([
      append ? null : allCounts(f),
      api("/executions?" + query(f, { status: f.status, limit: 50, cursor: append ? cursor : null })),
      append ? null : loadSchedules(gen),
      append ? null : loadCharts(),
    ]);
    if (gen !== generation) return;
    problem("");
    if (counts) renderCounts(counts, f.status);
    const rows = page.items.map(row);
    if (append) $("rows").append(...rows); else $("rows").replaceChildren(...rows);
    cursor = page.next_cursor;
    $("more").hidden = !cursor;
    $("empty").hidden = $("rows").children.length > 0;
    $("updated").textContent = "updated " + new Date().toISOString().replace("T", " ").replace("Z", " UTC");
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof Unauthorized) { stop(); signOut("The token was refused: sign in again."); return; }
    problem("Could not read the index: " + e.message);
  }
}

function stop() { generation += 1; clearInterval(refresh); refresh = null; }
function reload() {
  stop();
  const f = filters();
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) q.set(k, v);
  history.replaceState(null, "", location.pathname + (q.toString() ? "?" + q : ""));
  load(false);
  // Refresh the first page only: once an operator pages on, the list holds still.
  refresh = setInterval(() => load(false), 5000);
}

loadFiltersFromUrl();
$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); reload(); });
$("f-status").addEventListener("change", reload);
$("f-window").addEventListener("change", reload);
$("counts").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-status]");
  if (!b) return;
  $("f-status").value = b.dataset.status;
  reload();
});
$("more").addEventListener("click", () => { clearInterval(refresh); refresh = null; load(true); });
const signOut = setupLogin(reload);
$("signout").addEventListener("click", stop);
`;

export function overviewPage(): Response {
  return htmlResponse(
    (nonce) => `${pageHead(nonce, `Executions · Orchestrator`, CSS + CHARTS_CSS)}
<body>
${pageFrame({
  header: "<h1>Executions</h1>",
  tools: '<a href="/openapi.json">API</a>\n  ',
  body: `  <form id="filters" class="filters card">
    <label>Client<input id="f-client_id" maxlength="128" spellcheck="false"></label>
    <label>Template<input id="f-template_name" maxlength="64" spellcheck="false"></label>
    <label>Status<select id="f-status">
      <option value="">any</option><option>queued</option><option>running</option><option>paused</option>
      <option>completed</option><option>failed</option><option>cancelled</option>
    </select></label>
    <label>Created<select id="f-window">
      <option value="1h">last hour</option><option value="24h">last 24 h</option><option value="7d" selected>last 7 days</option>
      <option value="30d">last 30 days</option><option value="all">any time</option>
    </select></label>
    <button class="primary" type="submit">Apply</button>
  </form>
  <div id="counts" class="counts"></div>
${CHARTS_HTML}
  <section class="card scroll">
    <table>
      <thead><tr>
        <th>Created</th><th>Execution</th><th>Status</th><th>Client</th><th>Template</th><th>Priority</th>
        <th class="num">Stages</th><th class="num">Cost</th><th>Error</th><th>Updated</th>
      </tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <p id="empty" class="muted" hidden>No executions match.</p>
    <div id="more-row"><button type="button" id="more" hidden>Load more</button><span id="updated" class="muted"></span></div>
  </section>
  <h2>Schedules</h2>
  <section class="card scroll">
    <table>
      <thead><tr>
        <th>Schedule</th><th>Cron</th><th>Time zone</th><th>Template</th><th>Client</th><th>Overlap</th><th>Next run</th><th>Last fire</th>
      </tr></thead>
      <tbody id="schedule-rows"></tbody>
    </table>
    <p id="schedules-empty" class="muted" hidden>No schedules.</p>
  </section>
`,
})}
${pageTail(nonce, CHARTS_JS + SCRIPT)}`,
  );
}
