/**
 * `erp-cloud migrate`: history in erp-cloud's own schema (erp_cloud.migration), safe to run twice
 * and concurrently, a changed landed file refused, an application's own `migrations` table never
 * read as ours nor touched, and an installation of an earlier release (postgres-migrations)
 * upgraded in place. And pg_cron runs the maintenance jobs unattended in the cron database (the
 * tests' own: test/helpers/cron.ts).
 */
import { execFile } from 'node:child_process';
import { appendFileSync, cpSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { migrate, migrationsDir } from '../listener/kernel/db.js';
import { loadBaseline, loadMigrationFiles, MigrationError, MigrationReason, runMigrations } from '../listener/kernel/migrations.js';
import { migrateLikeEarlierRelease, PREVIOUS_RELEASE, releaseFiles } from './helpers/legacy-release.js';
import { withCronDatabase } from './helpers/cron.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';

const run = promisify(execFile);
const dbs: TestDb[] = [];
const dirs: string[] = [];
// every DROP DATABASE forces a checkpoint: a dozen one after the other outlasted the 60-s hook on a loaded
// machine, while drops side by side share their checkpoints (bounded by the hook's own 180 s)
afterAll(async () => {
  await Promise.all(dbs.map((d) => d.drop()));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}, 180_000);

const files = loadMigrationFiles(migrationsDir);
/** How many files a fresh database gets from sql/baseline (test/baseline.test.ts) rather than one by one. */
const fromBaseline = loadBaseline(path.join(path.dirname(migrationsDir), 'baseline'))?.id ?? 0;
/** The number of the n-th migration file after the last landed one (0018 while 0017 is the last). */
const nextNo = (n: number) => String(files.length + n).padStart(4, '0');
const OUR_SCHEMAS = ['cloud', 'tax', 'scm', 'sso', 'vault', 'erp', 'erp_cloud'];

async function fresh(label: string): Promise<TestDb> {
  const db = await createTestDb(label, { template: null });
  dbs.push(db);
  return db;
}

async function migrated(label: string): Promise<TestDb> {
  const db = await createTestDb(label);
  dbs.push(db);
  return db;
}

/** A copy of sql/migrations to change (a landed file edited, a file added). */
function copyOfMigrations(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-migrations-'));
  dirs.push(dir);
  for (const f of readdirSync(migrationsDir).filter((x) => x.endsWith('.sql'))) cpSync(path.join(migrationsDir, f), path.join(dir, f));
  return dir;
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  c.on('notice', () => undefined);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

async function rejection(p: Promise<unknown>): Promise<MigrationError> {
  try {
    await p;
  } catch (err) {
    return err as MigrationError;
  }
  throw new Error('expected a rejection');
}

/** Everything an untouched table keeps: its definition in the catalog and every row version (xmin, ctid) and value. */
async function tableSnapshot(pool: pg.Pool, table: string): Promise<unknown> {
  const one = async (sql: string) => (await pool.query(sql, [table])).rows;
  return {
    relation: await one(`select relname, relkind, relowner::regrole::text as owner, relacl::text as acl, relfilenode, relnatts,
                                obj_description(oid, 'pg_class') as comment from pg_class where oid = $1::regclass`),
    columns: await one(`select a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) as type, a.attnotnull, pg_get_expr(d.adbin, d.adrelid) as def
                          from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                         where a.attrelid = $1::regclass and a.attnum > 0 order by a.attnum`),
    constraints: await one(`select conname, pg_get_constraintdef(oid) as def from pg_constraint where conrelid = $1::regclass order by conname`),
    indexes: await one(`select indexrelid::regclass::text as name, pg_get_indexdef(indexrelid) as def from pg_index where indrelid = $1::regclass order by 1`),
    triggers: await one(`select tgname from pg_trigger where tgrelid = $1::regclass order by 1`),
    rows: (await pool.query(`select xmin::text as xmin, ctid::text as ctid, to_jsonb(t) as row from ${table} t order by ctid`)).rows,
  };
}

/** Relations outside erp-cloud's schemas, and functions there that no extension owns. */
async function objectsOutsideOurSchemas(pool: pg.Pool): Promise<string[]> {
  const { rows } = await pool.query<{ obj: string }>(`
    select c.oid::regclass::text as obj from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname <> all ($1) and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast') and n.nspname !~ '^pg_temp|^pg_toast_temp'
       and not exists (select from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e')
    union all
    select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname <> all ($1) and n.nspname not in ('pg_catalog', 'information_schema')
       and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
     order by 1`, [OUR_SCHEMAS]);
  return rows.map((r) => r.obj);
}

describe('migrations', () => {
  it('run twice and concurrently without harm: one set of objects, one history row per migration file, all in erp-cloud\'s own schemas', async () => {
    const db = await fresh('migrate');
    const cli = () => run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate']);
    const results = await Promise.allSettled([cli(), cli(), migrate(db.url)]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled']);
    const again = await cli();
    expect(again.stdout).toContain('already current');
    const history = (await db.pool.query(`select id, name, sha256, applied_by = current_user as by_us, copied_from from erp_cloud.migration order by id`)).rows;
    expect(history).toEqual(files.map((f) => ({ id: f.id, name: f.name, sha256: f.sha256, by_us: true, copied_from: f.id <= fromBaseline ? 'baseline' : null })));
    const claimFns = await db.pool.query(`select count(*)::int n from pg_proc where proname = 'claim_messages'`);
    expect(claimFns.rows[0].n).toBe(1);
    // nothing in public or any other schema that is not ours: no history table found by the search path, no stray object
    expect((await db.pool.query(`select to_regclass('public.migrations') as t`)).rows[0].t).toBeNull();
    expect(await objectsOutsideOurSchemas(db.pool)).toEqual([]);
  });

  it('migrating a current database again is a no-op: nothing applied, the history rows untouched', async () => {
    const db = await migrated('noop');
    const before = (await db.pool.query(`select xmin::text, * from erp_cloud.migration order by id`)).rows;
    const lines: string[] = [];
    expect(await migrate(db.url, (m) => lines.push(m))).toEqual([]);
    expect(await migrate(db.url)).toEqual([]);
    expect((await db.pool.query(`select xmin::text, * from erp_cloud.migration order by id`)).rows).toEqual(before);
    expect(lines).toEqual([]);
  });

  it('the history table documents itself: the schema, the table and every column have a comment', async () => {
    const db = await migrated('comments');
    const { rows } = await db.pool.query(`
      select 'schema' as what, obj_description('erp_cloud'::regnamespace, 'pg_namespace') as comment
      union all select 'table', obj_description('erp_cloud.migration'::regclass, 'pg_class')
      union all select attname, col_description(attrelid, attnum) from pg_attribute where attrelid = 'erp_cloud.migration'::regclass and attnum > 0 and not attisdropped`);
    expect(rows.length).toBe(9);
    for (const r of rows) expect(r.comment, `${r.what} has no comment`).toBeTruthy();
  });

  it('a landed file changed after it was applied is refused (landed_file_changed) naming the file and the way out, and nothing is applied', async () => {
    const db = await migrated('edited');
    const dir = copyOfMigrations();
    const edited = files[2]!.name; // 0003_…
    appendFileSync(path.join(dir, edited), '\n-- a harmless-looking edit\n');
    writeFileSync(path.join(dir, `${nextNo(1)}_new_thing.sql`), 'create table cloud.should_not_exist ();\n');
    const err = await rejection(withClient(db.url, (c) => runMigrations(c, dir)));
    expect(err).toBeInstanceOf(MigrationError);
    expect(err.reason).toBe(MigrationReason.landedFileChanged);
    expect(err.message).toContain(edited);
    expect(err.hint).toMatch(/never edited.*new file/);
    expect((await db.pool.query(`select to_regclass('cloud.should_not_exist') as t`)).rows[0].t).toBeNull();
    expect((await db.pool.query(`select count(*)::int n from erp_cloud.migration`)).rows[0].n).toBe(files.length);
  });

  it('a migration that fails is rolled back with its history row, keeps the database\'s SQLSTATE and names the file; later files do not run', async () => {
    const db = await migrated('broken');
    const dir = copyOfMigrations();
    writeFileSync(path.join(dir, `${nextNo(1)}_half_written.sql`), 'create table cloud.half_written ();\nselect 1 / 0;\n');
    writeFileSync(path.join(dir, `${nextNo(2)}_after_it.sql`), 'create table cloud.after_it ();\n');
    const err = await rejection(withClient(db.url, (c) => runMigrations(c, dir)));
    expect(err.reason).toBe(MigrationReason.migrationFailed);
    expect(err.code).toBe('22012');
    expect(err.message).toContain(`${nextNo(1)}_half_written.sql`);
    const left = (await db.pool.query(`select to_regclass('cloud.half_written') as a, to_regclass('cloud.after_it') as b,
                                              (select max(id) from erp_cloud.migration) as last`)).rows[0];
    expect(left).toEqual({ a: null, b: null, last: files.length });
  });

  it('a database migrated by a newer release is reported (its unknown migrations named) and left as it is', async () => {
    const db = await migrated('newer');
    await db.pool.query(`insert into erp_cloud.migration (id, name, sha256) values ($1, '0099_from_a_newer_release.sql', repeat('a', 64))`, [files.length + 1]);
    const lines: string[] = [];
    expect(await migrate(db.url, (m) => lines.push(m))).toEqual([]);
    expect(lines.join('\n')).toContain('0099_from_a_newer_release.sql');
    expect((await db.pool.query(`select count(*)::int n from erp_cloud.migration`)).rows[0].n).toBe(files.length + 1);
  });

  it('a migration missing below the last applied one is refused (out_of_order: migrations apply in order only)', async () => {
    const db = await migrated('gap');
    await db.pool.query(`delete from erp_cloud.migration where id = 5`);
    const err = await rejection(migrate(db.url));
    expect(err.reason).toBe(MigrationReason.outOfOrder);
    expect(err.message).toContain(files[4]!.name);
  });

  it('an application\'s own public.migrations (Laravel) is never read as ours, stays byte-for-byte unchanged, and erp-cloud installs beside it', async () => {
    const db = await fresh('laravel');
    await db.pool.query(`
      create table public.migrations (id serial primary key, migration varchar(255) not null, batch integer not null);
      comment on table public.migrations is 'the ERP''s own';
      insert into public.migrations (migration, batch) values
        ('2014_10_12_000000_create_users_table', 1), ('2019_08_19_000000_create_failed_jobs_table', 1), ('2024_01_01_000000_create_invoices', 2);`);
    const before = await tableSnapshot(db.pool, 'public.migrations');
    const seqBefore = (await db.pool.query(`select last_value, is_called from public.migrations_id_seq`)).rows;
    const applied = await migrate(db.url);
    expect(applied).toEqual(files.map((f) => f.name));
    expect(await tableSnapshot(db.pool, 'public.migrations')).toEqual(before);
    expect((await db.pool.query(`select last_value, is_called from public.migrations_id_seq`)).rows).toEqual(seqBefore);
    expect((await db.pool.query(`select count(*)::int n, count(copied_from)::int copied from erp_cloud.migration where copied_from is distinct from 'baseline'`)).rows[0])
      .toEqual({ n: files.length - fromBaseline, copied: 0 });
    expect(await objectsOutsideOurSchemas(db.pool)).toEqual(['migrations', 'migrations_id_seq', 'migrations_pkey']);
    expect(await migrate(db.url)).toEqual([]);
    expect(await tableSnapshot(db.pool, 'public.migrations')).toEqual(before);
  });

  it('another application\'s postgres-migrations history in public.migrations (same columns, its own files) is not ours either and is left untouched', async () => {
    const db = await fresh('lookalike');
    const dir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-other-app-'));
    dirs.push(dir);
    writeFileSync(path.join(dir, '1_create_widgets.sql'), 'create table public.widgets (id int primary key);\n');
    writeFileSync(path.join(dir, '2_cloud_delivery_engine.sql'), 'create table public.gadgets (id int primary key);\n');
    await migrateLikeEarlierRelease(db.url, dir);
    const before = await tableSnapshot(db.pool, 'public.migrations');
    expect(await migrate(db.url)).toEqual(files.map((f) => f.name));
    expect(await tableSnapshot(db.pool, 'public.migrations')).toEqual(before);
    expect((await db.pool.query(`select count(*)::int n from erp_cloud.migration where copied_from is distinct from 'baseline'`)).rows[0].n).toBe(files.length - fromBaseline);
  });
});

describe('upgrading an installation of an earlier release (postgres-migrations)', () => {
  it(`a database migrated by the previous release (${PREVIOUS_RELEASE}) upgrades in place: only the new migrations run, its history and its messages are kept, and delivery goes on`, async () => {
    const db = await fresh('upgrade');
    const release = releaseFiles(PREVIOUS_RELEASE, 16);
    dirs.push(release.dir);
    expect(release.files).toEqual(files.slice(0, 16).map((f) => f.name));
    expect(await migrateLikeEarlierRelease(db.url, release.dir)).toEqual(['0_create-migrations-table.sql', ...release.files]);

    // the installation at work: one message delivered (attempt history in cloud.log), one waiting
    const q = db.pool.query.bind(db.pool);
    await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook')`);
    const enqueue = async (n: number) =>
      (await q(`select cloud.enqueue_message('hook', 'demo.ping', $1::jsonb, 'erp.doc', $2) as id`, [JSON.stringify({ n }), String(n)])).rows[0].id as string;
    const claim = async () => (await q(`select request_id, attempt from cloud.claim_messages('w1', 10, null, '30 seconds')`)).rows as Array<{ request_id: string; attempt: number }>;
    const report = async (m: { request_id: string; attempt: number }) =>
      (await q(`select request_id, status from cloud.record_attempts('w1', $1::jsonb)`, [JSON.stringify([{
        request_id: m.request_id, attempt: m.attempt, outcome: 'ok', method: 'POST', url: 'http://127.0.0.1:9/webhook', http_status: 200,
        duration_ms: 1.5, started_at: new Date().toISOString(),
      }])])).rows;
    const first = await enqueue(1);
    const claimed = await claim();
    expect(claimed.map((m) => m.request_id)).toEqual([first]);
    expect(await report(claimed[0]!)).toEqual([{ request_id: first, status: 'sent' }]);
    const waiting = await enqueue(2);
    const logBefore = (await q(`select count(*)::int n from cloud.log`)).rows[0].n as number;
    expect(logBefore).toBeGreaterThan(0);
    const legacyBefore = await tableSnapshot(db.pool, 'public.migrations');

    const lines: string[] = [];
    const applied = await migrate(db.url, (m) => lines.push(m));
    expect(applied).toEqual(files.slice(16).map((f) => f.name));
    expect(applied[0]).toBe('0017_delivery_under_partial_failure.sql');
    expect(lines.join('\n')).toContain('copied the history of 16 migration(s) from public.migrations');

    const history = (await q(`select m.id, m.name, m.sha256, m.applied_by = current_user as by_us, m.copied_from, m.duration_ms is not null as timed,
                                     m.applied_at = l.executed_at::timestamptz as same_time
                                from erp_cloud.migration m left join public.migrations l on l.id = m.id order by m.id`)).rows;
    expect(history).toEqual(files.map((f) => f.id <= 16
      ? { id: f.id, name: f.name, sha256: f.sha256, by_us: null, copied_from: 'public.migrations', timed: false, same_time: true }
      : { id: f.id, name: f.name, sha256: f.sha256, by_us: true, copied_from: null, timed: true, same_time: null }));
    expect(await tableSnapshot(db.pool, 'public.migrations')).toEqual(legacyBefore); // not ours to change or drop

    // what the earlier release wrote is still there, and the waiting message is delivered by the upgraded engine
    expect((await q(`select status from cloud.outbox where request_id = $1`, [first])).rows).toEqual([{ status: 'sent' }]);
    expect((await q(`select count(*)::int n from cloud.log`)).rows[0].n).toBe(logBefore);
    const next = await claim();
    expect(next.map((m) => m.request_id)).toEqual([waiting]);
    expect(await report(next[0]!)).toEqual([{ request_id: waiting, status: 'sent' }]);

    // and from now on the old history is not read again: migrating twice is a no-op
    expect(await migrate(db.url)).toEqual([]);
    expect(await objectsOutsideOurSchemas(db.pool)).toEqual(['migrations', 'migrations_name_key', 'migrations_pkey']); // postgres-migrations' own, from before
  });

  it("a database migrated by today's main (postgres-migrations through 0017) copies all 17 rows and applies nothing; a landed file edited since is refused first", async () => {
    const db = await fresh('upgrade17');
    await migrateLikeEarlierRelease(db.url, migrationsDir);
    const legacyBefore = await tableSnapshot(db.pool, 'public.migrations');

    // an edited landed file is caught against the old history too, and nothing is created
    const dir = copyOfMigrations();
    appendFileSync(path.join(dir, files[1]!.name), '\n-- edited\n');
    const err = await rejection(withClient(db.url, (c) => runMigrations(c, dir)));
    expect(err.reason).toBe(MigrationReason.landedFileChanged);
    expect(err.message).toContain(files[1]!.name);
    expect((await db.pool.query(`select to_regnamespace('erp_cloud') as s`)).rows[0].s).toBeNull();

    const lines: string[] = [];
    expect(await migrate(db.url, (m) => lines.push(m))).toEqual([]);
    expect(lines.join('\n')).toContain(`copied the history of ${files.length} migration(s) from public.migrations`);
    expect((await db.pool.query(`select count(*)::int n from erp_cloud.migration where copied_from = 'public.migrations'`)).rows[0].n).toBe(files.length);
    expect(await tableSnapshot(db.pool, 'public.migrations')).toEqual(legacyBefore);
  });
});

describe('pg_cron', () => {
  it('the maintenance jobs exist in the cron database and run every minute', () => withCronDatabase(async (cronDb, url) => {
    expect(cronDb, 'the server must preload pg_cron (scripts/pg.sh configures it)').toBeTruthy();
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
  }), 240_000);
});
