import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { migrateControl } from "../../actors/execution/control";
import { LATEST_SCHEMA } from "../../actors/execution/schema";
import { migrate } from "../../actors/execution/store";

/**
 * A new Execution creates its tables at the latest version in one run
 * (actors/execution/schema.ts): no ALTER TABLE on every new object.
 */
describe("the Execution's schema", () => {
  it("the schema a new object creates is what the migrations make of an older one's: migrating it changes nothing", async () => {
    const stub = env.EXECUTION.get(env.EXECUTION.newUniqueId());
    const { before, after } = await runInDurableObject(stub, (_i, state) => {
      const sql = state.storage.sql;
      const schema = () => sql.exec("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%' ORDER BY type, name").toArray();
      // Nothing but the new object's schema: every table dropped, then created as a new object creates it.
      for (const r of sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%'").toArray()) sql.exec(`DROP TABLE ${String(r.name)}`);
      sql.exec(LATEST_SCHEMA);
      const before = schema();
      migrateControl(state.storage);
      migrate(state.storage);
      return { before, after: schema() };
    });
    expect(before.map((r) => r.name)).toEqual(expect.arrayContaining(["execution", "stages", "timers", "outbox", "spans", "reservations", "stages_by_parent"]));
    expect(after).toEqual(before);
  });

  it("its tables keyed by their primary key alone are WITHOUT ROWID, and the outbox ids write no sqlite_sequence row", async () => {
    const stub = env.EXECUTION.get(env.EXECUTION.newUniqueId());
    const tables = await runInDurableObject(stub, (_i, state) =>
      state.storage.sql.exec("SELECT name, sql FROM sqlite_master WHERE type = 'table'").toArray().map((r) => ({ name: String(r.name), sql: String(r.sql) })),
    );
    const sqlOf = (name: string) => tables.find((t) => t.name === name)?.sql ?? "";
    for (const name of ["timers", "spans", "reservations", "data_objects", "reruns", "data_holds", "live_tickets"]) expect(sqlOf(name)).toMatch(/WITHOUT ROWID\s*$/);
    expect(sqlOf("outbox")).toMatch(/id INTEGER PRIMARY KEY,/);
    expect(sqlOf("outbox")).not.toMatch(/AUTOINCREMENT/);
  });
});
