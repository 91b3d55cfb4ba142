import { z } from "zod";
import { ClientId } from "../schemas/common";
import { configOf } from "./config";

/**
 * The orchestrator's secrets (docs/operations.md, "Secrets and rotation"):
 * - CALLBACK_SECRET keys the callback and data tokens; it never leaves the orchestrator;
 * - WORKER_SECRETS (JSON: worker name -> secret) is the bearer we send each stage
 *   worker, so one worker's secret opens no other; a worker missing from it falls
 *   back to WORKER_SECRET (one shared secret, for the migration);
 * - KAM_TOKEN and OPS_TOKEN are the bearers KAM and operators send us;
 * - NOTIFY_SECRET signs the event notifications we send KAM (we never verify with it);
 * - API_KEYS (optional) holds the hashes of scoped keys (src/api-keys.ts).
 * Every secret we verify may also hold a previous value in `<NAME>_PREVIOUS`:
 * both verify, only the current one signs. Missing or empty secrets make the
 * orchestrator refuse to serve (`misconfigured`) instead of running with a
 * guessable key.
 */
export type SecretName = "CALLBACK_SECRET" | "KAM_TOKEN" | "OPS_TOKEN" | "NOTIFY_SECRET";

/** The current value signs; both verify. */
export interface SecretPair {
  current: string;
  previous: string | null;
}

/** The shortest CALLBACK_SECRET we accept: an HMAC key must not be guessable. */
export const MIN_CALLBACK_SECRET_LENGTH = 32;

function text(value: unknown): string | null {
  return typeof value === "string" && value.trim() !== "" ? value : null;
}

function vars(env: Env): Record<string, unknown> {
  return env as unknown as Record<string, unknown>;
}

/** A secret and its previous value; null when the current one is missing or empty. */
export function secretPair(env: Env, name: SecretName): SecretPair | null {
  const current = text(vars(env)[name]);
  return current ? { current, previous: text(vars(env)[`${name}_PREVIOUS`]) } : null;
}

const WorkerSecrets = z.record(z.string(), z.string().trim().min(1));

/** WORKER_SECRETS parsed; null when it is set but is not a JSON object of non-empty strings. */
function workerSecrets(env: Env): Record<string, string> | null {
  const raw = vars(env).WORKER_SECRETS;
  if (raw === undefined || raw === null || raw === "") return {};
  try {
    const parsed = WorkerSecrets.safeParse(typeof raw === "string" ? JSON.parse(raw) : raw);
    return parsed.success ? parsed.data : null;
  } catch {
    return null;
  }
}

/** The bearer we send one worker: its own secret, else the shared WORKER_SECRET; null when neither is set. */
export function workerSecret(env: Env, worker: string): string | null {
  return workerSecrets(env)?.[worker] ?? text(vars(env).WORKER_SECRET);
}

// ---- API_KEYS (src/api-keys.ts): scoped keys, stored as the SHA-256 of each key ----

/** Bounded so a scoped listing stays one indexed `IN (...)` query within SQLite's bound parameters. */
export const MAX_KEY_CLIENTS = 50;

export const ApiKeyEntry = z
  .object({
    name: z.string().min(1).max(64),
    role: z.enum(["kam", "ops", "client"]),
    clients: z.union([z.literal("*"), z.array(ClientId).min(1).max(MAX_KEY_CLIENTS)]),
  })
  .strict();
export const ApiKeys = z.record(z.string().regex(/^[0-9a-f]{64}$/, "the lowercase hex SHA-256 of the key"), ApiKeyEntry);
type ApiKeyTable = [hash: string, entry: z.infer<typeof ApiKeyEntry>][];

const tableCache = new WeakMap<object, ApiKeyTable | null>();

/** API_KEYS parsed once per env object; `[]` when unset, null when set but invalid (the service then refuses to serve). */
export function apiKeyTable(env: Env): ApiKeyTable | null {
  const known = tableCache.get(env);
  if (known !== undefined) return known;
  const raw = (env as unknown as Record<string, unknown>).API_KEYS;
  let table: ApiKeyTable | null = [];
  if (raw !== undefined && raw !== null && raw !== "") {
    try {
      const parsed = ApiKeys.safeParse(typeof raw === "string" ? JSON.parse(raw) : raw);
      table = parsed.success ? Object.entries(parsed.data) : null;
    } catch {
      table = null;
    }
  }
  tableCache.set(env, table);
  return table;
}

const missingCache = new WeakMap<object, string[]>();

/**
 * What is missing or unusable, by name (never a value): every secret above,
 * and a secret for each worker in WORKER_BINDINGS. Computed once per env object.
 */
export function missingSecrets(env: Env): string[] {
  const known = missingCache.get(env);
  if (known) return known;
  const missing: string[] = [];
  const callback = secretPair(env, "CALLBACK_SECRET");
  if (!callback) missing.push("CALLBACK_SECRET");
  else if (callback.current.length < MIN_CALLBACK_SECRET_LENGTH) missing.push(`CALLBACK_SECRET (shorter than ${MIN_CALLBACK_SECRET_LENGTH} characters)`);
  for (const name of ["KAM_TOKEN", "OPS_TOKEN"] as const) if (!secretPair(env, name)) missing.push(name);
  const notify = secretPair(env, "NOTIFY_SECRET");
  if (!notify) missing.push("NOTIFY_SECRET");
  else if (notify.current.length < MIN_CALLBACK_SECRET_LENGTH) missing.push(`NOTIFY_SECRET (shorter than ${MIN_CALLBACK_SECRET_LENGTH} characters)`);
  if (apiKeyTable(env) === null) missing.push("API_KEYS (not a JSON object of lowercase hex SHA-256 -> { name, role, clients })");
  if (workerSecrets(env) === null) missing.push("WORKER_SECRETS (not a JSON object of non-empty strings)");
  else {
    let workers: string[] = [];
    try {
      workers = Object.keys(configOf(env).workerBindings);
    } catch {
      missing.push("WORKER_BINDINGS (invalid)");
    }
    for (const worker of workers) if (!workerSecret(env, worker)) missing.push(`WORKER_SECRETS.${worker} (or WORKER_SECRET)`);
  }
  missingCache.set(env, missing);
  return missing;
}
