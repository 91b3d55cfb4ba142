/** The client document (GET /clients/:client_id): quotas in force and usage, from the ledger's state. */
import type { ClientDocument, ClientQuotas } from "../../schemas/clients";
import { rollMonth, type ClientState } from "../ledger-rules";

export function clientDocument(c: ClientState, quotas: ClientQuotas, runningExecutions: number, currency: string, now: number): ClientDocument {
  rollMonth(c, now);
  const budget = quotas.monthly_budget;
  return {
    client_id: c.id,
    quotas,
    own_quotas: c.own,
    currency,
    usage: {
      running_executions: runningExecutions,
      running_stages: c.running,
      month: c.month,
      spent: c.spent,
      held: c.heldCost,
      remaining: budget === undefined ? null : Math.max(0, budget - c.spent - c.heldCost),
      waiting_stages: c.waiting,
    },
  };
}
