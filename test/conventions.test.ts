/**
 * The conventions every product schema keeps, checked once for all of them
 * (STYLE.md 5 and 8): every object is documented in the database (including
 * the cloud.log partitions made at run time), and PUBLIC may neither use a
 * product schema nor execute any of its functions. Role-specific grants are
 * checked where the roles are (engine, sso, vault tests). Every table the
 * supplier portal may touch has row-level security on (STYLE.md 6), and
 * triggers and their functions carry their table and order (STYLE.md 4).
 * Every public function's name takes a verb of the table in sql/README.md
 * (STYLE.md 3), so a new straggler fails here rather than in review.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';

/** erp is the reference example ERP's schema (sql/examples/reference-erp, installed in the test template): it keeps the conventions too. */
const SCHEMAS = ['cloud', 'tax', 'scm', 'sso', 'vault', 'erp', 'erp_cloud'];
/** The schemas of the product itself: no example is named in them. */
const PRODUCT_SCHEMAS = ['cloud', 'tax', 'scm', 'sso', 'vault'];

let db: TestDb;
beforeAll(async () => {
  db = await createTestDb('comments');
});
afterAll(() => db.drop());

/** Objects of the product schemas without a comment, or whose comment has an empty first line. */
async function undocumented(): Promise<string[]> {
  const { rows } = await db.pool.query<{ obj: string }>(`
    with documented(obj, description) as (
      select 'schema ' || n.nspname, obj_description(n.oid, 'pg_namespace')
        from pg_namespace n where n.nspname = any($1)
      union all
      select 'function ' || p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc')
        from pg_proc p where p.pronamespace::regnamespace::text = any($1)
         and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
      union all
      select (case c.relkind when 'r' then case when c.relispartition then 'partition ' else 'table ' end
                             when 'p' then 'partitioned table ' when 'v' then 'view ' when 'm' then 'materialized view '
                             when 'f' then 'foreign table ' end) || c.oid::regclass::text,
             obj_description(c.oid, 'pg_class')
        from pg_class c where c.relnamespace::regnamespace::text = any($1) and c.relkind in ('r', 'p', 'v', 'm', 'f')
         and not exists (select from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e')
      union all
      select 'type ' || t.oid::regtype::text, obj_description(t.oid, 'pg_type')
        from pg_type t where t.typnamespace::regnamespace::text = any($1)
         and (t.typtype in ('e', 'd') or (t.typtype = 'c' and (select c.relkind from pg_class c where c.oid = t.typrelid) = 'c')))
    select obj from documented where coalesce(btrim(split_part(description, E'\\n', 1)), '') = '' order by obj`, [SCHEMAS]);
  return rows.map((r) => r.obj);
}

describe('privileges', () => {
  it('no function of any product schema is executable by PUBLIC, and PUBLIC may not use any product schema', async () => {
    const { rows } = await db.pool.query(`
      select p.oid::regprocedure::text as fn from pg_proc p
       where p.pronamespace::regnamespace::text = any($1) and has_function_privilege('public', p.oid, 'execute')
         and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
       order by 1`, [SCHEMAS]);
    expect(rows).toEqual([]);
    const { rows: open } = await db.pool.query(`select nspname from pg_namespace where nspname = any($1) and has_schema_privilege('public', oid, 'usage')`, [SCHEMAS]);
    expect(open).toEqual([]);
    // the list is every schema the migrations made (a new one must join it)
    const { rows: made } = await db.pool.query(`select nspname from pg_namespace
       where nspname <> all ($1) and nspname !~ '^pg_' and nspname not in ('information_schema', 'public', 'cron') order by 1`, [SCHEMAS]);
    expect(made.map((r) => r.nspname)).toEqual([]);
  });
});

