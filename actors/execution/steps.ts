import type { DataReference } from "../../schemas/data";
import type { ReserveResult, SlotResult } from "../../schemas/ledger";
import type { ProgressResponse } from "../../schemas/worker-protocol";
import { reportRateLimits, retryAfterOf } from "../../src/pacing";
import { issueStageTokens } from "../../src/auth";
import { DATA_LIMITS, deleteExecutionData, putBytes, readText, verifyStored } from "../../src/data-store";
import { estimateTotalMs } from "../../src/estimates";
import { uploadNonce } from "../../src/ids";
import { layoutOf, ledgerForClient, ledgerShard } from "../../src/ledger-routing";
import { TimeoutError, withTimeout } from "../../src/outbound";
import { loadTemplate } from "../../src/template-source";
import { WorkerClient } from "../../src/worker-client";
import { type StageFailure, isOnWorker, isTerminalExecution, isTerminalStage } from "../stage-machine";
import { askParts, renewParts, routeOf } from "./acquire";
import { chainAfter, chainCut, useCarry } from "./chain";
import { fanOutItems, sinks } from "./graph";
import { isSharded, multiOf, workerShard } from "./parts";
import { type Core, type StageRow, type StoredOutput, dependsOn, isFanOut, outputAsInput, parse } from "./store";
import type { InputRead } from "./rpc-types";
import * as tx from "./transitions";

/**
 * One awaited step per stage state. Each makes its outbound call, then
 * re-reads the stage and applies the answer (through `transitions`) only if
 * the stage is still in the state and attempt that made the call: a callback
 * that arrived meanwhile wins. Each returns true when it changed something and
 * the drive loop should go on, false when the stage now waits for an event or a timer.
 */

/** The bound on one KV or R2 call inside a drive pass. */
const storageMs = (c: Core) => c.config.tuning.storageCallTimeoutMs;

export async function loadTemplateStep(c: Core): Promise<boolean> {
  const ex = c.store.row()!;
  if (ex.template_id || isTerminalExecution(ex.status)) return true;
  const res = await loadTemplate(c.env, ex.template_name);
  const now = Date.now();
  const cur = c.store.row()!;
  if (cur.template_id || isTerminalExecution(cur.status)) return true;
  const attempts = cur.template_attempts + 1;
  if (res.ok) {
    tx.createStages(c, res.template, res.source);
    // The completion estimate (a ledger call, bounded by its timeout) goes out beside the first stage.
    void estimateCompletion(c).catch((err) => c.store.log("warn", "estimate_failed", { error: String(err) }));
    return true;
  }
  if (res.retryable && attempts < c.config.tuning.kamMaxAttempts) {
    tx.templateRetry(c, attempts, res.code, now);
    return false;
  }
  tx.templateFailed(c, attempts, { code: res.code, message: res.message }, now);
  return false;
}

export async function estimateCompletion(c: Core): Promise<void> {
  const ex = c.store.row()!;
  const stages = c.store
    .stages()
    .filter((s) => s.kind !== "approval")
    .map((s) => ({ worker: s.worker, resources: parse<Record<string, number>>(s.resources) ?? undefined }));
  const totalMs = await estimateTotalMs(c.env, stages, ex.priority);
  // No commit of its own: the slot's answer or the first stage's writes come right after.
  const at = ex.created_at + Math.round(totalMs);
  c.grants.deferWrite(() => c.store.update({ estimated_completion_at: at }));
}

/**
 * The client's execution slot (max_running_executions), taken before the
 * first stage (docs/ledger.md, "Execution slots"). `asked` is written before
 * the call, so the execution releases the slot by its id when it ends even if
 * the answer never arrives.
 */
export async function askSlot(c: Core): Promise<void> {
  const ex = c.store.row()!;
  // Again only when its timer is due, or after a crash between writing `asked` and the answer (no timer then).
  const again = c.timers.has("slot") ? c.timers.take("slot") : ex.slot === "asked";
  if (ex.slot !== null && !again) return;
  if (ex.slot === null) c.store.update({ slot: "asked" });
  let r: SlotResult | null = null;
  try {
    r = await withTimeout<SlotResult>(ledgerForClient(c.env, ex.client_id).acquireSlot(ex.client_id, ex.execution_id), c.config.tuning.ledgerCallTimeoutMs, "ledger.acquireSlot");
  } catch (err) {
    c.store.log("warn", "ledger_slot_failed", { error: String(err) });
  }
  const now = c.store.row()!;
  if (!tx.needsSlot(now)) return; // ended, or the notice came first
  tx.slotAnswered(c, r, Date.now());
}

