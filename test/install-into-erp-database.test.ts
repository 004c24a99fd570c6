/**
 * erp-cloud at work inside the database of a real ERP (issue 11): the ERP already has a schema
 * `erp` with its own `customer` (rows, an index, a trigger, a function), an application's own
 * `public.migrations` with its rows, and tables in public named like erp-cloud's. After
 * `erp-cloud migrate`, and after erp-cloud is used there (a source, a document through the
 * contract, the foreign-shaped example installed), every object, privilege and row of the ERP's
 * is as it was. test/baseline.test.ts proves the install itself (twice, byte for byte).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { loadMigrationFiles } from '../listener/kernel/migrations.js';
import { createTestDb, type TestDb } from './helpers/db.js';
import { installExample, migrateWith } from './helpers/examples.js';

const ERP_CLOUD_SCHEMAS = ['cloud', 'tax', 'scm', 'sso', 'vault', 'erp_cloud'];
/** Names a real application's public schema often has, and that erp-cloud also uses for its own tables. */
const LOOKALIKES = ['outbox', 'endpoint', 'log', 'setting', 'invoice', 'invoice_line', 'document', 'source', 'attachment', 'reversal',
  'customer', 'supplier', 'purchase_order', 'asn', 'migration', 'config', 'app_user', 'secret', 'client', 'example'];

let db: TestDb;
beforeAll(async () => {
  db = await createTestDb('install_into_erp', { template: null });
  const q = (sql: string) => db.pool.query(sql);
  // the ERP's own objects, as a DBA would find them
  await q(`create schema erp`);
  await q(`create table erp.customer (khbh text primary key, khmc text not null, khsh text, created_at timestamptz default now())`);
  await q(`insert into erp.customer (khbh, khmc, khsh) values ('C001', '华东机电', '91330106MA2AYNWD8M'), ('C002', '华南机电', null)`);
  await q(`create table erp.settlement (id serial primary key, customer text references erp.customer, total numeric(16,2))`);
  await q(`create index settlement_customer on erp.settlement (customer)`);
  await q(`create function erp.touch() returns trigger language plpgsql as $$ begin return new; end $$`);
  await q(`create trigger settlement_touch before update on erp.settlement for each row execute function erp.touch()`);
  await q(`insert into erp.settlement (customer, total) values ('C001', 113.00)`);
  // an application that keeps its own migration history in public.migrations (Laravel's shape)
  await q(`create table public.migrations (id serial primary key, migration varchar(255) not null, batch integer not null)`);
  await q(`insert into public.migrations (migration, batch) values ('2014_10_12_000000_create_users_table', 1), ('2019_08_19_000000_create_failed_jobs_table', 1)`);
  for (const t of LOOKALIKES) {
    await q(`create table public.${t} (id bigint primary key, note text)`);
    await q(`insert into public.${t} values (1, 'the application''s ${t}')`);
  }
});
afterAll(() => db.drop());

