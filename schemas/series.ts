import { z } from "zod";
import { ClientId } from "./common";

/**
 * `GET /metrics/series?window=1h|24h|7d` (OPS): the numbers behind the charts
 * on `/ui` (src/ops-series.ts computes them; docs/operations.md, "Charts").
 * Every series has one value per bucket, in the order of `buckets`.
 */
export const SERIES_WINDOWS = { "1h": { ms: 3_600_000, bucketMs: 60_000 }, "24h": { ms: 86_400_000, bucketMs: 600_000 }, "7d": { ms: 7 * 86_400_000, bucketMs: 3_600_000 } } as const;
export type SeriesWindow = keyof typeof SERIES_WINDOWS;

export const SeriesQuery = z
  .object({
    window: z.enum(["1h", "24h", "7d"]).optional(),
    /** Only this client's executions (the queue series are the ledger's, for every client). */
    client_id: ClientId.optional(),
  })
  .strict();

const Quantiles = z.object({ p50: z.number().nullable(), p95: z.number().nullable() });
const PerBucket = z.array(z.number());
const PerBucketOrNull = z.array(z.number().nullable());

export const SeriesDocument = z.object({
  window: z.enum(["1h", "24h", "7d"]),
  client_id: z.string().nullable(),
  since: z.string(),
  until: z.string(),
  bucket_ms: z.number().int(),
  /** Each bucket's start, ISO 8601. */
  buckets: z.array(z.string()),
  currency: z.string(),
  /** Executions that ended in each bucket, by final status (divide by the bucket's minutes for a rate per minute). */
  executions: z.object({ completed: PerBucket, failed: PerBucket, cancelled: PerBucket }),
  /**
   * Completed stage and item attempts of the executions that ended in the
   * window, per worker: over the whole window, nearest-rank p50/p95 of each
   * phase; per bucket, p50/p95 of the processing time (null: no attempt).
   */
  latency: z.array(
    z.object({
      worker: z.string(),
      attempts: z.number().int(),
      waiting_ms: Quantiles,
      handshake_ms: Quantiles,
      processing_ms: Quantiles,
      processing_p50: PerBucketOrNull,
      processing_p95: PerBucketOrNull,
    }),
  ),
  /** Queue length per pool: the largest sample in each bucket (null: no sample), from actors/queue-sampler.ts. */
  queue: z.array(
    z.object({
      pool: z.string(),
      waiting: PerBucketOrNull,
      samples: z.number().int(),
      /** The newest sample in the window. */
      latest: z.object({ at: z.string(), waiting: z.number().int() }),
    }),
  ),
  /** Cost of the executions that ended in each bucket, per client, and its total over the window. */
  cost: z.array(z.object({ client_id: z.string(), cost: PerBucket, total: z.number() })),
  /** True when an index month or the sampler had more rows than one read takes: the numbers are a lower bound. */
  truncated: z.boolean(),
});
export type SeriesDocument = z.infer<typeof SeriesDocument>;
