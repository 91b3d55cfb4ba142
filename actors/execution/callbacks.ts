import type { StageStatus } from "../../schemas/api";
import type { DataReference } from "../../schemas/data";
import type { CompleteCallback, FailCallback, ProgressCallback } from "../../schemas/worker-protocol";
import { sha256Hex } from "../../src/hash";
import { retryAfterOf } from "../../src/pacing";
import { type StageFailure, isOnWorker, lostGrantReaskAt } from "../stage-machine";
import * as step from "./steps";
import { type Core, type StoredOutput, isFanOut } from "./store";
import * as tx from "./transitions";

/**
 * What a stage's worker sends back: callbacks (progress, complete, fail) and
 * uploads, each already authenticated by its token (execution, stage, attempt).
 * The checks and the transition they allow are one synchronous step.
 */

export type CallbackKind = "progress" | "complete" | "fail";
export type UploadCheck = { ok: true } | { ok: false; code: string; message: string };
export interface CallbackAnswer {
  status: 200 | 404 | 409 | 422;
  body: { ok: true; stage_status: StageStatus; duplicate?: boolean } | { error: { code: string; message: string } };
}

/**
 * Either the answer (nothing for a drive pass to do; `regrant`: but a pass should ask the ledger
 * now), or `moved`: the stage changed and a pass should run before answering.
 */
export type CallbackOutcome = { answer: CallbackAnswer; regrant?: boolean } | { moved: true };

export async function applyCallback(
  c: Core,
  kind: CallbackKind,
  stageId: string,
  attempt: number,
  body: ProgressCallback | CompleteCallback | FailCallback,
): Promise<CallbackOutcome> {
  const hash = kind === "complete" ? await sha256Hex(JSON.stringify(body)) : null;
  const early = refuseCallback(c, kind, stageId, attempt, hash);
  if (early) return { answer: early, regrant: askAgainIfLost(c, stageId, attempt) };
  if (kind !== "progress") {
    // Usage out of bounds is refused before anything is stored or charged; the stage goes on.
    const usage = (body as CompleteCallback | FailCallback).usage;
    const problem = tx.usageProblem(c, c.store.stage(stageId)!, usage);
    if (problem) {
      c.store.log("error", "usage_refused", { stage_id: stageId, attempt, kind, problem, usage });
      return { answer: { status: 422, body: { error: { code: "usage_out_of_bounds", message: problem } } } };
    }
  }
  // A large inline output is stored (KV or R2) before the transition; then the
  // checks run again, since the stage may have moved during the await.
  let stored: StoredOutput | StageFailure | null = null;
  if (kind === "complete") {
    const done = body as CompleteCallback;
    stored = await step.storeOutput(c, stageId, attempt, done.output, done.dataReference);
    const again = refuseCallback(c, kind, stageId, attempt, hash);
    if (again) return { answer: again };
  }
  // From here to the end: synchronous, so the checks and the transition are one atomic step.
  // A grant still held (grant.ts) is written first; a complete or fail ends the attempt in this step, so without its timers.
  c.grants.writeOne(stageId, kind !== "progress");
  const st = tx.asProcessing(c, c.store.stage(stageId)!);
  const now = Date.now();
  c.store.log("info", "callback", { stage_id: stageId, attempt, kind });
  if (kind === "progress") {
    const p = body as ProgressCallback;
    tx.progressCallback(c, st, p.progress, p.message);
    return { answer: { status: 200, body: { ok: true, stage_status: st.status } } };
  }
  if (kind === "complete") {
    const done = body as CompleteCallback;
    if (stored && "code" in stored) tx.failAttempt(c, st, stored, now, done.usage);
    else tx.completeStage(c, st, stored!, done.usage, now, hash);
  } else {
    const f = body as FailCallback;
    // A provider's retry-after (a 429) sets the earliest retry instead of the generic backoff alone.
    const failure = { code: f.error.code, message: f.error.message, retryable: f.retryable ?? false, retryAfterMs: retryAfterOf(f.rate_limits), fromWorker: true };
    tx.failAttempt(c, st, failure, now, f.usage);
  }
  return { moved: true };
}

