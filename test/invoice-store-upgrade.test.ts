/**
 * Migration 0018 on an installation that has been invoicing: a database migrated to 0017 with
 * live data (a settlement split into two invoices with their PDFs, a red invoice reversing one of
 * them, an invoice the platform refused, one whose PDF download is parked, and a shipment invoice
 * still waiting in the outbox) is migrated to 0018. The invoices, lines, PDFs and reversals keep
 * their ids and contents in tax.*, each document gets its tax.document row, the outbox names
 * tax.invoice, the waiting message is delivered by the upgraded installation, and the reference
 * ERP's reads and reversal inserts through the old names still work.
 */
import { copyFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { migrationFilesThrough } from './helpers/legacy-release.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';
import { approve, configureTax, customer, OATS, post, settlement, shipment, USCC_OK } from './helpers/invoicing.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { migrateWith } from './helpers/examples.js';

const APP_KEY = 'upgrade-app';
const APP_SECRET = randomBytes(12).toString('hex');
const REFUSED_BUYER = USCC_OK[3]!;
let db: TestDb;
let sim: NuonuoSim;
let listener: InProcessListener | null = null;
let dir17: string;

beforeAll(async () => {
  process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
  db = await createTestDb('invoice_store_upgrade', { template: null });
  dir17 = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-0017-'));
  for (const f of readdirSync(migrationsDir).filter((x) => x.endsWith('.sql')).sort().slice(0, 17)) {
    copyFileSync(path.join(migrationsDir, f), path.join(dir17, f));
  }
  sim = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 100 });
});
afterAll(async () => {
  await listener?.stop();
  await sim?.close();
  await db?.drop();
  if (dir17) rmSync(dir17, { recursive: true, force: true });
});

/** Before 0018: the invoices of a settlement or shipment, by the old table. */
const oldInvoicesOf = async (source: 'settlement' | 'shipment', id: number) =>
  (await db.pool.query(`select * from erp.ar_invoice where ${source}_id = $1 and invoice_type = 'blue' order by part_no`, [id])).rows;

