import { ClientId, type Priority } from "../schemas/common";
import type { ClientDocument, ClientQuotas, StartAdmission } from "../schemas/clients";
import type { ShardedClientList } from "../schemas/resources";
import { configOf } from "./config";
import { ApiError, parseWith } from "./http";
import { clientList } from "./ledger-fanout";
import { ledgerForClient } from "./ledger-routing";
import { remember } from "./bounded-memo";
import { askObject } from "./outbound";

/**
 * Clients over HTTP (docs/protocol.md, "Clients"): quotas and usage live in
 * the ledger shard of the client's id (src/ledger-routing.ts), and a start is
 * admitted there (max_priority, spent budget, starts per minute).
 */
function ledgerCall<T>(env: Env, promise: PromiseLike<T>, what: string): Promise<T> {
  // A 503 names the call, never the ledger's internal message (askObject logs it).
  return askObject(promise, configOf(env).tuning.ledgerCallTimeoutMs, what);
}

export function clientIdOf(raw: unknown): string {
  return parseWith(ClientId, typeof raw === "string" ? decodeURIComponent(raw) : raw, "client_id");
}

export async function putQuotas(env: Env, clientId: string, quotas: ClientQuotas): Promise<ClientDocument> {
  const doc = await ledgerCall(env, ledgerForClient(env, clientId).putClientQuotas(clientId, quotas), "ledger.putClientQuotas");
  // Once the ledger has the change: what this isolate kept (also from a start admitted during the call) was the old quotas'.
  forgetAdmissions(clientId);
  return doc;
}

export async function getClient(env: Env, clientId: string): Promise<ClientDocument> {
  return ledgerCall(env, ledgerForClient(env, clientId).client(clientId), "ledger.client");
}

/** Every shard's clients, each from its own shard (src/ledger-fanout.ts); 503 only when no shard answered. */
export async function listClients(env: Env): Promise<ShardedClientList> {
  const list = await clientList(env);
  if (!list.shards.some((s) => s.ok)) throw new ApiError(503, "unavailable", "ledger.clients is unavailable: no shard answered in time, or each failed");
  return list;
}

/** What an admitted start passes on to the Execution's start(): its slot, decided by the admission (docs/ledger.md, "Execution slots"). */
export interface AdmittedSlot {
  slot: "counted" | "free";
  client_weight: number | null;
}

/**
 * Steady admissions this isolate has been given (the ledger's `steady`: no budget, no start rate),
 * by client and priority, each until its time: a start within it asks the ledger nothing. Bounded,
 * like the other isolate caches; a quota change made through this isolate drops the client's.
 */
const admissions = new Map<string, { answer: AdmittedSlot; until: number }>();
const MAX_ADMISSIONS = 1000;

/** Forgets the client's steady admissions (its quotas changed). */
function forgetAdmissions(clientId: string): void {
  for (const key of [...admissions.keys()]) if (key.startsWith(`${clientId}\n`)) admissions.delete(key);
}

/** Throws the 403 / 429 a start of this client must answer; counts the start when admitted. */
export async function admitStart(env: Env, clientId: string, priority: Priority): Promise<AdmittedSlot> {
  const key = `${clientId}\n${priority}`;
  const now = Date.now();
  const held = admissions.get(key);
  if (held && held.until > now) return held.answer;
  const a = await ledgerCall<StartAdmission>(env, ledgerForClient(env, clientId).admitStart(clientId, priority), "ledger.admitStart");
  if (a.ok) {
    const answer: AdmittedSlot = { slot: a.slot, client_weight: a.weight ?? null };
    const ms = configOf(env).tuning.admissionCacheMs;
    if (a.steady && ms > 0) remember(admissions, key, { answer, until: now + ms }, MAX_ADMISSIONS);
    else admissions.delete(key);
    return answer;
  }
  admissions.delete(key);
  if (a.code === "priority_not_allowed") throw new ApiError(403, a.code, a.message);
  const headers: Record<string, string> = a.retryAfterMs !== undefined ? { "retry-after": String(Math.ceil(a.retryAfterMs / 1000)) } : {};
  throw new ApiError(429, a.code, a.message, a.retryAfterMs !== undefined ? { retry_after_ms: a.retryAfterMs } : undefined, headers);
}
