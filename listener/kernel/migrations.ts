/**
 * The migration runner (`erp-cloud migrate`): applies sql/migrations/NNNN_name.sql in order,
 * each file and its history row in one transaction, under a session advisory lock, so two runs
 * at once are safe. The history lives in erp-cloud's own schema (erp_cloud.migration), always
 * schema-qualified: nothing here depends on search_path, and no table of the application's is
 * read as ours or touched.
 *
 * Upgrade: releases up to 0017 migrated with postgres-migrations, whose history is a table
 * `migrations` in whatever schema the search path found first (usually public). Such a table is
 * recognised by its exact columns and by its rows naming and hashing our own files (sha1 of file
 * name + text); its history is copied once into erp_cloud.migration and the table is left as it
 * was (not ours to drop; `erp-cloud doctor` says when it is obsolete).
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import type pg from 'pg';

/**
 * Why `migrate` refused, as a stable name tests and callers match on. These are the runner's
 * own checks, made before or around the SQL, so they are not SQLSTATEs: the database raises
 * none of them. A migration file that fails keeps the database's own SQLSTATE (`code`).
 */
export const MigrationReason = {
  /** a file applied to this database has changed since (its sha256, or its name) */
  landedFileChanged: 'landed_file_changed',
  /** a file is missing below the last applied one, or the history names a file this release does not have */
  outOfOrder: 'out_of_order',
  /** a file in sql/migrations is not NNNN_snake_name.sql, or the numbers have a gap or a duplicate */
  badFileName: 'bad_file_name',
  /** a migration file failed and was rolled back */
  migrationFailed: 'migration_failed',
  /** postgres-migrations' history of erp-cloud was found in more than one table */
  oldHistoryAmbiguous: 'old_history_ambiguous',
  /** `--with-example` names no folder of sql/examples with an install.sql */
  unknownExample: 'unknown_example',
} as const;
export type MigrationReason = (typeof MigrationReason)[keyof typeof MigrationReason];

/** A migration refused or failed: why, a message naming the file, what is wrong in detail, and what to do. */
export class MigrationError extends Error {
  /** the database's SQLSTATE when a migration file failed; undefined for the runner's own checks */
  readonly code?: string;

  constructor(
    readonly reason: MigrationReason,
    message: string,
    readonly hint: string,
    readonly detail?: string,
    options?: { cause?: unknown; code?: string },
  ) {
    super(message, options);
    this.name = 'MigrationError';
    if (options?.code) this.code = options.code;
  }
}

export interface MigrationFile {
  /** 1 for 0001_cloud_delivery_engine.sql */
  id: number;
  /** the file name, 0001_cloud_delivery_engine.sql: what the history records */
  name: string;
  sql: string;
  /** sha256 of the file's bytes, hex */
  sha256: string;
  /** how postgres-migrations named it (cloud_delivery_engine) and hashed it (sha1 of file name + text) */
  legacyName: string;
  legacySha1: string;
}

const FILE_NAME = /^(\d{4})_([a-z0-9]+(?:_[a-z0-9]+)*)\.sql$/;

/** Reads and checks the migration files: NNNN_snake_name.sql, numbered 1, 2, 3 … without gaps. */
export function loadMigrationFiles(dir: string): MigrationFile[] {
  const names = readdirSync(dir).filter((f) => f.toLowerCase().endsWith('.sql')).sort();
  const files = names.map((name): MigrationFile => {
    const m = FILE_NAME.exec(name);
    if (!m) {
      throw new MigrationError(MigrationReason.badFileName, `migration file ${name} is not named NNNN_snake_description.sql`,
        `Rename it (four digits, an underscore, lower-case words joined by underscores), e.g. 0018_what_it_adds.sql.`, `in ${dir}`);
    }
    const bytes = readFileSync(path.join(dir, name));
    const sql = bytes.toString('utf8');
    return {
      id: Number(m[1]),
      name,
      sql,
      sha256: createHash('sha256').update(bytes).digest('hex'),
      legacyName: name.slice(5, -4),
      legacySha1: createHash('sha1').update(name + sql, 'utf8').digest('hex'),
    };
  });
  files.forEach((f, i) => {
    if (f.id !== i + 1) {
      throw new MigrationError(MigrationReason.badFileName, `migration file ${f.name} breaks the numbering: expected ${String(i + 1).padStart(4, '0')}_….sql`,
        'Migrations are numbered 0001, 0002, … without gaps or duplicates; give a new file the next free number.', `in ${dir}`);
    }
  });
  return files;
}

