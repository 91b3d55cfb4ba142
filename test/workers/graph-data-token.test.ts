import { describe, expect, it } from "vitest";
import { OPS, call, ended, waitFor } from "../support/api";
import { type Gathered, startGraph as start, stored } from "../support/graph";

/**
 * A merge's data token after many stored items (the fan-out and fan-in of
 * graph-data.test.ts, on the graph granulator instance): what it asserts is
 * the token and the data it reads, which no ledger call decides, so `shards`
 * does not run it again (graph-data.test.ts is in SHARDED_AGAIN for its leak
 * checks and the item bound).
 */
describe("a merge's data token", () => {
  it("a merge's data token is as long after 100 stored items as after 3, and bounded: the token lists no keys, and the merge reads all 100", async () => {
    // Each item's output is over the inline limit (64 KiB): every item is stored by reference, as with a 1,000-item fan-out.
    const merge = async (items: number) => {
      const id = await start("graph_fan_out", { items, steps: 1, step_ms: 0, output_bytes: 66_000, fault: { stage: 2, mode: "large_output" } });
      expect((await waitFor(id, ended, 100_000)).status).toBe("completed");
      const rows = await stored(id);
      const keys = Array.from({ length: items }, (_, i) => rows.get(`stage_2.${i}`)!.ref!.key);
      // After many items the merge's own output is over the inline limit too: read it from the deliverable's content.
      const content = await call(`/executions/${id}/result/content`, { headers: OPS });
      expect(content.status).toBe(200);
      const out = (await content.json()) as Gathered;
      expect(out.stage).toBe("stage_3");
      // Every item's output was read in full with that one token (none refused).
      expect(Object.keys(out.read!).sort()).toEqual([...keys].sort());
      for (const key of keys) expect(out.read![key]).toMatchObject({ size: 66_002 });
      return out.data_token_bytes!;
    };
    const three = await merge(3);
    // 100 items keep the test short on a shared machine; the bound below is what a 1,000-item merge gets too.
    const many = await merge(100);
    // Listing keys made it grow by ~108 bytes a key (~11 KB for 100, ~108 KB for 1,000); now it is the claims alone.
    expect(many).toBe(three);
    expect(three).toBeLessThan(400);
  }, 120_000);
});
