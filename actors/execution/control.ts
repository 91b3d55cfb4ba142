import type { StageDocument } from "../../schemas/api";
import { isTerminalExecution } from "../stage-machine";
import { type Core, type ExecutionRow, type StageRow, dependsOn, outputAsInput } from "./store";
import { attemptEnded, cancelOnWorker, completeStage, failAttempt, indexUpdate, moveStage, releaseReservation } from "./transitions";

/**
 * Execution control (docs/protocol.md, "Pause and resume"): synchronous state
 * changes like those of `transitions.ts`, with no `await` inside, so each is
 * atomic under the input gate and its event for KAM is written with it.
 */

/** Execution columns added by execution control, for objects whose table predates them. */
const CONTROL_COLUMNS = [
  "notify INTEGER NOT NULL DEFAULT 0",
  "paused_from TEXT",
  "paused_at INTEGER",
  "paused_ms INTEGER NOT NULL DEFAULT 0",
  "rerun_of TEXT",
  "retention_waiting INTEGER NOT NULL DEFAULT 0",
];

/** Stage columns added by approval stages. */
const STAGE_COLUMNS = ["kind TEXT", "decision TEXT", "reused_from TEXT"];

/** The reruns of this execution (rerun.ts). */
export const RERUNS_SCHEMA = "CREATE TABLE IF NOT EXISTS reruns (execution_id TEXT PRIMARY KEY, created_at INTEGER NOT NULL) WITHOUT ROWID;";

export function migrateControl(storage: DurableObjectStorage): void {
  const add = (table: string, cols: string[]) => {
    const have = new Set(storage.sql.exec(`PRAGMA table_info(${table})`).toArray().map((r) => String(r.name)));
    for (const col of cols) if (!have.has(col.split(" ")[0])) storage.sql.exec(`ALTER TABLE ${table} ADD COLUMN ${col}`);
  };
  // The reruns table is lazy (lazy-tables.ts): an older object without it gets it with its first rerun.
  add("execution", CONTROL_COLUMNS);
  add("stages", STAGE_COLUMNS);
}

/**
 * Pauses a live execution: nothing starts a new attempt or asks the ledger until
 * resume. Work already on a worker (handshaking, processing) runs to its end and
 * its callbacks apply. A stage waiting for resources gives its reservation back
 * (not held while paused) and goes back to `pending`; that attempt never ran, so
 * it does not count against `max_attempts` (which grows by one), and resume asks
 * the ledger again with a new attempt number (the ledger's reserve is idempotent per attempt).
 */
export function pauseExecution(c: Core, now: number): void {
  const ex = c.store.row()!;
  if (ex.status === "paused" || isTerminalExecution(ex.status)) return;
  c.store.update({ status: "paused", paused_from: ex.status, paused_at: now });
  // Every stage and item waiting for resources, in parallel stages and fan-outs alike.
  for (const st of c.store.unitsIn("waiting_resources")) {
    // Its attempt may be at the worker (a grant held by a lost instance): told to stop, as it ends here.
    cancelOnWorker(c, st, now);
    releaseReservation(c, st, now);
    // The attempt ends here, as a span (outcome `paused`) and its data point; resume starts the next one.
    attemptEnded(c, st, "paused", 0, undefined, now);
    moveStage(c, st, "pending", now, { message: "paused: the reservation was given back" });
    c.store.updateStage(st.stage_id, (cur) => ({ max_attempts: cur.max_attempts + 1, waiting_ms: cur.waiting_ms + (now - (st.waiting_since ?? now)), waiting_since: null }));
  }
  c.timers.clearMany(["reask"]);
  indexUpdate(c, now);
  c.notifier.emit("execution.paused", {}, now);
  c.store.log("info", "execution_status", { status: "paused", from: ex.status });
}

/**
 * When the execution-wide deadline (`execution_timeout_ms`) falls: its start's
 * deadline moved on by the time spent paused, and none while paused (the clock
 * that counts against it is stopped). Pure, for the drive pass and resume.
 */
