import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { ExecutionStatus } from "../../schemas/api";
import type { ExecutionCounts, ExecutionList, ExecutionSummary, IndexEntry } from "../../schemas/index-entry";
import { decodeCursor } from "../../schemas/index-entry";
import { CLOCK_SKEW_MS, INDEX_EPOCH_MS, bucketsNewestFirst, indexBucket, indexFor } from "../../src/index-routing";
import { KAM, OPS, call, ended, executionStub, startExecution, waitFor } from "../support/api";
import { TEST_TUNING } from "../support/constants";
import type { ExecutionIndex } from "../../actors/execution-index";
import { countingTransactions } from "../support/commits";

/**
 * The execution index: versioned idempotent upserts, month shards, newest-first
 * listing with cursors across shards, filters and counts; entries are written
 * straight through the object's RPC, as the Execution does.
 */
const STATUSES: ExecutionStatus[] = ["queued", "running", "completed", "failed", "cancelled"];
const run = Math.random().toString(36).slice(2, 8);

function entry(over: Partial<IndexEntry> & Pick<IndexEntry, "execution_id" | "created_at">): IndexEntry {
  return {
    client_id: `client_${run}`,
    template_name: "course_creation",
    status: "queued",
    priority: "normal",
    updated_at: over.created_at,
    completed_at: null,
    error_code: null,
    cost_total: null,
    stages_total: 3,
    stages_completed: 0,
    version: 1,
    ...over,
  };
}

const execId = (ms: number, n: number) => `exec_${ms}_${run}${String(n).padStart(8, "0")}`;

async function upsertAll(entries: IndexEntry[]) {
  for (let i = 0; i < entries.length; i += 50) {
    await Promise.all(entries.slice(i, i + 50).map((e) => indexFor(env, e.created_at).upsert(e)));
  }
}

async function list(query: Record<string, string | number | undefined>, headers: Record<string, string> = OPS) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined) q.set(k, String(v));
  const res = await call(`/executions?${q}`, { headers });
  const body = (await res.json()) as ExecutionList & { error?: { code: string } };
  return { res, body };
}

/**
 * Every page of a query, following the cursor; checks each page's size on the way.
 * `shortPages`: the query spans more months than one request reads
 * (maxIndexShardsPerRequest), so a page may end short at that bound, with a cursor.
 */
async function listAll(query: Record<string, string | number | undefined>, limit: number, shortPages = false): Promise<ExecutionSummary[]> {
  const out: ExecutionSummary[] = [];
  let cursor: string | undefined;
  for (let pages = 0; pages < 1000; pages++) {
    const { res, body } = await list({ ...query, limit, cursor });
    expect(res.status, JSON.stringify(body)).toBe(200);
    out.push(...body.items);
    if (!body.next_cursor) {
      expect(body.items.length).toBeLessThanOrEqual(limit);
      return out;
    }
    if (shortPages) expect(body.items.length).toBeLessThanOrEqual(limit);
    else expect(body.items).toHaveLength(limit);
    cursor = body.next_cursor;
  }
  throw new Error("pagination did not end");
}

const newestFirst = (a: IndexEntry, b: IndexEntry) => b.created_at - a.created_at || (a.execution_id < b.execution_id ? 1 : -1);

