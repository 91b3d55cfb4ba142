/**
 * Group commit for the ledger's SQL writes (and the execution index's upserts, which queue and
 * `ackLater` every one). A step decides in memory and hands
 * its writes here; how they land is the only thing that differs between steps:
 *
 * - queued (`write` outside `direct`): the write joins a queue that is
 *   executed as one transaction at once when no commit is in flight, else as
 *   soon as the one in flight is durable (`storage.sync()`), so concurrent
 *   calls share one commit. A reply waits for its writes through `ack`.
 * - direct (`direct(fn)`): the queue is executed first, then `fn` runs as one
 *   synchronous transaction in which every write executes at once.
 * - later (`ackLater`): a reply nobody waits on to go on (an outbox's settle
 *   after its stage ended) starts no commit of its own: its writes ride on the
 *   next one another step starts, or on one of their own after `maxMs`.
 *
 * Writes are executed in decision order in both ways, so what is durable is
 * always a prefix of what was decided, and nothing is acknowledged before its
 * writes are executed (the output gate then holds the reply until durable).
 */
export class GroupCommit {
  #pending: (() => void)[] = [];
  #acks: { resolve: () => void; reject: (err: unknown) => void }[] = [];
  #committing = false;
  #inDirect = false;
  /** Inside `together`: acks wait for its end, so the steps it runs share one commit. */
  #together = 0;
  /** The commit `ackLater` owes when no other step starts one first. */
  #later: ReturnType<typeof setTimeout> | null = null;

  /**
   * `beforeCommit` writes what the owner batches per commit (dirty pool rows);
   * `afterCommit` forgets what is now in SQL; `onFailure` rebuilds memory from
   * SQL after a transaction that threw (nothing of it was written).
   */
  constructor(
    private readonly storage: DurableObjectStorage,
    private readonly hooks: { beforeCommit(): void; afterCommit(): void; onFailure(): void },
  ) {}

  /** Whether a write now executes at once (inside `direct`) rather than queueing. */
  get queueing(): boolean {
    return !this.#inDirect;
  }

  get idle(): boolean {
    return this.#pending.length === 0 && this.#acks.length === 0;
  }

  write(w: () => void): void {
    if (this.#inDirect) w();
    else this.#pending.push(w);
  }

  /** Resolves with `result` once every write queued so far is executed. */
  ack<T>(result: T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#acks.push({ resolve: () => resolve(result), reject });
      if (!this.#committing && this.#together === 0) this.flush();
    });
  }

  /**
   * Resolves with `result` once every write queued so far is executed, like `ack`, but without
   * starting a commit: the next step's `ack` or `direct` executes these writes with its own, and
   * if none comes within `maxMs` they are executed then.
   */
  ackLater<T>(result: T, maxMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#acks.push({ resolve: () => resolve(result), reject });
      this.#later ??= setTimeout(() => {
        this.#later = null;
        // A commit in flight flushes what is queued when it is durable (#track).
        if (!this.#committing && this.#together === 0) this.flush();
      }, maxMs);
    });
  }

  /**
   * Runs `fn`, whose steps queue their writes, and executes the queue once after it: the steps of
   * one call (a settle and the next reserve) land in one commit instead of two.
   */
  together<T>(fn: () => T): T {
    this.#together++;
    try {
      return fn();
    } finally {
      this.#together--;
      if (this.#together === 0 && !this.#committing) this.flush();
    }
  }

  /** Executes the queue, then `fn` as one transaction with its writes at once. Memory is rebuilt if it throws. */
  direct<T>(fn: () => T): T {
    this.flush();
    let result: T;
    try {
      result = this.storage.transactionSync(() => {
        this.#inDirect = true;
        const r = fn();
        this.hooks.beforeCommit();
        return r;
      });
    } catch (err) {
      this.hooks.onFailure();
      throw err;
    } finally {
      this.#inDirect = false;
    }
    this.hooks.afterCommit();
    this.#track();
    return result;
  }

  /** Executes the queued writes as one transaction, in decision order. */
  flush(): void {
    if (this.#later) clearTimeout(this.#later);
    this.#later = null;
    if (this.idle) return;
    const writes = this.#pending;
    const acks = this.#acks;
    this.#pending = [];
    this.#acks = [];
    try {
      this.storage.transactionSync(() => {
        for (const w of writes) w();
        this.hooks.beforeCommit();
      });
    } catch (err) {
      // Nothing of this batch was written and nothing of it acknowledged: memory goes back to SQL.
      this.hooks.onFailure();
      for (const a of acks) a.reject(err);
      return;
    }
    this.hooks.afterCommit();
    for (const a of acks) a.resolve();
    this.#track();
  }

  /** Notes a commit in flight; writes queued meanwhile wait and share the next one. */
  #track(): void {
    if (this.#committing) return;
    this.#committing = true;
    const done = () => {
      this.#committing = false;
      if (!this.idle) this.flush();
    };
    this.storage.sync().then(done, done);
  }
}
