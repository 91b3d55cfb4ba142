import { z } from "zod";
import { PoolAmounts, TemplateName, WorkerName } from "./common";

/** One stage of a master template, as KAM stores it. */
export const TemplateStage = z.object({
  stage: z.number().int().min(1).max(100),
  worker: WorkerName,
  template_ref: z.string().min(1).max(128),
  action: z.string().min(1).max(64).optional(),
  timeout_ms: z.number().int().min(100).max(24 * 3600 * 1000).optional(),
  max_attempts: z.number().int().min(1).max(10).optional(),
  resources: PoolAmounts.optional(),
});
export type TemplateStage = z.infer<typeof TemplateStage>;

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