describe("index routing: one shard per UTC month of created_at", () => {
  it("names buckets and walks them newest first, within the epoch", () => {
    expect(indexBucket(Date.UTC(2026, 10, 24, 12))).toBe("2026-11");
    expect(indexBucket(Date.UTC(2026, 11, 31, 23, 59, 59, 999))).toBe("2026-12");
    expect(indexBucket(Date.UTC(2027, 0, 1))).toBe("2027-01");
    expect(bucketsNewestFirst(Date.UTC(2026, 9, 15), Date.UTC(2027, 0, 1))).toEqual(["2026-12", "2026-11", "2026-10"]);
    // `until` is exclusive: a bound on the first instant of a month does not read that month.
    expect(bucketsNewestFirst(Date.UTC(2026, 10, 1), Date.UTC(2026, 11, 1))).toEqual(["2026-11"]);
    expect(bucketsNewestFirst(0, INDEX_EPOCH_MS + 1)).toEqual([indexBucket(INDEX_EPOCH_MS)]);
    expect(bucketsNewestFirst(Date.UTC(2026, 5, 1), Date.UTC(2026, 4, 1))).toEqual([]);
  });

  it("sends an execution's writes to the shard of its created_at", async () => {
    const t = Date.UTC(2026, 1, 10);
    const e = entry({ execution_id: execId(t, 1), created_at: t });
    await indexFor(env, t).upsert(e);
    expect(await indexFor(env, Date.UTC(2026, 1, 28, 23)).get(e.execution_id)).toEqual(e);
    expect(await indexFor(env, Date.UTC(2026, 2, 1)).get(e.execution_id)).toBeNull();
  });
});

describe("an index shard created before the later columns", () => {
  it("is migrated by the first call of a new instance even when that call is a read, so the upserts after it work", async () => {
    const t = Date.UTC(2027, 8, 12);
    const shard = indexFor(env, t);
    // The table as the first version made it: no rerun_of, attempts or tokens_total.
    await runInDurableObject(shard, (_i, state) => {
      state.storage.sql.exec(`CREATE TABLE entries (
        execution_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, template_name TEXT NOT NULL,
        status TEXT NOT NULL, priority TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
        completed_at INTEGER, error_code TEXT, cost_total REAL,
        stages_total INTEGER NOT NULL, stages_completed INTEGER NOT NULL, version INTEGER NOT NULL)`);
    });
    // A new instance (through a new stub: the old one is broken with it), whose first call is a read.
    await runInDurableObject(shard, (_i, state) => state.abort("test: a new instance")).catch(() => {});
    const again = indexFor(env, t);
    const e = entry({ execution_id: execId(t, 1), created_at: t });
    expect(await again.get(e.execution_id)).toBeNull();
    await again.upsert(e);
    expect(await again.get(e.execution_id)).toEqual(e);
    const columns = await runInDurableObject(again, (_i, state) => state.storage.sql.exec("PRAGMA table_info(entries)").toArray().map((r) => r.name));
    expect(columns).toEqual(expect.arrayContaining(["rerun_of", "attempts", "tokens_total"]));
  });
});

