import type { WaitingOn } from "../../schemas/clients";
import type { ExecutionStatus, StageStatus } from "../../schemas/api";
import type { ErrorInfo } from "../../schemas/common";
import type { DataReference } from "../../schemas/data";
import type { SlotResult } from "../../schemas/ledger";
import { type MasterTemplate, isApprovalStage } from "../../schemas/template";
import { usagePoolsFor } from "../../src/config";
import { addUsage, costOf } from "../../src/cost";
import { emit, tokensOf } from "../../src/metrics";
import { attemptSpanId } from "../../src/trace";
import {
  type StageFailure,
  canMoveExecution,
  canMoveStage,
  isOnWorker,
  isTerminalExecution,
  isTerminalStage,
  mergeProgress,
  nextPollInterval,
  retryDelayMs,
  shouldRetry,
  usageRefusal,
} from "../stage-machine";
import { reservationIdOf } from "../resource-ledger";
import type { HeldGrant } from "./grant";
import { newCarry } from "./chain";
import { releaseUnit, settleUnit } from "./parts";
import { indexEntry } from "./documents";
import { endedSpan, indexAttempts, phases, recordSpan } from "./spans";
import { itemIdFor, resolveGraph } from "./graph";
import { type Core, type ExecutionRow, type RowChange, ITEM_ORD_STRIDE, type StageRow, type StoredOutput, dependsOn, isFanOut, parse } from "./store";

/**
 * The synchronous state changes of an Execution. Each is a run of `sql` calls
 * with no `await` inside, so the input gate makes it atomic; whatever must
 * reach another system goes to the outbox in the same run.
 */

export function createStages(c: Core, template: MasterTemplate, source: "kam" | "cache"): void {
  const t = c.config.tuning;
  // Checked when the template was parsed (template-source.ts); a failure here is a bug.
  const graph = resolveGraph(template.stages);
  if (!graph.ok) throw new Error(`internal: template ${template.template_id} passed validation with a bad graph: ${graph.message}`);
  template.stages.forEach((s, i) => {
    const node = graph.nodes[i];
    if (isApprovalStage(s)) {
      // No worker, no resources, one "attempt": the decision (control.ts).
      c.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status, kind, depends_on)
        VALUES (${node.stage_id}, ${node.ord}, '', '', 'approval', ${s.timeout_ms ?? t.defaultApprovalTimeoutMs}, 1, NULL, 'pending', 'approval',
                ${JSON.stringify(node.depends_on)})`;
      return;
    }
    c.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status,
        depends_on, for_each, max_parallel, queue_timeout_ms)
      VALUES (${node.stage_id}, ${node.ord}, ${s.worker}, ${s.template_ref}, ${s.action ?? "process"},
              ${s.timeout_ms ?? t.defaultStageTimeoutMs}, ${s.max_attempts ?? t.defaultMaxAttempts},
              ${s.resources ? JSON.stringify(s.resources) : null}, 'pending',
              ${JSON.stringify(node.depends_on)}, ${node.for_each}, ${node.for_each === null ? null : node.max_parallel}, ${s.queue_timeout_ms ?? null})`;
  });
  c.store.update({ template_id: template.template_id, template_source: source });
  c.store.log("info", "template_loaded", { template_id: template.template_id, source, stages: template.stages.length });
  c.changed();
}

/**
 * A fan-out stage's dependency completed with a usable list: one item row per
 * element (each with its own attempts, reservation, timers), and the stage
 * runs; an empty list completes it at once with `[]`.
 */
export function expandFanOut(c: Core, st: StageRow, items: unknown[], now: number): void {
  items.forEach((item, i) => {
    c.sql`INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, resources, status,
        parent, item_index, item)
      VALUES (${itemIdFor(st.stage_id, i)}, ${st.ord * ITEM_ORD_STRIDE + i + 1}, ${st.worker}, ${st.template_ref}, ${st.action},
              ${st.timeout_ms}, ${st.max_attempts}, ${st.resources}, 'pending', ${st.stage_id}, ${i}, ${JSON.stringify(item ?? null)})`;
  });
  c.store.updateStage(st.stage_id, (cur) => ({ items_total: items.length, started_at: cur.started_at ?? now }));
  c.store.log("info", "fan_out", { stage_id: st.stage_id, items: items.length });
  if (items.length === 0) {
    moveStage(c, st, "completed", now, {});
    c.store.updateStage(st.stage_id, { progress: 100, output: "[]", usage: "{}" });
  } else {
    moveStage(c, st, "processing", now, {});
  }
}

