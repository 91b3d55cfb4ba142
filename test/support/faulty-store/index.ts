import { WorkerEntrypoint } from "cloudflare:workers";

/**
 * The orchestrator's data stores behind real entrypoints that stall or fail a
 * call on request (the orchestrator's `DATA_KV_BINDING` and `DATA_R2_BINDING`
 * name `FaultyKv` and `FaultyR2` in the `ledger-faults` test project). Every
 * call is forwarded to the same KV namespace and R2 bucket the orchestrator
 * uses (miniflare shares them by id and name), unless a fault matches it:
 * - `stall`: the call waits `stallMs`, then goes through (a store that hangs);
 * - `fail`: the call throws without reaching the store.
 * A fault names the store, the method and a substring of the key or prefix;
 * `times` bounds how many calls it takes (unbounded when absent). Faults are
 * set and calls read through the `Control` entrypoint. The state is the
 * module's: locally one isolate serves every call to this worker.
 *
 * Only the calls src/data-store.ts makes exist here, with plain results (an
 * R2 object's class does not cross RPC): KV put/getWithMetadata/list/delete,
 * R2 put/get/list/delete.
 */
type Store = "kv" | "r2";
type Mode = "stall" | "fail";
export interface StoreFault {
  store: Store;
  method: string;
  /** A substring of the key (or of the list prefix, or of one of the keys of a bulk delete). */
  match: string;
  mode: Mode;
  stallMs?: number;
  times?: number;
}
export interface StoreCall {
  store: Store;
  method: string;
  key: string;
  at: number;
  fault: Mode | null;
}
interface StoreEnv {
  DATA_REFS: KVNamespace;
  DATA: R2Bucket;
}

let faults: StoreFault[] = [];
let calls: StoreCall[] = [];

async function gate(store: Store, method: string, key: string): Promise<void> {
  const i = faults.findIndex((f) => f.store === store && f.method === method && key.includes(f.match));
  const fault = i >= 0 ? faults[i] : null;
  if (fault && fault.times !== undefined && --fault.times <= 0) faults.splice(i, 1);
  calls.push({ store, method, key, at: Date.now(), fault: fault?.mode ?? null });
  if (fault?.mode === "fail") throw new Error(`${store}.${method} failed (test fault) for ${key}`);
  if (fault?.mode === "stall") await scheduler.wait(fault.stallMs ?? 60_000);
}

/** R2's put takes a stream only with a known length; one that came over RPC has none, so it is read first (test data is small). */
async function bytesOf(value: unknown): Promise<unknown> {
  return value instanceof ReadableStream ? new Uint8Array(await new Response(value).arrayBuffer()) : value;
}

export class Control extends WorkerEntrypoint<StoreEnv> {
  setFault(fault: StoreFault): void {
    faults.push({ ...fault });
  }
  /** Removes the faults of one store and method, or all of them. */
  clearFaults(store?: Store, method?: string): void {
    faults = faults.filter((f) => (store && f.store !== store) || (method && f.method !== method));
  }
  calls(store?: Store, method?: string): StoreCall[] {
    return calls.filter((c) => (!store || c.store === store) && (!method || c.method === method));
  }
  resetCalls(): void {
    calls = [];
  }
}

export class FaultyKv extends WorkerEntrypoint<StoreEnv> {
  async put(key: string, value: ArrayBuffer | Uint8Array | string, options?: KVNamespacePutOptions): Promise<void> {
    await gate("kv", "put", key);
    await this.env.DATA_REFS.put(key, value, options);
  }
  async getWithMetadata(key: string, type: "stream"): Promise<{ value: ReadableStream | null; metadata: unknown }> {
    await gate("kv", "getWithMetadata", key);
    const { value, metadata } = await this.env.DATA_REFS.getWithMetadata(key, type);
    return { value, metadata };
  }
  async list(options: KVNamespaceListOptions): Promise<KVNamespaceListResult<unknown>> {
    await gate("kv", "list", options.prefix ?? "");
    return this.env.DATA_REFS.list(options);
  }
  async delete(key: string): Promise<void> {
    await gate("kv", "delete", key);
    await this.env.DATA_REFS.delete(key);
  }
}

export class FaultyR2 extends WorkerEntrypoint<StoreEnv> {
  async put(key: string, value: unknown, options?: R2PutOptions): Promise<{ key: string }> {
    await gate("r2", "put", key);
    await this.env.DATA.put(key, (await bytesOf(value)) as ArrayBuffer, options);
    return { key };
  }
  async get(key: string): Promise<{ body: ReadableStream; size: number; httpMetadata: R2HTTPMetadata | undefined } | null> {
    await gate("r2", "get", key);
    const obj = await this.env.DATA.get(key);
    return obj ? { body: obj.body, size: obj.size, httpMetadata: obj.httpMetadata } : null;
  }
  async list(options: R2ListOptions): Promise<{ objects: { key: string; size: number }[]; truncated: boolean; cursor?: string }> {
    await gate("r2", "list", options.prefix ?? "");
    const page = await this.env.DATA.list(options);
    return { objects: page.objects.map((o) => ({ key: o.key, size: o.size })), truncated: page.truncated, cursor: page.truncated ? page.cursor : undefined };
  }
  async delete(keys: string | string[]): Promise<void> {
    await gate("r2", "delete", Array.isArray(keys) ? keys.join(" ") : keys);
    await this.env.DATA.delete(keys);
  }
}

export default {
  fetch: () => new Response("faulty-store: RPC only", { status: 404 }),
} satisfies ExportedHandler;
