/**
 * How a client's changing state is persisted without a `clients` row write per
 * grant and settle (docs/ledger.md, "Clients", "Persistence").
 *
 * A client's spend, month and rate buckets change on every grant and settle,
 * and each such change writes one of the client's reservation rows anyway. So
 * that row carries the client's state after the change (`cstate`) and a change
 * number (`cseq`, one counter for the whole object): the reservation write *is*
 * the client write, in the same statement. The `clients` table is a checkpoint,
 * written every `clientCheckpointRows` row writes (and whenever rows not yet
 * covered by it would be purged, or quotas change), together with
 * `meta.client_checkpoint`, the last change number it covers.
 *
 * State at load, per client: the checkpoint row, then the rows with a change
 * number past the checkpoint in order, the last one winning. That is exactly
 * the state after the last committed change, as a `clients` row written with
 * every change would be:
 * - spend, month, buckets: every change of them is followed, in the same step,
 *   by a write of one of the client's rows, which carries them (a bucket's
 *   lazy refill and a month's roll are pure functions of the stored fields and
 *   the time, so they need no write);
 * - the fair-queue tag: a client's last tag is the tag of its newest
 *   reservation, which is a row written after the checkpoint or covered by it;
 * - the virtual time (the largest tag granted): every grant writes its row.
 * Quotas and the start bucket change outside any reservation row: they are
 * written to the `clients` row at once, in their own columns only.
 */
import type { ClientQuotas } from "../../schemas/clients";
import { refill, type ClientState, type PoolState } from "../ledger-rules";
import type { Sql } from "../sql";

/** A rate bucket as persisted: [tokens, tokensAt, capacity] (refill is capacity / 60 per second). */
type StoredBucket = [number, number, number];

/** What the ledger's tables say of one client (the fields that are not derived from reservations). */
export interface PersistedClient {
  own: ClientQuotas | null;
  starts: PoolState | null;
  month: string;
  spent: number;
  lastTag: number;
  buckets: Map<string, StoredBucket>;
  /** Whether rows written after the checkpoint name it (the next checkpoint must write it). */
  pastCheckpoint: boolean;
}

export interface PersistedClients {
  clients: Map<string, PersistedClient>;
  virtualTime: number;
  /** The checkpoint's change number, and the largest one written. */
  checkpoint: number;
  lastChange: number;
  /** Rows written after the checkpoint (they are read at load). */
  pastCheckpoint: number;
}

/** The `cstate` of a row: the client's month, spend and buckets after the change the row records. */
export function encodeClientState(c: ClientState): string {
  return JSON.stringify([c.month, c.spent, c.rate.size ? Object.fromEntries(storedBuckets(c)) : {}]);
}

function bucketsOf(json: string): Map<string, StoredBucket> {
  const out = new Map<string, StoredBucket>();
  // Checkpoints before the journal stored whole PoolState objects; both read the same.
  for (const [pool, b] of Object.entries(JSON.parse(json) as Record<string, StoredBucket | PoolState>)) {
    out.set(pool, Array.isArray(b) ? b : [b.tokens, b.tokensAt, b.capacity]);
  }
  return out;
}

export function bucketOf(id: string, pool: string, [tokens, tokensAt, capacity]: StoredBucket): PoolState {
  return {
    name: `client:${id}:${pool}`,
    kind: "rate",
    capacity,
    refillPerSecond: capacity / 60,
    tokens,
    tokensAt,
    held: 0,
    consumed: 0,
    estAvg: null,
    estSamples: 0,
    waiting: 0,
  };
}

export function emptyClient(): PersistedClient {
  return { own: null, starts: null, month: "", spent: 0, lastTag: 0, buckets: new Map(), pastCheckpoint: false };
}

/** The clients' persisted state: the checkpoint, then every row written after it (load and selfCheck read it so). */
export function readPersistedClients(sql: Sql): PersistedClients {
  const meta = (key: string) => Number(sql<{ value: string }>`SELECT value FROM meta WHERE key = ${key}`[0]?.value ?? 0);
  const checkpoint = meta("client_checkpoint");
  let virtualTime = meta("virtual_time");
  const clients = new Map<string, PersistedClient>();
  type ClientRow = { client_id: string; quotas: string | null; month: string; spent: number; buckets: string; starts: string | null; last_tag: number };
  for (const r of sql<ClientRow>`SELECT * FROM clients`) {
    clients.set(r.client_id, {
      own: r.quotas ? (JSON.parse(r.quotas) as ClientQuotas) : null,
      starts: r.starts ? (JSON.parse(r.starts) as PoolState) : null,
      month: r.month,
      spent: r.spent,
      lastTag: r.last_tag,
      buckets: bucketsOf(r.buckets),
      pastCheckpoint: false,
    });
  }
  let lastChange = checkpoint;
  let pastCheckpoint = 0;
  type JournalRow = { client_id: string | null; tag: number; granted_at: number | null; cseq: number; cstate: string | null };
  // A scan of the table (no index on cseq: one would cost a row on every reservation write for this one read per load).
  for (const r of sql<JournalRow>`SELECT client_id, tag, granted_at, cseq, cstate FROM reservations
      WHERE cseq > ${checkpoint} ORDER BY cseq`) {
    pastCheckpoint++;
    lastChange = r.cseq;
    const id = r.client_id ?? "";
    let c = clients.get(id);
    if (!c) {
      c = emptyClient();
      clients.set(id, c);
    }
    c.pastCheckpoint = true;
    if (r.tag > c.lastTag) c.lastTag = r.tag;
    if (r.granted_at !== null && r.tag > virtualTime) virtualTime = r.tag;
    if (r.cstate) {
      const [month, spent, buckets] = JSON.parse(r.cstate) as [string, number, Record<string, StoredBucket>];
      c.month = month;
      c.spent = spent;
      c.buckets = new Map(Object.entries(buckets));
    }
  }
  return { clients, virtualTime, checkpoint, lastChange, pastCheckpoint };
}

