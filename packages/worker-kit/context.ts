import type { DataReference } from "../../schemas/data";
import type { HandshakeRequest } from "../../schemas/worker-protocol";
import { StageError, type StoredRef, replaceRefs, storedRefsIn, readValue } from "./data";
import type { Store } from "./store";
import { type RateLimitReport, rateLimitsFrom } from "./rate-limits";
import type { Counters, JobContext, KitEnv, TraceHeaders } from "./types";

/** Thrown by `sleep`: the run stops here and resumes from the alarm. */
export class Suspended extends Error {
  constructor(readonly until: number) {
    super("the run is suspended (job.sleep); do not catch this");
  }
}

/** Thrown by any context call once the job was cancelled or replaced by a newer attempt. */
export class Aborted extends Error {
  constructor() {
    super("the job was cancelled or replaced");
  }
}

/** What a run needs from its job object. */
export interface RunHost {
  store: Store;
  counters: Counters;
  /** Still this attempt, still processing. */
  isLive(attempt: number): boolean;
  input(handshake: HandshakeRequest): Promise<unknown>;
  readInput(handshake: HandshakeRequest): Promise<ReadableStream<Uint8Array> | null>;
  openRef(handshake: HandshakeRequest, ref: StoredRef): Promise<ReadableStream<Uint8Array>>;
  maxReadBytes: number;
  /** Records progress, queues its callback and marks `memo` done, in one synchronous step. */
  reportProgress(attempt: number, percent: number, message: string | undefined, memo: string): void;
  /** Holds rate-limit reports for the next callback. */
  holdRateLimits(attempt: number, reports: RateLimitReport[]): void;
}

/**
 * One run of `run(job)`. A run is replayed from the top each time the alarm
 * resumes it: steps done, sleeps over and progress reported are memoised per
 * attempt, so they are not done twice and the run carries on where it stopped.
 */
export class RunContext<E extends KitEnv> implements JobContext<E> {
  /** Set by `sleep`: when to resume (Infinity: never, until cancelled). */
  suspendedUntil: number | null = null;
  private sleeps = 0;
  private progresses = 0;
  private readonly names = new Set<string>();

  readonly executionId: string;
  readonly stageId: string;
  readonly attempt: number;
  readonly action: string;
  readonly parameters: Record<string, unknown>;
  readonly previousOutput: unknown;
  readonly dataReference: DataReference | undefined;
  readonly inputs: Record<string, unknown>;
  readonly counters: Counters;

  constructor(
    private readonly host: RunHost,
    readonly handshake: HandshakeRequest,
    readonly env: E,
    /** The attempt's W3C trace context: pass `trace.traceparent` on to calls this stage makes, to continue the trace. */
    readonly trace: TraceHeaders | null = null,
  ) {
    this.executionId = handshake.executionId;
    this.stageId = handshake.stageId;
    this.attempt = handshake.attempt;
    this.action = handshake.action;
    this.parameters = handshake.inputData.parameters;
    this.previousOutput = handshake.inputData.previousOutput;
    this.dataReference = handshake.dataReference;
    this.inputs = handshake.inputData.inputs ?? {};
    this.counters = host.counters;
  }

  async input<T = unknown>(): Promise<T> {
    this.check();
    const value = await this.host.input(this.handshake);
    this.check();
    return value as T;
  }

  async readInput(): Promise<ReadableStream<Uint8Array> | null> {
    this.check();
    return this.host.readInput(this.handshake);
  }

  async openRef(ref: StoredRef): Promise<ReadableStream<Uint8Array>> {
    this.check();
    return this.host.openRef(this.handshake, ref);
  }

  async readRef<T = unknown>(ref: StoredRef): Promise<T> {
    const value = await readValue(await this.openRef(ref), ref.$ref, ref.contentType);
    this.check();
    return value as T;
  }

  async resolveRefs<T = unknown>(value: unknown): Promise<T> {
    this.check();
    const total = storedRefsIn(value).reduce((sum, r) => sum + r.size, 0);
    if (total > this.host.maxReadBytes) {
      throw new StageError("input_too_large", `the references hold ${total} bytes; reads are limited to ${this.host.maxReadBytes}`, { retryable: false });
    }
    return (await replaceRefs(value, (ref) => this.readRef(ref))) as T;
  }

  async step<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
    this.check();
    if (this.names.has(name)) throw new Error(`step name '${name}' is used twice in one run`);
    this.names.add(name);
    const key = `memo:step:${name}`;
    const memo = this.host.store.getBlob(key);
    if (memo !== null) return (JSON.parse(memo) as { v: T }).v;
    const value = await fn();
    this.check();
    this.host.store.putBlob(key, JSON.stringify({ v: value }));
    return value;
  }

  async sleep(ms: number): Promise<void> {
    this.check();
    const key = `memo:sleep:${++this.sleeps}`;
    const memo = this.host.store.getBlob(key);
    if (memo !== null) {
      const wake = Number(memo);
      if (wake <= Date.now()) return;
      throw this.suspend(wake);
    }
    const wake = ms === Infinity ? Infinity : Date.now() + Math.max(0, ms);
    this.host.store.putBlob(key, String(wake));
    // Even sleep(0) suspends once: what was queued (progress) goes out before the run goes on.
    throw this.suspend(wake);
  }

  async progress(percent: number, message?: string): Promise<void> {
    this.check();
    const key = `memo:progress:${++this.progresses}`;
    if (this.host.store.getBlob(key) !== null) return;
    const p = Math.min(100, Math.max(0, Number.isFinite(percent) ? percent : 0));
    this.host.reportProgress(this.attempt, p, message?.slice(0, 1000), key);
  }

  rateLimits(response: Response, pool: string): void {
    this.check();
    const reports = rateLimitsFrom(response, pool);
    if (reports.length) this.host.holdRateLimits(this.attempt, reports);
  }

  private suspend(until: number): Suspended {
    this.suspendedUntil = until;
    return new Suspended(until);
  }

  /** Stops a run that goes on after a suspension, a cancel or a newer attempt. */
  private check(): void {
    if (this.suspendedUntil !== null) throw new Suspended(this.suspendedUntil);
    if (!this.host.isLive(this.attempt)) throw new Aborted();
  }
}