describe('comments', () => {
  it('every schema, table, partition, view, function and type of the product has a comment with a summary line', async () => {
    expect(await undocumented()).toEqual([]);
  });

  it('the cloud.log partitions made later by maintenance have their comment too', async () => {
    const made = (await db.pool.query(`select cloud.ensure_log_partitions(1, now() + interval '2 years') as n`)).rows[0].n as number;
    expect(made).toBe(2);
    const { rows } = await db.pool.query(`select c.relname, obj_description(c.oid, 'pg_class') as d from pg_inherits i join pg_class c on c.oid = i.inhrelid
                                          where i.inhparent = 'cloud.log'::regclass order by 1`);
    expect(rows.length).toBeGreaterThanOrEqual(3);
    for (const r of rows) expect(r.d, r.relname).toMatch(r.relname === 'log_default' ? /^Cloud_Log rows of a month that has no partition/ : /^Cloud_Log for \d{4}-\d{2} \(UTC\)/);
    expect(await undocumented()).toEqual([]);
  });

  it('tax.invoice names the tax_cloud_response keys the write-backs really use, and no pdf key', async () => {
    const comment = (await db.pool.query(`select obj_description('tax.invoice'::regclass, 'pg_class') as d`)).rows[0].d as string;
    // every key a tax function writes with jsonb_build_object('<key>', …) or under split_part(operation) is named
    const { rows } = await db.pool.query<{ src: string }>(`select prosrc as src from pg_proc where pronamespace = 'tax'::regnamespace and prosrc like '%tax_cloud_response%'`);
    const written = new Set<string>();
    for (const { src } of rows) {
      for (const m of src.matchAll(/tax_cloud_response\s*(?:=\s*a\.tax_cloud_response\s*\|\||=)\s*jsonb_build_object\(\s*'([a-z_]+)'(?:[^)(]*?,\s*'([a-z_]+)')?/g)) {
        written.add(m[1]!);
        if (m[2]) written.add(m[2]);
      }
    }
    // failures are kept under the operation's own name (split_part('tax.issue', '.', 2) …)
    for (const op of ['issue', 'red_confirm', 'query', 'red_query']) written.add(op);
    expect(written.size).toBeGreaterThan(5);
    for (const key of written) expect(comment, key).toMatch(new RegExp(`\\b${key}\\b`));
    expect(comment).not.toMatch(/\bpdf\)/);
    expect(comment).toContain('tax.attachment');
  });
});

describe('row-level security', () => {
  it('every table the supplier portal may read or write has row-level security on', async () => {
    const { rows } = await db.pool.query<{ t: string; rls: boolean }>(`
      select c.oid::regclass::text as t, c.relrowsecurity as rls from pg_class c
       where c.relnamespace::regnamespace::text = any($1) and c.relkind in ('r', 'p')
         and has_table_privilege('erp_cloud_supplier_portal', c.oid, 'select, insert, update, delete')
       order by 1`, [SCHEMAS]);
    expect(rows.length).toBeGreaterThan(0);
    expect(rows.filter((r) => !r.rls).map((r) => r.t)).toEqual([]);
  });
});

/**
 * Triggers that do not follow the naming rule, as `table.trigger → function`:
 * none any more (0022 renamed the product's, 0023 moved the reference ERP's into
 * its example, where they follow the rule). A new trigger never joins this list.
 */
const TRIGGER_STRAGGLERS: string[] = [];

describe('trigger naming', () => {
  it('a trigger is named <table>_<NNN>_<verb> and its function tg_<table>__<NNN>_<verb> (triggers fire in name order)', async () => {
    const { rows } = await db.pool.query<{ tbl: string; relname: string; tgname: string; fn: string; proname: string }>(`
      select t.tgrelid::regclass::text as tbl, c.relname, t.tgname, p.oid::regproc::text as fn, p.proname
        from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_proc p on p.oid = t.tgfoid
       where not t.tgisinternal and c.relnamespace::regnamespace::text = any($1)
       order by 1, 3`, [SCHEMAS]);
    expect(rows.length).toBeGreaterThan(5);
    const wrong = rows.filter((r) => {
      const m = new RegExp(`^${r.relname}_(\\d{3}_[a-z0-9_]+)$`).exec(r.tgname);
      return !m || r.proname !== `tg_${r.relname}__${m[1]}`;
    }).map((r) => `${r.tbl}.${r.tgname} → ${r.fn}`);
    expect(wrong).toEqual(TRIGGER_STRAGGLERS);
  });
});

describe('the product and the examples', () => {
  it('no function of a product schema names schema erp (the reference example ERP) or acme in its body or signature', async () => {
    const { rows } = await db.pool.query<{ fn: string }>(`
      select p.oid::regprocedure::text as fn from pg_proc p
       where p.pronamespace::regnamespace::text = any($1)
         and (p.prosrc ~* '(^|[^a-z0-9_."])"?(erp|acme)"?[.]' or pg_get_function_arguments(p.oid) ~* '(^|[^a-z0-9_."])(erp|acme)[.]'
              or pg_get_function_result(p.oid) ~* '(^|[^a-z0-9_."])(erp|acme)[.]')
       order by 1`, [PRODUCT_SCHEMAS]);
    expect(rows.map((r) => r.fn)).toEqual([]);
    // the check sees a name where one is: the example's own functions name their schema
    const { rows: seen } = await db.pool.query(`select count(*)::int n from pg_proc p where p.pronamespace = 'erp'::regnamespace
                                                  and p.prosrc ~* '(^|[^a-z0-9_."])"?(erp|acme)"?[.]'`);
    expect(seen[0].n).toBeGreaterThan(5);
  });
});

