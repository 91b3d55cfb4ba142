import { defineWorker, errorResponse, jsonResponse } from "../../packages/worker-kit";
import { faultHooks } from "./faults";
import { WORKER_ID, acceptStage, runStage } from "./job";
import type { GranulatorStats } from "./stats";
import { ACTIONS } from "./work";

export { GranulatorStats } from "./stats";

/**
 * Local stand-in for the bitware-content-granulator stage worker, built on the
 * worker kit (packages/worker-kit): the kit serves the protocol and keeps each
 * stage's job in a GranulatorJob object; this worker adds the work (job.ts,
 * work.ts), its concurrency stats (GranulatorStats) and fault injection (faults.ts).
 */
export interface GranulatorEnv {
  WORKER_SECRET: string;
  JOBS: DurableObjectNamespace;
  STATS: DurableObjectNamespace<GranulatorStats>;
  ORCHESTRATOR: Fetcher;
}

const stats = (env: GranulatorEnv) => env.STATS.get(env.STATS.idFromName("global"));
const statsKey = (job: { executionId: string; stageId: string; attempt: number }) => `${job.executionId}:${job.stageId}#${job.attempt}`;

const worker = defineWorker<GranulatorEnv>({
  workerId: WORKER_ID,
  binding: "JOBS",
  actions: ACTIONS,
  accept: (req, { counters }) => acceptStage(req, counters),
  run: runStage,
  // A bug, or an input the work cannot handle: asking again would fail the same way.
  errorCode: "granulation_failed",
  // Counted as the worker sees them; each end is recorded before the result is visible.
  lifecycle: {
    onBegin: (job, env) => stats(env).begin(statsKey(job)),
    onEnd: (job, outcome, env) => stats(env).end(statsKey(job), outcome),
  },
  hooks: faultHooks,
  async routes(request, env, url) {
    if (url.pathname === "/api/stats") {
      if (request.method !== "GET") return notAllowed(request.method, "GET");
      return jsonResponse(200, await stats(env).snapshot());
    }
    if (url.pathname === "/api/stats/jobs") {
      if (request.method !== "GET") return notAllowed(request.method, "GET");
      return jsonResponse(200, { jobs: await stats(env).active() });
    }
    if (url.pathname === "/api/stats/reset") {
      if (request.method !== "POST") return notAllowed(request.method, "POST");
      return jsonResponse(200, await stats(env).reset());
    }
    return null;
  },
});

/**
 * The kit's job object. `loseAlarm`, `alarmAt` and `calls` are test hooks, reachable only through a Durable
 * Object binding to JOBS, which only the tests have (never over HTTP): `loseAlarm` drops the
 * object's alarm, as a kill between a run's write of its next wake-up and its setAlarm would, so a
 * test can show the next progress poll re-arms it (the kit's healAlarm).
 */
export class GranulatorJob extends worker.JobObject {
  /** `lost`: no alarm is set and no alarm handler is running (one would re-arm at its end), so it stays lost. */
  async loseAlarm(): Promise<{ lost: boolean }> {
    await this.ctx.storage.deleteAlarm();
    const running = (this as unknown as { inAlarm: boolean }).inAlarm;
    return { lost: !running && (await this.ctx.storage.getAlarm()) === null };
  }
  async alarmAt(): Promise<number | null> {
    return this.ctx.storage.getAlarm();
  }
  /** The calls the job received and the callbacks it sent, as its log keeps them (also while a handshake is still being answered). */
  async calls(): Promise<{ attempt: number; what: string; status: number }[]> {
    return this.ctx.storage.sql.exec("SELECT attempt, what, status FROM kit_log ORDER BY seq").toArray() as { attempt: number; what: string; status: number }[];
  }
}
export default worker.handler;

function notAllowed(method: string, allow: string): Response {
  const res = errorResponse(405, "method_not_allowed", `${method} is not supported here`);
  res.headers.set("allow", allow);
  return res;
}
