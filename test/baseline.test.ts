/**
 * A fresh database is installed from sql/baseline/NNNN_baseline.sql, and that installs exactly what
 * the migration files do one by one (docs/adr/0001-erp-contracts.md §5.3, risk 1 of §7.3): the same
 * product schemas (pg_dump, byte for byte), the same seeded rows and sequences, the same grants,
 * owners, default privileges and extensions, the same partitions and pg_cron jobs, whether a superuser
 * or a database owner who is not one runs it. Then it is
 * migrated like any other database: nothing to do, or the newer files one by one.
 *
 * One thing may differ, by PostgreSQL's design: pg_dump prints an expression as the server keeps it,
 * and the server keeps `x between 1 and 2 and y` as `((x >= 1) AND (x <= 2)) AND y`, which reads back
 * as `(x >= 1) AND (x <= 2) AND y` (the parser flattens a nested AND on its left). Any pg_dump and
 * restore does the same. Such lines, equal once their parentheses are taken out, are allowed and named.
 *
 * That the checked-in baseline is the one `make schema` makes now is test/schema-dump.test.ts.
 */
import { execFile } from 'node:child_process';
import { appendFileSync, cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { loadBaseline, loadMigrationFiles, MigrationError, MigrationReason, runMigrations, type MigrateOptions, type MigrateResult } from '../listener/kernel/migrations.js';
import { withCronDatabase } from './helpers/cron.js';
import { createTestDb, type TestDb } from './helpers/db.js';

const run = promisify(execFile);
const files = loadMigrationFiles(migrationsDir);
const baselineDir = path.join(path.dirname(migrationsDir), 'baseline');
const baseline = loadBaseline(baselineDir);

const dbs: TestDb[] = [];
const dirs: string[] = [];
// every DROP DATABASE forces a checkpoint: a dozen one after the other outlasted the 60-s hook on a loaded
// machine, while drops side by side share their checkpoints (bounded by the hook's own 180 s)
afterAll(async () => {
  await Promise.all(dbs.map((d) => d.drop()));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
}, 180_000);

function tempDir(label: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), `erp-cloud-${label}-`));
  dirs.push(dir);
  return dir;
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  c.on('notice', () => undefined);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A database made from nothing and migrated by `erp-cloud migrate` (runMigrations) with `opts`. */
async function installed(label: string, opts: MigrateOptions = {}, dir = migrationsDir): Promise<{ db: TestDb; result: MigrateResult; log: string[] }> {
  const db = await createTestDb(label, { template: null });
  dbs.push(db);
  const log: string[] = [];
  const result = await withClient(db.url, (c) => runMigrations(c, dir, (m) => log.push(m), opts));
  return { db, result, log };
}

/** A directory laid out like sql/: migrations/ (a copy of the files) and baseline/ (a copy of the baseline). */
function copyOfSql(label: string): { migrations: string; baseline: string } {
  const root = tempDir(label);
  const out = { migrations: path.join(root, 'migrations'), baseline: path.join(root, 'baseline') };
  mkdirSync(out.migrations);
  mkdirSync(out.baseline);
  for (const f of files) cpSync(path.join(migrationsDir, f.name), path.join(out.migrations, f.name));
  cpSync(path.join(baselineDir, baseline!.name), path.join(out.baseline, baseline!.name));
  return out;
}

/** The product schemas (scripts/dump-schema.sh decides which, in one place). */
async function productSchemas(url: string): Promise<string[]> {
  return (await run('bash', ['scripts/dump-schema.sh', '--list-schemas', url])).stdout.split('\n').filter(Boolean);
}

/** scripts/dump-schema.sh on `url`: the schema files and the baseline it would make from that database, by file name. */
interface Dump { schema: Map<string, string>; baseline: Map<string, string> }

