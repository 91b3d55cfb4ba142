/**
 * What the operator pages share: escaping, the HTML response with a strict
 * Content-Security-Policy (inline style and script allowed by a per-response
 * nonce only, data fetched from this origin only), the look, and the sign-in
 * with the OPS token kept in the tab's sessionStorage.
 *
 * The pages are self-contained strings: no build step, no external assets, so
 * they work offline. They carry no data; the script fetches it with the token
 * and renders it with `textContent` and DOM properties only, never as markup.
 */

const HTML_ESCAPES: Record<string, string> = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(value: unknown): string {
  return String(value).replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
}

/** True when the caller asks for a page: `text/html` listed, and preferred over JSON (a tie goes to JSON). */
export function wantsHtml(request: Request): boolean {
  const accept = request.headers.get("accept");
  if (!accept) return false;
  let html = 0;
  let jsonQ = 0;
  for (const part of accept.split(",")) {
    const [type, ...ps] = part.trim().toLowerCase().split(";");
    const qp = ps.map((p) => p.trim()).find((p) => p.startsWith("q="));
    const q = qp ? Number(qp.slice(2)) : 1;
    const weight = Number.isFinite(q) ? q : 0;
    if (type === "text/html") html = Math.max(html, weight);
    if (type === "application/json") jsonQ = Math.max(jsonQ, weight);
  }
  return html > 0 && html > jsonQ;
}

function nonce(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

/** Renders a page with a fresh nonce and the headers every page gets. */
export function htmlResponse(render: (nonce: string) => string, status = 200): Response {
  const n = nonce();
  return new Response(render(n), {
    status,
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": [
        "default-src 'none'",
        `script-src 'nonce-${n}'`,
        `style-src 'nonce-${n}'`,
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
      ].join("; "),
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-store",
      vary: "Accept",
    },
  });
}

/** The `<head>` every page shares; `title` must already be escaped. */
export function pageHead(nonce: string, title: string, css: string): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>${title}</title>
<style nonce="${nonce}">${BASE_CSS}${css}</style>
</head>`;
}

/** The end every page shares: the sign-in script and the page's own. */
export function pageTail(nonce: string, script: string): string {
  return `<script nonce="${nonce}">"use strict";