/** Every item of a fan-out stage completed: its output is theirs, in item order. */
export function completeFanOut(c: Core, st: StageRow, output: StoredOutput, now: number): void {
  moveStage(c, st, "completed", now, {});
  c.store.updateStage(st.stage_id, { progress: 100, message: null, output: output.inline, output_ref: output.ref ? JSON.stringify(output.ref) : null });
}

/** A fan-out stage whose list is unusable (not an array, too long): it fails, and with it the execution. */
export function fanOutInvalid(c: Core, st: StageRow, reason: string, now: number): void {
  const info: ErrorInfo = { code: "fan_out_invalid", message: `${st.stage_id}: ${reason}`, stage_id: st.stage_id };
  c.store.log("warn", "fan_out_invalid", { stage_id: st.stage_id, reason });
  failExecutionAt(c, st, info, now);
}

/** A transient template failure: count it and try again after a backoff. */
export function templateRetry(c: Core, attempts: number, code: string, now: number): void {
  const t = c.config.tuning;
  c.store.update({ template_attempts: attempts });
  c.timers.set("advance", now + retryDelayMs(attempts, t.kamRetryBaseMs, t.retryCapMs));
  c.store.log("warn", "template_retry", { code, attempts });
}

export function templateFailed(c: Core, attempts: number, error: ErrorInfo, now: number): void {
  finishExecution(c, "failed", now, error, { template_attempts: attempts });
}

export function beginAttempt(c: Core, st: StageRow, now: number): void {
  const ex = c.store.row()!;
  if (ex.status === "queued") {
    c.store.update({ status: "running", started_at: now });
    indexUpdate(c, now);
    c.store.log("info", "execution_status", { status: "running" });
  }
  checkMove(c, st, "waiting_resources");
  c.store.updateStage(st.stage_id, (cur) => ({
    status: "waiting_resources", attempt: st.attempt + 1, reservation: "requested", reservation_id: null, requirements: null,
    waiting_since: now, started_at: cur.started_at ?? now, progress: 0, poll_interval_ms: null, poll_failures: 0,
    ledger_failures: 0, attempt_at: now, granted_at: null,
  }));
  c.timers.clear("reask", st.stage_id);
  // No `queue` timer yet: most stages are granted on their first ask (the reserve call has its own
  // timeout). It is written once the stage waits (queued, or the call failed: waitForGrant,
  // ledgerFailed); meanwhile every pass checks the deadline from `waiting_since`, and the watchdog
  // (30 s) brings a pass after a crash. An earlier attempt's (one that failed or was paused while it
  // waited) goes now: due before this attempt's deadline, it would keep the alarm firing.
  c.timers.clear("queue", st.stage_id);
}

/** The stage waits for resources from now on: the `queue` timer wakes the object at its deadline (written once). */
function queueDeadline(c: Core, st: StageRow): void {
  if (st.waiting_since === null) return;
  c.timers.setNoLaterThan("queue", st.waiting_since + (st.queue_timeout_ms ?? c.config.tuning.maxQueueMs), st.stage_id);
}

/**
 * The reservation id the ledger gives this stage's current attempt while it
 * waits for resources (derived from execution, stage and attempt), so a grant
 * notice or a release does not depend on the reserve answer having arrived.
 */
export function expectedReservationId(c: Core, st: StageRow): string | null {
  if (st.status !== "waiting_resources" || st.attempt < 1) return null;
  return reservationIdOf(c.store.row()!.execution_id, st.stage_id, st.attempt);
}

/** A ledger call failed (slow, down): ask again after a backoff with jitter that grows with each failure in a row. */
export function ledgerFailed(c: Core, st: StageRow, now: number): void {
  const t = c.config.tuning;
  const failures = st.ledger_failures + 1;
  c.store.updateStage(st.stage_id, { ledger_failures: failures });
  c.timers.set("reask", now + retryDelayMs(failures, t.ledgerRetryBaseMs, t.ledgerRetryCapMs), st.stage_id);
  queueDeadline(c, st);
}

