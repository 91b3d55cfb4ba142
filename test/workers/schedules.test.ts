import { env } from "cloudflare:workers";
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { afterAll, describe, expect, it } from "vitest";
import { ScheduleDocument } from "../../schemas/schedule";
import { fromDataPoint } from "../../src/metrics";
import { scheduleShardIndex } from "../../src/schedule-service";
import { JSON_HEADERS, KAM, OPS, call, ended, status, waitFor } from "../support/api";

/**
 * Schedules through the HTTP API, with their shard's alarm driven by the test
 * (runDurableObjectAlarm) after it moves the stored next fire time into the
 * past. Schedules here fire on February 29 at 06:00, so their real alarm is
 * years away and never fires by itself mid-test.
 */
const RARE = "0 6 29 2 *";
const started: string[] = [];

function shardOf(id: string) {
  return env.SCHEDULES.get(env.SCHEDULES.idFromName(`schedules:${scheduleShardIndex(id)}`));
}

async function post(body: Record<string, unknown>, headers: Record<string, string> = KAM) {
  const res = await call("/schedules", { method: "POST", headers: { ...headers, ...JSON_HEADERS }, body: JSON.stringify(body) });
  return { res, body: (await res.json()) as any };
}

async function get(id: string): Promise<ScheduleDocument> {
  const res = await call(`/schedules/${id}`, { headers: OPS });
  expect(res.status).toBe(200);
  return res.json();
}

async function patch(id: string, body: Record<string, unknown>) {
  const res = await call(`/schedules/${id}`, { method: "PATCH", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify(body) });
  return { res, body: (await res.json()) as any };
}

/** Makes the schedule due `agoMs` ago, as if its time had come, and runs its shard's alarm. */
async function fireNow(id: string, agoMs = 1_000): Promise<ScheduleDocument> {
  const stub = shardOf(id);
  await runInDurableObject(stub, (_i, state) => {
    state.storage.sql.exec("UPDATE schedules SET next_fire_at = ? WHERE schedule_id = ?", Date.now() - agoMs, id);
  });
  expect(await runDurableObjectAlarm(stub)).toBe(true);
  const doc = await get(id);
  for (const r of doc.last_runs) if (r.execution_id && !started.includes(r.execution_id)) started.push(r.execution_id);
  return doc;
}

/** A schedule whose first run hangs on its worker: fires once, waits until that run is running, fires again. */
async function fireWhileRunning(id: string, overlap: string): Promise<{ previous: string; second: ScheduleDocument }> {
  await post(base(id, { template_name: "course_creation", parameters: { fault: { mode: "hang" } }, overlap }));
  const first = await fireNow(id, 2_000);
  const previous = first.last_runs[0].execution_id!;
  await waitFor(previous, (d) => d.status === "running");
  return { previous, second: await fireNow(id, 1_000) };
}

/** Reads until `done` holds, for at most 10 s. */
async function until<T>(read: () => Promise<T>, done: (v: T) => boolean): Promise<T> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const v = await read();
    if (done(v)) return v;
    if (Date.now() > deadline) throw new Error(`not reached: ${JSON.stringify(v)}`);
    await scheduler.wait(25);
  }
}

/** Sets a client's max_starts_per_minute (its other quotas from the defaults). */
async function putStarts(clientId: string, perMinute: number) {
  const res = await call(`/clients/${clientId}/quotas`, { method: "PUT", headers: { ...OPS, ...JSON_HEADERS }, body: JSON.stringify({ max_starts_per_minute: perMinute }) });
  expect(res.status).toBe(200);
}

function base(id: string, extra: Record<string, unknown> = {}) {
  return {
    schedule_id: id,
    cron: RARE,
    template_name: "quick_summary",
    parameters: { topic: "Scheduled", targetAudience: "ops", steps: 1, step_ms: 5 },
    client_id: "client_sched",
    overlap: "allow",
    ...extra,
  };
}

afterAll(async () => {
  // Leave nothing running for the next file: cancel what is still going.
  for (const id of started) {
    const d = await status(id);
    if (!ended(d)) await call(`/executions/${id}/cancel`, { method: "POST", headers: OPS });
  }
});

