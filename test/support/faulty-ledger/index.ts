import { DurableObject } from "cloudflare:workers";

/**
 * A real Durable Object standing where the ledger stands (the orchestrator's
 * `LEDGER_BINDING` names it in the `ledger-faults` test project; the `shards`
 * project's tests put it there for one call). Every call is forwarded to the
 * real ResourceLedger of the same name (each shard its own) in the worker
 * under test, unless a fault is set for its method:
 * - `stall`: the call waits `stallMs`, then goes through (a slow ledger);
 * - `down`: the call fails without reaching the ledger (unreachable);
 * - `lose_answer`: the call reaches the ledger, which acts on it, but the
 *   answer never comes back (the caller sees a failure);
 * - `duplicate`: the call reaches the ledger twice (a request sent again by the
 *   network or a retry) and the second answer comes back.
 * Each object forwards to the real ledger of its own name (`global`, or
 * `ledger-{i}` when the ledger is sharded), so one shard can be faulty alone.
 * Faults are set over RPC by the test (`setFault`, `clearFaults`) and counted
 * (`calls`), so a test can show what the orchestrator asked and when.
 */
type Mode = "stall" | "down" | "lose_answer" | "corrupt" | "duplicate";
interface Fault {
  mode: Mode;
  stallMs?: number;
  /** How many more calls the fault applies to (unbounded when absent). */
  times?: number;
}
interface LedgerEnv {
  REAL_LEDGER: DurableObjectNamespace;
}

/** Every RPC method of ResourceLedger (a method missing here would fail every call to it). */
const METHODS = ["reserve", "renew", "settle", "settleAndReserve", "release", "status", "estimate", "snapshot", "putPool", "definePool", "putClientQuotas", "client", "clients", "admitStart", "acquireSlot", "releaseSlot"] as const;
type Method = (typeof METHODS)[number];

export class FaultyLedger extends DurableObject<LedgerEnv> {
  #faults = new Map<Method, Fault>();
  /** `names`: the call's string arguments (a slot call's client and execution ids), so a test can tell whose it was. */
  #calls: { method: Method; at: number; fault: Mode | null; names: string[] }[] = [];

  setFault(methods: Method[] | "all", fault: Fault): void {
    for (const m of methods === "all" ? METHODS : methods) this.#faults.set(m, { ...fault });
  }

  clearFaults(): void {
    this.#faults.clear();
  }

  calls(method?: Method): { method: Method; at: number; fault: Mode | null; names: string[] }[] {
    return this.#calls.filter((c) => !method || c.method === method);
  }

  resetCalls(): void {
    this.#calls = [];
  }

  reserve(...args: unknown[]) {
    return this.#forward("reserve", args);
  }
  renew(...args: unknown[]) {
    return this.#forward("renew", args);
  }
  settle(...args: unknown[]) {
    return this.#forward("settle", args);
  }
  settleAndReserve(...args: unknown[]) {
    return this.#forward("settleAndReserve", args);
  }
  release(...args: unknown[]) {
    return this.#forward("release", args);
  }
  status(...args: unknown[]) {
    return this.#forward("status", args);
  }
  estimate(...args: unknown[]) {
    return this.#forward("estimate", args);
  }
  snapshot(...args: unknown[]) {
    return this.#forward("snapshot", args);
  }
  putPool(...args: unknown[]) {
    return this.#forward("putPool", args);
  }
  definePool(...args: unknown[]) {
    return this.#forward("definePool", args);
  }
  putClientQuotas(...args: unknown[]) {
    return this.#forward("putClientQuotas", args);
  }
  client(...args: unknown[]) {
    return this.#forward("client", args);
  }
  clients(...args: unknown[]) {
    return this.#forward("clients", args);
  }
  admitStart(...args: unknown[]) {
    return this.#forward("admitStart", args);
  }
  acquireSlot(...args: unknown[]) {
    return this.#forward("acquireSlot", args);
  }
  releaseSlot(...args: unknown[]) {
    return this.#forward("releaseSlot", args);
  }

  async #forward(method: Method, args: unknown[]): Promise<unknown> {
    const fault = this.#take(method);
    this.#calls.push({ method, at: Date.now(), fault: fault?.mode ?? null, names: args.filter((a): a is string => typeof a === "string") });
    if (fault?.mode === "down") throw new Error(`ledger unreachable (test fault) for ${method}`);
    if (fault?.mode === "stall") await scheduler.wait(fault.stallMs ?? 60_000);
    // The real ledger of the same name: `global`, or a shard's `ledger-{i}` when the ledger is sharded.
    const name = this.ctx.id.name ?? "global";
    const real = this.env.REAL_LEDGER.get(this.env.REAL_LEDGER.idFromName(name)) as unknown as Record<Method, (...a: unknown[]) => Promise<unknown>>;
    // corrupt: the request reaches the ledger with a lease it refuses (invalid_request).
    if (fault?.mode === "corrupt") args = [{ ...(args[0] as object), leaseMs: 10 }, ...args.slice(1)];
    // duplicate: both copies in flight at once, the later answer returned.
    const answer = fault?.mode === "duplicate" ? (await Promise.all([real[method](...args), real[method](...args)]))[1] : await real[method](...args);
    if (fault?.mode === "lose_answer") throw new Error(`ledger answer lost (test fault) for ${method}`);
    return answer;
  }

  #take(method: Method): Fault | null {
    const f = this.#faults.get(method);
    if (!f) return null;
    if (f.times !== undefined) {
      f.times--;
      if (f.times <= 0) this.#faults.delete(method);
    }
    return f;
  }
}

export default {
  fetch: () => new Response("faulty-ledger: RPC only", { status: 404 }),
} satisfies ExportedHandler;
