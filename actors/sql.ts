/**
 * The one small SQL helper every actor uses: a tagged template over the
 * object's synchronous SQLite API. Values become bound parameters, never text.
 *
 *   const rows = sql<{ id: string }>`SELECT id FROM t WHERE x = ${x}`;
 *
 * Calls are synchronous, so a run of them with no `await` in between is one
 * atomic step under the object's input gate.
 */
export type Sql = <T = Record<string, SqlStorageValue>>(
  strings: TemplateStringsArray,
  ...values: SqlStorageValue[]
) => T[];

export function sqlOf(storage: DurableObjectStorage): Sql {
  return <T>(strings: TemplateStringsArray, ...values: SqlStorageValue[]) =>
    storage.sql.exec(strings.join("?"), ...values).toArray() as T[];
}

/** Runs several `;`-separated statements (schema set-up). */
export function execScript(storage: DurableObjectStorage, script: string): void {
  storage.sql.exec(script);
}
