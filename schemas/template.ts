import { z } from "zod";
import { PoolAmounts, TemplateName, WorkerName } from "./common";

/** One stage of a master template that a stage worker runs, as KAM stores it. */
export const WorkerStage = z.object({
  stage: z.number().int().min(1).max(100),
  type: z.literal("worker").optional(),
  worker: WorkerName,
  template_ref: z.string().min(1).max(128),
  action: z.string().min(1).max(64).optional(),
  timeout_ms: z.number().int().min(100).max(24 * 3600 * 1000).optional(),
  max_attempts: z.number().int().min(1).max(10).optional(),
  resources: PoolAmounts.optional(),
  /** Stage numbers this stage waits for. Absent: the next lower stage number (none for the lowest); `[]`: none. */
  depends_on: z.array(z.number().int().min(1).max(100)).max(50).optional(),
  /** RFC 6901 JSON Pointer into the single dependency's output; the stage runs once per element of that array. */
  for_each: z
    .string()
    .max(256)
    .regex(/^(\/([^~]|~[01])*)*$/, "must be a JSON Pointer (RFC 6901): empty, or /-separated tokens")
    .optional(),
  /** At most this many items of a fan-out stage reserved or running at once. */
  max_parallel: z.number().int().min(1).max(100).optional(),
  /** The longest this stage waits for resources; default `maxQueueMs`. */
  queue_timeout_ms: z.number().int().min(100).max(7 * 24 * 3600 * 1000).optional(),
});
export type WorkerStage = z.infer<typeof WorkerStage>;

/**
 * An approval stage (docs/protocol.md, "Approval stages"): no worker, no
 * resources. When it becomes ready it waits for `approve` or `reject` by KAM or
 * an operator, for at most `timeout_ms` (default `defaultApprovalTimeoutMs`).
 */
export const ApprovalStage = z
  .object({
    stage: z.number().int().min(1).max(100),
    type: z.literal("approval"),
    timeout_ms: z.number().int().min(1_000).max(30 * 24 * 3600 * 1000).optional(),
    /** Stage numbers this stage waits for (the pipeline graph); in a linear pipeline, the stage before it. */
    depends_on: z.array(z.number().int().min(1).max(100)).max(50).optional(),
  })
  .strict();
export type ApprovalStage = z.infer<typeof ApprovalStage>;

/** One stage of a master template, as KAM stores it. */
export const TemplateStage = z.union([ApprovalStage, WorkerStage]);
export type TemplateStage = z.infer<typeof TemplateStage>;
export const isApprovalStage = (s: TemplateStage): s is ApprovalStage => s.type === "approval";

/** `GET /api/master-templates/{name}` on KAM. `pipeline_stages` is a JSON string; an array is accepted too. */
export const MasterTemplateResponse = z.object({
  template_id: z.string().min(1).max(128),
  template_name: TemplateName,
  pipeline_stages: z.union([z.string(), z.array(z.unknown())]),
});

export const PipelineStages = z
  .array(TemplateStage)
  .min(1, "a template needs at least one stage")
  .max(50)
  .superRefine((stages, ctx) => {
    const seen = new Set<number>();
    for (const s of stages) {
      if (seen.has(s.stage)) ctx.addIssue({ code: "custom", message: `stage ${s.stage} appears twice` });
      seen.add(s.stage);
    }
  })
  .transform((stages) => [...stages].sort((a, b) => a.stage - b.stage));

export interface MasterTemplate {
  template_id: string;
  template_name: string;
  stages: TemplateStage[];
}
