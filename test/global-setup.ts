/**
 * Starts (or finds) the database server and migrates a template database once;
 * each test file clones its own database from it (test/helpers/db.ts).
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { migrate } from '../listener/kernel/db.js';

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
  execFileSync('bash', ['scripts/pg.sh', 'start'], { stdio: 'inherit' });
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
  await migrate(withDatabase(url, TEMPLATE));
  project.provide('serverUrl', url);
  project.provide('templateDb', TEMPLATE);
  return () => admin(url, (c) => c.query(`drop database if exists ${TEMPLATE} with (force)`)).then(() => undefined);
}

declare module 'vitest' {
  export interface ProvidedContext {
    serverUrl: string;
    templateDb: string;
  }
}
