/**
 * erp-cloud listeners as real processes (`node dist/listener/cli.js listen`),
 * exactly as an operator runs them, with the bench's fixed settings on top of
 * the listener's defaults. The settings used are recorded in the results.
 */
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { loadConfig } from '../../listener/kernel/config.js';
import { spawnChild, stopChild, type Child } from './procs.js';
import { waitFor } from './util.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/**
 * dist/listener/cli.js, found from dist/bench/lib/. BENCH_LISTENER_CLI=path (an A/B aid) runs
 * another build's listener instead, e.g. a worktree of the previous commit; recorded in the results.
 */
export const listenerCli = process.env.BENCH_LISTENER_CLI || path.resolve(here, '..', '..', 'listener', 'cli.js');

/**
 * What the bench sets; everything else (concurrency 64, batch 100, pool 8, poll
 * 500 ms) is the listener's default. BENCH_LISTENER_ENV="K=V,K=V" (a tuning
 * aid) adds settings to every listener; they are recorded with the results.
 */
export const LISTENER_ENV: Record<string, string> = {
  ERP_CLOUD_HTTP_PORT: '-1',
  ERP_CLOUD_LOG_LEVEL: 'warn',
  ERP_CLOUD_SHUTDOWN_GRACE_MS: '3000',
  ...Object.fromEntries(
    (process.env.BENCH_LISTENER_ENV ?? '')
      .split(',')
      .map((kv) => kv.trim())
      .filter((kv) => /^ERP_CLOUD_[A-Z_]+=/.test(kv))
      .map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]),
  ),
};

/**
 * The settings of a bench run's listeners, for the results: what the bench
 * sets (LISTENER_ENV) and the effective values of the main knobs, read through
 * the listener's own config parser (so its defaults are never copied by hand).
 */
export function listenerSettings(listeners: number, extraEnv: Record<string, string> = {}): Record<string, unknown> {
  const c = loadConfig({ DATABASE_URL: 'postgres://127.0.0.1/unused', ...LISTENER_ENV, ...extraEnv });
  return {
    listeners,
    ...LISTENER_ENV,
    ...extraEnv,
    ...(process.env.BENCH_LISTENER_CLI ? { BENCH_LISTENER_CLI: process.env.BENCH_LISTENER_CLI } : {}),
    effective: `CONCURRENCY=${c.ERP_CLOUD_CONCURRENCY} BATCH_SIZE=${c.ERP_CLOUD_BATCH_SIZE} POOL_SIZE=${c.ERP_CLOUD_POOL_SIZE} POLL_MS=${c.ERP_CLOUD_POLL_MS} MAINTENANCE_MS=${c.ERP_CLOUD_MAINTENANCE_MS} LEASE_MARGIN_MS=${c.ERP_CLOUD_LEASE_MARGIN_MS}`,
  };
}

export interface ListenerProc extends Child {
  workerId: string;
}

/**
 * BENCH_CPU_PROFILE=dir (a profiling aid): every listener (and graphile-worker process) runs under `node --cpu-prof` and writes
 * its profile into dir when it exits (open it in Chrome DevTools, or summarise it with
 * `node dist/bench/profile-top.js dir/x.cpuprofile`).
 */
const PROFILE_DIR = process.env.BENCH_CPU_PROFILE ?? '';

/** node's arguments for a profiled child named `name` (none unless BENCH_CPU_PROFILE is set). */
export function profileArgs(name: string): string[] {
  return PROFILE_DIR ? ['--cpu-prof', `--cpu-prof-dir=${PROFILE_DIR}`, `--cpu-prof-name=${name}-${Date.now()}.cpuprofile`] : [];
}

export function spawnListener(dbUrl: string, workerId: string, extraEnv: Record<string, string> = {}): ListenerProc {
  const child = spawnChild(`listener ${workerId}`, process.execPath, [...profileArgs(workerId), listenerCli, 'listen'], {
    env: { PATH: process.env.PATH, DATABASE_URL: dbUrl, ERP_CLOUD_WORKER_ID: workerId, ...LISTENER_ENV, ...extraEnv },
  });
  return Object.assign(child, { workerId });
}

/** SIGTERM (the listener finishes in-flight calls and reports them), SIGKILL after the grace period. */
export async function stopListener(l: ListenerProc): Promise<number | null> {
  return stopChild(l, 10_000);
}

/** Waits until the listener has registered and declared itself idle (its first claim came back empty). */
export async function waitListenerIdle(pool: pg.Pool, l: ListenerProc, timeoutMs = 20_000): Promise<void> {
  await waitFor(
    async () => {
      if (l.proc.exitCode !== null) throw new Error(`listener exited early (${l.proc.exitCode}): ${l.output()}`);
      const { rows } = await pool.query<{ idle: boolean }>('select idle from cloud.listener_status where worker_id = $1', [l.workerId]);
      return rows[0]?.idle === true;
    },
    { timeoutMs, intervalMs: 50, what: `listener ${l.workerId} to be idle` },
  );
}

/** A free TCP port on 127.0.0.1 (for a listener's /metrics). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** A histogram's sum and count from a listener's /metrics, over the series whose labels contain `labels` (e.g. 'result="work"'); null when it cannot be read. */
export async function scrapeHistogram(metricsUrl: string, name: string, labels = ''): Promise<{ sum: number; count: number } | null> {
  try {
    const text = await (await fetch(metricsUrl, { signal: AbortSignal.timeout(5000) })).text();
    let sum = 0;
    let count = 0;
    for (const line of text.split('\n')) {
      const m = /^([a-z_]+)_(sum|count)\{([^}]*)\} ([\d.e+-]+)$/.exec(line);
      if (!m || m[1] !== name || !m[3]!.includes(labels)) continue;
      if (m[2] === 'sum') sum += Number(m[4]);
      else count += Number(m[4]);
    }
    return { sum, count };
  } catch {
    return null;
  }
}

/** Mean in ms between two scrapes of a histogram (null when either failed or nothing was observed). */
export function meanMs(a: { sum: number; count: number } | null, b: { sum: number; count: number } | null): number | null {
  if (!a || !b || b.count === a.count) return null;
  return Math.round((1e6 * (b.sum - a.sum)) / (b.count - a.count)) / 1000;
}
