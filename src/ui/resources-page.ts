import { pollingPage } from "./meters";
import { WAITING_JS } from "./waiting-on";

/**
 * `GET /ui/resources`: the ledger snapshot of every shard (`GET /resources`):
 * how many shards answered and which are down, pools more than one shard
 * holds, every pool's shard, capacity, use (a bar), what is available, its
 * waiters and a provider pause (`paused_until`), then the waiters in each
 * shard's queue order with why each waits (`waiting_on`). Read with the OPS
 * token, every POLL_MS.
 */
const CSS = `
.totals { display: flex; gap: 24px; margin-bottom: 8px; }
.paused { color: var(--warn); font-weight: 600; }
.down { color: var(--bad); font-weight: 600; }
`;

const SCRIPT = `
function poolRow(p) {
  const now = Date.now();
  const paused = p.paused_until !== undefined && p.paused_until > now;
  const u = p.in_use;
  return el("tr", { dataset: { pool: p.name, kind: p.kind } }, [
    el("td", { class: "mono", text: p.name }),
    el("td", { class: "num", dataset: { role: "shard" }, text: String(p.shard) }),
    el("td", { text: p.kind }),
    el("td", { class: "num", dataset: { role: "capacity" }, text: fmtNum(p.capacity) }),
    meter("in-use", u, p.capacity, fmtNum(u) + " / " + fmtNum(p.capacity)),
    el("td", { class: "num", dataset: { role: "available" }, text: fmtNum(p.available) }),
    el("td", { class: "num", dataset: { role: "waiting" }, text: fmtNum(p.waiting) }),
    el("td", { class: "num", text: p.refill_per_second === undefined ? "–" : fmtNum(p.refill_per_second) + "/s" }),
    el("td", { class: paused ? "paused mono" : "mono", dataset: { role: "paused-until", value: p.paused_until === undefined ? "" : String(p.paused_until) },
      text: paused ? fmtTime(new Date(p.paused_until).toISOString()) + " (" + fmtMs(p.paused_until - now) + ")" : "–" }),
  ]);
}
function waiterRow(w, i) {
  const link = el("a", { class: "mono", text: w.execution_id });
  link.href = "/ui/executions/" + encodeURIComponent(w.execution_id);
  return el("tr", { dataset: { reservationId: w.reservation_id, reason: w.waiting_on.reason } }, [
    el("td", { class: "num", text: String(i + 1) }),
    el("td", null, [link]),
    el("td", { class: "mono", text: w.stage_id }),
    el("td", { class: "num", text: String(w.shard) }),
    el("td", { class: "mono", text: w.client_id || "–" }),
    el("td", { text: w.priority + (w.effective_priority !== w.priority ? " → " + w.effective_priority : "") }),
    el("td", { dataset: { role: "waiting-on" } }, [waitingOnNode(w.waiting_on)]),
  ]);
}
function shardRow(s) {
  return el("li", { class: "down", dataset: { shard: String(s.shard), ok: String(s.ok) }, text: s.name + " (shard " + s.shard + "): down, " + (s.error || "no answer") + "; its pools and waiters are missing below" });
}
function render(snap) {
  const down = snap.shards.filter((s) => !s.ok);
  $("shards-up").textContent = fmtNum(snap.shards.length - down.length) + " of " + fmtNum(snap.shards.length);
  $("shards-down").replaceChildren(...down.map(shardRow));
  $("conflicts").replaceChildren(...snap.conflicts.map((c) => el("li", { dataset: { pool: c.pool }, text: c.pool + " has state on shards " + c.shards.join(", ") + "; it belongs to shard " + c.owner })));
  $("leases").textContent = fmtNum(snap.leases);
  $("waiters").textContent = fmtNum(snap.waiters);
  $("pool-rows").replaceChildren(...snap.pools.map(poolRow));
  $("waiter-rows").replaceChildren(...snap.queue.map(waiterRow));
  $("no-waiters").hidden = snap.queue.length > 0;
}
`;

export function resourcesPage(): Response {
  return pollingPage({
    title: "Resources",
    path: "/ui/resources",
    api: "/resources",
    css: CSS,
    script: WAITING_JS + SCRIPT,
    body: `  <div class="totals"><span>Shards answering: <strong id="shards-up">–</strong></span><span>Leases held: <strong id="leases">–</strong></span><span>Waiting: <strong id="waiters">–</strong></span></div>
  <ul id="shards-down"></ul>
  <ul id="conflicts" class="paused"></ul>
  <section class="card scroll">
    <table id="pools">
      <thead><tr>
        <th>Pool</th><th class="num">Shard</th><th>Kind</th><th class="num">Capacity</th><th>In use</th><th class="num">Available</th><th class="num">Waiters</th><th class="num">Refill</th><th>Paused until</th>
      </tr></thead>
      <tbody id="pool-rows"></tbody>
    </table>
  </section>
  <section class="card scroll">
    <h2>Waiting, in queue order</h2>
    <table id="queue">
      <thead><tr><th class="num">#</th><th>Execution</th><th>Stage</th><th class="num">Shard</th><th>Client</th><th>Priority</th><th>Waiting on</th></tr></thead>
      <tbody id="waiter-rows"></tbody>
    </table>
    <p id="no-waiters" class="muted" hidden>Nothing is waiting.</p>
  </section>`,
  });
}
