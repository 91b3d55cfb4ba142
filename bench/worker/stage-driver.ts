import { BENCH_WORKER } from "./shared";

/**
 * What the bench's own drivers of the stage worker share (the floor and the
 * durable floor in bench/worker/index.ts, bench/worker/contract-floor.ts, the
 * Workflows implementation in bench/worker/workflows.ts): one stage started on
 * the bench stage worker the way the orchestrator starts it, and a waiter for
 * its completion callback.
 */

interface Fetcher {
  fetch(input: Request | string, init?: RequestInit): Promise<Response>;
}

/** The bench worker's maps keep at most this many entries, the oldest going first. */
export const MAX_ENTRIES = 50_000;

export function bounded<K, V>(map: Map<K, V>, key: K, value: V): void {
  map.set(key, value);
  while (map.size > MAX_ENTRIES) map.delete(map.keys().next().value as K);
}

/** The pools each stage of the bench template asks for. */
export const STAGE_POOLS = { [`worker:${BENCH_WORKER}`]: 1, "tokens:openai": 10 } as const;

export type Waiter = { token: string; resolve: (body: { output?: unknown } | null) => void };

/** How a floor run learns a stage's completion: a waiter, resolved by whoever receives the callback, or null after 30 s. */
export type Completion = (stageId: string, token: string) => { done: Promise<{ output?: unknown } | null>; cancel: () => void };

/** A waiter under `key` in `waiters`, resolved by whoever takes it out, or with null after 30 s; gone from the map either way. */
export function waitIn(waiters: Map<string, Waiter>, key: string, token: string): ReturnType<Completion> {
  let timer: ReturnType<typeof setTimeout> | null = null;
  const done = new Promise<{ output?: unknown } | null>((resolve) => {
    bounded(waiters, key, { token, resolve });
    timer = setTimeout(() => resolve(null), 30_000);
  });
  const cancel = () => {
    clearTimeout(timer);
    if (waiters.get(key)?.token === token) waiters.delete(key);
  };
  return { done: done.finally(cancel), cancel };
}

export interface StageStart {
  executionId: string;
  /** 1-based: stage_<n>, action bench_<n>. */
  n: number;
  parameters: Record<string, unknown>;
  previousOutput: unknown;
  /** The stage's callback base (`.../stages/stage_<n>`) and its token. */
  callbackUrl: string;
  token: string;
}

/** Handshake then process on the bench stage worker (through `worker`), attempt 1, as the orchestrator sends them; null, or what went wrong. */
export async function startStage(worker: Fetcher, secret: string, s: StageStart): Promise<string | null> {
  const stageId = `stage_${s.n}`;
  const auth = { authorization: `Bearer ${secret}`, "content-type": "application/json" };
  const base = `https://${BENCH_WORKER}.internal`;
  const hsRes = await worker.fetch(`${base}/api/handshake`, {
    method: "POST",
    headers: auth,
    signal: AbortSignal.timeout(10_000),
    body: JSON.stringify({
      executionId: s.executionId,
      stageId,
      attempt: 1,
      action: `bench_${s.n}`,
      inputData: { parameters: s.parameters, template_ref: "bench_v1", previousOutput: s.previousOutput },
      resourceRequirements: { estimatedTokens: 10, timeoutMs: 60_000, pools: STAGE_POOLS },
      validationConfig: {},
      callback: { url: s.callbackUrl, token: s.token },
    }),
  });
  const hs = (await hsRes.json().catch(() => null)) as { accepted?: boolean; reason?: string } | null;
  if (!hsRes.ok || !hs?.accepted) return `${stageId}: handshake answered ${hsRes.status}${hs?.reason ? ` ${hs.reason}` : ""}`;
  const prRes = await worker.fetch(`${base}/api/process`, {
    method: "POST",
    headers: auth,
    signal: AbortSignal.timeout(10_000),
    body: JSON.stringify({ executionId: s.executionId, stageId, attempt: 1 }),
  });
  await prRes.arrayBuffer();
  return prRes.ok ? null : `${stageId}: process answered ${prRes.status}`;
}
