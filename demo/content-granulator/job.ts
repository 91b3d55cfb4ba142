import {
  DataReadError,
  StageError,
  bytes,
  bytesOf,
  isJsonType,
  sha256Hex,
  storedRefsIn,
  type Acceptance,
  type Counters,
  type JobContext,
  type RunResult,
  type StoredRef,
} from "../../packages/worker-kit";
import type { HandshakeRequest } from "../../schemas/worker-protocol";
import {
  COUNTERS,
  faultFor,
  faultOf,
  faultOutput,
  handshakeRefusal,
  handshakeStallMs,
  outcomeOf,
  progressAt,
  runsSteps,
  stepCount,
  providerAnswer,
  type Fault,
  type Outcome,
} from "./faults";
import type { GranulatorEnv } from "./index";
import { type GraphInput, type RefRead, type TextAction, blobSize, blobStream, intParam, isTextAction, prepare, usageOf, type Work } from "./work";

/**
 * A granulator stage on the worker kit: `accept` decides the handshake, `run`
 * does the work in `steps` steps, each after a durable `step_ms` pause, with a
 * progress callback between steps. The kit keeps the job in the stage's
 * GranulatorJob object, resumes the run from its alarm, and reports the result.
 */

export const WORKER_ID = "bitware-content-granulator";

export async function acceptStage(req: HandshakeRequest, counters: Counters): Promise<Acceptance> {
  const params = req.inputData.parameters;
  const found = faultFor(params, req.stageId, req.attempt);
  if ("error" in found) return { accepted: false, reason: found.error, retryable: false };
  const stallMs = handshakeStallMs(found.fault, params, counters.get(COUNTERS.stalled));
  if (stallMs > 0) {
    counters.bump(COUNTERS.stalled);
    await scheduler.wait(stallMs);
  }
  const refused = handshakeRefusal(found.fault, counters.get(COUNTERS.refused));
  if (refused) {
    counters.bump(COUNTERS.refused);
    return { accepted: false, reason: refused.reason, retryable: refused.retryable };
  }
  const steps = stepCount(found.fault, intParam(params.steps, 4, 1, 50));
  const stepMs = intParam(params.step_ms, 50, 0, 60_000);
  // A referenced input is only read when the work starts: estimate without it.
  const words = isTextAction(req.action)
    ? prepare(req.action, params, req.dataReference ? null : req.inputData.previousOutput, graphInput(req)).estimatedWords
    : 0;
  return {
    accepted: true,
    estimatedCompletionMs: steps * (stepMs + 10),
    resourceRequirements: { estimatedTokens: usageOf(words, 0)["tokens:openai"] },
  };
}

export async function runStage(job: JobContext<GranulatorEnv>): Promise<RunResult> {
  const fault = faultOf(job);
  // crash, hang, malformed: accepted and processing, but nothing ever happens (until a cancel).
  if (!runsSteps(fault)) await job.sleep(Infinity);

  const params = job.parameters;
  const steps = stepCount(fault, intParam(params.steps, 4, 1, 50));
  const stepMs = intParam(params.step_ms, 50, 0, 60_000);
  const work = isTextAction(job.action) ? await textWork(job, job.action) : await blobWork(job);

  if (fault?.mode === "provider_429_once") await callProvider(job, fault);

  const parts: unknown[] = [];
  let words = 0;
  let workMs = 0;
  for (let step = 1; step <= steps; step++) {
    await job.sleep(stepMs);
    // Each step does its share of the work units; the kit stores the result, so a resumed run skips it.
    const done = await job.step(`step ${step}`, () => {
      const started = Date.now();
      const from = Math.floor(((step - 1) * work.units) / steps);
      const to = Math.floor((step * work.units) / steps);
      const pieces: unknown[] = [];
      let w = 0;
      for (let i = from; i < to; i++) {
        const piece = work.unit(i);
        pieces.push(piece.value ?? null);
        w += piece.words;
      }
      return { pieces, words: w, ms: Date.now() - started };
    });
    parts.push(...done.pieces);
    words += done.words;
    workMs += done.ms;
    if (step < steps) await job.progress(progressAt(fault, step, steps), `step ${step}/${steps} (${job.action})`);
  }

  const result = faultOutput(fault, params) ?? work.assemble(parts);
  const usage = usageOf(words + result.words, workMs);
  const outcome = await job.step("outcome", (): Outcome => {
    const o = outcomeOf(fault, job.counters.get(COUNTERS.failures));
    if (o.kind === "fail") job.counters.bump(COUNTERS.failures);
    return o;
  });
  if (outcome.kind === "fail") throw new StageError(outcome.code, outcome.message, { retryable: outcome.retryable, usage });
  return { output: result.value, usage };
}