/** The ledger answered a reserve with a reservation id: remember it (for release and for leak checks). */
export function reserved(c: Core, st: StageRow, reservationId: string, now: number): void {
  c.store.updateStage(st.stage_id, { reservation_id: reservationId });
  recordReservation(c, st, reservationId, now);
}

/** The attempt's reservation in the execution's list of them (Execution.reservationIds); the stage's own column is set by the caller. */
export function recordReservation(c: Core, st: StageRow, reservationId: string, now: number): void {
  c.sql`INSERT OR IGNORE INTO reservations (reservation_id, stage_id, attempt, created_at) VALUES (${reservationId}, ${st.stage_id}, ${st.attempt}, ${now})`;
}

/** The reservation waits in the ledger's queue; ask again at the `reask` timer in case the notice is lost. */
export function waitForGrant(c: Core, st: StageRow, position: number, now: number, waitingOn?: WaitingOn): void {
  const why = waitingOn ? JSON.stringify(waitingOn) : null;
  // The ledger answered: failed calls in a row start again from none (lostGrantReaskAt reads the count as a backoff in force).
  c.store.updateStage(st.stage_id, { reservation: "waiting", message: `waiting for resources (position ${position})`, waiting_on: why, ledger_failures: 0 });
  c.timers.set("reask", now + c.config.tuning.ledgerReaskMs, st.stage_id);
  queueDeadline(c, st);
  ledgerAnswered(c, st, "waiting", parse<Record<string, number>>(st.resources) ?? {}, null, 0);
}

/** The fields every data point about this execution (and one of its stage attempts) carries. */
function metricFields(ex: { execution_id: string; template_name: string; client_id: string }, st?: StageRow) {
  const base = { execution_id: ex.execution_id, template_name: ex.template_name, client_id: ex.client_id };
  return st ? { ...base, worker: st.worker, stage_id: st.stage_id, attempt: st.attempt } : base;
}

/** A ledger answer for a stage (granted, waiting, refused): one data point per pool it names, and the worker's pool. */
export function ledgerAnswered(c: Core, st: StageRow, outcome: string, pools: Record<string, number>, code: string | null, waitedMs: number): void {
  const ex = c.store.row()!;
  const names = new Set([...Object.keys(pools), `worker:${st.worker}`]);
  for (const pool of names) {
    emit(c.env, {
      event: "ledger_answer",
      ...metricFields(ex, st),
      pool,
      outcome,
      code,
      waiting_ms: waitedMs,
    });
  }
}

/**
 * `ending`: the attempt ends in the same synchronous step (a held grant written by the callback that
 * completes or fails it): its deadline and lease timers would be deleted again at once, so they are not written.
 */
export function granted(
  c: Core,
  st: StageRow,
  expiresAt: number,
  requirements: Record<string, number>,
  now: number,
  ending = false,
  reservationId: string | null = null,
  carry: string | null = null,
): void {
  checkMove(c, st, "handshaking");
  ledgerAnswered(c, st, "granted", requirements, null, now - (st.waiting_since ?? now));
  // `handshaking` has a deadline of its own; `process` accepted replaces it with the stage's.
  const deadline = now + c.config.tuning.handshakeTimeoutMs;
  // A reservation id not written yet rides in this UPDATE (one row written, not two).
  c.store.updateStage(st.stage_id, (cur) => ({
    status: "handshaking", reservation: "granted", reservation_id: reservationId ?? cur.reservation_id, requirements: JSON.stringify(requirements),
    lease_expires_at: expiresAt, waiting_ms: cur.waiting_ms + (now - (st.waiting_since ?? now)), waiting_since: null, message: null,
    ledger_failures: 0, deadline_at: deadline, granted_at: now, carry: carry ?? cur.carry,
  }));
  c.timers.clear("reask", st.stage_id);
  c.timers.clear("queue", st.stage_id);
  if (ending) return;
  c.timers.set("deadline", deadline, st.stage_id);
  c.timers.set("lease", renewalDue(c, expiresAt), st.stage_id);
}

/**
 * A grant held in memory (grant.ts) is written as of its arrival: what
 * `reserved` and `granted` would have written then, unless the stage moved on
 * since (it cannot without a write, which writes the grant first).
 */
