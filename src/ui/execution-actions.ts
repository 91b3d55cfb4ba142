/**
 * The operator's controls on the execution page (docs/operations.md, "The
 * execution page"): pause, resume, cancel (after a confirmation), rerun from a
 * chosen stage and, on a stage awaiting approval, approve or reject with a
 * comment. Each button calls the existing route with the token the page signed
 * in with (the same `api()` the page reads with), so the page can do nothing
 * its token may not; the answer, or the error's HTTP status and code, is shown
 * under the buttons. The server decides what is allowed: a button is never
 * hidden or disabled by the page's idea of the state (only while its own
 * request is out), so a refusal such as 409 `not_paused` is shown as the
 * server gives it.
 *
 * The page includes ACTIONS_CSS, ACTIONS_HTML and ACTIONS_JS, and calls
 * `renderActions(doc)` from its `render(doc)`; ACTIONS_JS uses the page's
 * `api`, `el`, `$`, `show` and `signOut`.
 */

/** An approval comment's limit, as `DecisionRequest` (schemas/api.ts) has it. */
export const MAX_COMMENT_CHARS = 2_000;

export const ACTIONS_CSS = `
.actions { display: flex; flex-wrap: wrap; gap: 8px 10px; align-items: flex-end; }
.actions .sep { width: 1px; align-self: stretch; background: var(--line); margin: 0 4px; }
.actions label { margin-right: 0; }
button.danger { color: var(--bad); border-color: var(--bad); }
#act-answer { margin: 10px 0 0; }
#act-answer:empty { display: none; }
#act-answer[data-outcome="ok"] { color: var(--ok); }
#act-answer[data-outcome="error"] { color: var(--bad); }
.approval { margin-top: 12px; padding-top: 10px; border-top: 1px solid var(--line); }
.approval textarea { display: block; width: 100%; max-width: 640px; min-height: 56px; font: inherit; padding: 6px 8px; border-radius: 6px; border: 1px solid var(--line); background: var(--card); color: var(--fg); margin: 4px 0 6px; }
.approval .row { display: flex; gap: 10px; align-items: center; }
`;

export const ACTIONS_HTML = `
  <section class="card" id="actions" aria-label="operator actions">
    <div class="actions">
      <button type="button" id="act-pause" data-action="pause">Pause</button>
      <button type="button" id="act-resume" data-action="resume">Resume</button>
      <button type="button" id="act-cancel" data-action="cancel" class="danger">Cancel…</button>
      <span class="sep"></span>
      <label for="act-rerun-from">Rerun from stage<select id="act-rerun-from"><option value="">default</option></select></label>
      <button type="button" id="act-rerun" data-action="rerun">Rerun</button>
    </div>
    <div id="act-approvals"></div>
    <p id="act-answer" role="status" data-outcome="" data-code=""></p>
  </section>`;

