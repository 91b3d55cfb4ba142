import type { StatusDocument } from "../../schemas/api";
import { OPS, call, ended, startExecution, waitFor } from "./api";

/**
 * The metrics and charts tests' known workload for one client: three
 * `quick_summary` executions that complete, one `unbound_worker` that fails
 * (`worker_not_bound`) and one that is cancelled while its stage runs.
 * Answers their status documents once each has ended, in that order.
 */
export async function knownWorkload(clientId: string, parameters: Record<string, unknown>): Promise<StatusDocument[]> {
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) ids.push((await startExecution({ template_name: "quick_summary", parameters, client_id: clientId })).body.execution_id);
  ids.push((await startExecution({ template_name: "unbound_worker", parameters: {}, client_id: clientId })).body.execution_id);
  const hanging = (await startExecution({ template_name: "quick_summary", parameters: { fault: { mode: "hang" } }, client_id: clientId })).body.execution_id;
  await waitFor(hanging, (d) => d.stages[0]?.status === "processing");
  await call(`/executions/${hanging}/cancel`, { method: "POST", headers: OPS });
  ids.push(hanging);
  const docs: StatusDocument[] = [];
  for (const id of ids) docs.push(await waitFor(id, ended));
  return docs;
}