export async function askLedger(c: Core, st: StageRow): Promise<boolean> {
  const id = st.stage_id;
  // Handed a chain grant by the stage before it: held at once, no ledger call (chain.ts).
  if (useCarry(c, st, Date.now())) return true;
  // Sharded: a stage whose needs span shards acquires them part by part (acquire.ts); one that does not takes today's path to its shard.
  let shard = 0;
  let requirements = parse<Record<string, number>>(st.resources) ?? undefined;
  if (isSharded(layoutOf(c.env))) {
    const multi = multiOf(c, st);
    if (multi) return askParts(c, st, multi);
    if (!waitedEnough(c, st)) return false;
    const route = await routeOf(c, st);
    if (!route) return false;
    if (route.kind === "multi") return askParts(c, c.store.stage(id)!, route.acquisition);
    ({ shard, requirements } = route);
  } else if (!waitedEnough(c, st)) return false;
  const ex = c.store.row()!;
  const ledger = ledgerShard(c.env, shard);
  const t = c.config.tuning;
  const request = {
    executionId: ex.execution_id,
    stageId: st.stage_id,
    attempt: st.attempt,
    priority: ex.priority,
    requirements,
    leaseMs: t.leaseMs,
    worker: st.worker,
    // The client's quotas and fair share apply to the reservation (docs/ledger.md, "Clients").
    clientId: ex.client_id,
    // The stages after it on the same worker, granted with it when all of it fits now (docs/ledger.md, "Chain grants").
    chain: chainAfter(c, st),
  };
  // The previous stage's settle, if still held for this shard, goes in the same call.
  const ride = c.outbox.takeHeld(shard);
  let result: ReserveResult;
  try {
    if (ride) {
      const { reservationId, usage, durationMs, stages } = ride.item;
      const both = await withTimeout(ledger.settleAndReserve({ reservationId, usage, durationMs, ...(stages ? { stages } : {}) }, request), t.ledgerCallTimeoutMs, "ledger.settleAndReserve");
      c.outbox.settled(ride, both.settled);
      result = both.reserved;
    } else {
      result = await withTimeout<ReserveResult>(ledger.reserve(request), t.ledgerCallTimeoutMs, "ledger.reserve");
    }
  } catch (err) {
    // Whether the settle got through is unknown: it goes again on its own (settles are idempotent).
    if (ride) c.outbox.settled(ride, null);
    // The ledger is slow or down: keep waiting, ask again after a growing backoff with jitter.
    c.store.log("warn", "ledger_reserve_failed", { stage_id: st.stage_id, attempt: st.attempt, error: String(err) });
    const cur = c.store.stage(st.stage_id);
    if (cur && c.store.stillAt(st, "waiting_resources")) tx.ledgerFailed(c, cur, Date.now());
    return false;
  }
  const now = Date.now();
  const cur = c.store.stage(st.stage_id)!;
  if (result.status === "ended") {
    if (cur.status === "waiting_resources" && cur.attempt === st.attempt) {
      // The grant was made and expired before this attempt could use it (its notice was lost for a whole
      // lease): this attempt cannot get it back, so it fails as transient and the next one asks anew.
      tx.failAttempt(c, cur, { code: "lease_expired", message: "the reservation expired before the stage started", retryable: true }, now);
    }
    return true;
  }
  if (result.status === "invalid") {
    // The ledger refuses the request itself (typed, not thrown): asking again can never help, so the
    // attempt fails for good instead of backing off like a ledger that is down. No reservation was made.
    if (c.store.stillAt(st, "waiting_resources")) {
      tx.ledgerAnswered(c, cur, "refused", parse<Record<string, number>>(st.resources) ?? {}, result.code, 0);
      tx.failAttempt(c, cur, { code: "invalid_request", message: `the ledger refused the reservation request: ${result.message}`, retryable: false }, now);
    }
    return true;
  }
  if (cur.status !== "waiting_resources" || cur.attempt !== st.attempt) {
    // Moved on meanwhile (cancelled, or a grant notice overtook this answer).
    if (cur.reservation_id !== result.reservationId || isTerminalStage(cur.status)) {
      c.outbox.enqueue({ kind: "ledger_release", shard, reservationId: result.reservationId }, now);
    }
    return true;
  }
  if (result.status === "granted") {
    // Held in memory, not written: the handshake goes out without a commit of its own. The grant is
    // written by the next write (the callback, `processing`, a failure; grant.ts HeldGrants). Lost
    // with the instance, it is asked for again under the same reservation id and given again.
    const renewAt = tx.renewalDue(c, result.expiresAt);
    const chain = result.chain?.length ? { chain: result.chain } : {};
    c.grants.hold({ stage_id: id, attempt: st.attempt, reservationId: result.reservationId, expiresAt: result.expiresAt, requirements: result.requirements, at: now, renewAt, ...chain });
    return true;
  }
  tx.reserved(c, st, result.reservationId, now);
  if (result.status === "waiting") {
    tx.waitForGrant(c, st, result.position, now, result.waitingOn);
    return false;
  }
  tx.ledgerAnswered(c, st, "refused", parse<Record<string, number>>(st.resources) ?? {}, result.code, 0);
  tx.failAttempt(c, c.store.stage(st.stage_id)!, { code: result.code, message: result.message, retryable: false }, now);
  return true;
}

