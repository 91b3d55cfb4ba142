import { describe, expect, it } from "vitest";
import { fireRequest, nextFireTimes, overlapAction, planFire } from "../../actors/schedule-rules";
import { ExecuteRequest } from "../../schemas/api";
import { ScheduleSpec } from "../../schemas/schedule";

/**
 * The schedule decisions as pure functions of `now` (the clock is the
 * test's). Europe/Berlin changes on the last Sundays of March and October:
 * 2027-03-28 at 01:00 UTC the clocks jump from 02:00 CET to 03:00 CEST, and
 * 2027-10-31 at 01:00 UTC they fall back from 03:00 CEST to 02:00 CET.
 */
const BERLIN = "Europe/Berlin";
const ms = (iso: string) => Date.parse(iso);
const iso = (t: number[]) => t.map((x) => new Date(x).toISOString());
const GRACE = 60_000;

describe("fire times across DST changes (croner)", () => {
  it("a 02:30 job on the spring-forward day runs once, at 03:00 CEST, right after the gap", () => {
    const runs = nextFireTimes({ cron: "30 2 * * *", timezone: BERLIN }, ms("2027-03-26T12:00:00Z"), 4);
    expect(iso(runs)).toEqual([
      "2027-03-27T01:30:00.000Z", // 02:30 CET
      "2027-03-28T01:00:00.000Z", // 02:30 does not exist: 03:00 CEST
      "2027-03-29T00:30:00.000Z", // 02:30 CEST
      "2027-03-30T00:30:00.000Z",
    ]);
  });

  it("a 02:30 job on the fall-back day runs once, at the first 02:30 (CEST)", () => {
    const runs = nextFireTimes({ cron: "30 2 * * *", timezone: BERLIN }, ms("2027-10-30T12:00:00Z"), 2);
    expect(iso(runs)).toEqual(["2027-10-31T00:30:00.000Z", "2027-11-01T01:30:00.000Z"]);
  });

  it("an every-30-minutes job skips the missing hour and runs through the repeated one twice", () => {
    const spring = nextFireTimes({ cron: "*/30 * * * *", timezone: BERLIN }, ms("2027-03-28T00:00:00Z"), 3);
    // 01:30 CET, then 03:00 CEST: 02:00 and 02:30 local never happen.
    expect(iso(spring)).toEqual(["2027-03-28T00:30:00.000Z", "2027-03-28T01:00:00.000Z", "2027-03-28T01:30:00.000Z"]);
    const fall = nextFireTimes({ cron: "*/30 * * * *", timezone: BERLIN }, ms("2027-10-30T23:45:00Z"), 5);
    // 02:00 and 02:30 CEST, then 02:00 and 02:30 CET, then 03:00 CET.
    expect(iso(fall)).toEqual([
      "2027-10-31T00:00:00.000Z",
      "2027-10-31T00:30:00.000Z",
      "2027-10-31T01:00:00.000Z",
      "2027-10-31T01:30:00.000Z",
      "2027-10-31T02:00:00.000Z",
    ]);
  });

  it("the example of the issue: Mondays at 06:00 in Berlin are 05:00 UTC in winter and 04:00 UTC in summer", () => {
    const runs = nextFireTimes({ cron: "0 6 * * 1", timezone: BERLIN }, ms("2027-03-20T00:00:00Z"), 2);
    expect(iso(runs)).toEqual(["2027-03-22T05:00:00.000Z", "2027-03-29T04:00:00.000Z"]);
  });
});

