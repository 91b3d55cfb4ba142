import { z } from "zod";
import type { Hooks, JobInfo, Reply } from "../../packages/worker-kit";
import { intParam, largeOutput, type Piece } from "./work";

/**
 * Fault injection for the orchestrator's tests, chosen per execution by
 * `inputData.parameters.fault = { stage?, mode, times? }`. Every decision a
 * fault can change goes through one function here, so the stage's own flow
 * (job.ts) reads as the healthy path; the kit's `hooks` call in from outside it.
 */

export const FAULT_MODES = [
  "refuse",
  "refuse_retryable",
  "stall_handshake",
  "process_500_once",
  "process_429_once",
  "provider_429_once",
  "crash",
  "crash_once",
  "hang",
  "malformed",
  "double_callback",
  "wrong_token",
  "progress_backwards",
  "fail",
  "fail_retryable_once",
  "large_output",
] as const;
export type FaultMode = (typeof FAULT_MODES)[number];

const FaultSpec = z.object({
  /** Only the stage whose id is `stage_{stage}` (and its items); every stage when absent. */
  stage: z.number().int().min(1).max(999).optional(),
  /** With `stage`: only item `stage_{stage}.{item}` of that fan-out stage. */
  item: z.number().int().min(0).max(999_999).optional(),
  mode: z.enum(FAULT_MODES),
  times: z.number().int().min(1).max(100).optional(),
  /** provider_429_once: the pool the stand-in provider's answers are about, and its `retry-after-ms`. */
  pool: z.string().min(1).max(64).optional(),
  retry_after_ms: z.number().int().min(0).max(600_000).optional(),
});

export interface Fault {
  mode: FaultMode;
  times: number;
  pool?: string;
  retryAfterMs?: number;
}

/**
 * Counters kept per stage across attempts (a new attempt replaces the job but
 * not these), so "the first N times" holds however the orchestrator numbers
 * its attempts.
 */
export const COUNTERS = {
  refused: "fault:refused",
  stalled: "fault:stalled",
  processCalls: "fault:process_calls",
  failures: "fault:failures",
  providerCalls: "fault:provider_calls",
} as const;

/**
 * `provider_429_once`: the stand-in for a model provider the stage calls. Its
 * first call (per stage, across attempts) answers 429 with `retry-after-ms`; later ones 200 with `x-ratelimit-remaining-tokens: 777`. The
 * stage hands each answer to the kit (`job.rateLimits`, or a StageError's
 * `provider`), which reports it as `rate_limits` on its next callback.
 */
export function providerAnswer(fault: Fault, callsSoFar: number): Response {
  if (callsSoFar === 0) {
    return new Response(null, { status: 429, headers: { "retry-after-ms": String(fault.retryAfterMs ?? 2000) } });
  }
  return new Response("{}", { status: 200, headers: { "x-ratelimit-remaining-tokens": String(PROVIDER_REMAINING) } });
}
export const PROVIDER_REMAINING = 777;

const LARGE_OUTPUT_DEFAULT = 2 * 1024 * 1024;
// Built in memory as one string: stay well under the upload limit and the object's memory.
const LARGE_OUTPUT_MAX = 16 * 1024 * 1024;

/** The fault for this stage, none, or why the spec is unusable (the handshake refuses it). */
export function faultFor(
  parameters: Record<string, unknown>,
  stageId: string,
  attempt: number,
): { fault: Fault | null } | { error: string } {
  if (parameters.fault === undefined || parameters.fault === null) return { fault: null };
  const spec = FaultSpec.safeParse(parameters.fault);
  if (!spec.success) {
    return { error: `invalid parameters.fault: ${spec.error.issues.map((i) => `${i.path.join(".")} ${i.message}`).join("; ")}` };
  }
  if (spec.data.stage !== undefined) {
    const target = `stage_${spec.data.stage}`;
    const matches = spec.data.item !== undefined ? stageId === `${target}.${spec.data.item}` : stageId === target || stageId.startsWith(`${target}.`);
    if (!matches) return { fault: null };
  }
  // crash_once: the first attempt crashes, the next ones are healthy.
  if (spec.data.mode === "crash_once" && attempt > 1) return { fault: null };
  return { fault: { mode: spec.data.mode, times: spec.data.times ?? 1, pool: spec.data.pool, retryAfterMs: spec.data.retry_after_ms } };
}

/** Whether to refuse the handshake. `refusedSoFar` counts this stage's earlier refusals. */
export function handshakeRefusal(fault: Fault | null, refusedSoFar: number): { reason: string; retryable: boolean } | null {
  if (fault?.mode === "refuse") return { reason: "refused (fault injected)", retryable: false };
  if (fault?.mode === "refuse_retryable" && refusedSoFar < fault.times) {
    return { reason: `busy, try again (fault injected, refusal ${refusedSoFar + 1} of ${fault.times})`, retryable: true };
  }
  return null;
}

/**
 * `stall_handshake`: the stage's first `times` handshakes answer only after
 * `parameters.stall_ms` (default 10 s), past any handshake deadline under test.
 */