/** A waiting reservation asks again only at its `reask` timer (a lost notice); a failed call only after its backoff. */
function waitedEnough(c: Core, st: StageRow): boolean {
  if (st.reservation === "waiting") {
    if (!c.timers.take("reask", st.stage_id)) return false;
    // Asked again if this object dies mid-call: a grant in the lost answer comes with no notice.
    c.timers.set("reask", Date.now() + 2 * c.config.tuning.ledgerCallTimeoutMs, st.stage_id);
    return true;
  }
  if (st.reservation === "requested" && c.timers.has("reask", st.stage_id) && !c.timers.take("reask", st.stage_id)) return false;
  return true;
}

export async function handshake(c: Core, st: StageRow): Promise<boolean> {
  const ex = c.store.row()!;
  const now = Date.now();
  const client = WorkerClient.for(c.env, st.worker, c.store.traceHeaders(st.stage_id, st.attempt));
  if (!client) {
    tx.failAttempt(c, st, { code: "worker_not_bound", message: `no service binding serves worker ${st.worker} (see WORKER_BINDINGS)`, retryable: false }, now);
    return true;
  }
  // An item's inputs are its fan-out stage's: the dependencies' outputs, whole.
  const deps = dependenciesOf(c, st);
  for (const dep of deps) {
    const ref = parse<DataReference>(dep.output_ref);
    if (!ref) continue;
    // A large input is handed over by reference; check it is whole before a worker spends time on it.
    const check = await withTimeout(verifyStored(c.env, ref), storageMs(c), "data.verify").catch((err) => ({ ok: "unknown" as const, reason: String(err) }));
    if (check.ok === "unknown") {
      // The store did not answer in time: a transient failure of this attempt, not corrupt data.
      if (c.store.stillAt(st, "handshaking")) tx.failAttempt(c, st, { code: "data_unavailable", message: `input of ${st.stage_id}: ${check.reason}`, retryable: true }, Date.now());
      return true;
    }
    if (!c.store.stillAt(st, "handshaking")) return true;
    if (!check.ok) {
      tx.failAttempt(c, st, { code: "data_corrupt", message: `input of ${st.stage_id} from ${dep.stage_id}: ${check.reason}`, retryable: false }, Date.now());
      return true;
    }
  }
  const prev = deps.length === 1 ? deps[0] : null;
  const prevRef = prev ? parse<DataReference>(prev.output_ref) : null;
  const inputs = Object.fromEntries(deps.map((d) => [d.stage_id, outputAsInput(d)]));
  const item = st.parent !== null ? { item: parse<unknown>(st.item), item_index: st.item_index! } : {};
  const requirements = parse<Record<string, number>>(st.requirements) ?? {};
  const estimatedTokens = Object.entries(requirements)
    .filter(([pool]) => pool.startsWith("tokens:"))
    .reduce((sum, [, v]) => sum + v, 0);
  const { token, dataToken } = await issueStageTokens(c.env, {
    executionId: ex.execution_id,
    stageId: st.stage_id,
    attempt: st.attempt,
    timeoutMs: st.timeout_ms,
  });
  const hs = await client.handshake({
    executionId: ex.execution_id,
    stageId: st.stage_id,
    attempt: st.attempt,
    action: st.action,
    inputData: {
      parameters: JSON.parse(ex.parameters),
      template_ref: st.template_ref,
      // By reference, previousOutput is a small summary and dataReference says where the bytes are.
      previousOutput: prev ? outputAsInput(prev) : null,
      inputs,
      ...item,
    },
    dataReference: prevRef ?? undefined,
    resourceRequirements: { estimatedTokens, timeoutMs: st.timeout_ms, pools: requirements },
    validationConfig: {},
    callback: { url: `${c.config.publicUrl}/executions/${ex.execution_id}/stages/${st.stage_id}`, token, dataToken },
  }, handshakingLeftMs(st));
  c.store.logCall("worker_handshake", st, hs.ms, hs.ok ? (hs.value.accepted ? "accepted" : "refused") : hs.error.code);
  if (!c.store.stillAt(st, "handshaking")) return true;
  if (!hs.ok) {
    tx.failAttempt(c, st, handshakingFailure(c, st, hs.error), Date.now());
    return true;
  }
  if (!hs.value.accepted) {
    const reason = hs.value.reason ?? "no reason given";
    tx.failAttempt(c, st, { code: "handshake_refused", message: `worker refused the stage: ${reason}`, retryable: hs.value.retryable ?? false }, Date.now());
    return true;
  }
  const calling = client.process({ executionId: ex.execution_id, stageId: st.stage_id, attempt: st.attempt }, handshakingLeftMs(st));
  void calling.then((r) => c.store.logCall("worker_process", st, r.ms, r.ok ? "ok" : r.error.code));
  // A fast worker may call back `complete` before process() answers: the pass goes on at once (in the
  // callback's turn, so the next stage's start shares its commit); the answer no longer matters.
  const pr = await Promise.race([calling, whileHandshaking(c, st, calling)]);
  if (pr === null || !c.store.stillAt(st, "handshaking")) return true;
  const at = Date.now();
  if (!pr.ok) {
    tx.failAttempt(c, st, handshakingFailure(c, st, pr.error), at);
    return true;
  }
  // `processing` (a commit, its deadline and poll timers, maybe an alarm) is written only for a worker
  // that has not called back within `pollInitialMs`, when its first poll would be due anyway (with the
  // grant, if it is still held). Until then the stage stays `handshaking` under that deadline; a crash
  // meanwhile replays the handshake and process, idempotent per attempt (docs/reliability.md).
  const key = `${st.stage_id}#${st.attempt}`;
  c.accepted.set(key, at);
  const until = at + c.config.tuning.pollInitialMs;
  try {
    while (c.store.stillAt(st, "handshaking") && Date.now() < until) await c.nextChange(until - Date.now());
  } finally {
    c.accepted.delete(key);
  }
  if (!c.store.stillAt(st, "handshaking")) return true;
  tx.startProcessing(c, st, at);
  return true;
}

