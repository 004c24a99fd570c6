/**
 * The test cluster's pg_cron database, for the few tests that need pg_cron.
 *
 * pg_cron keeps its jobs in one database per server, `cron.database_name`, a
 * setting read only at server start (PGC_POSTMASTER). So the test cluster is
 * started with a cron database of its own, CRON_TEST_DB (`make test` and
 * global-setup pass ERP_CLOUD_CRON_DB to scripts/pg.sh), never `erp_cloud`,
 * which `make demo` uses. The database cannot be dropped and made again during
 * a run: DROP DATABASE … WITH (FORCE) ends pg_cron's launcher until the server
 * restarts. So each user empties it in place and migrates it from nothing
 * (the template has no pg_cron: it is not the cron database), holding an
 * advisory lock so that two test files take turns on it.
 */
import pg from 'pg';
import { migrate } from '../../listener/kernel/db.js';
import { urlFor } from './db.js';

export const CRON_TEST_DB = 'erp_cloud_test_cron';

/** Advisory lock key (in the `postgres` database) of whoever uses the cron database. */
const LOCK_SQL = `select pg_advisory_lock(hashtext('erp-cloud tests: the cron database'))`;

/**
 * Runs fn with the cron database emptied and freshly migrated (so the
 * migrations scheduled the pg_cron jobs), alone on it. fn gets the database's
 * name as the server reports `cron.database_name` (null without pg_cron) and
 * its URL.
 */
export async function withCronDatabase<T>(fn: (cronDb: string | null, url: string) => Promise<T>): Promise<T> {
  const admin = new pg.Client({ connectionString: urlFor('postgres') });
  await admin.connect();
  try {
    const cronDb = (await admin.query(`select current_setting('cron.database_name', true) as d`)).rows[0].d as string | null;
    if (cronDb && cronDb !== CRON_TEST_DB) {
      throw new Error(`the server's cron.database_name is ${cronDb}, not the tests' own ${CRON_TEST_DB}: start the test cluster with ` +
        `ERP_CLOUD_CRON_DB=${CRON_TEST_DB} scripts/pg.sh start (make test does), or set it in the server's configuration`);
    }
    const url = urlFor(CRON_TEST_DB);
    if (!cronDb) return await fn(cronDb, url);
    await admin.query(`set lock_timeout = '150s'`);
    await admin.query(LOCK_SQL);
    if (!(await admin.query(`select 1 from pg_database where datname = $1`, [CRON_TEST_DB])).rowCount) {
      await admin.query(`create database ${CRON_TEST_DB}`);
    }
    await emptyDatabase(url);
    await migrate(url);
    return await fn(cronDb, url);
  } finally {
    await admin.end(); // ends the session: the advisory lock goes with it
  }
}

/** Drops every schema and extension a migration made (what `create database` from template0 would not have). */
async function emptyDatabase(url: string): Promise<void> {
  const c = new pg.Client({ connectionString: url });
  c.on('notice', () => undefined);
  await c.connect();
  try {
    await c.query(`do $$
      declare x text;
      begin
        for x in select extname from pg_extension where extname <> 'plpgsql' loop
          execute format('drop extension %I cascade', x);
        end loop;
        for x in select nspname from pg_namespace where nspname !~ '^pg_' and nspname <> 'information_schema' loop
          execute format('drop schema %I cascade', x);
        end loop;
        create schema public authorization pg_database_owner;
        grant usage on schema public to public;
        comment on schema public is 'standard public schema';
      end $$`);
  } finally {
    await c.end();
  }
}
