import type { TemplateStage } from "../../schemas/template";

/**
 * The master templates this KAM stand-in serves. `pipeline_stages` is stored the
 * way real KAM returns it: a JSON string. `array_stages` returns an array and
 * `broken_template` a malformed string, so the orchestrator's parsing of both
 * shapes (and its refusal of bad ones) is exercised for real.
 */
export interface StoredTemplate {
  template_id: string;
  template_name: string;
  pipeline_stages: string | unknown[];
}

const GRANULATOR = "bitware-content-granulator";
/** The granulator instance the pipeline graph tests have to themselves (its stats count only them). */
const GRAPH = "bitware-graph-granulator";

/** `stages` granulator `echo` stages (fault_v1: parameters.fault picks the fault) of two attempts each. */
function faultTemplate(template_id: string, template_name: string, stages: number, timeout_ms: number): StoredTemplate {
  const list = Array.from({ length: stages }, (_, i): TemplateStage => ({ stage: i + 1, worker: GRANULATOR, template_ref: "fault_v1", action: "echo", timeout_ms, max_attempts: 2 }));
  return { template_id, template_name, pipeline_stages: JSON.stringify(list) };
}

const courseStages: TemplateStage[] = [
  { stage: 1, worker: GRANULATOR, template_ref: "course_v1", action: "outline", resources: { "tokens:openai": 2000 } },
  { stage: 2, worker: GRANULATOR, template_ref: "course_v1", action: "chapters" },
  { stage: 3, worker: GRANULATOR, template_ref: "course_v1", action: "summary" },
];