/** Resolves null once the stage has left `handshaking` (a callback ended it), or when `call` has answered. */
async function whileHandshaking(c: Core, st: StageRow, call: Promise<unknown>): Promise<null> {
  let answered = false;
  void call.finally(() => {
    answered = true;
  });
  // Woken by every change of the status document; the quantum bounds a wait that outlives the call.
  while (!answered && c.store.stillAt(st, "handshaking")) await c.nextChange(c.config.tuning.pollInitialMs);
  return null;
}

/**
 * What is left of the handshaking deadline bounds the handshake and process calls: the drive pass
 * awaits them, so the deadline's alarm cannot end the attempt while one is still out.
 */
function handshakingLeftMs(st: StageRow): number | undefined {
  return st.deadline_at === null ? undefined : Math.max(1, st.deadline_at - Date.now());
}

/** A call cut short by the handshaking deadline fails the attempt as the deadline does, `handshake_timeout`. */
function handshakingFailure(c: Core, st: StageRow, error: StageFailure): StageFailure {
  if (st.deadline_at === null || Date.now() < st.deadline_at) return error;
  return handshakeTimeout(c);
}

export function handshakeTimeout(c: Core): StageFailure {
  return { code: "handshake_timeout", message: `handshake and process took longer than ${c.config.tuning.handshakeTimeoutMs} ms`, retryable: true };
}

