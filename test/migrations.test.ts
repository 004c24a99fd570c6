/**
 * Migrations are safe to run twice and concurrently, and pg_cron runs the
 * maintenance jobs unattended in the cron database.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { migrate } from '../listener/db.js';
import { createTestDb, urlFor, waitFor, type TestDb } from './helpers/db.js';

const run = promisify(execFile);
const dbs: TestDb[] = [];
afterAll(async () => {
  for (const d of dbs) await d.drop();
});

describe('migrations', () => {
  it('run twice and concurrently without harm: one set of objects, one row per migration', async () => {
    const db = await createTestDb('migrate', { template: null });
    dbs.push(db);
    const cli = () => run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate']);
    const results = await Promise.allSettled([cli(), cli(), migrate(db.url)]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
    const again = await cli();
    expect(again.stdout).toContain('already current');
    const { rows } = await db.pool.query(`select count(*)::int n from migrations`);
    const files = await db.pool.query(`select count(*)::int n from pg_proc where proname = 'claim_messages'`);
    const migrationFiles = readdirSync('sql/migrations').filter((f) => f.endsWith('.sql')).length;
    expect(rows[0].n).toBe(migrationFiles + 1); // + postgres-migrations' own bookkeeping row
    expect(files.rows[0].n).toBe(1);
  });

  it('a database without pg_cron gets a NOTICE and the listener runs maintenance itself', async () => {
    const db = await createTestDb('nocron', { template: null });
    dbs.push(db);
    const out = await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate']);
    expect(out.stdout).toMatch(/NOTICE: pg_cron is not available in database/);
    expect((await db.pool.query(`select cloud.cron_jobs_scheduled() as s`)).rows[0].s).toBe(false);
  });
});

describe('pg_cron', () => {
  it('the maintenance jobs exist in the cron database and run every minute', async () => {
    const admin = new pg.Client({ connectionString: urlFor('postgres') });
    await admin.connect();
    const cronDb = (await admin.query(`select current_setting('cron.database_name', true) as d`)).rows[0].d as string | null;
    await admin.end();
    expect(cronDb, 'the server must preload pg_cron (scripts/pg.sh configures it)').toBeTruthy();
    const url = urlFor(cronDb!);
    await migrate(url);
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      const jobs = await c.query(`select jobname, schedule, database, active from cron.job where jobname like 'erp-cloud: %' order by jobname`);
      expect(jobs.rows.map((j) => j.jobname)).toEqual([
        'erp-cloud: log partitions', 'erp-cloud: purge finished', 'erp-cloud: reap expired leases', 'erp-cloud: wake due retries',
      ]);
      expect(jobs.rows.every((j) => j.database === cronDb && j.active)).toBe(true);
      expect((await c.query(`select cloud.cron_jobs_scheduled() as s`)).rows[0].s).toBe(true);
      const since = new Date();
      const ran = await waitFor(async () => {
        const { rows } = await c.query(
          `select d.status, d.return_message from cron.job_run_details d join cron.job j using (jobid)
            where j.jobname = 'erp-cloud: reap expired leases' and d.start_time >= $1 and d.status in ('succeeded', 'failed')`, [since]);
        return rows[0];
      }, { timeoutMs: 75_000, intervalMs: 1000, what: 'a pg_cron run of the reaper' });
      expect(ran).toMatchObject({ status: 'succeeded' });

      // doctor reports the listeners with pg_cron too: pg_cron maintains, but only a listener delivers
      const worker = `doctor-cron-${process.pid}`;
      await c.query(`insert into cloud.listener (worker_id, host) values ($1, 'cron-test') on conflict (worker_id) do update set heartbeat_at = now()`, [worker]);
      try {
        const out = await run(process.execPath, ['dist/listener/cli.js', '-c', url, 'doctor', '--json'], { env: { PATH: process.env.PATH } })
          .then((r) => r.stdout, (e: { stdout: string }) => e.stdout);
        const checks = (JSON.parse(out) as { checks: Array<{ check: string; status: string; detail: string }> }).checks;
        expect(checks.filter((x) => x.check === 'pg_cron job').map((x) => x.status)).toContain('ok');
        const heartbeat = checks.filter((x) => x.check === 'listener heartbeat');
        expect(heartbeat).toHaveLength(1);
        expect(heartbeat[0]).toMatchObject({ status: 'ok', detail: expect.stringContaining(`${worker} on cron-test`) });
        expect(heartbeat[0]!.detail).not.toMatch(/run maintenance/);
      } finally {
        await c.query(`delete from cloud.listener where worker_id = $1`, [worker]);
      }
    } finally {
      await c.end();
    }
  }, 90_000);
});
