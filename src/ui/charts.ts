import { UPLOT_CSS, UPLOT_JS } from "./vendor/uplot";

/**
 * The charts on `/ui` (docs/operations.md, "Charts"), drawn with uPlot
 * (src/ui/vendor/uplot.ts, inlined under the page's nonce: nothing is loaded
 * from anywhere) from `GET /metrics/series?window=`: executions per minute by
 * status, stage processing latency p50/p95 per worker, queue length per pool
 * and cost per client, for the client the overview filters on (if any).
 * Under each chart its numbers are rendered as a table
 * (the browser test reads them there), the chart itself is a canvas.
 */
export const CHARTS_CSS = `${UPLOT_CSS}
.charts-head { display: flex; align-items: center; gap: 12px; }
.charts-head h2 { margin: 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; margin-top: 12px; }
.chart { overflow-x: auto; min-width: 0; }
.chart h3 { font-size: 14px; margin: 0 0 6px; }
.chart .plot { min-height: 200px; }
.chart table.numbers { margin-top: 8px; }
.chart details summary { cursor: pointer; color: var(--muted); font-size: 12px; margin-top: 6px; }
.chart .u-legend { font-size: 12px; }
`;

export const CHARTS_HTML = `
  <div class="charts-head">
    <h2>Charts</h2>
    <label>Window<select id="c-window">
      <option value="1h" selected>last hour</option><option value="24h">last day</option><option value="7d">last week</option>
    </select></label>
    <span id="charts-note" class="muted"></span>
  </div>
  <div class="charts" id="charts">
    <section class="card chart" id="chart-executions" data-chart="executions">
      <h3>Executions per minute, by status</h3><div class="plot"></div>
      <details open><summary>numbers (executions ended per bucket)</summary>
      <table class="numbers"><thead><tr><th>Bucket</th><th class="num">completed</th><th class="num">failed</th><th class="num">cancelled</th></tr></thead><tbody></tbody></table></details>
    </section>
    <section class="card chart" id="chart-latency" data-chart="latency">
      <h3>Stage latency p50 / p95 per worker (processing)</h3><div class="plot"></div>
      <details open><summary>numbers (completed attempts over the window)</summary>
      <table class="numbers"><thead><tr><th>Worker</th><th class="num">attempts</th><th class="num">waiting p50</th><th class="num">waiting p95</th>
        <th class="num">handshake p50</th><th class="num">handshake p95</th><th class="num">processing p50</th><th class="num">processing p95</th></tr></thead><tbody></tbody></table></details>
    </section>
    <section class="card chart" id="chart-queue" data-chart="queue">
      <h3>Queue length per pool</h3><div class="plot"></div>
      <details open><summary>numbers (sampled from the ledger)</summary>
      <table class="numbers"><thead><tr><th>Pool</th><th class="num">samples</th><th class="num">max</th><th class="num">latest sample</th></tr></thead><tbody></tbody></table></details>
    </section>
    <section class="card chart" id="chart-cost" data-chart="cost">
      <h3>Cost per client</h3><div class="plot"></div>
      <details open><summary>numbers (executions ended in the window)</summary>
      <table class="numbers"><thead><tr><th>Client</th><th class="num">cost</th></tr></thead><tbody></tbody></table></details>
    </section>
  </div>`;

/**
 * Page script, uPlot first (one script element, under the nonce): `loadCharts()`
 * reads the series and draws them; the overview calls it on every refresh.
 */
