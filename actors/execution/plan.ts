import { isOnWorker, isTerminalExecution, isTerminalStage } from "../stage-machine";
import { approvalTimedOut, awaitApproval } from "./control";
import { DEFAULT_MAX_PARALLEL, itemSlots, readyStages } from "./graph";
import * as step from "./steps";
import { type Core, type ItemKey, type StageRow, dependsOn, isFanOut } from "./store";
import * as tx from "./transitions";

/**
 * What a drive pass runs (the pass itself is `Execution.#drivePass`): the plan
 * of work that can move now, decided synchronously from the rows (graph.ts
 * decides readiness and slots), and the steps one stage or item takes.
 */

/** A piece of work a drive pass runs: `key` names it, `sig` is where its stage stood when planned. */
export interface Work {
  key: string;
  sig: string;
  run: () => Promise<void>;
}

/** Bounds that keep a pass from spinning (each plan follows one piece of work coming back). */
export const MAX_PLANS_PER_PASS = 100_000;
const MAX_STEPS_PER_RUN = 50;

const unitSignature = (st: ItemKey) => `${st.status}#${st.attempt}#${st.reservation ?? ""}`;

/** Before the template is loaded, the only work is loading it. */
export function templateWork(c: Core): Work {
  return { key: "template", sig: "", run: async () => void (await step.loadTemplateStep(c)) };
}

/** Before the first stage, the client's execution slot (steps.ts askSlot). */
export function slotWork(c: Core): Work {
  return { key: "slot", sig: "", run: () => step.askSlot(c) };
}

/**
 * What can move now (synchronous; graph.ts decides): every stage whose
 * dependencies completed, the items of running fan-out stages within their
 * `max_parallel` and the execution's `maxRunningItems`, a fan-out stage to
 * expand or to gather, and the execution's completion.
 */
export function plan(c: Core): Work[] {
  // Paused: only work already on a worker goes on (to its end), and an approval's deadline runs; nothing starts, nothing completes.
  if (c.store.row()!.status === "paused") return c.store.onWorker().map((st) => unitWork(c, st));
  const stages = c.store.stages();
  if (stages.every((s) => s.status === "completed")) {
    return [{ key: "complete", sig: "", run: () => step.completeExecution(c) }];
  }
  const work: Work[] = [];
  const ready = new Set(readyStages(stages.map((s) => ({ ...s, depends_on: dependsOn(s) }))).map((s) => s.stage_id));
  const t = c.config.tuning;
  // Items holding a slot, per fan-out stage (every item's parent is one of these stages).
  const open = new Map(stages.filter(isFanOut).map((st) => [st.stage_id, c.store.openItems(st.stage_id)]));
  let activeInExecution = [...open.values()].reduce((n, items) => n + items.length, 0);
  for (const st of stages) {
    if (isFanOut(st)) {
      if (st.status === "pending" && ready.has(st.stage_id)) work.push({ key: `expand:${st.stage_id}`, sig: st.status, run: () => step.expandFanOut(c, st) });
      if (st.status !== "processing") continue;
      const running = open.get(st.stage_id) ?? [];
      // An open item is not completed, so the counts are only needed when none is.
      const counts = running.length === 0 ? c.store.itemCounts().get(st.stage_id) : undefined;
      if (counts && counts.completed === counts.total) {
        work.push({ key: `fan_in:${st.stage_id}`, sig: st.status, run: () => step.fanIn(c, st) });
        continue;
      }
      const slots = itemSlots(st.max_parallel ?? DEFAULT_MAX_PARALLEL, running.length, activeInExecution, t.maxRunningItems);
      activeInExecution += slots;
      for (const item of running.concat(c.store.freshItems(st.stage_id, slots))) work.push(unitWork(c, item));
      continue;
    }
    if (isTerminalStage(st.status) || (st.status === "pending" && !ready.has(st.stage_id))) continue;
    work.push(unitWork(c, st));
  }
  return work;
}

function unitWork(c: Core, st: ItemKey): Work {
  return { key: st.stage_id, sig: unitSignature(st), run: () => runUnit(c, st.stage_id) };
}

/** Where a piece of work's stage stands: planning it again is worth it only once this changed. */
export function signature(c: Core, key: string): string {
  if (key === "template" || key === "complete") return "";
  const st = c.store.stage(key.includes(":") ? key.slice(key.indexOf(":") + 1) : key);
  if (!st) return "";
  return key.includes(":") ? st.status : unitSignature(st);
}

/** Steps one stage or item until it waits for an event or a timer. */
async function runUnit(c: Core, stageId: string): Promise<void> {
  try {
    for (let i = 0; i < MAX_STEPS_PER_RUN; i++) {
      const ex = c.store.row();
      const st = c.store.stage(stageId);
      if (!ex || !st || isTerminalExecution(ex.status) || isTerminalStage(st.status)) return;
      if (ex.status === "paused" && !isOnWorker(st.status) && st.status !== "awaiting_approval") return;
      if (!(await stepStage(c, st))) return;
    }
  } finally {
    // A grant lives in memory only while its own steps run (the handshake's): never past them.
    c.grants.writeOne(stageId);
  }
}

/** One step of the current stage. Returns true when it changed something and the loop should go on. */
async function stepStage(c: Core, st: StageRow): Promise<boolean> {
  const now = Date.now();
  const timers = c.timers;
  switch (st.status) {
    case "pending": {
      if (st.kind === "approval") {
        awaitApproval(c, st, now);
        return false;
      }
      if (st.attempt > 0 && !timers.take("retry", st.stage_id)) return false;
      tx.beginAttempt(c, st, now);
      return true;
    }
    case "awaiting_approval": {
      if (st.deadline_at === null || now < st.deadline_at) return false;
      timers.take("approval", st.stage_id);
      approvalTimedOut(c, st, now);
      return true;
    }
    case "waiting_resources": {
      const limit = st.queue_timeout_ms ?? c.config.tuning.maxQueueMs;
      if (st.waiting_since !== null && now >= st.waiting_since + limit) {
        timers.take("queue", st.stage_id);
        // Not retried: waiting again would wait for the same resources.
        tx.failAttempt(c, st, { code: "queue_timeout", message: `no resources granted within ${limit} ms`, retryable: false }, now);
        return true;
      }
      return step.askLedger(c, st);
    }
    case "handshaking": {
      if (st.deadline_at !== null && now >= st.deadline_at) {
        timers.take("deadline", st.stage_id);
        tx.failAttempt(c, st, step.handshakeTimeout(c), now);
        return true;
      }
      // A held grant has no lease timer yet, and taking one is a write (which writes the grant).
      if (!c.grants.of(st) && timers.take("lease", st.stage_id)) void step.renewLease(c, st);
      return step.handshake(c, st);
    }
    case "processing": {
      if (st.deadline_at !== null && now >= st.deadline_at) {
        timers.take("deadline", st.stage_id);
        tx.failAttempt(c, st, { code: "stage_timeout", message: `no result within ${st.timeout_ms} ms`, retryable: true }, now);
        return true;
      }
      // The renewal goes out beside the poll: a slow ledger must not hold up the stage's progress.
      if (timers.take("lease", st.stage_id)) void step.renewLease(c, st);
      if (timers.take("poll", st.stage_id)) return step.poll(c, st);
      return false;
    }
    default:
      return false;
  }
}
