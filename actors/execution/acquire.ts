import type { RenewResult, ReserveRequest, ReserveResult } from "../../schemas/ledger";
import { remember } from "../../src/bounded-memo";
import { basePoolOf, everyShard, layoutOf, ledgerShard, shardOfPool, subPoolOf } from "../../src/ledger-routing";
import { askShards } from "../../src/ledger-fanout";
import { withTimeout } from "../../src/outbound";
import {
  type Acquisition,
  type Amounts,
  acquisitionOf,
  giveUpRound,
  grantedSet,
  isFinalRefusal,
  nextPart,
  partAnswered,
  partReservationId,
  planParts,
  recordPart,
  saveAcquisition,
  stageNeeds,
  workerShard,
} from "./parts";
import { type Core, type StageRow, parse } from "./store";
import * as tx from "./transitions";

/**
 * The awaited steps of a sharded stage's reservation (the decisions are in
 * parts.ts): which shard or shards it asks, the part-by-part acquisition, the
 * renewal of every part, and the estimate fan-out for implicit requirements.
 * Like steps.ts, each re-reads the stage after its await and applies the
 * answer only if the stage is still where the call left it.
 */

/** How the stage's current attempt reserves: in one call to one shard (today's path), or part by part. */
export type Route = { kind: "single"; shard: number; requirements: Amounts | undefined } | { kind: "multi"; acquisition: Acquisition };

/**
 * Decides the route of a stage's attempt in a sharded layout. Explicit needs
 * are split with no I/O; implicit needs (no `resources`) are the shards'
 * estimates for the worker, asked once per attempt (estimateNeeds). Null: the
 * estimate could not be asked (no shard answered) or the stage moved on.
 */
export async function routeOf(c: Core, st: StageRow): Promise<Route | null> {
  const layout = layoutOf(c.env);
  const ex = c.store.row()!;
  const opts = { worker: st.worker, clientId: ex.client_id, executionId: ex.execution_id };
  const resources = parse<Amounts>(st.resources);
  if (resources) {
    const parts = planParts(layout, resources, opts);
    if (parts.length === 1) return { kind: "single", shard: parts[0].shard, requirements: parts[0].requirements };
    return { kind: "multi", acquisition: acquisitionOf(c, st) ?? startAcquisition(c, st, parts, false) };
  }
  let a = acquisitionOf(c, st);
  if (!a) {
    const needs = await estimateNeeds(c, st);
    if (!needs || !c.store.stillAt(st, "waiting_resources")) {
      if (!needs && c.store.stillAt(st, "waiting_resources")) tx.ledgerFailed(c, c.store.stage(st.stage_id)!, Date.now());
      return null;
    }
    a = acquisitionOf(c, st) ?? startAcquisition(c, st, planParts(layout, needs, opts), true);
  }
  // One part: the worker's shard estimates the stage itself, exactly as an unsharded ledger does.
  if (a.parts.length === 1) return { kind: "single", shard: workerShard(layout, st.worker), requirements: undefined };
  return { kind: "multi", acquisition: a };
}

function startAcquisition(c: Core, st: StageRow, parts: Acquisition["parts"], estimated: boolean): Acquisition {
  const a: Acquisition = { stage_id: st.stage_id, attempt: st.attempt, round: 0, estimated, parts };
  saveAcquisition(c, a);
  return a;
}

/** Implicit needs per worker and priority, kept for `estimateCacheMs` in this isolate (a burst asks the shards once). */
const estimates = new Map<string, { needs: Amounts; at: number }>();
const MAX_ESTIMATES = 256;

/**
 * A stage without `resources` in a sharded layout: each shard estimates the
 * worker's needs in the pools it owns (the averages live with the pools), all
 * asked in parallel (askShards: at most 16 at once) under one
 * `ledgerCallTimeoutMs` deadline. A shard that does not answer in time adds
 * nothing; null when none answered.
 */