export const CHARTS_JS = `${UPLOT_JS}

const PALETTE = ["#0b5cad", "#137a3a", "#b3261e", "#9a6700", "#7b3fb5", "#0f8a8a", "#c2410c", "#4b5563"];
const STATUS_COLOUR = { completed: "#137a3a", failed: "#b3261e", cancelled: "#9a6700" };
const plots = new Map();
let chartsGeneration = 0;

function draw(name, series, data, opts) {
  const box = document.querySelector("#chart-" + name + " .plot");
  if (plots.has(name)) { plots.get(name).destroy(); plots.delete(name); }
  box.replaceChildren();
  const fg = getComputedStyle(document.body).color;
  const axis = { stroke: fg, grid: { stroke: "rgba(128,128,128,.2)" }, ticks: { stroke: "rgba(128,128,128,.3)" } };
  const plot = new uPlot({
    width: Math.max(300, box.clientWidth || 520),
    height: 200,
    scales: { x: { time: true } },
    axes: [axis, { ...axis, size: 70, values: (opts && opts.values) || ((u, ticks) => ticks.map((t) => +t.toPrecision(3))) }],
    // Points as well as lines: a series with one non-empty bucket is still seen.
    series: [{}, ...series.map((x) => ({ points: { show: true, size: 5 }, ...x }))],
  }, data, box);
  plots.set(name, plot);
  box.dataset.series = String(series.length);
}

function cell(text, role, value) {
  return el("td", { class: "num", text, dataset: role ? { role, value: String(value) } : undefined });
}

function renderExecutions(doc, xs) {
  const perMinute = doc.bucket_ms / 60000;
  const statuses = ["completed", "failed", "cancelled"];
  draw("executions", statuses.map((s) => ({ label: s, stroke: STATUS_COLOUR[s], width: 2, value: (u, v) => v === null ? "–" : (+v).toFixed(2) + "/min" })),
    [xs, ...statuses.map((s) => doc.executions[s].map((n) => n / perMinute))]);
  const rows = [];
  doc.buckets.forEach((b, i) => {
    const counts = statuses.map((s) => doc.executions[s][i]);
    if (counts.every((n) => n === 0)) return;
    rows.push(el("tr", { dataset: { bucket: b } }, [el("td", { class: "mono", text: fmtTime(b) }), ...statuses.map((s, k) => cell(String(counts[k]), s, counts[k]))]));
  });
  document.querySelector("#chart-executions table.numbers tbody").replaceChildren(...rows);
}

function renderLatency(doc, xs) {
  const series = [];
  const data = [xs];
  doc.latency.forEach((w, i) => {
    const colour = PALETTE[i % PALETTE.length];
    series.push({ label: w.worker + " p50", stroke: colour, width: 2, spanGaps: true, value: (u, v) => fmtMs(v) });
    series.push({ label: w.worker + " p95", stroke: colour, width: 1, dash: [6, 4], spanGaps: true, value: (u, v) => fmtMs(v) });
    data.push(w.processing_p50, w.processing_p95);
  });
  draw("latency", series, data, { values: (u, ticks) => ticks.map((t) => fmtMs(t)) });
  document.querySelector("#chart-latency table.numbers tbody").replaceChildren(...doc.latency.map((w) => el("tr", { dataset: { worker: w.worker } }, [
    el("td", { class: "mono", text: w.worker }),
    cell(String(w.attempts), "attempts", w.attempts),
    ...["waiting_ms", "handshake_ms", "processing_ms"].flatMap((k) => [
      cell(fmtMs(w[k].p50), k + "-p50", w[k].p50), cell(fmtMs(w[k].p95), k + "-p95", w[k].p95),
    ]),
  ])));
}

function renderQueue(doc, xs) {
  draw("queue", doc.queue.map((p, i) => ({ label: p.pool, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true })), [xs, ...doc.queue.map((p) => p.waiting)]);
  document.querySelector("#chart-queue table.numbers tbody").replaceChildren(...doc.queue.map((p) => {
    const max = Math.max(...p.waiting.filter((v) => v !== null));
    return el("tr", { dataset: { pool: p.pool, latestAt: p.latest.at } }, [
      el("td", { class: "mono", text: p.pool }),
      cell(String(p.samples), "samples", p.samples),
      cell(String(max), "max", max),
      el("td", { class: "num", title: "sampled " + fmtTime(p.latest.at), text: String(p.latest.waiting), dataset: { role: "latest", value: String(p.latest.waiting) } }),
    ]);
  }));
}

function renderCost(doc, xs) {
  draw("cost", doc.cost.map((c, i) => ({ label: c.client_id, stroke: PALETTE[i % PALETTE.length], width: 2, value: (u, v) => fmtCost(v, doc.currency) })),
    [xs, ...doc.cost.map((c) => c.cost)]);
  document.querySelector("#chart-cost table.numbers tbody").replaceChildren(...doc.cost.map((c) => el("tr", { dataset: { client: c.client_id } }, [
    el("td", { class: "mono", text: c.client_id }), cell(fmtCost(c.total, doc.currency), "total", c.total),
  ])));
}

async function loadCharts() {
  const gen = ++chartsGeneration;
  const win = $("c-window").value;
  try {
    const q = new URLSearchParams({ window: win });
    // The overview's client filter applies to the charts too (the queue is every client's).
    const client = $("f-client_id").value.trim();
    if (client) q.set("client_id", client);
    const doc = await api("/metrics/series?" + q);
    if (gen !== chartsGeneration) return;
    // uPlot's x values are unix seconds: the middle of each bucket.
    const xs = doc.buckets.map((b) => (Date.parse(b) + doc.bucket_ms / 2) / 1000);
    renderExecutions(doc, xs);
    renderLatency(doc, xs);
    renderQueue(doc, xs);
    renderCost(doc, xs);
    const charts = $("charts");
    charts.dataset.window = doc.window;
    charts.dataset.until = doc.until;
    charts.dataset.bucketMs = String(doc.bucket_ms);
    $("charts-note").textContent = (doc.truncated ? "partial: a bound was reached; " : "") + "buckets of " + fmtMs(doc.bucket_ms) + ", up to " + fmtTime(doc.until);
  } catch (e) {
    if (gen !== chartsGeneration) return;
    if (e instanceof Unauthorized) throw e;
    $("charts-note").textContent = "Could not read the series: " + e.message;
  }
}
$("c-window").addEventListener("change", () => loadCharts());
`;