const list: StoredTemplate[] = [
  { template_id: "mt_course_001", template_name: "course_creation", pipeline_stages: JSON.stringify(courseStages) },
  {
    template_id: "mt_quick_001",
    template_name: "quick_summary",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "quick_v1", action: "summary" },
    ] satisfies TemplateStage[]),
  },
  { template_id: "mt_array_001", template_name: "array_stages", pipeline_stages: courseStages },
  {
    template_id: "mt_unbound_001",
    template_name: "unbound_worker",
    // No service binding exists for this worker: the orchestrator must fail with `worker_not_bound`.
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: "bitware-not-deployed", template_ref: "unbound_v1", action: "summary" },
    ] satisfies TemplateStage[]),
  },
  // For fault-injection tests: short deadlines and two attempts, so timeouts and retries show quickly.
  faultTemplate("mt_fault_001", "fault_single", 1, 1500),
  faultTemplate("mt_fault_002", "fault_two_stage", 2, 1500),
  // The same two, with a deadline no fault test meets: for faults whose outcome is not a timeout, so a
  // worker slowed by a loaded machine (its 10 ms of work took 2 s at load 4) cannot turn into a second attempt.
  faultTemplate("mt_fault_003", "fault_single_long", 1, 30_000),
  faultTemplate("mt_fault_004", "fault_two_stage_long", 2, 30_000),
  // Data between stages: three `blob` stages whose sizes (parameters.output_bytes) pick the tier
  // (inline, KV, R2). One attempt each, so a data error fails the execution instead of retrying.
  {
    template_id: "mt_data_001",
    template_name: "data_pipeline",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 3, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 1, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  // Two blob stages that may each retry once (the storage fault tests: a stalled read of stage 1's output fails attempt 1 of stage 2).
  {
    template_id: "mt_data_004",
    template_name: "data_retried",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 2, timeout_ms: 60_000 },
      { stage: 2, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 2, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  // Stage 2 also needs a slot of the `gate:data-tamper` pool (created by the test that uses it), so a
  // test can hold stage 2 in waiting_resources, with stage 1's output stored, for as long as it needs.
  {
    template_id: "mt_data_002",
    template_name: "data_gated",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, worker: GRANULATOR, template_ref: "data_v1", action: "blob", max_attempts: 1, timeout_ms: 60_000, resources: { "gate:data-tamper": 1 } },
    ] satisfies TemplateStage[]),
  },
  // Two `echo` stages with room for large data: with `fault: { stage: 1, mode: "large_output" }` stage 1
  // uploads its output, and stage 2 reads it by reference and hands it on.
  {
    template_id: "mt_data_003",
    template_name: "data_relay",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "data_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, worker: GRANULATOR, template_ref: "data_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  // For the soak benchmark: the same shapes with deadlines that hold on a loaded machine.
  {
    template_id: "mt_soak_001",
    template_name: "soak_single",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "soak_v1", action: "echo", timeout_ms: 5000, max_attempts: 2 },
    ] satisfies TemplateStage[]),
  },
  {
    template_id: "mt_soak_002",
    template_name: "soak_two_stage",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "soak_v1", action: "echo", timeout_ms: 5000, max_attempts: 2 },
      { stage: 2, worker: GRANULATOR, template_ref: "soak_v1", action: "echo", timeout_ms: 5000, max_attempts: 2 },
    ] satisfies TemplateStage[]),
  },
  // Three stages on a second granulator instance that the ledger tests cap at two slots.
  {
    template_id: "mt_capped_001",
    template_name: "capped_pipeline",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: "bitware-capped-granulator", template_ref: "capped_v1", action: "outline" },
      { stage: 2, worker: "bitware-capped-granulator", template_ref: "capped_v1", action: "chapters" },
      { stage: 3, worker: "bitware-capped-granulator", template_ref: "capped_v1", action: "summary" },
    ] satisfies TemplateStage[]),
  },
  // Execution control: both stages need the one slot of `gate:control` (created by the test that uses it),
  // so a test can hold a stage in waiting_resources, behind another execution, for as long as it needs.
  {
    template_id: "mt_control_001",
    template_name: "control_gated",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "control_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000, resources: { "gate:control": 1 } },
      { stage: 2, worker: GRANULATOR, template_ref: "control_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  // Ledger sharding (test/shards/acquire.test.ts): each stage needs a gate of its own (created by the
  // test on the gate's shard) beside its worker's pool, so its set spans shards; `shard_trio` also needs
  // `tokens:openai`, so its usage is settled on three shards.
  ...["pair", "deadline", "evict"].map((name) => ({
    template_id: `mt_shard_${name}_001`,
    template_name: `shard_${name}`,
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "shard_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000, resources: { [`gate:shard-${name}`]: 1 } },
    ] satisfies TemplateStage[]),
  })),
  {
    template_id: "mt_shard_trio_001",
    template_name: "shard_trio",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "shard_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000, resources: { "gate:shard-trio": 1, "tokens:openai": 500 } },
    ] satisfies TemplateStage[]),
  },
  // The charts' queue (test/workers/series.test.ts, the browser test): one stage behind the slots of
  // `gate:series` (created by the test that uses it), so a test decides how many wait.
  {
    template_id: "mt_series_001",
    template_name: "series_gated",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "series_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000, resources: { "gate:series": 1 } },
    ] satisfies TemplateStage[]),
  },
  // Approval stages: a person (KAM or an operator) approves or rejects stage 2's passing stage 1's output on.
  {
    template_id: "mt_approval_001",
    template_name: "approval_pipeline",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "approval_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, type: "approval", timeout_ms: 600_000 },
      { stage: 3, worker: GRANULATOR, template_ref: "approval_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  {
    template_id: "mt_approval_002",
    template_name: "approval_short",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "approval_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, type: "approval", timeout_ms: 1_000 },
    ] satisfies TemplateStage[]),
  },
  // An approval with two dependencies (stages 1 and 2 run side by side): approved, it passes on `inputs`.
  {
    template_id: "mt_approval_003",
    template_name: "approval_join",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "approval_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
      { stage: 2, worker: GRANULATOR, template_ref: "approval_v1", action: "list", max_attempts: 1, timeout_ms: 60_000, depends_on: [] },
      { stage: 3, type: "approval", timeout_ms: 600_000, depends_on: [1, 2] },
      { stage: 4, worker: GRANULATOR, template_ref: "approval_v1", action: "echo", max_attempts: 1, timeout_ms: 60_000 },
    ] satisfies TemplateStage[]),
  },
  // One capped stage that waits at most 1.5 s for its slot (`queue_timeout_ms`), then fails `queue_timeout`.
  {
    template_id: "mt_queue_001",
    template_name: "queue_bounded",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: "bitware-capped-granulator", template_ref: "capped_v1", action: "echo", queue_timeout_ms: 1500 },
    ] satisfies TemplateStage[]),
  },
  // The pipeline graph as a course: an outline, one chapter per module written in parallel (fan-out),
  // a quiz and a summary of the chapters side by side, and the assembled course waiting for both.
  {
    template_id: "mt_course_parallel_001",
    template_name: "course_parallel",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRANULATOR, template_ref: "course_v2", action: "outline" },
      { stage: 2, worker: GRANULATOR, template_ref: "course_v2", action: "write_chapter", for_each: "/modules", max_parallel: 4 },
      { stage: 3, worker: GRANULATOR, template_ref: "course_v2", action: "quiz", depends_on: [2] },
      { stage: 4, worker: GRANULATOR, template_ref: "course_v2", action: "summary", depends_on: [2] },
      // The course needs the chapters' text as well as the quiz and the summary.
      { stage: 5, worker: GRANULATOR, template_ref: "course_v2", action: "assemble", depends_on: [2, 3, 4] },
    ] satisfies TemplateStage[]),
  },
  // Pipeline graphs, on a granulator instance of their own so its counters see only these stages.
  // The diamond: 1 -> 2 and 3 -> 4.
  {
    template_id: "mt_graph_001",
    template_name: "graph_diamond",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "gather" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1] },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1] },
      { stage: 4, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [2, 3] },
    ] satisfies TemplateStage[]),
  },
  // A list (parameters.items entries) -> one item per entry, at most 5 at once -> a merge.
  {
    template_id: "mt_graph_002",
    template_name: "graph_fan_out",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "list" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", for_each: "/items", max_parallel: 5, max_attempts: 2 },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather" },
    ] satisfies TemplateStage[]),
  },
  // Two fan-outs over the same list side by side (max_parallel 5 each), then a merge: the execution's maxRunningItems bounds them together.
  {
    template_id: "mt_graph_005",
    template_name: "graph_side_by_side",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "list" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1], for_each: "/items", max_parallel: 5 },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1], for_each: "/items", max_parallel: 5 },
      { stage: 4, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [2, 3] },
    ] satisfies TemplateStage[]),
  },
  // Two stages nothing depends on: the deliverable maps each one's id to its output.
  {
    template_id: "mt_graph_003",
    template_name: "graph_two_sinks",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "list" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1] },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1] },
    ] satisfies TemplateStage[]),
  },
  // for_each at something that is not an array (the list's count).
  {
    template_id: "mt_graph_004",
    template_name: "graph_for_each_scalar",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "list" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", for_each: "/count" },
    ] satisfies TemplateStage[]),
  },
  // Templates whose graph is refused when loaded (invalid_template).
  {
    template_id: "mt_graph_bad_1",
    template_name: "graph_cycle",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [] },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1, 4] },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [2] },
      { stage: 4, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [3] },
    ] satisfies TemplateStage[]),
  },
  {
    template_id: "mt_graph_bad_2",
    template_name: "graph_unknown_dependency",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "gather" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1, 7] },
    ] satisfies TemplateStage[]),
  },
  {
    template_id: "mt_graph_bad_3",
    template_name: "graph_for_each_two_deps",
    pipeline_stages: JSON.stringify([
      { stage: 1, worker: GRAPH, template_ref: "graph_v1", action: "list" },
      { stage: 2, worker: GRAPH, template_ref: "graph_v1", action: "list", depends_on: [] },
      { stage: 3, worker: GRAPH, template_ref: "graph_v1", action: "gather", depends_on: [1, 2], for_each: "/items" },
    ] satisfies TemplateStage[]),
  },
  // Valid JSON, invalid stages (no worker, no template_ref).
  { template_id: "mt_broken_001", template_name: "broken_template", pipeline_stages: '[{"stage": "one"}]' },
];

export const TEMPLATES: ReadonlyMap<string, StoredTemplate> = new Map(list.map((t) => [t.template_name, t]));
