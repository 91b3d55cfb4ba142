/**
 * The execution page's waterfall (docs/operations.md, "Traces"): one row per
 * stage and item attempt across the workers, from `GET /executions/{id}/spans`
 * (the same spans the trace carries: each row names its span id), on the
 * execution's time axis, with the three phases in their own shades: waiting
 * for resources, handshake (input check, handshake and process calls) and
 * processing. The page calls `renderTimeline(doc)` on every update; the spans
 * are read again at most once a second, and a read due within that second is
 * put off to its end, never dropped (the last push may be the execution ending).
 */
export const TIMELINE_CSS = `
.wf-legend { display: flex; gap: 14px; font-size: 12px; color: var(--muted); margin: 0 0 8px; flex-wrap: wrap; }
.wf-legend i { display: inline-block; width: 12px; height: 10px; margin-right: 4px; vertical-align: middle; border-radius: 2px; }
.wf-row { display: grid; grid-template-columns: minmax(220px, 280px) 1fr; gap: 10px; align-items: center; padding: 3px 0; border-bottom: 1px solid var(--line); }
.wf-label { font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.wf-track { position: relative; height: 16px; background: color-mix(in srgb, var(--line) 40%, transparent); border-radius: 3px; }
.wf-bar { position: absolute; top: 2px; bottom: 2px; display: flex; min-width: 2px; border-radius: 2px; overflow: hidden; }
.wf-seg { height: 100%; }
.wf-seg[data-phase=waiting] { background: var(--wf-c); opacity: .28; }
.wf-seg[data-phase=handshake] { background: var(--wf-c); opacity: .6; }
.wf-seg[data-phase=processing] { background: var(--wf-c); }
.wf-bar { --wf-c: var(--run); } .wf-bar.o-completed { --wf-c: var(--ok); } .wf-bar.o-failed { --wf-c: var(--bad); } .wf-bar.o-cancelled { --wf-c: var(--warn); }
.wf-key { background: var(--run); } .wf-key[data-phase=waiting] { opacity: .28; } .wf-key[data-phase=handshake] { opacity: .6; }
.wf-axis { display: flex; justify-content: space-between; font-size: 11px; color: var(--muted); margin-left: 290px; }
`;

export const TIMELINE_HTML = `
  <section class="card" id="waterfall" aria-label="timeline of every attempt">
    <h2 class="items-title">Waterfall <span class="muted" id="wf-note"></span></h2>
    <div class="wf-legend"><span><i class="wf-key" data-phase="waiting"></i>waiting for resources</span><span><i class="wf-key" data-phase="handshake"></i>handshake</span>
      <span><i class="wf-key" data-phase="processing"></i>processing</span><span class="mono" id="wf-trace"></span></div>
    <div id="wf-rows"></div>
    <div class="wf-axis"><span id="wf-start"></span><span id="wf-end"></span></div>
  </section>`;

export const TIMELINE_JS = `
let wfAt = 0;
let wfTimer = null;
function renderTimeline() {
  const wait = 1000 - (Date.now() - wfAt);
  clearTimeout(wfTimer);
  if (wait > 0) { wfTimer = setTimeout(renderTimeline, wait); return; }
  wfAt = Date.now();
  api("/executions/" + encodeURIComponent(ID) + "/spans").then(drawTimeline, (e) => {
    if (e instanceof Unauthorized) return;
    $("wf-note").textContent = "(could not read the spans: " + e.message + ")";
  });
}
function drawTimeline(doc) {
  const t0 = Date.parse(doc.created_at);
  const now = Date.now();
  const end = doc.completed_at ? Date.parse(doc.completed_at) : Math.max(now, ...doc.spans.map((s) => Date.parse(s.ended_at || s.queued_at)));
  const total = Math.max(1, end - t0);
  const pct = (ms) => Math.min(100, Math.max(0, (ms / total) * 100)) + "%";
  const rows = doc.spans.map((s) => {
    const start = Date.parse(s.queued_at);
    const bar = el("div", { class: "wf-bar o-" + (s.outcome === null ? "open" : s.outcome === "completed" ? "completed" : s.outcome === "cancelled" ? "cancelled" : "failed") });
    bar.style.left = pct(start - t0);
    const length = s.waiting_ms + s.handshake_ms + s.processing_ms;
    bar.style.width = pct(length);
    for (const phase of ["waiting", "handshake", "processing"]) {
      const ms = s[phase + "_ms"];
      const seg = el("div", { class: "wf-seg", title: phase + " " + fmtMs(ms), dataset: { phase, ms: String(ms) } });
      seg.style.width = length > 0 ? (ms / length) * 100 + "%" : "0";
      bar.append(seg);
    }
    const label = s.stage_id + " #" + s.attempt + " · " + s.worker;
    return el("div", { class: "wf-row", title: label + (s.outcome ? " · " + s.outcome : " · running"),
      dataset: { stageId: s.stage_id, attempt: String(s.attempt), worker: s.worker, spanId: s.span_id || "", outcome: s.outcome || "" } }, [
      el("span", { class: "wf-label mono", text: label }),
      el("div", { class: "wf-track" }, [bar]),
    ]);
  });
  $("wf-rows").replaceChildren(...rows);
  $("wf-note").textContent = "(" + doc.spans.length + " attempts" + (doc.truncated ? ", the first 2000 shown" : "") + ")";
  $("wf-trace").textContent = doc.trace_id ? "trace " + doc.trace_id : "";
  $("wf-start").textContent = fmtTime(doc.created_at);
  $("wf-end").textContent = doc.completed_at ? fmtTime(doc.completed_at) : "now";
}
`;