/** The session advisory lock every migrate takes: the key postgres-migrations used, so a migrate of an older release and this one never run at once either. */
export const MIGRATE_LOCK_KEY = '-8525285245963000605';

/** The SQL of the history (one place; doctor reads the same statements). */
export const historySql = {
  present: `select pg_catalog.to_regclass('erp_cloud.migration') is not null as present`,
  rows: `select id, name, sha256, applied_at, applied_by, duration_ms, copied_from from erp_cloud.migration order by id`,
  create: `
    create schema erp_cloud;
    comment on schema erp_cloud is 'erp-cloud''s own bookkeeping: which migrations were applied to this database (erp_cloud.migration).';
    create table erp_cloud.migration (
      id integer primary key check (id > 0),
      name text not null unique check (name ~ '^[0-9]{4}_[a-z0-9_]+[.]sql$'),
      sha256 text not null check (sha256 ~ '^[0-9a-f]{64}$'),
      applied_at timestamptz not null default pg_catalog.now(),
      applied_by text default current_user,
      duration_ms integer check (duration_ms >= 0),
      copied_from text
    );
    comment on table erp_cloud.migration is
      'One row per applied migration file of sql/migrations, written by erp-cloud migrate in the transaction that applied the file.
A landed file never changes: migrate refuses a file whose sha256 differs from its row.';
    comment on column erp_cloud.migration.id is 'The file''s number (0001_… is 1).';
    comment on column erp_cloud.migration.name is 'The file name, e.g. 0001_cloud_delivery_engine.sql.';
    comment on column erp_cloud.migration.sha256 is 'sha256 (hex) of the file''s bytes as applied.';
    comment on column erp_cloud.migration.applied_at is 'When the transaction that applied the file started (for a copied row: postgres-migrations'' executed_at).';
    comment on column erp_cloud.migration.applied_by is 'The role that applied it; null for rows copied from postgres-migrations'' history, which did not record it.';
    comment on column erp_cloud.migration.duration_ms is 'How long the file took to run; null for copied rows.';
    comment on column erp_cloud.migration.copied_from is 'For rows applied by releases up to 0017 (postgres-migrations): the table they were copied from, e.g. public.migrations; null otherwise.';
    revoke all on schema erp_cloud from public;
    revoke all on table erp_cloud.migration from public;`,
  insert: `insert into erp_cloud.migration (id, name, sha256, duration_ms) values ($1, $2, $3, $4)`,
  copy: `insert into erp_cloud.migration (id, name, sha256, applied_at, applied_by, duration_ms, copied_from)
         select r.id, r.name, r.sha256, r.applied_at, null, null, $2 from pg_catalog.jsonb_to_recordset($1::jsonb)
                as r(id integer, name text, sha256 text, applied_at timestamp without time zone)`,
  /**
   * Tables that look like postgres-migrations' history: named migrations, in any schema (it used
   * whatever the search path found first), with exactly its four columns. Only the catalog is
   * read here; rows are read only from a table of this shape.
   */
  legacyTables: `
    select pg_catalog.format('%I.migrations', n.nspname) as "table",
           -- executed_at as text: a timestamp without time zone, copied as written (not through a JS Date)
           pg_catalog.format('select id, name, hash, executed_at::text as executed_at from %I.migrations order by id', n.nspname) as rows_sql
      from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where c.relname = 'migrations' and c.relkind = 'r'
       and array(select a.attname::text || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                   from pg_catalog.pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped order by a.attnum)
           = array['id integer', 'name character varying(100)', 'hash character varying(40)', 'executed_at timestamp without time zone']
     order by n.nspname`,
} as const;

export interface HistoryRow {
  id: number;
  name: string;
  sha256: string;
}

export interface LegacyHistory {
  /** schema-qualified table, e.g. public.migrations */
  table: string;
  rows: Array<{ id: number; name: string; hash: string; executed_at: string | null }>;
}

