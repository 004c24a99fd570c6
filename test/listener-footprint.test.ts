/**
 * What a listener's start loads (issue 15 §3: start-up is a large share of a short run's CPU):
 * a plain `erp-cloud listen` loads only what a delivery needs. The modules a process loaded are
 * seen through a module loading hook (node --import), as file URLs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';

let db: TestDb;
let sim: SimServer;
const children: ChildProcess[] = [];

beforeAll(async () => {
  db = await createTestDb('footprint');
  sim = await startSim({ routes: webhookRoutes() });
  await db.pool.query(`select cloud.put_endpoint('hook', $1)`, [`${sim.url}/webhook`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await sim.close();
  await db.drop();
});

/** A --import module that reports every module URL the process loads (on stderr, as it exits). */
const HOOKS = 'let port; export function initialize(d) { port = d.port; } '
  + 'export async function load(url, context, next) { port.postMessage(url); return next(url, context); }';
const RECORDER = 'data:text/javascript,' + encodeURIComponent(`import { register } from 'node:module';
import { MessageChannel } from 'node:worker_threads';
const { port1, port2 } = new MessageChannel();
const seen = new Set();
port1.on('message', (u) => seen.add(u));
port1.unref();
register('data:text/javascript,' + encodeURIComponent(${JSON.stringify(HOOKS)}), { data: { port: port2 }, transferList: [port2] });
process.on('exit', () => process.stderr.write('LOADED ' + JSON.stringify([...seen]) + '\\n'));`);

/** Runs `erp-cloud <args>` under the recorder until it has delivered one message, stops it, and returns what it loaded. */
async function loadedBy(args: string[], env: Record<string, string>, label: string): Promise<string[]> {
  let out = '';
  const proc = spawn(process.execPath, ['--import', RECORDER, 'dist/listener/cli.js', ...args], {
    env: { PATH: process.env.PATH, ERP_CLOUD_LOG_LEVEL: 'warn', ERP_CLOUD_POLL_MS: '200', ERP_CLOUD_WORKER_ID: label, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(proc);
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const { rows } = await db.pool.query<{ id: string }>(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('who', $1::text)) id`, [label]);
  await waitFor(async () => {
    if (proc.exitCode !== null) throw new Error(`listener exited (${proc.exitCode}): ${out}`);
    const s = await db.pool.query<{ status: string }>('select status from cloud.outbox where request_id = $1', [rows[0]!.id]);
    return s.rows[0]?.status === 'sent';
  }, { timeoutMs: 20_000, what: `${label} to deliver its message` });
  proc.kill('SIGTERM');
  expect(await exited).toBe(0);
  const line = out.split('\n').find((l) => l.startsWith('LOADED '));
  expect(line, out).toBeTruthy();
  return (JSON.parse(line!.slice('LOADED '.length)) as string[]).map((u) => decodeURIComponent(u));
}

const under = (urls: string[], part: string) => urls.filter((u) => u.includes(part));

describe('a listener loads only what a delivery needs', () => {
  it('a plain `listen` loads neither zod nor commander nor prom-client (its metrics port off), nor got, nor any of sso/, console/, sim/, inbound/, ops/, and still delivers', async () => {
    const urls = await loadedBy(['listen'], { DATABASE_URL: db.url, ERP_CLOUD_HTTP_PORT: '-1' }, 'plain');
    expect(under(urls, '/dist/listener/delivery/worker.js')).toHaveLength(1); // the recorder sees the listener's own modules
    expect(under(urls, '/node_modules/pg/')).not.toEqual([]); // and the packages it loads
    for (const part of ['/node_modules/zod/', '/node_modules/commander/', '/node_modules/prom-client/', '/node_modules/got/',
      '/dist/listener/sso/', '/dist/listener/console/', '/dist/listener/sim/', '/dist/listener/inbound/', '/dist/listener/ops/']) {
      expect(under(urls, part), part).toEqual([]);
    }
  });

  it('-c URL listen is a plain listen too; with the metrics port on it loads prom-client and the status server, with the inbound port on the receivers', async () => {
    const urls = await loadedBy(['-c', db.url, 'listen'], { ERP_CLOUD_HTTP_PORT: '0', ERP_CLOUD_INBOUND_PORT: '0', ERP_CLOUD_INBOUND_HOST: '127.0.0.1' }, 'served');
    expect(under(urls, '/node_modules/prom-client/')).not.toEqual([]);
    expect(under(urls, '/dist/listener/ops/status-server.js')).toHaveLength(1);
    expect(under(urls, '/dist/listener/inbound/routes.js')).toHaveLength(1);
    for (const part of ['/node_modules/zod/', '/node_modules/commander/', '/dist/listener/sso/', '/dist/listener/console/']) {
      expect(under(urls, part), part).toEqual([]);
    }
  });

  it('any other command line goes through commander as before (the listen verb after an option it does not take is refused with usage)', async () => {
    const r = await new Promise<{ code: number | null; out: string }>((resolve) => {
      let out = '';
      const p = spawn(process.execPath, ['dist/listener/cli.js', 'listen', '--bogus'], { env: { PATH: process.env.PATH, DATABASE_URL: db.url }, stdio: ['ignore', 'pipe', 'pipe'] });
      p.stdout!.on('data', (d) => (out += d));
      p.stderr!.on('data', (d) => (out += d));
      p.on('exit', (code) => resolve({ code, out }));
    });
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/unknown option '--bogus'/);
  });
});
