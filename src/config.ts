import { z } from "zod";
import { ClientQuotas } from "../schemas/clients";
import { PoolConfig } from "../schemas/ledger";

/**
 * Every tunable of the orchestrator in one place: timeouts, retries, polling,
 * limits and size thresholds. Defaults are here; `TUNING` (a JSON var) may
 * override any of them per environment. docs/operations.md lists them.
 */
export const DEFAULT_TUNING = {
  /** Outbound call timeouts. */
  kamTimeoutMs: 5_000,
  workerCallTimeoutMs: 10_000,
  ledgerCallTimeoutMs: 5_000,
  /** A read of every ledger shard (GET /resources, GET /clients, /metrics) answers within this, with the shards that did not (src/ledger-fanout.ts). */
  ledgerFanOutDeadlineMs: 8_000,
  objectCallTimeoutMs: 10_000,
  /** The longest `wait_ms` of a long-polled `GET /executions/:id` (docs/protocol.md, "Status reads"). */
  statusWaitMaxMs: 30_000,
  /**
   * How long a front Worker isolate may answer an ended execution's document
   * from its own memory after reading it (the object holds back any change
   * until then); 0: every read calls the object (docs/protocol.md, "Status reads").
   */
  statusLeaseMs: 1_000,
  /** Every read the Execution serves from memory is read again from SQL and compared when 1, a difference failing the call (actors/execution/read-cache.ts; the test suite's check, not for production). */
  readCacheCheck: 0,
  /**
   * The front Worker reuses a steady admission (a client with neither `monthly_budget` nor
   * `max_starts_per_minute`) for this long per client and priority, so a start within it asks the
   * ledger nothing; a quota change reaches starts through other isolates at most this late. 0: every start asks.
   */
  admissionCacheMs: 1_000,
  /** KV and R2 reads and writes inside an execution's drive pass (a stalled store must not block its alarm). */
  storageCallTimeoutMs: 10_000,
  /** KAM template fetch: attempts before `kam_unavailable`, and the backoff between them. */
  kamMaxAttempts: 4,
  kamRetryBaseMs: 500,
  /** Template cache TTL in EXECUTION_CACHE (KV's minimum is 60 s). */
  templateCacheTtlSeconds: 300,
  /**
   * Callback and data tokens expire this long after the latest moment their
   * attempt can still be running (handshake + process calls + the stage's
   * `timeout_ms`): room for a callback already on its way at the deadline.
   */
  callbackTokenMarginMs: 5 * 60_000,
  /** Stage deadline when the template gives no `timeout_ms`. */
  defaultStageTimeoutMs: 10 * 60_000,
  /** How long an approval stage waits for a decision when the template gives no `timeout_ms` (then `approval_timeout`). */
  defaultApprovalTimeoutMs: 24 * 3600_000,
  /** Attempts per stage when the template gives no `max_attempts`. */
  defaultMaxAttempts: 3,
  /** Backoff between attempts of a stage: base * 2^(attempt-1), capped, with full jitter. */
  retryBaseMs: 1_000,
  retryCapMs: 60_000,
  /** Progress polling: starts short, doubles, capped. */
  pollInitialMs: 250,
  pollMaxMs: 5_000,
  /**
   * A summary of a live execution for the index waits this long for the next one, which takes its
   * outbox row and goes in its place (a summary of an ended execution goes at once): an execution
   * that starts running or ends within it is sent once, not once per change.
   */
  indexHoldMs: 1_000,
  /**
   * The execution index writes the upserts that arrive within this long of the first one in one
   * commit (group commit; each caller is answered once its entry is written); 0 writes each at once.
   */
  indexCommitMs: 25,
  /** Consecutive failed polls after which the worker is taken as gone. */
  maxPollFailures: 5,
  /** Ledger leases: granted for leaseMs, renewed by polls once half of it has passed. */
  leaseMs: 60_000,
  /**
   * A stage whose pools live on several ledger shards holds each part on this
   * short lease until every part is granted (then renews all to leaseMs): a
   * set left incomplete (a later shard kept it waiting, or the Execution died)
   * strands nothing for longer than this (docs/scaling.md).
   */
  ledgerShortLeaseMs: 15_000,
  /** While waiting in the ledger's queue the grant notice wakes the stage; it re-asks this rarely, in case a notice was lost. */
  ledgerReaskMs: 60_000,
  /**
   * A settle the ledger answers while nobody waits for resources (the Execution's outbox sends it
   * after the stage) starts no commit of its own: its writes go with the next call's commit, or
   * with one of their own after this long; 0 commits each at once.
   */
  ledgerSettleCommitMs: 25,
  /**
   * Chain grants (docs/ledger.md, "Chain grants"): a stage whose next stages run one after another
   * on the same worker asks for up to this many of them with it; when nobody waits and all of it
   * fits, one grant covers them all and the stages in between ask the ledger nothing. 0: off.
   */
  chainGrantStages: 8,
  /** Ledger calls that fail (slow, down) are retried after base * 2^(n-1), capped, with full jitter. */
  ledgerRetryBaseMs: 500,
  ledgerRetryCapMs: 30_000,
  /** The longest a stage waits for resources (`waiting_resources`) when its template gives no `queue_timeout_ms`: then `queue_timeout`. */
  maxQueueMs: 30 * 60_000,
  /** The longest a stage may spend in `handshaking` (handshake and process) before the attempt fails with `handshake_timeout`. */
  handshakeTimeoutMs: 60_000,
  /** The longest an execution may run when the request gives no `execution_timeout_ms`: then `execution_timeout`. */
  executionTimeoutMs: 24 * 3600_000,
  /** Worker-reported usage may exceed the stage's reservation in a pool by at most this factor (else 422 `usage_out_of_bounds`). */
  usageMaxFactor: 10,
  /** Re-deliver outbox messages (ledger settles, index updates) with this backoff, capped, for as long as the execution exists. */
  outboxRetryMs: 2_000,
  outboxRetryCapMs: 60_000,
  /** A message still not delivered this long after it was written is marked `undeliverable` (status document, error log, GET /resources/undeliverable); it keeps being retried. */
  outboxUndeliverableMs: 24 * 3600_000,
  /** Event notifications to KAM: call timeout, backoff between redeliveries, and how long before an event is undeliverable. */
  notifyTimeoutMs: 5_000,
  notifyRetryBaseMs: 1_000,
  notifyRetryCapMs: 10 * 60_000,
  notifyRetryWindowMs: 24 * 3600_000,
  /** Pipeline graph: items a fan-out stage may have (at most 99,999), and items of one execution reserved or running at once. */
  maxFanOutItems: 1_000,
  maxRunningItems: 100,
  /** Alarm runs that may fail in a row before the execution is failed with the reason. */
  maxAlarmFailures: 5,
  /** A request_id maps to its execution this long after its first claim (far longer than any client's retry window), then it expires. */
  requestIdRetentionMs: 7 * 24 * 3600_000,
  /** Ended executions keep their data this long, then their alarm deletes it. */
  retentionMs: 7 * 24 * 3600_000,
  /** Request body limits: bytes, nesting depth of objects and arrays, object keys in the whole body (past them: 400 `invalid_json`). */
  maxBodyBytes: 256 * 1024,
  maxCallbackBodyBytes: 1024 * 1024,
  maxJsonDepth: 32,
  maxJsonKeys: 10_000,
  /** Answers we read from peers: a worker's (handshake, process, progress with an inline output) and KAM's (a template). */
  maxWorkerAnswerBytes: 2 * 1024 * 1024,
  maxKamAnswerBytes: 256 * 1024,
  /** Index shards (months) one list or counts request reads at most; past it the answer carries a cursor. */
  maxIndexShardsPerRequest: 24,
  /** Estimate for a stage with no `resources` and no usage history. */
  defaultEstimatedTokens: 1_000,
  defaultStageDurationMs: 5_000,
  /** A start's completion estimate is reused for the same pipeline and priority this long (per isolate). */
  estimateCacheMs: 1_000,
  /** Concurrency slots a `worker:` pool gets when config names none. */
  defaultWorkerConcurrency: 10,
  /** Ledger queue (docs/ledger.md): a waiter's rank rises one priority level per this much waiting. */
  ledgerAgingMs: 30_000,
  /** How many times smaller waiters may pass a head that does not fit before its pools are held for it. */
  ledgerBackfillLimit: 8,
  /** Waiters examined per grant pass. */
  ledgerScanLimit: 256,
  /** Finished reservations are kept this long (idempotent settles, estimates), then purged. */
  ledgerDoneRetentionMs: 86_400_000,
  /** Schedules (docs/operations.md): a fire found more than this late counts as missed (its `missed_fires` policy decides). */
  scheduleGraceMs: 60_000,
  /** A fire whose start keeps failing transiently is given up (`fire_deadline`) this long after its time. */
  scheduleFireDeadlineMs: 15 * 60_000,
  /** Fires kept per schedule (the newest); `last_runs` shows the newest ten. */
  scheduleRunsKept: 50,
  /** How often the queue sampler (actors/queue-sampler.ts) records each pool's queue length from the ledger snapshot. */
  queueSampleMs: 60_000,
  /** How long queue samples are kept (the charts' longest window is 7 days). */
  queueSampleRetentionMs: 8 * 86_400_000,
};
export type Tuning = typeof DEFAULT_TUNING;

