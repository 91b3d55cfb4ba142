import type { ResourceLedger } from "../actors/resource-ledger";

/**
 * The one place that knows which ResourceLedger object owns a pool. Today a
 * single object named "global" owns every pool; sharding pools across objects
 * (docs/scaling.md) is a change to this function alone.
 */
export const LEDGER_OBJECT_NAME = "global";

export function ledgerFor(env: Env, _pool?: string): DurableObjectStub<ResourceLedger> {
  const ns = env.RESOURCE_LEDGER as unknown as DurableObjectNamespace<ResourceLedger>;
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
