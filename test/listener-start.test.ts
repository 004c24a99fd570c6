/**
 * A listener started before its database (or while it restarts, or is full) waits for it
 * instead of exiting: `erp-cloud listen` as a real process against a 127.0.0.1 port where
 * nothing listens yet, then a small TCP proxy on that port that first answers as a
 * PostgreSQL that cannot take the connection (a real ErrorResponse with its SQLSTATE),
 * then forwards to the real server.
 */
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { classifyStartError } from '../listener/kernel/db.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, urlFor, waitFor, type TestDb } from './helpers/db.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';

const PASSWORD = 'start-wait-pw-9c1e'; // secret-scan: allow (a test fixture: the server trusts 127.0.0.1, the password must only never be printed)

let db: TestDb;
let sim: SimServer;
let children: ChildListener[] = [];
let proxies: Proxy[] = [];

/** A port on 127.0.0.1 where nothing listens (yet). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as net.AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

/** The test database's URL with another host:port (and a password the server does not need). */
function urlVia(port: number, database = db.name): string {
  const u = new URL(urlFor(database));
  u.host = `127.0.0.1:${port}`;
  u.username = u.username || 'postgres';
  u.password = PASSWORD;
  return u.toString();
}

/** A PostgreSQL ErrorResponse (FATAL) with this SQLSTATE, as a server that cannot take a connection sends it. */
function errorResponse(sqlstate: string, message: string): Buffer {
  const fields = Buffer.concat([
    ...[['S', 'FATAL'], ['V', 'FATAL'], ['C', sqlstate], ['M', message]].map(([k, v]) => Buffer.from(`${k}${v}\0`, 'utf8')),
    Buffer.from([0]),
  ]);
  const head = Buffer.alloc(5);
  head.write('E', 0);
  head.writeInt32BE(fields.length + 4, 1);
  return Buffer.concat([head, fields]);
}

interface Proxy {
  /** 'forward' to the real server, 'silent' (accept and never answer), or refuse each new connection with this SQLSTATE. */
  mode: 'forward' | 'silent' | { sqlstate: string; message: string };
  accepted: number;
  refused: number;
  forwarded: number;
  close(): Promise<void>;
}

/** A TCP proxy on 127.0.0.1:port to the real server. */
async function startProxy(port: number, mode: Proxy['mode']): Promise<Proxy> {
  const target = new URL(urlFor(db.name));
  const sockets = new Set<net.Socket>();
  const proxy: Proxy = { mode, accepted: 0, refused: 0, forwarded: 0, close: async () => undefined };
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => undefined);
    const m = proxy.mode;
    proxy.accepted++;
    if (m === 'silent') return;
    if (m !== 'forward') {
      proxy.refused++;
      client.once('data', () => client.end(errorResponse(m.sqlstate, m.message))); // after the startup packet, as a server does
      return;
    }
    proxy.forwarded++;
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(upstream);
    upstream.on('close', () => sockets.delete(upstream));
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  proxy.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
  };
  proxies.push(proxy);
  return proxy;
}

function spawn(url: string, env: Record<string, string>): ChildListener {
  const c = spawnListener(url, { ERP_CLOUD_LOG_LEVEL: 'info', ...env });
  children.push(c);
  return c;
}

/** Resolves with the exit code, or fails after a bound (the process is then killed in afterEach). */
async function exitOf(c: ChildListener, what: string, timeoutMs = 30_000): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for the listener to exit (${what}); output:\n${c.output()}`)), timeoutMs);
  });
  try {
    return await Promise.race([c.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const lines = (c: ChildListener, msg: string) => c.output().split('\n').filter((l) => l.includes(`"msg":"${msg}`));
const retries = (c: ChildListener) => lines(c, 'database not reachable at start; retrying');