export const ACTIONS_JS = `
const MAX_COMMENT = ${MAX_COMMENT_CHARS};
const ACT = "/executions/" + encodeURIComponent(ID);

/** The answer under the buttons: what was done, or the status and code of the refusal. */
function answer(outcome, code, text, link) {
  const p = $("act-answer");
  p.dataset.outcome = outcome;
  p.dataset.code = code;
  p.replaceChildren(text);
  if (link) p.append(" ", link);
}

/** One request for one button: the button is disabled while it is out; the answer or the error is shown. */
async function act(button, label, path, payload, done) {
  button.disabled = true;
  answer("pending", "", label + "…");
  try {
    const body = await api(path, "POST", payload);
    done(body);
  } catch (e) {
    if (e instanceof Unauthorized) { signOut("The token was refused: sign in again."); return; }
    const code = e instanceof HttpError ? (e.body && e.body.error && e.body.error.code) || "http_" + e.status : "network_error";
    const status = e instanceof HttpError ? e.status + " " : "";
    const fields = e instanceof HttpError && e.body && e.body.error && Array.isArray(e.body.error.details)
      ? " (" + e.body.error.details.map((d) => d.path + ": " + d.message).join("; ") + ")" : "";
    answer("error", code, label + " refused: " + status + code + ": " + e.message + fields);
  } finally {
    button.disabled = false;
  }
}

/** A status document back from the server: shown at once (the live socket may follow with the same). */
function applied(label) {
  return (doc) => { answer("ok", "", label + ": the execution is " + doc.status + "."); show(doc); };
}

$("act-pause").addEventListener("click", (ev) => act(ev.currentTarget, "Pause", ACT + "/pause", undefined, applied("Paused")));
$("act-resume").addEventListener("click", (ev) => act(ev.currentTarget, "Resume", ACT + "/resume", undefined, applied("Resumed")));
$("act-cancel").addEventListener("click", (ev) => {
  if (!confirm("Cancel execution " + ID + "? Running stages are told to stop; this cannot be undone.")) {
    answer("", "", "Cancel not confirmed: nothing was sent.");
    return;
  }
  act(ev.currentTarget, "Cancel", ACT + "/cancel", undefined, applied("Cancelled"));
});
$("act-rerun").addEventListener("click", (ev) => {
  const from = $("act-rerun-from").value;
  act(ev.currentTarget, "Rerun", ACT + "/rerun", from ? { from_stage: from } : {}, (r) => {
    const link = el("a", { href: "/ui/executions/" + encodeURIComponent(r.execution_id), id: "act-rerun-link", dataset: { executionId: r.execution_id }, text: r.execution_id });
    answer("ok", "", "Rerun started from " + r.from_stage + (r.reused.length ? " (reused: " + r.reused.join(", ") + ")" : "") + ":", link);
  });
});

/** The stage a rerun without from_stage starts at, by the server's rule: the lowest-numbered that did not complete. */
function defaultFrom(stages) {
  const sorted = stages.slice().sort((a, b) => a.order - b.order);
  const s = sorted.find((x) => x.status !== "completed") || sorted[0];
  return s ? s.stage_id : null;
}

/** The stage choice, kept as the operator left it when a push redraws the page. */
function renderRerunChoice(doc) {
  const select = $("act-rerun-from");
  const kept = select.value;
  const ids = doc.stages.slice().sort((a, b) => a.order - b.order).map((s) => s.stage_id);
  const def = defaultFrom(doc.stages);
  const options = [el("option", { value: "", text: def ? "default (" + def + ")" : "default" })];
  for (const id of ids) options.push(el("option", { value: id, text: id }));
  select.replaceChildren(...options);
  select.value = ids.includes(kept) ? kept : "";
}

/** One panel per stage awaiting approval; a panel already shown is kept, so a push does not wipe a comment being typed. */
function renderApprovals(doc) {
  const box = $("act-approvals");
  const waiting = doc.stages.filter((s) => s.status === "awaiting_approval").map((s) => s.stage_id);
  for (const panel of Array.from(box.children)) if (!waiting.includes(panel.dataset.stageId)) panel.remove();
  for (const stage of waiting) {
    if (box.querySelector('.approval[data-stage-id="' + stage + '"]')) continue;
    const comment = el("textarea", { maxlength: MAX_COMMENT, dataset: { role: "comment" }, "aria-label": "comment on " + stage, placeholder: "comment (optional, at most " + MAX_COMMENT + " characters)" });
    const count = el("span", { class: "muted", dataset: { role: "count" }, text: "0 / " + MAX_COMMENT });
    comment.addEventListener("input", () => { count.textContent = comment.value.length + " / " + MAX_COMMENT; });
    const decide = (action, label) => {
      const b = el("button", { type: "button", class: action === "reject" ? "danger" : "primary", dataset: { action } , text: label });
      b.addEventListener("click", () => {
        const text = comment.value;
        act(b, label + " " + stage, ACT + "/stages/" + encodeURIComponent(stage) + "/" + action, text ? { comment: text } : {}, applied(label === "Approve" ? "Approved " + stage : "Rejected " + stage));
      });
      return b;
    };
    box.append(el("div", { class: "approval", dataset: { stageId: stage } }, [
      el("strong", { class: "mono", text: stage }), el("span", { class: "muted", text: " awaits approval" }),
      comment,
      el("div", { class: "row" }, [decide("approve", "Approve"), decide("reject", "Reject"), count]),
    ]));
  }
}

function renderActions(doc) {
  renderRerunChoice(doc);
  renderApprovals(doc);
}
`;
