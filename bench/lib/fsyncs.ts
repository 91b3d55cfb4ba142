import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";

/**
 * `--fsyncs`: counts the workerd runtime's `fsync`/`fdatasync` calls by the
 * file synced while a phase runs (`strace -f -y -e trace=fsync,fdatasync -p`),
 * the way docs/performance.md ("Where the time goes", 2) counts them. Every
 * SQLite commit of an object is one `fsync` of its `-wal` file; `setAlarm`
 * and `deleteAlarm` commit the alarm store (`metadata.sqlite`); a new object's
 * database costs a few more (its journal, file and directory). strace stops
 * the runtime at every system call, so a run with it is slower: count with
 * it, time without it.
 */
export interface FsyncCounts {
  /** The executions of the phase: what `per_execution` divides by. */
  executions: number;
  /** Execution databases synced in the window (the phase's, and the warm-up's trailing writes). */
  execution_databases: number;
  /** Commits of one Execution database, median over those synced (a warm-up execution's few trailing ones left out by the median). */
  execution_commits_median: number;
  total: number;
  /** Per class of file: calls in all (an object class's databases, its alarm store, or a new database's journal, file and directory). */
  by_class: Record<string, number>;
  per_execution: Record<string, number>;
}

export class FsyncCounter {
  readonly #file = path.join(os.tmpdir(), `bench-fsyncs-${process.pid}-${Date.now()}.txt`);
  #proc: ChildProcess | null = null;

  /** Attaches to every thread of `pid`; resolves once strace reports it is attached. */
  async start(pid: number): Promise<void> {
    const proc = spawn("strace", ["-f", "-y", "-e", "trace=fsync,fdatasync", "-o", this.#file, "-p", String(pid)], { stdio: ["ignore", "ignore", "pipe"] });
    this.#proc = proc;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("strace did not attach within 10 s")), 10_000);
      proc.once("error", (err) => {
        clearTimeout(timer);
        reject(new Error(`strace: ${err.message} (is it installed, and may this user ptrace the runtime?)`));
      });
      proc.stderr?.on("data", (d: Buffer) => {
        if (/attached/i.test(String(d))) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  /** Detaches and classifies what was synced meanwhile, per execution of the phase (`executions`). */
  async stop(executions: number): Promise<FsyncCounts> {
    return classify(await this.rawStop(), executions);
  }

  /** Detaches and answers the trace itself: a line per call, with the path of the file synced. */
  async rawStop(): Promise<string> {
    const proc = this.#proc;
    this.#proc = null;
    if (proc && proc.exitCode === null) {
      const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
      proc.kill("SIGINT");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
    }
    const text = readFileSync(this.#file, "utf8");
    rmSync(this.#file, { force: true });
    return text;
  }
}

/** Lines like `123 fsync(45</tmp/x/v3/do/orchestrator-v2-Execution/ab12.sqlite-wal>) = 0`. */
export function classify(text: string, executions: number): FsyncCounts {
  const byClass: Record<string, number> = {};
  const executionDbs = new Map<string, number>();
  let total = 0;
  for (const line of text.split("\n")) {
    const m = /f(?:data)?sync\(\d+<([^>]*)>\)/.exec(line);
    if (!m) continue;
    total++;
    const file = m[1];
    const base = path.basename(file);
    const dir = path.basename(path.dirname(file));
    // The object's class from its directory, `<worker>-<Class>` (miniflare's layout).
    const owner = dir.replace(/^.*-(?=[A-Z][A-Za-z]*$)/, "");
    let cls: string;
    if (base.startsWith("metadata.sqlite")) cls = `alarm store (${owner})`;
    else if (base.endsWith(".sqlite-wal")) {
      cls = owner;
      if (cls === "Execution") executionDbs.set(base, (executionDbs.get(base) ?? 0) + 1);
    } else cls = "new databases (journal, file, directory)";
    byClass[cls] = (byClass[cls] ?? 0) + 1;
  }
  const n = Math.max(1, executions);
  const perExecution: Record<string, number> = { total: Number((total / n).toFixed(2)) };
  for (const [k, v] of Object.entries(byClass)) perExecution[k] = Number((v / n).toFixed(2));
  const each = [...executionDbs.values()].sort((a, b) => a - b);
  const median = each.length ? each[Math.floor(each.length / 2)] : 0;
  return { executions, execution_databases: each.length, execution_commits_median: median, total, by_class: byClass, per_execution: perExecution };
}
