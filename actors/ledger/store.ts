/**
 * The ledger's state and its persistence: pools, worker estimates and the
 * live leases in memory, reservations in SQL (indexed), every write through
 * the group commit (./group-commit.ts). Memory is the state as decided; SQL
 * lags it by at most the writes queued for the next commit, and every read
 * here sees the decided state (a queued row wins over its SQL copy).
 *
 * The held amounts and counters are never stored: they are derived from the
 * reservations at load, so they cannot drift from them. A client's changing
 * state (spend, buckets, fair tag) is carried by its reservation rows, with a
 * `clients` checkpoint now and then (./client-journal.ts).
 */
import type { z } from "zod";
import type { PoolConfig, ReservePart } from "../../schemas/ledger";
import { holdCost, largestHeld, newClient, newPool, queueOrder, type Amounts, type ClientState, type LedgerRules, type PoolState, type WorkerStats } from "../ledger-rules";
import { sqlOf, type Sql } from "../sql";
import { bucketOf, checkPersisted, encodeClientState, readPersistedClients, writeCheckpoint, writeSettings } from "./client-journal";
import { GroupCommit } from "./group-commit";
import { migrate } from "./schema";

/** `parked` values: 0 active, 1 parked (can never fit the pools' sizes), 2 held by its client's quota. */
export const PARKED = 1;
export const HELD = 2;

/** The key of reservations without a client in the clients map (never listed, never limited). */
export const NO_CLIENT = "";

export interface ResRow extends Record<string, SqlStorageValue> {
  id: string;
  execution_id: string;
  stage_id: string;
  attempt: number;
  worker: string;
  rank: number;
  eff_rank: number;
  age_at: number | null;
  seq: number;
  state: string;
  req: string;
  lease_ms: number;
  created_at: number;
  granted_at: number | null;
  expires_at: number | null;
  passed: number;
  parked: number;
  usage: string | null;
  duration_ms: number | null;
  ended_at: number | null;
  client_id: string | null;
  /** Estimated cost at the price table, held against the client's budget while granted. */
  cost_est: number;
  /** Fair-queue tag (ledger-rules fairTag). */
  tag: number;
  /** A multi-shard stage's part (ReservePart as JSON); null: the whole stage (docs/ledger.md, "Parts"). */
  part: string | null;
  /** A chain grant's later stages and whether it was cut (ChainState as JSON); null: one stage (docs/ledger.md, "Chain grants"). */
  chain: string | null;
}

/** A chain grant: the stages after the first that it covers, and whether a waiter has asked it to end at the next stage's end. */
export interface ChainState {
  stages: string[];
  cut: boolean;
  /** The first stage's own needs (the row's `req` is the whole chain's). */
  own: Amounts;
}

export function chainOf(row: ResRow): ChainState | null {
  return row.chain ? (JSON.parse(row.chain) as ChainState) : null;
}

export function needsOf(row: ResRow): Amounts {
  return JSON.parse(row.req) as Amounts;
}

export function partOf(row: ResRow): ReservePart | null {
  return row.part ? (JSON.parse(row.part) as ReservePart) : null;
}

/** Whether the row holds its client's running-stage count, rate buckets and budget hold (a whole stage, or the client's part). */
export function holdsClient(row: ResRow): boolean {
  return row.part === null || partOf(row)!.client;
}

/** What the client's rate buckets take for the row: the whole stage's needs on the client's part, else the row's own. */
export function clientNeedsOf(row: ResRow): Amounts {
  return (row.part === null ? null : partOf(row)!.stageNeeds) ?? needsOf(row);
}

