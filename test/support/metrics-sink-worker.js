// The Analytics Engine dataset of the workerd tests: a real worker behind the
// orchestrator's METRICS binding (vitest.config.ts), so the code that writes
// data points in production runs unchanged and the tests can read what it
// wrote (miniflare's own local dataset accepts writes but keeps nothing).
// writeDataPoint stores each point in one SQLite object; GET / answers them
// all in write order.
import { DurableObject, WorkerEntrypoint } from "cloudflare:workers";

export class Points extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)");
  }
  add(point) {
    this.ctx.storage.sql.exec("INSERT INTO points (body) VALUES (?)", JSON.stringify(point ?? {}));
  }
  all() {
    return this.ctx.storage.sql.exec("SELECT body FROM points ORDER BY id").toArray().map((r) => JSON.parse(r.body));
  }
}

const store = (env) => env.POINTS.get(env.POINTS.idFromName("all"));

export class Dataset extends WorkerEntrypoint {
  writeDataPoint(point) {
    return store(this.env).add(point);
  }
}

export default {
  async fetch(_request, env) {
    return Response.json(await store(env).all());
  },
};