export const PriceTable = z.object({
  currency: z.string().min(3).max(3),
  per_unit: z.record(z.string(), z.number().nonnegative()),
});
export type PriceTable = z.infer<typeof PriceTable>;

export interface Config {
  tuning: Tuning;
  workerBindings: Record<string, string>;
  pools: z.infer<typeof PoolConfig>;
  prices: PriceTable;
  /** Quotas of clients without their own (CLIENT_DEFAULTS). */
  clientDefaults: ClientQuotas;
  publicUrl: string;
  /** `notify` for an execution whose request does not say (the NOTIFY_DEFAULT var, "true" or "false"). */
  notifyDefault: boolean;
  /** The Durable Object binding the ledger is reached through (`LEDGER_BINDING`, default RESOURCE_LEDGER). */
  ledgerBinding: string;
  /** The KV namespace and R2 bucket bindings stage data lives in (`DATA_KV_BINDING`, default DATA_REFS; `DATA_R2_BINDING`, default DATA). */
  dataKvBinding: string;
  dataR2Binding: string;
  /** `USAGE_POOLS`: per worker name (or "*"), the pools it may report usage in beyond those its stage reserved. */
  usagePools: Record<string, string[]>;
}

/** The pools a worker may report usage in beyond its stage's reservation; null: any. */
export function usagePoolsFor(config: Config, worker: string): string[] | null {
  return config.usagePools[worker] ?? config.usagePools["*"] ?? null;
}