${AUTH_JS}
${script}
</script>
</body>
</html>`;
}

export const BASE_CSS = `
:root { color-scheme: light dark; --fg: #1d2430; --muted: #5d6878; --bg: #f6f7f9; --card: #fff; --line: #dde1e7;
  --ok: #137a3a; --bad: #b3261e; --warn: #9a6700; --run: #0b5cad; --idle: #6b7280; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e9ee; --muted: #9aa4b2; --bg: #14171c; --card: #1c2027; --line: #2e3440;
  --ok: #4cc27a; --bad: #f2786d; --warn: #e3b341; --run: #6cb0ff; --idle: #9aa4b2; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; gap: 12px; align-items: center; padding: 12px 20px; border-bottom: 1px solid var(--line); background: var(--card); flex-wrap: wrap; }
header h1 { font-size: 16px; margin: 0; font-weight: 600; }
header .spacer { flex: 1; }
a { color: var(--run); }
main { padding: 16px 20px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
.mono, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.muted { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 7px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; border: 1px solid currentColor; white-space: nowrap; }
.st-completed { color: var(--ok); } .st-failed { color: var(--bad); } .st-cancelled { color: var(--warn); }
.st-running, .st-processing, .st-handshaking { color: var(--run); } .st-waiting_resources, .st-paused, .st-awaiting_approval { color: var(--warn); }
.st-queued, .st-pending { color: var(--idle); }
.error { color: var(--bad); }
button { font: inherit; padding: 5px 12px; border-radius: 6px; border: 1px solid var(--line); background: var(--card); color: var(--fg); cursor: pointer; }
button.primary { background: var(--run); color: #fff; border-color: var(--run); }
input, select { font: inherit; padding: 5px 8px; border-radius: 6px; border: 1px solid var(--line); background: var(--card); color: var(--fg); }
label { display: inline-flex; flex-direction: column; gap: 2px; font-size: 12px; color: var(--muted); margin-right: 10px; }
form.login { max-width: 420px; margin: 40px auto; }
form.login label { display: flex; margin: 0 0 10px; }
.live { font-size: 12px; color: var(--muted); }
.live.on::before { content: "●"; color: var(--ok); margin-right: 4px; }
[hidden] { display: none !important; }
`;

/**
 * Browser-side helpers, as script text: the token in sessionStorage, the
 * sign-in form, and `api(path, method?, payload?)` that fetches JSON with the token and signs
 * out on 401.
 */
export const AUTH_JS = `
const TOKEN_KEY = "orchestrator.ops_token";
const $ = (id) => document.getElementById(id);
function token() { try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; } }
function setToken(t) { try { if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY); } catch {} }
class Unauthorized extends Error {}
class HttpError extends Error { constructor(status, body) { super((body && body.error && body.error.message) || ("HTTP " + status)); this.status = status; this.body = body; } }
async function api(path, method, payload) {
  const headers = { accept: "application/json", authorization: "Bearer " + token() };
  if (payload !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method: method || "GET", headers, body: payload === undefined ? undefined : JSON.stringify(payload), cache: "no-store" });
  let body = null;
  try { body = await res.json(); } catch {}
  if (res.status === 401) { setToken(null); throw new Unauthorized("the token was refused"); }
  if (!res.ok) throw new HttpError(res.status, body);
  return body;
}
function el(tag, props, children) {
  const e = document.createElement(tag);
  if (props) for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") e.textContent = String(v);
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children || []) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
  const m = Math.floor(ms / 60000), s = Math.round((ms % 60000) / 1000);
  if (m < 60) return m + " min " + s + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").replace("Z", " UTC");
}
function fmtCost(n, currency) {
  if (n === null || n === undefined) return "–";
  return (currency ? currency + " " : "") + Number(n).toLocaleString("en-US", { maximumSignificantDigits: 4 });
}
function badge(status) { return el("span", { class: "badge st-" + String(status).replace(/[^a-z_]/g, ""), text: status }); }
function setupLogin(onReady) {
  const form = $("login"), input = $("token"), err = $("login-error"), app = $("app"), out = $("signout");
  const show = (signedIn, message) => {
    form.hidden = signedIn; app.hidden = !signedIn; out.hidden = !signedIn;
    err.textContent = message || "";
    if (!signedIn) input.focus();
  };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) { err.textContent = "enter the OPS token"; return; }
    setToken(t); input.value = ""; show(true); onReady();
  });
  out.addEventListener("click", () => { setToken(null); show(false); });
  const signOut = (message) => show(false, message);
  if (token()) { show(true); onReady(); } else show(false);
  return signOut;
}
`;

/** The sign-in form and the sign-out button both pages carry. */
export const LOGIN_HTML = `
<form id="login" class="login card" hidden autocomplete="off">
  <h2>Sign in</h2>
  <p class="muted">Operators read with the <code>OPS_TOKEN</code>. It is kept in this tab's session storage only.</p>
  <label for="token">OPS token<input id="token" name="token" type="password" autocomplete="off" spellcheck="false"></label>
  <button class="primary" type="submit" id="signin">Sign in</button>
  <p id="login-error" class="error" role="alert"></p>
</form>`;

/**
 * The frame every operator page shares: the header (`header` left, `tools` before
 * the sign-out button on the right), the sign-in form, and the app (hidden until
 * signed in) with its problem line above `body` (trusted markup).
 */
export function pageFrame(frame: { header: string; tools?: string; problemClass?: string; body: string }): string {
  return `<header>
  ${frame.header}
  <span class="spacer"></span>
  ${frame.tools ?? ""}<button type="button" id="signout" hidden>Sign out</button>
</header>
<main>
${LOGIN_HTML}
<div id="app" hidden>
  <p id="problem" class="${frame.problemClass ?? "error"}" role="alert"></p>
${frame.body}
</div>
</main>`;
}
