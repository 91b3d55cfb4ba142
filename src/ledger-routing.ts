import type { ResourceLedger } from "../actors/resource-ledger";
import { configOf } from "./config";

/**
 * The one place that knows which ResourceLedger object owns a pool. Today a
 * single object named "global" owns every pool; sharding pools across objects
 * (docs/scaling.md) is a change to this function alone. The binding is
 * `LEDGER_BINDING` (default `RESOURCE_LEDGER`): the fault tests put a real
 * object that stalls or fails in front of the ledger there (vitest.config.ts).
 */
export const LEDGER_OBJECT_NAME = "global";

export function ledgerFor(env: Env, _pool?: string): DurableObjectStub<ResourceLedger> {
  const ns = (env as unknown as Record<string, unknown>)[configOf(env).ledgerBinding] as DurableObjectNamespace<ResourceLedger> | undefined;
  if (!ns || typeof ns.idFromName !== "function") throw new Error(`LEDGER_BINDING names no Durable Object binding (${configOf(env).ledgerBinding})`);
  return ns.get(ns.idFromName(LEDGER_OBJECT_NAME));
}

/**
 * The ledger object that keeps a client's quotas, buckets and spend. With one
 * object it is the same as every pool's; when pools are sharded, a client's
 * own pools (`client:{id}:*`) go to one shard chosen by its id.
 */
export function ledgerForClient(env: Env, clientId: string): DurableObjectStub<ResourceLedger> {
  return ledgerFor(env, `client:${clientId}`);
}
