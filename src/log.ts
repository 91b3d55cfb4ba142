/**
 * Structured logs: one JSON line per state change and per outbound call, with
 * execution_id, stage_id, attempt, duration and outcome, so one execution can
 * be followed through `wrangler tail`. Never pass tokens or secrets here.
 */
type Level = "debug" | "info" | "warn" | "error";
const RANK: Record<Level | "silent", number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 };
let threshold = RANK.info;

/** The `LOG_LEVEL` var of an env (every object's constructor and the front Worker call this with theirs). */
export function setLogLevel(env: unknown): void {
  const level = (env as { LOG_LEVEL?: unknown } | undefined)?.LOG_LEVEL;
  if (typeof level === "string" && level in RANK) threshold = RANK[level as Level];
}

export function log(level: Level, event: string, fields: Record<string, unknown> = {}): void {
  if (RANK[level] < threshold) return;
  const line = JSON.stringify({ ts: new Date().toISOString(), level, event, ...fields });
  if (level === "error") console.error(line);
  else if (level === "warn") console.warn(line);
  else console.log(line);
}