export async function estimateNeeds(c: Core, st: StageRow): Promise<Amounts | null> {
  const t = c.config.tuning;
  const ex = c.store.row()!;
  const key = `${st.worker}|${ex.priority}`;
  const hit = estimates.get(key);
  if (hit && Date.now() - hit.at < t.estimateCacheMs) return { ...hit.needs };
  const layout = layoutOf(c.env);
  const shards = everyShard(c.env);
  // A shard that does not answer is logged once, by askShards, with this stage's ids.
  const answers = await askShards(c.env, shards, (s) => s.stub.estimate([{ worker: st.worker }], ex.priority), "ledger.estimate", {
    deadlineMs: t.ledgerCallTimeoutMs,
    logFields: { execution_id: ex.execution_id, stage_id: st.stage_id },
  });
  const needs: Amounts = {};
  let answered = 0;
  for (const a of answers) {
    if (!a.ok) continue;
    answered++;
    for (const [pool, amount] of Object.entries(a.value.stages[0]?.requirements ?? {})) {
      // Only what the shard owns, and of a split pool only this execution's sub-pool.
      if (pool === `worker:${st.worker}` || shardOfPool(layout, pool) !== a.shard) continue;
      if (subPoolOf(layout, basePoolOf(pool), ex.execution_id) !== pool) continue;
      needs[pool] = amount;
    }
  }
  if (answered === 0) return null;
  if (answered === shards.length) remember(estimates, key, { needs: { ...needs }, at: Date.now() }, MAX_ESTIMATES);
  return needs;
}

/**
 * One step of a multi-shard acquisition: the round's deadline or backoff, then
 * the next part's reserve (short lease), or, with every part granted, the
 * renewal of all of them to `leaseMs` and the normal granted path. Returns
 * true when it changed something and the stage should step again.
 */
export async function askParts(c: Core, st: StageRow, a: Acquisition): Promise<boolean> {
  const id = st.stage_id;
  const timers = c.timers;
  if (timers.take("part_deadline", id) && nextPart(a) >= 0) {
    giveUpRound(c, st, a, "part_deadline", Date.now());
    return false;
  }
  if (timers.has("reacquire", id) && !timers.take("reacquire", id)) return false;
  const k = nextPart(a);
  if (k < 0) return renewAndStart(c, st, a);
  const part = a.parts[k];
  // A queued part wakes by its notice, or asks again at `reask` (a lost notice); a failed call waits out its backoff.
  if (part.state === "waiting" && !timers.take("reask", id)) return false;
  if (part.state === "new" && timers.has("reask", id) && !timers.take("reask", id)) return false;
  const ex = c.store.row()!;
  const t = c.config.tuning;
  // Asked again if this object dies mid-call: a waiting part is woken by nothing else when its answer was a grant.
  if (part.state === "waiting") timers.set("reask", Date.now() + 2 * t.ledgerCallTimeoutMs, id);
  const request: ReserveRequest = {
    executionId: ex.execution_id,
    stageId: id,
    attempt: st.attempt,
    round: a.round,
    priority: ex.priority,
    requirements: part.requirements,
    leaseMs: t.ledgerShortLeaseMs,
    worker: st.worker,
    clientId: ex.client_id,
    // Fair sharing on a shard that is not the client's weighs the stage by the client's weight.
    ...(!part.client && ex.client_weight != null ? { clientWeight: ex.client_weight } : {}),
    part: {
      shard: part.shard,
      shards: a.parts.map((p) => p.shard),
      worker: part.worker,
      client: part.client,
      // The client's budget and rate are judged on the whole stage, on the client's shard.
      ...(part.client ? { stageNeeds: stageNeeds(a) } : {}),
    },
  };
  let result: ReserveResult;
  try {
    result = await withTimeout<ReserveResult>(ledgerShard(c.env, part.shard).reserve(request), t.ledgerCallTimeoutMs, "ledger.reserve");
  } catch (err) {
    c.store.log("warn", "ledger_reserve_failed", { stage_id: id, attempt: st.attempt, shard: part.shard, round: a.round, error: String(err) });
    const cur = c.store.stage(id);
    if (cur && c.store.stillAt(st, "waiting_resources") && acquisitionOf(c, cur)?.round === a.round) tx.ledgerFailed(c, cur, Date.now());
    return false;
  }
  const now = Date.now();
  const cur = c.store.stage(id)!;
  const fresh = acquisitionOf(c, cur);
  if (!c.store.stillAt(st, "waiting_resources") || !fresh || fresh.round !== a.round) {
    // Moved on meanwhile (cancelled, failed, or the round was given up): what this call made goes back;
    // an `ended` answer (a round the shard already saw the set leave, or a replay of one ended) made nothing.
    if ("reservationId" in result && result.status !== "ended") c.outbox.enqueue({ kind: "ledger_release", shard: part.shard, reservationId: result.reservationId }, now);
    return true;
  }
  switch (result.status) {
    case "granted":
      recordPart(c, cur, result.reservationId, part.shard, now);
      partAnswered(c, fresh, part.shard, { granted: true, expiresAt: result.expiresAt, requirements: result.requirements });
      return true;
    case "waiting":
      recordPart(c, cur, result.reservationId, part.shard, now);
      partAnswered(c, fresh, part.shard, { granted: false });
      tx.waitForGrant(c, cur, result.position, now, result.waitingOn);
      return false;
    case "ended":
      // This part's reservation lapsed before the set was complete (its short lease ran out): start over.
      giveUpRound(c, cur, fresh, `part on shard ${part.shard} ${result.state}`, now);
      return false;
    case "invalid":
      tx.ledgerAnswered(c, cur, "refused", parse<Amounts>(st.resources) ?? {}, result.code, 0);
      tx.failAttempt(c, cur, { code: "invalid_request", message: `the ledger refused the reservation request: ${result.message}`, retryable: false }, now);
      return true;
    case "refused":
      tx.ledgerAnswered(c, cur, "refused", parse<Amounts>(st.resources) ?? {}, result.code, 0);
      if (isFinalRefusal(result.code)) {
        // As for a single-shard stage: it can never be granted. failAttempt releases every part.
        tx.failAttempt(c, cur, { code: result.code, message: result.message, retryable: false }, now);
        return true;
      }
      giveUpRound(c, cur, fresh, `refusal ${result.code} on shard ${part.shard}`, now);
      return false;
  }
}

