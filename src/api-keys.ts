import { type Role, bearerToken, matchesSecret, safeEqual } from "./auth";
import { sha256Hex } from "./hash";
import { getStatus } from "./execution-service";
import { ApiError } from "./http";
import { apiKeyTable, secretPair } from "./secrets";

/**
 * Who is calling (docs/operations.md, "API keys"): KAM_TOKEN and OPS_TOKEN act
 * for every client; each entry of the API_KEYS secret is a key of its own with
 * a role and the clients it may see:
 *
 *   API_KEYS = { "<lowercase hex SHA-256 of the key>": { "name", "role": "kam"|"ops"|"client", "clients": [...] | "*" } }
 *
 * The key itself is sent as `Authorization: Bearer <key>`; only its hash is
 * stored. The presented key's hash is compared with every entry's in constant
 * time (no early exit, no map lookup keyed by the secret), so the time taken
 * says nothing about which entry, or how much of one, matched.
 */
export type PrincipalRole = Role;

export interface Principal {
  role: PrincipalRole;
  /** The clients whose executions this caller may see and start; `"*"`: every client. */
  clients: "*" | readonly string[];
  /** The key's name for logs; `KAM_TOKEN` / `OPS_TOKEN` for those. */
  name: string;
}

/** The entry whose hash is the key's, comparing against every entry (constant time in the secret). */
async function keyEntry(env: Env, key: string): Promise<Principal | null> {
  const table = apiKeyTable(env);
  if (!table?.length) return null;
  const hash = await sha256Hex(key);
  let found: Principal | null = null;
  for (const [h, entry] of table) {
    if (safeEqual(hash, h) && !found) found = { role: entry.role, clients: entry.clients, name: entry.name };
  }
  return found;
}

/**
 * The caller, or 401 when no credential opens a route for one of `allowed`
 * (also a valid credential of another role, as for KAM_TOKEN on an operator route).
 */
export async function authorize(request: Request, env: Env, allowed: readonly PrincipalRole[]): Promise<Principal> {
  const token = bearerToken(request);
  if (token) {
    if (allowed.includes("ops") && matchesSecret(token, secretPair(env, "OPS_TOKEN"))) return { role: "ops", clients: "*", name: "OPS_TOKEN" };
    if (allowed.includes("kam") && matchesSecret(token, secretPair(env, "KAM_TOKEN"))) return { role: "kam", clients: "*", name: "KAM_TOKEN" };
    const key = await keyEntry(env, token);
    if (key && allowed.includes(key.role)) return key;
  }
  throw new ApiError(401, "unauthorized", "missing or invalid bearer token");
}

export function inScope(p: Principal, clientId: string): boolean {
  return p.clients === "*" || p.clients.includes(clientId);
}

/** 403 for a client outside the caller's scope (starting for it, its quotas). */
export function requireClient(p: Principal, clientId: string): void {
  if (!inScope(p, clientId)) throw new ApiError(403, "forbidden", `this key may not act for client ${clientId}`, { client_id: clientId });
}

/** 403 on routes that span every client (resources, metrics, schedules, undeliverable): a scoped key may not use them. */
export function requireUnscoped(p: Principal): void {
  if (p.clients !== "*") throw new ApiError(403, "forbidden", "this key is scoped to some clients; this route spans every client");
}

/**
 * The executions a caller may see among those a query names: `undefined` for
 * every client (no filter added), else the clients to keep (empty: nothing to see).
 */
export function visibleClients(p: Principal, asked: string | undefined): string[] | undefined {
  if (p.clients === "*") return undefined;
  if (asked === undefined) return [...p.clients];
  return p.clients.includes(asked) ? [asked] : [];
}

/**
 * 404 for an execution of a client outside the caller's scope, exactly as for
 * one that does not exist. An execution's client never changes, so reading it
 * first and acting after is not a race.
 */
export async function requireVisibleExecution(env: Env, p: Principal, id: unknown): Promise<void> {
  if (p.clients === "*") return;
  const doc = await getStatus(env, id);
  if (!inScope(p, doc.client_id)) throw new ApiError(404, "not_found", `no execution ${doc.execution_id}`);
}
