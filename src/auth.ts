import { z } from "zod";
import { configOf } from "./config";
import { ApiError } from "./http";
import { type SecretPair, secretPair } from "./secrets";

/**
 * Who may call what:
 * - KAM_TOKEN: start and read executions over HTTP;
 * - OPS_TOKEN: operators (resources, pools, any execution);
 * - API_KEYS: scoped keys, each with a role and the clients it sees (src/api-keys.ts `authorize`);
 * - callback tokens: a stage worker, for one execution, one stage, one attempt,
 *   one use (`callback`: callbacks and uploads; `data`: reading its inputs), until they expire;
 * - CALLBACK_SECRET keys those tokens (src/secrets.ts); the bearer we send each
 *   worker is its own secret (WORKER_SECRETS).
 * Secrets are compared in constant time and never logged; each may have a
 * previous value that still verifies during a rotation.
 */
export type Role = "kam" | "ops" | "client";

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

/** True when `given` is the current or the previous value (both compared, so the time does not say which). */
export function matchesSecret(given: string, pair: SecretPair | null): boolean {
  if (!pair) return false;
  const current = safeEqual(given, pair.current);
  const previous = pair.previous !== null && safeEqual(given, pair.previous);
  return current || previous;
}

// ---- callback and data tokens ----------------------------------------------

export type TokenUse = "callback" | "data";

export interface TokenClaims {
  executionId: string;
  stageId: string;
  attempt: number;
  /** Unix ms after which the token is refused with `token_expired`. */
  expiresAt: number;
  /**
   * `callback`: the stage's callbacks and uploads; `data`: reading the stage's inputs. A data token
   * lists no keys, so its size is the same for 1 input or 1,000: `GET /data/...` asks the Execution
   * whether a key is an input of this stage's attempt (src/execution-service.ts `readData`).
   */
  use: TokenUse;
}

const TokenPayload = z.object({
  v: z.literal(2),
  e: z.string(),
  s: z.string(),
  a: z.number().int().min(1),
  x: z.number().int(),
  u: z.enum(["callback", "data"]),
});

const keyCache = new Map<string, Promise<CryptoKey>>();

function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keyCache.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", encoder.encode(`callback-token-v2:${secret}`), { name: "HMAC", hash: "SHA-256" }, false, [
      "sign",
    ]);
    // One entry per secret value: current and previous, a handful over a rotation.
    if (keyCache.size > 16) keyCache.clear();
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
    const binary = atob(s.replace(/-/g, "+").replace(/_/g, "/"));
    return new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
  } catch {
    return null;
  }
}

async function sign(secret: string, payload: string): Promise<string> {
  return b64url(await crypto.subtle.sign("HMAC", await hmacKey(secret), encoder.encode(payload)));
}

/**
 * `{base64url(JSON payload)}.{base64url(HMAC-SHA256)}`, signed with the current
 * CALLBACK_SECRET only. The payload names the execution, stage, attempt, expiry
 * and use, so a token opens one attempt of one stage for one purpose, for a
 * bounded time.
 */
export async function issueToken(secret: SecretPair, claims: TokenClaims): Promise<string> {
  const payload = JSON.stringify({
    v: 2,
    e: claims.executionId,
    s: claims.stageId,
    a: claims.attempt,
    x: claims.expiresAt,
    u: claims.use,
  });
  return `${b64url(encoder.encode(payload))}.${await sign(secret.current, payload)}`;
}

/**
 * How long a stage's tokens live: the longest the attempt can last (its
 * handshake and process calls, then `timeout_ms` of processing) plus
 * `callbackTokenMarginMs` for a callback already on its way at the deadline.
 */
export function tokenExpiry(now: number, timeoutMs: number, tuning: { workerCallTimeoutMs: number; callbackTokenMarginMs: number }): number {
  return now + 2 * tuning.workerCallTimeoutMs + timeoutMs + tuning.callbackTokenMarginMs;
}

/** The two tokens a stage's handshake carries: `callback` (callbacks, uploads) and `data` (reading its inputs). */
export async function issueStageTokens(
  env: Env,
  stage: { executionId: string; stageId: string; attempt: number; timeoutMs: number },
  now = Date.now(),
): Promise<{ token: string; dataToken: string }> {
  const secret = secretPair(env, "CALLBACK_SECRET");
  if (!secret) throw new Error("CALLBACK_SECRET is not set");
  const expiresAt = tokenExpiry(now, stage.timeoutMs, configOf(env).tuning);
  const base = { executionId: stage.executionId, stageId: stage.stageId, attempt: stage.attempt, expiresAt };
  const [token, dataToken] = await Promise.all([
    issueToken(secret, { ...base, use: "callback" }),
    issueToken(secret, { ...base, use: "data" }),
  ]);
  return { token, dataToken };
}

async function macMatches(secret: SecretPair, payload: string, mac: string): Promise<boolean> {
  const current = safeEqual(mac, await sign(secret.current, payload));
  const previous = secret.previous !== null && safeEqual(mac, await sign(secret.previous, payload));
  return current || previous;
}

/**
 * 401 `unauthorized` for a missing or forged token, 401 `token_expired` past
 * its expiry, 403 `forbidden` for a genuine token of another use, execution or stage.
 */
export async function verifyToken(
  request: Request,
  env: Env,
  /** `executionId` omitted: a token of any execution (the caller asks that execution what the token may do). */
  expected: { executionId?: string; stageId?: string; use: TokenUse },
  now = Date.now(),
): Promise<TokenClaims> {
  const secret = secretPair(env, "CALLBACK_SECRET");
  const token = bearerToken(request);
  const [p, mac, extra] = token?.split(".") ?? [];
  const payload = p && mac && extra === undefined ? fromB64url(p) : null;
  if (!secret || !payload || !mac || !(await macMatches(secret, payload, mac))) {
    throw new ApiError(401, "unauthorized", "missing or invalid callback token");
  }
  let parsed: z.infer<typeof TokenPayload>;
  try {
    parsed = TokenPayload.parse(JSON.parse(payload));
  } catch {
    throw new ApiError(401, "unauthorized", "missing or invalid callback token");
  }
  if (now >= parsed.x) {
    throw new ApiError(401, "token_expired", `this token expired at ${new Date(parsed.x).toISOString()}`, { expired_at: new Date(parsed.x).toISOString() });
  }
  if (parsed.u !== expected.use) {
    throw new ApiError(403, "forbidden", `this token is for ${parsed.u === "data" ? "reading a stage's inputs" : "callbacks and uploads"}, not for this route`);
  }
  if ((expected.executionId !== undefined && parsed.e !== expected.executionId) || (expected.stageId !== undefined && parsed.s !== expected.stageId)) {
    throw new ApiError(403, "forbidden", "this callback token belongs to another execution or stage");
  }
  return { executionId: parsed.e, stageId: parsed.s, attempt: parsed.a, expiresAt: parsed.x, use: parsed.u };
}