export function writeGrant(c: Core, g: HeldGrant, ending: boolean): void {
  const st = c.store.stage(g.stage_id);
  if (st?.status !== "waiting_resources" || st.attempt !== g.attempt) return;
  recordReservation(c, st, g.reservationId, g.at);
  const carry = g.chain ? JSON.stringify(newCarry(g.reservationId, g.expiresAt, g.chain)) : null;
  granted(c, st, g.expiresAt, g.requirements, g.at, ending, g.reservationId, carry);
}

/** `process` was accepted: the stage runs until its deadline, polled from `pollInitialMs` on. */
export function startProcessing(c: Core, st: StageRow, at: number): void {
  const poll = nextPollInterval(null, c.config.tuning.pollInitialMs, c.config.tuning.pollMaxMs);
  moveStage(c, st, "processing", at, {});
  c.store.updateStage(st.stage_id, { processing_since: at, deadline_at: at + st.timeout_ms, poll_interval_ms: poll, poll_failures: 0 });
  c.timers.set("deadline", at + st.timeout_ms, st.stage_id);
  c.timers.set("poll", at + poll, st.stage_id);
}

/**
 * The stage as a callback ends it: an attempt whose `process` was accepted but
 * whose `processing` is not written yet (steps.ts handshake) counts its time
 * from the acceptance, as if it were.
 */
export function asProcessing(c: Core, st: StageRow): StageRow {
  const at = st.processing_since === null && st.status === "handshaking" ? c.accepted.get(`${st.stage_id}#${st.attempt}`) : undefined;
  return at === undefined ? st : { ...st, processing_since: at };
}

/** A progress poll went out (counted before the call, so an eviction mid-call still counts it). */
export function pollSent(c: Core, st: StageRow): void {
  c.store.updateStage(st.stage_id, (cur) => ({ polls: cur.polls + 1 }));
}

/** A poll failed: poll again later, unless too many failed in a row (then the attempt fails: true). */
export function pollFailed(c: Core, st: StageRow, error: StageFailure, now: number): boolean {
  const failures = st.poll_failures + 1;
  if (failures >= c.config.tuning.maxPollFailures || !error.retryable) {
    failAttempt(c, st, { ...error, message: `progress polls failing (${failures} in a row): ${error.message}`, retryable: true }, now);
    return true;
  }
  const interval = nextPollInterval(st.poll_interval_ms, c.config.tuning.pollInitialMs, c.config.tuning.pollMaxMs);
  c.store.updateStage(st.stage_id, { poll_failures: failures, poll_interval_ms: interval });
  c.timers.set("poll", now + interval, st.stage_id);
  return false;
}

/** A worker reported progress (by poll): merge it and poll again later. */
export function progressed(c: Core, st: StageRow, progress: number | undefined, message: string | undefined, now: number): void {
  const interval = nextPollInterval(st.poll_interval_ms, c.config.tuning.pollInitialMs, c.config.tuning.pollMaxMs);
  c.store.updateStage(st.stage_id, { progress: mergeProgress(st.progress, progress), message: message ?? st.message, poll_failures: 0, poll_interval_ms: interval });
  c.timers.set("poll", now + interval, st.stage_id);
  c.changed();
}

/** A worker reported progress by callback: merged, no timer moves. */
export function progressCallback(c: Core, st: StageRow, progress: number | undefined, message: string | undefined): void {
  c.store.updateStage(st.stage_id, { progress: mergeProgress(st.progress, progress), message: message ?? st.message });
  c.changed();
}

export function leaseRenewed(c: Core, st: StageRow, expiresAt: number): void {
  c.store.updateStage(st.stage_id, { lease_expires_at: expiresAt });
  c.timers.set("lease", renewalDue(c, expiresAt), st.stage_id);
}

/** Records a stored object; false (nothing changed) when its key is already recorded: a recorded object is never replaced. */
export function recordObject(c: Core, ref: DataReference, stageId: string, attempt: number, now: number): boolean {
  return (
    c.sql`INSERT INTO data_objects (key, kind, size, sha256, content_type, stage_id, attempt, created_at)
    VALUES (${ref.key}, ${ref.kind}, ${ref.size}, ${ref.sha256}, ${ref.contentType}, ${stageId}, ${attempt}, ${now})
    ON CONFLICT(key) DO NOTHING RETURNING key`.length > 0
  );
}