/**
 * A callback of the current attempt of a stage stored as waiting for resources: its handshake went
 * out on a grant held in memory (grant.ts) by an instance that is gone. The callback is refused
 * (409, the stage is not on a worker as stored) and the ledger asked again now rather than at the
 * watchdog: the same reservation id gets the same grant, the worker answers the replayed handshake
 * and process as the first, and a progress poll takes the result.
 */
function grantLost(c: Core, stageId: string, attempt: number): boolean {
  const st = c.store.stage(stageId);
  return !!st && st.status === "waiting_resources" && st.attempt === attempt;
}

/**
 * For a callback or upload refused in that window (grantLost): makes the stage's re-ask due now and
 * says whether a pass should run. The pass asks at once whatever the stage's last answer was (one
 * that queued first has a `reask` timer, its lost notice's or the one set before the re-ask that was
 * granted, due later), but not within the backoff after a failed ledger call (lostGrantReaskAt).
 */
export function askAgainIfLost(c: Core, stageId: string, attempt: number): boolean {
  if (!grantLost(c, stageId, attempt)) return false;
  const st = c.store.stage(stageId)!;
  const at = lostGrantReaskAt(c.timers.dueAt("reask", stageId), st.ledger_failures, Date.now());
  if (at === null) return false;
  c.timers.set("reask", at, stageId);
  return true;
}

const WAITING_MESSAGE = "the stage is waiting for resources; its grant is being asked for again";

/** Why a callback cannot act now (404/409), or null when it may. Synchronous. */
function refuseCallback(c: Core, kind: CallbackKind, stageId: string, attempt: number, hash: string | null): CallbackAnswer | null {
  const ex = c.store.row();
  const st = ex ? c.store.stage(stageId) : null;
  if (!ex || !st) return { status: 404, body: { error: { code: "not_found", message: "no such execution or stage" } } };
  // A fan-out stage runs on no worker itself: its items do, under their own ids.
  if (isFanOut(st)) return { status: 404, body: { error: { code: "not_found", message: `${stageId} runs as items (${stageId}.{i}); no worker holds it` } } };
  const conflict = (code: string, message: string): CallbackAnswer => ({ status: 409, body: { error: { code, message } } });
  if (ex.status === "cancelled" || st.status === "cancelled") return conflict("execution_cancelled", "the execution was cancelled");
  if (attempt !== st.attempt) return conflict("stale_attempt", `this token is for attempt ${attempt}; the stage is on attempt ${st.attempt}`);
  if (st.status === "completed") {
    if (kind === "complete" && hash === st.complete_hash) return { status: 200, body: { ok: true, stage_status: st.status, duplicate: true } };
    return conflict("stage_ended", "the stage has already completed");
  }
  // Stored waiting for resources, this attempt has not ended: its grant was held by an instance since lost (grantLost).
  if (st.status === "waiting_resources") return conflict("stage_waiting", WAITING_MESSAGE);
  if (!isOnWorker(st.status)) return conflict("stage_ended", `the stage is ${st.status}`);
  return null;
}

/**
 * Whether a worker may upload for this stage and attempt now (asked before any byte is written, and
 * again when the upload is recorded). In the lost-grant window (grantLost) the answer is
 * `stage_waiting`, as for a callback: the worker tries again later, when the replayed attempt is on
 * it as stored; `stage_ended` would make it give the attempt up (the caller asks the ledger again).
 */
export function uploadCheck(c: Core, stageId: string, attempt: number): UploadCheck {
  const st = c.store.stage(stageId);
  if (grantLost(c, stageId, attempt)) return { ok: false, code: "stage_waiting", message: WAITING_MESSAGE };
  if (!st || st.attempt !== attempt || !isOnWorker(st.status)) {
    return { ok: false, code: "stage_ended", message: "the stage is not running this attempt" };
  }
  return { ok: true };
}

/** Records an upload so a later `complete` may name it: the check and the record are one synchronous step; a key already recorded is never replaced. */
export function registerUpload(c: Core, stageId: string, attempt: number, ref: DataReference, now: number): UploadCheck {
  const refused = uploadCheck(c, stageId, attempt);
  if (!refused.ok) return refused;
  if (!tx.recordObject(c, ref, stageId, attempt, now)) {
    return { ok: false, code: "data_exists", message: `${ref.key} is already recorded` };
  }
  return { ok: true };
}
