/**
 * Sets `key` in an isolate-level memo, most recent last, dropping the oldest
 * entries past `max`: the caches a start reads from (templates, estimates)
 * must not grow with the number of names they have seen.
 */
export function remember<K, V>(memo: Map<K, V>, key: K, value: V, max: number): void {
  memo.delete(key);
  memo.set(key, value);
  while (memo.size > max) memo.delete(memo.keys().next().value as K);
}