/** The history of an installation migrated by postgres-migrations, if this database has one whose rows are our files; null otherwise. */
export async function findLegacyHistory(c: pg.ClientBase, files: MigrationFile[]): Promise<LegacyHistory | null> {
  const first = files[0];
  if (!first) return null;
  const found: LegacyHistory[] = [];
  for (const { table, rows_sql } of (await c.query<{ table: string; rows_sql: string }>(historySql.legacyTables)).rows) {
    const rows = (await c.query(rows_sql)).rows as LegacyHistory['rows'];
    // ours only when its 0001 is our 0001, byte for byte: another app's postgres-migrations history never matches
    if (rows.some((r) => r.id === first.id && r.name === first.legacyName && r.hash === first.legacySha1)) found.push({ table, rows });
  }
  if (found.length > 1) {
    throw new MigrationError(MigrationReason.oldHistoryAmbiguous,
      `erp-cloud's old migration history is in more than one table: ${found.map((f) => f.table).join(', ')}`,
      'Keep the one in the schema the earlier releases migrated with (usually public.migrations): rename the others, then run erp-cloud migrate again.');
  }
  return found[0] ?? null;
}

/** Checks an old history against the files and turns it into rows of erp_cloud.migration (its own row 0 is postgres-migrations' bookkeeping). */
export function legacyToHistory(legacy: LegacyHistory, files: MigrationFile[]): Array<HistoryRow & { applied_at: unknown }> {
  const byId = new Map(files.map((f) => [f.id, f]));
  const out: Array<HistoryRow & { applied_at: unknown }> = [];
  for (const r of legacy.rows) {
    if (r.id === 0) continue;
    const f = byId.get(r.id);
    if (!f) {
      throw new MigrationError(MigrationReason.outOfOrder,
        `${legacy.table} records migration ${r.id} (${r.name}), which this release does not have`,
        'This database was migrated by a newer release: run erp-cloud migrate of that release (or a newer one).');
    }
    if (r.name !== f.legacyName || r.hash !== f.legacySha1) {
      throw changedFile(f, `${legacy.table} recorded ${r.name} with sha1 ${r.hash}; the file now hashes to ${f.legacySha1}`);
    }
    out.push({ id: f.id, name: f.name, sha256: f.sha256, applied_at: r.executed_at });
  }
  return out;
}

function changedFile(f: MigrationFile, detail: string): MigrationError {
  return new MigrationError(MigrationReason.landedFileChanged,
    `migration ${f.name} has changed since it was applied to this database`,
    `A landed migration is never edited: restore ${f.name} as released (git checkout -- sql/migrations/${f.name}) and put the change in a new file with the next number.`,
    detail);
}

export interface Plan {
  pending: MigrationFile[];
  /** applied rows this release has no file for (a newer release migrated the database) */
  unknown: HistoryRow[];
}

/** Compares the history with the files: refuses a changed or renamed landed file and a gap; lists what is to apply and what is unknown. */
export function plan(history: HistoryRow[], files: MigrationFile[]): Plan {
  const byId = new Map(history.map((h) => [h.id, h]));
  for (const f of files) {
    const h = byId.get(f.id);
    if (h && (h.name !== f.name || h.sha256 !== f.sha256)) {
      throw changedFile(f, h.name !== f.name
        ? `erp_cloud.migration row ${f.id} is ${h.name}`
        : `erp_cloud.migration recorded sha256 ${h.sha256}; the file now hashes to ${f.sha256}`);
    }
  }
  const pending = files.filter((f) => !byId.has(f.id));
  const known = new Set(files.map((f) => f.id));
  const unknown = history.filter((h) => !known.has(h.id));
  const lastApplied = Math.max(0, ...history.map((h) => h.id));
  const early = pending.find((f) => f.id < lastApplied);
  if (early) {
    throw new MigrationError(MigrationReason.outOfOrder,
      `migration ${early.name} is not applied but a later one is (${history.find((h) => h.id === lastApplied)!.name})`,
      'Migrations apply in order only: this database was migrated from another branch or a newer release; migrate it with that release, or restore it from a backup.');
  }
  return { pending, unknown };
}

export interface MigrateResult {
  applied: string[];
  /** the table whose history was copied into erp_cloud.migration in this run, if any */
  copiedFrom: string | null;
  unknown: string[];
  /** the examples (`--with-example`) installed or re-installed in this run */
  examples: string[];
}