/** Every part is granted on a short lease: renew each to `leaseMs`, then the stage is granted as a whole (or the round is given up). */
async function renewAndStart(c: Core, st: StageRow, a: Acquisition): Promise<boolean> {
  const ex = c.store.row()!;
  const renewed = await renewParts(c, a, ex.execution_id).catch((err): RenewResult => {
    c.store.log("warn", "lease_renew_failed", { stage_id: st.stage_id, round: a.round, error: String(err) });
    return { ok: false, state: "unknown" };
  });
  const now = Date.now();
  const cur = c.store.stage(st.stage_id)!;
  const fresh = acquisitionOf(c, cur);
  if (!c.store.stillAt(st, "waiting_resources") || !fresh || fresh.round !== a.round) return true;
  if (!renewed.ok || renewed.expiresAt === undefined) {
    giveUpRound(c, cur, fresh, `renewal to the full lease failed (${renewed.state})`, now);
    return false;
  }
  saveAcquisition(c, { ...fresh, parts: fresh.parts.map((p) => ({ ...p, expiresAt: renewed.expiresAt })) });
  c.timers.clear("part_deadline", st.stage_id);
  tx.granted(c, cur, renewed.expiresAt, grantedSet(fresh), now);
  return true;
}

/**
 * Renews every part of the acquisition to `leaseMs`, in parallel, each to its
 * shard: ok only when every part is; the lease is the earliest part's. A part
 * the ledger no longer holds wins over a call that failed (the lease is lost
 * then); a failed call alone throws, so the caller retries as for one reservation.
 */
export async function renewParts(c: Core, a: Acquisition, executionId: string): Promise<RenewResult> {
  const t = c.config.tuning;
  const id = partReservationId(executionId, a.stage_id, a.attempt, a.round);
  const results = await Promise.allSettled(a.parts.map((p) => withTimeout(ledgerShard(c.env, p.shard).renew(id, t.leaseMs), t.ledgerCallTimeoutMs, "ledger.renew")));
  const lost = results.find((r): r is PromiseFulfilledResult<RenewResult> => r.status === "fulfilled" && (!r.value.ok || !r.value.expiresAt));
  if (lost) return lost.value;
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
  const expiries = results.map((r) => (r as PromiseFulfilledResult<RenewResult>).value.expiresAt!);
  return { ok: true, state: "granted", expiresAt: Math.min(...expiries) };
}
