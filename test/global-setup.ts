/**
 * Starts (or finds) the database server and migrates a template database once;
 * each test file clones its own database from it (test/helpers/db.ts), and
 * resets it to the template's state from the catalog (test/helpers/reset.ts).
 *
 * No test touches a database it did not make: pg_cron runs in one database per
 * server (cron.database_name, fixed at server start), so the test cluster is
 * started with its own cron database (CRON_TEST_DB: `make test` and
 * scripts/pg.sh), which the files that test pg_cron re-make in turn
 * (test/helpers/cron.ts). The shared `erp_cloud` database is only fingerprinted
 * here, before and after the run, to prove that.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { migrate } from '../listener/kernel/db.js';
import { CRON_TEST_DB } from './helpers/cron.js';
import { readTemplateState } from './helpers/reset.js';

/** One template per test run (named after its pid), so two runs on one server never drop each other's. */
const TEMPLATE_PREFIX = 'erp_cloud_test_template_';
export const TEMPLATE = `${TEMPLATE_PREFIX}${process.pid}`;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function serverUrl(): string {
  if (process.env.DATABASE_URL) return process.env.DATABASE_URL;
  execFileSync('bash', ['scripts/pg.sh', 'start'], { stdio: 'inherit', env: { ...process.env, ERP_CLOUD_CRON_DB: CRON_TEST_DB } });
  return execFileSync('bash', ['scripts/pg.sh', 'url']).toString().trim();
}

export function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

async function admin<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: withDatabase(url, 'postgres') });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  if (!existsSync('dist/listener/cli.js')) throw new Error('dist/ is missing: run `make test` (it builds first)');
  const url = serverUrl();
  await admin(url, async (c) => {
    // templates left by runs that were killed
    const { rows } = await c.query<{ datname: string }>(`select datname from pg_database where datname like $1`, [`${TEMPLATE_PREFIX}%`]);
    for (const { datname } of rows) {
      if (!alive(Number(datname.slice(TEMPLATE_PREFIX.length)))) await c.query(`drop database if exists ${datname} with (force)`);
    }
    await c.query(`drop database if exists ${TEMPLATE} with (force)`);
    await c.query(`create database ${TEMPLATE}`);
  });
  await migrate(withDatabase(url, TEMPLATE), undefined, ['reference-erp']); // the reference ERP is an example: the tests run the product through it
  const tc = new pg.Client({ connectionString: withDatabase(url, TEMPLATE) });
  await tc.connect();
  try {
    project.provide('templateState', await readTemplateState(tc));
  } finally {
    await tc.end();
  }
  const shared = await sharedFingerprint(url);
  project.provide('serverUrl', url);
  project.provide('templateDb', TEMPLATE);
  return async () => {
    await admin(url, (c) => c.query(`drop database if exists ${TEMPLATE} with (force)`));
    const after = await sharedFingerprint(url);
    if (after !== shared) {
      // vitest reports an error thrown here but still exits 0: fail the run explicitly
      process.exitCode = 1;
      throw new Error(`the shared database ${SHARED_DB} changed during the test run (tables made, dropped or truncated, or its migration history): a test used a database it did not create`);
    }
  };
}

const SHARED_DB = 'erp_cloud';

/**
 * What a test run must leave as it was in the shared database (make demo's):
 * its tables (a truncate gives a table a new relfilenode) and its migration
 * history. Partitions are left out: a listener running the demo may make next
 * month's. Read-only, and 'absent' when there is no such database.
 */
async function sharedFingerprint(url: string): Promise<string> {
  const exists = await admin(url, async (c) => (await c.query(`select 1 from pg_database where datname = $1`, [SHARED_DB])).rowCount);
  if (!exists) return 'absent';
  const c = new pg.Client({ connectionString: withDatabase(url, SHARED_DB) });
  await c.connect();
  try {
    const history = (await c.query(`select to_regclass('erp_cloud.migration') t`)).rows[0].t
      ? (await c.query<{ h: string }>(`select coalesce(string_agg(format('%s %s', id, sha256), ',' order by id), '') h from erp_cloud.migration`)).rows[0]!.h
      : 'no history';
    const { rows } = await c.query<{ f: string }>(`
      select md5(coalesce(string_agg(format('%s %s %s', c.oid::regclass, c.relkind, c.relfilenode), ',' order by c.oid::regclass::text), '') || $1) as f
        from pg_class c
       where c.relnamespace::regnamespace::text !~ '^(pg_|information_schema)' and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S') and not c.relispartition`, [history]);
    return rows[0]!.f;
  } finally {
    await c.end();
  }
}

declare module 'vitest' {
  export interface ProvidedContext {
    serverUrl: string;
    templateDb: string;
  }
}