const cache = new WeakMap<object, Config>();

function parseJson<T>(name: string, raw: unknown, schema: z.ZodType<T>, fallback: T): T {
  if (raw === undefined || raw === null || raw === "") return fallback;
  const value = typeof raw === "string" ? JSON.parse(raw) : raw;
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new Error(`config ${name} is invalid: ${parsed.error.message}`);
  return parsed.data;
}

/** A binding-name var (the fault tests point one at a stand-in that stalls or fails), else the usual binding. */
function bindingName(raw: unknown, fallback: string): string {
  return typeof raw === "string" && raw ? raw : fallback;
}

/** Parsed once per isolate per env object; a bad var fails loudly at first use. */
export function configOf(env: Env): Config {
  let c = cache.get(env);
  if (c) return c;
  const vars = env as unknown as Record<string, unknown>;
  const tuningOverride = parseJson("TUNING", vars.TUNING, z.record(z.string(), z.number()), {});
  c = {
    tuning: { ...DEFAULT_TUNING, ...(tuningOverride as Partial<Tuning>) },
    workerBindings: parseJson("WORKER_BINDINGS", vars.WORKER_BINDINGS, z.record(z.string(), z.string()), {}),
    pools: parseJson("POOLS", vars.POOLS, PoolConfig, []),
    prices: parseJson("PRICES", vars.PRICES, PriceTable, { currency: "USD", per_unit: {} }),
    clientDefaults: parseJson("CLIENT_DEFAULTS", vars.CLIENT_DEFAULTS, ClientQuotas, {}),
    publicUrl: String(vars.PUBLIC_URL ?? "http://orchestrator-v2.internal").replace(/\/$/, ""),
    notifyDefault: parseJson("NOTIFY_DEFAULT", vars.NOTIFY_DEFAULT, z.boolean(), false),
    ledgerBinding: bindingName(vars.LEDGER_BINDING, "RESOURCE_LEDGER"),
    dataKvBinding: bindingName(vars.DATA_KV_BINDING, "DATA_REFS"),
    dataR2Binding: bindingName(vars.DATA_R2_BINDING, "DATA"),
    usagePools: parseJson("USAGE_POOLS", vars.USAGE_POOLS, z.record(z.string(), z.array(z.string())), {}),
  };
  cache.set(env, c);
  return c;
}
