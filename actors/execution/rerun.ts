import type { Priority } from "../../schemas/common";
import type { DataReference } from "../../schemas/data";
import { parseDataKey } from "../../src/data-store";
import { type RerunNode, defaultFromStage, reusableStages } from "./rerun-rules";
import { type Core, type ExecutionRow, type StageRow, dependsOn, isFanOut, parse } from "./store";

/**
 * Rerun from a stage (docs/protocol.md, "Rerun"): what the original hands to
 * the new execution, and how the new one takes it in. The new execution runs
 * the original's stages as they were (the template snapshot: no KAM fetch) and
 * starts with the reused stages already completed: their outputs taken over
 * (a stored output by reference: the same key, nothing copied), no usage.
 */

/**
 * One stage of the original as it was created from the template: its row's template-given
 * columns, the pipeline graph's among them (store.ts).
 */
export type StageSnapshot = Pick<
  StageRow,
  | "stage_id"
  | "ord"
  | "kind"
  | "worker"
  | "template_ref"
  | "action"
  | "timeout_ms"
  | "max_attempts"
  | "resources"
  | "depends_on"
  | "for_each"
  | "max_parallel"
>;

type StoredObject = { key: string; kind: string; size: number; sha256: string; content_type: string; attempt: number };

export interface ReusedStage {
  stage_id: string;
  output: string | null;
  output_ref: string | null;
  /** The stored objects its output names (metadata only), so the new execution can check and serve them. */
  objects: StoredObject[];
  /**
   * A reused fan-out stage's items, all completed: their ids, positions and stored outputs'
   * references, so the new execution shows the same counts and items and its next stages may read
   * the stored ones. Their values are in the stage's output already, so nothing else is carried.
   */
  items?: { stage_id: string; ord: number; item_index: number; output_ref: string | null; objects: StoredObject[] }[];
}

export interface RerunSource {
  execution_id: string;
  template_name: string;
  template_id: string;
  client_id: string;
  priority: Priority;
  parameters: Record<string, unknown>;
  notify: boolean;
  from_stage: string;
  stages: StageSnapshot[];
  reused: ReusedStage[];
}

export type RerunSourceState =
  | { state: "missing" }
  | { state: "not_terminal"; status: string }
  | { state: "expired"; at: number }
  | { state: "invalid_stage"; message: string }
  | { state: "ok"; source: RerunSource };

/** The graph the reuse rule walks: each stage's `depends_on` (actors/execution/graph.ts resolved it from the template). */
function graphOf(rows: readonly StageRow[]): RerunNode[] {
  return rows.map((r) => ({ stage_id: r.stage_id, ord: r.ord, status: r.status, depends_on: dependsOn(r) }));
}

/** What a rerun of this (ended) execution from `fromStage` takes over and runs again. Synchronous. */
export function rerunSource(c: Core, ex: ExecutionRow, fromStage: string | null): RerunSourceState {
  if (ex.status !== "completed" && ex.status !== "failed" && ex.status !== "cancelled") return { state: "not_terminal", status: ex.status };
  if (ex.data_expired_at !== null) return { state: "expired", at: ex.data_expired_at };
  const rows = c.store.stages();
  if (!ex.template_id || rows.length === 0) {
    return { state: "invalid_stage", message: "the original never loaded its template: there is nothing to rerun from (start it anew)" };
  }
  const graph = graphOf(rows);
  const from = fromStage ?? defaultFromStage(graph)!;
  if (!rows.some((r) => r.stage_id === from)) {
    return { state: "invalid_stage", message: `no stage ${from}; the stages are ${rows.map((r) => r.stage_id).join(", ")}` };
  }
  const reuse = new Set(reusableStages(graph, from));
  const objects = c.sql<StoredObject & { stage_id: string }>`SELECT key, kind, size, sha256, content_type, stage_id, attempt FROM data_objects`;
  const objectsOf = (r: StageRow): StoredObject[] => {
    const ref = parse<DataReference>(r.output_ref);
    return ref ? objects.filter((o) => o.key === ref.key).map(({ stage_id: _s, ...o }) => o) : [];
  };
  return {
    state: "ok",
    source: {
      execution_id: ex.execution_id,
      template_name: ex.template_name,
      template_id: ex.template_id,
      client_id: ex.client_id,
      priority: ex.priority,
      parameters: JSON.parse(ex.parameters),
      notify: !!ex.notify,
      from_stage: from,
      stages: rows.map((r) => ({
        stage_id: r.stage_id,
        ord: r.ord,
        kind: r.kind,
        worker: r.worker,
        template_ref: r.template_ref,
        action: r.action,
        timeout_ms: r.timeout_ms,
        max_attempts: r.max_attempts,
        resources: r.resources,
        depends_on: r.depends_on,
        for_each: r.for_each,
        max_parallel: r.max_parallel,
      })),
      reused: rows
        .filter((r) => reuse.has(r.stage_id))
        .map((r) => ({
          stage_id: r.stage_id,
          output: r.output,
          output_ref: r.output_ref,
          objects: objectsOf(r),
          ...(isFanOut(r) ? { items: c.store.items(r.stage_id).map((i) => ({ stage_id: i.stage_id, ord: i.ord, item_index: i.item_index!, output_ref: i.output_ref, objects: objectsOf(i) })) } : {}),
        })),
    },
  };
}

