/**
 * Rerun from a stage (docs/protocol.md, "Rerun"), as pure rules on the
 * pipeline graph: `from_stage` and every stage that depends on it, directly or
 * through others, run again; every other stage that completed in the original
 * is reused. Stages name what they wait for in `depends_on` (the pipeline
 * graph's, actors/execution/graph.ts; a linear pipeline: the stage before).
 */
export interface RerunNode {
  stage_id: string;
  ord: number;
  status: string;
  depends_on: string[];
}

/** `from` and everything that depends on it, directly or through others. */
export function dependentsOf(nodes: RerunNode[], from: string): Set<string> {
  const out = new Set([from]);
  for (let grew = true; grew; ) {
    grew = false;
    for (const n of nodes) {
      if (!out.has(n.stage_id) && n.depends_on.some((d) => out.has(d))) {
        out.add(n.stage_id);
        grew = true;
      }
    }
  }
  return out;
}

/** The stages a rerun from `from` takes over from the original: completed there, and not depending on `from`. */
export function reusableStages(nodes: RerunNode[], from: string): string[] {
  const again = dependentsOf(nodes, from);
  return nodes.filter((n) => n.status === "completed" && !again.has(n.stage_id)).map((n) => n.stage_id);
}

/** `from_stage` when none is given: the lowest-numbered stage that did not complete (the first, if all did). */
export function defaultFromStage(nodes: RerunNode[]): string | null {
  const sorted = [...nodes].sort((a, b) => a.ord - b.ord);
  return (sorted.find((n) => n.status !== "completed") ?? sorted[0])?.stage_id ?? null;
}