/** The product's schemas for the verb check: erp is the reference ERP, an example of an ERP with names of its own. */
const VERB_SCHEMAS = ['cloud', 'tax', 'scm', 'sso', 'vault', 'erp_cloud'];

/**
 * The name patterns of the verb table in sql/README.md ("The verbs, and what each
 * one means"): every backticked name in its first column, `*` standing for the rest
 * of a name (`put_*`, `build_*_payload`, `*_ok`); a name without `*` is that name only.
 */
function verbPatterns(): { text: string; re: RegExp }[] {
  const readme = readFileSync('sql/README.md', 'utf8');
  const start = readme.indexOf('### The verbs, and what each one means');
  expect(start, 'sql/README.md has the verb table').toBeGreaterThan(0);
  const rows = readme.slice(start).split('\n').filter((l) => l.startsWith('| `'));
  const patterns = rows.flatMap((row) => [...row.split('|')[1]!.matchAll(/`([a-z0-9_*]+)`/g)].map((m) => m[1]!));
  return patterns.map((text) => ({ text, re: new RegExp(`^${text.replace(/\*/g, '[a-z0-9_]+')}$`) }));
}

describe('naming', () => {
  it('every public function of the product takes a verb of the table in sql/README.md (deprecated wrappers aside)', async () => {
    const { rows } = await db.pool.query<{ fn: string; proname: string }>(`
      select distinct p.pronamespace::regnamespace::text || '.' || p.proname as fn, p.proname from pg_proc p
       where p.pronamespace::regnamespace::text = any($1) and p.proname !~ '^_'
         and coalesce(obj_description(p.oid, 'pg_proc'), '') !~ '^Deprecated:'
         and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
       order by 1`, [VERB_SCHEMAS]);
    expect(rows.length).toBeGreaterThan(100);
    const patterns = verbPatterns();
    expect(patterns.length).toBeGreaterThan(20);
    const leadingWords = [...new Set(rows.map((r) => r.proname.split('_')[0]!))].sort();
    const unlisted = rows.filter((r) => !patterns.some((p) => p.re.test(r.proname))).map((r) => r.fn);
    expect(unlisted, `leading words in use: ${leadingWords.join(' ')}`).toEqual([]);
    // a row of the table that no function uses any more goes with its last function
    const unused = patterns.filter((p) => !rows.some((r) => p.re.test(r.proname))).map((p) => p.text);
    expect(unused).toEqual([]);
  });

  it('a deprecated name calls what replaces it, which the same roles may execute, so a listener of the previous release keeps working', async () => {
    const roles = `(select array_agg(distinct a.grantee::regrole::text order by a.grantee::regrole::text)
                      from pg_proc q, aclexplode(q.proacl) a where q.oid = %s and a.grantee <> q.proowner)`;
    const { rows } = await db.pool.query<{ fn: string; src: string; d: string; roles: string[] }>(`
      select p.oid::regprocedure::text as fn, p.prosrc as src, obj_description(p.oid, 'pg_proc') as d, ${roles.replace('%s', 'p.oid')} as roles
        from pg_proc p
       where p.pronamespace::regnamespace::text = any($1) and obj_description(p.oid, 'pg_proc') ~ '^Deprecated:'
       order by 1`, [VERB_SCHEMAS]);
    expect(rows.length).toBeGreaterThan(0);
    for (const r of rows) {
      const replacement = /^Deprecated: use ([a-z_]+\.[a-z0-9_]+)/.exec(r.d)?.[1];
      expect(replacement, r.fn).toBeDefined();
      expect(r.src, r.fn).toContain(`${replacement}(`);
      expect(r.d, r.fn).toMatch(/removed in the next release/);
      const { rows: target } = await db.pool.query<{ roles: string[] }>(`
        select ${roles.replace('%s', 'p.oid')} as roles from pg_proc p
         where p.pronamespace::regnamespace::text || '.' || p.proname = $1`, [replacement]);
      expect(target, r.fn).toHaveLength(1);
      expect(r.roles, r.fn).toEqual(target[0]!.roles);
    }
  });
});