describe("planFire: when the alarm finds a schedule due", () => {
  const daily = { cron: "30 2 * * *", timezone: BERLIN, missed_fires: "run_once" as const };

  it("fires at its time, once, and plans the next time after now", () => {
    const due = ms("2027-03-28T01:00:00Z");
    const plan = planFire(daily, due, due + 150, GRACE);
    expect(plan).toEqual({ fire: { at: due, run: true, late: false }, missed: 0, next: ms("2027-03-29T00:30:00Z") });
  });

  it("does nothing before the time", () => {
    const due = ms("2027-03-28T01:00:00Z");
    expect(planFire(daily, due, due - 1, GRACE).fire).toBeNull();
  });

  it("after an outage, run_once fires once for the latest missed time and counts the rest", () => {
    const due = ms("2027-03-27T01:30:00Z");
    const now = ms("2027-03-29T12:00:00Z"); // down over three fire times
    const plan = planFire(daily, due, now, GRACE);
    expect(plan).toEqual({ fire: { at: ms("2027-03-29T00:30:00Z"), run: true, late: true }, missed: 2, next: ms("2027-03-30T00:30:00Z") });
  });

  it("after an outage, skip records the latest missed time as skipped and waits for the next", () => {
    const due = ms("2027-03-27T01:30:00Z");
    const now = ms("2027-03-29T12:00:00Z");
    const plan = planFire({ ...daily, missed_fires: "skip" }, due, now, GRACE);
    expect(plan.fire).toEqual({ at: ms("2027-03-29T00:30:00Z"), run: false, late: true });
    expect(plan.next).toBe(ms("2027-03-30T00:30:00Z"));
  });

  it("a fire within the grace is on time under either policy", () => {
    const due = ms("2027-03-28T01:00:00Z");
    for (const missed_fires of ["run_once", "skip"] as const) {
      expect(planFire({ ...daily, missed_fires }, due, due + GRACE, GRACE).fire).toEqual({ at: due, run: true, late: false });
    }
  });

  it("counting a long outage of a minute job stops at the cap and still finds the latest time", () => {
    const minute = { cron: "* * * * *", timezone: "UTC", missed_fires: "run_once" as const };
    const due = ms("2027-01-01T00:00:00Z");
    const now = ms("2027-01-08T00:00:30Z");
    const plan = planFire(minute, due, now, GRACE);
    expect(plan.fire).toEqual({ at: ms("2027-01-08T00:00:00Z"), run: true, late: false });
    expect(plan.missed).toBe(1000);
  });
});

describe("overlap", () => {
  it("allow always starts; skip and cancel_previous act only while the previous run is going", () => {
    expect(overlapAction("allow", true)).toBe("start");
    expect(overlapAction("skip", true)).toBe("skip");
    expect(overlapAction("cancel_previous", true)).toBe("cancel_then_start");
    for (const o of ["allow", "skip", "cancel_previous"] as const) expect(overlapAction(o, false)).toBe("start");
  });
});

describe("fireRequest", () => {
  const spec = ScheduleSpec.parse({
    schedule_id: "weekly.report",
    cron: "0 6 * * 1",
    timezone: BERLIN,
    template_name: "quick_summary",
    parameters: { topic: "x" },
    client_id: "client_a",
    priority: "high",
    notify: false,
    overlap: "skip",
    missed_fires: "run_once",
    paused: false,
  });

  it("is a valid /execute body whose request_id names the schedule, its creation and the fire time", () => {
    const r = fireRequest(spec, 1_700_000_000_000, 1_800_000_000_000);
    expect(ExecuteRequest.parse(r)).toMatchObject({ template_name: "quick_summary", client_id: "client_a", priority: "high" });
    expect(r.request_id).toBe("sched:weekly.report:1700000000000:1800000000000");
    // The same fire gives the same id; another fire time or another incarnation of the id another one.
    expect(fireRequest(spec, 1_700_000_000_000, 1_800_000_000_000).request_id).toBe(r.request_id);
    expect(fireRequest(spec, 1_700_000_000_000, 1_800_000_060_000).request_id).not.toBe(r.request_id);
    expect(fireRequest(spec, 1_700_000_000_001, 1_800_000_000_000).request_id).not.toBe(r.request_id);
  });

  it("fits the RequestId limit with the longest schedule id", () => {
    const r = fireRequest({ ...spec, schedule_id: "s".repeat(64) }, 9_999_999_999_999, 9_999_999_999_999);
    expect(ExecuteRequest.safeParse(r).success).toBe(true);
  });
});