export function completeStage(c: Core, st: StageRow, output: StoredOutput, usage: Record<string, number> | undefined, now: number, hash: string | null): void {
  const worked = st.processing_since !== null ? now - st.processing_since : 0;
  checkMove(c, st, "completed");
  c.store.updateStage(st.stage_id, (cur) => ({
    status: "completed", progress: 100, message: null, completed_at: now, processing_ms: cur.processing_ms + worked, processing_since: null,
    usage: JSON.stringify(addUsage(parse(st.usage), usage) ?? {}), output: output.inline, output_ref: output.ref ? JSON.stringify(output.ref) : null,
    complete_hash: hash, reservation: null, deadline_at: null, carry: null,
  }));
  addToStage(c, st, usage);
  attemptEnded(c, st, "completed", worked, usage, now);
  settleUnit(c, st, usage ?? {}, worked, now, true, true);
  c.timers.clearUnit(st.stage_id);
}

/** An item's usage also counts for its fan-out stage (whose cost is the sum of its items'). */
function addToStage(c: Core, st: StageRow, usage: Record<string, number> | undefined): void {
  if (st.parent === null || !usage) return;
  const parent = c.store.stage(st.parent)!;
  c.store.updateStage(st.parent, { usage: JSON.stringify(addUsage(parse(parent.usage), usage)) });
}

/** Why this stage's reported usage cannot be charged, or null when it can (see usageRefusal). */
export function usageProblem(c: Core, st: StageRow, usage: Record<string, number> | undefined): string | null {
  const reserved = parse<Record<string, number>>(st.resources) ?? {};
  return usageRefusal(usage, reserved, usagePoolsFor(c.config, st.worker), c.config.tuning.usageMaxFactor);
}

/**
 * Whether a worker may hold this attempt: a stage on a worker, or one stored `waiting_resources`
 * whose grant an instance since lost held in memory and sent to the worker's handshake (and maybe
 * `process`) before writing it (grant.ts HeldGrants). A live instance shows such a stage
 * `handshaking` (its held grant); after a crash nothing tells the two apart, so an attempt that ends
 * while stored waiting is cancelled at the worker too: one that never reached it answers the cancel
 * 404, which the outbox takes as done.
 */
export function mayBeOnWorker(st: StageRow): boolean {
  return isOnWorker(st.status) || (st.status === "waiting_resources" && st.attempt > 0);
}

/** Tells the stage's worker to stop this attempt (through the outbox: delivered at least once). */
export function cancelOnWorker(c: Core, st: StageRow, now: number): void {
  c.outbox.enqueue({ kind: "worker_cancel", worker: st.worker, stageId: st.stage_id, attempt: st.attempt }, now);
}

/** When a lease ending at `expiresAt` is renewed: half of leaseMs before its end (the `lease` timer, a held grant's write). */
export function renewalDue(c: Core, expiresAt: number): number {
  return expiresAt - Math.floor(c.config.tuning.leaseMs / 2);
}

/** One attempt failed: settle what it used, then retry after a backoff or fail the stage and the execution. */
export function failAttempt(c: Core, st: StageRow, failure: StageFailure, now: number, usage?: Record<string, number>): void {
  const worked = st.processing_since !== null ? now - st.processing_since : 0;
  // Settled (every part, each to its shard) when granted; else whatever it holds or waits for is released.
  if (st.reservation !== "granted" || !settleUnit(c, st, usage ?? {}, worked, now, false)) releaseReservation(c, st, now);
  // Whenever the attempt ends on our side (a deadline, failed polls, a lost lease, refused data...), the
  // worker is told to stop; only a failure the worker reported itself needs no cancel.
  if (mayBeOnWorker(st) && !failure.fromWorker) cancelOnWorker(c, st, now);
  const info: ErrorInfo = { code: failure.code, message: failure.message, stage_id: st.stage_id };
  c.store.updateStage(st.stage_id, (cur) => ({
    last_error: JSON.stringify({ ...info, attempt: st.attempt }), usage: JSON.stringify(addUsage(parse(st.usage), usage)),
    processing_ms: cur.processing_ms + worked, processing_since: null, deadline_at: null, reservation: null, carry: null,
    waiting_ms: cur.waiting_ms + (st.waiting_since !== null ? now - st.waiting_since : 0), waiting_since: null,
  }));
  addToStage(c, st, usage);
  c.timers.clearUnit(st.stage_id);
  attemptEnded(c, st, failure.code, worked, usage, now);
  c.store.log("warn", "stage_attempt_failed", { stage_id: st.stage_id, attempt: st.attempt, code: failure.code, retryable: failure.retryable });
  if (shouldRetry(failure, st.attempt, st.max_attempts)) {
    moveStage(c, st, "pending", now, { message: `retrying after ${failure.code}` });
    const t = c.config.tuning;
    c.timers.set("retry", now + retryDelayMs(st.attempt, t.retryBaseMs, t.retryCapMs, failure.retryAfterMs), st.stage_id);
    return;
  }
  failExecutionAt(c, st, info, now);
}

