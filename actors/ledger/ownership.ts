/**
 * Which pools and clients this ledger object owns (docs/ledger.md,
 * "Ownership"). The routing layout (src/ledger-routing.ts) is the one place
 * that decides; an object whose name is a shard name under that layout
 * (`global` with one shard, `ledger-{i}` with more) refuses what the layout
 * places on another shard, so two shards can never both hold a pool. An object
 * with another name (a test's fresh ledger) owns everything and checks nothing.
 *
 * The object's name is `ctx.id.name` (objects are always reached by name).
 */
import { layoutOf, shardIndexOf, shardName, shardOfClient, shardOfPool, type ShardLayout } from "../../src/ledger-routing";

/** The routing vars the layout is read from (tests of one object may replace them). */
export type RoutingVars = { LEDGER_SHARDS?: string; LEDGER_SHARD_MAP?: string };

export class Ownership {
  #env: Env;
  #name: string | undefined;
  #layout: ShardLayout | null = null;
  /** undefined: not yet computed; null: not a shard name (checks skipped). */
  #index: number | null | undefined;

  constructor(
    /** This object's name (`ctx.id.name`; absent when it was not reached by name). */
    private readonly ownName: string | undefined,
    private readonly ownEnv: Env,
  ) {
    this.#env = ownEnv;
    this.#name = ownName;
  }

  /**
   * Tests: judge ownership under other routing vars and as if named `name` (a
   * test's own object standing for a shard, so no real shard object is touched);
   * null restores the object's own env and name.
   */
  setRouting(routing: { vars: RoutingVars; name?: string } | null): void {
    this.#env = routing ? ({ ...routing.vars } as unknown as Env) : this.ownEnv;
    this.#name = routing?.name ?? this.ownName;
    this.#layout = null;
    this.#index = undefined;
  }

  get name(): string | undefined {
    return this.#name;
  }

  get layout(): ShardLayout {
    this.#layout ??= layoutOf(this.#env);
    return this.#layout;
  }

  /** This object's shard index under the layout, or null when its name is no shard name. */
  get index(): number | null {
    if (this.#index === undefined) this.#index = this.#name === undefined ? null : shardIndexOf(this.layout, this.#name);
    return this.#index;
  }

  /** One shard of several (a multi-shard layout, and this object is one of its shards). */
  get sharded(): boolean {
    return this.index !== null && this.layout.count > 1;
  }

  /** The shard the snapshot and grant notices name: this object's index, 0 for an object outside the layout. */
  get shard(): number {
    return this.index ?? 0;
  }

  owns(pool: string): boolean {
    const i = this.index;
    return i === null || this.layout.count === 1 || shardOfPool(this.layout, pool) === i;
  }

  ownsClient(clientId: string): boolean {
    const i = this.index;
    return i === null || this.layout.count === 1 || shardOfClient(this.layout, clientId) === i;
  }

  /** Why a request naming these pools (and this client, when it is to be held here) is not for this shard, or null. */
  misplaced(pools: Iterable<string>, clientId: string | null, partShard: number | null): string | null {
    const i = this.index;
    if (i === null) return null;
    const problems: string[] = [];
    if (partShard !== null && partShard !== i) problems.push(`the part is for shard ${partShard}`);
    for (const p of pools) if (!this.owns(p)) problems.push(`pool ${p} belongs to ${this.#nameOf(shardOfPool(this.layout, p))}`);
    if (clientId !== null && !this.ownsClient(clientId)) problems.push(`client ${clientId} belongs to ${this.#nameOf(shardOfClient(this.layout, clientId))}`);
    return problems.length ? `not for ${this.#nameOf(i)}: ${problems.join("; ")}` : null;
  }

  #nameOf(i: number): string {
    return shardName(this.layout, i);
  }
}
