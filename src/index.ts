import { WorkerEntrypoint } from "cloudflare:workers";
import type { ExecuteResponse, RerunResponse, ResultDocument, StatusDocument } from "../schemas/api";
import { cancelExecution, decideStage, getResult, getStatus, pauseExecution, resumeExecution, startExecution } from "./execution-service";
import { ApiError } from "./http";
import { setLogLevel } from "./log";
import { rerunExecution } from "./rerun-service";
import { handle, requireConfigured } from "./routes";

export { Execution } from "../actors/execution/index";
export { ExecutionIndex } from "../actors/execution-index";
export { QueueSampler } from "../actors/queue-sampler";
export { RequestRegistry } from "../actors/request-registry";
export { ResourceLedger } from "../actors/resource-ledger";
export { ScheduleShard } from "../actors/schedule-shard";

/** What an RPC caller gets: the same body and status the HTTP API would answer. */
export type RpcResult<T> =
  | { ok: true; status: number; data: T }
  | { ok: false; status: number; error: { code: string; message: string; details?: unknown } };

async function rpc<T>(env: Env, work: () => Promise<{ status: number; data: T }>): Promise<RpcResult<T>> {
  try {
    requireConfigured(env);
    const { status, data } = await work();
    return { ok: true, status, data };
  } catch (err) {
    if (err instanceof ApiError) return { ok: false, status: err.status, error: { code: err.code, message: err.message, details: err.details } };
    return { ok: false, status: 500, error: { code: "internal_error", message: "internal error" } };
  }
}

/**
 * The front Worker's default entrypoint: `fetch` only (the HTTP API). Stage
 * workers bind to it for their callbacks and data routes, so nothing else may
 * be reachable through it: a binding is a capability.
 */
export default class Orchestrator extends WorkerEntrypoint<Env> {
  override fetch(request: Request): Promise<Response> {
    setLogLevel(this.env);
    return handle(request, this.env, this.ctx);
  }
}

/**
 * KAM's RPC surface, a named entrypoint only KAM's binding names
 * (`entrypoint = "KamApi"`). The methods do the same work with the same
 * validation as the HTTP routes; the binding is the capability, so no token.
 */
export class KamApi extends WorkerEntrypoint<Env> {
  execute(request: unknown): Promise<RpcResult<ExecuteResponse>> {
    return rpc(this.env, async () => {
      const out = await startExecution(this.env, request, "https://orchestrator-v2.internal");
      return { status: out.status, data: out.body };
    });
  }

  getStatus(id: string): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await getStatus(this.env, id) }));
  }

  getResult(id: string): Promise<RpcResult<ResultDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await getResult(this.env, id, "https://orchestrator-v2.internal") }));
  }

  cancel(id: string): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await cancelExecution(this.env, id) }));
  }

  pause(id: string): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await pauseExecution(this.env, id) }));
  }

  resume(id: string): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await resumeExecution(this.env, id) }));
  }

  /** Reruns an ended execution (`request`: `{ from_stage?, parameters?, request_id?, notify? }`): a new execution, 202. */
  rerun(id: string, request?: unknown): Promise<RpcResult<RerunResponse>> {
    return rpc(this.env, async () => {
      const out = await rerunExecution(this.env, id, request ?? {}, "https://orchestrator-v2.internal");
      return { status: out.status, data: out.body };
    });
  }

  /** Approves an approval stage (`body`: `{ comment? }`), as `by: "kam"`. */
  approve(id: string, stageId: string, body?: unknown): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await decideStage(this.env, id, stageId, true, "kam", body) }));
  }

  reject(id: string, stageId: string, body?: unknown): Promise<RpcResult<StatusDocument>> {
    return rpc(this.env, async () => ({ status: 200, data: await decideStage(this.env, id, stageId, false, "kam", body) }));
  }
}