describe("ExecutionIndex.upsert", () => {
  it("is idempotent and keeps the highest version, whatever the arrival order", async () => {
    const t = Date.UTC(2026, 2, 3, 10);
    const id = execId(t, 2);
    const shard = indexFor(env, t);
    const v1 = entry({ execution_id: id, created_at: t, version: 1 });
    const v2 = entry({ execution_id: id, created_at: t, version: 2, status: "running", updated_at: t + 10 });
    const v3 = entry({
      execution_id: id,
      created_at: t,
      version: 3,
      status: "completed",
      updated_at: t + 500,
      completed_at: t + 500,
      cost_total: 0.0007,
      stages_completed: 3,
    });
    await shard.upsert(v1);
    await shard.upsert(v3);
    await shard.upsert(v2); // late
    await shard.upsert(v1); // repeated
    expect(await shard.get(id)).toEqual(v3);
    await shard.upsert(v3);
    expect(await shard.get(id)).toEqual(v3);
    const page = await shard.query({ client_id: v1.client_id, since: t, until: t + 1, limit: 10 });
    expect(page.items).toEqual([v3]);
  });

  it("writes the upserts that arrive within indexCommitMs in one commit, and answers each only once it is written (issue 17, target 4)", async () => {
    const t = Date.UTC(2026, 3, 7, 10);
    const ids = [0, 1, 2, 3, 4].map((n) => execId(t, 700 + n));
    const shard = indexFor(env, t);
    const stored = (state: DurableObjectState) =>
      state.storage.sql.exec("SELECT 1 FROM sqlite_master WHERE name = 'entries'").toArray().length === 0
        ? 0
        : state.storage.sql.exec(`SELECT COUNT(*) AS n FROM entries WHERE execution_id IN (${ids.map(() => "?").join(",")})`, ...ids).one().n;
    // The real storage's transactionSync, counted: each group commit of the index is one of them.
    const seen = await runInDurableObject(shard, (instance: ExecutionIndex, state) =>
      countingTransactions(state.storage, async (commits) => {
        let answered = 0;
        const all = Promise.all(ids.map((id) => instance.upsert(entry({ execution_id: id, created_at: t })).then(() => answered++)));
        // Inside the window: nothing written, nobody answered.
        await scheduler.wait(1);
        const during = { rows: stored(state), answered };
        await all;
        return { during, commits: commits(), rows: stored(state), answered };
      }),
    );
    expect(seen).toEqual({ during: { rows: 0, answered: 0 }, commits: 1, rows: 5, answered: 5 });
    expect((await shard.get(ids[4]))?.version).toBe(1);
  });

  it("a read inside the commit window writes what is waiting first and sees it; an older version waiting beside a newer one is not written over it", async () => {
    const t = Date.UTC(2026, 3, 8, 10);
    const id = execId(t, 710);
    const shard = indexFor(env, t);
    const got = await runInDurableObject(shard, async (instance: ExecutionIndex) => {
      const newer = instance.upsert(entry({ execution_id: id, created_at: t, version: 2, status: "running" }));
      const older = instance.upsert(entry({ execution_id: id, created_at: t, version: 1 }));
      const read = await instance.get(id);
      await Promise.all([newer, older]);
      return read;
    });
    expect(got).toMatchObject({ execution_id: id, version: 2, status: "running" });
    expect((await shard.get(id))?.version).toBe(2);
  });

  it("a newer entry updates what changes over an execution's life; client, template, priority, creation and rerun_of stay as first written", async () => {
    const t = Date.UTC(2026, 2, 3, 11);
    const id = execId(t, 3);
    const shard = indexFor(env, t);
    const v1 = entry({ execution_id: id, created_at: t, version: 1, rerun_of: null });
    await shard.upsert(v1);
    const v2 = entry({ execution_id: id, created_at: t + 5, version: 2, client_id: "other", template_name: "other", priority: "high", rerun_of: execId(t, 4), status: "completed", completed_at: t + 50, updated_at: t + 50, stages_completed: 3 });
    await shard.upsert(v2);
    expect(await shard.get(id)).toEqual({ ...v2, client_id: v1.client_id, template_name: v1.template_name, priority: v1.priority, created_at: t, rerun_of: undefined });
  });

  it("a new shard's entries table is WITHOUT ROWID; a shard created before, with its rowid table, keeps it and answers the same", async () => {
    const tables = async (t: number) =>
      runInDurableObject(indexFor(env, t), (_i, state) => state.storage.sql.exec("SELECT sql FROM sqlite_master WHERE name = 'entries'").toArray().map((r) => String(r.sql)));
    const fresh = Date.UTC(2025, 6, 9, 8);
    await indexFor(env, fresh).upsert(entry({ execution_id: execId(fresh, 1), created_at: fresh }));
    expect((await tables(fresh))[0]).toMatch(/WITHOUT ROWID\s*$/);
    // A shard whose table was created before: the same columns, a rowid table.
    const old = Date.UTC(2025, 4, 9, 8);
    const shard = indexFor(env, old);
    await runInDurableObject(shard, (_i, state) =>
      state.storage.sql.exec(`CREATE TABLE entries (
        execution_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, template_name TEXT NOT NULL,
        status TEXT NOT NULL, priority TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
        completed_at INTEGER, error_code TEXT, cost_total REAL,
        stages_total INTEGER NOT NULL, stages_completed INTEGER NOT NULL, version INTEGER NOT NULL)`),
    );
    const id = execId(old, 1);
    const v1 = entry({ execution_id: id, created_at: old });
    const v2 = entry({ execution_id: id, created_at: old, version: 2, status: "completed", completed_at: old + 9, updated_at: old + 9, stages_completed: 3 });
    await shard.upsert(v1);
    await shard.upsert(v2);
    await shard.upsert(v1);
    expect(await shard.get(id)).toEqual(v2);
    expect((await shard.query({ status: "completed", since: old, until: old + 1, limit: 10 })).items).toEqual([v2]);
    expect((await tables(old))[0]).not.toMatch(/WITHOUT ROWID/);
  });

  it("drops an entry that does not match the schema (a retry would not fix it)", async () => {
    const t = Date.UTC(2026, 2, 4);
    const shard = indexFor(env, t);
    await shard.upsert(entry({ execution_id: "exec_nope", created_at: t }));
    await shard.upsert({ ...entry({ execution_id: execId(t, 3), created_at: t }), status: "weird" as ExecutionStatus });
    expect(await shard.get("exec_nope")).toBeNull();
    expect(await shard.get(execId(t, 3))).toBeNull();
  });
});