export function executionDeadlineAt(ex: Pick<ExecutionRow, "status" | "deadline_at" | "paused_ms">): number | null {
  if (ex.deadline_at === null || ex.status === "paused") return null;
  return ex.deadline_at + ex.paused_ms;
}

/** Resumes a paused execution where it was (`queued` or `running`); the ready stage starts in the next drive pass. */
export function resumeExecution(c: Core, now: number): void {
  const ex = c.store.row()!;
  if (ex.status !== "paused") return;
  const to = ex.paused_from === "queued" ? "queued" : "running";
  c.store.update({ status: to, paused_from: null, paused_at: null, paused_ms: ex.paused_ms + (now - (ex.paused_at ?? now)) });
  // A stage or item whose attempt was given back starts again now; one waiting out a retry backoff keeps its timer.
  for (const st of c.store.unitsIn("pending")) {
    if (st.attempt > 0 && !c.timers.has("retry", st.stage_id)) c.timers.set("retry", now, st.stage_id);
  }
  // The deadline moved on by this pause: its timer too (it may have fired, to no effect, while paused).
  const deadline = executionDeadlineAt(c.store.row()!);
  if (deadline !== null) c.timers.set("execution", deadline);
  indexUpdate(c, now);
  c.notifier.emit("execution.resumed", {}, now);
  c.store.log("info", "execution_status", { status: to, resumed: true, paused_ms: now - (ex.paused_at ?? now) });
}

// ---- approval stages --------------------------------------------------------

/** An approval stage became ready: it waits for a decision until its `timeout_ms` runs out. */
export function awaitApproval(c: Core, st: StageRow, now: number): void {
  moveStage(c, st, "awaiting_approval", now, { message: "awaiting approval" });
  c.store.updateStage(st.stage_id, (cur) => ({ attempt: 1, started_at: cur.started_at ?? now, deadline_at: now + st.timeout_ms }));
  c.timers.set("approval", now + st.timeout_ms, st.stage_id);
  c.notifier.emit("stage.awaiting_approval", { stage_id: st.stage_id }, now);
}

export type Decision = NonNullable<StageDocument["decision"]>;

/**
 * Approve: the stage completes with its dependency's output passed on unchanged
 * (by reference when it is stored data: nothing is copied), no usage, no cost.
 * Reject: the stage fails with `approval_rejected`, and so does the execution.
 */
export function decideApproval(c: Core, st: StageRow, decision: Decision, now: number): void {
  c.timers.clear("approval", st.stage_id);
  c.store.updateStage(st.stage_id, { decision: JSON.stringify(decision), deadline_at: null });
  c.store.log("info", "approval_decided", { stage_id: st.stage_id, approved: decision.approved, by: decision.by });
  if (decision.approved) {
    // What it passes on: its one dependency's output as it is; several: `inputs`, stage id -> output
    // as a worker stage would see them (a stored one as its reference's summary); none: null.
    const deps = dependsOn(st).map((id) => c.store.stage(id)!);
    const one = deps.length === 1 ? deps[0] : null;
    const output = one?.output_ref
      ? { inline: null, ref: JSON.parse(one.output_ref) }
      : { inline: one ? (one.output ?? "null") : JSON.stringify(deps.length ? Object.fromEntries(deps.map((d) => [d.stage_id, outputAsInput(d)])) : null), ref: null };
    completeStage(c, c.store.stage(st.stage_id)!, output, {}, now, null);
    c.store.updateStage(st.stage_id, { message: decision.comment ? `approved by ${decision.by}: ${decision.comment}` : `approved by ${decision.by}` });
    return;
  }
  const why = decision.comment ? `: ${decision.comment}` : "";
  failAttempt(c, c.store.stage(st.stage_id)!, { code: "approval_rejected", message: `${st.stage_id} was rejected by ${decision.by}${why}`, retryable: false }, now);
}

/** No decision within `timeout_ms`: the stage and the execution fail with `approval_timeout`. */
export function approvalTimedOut(c: Core, st: StageRow, now: number): void {
  failAttempt(c, st, { code: "approval_timeout", message: `${st.stage_id} had no decision within ${st.timeout_ms} ms`, retryable: false }, now);
}
