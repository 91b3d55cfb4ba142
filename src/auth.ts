import { ApiError } from "./http";

/**
 * Who may call what:
 * - KAM_TOKEN: start and read executions over HTTP;
 * - OPS_TOKEN: operators (resources, pools, any execution);
 * - callback tokens: a stage worker, for one execution, one stage, one attempt;
 * - WORKER_SECRET: on every call we make to a worker, and the key of the callback tokens.
 * Secrets are compared in constant time and never logged.
 */
export type Role = "kam" | "ops";

const encoder = new TextEncoder();

export function bearerToken(request: Request): string | null {
  const header = request.headers.get("authorization") ?? "";
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m ? m[1] : null;
}

/** Constant-time comparison; unequal lengths still cost a full comparison. */
export function safeEqual(a: string, b: string): boolean {
  const x = encoder.encode(a);
  const y = encoder.encode(b);
  if (x.byteLength !== y.byteLength) {
    crypto.subtle.timingSafeEqual(x, x);
    return false;
  }
  return crypto.subtle.timingSafeEqual(x, y);
}

/** Returns the caller's role, or throws 401. */
export function requireRole(request: Request, env: Env, allowed: readonly Role[]): Role {
  const token = bearerToken(request);
  if (token) {
    if (allowed.includes("ops") && env.OPS_TOKEN && safeEqual(token, env.OPS_TOKEN)) return "ops";
    if (allowed.includes("kam") && env.KAM_TOKEN && safeEqual(token, env.KAM_TOKEN)) return "kam";
  }
  throw new ApiError(401, "unauthorized", "missing or invalid bearer token");
}

// ---- callback tokens -------------------------------------------------------

export interface CallbackClaims {
  executionId: string;
  stageId: string;
  attempt: number;
}

const keyCache = new Map<string, Promise<CryptoKey>>();

function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keyCache.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", encoder.encode(`callback-token-v1:${secret}`), { name: "HMAC", hash: "SHA-256" }, false, [
      "sign",
    ]);
    keyCache.set(secret, key);
  }
  return key;
}

function b64url(bytes: ArrayBuffer | Uint8Array): string {
  const u8 = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  let s = "";
  for (const b of u8) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function fromB64url(s: string): string | null {
  try {
    return atob(s.replace(/-/g, "+").replace(/_/g, "/"));
  } catch {
    return null;
  }
}

async function sign(secret: string, payload: string): Promise<string> {
  return b64url(await crypto.subtle.sign("HMAC", await hmacKey(secret), encoder.encode(payload)));
}

/**
 * `{base64url(execution|stage|attempt)}.{base64url(HMAC-SHA256)}`: bound to one
 * attempt of one stage, so a late callback from an earlier attempt or another
 * execution cannot act on this one.
 */
export async function issueCallbackToken(secret: string, claims: CallbackClaims): Promise<string> {
  const payload = `${claims.executionId}|${claims.stageId}|${claims.attempt}`;
  return `${b64url(encoder.encode(payload))}.${await sign(secret, payload)}`;
}

/** 401 for a missing or forged token, 403 for a genuine token of another execution or stage. */
export async function verifyCallbackToken(
  request: Request,
  secret: string,
  expected: { executionId: string; stageId?: string },
): Promise<CallbackClaims> {
  const token = bearerToken(request);
  const [p, mac] = token?.split(".") ?? [];
  const payload = p && mac ? fromB64url(p) : null;
  if (!payload || !mac || !safeEqual(mac, await sign(secret, payload))) {
    throw new ApiError(401, "unauthorized", "missing or invalid callback token");
  }
  const [executionId, stageId, attemptText] = payload.split("|");
  const attempt = Number(attemptText);
  if (executionId !== expected.executionId || (expected.stageId !== undefined && stageId !== expected.stageId)) {
    throw new ApiError(403, "forbidden", "this callback token belongs to another execution or stage");
  }
  return { executionId, stageId, attempt };
}
