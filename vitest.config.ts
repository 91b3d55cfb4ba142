import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";
import { TEST_PREVIOUS_SECRETS, TEST_PREVIOUS_WORKER_SECRET, TEST_SECRETS, TEST_TUNING, TEST_WORKER_SECRETS } from "./test/support/constants.ts";

const compatibilityDate = "2026-11-01";

/**
 * The worker under test runs as the plugin's runner, named after the project;
 * auxiliary workers reach the orchestrator through it. A stage worker binds its
 * default entrypoint (fetch only); KAM binds the KamApi entrypoint (RPC).
 */
const ORCHESTRATOR_AS_WORKER = "vitest-plugin-runner-workers";
const ORCHESTRATOR_AS_KAM = { name: "vitest-plugin-runner-workers", entrypoint: "KamApi" };

/** The demo granulator as an auxiliary worker under a given name (each name has its own objects and stats). */
function granulator(name: keyof typeof TEST_WORKER_SECRETS) {
  return {
    name,
    modules: true,
    scriptPath: "./dist/test-workers/content-granulator/index.js",
    compatibilityDate,
    // Its own secret: another worker's does not open it.
    bindings: {
      WORKER_SECRET: TEST_WORKER_SECRETS[name],
      ...(name === "bitware-content-granulator" ? { WORKER_SECRET_PREVIOUS: TEST_PREVIOUS_WORKER_SECRET } : {}),
    },
    // The short form would give key-value storage; the demo's objects use SQLite.
    durableObjects: {
      JOBS: { className: "GranulatorJob", useSQLite: true },
      STATS: { className: "GranulatorStats", useSQLite: true },
    },
    serviceBindings: { ORCHESTRATOR: ORCHESTRATOR_AS_WORKER },
  };
}

// The orchestrator holds each worker's secret in WORKER_SECRETS, with no shared WORKER_SECRET to fall back on.
const { WORKER_SECRET: _shared, ...ORCHESTRATOR_SECRETS } = TEST_SECRETS;

/**
 * Three projects:
 * - `workers`: tests that run inside workerd next to the orchestrator's real
 *   Durable Objects, with the demo stand-ins as auxiliary workers behind the
 *   real service bindings (built by test/support/global-setup.ts, since
 *   auxiliary workers take a built script, not a wrangler config);
 * - `e2e`: Node tests that start the same multi-worker `wrangler dev` session
 *   as `npm start` and drive it over HTTP;
 * - `browser`: the operator pages in the system Chromium (/usr/bin/chromium)
 *   through playwright-core, over the same kind of session.
 */
export default defineConfig({
  test: {
    projects: [
      {
        plugins: [
          cloudflareTest({
            wrangler: { configPath: "./wrangler.toml" },
            miniflare: {
              bindings: {
                ...ORCHESTRATOR_SECRETS,
                ...TEST_PREVIOUS_SECRETS,
                TUNING: JSON.stringify(TEST_TUNING),
                LOG_LEVEL: "error",
                WORKER_BINDINGS: JSON.stringify({
                  "bitware-content-granulator": "CONTENT_GRANULATOR",
                  "bitware-capped-granulator": "CAPPED_GRANULATOR",
                }),
              },
              serviceBindings: { CAPPED_GRANULATOR: "bitware-capped-granulator", RPC_PROBE: "rpc-probe" },
              workers: [
                {
                  name: "bitware-key-account-manager",
                  modules: true,
                  scriptPath: "./dist/test-workers/kam/index.js",
                  compatibilityDate,
                  serviceBindings: { ORCHESTRATOR: ORCHESTRATOR_AS_KAM },
                },
                // Calls the orchestrator's RPC methods through a worker's and KAM's kind of binding.
                {
                  name: "rpc-probe",
                  modules: true,
                  scriptPath: "./test/support/rpc-probe-worker.js",
                  compatibilityDate,
                  serviceBindings: { AS_WORKER: ORCHESTRATOR_AS_WORKER, AS_KAM: ORCHESTRATOR_AS_KAM },
                },
                granulator("bitware-content-granulator"),
                // A second instance for tests that need a worker (and its pool and counters) to themselves.
                granulator("bitware-capped-granulator"),
              ],
            },
          }),
        ],
        test: {
          name: "workers",
          include: ["test/workers/**/*.test.ts"],
          globalSetup: ["./test/support/global-setup.ts"],
          testTimeout: 30_000,
        },
      },
      {
        test: {
          name: "e2e",
          include: ["test/e2e/**/*.test.ts"],
          environment: "node",
          testTimeout: 120_000,
          hookTimeout: 120_000,
          fileParallelism: false,
        },
      },
      {
        // The operator pages in the system Chromium through playwright-core, over `wrangler dev`.
        test: {
          name: "browser",
          include: ["test/browser/**/*.test.ts"],
          environment: "node",
          testTimeout: 180_000,
          hookTimeout: 120_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