describe("GET /executions over 1,000 entries in four month shards", () => {
  // June to September 2026: months no other test writes to, so the expected lists are exact.
  const from = Date.UTC(2026, 5, 1);
  const to = Date.UTC(2026, 9, 1);
  const clients = [`acme_${run}`, `globex_${run}`, `initech_${run}`];
  const templates = ["course_creation", "quick_summary", "array_stages"];
  let seed = 42;
  const rnd = () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  const all: IndexEntry[] = [];
  for (let i = 0; i < 1000; i++) {
    // Every tenth entry shares its created_at with the previous one: the id breaks the tie.
    const created = i % 10 === 1 ? all[i - 1].created_at : from + Math.floor(rnd() * (to - from));
    const status = STATUSES[Math.floor(rnd() * STATUSES.length)];
    const done = status === "completed" || status === "failed" || status === "cancelled";
    all.push(
      entry({
        execution_id: execId(created, i),
        created_at: created,
        updated_at: created + 1000,
        client_id: clients[i % 3],
        template_name: templates[Math.floor(rnd() * 3)],
        status,
        priority: i % 4 === 0 ? "high" : "normal",
        completed_at: done ? created + 1000 : null,
        error_code: status === "failed" ? "worker_timeout" : null,
        cost_total: status === "completed" ? Math.round(rnd() * 1e6) / 1e9 : null,
        stages_completed: status === "completed" ? 3 : 1,
        version: 2,
      }),
    );
  }
  const expected = (pred: (e: IndexEntry) => boolean) => all.filter(pred).sort(newestFirst).map((e) => e.execution_id);
  const ids = (xs: ExecutionSummary[]) => xs.map((x) => x.execution_id);
  const window = { since: new Date(from).toISOString(), until: to };

  it("writes them through the RPC (a second, older write of each changes nothing)", async () => {
    expect(new Set(all.map((e) => indexBucket(e.created_at)))).toEqual(new Set(["2026-06", "2026-07", "2026-08", "2026-09"]));
    await upsertAll(all);
    await upsertAll(all.slice(0, 100).map((e) => ({ ...e, version: 1, status: "queued" as const })));
    const first = await indexFor(env, all[0].created_at).get(all[0].execution_id);
    expect(first).toEqual(all[0]);
  }, 60_000);

  it("lists all of them newest first, across shards, with cursors", async () => {
    const got = await listAll(window, 97);
    expect(got).toHaveLength(1000);
    expect(ids(got)).toEqual(expected(() => true));
    const sample = got.find((x) => x.execution_id === all[5].execution_id)!;
    expect(sample).toEqual({
      execution_id: all[5].execution_id,
      client_id: all[5].client_id,
      template_name: all[5].template_name,
      status: all[5].status,
      priority: all[5].priority,
      created_at: new Date(all[5].created_at).toISOString(),
      updated_at: new Date(all[5].updated_at).toISOString(),
      completed_at: all[5].completed_at === null ? null : new Date(all[5].completed_at).toISOString(),
      error_code: all[5].error_code,
      cost_total: all[5].cost_total,
      stages_total: 3,
      stages_completed: all[5].stages_completed,
      rerun_of: null,
    });
  }, 60_000);

  it("pages of the maximum size, and an exact last page with no cursor", async () => {
    // 1,000 is a multiple of 200: the fifth page is full, and says there is nothing after it.
    const got = await listAll(window, 200);
    expect(ids(got)).toEqual(expected(() => true));
  }, 60_000);

  it("walks back to the epoch when no since is given", async () => {
    // Nine months (January to September), more than one request reads: pages may end short at the bound.
    expect(TEST_TUNING.maxIndexShardsPerRequest).toBeLessThan(9);
    const got = await listAll({ until: to, client_id: clients[1] }, 150, true);
    expect(ids(got)).toEqual(expected((e) => e.client_id === clients[1]));
  }, 60_000);

  it("filters by client, template, status and time, alone and together", async () => {
    const cases: [Record<string, string | number>, (e: IndexEntry) => boolean][] = [
      [{ client_id: clients[0] }, (e) => e.client_id === clients[0]],
      [{ template_name: "quick_summary" }, (e) => e.template_name === "quick_summary"],
      [{ status: "failed" }, (e) => e.status === "failed"],
      [
        { client_id: clients[2], status: "completed", template_name: "array_stages" },
        (e) => e.client_id === clients[2] && e.status === "completed" && e.template_name === "array_stages",
      ],
    ];
    for (const [filter, pred] of cases) {
      expect(ids(await listAll({ ...window, ...filter }, 64)), JSON.stringify(filter)).toEqual(expected(pred));
    }
    // A window inside one month and one across a month boundary; since inclusive, until exclusive.
    const a = Date.UTC(2026, 6, 10);
    const b = Date.UTC(2026, 7, 20);
    const edge = all[300].created_at;
    const inWindow = (lo: number, hi: number) => (e: IndexEntry) => e.created_at >= lo && e.created_at < hi;
    expect(ids(await listAll({ since: a, until: b }, 50))).toEqual(expected(inWindow(a, b)));
    expect(ids(await listAll({ since: new Date(a).toISOString(), until: new Date(a + 5 * 86400e3).toISOString() }, 50))).toEqual(
      expected(inWindow(a, a + 5 * 86400e3)),
    );
    expect(ids(await listAll({ since: edge, until: edge + 1 }, 50))).toEqual(expected(inWindow(edge, edge + 1)));
    expect(ids(await listAll({ since: from, until: edge }, 200))).toEqual(expected(inWindow(from, edge)));
  }, 120_000);

  it("counts by status over a window, with the same filters", async () => {
    const res = await call(`/executions/counts?since=${from}&until=${to}`, { headers: OPS });
    expect(res.status).toBe(200);
    const body = (await res.json()) as ExecutionCounts;
    for (const s of STATUSES) expect(body.counts[s], s).toBe(all.filter((e) => e.status === s).length);
    expect(body.total).toBe(1000);
    expect(body.since).toBe(new Date(from).toISOString());
    const byClient = (await (await call(`/executions/counts?since=${from}&until=${to}&client_id=${clients[1]}`, { headers: KAM })).json()) as ExecutionCounts;
    expect(byClient.total).toBe(all.filter((e) => e.client_id === clients[1]).length);
    expect(byClient.counts.failed).toBe(all.filter((e) => e.client_id === clients[1] && e.status === "failed").length);
  });

  it("a cursor stays valid while newer executions arrive", async () => {
    const first = await list({ ...window, limit: 10 });
    const newer = entry({ execution_id: execId(to - 1, 5000), created_at: to - 1 });
    await indexFor(env, newer.created_at).upsert(newer);
    const second = await list({ ...window, limit: 10, cursor: first.body.next_cursor! });
    expect(ids(second.body.items)).toEqual(expected(() => true).slice(10, 20));
    const again = await list({ ...window, limit: 1 });
    expect(ids(again.body.items)).toEqual([newer.execution_id]);
  });
});

