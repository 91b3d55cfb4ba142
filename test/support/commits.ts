/**
 * Counts the explicit transactions an object's code runs while `fn` runs: the storage's real
 * `transactionSync`, wrapped for the time of `fn` (inside runInDurableObject). The ledger's group
 * commit and the index's write each batch in one, so the count is their commits.
 */
export async function countingTransactions<T>(storage: { transactionSync<R>(body: () => R): R }, fn: (count: () => number) => Promise<T>): Promise<T> {
  const real = storage.transactionSync.bind(storage);
  let n = 0;
  storage.transactionSync = <R>(body: () => R): R => {
    n++;
    return real(body);
  };
  try {
    return await fn(() => n);
  } finally {
    storage.transactionSync = real;
  }
}
