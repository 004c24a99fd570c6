/**
 * Starts (or finds) the database server and migrates a template database once;
 * each test file clones its own database from it (test/helpers/db.ts).
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { migrate } from '../listener/db.js';

export const TEMPLATE = 'erp_cloud_test_template';

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

export default async function setup(project: TestProject): Promise<void> {
  if (!existsSync('dist/listener/cli.js')) throw new Error('dist/ is missing: run `make test` (it builds first)');
  const url = serverUrl();
  const admin = new pg.Client({ connectionString: withDatabase(url, 'postgres') });
  await admin.connect();
  try {
    await admin.query(`drop database if exists ${TEMPLATE} with (force)`);
    await admin.query(`create database ${TEMPLATE}`);
  } finally {
    await admin.end();
  }
  await migrate(withDatabase(url, TEMPLATE));
  project.provide('serverUrl', url);
  project.provide('templateDb', TEMPLATE);
}

declare module 'vitest' {
  export interface ProvidedContext {
    serverUrl: string;
    templateDb: string;
  }
}
