/** Example ERPs (sql/examples/<name>) for the test files that need one, installed the way `migrate --with-example` does. */
import pg from 'pg';
import { migrationsDir } from '../../listener/kernel/db.js';
import { runMigrations } from '../../listener/kernel/migrations.js';
import type { TestDb } from './db.js';

/** Installs (or finds installed) the example `name` in the test database: the runner's own path, under its lock. */
export async function installExample(db: TestDb, name: string): Promise<string[]> {
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  try {
    return (await runMigrations(c, migrationsDir, () => undefined, { examples: [name] })).examples;
  } finally {
    await c.end();
  }
}
