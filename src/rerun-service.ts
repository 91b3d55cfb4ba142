import { type RerunSourceState, dataOwners } from "../actors/execution/rerun";
import { RerunRequest, type RerunResponse } from "../schemas/api";
import { admitStart } from "./clients";
import { configOf } from "./config";
import { call, canonical, checkExecutionId, claimExecutionId, executionStub, startAnswer } from "./execution-service";
import { sha256Hex } from "./hash";
import { ApiError, parseWith } from "./http";

/**
 * `POST /executions/:id/rerun` and RPC `rerun(id, request)` (docs/protocol.md,
 * "Rerun"): a new execution of the original's template snapshot, client and
 * priority, that takes over the stages not depending on `from_stage`.
 */
export interface RerunOutcome {
  status: 200 | 202;
  body: RerunResponse;
}

export async function rerunExecution(env: Env, id: unknown, raw: unknown, origin: string): Promise<RerunOutcome> {
  const originalId = checkExecutionId(id);
  const input = parseWith(RerunRequest, raw ?? {}, "body");
  const src = await call<RerunSourceState>(env, executionStub(env, originalId).rerunSource(input.from_stage ?? null), "execution rerun source");
  if (src.state === "missing") throw new ApiError(404, "not_found", `no execution ${originalId}`);
  if (src.state === "not_terminal") {
    throw new ApiError(409, "not_terminal", `the execution is ${src.status}: rerun it once it has ended (or cancel it)`, { status: src.status });
  }
  if (src.state === "expired") throw new ApiError(410, "data_expired", `the execution's data was deleted at ${new Date(src.at).toISOString()} (retention)`);
  if (src.state === "invalid_stage") throw new ApiError(400, "invalid_request", src.message, [{ path: "from_stage", message: src.message }]);
  const source = src.source;
  const parameters = input.parameters ?? source.parameters;
  const admitted = await admitStart(env, source.client_id, source.priority);
  const requestId = input.request_id ?? null;
  const requestHash = requestId ? await sha256Hex(canonical({ rerun_of: originalId, from_stage: source.from_stage, parameters })) : null;
  const { executionId } = await claimExecutionId(env, source.client_id, requestId, requestHash);
  // Stored outputs are taken over by reference: their owners keep them until this rerun's own data expires.
  for (const owner of dataOwners(source, executionId)) {
    const held = await call<boolean>(env, executionStub(env, owner).holdData(executionId), "execution data hold");
    if (!held) throw new ApiError(410, "data_expired", `the data of ${owner}, which this rerun would reuse, was deleted (retention)`);
  }
  const result = await call(
    env,
    executionStub(env, executionId).start({
      execution_id: executionId,
      template_name: source.template_name,
      parameters,
      client_id: source.client_id,
      request_id: requestId,
      request_hash: requestHash,
      priority: source.priority,
      notify: input.notify ?? source.notify ?? configOf(env).notifyDefault,
      rerun: source,
      ...admitted,
    }),
    "execution start",
  );
  const answer = startAnswer(executionId, result, origin);
  return {
    status: answer.status,
    body: { ...answer.body, rerun_of: originalId, from_stage: source.from_stage, reused: source.reused.map((r) => r.stage_id) },
  };
}
