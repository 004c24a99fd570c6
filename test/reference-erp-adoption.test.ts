/**
 * Migration 0023: the reference ERP leaves the product and becomes the example sql/examples/reference-erp.
 * A database migrated file by file from nothing has no schema erp and no reference-erp source (the example is
 * installed only when asked for). An installation that had the reference ERP (migrated to 0021 with its
 * customers, an invoiced settlement, suppliers and a published purchase order) keeps every row and id, gets the
 * example recorded as installed by that same migration, and its ERP still issues an invoice when a settlement is
 * approved and publishes a purchase order when one is approved, now through the contracts only.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';
import { installExample, migrateWith } from './helpers/examples.js';
import { approve, configureTax, customer, OATS, settlement } from './helpers/invoicing.js';
import { migrationFilesThrough } from './helpers/legacy-release.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { addPo, addSuppliers, setupYonbip } from './helpers/scm.js';

const APP_KEY = 'adoption-app';
const APP_SECRET = randomBytes(12).toString('hex');

const q = async (db: TestDb, sql: string, params: unknown[] = []) => (await db.pool.query(sql, params)).rows;

describe('a fresh database migrated file by file', () => {
  let db: TestDb;
  beforeAll(async () => {
    db = await createTestDb('reference_erp_fresh', { template: null });
  });
  afterAll(() => db?.drop());

  it('has no schema erp and no reference-erp source: the reference ERP is an example, installed only when asked for', async () => {
    const applied = (await migrateWith(db, migrationsDir)).applied;
    expect(applied).toContain('0023_reference_erp_leaves_the_product.sql');
    expect(await q(db, `select nspname from pg_namespace where nspname = 'erp'`)).toEqual([]);
    expect(await q(db, `select name from tax.source where name = 'reference-erp' union all select name from scm.source where name = 'reference-erp'`)).toEqual([]);
    expect(await q(db, `select to_regclass('erp_cloud.example')::text as t`)).toEqual([{ t: null }]); // no example was ever installed
    // asked for, it is there, registered through the contracts and recorded
    expect(await installExample(db, 'reference-erp')).toEqual(['reference-erp']);
    expect(await q(db, `select name from erp_cloud.example`)).toEqual([{ name: 'reference-erp' }]);
    expect(await q(db, `select refresh_buyer::text from tax.source where name = 'reference-erp'`)).toEqual([{ refresh_buyer: 'erp.buyer_of(text)' }]);
    expect(await q(db, `select on_order::text from scm.source where name = 'reference-erp'`)).toEqual([{ on_order: 'erp.on_order(scm.order_result)' }]);
    expect(await q(db, `select nspowner::regrole::text as owner from pg_namespace where nspname = 'erp'`)).toEqual([{ owner: 'erp_example_owner' }]);
  });
});

describe('an installation that had the reference ERP, upgraded past 0023', () => {
  let db: TestDb;
  let nuonuo: NuonuoSim;
  let yonbip: YonbipSim;
  let listener: InProcessListener | null = null;
  const before: Record<string, unknown[]> = {};
  let invoiced: { id: number; no: string };
  let suppliers: { s1: number; s2: number };

  beforeAll(async () => {
    process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
    db = await createTestDb('reference_erp_upgrade', { template: null });
    nuonuo = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 50 });
    yonbip = await startYonbipSim();
    const through21 = migrationFilesThrough(migrationsDir, 21);
    try {
      await migrateWith(db, through21.dir);
    } finally {
      through21.remove();
    }
    await configureTax(db.pool, nuonuo.url, APP_KEY);
    await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', '{}')`);
    await setupYonbip(db.pool, yonbip);
    // the ERP's data before the upgrade: an invoiced settlement, suppliers, a PO handed to procurement
    const cust = await customer(db.pool, { email: 'ap@example.com' });
    invoiced = await settlement(db.pool, cust, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 113 }]);
    await approve(db.pool, invoiced.id);
    suppliers = await addSuppliers(db.pool);
    await addPo(db.pool, 'PO-BEFORE', suppliers.s1);
    for (const t of ['customer', 'settlement', 'settlement_line', 'supplier', 'purchase_order', 'purchase_order_line']) {
      before[t] = await q(db, `select * from erp.${t} order by id`);
    }
    before.invoices = await q(db, `select source, reference, invoice_id, status from tax.invoice_status order by invoice_id`);
    before.orders = await q(db, `select source, reference, order_id, po_no from scm.order_status order by order_id`);
    expect((await migrateWith(db, migrationsDir)).applied).toContain('0023_reference_erp_leaves_the_product.sql');
  }, 120_000);
  afterAll(async () => {
    await listener?.stop();
    await nuonuo?.close();
    await yonbip?.close();
    await db?.drop();
  });

  it('keeps every row and id of the ERP\'s tables and what erp-cloud holds for them', async () => {
    expect((before.settlement as unknown[]).length).toBe(1);
    expect((before.purchase_order as unknown[]).length).toBe(1);
    for (const t of ['customer', 'settlement', 'settlement_line', 'supplier', 'purchase_order', 'purchase_order_line']) {
      expect(await q(db, `select * from erp.${t} order by id`), t).toEqual(before[t]);
    }
    expect(await q(db, `select source, reference, invoice_id, status from tax.invoice_status order by invoice_id`)).toEqual(before.invoices);
    expect(await q(db, `select source, reference, order_id, po_no from scm.order_status order by order_id`)).toEqual(before.orders);
  });

  it('records the example as installed, owned by its own role and registered through put_source; no product function names erp', async () => {
    expect(await q(db, `select name from erp_cloud.example`)).toEqual([{ name: 'reference-erp' }]);
    expect(await q(db, `select distinct relowner::regrole::text as owner from pg_class where relnamespace = 'erp'::regnamespace and relkind = 'r'`))
      .toEqual([{ owner: 'erp_example_owner' }]);
    expect(await q(db, `select refresh_buyer::text from tax.source where name = 'reference-erp'`)).toEqual([{ refresh_buyer: 'erp.buyer_of(text)' }]);
    expect(await q(db, `select on_order::text from scm.source where name = 'reference-erp'`)).toEqual([{ on_order: 'erp.on_order(scm.order_result)' }]);
    expect(await q(db, `select p.oid::regprocedure::text fn from pg_proc p where p.pronamespace::regnamespace::text in ('cloud', 'tax', 'scm', 'sso', 'vault')
                          and p.prosrc ~* '(^|[^a-z0-9_."])erp[.]'`)).toEqual([]);
    expect(await q(db, `select c.relname from pg_class c where c.relnamespace = 'erp'::regnamespace and c.relkind = 'v'`)).toEqual([]);
    // the ERP's tables are the ERP application's and the operators' to read, no other product role's (the portal reads scm.order_status)
    expect(await q(db, `select r.rolname from pg_roles r where r.rolname in ('erp_cloud_listener', 'erp_cloud_sso', 'erp_cloud_supplier_portal')
                          and (has_schema_privilege(r.oid, 'erp', 'usage') or exists (select from pg_class c where c.relnamespace = 'erp'::regnamespace
                                and c.relkind = 'r' and has_table_privilege(r.oid, c.oid, 'select, insert, update, delete')))`)).toEqual([]);
    expect(await q(db, `select p.oid::regprocedure::text fn from pg_proc p where p.pronamespace = 'erp'::regnamespace
                          and (has_function_privilege('erp_cloud_app', p.oid, 'execute') and not pg_has_role('erp_cloud_app', p.proowner, 'member'))`)).toEqual([]);
    // migrating again changes nothing: the example is recorded with this file
    expect((await migrateWith(db, migrationsDir)).applied).toEqual([]);
  });

  it('still issues an invoice when a settlement is approved, and publishes a purchase order when one is approved', async () => {
    listener = await startListener(db.url);
    const cust = Number((before.customer as Array<{ id: string }>)[0]!.id);
    const s = await settlement(db.pool, cust, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 226 }]);
    await approve(db.pool, s.id);
    const issued = await waitFor(async () => (await q(db, `select status, invoice_no from tax.invoice_status where source = 'reference-erp' and reference = $1`,
      [`settlement/${s.no}`])).find((r) => r.status === 'issued'), { timeoutMs: 30_000, intervalMs: 100, what: 'the invoice of the settlement approved after the upgrade' });
    expect(issued.invoice_no).toMatch(/^\d{20}$/);
    // approving the invoiced settlement again issues nothing more
    await db.pool.query(`update erp.settlement set status = 'draft' where id = $1`, [invoiced.id]);
    await approve(db.pool, invoiced.id);
    expect(await q(db, `select count(*)::int n from tax.invoice_status where source = 'reference-erp' and reference = $1`, [`settlement/${invoiced.no}`]))
      .toEqual([{ n: 1 }]);

    const id = await addPo(db.pool, 'PO-AFTER', suppliers.s2);
    const po = await waitFor(async () => (await q(db, `select cloud_status, cloud_ref from erp.purchase_order where id = $1`, [id]))
      .find((r) => r.cloud_status === 'published'), { timeoutMs: 30_000, intervalMs: 100, what: 'the PO approved after the upgrade, published' });
    expect(po.cloud_ref).toBeTruthy();
    expect(await q(db, `select source, po_no, supplier_code from scm.order_status where reference = 'PO-AFTER'`))
      .toEqual([{ source: 'reference-erp', po_no: 'PO-AFTER', supplier_code: 'S002' }]);
  }, 90_000);
});