export async function poll(c: Core, st: StageRow): Promise<boolean> {
  const ex = c.store.row()!;
  const client = WorkerClient.for(c.env, st.worker, c.store.traceHeaders(st.stage_id, st.attempt));
  if (!client) {
    tx.failAttempt(c, st, { code: "worker_not_bound", message: `no service binding serves worker ${st.worker}`, retryable: false }, Date.now());
    return true;
  }
  tx.pollSent(c, st);
  const res = await client.progress(ex.execution_id, st.stage_id);
  if (res.ok) await reportRateLimits(c.env, res.value.rate_limits, { execution_id: ex.execution_id, stage_id: st.stage_id });
  c.store.logCall("worker_progress", st, res.ms, res.ok ? res.value.status : res.error.code);
  if (!c.store.stillAt(st, "processing")) return true;
  const now = Date.now();
  const cur = c.store.stage(st.stage_id)!;
  if (!res.ok) {
    return tx.pollFailed(c, cur, res.error, now);
  }
  return await applyProgress(c, cur, res.value, now);
}

async function applyProgress(c: Core, st: StageRow, p: ProgressResponse, now: number): Promise<boolean> {
  if (p.status === "completed" || p.status === "failed") {
    const problem = tx.usageProblem(c, st, p.usage);
    if (problem) {
      // A result whose usage cannot be charged is not taken: the attempt fails, nothing is charged.
      c.store.log("error", "usage_refused", { stage_id: st.stage_id, attempt: st.attempt, via: "poll", problem, usage: p.usage });
      tx.failAttempt(c, st, { code: "usage_out_of_bounds", message: problem, retryable: false }, now);
      return true;
    }
  }
  if (p.status === "completed") {
    const stored = await storeOutput(c, st.stage_id, st.attempt, p.output, p.dataReference);
    if (!c.store.stillAt(st, "processing")) return true;
    const cur = c.store.stage(st.stage_id)!;
    if ("code" in stored) tx.failAttempt(c, cur, stored, Date.now(), p.usage);
    else tx.completeStage(c, cur, stored, p.usage, Date.now(), null);
    return true;
  }
  if (p.status === "failed") {
    const e = p.error ?? { code: "worker_failed", message: "the worker reported a failure without details" };
    // A provider's retry-after reported with the failure: the retry waits for it, as from a fail callback.
    tx.failAttempt(c, st, { code: e.code, message: e.message, retryable: p.retryable ?? false, retryAfterMs: retryAfterOf(p.rate_limits), fromWorker: true }, now, p.usage);
    return true;
  }
  tx.progressed(c, st, p.progress, p.message, now);
  return false;
}

