/// <reference types="vite/client" />
import Ajv2020Module from "ajv/dist/2020";
import addFormatsModule from "ajv-formats";
import { describe, expect, it } from "vitest";
import committed from "../../docs/openapi.json";
import protocol from "../../docs/protocol.md?raw";
import { buildOpenApiDocument } from "../../src/openapi";
import { ROUTES } from "../../src/routes";
import { KAM, OPS, call, ended, startExecution, waitFor } from "../support/api";

/**
 * docs/openapi.json is generated from the zod schemas (src/openapi.ts): it
 * must be current, cover every route of the router, and accept every example
 * of docs/protocol.md (each JSON block follows a `<!-- schema: Name -->` marker
 * naming its component) and what the Worker really answers.
 */
type Doc = { paths: Record<string, Record<string, unknown>>; components: { schemas: Record<string, unknown> } };
const doc = committed as unknown as Doc;

// CJS modules through vite: the class may sit on `.default`.
const Ajv2020 = ((Ajv2020Module as unknown as { default?: unknown }).default ?? Ajv2020Module) as typeof Ajv2020Module;
const addFormats = ((addFormatsModule as unknown as { default?: unknown }).default ?? addFormatsModule) as typeof addFormatsModule;

const SPEC_ID = "https://orchestrator-v2.internal/openapi.json";
const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
ajv.addSchema({ $id: SPEC_ID, components: doc.components });

function validate(name: string, value: unknown): string[] {
  const v = ajv.compile({ $ref: `${SPEC_ID}#/components/schemas/${name}` });
  if (v(value)) return [];
  return (v.errors ?? []).map((e) => `${e.instancePath || "(root)"} ${e.message}${e.params ? ` ${JSON.stringify(e.params)}` : ""}`);
}

/** The JSON code blocks of a markdown text, each with the schema named by the marker line just before it. */
function jsonBlocks(md: string): { line: number; schema: string | null; text: string }[] {
  const lines = md.split("\n");
  const out: { line: number; schema: string | null; text: string }[] = [];
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() !== "```json") continue;
    const marker = /^<!--\s*schema:\s*([A-Za-z0-9_]+)\s*-->$/.exec(lines[i - 1]?.trim() ?? "");
    const end = lines.findIndex((l, j) => j > i && l.trim() === "```");
    out.push({ line: i + 1, schema: marker ? marker[1] : null, text: lines.slice(i + 1, end).join("\n") });
    i = end;
  }
  return out;
}

describe("docs/openapi.json", () => {
  it("is what `npm run openapi` generates from the zod schemas", () => {
    expect(JSON.parse(JSON.stringify(buildOpenApiDocument()))).toEqual(committed);
  });

  it("is served at GET /openapi.json", async () => {
    const res = await call("/openapi.json");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("application/json");
    expect(await res.json()).toEqual(committed);
  });

  it("describes every route of the router, with its method", () => {
    expect(ROUTES.length).toBeGreaterThan(10);
    const missing = ROUTES.map((r) => ({ method: r.method.toLowerCase(), path: r.path.replace(/:([A-Za-z_]+)/g, "{$1}") })).filter(
      (r) => !doc.paths[r.path]?.[r.method],
    );
    expect(missing).toEqual([]);
  });

  it("documents no route the router does not have", () => {
    const routed = new Set(ROUTES.map((r) => `${r.method.toLowerCase()} ${r.path.replace(/:([A-Za-z_]+)/g, "{$1}")}`));
    const extra = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m} ${path}`)).filter((k) => !routed.has(k));
    expect(extra).toEqual([]);
  });
});

describe("docs/protocol.md examples", () => {
  const blocks = jsonBlocks(protocol);

  it("has a schema marker before every JSON block, naming a component", () => {
    expect(blocks.length).toBeGreaterThan(10);
    for (const b of blocks) {
      expect(b.schema, `docs/protocol.md:${b.line}: add <!-- schema: Name --> before the block`).not.toBeNull();
      expect(Object.keys(doc.components.schemas), `docs/protocol.md:${b.line}`).toContain(b.schema);
    }
  });

  for (const b of jsonBlocks(protocol)) {
    it(`line ${b.line} validates as ${b.schema}`, () => {
      const value = JSON.parse(b.text);
      expect(validate(b.schema ?? "?", value), `docs/protocol.md:${b.line} (${b.schema})`).toEqual([]);
    });
  }
});

describe("what the Worker answers matches the document", () => {
  it("status, result, list and counts of a real execution", async () => {
    const { res, body } = await startExecution({
      template_name: "quick_summary",
      parameters: { topic: "OpenAPI", targetAudience: "ops", steps: 1, step_ms: 5 },
      client_id: "client_openapi",
    });
    expect(validate("ExecuteResponse", body)).toEqual([]);
    expect(res.status).toBe(202);
    const status = await waitFor(body.execution_id, ended);
    expect(validate("StatusDocument", status)).toEqual([]);
    const result = await (await call(`/executions/${body.execution_id}/result`, { headers: KAM })).json();
    expect(validate("ResultDocument", result)).toEqual([]);
    const list = await (await call("/executions?limit=5", { headers: OPS })).json();
    expect(validate("ExecutionList", list)).toEqual([]);
    const counts = await (await call("/executions/counts", { headers: OPS })).json();
    expect(validate("ExecutionCounts", counts)).toEqual([]);
    const resources = await (await call("/resources", { headers: OPS })).json();
    expect(validate("LedgerSnapshot", resources)).toEqual([]);
    const error = await (await call("/executions/exec_nope", { headers: OPS })).json();
    expect(validate("ErrorEnvelope", error)).toEqual([]);
    expect(validate("Health", await (await call("/health")).json())).toEqual([]);
  });
});