/** Writes the checkpoint: the given clients' whole rows and the change number they cover (in one transaction with the rows). */
export function writeCheckpoint(sql: Sql, clients: Iterable<ClientState>, virtualTime: number, lastChange: number): void {
  for (const c of clients) {
    const v = columnsOf(c);
    sql`INSERT INTO clients (client_id, quotas, month, spent, buckets, starts, last_tag)
      VALUES (${c.id}, ${v.quotas}, ${c.month}, ${c.spent}, ${v.buckets}, ${v.starts}, ${c.lastTag})
      ON CONFLICT (client_id) DO UPDATE SET quotas = excluded.quotas, month = excluded.month, spent = excluded.spent,
        buckets = excluded.buckets, starts = excluded.starts, last_tag = excluded.last_tag`;
  }
  sql`INSERT INTO meta (key, value) VALUES ('virtual_time', ${String(virtualTime)}) ON CONFLICT (key) DO UPDATE SET value = excluded.value`;
  sql`INSERT INTO meta (key, value) VALUES ('client_checkpoint', ${String(lastChange)}) ON CONFLICT (key) DO UPDATE SET value = excluded.value`;
}

/**
 * Quotas and the start bucket, which no reservation row carries: written at
 * once, in their own columns only. (A new row takes the other columns from
 * memory; the rows past the checkpoint, applied over it at load, agree with it.)
 */
export function writeSettings(sql: Sql, c: ClientState): void {
  const v = columnsOf(c);
  sql`INSERT INTO clients (client_id, quotas, month, spent, buckets, starts, last_tag)
    VALUES (${c.id}, ${v.quotas}, ${c.month}, ${c.spent}, ${v.buckets}, ${v.starts}, ${c.lastTag})
    ON CONFLICT (client_id) DO UPDATE SET quotas = excluded.quotas, starts = excluded.starts`;
}

function columnsOf(c: ClientState): { quotas: string | null; starts: string | null; buckets: string } {
  return {
    quotas: c.own ? JSON.stringify(c.own) : null,
    starts: c.starts ? JSON.stringify(c.starts) : null,
    buckets: JSON.stringify(Object.fromEntries(storedBuckets(c))),
  };
}

function storedBuckets(c: ClientState): [string, StoredBucket][] {
  return [...c.rate].map(([pool, b]) => [pool, [b.tokens, b.tokensAt, b.capacity]]);
}

/**
 * Memory against what a restart would load, for tests (LedgerStore.selfCheck):
 * the same spend this month, quotas, start bucket, last tag, and buckets that
 * hold the same at the same time (a refill is a function of the stored fields).
 */
export function checkPersisted(clients: Iterable<ClientState>, persisted: PersistedClients, virtualTime: number): string[] {
  const problems: string[] = [];
  if (persisted.virtualTime !== virtualTime) problems.push(`virtual time: memory ${virtualTime}, stored ${persisted.virtualTime}`);
  for (const c of clients) {
    const p = persisted.clients.get(c.id) ?? emptyClient();
    const month = c.month > p.month ? c.month : p.month;
    const spentIn = (m: string, spent: number) => (m === month ? spent : 0);
    const diffs: string[] = [];
    if (Math.abs(spentIn(c.month, c.spent) - spentIn(p.month, p.spent)) > 1e-9) diffs.push(`spent ${c.month} ${c.spent} / ${p.month} ${p.spent}`);
    if (c.lastTag !== p.lastTag) diffs.push(`last tag ${c.lastTag} / ${p.lastTag}`);
    if (JSON.stringify(c.own) !== JSON.stringify(p.own)) diffs.push("quotas");
    if (JSON.stringify(c.starts) !== JSON.stringify(p.starts)) diffs.push("start bucket");
    for (const pool of p.buckets.keys()) if (!c.rate.has(pool)) diffs.push(`bucket ${pool} stored, not in memory`);
    for (const [pool, b] of c.rate) {
      const s = p.buckets.get(pool);
      const stored = s ? bucketOf(c.id, pool, s) : { ...b, tokens: b.capacity };
      const at = Math.max(b.tokensAt, stored.tokensAt);
      const mem = { ...b };
      refill(mem, at);
      refill(stored, at);
      if (stored.capacity !== mem.capacity || Math.abs(stored.tokens - mem.tokens) > 1e-6 + 1e-9 * mem.capacity) {
        diffs.push(`bucket ${pool} ${mem.tokens}/${mem.capacity} / ${stored.tokens}/${stored.capacity}`);
      }
    }
    if (diffs.length) problems.push(`client ${JSON.stringify(c.id)} memory / stored: ${diffs.join("; ")}`);
  }
  return problems;
}
