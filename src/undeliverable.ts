import { z } from "zod";
import type { Execution } from "../actors/execution";
import type { RetryUndeliverableRequest, UndeliverableList } from "../schemas/api";
import { configOf } from "./config";
import { ApiError, parseWith } from "./http";
import { withTimeout } from "./outbound";

/**
 * Operators' view of the messages executions could not deliver for longer
 * than `outboxUndeliverableMs` (ledger settles and releases, worker cancels,
 * index updates). Each Execution keeps retrying its own; it lists them in
 * EXECUTION_CACHE under `undeliverable:{execution_id}:{outbox_id}` and removes
 * the entry once one is delivered. `POST /resources/undeliverable/retry` makes
 * them due at once.
 */
type UndeliverableEntry = UndeliverableList["items"][number];

const PREFIX = "undeliverable:";
const MAX_PER_RETRY = 100;

function stub(env: Env, executionId: string): DurableObjectStub<Execution> {
  const ns = env.EXECUTION as unknown as DurableObjectNamespace<Execution>;
  return ns.get(ns.idFromName(executionId));
}

export async function listUndeliverable(env: Env, url: URL): Promise<UndeliverableList> {
  const limit = parseWith(z.coerce.number().int().min(1).max(1000).default(100), url.searchParams.get("limit") ?? undefined, "limit");
  const cursor = url.searchParams.get("cursor") ?? undefined;
  const page = await kv(env, env.EXECUTION_CACHE.list<UndeliverableEntry>({ prefix: PREFIX, limit, cursor }));
  return {
    items: page.keys.flatMap((k) => (k.metadata ? [k.metadata] : [])),
    cursor: page.list_complete ? null : page.cursor,
  };
}

/** Makes the listed messages (of one execution, or the first hundred) due now; answers what was asked of whom. */
export async function retryUndeliverable(env: Env, body: z.infer<typeof RetryUndeliverableRequest>): Promise<{ executions: number; retried: number }> {
  const prefix = body.execution_id ? `${PREFIX}${body.execution_id}:` : PREFIX;
  const page = await kv(env, env.EXECUTION_CACHE.list({ prefix, limit: MAX_PER_RETRY }));
  const ids = [...new Set(page.keys.map((k) => k.name.slice(PREFIX.length).split(":")[0]))];
  const t = configOf(env).tuning.objectCallTimeoutMs;
  const answers = await Promise.all(
    ids.map((id) => withTimeout(stub(env, id).retryUndeliverable(), t, "execution retry").catch(() => ({ retried: 0 }))),
  );
  return { executions: ids.length, retried: answers.reduce((n, a) => n + a.retried, 0) };
}

async function kv<T>(env: Env, p: Promise<T>): Promise<T> {
  try {
    return await withTimeout(p, configOf(env).tuning.storageCallTimeoutMs, "kv.list");
  } catch (err) {
    throw new ApiError(503, "unavailable", `the undeliverable list could not be read: ${err instanceof Error ? err.name : "error"}`);
  }
}