/**
 * A stage or item failed for good: it fails (an item's stage with it), every
 * other stage and item still open is stopped (reservation released, worker
 * told to cancel; those downstream end `upstream_failed`), and the execution
 * fails with the error naming it.
 */
function failExecutionAt(c: Core, st: StageRow, info: ErrorInfo, now: number): void {
  moveStage(c, st, "failed", now, { error: info });
  const stage = st.parent === null ? st : c.store.stage(st.parent)!;
  if (stage !== st) moveStage(c, stage, "failed", now, { error: info });
  const downstream = descendants(c.store.stages(), stage.stage_id);
  for (const other of openUnits(c)) {
    const top = other.parent ?? other.stage_id;
    const code = downstream.has(top) ? "upstream_failed" : "execution_failed";
    stopUnit(c, other, "cancelled", now, { code, message: `${st.stage_id} failed` });
  }
  finishExecution(c, "failed", now, info);
}

/** Stage ids that depend on `stageId`, directly or through others. */
function descendants(stages: readonly StageRow[], stageId: string): Set<string> {
  const out = new Set<string>();
  const walk = (id: string) => {
    for (const s of stages) {
      if (!out.has(s.stage_id) && dependsOn(s).includes(id)) {
        out.add(s.stage_id);
        walk(s.stage_id);
      }
    }
  };
  walk(stageId);
  return out;
}

/** Every stage completed: the deliverable is the sinks' output (see steps.deliverable). */
export function completeExecution(c: Core, output: StoredOutput | null, now: number): void {
  finishExecution(c, "completed", now, null, { output: output?.inline ?? null, output_ref: output?.ref ? JSON.stringify(output.ref) : null });
}

/** `with`: what else the end changes of the row, in the same statement (written also when the execution cannot move, as before). */
export function finishExecution(c: Core, status: ExecutionStatus, now: number, error: ErrorInfo | null, with_: RowChange = {}): void {
  const ex = c.store.row()!;
  if (!canMoveExecution(ex.status, status)) {
    if (Object.keys(with_).length > 0) c.store.update(with_);
    return;
  }
  const stages = c.store.stages();
  const cost = costOf(
    stages.map((s) => ({ stage_id: s.stage_id, usage: parse<Record<string, number>>(s.usage) })),
    c.config.prices,
  );
  c.store.update({ ...with_, status, completed_at: now, started_at: ex.started_at ?? now, error: error ? JSON.stringify(error) : null, cost: JSON.stringify(cost) });
  c.timers.clearMany(["advance", "poll", "deadline", "lease", "reask", "retry", "approval", "watchdog", "queue", "execution", "slot", "part_deadline", "reacquire"]);
  // The client execution slot (or the place in its line) is given back by the execution's id, also when its answer never came.
  if (ex.slot !== null && ex.slot !== "free") c.outbox.enqueue({ kind: "slot_release", executionId: ex.execution_id }, now);
  indexUpdate(c, now);
  c.notifier.emit(`execution.${status as "completed" | "failed" | "cancelled"}`, {
    error,
    cost,
    ...(status === "completed" ? { result_url: `${c.config.publicUrl}/executions/${ex.execution_id}/result` } : {}),
  }, now);
  // Ended executions keep their data for the retention period, then their alarm deletes it.
  c.timers.set("retention", now + c.config.tuning.retentionMs);
  c.store.log(status === "failed" ? "warn" : "info", "execution_status", {
    status,
    error_code: error?.code,
    duration_ms: now - ex.created_at,
    cost_total: cost.total,
  });
  emit(c.env, {
    event: "execution_ended",
    ...metricFields(ex),
    outcome: status,
    code: error?.code ?? null,
    duration_ms: now - ex.created_at,
    cost: cost.total,
    tokens: stages.reduce((n, s) => n + tokensOf(parse<Record<string, number>>(s.usage)), 0),
  });
}

