import { Cron } from "croner";
import { z } from "zod";
import { ClientId, Priority, TemplateName } from "./common";

/**
 * Scheduled executions (`/schedules`, docs/protocol.md "Schedules"). A
 * schedule is a cron expression in a time zone plus the execution it starts;
 * each fire starts a normal execution with a `request_id` derived from the
 * schedule and the fire time (actors/schedule-rules.ts).
 *
 * Cron expressions are the five-field Vixie form, parsed by croner, which also
 * does the time-zone arithmetic (DST gaps and repeats included).
 */
export const SCHEDULE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
export const ScheduleId = z.string().regex(SCHEDULE_ID_RE, "1-64 letters, digits, '_', '.', '-', starting with a letter or digit");

export const Overlap = z.enum(["skip", "allow", "cancel_previous"]);
export type Overlap = z.infer<typeof Overlap>;

/** What a fire found late after an outage does: run once for the latest missed time, or skip to the next one. */
export const MissedFires = z.enum(["run_once", "skip"]);
export type MissedFires = z.infer<typeof MissedFires>;

/** True for a time-zone name the runtime's Intl knows (IANA names and `UTC`). */
export function isTimeZone(name: string): boolean {
  try {
    new Intl.DateTimeFormat("en-US", { timeZone: name });
    return true;
  } catch {
    return false;
  }
}

/** The croner job for a schedule: never started (no timers), only asked for run times. */
export function cronOf(cron: string, timezone: string): Cron {
  return new Cron(cron, { timezone, paused: true, mode: "5-part" });
}

/** croner's reason for refusing an expression, or null when it parses. */
export function cronProblem(cron: string): string | null {
  const fields = cron.trim().split(/\s+/).length;
  if (fields !== 5) return `expected 5 fields (minute hour day-of-month month day-of-week), got ${fields}`;
  try {
    cronOf(cron, "UTC");
    return null;
  } catch (err) {
    return err instanceof Error ? err.message.replace(/^CronPattern:\s*/, "") : String(err);
  }
}

export const CronExpression = z
  .string()
  .min(1)
  .max(120)
  .superRefine((value, ctx) => {
    const problem = cronProblem(value);
    if (problem) ctx.addIssue({ code: "custom", message: `not a five-field cron expression: ${problem}` });
  });

export const TimeZone = z
  .string()
  .min(1)
  .max(64)
  .refine(isTimeZone, "unknown time zone: use an IANA name such as Europe/Berlin, or UTC");

/** What a schedule starts and when; the fields PATCH may change. */
const ScheduleFields = {
  cron: CronExpression,
  timezone: TimeZone,
  template_name: TemplateName,
  parameters: z.record(z.string(), z.unknown()),
  client_id: ClientId,
  priority: Priority,
  notify: z.boolean(),
  overlap: Overlap,
  missed_fires: MissedFires,
  paused: z.boolean(),
};

export const CreateScheduleRequest = z
  .object({
    schedule_id: ScheduleId.optional(),
    cron: ScheduleFields.cron,
    timezone: ScheduleFields.timezone.default("UTC"),
    template_name: ScheduleFields.template_name,
    parameters: ScheduleFields.parameters,
    client_id: ScheduleFields.client_id,
    priority: ScheduleFields.priority.default("normal"),
    notify: ScheduleFields.notify.default(false),
    overlap: ScheduleFields.overlap,
    missed_fires: ScheduleFields.missed_fires.default("run_once"),
    paused: ScheduleFields.paused.default(false),
  })
  .strict();
export type CreateScheduleRequest = z.input<typeof CreateScheduleRequest>;

export const PatchScheduleRequest = z
  .object(Object.fromEntries(Object.entries(ScheduleFields).map(([k, v]) => [k, v.optional()])) as {
    [K in keyof typeof ScheduleFields]: z.ZodOptional<(typeof ScheduleFields)[K]>;
  })
  .strict()
  .refine((p) => Object.keys(p).length > 0, "name at least one field to change");
export type PatchScheduleRequest = z.infer<typeof PatchScheduleRequest>;

/** A schedule as stored: the request with its defaults applied and an id. */
export const ScheduleSpec = z.object({ schedule_id: ScheduleId, ...ScheduleFields });
export type ScheduleSpec = z.infer<typeof ScheduleSpec>;

export const FireState = z.enum(["pending", "started", "skipped", "failed"]);
export type FireState = z.infer<typeof FireState>;

/** One fire of a schedule: started (with its execution), skipped (overlap, missed) or failed (with the error). */
export const ScheduleRun = z.object({
  fire_at: z.string(),
  state: FireState,
  request_id: z.string(),
  execution_id: z.string().nullable(),
  /** Why a fire was skipped or failed: `overlap`, `missed`, or the error code of the start. */
  reason: z.string().nullable(),
  message: z.string().nullable(),
  attempts: z.number().int().nonnegative(),
});
export type ScheduleRun = z.infer<typeof ScheduleRun>;

export const ScheduleDocument = ScheduleSpec.extend({
  created_at: z.string(),
  updated_at: z.string(),
  /** The next fire times (ISO 8601, UTC), empty while paused. */
  next_runs: z.array(z.string()),
  /** Recent fires, newest first. */
  last_runs: z.array(ScheduleRun),
});
export type ScheduleDocument = z.infer<typeof ScheduleDocument>;

export const ScheduleList = z.object({
  items: z.array(ScheduleDocument),
  next_cursor: z.string().nullable(),
});
export type ScheduleList = z.infer<typeof ScheduleList>;

export const ScheduleListQuery = z
  .object({
    client_id: ClientId.optional(),
    limit: z.coerce.number().int().min(1).max(200).default(50),
    cursor: ScheduleId.optional(),
  })
  .strict();
