// Worker-only (crypto.subtle.timingSafeEqual is workerd's): kept out of shared.ts, which the Node side imports too.
/** Constant-time comparison of two secrets (through their SHA-256, so the lengths do not leak). */
export async function sameSecret(given: string, expected: string): Promise<boolean> {
  if (!given || !expected) return false;
  const enc = new TextEncoder();
  const [a, b] = await Promise.all([crypto.subtle.digest("SHA-256", enc.encode(given)), crypto.subtle.digest("SHA-256", enc.encode(expected))]);
  return crypto.subtle.timingSafeEqual(a, b);
}
