import { type EventsEnv, handleEvents } from "./events";
import { TEMPLATES } from "./templates";

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
    const template = TEMPLATES.get(name);
    if (!template) return error(404, "not_found", `template '${name}' does not exist`);
    return json(200, template);
  },
} satisfies ExportedHandler<EventsEnv>;