describe("POST /schedules", () => {
  it("creates a schedule: 201 with the document, its id and the next runs in its time zone", async () => {
    const { res, body } = await post({ ...base("sched-create"), cron: "0 6 * * 1", timezone: "Europe/Berlin", priority: "high" });
    expect(res.status).toBe(201);
    expect(ScheduleDocument.safeParse(body).success).toBe(true);
    expect(body).toMatchObject({
      schedule_id: "sched-create",
      cron: "0 6 * * 1",
      timezone: "Europe/Berlin",
      priority: "high",
      notify: false,
      overlap: "allow",
      missed_fires: "run_once",
      paused: false,
      last_runs: [],
    });
    expect(body.next_runs).toHaveLength(5);
    for (const at of body.next_runs as string[]) {
      const d = new Date(at);
      expect(d.getTime()).toBeGreaterThan(Date.now());
      // Monday 06:00 in Berlin, whichever offset applies that day.
      const local = new Intl.DateTimeFormat("en-GB", { timeZone: "Europe/Berlin", weekday: "short", hour: "2-digit", minute: "2-digit" }).format(d);
      expect(local).toBe("Mon 06:00");
    }
  });

  it("generates an id when none is given, and a repeat of the same body with that id is 200 with the same schedule", async () => {
    const { res, body } = await post({ ...base("x"), schedule_id: undefined });
    expect(res.status).toBe(201);
    expect(body.schedule_id).toMatch(/^sch_[A-Za-z0-9_-]{16}$/);
    const again = await post({ ...base("x"), schedule_id: body.schedule_id });
    expect(again.res.status).toBe(200);
    expect(again.body.created_at).toBe(body.created_at);
    const other = await post({ ...base("x"), schedule_id: body.schedule_id, template_name: "course_creation" });
    expect(other.res.status).toBe(409);
    expect(other.body.error.code).toBe("schedule_exists");
  });

  it("next_runs follow DST: 02:30 on the spring-forward Sunday is 03:00 CEST, on the fall-back Sunday the first 02:30", async () => {
    const spring = await post({ ...base("sched-dst-spring"), cron: "30 2 * 3 0L", timezone: "Europe/Berlin" });
    const fall = await post({ ...base("sched-dst-fall"), cron: "30 2 * 10 0L", timezone: "Europe/Berlin" });
    for (const at of spring.body.next_runs as string[]) expect(at).toMatch(/^\d{4}-03-\d\dT01:00:00\.000Z$/);
    for (const at of fall.body.next_runs as string[]) expect(at).toMatch(/^\d{4}-10-\d\dT00:30:00\.000Z$/);
  });

  it("refuses a bad cron, an unknown time zone, a bad overlap and unknown fields: 400 naming each field, nothing stored", async () => {
    const { res, body } = await post({ ...base("sched-bad"), cron: "61 * * * *", timezone: "Mars/Olympus", overlap: "sometimes", colour: "red" });
    expect(res.status).toBe(400);
    expect(body.error.code).toBe("invalid_request");
    const paths = (body.error.details as { path: string }[]).map((d) => d.path).sort();
    expect(paths).toEqual(["(body)", "cron", "overlap", "timezone"]);
    expect((await call("/schedules/sched-bad", { headers: OPS })).status).toBe(404);
    const short = await post({ ...base("sched-bad"), cron: "0 6 * *" });
    expect(short.res.status).toBe(400);
    expect(short.body.error.details).toEqual([{ path: "cron", message: "not a five-field cron expression: expected 5 fields (minute hour day-of-month month day-of-week), got 4" }]);
  });

  it("notify: true is passed to each run (its status document has notifications on)", async () => {
    const { res, body } = await post({ ...base("sched-notify"), notify: true });
    expect(res.status).toBe(201);
    expect(body.notify).toBe(true);
    const doc = await fireNow("sched-notify");
    const run = doc.last_runs[0];
    expect(run.state).toBe("started");
    const d = await status(run.execution_id!);
    expect(d.notifications.enabled).toBe(true);
    await waitFor(run.execution_id!, ended);
  });

  it("needs the KAM or the OPS token", async () => {
    expect((await post(base("sched-auth"), {})).res.status).toBe(401);
    expect((await call("/schedules")).status).toBe(401);
    expect((await post(base("sched-auth-ops"), OPS)).res.status).toBe(201);
  });
});

