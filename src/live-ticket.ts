import { z } from "zod";
import type { Role } from "./auth";
import { safeEqual } from "./auth";
import { ApiError } from "./http";
import { secretPair } from "./secrets";

/**
 * Tickets for the live status socket (`GET /executions/:id/live`, docs/protocol.md
 * "Live updates"). A browser cannot put an Authorization header on a WebSocket,
 * and a token in the URL would end up in logs, so an authenticated
 * `POST /executions/:id/live-ticket` hands out a ticket: one execution, a
 * minute, signed with CALLBACK_SECRET under its own key derivation (so a ticket
 * is never a callback token, nor the other way round). The socket sends it as a
 * subprotocol, `ticket.<ticket>`, next to `orchestrator-live.v1`.
 *
 * A ticket opens one socket: it carries a random nonce, which the front hands
 * the execution's object (TICKET_USE_HEADER, set here over anything the caller
 * sent) and the object remembers until the ticket expires (actors/execution/live.ts).
 */
export const LIVE_PROTOCOL = "orchestrator-live.v1";
export const TICKET_PREFIX = "ticket.";
export const LIVE_TICKET_TTL_MS = 60_000;
/** The verified ticket's use, from the front to the object: `<nonce>.<expires at, unix ms>`. */
export const TICKET_USE_HEADER = "x-orchestrator-live-ticket";

const encoder = new TextEncoder();
const Payload = z.object({ v: z.literal(1), e: z.string(), x: z.number().int(), r: z.enum(["kam", "ops", "client"]), n: z.string().regex(/^[A-Za-z0-9_-]{22}$/) });

/** What a verified ticket allows: the role it was issued to, and its one use (nonce, expiry). */
export interface LiveTicketUse {
  role: Role;
  nonce: string;
  expiresAt: number;
}

function b64url(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function mac(secret: string, payload: string): Promise<string> {
  const key = await crypto.subtle.importKey("raw", encoder.encode(`live-ticket-v1:${secret}`), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return b64url(new Uint8Array(await crypto.subtle.sign("HMAC", key, encoder.encode(payload))));
}

function keys(env: Env): { current: string; previous: string | null } {
  const pair = secretPair(env, "CALLBACK_SECRET");
  if (!pair) throw new ApiError(503, "misconfigured", "CALLBACK_SECRET is not set");
  return pair;
}

export async function issueLiveTicket(env: Env, executionId: string, role: Role, now: number): Promise<{ ticket: string; expires_at: string }> {
  const expiresAt = now + LIVE_TICKET_TTL_MS;
  const nonce = b64url(crypto.getRandomValues(new Uint8Array(16)));
  const payload = b64url(encoder.encode(JSON.stringify({ v: 1, e: executionId, x: expiresAt, r: role, n: nonce })));
  return { ticket: `${payload}.${await mac(keys(env).current, payload)}`, expires_at: new Date(expiresAt).toISOString() };
}

/**
 * The ticket from the socket's subprotocols; 401 when missing, forged or expired, 403 for another execution's.
 * Whether it was used already only the execution's object knows (`ticket_used`).
 */
export async function verifyLiveTicket(env: Env, request: Request, executionId: string, now: number): Promise<LiveTicketUse> {
  const offered = (request.headers.get("sec-websocket-protocol") ?? "").split(",").map((p) => p.trim());
  if (!offered.includes(LIVE_PROTOCOL)) {
    throw new ApiError(400, "invalid_request", `offer the subprotocol ${LIVE_PROTOCOL}`, [{ path: "sec-websocket-protocol", message: `must include ${LIVE_PROTOCOL}` }]);
  }
  const ticket = offered.find((p) => p.startsWith(TICKET_PREFIX))?.slice(TICKET_PREFIX.length) ?? "";
  const [payload, given] = ticket.split(".");
  if (!payload || !given) throw new ApiError(401, "unauthorized", "missing live ticket (POST /executions/:id/live-ticket)");
  const { current, previous } = keys(env);
  const okCurrent = safeEqual(given, await mac(current, payload));
  const okPrevious = previous !== null && safeEqual(given, await mac(previous, payload));
  if (!okCurrent && !okPrevious) throw new ApiError(401, "unauthorized", "invalid live ticket");
  let claims: z.infer<typeof Payload>;
  try {
    const bin = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    claims = Payload.parse(JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)))));
  } catch {
    throw new ApiError(401, "unauthorized", "invalid live ticket");
  }
  if (claims.x <= now) throw new ApiError(401, "token_expired", "the live ticket expired: ask for a new one");
  if (claims.e !== executionId) throw new ApiError(403, "forbidden", "this live ticket belongs to another execution");
  return { role: claims.r, nonce: claims.n, expiresAt: claims.x };
}