async function dumpOf(url: string, label: string): Promise<Dump> {
  const dir = tempDir(label);
  await run('bash', ['scripts/dump-schema.sh', '--from', url, '--out', path.join(dir, 'schema'), '--baseline', path.join(dir, 'baseline')], { timeout: 120_000 });
  const read = (d: string) => new Map(readdirSync(path.join(dir, d)).sort().map((f) => [f, readFileSync(path.join(dir, d, f), 'utf8')]));
  return { schema: read('schema'), baseline: read('baseline') };
}

/**
 * How two texts differ line by line: `differ` names lines that are not the same, `parensOnly` those
 * that are the same once parentheses are taken out (pg_dump's own round trip: see the file header).
 */
function compareLines(what: string, a: string, b: string): { differ: string[]; parensOnly: string[] } {
  const la = a.split('\n');
  const lb = b.split('\n');
  if (la.length !== lb.length) return { differ: [`${what}: ${la.length} lines file by file, ${lb.length} from the baseline`], parensOnly: [] };
  const differ: string[] = [];
  const parensOnly: string[] = [];
  const bare = (s: string) => s.replace(/[()]/g, '');
  la.forEach((l, i) => {
    if (l === lb[i]) return;
    (bare(l) === bare(lb[i]!) ? parensOnly : differ).push(`${what}:${i + 1}\n  file by file: ${l}\n  baseline:     ${lb[i]}`);
  });
  return { differ, parensOnly };
}

/** Columns that default to the clock: they hold the time of the install, whichever way it ran. */
const CLOCK_DEFAULT = String.raw`\m(now|clock_timestamp|statement_timestamp|transaction_timestamp|current_timestamp|current_date|current_time|localtimestamp|localtime)\M`;

/** Every row of every table of `schemas` (sorted, clock-defaulted columns left out), and every sequence's state. */
async function contents(pool: pg.Pool, schemas: string[]): Promise<Record<string, unknown>> {
  const tables = (await pool.query<{ t: string; cols: string[] }>(`
    select c.oid::regclass::text as t,
           array(select quote_ident(a.attname) from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                  where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                    and coalesce(pg_get_expr(d.adbin, d.adrelid), '') !~* $2 order by a.attnum) as cols
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any ($1) and c.relkind in ('r', 'p') order by 1`, [schemas, CLOCK_DEFAULT])).rows;
  const out: Record<string, unknown> = {};
  for (const { t, cols } of tables) {
    out[t] = (await pool.query(`select coalesce(json_agg(x order by x::text), '[]') as rows from (select ${cols.join(', ')} from only ${t}) x`)).rows[0].rows;
  }
  const sequences = (await pool.query<{ s: string }>(`
    select c.oid::regclass::text as s from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any ($1) and c.relkind = 'S' order by 1`, [schemas])).rows;
  for (const { s } of sequences) out[`sequence ${s}`] = (await pool.query(`select last_value, is_called from ${s}`)).rows[0];
  return out;
}

/**
 * Who owns and may use what, in every schema of the database (public and the extensions' too; an ACL
 * as its privileges: no ACL is the owner's default one, which pg_dump and so the baseline write that way), and
 * what else the migrations set up around the schemas: default privileges, extensions, policies' roles,
 * partitions with their comments.
 */