export function handshakeStallMs(fault: Fault | null, parameters: Record<string, unknown>, stalledSoFar: number): number {
  if (fault?.mode !== "stall_handshake" || stalledSoFar >= fault.times) return 0;
  return intParam(parameters.stall_ms, 10_000, 1, 60_000);
}

/** `process_500_once`: the stage's very first process call answers 500. */
export function processCallFails(fault: Fault | null, callsSoFar: number): boolean {
  return fault?.mode === "process_500_once" && callsSoFar === 0;
}

/** `process_429_once`: the stage's very first process call answers 429 with `retry-after: 2` (seconds). */
export function processCallThrottled(fault: Fault | null, callsSoFar: number): boolean {
  return fault?.mode === "process_429_once" && callsSoFar === 0;
}

/** Stalled modes accept and "process" but never step, progress or call back. */
export function runsSteps(fault: Fault | null): boolean {
  return !(fault?.mode === "crash" || fault?.mode === "crash_once" || fault?.mode === "hang" || fault?.mode === "malformed");
}

/** What a progress poll gets from a stalled job instead of its real state. */
export function stalledProgress(fault: Fault | null): Reply | null {
  switch (fault?.mode) {
    case "crash":
    case "crash_once":
      return { status: 500, body: { error: { code: "internal_error", message: "worker crashed (fault injected)" } } };
    case "malformed":
      return { status: 200, text: "not json{" };
    case "hang":
      return { status: 200, body: { status: "processing", progress: 0, message: "working" } };
    default:
      return null;
  }
}

/** `progress_backwards` needs exactly two progress steps before the last. */
export function stepCount(fault: Fault | null, requested: number): number {
  return fault?.mode === "progress_backwards" ? 3 : requested;
}

/** Progress after `step` of `steps`: step/steps*100, or 60 then 30 for `progress_backwards`. */
export function progressAt(fault: Fault | null, step: number, steps: number): number {
  if (fault?.mode === "progress_backwards" && step < steps) return step === 1 ? 60 : 30;
  return Math.round((step / steps) * 1000) / 10;
}

/**
 * `large_output` replaces the action's output with a string of `parameters.output_bytes`
 * bytes; over the kit's threshold (512 KiB) it goes to the orchestrator as an upload.
 */
export function faultOutput(fault: Fault | null, parameters: Record<string, unknown>): Piece | null {
  if (fault?.mode !== "large_output") return null;
  return largeOutput(intParam(parameters.output_bytes, LARGE_OUTPUT_DEFAULT, 1, LARGE_OUTPUT_MAX));
}

export type Outcome =
  | { kind: "complete" }
  | { kind: "fail"; code: string; message: string; retryable: boolean };

/** How the work ends. `failuresSoFar` counts this stage's earlier failed attempts. */
export function outcomeOf(fault: Fault | null, failuresSoFar: number): Outcome {
  if (fault?.mode === "fail") {
    return { kind: "fail", code: "granulation_failed", message: "granulation failed (fault injected)", retryable: false };
  }
  if (fault?.mode === "fail_retryable_once" && failuresSoFar === 0) {
    return { kind: "fail", code: "granulation_failed", message: "transient granulation failure (fault injected)", retryable: true };
  }
  return { kind: "complete" };
}

/** The complete callbacks to send, in order; `forged` ones carry an altered token. */
export function completeCallbacks(fault: Fault | null): { forged: boolean }[] {
  if (fault?.mode === "double_callback") return [{ forged: false }, { forged: false }];
  if (fault?.mode === "wrong_token") return [{ forged: true }, { forged: false }];
  return [{ forged: false }];
}

/** A token that looks valid but is not: same length, last character changed. */
export function forgeToken(token: string): string {
  return token.slice(0, -1) + (token.endsWith("x") ? "y" : "x");
}

const parsed = new WeakMap<object, Fault | null>();

/** The job's fault (none for an invalid spec: the handshake refused those), parsed once per attempt. */
export function faultOf(job: Pick<JobInfo, "handshake" | "stageId" | "attempt">): Fault | null {
  let fault = parsed.get(job.handshake);
  if (fault === undefined) {
    const found = faultFor(job.handshake.inputData.parameters, job.stageId, job.attempt);
    fault = "fault" in found ? found.fault : null;
    parsed.set(job.handshake, fault);
  }
  return fault;
}

/** The kit's extension points, for the faults that act outside the work itself. */
export const faultHooks: Hooks = {
  beforeProcess(job, counters) {
    const callsSoFar = counters.get(COUNTERS.processCalls);
    counters.bump(COUNTERS.processCalls);
    if (processCallThrottled(faultOf(job), callsSoFar)) {
      return { status: 429, headers: { "retry-after": "2" }, body: { error: { code: "busy", message: "try again in 2 s (fault injected)" } } };
    }
    if (!processCallFails(faultOf(job), callsSoFar)) return null;
    return { status: 500, body: { error: { code: "internal_error", message: "process failed (fault injected)" } } };
  },
  progress: (job) => stalledProgress(faultOf(job)),
  callbackTokens(job, kind, token) {
    if (kind !== "complete") return [token];
    return completeCallbacks(faultOf(job)).map((cb) => (cb.forged ? forgeToken(token) : token));
  },
};
