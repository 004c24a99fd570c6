/**
 * The dedicated LISTEN connection (listener/kernel/listen.ts, `pg` alone) against the real
 * server: NOTIFYs arrive; a backend the server terminates, or a TCP connection that silently
 * stops answering, is replaced by a new one that LISTENs again and wakes the listener once;
 * close() leaves nothing that keeps a process alive.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createListenConnection, type ListenConnection } from '../listener/kernel/db.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
let db: TestDb;
let open: ListenConnection[] = [];
const CHANNELS = ['erp_cloud_plain', 'Mixed "Case" channel'];

beforeAll(async () => {
  db = await createTestDb('listen_connection');
});
afterEach(async () => {
  for (const c of open) await c.close();
  open = [];
});
afterAll(async () => {
  await db?.drop();
});

/** A connection with its own application_name, recording every wake and every log line. */
async function listen(opts: { url?: string; keepAliveMs?: number } = {}) {
  const app = `listen-test-${randomBytes(4).toString('hex')}`;
  const wakes: string[] = [];
  const logs: Array<{ msg: string; [k: string]: unknown }> = [];
  const log = pino({ level: 'info' }, { write: (s: string) => void logs.push(JSON.parse(s)) });
  const conn = await createListenConnection(opts.url ?? db.url, (ch) => wakes.push(ch), log, {
    applicationName: app, keepAliveMs: opts.keepAliveMs, baseMs: 50, capMs: 500,
  });
  open.push(conn);
  await conn.listenTo(CHANNELS);
  return { conn, app, wakes, logs };
}

async function backendPids(app: string): Promise<number[]> {
  const { rows } = await db.pool.query<{ pid: number }>(`select pid from pg_stat_activity where application_name = $1`, [app]);
  return rows.map((r) => r.pid);
}

async function notify(channel: string): Promise<void> {
  await db.pool.query(`select pg_notify($1, '')`, [channel]);
}

describe('the LISTEN connection (pg alone)', () => {
  it('delivers a NOTIFY on each of its channels, names needing quotes included', async () => {
    const { conn, wakes } = await listen();
    expect(conn.connected()).toBe(true);
    for (const ch of CHANNELS) await notify(ch);
    await waitFor(async () => CHANNELS.every((ch) => wakes.includes(ch)), { what: 'both notifications' });
    await notify('erp_cloud_not_listened');
    await notify(CHANNELS[0]);
    await waitFor(async () => wakes.filter((w) => w === CHANNELS[0]).length === 2, { what: 'second notification' });
    expect(wakes).not.toContain('erp_cloud_not_listened');
  });

  it('a LISTEN backend the server terminates is replaced: it LISTENs again, wakes once, and the next NOTIFY arrives', async () => {
    const { conn, app, wakes, logs } = await listen();
    const [before] = await backendPids(app);
    expect(before).toBeGreaterThan(0);
    await db.pool.query(`select pg_terminate_backend(pid) from pg_stat_activity where application_name = $1`, [app]);

    await waitFor(async () => wakes.includes('reconnected') && conn.connected(), { what: 'the reconnect wake' });
    const after = await backendPids(app);
    expect(after).toHaveLength(1);
    expect(after[0]).not.toBe(before);
    expect(wakes.filter((w) => w === 'reconnected')).toHaveLength(1);
    for (const ch of CHANNELS) await notify(ch);
    await waitFor(async () => CHANNELS.every((ch) => wakes.includes(ch)), { what: 'notifications after the reconnect' });
    const messages = logs.map((l) => l.msg);
    expect(messages).toContain('LISTEN connection failed');
    expect(messages).toContain('LISTEN connection lost, reconnecting');
    expect(messages).toContain('LISTEN connection re-established');
  });

  it('a connection that silently stops answering is noticed by the keep-alive query and replaced', async () => {
    const proxy = await freezableProxy(new URL(db.url));
    try {
      const u = new URL(db.url);
      u.host = `127.0.0.1:${proxy.port}`;
      const { conn, app, wakes, logs } = await listen({ url: u.toString(), keepAliveMs: 200 });
      const [before] = await backendPids(app);
      proxy.freezeAll(); // the socket stays open, nothing passes: no 'error', no 'end'
      await waitFor(async () => wakes.includes('reconnected') && conn.connected(), { what: 'the reconnect after the keep-alive failed' });
      expect(logs.some((l) => l.msg === 'LISTEN connection failed' && String(l.err).includes('keep-alive'))).toBe(true);
      const now = await backendPids(app);
      expect(now).not.toEqual([before]);
      await notify(CHANNELS[1]);
      await waitFor(async () => wakes.includes(CHANNELS[1]), { what: 'a notification on the new connection' });
    } finally {
      for (const c of open) await c.close();
      open = [];
      await proxy.close();
    }
  });

  it('close() ends the connection and leaves nothing behind: a process using it exits on its own', async () => {
    const app = `listen-test-${randomBytes(4).toString('hex')}`;
    const script = `
      import { createListenConnection } from './dist/listener/kernel/listen.js';
      import { pino } from 'pino';
      const conn = await createListenConnection(process.env.URL, (ch) => {
        console.log('woken ' + ch);
        void conn.close().then(() => console.log('closed'));
      }, pino({ level: 'silent' }), { applicationName: process.env.APP, keepAliveMs: 100 });
      await conn.listenTo(['erp_cloud_plain']);
      console.log('ready');
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      cwd: repo, env: { ...process.env, URL: db.url, APP: app }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    try {
      await waitFor(async () => out.includes('ready'), { what: 'the child listening' });
      await notify('erp_cloud_plain');
      const code = await Promise.race([exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), 20_000).unref())]);
      expect(code, out).toBe(0);
      expect(out).toContain('woken erp_cloud_plain');
      expect(out).toContain('closed');
      expect(await backendPids(app)).toEqual([]);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});

/** A TCP proxy to the server whose existing connections can be frozen (kept open, nothing forwarded). */
async function freezableProxy(target: URL): Promise<{ port: number; freezeAll(): void; close(): Promise<void> }> {
  const pairs: Array<[net.Socket, net.Socket]> = [];
  const server = net.createServer((inbound) => {
    const outbound = net.connect(Number(target.port), target.hostname);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
    const onError = () => {
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on('error', onError);
    outbound.on('error', onError);
    pairs.push([inbound, outbound]);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    freezeAll() {
      for (const [a, b] of pairs) {
        a.unpipe(b);
        b.unpipe(a);
        a.pause();
        b.pause();
      }
    },
    async close() {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      await new Promise((r) => server.close(r));
    },
  };
}
