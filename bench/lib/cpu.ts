/**
 * CPU accounting from /proc (Linux; elsewhere every figure is null): CPU
 * seconds used by a process, and by the PostgreSQL backends connected to one
 * database, between a mark and now. Used to show where the CPU of a 2-core box
 * goes per message (figures 1 and 3).
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type pg from 'pg';

let ticks: number | null = null;
function clockTicks(): number {
  if (ticks === null) {
    try {
      ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8', timeout: 2000 }).trim()) || 100;
    } catch {
      ticks = 100;
    }
  }
  return ticks;
}

/** user + system CPU seconds of one process, or null when it is gone or /proc is not there. */
export function procCpuSeconds(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // the command name may contain spaces and parentheses: fields start after the last ')'
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    return Number.isFinite(utime) && Number.isFinite(stime) ? (utime + stime) / clockTicks() : null;
  } catch {
    return null;
  }
}

/**
 * Pids of the client backends connected to database `db`, optionally only those
 * whose application_name starts with `app`. The asking session and the bench's
 * own connections (application_name 'bench …', pgbench included) never count.
 */
export async function backendPids(pool: pg.Pool, db: string, app = ''): Promise<number[]> {
  const { rows } = await pool.query<{ pid: number }>(
    `select pid from pg_stat_activity
      where datname = $1 and backend_type = 'client backend' and pid <> pg_backend_pid()
        and application_name like $2 || '%' and application_name not like 'bench %'`,
    [db, app],
  );
  return rows.map((r) => r.pid);
}

/** Which processes a CPU measurement covers: worker processes by pid, database backends by application_name prefix, the sink. */
export interface CpuScope {
  pool: pg.Pool;
  db: string;
  /** Backends whose application_name starts with this ('' = every non-bench backend of the database). */
  app?: string;
  workerPids: Array<number | undefined>;
  sinkPid: number | undefined;
}

export interface CpuMark {
  workers: Map<number, number>;
  backends: Map<number, number>;
  sink: number | null;
  machine: { busy: number; total: number } | null;
  /** The last reading of every backend seen during the measurement (a sampler refreshes it), so one that disconnects still counts. */
  lastSeen: Map<number, number>;
  sampler: NodeJS.Timeout | null;
}

/** Where the CPU went during a measurement (Linux /proc; null elsewhere). */
export interface CpuUse {
  worker_s: number | null;
  worker_ms_per_msg: number | null;
  db_backends_s: number | null;
  db_ms_per_msg: number | null;
  sink_s: number | null;
  /** Messages per CPU second of the whole system measured: worker processes + database backends (the sink excluded). */
  msgs_per_cpu_s: number | null;
  machine_busy_pct: number | null;
}

function cpuByPid(pids: Array<number | undefined>): Map<number, number> {
  const m = new Map<number, number>();
  for (const pid of pids) {
    const s = pid ? procCpuSeconds(pid) : null;
    if (pid && s !== null) m.set(pid, s);
  }
  return m;
}

/** How often the backends in scope are looked up and read during a measurement. */
const SAMPLE_MS = 500;

/**
 * CPU counters at the start of a measurement. Workers or backends that appear later count from zero.
 * The database's backends are looked up again every SAMPLE_MS until cpuSince: one that connects
 * and disconnects in between counts with its last reading (at most SAMPLE_MS of its CPU is missed).
 */
export async function cpuMark(scope: CpuScope): Promise<CpuMark> {
  const backends = cpuByPid(await backendPids(scope.pool, scope.db, scope.app ?? ''));
  const mark: CpuMark = {
    workers: cpuByPid(scope.workerPids),
    backends,
    sink: procCpuSeconds(scope.sinkPid),
    machine: machineTicks(),
    lastSeen: new Map(backends),
    sampler: null,
  };
  let busy = false;
  mark.sampler = setInterval(() => {
    if (busy) return;
    busy = true;
    void backendPids(scope.pool, scope.db, scope.app ?? '')
      .then((pids) => {
        for (const [pid, s] of cpuByPid([...pids, ...mark.lastSeen.keys()])) mark.lastSeen.set(pid, s);
      })
      .catch(() => undefined)
      .finally(() => {
        busy = false;
      });
  }, SAMPLE_MS);
  mark.sampler.unref();
  return mark;
}

/**
 * CPU used since `start` by the worker processes, the database's backends in
 * scope, and the sink; per message over `messages`. A backend that connected
 * and disconnected between two samples is not seen (the systems measured keep
 * theirs); autovacuum and the WAL writer are not client backends and not counted.
 */
export async function cpuSince(scope: CpuScope, start: CpuMark, messages: number): Promise<CpuUse> {
  const delta = (now: Map<number, number>, then: Map<number, number>): number | null =>
    now.size === 0 ? null : [...now].reduce((a, [pid, s]) => a + s - (then.get(pid) ?? 0), 0);
  if (start.sampler) clearInterval(start.sampler);
  const worker = delta(cpuByPid(scope.workerPids), start.workers);
  const seen = new Map(start.lastSeen);
  for (const [pid, s] of cpuByPid([...(await backendPids(scope.pool, scope.db, scope.app ?? '')), ...seen.keys()])) seen.set(pid, s);
  const dbCpu = delta(seen, start.backends);
  const sinkNow = procCpuSeconds(scope.sinkPid);
  const m = machineTicks();
  const perMsg = (x: number | null) => (x === null || messages <= 0 ? null : Math.round((x * 1e6) / messages) / 1000);
  const r2 = (x: number) => Math.round(x * 100) / 100;
  return {
    worker_s: worker === null ? null : r2(worker),
    worker_ms_per_msg: perMsg(worker),
    db_backends_s: dbCpu === null ? null : r2(dbCpu),
    db_ms_per_msg: perMsg(dbCpu),
    sink_s: sinkNow !== null && start.sink !== null ? r2(sinkNow - start.sink) : null,
    msgs_per_cpu_s: worker !== null && dbCpu !== null && worker + dbCpu > 0 ? Math.round(messages / (worker + dbCpu)) : null,
    machine_busy_pct: m && start.machine ? Math.round((1000 * (m.busy - start.machine.busy)) / Math.max(1, m.total - start.machine.total)) / 10 : null,
  };
}

/** Whole-machine busy and total jiffies (first line of /proc/stat). */
export function machineTicks(): { busy: number; total: number } | null {
  try {
    const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const idle = (v[3] ?? 0) + (v[4] ?? 0);
    const total = v.reduce((a, b) => a + b, 0);
    return { busy: total - idle, total };
  } catch {
    return null;
  }
}
