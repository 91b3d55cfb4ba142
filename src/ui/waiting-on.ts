/**
 * `waiting_on` (docs/ledger.md, "Why is it waiting") as the pages show it:
 * the reason in words, the pools, the place in the queue and the expected
 * wait. `waitingOnNode(w)` is browser-side script; the node carries the raw
 * fields as data attributes for tests and tools.
 */
export const WAITING_CSS = `
.waiting-on { font-size: 12px; color: var(--warn); }
`;

export const WAITING_JS = `
const WAIT_REASONS = {
  capacity: "pool capacity",
  client_quota: "the client's quota",
  client_budget: "the client's budget",
  client_rate: "the client's rate",
  provider_backoff: "provider backoff",
  paused: "paused",
};
function waitingOnNode(w) {
  const pools = w.pools && w.pools.length ? " on " + w.pools.join(", ") : "";
  const text = "waiting for " + (WAIT_REASONS[w.reason] || w.reason) + pools + " · #" + w.position + " · about " + fmtMs(w.estimated_wait_ms);
  return el("div", { class: "waiting-on", dataset: { role: "waiting-on", reason: w.reason, position: String(w.position), pools: (w.pools || []).join(","), estimatedWaitMs: String(w.estimated_wait_ms) }, text });
}
`;

/** The execution page's hook: a queued execution's own `waiting_on` (a client quota) in the summary. */
export const WAITING_SUMMARY_JS = `
function renderWaiting(doc) {
  $("exec-waiting").hidden = !doc.waiting_on;
  $("exec-waiting-on").replaceChildren(...(doc.waiting_on ? [waitingOnNode(doc.waiting_on)] : []));
}
`;