/** Polls are the lease heartbeat; the `lease` timer covers stages that report only by callback. */
export async function renewLease(c: Core, st: StageRow): Promise<void> {
  // A multi-shard stage renews every part, each on its shard (acquire.ts renewParts).
  const multi = multiOf(c, st);
  const reservationId = st.reservation_id;
  if (!reservationId && !multi) return;
  const t = c.config.tuning;
  // The next try if this object dies mid-call (the due timer was taken); an answer sets it anew.
  const retry = () => c.timers.set("lease", Date.now() + Math.min(t.ledgerRetryCapMs, Math.max(250, Math.floor(t.leaseMs / 4))), st.stage_id);
  const current = () => {
    const now = c.store.stage(st.stage_id);
    return now && now.attempt === st.attempt && isOnWorker(now.status) ? now : null;
  };
  retry();
  try {
    const r = multi
      ? await renewParts(c, multi, c.store.row()!.execution_id)
      : await withTimeout(ledgerShard(c.env, workerShard(layoutOf(c.env), st.worker)).renew(reservationId!, t.leaseMs), t.ledgerCallTimeoutMs, "ledger.renew");
    // Still this attempt on the worker (it may have gone from handshaking to processing meanwhile)?
    const now = current();
    if (!now) return;
    if (r.ok && r.expiresAt) {
      tx.leaseRenewed(c, st, r.expiresAt);
      // A cut whose notice was lost: the renew's answer tells it too.
      if ("chainCut" in r && r.chainCut && reservationId) chainCut(c, reservationId);
    } else {
      // The ledger no longer honours the lease (it expired while we could not reach it): the
      // slot may be someone else's now, so the work stops; the worker is told to cancel.
      c.store.log("warn", "lease_lost", { stage_id: st.stage_id, attempt: st.attempt, state: r.state });
      tx.failAttempt(c, now, { code: "lease_lost", message: `the ledger no longer holds this stage's lease (${r.state})`, retryable: true }, Date.now());
    }
  } catch (err) {
    c.store.log("warn", "lease_renew_failed", { stage_id: st.stage_id, error: String(err) });
    // Tried again well inside the lease, so one failed call does not lose it; not for an attempt that
    // ended during the call (its end cleared its timers; nothing takes a lease timer of a stage off its worker).
    if (current()) retry();
  }
  await c.rearm().catch(() => {});
}

/** The stages a stage (or an item, through its fan-out stage) waits for, in stage order. */
function dependenciesOf(c: Core, st: StageRow): StageRow[] {
  const stage = st.parent === null ? st : c.store.stage(st.parent)!;
  const ids = new Set(dependsOn(stage));
  return c.store.stages().filter((s) => ids.has(s.stage_id));
}

/**
 * The record of `key` when it is a stored input of `stageId` (a stage or an item) at `attempt`,
 * the only keys that attempt's data token reads (`GET /data/...`): each dependency's stored
 * output, and each stored item output of a fan-out dependency (its output names them as
 * `{ $ref }`, inline or inside its own stored array). An approval passes its own dependencies'
 * outputs on unchanged, so through it their keys count. Nothing else: not the stage's own
 * output, not a sibling item's, not another execution's (the token names its execution, and
 * only that Execution is asked). Asked here rather than listed in the token, so the token's
 * size does not grow with the inputs (a merge after 1,000 stored items would carry ~108 KB).
 */
export function inputRead(c: Core, stageId: string, attempt: number, key: string): InputRead {
  const st = c.store.stage(stageId);
  // A superseded attempt's token reads nothing: its worker was replaced.
  if (!st || st.attempt !== attempt || !receives(c, dependenciesOf(c, st), key)) return { state: "not_input" };
  const ref = c.store.dataRef(key);
  return ref ? { state: "ok", ref } : { state: "gone" };
}

function receives(c: Core, deps: StageRow[], key: string): boolean {
  for (const dep of deps) {
    if (parse<DataReference>(dep.output_ref)?.key === key) return true;
    if (isFanOut(dep) && c.store.itemStored(dep.stage_id, key)) return true;
    // The graph is acyclic (graph.ts), so this ends.
    if (dep.kind === "approval" && receives(c, dependenciesOf(c, dep), key)) return true;
  }
  return false;
}

/** A completed stage's output value, read back from KV or R2 when it was stored by reference. */
async function outputValue(c: Core, st: StageRow): Promise<unknown> {
  const ref = parse<DataReference>(st.output_ref);
  if (!ref) return parse(st.output);
  const text = await withTimeout(readText(c.env, ref), storageMs(c), "data.read");
  if (text === null) throw new Error(`output of ${st.stage_id} (${ref.key}) is missing from storage`);
  return JSON.parse(text);
}

/**
 * A fan-out stage whose dependency completed: the list at its `for_each`
 * pointer becomes its items (or the stage fails with `fan_out_invalid`).
 */