/**
 * One stage attempt ended (`completed` or its error code; `st` is its row before the end): its span is
 * recorded (spans.ts) and written as one data point with its worker and timings.
 */
export function attemptEnded(c: Core, st: StageRow, outcome: string, processingMs: number, usage: Record<string, number> | undefined, now: number): void {
  const ex = c.store.row()!;
  const cur = c.store.stage(st.stage_id)!;
  const trace = c.store.trace();
  const span = endedSpan(st, outcome, now);
  if (span) recordSpan(c.sql, span, tokensOf(usage));
  emit(c.env, {
    event: "stage_attempt",
    trace_id: trace?.trace_id,
    span_id: trace ? attemptSpanId(trace, st.stage_id, st.attempt) : undefined,
    parent_span_id: trace?.span_id,
    ...metricFields(ex, st),
    outcome,
    waiting_ms: cur.waiting_ms,
    handshake_ms: span ? phases(span, now).handshake_ms : 0,
    processing_ms: processingMs,
    tokens: tokensOf(usage),
  });
}

export function moveStage(c: Core, st: StageRow, to: StageStatus, now: number, extra: { error?: ErrorInfo; message?: string }): void {
  if (!checkMove(c, st, to)) return;
  const ended = isTerminalStage(to) ? now : null;
  c.store.updateStage(st.stage_id, (cur) => ({
    status: to,
    completed_at: ended ?? cur.completed_at,
    error: extra.error ? JSON.stringify(extra.error) : cur.error,
    message: extra.message ?? cur.message,
  }));
}

/**
 * A stage's move to `to`, checked and logged; false when it is there already. The caller
 * writes the status in the UPDATE it makes anyway (one row written, not two; moveStage for the rest).
 */
function checkMove(c: Core, st: StageRow, to: StageStatus): boolean {
  const cur = c.store.stage(st.stage_id)!;
  if (cur.status === to) return false;
  if (!canMoveStage(cur.status, to, isFanOut(cur))) throw new Error(`illegal stage transition ${cur.status} -> ${to} for ${st.stage_id}`);
  c.store.log("info", "stage_status", { stage_id: st.stage_id, attempt: cur.attempt, from: cur.status, to });
  c.changed();
  return true;
}

/** Every stage and item not yet ended. */
function openUnits(c: Core): StageRow[] {
  // Read in bulk, not through stage(): a held grant is written first, so a stopped stage is seen on its worker.
  c.grants.writeAll();
  return c.sql<StageRow>`SELECT * FROM stages WHERE status NOT IN ('completed', 'failed', 'cancelled') ORDER BY ord`;
}

/** Ends one stage or item: tells a worker that has it to cancel, gives back its reservation. */
function stopUnit(c: Core, st: StageRow, to: "cancelled" | "failed", now: number, error: ErrorInfo): void {
  if (mayBeOnWorker(st) && !isFanOut(st)) cancelOnWorker(c, st, now);
  releaseReservation(c, st, now);
  // An attempt stopped while it waited or ran ends here: its span and data point, with the stop's code.
  const inFlight = (st.status === "waiting_resources" || isOnWorker(st.status)) && !isFanOut(st);
  if (inFlight) attemptEnded(c, st, error.code, st.processing_since !== null ? now - st.processing_since : 0, undefined, now);
  moveStage(c, st, to, now, { error });
}

/** Ends every stage and item still open. */
export function stopStages(c: Core, to: "cancelled" | "failed", now: number, error: ErrorInfo): void {
  for (const st of openUnits(c)) stopUnit(c, st, to, now, error);
}

/** Stops the whole execution (cancel, or an object that cannot advance any more). */
export function stopExecution(c: Core, status: "cancelled" | "failed", now: number, stageError: ErrorInfo, error: ErrorInfo): void {
  stopStages(c, status, now, stageError);
  finishExecution(c, status, now, error);
}

/** Gives the stage's reservation back; a waiter whose reserve answer never arrived is released by its derived id. */
export function releaseReservation(c: Core, st: StageRow, now: number): void {
  releaseUnit(c, st, expectedReservationId(c, st), now);
  c.store.updateStage(st.stage_id, { reservation: null, carry: null });
}

