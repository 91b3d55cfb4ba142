import { evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import type { StatusDocument } from "../../schemas/api";
import { KAM, OPS, call, ended, executionStub, startExecution, waitFor } from "../support/api";
import { TEST_API_KEYS } from "../support/constants";

/**
 * Leases on ended executions' documents (docs/protocol.md, "Status reads"): a
 * read of a settled, ended execution gives the front Worker's isolate a lease
 * of statusLeaseMs, during which it answers from its own memory; the object
 * holds back any change of that document until the lease has ended, for every
 * reader, and a new instance waits out the leases its predecessor may have given.
 */

/** This project's statusLeaseMs (vitest.config.ts). */
const LEASE_MS = 4000;

async function read(id: string, query = "", headers: Record<string, string> = OPS): Promise<{ res: Response; doc: StatusDocument | null }> {
  const res = await call(`/executions/${id}${query}`, { headers });
  const text = await res.text();
  return { res, doc: text ? (JSON.parse(text) as StatusDocument) : null };
}

/**
 * An ended execution with nothing left to deliver, the kind of document that
 * is leased; watched through the object's own getStatus (which gives no
 * lease), so the next `GET` is the first to take one.
 */
async function settled(): Promise<string> {
  const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0 }, client_id: "client_leases" });
  const id = body.execution_id as string;
  const deadline = Date.now() + 20_000;
  for (;;) {
    const d = (await executionStub(id).getStatus()) as unknown as StatusDocument | null;
    if (d && ended(d) && d.notifications.pending === 0) return id;
    if (Date.now() > deadline) throw new Error(`not settled within 20 s: ${JSON.stringify(d)}`);
    await scheduler.wait(25);
  }
}

/** Retention, made due now: a change of an ended execution's document (`data_expired_at`), stored by its alarm. */
async function expire(id: string): Promise<void> {
  const stub = executionStub(id);
  await runInDurableObject(stub, (_i, state) => state.storage.sql.exec("UPDATE timers SET due_at = 0 WHERE name = 'retention'"));
  await runDurableObjectAlarm(stub);
}

describe("leases on ended executions' documents", () => {
  it("within the lease the front Worker answers from its memory, 304s included, without calling the object", async () => {
    const id = await settled();
    // Every readStatus call that reaches an Execution object is counted (the class's own method, wrapped).
    const calls = { n: 0 };
    let restore = () => {};
    await runInDurableObject(executionStub(id), (instance: object) => {
      const proto = Object.getPrototypeOf(instance) as { readStatus: (...a: unknown[]) => unknown };
      const real = proto.readStatus;
      proto.readStatus = function (this: unknown, ...a: unknown[]) {
        calls.n++;
        return real.apply(this, a);
      };
      restore = () => {
        proto.readStatus = real;
      };
    });
    try {
      const first = await read(id);
      expect(calls.n).toBe(1);
      const etag = first.res.headers.get("etag")!;
      const again = await read(id);
      const notModified = await read(id, "", { ...OPS, "if-none-match": etag });
      // Another client's key still gets 404, from the same memory.
      const other = await read(id, "", { authorization: `Bearer ${TEST_API_KEYS.beta.key}` });
      expect(calls.n).toBe(1);
      expect(again.res.status).toBe(200);
      expect(again.doc).toEqual(first.doc);
      expect(again.res.headers.get("etag")).toBe(etag);
      expect(notModified.res.status).toBe(304);
      expect(notModified.res.headers.get("etag")).toBe(etag);
      expect(other.res.status).toBe(404);
      // A long poll is never answered from a lease: it goes to the object, which holds it.
      expect((await read(id, `?wait_ms=10&since=${first.doc!.version}`)).doc).toEqual(first.doc);
      expect(calls.n).toBe(2);
    } finally {
      restore();
    }
  });

  it("a change stored during the lease is held back for every reader, the object included, and is the next version when the lease ends", async () => {
    const id = await settled();
    const t0 = Date.now();
    const leased = (await read(id)).doc!;
    expect(leased.data_expired_at).toBeNull();
    await expire(id);
    // The data is gone, but the document the lease is on is still the one every reader gets.
    expect((await call(`/executions/${id}/result`, { headers: KAM })).status).toBe(410);
    expect((await read(id)).doc).toEqual(leased);
    const direct = (await executionStub(id).getStatus()) as unknown as StatusDocument;
    expect(direct).toEqual(leased);
    // A long poll (never answered from a lease) wakes when the lease ends, with the change as the next version.
    const polled = (await read(id, `?wait_ms=20000&since=${leased.version}`)).doc!;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(LEASE_MS);
    expect(polled.version).toBe(leased.version + 1);
    expect(polled.data_expired_at).not.toBeNull();
    expect((await read(id)).doc).toEqual(polled);
  });

  it("a new instance waits out the leases the evicted one may have given before it shows a change held back", async () => {
    const id = await settled();
    const t0 = Date.now();
    const leased = (await read(id)).doc!;
    await expire(id);
    await evictDurableObject(executionStub(id));
    const doc = (await executionStub(id).getStatus()) as unknown as StatusDocument;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(LEASE_MS);
    expect(doc.version).toBe(leased.version + 1);
    expect(doc.data_expired_at).not.toBeNull();
  });

  it("a running execution's document is not leased: a change shows on the next read", async () => {
    const { body } = await startExecution({ template_name: "quick_summary", parameters: { steps: 1, step_ms: 0, fault: { mode: "hang" } }, client_id: "client_leases" });
    const id = body.execution_id as string;
    const running = await waitFor(id, (d) => d.stages[0]?.status === "processing");
    expect((await call(`/executions/${id}/cancel`, { method: "POST", headers: KAM })).status).toBe(200);
    const after = (await read(id)).doc!;
    expect(after.status).toBe("cancelled");
    expect(after.version).toBeGreaterThan(running.version);
  });
});
