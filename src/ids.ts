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
