/**
 * The listener as real processes: two of them draining one queue, one killed
 * with SIGKILL mid-batch, one stopped with SIGTERM, one refused for bad config;
 * and the CLI verbs an operator uses.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';

const run = promisify(execFile);
let db: TestDb;
let sim: SimServer;
let children: ChildListener[] = [];

beforeAll(async () => {
  db = await createTestDb('processes');
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  for (const c of children) c.proc.kill('SIGKILL');
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  for (const c of children) c.proc.kill('SIGKILL');
  children = [];
  sim.reset();
  await resetProductState(db.pool);
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 1000, p_backoff_base_ms => 100, p_backoff_cap_ms => 500)`, [`${sim.url}/webhook`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});

function spawn(env: Record<string, string> = {}): ChildListener {
  const c = spawnListener(db.url, env);
  children.push(c);
  return c;
}

async function enqueueMany(n: number): Promise<void> {
  await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, $1) g`, [n]);
}

function cli(...args: string[]) {
  return run(process.execPath, ['dist/listener/cli.js', ...args], { env: { PATH: process.env.PATH, DATABASE_URL: db.url } }).then(
    (r) => ({ code: 0, ...r }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

describe('listener processes', () => {
  it('two listener processes draining 2,000 messages send each exactly once and lose none', async () => {
    // the timeout is not what this test is about: a retry after one on a loaded machine would be a second request
    await db.pool.query(`update cloud.endpoint set timeout_ms = 10000`);
    await enqueueMany(2000);
    spawn({ ERP_CLOUD_WORKER_ID: 'proc-a' });
    spawn({ ERP_CLOUD_WORKER_ID: 'proc-b' });
    await waitFor(async () => (await statusCounts(db.pool)).sent === 2000, { timeoutMs: 45_000, what: '2000 sent' });
    const ledger = sim.ledger();
    expect(ledger).toHaveLength(2000);
    expect(ledger.every((e) => e.hits === 1)).toBe(true);
    expect(sim.requests()).toHaveLength(2000);
    const { rows } = await db.pool.query(`select count(*)::int n, count(distinct request_id)::int d from cloud.log`);
    expect(rows[0]).toEqual({ n: 2000, d: 2000 });
    const workers = await db.pool.query(`select distinct worker_id from cloud.log order by 1`);
    expect(workers.rows.map((r) => r.worker_id)).toEqual(['proc-a', 'proc-b']);
  });

  it('a listener killed with SIGKILL mid-batch loses nothing: its leases expire and another listener delivers, one effect per request_id', async () => {
    sim.setFaults({ fault: { kind: 'slow', ms: 300 } });
    await enqueueMany(200);
    const victim = spawn({ ERP_CLOUD_WORKER_ID: 'victim', ERP_CLOUD_CONCURRENCY: '50', ERP_CLOUD_LEASE_MARGIN_MS: '500' });
    await waitFor(async () => (await statusCounts(db.pool)).in_flight >= 40, { what: 'a batch in flight' });
    victim.proc.kill('SIGKILL');
    await victim.exited;
    const stranded = (await statusCounts(db.pool)).in_flight ?? 0;
    expect(stranded).toBeGreaterThan(0);
    sim.setFaults(null);
    spawn({ ERP_CLOUD_WORKER_ID: 'rescuer' });
    await waitFor(async () => (await statusCounts(db.pool)).sent === 200, { timeoutMs: 30_000, what: 'all 200 sent' });
    const ledger = sim.ledger();
    expect(ledger).toHaveLength(200);
    expect(new Set(ledger.map((e) => e.key)).size).toBe(200);
    const reaped = await db.pool.query(`select count(*)::int n from cloud.log where error_class = 'lease_expired' and worker_id = 'victim'`);
    expect(reaped.rows[0].n).toBe(stranded);
  });

  it('SIGTERM stops claiming, lets in-flight calls finish, leaves nothing in flight and exits 0', async () => {
    sim.setFaults({ fault: { kind: 'slow', ms: 400 } });
    await enqueueMany(100);
    const l = spawn({ ERP_CLOUD_CONCURRENCY: '20' });
    await waitFor(async () => (await statusCounts(db.pool)).in_flight >= 10, { what: 'calls in flight' });
    l.proc.kill('SIGTERM');
    expect(await l.exited).toBe(0);
    const counts = await statusCounts(db.pool);
    expect(counts.in_flight ?? 0).toBe(0);
    expect(counts.sent).toBeGreaterThanOrEqual(10);
    expect((counts.sent ?? 0) + (counts.pending ?? 0)).toBe(100);
    expect((await db.pool.query(`select count(*)::int n from cloud.listener`)).rows[0].n).toBe(0);
  });

  it('a bad ERP_CLOUD_* value stops the listener with exit code 1 and a message naming the variable', async () => {
    const l = spawn({ ERP_CLOUD_CONCURRENCY: 'lots' });
    expect(await l.exited).toBe(1);
    expect(l.output()).toMatch(/ERP_CLOUD_CONCURRENCY/);
  });
});

describe('the CLI', () => {
  it('status prints the per-endpoint table; replay re-queues a dead message and refuses a sent one', async () => {
    await db.pool.query(`update cloud.endpoint set max_attempts = 1`);
    const { rows } = await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}') as id`);
    const id = rows[0].id as string;
    await db.pool.query(`select cloud.claim_messages('w', 10)`);
    await db.pool.query(`select cloud.record_attempts('w', $1::jsonb)`, [JSON.stringify([{ request_id: id, attempt: 1, outcome: 'retryable', error_message: 'HTTP 503', started_at: new Date().toISOString() }])]);
    const status = await cli('status');
    expect(status.code).toBe(0);
    expect(status.stdout).toMatch(/^endpoint\s+enabled\s+pending/m);
    expect(status.stdout).toMatch(/^hook\s+true\s+0\s+0\s+0\s+0\s+1/m);
    expect(JSON.parse((await cli('status', '--json')).stdout).endpoints[0]).toMatchObject({ endpoint: 'hook', dead: '1' });

    expect((await cli('replay', id)).code).toBe(1); // --reason is required
    const replay = await cli('replay', id, '--reason', 'cloud back', '--actor', 'dba');
    expect(replay.code).toBe(0);
    const again = await cli('replay', id, '--reason', 'twice');
    expect(again.code).toBe(1);
    expect(again.stderr).toContain('EC006');
    const unknown = await cli('replay', '--dead', '--endpoint', 'nope', '--reason', 'x');
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('EC001');

    // the replayed message dies again (its second try: replays keep numbering them); --dead replays every dead letter of the endpoint
    await db.pool.query(`select cloud.claim_messages('w', 10)`);
    await db.pool.query(`select cloud.record_attempts('w', $1::jsonb)`, [JSON.stringify([{ request_id: id, attempt: 2, outcome: 'retryable', error_message: 'HTTP 503', started_at: new Date().toISOString() }])]);
    const all = await cli('replay', '--dead', '--endpoint', 'hook', '--reason', 'cloud back for good');
    expect(all).toMatchObject({ code: 0, stdout: expect.stringContaining('replayed 1 dead message(s) of hook') });
    const audit = await db.pool.query(`select actor, reason from cloud.replay_audit order by id`);
    expect(audit.rows).toEqual([{ actor: 'dba', reason: 'cloud back' }, { actor: expect.any(String), reason: 'cloud back for good' }]);
  });

  it('any failure exits with code 1: no database, an unreachable database, an unknown verb', async () => {
    const noDb = await run(process.execPath, ['dist/listener/cli.js', 'status'], { env: { PATH: process.env.PATH } }).catch((e) => e);
    expect(noDb.code).toBe(1);
    expect(noDb.stderr).toMatch(/DATABASE_URL/);
    expect((await cli('-c', 'postgres://postgres@127.0.0.1:1/none', 'status')).code).toBe(1);
    expect((await cli('frobnicate')).code).toBe(1);
  });
});
