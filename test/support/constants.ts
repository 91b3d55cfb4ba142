/** Each stage worker's own secret (the orchestrator holds them as WORKER_SECRETS). Never real values. */
export const TEST_WORKER_SECRETS = {
  "bitware-content-granulator": "test-granulator-secret-0123456789abcdef",
  "bitware-capped-granulator": "test-capped-secret-0123456789abcdef",
  "bitware-graph-granulator": "test-graph-secret-0123456789abcdef",
};

/** Secrets shared by the test projects (never real values). */
export const TEST_SECRETS = {
  CALLBACK_SECRET: "test-callback-secret-0123456789abcdef0123",
  WORKER_SECRETS: JSON.stringify(TEST_WORKER_SECRETS),
  /** The demo granulator's own secret in a `wrangler dev` session (it reads WORKER_SECRET). */
  WORKER_SECRET: TEST_WORKER_SECRETS["bitware-content-granulator"],
  KAM_TOKEN: "test-kam-token",
  OPS_TOKEN: "test-ops-token",
  NOTIFY_SECRET: "test-notify-secret-0123456789abcdef",
};

/** The content granulator's previous secret, as during a rotation (the worker kit's WORKER_SECRET_PREVIOUS). */
export const TEST_PREVIOUS_WORKER_SECRET = "test-granulator-secret-previous-0123456789";

/** Previous values, as during a rotation: they still verify, they never sign (workers project only). */
export const TEST_PREVIOUS_SECRETS = {
  CALLBACK_SECRET_PREVIOUS: "test-callback-secret-previous-0123456789ab",
  KAM_TOKEN_PREVIOUS: "test-kam-token-previous",
  OPS_TOKEN_PREVIOUS: "test-ops-token-previous",
};

/**
 * Short timings so tests do not wait on defaults. Alarms fire on real time in
 * workerd, so anything a test drives by hand with runDurableObjectAlarm is
 * scheduled far enough ahead not to fire by itself mid-test.
 */
export const TEST_TUNING = {
  kamTimeoutMs: 2_000,
  kamMaxAttempts: 2,
  kamRetryBaseMs: 50,
  workerCallTimeoutMs: 2_000,
  ledgerCallTimeoutMs: 2_000,
  retryBaseMs: 50,
  retryCapMs: 200,
  pollInitialMs: 100,
  pollMaxMs: 500,
  // As deployed: a live execution's index summary waits this long for the next (outbox.ts).
  indexHoldMs: 1_000,
  outboxRetryMs: 200,
  maxPollFailures: 3,
  notifyRetryBaseMs: 50,
  notifyRetryCapMs: 200,
  // Short, so an event KAM never accepts is given up on within a test (24 h by default).
  notifyRetryWindowMs: 5_000,
  // Fewer than the months the index tests span, so reads that cross more of them stop at the bound with a cursor.
  maxIndexShardsPerRequest: 4,
  // Fewer than two fan-outs side by side may run (max_parallel 5 each), so the graph test sees the bound hold.
  maxRunningItems: 6,
  // The suite reads every change of an ended execution at once; leases on ended documents have a project of their own (test/status-leases).
  statusLeaseMs: 0,
  // Every read the Execution serves from memory is compared with SQL (actors/execution/read-cache.ts).
  readCacheCheck: 1,
  // Tests change quotas through the ledger as well as over HTTP: every start asks it; the cache has a project of its own (test/status-leases).
  admissionCacheMs: 0,
};

/**
 * Scoped keys (src/api-keys.ts): the orchestrator holds only their SHA-256 in
 * API_KEYS (vitest.config.ts hashes them). Never real values.
 */
export const TEST_API_KEYS = {
  alpha: { key: "test-api-key-alpha-0123456789abcdef", name: "alpha-app", role: "client", clients: ["client_alpha"] },
  beta: { key: "test-api-key-beta-0123456789abcdef", name: "beta-app", role: "client", clients: ["client_beta"] },
  /** A KAM-role key for two clients. */
  pair: { key: "test-api-key-pair-0123456789abcdef", name: "kam-pair", role: "kam", clients: ["client_alpha", "client_gamma"] },
  /** An operator key scoped to one client. */
  opsAlpha: { key: "test-api-key-ops-alpha-0123456789abcdef", name: "ops-alpha", role: "ops", clients: ["client_alpha"] },
} as const;

/**
 * The `shards` project's ledger layout (vitest.config.ts): 4 ledger objects;
 * the worker pools on shard 0, `tokens:*` on 1, `gate:*` on 2, other pools by
 * the hash of their name, a client's own state by its id. So most demo stages
 * hold parts on two or three shards (docs/scaling.md, "Tests").
 */
export const TEST_SHARDS = {
  LEDGER_SHARDS: "4",
  LEDGER_SHARD_MAP: JSON.stringify({ "worker:*": 0, "tokens:*": 1, "gate:*": 2 }),
};