beforeAll(async () => {
  db = await createTestDb('listener_start');
  sim = await startSim({ routes: webhookRoutes() });
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 1000, p_backoff_base_ms => 100, p_backoff_cap_ms => 500)`, [`${sim.url}/webhook`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});
afterEach(async () => {
  for (const c of children) if (c.proc.exitCode === null && c.proc.signalCode === null) c.proc.kill('SIGKILL');
  await Promise.all(children.map((c) => c.exited));
  children = [];
  for (const p of proxies) await p.close();
  proxies = [];
});
afterAll(async () => {
  await sim.close();
  await db.drop();
});

describe('a listener started before its database', () => {
  it('waits while nothing listens and while the server is full, then connects and delivers a message, without printing the password', async () => {
    const port = await freePort();
    const c = spawn(urlVia(port), { ERP_CLOUD_START_WAIT_MS: '120000', ERP_CLOUD_WORKER_ID: 'early-bird' });
    await waitFor(async () => retries(c).length >= 2, { what: 'two refused attempts logged' });
    expect(retries(c).every((l) => l.includes('ECONNREFUSED'))).toBe(true);

    // the server is there but full: too_many_connections is waited out too
    const proxy = await startProxy(port, { sqlstate: '53300', message: 'sorry, too many clients already' });
    await waitFor(async () => retries(c).some((l) => l.includes('"code":"53300"')), { what: 'a too_many_connections attempt logged' });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}')`);
    expect(c.proc.exitCode).toBeNull();

    proxy.mode = 'forward';
    await waitFor(async () => (await statusCounts(db.pool)).sent === 1, { timeoutMs: 40_000, what: 'the message sent once the database answers' });
    expect(sim.ledger()).toHaveLength(1);
    expect(lines(c, 'database reachable: starting')).toHaveLength(1);
    expect(lines(c, 'listener started')).toHaveLength(1);
    expect(proxy.refused).toBeGreaterThanOrEqual(1);
    expect(proxy.forwarded).toBeGreaterThanOrEqual(1);
    expect(c.output()).not.toContain(PASSWORD);

    c.proc.kill('SIGTERM');
    expect(await exitOf(c, 'SIGTERM after start')).toBe(0);
  });

  it.each([
    ['57P03', 'the database system is starting up'],
    ['57P01', 'terminating connection due to administrator command'],
    ['57P02', 'terminating connection because of crash of another server process'],
  ])('a server answering %s (starting, shutting down, crashed) is waited for, not exited on', async (sqlstate, message) => {
    const port = await freePort();
    const proxy = await startProxy(port, { sqlstate, message });
    const c = spawn(urlVia(port), { ERP_CLOUD_START_WAIT_MS: '120000' });
    await waitFor(async () => retries(c).filter((l) => l.includes(`"code":"${sqlstate}"`)).length >= 2, { what: `two ${sqlstate} attempts logged` });
    expect(c.proc.exitCode).toBeNull();
    proxy.mode = 'forward';
    await waitFor(async () => lines(c, 'listener started').length === 1, { timeoutMs: 40_000, what: 'the listener started' });
    c.proc.kill('SIGTERM');
    expect(await exitOf(c, 'SIGTERM after start')).toBe(0);
  });

  it('with ERP_CLOUD_START_WAIT_MS=0 it exits 1 after one attempt, saying why', async () => {
    const c = spawn(urlVia(await freePort()), { ERP_CLOUD_START_WAIT_MS: '0' });
    expect(await exitOf(c, 'no waiting')).toBe(1);
    expect(retries(c)).toEqual([]);
    expect(c.output()).toContain('ERP_CLOUD_START_WAIT_MS is 0');
    expect(c.output()).toContain('ECONNREFUSED');
    expect(c.output()).not.toContain(PASSWORD);
    expect(lines(c, 'listener started')).toEqual([]);
  });

  it('one that waits past its limit exits 1 with a message naming the limit and the last reason', async () => {
    const c = spawn(urlVia(await freePort()), { ERP_CLOUD_START_WAIT_MS: '1500' });
    expect(await exitOf(c, 'the wait running out')).toBe(1);
    expect(retries(c).length).toBeGreaterThanOrEqual(1);
    expect(c.output()).toMatch(/erp-cloud: cannot start: the database was not reachable within ERP_CLOUD_START_WAIT_MS=1500 ms .*last error: .*ECONNREFUSED/);
    expect(c.output()).not.toContain(PASSWORD);
    expect(lines(c, 'listener started')).toEqual([]);
  });

  it.each(['SIGTERM', 'SIGINT'] as const)('%s while it waits ends the wait and exits 0', async (signal) => {
    const c = spawn(urlVia(await freePort()), { ERP_CLOUD_START_WAIT_MS: '600000' });
    await waitFor(async () => retries(c).length >= 1, { what: 'a refused attempt logged' });
    c.proc.kill(signal);
    expect(await exitOf(c, `${signal} while waiting`)).toBe(0);
    expect(lines(c, 'stopped before the database was reachable')).toHaveLength(1);
    expect(lines(c, 'listener started')).toEqual([]);
  });

  it('SIGTERM while a connection attempt hangs (a server that never answers) exits 0: the attempt is abandoned, not retried', async () => {
    const port = await freePort();
    const proxy = await startProxy(port, 'silent');
    const c = spawn(urlVia(port), { ERP_CLOUD_START_WAIT_MS: '600000' });
    await waitFor(async () => proxy.accepted >= 1, { what: 'the listener connecting' });
    c.proc.kill('SIGTERM');
    expect(await exitOf(c, 'SIGTERM during a hung attempt')).toBe(0);
    // the one attempt was abandoned, not timed out and retried
    expect(retries(c)).toEqual([]);
    expect(proxy.accepted).toBe(1);
    expect(lines(c, 'stopped before the database was reachable')).toHaveLength(1);
  });

  it('a database that does not exist fails at once with exit 1, however long the wait is', async () => {
    const c = spawn(urlFor(`${db.name}_missing`), { ERP_CLOUD_START_WAIT_MS: '600000' });
    expect(await exitOf(c, 'a missing database')).toBe(1);
    expect(retries(c)).toEqual([]);
    expect(c.output()).toContain('3D000');
    expect(c.output()).toContain('waiting cannot fix');
  });
});

describe('which start errors are waited out', () => {
  const pgError = (code: string) => Object.assign(new Error(`server said ${code}`), { code });
  it.each([
    ['too_many_connections', pgError('53300')],
    ['cannot_connect_now', pgError('57P03')],
    ['admin_shutdown', pgError('57P01')],
    ['crash_shutdown', pgError('57P02')],
    ['connection_failure', pgError('08006')],
    ['connection refused', pgError('ECONNREFUSED')],
    ['connection reset', pgError('ECONNRESET')],
    ['a network timeout', pgError('ETIMEDOUT')],
    ['a name not resolvable yet', pgError('EAI_AGAIN')],
    ['pg: a socket closed mid-handshake', new Error('Connection terminated unexpectedly')],
    ['pg: its connect timeout', new Error('Connection terminated due to connection timeout')],
    ['pg: its query timeout', new Error('Query read timeout')],
  ])('%s: retried', (_what, err) => {
    expect(classifyStartError(err)).toBe('retry');
  });

  it.each([
    ['invalid_password', pgError('28P01')],
    ['invalid_authorization_specification', pgError('28000')],
    ['invalid_catalog_name (no such database)', pgError('3D000')],
    ['insufficient_privilege', pgError('42501')],
    ['a TLS error', pgError('ERR_TLS_CERT_ALTNAME_INVALID')],
    ['an error of unknown kind', new Error('The server does not support SSL connections')],
  ])('%s: not retried', (_what, err) => {
    expect(classifyStartError(err)).toBe('fatal');
  });
});
