import { readdirSync, readFileSync } from "node:fs";

/**
 * Linux /proc readings for a process tree: descendants of a process, their
 * resident memory (VmRSS, VmHWM) and CPU time. Used to find the workerd
 * processes of a `wrangler dev` session and watch them.
 */
export interface ProcInfo {
  pid: number;
  ppid: number;
  comm: string;
}

const CLK_TCK = 100;

function readStat(pid: number): { comm: string; ppid: number; utime: number; stime: number } | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    const close = text.lastIndexOf(")");
    const comm = text.slice(text.indexOf("(") + 1, close);
    const f = text.slice(close + 2).split(" ");
    return { comm, ppid: Number(f[1]), utime: Number(f[11]), stime: Number(f[12]) };
  } catch {
    return null;
  }
}

/** Every live descendant of `root` (not `root` itself). */
export function descendants(root: number): ProcInfo[] {
  const all: ProcInfo[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const st = readStat(Number(name));
    if (st) all.push({ pid: Number(name), ppid: st.ppid, comm: st.comm });
  }
  const out: ProcInfo[] = [];
  const frontier = [root];
  while (frontier.length) {
    const parent = frontier.pop()!;
    for (const p of all) {
      if (p.ppid === parent) {
        out.push(p);
        frontier.push(p.pid);
      }
    }
  }
  return out;
}

/** VmRSS and VmHWM (peak) in bytes, or null when the process is gone. */
export function memoryOf(pid: number): { rss: number; hwm: number } | null {
  try {
    const text = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? Number.NaN) * 1024;
    return { rss: kb("VmRSS"), hwm: kb("VmHWM") };
  } catch {
    return null;
  }
}

/** User + system CPU seconds the process has used so far. */
export function cpuSecondsOf(pid: number): number {
  const st = readStat(pid);
  return st ? (st.utime + st.stime) / CLK_TCK : Number.NaN;
}

export function commandLineOf(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return [];
  }
}

/** Samples VmRSS of some processes at an interval; `stop()` ends it. */
export class RssSampler {
  readonly samples: { t: number; rss: Record<number, number> }[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  constructor(
    private readonly pids: number[],
    private readonly everyMs = 250,
  ) {}

  start(): this {
    this.sample();
    this.timer = setInterval(() => this.sample(), this.everyMs);
    this.timer.unref();
    return this;
  }

  sample(): Record<number, number> {
    const rss: Record<number, number> = {};
    for (const pid of this.pids) rss[pid] = memoryOf(pid)?.rss ?? Number.NaN;
    this.samples.push({ t: Date.now(), rss });
    if (this.samples.length > 100_000) this.samples.splice(0, 50_000);
    return rss;
  }

  peak(pid: number, since = 0): number {
    let max = 0;
    for (const s of this.samples) if (s.t >= since && s.rss[pid] > max) max = s.rss[pid];
    return max;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}

/** CPU seconds the whole machine spent busy (all cores: user, nice, system, irq, softirq, steal) since boot. */
export function machineBusySeconds(): number {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n")[0];
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    const [user, nice, system, , , irq, softirq, steal] = f;
    return (user + nice + system + irq + softirq + (steal ?? 0)) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

/** Open file descriptors of a process (null when it is gone). */
export function openFds(pid: number): number | null {
  try {
    return readdirSync(`/proc/${pid}/fd`).length;
  } catch {
    return null;
  }
}
