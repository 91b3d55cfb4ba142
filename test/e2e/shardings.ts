import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { expect } from "vitest";
import { TEST_SECRETS, TEST_SHARDS } from "../support/constants";

/**
 * Every e2e file runs its session twice: with the one ledger object of the
 * default configuration and with the ledger sharded over 4 objects in the
 * `shards` project's layout (TEST_SHARDS: worker pools on shard 0, `tokens:*`
 * on 1, a client's state by its id, so the demo's stages hold parts on two or
 * three shards). The vars go with `--var`, which reaches only the first worker
 * of the session: the orchestrator, whose ResourceLedger objects are the shards.
 */
export const SHARDINGS = [
  { label: "1 ledger shard", shards: 1, vars: {} as Record<string, string> },
  { label: "4 ledger shards", shards: 4, vars: TEST_SHARDS as Record<string, string> },
];
export type Sharding = (typeof SHARDINGS)[number];

/**
 * Starts one session per sharding, all at once, each on fresh state of its own
 * (two sessions must never share a state directory). At once, since the suite
 * runs e2e one file at a time (vitest.config.ts) and a session mostly waits on its workers' steps: the
 * second costs little more wall time than the first. If one fails to start, the
 * others are stopped and the error thrown.
 */
export async function startEach<T extends { stop(): Promise<void> }>(
  start: (s: Sharding, persistTo: string) => Promise<T>,
): Promise<{ sessions: T[]; stop: () => Promise<void> }> {
  const dirs = SHARDINGS.map(() => mkdtempSync(path.join(os.tmpdir(), "orch-e2e-state-")));
  const started = await Promise.allSettled(SHARDINGS.map((s, i) => start(s, dirs[i])));
  const sessions = started.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const stop = async () => {
    await Promise.all(sessions.map((s) => s.stop()));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  };
  const failed = started.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) {
    await stop();
    throw failed.reason;
  }
  return { sessions, stop };
}

/** `GET /resources` as an operator: every shard the orchestrator routes to (and whether each answered), and each pool's shard. */
export async function resourcesOf(url: string): Promise<{ shards: { shard: number; name: string; ok: boolean }[]; pools: { name: string; shard: number }[] }> {
  const res = await fetch(`${url}/resources`, { headers: { authorization: `Bearer ${TEST_SECRETS.OPS_TOKEN}` }, signal: AbortSignal.timeout(30_000) });
  if (res.status !== 200) throw new Error(`GET /resources: ${res.status} ${await res.text()}`);
  return (await res.json()) as never;
}

/**
 * What a session with this sharding must show at `GET /resources`: its ledger
 * objects (`global` alone, or `ledger-0` .. `ledger-3`), every one answering,
 * every pool on one of them, and each pool the map pins (`worker:*`, `tokens:*`)
 * on its pinned shard. (The Node tests cannot load src/ledger-routing.ts, which
 * is typed against the Workers runtime; the pins are read from the map itself.)
 */
export async function expectRouted(url: string, s: Sharding): Promise<void> {
  const { shards, pools } = await resourcesOf(url);
  expect(shards).toEqual(Array.from({ length: s.shards }, (_, i) => ({ shard: i, name: s.shards === 1 ? "global" : `ledger-${i}`, ok: true })));
  const pins = Object.entries(JSON.parse(s.vars.LEDGER_SHARD_MAP ?? "{}") as Record<string, number>);
  const pinnedOf = (pool: string) => pins.find(([key]) => (key.endsWith("*") ? pool.startsWith(key.slice(0, -1)) : pool === key))?.[1];
  expect(pools.map((p) => p.name)).toEqual(expect.arrayContaining(["worker:bitware-content-granulator", "tokens:openai"]));
  for (const p of pools) {
    expect(p.shard, p.name).toBeGreaterThanOrEqual(0);
    expect(p.shard, p.name).toBeLessThan(s.shards);
    expect(p.shard, p.name).toBe(pinnedOf(p.name) ?? p.shard);
  }
}