describe("GET, PATCH, DELETE", () => {
  it("lists every shard's schedules in id order, one page at a time", async () => {
    const ids = Array.from({ length: 12 }, (_, i) => `list-${String(i).padStart(2, "0")}`);
    for (const id of ids) expect((await post({ ...base(id), client_id: "client_list" })).res.status).toBe(201);
    expect(new Set(ids.map(scheduleShardIndex)).size).toBeGreaterThan(1);
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const res = await call(`/schedules?client_id=client_list&limit=5${cursor ? `&cursor=${cursor}` : ""}`, { headers: KAM });
      expect(res.status).toBe(200);
      const page = (await res.json()) as { items: ScheduleDocument[]; next_cursor: string | null };
      expect(page.items.length).toBeLessThanOrEqual(5);
      seen.push(...page.items.map((s) => s.schedule_id));
      cursor = page.next_cursor;
    } while (cursor);
    expect(seen).toEqual(ids);
    expect((await call("/schedules?limit=0", { headers: KAM })).status).toBe(400);
  });

  it("pauses (no next runs, nothing fires), resumes and changes fields", async () => {
    await post(base("sched-pause"));
    const paused = await patch("sched-pause", { paused: true });
    expect(paused.res.status).toBe(200);
    expect(paused.body).toMatchObject({ paused: true, next_runs: [] });
    await runInDurableObject(shardOf("sched-pause"), (_i, state) => {
      state.storage.sql.exec("UPDATE schedules SET next_fire_at = ? WHERE schedule_id = ?", Date.now() - 1000, "sched-pause");
    });
    await runDurableObjectAlarm(shardOf("sched-pause"));
    expect((await get("sched-pause")).last_runs).toEqual([]);
    const resumed = await patch("sched-pause", { paused: false, cron: "15 4 * * *", timezone: "Asia/Tokyo", overlap: "skip" });
    expect(resumed.body).toMatchObject({ paused: false, cron: "15 4 * * *", timezone: "Asia/Tokyo", overlap: "skip" });
    // 04:15 in Tokyo (UTC+9, no DST) is 19:15 UTC the day before.
    for (const at of resumed.body.next_runs as string[]) expect(at).toMatch(/T19:15:00\.000Z$/);
    const bad = await patch("sched-pause", { timezone: "Nowhere/City" });
    expect(bad.res.status).toBe(400);
    expect(bad.body.error.details[0].path).toBe("timezone");
    expect((await patch("sched-pause", {})).res.status).toBe(400);
    expect((await patch("sched-none", { paused: true })).res.status).toBe(404);
  });

  it("deletes: 204, then 404", async () => {
    await post(base("sched-delete"));
    expect((await call("/schedules/sched-delete", { method: "DELETE", headers: OPS })).status).toBe(204);
    expect((await call("/schedules/sched-delete", { headers: OPS })).status).toBe(404);
    expect((await call("/schedules/sched-delete", { method: "DELETE", headers: OPS })).status).toBe(404);
    expect((await call("/schedules/bad%20id", { headers: OPS })).status).toBe(400);
  });
});

