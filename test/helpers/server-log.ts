/**
 * The database server's own log, for tests that search what PostgreSQL wrote
 * while they ran (a secret must never reach it).
 *
 * Where it is: ERP_CLOUD_SERVER_LOG when set; else the file the logging
 * collector writes now (pg_current_logfile()); else server.log next to the
 * data directory, the layout of the private cluster (scripts/pg.sh: `dir`
 * holds data/ and server.log). A test may skip a log assertion only when the
 * server is not the private cluster (DATABASE_URL elsewhere) and no log file
 * is readable here; against the private cluster (`make test`, CI) an
 * unreadable log is a failure, never a silent skip.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readSync, realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import type pg from 'pg';

export interface ServerLog {
  /** The log file, or null when none is readable from here. */
  file: string | null;
  /** Whether the server is the private cluster of scripts/pg.sh (then the log must be readable). */
  privateCluster: boolean;
  /** Why the file is null, for the skip message. */
  why: string;
}

function real(p: string): string | null {
  try {
    return realpathSync(p);
  } catch {
    return null;
  }
}

function readable(file: string): boolean {
  try {
    closeSync(openSync(file, 'r'));
    return statSync(file).isFile();
  } catch {
    return false;
  }
}

/** Finds the log of the server `pool` is connected to. */
export async function locateServerLog(pool: pg.Pool | pg.Client): Promise<ServerLog> {
  let dataDir: string | null = null;
  let current: string | null = null;
  try {
    const { rows } = await pool.query<{ d: string; f: string | null }>(`select current_setting('data_directory') as d, pg_current_logfile() as f`);
    dataDir = rows[0]!.d;
    current = rows[0]!.f;
  } catch {
    // not allowed to see the data directory: a server that is not ours
  }
  let clusterDir: string | null = null;
  try {
    clusterDir = execFileSync('bash', ['scripts/pg.sh', 'dir'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
  } catch {
    clusterDir = null;
  }
  const privateCluster = dataDir !== null && clusterDir !== null && real(path.join(clusterDir, 'data')) === real(dataDir);
  const candidates: string[] = [];
  if (process.env.ERP_CLOUD_SERVER_LOG) candidates.push(process.env.ERP_CLOUD_SERVER_LOG);
  if (current && dataDir) candidates.push(path.resolve(dataDir, current));
  if (privateCluster) candidates.push(path.join(clusterDir!, 'server.log'));
  else if (dataDir) candidates.push(path.join(path.dirname(dataDir), 'server.log'));
  const file = candidates.find(readable) ?? null;
  const why = file
    ? ''
    : dataDir === null
      ? 'the server does not show its data directory to this login, so its log cannot be found'
      : `no readable server log (looked at ${candidates.join(', ') || 'nothing'}); set ERP_CLOUD_SERVER_LOG to the file`;
  return { file, privateCluster: privateCluster || Boolean(process.env.ERP_CLOUD_SERVER_LOG), why };
}

/** The size of the log now: what is written later starts there. */
export function logOffset(file: string): number {
  return statSync(file).size;
}

/** What the server wrote to the log since `offset` (all of it when the file was rotated meanwhile). */
export function logSince(file: string, offset: number): string {
  const size = statSync(file).size;
  const from = size < offset ? 0 : offset;
  const buf = Buffer.alloc(size - from);
  const fd = openSync(file, 'r');
  try {
    let at = 0;
    while (at < buf.length) {
      const n = readSync(fd, buf, at, buf.length - at, from + at);
      if (n === 0) break;
      at += n;
    }
    return buf.subarray(0, at).toString('utf8');
  } finally {
    closeSync(fd);
  }
}
