import { escapeHtml, htmlResponse, pageFrame, pageHead, pageTail } from "./common";
import { ACTIONS_CSS, ACTIONS_HTML, ACTIONS_JS } from "./execution-actions";
import { WAITING_CSS, WAITING_JS, WAITING_SUMMARY_JS } from "./waiting-on";
import { TIMELINE_CSS, TIMELINE_HTML, TIMELINE_JS } from "./timeline";

/**
 * `GET /executions/:id` with `Accept: text/html`, and `GET /ui/executions/:id`:
 * the execution as a graph (stages as nodes in columns by depth, edges from
 * their dependencies, coloured by status; a fan-out stage with its items'
 * progress, and clicking it lists its items) and as a timeline, one row per
 * stage (status, attempts, progress,
 * time waiting for resources, time processing, usage, cost, error), pushed
 * over the execution's live socket (a ticket asked for with the OPS token), or
 * polled every second when the socket cannot open or drops, which the page
 * says. The page itself holds no data, so it is served without a token.
 * The operator's buttons are in ./execution-actions.ts, the waterfall of
 * every attempt in ./timeline.ts.
 */
const CSS = `
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 8px 20px; margin: 0; }
.summary div { min-width: 0; }
.summary dt { font-size: 12px; color: var(--muted); }
.summary dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
.stage-name { font-weight: 600; }
td progress { width: 90px; vertical-align: middle; }
.tl { position: relative; height: 14px; min-width: 160px; background: color-mix(in srgb, var(--line) 45%, transparent); border-radius: 3px; }
.tl-bar { position: absolute; top: 2px; bottom: 2px; display: flex; overflow: hidden; border-radius: 2px; background: var(--run); min-width: 2px; }
.tl-bar.st-completed { background: var(--ok); } .tl-bar.st-failed { background: var(--bad); } .tl-bar.st-cancelled { background: var(--warn); }
.tl-wait { height: 100%; background: var(--warn); opacity: .75; }
ul.usage { margin: 0; padding: 0; list-style: none; }
#problem:empty { display: none; }
.graph { position: relative; overflow-x: auto; }
.g-cols { position: relative; display: flex; gap: 56px; align-items: center; padding: 4px; z-index: 1; }
.g-col { display: flex; flex-direction: column; gap: 14px; }
.g-node { display: flex; flex-direction: column; gap: 3px; min-width: 150px; text-align: left; border: 2px solid currentColor; border-radius: 8px; padding: 6px 10px; background: var(--card); }
.g-node .mono { color: var(--fg); font-weight: 600; }
.g-node progress { width: 100%; }
.g-node.selected { box-shadow: 0 0 0 3px color-mix(in srgb, currentColor 35%, transparent); }
.g-edges { position: absolute; inset: 0; pointer-events: none; z-index: 0; }
.items-title { font-size: 14px; margin: 0 0 8px; }
.g-edges path { fill: none; stroke: var(--muted); stroke-width: 1.5; }
`;

