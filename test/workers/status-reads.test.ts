import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { JSON_HEADERS, KAM, OPS, call, ended, executionStub, startExecution, status, until, waitFor } from "../support/api";
import { TEST_API_KEYS, TEST_TUNING } from "../support/constants";

/**
 * Status reads (docs/protocol.md, "Status reads"): the document comes from the
 * Execution object's memory with a `version`, an `ETag` and 304s, and a long
 * poll (`wait_ms`, `since`) answers when the version moves past `since`.
 */

const bearer = (key: string) => ({ authorization: `Bearer ${key}` });
const ALPHA = bearer(TEST_API_KEYS.alpha.key);
const BETA = bearer(TEST_API_KEYS.beta.key);

/** The document without the durations that grow while a stage or a pause runs (they are not changes). */
function state(d: StatusDocument): unknown {
  return { ...d, paused_ms: 0, stages: d.stages.map((s) => ({ ...s, waiting_ms: 0, processing_ms: 0 })) };
}

async function read(id: string, query = "", headers: Record<string, string> = OPS): Promise<{ res: Response; doc: StatusDocument | null; ms: number }> {
  const t0 = Date.now();
  const res = await call(`/executions/${id}${query}`, { headers });
  const text = await res.text();
  return { res, doc: text ? (JSON.parse(text) as StatusDocument) : null, ms: Date.now() - t0 };
}

async function awaitingApproval(client = "client_status_reads"): Promise<{ id: string; doc: StatusDocument }> {
  const { body } = await startExecution({ template_name: "approval_pipeline", parameters: { echo: { draft: "v1" } }, client_id: client });
  const id = body.execution_id as string;
  return { id, doc: await waitFor(id, (d) => d.stages[1]?.status === "awaiting_approval") };
}

const approve = (id: string) => call(`/executions/${id}/stages/stage_2/approve`, { method: "POST", headers: { ...OPS, ...JSON_HEADERS }, body: "{}" });

