import type { ExecutionStatus, StageStatus } from "../schemas/api";

/**
 * The stage state machine, as pure rules the Execution object applies.
 *
 *   pending ──► waiting_resources ──► handshaking ──► processing ──► completed
 *      ▲               │                   │               │
 *      └──── retry ────┴───────────────────┴───────────────┤ (transient failure, attempts left)
 *                                                          ▼
 *                                                 failed / cancelled
 *
 * A stage holds a ledger reservation from `handshaking` until it leaves
 * `processing`; every way out settles or releases it.
 */
export const STAGE_TRANSITIONS: Record<StageStatus, readonly StageStatus[]> = {
  pending: ["waiting_resources", "awaiting_approval", "failed", "cancelled"],
  // An approval stage: decided (completed, or failed by reject or timeout), or cancelled with the execution.
  awaiting_approval: ["completed", "failed", "cancelled"],
  waiting_resources: ["handshaking", "pending", "failed", "cancelled"],
  handshaking: ["processing", "completed", "pending", "failed", "cancelled"],
  processing: ["completed", "pending", "failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

/**
 * A fan-out stage's own row: it never reserves or calls a worker itself, its
 * items do. `processing` while its items run; `completed` at once for an empty list.
 */
export const FAN_OUT_TRANSITIONS: Record<StageStatus, readonly StageStatus[]> = {
  pending: ["processing", "completed", "failed", "cancelled"],
  awaiting_approval: [],
  waiting_resources: [],
  handshaking: [],
  processing: ["completed", "failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

export const EXECUTION_TRANSITIONS: Record<ExecutionStatus, readonly ExecutionStatus[]> = {
  queued: ["running", "paused", "failed", "cancelled"],
  running: ["completed", "paused", "failed", "cancelled"],
  // Paused: work already on a worker may still fail the execution; it resumes to where it was.
  paused: ["queued", "running", "failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

export function canMoveStage(from: StageStatus, to: StageStatus, fanOut = false): boolean {
  return (fanOut ? FAN_OUT_TRANSITIONS : STAGE_TRANSITIONS)[from].includes(to);
}

export function canMoveExecution(from: ExecutionStatus, to: ExecutionStatus): boolean {
  return EXECUTION_TRANSITIONS[from].includes(to);
}

export const isTerminalStage = (s: StageStatus) => s === "completed" || s === "failed" || s === "cancelled";
export const isTerminalExecution = (s: ExecutionStatus) => s === "completed" || s === "failed" || s === "cancelled";

/** A stage is doing work on a worker (a cancel must tell the worker). */
export const isOnWorker = (s: StageStatus) => s === "handshaking" || s === "processing";

export interface StageFailure {
  code: string;
  message: string;
  retryable: boolean;
  retryAfterMs?: number;
  /** The worker reported this failure itself (a `fail` callback or a `failed` progress): it needs no cancel. */
  fromWorker?: boolean;
}

/** Retry a failed attempt when the failure is transient and attempts remain. */
export function shouldRetry(failure: StageFailure, attempt: number, maxAttempts: number): boolean {
  return failure.retryable && attempt < maxAttempts;
}

/**
 * Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))],
 * but never sooner than a worker's Retry-After.
 */
export function retryDelayMs(attempt: number, baseMs: number, capMs: number, retryAfterMs = 0, random = Math.random): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.max(Math.round(random() * ceiling), Math.min(retryAfterMs, capMs * 10));
}

/**
 * When a stage whose grant was lost with its instance (a callback or upload of its attempt refused
 * while it is stored waiting for resources) asks the ledger again: now, unless its `reask` is due by
 * then already, or its last ledger call failed and that backoff's timer still stands (`ledgerFailures`
 * counts failed calls in a row; any answer resets it), so a worker's refused calls never make a ledger
 * that is down be asked once per refusal. Null: the timer stays as it is.
 */
export function lostGrantReaskAt(reaskDueAt: number | null, ledgerFailures: number, now: number): number | null {
  if (reaskDueAt !== null && (reaskDueAt <= now || ledgerFailures > 0)) return null;
  return now;
}

/** Progress polls start short and double up to a cap. */
export function nextPollInterval(currentMs: number | null, initialMs: number, maxMs: number): number {
  return currentMs === null ? initialMs : Math.min(maxMs, currentMs * 2);
}

/**
 * Whether a worker's usage report may be charged. In a pool the template
 * reserved for the stage (`resources`), at most `factor` times that amount; in
 * any other pool only if `allowed` lists it (null: any pool). A refusal says
 * which pools and why; the report is then not charged at all.
 */
export function usageRefusal(
  usage: Record<string, number> | undefined,
  reserved: Record<string, number>,
  allowed: readonly string[] | null,
  factor: number,
): string | null {
  const problems: string[] = [];
  for (const [pool, amount] of Object.entries(usage ?? {})) {
    const held = reserved[pool];
    if (held !== undefined) {
      if (amount > held * factor) problems.push(`${pool}: ${amount} is more than ${factor} x the ${held} reserved`);
    } else if (allowed !== null && !allowed.includes(pool)) {
      problems.push(`${pool}: not reserved by the stage, and not a pool this worker may report`);
    }
  }
  return problems.length ? problems.join("; ") : null;
}

/** Progress never goes backwards in the status document (a worker's late or reordered report is ignored). */
export function mergeProgress(current: number, reported: number | undefined): number {
  if (reported === undefined || !Number.isFinite(reported)) return current;
  return Math.max(current, Math.min(100, Math.max(0, reported)));
}