describe("bounds on the index: a clamped window, a bounded number of shards per request", () => {
  const bound = TEST_TUNING.maxIndexShardsPerRequest;
  const monthsBack = (ms: number, n: number) => {
    const d = new Date(ms);
    return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() - n, 1);
  };

  it("generates at most the months it is asked for", () => {
    expect(bucketsNewestFirst(INDEX_EPOCH_MS, Date.UTC(2026, 11, 15), 3)).toEqual(["2026-12", "2026-11", "2026-10"]);
    // However far the end: the walk stops at its bound instead of listing every month up to it.
    expect(bucketsNewestFirst(INDEX_EPOCH_MS, 999999999999999, 2)).toHaveLength(2);
  });

  it("GET /executions/counts?until=999999999999999 reads a bounded number of shards and answers a cursor for the rest", async () => {
    const t = Date.UTC(2026, 1, 12);
    await indexFor(env, t).upsert(entry({ execution_id: execId(t, 9001), created_at: t, client_id: `bounds_${run}`, status: "completed" }));
    const t2 = Date.UTC(2026, 10, 3);
    await indexFor(env, t2).upsert(entry({ execution_id: execId(t2, 9002), created_at: t2, client_id: `bounds_${run}`, status: "failed" }));

    const now = Date.now();
    const first = await call(`/executions/counts?until=999999999999999&client_id=bounds_${run}`, { headers: OPS });
    expect(first.status).toBe(200);
    const body = (await first.json()) as ExecutionCounts;
    // The end is clamped to now + the clock skew, not the year 33658.
    expect(Date.parse(body.until!)).toBeGreaterThanOrEqual(now + CLOCK_SKEW_MS - 1000);
    expect(Date.parse(body.until!)).toBeLessThanOrEqual(Date.now() + CLOCK_SKEW_MS);
    // Exactly `bound` months were read, newest first: the cursor continues just below the oldest of them.
    const top = now + CLOCK_SKEW_MS;
    expect(body.next_cursor).not.toBeNull();
    expect(decodeCursor(body.next_cursor!)?.created_at).toBe(monthsBack(top, bound - 1) - 1);

    // Following the cursor ends, one bounded step at a time, and the parts add up to the whole.
    const counts = { ...body.counts };
    let cursor = body.next_cursor;
    let answers = 1;
    while (cursor) {
      const next = (await (await call(`/executions/counts?until=999999999999999&client_id=bounds_${run}&cursor=${cursor}`, { headers: OPS })).json()) as ExecutionCounts;
      for (const s of STATUSES) counts[s] += next.counts[s];
      cursor = next.next_cursor;
      answers++;
    }
    const months = bucketsNewestFirst(INDEX_EPOCH_MS, top).length;
    expect(answers).toBe(Math.ceil(months / bound));
    expect(counts).toEqual({ queued: 0, running: 0, paused: 0, completed: 1, failed: 1, cancelled: 0 });
  });

  it("a list with an until far ahead is clamped and bounded too, and its cursor goes on to older months", async () => {
    const t = Date.UTC(2026, 0, 20);
    const old = entry({ execution_id: execId(t, 9003), created_at: t, client_id: `bounds_list_${run}` });
    await indexFor(env, t).upsert(old);
    const items: string[] = [];
    let cursor: string | null | undefined;
    let answers = 0;
    do {
      const { res, body } = await list({ until: 999999999999999, client_id: `bounds_list_${run}`, cursor: cursor ?? undefined });
      expect(res.status).toBe(200);
      items.push(...body.items.map((x) => x.execution_id));
      cursor = body.next_cursor;
      answers++;
    } while (cursor);
    expect(items).toEqual([old.execution_id]);
    expect(answers).toBe(Math.ceil(bucketsNewestFirst(INDEX_EPOCH_MS, Date.now() + CLOCK_SKEW_MS).length / bound));
  });
});