export class LedgerStore {
  readonly sql: Sql;
  readonly commit: GroupCommit;
  readonly pools = new Map<string, PoolState>();
  readonly stats = new Map<string, WorkerStats>();
  /** Granted reservations (live leases), as decided: loaded at start, kept in step with every change. */
  readonly live = new Map<string, ResRow>();
  /** The live chain grants not cut yet (a subset of `live`): the ones a new waiter asks to end early. */
  readonly chains = new Map<string, ResRow>();
  readonly clients = new Map<string, ClientState>();
  /** Fair queue: the largest tag granted so far. */
  virtualTime = 0;
  /** Counters derived from the reservations at load. */
  leases = 0;
  waiters = 0;
  parked = 0;
  seq = 0;
  /** Latest version of rows with a queued write (read before SQL). */
  readonly #dirtyRows = new Map<string, ResRow>();
  /** Pools and estimates changed since their rows were last written (written once per commit). */
  readonly #dirtyPools = new Set<PoolState>();
  readonly #dirtyStats = new Set<WorkerStats>();
  /** Clients with rows written since the last checkpoint, and those whose quotas or start bucket changed. */
  readonly #journaled = new Set<ClientState>();
  readonly #settings = new Set<ClientState>();
  /** The last change number given to a row; rows written since the checkpoint; a checkpoint asked for this commit. */
  #cseq = 0;
  #pastCheckpoint = 0;
  #checkpointDue = false;

  constructor(
    private readonly storage: DurableObjectStorage,
    private readonly rules: Pick<LedgerRules, "clientCheckpointRows">,
  ) {
    this.sql = sqlOf(storage);
    this.commit = new GroupCommit(storage, {
      beforeCommit: () => this.#writeDirty(),
      afterCommit: () => this.#dirtyRows.clear(),
      onFailure: () => this.load(),
    });
  }

  /** Schema, seeding at the very first start only, then memory from SQL. */
  open(seedPools: z.infer<typeof PoolConfig>, now: number): void {
    migrate(this.storage);
    const seeded = this.sql<{ value: string }>`SELECT value FROM meta WHERE key = 'seeded'`.length > 0;
    if (!seeded) {
      this.storage.transactionSync(() => {
        for (const spec of seedPools) {
          this.#savePool(newPool(spec.name, spec.kind, spec.capacity, spec.refill_per_second ?? 0, now));
        }
        this.sql`INSERT INTO meta (key, value) VALUES ('seeded', ${String(now)})`;
      });
    }
    this.load();
  }

  /** Waiters a grant pass could grant (parked ones hold nobody back). */
  get activeWaiters(): number {
    return this.waiters - this.parked;
  }

  // ---- pools and estimates -------------------------------------------------

  addPool(p: PoolState): void {
    this.pools.set(p.name, p);
    this.#dirtyPools.add(p);
  }

  /** Marks a pool for writing with the step's commit (once, however often it changed). */
  touchPool(p: PoolState): void {
    this.#dirtyPools.add(p);
  }

  touchStats(w: WorkerStats): void {
    this.#dirtyStats.add(w);
  }

  recordUnknownUsage(pool: string, amount: number, now: number): void {
    this.commit.write(
      () => this.sql`INSERT INTO unknown_usage (pool, total, events, last_at) VALUES (${pool}, ${amount}, 1, ${now})
        ON CONFLICT (pool) DO UPDATE SET total = total + excluded.total, events = events + 1, last_at = excluded.last_at`,
    );
  }

  // ---- clients ---------------------------------------------------------------

  /** The client's state (created in memory on first use; written when it changes). */
  client(id: string | null, now: number): ClientState {
    const key = id ?? NO_CLIENT;
    let c = this.clients.get(key);
    if (!c) {
      c = newClient(key, now);
      this.clients.set(key, c);
    }
    return c;
  }

  /**
   * Writes the client's quotas and start bucket with the step's commit (what
   * no reservation row carries); `checkpoint` also writes the whole
   * checkpoint then (a quota change resizes buckets outside any row).
   */
  saveClientSettings(c: ClientState, checkpoint = false): void {
    this.#settings.add(c);
    if (checkpoint) this.#checkpointDue = true;
  }

