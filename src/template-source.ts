import { resolveGraph } from "../actors/execution/graph";
import { z } from "zod";
import { type MasterTemplate, MasterTemplateResponse, PipelineStages, TemplateStage } from "../schemas/template";
import { remember } from "./bounded-memo";
import { configOf } from "./config";
import { zodIssues } from "./http";
import { log } from "./log";
import { callJson, withTimeout } from "./outbound";

/**
 * Master templates: fetched from KAM through its binding and cached in
 * EXECUTION_CACHE. A cached copy younger than `templateCacheTtlSeconds` is
 * used without asking KAM; an older one is kept (for a day) as the fallback
 * when KAM is down, and the status document then says `template_source: "cache"`.
 * Each isolate also keeps the entries it read or wrote, under the same freshness
 * rule, so a burst of starts does not pay a KV read each.
 */
export type TemplateLoad =
  | { ok: true; template: MasterTemplate; source: "kam" | "cache" }
  | { ok: false; code: "template_not_found" | "invalid_template" | "kam_unavailable"; message: string; retryable: boolean };

const STALE_TTL_SECONDS = 24 * 3600;
const Cached = z.object({ fetched_at: z.number(), template: z.object({ template_id: z.string(), template_name: z.string(), stages: z.array(TemplateStage) }) });

const cacheKey = (name: string) => `template:${name}`;

type CacheEntry = z.infer<typeof Cached>;
const MEMORY_ENTRIES = 256;
const memory = new Map<string, CacheEntry>();

/** Validates KAM's answer: `pipeline_stages` may be a JSON string or an array. */
export function parseTemplate(body: z.output<typeof MasterTemplateResponse>): MasterTemplate | string {
  let raw: unknown = body.pipeline_stages;
  if (typeof raw === "string") {
    try {
      raw = JSON.parse(raw);
    } catch {
      return "pipeline_stages is not valid JSON";
    }
  }
  const stages = PipelineStages.safeParse(raw);
  if (!stages.success) {
    return zodIssues(stages.error)
      .map((i) => `pipeline_stages.${i.path}: ${i.message}`)
      .join("; ");
  }
  // The graph (depends_on, for_each) is checked here too, so a bad one fails before any stage reserves.
  const graph = resolveGraph(stages.data);
  if (!graph.ok) return `pipeline_stages: ${graph.message}`;
  return { template_id: body.template_id, template_name: body.template_name, stages: stages.data };
}

export async function loadTemplate(env: Env, name: string): Promise<TemplateLoad> {
  const { tuning } = configOf(env);
  const fresh = (entry: CacheEntry) => Date.now() - entry.fetched_at < tuning.templateCacheTtlSeconds * 1000;
  const mine = memory.get(name);
  if (mine && fresh(mine)) return { ok: true, template: mine.template, source: "cache" };
  let cached: CacheEntry | null = null;
  try {
    const parsed = Cached.safeParse(await withTimeout(env.EXECUTION_CACHE.get(cacheKey(name), "json"), tuning.storageCallTimeoutMs, "kv.get"));
    cached = parsed.success ? parsed.data : null;
  } catch (err) {
    log("warn", "template_cache_read_failed", { template_name: name, error: String(err) });
  }
  if (cached && fresh(cached)) {
    remember(memory, name, cached, MEMORY_ENTRIES);
    return { ok: true, template: cached.template, source: "cache" };
  }

  const res = await callJson({
    fetcher: env.KAM,
    url: `https://kam.internal/api/master-templates/${encodeURIComponent(name)}`,
    method: "GET",
    schema: MasterTemplateResponse,
    timeoutMs: tuning.kamTimeoutMs,
    maxAnswerBytes: tuning.maxKamAnswerBytes,
    peer: "kam",
  });
  log(res.ok ? "info" : "warn", "kam_template_fetch", { template_name: name, ms: res.ms, outcome: res.ok ? "ok" : res.error.code });
  if (res.ok) {
    const template = parseTemplate(res.value);
    if (typeof template === "string") return { ok: false, code: "invalid_template", message: template, retryable: false };
    const entry: CacheEntry = { fetched_at: Date.now(), template };
    remember(memory, name, entry, MEMORY_ENTRIES);
    try {
      await withTimeout(env.EXECUTION_CACHE.put(cacheKey(name), JSON.stringify(entry), { expirationTtl: STALE_TTL_SECONDS }), tuning.storageCallTimeoutMs, "kv.put");
    } catch (err) {
      log("warn", "template_cache_write_failed", { template_name: name, error: String(err) });
    }
    return { ok: true, template, source: "kam" };
  }
  if (res.error.httpStatus === 404) {
    return { ok: false, code: "template_not_found", message: `KAM has no master template named ${name}`, retryable: false };
  }
  if (cached) return { ok: true, template: cached.template, source: "cache" };
  if (res.error.code === "kam_protocol_error" || res.error.code === "kam_answer_too_large") {
    return { ok: false, code: "invalid_template", message: res.error.message, retryable: false };
  }
  return { ok: false, code: "kam_unavailable", message: res.error.message, retryable: res.error.retryable };
}