/** Everything of the ERP's: schemas, relations with columns, constraints, indexes, triggers, functions, owners, ACLs, and every row. */
async function snapshotOfTheErp(): Promise<unknown> {
  const ours = ERP_CLOUD_SCHEMAS;
  const catalog = await db.pool.query(
    `select n.nspname, pg_get_userbyid(n.nspowner) owner,
            -- the one grant erp-cloud makes outside its schemas: its vault owner may use the schema where pgcrypto lives
            array(select a::text from unnest(n.nspacl) a where a::text not like 'erp\\_cloud\\_vault\\_owner=U/%' order by 1) acl,
            (select jsonb_agg(jsonb_build_object('rel', c.relname, 'kind', c.relkind, 'owner', pg_get_userbyid(c.relowner), 'acl', c.relacl::text,
                      'columns', (select string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || case when a.attnotnull then ' not null' else '' end
                                                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''), ', ' order by a.attnum)
                                    from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                                   where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
                      'constraints', (select string_agg(k.conname || ' ' || pg_get_constraintdef(k.oid), '; ' order by k.conname) from pg_constraint k where k.conrelid = c.oid),
                      'indexes', (select string_agg(pg_get_indexdef(i.indexrelid), '; ' order by i.indexrelid::regclass::text) from pg_index i where i.indrelid = c.oid),
                      'triggers', (select string_agg(pg_get_triggerdef(t.oid), '; ' order by t.tgname) from pg_trigger t where t.tgrelid = c.oid and not t.tgisinternal),
                      'policies', (select count(*) from pg_policy p where p.polrelid = c.oid), 'rls', c.relrowsecurity)
                      order by c.relname)
               from pg_class c where c.relnamespace = n.oid) relations,
            (select jsonb_agg(p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') ' || md5(pg_get_functiondef(p.oid)) order by p.proname)
               from pg_proc p where p.pronamespace = n.oid
                -- the extensions erp-cloud needs (pgcrypto, postgres_fdw) are created, if absent, where PostgreSQL puts them
                and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')) functions
       from pg_namespace n
      where n.nspname not like 'pg\\_%' and n.nspname <> 'information_schema' and n.nspname <> all ($1::text[])
        and not exists (select from pg_depend d where d.objid = n.oid and d.deptype = 'e')
      order by n.nspname`, [ours]);
  const tables = await db.pool.query(
    `select format('%I.%I', n.nspname, c.relname) t from pg_class c join pg_namespace n on n.oid = c.relnamespace
      where c.relkind = 'r' and n.nspname in ('erp', 'public') order by 1`);
  const rows: Record<string, unknown> = {};
  for (const { t } of tables.rows as Array<{ t: string }>) {
    rows[t] = (await db.pool.query(`select coalesce(jsonb_agg(to_jsonb(x) order by to_jsonb(x)::text), '[]') r from ${t} x`)).rows[0].r;
  }
  return { catalog: catalog.rows, rows };
}

describe('erp-cloud migrate into the database of an ERP that has its own erp schema, migrations table and look-alike tables', () => {
  let before: unknown;
  let first: Awaited<ReturnType<typeof migrateWith>>;

  it('succeeds, and erp-cloud keeps its history in its own schema', async () => {
    before = await snapshotOfTheErp();
    first = await migrateWith(db);
    const files = loadMigrationFiles(migrationsDir);
    const history = await db.pool.query(`select name from erp_cloud.migration order by id`);
    expect(history.rows.map((r) => r.name)).toEqual(files.map((f) => f.name));
    for (const s of ['cloud', 'tax', 'scm', 'sso', 'vault']) {
      expect((await db.pool.query(`select count(*)::int n from pg_namespace where nspname = $1`, [s])).rows[0].n, s).toBe(1);
    }
  });

  it('touches none of the ERP\'s objects or rows: schema erp, its customer, public.migrations and the look-alike tables are as they were', async () => {
    expect(await snapshotOfTheErp()).toEqual(before);
  });

  it('the installation works there: a source registered, a document handed in through the contract, its invoice queued', async () => {
    await db.pool.query(`select tax.put_config(p_seller_tax_id => '339902999999789113', p_seller_name => '浙江诺诺网络科技', p_clerk => '张三')`);
    await db.pool.query(`select cloud.put_endpoint('nuonuo', 'http://127.0.0.1:9/open/v1/services', 'nuonuo', 'invoice_request')`);
    await db.pool.query(`select tax.put_source('their-erp', p_document_label => '结算单')`);
    const { rows } = await db.pool.query(`select tax.enqueue_invoices('their-erp', 'JS-1', $1) ids`, [JSON.stringify({
      kind: 'normal', buyer: { name: '华东机电', tax_id: '91330106MA2AYNWD8M' },
      lines: [{ line_no: 1, item_name: '软件服务', tax_code: '3040201030000000000', amount: 106, tax_rate: 0.06 }],
    })]);
    expect(rows[0].ids).toHaveLength(1);
    expect((await db.pool.query(`select count(*)::int n from cloud.outbox where operation = 'tax.issue'`)).rows[0].n).toBe(1);
    expect(await snapshotOfTheErp()).toEqual(before);
  });

  it('the foreign-shaped example installs beside the ERP\'s own erp schema', async () => {
    expect(await installExample(db, 'acme')).toEqual(['acme']);
    const { rows } = await db.pool.query(`select name from erp_cloud.example order by name`);
    expect(rows.map((r) => r.name)).toEqual(['acme']);
  });
});