/** The stand-in provider call (faults.ts `providerAnswer`), once per attempt: a 429 fails the attempt, retryable. */
async function callProvider(job: JobContext<GranulatorEnv>, fault: Fault): Promise<void> {
  const pool = fault.pool ?? "tokens:openai";
  const throttled = await job.step("provider call", () => {
    const res = providerAnswer(fault, job.counters.bump(COUNTERS.providerCalls) - 1);
    if (res.status !== 429) job.rateLimits(res, pool);
    return res.status === 429 ? { retryAfterMs: fault.retryAfterMs ?? 2000 } : null;
  });
  if (throttled) {
    const response = providerAnswer(fault, 0);
    throw new StageError("provider_rate_limited", `the provider answered 429 (retry after ${throttled.retryAfterMs} ms)`, { retryable: true, provider: { response, pool } });
  }
}

/**
 * Text actions work on values: the stored inputs a stage receives as `{ $ref }`
 * (its dependency's output, several dependencies' outputs, a fan-out's stored
 * item outputs) are read through the orchestrator first. `gather` reports what
 * it received as it came, with a digest of every stored input it read.
 */
async function textWork(job: JobContext<GranulatorEnv>, action: TextAction): Promise<Work> {
  const input = await job.input();
  const graph = graphInput(job.handshake);
  if (action === "gather") {
    const read = storedRefsIn(graph.inputs).length > 0 ? await job.step("read inputs", () => digestRefs(job, graph.inputs)) : undefined;
    // The length of the data token it read with: the same for 3 stored inputs or 300 (the token lists no keys).
    const dataTokenBytes = read ? (job.handshake.callback.dataToken ?? "").length : undefined;
    return prepare(action, job.parameters, input, { ...graph, read, dataTokenBytes });
  }
  const inputs = await job.resolveRefs<Record<string, unknown>>(graph.inputs);
  return prepare(action, job.parameters, await job.resolveRefs(input), { ...graph, inputs });
}

/**
 * Reads every `{ $ref }` in `inputs` and digests its bytes; a JSON input is also
 * searched for references inside it, which are tried once: the data token reads
 * only this stage's own inputs, so the orchestrator's refusal (its status) is what
 * they record. A stored input of the stage itself that cannot be read fails the stage.
 */
async function digestRefs(job: JobContext<GranulatorEnv>, inputs: Record<string, unknown>): Promise<Record<string, RefRead>> {
  const report: Record<string, RefRead> = {};
  const digest = async (ref: StoredRef): Promise<Uint8Array> => {
    const u8 = new Uint8Array(await new Response(await job.openRef(ref)).arrayBuffer());
    report[ref.$ref] = { size: u8.byteLength, sha256: await sha256Hex(u8) };
    return u8;
  };
  const nested: StoredRef[] = [];
  for (const ref of storedRefsIn(inputs)) {
    if (report[ref.$ref]) continue;
    const u8 = await digest(ref);
    if (isJsonType(ref.contentType)) nested.push(...storedRefsIn(JSON.parse(new TextDecoder().decode(u8))));
  }
  for (const ref of nested) {
    if (report[ref.$ref]) continue;
    try {
      await digest(ref);
    } catch (err) {
      if (!(err instanceof DataReadError) || err.status < 400 || err.status >= 500) throw err;
      report[ref.$ref] = { refused: err.status };
    }
  }
  return report;
}

function graphInput(req: HandshakeRequest): GraphInput {
  const d = req.inputData;
  return { stageId: req.stageId, inputs: d.inputs ?? {}, item: d.item, itemIndex: d.item_index };
}

/**
 * `blob`: exactly blobSize() bytes of the pattern (work.ts, blobByte). Small
 * blobs go back inline as base64 (with `input: { size, sha256 }` when the stage
 * had an input); large ones are uploaded by the kit. An input is read in full
 * first: streamed and hashed when it is a binary reference.
 */
async function blobWork(job: JobContext<GranulatorEnv>): Promise<Work> {
  const size = blobSize(job.parameters, job.stageId);
  const input = await job.step("input digest", () => digestInput(job));
  return {
    units: 0,
    estimatedWords: 0,
    unit: () => ({ value: null, words: 0 }),
    assemble: () => ({
      value: bytes(blobStream(job.stageId, size), { size, contentType: "application/octet-stream", extra: input ? { input } : undefined }),
      words: 0,
    }),
  };
}

async function digestInput(job: JobContext<GranulatorEnv>): Promise<{ size: number; sha256: string } | null> {
  const ref = job.dataReference;
  if (ref && !isJsonType(ref.contentType)) {
    const stream = (await job.readInput())!;
    const digest = new crypto.DigestStream("SHA-256");
    await stream.pipeTo(digest);
    const sha = [...new Uint8Array(await digest.digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    return { size: Number(digest.bytesWritten), sha256: sha };
  }
  const value = await job.input();
  if (value === null || value === undefined) return null;
  const u8 = bytesOf(value) ?? new TextEncoder().encode(JSON.stringify(value));
  return { size: u8.byteLength, sha256: await sha256Hex(u8) };
}