export async function expandFanOut(c: Core, st: StageRow): Promise<void> {
  const [dep] = dependenciesOf(c, st);
  let value: unknown;
  try {
    value = await outputValue(c, dep);
  } catch (err) {
    // A store that did not answer in time is transient: the pass fails and is retried (driveFailed), the list read again.
    if (err instanceof TimeoutError) throw err;
    if (!c.store.stillAt(st, "pending")) return;
    tx.fanOutInvalid(c, st, `the output of ${dep.stage_id} cannot be read as JSON: ${err instanceof Error ? err.message : String(err)}`, Date.now());
    return;
  }
  if (!c.store.stillAt(st, "pending")) return;
  const found = fanOutItems(value, st.for_each!, c.config.tuning.maxFanOutItems);
  if (found.ok) tx.expandFanOut(c, st, found.items, Date.now());
  else tx.fanOutInvalid(c, st, found.reason, Date.now());
}

/** Every item of a fan-out stage completed: their outputs, in item order, become its output. */
export async function fanIn(c: Core, st: StageRow): Promise<void> {
  const outputs = c.store.items(st.stage_id).map(outputAsInput);
  const stored = await storeOutput(c, st.stage_id, 0, outputs, undefined);
  if (!c.store.stillAt(st, "processing")) return;
  if ("code" in stored) tx.fanOutInvalid(c, st, stored.message, Date.now());
  else tx.completeFanOut(c, c.store.stage(st.stage_id)!, stored, Date.now());
}

/**
 * Every stage completed: the deliverable is the output of the one stage nothing
 * depends on, or, with several, an object of stage id -> output.
 */
export async function completeExecution(c: Core): Promise<void> {
  const stages = c.store.stages();
  const endIds = new Set(sinks(stages.map((s) => ({ stage_id: s.stage_id, depends_on: dependsOn(s) }))).map((s) => s.stage_id));
  const ends = stages.filter((s) => endIds.has(s.stage_id));
  if (ends.length === 1) {
    const only = ends[0];
    const ref = parse<DataReference>(only.output_ref);
    tx.completeExecution(c, ref ? { inline: null, ref } : { inline: only.output ?? "null", ref: null }, Date.now());
    return;
  }
  const byStage = Object.fromEntries(ends.map((s) => [s.stage_id, outputAsInput(s)]));
  const stored = await storeOutput(c, ends[ends.length - 1].stage_id, 0, byStage, undefined, "deliverable.json");
  const ex = c.store.row()!;
  if (isTerminalExecution(ex.status)) return;
  if ("code" in stored) throw new Error(`the deliverable could not be stored: ${stored.message}`);
  tx.completeExecution(c, stored, Date.now());
}

/**
 * Turns a worker's result into what the row keeps: small JSON inline, larger
 * JSON in KV or R2 by size, and a worker's own upload checked against the
 * checksum the front Worker computed when it streamed it in.
 */
export async function storeOutput(
  c: Core,
  stageId: string,
  attempt: number,
  output: unknown,
  ref: DataReference | undefined,
  name = "output.json",
): Promise<StoredOutput | StageFailure> {
  const ex = c.store.row()!;
  if (ref) {
    const known = c.store.dataRef(ref.key);
    if (!known || known.sha256 !== ref.sha256 || known.size !== ref.size) {
      return { code: "data_corrupt", message: `the output reference ${ref.key} does not match a stored upload`, retryable: false };
    }
    return { inline: null, ref: known };
  }
  const text = JSON.stringify(output ?? null);
  const bytes = new TextEncoder().encode(text);
  if (bytes.byteLength <= DATA_LIMITS.inlineMaxBytes) return { inline: text, ref: null };
  // A key of its own per write: a second `complete` for the attempt cannot overwrite the first one's object.
  const stored = await withTimeout(putBytes(c.env, ex.execution_id, stageId, `a${attempt}-${uploadNonce()}-${name}`, bytes, "application/json"), storageMs(c), "data.put");
  tx.recordObject(c, stored, stageId, attempt, Date.now());
  return { inline: null, ref: stored };
}

/** Retention: deletes the execution's KV and R2 data and inline outputs; the summary stays. */
export async function expireData(c: Core): Promise<void> {
  const ex = c.store.row()!;
  const deleted = await withTimeout(deleteExecutionData(c.env, ex.execution_id), storageMs(c) * 6, "data.delete");
  tx.dataExpired(c, Date.now());
  c.store.log("info", "data_expired", { kv_keys: deleted.kv, r2_objects: deleted.r2 });
}
