/**
 * The listener survives a PostgreSQL restart, and a crash. This file starts a
 * cluster of its own (scripts/pg.sh with its own directory and port), so
 * restarting or crashing it cannot disturb the other test files.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrate } from '../listener/kernel/db.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { statusCounts, waitFor } from './helpers/db.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';

const run = promisify(execFile);
const dir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-restart-'));
const port = String(20000 + Math.floor(Math.random() * 20000));
const env = { PATH: process.env.PATH, ERP_CLOUD_PGDIR: dir, ERP_CLOUD_PGPORT: port };
const url = `postgres://postgres@127.0.0.1:${port}/erp_cloud`;
const pgsh = (verb: string) => run('bash', ['scripts/pg.sh', verb], { env });

let sim: SimServer;
let pool: pg.Pool;
let listener: ChildListener | undefined;

beforeAll(async () => {
  await pgsh('start');
  await migrate(url);
  sim = await startSim({ routes: webhookRoutes() });
  pool = new pg.Pool({ connectionString: url, max: 2 });
  pool.on('error', () => undefined);
  await pool.query(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 1000, p_backoff_base_ms => 100, p_backoff_cap_ms => 1000)`, [`${sim.url}/webhook`]);
  await pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`);
}, 60_000);

afterAll(async () => {
  listener?.proc.kill('SIGKILL');
  await pool?.end().catch(() => undefined);
  await sim?.close();
  await pgsh('stop').catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
});

describe('PostgreSQL restart', () => {
  it('the listener survives a PostgreSQL restart and delivers what was enqueued before and after it', async () => {
    // a one-minute poll: everything below must come from NOTIFY, the retry timer and the reconnect wake-up
    listener = spawnListener(url, { ERP_CLOUD_WORKER_ID: 'survivor', ERP_CLOUD_LOG_LEVEL: 'warn', ERP_CLOUD_POLL_MS: '60000' });
    await pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 50) g`);
    await waitFor(async () => (await statusCounts(pool)).sent === 50, { what: 'first 50 sent' });

    await run('bash', ['scripts/pg.sh', 'stop'], { env });
    await new Promise((r) => setTimeout(r, 1500)); // the listener sees the database gone
    await pgsh('start');

    await waitFor(async () => {
      try {
        await pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(51, 100) g`);
        return true;
      } catch {
        return false;
      }
    }, { what: 'database back' });
    await waitFor(async () => (await statusCounts(pool)).sent === 100, { timeoutMs: 30_000, what: 'all 100 sent after the restart' });
    expect(listener.proc.exitCode).toBeNull();
    expect(sim.ledger()).toHaveLength(100);
    // LISTEN came back too: an idle listener is woken by NOTIFY again, well before the poll would find the row
    await waitFor(async () => (await pool.query(`select idle from cloud.listener_status where worker_id = 'survivor'`)).rows[0]?.idle === true, { what: 'idle again' });
    // its LISTEN connection is back (every backend is new since the restart), and the enqueue NOTIFYs it
    expect((await pool.query(`select count(*)::int as n from pg_stat_activity where application_name = 'erp-cloud listen'`)).rows).toEqual([{ n: 1 }]);
    const ear = new pg.Client({ connectionString: url });
    await ear.connect();
    try {
      const heard = new Promise<string>((resolve) => ear.once('notification', (n) => resolve(n.channel)));
      await ear.query('listen cloud_outbox');
      await pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":101}')`);
      expect(await heard).toBe('cloud_outbox');
    } finally {
      await ear.end();
    }
    await waitFor(async () => sim.ledger().length === 101, { what: 'the message after the restart' });
  }, 90_000);

  it('after a crash of PostgreSQL, what was enqueued before it waits out the longest lease while what comes after goes at once, and each message reaches the cloud once', async () => {
    // the listener of the test above still runs; a clean stop raised no fence
    expect((await pool.query(`select fence_until = '-infinity' as none from cloud.delivery_fence`)).rows).toEqual([{ none: true }]);
    await pool.query(`select cloud.put_endpoint('slowhook', $1, p_timeout_ms => 15000, p_enabled => false)`, [`${sim.url}/webhook`]);
    await pool.query(`select cloud.put_endpoint_allowlist('slowhook', '{}', '{}', true)`);
    const enqueue = async (from: number) => (await pool.query<{ id: string }>(
      `select cloud.enqueue_message('slowhook', 'demo.ping', jsonb_build_object('n', g)) as id from generate_series($1::int, $1::int + 4) g`, [from])).rows.map((r) => r.id);
    const before = await enqueue(201); // held: the endpoint is disabled

    await pgsh('crash');
    await pgsh('start');
    // crash recovery emptied the unlogged fence; the listener's first claim after it raises the fence again
    await waitFor(async () => {
      try {
        return (await pool.query(`select 1 from cloud.delivery_fence where fence_until > now()`)).rowCount === 1;
      } catch {
        return false;
      }
    }, { timeoutMs: 30_000, what: 'the fence raised by the first claim after the crash' });
    await pool.query(`select cloud.put_endpoint('slowhook', $1, p_timeout_ms => 15000)`, [`${sim.url}/webhook`]);
    const after = await enqueue(206);
    await waitFor(async () => (await pool.query(`select 1 from cloud.outbox where request_id = any ($1::uuid[]) and status = 'sent'`, [after])).rowCount === 5,
      { timeoutMs: 15_000, what: 'the five enqueued after the crash sent' });
    const { rows: [held] } = await pool.query<{ fenced: boolean; waiting: number }>(
      `select (select now() < fence_until from cloud.delivery_fence) as fenced,
              (select count(*)::int from cloud.outbox where request_id = any ($1::uuid[]) and status = 'pending') as waiting`, [before]);
    expect(held).toEqual({ fenced: true, waiting: 5 });

    await waitFor(async () => (await pool.query(`select 1 from cloud.outbox where request_id = any ($1::uuid[]) and status = 'sent'`, [before])).rowCount === 5,
      { timeoutMs: 60_000, what: 'the five enqueued before the crash sent once the fence lifted' });
    const keys = sim.ledger().map((e) => e.key);
    expect(new Set(keys).size).toBe(keys.length);
    expect(keys.filter((k) => before.includes(k) || after.includes(k))).toHaveLength(10);
    expect(listener!.proc.exitCode).toBeNull();
  }, 120_000);
});
