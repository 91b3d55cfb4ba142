import { nanoid } from "nanoid";
import type { CreateOutcome, ScheduleShard } from "../actors/schedule-shard";
import { fireRequest } from "../actors/schedule-rules";
import { ExecuteRequest } from "../schemas/api";
import {
  CreateScheduleRequest,
  PatchScheduleRequest,
  type ScheduleDocument,
  ScheduleId,
  type ScheduleList,
  ScheduleListQuery,
  ScheduleSpec,
} from "../schemas/schedule";
import { configOf } from "./config";
import { ApiError, invalid, parseWith } from "./http";
import { askObject } from "./outbound";

/**
 * Schedules (docs/protocol.md "Schedules"): validation, and the one place
 * that knows which ScheduleShard holds a schedule: `schedules:{n}` with n a
 * hash of the schedule id modulo SCHEDULE_SHARDS. The shard count is part of
 * where data lives: changing it would lose schedules, so it is a constant,
 * not a setting. A listing asks every shard for one page and merges them, so
 * its cost is bounded by SCHEDULE_SHARDS x limit rows.
 */
export const SCHEDULE_SHARDS = 8;

/** FNV-1a over the id's UTF-16 code units: stable, cheap, no I/O. */
export function scheduleShardIndex(scheduleId: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < scheduleId.length; i++) {
    h ^= scheduleId.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h % SCHEDULE_SHARDS;
}

export function shardAt(env: Env, index: number): DurableObjectStub<ScheduleShard> {
  const ns = env.SCHEDULES as unknown as DurableObjectNamespace<ScheduleShard>;
  return ns.get(ns.idFromName(`schedules:${index}`));
}

export function scheduleShard(env: Env, scheduleId: string): DurableObjectStub<ScheduleShard> {
  return shardAt(env, scheduleShardIndex(scheduleId));
}

export function call<T>(env: Env, promise: PromiseLike<T>, what: string): Promise<T> {
  return askObject(promise, configOf(env).tuning.objectCallTimeoutMs, what);
}

/**
 * A schedule whose runs `/execute` would refuse is refused now, with the same
 * field names (e.g. `notify` on a deployment whose /execute has none yet).
 */
function checkRunnable(spec: ScheduleSpec): void {
  const parsed = ExecuteRequest.safeParse(fireRequest(spec, 0, 0));
  if (!parsed.success) throw invalid(parsed.error, "schedule: its runs would be refused by /execute");
}

export async function createSchedule(env: Env, raw: unknown): Promise<{ status: 200 | 201; body: ScheduleDocument }> {
  const input = parseWith(CreateScheduleRequest, raw, "body");
  const spec = ScheduleSpec.parse({ ...input, schedule_id: input.schedule_id ?? `sch_${nanoid(16)}` });
  checkRunnable(spec);
  const r = await call<CreateOutcome>(env, scheduleShard(env, spec.schedule_id).create(spec), "schedule create");
  if (r.outcome === "conflict") {
    throw new ApiError(409, "schedule_exists", `schedule ${spec.schedule_id} already exists with another definition`, {
      schedule_id: spec.schedule_id,
    });
  }
  return { status: r.outcome === "created" ? 201 : 200, body: r.schedule };
}

function checkScheduleId(id: unknown): string {
  return parseWith(ScheduleId, id, "schedule id");
}

export async function getSchedule(env: Env, id: unknown): Promise<ScheduleDocument> {
  const scheduleId = checkScheduleId(id);
  const doc = await call<ScheduleDocument | null>(env, scheduleShard(env, scheduleId).get(scheduleId), "schedule read");
  if (!doc) throw new ApiError(404, "not_found", `no schedule ${scheduleId}`);
  return doc;
}

export async function listSchedules(env: Env, url: URL): Promise<ScheduleList> {
  const q = parseWith(ScheduleListQuery, Object.fromEntries(url.searchParams), "query");
  const pages = await Promise.all(
    Array.from({ length: SCHEDULE_SHARDS }, (_, i) =>
      call<ScheduleDocument[]>(env, shardAt(env, i).list({ client_id: q.client_id, after: q.cursor, limit: q.limit + 1 }), "schedule list"),
    ),
  );
  const all = pages.flat().sort((a, b) => (a.schedule_id < b.schedule_id ? -1 : a.schedule_id > b.schedule_id ? 1 : 0));
  const items = all.slice(0, q.limit);
  return { items, next_cursor: all.length > q.limit ? items[items.length - 1].schedule_id : null };
}

export async function patchSchedule(env: Env, id: unknown, raw: unknown): Promise<ScheduleDocument> {
  const scheduleId = checkScheduleId(id);
  const patch = parseWith(PatchScheduleRequest, raw, "body");
  const shard = scheduleShard(env, scheduleId);
  const current = await call<ScheduleDocument | null>(env, shard.get(scheduleId), "schedule read");
  if (!current) throw new ApiError(404, "not_found", `no schedule ${scheduleId}`);
  checkRunnable(ScheduleSpec.parse({ ...current, ...patch }));
  const doc = await call<ScheduleDocument | null>(env, shard.patch(scheduleId, patch), "schedule change");
  if (!doc) throw new ApiError(404, "not_found", `no schedule ${scheduleId}`);
  return doc;
}

export async function deleteSchedule(env: Env, id: unknown): Promise<void> {
  const scheduleId = checkScheduleId(id);
  const removed = await call<boolean>(env, scheduleShard(env, scheduleId).remove(scheduleId), "schedule delete");
  if (!removed) throw new ApiError(404, "not_found", `no schedule ${scheduleId}`);
}