/**
 * Migrates the database `c` is connected to (a dedicated client, not in a transaction).
 * `log` gets one line per step an operator wants to see.
 */
export async function runMigrations(c: pg.ClientBase, dir: string, log: (msg: string) => void = () => undefined,
  opts: { examples?: string[]; examplesDir?: string } = {}): Promise<MigrateResult> {
  const files = loadMigrationFiles(dir);
  const examples = loadExamples(opts.examplesDir ?? path.join(path.dirname(dir), 'examples'), opts.examples ?? []);
  if (!(await c.query<{ ok: boolean }>('select pg_catalog.pg_try_advisory_lock($1::bigint) as ok', [MIGRATE_LOCK_KEY])).rows[0]!.ok) {
    log('waiting for another erp-cloud migrate of this database to finish');
    await c.query('select pg_catalog.pg_advisory_lock($1::bigint)', [MIGRATE_LOCK_KEY]);
  }
  try {
    let copiedFrom: string | null = null;
    if (!(await c.query<{ present: boolean }>(historySql.present)).rows[0]!.present) {
      // a fresh database, or one migrated by postgres-migrations: the history table and the copy of the old history commit together
      const legacy = await findLegacyHistory(c, files);
      const copied = legacy ? legacyToHistory(legacy, files) : [];
      await inTransaction(c, async () => {
        await c.query(historySql.create);
        if (legacy && copied.length) await c.query(historySql.copy, [JSON.stringify(copied), legacy.table]);
      });
      if (legacy && copied.length) {
        copiedFrom = legacy.table;
        log(`copied the history of ${copied.length} migration(s) from ${legacy.table} (postgres-migrations) into erp_cloud.migration; ${legacy.table} is left as it was`);
      }
    }
    const history = (await c.query<HistoryRow>(historySql.rows)).rows;
    // what the database had before this run, read before anything of the run is applied: a migration that adopts or
    // drops what earlier ones made (0023: the reference ERP's tables) tells an upgrade from a fresh install by it
    await c.query(`select pg_catalog.set_config('erp_cloud.history_before_run', $1, false)`, [String(Math.max(0, ...history.map((h) => h.id)))]);
    const { pending, unknown } = plan(history, files);
    const examplesDir = opts.examplesDir ?? path.join(path.dirname(dir), 'examples');
    if (unknown.length) {
      log(`applied by a newer release, not in ${dir}: ${unknown.map((u) => u.name).join(', ')} (nothing of this release is missing)`);
    }
    const applied: string[] = [];
    for (const f of pending) {
      const started = performance.now();
      try {
        await inTransaction(c, async () => {
          await c.query(f.sql);
          // a migration that adopts an example (0023: an upgraded installation's reference ERP) has it installed in its own transaction
          const adopt = (await c.query<{ name: string | null }>(`select pg_catalog.current_setting('erp_cloud.adopt_example', true) as name`)).rows[0]!.name;
          if (adopt) await applyExample(c, loadExamples(examplesDir, [adopt])[0]!);
          await c.query(historySql.insert, [f.id, f.name, f.sha256, Math.round(performance.now() - started)]);
        });
      } catch (err) {
        const e = err as { code?: string; message?: string; hint?: string; detail?: string; position?: string };
        throw new MigrationError(MigrationReason.migrationFailed,
          `migration ${f.name} failed and was rolled back (nothing of it remains; later files were not run): ${e.message ?? String(err)}`,
          e.hint ?? 'Fix the cause (the message says what the database refused), then run erp-cloud migrate again.',
          [e.detail, e.position && `at character ${e.position} of ${f.name}`].filter(Boolean).join('; ') || undefined, { cause: err, code: e.code });
      }
      applied.push(f.name);
      log(`applied ${f.name}`);
    }
    return { applied, copiedFrom, unknown: unknown.map((u) => u.name), examples: await installExamples(c, examples, log) };
  } finally {
    await c.query('select pg_catalog.pg_advisory_unlock($1::bigint)', [MIGRATE_LOCK_KEY]).catch(() => undefined);
  }
}

