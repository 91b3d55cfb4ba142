import { htmlResponse, pageFrame, pageHead, pageTail } from "./common";

/**
 * What the clients and resources pages share: a usage bar (`meter`), the
 * header's links between the operator pages, and a poller that reads one
 * route every POLL_MS while signed in, says when it last did, and signs out on 401.
 */
export const POLL_MS = 2000;

export const METER_CSS = `
.meter { display: inline-block; vertical-align: middle; width: 120px; height: 10px; border-radius: 5px; background: var(--line); overflow: hidden; margin-right: 8px; }
.meter > span { display: block; height: 100%; background: var(--run); }
.meter[data-level="high"] > span { background: var(--warn); }
.meter[data-level="full"] > span { background: var(--bad); }
.meter-text { font-variant-numeric: tabular-nums; white-space: nowrap; }
nav.pages { display: flex; gap: 14px; }
nav.pages a[aria-current="page"] { font-weight: 600; text-decoration: none; color: var(--fg); }
.scroll { overflow-x: auto; }
`;

/** The header links; `current` is the page's own path. */
export function navHtml(current: string): string {
  const links: [string, string][] = [
    ["/ui", "Executions"],
    ["/ui/clients", "Clients"],
    ["/ui/resources", "Resources"],
  ];
  return `<nav class="pages">${links.map(([href, label]) => `<a href="${href}"${href === current ? ' aria-current="page"' : ""}>${label}</a>`).join("")}</nav>`;
}

/**
 * Browser-side: `meter(role, value, max, text)` is a cell with a bar
 * (`data-value`, `data-max`; no bar when `max` is null: no limit) and its
 * text; `poll(path, render)` reads `path` every POLL_MS and hands the body to `render`.
 */
export const METER_JS = `
function meter(role, value, max, text) {
  const cell = el("td", { dataset: { role, value: String(value), max: max === null || max === undefined ? "" : String(max) } });
  if (max !== null && max !== undefined) {
    const frac = max > 0 ? Math.min(1, value / max) : (value > 0 ? 1 : 0);
    const bar = el("span");
    bar.style.width = (frac * 100).toFixed(1) + "%";
    cell.append(el("div", { class: "meter", dataset: { level: frac >= 1 ? "full" : frac >= 0.8 ? "high" : "ok" } }, [bar]));
  }
  cell.append(el("span", { class: "meter-text", text }));
  return cell;
}
function fmtNum(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 }); }
let pollTimer = null;
let pollGeneration = 0;
function poll(path, render) {
  const gen = ++pollGeneration;
  clearTimeout(pollTimer);
  const tick = async () => {
    if (gen !== pollGeneration || !token()) return;
    try {
      const body = await api(path);
      if (gen !== pollGeneration) return;
      $("problem").textContent = "";
      render(body);
      $("updated").textContent = "updated " + new Date().toISOString().replace("T", " ").replace("Z", " UTC") + " · every ${POLL_MS / 1000} s";
    } catch (e) {
      if (gen !== pollGeneration) return;
      if (e instanceof Unauthorized) { signOut("The token was refused: sign in again."); return; }
      $("problem").textContent = "Could not read " + path + " (" + e.message + "); retrying.";
    }
    pollTimer = setTimeout(tick, ${POLL_MS});
  };
  tick();
}
`;

/**
 * A polling operator page: the header (title, the links, sign out), the
 * sign-in form, and `body` (trusted markup) between the problem line and the
 * "updated" line; `script` (which defines `render(body)`) runs after METER_JS,
 * then the sign-in starts polling `api` and sign-out stops it.
 */
export function pollingPage(page: {
  title: string;
  path: string;
  api: string;
  css?: string;
  body: string;
  script: string;
}): Response {
  const start = `const signOut = setupLogin(() => poll(${JSON.stringify(page.api)}, render));
$("signout").addEventListener("click", () => { pollGeneration++; clearTimeout(pollTimer); });
`;
  return htmlResponse(
    (nonce) => `${pageHead(nonce, `${page.title} · Orchestrator`, METER_CSS + (page.css ?? ""))}
<body>
${pageFrame({
  header: `<h1>${page.title}</h1>
  ${navHtml(page.path)}`,
  body: `${page.body}
  <p id="updated" class="muted"></p>`,
})}
${pageTail(nonce, METER_JS + page.script + start)}`,
  );
}
