/**
 * Event notifications to KAM are signed (docs/protocol.md, "Event notifications"):
 * `x-orchestrator-signature: t=<unix ms>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`
 * keyed with NOTIFY_SECRET. `t` is the moment of this delivery attempt, so a
 * redelivery carries a fresh `t` over the same body (and the same `event_id`).
 */
export const SIGNATURE_HEADER = "x-orchestrator-signature";

const encoder = new TextEncoder();
const keys = new Map<string, Promise<CryptoKey>>();

function keyFor(secret: string): Promise<CryptoKey> {
  let key = keys.get(secret);
  if (!key) {
    key = crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    // One entry per secret value: a handful over a rotation.
    if (keys.size > 8) keys.clear();
    keys.set(secret, key);
  }
  return key;
}

function hex(bytes: ArrayBuffer): string {
  return [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** The header value for `body` signed at `t` (unix ms). */
export async function signatureHeader(secret: string, body: string, t: number): Promise<string> {
  const mac = await crypto.subtle.sign("HMAC", await keyFor(secret), encoder.encode(`${t}.${body}`));
  return `t=${t},v1=${hex(mac)}`;
}
