/**
 * Database access: the work pool, the one dedicated LISTEN connection (listen.ts), the
 * wait for the database at start, and migrating (the runner is migrations.ts). Every SQL statement the listener sends is a call to a function
 * in schema cloud (queries.ts); nothing here knows their logic.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { redactUrl } from './config.js';
import { describePgError } from './errors.js';
import type { Logger } from './logger.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** sql/migrations, found from both listener/kernel/ (tsx, vitest) and dist/listener/kernel/ (built). */
export const migrationsDir = [path.resolve(here, '../../sql/migrations'), path.resolve(here, '../../../sql/migrations')].find(
  (d) => d.endsWith(path.join('sql', 'migrations')) && !d.includes(`${path.sep}dist${path.sep}sql`),
)!;

export function createPool(connectionString: string, max: number, log?: Logger): pg.Pool {
  // keep-alive: a listener cut off from the network has its sessions (and their locks) ended by the
  // server within minutes instead of the OS default of hours
  const pool = new pg.Pool({ connectionString, max, application_name: 'erp-cloud', keepAlive: true, keepAliveInitialDelayMillis: 10_000 });
  // an idle client losing its connection (server restart) must not crash the process
  pool.on('error', (err) => log?.warn({ err: err.message }, 'idle database connection lost'));
  return pool;
}

/**
 * Runs fn in one transaction on a pool client of its own: committed when fn returns, rolled back when
 * it throws (the error goes on). `begin` opens it, e.g. 'begin isolation level repeatable read read only'.
 */
export async function inTransaction<T>(pool: pg.Pool, fn: (c: pg.PoolClient) => Promise<T>, begin = 'begin'): Promise<T> {
  const c = await pool.connect();
  try {
    await c.query(begin);
    const out = await fn(c);
    await c.query('commit');
    return out;
  } catch (err) {
    await c.query('rollback').catch(() => undefined);
    throw err;
  } finally {
    c.release();
  }
}

/**
 * Applies the numbered migrations not yet applied and returns their file names (migrations.ts:
 * history in erp_cloud.migration, one transaction per file, an advisory lock so concurrent runs
 * are safe; a database without history is installed from sql/baseline when there is one, unless
 * `baseline` is false). `log` gets the server's NOTICEs and one line per step. `examples`
 * (sql/examples/<name>) are installed afterwards, each in its own transaction.
 */
export async function migrate(connectionString: string, log?: (msg: string) => void, examples: string[] = [],
  opts: { baseline?: boolean } = {}): Promise<string[]> {
  const client = new pg.Client({ connectionString, application_name: 'erp-cloud migrate' });
  const notices: string[] = [];
  client.on('notice', (n) => {
    notices.push(n.message ?? String(n));
    log?.(`NOTICE: ${n.message}`);
  });
  await client.connect();
  try {
    const { runMigrations } = await import('./migrations.js'); // a listener's start never needs the runner
    return (await runMigrations(client, migrationsDir, log, { examples, baseline: opts.baseline })).applied;
  } finally {
    await client.end();
  }
}

// the dedicated LISTEN connection (pg alone: reconnect, re-LISTEN, keep-alive, a wake after reconnect)
export { createListenConnection, type ListenConnection, type ListenOptions } from './listen.js';

/** SQLSTATEs a waiting listener outlives: the server is starting, stopping, restarting, or full. */
const START_RETRY_SQLSTATES: ReadonlySet<string> = new Set(['53300', '57P01', '57P02', '57P03']);
/** SQLSTATEs waiting cannot fix: a wrong password or login, a database that does not exist. */
const START_FATAL_SQLSTATES: ReadonlySet<string> = new Set(['28P01', '28000', '3D000']);
/** Network errors of a server that is not (yet) there: refused, reset, timed out, not (yet) resolvable. */
const START_RETRY_ERRNOS: ReadonlySet<string> = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN', 'ENETDOWN', 'ENOTFOUND', 'EAI_AGAIN',
]);

/**
 * Whether waiting can fix an error met while connecting at start: 'retry' for a server not
 * there yet, starting, shutting down, crashed or full, and for a connection cut or timed out;
 * 'fatal' for a wrong password or login and a database that does not exist, and for
 * anything not known to be passing (a TLS or protocol error, another SQLSTATE).
 */
export function classifyStartError(err: unknown): 'retry' | 'fatal' {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    if (START_FATAL_SQLSTATES.has(code)) return 'fatal';
    if (START_RETRY_SQLSTATES.has(code) || code.startsWith('08') || START_RETRY_ERRNOS.has(code)) return 'retry';
    return 'fatal';
  }
  // pg's own errors carry no code: a socket closed mid-handshake, its connect or query timeout
  const message = err instanceof Error ? err.message : String(err);
  return /Connection terminated|connection timeout|timeout expired|Query read timeout/i.test(message) ? 'retry' : 'fatal';
}

/** The listener could not reach its database at start; the message says why and, when it waited, for how long. */
export class DatabaseStartError extends Error {}