describe("GET /executions: auth and validation", () => {
  it("needs a token; KAM and OPS both read", async () => {
    expect((await call("/executions")).status).toBe(401);
    expect((await call("/executions", { headers: { authorization: "Bearer wrong" } })).status).toBe(401);
    expect((await call("/executions/counts")).status).toBe(401);
    // Both read the same page, with an entry this test wrote (not just a 200).
    const t = Date.UTC(2026, 4, 9);
    const mine = entry({ execution_id: execId(t, 7001), created_at: t, client_id: `readers_${run}`, status: "completed" });
    await indexFor(env, t).upsert(mine);
    const query = { client_id: `readers_${run}`, since: Date.UTC(2026, 4, 1), until: Date.UTC(2026, 5, 1) };
    const byKam = await list(query, KAM);
    const byOps = await list(query, OPS);
    expect(byKam.res.status).toBe(200);
    expect(byOps.res.status).toBe(200);
    expect(byKam.body).toEqual({ items: [expect.objectContaining({ execution_id: mine.execution_id, status: "completed", client_id: `readers_${run}` })], next_cursor: null });
    expect(byOps.body).toEqual(byKam.body);
    for (const h of [KAM, OPS]) {
      const counts = (await (await call(`/executions/counts?client_id=readers_${run}&since=${query.since}&until=${query.until}`, { headers: h })).json()) as ExecutionCounts;
      expect(counts).toMatchObject({ total: 1, counts: { completed: 1 }, next_cursor: null });
    }
  });

  it("refuses bad parameters with invalid_request naming them", async () => {
    const bad: Record<string, string>[] = [
      { limit: "0" },
      { limit: "201" },
      { limit: "ten" },
      { status: "sleeping" },
      { since: "yesterday" },
      { until: "2026-13-45T00:00:00Z" },
      { client_id: "has space" },
      { cursor: "not-a-cursor" },
      { cursor: btoa(JSON.stringify([1, "x"])) },
      { colour: "blue" },
    ];
    for (const q of bad) {
      const { res, body } = await list(q);
      expect(res.status, JSON.stringify(q)).toBe(400);
      expect(body.error?.code).toBe("invalid_request");
    }
  });

  it("answers an empty page for a window with nothing in it", async () => {
    const { body } = await list({ since: Date.UTC(2026, 0, 1), until: Date.UTC(2026, 0, 2) });
    expect(body).toEqual({ items: [], next_cursor: null });
  });
});

