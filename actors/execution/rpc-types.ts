import type { ExecutionStatus, SpansDocument, StageDocument, StageStatus, StatusDocument } from "../../schemas/api";
import type { Priority } from "../../schemas/common";
import type { DataReference } from "../../schemas/data";
import type { TraceContext } from "../../src/trace";
import type { RerunSource } from "./rerun";

/** What the Execution's RPC methods take and answer (index.ts), as typed results: no string-matched errors. */

export interface StartInput {
  execution_id: string;
  template_name: string;
  parameters: Record<string, unknown>;
  client_id: string;
  request_id: string | null;
  request_hash: string | null;
  priority: Priority;
  /** Deliver this execution's events to KAM (docs/protocol.md, "Event notifications"). */
  notify: boolean;
  /** W3C trace context (src/trace.ts): the caller's, continued, or a new trace. */
  trace?: TraceContext | null;
  /** A rerun: the original's snapshot and what it takes over (rerun.ts). */
  rerun?: RerunSource;
  /** The execution-wide deadline from now; absent or null: `executionTimeoutMs`. */
  execution_timeout_ms?: number | null;
  /**
   * The start's admission (src/clients.ts admitStart): `free` starts with its
   * slot free, asking no acquireSlot and releasing nothing at the end; absent
   * or `counted`: the slot is asked before the first stage (docs/ledger.md, "Execution slots").
   */
  slot?: "counted" | "free";
  /** With `free` on a sharded ledger: the client's fair-share weight from the admission (else null). */
  client_weight?: number | null;
}

export interface StartResult {
  created: boolean;
  status: ExecutionStatus;
  estimated_completion_ms: number;
  estimated_completion_at: string;
  request_hash: string | null;
}

export type ResultState =
  | { state: "missing" }
  | { state: "not_completed"; status: ExecutionStatus }
  | { state: "expired"; at: number }
  | { state: "completed"; output: unknown; outputRef: DataReference | null; cost: StatusDocument["cost"] };
export type CancelState =
  | { state: "missing" }
  | { state: "already_terminal"; status: StatusDocument }
  | { state: "cancelled"; status: StatusDocument };

export type PauseState =
  | { state: "missing" }
  | { state: "already_terminal"; status: StatusDocument }
  | { state: "paused"; status: StatusDocument };
export type ResumeState = { state: "missing" } | { state: "not_paused"; status: StatusDocument } | { state: "resumed"; status: StatusDocument };
export type ItemsState =
  | { state: "missing" }
  | { state: "not_fan_out" }
  | { state: "ok"; total: number | null; items: StageDocument[]; next_cursor: string | null };

/** The execution's attempts as spans (spans.ts), for `GET /executions/{id}/spans`. */
export type SpansState = { state: "missing" } | { state: "ok"; document: SpansDocument };

/** `readStatus`: a long poll waits up to `wait_ms` (capped by `statusWaitMaxMs`) for a version after `since`. */
export interface StatusReadQuery {
  wait_ms: number;
  /** null: the version current when the call arrives. */
  since: number | null;
  /** The version the caller holds (its `If-None-Match`): answered without a body when it is current. */
  if_none_match: number | null;
}

export type StatusRead =
  | { state: "missing" }
  | {
      state: "ok";
      version: number;
      execution_id: string;
      client_id: string;
      ended: boolean;
      body: string | null;
      /** > 0: a lease on this (ended) document for this long (status-cache.ts): it does not change before it ends. */
      lease_ms: number;
    };

export type DecideState =
  | { state: "missing" }
  | { state: "missing_stage" }
  | { state: "not_awaiting_approval"; stage_status: StageStatus; status: StatusDocument }
  | { state: "decided"; status: StatusDocument };

/** `inputRef`: a data token's read, answered by the Execution (steps.ts `inputRead`). */
export type InputRead = { state: "not_input" } | { state: "gone" } | { state: "ok"; ref: DataReference };
