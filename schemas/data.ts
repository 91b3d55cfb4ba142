import { z } from "zod";

/** Where a payload too large to pass inline lives. Workers read it through `GET /data/:key`. */
export const DataReference = z.object({
  kind: z.enum(["kv", "r2"]),
  key: z.string().min(1).max(512),
  size: z.number().int().nonnegative(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  contentType: z.string().min(1).max(128),
});
export type DataReference = z.infer<typeof DataReference>;