describe("the overview page", () => {
  it("is served to a browser on /ui and on /executions, without a token", async () => {
    for (const path of ["/ui", "/executions"]) {
      const res = await call(path, { headers: { accept: "text/html,application/xhtml+xml,*/*;q=0.8" } });
      expect(res.status, path).toBe(200);
      expect(res.headers.get("content-type")).toContain("text/html");
      expect(res.headers.get("content-security-policy")).toContain("default-src 'none'");
      const html = await res.text();
      expect(html).toContain('id="login"');
      expect(html).toContain("/executions/counts?");
      expect(html).not.toMatch(/<script[^>]+src=|<link[^>]+href="(?!data:)/);
    }
  });
});

describe("a real execution appears in the index", () => {
  it("is listed with its final status once it ends (written by the Execution)", async () => {
    const client = `client_index_${run}`;
    const { body } = await startExecution({
      template_name: "quick_summary",
      parameters: { topic: "Index", targetAudience: "ops", steps: 1, step_ms: 5 },
      client_id: client,
    });
    const doc = await waitFor(body.execution_id, ended);
    expect(doc.status).toBe("completed");
    const deadline = Date.now() + 10_000;
    let last: ExecutionList | null = null;
    while (Date.now() < deadline) {
      last = (await list({ client_id: client })).body;
      if (last.items[0]?.status === "completed") break;
      await scheduler.wait(50);
    }
    expect(last?.items, "the Execution did not write its summary to the index").toHaveLength(1);
    expect(last!.items[0]).toMatchObject({
      execution_id: body.execution_id,
      client_id: client,
      template_name: "quick_summary",
      status: "completed",
      priority: "normal",
      created_at: doc.created_at,
      completed_at: doc.completed_at,
      error_code: null,
      cost_total: doc.cost?.total,
      stages_total: doc.stages.length,
      stages_completed: doc.stages.length,
    });
  });
});
