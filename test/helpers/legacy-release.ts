/**
 * An installation as the releases up to 0017 left it: migrated by postgres-migrations
 * (history in public.migrations), with the files of an earlier release, as a real upgrade
 * starts. postgres-migrations is kept for these upgrade tests only.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { migrate as legacyMigrate } from 'postgres-migrations';

/** The last release before this runner: its migrations are 0001–0016. */
export const PREVIOUS_RELEASE = 'a75af06';

/**
 * The migration files of `release`, written to a temporary directory: from git when the
 * commit is reachable; in a clone without that history (a shallow CI checkout), the first
 * `count` files of this checkout, which are the same bytes because landed files never change
 * (sql/migrations/CHECKSUMS pins them, test/migration-checksums.test.ts holds the pin).
 */
export function releaseFiles(release: string, count: number): { dir: string; source: 'git' | 'checkout'; files: string[]; remove(): void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), `erp-cloud-release-${release}-`));
  let source: 'git' | 'checkout' = 'git';
  let files: string[];
  try {
    files = execFileSync('git', ['ls-tree', '--name-only', `${release}:sql/migrations`], { stdio: ['ignore', 'pipe', 'ignore'] })
      .toString().split('\n').filter((f) => f.endsWith('.sql'));
    for (const f of files) {
      writeFileSync(path.join(dir, f), execFileSync('git', ['show', `${release}:sql/migrations/${f}`], { maxBuffer: 64 << 20 }));
    }
  } catch {
    source = 'checkout';
    files = readdirSync('sql/migrations').filter((f) => f.endsWith('.sql')).sort().slice(0, count);
    for (const f of files) copyFileSync(path.join('sql/migrations', f), path.join(dir, f));
  }
  return { dir, source, files, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Migrates `url` with postgres-migrations itself, exactly as `erp-cloud migrate` of the releases up to 0017 did. */
export async function migrateLikeEarlierRelease(url: string, dir: string): Promise<string[]> {
  const client = new pg.Client({ connectionString: url, application_name: 'erp-cloud migrate (earlier release)' });
  client.on('notice', () => undefined);
  await client.connect();
  try {
    return (await legacyMigrate({ client }, dir)).map((m) => m.fileName);
  } finally {
    await client.end();
  }
}

/**
 * The migration files 0001…`last` of this checkout in a temporary directory: an installation of the release that
 * ended with `last` (landed files never change). The upgrade tests of one migration stop where the next step
 * changes the world they test: 0018–0021 upgrade to 0022, the last release in which the reference ERP was part of
 * the product (0023 makes it an example: test/reference-erp-adoption.test.ts).
 */
export function migrationFilesThrough(migrationsDir: string, last: number): { dir: string; remove(): void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), `erp-cloud-through-${String(last).padStart(4, '0')}-`));
  for (const f of readdirSync(migrationsDir).filter((x) => /^\d{4}_.*\.sql$/.test(x) && Number(x.slice(0, 4)) <= last)) {
    copyFileSync(path.join(migrationsDir, f), path.join(dir, f));
  }
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}