/** The new execution's stages: the snapshot, with the reused ones completed from the start. Synchronous. */
export function createFromSnapshot(c: Core, source: RerunSource, now: number): void {
  const reused = new Map(source.reused.map((r) => [r.stage_id, r]));
  for (const s of source.stages) {
    const r = reused.get(s.stage_id);
    c.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status, kind,
        depends_on, for_each, max_parallel, progress, usage, output, output_ref, completed_at, reused_from)
      VALUES (${s.stage_id}, ${s.ord}, ${s.worker}, ${s.template_ref}, ${s.action}, ${s.timeout_ms}, ${s.max_attempts}, ${s.resources},
        ${r ? "completed" : "pending"}, ${s.kind}, ${s.depends_on}, ${s.for_each}, ${s.max_parallel},
        ${r ? 100 : 0}, ${r ? "{}" : null}, ${r?.output ?? null}, ${r?.output_ref ?? null}, ${r ? now : null}, ${r ? source.execution_id : null})`;
    const record = (stageId: string, objects: StoredObject[]) => {
      for (const o of objects) {
        c.sql`INSERT OR IGNORE INTO data_objects (key, kind, size, sha256, content_type, stage_id, attempt, created_at)
          VALUES (${o.key}, ${o.kind}, ${o.size}, ${o.sha256}, ${o.content_type}, ${stageId}, ${o.attempt}, ${now})`;
      }
    };
    record(s.stage_id, r?.objects ?? []);
    if (!r?.items) continue;
    // A reused fan-out: its items as they ended, completed, reused, with no usage (cost zero).
    for (const item of r.items) {
      c.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status,
          parent, item_index, progress, usage, output_ref, completed_at, reused_from)
        VALUES (${item.stage_id}, ${item.ord}, ${s.worker}, ${s.template_ref}, ${s.action}, ${s.timeout_ms}, ${s.max_attempts}, ${s.resources},
          'completed', ${s.stage_id}, ${item.item_index}, 100, '{}', ${item.output_ref}, ${now}, ${source.execution_id})`;
      record(item.stage_id, item.objects);
    }
    c.store.updateStage(s.stage_id, { items_total: r.items.length });
  }
  c.store.update({ template_id: source.template_id, template_source: "snapshot", rerun_of: source.execution_id });
  c.store.log("info", "rerun_created", { rerun_of: source.execution_id, from_stage: source.from_stage, reused: source.reused.map((r) => r.stage_id) });
}

/** The original learns of a rerun (idempotent: delivered at least once through the new one's outbox). */
export function recordRerun(c: Core, executionId: string, now: number): void {
  c.sql`INSERT OR IGNORE INTO reruns (execution_id, created_at) VALUES (${executionId}, ${now})`;
  c.changed();
}

export function rerunsOf(c: Core): string[] {
  return c.reads.memo("reruns", ["reruns"], () =>
    c.sql<{ execution_id: string }>`SELECT execution_id FROM reruns ORDER BY created_at DESC, execution_id DESC`.map((r) => r.execution_id),
  );
}

// ---- data of reused outputs -------------------------------------------------

/**
 * A reused stored output stays under the original's key, so the original must
 * not delete it while a rerun may still read it: reference counting. The front
 * Worker registers the rerun as a holder with the object that owns the key
 * before the rerun exists; the original's retention then waits until every
 * holder has released (each does when its own data expires, through its outbox).
 */
export const HOLDS_SCHEMA = "CREATE TABLE IF NOT EXISTS data_holds (holder TEXT PRIMARY KEY, created_at INTEGER NOT NULL) WITHOUT ROWID;";

/** The executions owning the stored outputs a rerun takes over (their keys name them). */
export function dataOwners(source: RerunSource, self?: string): string[] {
  const owners = new Set<string>();
  for (const r of source.reused) {
    for (const outputRef of [r.output_ref, ...(r.items ?? []).map((i) => i.output_ref)]) {
      const ref = parse<DataReference>(outputRef);
      const owner = ref ? parseDataKey(ref.key)?.executionId : undefined;
      if (owner && owner !== self) owners.add(owner);
    }
  }
  return [...owners];
}

/** Registers a holder; false once the data is gone. */
export function holdData(c: Core, holder: string, now: number): boolean {
  if (c.store.row()?.data_expired_at !== null) return false;
  c.sql`INSERT OR IGNORE INTO data_holds (holder, created_at) VALUES (${holder}, ${now})`;
  return true;
}

export function isDataHeld(c: Core): boolean {
  return c.sql`SELECT 1 FROM data_holds LIMIT 1`.length > 0;
}

/** A holder let go; the last one lets a retention that came due meanwhile run now. */
export function releaseData(c: Core, holder: string, now: number): void {
  c.sql`DELETE FROM data_holds WHERE holder = ${holder}`;
  const ex = c.store.row();
  if (!isDataHeld(c) && ex?.retention_waiting) {
    c.store.update({ retention_waiting: 0 });
    c.timers.set("retention", now);
  }
}

/** The owners of the stored outputs this rerun took over (read before its own data expires: that clears the refs). */
export function heldOwners(c: Core): string[] {
  const self = c.store.row()!.execution_id;
  const refs = c.sql<{ output_ref: string }>`SELECT output_ref FROM stages WHERE reused_from IS NOT NULL AND output_ref IS NOT NULL`;
  const owners = new Set(refs.map((r) => parseDataKey(parse<DataReference>(r.output_ref)!.key)?.executionId));
  return [...owners].filter((o): o is string => !!o && o !== self);
}

/** The rerun's own data expired: it no longer reads the originals' outputs. Through the outbox, at least once. */
export function releaseHeldData(c: Core, owners: string[], now: number): void {
  const holder = c.store.row()!.execution_id;
  for (const owner of owners) c.outbox.enqueue({ kind: "data_release", owner, holder }, now);
}
