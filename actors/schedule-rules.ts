import type { ExecuteRequest } from "../schemas/api";
import { type MissedFires, type Overlap, type ScheduleSpec, cronOf } from "../schemas/schedule";

/**
 * The decisions of a schedule shard (actors/schedule-shard.ts), as pure
 * functions of the schedule and `now`, so tests drive the clock. Every date
 * computation is croner's (schemas/schedule.ts `cronOf`), which handles the
 * time zone and its DST changes:
 * - a fixed-time job (one value each in minute and hour, e.g. `30 2 * * *`)
 *   whose time falls in a spring-forward gap runs at the first valid time
 *   after the gap, the same day; in a fall-back repeat it runs once, at the
 *   first occurrence;
 * - an interval job (`*`, a step, a range or a list in minute or hour) skips
 *   times in a gap and runs on both occurrences of a repeated time.
 */

/** The first `n` fire times strictly after `after` (unix ms). */
export function nextFireTimes(spec: Pick<ScheduleSpec, "cron" | "timezone">, after: number, n: number): number[] {
  return cronOf(spec.cron, spec.timezone)
    .nextRuns(n, new Date(after))
    .map((d) => d.getTime());
}

/** The first fire time strictly after `after`, or null when the expression has none left. */
export function nextFireTime(spec: Pick<ScheduleSpec, "cron" | "timezone">, after: number): number | null {
  return nextFireTimes(spec, after, 1)[0] ?? null;
}

/** Counting passed-over fire times stops here (a minute schedule after a week's outage). */
export const MISSED_COUNT_CAP = 1000;

export interface FirePlan {
  /** The fire time to record now, and whether it runs or is recorded as skipped. */
  fire: { at: number; run: boolean; late: boolean } | null;
  /** Fire times passed over before `fire.at` (an outage), capped at MISSED_COUNT_CAP. */
  missed: number;
  /** The next fire time after `now`. */
  next: number | null;
}

/**
 * What to do when the alarm finds a schedule due: `dueAt` is its stored next
 * fire time (<= now). The latest fire time not after `now` is the one that
 * counts; earlier ones were missed (the system was down or the alarm late).
 * A fire more than `graceMs` late is `late`: with `missed_fires: "run_once"`
 * it still runs (once, whatever was missed), with `"skip"` it is recorded as
 * skipped and the schedule waits for its next time.
 */
export function planFire(
  spec: Pick<ScheduleSpec, "cron" | "timezone" | "missed_fires">,
  dueAt: number,
  now: number,
  graceMs: number,
): FirePlan {
  const next = nextFireTime(spec, now);
  if (dueAt > now) return { fire: null, missed: 0, next: dueAt };
  // Walk from dueAt to the latest time <= now; bounded, then jump with previousRuns.
  let latest = dueAt;
  let missed = 0;
  const cron = cronOf(spec.cron, spec.timezone);
  for (;;) {
    if (missed >= MISSED_COUNT_CAP) {
      const last = cron.previousRuns(1, new Date(now + 1))[0]?.getTime();
      if (last !== undefined && last > latest) latest = last;
      break;
    }
    const t = cron.nextRun(new Date(latest))?.getTime();
    if (t === undefined || t > now) break;
    latest = t;
    missed += 1;
  }
  const late = now - latest > graceMs;
  return { fire: { at: latest, run: !late || runsWhenLate(spec.missed_fires), late }, missed, next };
}

function runsWhenLate(policy: MissedFires): boolean {
  return policy === "run_once";
}

/** What a fire does about the schedule's previous execution, given whether that one is still going. */
export function overlapAction(overlap: Overlap, previousRunning: boolean): "start" | "skip" | "cancel_then_start" {
  if (!previousRunning || overlap === "allow") return "start";
  return overlap === "skip" ? "skip" : "cancel_then_start";
}

/**
 * The start request of one fire. Its `request_id` is derived from the
 * schedule (its id and creation time, so a schedule deleted and created again
 * under the same id is a new series) and the fire time: a fire started twice
 * (an alarm that ran again after a crash) starts one execution.
 */
export function fireRequest(spec: ScheduleSpec, createdAt: number, fireAt: number): ExecuteRequest {
  return {
    template_name: spec.template_name,
    parameters: spec.parameters,
    client_id: spec.client_id,
    priority: spec.priority,
    // Always said, so NOTIFY_DEFAULT never decides for a schedule: its own `notify` does.
    notify: spec.notify,
    request_id: `sched:${spec.schedule_id}:${createdAt}:${fireAt}`,
  };
}

/** Retry delay of a fire whose start failed transiently: doubling from base, capped. */
export function fireRetryDelay(attempts: number, baseMs: number, capMs: number): number {
  return Math.min(capMs, baseMs * 2 ** Math.max(0, attempts - 1));
}

/** A fire still not started this long after its time fails with `fire_deadline`. */
export function fireExpired(fireAt: number, now: number, deadlineMs: number): boolean {
  return now - fireAt > deadlineMs;
}
