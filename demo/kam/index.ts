import { type EventsEnv, handleEvents } from "./events";
import { type StoredTemplate, TEMPLATES } from "./templates";

export { KamEvents } from "./events";

/**
 * Local stand-in for KAM (bitware-key-account-manager): serves master templates
 * to the orchestrator over its KAM service binding, and receives its signed
 * event notifications (events.ts).
 */

function json(status: number, body: unknown): Response {
  return Response.json(body, { status });
}

function error(status: number, code: string, message: string): Response {
  return json(status, { error: { code, message } });
}

const TEMPLATE_PATH = /^\/api\/master-templates\/([^/]+)$/;
const SLOW = /^slow(\d{1,5})_(.+)$/;
const REVISED = /^revised(\d{0,6})_(.+)$/;
const NEEDS = /^needs(\d{0,7})_([a-z0-9]+(?:\.[a-z0-9]+)*)_[A-Za-z0-9-]+$/;

/**
 * A stage's set of pools named by the test (the ledger sharding tests,
 * test/shard-faults): `needs{q}_{a}.{b}..._{tag}` answers a one-stage template
 * on the graph granulator whose stage needs one unit of each pool `set:{a}`,
 * `set:{b}`, ..., with a queue timeout of q ms when q is given; the tag only
 * makes names distinct.
 */
function needs(name: string, m: RegExpExecArray): StoredTemplate {
  const resources = Object.fromEntries(m[2].split(".").map((p) => [`set:${p}`, 1]));
  const stage = { stage: 1, worker: "bitware-graph-granulator", template_ref: "needs_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000, resources };
  return { template_id: `mt_${name}`, template_name: name, pipeline_stages: JSON.stringify([m[1] ? { ...stage, queue_timeout_ms: Number(m[1]) } : stage]) };
}

/**
 * A template KAM keeps editing: `revised{k}_{name}` answers `{name}`'s template
 * as revision n, where n counts the fetches of every `revised{k}_{name}` (1, 2,
 * ...); the digits k only make distinct names, which the orchestrator's template
 * cache does not answer for each other. Revision 1 is the template itself; from
 * revision 2 on it has one more stage (a copy of its last), so a test can tell
 * which revision an execution runs.
 */
function revised(base: StoredTemplate, name: string, n: number): StoredTemplate {
  const stages = (typeof base.pipeline_stages === "string" ? JSON.parse(base.pipeline_stages) : base.pipeline_stages) as Array<Record<string, unknown>>;
  const last = stages[stages.length - 1];
  const more = n >= 2 ? [...stages, { ...last, stage: Number(last.stage) + 1 }] : stages;
  return { ...base, template_id: `${base.template_id}_r${n}`, template_name: name, pipeline_stages: JSON.stringify(more) };
}

export default {
  async fetch(request: Request, env: EventsEnv): Promise<Response> {
    const url = new URL(request.url);
    if (url.pathname === "/api/orchestrator/events" && (request.method === "POST" || request.method === "GET")) return handleEvents(request, env);
    if (request.method !== "GET") {
      const res = error(405, "method_not_allowed", `${request.method} is not supported`);
      res.headers.set("allow", "GET");
      return res;
    }
    if (url.pathname === "/health") return json(200, { status: "ok" });

    const match = TEMPLATE_PATH.exec(url.pathname);
    if (!match) return error(404, "not_found", `no route for ${url.pathname}`);

    let name: string;
    try {
      name = decodeURIComponent(match[1]);
    } catch {
      return error(400, "bad_request", "template name is not valid URL encoding");
    }
    // An outage knob for the orchestrator's resilience tests: KAM "is down" for these names.
    if (name.startsWith("outage_")) return error(503, "unavailable", "KAM is temporarily unavailable");
    // A size knob for the orchestrator's input bounds: a valid template padded past any sane size (1 MiB).
    if (name.startsWith("oversize_")) {
      const base = TEMPLATES.get("quick_summary");
      return json(200, { ...base, template_name: name, description: "x".repeat(1024 * 1024) });
    }
    // A slowness knob: `slow{ms}_{name}` answers for `{name}` after {ms} ms (at most 30 s), KAM slow but not down.
    const slow = SLOW.exec(name);
    if (slow) {
      await scheduler.wait(Math.min(30_000, Number(slow[1])));
      name = slow[2];
    }
    const set = NEEDS.exec(name);
    if (set) return json(200, needs(name, set));
    const edited = REVISED.exec(name);
    const template = TEMPLATES.get(edited ? edited[2] : name);
    if (!template) return error(404, "not_found", `template '${name}' does not exist`);
    if (edited) return json(200, revised(template, name, await env.EVENTS.get(env.EVENTS.idFromName("revisions")).revise(edited[2])));
    return json(200, template);
  },
} satisfies ExportedHandler<EventsEnv>;
