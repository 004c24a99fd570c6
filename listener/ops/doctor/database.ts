/** Doctor, 1. the database: the connection, the server version, and whether the migrations are current. */
import type pg from 'pg';
import { migrationsDir } from '../../kernel/db.js';
import { describePgError } from '../../kernel/errors.js';
import { findLegacyHistory, loadMigrationFiles } from '../../kernel/migrations.js';
import { errText, iso, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

const MIN_SERVER_VERSION = 150000;

/** host:port/database of a connection URL, without user or password. */
export function databaseTarget(url: string): string {
  try {
    const u = new URL(url);
    return `${u.hostname || 'local socket'}:${u.port || '5432'}${u.pathname}`;
  } catch {
    return 'database';
  }
}

export async function checkDatabase(c: pg.Client, target: string): Promise<CheckLine[]> {
  let s: { num: number; version: string; database: string; role: string };
  try {
    s = (await c.query(q.server)).rows[0];
  } catch (err) {
    return [line('database connection', target, 'fail', errText(err))];
  }
  const out = [
    line('database connection', target, 'ok', `connected to ${s.database} as ${s.role}`),
    line('server version', s.database, s.num >= MIN_SERVER_VERSION ? 'ok' : 'fail',
      s.num >= MIN_SERVER_VERSION ? `PostgreSQL ${s.version}` : `PostgreSQL ${s.version}: erp-cloud needs 15 or newer`),
  ];
  const migrations = await checkMigrations(c, s.database);
  out.push(migrations);
  if (migrations.status !== 'fail') out.push(...(await checkCallbacks(c)));
  return out;
}

/** An ERP's callback that raised was rolled back alone and kept: the ERP's own columns lag until it is replayed. */
async function checkCallbacks(c: pg.Client): Promise<CheckLine[]> {
  const name = 'source callbacks';
  let rows: Array<{ domain: string; source: string; failures: number; since: Date; last: string }>;
  try {
    rows = (await c.query(q.callbackFailures)).rows;
  } catch (err) {
    return [line(name, 'tax.callback_failure, scm.callback_failure', 'warn', `cannot read them: ${errText(err)}`)];
  }
  const out = rows.length
    ? rows.map((r) => line(name, `${r.domain}:${r.source}`, 'warn',
      `${r.failures} failed callback(s) since ${iso(r.since)}, the last ${r.last}: the ERP's own columns lag behind; fix the callback, then select ${r.domain}.replay_callbacks('${r.source}')`))
    : [line(name, 'every source', 'ok', 'no failed callback waits for a replay')];
  return [...out, ...(await checkCallbackLockTimeouts(c))];
}

/**
 * A callback whose own SET lock_timeout is 0 or at least deadlock_timeout replaces the 50 ms erp-cloud calls it
 * with (0037): waiting on a row the ERP holds while the ERP waits for erp-cloud, it lets PostgreSQL abort the ERP's
 * transaction. put_source refuses such a callback; one registered before 0037 is named here.
 */
async function checkCallbackLockTimeouts(c: pg.Client): Promise<CheckLine[]> {
  const name = 'callback lock_timeout';
  let rows: Array<{ what: string; source: string; fn: string; ms: number; deadlock_timeout: string }>;
  try {
    rows = (await c.query(q.callbackLockTimeouts)).rows;
  } catch (err) {
    return [line(name, 'tax.source, scm.source', 'warn', `cannot read them: ${errText(err)}`)];
  }
  if (!rows.length) return [line(name, 'every source', 'ok', 'no callback sets a lock_timeout that could deadlock the ERP')];
  return rows.map((r) => line(name, `${r.source}:${r.what}`, 'warn',
    `${r.fn} sets lock_timeout ${r.ms === 0 ? '0 (no limit)' : `${r.ms} ms`}, not under deadlock_timeout ${r.deadlock_timeout}: a wait on your ERP's row while your ERP waits for erp-cloud can abort your ERP's transaction; ALTER FUNCTION ${r.fn} RESET lock_timeout (erp-cloud calls it with 50 ms)`));
}

async function checkMigrations(c: pg.Client, database: string): Promise<CheckLine> {
  const name = 'migrations current';
  try {
    const files = loadMigrationFiles(migrationsDir);
    const latest = files.at(-1)?.name;
    // postgres-migrations' history (releases up to 0017), recognised only when its rows are our files
    const legacy = await findLegacyHistory(c, files);
    if (!(await c.query(q.migrationsTable)).rows[0].present) {
      if (legacy) {
        return line(name, database, 'warn',
          `installed by an earlier release (history in ${legacy.table}, postgres-migrations): run erp-cloud migrate (it copies that history into erp_cloud.migration and applies what is missing)`);
      }
      return line(name, database, 'fail', `no migration history (erp_cloud.migration): run erp-cloud migrate (${files.length} migration(s) to apply)`);
    }
    const rows = (await c.query<{ id: number; name: string; sha256: string }>(q.migrationRows)).rows;
    const applied = new Map(rows.map((r) => [r.id, r]));
    const known = new Set(files.map((f) => f.id));
    const missing = files.filter((f) => !applied.has(f.id)).map((f) => f.name);
    const extra = rows.filter((r) => !known.has(r.id)).map((r) => r.name);
    const edited = files.filter((f) => applied.has(f.id) && (applied.get(f.id)!.sha256 !== f.sha256 || applied.get(f.id)!.name !== f.name)).map((f) => f.name);
    if (missing.length) return line(name, database, 'fail', `not applied: ${missing.join(', ')} (run erp-cloud migrate)`);
    const notes = [
      extra.length && `applied but not in ${migrationsDir}: ${extra.join(', ')} (a newer release migrated this database?)`,
      edited.length && `changed since applied: ${edited.join(', ')} (erp-cloud migrate will refuse; a landed file is never edited, a fix is a new file)`,
    ].filter(Boolean);
    if (notes.length) return line(name, database, 'warn', notes.join('; '));
    const obsolete = legacy
      ? `; ${legacy.table} (postgres-migrations' history, copied into erp_cloud.migration) is obsolete and can be dropped once no release older than this one will migrate this database`
      : '';
    return line(name, database, 'ok', `${files.length} migration(s), all applied (latest ${latest})${obsolete}`);
  } catch (err) {
    return line(name, database, 'fail', describePgError(err));
  }
}
