import type { Sql } from "../sql";
import { migrateControl } from "./control";
import { LAZY_GROUPS, withLazyTables } from "./lazy-tables";
import { SCHEMA, STAGES_BY_PARENT, migrate } from "./store";

/**
 * The tables every execution writes (store.ts); the others (events, reruns, rerun holds, live
 * tickets, ledger parts) come with the first statement that writes one (lazy-tables.ts).
 */
const TABLES = SCHEMA;
/** A new object's schema: those tables at the latest version and their index. */
export const LATEST_SCHEMA = TABLES + STAGES_BY_PARENT;
/** Every table a new object may come to have: its schema and each lazy group's. */
export const ALL_TABLES_SCHEMA = LATEST_SCHEMA + LAZY_GROUPS.map((g) => g.schema).join("");

/** Whether the object has its tables (a new one gets them with its first statement, withTables). */
export function hasTables(storage: DurableObjectStorage): boolean {
  return storage.sql.exec("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'execution'").toArray().length > 0;
}

/** An Execution's `sql` (withTables), and whether its tables exist yet. */
export interface TabledSql {
  sql: Sql;
  /** False for a new object until its first write: it has no execution, and a read need not create the tables to say so. */
  exists(): boolean;
}

/**
 * `sql` that creates or migrates the tables (createTables) before its first statement. A new object
 * thus writes its schema in the turn of its first write (start()), in that turn's commit, not in a
 * commit of its own from the constructor; every statement after it finds the tables. `existed`:
 * whether the object had its tables when it was constructed (hasTables).
 */
export function withTables(sql: Sql, storage: DurableObjectStorage, existed: boolean): TabledSql {
  let ready = false;
  let exists = existed;
  const lazy = withLazyTables(sql, storage, existed);
  return {
    sql: (strings, ...values) => {
      if (!ready) {
        createTables(storage);
        ready = true;
        exists = true;
      }
      return lazy(strings, ...values);
    },
    exists: () => exists,
  };
}

/**
 * Run before the object's first statement (withTables). A new object creates its
 * tables at the latest version in one run and migrates nothing; an older one
 * gets what it lacks, then the migrations (columns, the timers' units).
 */
export function createTables(storage: DurableObjectStorage): void {
  if (!hasTables(storage)) {
    storage.sql.exec(LATEST_SCHEMA);
    return;
  }
  // Not the index: on an object from before the graph its columns do not exist yet (migrate adds both).
  storage.sql.exec(TABLES);
  migrateControl(storage);
  migrate(storage);
}
