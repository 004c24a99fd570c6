/**
 * sql/schema/ and sql/baseline/ are never stale: a database migrated from nothing,
 * file by file, dumps to exactly the checked-in files, and makes exactly the
 * checked-in baseline (scripts/dump-schema.sh, the same script `make schema`
 * runs); and nothing of the product hides in a schema the dump leaves out.
 * (That the baseline installs what the files do: test/baseline.test.ts.)
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrate } from '../listener/kernel/db.js';
import { createTestDb, type TestDb } from './helpers/db.js';

const run = promisify(execFile);
const CHECKED_IN = 'sql/schema';
const STALE = 'sql/schema is stale: run `make schema` and commit sql/schema';
const BASELINE = 'sql/baseline';
const STALE_BASELINE = 'sql/baseline is stale: run `make schema` and commit sql/baseline';

/** The schemas the dump leaves out, as scripts/dump-schema.sh lists them (one list, there). */
const excludedSchemas = (() => {
  const m = /^EXCLUDED_SCHEMAS=\(([^)]*)\)$/m.exec(readFileSync('scripts/dump-schema.sh', 'utf8'));
  if (!m) throw new Error('scripts/dump-schema.sh has no EXCLUDED_SCHEMAS=(...) line');
  return m[1]!.trim().split(/\s+/);
})();

/** The example ERPs' schemas (sql/examples), which the dump leaves out as well: the test template has reference-erp installed. */
const exampleSchemas = (() => {
  const m = /^EXAMPLE_SCHEMAS=\(([^)]*)\)$/m.exec(readFileSync('scripts/dump-schema.sh', 'utf8'));
  if (!m) throw new Error('scripts/dump-schema.sh has no EXAMPLE_SCHEMAS=(...) line');
  return m[1]!.trim().split(/\s+/);
})();

let db: TestDb;
let out: string;
let baselineOut: string;
beforeAll(async () => {
  // what make schema does: a database made from nothing, migrated file by file (the template came from the baseline)
  db = await createTestDb('schema_dump', { template: null });
  await migrate(db.url, undefined, [], { baseline: false });
  out = mkdtempSync(path.join(tmpdir(), 'erp-cloud-schema-'));
  baselineOut = path.join(out, 'baseline');
}, 120_000);
afterAll(async () => {
  rmSync(out, { recursive: true, force: true });
  await db.drop();
});

const sqlFiles = (dir: string) => readdirSync(dir).filter((f) => f.endsWith('.sql')).sort();

/** At most `max` lines of `diff -u` between the checked-in file and the fresh one. */
async function shortDiff(file: string, max = 40, checkedIn = CHECKED_IN, fresh = out): Promise<string> {
  const lines = await run('diff', ['-u', '--label', `${checkedIn}/${file} (checked in)`, '--label', `${checkedIn}/${file} (from the migrations)`,
    path.join(checkedIn, file), path.join(fresh, file)], { maxBuffer: 64 << 20 }).then(
    (r) => r.stdout,
    (e: { stdout?: string }) => e.stdout ?? '',
  ).then((s) => s.split('\n'));
  return lines.slice(0, max).join('\n') + (lines.length > max ? `\n… (${lines.length - max} more lines)` : '');
}