async function inTransaction<T>(c: pg.ClientBase, fn: () => Promise<T>): Promise<T> {
  await c.query('begin');
  try {
    const out = await fn();
    await c.query('commit');
    return out;
  } catch (err) {
    await c.query('rollback').catch(() => undefined);
    throw err;
  }
}

/**
 * Examples (`erp-cloud migrate --with-example acme`): sql/examples/<name>/install.sql, an ERP connected
 * through the contracts only. Never installed by default. Each is applied after the migrations, under
 * the same lock, in a transaction of its own with its row in erp_cloud.example; an example whose
 * recorded sha256 is the file's is left as it is (install files are idempotent, so a changed one is
 * simply applied again).
 */
export interface ExampleFile {
  name: string;
  sql: string;
  sha256: string;
}

export const exampleSql = {
  create: `
    create table if not exists erp_cloud.example (
      name text primary key,
      sha256 text not null check (sha256 ~ '^[0-9a-f]{64}$'),
      installed_at timestamptz not null default pg_catalog.now()
    );
    comment on table erp_cloud.example is
      'One row per example ERP (sql/examples/<name>/install.sql) that erp-cloud migrate --with-example installed, with the sha256 of the file it applied.';
    comment on column erp_cloud.example.name is 'The example''s folder under sql/examples, e.g. acme.';
    comment on column erp_cloud.example.sha256 is 'sha256 (hex) of the install.sql applied last; migrate applies a file with another hash again (install files are idempotent).';
    comment on column erp_cloud.example.installed_at is 'When the transaction that applied it last started.';
    revoke all on table erp_cloud.example from public;`,
  recorded: `select sha256 from erp_cloud.example where name = $1`,
  record: `insert into erp_cloud.example (name, sha256) values ($1, $2)
           on conflict (name) do update set sha256 = excluded.sha256, installed_at = pg_catalog.now()`,
} as const;

/** The examples this release has: folders of `dir` with an install.sql. */
export function knownExamples(dir: string): string[] {
  try {
    return readdirSync(dir, { withFileTypes: true })
      .filter((d) => d.isDirectory() && existsSync(path.join(dir, d.name, 'install.sql'))).map((d) => d.name).sort();
  } catch {
    return [];
  }
}

function loadExamples(dir: string, names: string[]): ExampleFile[] {
  if (!names.length) return [];
  const known = knownExamples(dir);
  return [...new Set(names)].map((name) => {
    if (!known.includes(name)) {
      throw new MigrationError(MigrationReason.unknownExample, `there is no example named ${name}: the examples are ${known.join(', ') || '(none)'}`,
        `Name one of them: erp-cloud migrate --with-example ${known[0] ?? '<name>'}.`, `looked in ${dir}`);
    }
    const bytes = readFileSync(path.join(dir, name, 'install.sql'));
    return { name, sql: bytes.toString('utf8'), sha256: createHash('sha256').update(bytes).digest('hex') };
  });
}

/** Applies an example in the transaction `c` is in, unless it is recorded with this file's sha256; true when applied. */
async function applyExample(c: pg.ClientBase, ex: ExampleFile): Promise<boolean> {
  await c.query('set local client_min_messages = warning'); // "already exists, skipping" is what idempotent means here
  await c.query(exampleSql.create);
  if ((await c.query(exampleSql.recorded, [ex.name])).rows[0]?.sha256 === ex.sha256) return false;
  await c.query(ex.sql);
  await c.query(exampleSql.record, [ex.name, ex.sha256]);
  return true;
}

async function installExamples(c: pg.ClientBase, examples: ExampleFile[], log: (msg: string) => void): Promise<string[]> {
  const installed: string[] = [];
  for (const ex of examples) {
    try {
      const done = await inTransaction(c, () => applyExample(c, ex));
      if (done) installed.push(ex.name);
      log(done ? `installed example ${ex.name}` : `example ${ex.name} is installed and unchanged`);
    } catch (err) {
      const e = err as { code?: string; message?: string; hint?: string; detail?: string };
      throw new MigrationError(MigrationReason.migrationFailed,
        `example ${ex.name} failed and was rolled back (the migrations stay applied): ${e.message ?? String(err)}`,
        e.hint ?? `Fix the cause, then run erp-cloud migrate --with-example ${ex.name} again.`, e.detail, { cause: err, code: e.code });
    }
  }
  return installed;
}
