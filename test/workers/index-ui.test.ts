import { describe, expect, it } from "vitest";
import { escapeHtml, wantsHtml } from "../../src/ui/common";
import { OPS, call, ended, startExecution, waitFor } from "../support/api";

/** The operator pages as served (the browser test in test/browser/ runs them). */
const BROWSER = { accept: "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8" };

describe("content negotiation", () => {
  it("serves the page only when text/html is preferred over JSON", () => {
    const req = (accept?: string) => new Request("http://x/", accept ? { headers: { accept } } : {});
    expect(wantsHtml(req(BROWSER.accept))).toBe(true);
    expect(wantsHtml(req("text/html"))).toBe(true);
    expect(wantsHtml(req())).toBe(false);
    expect(wantsHtml(req("*/*"))).toBe(false);
    expect(wantsHtml(req("application/json"))).toBe(false);
    expect(wantsHtml(req("application/json, text/html;q=0.5"))).toBe(false);
    expect(wantsHtml(req("application/json, text/html"))).toBe(false);
    expect(wantsHtml(req("text/html, application/json;q=0.9"))).toBe(true);
    expect(wantsHtml(req("text/html;q=0"))).toBe(false);
  });

  it("escapes what it renders", () => {
    expect(escapeHtml(`<script>alert("x")</script>&'`)).toBe("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;");
  });
});

describe("the execution page", () => {
  it("is served for GET /executions/:id to a browser and on /ui/executions/:id, without a token", async () => {
    const { body } = await startExecution({
      template_name: "quick_summary",
      parameters: { topic: "Page", targetAudience: "ops", steps: 1, step_ms: 5 },
      client_id: "client_page",
    });
    const id = body.execution_id as string;
    for (const [path, headers] of [
      [`/executions/${id}`, BROWSER],
      [`/ui/executions/${id}`, {}],
    ] as const) {
      const res = await call(path, { headers });
      expect(res.status, path).toBe(200);
      expect(res.headers.get("content-type")).toBe("text/html; charset=utf-8");
      expect(res.headers.get("cache-control")).toBe("no-store");
      const csp = res.headers.get("content-security-policy") ?? "";
      const nonce = /script-src 'nonce-([^']+)'/.exec(csp)?.[1];
      expect(nonce, csp).toBeTruthy();
      expect(csp).toContain("connect-src 'self'");
      const html = await res.text();
      expect(html).toContain(`data-execution-id="${id}"`);
      // Every inline script and style carries this response's nonce; nothing is loaded from elsewhere.
      expect(html.match(/<script\b[^>]*>/g)).toEqual([`<script nonce="${nonce}">`]);
      expect(html.match(/<style\b[^>]*>/g)).toEqual([`<style nonce="${nonce}">`]);
      // No assets from elsewhere: the only link is the empty inline icon (so browsers do not ask for /favicon.ico).
      expect(html).not.toMatch(/\bsrc=|https?:\/\//);
      expect(html.match(/<link\b[^>]*>/g)).toEqual(['<link rel="icon" href="data:,">']);
      expect(html).toContain('id="token"');
    }
    await waitFor(id, ended);
  });

  it("serves /ui/clients and /ui/resources without a token, self-contained, every script and style under the response's nonce", async () => {
    for (const path of ["/ui/clients", "/ui/resources"]) {
      const res = await call(path);
      expect(res.status, path).toBe(200);
      expect(res.headers.get("content-type")).toBe("text/html; charset=utf-8");
      const nonce = /script-src 'nonce-([^']+)'/.exec(res.headers.get("content-security-policy") ?? "")?.[1];
      expect(nonce, path).toBeTruthy();
      const html = await res.text();
      expect(html.match(/<script\b[^>]*>/g)).toEqual([`<script nonce="${nonce}">`]);
      expect(html.match(/<style\b[^>]*>/g)).toEqual([`<style nonce="${nonce}">`]);
      expect(html).not.toMatch(/\bsrc=|https?:\/\//);
      expect(html).toContain('id="token"');
      // It reads its data with the token, from this origin's API.
      expect(html).toContain(path === "/ui/clients" ? 'poll("/clients"' : 'poll("/resources"');
    }
  });

  it("leaves JSON callers as they were", async () => {
    const { body } = await startExecution({
      template_name: "quick_summary",
      parameters: { topic: "Json", targetAudience: "ops", steps: 1, step_ms: 5 },
      client_id: "client_page",
    });
    const id = body.execution_id as string;
    for (const accept of [undefined, "*/*", "application/json", "application/json, text/html;q=0.9"]) {
      const headers: Record<string, string> = accept ? { accept } : {};
      expect((await call(`/executions/${id}`, { headers })).status, String(accept)).toBe(401);
      const res = await call(`/executions/${id}`, { headers: { ...headers, ...OPS } });
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toContain("application/json");
      expect(((await res.json()) as { execution_id: string }).execution_id).toBe(id);
    }
    await waitFor(id, ended);
  });

  it("refuses an id that is not an execution id before rendering anything", async () => {
    for (const path of ["/ui/executions/%3Cscript%3Ealert(1)%3C%2Fscript%3E", "/executions/exec_%22%3E%3Cimg"]) {
      const res = await call(path, { headers: BROWSER });
      expect(res.status, path).toBe(400);
      const text = await res.text();
      expect(text).not.toContain("<script");
      expect(text).not.toContain("<img");
    }
  });
});
