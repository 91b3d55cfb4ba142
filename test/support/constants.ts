/** Secrets and tuning shared by the test projects (never real values). */
export const TEST_SECRETS = {
  WORKER_SECRET: "test-worker-secret-0123456789abcdef",
  KAM_TOKEN: "test-kam-token",
  OPS_TOKEN: "test-ops-token",
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
  outboxRetryMs: 200,
  maxPollFailures: 3,
};