  /** The grant of a reservation with `tag` (its row, written with the grant, makes it durable). */
  advanceVirtualTime(tag: number): void {
    if (tag > this.virtualTime) this.virtualTime = tag;
  }

  /** The client's waiters held by its quota become active again (its usage or quota changed). */
  unholdClient(c: ClientState): void {
    if (c.held === 0) return;
    for (const r of this.#dirtyRows.values()) if (r.state === "waiting" && r.parked === HELD && (r.client_id ?? NO_CLIENT) === c.id) this.#dirtyRows.set(r.id, { ...r, parked: 0 });
    const id = c.id === NO_CLIENT ? null : c.id;
    this.commit.write(() => this.sql`UPDATE reservations SET parked = 0 WHERE state = 'waiting' AND parked = ${HELD} AND client_id IS ${id}`);
    c.held = 0;
  }

  // ---- reservations ----------------------------------------------------------

  /** A reservation as decided: a queued write wins over SQL. */
  row(id: string): ResRow | undefined {
    return this.#dirtyRows.get(id) ?? this.live.get(id) ?? this.sql<ResRow>`SELECT * FROM reservations WHERE id = ${id}`[0];
  }

  /**
   * The rows of one attempt's rounds before `round` (ids `{base}` and
   * `{base}@{r}`, one range of the primary key), the newest round first.
   */
  earlierRounds(base: string, round: number): Pick<ResRow, "id" | "seq" | "tag" | "created_at">[] {
    const rows = this.sql<{ id: string; seq: number; tag: number; created_at: number }>`
      SELECT id, seq, tag, created_at FROM reservations WHERE id = ${base} OR (id > ${`${base}@`} AND id < ${`${base}A`})`;
    return rows.filter((r) => roundOf(base, r.id) < round).sort((a, b) => roundOf(base, b.id) - roundOf(base, a.id));
  }

  /** The id of a row of one of the attempt's rounds after `round`, queued or in SQL (the same range), or undefined. */
  laterRound(base: string, round: number): string | undefined {
    const later = (id: string) => id.startsWith(`${base}@`) && roundOf(base, id) > round;
    for (const id of this.#dirtyRows.keys()) if (later(id)) return id;
    return this.sql<{ id: string }>`SELECT id FROM reservations WHERE id > ${`${base}@`} AND id < ${`${base}A`}`.find((r) => later(r.id))?.id;
  }

  /**
   * Writes a row's new version (insert or update), keeping the live-lease map
   * in step. The row carries its client's state as decided so far in the step
   * (every change of a client's spend or buckets is followed by a write of one
   * of its rows), so no separate client write is needed.
   */
  putRow(r: ResRow): void {
    const c = this.client(r.client_id, r.created_at);
    // Its change number and its client's state after the change (./client-journal.ts).
    const cseq = ++this.#cseq;
    const cstate = encodeClientState(c);
    this.#journaled.add(c);
    this.#pastCheckpoint++;
    if (r.state === "granted") this.live.set(r.id, r);
    else this.live.delete(r.id);
    if (r.state === "granted" && r.chain !== null && !chainOf(r)!.cut) this.chains.set(r.id, r);
    else this.chains.delete(r.id);
    if (this.commit.queueing) this.#dirtyRows.set(r.id, r);
    this.commit.write(
      () => this.sql`INSERT INTO reservations
        (id, execution_id, stage_id, attempt, worker, rank, eff_rank, age_at, seq, state, req, lease_ms, created_at,
         granted_at, expires_at, passed, parked, usage, duration_ms, ended_at, client_id, cost_est, tag, cseq, cstate, part, chain)
        VALUES (${r.id}, ${r.execution_id}, ${r.stage_id}, ${r.attempt}, ${r.worker}, ${r.rank}, ${r.eff_rank}, ${r.age_at},
                ${r.seq}, ${r.state}, ${r.req}, ${r.lease_ms}, ${r.created_at}, ${r.granted_at}, ${r.expires_at}, ${r.passed},
                ${r.parked}, ${r.usage}, ${r.duration_ms}, ${r.ended_at}, ${r.client_id}, ${r.cost_est}, ${r.tag}, ${cseq}, ${cstate}, ${r.part}, ${r.chain})
        ON CONFLICT (id) DO UPDATE SET state = excluded.state, eff_rank = excluded.eff_rank, age_at = excluded.age_at,
          granted_at = excluded.granted_at, expires_at = excluded.expires_at, passed = excluded.passed,
          parked = excluded.parked, usage = excluded.usage, duration_ms = excluded.duration_ms, ended_at = excluded.ended_at,
          cseq = excluded.cseq, cstate = excluded.cstate, chain = excluded.chain`,
    );
  }

  /** Queued rows that are active waiters (only the current step's can exist: see ResourceLedger#step). */
  #dirtyWaiting(): ResRow[] {
    const out: ResRow[] = [];
    for (const r of this.#dirtyRows.values()) if (r.state === "waiting" && !r.parked) out.push(r);
    return out;
  }

  /** The head of the queue: active waiters by effective rank desc, then arrival. */
  queueHead(limit: number): ResRow[] {
    const rows = this.sql<ResRow>`SELECT * FROM reservations
      WHERE state = 'waiting' AND parked = 0 ORDER BY eff_rank DESC, tag, seq LIMIT ${limit}`;
    if (this.#dirtyRows.size === 0) return rows;
    const merged = new Map<string, ResRow>();
    for (const r of rows) merged.set(r.id, this.#dirtyRows.get(r.id) ?? r);
    for (const r of this.#dirtyWaiting()) merged.set(r.id, r);
    return [...merged.values()]
      .filter((r) => r.state === "waiting" && !r.parked)
      .sort(queueOrder)
      .slice(0, limit);
  }

  /** The snapshot's list: the head of the queue, then waiters held by a client quota (up to `limit` in all). */
  queueList(limit: number): ResRow[] {
    const head = this.queueHead(limit);
    if (head.length >= limit) return head;
    const held = this.sql<ResRow>`SELECT * FROM reservations WHERE state = 'waiting' AND parked = ${HELD}
      ORDER BY eff_rank DESC, tag, seq LIMIT ${limit - head.length}`.map((r) => this.#dirtyRows.get(r.id) ?? r);
    return [...head, ...held.filter((r) => r.state === "waiting" && r.parked === HELD)];
  }

  /** Executions of the client with a stage holding a grant now. */
  runningExecutions(clientId: string): number {
    const ids = new Set<string>();
    for (const r of this.live.values()) if (r.client_id === clientId) ids.add(r.execution_id);
    return ids.size;
  }

  /** Active waiters ahead of `row`, and how many of them are for the same worker. */
  countAhead(row: ResRow): { n: number; same: number } {
    const r = this.sql<{ n: number; same: number | null }>`SELECT COUNT(*) AS n, SUM(worker = ${row.worker}) AS same
      FROM reservations WHERE state = 'waiting' AND parked = 0 AND id != ${row.id}
      AND (eff_rank > ${row.eff_rank} OR (eff_rank = ${row.eff_rank} AND (tag < ${row.tag} OR (tag = ${row.tag} AND seq < ${row.seq}))))`[0];
    return { n: r?.n ?? 0, same: r?.same ?? 0 };
  }

  /** Active waiters per worker with an effective rank of at least `rank`. */
  waitingByWorker(rank: number): Map<string, number> {
    const counts = new Map<string, number>();
    for (const r of this.sql<{ worker: string; n: number }>`SELECT worker, COUNT(*) AS n FROM reservations
        WHERE state = 'waiting' AND parked = 0 AND eff_rank >= ${rank} GROUP BY worker`) {
      counts.set(r.worker, r.n);
    }
    return counts;
  }

  /** Waiters whose next ageing step is due. */
  dueAgeing(now: number, limit: number): ResRow[] {
    return this.sql<ResRow>`SELECT * FROM reservations
      WHERE state = 'waiting' AND age_at IS NOT NULL AND age_at <= ${now} LIMIT ${limit}`.map((r) => this.#dirtyRows.get(r.id) ?? r);
  }

  /** Granted reservations whose lease is over, earliest first (read from the live map: always as decided). */
  dueLeases(now: number, limit: number): ResRow[] {
    const due: ResRow[] = [];
    for (const r of this.live.values()) if (r.expires_at !== null && r.expires_at <= now) due.push(r);
    return due.sort((a, b) => (a.expires_at ?? 0) - (b.expires_at ?? 0)).slice(0, limit);
  }

  /** Every parked waiter gets another look (after a resize). */
  unparkAll(): void {
    if (this.parked === 0) return;
    for (const r of this.#dirtyRows.values()) if (r.state === "waiting" && r.parked === PARKED) this.#dirtyRows.set(r.id, { ...r, parked: 0 });
    this.commit.write(() => this.sql`UPDATE reservations SET parked = 0 WHERE state = 'waiting' AND parked = ${PARKED}`);
    this.parked = 0;
  }

  purge(before: number, limit: number): void {
    const oldest = this.earliestEnded();
    if (oldest === null || oldest >= before) return;
    // Rows past the checkpoint carry client state it does not have yet: checkpoint in the same transaction.
    if (this.#pastCheckpoint > 0) this.#checkpointDue = true;
    this.commit.write(
      () => this.sql`DELETE FROM reservations WHERE id IN (SELECT id FROM reservations WHERE ended_at IS NOT NULL
        AND ended_at < ${before} ORDER BY ended_at LIMIT ${limit})`,
    );
  }

  earliestLease(): number | null {
    let t: number | null = null;
    for (const r of this.live.values()) if (r.expires_at !== null && (t === null || r.expires_at < t)) t = r.expires_at;
    return t;
  }

  earliestEnded(): number | null {
    return this.sql<{ t: number | null }>`SELECT MIN(ended_at) AS t FROM reservations WHERE ended_at IS NOT NULL`[0]?.t ?? null;
  }

  // ---- load and check ----------------------------------------------------------

  /** (Re)builds memory from SQL: pools, estimates, and the counters derived from live reservations. */
  load(): void {
    this.pools.clear();
    this.stats.clear();
    this.#dirtyRows.clear();
    this.#dirtyPools.clear();
    this.#dirtyStats.clear();
    this.#journaled.clear();
    this.#settings.clear();
    this.#checkpointDue = false;
    this.clients.clear();
    const persisted = readPersistedClients(this.sql);
    this.virtualTime = persisted.virtualTime;
    this.#cseq = persisted.lastChange;
    this.#pastCheckpoint = persisted.pastCheckpoint;
    for (const [id, p] of persisted.clients) {
      const c = newClient(id, 0);
      c.own = p.own;
      c.starts = p.starts;
      if (p.month) c.month = p.month;
      c.spent = p.spent;
      c.lastTag = p.lastTag;
      for (const [pool, b] of p.buckets) c.rate.set(pool, bucketOf(id, pool, b));
      this.clients.set(id, c);
      // Its rows past the checkpoint stay needed until the next checkpoint covers it.
      if (p.pastCheckpoint) this.#journaled.add(c);
    }
    const clientOf = (id: string | null) => this.client(id, 0);
    type PoolRow = {
      name: string;
      kind: PoolState["kind"];
      capacity: number;
      refill_per_second: number;
      tokens: number;
      tokens_at: number;
      consumed: number;
      est_avg: number | null;
      est_n: number;
      paused_until: number | null;
    };
    for (const r of this.sql<PoolRow>`SELECT * FROM pools`) {
      this.pools.set(r.name, {
        name: r.name,
        kind: r.kind,
        capacity: r.capacity,
        refillPerSecond: r.refill_per_second,
        tokens: r.tokens,
        tokensAt: r.tokens_at,
        held: 0,
        consumed: r.consumed,
        estAvg: r.est_avg,
        estSamples: r.est_n,
        waiting: 0,
        pausedUntil: r.paused_until,
      });
    }
    for (const r of this.sql<{ worker: string; dur_avg: number | null; dur_n: number; usage: string }>`SELECT * FROM worker_stats`) {
      this.stats.set(r.worker, { worker: r.worker, durAvg: r.dur_avg, durSamples: r.dur_n, usage: JSON.parse(r.usage) });
    }
    this.leases = 0;
    this.live.clear();
    this.chains.clear();
    // A scan (no index on the granted rows: one would cost a row on every grant for this one read per load).
    for (const r of this.sql<ResRow>`SELECT * FROM reservations WHERE state = 'granted'`) {
      this.live.set(r.id, r);
      if (r.chain !== null && !chainOf(r)!.cut) this.chains.set(r.id, r);
      if (holdsClient(r)) {
        const c = clientOf(r.client_id);
        holdCost(c, r.cost_est, true);
        for (const [n, a] of Object.entries(clientNeedsOf(r))) {
          const b = c.rate.get(n);
          if (b) b.held += a;
        }
      }
      for (const [n, a] of Object.entries(needsOf(r))) {
        const p = this.pools.get(n);
        if (p) p.held += a;
      }
      this.leases++;
    }
    this.waiters = 0;
    this.parked = 0;
    this.seq = 0;
    for (const r of this.sql<{ req: string; parked: number; seq: number; client_id: string | null }>`SELECT req, parked, seq, client_id
        FROM reservations WHERE state = 'waiting'`) {
      if (r.seq > this.seq) this.seq = r.seq;
      const c = clientOf(r.client_id);
      c.waiting++;
      if (r.parked === HELD) c.held++;
      for (const n of Object.keys(JSON.parse(r.req) as Amounts)) {
        const p = this.pools.get(n);
        if (p) p.waiting++;
      }
      this.waiters++;
      if (r.parked === PARKED) this.parked++;
    }
  }

  /** Memory against SQL, for tests: held amounts, counters, persisted pool fields. */
  selfCheck(): string[] {
    this.commit.flush();
    const problems: string[] = [];
    const held = new Map<string, number>();
    const waiting = new Map<string, number>();
    let leases = 0;
    let waiters = 0;
    for (const r of this.sql<ResRow>`SELECT * FROM reservations WHERE state IN ('granted', 'waiting')`) {
      const needs = needsOf(r);
      if (r.state === "granted") leases++;
      else waiters++;
      for (const [n, a] of Object.entries(needs)) {
        const m = r.state === "granted" ? held : waiting;
        m.set(n, (m.get(n) ?? 0) + (r.state === "granted" ? a : 1));
      }
    }
    if (leases !== this.leases) problems.push(`leases: memory ${this.leases}, sql ${leases}`);
    if (this.live.size !== leases) problems.push(`live map: ${this.live.size} rows, sql ${leases} granted`);
    for (const r of this.live.values()) {
      const sqlRow = this.sql<ResRow>`SELECT * FROM reservations WHERE id = ${r.id}`[0];
      if (sqlRow?.state !== "granted" || sqlRow.expires_at !== r.expires_at) problems.push(`live map row ${r.id} differs from sql`);
    }
    if (waiters !== this.waiters) problems.push(`waiters: memory ${this.waiters}, sql ${waiters}`);
    const perClient = new Map<string, { running: number; cost: number; largest: number; waiting: number; held: number }>();
    for (const r of this.sql<ResRow>`SELECT * FROM reservations WHERE state IN ('granted', 'waiting')`) {
      const k = r.client_id ?? NO_CLIENT;
      const e = perClient.get(k) ?? { running: 0, cost: 0, largest: 0, waiting: 0, held: 0 };
      if (r.state === "granted") {
        if (!holdsClient(r)) continue;
        e.running++;
        e.cost += r.cost_est;
        e.largest = Math.max(e.largest, r.cost_est);
      } else {
        e.waiting++;
        if (r.parked === HELD) e.held++;
      }
      perClient.set(k, e);
    }
    for (const c of this.clients.values()) {
      const e = perClient.get(c.id) ?? { running: 0, cost: 0, largest: 0, waiting: 0, held: 0 };
      const largest = largestHeld(c);
      if (e.running !== c.running || e.waiting !== c.waiting || e.held !== c.held || Math.abs(e.cost - c.heldCost) > 1e-6 || e.largest !== largest) {
        problems.push(`client ${c.id}: memory ${JSON.stringify([c.running, c.heldCost, c.waiting, c.held])}, sql ${JSON.stringify(e)}`);
      }
    }
    for (const p of this.pools.values()) {
      const h = held.get(p.name) ?? 0;
      if (Math.abs(h - p.held) > 1e-6) problems.push(`${p.name}: held memory ${p.held}, sql ${h}`);
      const w = waiting.get(p.name) ?? 0;
      if (w !== p.waiting) problems.push(`${p.name}: waiting memory ${p.waiting}, sql ${w}`);
      const row = this.sql<{ tokens: number; consumed: number; capacity: number }>`SELECT tokens, consumed, capacity FROM pools
        WHERE name = ${p.name}`[0];
      if (!row) problems.push(`${p.name}: no row`);
      else if (row.capacity !== p.capacity || row.consumed !== p.consumed) problems.push(`${p.name}: row differs from memory`);
    }
    // What a restart would load (the checkpoint and the rows past it) is what memory holds.
    problems.push(...checkPersisted(this.clients.values(), readPersistedClients(this.sql), this.virtualTime));
    return problems;
  }

  // ---- writes batched per commit -------------------------------------------------

  #writeDirty(): void {
    for (const p of this.#dirtyPools) this.#savePool(p);
    for (const w of this.#dirtyStats) {
      this.sql`INSERT INTO worker_stats (worker, dur_avg, dur_n, usage)
        VALUES (${w.worker}, ${w.durAvg}, ${w.durSamples}, ${JSON.stringify(w.usage)})
        ON CONFLICT (worker) DO UPDATE SET dur_avg = excluded.dur_avg, dur_n = excluded.dur_n, usage = excluded.usage`;
    }
    if (this.#checkpointDue || this.#pastCheckpoint >= this.rules.clientCheckpointRows) {
      writeCheckpoint(this.sql, new Set([...this.#journaled, ...this.#settings]), this.virtualTime, this.#cseq);
      this.#journaled.clear();
      this.#pastCheckpoint = 0;
      this.#checkpointDue = false;
    } else {
      for (const c of this.#settings) writeSettings(this.sql, c);
    }
    this.#dirtyPools.clear();
    this.#dirtyStats.clear();
    this.#settings.clear();
  }

  #savePool(p: PoolState): void {
    this.sql`INSERT INTO pools (name, kind, capacity, refill_per_second, tokens, tokens_at, consumed, est_avg, est_n, paused_until)
      VALUES (${p.name}, ${p.kind}, ${p.capacity}, ${p.refillPerSecond}, ${p.tokens}, ${p.tokensAt}, ${p.consumed},
              ${p.estAvg}, ${p.estSamples}, ${p.pausedUntil ?? null})
      ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, capacity = excluded.capacity,
        refill_per_second = excluded.refill_per_second, tokens = excluded.tokens, tokens_at = excluded.tokens_at,
        consumed = excluded.consumed, est_avg = excluded.est_avg, est_n = excluded.est_n, paused_until = excluded.paused_until`;
  }
}

/** The round of a reservation id of the attempt whose round-0 id is `base` (`{base}` or `{base}@{round}`). */
function roundOf(base: string, id: string): number {
  return id === base ? 0 : Number(id.slice(base.length + 1));
}