const SCRIPT = `
const ID = document.body.dataset.executionId;
const TERMINAL = ["completed", "failed", "cancelled"];
let timer = null;
let failures = 0;
let generation = 0;

function setLive(on, text) {
  const live = $("live");
  live.classList.toggle("on", on);
  live.textContent = text;
}
function problem(text) { $("problem").textContent = text || ""; }
function put(id, value) { $(id).textContent = value === null || value === undefined || value === "" ? "–" : String(value); }

function renderSummary(doc) {
  const st = $("exec-status");
  st.replaceChildren(badge(doc.status));
  st.dataset.status = doc.status;
  put("template", doc.template_name + (doc.template_id ? " (" + doc.template_id + (doc.template_source ? ", from " + doc.template_source : "") + ")" : ""));
  put("client", doc.client_id);
  put("request", doc.request_id);
  put("priority", doc.priority);
  put("created", fmtTime(doc.created_at));
  put("started", fmtTime(doc.started_at));
  put("completed", fmtTime(doc.completed_at));
  put("estimated", doc.completed_at ? null : fmtTime(doc.estimated_completion_at));
  const end = doc.completed_at ? Date.parse(doc.completed_at) : Date.now();
  put("duration", fmtMs(end - Date.parse(doc.created_at)));
  put("cost", doc.cost ? fmtCost(doc.cost.total, doc.cost.currency) : null);
  const e = doc.error;
  put("error", e ? e.code + ": " + e.message + (e.stage_id ? " (" + e.stage_id + ")" : "") : null);
  $("error").classList.toggle("error", !!e);
  put("expired", doc.data_expired_at ? fmtTime(doc.data_expired_at) : null);
}

function timeline(doc, s) {
  const box = el("div", { class: "tl", title: "waiting " + fmtMs(s.waiting_ms) + ", processing " + fmtMs(s.processing_ms) });
  if (!s.started_at) return box;
  const t0 = Date.parse(doc.created_at);
  const tEnd = doc.completed_at ? Date.parse(doc.completed_at) : Date.now();
  const span = Math.max(1, tEnd - t0);
  const start = Date.parse(s.started_at);
  const stop = s.completed_at ? Date.parse(s.completed_at) : tEnd;
  const bar = el("div", { class: "tl-bar st-" + s.status });
  bar.style.left = Math.min(100, Math.max(0, ((start - t0) / span) * 100)) + "%";
  bar.style.width = Math.min(100, Math.max(0.5, ((stop - start) / span) * 100)) + "%";
  const total = Math.max(1, s.waiting_ms + s.processing_ms);
  const wait = el("div", { class: "tl-wait" });
  wait.style.width = Math.min(100, (s.waiting_ms / total) * 100) + "%";
  bar.append(wait);
  box.append(bar);
  return box;
}

function usageList(usage) {
  if (!usage) return document.createTextNode("–");
  const ul = el("ul", { class: "usage mono" });
  for (const [pool, amount] of Object.entries(usage)) ul.append(el("li", { text: pool + ": " + Number(amount).toLocaleString("en-US") }));
  return ul;
}

function stageRow(doc, s, currency) {
  const progress = Math.max(0, Math.min(100, Number(s.progress) || 0));
  const statusCell = el("td", null, [el("span", { dataset: { role: "status" }, class: "badge st-" + s.status, text: s.status })]);
  if (s.message) statusCell.append(el("div", { class: "muted", text: s.message }));
  if (s.waiting_on) statusCell.append(waitingOnNode(s.waiting_on));
  return el("tr", { dataset: { stageId: s.stage_id, status: s.status } }, [
    el("td", { class: "num", text: s.order }),
    el("td", null, [
      el("div", { class: "stage-name mono", text: s.stage_id }),
      el("div", { class: "muted", text: s.type === "approval"
        ? "approval" + (s.decision ? " · " + (s.decision.approved ? "approved" : "rejected") + " by " + s.decision.by + (s.decision.comment ? ": " + s.decision.comment : "") : "")
        : s.worker + " · " + s.action + " · " + s.template_ref }),
    ]),
    statusCell,
    el("td", { class: "num", dataset: { role: "attempts" }, text: s.attempts + " / " + s.max_attempts }),
    el("td", { class: "num" }, [el("progress", { max: 100, value: progress }), " " + Math.round(progress) + "%"]),
    el("td", { class: "num", dataset: { role: "waiting" }, text: fmtMs(s.waiting_ms) }),
    el("td", { class: "num", dataset: { role: "processing" }, text: fmtMs(s.processing_ms) }),
    el("td", null, [timeline(doc, s)]),
    el("td", null, [usageList(s.usage)]),
    el("td", { class: "num", text: fmtCost(s.cost, currency) }),
    el("td", { class: s.error ? "error" : "", text: s.error ? s.error.code + ": " + s.error.message : "" }),
  ]);
}

/** Depth of each stage: 0 without dependencies, else one more than its deepest dependency. */
function depths(stages) {
  const by = new Map(stages.map((s) => [s.stage_id, s]));
  const memo = new Map();
  const depth = (id, guard) => {
    if (memo.has(id)) return memo.get(id);
    const deps = (by.get(id) && by.get(id).depends_on) || [];
    const d = deps.length && guard < 60 ? 1 + Math.max(...deps.map((x) => depth(x, guard + 1))) : 0;
    memo.set(id, d);
    return d;
  };
  for (const s of stages) depth(s.stage_id, 0);
  return memo;
}

let selected = null;
let itemsAt = 0;

function graphNode(s) {
  const kids = [el("span", { class: "mono", text: s.stage_id }), el("span", { class: "muted", text: s.type === "approval" ? "approval" : s.action }), badge(s.status)];
  if (s.for_each !== undefined) {
    const it = s.items;
    kids.push(it ? el("progress", { max: Math.max(1, it.total), value: it.completed, dataset: { role: "items-bar" } }) : null);
    kids.push(el("span", { class: "muted", dataset: { role: "items" }, text: it ? it.completed + "/" + it.total + " items" + (it.running ? ", " + it.running + " running" : "") : "items: not known yet" }));
  }
  const node = el("button", { type: "button", class: "g-node st-" + s.status + (selected === s.stage_id ? " selected" : ""), dataset: { stageId: s.stage_id, status: s.status, fanOut: s.for_each !== undefined ? "1" : "0" } }, kids);
  if (s.for_each !== undefined) node.addEventListener("click", () => { selected = s.stage_id; itemsAt = 0; loadItems(); for (const n of document.querySelectorAll(".g-node")) n.classList.toggle("selected", n.dataset.stageId === selected); });
  return node;
}

/** The stages as a graph: a column per depth, an edge from each dependency. */
function renderGraph(doc) {
  const box = $("graph");
  const d = depths(doc.stages);
  const cols = [];
  for (const s of doc.stages.slice().sort((a, b) => a.order - b.order)) (cols[d.get(s.stage_id)] = cols[d.get(s.stage_id)] || []).push(s);
  const row = el("div", { class: "g-cols" }, cols.filter(Boolean).map((list) => el("div", { class: "g-col" }, list.map(graphNode))));
  // Parsed as markup, the svg element gets its namespace from the HTML parser (the page names no URL at all).
  box.replaceChildren(row);
  box.insertAdjacentHTML("afterbegin", '<svg class="g-edges"></svg>');
  const svg = box.firstElementChild;
  const origin = box.getBoundingClientRect();
  const at = (id) => box.querySelector('.g-node[data-stage-id="' + id + '"]');
  svg.setAttribute("width", String(row.scrollWidth));
  svg.setAttribute("height", String(row.scrollHeight + 8));
  for (const s of doc.stages) {
    for (const dep of s.depends_on || []) {
      const a = at(dep), b = at(s.stage_id);
      if (!a || !b) continue;
      const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
      const x1 = ra.right - origin.left + box.scrollLeft, y1 = ra.top + ra.height / 2 - origin.top;
      const x2 = rb.left - origin.left + box.scrollLeft, y2 = rb.top + rb.height / 2 - origin.top;
      const path = document.createElementNS(svg.namespaceURI, "path");
      const mid = (x1 + x2) / 2;
      path.setAttribute("d", "M" + x1 + "," + y1 + " C" + mid + "," + y1 + " " + mid + "," + y2 + " " + x2 + "," + y2);
      path.dataset.from = dep;
      path.dataset.to = s.stage_id;
      svg.append(path);
    }
  }
}

/**
 * The selected fan-out stage's items (first 200), read again at most once a second while the page updates.
 * A read due within that second is put off to its end, never dropped: the last change (the execution
 * ending, say) may be the last push the page gets.
 */
let itemsTimer = null;
async function loadItems() {
  if (!selected) return;
  const wait = 1000 - (Date.now() - itemsAt);
  clearTimeout(itemsTimer);
  if (wait > 0) { itemsTimer = setTimeout(loadItems, wait); return; }
  itemsAt = Date.now();
  const stage = selected;
  try {
    const page = await api("/executions/" + encodeURIComponent(ID) + "/stages/" + encodeURIComponent(stage) + "/items?limit=200");
    if (stage !== selected) return;
    $("items-title").textContent = stage + ": " + (page.total === null ? "items not known yet" : page.total + " items");
    $("items-body").replaceChildren(...page.items.map((i) => el("tr", { dataset: { stageId: i.stage_id, status: i.status } }, [
      el("td", { class: "mono", text: i.stage_id }),
      el("td", null, [badge(i.status)]),
      el("td", { class: "num", text: i.attempts + " / " + i.max_attempts }),
      el("td", { class: "num", text: Math.round(i.progress) + "%" }),
      el("td", { class: "num", text: fmtMs(i.processing_ms) }),
      el("td", { class: i.error ? "error" : "", text: i.error ? i.error.code + ": " + i.error.message : "" }),
    ])));
    $("items").hidden = false;
  } catch (e) {
    problem("Could not read the items of " + stage + " (" + e.message + ").");
  }
}

function render(doc) {
  renderSummary(doc);
  renderWaiting(doc);
  renderActions(doc);
  renderGraph(doc);
  renderTimeline();
  if (selected) loadItems();
  const currency = doc.cost ? doc.cost.currency : null;
  const rows = doc.stages.slice().sort((a, b) => a.order - b.order).map((s) => stageRow(doc, s, currency));
  $("stages-body").replaceChildren(...rows);
  $("no-stages").hidden = rows.length > 0;
  $("updated").textContent = "updated " + new Date().toISOString().replace("T", " ").replace("Z", " UTC");
}

let socket = null;
/** Why the page polls instead of being pushed to, shown while it does. */
let note = "";

function show(doc) {
  failures = 0;
  problem(note);
  render(doc);
}

/** Polling, the fallback: every second until the execution ends. */
async function tick(gen) {
  if (gen !== generation || !token()) return;
  try {
    const doc = await api("/executions/" + encodeURIComponent(ID));
    if (gen !== generation) return;
    show(doc);
    if (TERMINAL.includes(doc.status)) { setLive(false, "final state"); return; }
    setLive(true, "polling (live updates unavailable)");
    timer = setTimeout(() => tick(gen), 1000);
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof Unauthorized) { setLive(false, ""); signOut("The token was refused: sign in again."); return; }
    if (e instanceof HttpError && (e.status === 404 || e.status === 400)) { setLive(false, ""); problem(e.message); return; }
    failures += 1;
    const wait = Math.min(15000, 1000 * 2 ** Math.min(failures, 4));
    setLive(false, "retrying");
    problem("Could not read the execution (" + e.message + "); retrying in " + Math.round(wait / 1000) + " s.");
    timer = setTimeout(() => tick(gen), wait);
  }
}

/** Live updates: a ticket from an authenticated request, then the socket; polling if either fails. */
async function connect(gen) {
  if (gen !== generation || !token()) return;
  let ticket;
  try {
    ticket = await api("/executions/" + encodeURIComponent(ID) + "/live-ticket", "POST");
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof Unauthorized) { setLive(false, ""); signOut("The token was refused: sign in again."); return; }
    return tick(gen);
  }
  let ended = false;
  let opened = false;
  const ws = new WebSocket(ticket.url, ticket.protocols);
  socket = ws;
  ws.onopen = () => { opened = true; if (gen === generation) setLive(true, "live"); };
  ws.onmessage = (e) => {
    if (gen !== generation) return;
    const msg = JSON.parse(e.data);
    if (msg.type !== "status") return;
    show(msg.document);
    if (TERMINAL.includes(msg.document.status)) { ended = true; setLive(false, "final state"); }
  };
  ws.onclose = () => {
    if (socket === ws) socket = null;
    if (gen !== generation || ended) return;
    note = opened ? "The live connection dropped; polling every second instead." : "Live updates are unavailable; polling every second instead.";
    problem(note);
    tick(gen);
  };
}

function start() {
  clearTimeout(timer);
  note = "";
  if (socket) socket.close();
  generation += 1;
  connect(generation);
}
const signOut = setupLogin(start);
$("signout").addEventListener("click", () => { generation += 1; clearTimeout(timer); if (socket) socket.close(); setLive(false, ""); });
`;