describe('sql/schema', () => {
  it('is the current definition: a freshly migrated database dumps to exactly the checked-in files', async (ctx) => {
    const major = Number((await db.pool.query(`select current_setting('server_version_num')::int / 10000 as m`)).rows[0].m);
    const made = /PostgreSQL (\d+)\)/.exec(readFileSync(path.join(CHECKED_IN, 'cloud.sql'), 'utf8'))?.[1];
    if (made && Number(made) !== major) {
      // pg_dump of another major prints other (equivalent) text: only a server of the files' major can judge them
      console.warn(`schema-dump: the server is PostgreSQL ${major}, sql/schema was made with ${made}: not compared`);
      ctx.skip();
    }
    await run('bash', ['scripts/dump-schema.sh', '--from', db.url, '--out', out, '--baseline', baselineOut], { timeout: 120_000 });

    const fresh = sqlFiles(out);
    expect(fresh, 'a file per product schema').toEqual(expect.arrayContaining(['cloud.sql', 'scm.sql', 'sso.sql', 'tax.sql', 'vault.sql']));
    expect(sqlFiles(CHECKED_IN), `${STALE} (a schema was added or removed)`).toEqual(fresh);
    for (const s of exampleSchemas) expect(fresh, 'an example\'s schema is not the product\'s').not.toContain(`${s}.sql`);
    const differ: string[] = [];
    for (const f of fresh) {
      if (readFileSync(path.join(out, f), 'utf8') !== readFileSync(path.join(CHECKED_IN, f), 'utf8')) differ.push(await shortDiff(f));
    }
    expect(differ.length, `${STALE}\n\n${differ.join('\n\n')}\n\nfiles that differ`).toBe(0);

    // the baseline a fresh database is installed from: one file, for the newest migration, as make schema makes it
    const generated = sqlFiles(baselineOut);
    expect(generated).toEqual([`${String(readdirSync('sql/migrations').filter((f) => /^\d{4}_.*\.sql$/.test(f)).length).padStart(4, '0')}_baseline.sql`]);
    expect(sqlFiles(BASELINE), `${STALE_BASELINE} (it is for another migration, or there are several)`).toEqual(generated);
    if (readFileSync(path.join(baselineOut, generated[0]!), 'utf8') !== readFileSync(path.join(BASELINE, generated[0]!), 'utf8')) {
      expect.fail(`${STALE_BASELINE}\n\n${await shortDiff(generated[0]!, 40, BASELINE, baselineOut)}`);
    }
  });

  it('the baseline says it is generated, what it is for, and which files it stands for', () => {
    for (const f of sqlFiles(BASELINE)) {
      const text = readFileSync(path.join(BASELINE, f), 'utf8');
      const head = text.split('\n').slice(0, 16).join('\n');
      expect(head, f).toMatch(/^-- erp-cloud baseline \d{4}: /);
      expect(head, f).toContain('GENERATED by scripts/dump-schema.sh');
      expect(head, f).toContain('do not edit');
      expect(head, f).toContain('It is not a migration');
      expect(text, f).toMatch(/^-- migration 0001_\w+\.sql sha256 [0-9a-f]{64}$/m);
    }
  });

  it('every file says it is generated, how to regenerate it, and what the truth is', () => {
    for (const f of sqlFiles(CHECKED_IN)) {
      const head = readFileSync(path.join(CHECKED_IN, f), 'utf8').split('\n').slice(0, 8).join('\n');
      expect(head, f).toMatch(/^-- Schema \w+: its current definition/);
      expect(head, f).toContain('GENERATED by scripts/dump-schema.sh');
      expect(head, f).toContain('do not edit');
      expect(head, f).toContain('`make schema`');
      expect(head, f).toContain('The truth is sql/migrations');
    }
  });

  it('nothing of the product hides in a schema the dump leaves out: only extensions, the migration history and the examples\' record live there', async () => {
    // migration history (postgres-migrations' table migrations, its indexes, whatever a history schema holds) is named migration*,
    // and the record of installed examples (erp_cloud.example) example*
    const { rows } = await db.pool.query<{ obj: string }>(`
      with excluded as (select oid from pg_namespace where nspname = any($1::name[])),
      objects(obj, classid, objid, relname) as (
        select 'relation ' || c.oid::regclass::text, 'pg_class'::regclass, c.oid, c.relname
          from pg_class c where c.relnamespace in (select oid from excluded) and c.relkind <> 't'
        union all
        select 'function ' || p.oid::regprocedure::text, 'pg_proc'::regclass, p.oid, null
          from pg_proc p where p.pronamespace in (select oid from excluded)
        union all
        select 'type ' || t.oid::regtype::text, 'pg_type'::regclass, t.oid, null
          from pg_type t where t.typnamespace in (select oid from excluded) and t.typrelid = 0 and t.typelem = 0
      )
      select obj from objects o
       where not exists (select from pg_depend d where d.classid = o.classid and d.objid = o.objid and d.deptype = 'e')
         and coalesce(o.relname, '') !~ '^(migration|example)'
       order by obj`, [excludedSchemas]);
    expect(rows.map((r) => r.obj), `move these into a product schema (or add their schema to sql/schema by taking it off EXCLUDED_SCHEMAS)`).toEqual([]);
  });
});