/** A failed drive pass: counted, and retried by the `advance` timer after a backoff. */
export function driveFailed(c: Core, failures: number, now: number): void {
  c.store.update({ alarm_failures: failures });
  c.timers.set("advance", now + retryDelayMs(failures, c.config.tuning.retryBaseMs, c.config.tuning.retryCapMs));
}

/** Retention failed (a store did not answer): it runs again after a backoff, until it succeeds. */
export function retentionFailed(c: Core, err: unknown, now: number): void {
  const t = c.config.tuning;
  c.store.log("warn", "retention_failed", { error: String(err) });
  c.timers.set("retention", now + retryDelayMs(3, t.outboxRetryMs, t.outboxRetryCapMs) + t.outboxRetryMs);
}

/** Retention ran: the execution's inline outputs and data records go; the summary stays. */
export function dataExpired(c: Core, now: number): void {
  c.store.update({ data_expired_at: now, output: null, output_ref: null });
  c.sql`UPDATE stages SET output = NULL, output_ref = NULL`;
  c.sql`DELETE FROM data_objects`;
}

/**
 * Sends this execution's summary to the execution index (through the outbox).
 * Every summary carries a version, and the index ignores older ones, so they
 * may arrive in any order and more than once.
 */
export function indexUpdate(c: Core, now: number): void {
  const ex = c.store.row()!;
  const version = ex.index_version + 1;
  c.store.update({ index_version: version });
  // An ended execution's entry also carries its completed attempts, for the latency charts.
  const attempts = isTerminalExecution(ex.status) ? indexAttempts(c.sql) : undefined;
  c.outbox.enqueue({ kind: "index_upsert", entry: indexEntry(ex, c.store.stages(), now, version, attempts) }, now);
  c.changed();
}

/** The execution needs its client execution slot before its first stage starts (docs/ledger.md, "Execution slots"). */
export function needsSlot(ex: ExecutionRow): boolean {
  return ex.status === "queued" && ex.slot !== "granted" && ex.slot !== "free";
}

/**
 * The ledger's answer to an acquireSlot (null: the call failed; ask again
 * after a backoff). Waiting, the execution stays `queued` and asks again at
 * `ledgerReaskMs` in case the slot notice is lost; its deadline is the
 * execution's own (`execution_timeout_ms`).
 */
export function slotAnswered(c: Core, r: SlotResult | null, now: number): void {
  const t = c.config.tuning;
  if (!r) {
    // The ledger is slow or down: ask again after a backoff that grows with each failure in a row.
    const failures = c.store.row()!.slot_failures + 1;
    c.store.update({ slot_failures: failures });
    c.timers.set("slot", now + retryDelayMs(failures, t.retryBaseMs, t.retryCapMs));
    return;
  }
  // Written only when there were failures (the row is in memory): a write that changes nothing still costs a statement.
  // One write for the reset and the answer; the answer only over a slot still asked or waiting (as the statement's condition was).
  const ex = c.store.row()!;
  const reset: RowChange = ex.slot_failures !== 0 ? { slot_failures: 0 } : {};
  const open = ex.slot === "asked" || ex.slot === "waiting";
  if (r.status === "granted") {
    if (open) c.store.update({ ...reset, slot: r.counted ? "granted" : "free", slot_wait: null, client_weight: r.weight ?? null });
    else if (reset.slot_failures === 0) c.store.update(reset);
    c.timers.clear("slot");
    return;
  }
  if (open) c.store.update({ ...reset, slot: "waiting", slot_wait: JSON.stringify(r.waitingOn) });
  else if (reset.slot_failures === 0) c.store.update(reset);
  c.timers.set("slot", now + t.ledgerReaskMs);
  c.store.log("info", "execution_slot_waiting", { position: r.waitingOn.position });
}

/** A slot notice from the ledger: the waiting execution holds its slot now. Returns true when a drive pass should run. */
export function slotGranted(c: Core): boolean {
  const ex = c.store.row();
  if (!ex || (ex.slot !== "waiting" && ex.slot !== "asked")) return false;
  c.store.update({ slot: "granted", slot_wait: null });
  c.timers.clear("slot");
  return true;
}
