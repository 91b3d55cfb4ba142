import type { Sql } from "../sql";
import { LIVE_TICKETS_SCHEMA } from "./live";
import { EVENTS_SCHEMA } from "./notify";
import { PARTS_SCHEMA } from "./parts";
import { HOLDS_SCHEMA } from "./rerun";
import { RERUNS_SCHEMA } from "./control";

/**
 * Tables most executions never write, created by the first statement that
 * writes one (docs/performance.md, target 7): every table a live object has
 * costs the runtime memory for as long as it lives (`bench:object-memory`),
 * and a plain three-stage execution asks no notifications, has no reruns or
 * rerun holds, no live socket tickets and no ledger parts.
 *
 * Until a group's table exists, a statement on it is answered as the empty
 * table would answer it, without running: a SELECT from it alone (no join,
 * no subquery, no aggregate outside a GROUP BY) has no rows, and an UPDATE or
 * DELETE changes nothing. Any other statement naming it (an INSERT, anything
 * this cannot tell) creates the group first, then runs.
 */
export const LAZY_GROUPS: readonly { tables: readonly string[]; schema: string }[] = [
  { tables: ["events"], schema: EVENTS_SCHEMA },
  { tables: ["reruns"], schema: RERUNS_SCHEMA },
  { tables: ["data_holds"], schema: HOLDS_SCHEMA },
  { tables: ["live_tickets"], schema: LIVE_TICKETS_SCHEMA },
  { tables: ["acquisitions", "part_reservations"], schema: PARTS_SCHEMA },
];

export const LAZY_NAMES = LAZY_GROUPS.flatMap((g) => g.tables);
const NAMED = new RegExp(`\\b(${LAZY_NAMES.join("|")})\\b`, "gi");
const CHANGE = /^\s*(?:UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+(\w+)\b/i;
const SELECT_FROM = /^\s*SELECT\b[\s\S]*?\bFROM\s+(\w+)\b/i;
const AGGREGATE = /\b(?:COUNT|SUM|TOTAL|MIN|MAX|AVG|GROUP_CONCAT)\s*\(/i;

/** The lazy tables a statement names. */
export function lazyTablesOf(text: string): string[] {
  return [...new Set([...text.matchAll(NAMED)].map((m) => m[1].toLowerCase()))];
}

/**
 * What a statement that names `table`, which does not exist yet, does (pure): `empty` when the empty
 * table would answer it with no rows and change nothing, else `create` (the group first, then the statement).
 */
export function missingTableAnswer(text: string, table: string): "empty" | "create" {
  const named = lazyTablesOf(text);
  if (named.length !== 1 || named[0] !== table) return "create";
  const change = CHANGE.exec(text);
  if (change) return change[1].toLowerCase() === table && !/\(\s*SELECT\b/i.test(text) ? "empty" : "create";
  const select = SELECT_FROM.exec(text);
  if (!select || select[1].toLowerCase() !== table) return "create";
  // One table, its rows or groups only: none when it has none. A join, a subquery or an aggregate over all rows (one row even of none) is run.
  if (/\bJOIN\b/i.test(text) || (text.match(/\bSELECT\b/gi) ?? []).length > 1) return "create";
  if (AGGREGATE.test(text) && !/\bGROUP\s+BY\b/i.test(text)) return "create";
  return "empty";
}

/**
 * `sql` with the lazy groups. Which of their tables the object has is asked once, at the first
 * statement naming one, and only of an object that had its tables when constructed (`existed`:
 * a new one has none). The tables a statement names are found once per statement text (its
 * template strings, the same array at every call of a call site): most statements name none.
 */
export function withLazyTables(sql: Sql, storage: DurableObjectStorage, existed: boolean): Sql {
  const namedBy = new WeakMap<TemplateStringsArray, string[]>();
  let present: Set<string> | null = null;
  const stored = () =>
    existed
      ? storage.sql
          .exec(`SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (${LAZY_NAMES.map(() => "?").join(", ")})`, ...LAZY_NAMES)
          .toArray()
          .map((r) => String(r.name))
      : [];
  return ((strings: TemplateStringsArray, ...values: SqlStorageValue[]) => {
    let named = namedBy.get(strings);
    if (!named) {
      named = lazyTablesOf(strings.join("?"));
      namedBy.set(strings, named);
    }
    if (named.length > 0) {
      present ??= new Set(stored());
      for (const table of named) {
        if (present.has(table)) continue;
        if (named.length === 1 && missingTableAnswer(strings.join("?"), table) === "empty") return [];
        const group = LAZY_GROUPS.find((g) => g.tables.includes(table))!;
        storage.sql.exec(group.schema);
        for (const t of group.tables) present.add(t);
      }
    }
    return sql(strings, ...values);
  }) as Sql;
}