/** Waits until every given invoice is final and has no message under way (the old names before 0018, the new ones after). */
async function settledIds(ids: string[], table: string, aggregateType: string) {
  return waitFor(async () => {
    const { rows } = await db.pool.query(`select count(*)::int n from ${table} where id = any ($1::bigint[]) and invoice_status in ('pending', 'issuing')`, [ids]);
    if (rows[0].n !== 0) return null;
    const { rows: open } = await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_type = $2
        and aggregate_id = any ($1::text[]) and status in ('pending', 'in_flight')`, [ids, aggregateType]);
    return open[0].n === 0 ? true : null;
  }, { timeoutMs: 30_000, intervalMs: 100, what: `invoices ${ids.join(', ')} to settle` });
}

const snapshot = {
  invoices: `select id, settlement_id, shipment_id, original_invoice_id, part_no, part_count, invoice_type, invoice_kind, invoice_status,
                    invoice_no, order_no, request_id, buyer_name, buyer_tax_id, amount_incl_tax, error_code, tax_cloud_response
               from erp.ar_invoice order by id`,
  linesBefore: `select id, ar_invoice_id, line_no, source_line_no, item_name, amount_excl_tax, tax_amount, amount_incl_tax from erp.ar_invoice_line order by id`,
  linesAfter: `select id, invoice_id as ar_invoice_id, line_no, source_line_no, item_name, amount_excl_tax, tax_amount, amount_incl_tax from tax.invoice_line order by id`,
  pdfsBefore: `select id, doc_id as invoice_id, file_name, content_type, sha256, byte_size, encode(sha256(content), 'hex') as content_sha256, source_url, created_at
                 from erp.attachment order by id`,
  pdfsAfter: `select id, invoice_id, file_name, content_type, sha256, byte_size, encode(sha256(content), 'hex') as content_sha256, source_url, created_at
                from tax.attachment order by id`,
  // 0019 names the reasons (Nuonuo's digits 1–4 become return, error, service_stopped, allowance)
  reversalsBefore: `select id, ar_invoice_id as invoice_id,
                           case reason when '1' then 'return' when '2' then 'error' when '3' then 'service_stopped' when '4' then 'allowance' end as reason, line_nos, status, bill_id, bill_status, red_invoice_id, requested_at from erp.invoice_reversal_request order by id`,
  reversalsAfter: `select id, invoice_id, reason, line_nos, status, bill_id, bill_status, red_invoice_id, requested_at from tax.reversal order by id`,
  outbox: `select request_id, operation, status, aggregate_type, aggregate_id, attempts from cloud.outbox order by request_id`,
  events: `select count(*)::int n from tax.invoice_event`,
};

describe('an installation that has been invoicing, upgraded to 0018', () => {
  const before: Record<string, unknown[]> = {};
  const ids: Record<string, string> = {};
  let split: { id: number; no: string };
  let refused: { id: number; no: string };
  let parked: { id: number; no: string };
  let ship: { id: number; no: string };
  let cust: number;

  beforeAll(async () => {
    await migrateWith(db, dir17);
    await configureTax(db.pool, sim.url, APP_KEY, { maxAmount: 100 });
    await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', '{}')`);
    listener = await startListener(db.url);

    // a settlement split into two invoices, both issued with their PDFs
    cust = await customer(db.pool, { email: 'ap@example.com' });
    split = await settlement(db.pool, cust, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 90.4 }, { item: '软件维护', amount: 63.6 }]);
    await approve(db.pool, split.id);
    const parts = await waitFor(async () => {
      const rows = await oldInvoicesOf('settlement', split.id);
      return rows.length === 2 ? rows : null;
    }, { timeoutMs: 10_000, intervalMs: 50, what: 'the two invoices of the split settlement' });
    ids.part1 = parts[0].id;
    ids.part2 = parts[1].id;
    await settledIds([ids.part1, ids.part2], 'erp.ar_invoice', 'erp.ar_invoice');

    // a red invoice reversing the first part, issued
    const { rows: q } = await db.pool.query(`insert into erp.invoice_reversal_request (ar_invoice_id, reason) values ($1, '2') returning id`, [ids.part1]);
    ids.reversal = q[0].id;
    ids.red = await waitFor(async () => (await db.pool.query(`select red_invoice_id from erp.invoice_reversal_request where id = $1 and status = 'issued'`,
      [ids.reversal])).rows[0]?.red_invoice_id, { timeoutMs: 30_000, intervalMs: 100, what: 'the red invoice' });
    await settledIds([ids.red!], 'erp.ar_invoice', 'erp.ar_invoice');

    // an invoice the platform refused (22)
    sim.configure({ rejectBuyers: { [REFUSED_BUYER]: '购买方纳税人识别号在税务局登记信息中不存在' } });
    refused = await settlement(db.pool, await customer(db.pool, { taxId: REFUSED_BUYER }), [{ item: '软件维护', amount: 53 }]);
    await approve(db.pool, refused.id);
    ids.refused = (await waitFor(async () => (await oldInvoicesOf('settlement', refused.id))[0], { timeoutMs: 10_000, intervalMs: 50 })).id;
    await settledIds([ids.refused], 'erp.ar_invoice', 'erp.ar_invoice');
    sim.configure({ rejectBuyers: {} });

    // an issued invoice whose PDF download is parked (the answer was not a PDF: a permanent failure)
    sim.configure({ pdfUrlOverride: `${sim.url}/__nuonuo/invoices` });
    parked = await settlement(db.pool, cust, [{ item: '软件维护', amount: 21.2 }]);
    await approve(db.pool, parked.id);
    ids.parked = (await waitFor(async () => (await oldInvoicesOf('settlement', parked.id))[0], { timeoutMs: 10_000, intervalMs: 50 })).id;
    await settledIds([ids.parked], 'erp.ar_invoice', 'erp.ar_invoice');
    sim.configure({ pdfUrlOverride: null });

    // the listener stops; a shipment invoice waits in the outbox across the upgrade
    await listener.stop();
    listener = null;
    ship = await shipment(db.pool, await customer(db.pool, { invoiceOn: 'shipment', taxId: USCC_OK[1] }), [{ item: '软件维护', amount: 31.8 }]);
    await post(db.pool, ship.id);
    ids.shipment = (await oldInvoicesOf('shipment', ship.id))[0].id;

    before.invoices = (await db.pool.query(snapshot.invoices)).rows;
    before.lines = (await db.pool.query(snapshot.linesBefore)).rows;
    before.pdfs = (await db.pool.query(snapshot.pdfsBefore)).rows;
    before.reversals = (await db.pool.query(snapshot.reversalsBefore)).rows;
    before.outbox = (await db.pool.query(snapshot.outbox)).rows;
    before.events = (await db.pool.query(snapshot.events)).rows;

    const through22 = migrationFilesThrough(migrationsDir, 22); // up to 0022: 0023 makes the reference ERP an example
    try {
      await migrateWith(db, through22.dir);
    } finally {
      through22.remove();
    }
  }, 120_000);

  it('the live data is what this test meant to build before the upgrade', () => {
    const inv = before.invoices as Array<Record<string, unknown>>;
    expect(inv.map((r) => [r.invoice_type, r.invoice_status, r.error_code])).toEqual([
      ['blue', 'reversed', null], ['blue', 'issued', null], ['red', 'issued', null], ['blue', 'failed', 'nuonuo_22'],
      ['blue', 'issued', 'pdf_download'], ['blue', 'pending', null],
    ]);
    expect(before.pdfs).toHaveLength(3); // the two parts and the red invoice
    const statuses = (before.outbox as Array<{ status: string; operation: string }>).map((m) => `${m.operation}:${m.status}`);
    expect(statuses).toContain('tax.download_pdf:failed');
    expect(statuses).toContain('tax.issue:pending');
    expect((before.outbox as Array<{ aggregate_type: string }>).every((m) => m.aggregate_type === 'erp.ar_invoice')).toBe(true);
  });

  it('keeps every invoice, line, PDF and reversal with its id and content, now in schema tax', async () => {
    // the compatibility view gives the old rows back exactly, settlement_id / shipment_id included
    expect((await db.pool.query(snapshot.invoices)).rows).toEqual(before.invoices);
    expect((await db.pool.query(`select count(*)::int n from tax.invoice`)).rows[0].n).toBe(before.invoices!.length);
    expect((await db.pool.query(snapshot.linesAfter)).rows).toEqual(before.lines);
    expect((await db.pool.query(snapshot.pdfsAfter)).rows).toEqual(before.pdfs);
    for (const p of before.pdfs as Array<{ sha256: string; content_sha256: string }>) expect(p.content_sha256).toBe(p.sha256);
    expect((await db.pool.query(snapshot.reversalsAfter)).rows).toEqual(before.reversals);
    expect((await db.pool.query(snapshot.events)).rows).toEqual(before.events);
    // the old tables are gone: erp.attachment is the ERP's own again (empty), the others are views
    expect((await db.pool.query(`select count(*)::int n from erp.attachment`)).rows[0].n).toBe(0);
    const kinds = (await db.pool.query(`select c.relname, c.relkind from pg_class c
        where c.relnamespace = 'erp'::regnamespace and c.relname in ('ar_invoice', 'ar_invoice_line', 'invoice_reversal_request', 'attachment') order by 1`)).rows;
    expect(kinds).toEqual([{ relname: 'ar_invoice', relkind: 'v' }, { relname: 'ar_invoice_line', relkind: 'v' },
      { relname: 'attachment', relkind: 'r' }, { relname: 'invoice_reversal_request', relkind: 'v' }]);
  });

  it('gives each invoiced settlement and shipment its tax.document, and each invoice its document or reversal and its buyer', async () => {
    const { rows: docs } = await db.pool.query(`select id, source, reference, kind, remark, doc, doc_sha256 = encode(sha256(doc::text::bytea), 'hex') as sha_ok
                                                  from tax.document order by id`);
    expect(docs.map((d) => [d.source, d.reference, d.kind, d.remark, d.sha_ok])).toEqual([
      ['reference-erp', `settlement/${split.no}`, 'normal', split.no, true],
      ['reference-erp', `settlement/${refused.no}`, 'normal', refused.no, true],
      ['reference-erp', `settlement/${parked.no}`, 'normal', parked.no, true],
      ['reference-erp', `shipment/${ship.no}`, 'normal', ship.no, true],
    ]);
    expect(docs[0].doc).toMatchObject({
      kind: 'normal', remark: split.no,
      buyer: { name: '华东机电有限公司', tax_id: USCC_OK[0], email: 'ap@example.com', bank_name: '工商银行杭州分行', tax_id_check_override: false },
      lines: [{ line_no: 1, item_name: '燕麦', tax_code: OATS, amount: 90.4, tax_rate: 0.13 }, { line_no: 2, item_name: '软件维护', amount: 63.6 }],
    });
    const { rows: inv } = await db.pool.query(`select i.id, i.invoice_type, d.reference, i.reversal_id, i.buyer_email, i.buyer_address, i.buyer_account
                                                 from tax.invoice i left join tax.document d on d.id = i.document_id order by i.id`);
    expect(inv.map((r) => [r.id, r.reference, r.reversal_id])).toEqual([
      [ids.part1, `settlement/${split.no}`, null], [ids.part2, `settlement/${split.no}`, null], [ids.red, null, ids.reversal],
      [ids.refused, `settlement/${refused.no}`, null], [ids.parked, `settlement/${parked.no}`, null], [ids.shipment, `shipment/${ship.no}`, null],
    ]);
    expect(inv[0]).toMatchObject({ buyer_email: 'ap@example.com', buyer_address: '杭州市西湖区文三路 1 号', buyer_account: '1202020209900000001' });
    expect(inv[2]).toMatchObject({ buyer_email: 'ap@example.com' }); // the red one: its original's buyer
  });

  it('rewrites the aggregate type of every outbox message about an invoice, whatever its status, and nothing else', async () => {
    const after = (await db.pool.query(snapshot.outbox)).rows;
    expect(after).toEqual((before.outbox as Array<Record<string, unknown>>).map((m) => ({ ...m, aggregate_type: 'tax.invoice' })));
  });

  it('delivers the message that waited across the upgrade, and keeps issuing and reversing under the new names, never issuing a known document twice', async () => {
    listener = await startListener(db.url);
    await settledIds([ids.shipment!], 'tax.invoice', 'tax.invoice');
    const shipped = (await db.pool.query(`select invoice_status, invoice_no from tax.invoice where id = $1`, [ids.shipment])).rows[0];
    expect(shipped.invoice_status).toBe('issued');
    expect(shipped.invoice_no).toMatch(/^\d{20}$/);
    const pdf = (await db.pool.query(`select sha256, encode(sha256(content), 'hex') as actual from tax.attachment where invoice_id = $1`, [ids.shipment])).rows;
    expect(pdf).toHaveLength(1);
    expect(pdf[0].actual).toBe(pdf[0].sha256);
    expect(sim.invoices().filter((i) => i.orderNo === (before.invoices as Array<{ id: string; order_no: string }>).find((r) => r.id === ids.shipment)!.order_no))
      .toHaveLength(1);

    // the reference ERP still asks for a reversal through its old name, as its own role
    const client = await db.pool.connect();
    let reversalId: string;
    try {
      await client.query('set role erp_cloud_app');
      reversalId = (await client.query(`insert into erp.invoice_reversal_request (ar_invoice_id, reason, line_nos) values ($1, '2', '{1}') returning id`,
        [ids.part2])).rows[0].id;
      await client.query('reset role');
    } finally {
      client.release();
    }
    const red = await waitFor(async () => (await db.pool.query(`select red_invoice_id from tax.reversal where id = $1 and status = 'issued'`, [reversalId]))
      .rows[0]?.red_invoice_id as string | undefined, { timeoutMs: 30_000, intervalMs: 100, what: 'the red invoice of the second part' });
    expect(Number(red)).toBeGreaterThan(Math.max(...(before.invoices as Array<{ id: string }>).map((r) => Number(r.id))));
    expect(Number(reversalId)).toBeGreaterThan(Number(ids.reversal));
    expect((await db.pool.query(`select reversal_id, original_invoice_id from tax.invoice where id = $1`, [red])).rows[0])
      .toEqual({ reversal_id: reversalId, original_invoice_id: ids.part2 });
    await settledIds([red], 'tax.invoice', 'tax.invoice');
    expect((await db.pool.query(`select invoice_status from tax.invoice where id = $1`, [ids.part2])).rows[0].invoice_status).toBe('reversed');

    // approving the split settlement again (after a step back to draft) issues nothing: its document is known
    await db.pool.query(`update erp.settlement set status = 'draft' where id = $1`, [split.id]);
    await approve(db.pool, split.id);
    expect((await db.pool.query(`select count(*)::int n from tax.document`)).rows[0].n).toBe(4);
    expect((await db.pool.query(`select count(*)::int n from tax.invoice where invoice_type = 'blue'`)).rows[0].n).toBe(5);
  }, 90_000);
});