async function grantsAndSurroundings(pool: pg.Pool): Promise<string[]> {
  const { rows } = await pool.query<{ line: string }>(`
    with ns as (select oid, nspname from pg_namespace where nspname !~ '^pg_' and nspname <> 'information_schema')
    select format('schema %s owner %s acl %s', n.nspname, n.nspowner::regrole, coalesce(n.nspacl, acldefault('n'::"char", n.nspowner))) as line
      from pg_namespace n where n.oid in (select oid from ns)
    union all
    select format('relation %s owner %s acl %s', c.oid::regclass, c.relowner::regrole,
                  coalesce(c.relacl, acldefault((case c.relkind when 'S' then 's' else 'r' end)::"char", c.relowner)))
      from pg_class c where c.relnamespace in (select oid from ns)
    union all
    select format('column %s.%s acl %s', a.attrelid::regclass, a.attname, a.attacl) from pg_attribute a join pg_class c on c.oid = a.attrelid
     where c.relnamespace in (select oid from ns) and a.attacl is not null and not a.attisdropped
    union all
    select format('function %s owner %s acl %s', p.oid::regprocedure, p.proowner::regrole, coalesce(p.proacl, acldefault('f'::"char", p.proowner)))
      from pg_proc p where p.pronamespace in (select oid from ns)
    union all
    select format('type %s owner %s acl %s', t.oid::regtype, t.typowner::regrole, coalesce(t.typacl, acldefault('T'::"char", t.typowner)))
      from pg_type t where t.typnamespace in (select oid from ns)
    union all
    select format('default privileges of %s in %s on %s: %s', d.defaclrole::regrole, coalesce(d.defaclnamespace::regnamespace::text, 'the database'), d.defaclobjtype, d.defaclacl)
      from pg_default_acl d
    union all
    select format('extension %s %s in %s', e.extname, e.extversion, e.extnamespace::regnamespace) from pg_extension e
    union all
    select format('policy %s on %s for %s: %s', p.polname, p.polrelid::regclass, array(select r.rolname from pg_roles r where r.oid = any (p.polroles) order by 1), p.polcmd)
      from pg_policy p
    union all
    select format('partition %s of %s: %s, %s', c.oid::regclass, i.inhparent::regclass, pg_get_expr(c.relpartbound, c.oid), obj_description(c.oid, 'pg_class'))
      from pg_class c join pg_inherits i on i.inhrelid = c.oid where c.relispartition and c.relnamespace in (select oid from ns)
    order by 1`);
  return rows.map((r) => r.line);
}