export interface WaitForDatabaseOptions {
  /** Total time to keep trying (ERP_CLOUD_START_WAIT_MS); 0 = one attempt. */
  maxWaitMs: number;
  log: Logger;
  /** Aborted (SIGTERM, SIGINT): stop waiting at once and resolve false. */
  signal?: AbortSignal;
  /** First backoff step (doubled per failure, up to capMs, each ×0.5–1.0 jitter). */
  baseMs?: number;
  capMs?: number;
}

/** One attempt: connect and run a first query; the client is always closed. An abort ends it at once. */
async function probeDatabase(connectionString: string, timeoutMs: number, signal?: AbortSignal): Promise<void> {
  const client = new pg.Client({
    connectionString, application_name: 'erp-cloud listen (start)', connectionTimeoutMillis: timeoutMs, query_timeout: timeoutMs,
  });
  client.on('error', () => undefined); // a connection lost after the attempt is over is not this attempt's business
  const attempt = (async () => {
    await client.connect();
    await client.query('select 1');
  })();
  attempt.catch(() => undefined); // when an abort wins the race, the attempt's own failure is nobody's business
  let onAbort = (): void => undefined;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => {
      // a connect to a host that never answers would otherwise hold SIGTERM up until its timeout
      (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
      reject(new Error('aborted'));
    };
  });
  aborted.catch(() => undefined);
  if (signal?.aborted) onAbort();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await Promise.race([attempt, aborted]);
  } finally {
    signal?.removeEventListener('abort', onAbort);
    await Promise.race([client.end().catch(() => undefined), new Promise((r) => setTimeout(r, 1000).unref())]);
  }
}

/** An error as one line for a log or an exit message, with any password in the URL removed. */
function startErrorText(err: unknown, connectionString: string): string {
  let text = describePgError(err);
  const secrets: string[] = [];
  try {
    const u = new URL(connectionString);
    if (u.password) secrets.push(u.password, decodeURIComponent(u.password));
    const q = u.searchParams.get('password');
    if (q) secrets.push(q);
  } catch {
    // not a URL: nothing of it to hide beyond what redactUrl hides
  }
  for (const s of secrets) text = text.split(s).join('***');
  return redactUrl(text);
}

/**
 * Waits for the database at start, so a listener started before PostgreSQL (or during its
 * restart, or while it is full) needs no supervisor to come back: connects and runs a first
 * query, and on an error waiting can fix (classifyStartError) tries again with backoff and
 * jitter, logging each failure with its reason, for at most maxWaitMs in all. Resolves true
 * when the database answered, false when `signal` was aborted; throws DatabaseStartError at
 * once on an error waiting cannot fix, and when maxWaitMs has passed.
 */
export async function waitForDatabase(connectionString: string, opts: WaitForDatabaseOptions): Promise<boolean> {
  const { maxWaitMs, log, signal } = opts;
  const baseMs = opts.baseMs ?? 250;
  const capMs = opts.capMs ?? 5000;
  const started = Date.now();
  const database = redactUrl(connectionString);
  for (let attempt = 1; ; attempt++) {
    if (signal?.aborted) return false;
    const left = maxWaitMs - (Date.now() - started);
    try {
      // one attempt may not outlast the wait, but gets at least 1 s (a slow handshake is not a dead server)
      await probeDatabase(connectionString, Math.max(1000, Math.min(10_000, left)), signal);
      if (signal?.aborted) return false;
      if (attempt > 1) log.info({ database, attempts: attempt, waited_ms: Date.now() - started }, 'database reachable: starting');
      return true;
    } catch (err) {
      if (signal?.aborted) return false;
      const reason = startErrorText(err, connectionString);
      const code = (err as { code?: string }).code ?? null;
      if (classifyStartError(err) === 'fatal') {
        log.error({ database, attempt, code, err: reason }, 'database refused the listener at start: not retried (waiting cannot fix this)');
        throw new DatabaseStartError(`cannot start: the database refused the listener for a reason waiting cannot fix (${database}): ${reason}`);
      }
      const waited = Date.now() - started;
      if (maxWaitMs === 0) {
        log.error({ database, code, err: reason, max_wait_ms: 0 }, 'database not reachable at start; ERP_CLOUD_START_WAIT_MS=0: not waiting');
        throw new DatabaseStartError(`cannot start: the database is not reachable (${database}) and ERP_CLOUD_START_WAIT_MS is 0 (no waiting): ${reason}`);
      }
      if (waited >= maxWaitMs) {
        log.error({ database, attempts: attempt, code, err: reason, waited_ms: waited, max_wait_ms: maxWaitMs }, 'database not reachable at start: gave up');
        throw new DatabaseStartError(
          `cannot start: the database was not reachable within ERP_CLOUD_START_WAIT_MS=${maxWaitMs} ms (${database}, ${attempt} attempts); last error: ${reason}`);
      }
      const step = Math.min(capMs, baseMs * 2 ** Math.min(attempt - 1, 20)) * (0.5 + Math.random() * 0.5);
      const delay = Math.max(0, Math.min(step, maxWaitMs - waited));
      log.warn({ database, attempt, code, err: reason, retry_in_ms: Math.round(delay), waited_ms: waited, max_wait_ms: maxWaitMs },
        'database not reachable at start; retrying');
      await abortableSleep(delay, signal);
    }
  }
}

function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}
