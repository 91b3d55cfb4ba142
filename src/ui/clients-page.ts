import { pollingPage } from "./meters";

/**
 * `GET /ui/clients`: every client the ledger knows (`GET /clients`), with the
 * quotas in force and usage bars: running executions and stages against their
 * quotas, this month's spend (settled, plus what running stages hold) against
 * the budget, and the stages waiting. Read with the OPS token, every POLL_MS.
 */
const SCRIPT = `
function quotaText(n) { return n === undefined ? "no limit" : fmtNum(n); }
function rateText(rate) {
  if (!rate) return "–";
  return Object.entries(rate).map(([pool, r]) => pool + " " + fmtNum(r.per_minute) + "/min").join(", ") || "–";
}
function clientRow(c) {
  const q = c.quotas, u = c.usage;
  const budget = q.monthly_budget;
  const used = u.spent + u.held;
  return el("tr", { dataset: { clientId: c.client_id } }, [
    el("td", { class: "mono", text: c.client_id }),
    el("td", { class: "num", dataset: { role: "weight" }, text: q.weight === undefined ? "1" : String(q.weight) }),
    el("td", { dataset: { role: "max-priority" }, text: q.max_priority || "critical" }),
    meter("running-executions", u.running_executions, q.max_running_executions, fmtNum(u.running_executions) + " / " + quotaText(q.max_running_executions)),
    meter("running-stages", u.running_stages, q.max_running_stages, fmtNum(u.running_stages) + " / " + quotaText(q.max_running_stages)),
    meter("spend", used, budget, fmtCost(u.spent, c.currency) + (u.held ? " + " + fmtNum(u.held) + " held" : "") + " / " + (budget === undefined ? "no budget" : fmtCost(budget, c.currency))),
    el("td", { class: "num", dataset: { role: "remaining" }, text: u.remaining === null ? "–" : fmtCost(u.remaining, c.currency) }),
    el("td", { class: "num", dataset: { role: "waiting" }, text: fmtNum(u.waiting_stages) }),
    el("td", { class: "mono", dataset: { role: "rate" }, text: rateText(q.rate) }),
    el("td", { class: "num", dataset: { role: "starts" }, text: quotaText(q.max_starts_per_minute) }),
    el("td", { class: "mono", text: u.month }),
  ]);
}
function render(body) {
  const rows = body.clients.map(clientRow);
  $("client-rows").replaceChildren(...rows);
  $("no-clients").hidden = rows.length > 0;
}
`;

export function clientsPage(): Response {
  return pollingPage({
    title: "Clients",
    path: "/ui/clients",
    api: "/clients",
    script: SCRIPT,
    body: `  <section class="card scroll">
    <table id="clients">
      <thead><tr>
        <th>Client</th><th class="num">Weight</th><th>Max priority</th><th>Running executions</th><th>Running stages</th>
        <th>Spend this month</th><th class="num">Remaining</th><th class="num">Waiting stages</th><th>Rate</th><th class="num">Starts / min</th><th>Month</th>
      </tr></thead>
      <tbody id="client-rows"></tbody>
    </table>
    <p id="no-clients" class="muted" hidden>No client has quotas or usage yet.</p>
  </section>`,
  });
}