describe.runIf(baseline)('the baseline', () => {
  let bySteps: { db: TestDb; stdout: string };
  let fromBaseline: Awaited<ReturnType<typeof installed>>;
  beforeAll(async () => {
    // one after the other: the two ways must not see each other's half-made roles
    const db = await createTestDb('by_steps', { template: null });
    dbs.push(db);
    bySteps = { db, stdout: (await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'migrate', '--no-baseline'])).stdout };
    fromBaseline = await installed('from_baseline');
  }, 120_000);

  it('is one file for the newest migration or an earlier one, and lists every file it stands for with its sha256', () => {
    expect(readdirSync(baselineDir)).toEqual([baseline!.name]);
    expect(baseline!.id).toBeLessThanOrEqual(files.length);
    expect(baseline!.files).toEqual(files.slice(0, baseline!.id).map((f) => ({ name: f.name, sha256: f.sha256 })));
  });

  it('a database without erp-cloud is installed from it in one step: every file it stands for is recorded with its sha256 as copied from the baseline, the newer ones run one by one; --no-baseline runs every file', async () => {
    expect(fromBaseline.result.baseline).toBe(baseline!.name);
    expect(fromBaseline.result.applied).toEqual(files.map((f) => f.name));
    expect(fromBaseline.log[0]).toMatch(new RegExp(`^installed from the baseline ${baseline!.name}: ${files[0]!.name} … ${files[baseline!.id - 1]!.name}`));
    const history = (await fromBaseline.db.pool.query(
      `select id, name, sha256, copied_from, applied_by = current_user as by_us, duration_ms is not null as timed from erp_cloud.migration order by id`)).rows;
    expect(history).toEqual(files.map((f) => ({
      id: f.id, name: f.name, sha256: f.sha256, by_us: true,
      ...(f.id <= baseline!.id ? { copied_from: 'baseline', timed: false } : { copied_from: null, timed: true }),
    })));
    // and file by file when told so: erp-cloud migrate --no-baseline
    expect(bySteps.stdout).not.toContain('baseline');
    expect(bySteps.stdout).toContain(`applied ${files[0]!.name}\n`);
    expect(bySteps.stdout).toContain(`${files.length} migration(s) applied`);
    expect((await bySteps.db.pool.query(`select count(*)::int n, count(copied_from)::int copied from erp_cloud.migration`)).rows[0]).toEqual({ n: files.length, copied: 0 });
  });

  /**
   * Both databases dumped once (scripts/dump-schema.sh: the product schemas and the baseline made from each), for
   * the two tests that compare them. Each dump may take up to its own 120 s on a loaded machine (it took 8–20 s
   * alone, 30–40 s beside a second suite and two busy loops), so these tests are bounded by that, not by the
   * suite's 60-s default, which one such run exceeded while dumping the same two databases a second time.
   */
  let dumps: Promise<[Dump, Dump]> | null = null;
  const dumpsOfBoth = () => (dumps ??= (async (): Promise<[Dump, Dump]> => [await dumpOf(bySteps.db.url, 'dump-steps'), await dumpOf(fromBaseline.db.url, 'dump-baseline')])());
  const DUMPS_TIMEOUT_MS = 2 * 120_000 + 30_000;

  it('installs the same product schemas as the files one by one: pg_dump of each is the same byte for byte (but for the parentheses pg_dump\'s own round trip drops)', async () => {
    const schemas = await productSchemas(bySteps.db.url);
    expect(await productSchemas(fromBaseline.db.url)).toEqual(schemas);
    const [a, b] = await dumpsOfBoth();
    expect([...b.schema.keys()]).toEqual([...a.schema.keys()]);
    expect([...a.schema.keys()]).toEqual(schemas.map((s) => `${s}.sql`));
    const differ: string[] = [];
    for (const [f, text] of a.schema) differ.push(...compareLines(`sql/schema/${f}`, text, b.schema.get(f)!).differ);
    expect(differ, `the baseline installs other definitions than the migration files:\n${differ.slice(0, 20).join('\n')}`).toEqual([]);
  }, DUMPS_TIMEOUT_MS);

  it('makes the same roles, grants, default privileges, extension grants and seeded rows: the baseline made from it is the baseline made from the files one by one', async () => {
    const [a, b] = await dumpsOfBoth();
    expect([...b.baseline.keys()]).toEqual([baseline!.name.replace(/^\d{4}/, String(files.length).padStart(4, '0'))]);
    const name = [...a.baseline.keys()][0]!;
    const { differ } = compareLines(name, a.baseline.get(name)!, b.baseline.get(name)!);
    expect(differ, differ.slice(0, 20).join('\n')).toEqual([]);
  }, DUMPS_TIMEOUT_MS);

  it('holds the same rows in every table (seeded configuration alike, data tables empty alike; clock columns aside) and the same sequence values', async () => {
    const schemas = await productSchemas(bySteps.db.url);
    const a = await contents(bySteps.db.pool, schemas);
    const b = await contents(fromBaseline.db.pool, schemas);
    expect(Object.keys(a).length).toBeGreaterThan(50);
    expect(b).toEqual(a);
    // what the migrations seed is there, not only "the same nothing"
    const seeded = Object.entries(a).filter(([k, v]) => !k.startsWith('sequence ') && (v as unknown[]).length > 0).map(([k]) => k);
    expect(seeded).toEqual(expect.arrayContaining(['cloud.operation_handler', 'cloud.setting', 'tax.config', 'tax.text_limit']));
  });

  it('grants the same privileges to the same roles on every object, owns the same objects, and sets up the same default privileges, extensions, policies and partitions', async () => {
    const a = await grantsAndSurroundings(bySteps.db.pool);
    const b = await grantsAndSurroundings(fromBaseline.db.pool);
    expect(a.some((l) => /^function (public\.)?pgp_sym_encrypt.*erp_cloud_vault_owner=X/.test(l)), 'the vault owner may encrypt with pgcrypto').toBe(true);
    expect(a.some((l) => l.startsWith('partition cloud.log_p')), 'cloud.log has its months').toBe(true);
    expect(b.filter((l) => !a.includes(l)), 'only after the baseline').toEqual([]);
    expect(a.filter((l) => !b.includes(l)), 'only after the files one by one').toEqual([]);
  });

  it('a database owner that is not a superuser installs from it what the files give that owner one by one', async () => {
    const owner = `erp_cloud_test_owner_${process.pid}`;
    const admin = async (sql: string) => withClient(fromBaseline.db.url, (c) => c.query(sql));
    // what the migrations need of such an owner: roles to create and grant, the server's settings (cron.database_name) to read
    await admin(`create role ${owner} login createrole in role pg_read_all_settings`);
    try {
      const made = await Promise.all(['owner_steps', 'owner_baseline'].map(async (label) => {
        const db = await createTestDb(label, { template: null });
        await admin(`alter database ${db.name} owner to ${owner}`);
        const url = new URL(db.url);
        url.username = owner;
        return { db, url: url.toString() };
      }));
      const [steps, base] = made;
      try {
        expect((await withClient(steps!.url, (c) => runMigrations(c, migrationsDir, undefined, { baseline: false }))).baseline).toBeNull();
        expect((await withClient(base!.url, (c) => runMigrations(c, migrationsDir))).baseline).toBe(baseline!.name);
        const schemas = await productSchemas(steps!.db.url);
        expect(await contents(base!.db.pool, schemas)).toEqual(await contents(steps!.db.pool, schemas));
        const a = await grantsAndSurroundings(steps!.db.pool);
        const b = await grantsAndSurroundings(base!.db.pool);
        expect(a.some((l) => l.startsWith(`function cloud.claim_messages(`) && l.includes(`owner ${owner} `))).toBe(true);
        expect(b.filter((l) => !a.includes(l)), 'only after the baseline').toEqual([]);
        expect(a.filter((l) => !b.includes(l)), 'only after the files one by one').toEqual([]);
      } finally {
        for (const m of made) await m.db.drop();
      }
    } finally {
      await admin(`drop role if exists ${owner}`);
    }
  });

  it('installs beside an ERP that has its own schema erp (a customer table), another app\'s public.migrations and tables named like ours in public, touching none of them, twice without harm', async () => {
    const db = await createTestDb('foreign_erp', { template: null });
    dbs.push(db);
    await db.pool.query(`
      create schema erp;
      create table erp.customer (id serial primary key, name text not null, tax_id text);
      insert into erp.customer (name, tax_id) values ('Their customer', '91310000MA1FL8LQ3X');
      create table public.migrations (id serial primary key, migration varchar(255) not null, batch integer not null);
      insert into public.migrations (migration, batch) values ('2014_10_12_000000_create_users_table', 1);
      create table public.outbox (id bigint primary key); create table public.endpoint (name text primary key);
      create table public.invoice (id bigint primary key); create table public.customer (id bigint primary key);
      create table public.migration (id bigint primary key); create table public.source (name text primary key);
      insert into public.invoice values (1), (2);`);
    // what is theirs: every relation of erp and public with its storage, columns, ACL and every row version
    const theirs = async () => (await db.pool.query(`
      select c.oid::regclass::text as rel, c.relfilenode, c.relacl::text as acl,
             (xpath('/row/r/text()', query_to_xml(case c.relkind
                when 'S' then format('select last_value::text || '' '' || is_called::text as r from %s', c.oid::regclass)
                else format('select coalesce(string_agg(xmin::text || ctid::text || t::text, '','' order by ctid), '''') as r from %s t', c.oid::regclass) end,
              false, true, '')))[1]::text as rows,
             array(select a.attname || ' ' || format_type(a.atttypid, a.atttypmod) from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 order by a.attnum) as columns
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
       where n.nspname in ('erp', 'public') and c.relkind in ('r', 'S') order by 1`)).rows;
    const schemaAcls = async () => Object.fromEntries((await db.pool.query(
      `select nspname, nspacl::text as acl from pg_namespace where nspname in ('erp', 'public')`)).rows.map((r) => [r.nspname, r.acl]));
    const before = await theirs();
    const aclsBefore = await schemaAcls();
    expect(before.length).toBeGreaterThan(8);
    const first = await withClient(db.url, (c) => runMigrations(c, migrationsDir));
    expect(first).toMatchObject({ baseline: baseline!.name, applied: files.map((f) => f.name), copiedFrom: null });
    expect(await theirs()).toEqual(before);
    expect(await withClient(db.url, (c) => runMigrations(c, migrationsDir))).toMatchObject({ applied: [], baseline: null });
    expect(await theirs()).toEqual(before);
    expect((await db.pool.query(`select name from erp.customer`)).rows).toEqual([{ name: 'Their customer' }]);
    // their schema erp as it was; public only lets the vault's owner reach pgcrypto there, as the migrations do (0004)
    expect(await schemaAcls()).toEqual({ ...aclsBefore, public: aclsBefore.public.replace(/}$/, ',erp_cloud_vault_owner=U/pg_database_owner}') });
  });

  it('migrating a database installed from it again is a no-op: nothing applied, the history rows untouched', async () => {
    const before = (await fromBaseline.db.pool.query(`select xmin::text, * from erp_cloud.migration order by id`)).rows;
    const log: string[] = [];
    const again = await withClient(fromBaseline.db.url, (c) => runMigrations(c, migrationsDir, (m) => log.push(m)));
    expect(again).toMatchObject({ applied: [], baseline: null, copiedFrom: null });
    expect(log).toEqual([]);
    expect((await fromBaseline.db.pool.query(`select xmin::text, * from erp_cloud.migration order by id`)).rows).toEqual(before);
  });

  it('a database installed from it upgrades through a later migration file one by one, and that file runs after the baseline in the same migrate too', async () => {
    const sql = copyOfSql('later');
    const next = `${String(files.length + 1).padStart(4, '0')}_a_later_change.sql`;
    writeFileSync(path.join(sql.migrations, next), `create table cloud.a_later_change (id integer primary key);\ninsert into cloud.a_later_change values (1);\n`);

    // installed before the file existed, upgraded when it came
    const db = await createTestDb('later', { template: null });
    dbs.push(db);
    const first = await withClient(db.url, (c) => runMigrations(c, migrationsDir));
    expect(first.baseline).toBe(baseline!.name);
    const upgraded = await withClient(db.url, (c) => runMigrations(c, sql.migrations, undefined, { baselineDir: sql.baseline }));
    expect(upgraded).toMatchObject({ applied: [next], baseline: null });
    expect((await db.pool.query(`select id from cloud.a_later_change`)).rows).toEqual([{ id: 1 }]);
    const last = (await db.pool.query(`select name, copied_from, duration_ms is not null as timed from erp_cloud.migration order by id desc limit 1`)).rows[0];
    expect(last).toEqual({ name: next, copied_from: null, timed: true });

    // a fresh database: the baseline, then the later file, in one migrate
    const fresh = await installed('later_fresh', { baselineDir: sql.baseline }, sql.migrations);
    expect(fresh.result).toMatchObject({ baseline: baseline!.name, applied: [...files.map((f) => f.name), next] });
    expect(fresh.log.at(-1)).toBe(`applied ${next}`);
    expect((await fresh.db.pool.query(`select count(*)::int n from cloud.a_later_change`)).rows[0].n).toBe(1);
  });

  it('a database with history never runs the baseline: one migrated up to an earlier file gets the rest one by one', async () => {
    const sql = copyOfSql('partial');
    const keep = baseline!.id - 1;
    for (const f of files.slice(keep)) rmSync(path.join(sql.migrations, f.name));
    const { db } = await installed('partial', { baseline: false }, sql.migrations);
    expect((await db.pool.query(`select count(*)::int n, count(copied_from)::int copied from erp_cloud.migration`)).rows[0]).toEqual({ n: keep, copied: 0 });
    const rest = await withClient(db.url, (c) => runMigrations(c, migrationsDir));
    expect(rest).toMatchObject({ baseline: null, applied: files.slice(keep).map((f) => f.name) });
    expect((await db.pool.query(`select count(copied_from)::int n from erp_cloud.migration`)).rows[0].n).toBe(0);
  });

  it('a baseline made from other files than these is not used: the files run one by one, and migrate says why', async () => {
    const sql = copyOfSql('other-files');
    const last = files[baseline!.id - 1]!.name;
    appendFileSync(path.join(sql.migrations, last), '\n-- not yet landed, changed after make schema\n');
    const { db, result, log } = await installed('other_files', { baselineDir: sql.baseline }, sql.migrations);
    expect(result.baseline).toBeNull();
    expect(log[0]).toContain(`not installing from ${baseline!.name}: it was made from ${last} with sha256`);
    expect(log[0]).toContain('make schema');
    expect((await db.pool.query(`select count(*)::int n, count(copied_from)::int copied from erp_cloud.migration`)).rows[0]).toEqual({ n: files.length, copied: 0 });
  });

  it('a baseline that fails is rolled back whole: nothing of it and no history remains, the error keeps the SQLSTATE, names the file and says how to install file by file', async () => {
    const sql = copyOfSql('failing');
    appendFileSync(path.join(sql.baseline, baseline!.name), '\nselect 1 / 0;\n');
    const db = await createTestDb('failing', { template: null });
    dbs.push(db);
    const err = await withClient(db.url, (c) => runMigrations(c, sql.migrations, undefined, { baselineDir: sql.baseline })).then(
      () => { throw new Error('expected a rejection'); }, (e: unknown) => e as MigrationError);
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ reason: MigrationReason.migrationFailed, code: '22012' });
    expect(err.message).toContain(baseline!.name);
    expect(err.hint).toContain('--no-baseline');
    const left = (await db.pool.query(`select to_regnamespace('cloud') as cloud, (select count(*)::int from erp_cloud.migration) as history`)).rows[0];
    expect(left).toEqual({ cloud: null, history: 0 });
  });

  it('a sql/baseline that holds anything but one NNNN_baseline.sql is refused (bad_baseline) before anything runs', async () => {
    const sql = copyOfSql('two');
    writeFileSync(path.join(sql.baseline, '0001_baseline.sql'), '-- an old one\n');
    const db = await createTestDb('two_baselines', { template: null });
    dbs.push(db);
    const err = await withClient(db.url, (c) => runMigrations(c, sql.migrations, undefined, { baselineDir: sql.baseline })).catch((e: unknown) => e as MigrationError);
    expect(err).toMatchObject({ reason: MigrationReason.badBaseline });
    expect((err as MigrationError).hint).toContain('make schema');
    expect((await db.pool.query(`select to_regnamespace('cloud') as s`)).rows[0].s).toBeNull();
  });

  it('schedules the same pg_cron jobs as the files one by one, in the cron database', async () => {
    const jobs = (opts: { baseline?: boolean }) => withCronDatabase(async (cronDb, url) => {
      expect(cronDb, 'the server must preload pg_cron (scripts/pg.sh configures it)').toBeTruthy();
      return withClient(url, async (c) => (await c.query(
        `select jobname, schedule, command, database, username = current_user as by_us, active from cron.job order by jobname`)).rows);
    }, opts);
    const a = await jobs({ baseline: false });
    const b = await jobs({});
    expect(a.map((j) => j.jobname)).toEqual(expect.arrayContaining(['erp-cloud: reap expired leases', 'erp-cloud scm: pull ASNs']));
    expect(b).toEqual(a);
  }, 240_000);
});
