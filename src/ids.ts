import { nanoid } from "nanoid";
import { EXECUTION_ID_RE } from "../schemas/common";

/** `exec_{unix ms}_{16 url-safe random chars}`. */
export function newExecutionId(now = Date.now()): string {
  return `exec_${now}_${nanoid(16)}`;
}

export function isExecutionId(id: string): boolean {
  return EXECUTION_ID_RE.test(id);
}

export function stageIdFor(order: number): string {
  return `stage_${order}`;
}

/** A key part unique to one write (uploads, stored outputs), so no write can overwrite another's object. */
export function uploadNonce(): string {
  return nanoid(12).replace(/[^A-Za-z0-9]/g, "x");
}
