/**
 * CPU accounting from /proc (Linux; elsewhere every figure is null): CPU
 * seconds used by a process, and by the PostgreSQL backends connected to one
 * database. Used to show where the CPU of a 2-core box goes per message.
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

/** Pids of the client backends connected to database `db` (excluding the asking session), optionally only those whose application_name starts with `app`. */
export async function backendPids(pool: pg.Pool, db: string, app = ''): Promise<number[]> {
  const { rows } = await pool.query<{ pid: number }>(
    `select pid from pg_stat_activity
      where datname = $1 and backend_type = 'client backend' and pid <> pg_backend_pid() and application_name like $2 || '%'`,
    [db, app],
  );
  return rows.map((r) => r.pid);
}

/** Sum of CPU seconds over pids (missing ones count 0). */
export function sumCpu(pids: Array<number | undefined>): number {
  return pids.reduce<number>((a, pid) => a + (procCpuSeconds(pid) ?? 0), 0);
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
