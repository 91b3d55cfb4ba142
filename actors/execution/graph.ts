import type { StageStatus } from "../../schemas/api";
import type { TemplateStage } from "../../schemas/template";
import { stageIdFor } from "../../src/ids";

/**
 * The pipeline graph, as pure rules (no I/O, no clock): which stage waits for
 * which, what is ready, how a fan-out stage expands into items, and what the
 * deliverable is. A template's stages keep the ids `stage_{n}` (n: position in
 * `stage` order, from 1); item `i` of a fan-out stage is `stage_{n}.{i}`.
 */

export interface GraphNode {
  stage_id: string;
  ord: number;
  /** Stage ids this stage waits for. */
  depends_on: string[];
  for_each: string | null;
  max_parallel: number;
}

export const DEFAULT_MAX_PARALLEL = 10;

export const itemIdFor = (stageId: string, index: number) => `${stageId}.${index}`;

/**
 * Resolves `depends_on` (stage numbers; absent: the next lower stage number) into
 * stage ids and checks the graph: unknown numbers, a stage depending on itself,
 * cycles, and `for_each` on a stage without exactly one dependency are refused
 * with a reason that names the stages. `stages` are sorted by `stage`.
 */
export function resolveGraph(stages: TemplateStage[]): { ok: true; nodes: GraphNode[] } | { ok: false; message: string } {
  const idOf = new Map(stages.map((s, i) => [s.stage, stageIdFor(i + 1)]));
  const problems: string[] = [];
  const nodes = stages.map((s, i): GraphNode => {
    // Approval stages have no for_each or max_parallel (schemas/template.ts).
    const forEach = "for_each" in s ? s.for_each : undefined;
    const maxParallel = "max_parallel" in s ? s.max_parallel : undefined;
    const numbers = s.depends_on ?? (i === 0 ? [] : [stages[i - 1].stage]);
    for (const n of numbers) {
      if (n === s.stage) problems.push(`stage ${s.stage} depends on itself`);
      else if (!idOf.has(n)) problems.push(`stage ${s.stage} depends on stage ${n}, which is not a stage of the template`);
    }
    const deps = [...new Set(numbers.filter((n) => n !== s.stage && idOf.has(n)))];
    if (forEach !== undefined && deps.length !== 1) {
      problems.push(`stage ${s.stage} has for_each but ${deps.length === 0 ? "no dependency" : `${deps.length} dependencies (${deps.map((n) => `stage ${n}`).join(", ")})`}; for_each needs exactly one`);
    }
    if (maxParallel !== undefined && forEach === undefined) problems.push(`stage ${s.stage} has max_parallel but no for_each`);
    return {
      stage_id: stageIdFor(i + 1),
      ord: i + 1,
      depends_on: deps.map((n) => idOf.get(n)!),
      for_each: forEach ?? null,
      max_parallel: maxParallel ?? DEFAULT_MAX_PARALLEL,
    };
  });
  if (problems.length === 0) {
    const cycle = findCycle(stages);
    if (cycle) problems.push(`cycle: ${cycle.map((n) => `stage ${n}`).join(" -> ")}`);
  }
  return problems.length ? { ok: false, message: problems.join("; ") } : { ok: true, nodes };
}

/** A dependency cycle as stage numbers (first = last), or null. Depth-first over `depends_on`. */
function findCycle(stages: TemplateStage[]): number[] | null {
  const deps = new Map(stages.map((s, i) => [s.stage, s.depends_on ?? (i === 0 ? [] : [stages[i - 1].stage])]));
  const state = new Map<number, "open" | "done">();
  const path: number[] = [];
  const visit = (n: number): number[] | null => {
    if (state.get(n) === "done") return null;
    if (state.get(n) === "open") return [...path.slice(path.indexOf(n)), n];
    state.set(n, "open");
    path.push(n);
    for (const d of deps.get(n) ?? []) {
      const found = visit(d);
      if (found) return found;
    }
    path.pop();
    state.set(n, "done");
    return null;
  };
  for (const s of stages) {
    const found = visit(s.stage);
    if (found) return found;
  }
  return null;
}

/** RFC 6901: resolves `pointer` in `value`. */
export function resolvePointer(value: unknown, pointer: string): { ok: true; value: unknown } | { ok: false; reason: string } {
  if (pointer === "") return { ok: true, value };
  if (!pointer.startsWith("/")) return { ok: false, reason: `${JSON.stringify(pointer)} is not a JSON Pointer` };
  let cur = value;
  for (const raw of pointer.slice(1).split("/")) {
    const token = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    if (Array.isArray(cur)) {
      if (!/^(0|[1-9]\d*)$/.test(token) || Number(token) >= cur.length) return { ok: false, reason: `no element ${JSON.stringify(token)} at ${pointer}` };
      cur = cur[Number(token)];
    } else if (cur !== null && typeof cur === "object" && Object.hasOwn(cur, token)) {
      cur = (cur as Record<string, unknown>)[token];
    } else {
      return { ok: false, reason: `nothing at ${JSON.stringify(pointer)} (no ${JSON.stringify(token)})` };
    }
  }
  return { ok: true, value: cur };
}

/** The items of a fan-out stage: the array at `pointer` in the dependency's output, at most `max` of them. */
export function fanOutItems(output: unknown, pointer: string, max: number): { ok: true; items: unknown[] } | { ok: false; reason: string } {
  const found = resolvePointer(output, pointer);
  if (!found.ok) return found;
  if (!Array.isArray(found.value)) {
    const kind = found.value === null ? "null" : typeof found.value;
    return { ok: false, reason: `for_each ${JSON.stringify(pointer)} points at ${kind}, not an array` };
  }
  if (found.value.length > max) return { ok: false, reason: `for_each ${JSON.stringify(pointer)} gives ${found.value.length} items, more than maxFanOutItems (${max})` };
  return { ok: true, items: found.value };
}

export interface NodeState {
  stage_id: string;
  status: StageStatus;
  depends_on: string[];
}

/** Pending stages whose dependencies have all completed, in stage order. */
export function readyStages<T extends NodeState>(stages: T[]): T[] {
  const done = new Set(stages.filter((s) => s.status === "completed").map((s) => s.stage_id));
  return stages.filter((s) => s.status === "pending" && s.depends_on.every((d) => done.has(d)));
}

/** Stages no other stage depends on: their outputs make the deliverable. */
export function sinks<T extends { stage_id: string; depends_on: string[] }>(stages: T[]): T[] {
  const needed = new Set(stages.flatMap((s) => s.depends_on));
  return stages.filter((s) => !needed.has(s.stage_id));
}

/**
 * How many more items of a fan-out stage may start now: up to its
 * `max_parallel` counting those already reserved or running (or waiting to
 * retry), and within the execution's bound on running items.
 */
export function itemSlots(maxParallel: number, activeInStage: number, activeInExecution: number, maxRunning: number): number {
  return Math.max(0, Math.min(maxParallel - activeInStage, maxRunning - activeInExecution));
}
