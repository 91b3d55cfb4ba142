import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { migrateControl } from "../../actors/execution/control";
import { LAZY_GROUPS, missingTableAnswer } from "../../actors/execution/lazy-tables";
import { ALL_TABLES_SCHEMA, LATEST_SCHEMA, createTables, hasTables } from "../../actors/execution/schema";
import { migrate } from "../../actors/execution/store";
import { newExecutionId } from "../../src/ids";
import { OPS, call, ended, executionStub, startExecution, waitFor } from "../support/api";

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

  it("a new object's stages table is WITHOUT ROWID; an older object's rowid one is kept by the migration, its rows as they were, and answers the stage SQL as the new one does", async () => {
    // The schema as it was before stages became WITHOUT ROWID.
    const older = LATEST_SCHEMA.replace(/(CREATE TABLE IF NOT EXISTS stages \([\s\S]*?\)) WITHOUT ROWID;/, "$1;");
    // The same statements on an object created with `schema`, around the start's createTables.
    const run = (schema: string) =>
      runInDurableObject(env.EXECUTION.get(env.EXECUTION.newUniqueId()), (_i, state) => {
        const sql = state.storage.sql;
        for (const r of sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%'").toArray()) sql.exec(`DROP TABLE ${String(r.name)}`);
        sql.exec(schema);
        sql.exec("INSERT INTO execution (id, execution_id, template_name, client_id, priority, parameters, status, created_at) VALUES (1, 'e', 't', 'c', 'normal', '{}', 'running', 1)");
        sql.exec("INSERT OR IGNORE INTO stages (stage_id, ord, worker, template_ref, action, timeout_ms, max_attempts, status, depends_on) VALUES ('stage_1', 1, 'w', 't', 'a', 1000, 1, 'pending', '[]')");
        createTables(state.storage);
        sql.exec("UPDATE stages SET status = 'completed' WHERE stage_id = 'stage_1'");
        let rowid = true;
        try {
          sql.exec("SELECT rowid FROM stages").toArray();
        } catch {
          rowid = false; // a WITHOUT ROWID table has no rowid column
        }
        return {
          ddl: String(sql.exec("SELECT sql FROM sqlite_master WHERE name = 'stages'").one().sql),
          rowid,
          rows: sql.exec("SELECT stage_id, ord, status, depends_on FROM stages ORDER BY ord").toArray(),
        };
      });
    const [fresh, kept] = [await run(LATEST_SCHEMA), await run(older)];
    expect(fresh.ddl).toMatch(/WITHOUT ROWID\s*$/);
    expect(fresh.rowid).toBe(false);
    expect(kept.ddl).not.toMatch(/WITHOUT ROWID/);
    expect(kept.rowid).toBe(true);
    expect(kept.rows).toEqual([{ stage_id: "stage_1", ord: 1, status: "completed", depends_on: "[]" }]);
    expect(kept.rows).toEqual(fresh.rows);
  });

  it("a new object creates no tables in its constructor, nor when it is asked for an execution it does not have: they come with start(), in its commit", async () => {
    const stub = executionStub(newExecutionId());
    const tables = () => runInDurableObject(stub, (_i, state) => hasTables(state.storage));
    expect(await tables()).toBe(false);
    // The reads an unknown id gets (GET /executions/:id, its result, a stray callback) answer "none" and write nothing.
    expect(await stub.readStatus({ wait_ms: 0, since: null, if_none_match: null })).toEqual({ state: "missing" });
    expect(await stub.getStatus()).toBeNull();
    expect(await stub.getResult()).toEqual({ state: "missing" });
    expect((await call(`/executions/${newExecutionId()}`, { headers: OPS })).status).toBe(404);
    expect(await tables()).toBe(false);
    // The execution's first write creates them.
    const { body } = await startExecution({ template_name: "fault_two_stage", parameters: { steps: 1, step_ms: 10 }, client_id: "client_schema" });
    expect(await runInDurableObject(executionStub(body.execution_id as string), (_i, state) => hasTables(state.storage))).toBe(true);
  });

  it("its tables keyed by their primary key alone are WITHOUT ROWID, and the outbox ids write no sqlite_sequence row", async () => {
    const stub = env.EXECUTION.get(env.EXECUTION.newUniqueId());
    const tables = await runInDurableObject(stub, (_i, state) => {
      // Every table a new object may come to have, the lazy ones too.
      state.storage.sql.exec(ALL_TABLES_SCHEMA);
      return state.storage.sql.exec("SELECT name, sql FROM sqlite_master WHERE type = 'table'").toArray().map((r) => ({ name: String(r.name), sql: String(r.sql) }));
    });
    const sqlOf = (name: string) => tables.find((t) => t.name === name)?.sql ?? "";
    for (const name of ["timers", "spans", "reservations", "data_objects", "reruns", "data_holds", "live_tickets"]) expect(sqlOf(name)).toMatch(/WITHOUT ROWID\s*$/);
    // The stages too (keyed by stage_id, with its `ord UNIQUE` index): an insert writes the row and its ord entry, no separate key entry.
    expect(sqlOf("stages")).toMatch(/stage_id TEXT PRIMARY KEY, ord INTEGER NOT NULL UNIQUE/);
    expect(sqlOf("stages")).toMatch(/WITHOUT ROWID\s*$/);
    expect(sqlOf("outbox")).toMatch(/id INTEGER PRIMARY KEY,/);
    expect(sqlOf("outbox")).not.toMatch(/AUTOINCREMENT/);
  });
  it("a plain execution has none of the tables it never writes (notifications, reruns, holds, live tickets, ledger parts), and a statement on one it lacks answers as the empty table", async () => {
    const { body } = await startExecution({ template_name: "fault_two_stage", parameters: { steps: 1, step_ms: 10 }, client_id: "client_schema" });
    const id = body.execution_id as string;
    const doc = await waitFor(id, ended, 30_000);
    expect(doc.status).toBe("completed");
    const lazy = LAZY_GROUPS.flatMap((g) => g.tables);
    const names = await runInDurableObject(executionStub(id), (_i, state) =>
      state.storage.sql.exec("SELECT name FROM sqlite_master WHERE type = 'table'").toArray().map((r) => String(r.name)),
    );
    expect(names).toContain("stages");
    expect(names.filter((n) => lazy.includes(n))).toEqual([]);
    // Its document reads them as empty: no reruns, no notifications.
    expect(doc.reruns ?? []).toEqual([]);
  });

  it("answers a statement on a missing lazy table without it only where the empty table answers no rows and changes nothing", () => {
    expect(missingTableAnswer("SELECT * FROM events WHERE state = 'pending' ORDER BY seq LIMIT 1", "events")).toBe("empty");
    expect(missingTableAnswer("SELECT state, COUNT(*) AS n FROM events GROUP BY state", "events")).toBe("empty");
    expect(missingTableAnswer("SELECT 1 FROM data_holds LIMIT 1", "data_holds")).toBe("empty");
    expect(missingTableAnswer("UPDATE events SET next_at = ? WHERE seq = ?", "events")).toBe("empty");
    expect(missingTableAnswer("DELETE FROM live_tickets WHERE expires_at <= ?", "live_tickets")).toBe("empty");
    // One row even of none, rows from another table, or a write: the table is made first.
    expect(missingTableAnswer("SELECT COUNT(*) AS n FROM events", "events")).toBe("create");
    expect(missingTableAnswer("SELECT s.stage_id FROM acquisitions a JOIN stages s ON s.stage_id = a.stage_id", "acquisitions")).toBe("create");
    expect(missingTableAnswer("SELECT (SELECT COUNT(*) FROM reruns) AS n FROM execution", "reruns")).toBe("create");
    expect(missingTableAnswer("DELETE FROM stages WHERE stage_id IN (SELECT stage_id FROM acquisitions)", "acquisitions")).toBe("create");
    expect(missingTableAnswer("INSERT OR IGNORE INTO reruns (execution_id, created_at) VALUES (?, ?)", "reruns")).toBe("create");
  });
});