/** The page for one execution; `executionId` is already validated, and escaped here anyway. */
export function executionPage(executionId: string): Response {
  const id = escapeHtml(executionId);
  return htmlResponse(
    (nonce) => `${pageHead(nonce, `${id} · Orchestrator`, CSS + ACTIONS_CSS + WAITING_CSS + TIMELINE_CSS)}
<body data-execution-id="${id}">
${pageFrame({
  header: `<h1><a href="/ui">Executions</a> / <span class="mono" id="exec-id">${id}</span></h1>
  <span id="live" class="live"></span>`,
  problemClass: "error card",
  body: `  <section class="card">
    <dl class="summary">
      <div><dt>Status</dt><dd id="exec-status" data-status="">–</dd></div>
      <div><dt>Template</dt><dd id="template">–</dd></div>
      <div><dt>Client</dt><dd id="client" class="mono">–</dd></div>
      <div><dt>Request id</dt><dd id="request" class="mono">–</dd></div>
      <div><dt>Priority</dt><dd id="priority">–</dd></div>
      <div><dt>Created</dt><dd id="created">–</dd></div>
      <div><dt>Started</dt><dd id="started">–</dd></div>
      <div><dt>Completed</dt><dd id="completed">–</dd></div>
      <div><dt>Estimated completion</dt><dd id="estimated">–</dd></div>
      <div><dt>Duration</dt><dd id="duration">–</dd></div>
      <div><dt>Cost</dt><dd id="cost">–</dd></div>
      <div><dt>Error</dt><dd id="error">–</dd></div>
      <div id="exec-waiting" hidden><dt>Waiting on</dt><dd id="exec-waiting-on"></dd></div>
      <div><dt>Data deleted</dt><dd id="expired">–</dd></div>
    </dl>
  </section>${ACTIONS_HTML}
  <section class="card graph" id="graph" aria-label="pipeline graph"></section>${TIMELINE_HTML}
  <section class="card scroll" id="items" hidden>
    <h2 id="items-title" class="items-title"></h2>
    <table>
      <thead><tr><th>Item</th><th>Status</th><th class="num">Attempts</th><th class="num">Progress</th><th class="num">Processing</th><th>Error</th></tr></thead>
      <tbody id="items-body"></tbody>
    </table>
  </section>
  <section class="card scroll">
    <table id="stages">
      <thead><tr>
        <th class="num">#</th><th>Stage</th><th>Status</th><th class="num">Attempts</th><th class="num">Progress</th>
        <th class="num" title="waiting for resources">Waiting</th><th class="num">Processing</th><th>Timeline</th>
        <th>Usage</th><th class="num">Cost</th><th>Error</th>
      </tr></thead>
      <tbody id="stages-body"></tbody>
    </table>
    <p id="no-stages" class="muted">No stages yet: the template is still loading.</p>
  </section>
  <p id="updated" class="muted"></p>
`,
})}
${pageTail(nonce, SCRIPT + ACTIONS_JS + WAITING_JS + WAITING_SUMMARY_JS + TIMELINE_JS)}`,
  );
}
