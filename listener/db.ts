/**
 * Database access: the work pool, the one dedicated LISTEN connection, and
 * migrations. Every SQL statement the listener sends is a call to a function
 * in schema cloud (queries.ts); nothing here knows their logic.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import pgListen, { type Subscriber } from 'pg-listen';

// pg-listen is CommonJS with an ES-style default export
const createSubscriber = pgListen.default;
import { migrate as runMigrations } from 'postgres-migrations';
import type { Logger } from './logger.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** sql/migrations, found from both listener/ (tsx, vitest) and dist/listener/ (built). */
export const migrationsDir = [path.resolve(here, '../sql/migrations'), path.resolve(here, '../../sql/migrations')].find(
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

/** Runs the numbered migrations (postgres-migrations takes an advisory lock, so concurrent runs are safe). */
export async function migrate(connectionString: string, log?: (msg: string) => void): Promise<string[]> {
  const client = new pg.Client({ connectionString, application_name: 'erp-cloud migrate' });
  const notices: string[] = [];
  client.on('notice', (n) => {
    notices.push(n.message ?? String(n));
    log?.(`NOTICE: ${n.message}`);
  });
  await client.connect();
  try {
    const applied = await runMigrations({ client }, migrationsDir);
    for (const m of applied) log?.(`applied ${m.fileName}`);
    return applied.map((m) => m.fileName);
  } finally {
    await client.end();
  }
}

export interface ListenConnection {
  subscriber: Subscriber;
  connected(): boolean;
  listenTo(channels: string[]): Promise<void>;
  close(): Promise<void>;
}

/**
 * The dedicated LISTEN connection (pg-listen): reconnects with backoff, and a
 * heartbeat query ("paranoid checking") notices a silently dead socket.
 */
export async function createListenConnection(
  connectionString: string,
  onWake: (channel: string) => void,
  log: Logger,
): Promise<ListenConnection> {
  const subscriber = createSubscriber(
    { connectionString, application_name: 'erp-cloud listen' },
    { paranoidChecking: 10_000, retryInterval: (n) => Math.min(250 * 2 ** n, 5000) * (0.8 + Math.random() * 0.4), retryLimit: Infinity, retryTimeout: Infinity, parse: (s) => s },
  );
  let up = false;
  const channels = new Set<string>();
  subscriber.events.on('connected', () => {
    up = true;
  });
  subscriber.events.on('reconnect', (attempt) => {
    up = false;
    log.warn({ attempt }, 'LISTEN connection lost, reconnecting');
  });
  subscriber.events.on('error', (err) => {
    up = false;
    log.error({ err: err.message }, 'LISTEN connection failed');
  });
  subscriber.events.on('notification', ({ channel }) => onWake(channel));
  await subscriber.connect();
  up = true;
  // after a reconnect pg-listen re-issues LISTEN itself; wake once so nothing
  // enqueued while we were deaf waits for the poll
  subscriber.events.on('connected', () => onWake('reconnected'));
  return {
    subscriber,
    connected: () => up,
    async listenTo(list) {
      for (const ch of list) {
        if (channels.has(ch)) continue;
        await subscriber.listenTo(ch);
        channels.add(ch);
      }
    },
    async close() {
      await subscriber.close().catch(() => undefined);
    },
  };
}