describe("status reads from the execution's memory", () => {
  it("the version rises with every change of the document and with nothing else; the same version is the same document", async () => {
    const { body } = await startExecution({ template_name: "fault_two_stage", parameters: { steps: 3, step_ms: 60 }, client_id: "client_status_reads" });
    const id = body.execution_id as string;
    const seen: StatusDocument[] = [];
    // Reads as fast as they come while the worker's progress and complete callbacks move the stages.
    for (;;) {
      const d = (await read(id)).doc!;
      seen.push(d);
      if (ended(d)) break;
    }
    for (let i = 1; i < seen.length; i++) {
      const [a, b] = [seen[i - 1], seen[i]];
      expect(b.version).toBeGreaterThanOrEqual(a.version);
      // Same version: the same document; another document: a higher version.
      if (b.version === a.version) expect(state(b)).toEqual(state(a));
      else expect(state(b)).not.toEqual(state(a));
    }
    const versions = new Set(seen.map((d) => d.version));
    expect(versions.size).toBeGreaterThan(3);
    // Reads of an ended execution change nothing, the version included.
    const last = seen.at(-1)!;
    expect((await read(id)).doc).toEqual(last);
    expect((await read(id)).doc).toEqual(last);
  });

  it("a read runs no SQL statement in the object: the document is in memory", async () => {
    const { id, doc } = await awaitingApproval();
    const stub = executionStub(id);
    await read(id);
    type Counted = { exec: (...a: unknown[]) => unknown; __n?: number };
    const count = () => runInDurableObject(stub, (_o, st) => (st.storage.sql as unknown as Counted).__n!);
    const reset = () =>
      runInDurableObject(stub, (_o, st) => {
        (st.storage.sql as unknown as Counted).__n = 0;
      });
    await runInDurableObject(stub, (_o, st) => {
      const sql = st.storage.sql as unknown as Counted;
      const exec = sql.exec.bind(sql);
      sql.__n = 0;
      sql.exec = (...a: unknown[]) => {
        sql.__n! += 1;
        return exec(...a);
      };
    });
    // First a window in which the object runs nothing of its own (the outbox and the ledger's answers settle after
    // stage 1), longer than the index summary's hold (indexHoldMs): a held summary still pending would be sent
    // inside it, not during the reads below.
    const deadline = Date.now() + 15_000;
    for (;;) {
      await reset();
      await scheduler.wait(TEST_TUNING.indexHoldMs + 300);
      if ((await count()) === 0) break;
      if (Date.now() > deadline) throw new Error("the object never went quiet");
    }
    for (let i = 0; i < 5; i++) expect((await read(id)).doc!.version).toBe(doc.version);
    expect(await count()).toBe(0);
    // The count is real: a call that reads its tables is counted.
    await stub.reservationIds();
    expect(await count()).toBeGreaterThan(0);
  });

  it("answers an ETag from the execution id and the version, and 304 with no body for If-None-Match on the current version", async () => {
    const { id } = await awaitingApproval();
    const first = await read(id);
    const etag = first.res.headers.get("etag");
    expect(etag).toBe(`W/"${id}.${first.doc!.version}"`);
    const again = await read(id, "", { ...OPS, "if-none-match": etag! });
    expect(again.res.status).toBe(304);
    expect(again.doc).toBeNull();
    expect(again.res.headers.get("etag")).toBe(etag);
    // A tag of another execution, or an older version, gets the document.
    expect((await read(id, "", { ...OPS, "if-none-match": `W/"ex_other.${first.doc!.version}"` })).res.status).toBe(200);
    expect((await read(id, "", { ...OPS, "if-none-match": `W/"${id}.${first.doc!.version - 1}"` })).res.status).toBe(200);

    expect((await approve(id)).status).toBe(200);
    const changed = await read(id, "", { ...OPS, "if-none-match": etag! });
    expect(changed.res.status).toBe(200);
    expect(changed.doc!.version).toBeGreaterThan(first.doc!.version);
    expect(changed.res.headers.get("etag")).toBe(`W/"${id}.${changed.doc!.version}"`);
  });

  it("a long poll answers when a transition happens: the approval decision, and the worker's callbacks after it", async () => {
    const { id, doc } = await awaitingApproval();
    const poll = read(id, `?wait_ms=20000&since=${doc.version}`);
    // The poll is waiting in the object: nothing changes until the decision.
    const decided = await approve(id);
    expect(decided.status).toBe(200);
    const got = await poll;
    expect(got.res.status).toBe(200);
    expect(got.doc!.version).toBeGreaterThan(doc.version);
    expect(got.doc!.stages[1].status).toBe("completed");
    expect(got.res.headers.get("etag")).toBe(`W/"${id}.${got.doc!.version}"`);

    // Follow the rest by long polls only: each answer is a newer version, until the end.
    let last = got.doc!;
    while (!ended(last)) {
      const next = (await read(id, `?wait_ms=20000&since=${last.version}`)).doc!;
      expect(next.version).toBeGreaterThan(last.version);
      last = next;
    }
    expect(last.status).toBe("completed");
    expect(state(last)).toEqual(state(await status(id)));
  });

  it("a long poll on a document that does not change answers at wait_ms with the same version", async () => {
    const { id, doc } = await awaitingApproval();
    const got = await read(id, `?wait_ms=400&since=${doc.version}`);
    expect(got.res.status).toBe(200);
    expect(got.doc!.version).toBe(doc.version);
    expect(got.ms).toBeGreaterThanOrEqual(390);
    // Without since it waits for the next change after its arrival, and with If-None-Match on that version it ends in a 304.
    const none = await read(id, "?wait_ms=300", { ...OPS, "if-none-match": `W/"${id}.${doc.version}"` });
    expect(none.res.status).toBe(304);
    expect(none.ms).toBeGreaterThanOrEqual(290);
    // since below the current version: answered at once.
    const behind = await read(id, `?wait_ms=20000&since=${doc.version - 1}`);
    expect(behind.doc!.version).toBe(doc.version);
    expect(behind.ms).toBeLessThan(20_000);
  });

  it("refuses bad wait_ms and since with 400 naming the field, and changes nothing", async () => {
    const { id, doc } = await awaitingApproval();
    for (const [query, field] of [
      ["?wait_ms=abc", "wait_ms"],
      ["?wait_ms=-5", "wait_ms"],
      ["?wait_ms=1.5", "wait_ms"],
      ["?wait_ms=30001", "wait_ms"],
      ["?since=-1", "since"],
      ["?since=v3", "since"],
      ["?wait_ms=100&since=", "since"],
    ] as const) {
      const r = await read(id, query);
      expect(r.res.status, query).toBe(400);
      const err = (r.doc as unknown as { error: { code: string; details: { path: string }[] } }).error;
      expect(err.code).toBe("invalid_request");
      expect(err.details.map((d) => d.path)).toEqual([field]);
    }
    expect((await read(id)).doc!.version).toBe(doc.version);
  });

  it("scoped keys: the owner's key reads and long-polls; another client's key gets 404, with or without If-None-Match", async () => {
    const { id, doc } = await awaitingApproval("client_alpha");
    const own = await read(id, "", ALPHA);
    expect(own.res.status).toBe(200);
    expect(own.doc!.version).toBe(doc.version);
    const etag = own.res.headers.get("etag")!;
    for (const query of ["", "?wait_ms=200", `?wait_ms=200&since=${doc.version}`]) {
      const other = await read(id, query, { ...BETA, "if-none-match": etag });
      expect(other.res.status, query).toBe(404);
      expect(other.res.headers.get("etag")).toBeNull();
      expect((other.doc as unknown as { error: { code: string } }).error.code).toBe("not_found");
    }
    expect((await read(id, `?wait_ms=200&since=${doc.version}`, ALPHA)).doc!.version).toBe(doc.version);
    expect((await read(id, "", KAM)).res.status).toBe(200);
  });

  it("a version is stored when it is first shown or the execution ends: the changes nobody was shown write none, and a restart never reuses a version shown", async () => {
    const { id, doc } = await awaitingApproval();
    const stub = executionStub(id);
    const stored = () =>
      runInDurableObject(stub, (_o, st) => st.storage.sql.exec<{ version: number; status: string }>("SELECT status_version AS version, status FROM execution").one());
    expect((await stored()).version).toBe(doc.version);
    // The approval's answer shows the document of its turn; the execution then runs to its end with nobody reading.
    const decided = (await (await approve(id)).json()) as StatusDocument;
    expect(decided.version).toBeGreaterThan(doc.version);
    await until("the execution's end, read from its SQL (not shown)", stored, (r) => r.status === "completed");
    // Stage 2's completion and stage 3's start changed the document unread: none stored. The end's
    // version is stored with the end (every caller reads it next), one above the last of those changes.
    const atEnd = (await stored()).version;
    expect(atEnd).toBeGreaterThan(decided.version + 1);
    // A new instance counts from the last version stored: the ended document keeps it.
    await evictDurableObject(stub);
    const end = (await read(id)).doc!;
    expect(end.status).toBe("completed");
    expect(end.version).toBe(atEnd);
    expect((await stored()).version).toBe(atEnd);
  });

  it("the document in memory is the one a fresh object builds after eviction, at the same version; the next change takes the next one", async () => {
    const { id } = await awaitingApproval();
    const before = (await read(id)).doc!;
    await evictDurableObject(executionStub(id));
    const after = (await read(id)).doc!;
    expect(after.version).toBe(before.version);
    expect(state(after)).toEqual(state(before));
    expect((await approve(id)).status).toBe(200);
    const end = await waitFor(id, ended);
    expect(end.version).toBeGreaterThan(before.version);
    await evictDurableObject(executionStub(id));
    expect(await status(id)).toEqual(end);
  });
});
