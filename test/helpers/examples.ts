/** `erp-cloud migrate` from a test, on a dedicated connection, and the example ERPs (sql/examples/<name>) it installs. */
import pg from 'pg';
import { migrationsDir } from '../../listener/kernel/db.js';
import { runMigrations, type MigrateResult } from '../../listener/kernel/migrations.js';
import type { TestDb } from './db.js';

/** Migrates `db` with the files of `dir` (default: this release's), the way `erp-cloud migrate` does; notices are dropped. */
export async function migrateWith(db: TestDb, dir: string = migrationsDir, opts: Parameters<typeof runMigrations>[3] = {}): Promise<MigrateResult> {
  const c = new pg.Client({ connectionString: db.url });
  c.on('notice', () => undefined);
  await c.connect();
  try {
    return await runMigrations(c, dir, () => undefined, opts);
  } finally {
    await c.end();
  }
}

/** Installs (or finds installed) the example `name` in the test database: the runner's own path, under its lock. */
export async function installExample(db: TestDb, name: string): Promise<string[]> {
  return (await migrateWith(db, migrationsDir, { examples: [name] })).examples;
}