describe("fires", () => {
  it("a fire starts a normal execution with the request_id derived from the schedule and the fire time", async () => {
    const created = (await post(base("fire-once"))).body as ScheduleDocument;
    const doc = await fireNow("fire-once");
    expect(doc.last_runs).toHaveLength(1);
    const run = doc.last_runs[0];
    expect(run).toMatchObject({ state: "started", attempts: 1, reason: null });
    const fireAt = Date.parse(run.fire_at);
    expect(run.request_id).toBe(`sched:fire-once:${Date.parse(created.created_at)}:${fireAt}`);
    const d = await waitFor(run.execution_id!, ended);
    expect(d).toMatchObject({ status: "completed", client_id: "client_sched", template_name: "quick_summary", request_id: run.request_id });
    // Counted where it happened: one schedule_fire data point (the tests' Analytics Engine dataset keeps them).
    const sink = (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK;
    const fires = ((await (await sink.fetch("http://sink/")).json()) as AnalyticsEngineDataPoint[])
      .map(fromDataPoint)
      .filter((p) => p.event === "schedule_fire" && p.schedule_id === "fire-once");
    expect(fires).toEqual([expect.objectContaining({ outcome: "started", template_name: "quick_summary", client_id: "client_sched" })]);
  });

  it("never starts twice for one fire time: the alarm again records nothing, a restart of the same fire gets the same execution", async () => {
    await post(base("fire-twice"));
    const first = await fireNow("fire-twice");
    const executionId = first.last_runs[0].execution_id!;
    // The alarm runs again (at-least-once alarms): nothing is due, nothing new is recorded.
    await runDurableObjectAlarm(shardOf("fire-twice"));
    expect((await get("fire-twice")).last_runs).toEqual(first.last_runs);
    // A crash after the start but before it was recorded: the fire is pending again and is started again.
    await runInDurableObject(shardOf("fire-twice"), (_i, state) => {
      state.storage.sql.exec("UPDATE fires SET state = 'pending', execution_id = NULL, next_try_at = 0 WHERE schedule_id = 'fire-twice'");
      state.storage.sql.exec("UPDATE schedules SET next_fire_at = ? WHERE schedule_id = 'fire-twice'", Date.now() + 3_600_000);
    });
    await runDurableObjectAlarm(shardOf("fire-twice"));
    const again = await get("fire-twice");
    expect(again.last_runs).toHaveLength(1);
    expect(again.last_runs[0]).toMatchObject({ state: "started", execution_id: executionId, attempts: 2 });
    await waitFor(executionId, ended);
  });

  it("overlap skip: a fire while the previous run is going is recorded as skipped and starts nothing", async () => {
    const { previous: running, second } = await fireWhileRunning("overlap-skip", "skip");
    expect(second.last_runs).toHaveLength(2);
    expect(second.last_runs[0]).toMatchObject({ state: "skipped", reason: "overlap", execution_id: null });
    expect(second.last_runs[0].message).toContain(running);
    expect((await status(running)).status).toBe("running");
    // Once the previous run ended, the next fire starts again.
    await call(`/executions/${running}/cancel`, { method: "POST", headers: OPS });
    const third = await fireNow("overlap-skip", 500);
    expect(third.last_runs[0]).toMatchObject({ state: "started" });
    expect(third.last_runs[0].execution_id).not.toBe(running);
  });

  it("overlap cancel_previous: the previous run is cancelled and the new one starts", async () => {
    const { previous, second } = await fireWhileRunning("overlap-cancel", "cancel_previous");
    expect(second.last_runs[0]).toMatchObject({ state: "started", message: `cancelled the previous run ${previous}` });
    expect((await status(previous)).status).toBe("cancelled");
    const next = second.last_runs[0].execution_id!;
    expect(next).not.toBe(previous);
    expect(["queued", "running"]).toContain((await status(next)).status);
  });

  it("overlap allow: both runs go on", async () => {
    const { previous, second } = await fireWhileRunning("overlap-allow", "allow");
    expect(second.last_runs.map((r) => r.state)).toEqual(["started", "started"]);
    expect((await status(previous)).status).toBe("running");
  });

  it("missed fires: run_once runs once for the latest missed time; skip records it as skipped", async () => {
    // Due since 29 February 2020: the 2024 time was missed too, and both are far past the grace.
    const due2020 = Date.UTC(2020, 1, 29, 6);
    for (const [id, policy] of [["missed-run", "run_once"], ["missed-skip", "skip"]] as const) {
      await post(base(id, { missed_fires: policy }));
      await runInDurableObject(shardOf(id), (_i, state) => {
        state.storage.sql.exec("UPDATE schedules SET next_fire_at = ? WHERE schedule_id = ?", due2020, id);
      });
      await runDurableObjectAlarm(shardOf(id));
    }
    const ran = await get("missed-run");
    expect(ran.last_runs).toHaveLength(1);
    expect(ran.last_runs[0]).toMatchObject({ fire_at: "2024-02-29T06:00:00.000Z", state: "started", message: "1 earlier fire time(s) passed over" });
    started.push(ran.last_runs[0].execution_id!);
    const skipped = await get("missed-skip");
    expect(skipped.last_runs).toHaveLength(1);
    expect(skipped.last_runs[0]).toMatchObject({ fire_at: "2024-02-29T06:00:00.000Z", state: "skipped", reason: "missed", execution_id: null });
    for (const doc of [ran, skipped]) expect(doc.next_runs[0]).toBe("2028-02-29T06:00:00.000Z");
  });

  it("a fire whose start fails transiently (429 rate_limited) stays pending and is retried by the alarm; once admitted it starts, once", async () => {
    const client = "client_sched_retry";
    await putStarts(client, 1);
    // The client's one start of this minute is used up: the fire's start is refused with 429 rate_limited.
    const first = await call("/execute", { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: JSON.stringify({ template_name: "quick_summary", parameters: {}, client_id: client }) });
    expect(first.status).toBe(202);
    const own = ((await first.json()) as { execution_id: string }).execution_id;
    started.push(own);
    await post(base("fire-retry", { client_id: client }));
    const pending = await fireNow("fire-retry");
    expect(pending.last_runs).toHaveLength(1);
    expect(pending.last_runs[0]).toMatchObject({ state: "pending", reason: "rate_limited", execution_id: null });
    // The shard's own alarm retries it (backoff from retryBaseMs, 50 ms here): still refused, still pending.
    const retried = await until(async () => (await get("fire-retry")).last_runs[0], (r) => r.attempts >= 3);
    expect(retried).toMatchObject({ state: "pending", reason: "rate_limited", execution_id: null });

    // The quota is lifted: the next retry starts it, under the fire's derived request_id.
    await putStarts(client, 1000);
    const run = await until(async () => (await get("fire-retry")).last_runs, (r) => r[0].state !== "pending");
    expect(run).toHaveLength(1);
    expect(run[0]).toMatchObject({ state: "started", reason: null });
    expect(run[0].attempts).toBeGreaterThan(retried.attempts);
    const doc = await waitFor(run[0].execution_id!, ended);
    started.push(doc.execution_id);
    expect(doc.request_id).toBe(run[0].request_id);
    // Started once: the client has its own first execution and this one.
    const listed = (await (await call(`/executions?client_id=${client}`, { headers: OPS })).json()) as { items: { execution_id: string }[] };
    expect(listed.items.map((x) => x.execution_id).sort()).toEqual([own, doc.execution_id].sort());
  });

  it("a fire still failing transiently past scheduleFireDeadlineMs after its time fails with fire_deadline; the schedule goes on", async () => {
    const client = "client_sched_deadline";
    await putStarts(client, 1);
    const first = await call("/execute", { method: "POST", headers: { ...KAM, ...JSON_HEADERS }, body: JSON.stringify({ template_name: "quick_summary", parameters: {}, client_id: client }) });
    expect(first.status).toBe(202);
    started.push(((await first.json()) as { execution_id: string }).execution_id);
    await post(base("fire-deadline", { client_id: client }));
    // Its fire time is 16 minutes ago (the deadline is 15): missed_fires run_once runs it, and its start is refused 429.
    const doc = await fireNow("fire-deadline", 16 * 60_000);
    expect(doc.last_runs).toHaveLength(1);
    expect(doc.last_runs[0]).toMatchObject({ state: "failed", reason: "fire_deadline", attempts: 1, execution_id: null });
    expect(doc.last_runs[0].message).toContain("not started within 900000 ms");
    expect(doc.last_runs[0].message).toContain("executions per minute");
    expect(doc.next_runs[0]).toBe("2028-02-29T06:00:00.000Z");
    const points = await (await (env as unknown as { METRICS_SINK: Fetcher }).METRICS_SINK.fetch("http://sink/")).json();
    const fires = (points as AnalyticsEngineDataPoint[]).map(fromDataPoint).filter((p) => p.event === "schedule_fire" && p.schedule_id === "fire-deadline");
    expect(fires).toEqual([expect.objectContaining({ outcome: "failed", code: "fire_deadline", client_id: client })]);
  });

  it("a fire whose start is refused for good fails with the code and message; the schedule goes on", async () => {
    await post(base("fire-refused"));
    // A fire recorded with a request /execute refuses (as after a deployment changed its schema): no retry can fix it.
    await runInDurableObject(shardOf("fire-refused"), (_i, state) => {
      const request = JSON.stringify({ ...base("x"), schedule_id: undefined, cron: undefined, overlap: undefined, priority: "urgent", request_id: "sched:fire-refused:1:1" });
      state.storage.sql.exec(
        "INSERT INTO fires (schedule_id, fire_at, state, request, attempts, next_try_at) VALUES ('fire-refused', ?, 'pending', ?, 0, 0)",
        Date.now() - 1000,
        request,
      );
    });
    await runDurableObjectAlarm(shardOf("fire-refused"));
    const doc = await get("fire-refused");
    expect(doc.last_runs[0]).toMatchObject({ state: "failed", reason: "invalid_request", execution_id: null, attempts: 1 });
    expect(doc.last_runs[0].message).toContain("priority");
    expect(doc.next_runs[0]).toBe("2028-02-29T06:00:00.000Z");
  });
});
