/**
 * From an approved settlement to an issued 数电 invoice with its PDF attached,
 * through the listener and the Nuonuo simulator over real HTTP: submit →
 * query (backing off) → issued write-back → PDF download → attachment; the
 * platform failing an invoice; faults during submit and query; E9106; SSRF;
 * red-letter reversal; the callback as a hint.
 */
import { createHash, randomBytes } from 'node:crypto';
import { PDFDocument } from 'pdf-lib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { startInboundServer } from '../listener/inbound/inbound-server.js';
import '../listener/inbound/routes.js';
import { createLogger } from '../listener/kernel/logger.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { createTestDb, sqlstateOf, waitFor, type TestDb } from './helpers/db.js';
import { approve, configureTax, customer, invoicesOf, OATS, requestReversal, settlement, USCC_OK } from './helpers/invoicing.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

const APP_KEY = 'flow-app';
const APP_SECRET = randomBytes(12).toString('hex');
let db: TestDb;
let sim: NuonuoSim;
let listener: InProcessListener;

beforeAll(async () => {
  process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
  db = await createTestDb('invoicing_flow');
  sim = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 300 });
  await configureTax(db.pool, sim.url, APP_KEY);
  listener = await startListener(db.url);
});
afterAll(async () => {
  await listener.stop();
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  sim.setFaults(null);
  sim.configure({ pdfUrlOverride: null, pdfRedirectTo: null, rejectBuyers: {}, issueDelayMs: 300, signFailBuyers: [], redAwaitBuyer: false });
  await configureTax(db.pool, sim.url, APP_KEY);
  await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', '{}')`);
});

async function settled(settlementId: number, n = 1, source: 'settlement' | 'shipment' = 'settlement') {
  return waitFor(async () => {
    const rows = await invoicesOf(db.pool, settlementId, source);
    if (rows.length !== n || rows.some((r) => r.invoice_status === 'pending' || r.invoice_status === 'issuing')) return null;
    // the PDF step runs after the issued write-back: wait for it to finish too
    const { rows: open } = await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_type = 'tax.invoice'
        and aggregate_id = any ($1::text[]) and status in ('pending', 'in_flight')`, [rows.map((r) => r.id)]);
    // read the invoices again: the last step may have written them back between the two queries above
    return open[0].n === 0 ? invoicesOf(db.pool, settlementId, source) : null;
  }, { timeoutMs: 30_000, intervalMs: 100, what: `invoices of ${source} ${settlementId} to settle` });
}

async function attachmentOf(invoiceId: string) {
  const { rows } = await db.pool.query(`select * from tax.attachment where invoice_id = $1`, [invoiceId]);
  return rows;
}

const simInvoicesFor = (orderNo: string) => sim.invoices().filter((i) => i.orderNo === orderNo);

describe('an approved settlement', () => {
  it('yields exactly one issued invoice with the right totals, its number and raw response written back, and its PDF attached', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [
      { item: '燕麦', code: OATS, rate: 0.13, qty: 10, price: 11.3, amount: 113 },
      { item: '软件维护', rate: 0.06, amount: 100.01 },
    ]);
    await approve(db.pool, s.id);
    const [inv, ...more] = await settled(s.id);
    expect(more).toHaveLength(0);
    expect(inv).toMatchObject({ invoice_status: 'issued', amount_excl_tax: '194.35', tax_amount: '18.66', amount_incl_tax: '213.01', error_code: null });
    expect(inv!.invoice_no).toMatch(/^\d{20}$/);
    expect(inv!.invoice_date).toBeInstanceOf(Date);
    const raw = inv!.tax_cloud_response as { submit: { code: string; result: { invoiceSerialNum: string } }; query: { result: Array<Record<string, unknown>> } };
    expect(raw.submit.code).toBe('E0000');
    expect(raw.query.result[0]).toMatchObject({ status: '2', allElectronicInvoiceNumber: inv!.invoice_no, orderNo: inv!.order_no, exTaxAmount: '194.35', taxAmount: '18.66' });
    const row = await db.pool.query(`select invoice_serial_no, pdf_url, ofd_url, xml_url from tax.invoice where id = $1`, [inv!.id]);
    expect(row.rows[0].invoice_serial_no).toBe(raw.submit.result.invoiceSerialNum);
    expect(row.rows[0].ofd_url).toMatch(/\.ofd$/); // OFD is the legal original: its URL is kept

    // the simulator issued it once
    const issued = simInvoicesFor(inv!.order_no);
    expect(issued).toHaveLength(1);
    expect(issued[0]).toMatchObject({ status: '2', invoiceNo: inv!.invoice_no, submits: 1 });

    const [att, ...moreAtt] = await attachmentOf(inv!.id);
    expect(moreAtt).toHaveLength(0);
    const pdf: Buffer = att.content;
    expect(att).toMatchObject({ content_type: 'application/pdf', file_name: `${inv!.invoice_no}.pdf`, byte_size: pdf.length, source_url: row.rows[0].pdf_url });
    expect(pdf.subarray(0, 5).toString('latin1')).toBe('%PDF-');
    expect(att.sha256).toBe(createHash('sha256').update(pdf).digest('hex'));
    expect(pdf.equals(sim.pdfOf(inv!.invoice_no)!)).toBe(true);
    const doc = await PDFDocument.load(pdf);
    expect(doc.getTitle()).toBe(`Invoice ${inv!.invoice_no}`);
    expect(doc.getPageCount()).toBe(1);

    // the event log has the number's arrival
    const ev = await db.pool.query(`select old_invoice_no, new_invoice_no, invoice_status from tax.invoice_event where invoice_id = $1`, [inv!.id]);
    expect(ev.rows).toEqual([{ old_invoice_no: null, new_invoice_no: inv!.invoice_no, invoice_status: 'issued' }]);
    // the PDF's bytes live in the attachment, not in the outbox
    const ob = await db.pool.query(`select response from cloud.outbox where operation = 'tax.download_pdf' and aggregate_id = $1`, [inv!.id]);
    expect(ob.rows[0].response).not.toHaveProperty('content_base64');
    // the chain: issue, at least one query, the download
    const ops = await db.pool.query(`select operation, count(*)::int n from cloud.outbox where aggregate_id = $1 group by 1 order by 1`, [inv!.id]);
    expect(ops.rows.map((r) => r.operation)).toEqual(['tax.download_pdf', 'tax.issue', 'tax.query']);
  });

  it('split into several invoices issues each once', async () => {
    await configureTax(db.pool, sim.url, APP_KEY, { maxLines: 1 });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '服务一', amount: 10.6 }, { item: '服务二', amount: 21.2 }, { item: '服务三', amount: 31.8 }]);
    await approve(db.pool, s.id);
    const invs = await settled(s.id, 3);
    expect(invs.map((i) => i.invoice_status)).toEqual(['issued', 'issued', 'issued']);
    expect(new Set(invs.map((i) => i.invoice_no)).size).toBe(3);
    for (const i of invs) {
      expect(simInvoicesFor(i.order_no)).toHaveLength(1);
      expect(await attachmentOf(i.id)).toHaveLength(1);
    }
  });

  it('of 300 lines of 1.00 at 13% is split so the platform, which refuses an invoice over the 1.27 tolerance, issues every part', async () => {
    await configureTax(db.pool, sim.url, APP_KEY, { maxLines: 2000 });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, Array.from({ length: 300 }, (_, i) => ({ item: `配件${i + 1}`, code: OATS, rate: 0.13, amount: '1.00', qty: '1.0000000000', price: '1.0000000000' })));
    await approve(db.pool, s.id);
    const invs = await settled(s.id, 2);
    expect(invs.map((i) => [i.invoice_status, i.error_code])).toEqual([['issued', null], ['issued', null]]);
    expect(invs.reduce((sum, i) => sum + Math.round(Number(i.amount_incl_tax) * 100), 0)).toBe(300_00);
    // the platform's own totals agree, one invoice per orderNo
    const platform = invs.flatMap((i) => simInvoicesFor(i.order_no));
    expect(platform).toHaveLength(2);
    expect(platform.reduce((sum, p) => sum + Math.round(Number(p.orderAmount) * 100), 0)).toBe(300_00);
  });

  it('for a customer invoiced on shipment is issued on posting through the cloud, not on approval', async () => {
    const c = await customer(db.pool, { invoiceOn: 'shipment' });
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 53 }]);
    await approve(db.pool, s.id);
    const { rows } = await db.pool.query(`insert into erp.shipment (shipment_no, customer_id, settlement_id) values ($1, $2, $3) returning id`, [`CK-${s.no}`, c, s.id]);
    await db.pool.query(`insert into erp.shipment_line (shipment_id, line_no, item_name, tax_code, amount, tax_rate) values ($1, 1, '软件维护', '3040201030000000000', 53, 0.06)`, [rows[0].id]);
    await db.pool.query(`update erp.shipment set status = 'posted' where id = $1`, [rows[0].id]);
    const [inv] = await settled(Number(rows[0].id), 1, 'shipment');
    expect(inv!.invoice_status).toBe('issued');
    expect(await invoicesOf(db.pool, s.id)).toHaveLength(0);
  });
});

describe('when the cloud fails', () => {
  it('an invoice the platform fails (22) is marked failed with the reason and is not queried again', async () => {
    const buyer = USCC_OK[2]!;
    sim.configure({ rejectBuyers: { [buyer]: '购买方纳税人识别号在税务局登记信息中不存在' } });
    const c = await customer(db.pool, { taxId: buyer });
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'failed', error_code: 'nuonuo_22', error_message: '购买方纳税人识别号在税务局登记信息中不存在', invoice_no: null });
    const queries = async () => (await db.pool.query(`select count(*)::int n from cloud.outbox where operation = 'tax.query' and aggregate_id = $1`, [inv!.id])).rows[0].n;
    const n = await queries();
    await new Promise((r) => setTimeout(r, 600)); // longer than the poll interval: no further query appears
    expect(await queries()).toBe(n);
    expect(await attachmentOf(inv!.id)).toHaveLength(0);
    expect(simInvoicesFor(inv!.order_no)).toMatchObject([{ status: '22' }]);

    // the clerk corrects the buyer's tax id; the operator issues it again under a new orderNo
    await db.pool.query(`update erp.customer set tax_id = $1 where id = $2`, [USCC_OK[3], c]);
    await db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id]);
    const [again] = await settled(s.id);
    expect(again).toMatchObject({ id: inv!.id, invoice_status: 'issued', error_code: null });
    expect(again!.order_no).not.toBe(inv!.order_no);
    expect((again!.tax_cloud_response as { previous: { query: unknown } }).previous.query).toBeTruthy();
    expect(simInvoicesFor(again!.order_no)).toMatchObject([{ status: '2', buyerTaxNum: USCC_OK[3] }]);
    // an issued invoice cannot be re-issued
    expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id]))).toBe(SqlState.invoiceReissueRefused);
  });

  it('timeouts and 5xx during submit and query still give exactly one invoice in the simulator', async () => {
    await configureTax(db.pool, sim.url, APP_KEY, { timeoutMs: 1500 });
    // gateway faults in arrival order: submit times out, then 503, then goes through; the first query 500s, the next times out
    sim.setFaults({ pathPrefix: '/open/v1/services', schedule: [{ kind: 'timeout', ms: 5000 }, { kind: 'status', status: 503 }, { kind: 'ok' },
      { kind: 'status', status: 500 }, { kind: 'timeout', ms: 5000 }] });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 212 }]);
    await approve(db.pool, s.id);
    const [inv] = await settled(s.id);
    expect(inv!.invoice_status).toBe('issued');
    expect(simInvoicesFor(inv!.order_no)).toHaveLength(1);
    const log = await db.pool.query(`select l.operation, l.outcome, l.error_class from cloud.log l join cloud.outbox o using (request_id)
                                      where o.aggregate_id = $1 and l.outcome <> 'ok' order by l.started_at`, [inv!.id]);
    expect(log.rows.map((r) => `${r.operation} ${r.error_class}`)).toEqual(['tax.issue timeout', 'tax.issue http_503', 'tax.query http_500', 'tax.query timeout']);
    expect(await attachmentOf(inv!.id)).toHaveLength(1);
  });

  it('a submit whose answer is lost (the platform issued it) is reconciled through E9106 and a query by orderNo', async () => {
    // the retry comes well after the platform finished the first submit
    await configureTax(db.pool, sim.url, APP_KEY, { timeoutMs: 1000, backoffBaseMs: 3000 });
    // the platform takes the order but answers after the client gave up
    sim.setFaults({ pathPrefix: '/open/v1/services', schedule: [{ kind: 'slow', ms: 2000 }] });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 318 }]);
    await approve(db.pool, s.id);
    const [inv] = await settled(s.id);
    expect(inv!.invoice_status).toBe('issued');
    const [one, ...none] = simInvoicesFor(inv!.order_no);
    expect(none).toHaveLength(0);
    expect(one!.submits).toBe(2); // the retry reached the platform and was refused as a duplicate
    const raw = inv!.tax_cloud_response as { submit: { code: string; duplicate: boolean } };
    expect(raw.submit).toMatchObject({ code: 'E9106', duplicate: true });
    const q = await db.pool.query(`select payload from cloud.outbox where operation = 'tax.query' and aggregate_id = $1 order by id limit 1`, [inv!.id]);
    expect(q.rows[0].payload).toEqual({ orderNos: [inv!.order_no], isOfferInvoiceDetail: '0' });
  });

  it('a wrong app secret is refused by the platform (070601): the invoice fails with that code, nothing is issued', async () => {
    process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = 'not-the-secret';
    try {
      const c = await customer(db.pool);
      const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 424 }]);
      await approve(db.pool, s.id);
      const [inv] = await settled(s.id);
      expect(inv).toMatchObject({ invoice_status: 'failed', error_code: '070601' });
      expect(simInvoicesFor(inv!.order_no)).toHaveLength(0);
    } finally {
      process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
    }
  });

  it('a reissued invoice cannot be submitted again under its old orderNo: the old submit is retired, and a late answer about it changes nothing', async () => {
    process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = 'not-the-secret';
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 530 }]);
    let refused;
    try {
      await approve(db.pool, s.id);
      [refused] = await settled(s.id);
    } finally {
      process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
    }
    expect(refused).toMatchObject({ invoice_status: 'failed', error_code: '070601' });
    const old = (await db.pool.query(`select to_jsonb(o) m from cloud.outbox o where operation = 'tax.issue' and aggregate_id = $1`, [refused!.id])).rows[0].m;
    expect(old.status).toBe('failed');
    await db.pool.query(`select tax.reissue_invoice($1)`, [refused!.id]);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', error_code: null });
    expect(inv!.order_no).not.toBe(refused!.order_no);
    // the old submit can no longer be replayed, one by one or with the dead letters
    expect(await sqlstateOf(db.pool.query(`select cloud.replay_message($1, 'operator replays the old submit')`, [old.request_id]))).toBe(SqlState.messageNotFound);
    await db.pool.query(`select cloud.replay_dead_messages('nuonuo', 'replay everything')`);
    // an answer about the old orderNo still in flight is kept as stale; the invoice is untouched
    for (const fn of ['tax.record_issue_submitted', 'tax.record_issue_failed']) {
      await db.pool.query(`select ${fn}(jsonb_populate_record(null::cloud.outbox, $1), $2::jsonb)`,
        [JSON.stringify(old), JSON.stringify({ status: 'failed', http_status: 200, code: 'E0000', result: { invoiceSerialNum: 'OLD-SERIAL' } })]);
    }
    const after = (await db.pool.query(`select * from tax.invoice where id = $1`, [inv!.id])).rows[0];
    expect(after).toMatchObject({ invoice_status: 'issued', invoice_no: inv!.invoice_no, order_no: inv!.order_no, error_code: null });
    expect(after.invoice_serial_no).not.toBe('OLD-SERIAL');
    expect(after.tax_cloud_response.stale).toMatchObject({ request_id: old.request_id });
    await settled(s.id);
    expect(simInvoicesFor(refused!.order_no)).toHaveLength(0);
    expect(simInvoicesFor(inv!.order_no)).toMatchObject([{ status: '2', submits: 1 }]);
  });

  it('a refused token is forgotten and a new one obtained; otherwise one token serves every invoice', async () => {
    const before = sim.tokenCalls();
    const c = await customer(db.pool);
    const a = await settlement(db.pool, c, [{ item: '软件维护', amount: 10.6 }]);
    const b = await settlement(db.pool, c, [{ item: '软件维护', amount: 21.2 }]);
    await approve(db.pool, a.id);
    await approve(db.pool, b.id);
    await settled(a.id);
    await settled(b.id);
    expect(sim.tokenCalls()).toBe(before); // the cached token (from earlier tests) was reused
    // the platform forgets every token (revoked, or expired early)
    sim.reset();
    const d = await settlement(db.pool, c, [{ item: '软件维护', amount: 31.8 }]);
    await approve(db.pool, d.id);
    const [inv] = await settled(d.id);
    expect(inv!.invoice_status).toBe('issued');
    expect(sim.tokenCalls()).toBe(1);
    const refused = await db.pool.query(`select count(*)::int n from cloud.log l join cloud.outbox o using (request_id) where o.aggregate_id = $1 and l.error_class = 'token_refused'`, [inv!.id]);
    expect(refused.rows[0].n).toBe(1);
  });
});

describe('when the outcome is unknown', () => {
  // these tests fail many attempts in a row on purpose: the circuit breaker must not open (and delay the tests after)
  beforeEach(async () => {
    await db.pool.query(`select cloud.put_endpoint_limits('nuonuo', null, 1, 1000, 30000)`);
  });
  afterAll(async () => {
    await db.pool.query(`select cloud.put_endpoint_limits('nuonuo', null, 1, 5, 30000)`);
  });
  const final = (id: string) => waitFor(async () => {
    const r = (await db.pool.query(`select * from tax.invoice where id = $1`, [id])).rows[0];
    return r.invoice_status === 'pending' || r.invoice_status === 'issuing' ? null : r;
  }, { timeoutMs: 30_000, intervalMs: 100, what: `invoice ${id} to end` });

  it('a submit that reached the platform and then only met 5xx is unknown_outcome, never re-issued; its replay books the one invoice', async () => {
    await configureTax(db.pool, sim.url, APP_KEY, { timeoutMs: 1000 });
    // the first submit is taken but answered too late; every retry meets a 503 until the attempts run out
    sim.setFaults({ pathPrefix: '/open/v1/services', schedule: [{ kind: 'slow', ms: 2000 }, { kind: 'status', status: 503 }], persist: true });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 742 }]);
    await approve(db.pool, s.id);
    const [pending] = await invoicesOf(db.pool, s.id);
    const failed = await final(pending!.id);
    expect(failed).toMatchObject({ invoice_status: 'failed', error_code: 'unknown_outcome' });
    expect(failed.error_message).toContain(`tax.requery_invoice(${pending!.id})`);
    expect(simInvoicesFor(pending!.order_no)).toHaveLength(1); // the platform has it
    // a new orderNo would issue it twice: refused
    expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [pending!.id]))).toBe(SqlState.invoiceReissueRefused);
    sim.setFaults(null);
    // the operator replays the submit: E9106 is booked although the invoice was marked failed
    const m = (await db.pool.query(`select request_id from cloud.outbox where operation = 'tax.issue' and aggregate_id = $1`, [pending!.id])).rows[0];
    await db.pool.query(`select cloud.replay_message($1, 'platform back: reconcile the lost submit')`, [m.request_id]);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', order_no: pending!.order_no, error_code: null });
    expect(simInvoicesFor(inv!.order_no)).toMatchObject([{ status: '2', submits: 2 }]);
    expect(sim.invoices().filter((i) => i.invoiceNo === inv!.invoice_no)).toHaveLength(1);
  });

  it('a credential refusal (070601) after a timeout proves nothing: unknown_outcome, never a new orderNo; requery books the one invoice', async () => {
    await configureTax(db.pool, sim.url, APP_KEY, { timeoutMs: 1000 });
    // the first submit is taken but answered too late; the retry meets a gateway sign refusal
    sim.setFaults({ pathPrefix: '/open/v1/services', schedule: [{ kind: 'slow', ms: 2000 }, { kind: 'status', status: 200, body: { code: '070601', describe: '签名不匹配' } }] });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 848 }]);
    await approve(db.pool, s.id);
    const [pending] = await invoicesOf(db.pool, s.id);
    const failed = await final(pending!.id);
    expect(failed).toMatchObject({ invoice_status: 'failed', error_code: 'unknown_outcome' });
    // the platform has it (the slow first submit finishes after the client gave up on it)
    await waitFor(async () => simInvoicesFor(pending!.order_no).length === 1 || null, { what: 'the slow submit to land' });
    expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [pending!.id]))).toBe(SqlState.invoiceReissueRefused);
    sim.setFaults(null);
    await db.pool.query(`select tax.requery_invoice($1)`, [pending!.id]);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', order_no: pending!.order_no });
    expect(sim.invoices().filter((i) => i.invoiceNo === inv!.invoice_no)).toHaveLength(1);
  });

  it('a result query that keeps failing is unknown_outcome; requery asks again under the same orderNo and books it', async () => {
    // the submit goes through, every query then meets a 503
    sim.setFaults({ pathPrefix: '/open/v1/services', schedule: [{ kind: 'ok' }, { kind: 'status', status: 503 }], persist: true });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 848 }]);
    await approve(db.pool, s.id);
    const [pending] = await invoicesOf(db.pool, s.id);
    const failed = await final(pending!.id);
    expect(failed).toMatchObject({ invoice_status: 'failed', error_code: 'unknown_outcome' });
    expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [pending!.id]))).toBe(SqlState.invoiceReissueRefused);
    sim.setFaults(null);
    await db.pool.query(`select tax.requery_invoice($1)`, [pending!.id]);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', order_no: pending!.order_no });
    expect(simInvoicesFor(inv!.order_no)).toHaveLength(1);
    expect(await attachmentOf(inv!.id)).toHaveLength(1);
    // an issued invoice is not waiting for an answer
    expect(await sqlstateOf(db.pool.query(`select tax.requery_invoice($1)`, [inv!.id]))).toBe(SqlState.invoiceRequeryRefused);
  });

  it('status 24 (issued, signing failed) keeps the invoice issuing: reInvoice on the same serial no., never a new orderNo, and only once while the signing runs', async () => {
    const buyer = USCC_OK[1]!;
    // signing takes 1.5 s and polls come every 300 ms: several polls see 24 after the reInvoice, none spends another
    await configureTax(db.pool, sim.url, APP_KEY, { pollCapMs: 300 });
    sim.configure({ signFailBuyers: [buyer], issueDelayMs: 1500 });
    const c = await customer(db.pool, { taxId: buyer });
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 954 }]);
    await approve(db.pool, s.id);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', error_code: null });
    const [one, ...none] = simInvoicesFor(inv!.order_no);
    expect(none).toHaveLength(0);
    expect(one).toMatchObject({ status: '2', reinvoices: 1, invoiceNo: inv!.invoice_no });
    const re = await db.pool.query(`select payload, status from cloud.outbox where operation = 'tax.reinvoice' and aggregate_id = $1`, [inv!.id]);
    expect(re.rows).toEqual([{ payload: { fpqqlsh: one!.serialNo, orderno: inv!.order_no }, status: 'sent' }]);
    expect(await attachmentOf(inv!.id)).toHaveLength(1);
  });
});

describe('the PDF download', () => {
  // The address cases name their host as a download host, so only the address check can refuse them: loopback is
  // allowed for the simulator, but only 127.0.0.1 (allow_cidrs); the refusal kind is asserted from the message.
  // A metadata literal cannot be listed at all (EC011 when it is set), so that case is refused by host.
  const ADDRESS_HOSTS = ['10.20.30.40', '169.254.1.1', '127.0.0.2'];
  const cases: Array<[string, Partial<{ pdfUrlOverride: string; pdfRedirectTo: string }>, string, string]> = [
    ['a cloud metadata address (allowed by host)', { pdfUrlOverride: 'http://169.254.169.254/latest/meta-data/iam.pdf' }, 'egress_refused', 'host 169.254.169.254 is not allowed'],
    ['a private-range address (allowed by host)', { pdfUrlOverride: 'http://10.20.30.40/invoice.pdf' }, 'egress_refused', '10.20.30.40 is outside the address ranges allowed'],
    ['a link-local address (allowed by host)', { pdfUrlOverride: 'http://169.254.1.1/invoice.pdf' }, 'egress_refused', '169.254.1.1 is outside the address ranges allowed'],
    ['another loopback address (allowed by host)', { pdfUrlOverride: 'http://127.0.0.2/invoice.pdf' }, 'egress_refused', '127.0.0.2 is outside the address ranges allowed'],
    ["a host name other than the endpoint's", { pdfUrlOverride: 'http://localhost.localdomain:1/x.pdf' }, 'egress_refused', 'host localhost.localdomain is not allowed'],
    ['a redirect to loopback', { pdfRedirectTo: 'http://127.0.0.1:9/admin.pdf' }, 'redirect_refused', 'redirects to http://127.0.0.1:9/admin.pdf'],
    ['a redirect to the metadata service', { pdfRedirectTo: 'http://169.254.169.254/latest/meta-data/' }, 'redirect_refused', 'redirects to http://169.254.169.254/'],
  ];
  for (const [what, settings, errorClass, why] of cases) {
    it(`from ${what} is refused and logged; the invoice stays issued without an attachment`, async () => {
      await db.pool.query(`select cloud.put_endpoint_allowlist('nuonuo', '{}', '{127.0.0.1/32}', true)`);
      await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', $1)`, [ADDRESS_HOSTS]);
      sim.configure(settings);
      const c = await customer(db.pool);
      const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
      await approve(db.pool, s.id);
      const [inv] = await settled(s.id);
      expect(inv).toMatchObject({ invoice_status: 'issued', error_code: 'pdf_download' });
      expect(inv!.error_message).toContain(errorClass);
      expect(inv!.error_message).toContain(why);
      expect(await attachmentOf(inv!.id)).toHaveLength(0);
      const log = await db.pool.query(`select l.outcome, l.error_class, l.attempt from cloud.log l join cloud.outbox o using (request_id)
                                        where o.aggregate_id = $1 and o.operation = 'tax.download_pdf'`, [inv!.id]);
      expect(log.rows).toEqual([{ outcome: 'permanent', error_class: errorClass, attempt: 1 }]);
    });
  }

  it('refuses an answer that is not a PDF, and one over the size cap', async () => {
    // the cap cannot go below 1 KiB, not even by a direct UPDATE (CHECK constraint); the simulator's PDFs are a little over
    expect(await sqlstateOf(db.pool.query(`update tax.config set max_pdf_bytes = 200`))).toBe('23514');
    await db.pool.query(`select tax.put_config(p_max_pdf_bytes => 1024)`);
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    const [inv] = await settled(s.id);
    expect(inv).toMatchObject({ invoice_status: 'issued', error_code: 'pdf_download' });
    expect(inv!.error_message).toMatch(/response_too_large.*exceeds 1024 bytes|exceeds 1024 bytes.*response_too_large/); // refused while it downloaded
    sim.configure({ pdfUrlOverride: `${sim.url}/__nuonuo/invoices` }); // JSON, not a PDF
    await configureTax(db.pool, sim.url, APP_KEY);
    const s2 = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
    await approve(db.pool, s2.id);
    const [inv2] = await settled(s2.id);
    expect(inv2!.error_message).toContain('not_pdf');
  });
});

describe('red-letter reversal (红冲)', () => {
  it('a full reversal issues the red invoice through the 数电 red confirmation and marks the original reversed', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 113 }, { item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    const [blue] = await settled(s.id);
    const { rows } = await requestReversal(db.pool, blue!.id, '2');
    const req = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.reversal where id = $1`, [rows[0].id])).rows[0];
      return r.status === 'issued' || r.status === 'failed' ? r : null;
    }, { timeoutMs: 30_000, what: 'the reversal' });
    expect(req).toMatchObject({ status: 'issued', bill_status: '04' });
    const red = (await db.pool.query(`select * from tax.invoice where id = $1`, [req.red_invoice_id])).rows[0];
    expect(red).toMatchObject({ invoice_type: 'red', invoice_status: 'issued', original_invoice_id: blue!.id, amount_incl_tax: '-219.00', tax_amount: '-19.00' });
    expect(red.invoice_no).toMatch(/^\d{20}$/);
    expect(red.invoice_no).not.toBe(blue!.invoice_no);
    const orig = (await db.pool.query(`select invoice_status from tax.invoice where id = $1`, [blue!.id])).rows[0];
    expect(orig.invoice_status).toBe('reversed');
    const simRed = sim.invoices().find((i) => i.invoiceNo === red.invoice_no);
    expect(simRed).toMatchObject({ red: true, blueInvoiceNo: blue!.invoice_no, orderAmount: '-219.00' });
    const ev = await db.pool.query(`select new_invoice_no from tax.invoice_event where invoice_id = $1`, [red.id]);
    expect(ev.rows).toEqual([{ new_invoice_no: red.invoice_no }]);
    await waitFor(async () => (await attachmentOf(red.id)).length === 1, { what: 'the red invoice PDF' });
    // a second reversal of the same invoice is refused
    expect(await sqlstateOf(requestReversal(db.pool, blue!.id, '2')))
      .toBe(SqlState.reversalAlreadyUnderway);
  });

  it('a partial reversal by line reverses only those lines', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '燕麦', code: OATS, rate: 0.13, qty: 2, price: 56.5, amount: 113 }, { item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    const [blue] = await settled(s.id);
    const { rows } = await requestReversal(db.pool, blue!.id, '1', [1]);
    const req = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.reversal where id = $1`, [rows[0].id])).rows[0];
      return r.status === 'issued' || r.status === 'failed' ? r : null;
    }, { timeoutMs: 30_000, what: 'the reversal' });
    expect(req.status).toBe('issued');
    const red = (await db.pool.query(`select amount_incl_tax, invoice_no from tax.invoice where id = $1`, [req.red_invoice_id])).rows[0];
    expect(red.amount_incl_tax).toBe('-113.00');
    const payload = (await db.pool.query(`select payload from cloud.outbox where operation = 'tax.red_confirm' and aggregate_id = $1`, [String(req.red_invoice_id)])).rows[0].payload;
    expect(payload).toMatchObject({ blueElecInvoiceNumber: blue!.invoice_no, redReason: '1', blueInvoiceLine: 'pc',
      detail: [{ blueDetailIndex: '1', goodsCode: OATS, taxRate: '0.13', num: '-2', taxExcludedAmount: '-100.00', taxAmount: '-13.00', taxExcludedPrice: '50' }] });
    expect(sim.invoices().find((i) => i.invoiceNo === red.invoice_no)).toMatchObject({ orderAmount: '-113.00' });
    // line 2 is not reversed: the invoice is partially reversed, line 1 cannot be reversed again, line 2 still can
    const statusOf = async () => (await db.pool.query(`select invoice_status from tax.invoice where id = $1`, [blue!.id])).rows[0].invoice_status;
    expect(await statusOf()).toBe('partially_reversed');
    const ins = (lines: number[] | null) => requestReversal(db.pool, blue!.id, '2', lines);
    expect(await sqlstateOf(ins([1]))).toBe(SqlState.reversalAlreadyUnderway);
    expect(await sqlstateOf(ins(null))).toBe(SqlState.reversalAlreadyUnderway);
    const second = (await ins([2])).rows[0];
    const req2 = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.reversal where id = $1`, [second.id])).rows[0];
      return r.status === 'issued' || r.status === 'failed' ? r : null;
    }, { timeoutMs: 30_000, what: 'the second reversal' });
    expect(req2.status).toBe('issued');
    expect(await statusOf()).toBe('reversed');
    expect(await sqlstateOf(ins([2]))).toBe(SqlState.reversalAlreadyUnderway);
  });

  it('a 专票 form the buyer never confirms is given up after 72 hours with the reason written back, not polled for ever', async () => {
    sim.configure({ redAwaitBuyer: true });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 226 }], 'special');
    await approve(db.pool, s.id);
    const [blue] = await settled(s.id);
    const { rows } = await requestReversal(db.pool, blue!.id, '1');
    await waitFor(async () => (await db.pool.query(`select bill_status from tax.reversal where id = $1`, [rows[0].id])).rows[0].bill_status === '02',
      { what: 'the form awaiting the buyer' });
    // the deadline counts from the form's creation, not from the request: an old request alone goes on polling
    await db.pool.query(`update tax.reversal set requested_at = now() - interval '80 hours' where id = $1`, [rows[0].id]);
    const redId = (await db.pool.query(`select red_invoice_id from tax.reversal where id = $1`, [rows[0].id])).rows[0].red_invoice_id;
    const pollsNow = async () => (await db.pool.query(`select polls from tax.invoice where id = $1`, [redId])).rows[0].polls as number;
    const p0 = await pollsNow();
    await waitFor(async () => (await pollsNow()) >= p0 + 2 || null, { timeoutMs: 30_000, what: 'two more form queries' });
    expect((await db.pool.query(`select status from tax.reversal where id = $1`, [rows[0].id])).rows[0].status).toBe('confirming');
    // 73 hours after the form was created (moved back here) it stops
    await db.pool.query(`update tax.reversal set form_submitted_at = now() - interval '74 hours' where id = $1`, [rows[0].id]);
    const req = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.reversal where id = $1`, [rows[0].id])).rows[0];
      return r.status === 'failed' ? r : null;
    }, { timeoutMs: 30_000, what: 'the reversal to be given up' });
    expect(req.error_message).toContain('72 hours');
    const red = (await db.pool.query(`select invoice_status, error_code from tax.invoice where id = $1`, [req.red_invoice_id])).rows[0];
    expect(red).toEqual({ invoice_status: 'failed', error_code: 'red_deadline' });
    const open = await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_id = $1 and status in ('pending', 'in_flight')`, [String(req.red_invoice_id)]);
    expect(open.rows[0].n).toBe(0);
    expect((await db.pool.query(`select invoice_status from tax.invoice where id = $1`, [blue!.id])).rows[0].invoice_status).toBe('issued');
  });

  it('refuses a reversal of an invoice that is not issued, with a bad reason, or naming a line the invoice does not have', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    const [pending] = await invoicesOf(db.pool, s.id);
    const ins = (id: string, reason: string, lines: number[] | null = null) =>
      requestReversal(db.pool, id, reason, lines);
    expect(await sqlstateOf(ins(pending!.id, '2'))).toBe(SqlState.reversalInvoiceNotIssued);
    const [issued] = await settled(s.id);
    expect(await sqlstateOf(ins(issued!.id, '5'))).toBe(SqlState.reversalReasonInvalid);
    expect(await sqlstateOf(ins(issued!.id, '2', [7]))).toBe(SqlState.reversalLineUnknown);
    // services cannot be returned (销货退回); goods cannot be a service stopped (服务中止)
    expect(await sqlstateOf(ins(issued!.id, '1'))).toBe(SqlState.reversalReasonInvalid);
    const n = await db.pool.query(`select count(*)::int n from tax.reversal where invoice_id = $1`, [issued!.id]);
    expect(n.rows[0].n).toBe(0);
  });
});

describe('the Nuonuo callback', () => {
  it('is a hint that makes the pending result query run now; a forged one books nothing', async () => {
    const log = createLogger('silent');
    const inbound = await startInboundServer('127.0.0.1', 0, {
      pool: db.pool, log, secret: async () => '', env: { ERP_CLOUD_NUONUO_CALLBACK_CIDRS: '127.0.0.1/32' },
    });
    try {
      // first query a minute after submit: only the callback can make it sooner
      await configureTax(db.pool, sim.url, APP_KEY, { firstPollMs: 60_000, callbackUrl: `${inbound.url}/callbacks/nuonuo` });
      sim.configure({ issueDelayMs: 5000 });
      const c = await customer(db.pool);
      const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 636 }]);
      await approve(db.pool, s.id);
      const issuing = await waitFor(async () => (await invoicesOf(db.pool, s.id)).find((i) => i.invoice_status === 'issuing'), { what: 'issuing' });
      // a forged callback claiming success while the platform is still issuing: nothing is booked
      const forged = new URLSearchParams({ operater: 'callback', orderno: issuing.order_no,
        content: JSON.stringify({ c_status: '1', c_fphm: '99999999999999999999', c_orderno: issuing.order_no }) });
      const answer = await fetch(`${inbound.url}/callbacks/nuonuo`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: forged.toString() });
      expect(await answer.json()).toEqual({ status: '0000', message: '同步成功' });
      const after = await waitFor(async () => {
        const r = (await db.pool.query(`select count(*)::int n from cloud.log l join cloud.outbox o using (request_id) where o.operation = 'tax.query' and o.aggregate_id = $1`, [issuing.id])).rows[0].n;
        return r >= 1 ? r : null;
      }, { what: 'the query the forged callback moved up' });
      expect(after).toBeGreaterThanOrEqual(1);
      const still = (await db.pool.query(`select invoice_status, invoice_no from tax.invoice where id = $1`, [issuing.id])).rows[0];
      expect(still).toEqual({ invoice_status: 'issuing', invoice_no: null });
      // the platform's own callback, once it has issued, brings the invoice in: without it the next query is a minute
      // away, longer than settled() waits
      const [inv] = await settled(s.id);
      expect(inv!.invoice_status).toBe('issued');
      expect(inv!.invoice_no).not.toBe('99999999999999999999');
      expect(inv!.invoice_no).toBe(simInvoicesFor(inv!.order_no)[0]!.invoiceNo);
    } finally {
      await inbound.close();
    }
  });

  it('redConfirmCallback is a hint too: it makes the red form query run now', async () => {
    const log = createLogger('silent');
    const inbound = await startInboundServer('127.0.0.1', 0, {
      pool: db.pool, log, secret: async () => '', env: { ERP_CLOUD_NUONUO_CALLBACK_CIDRS: '127.0.0.1/32' },
    });
    try {
      const c = await customer(db.pool);
      const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 530 }]);
      await approve(db.pool, s.id);
      const [blue] = await settled(s.id);
      // form queries a minute apart: only the callback makes the first one sooner
      await configureTax(db.pool, sim.url, APP_KEY, { firstPollMs: 60_000, pollCapMs: 60_000 });
      const { rows } = await requestReversal(db.pool, blue!.id, '2');
      const red = await waitFor(async () => {
        const r = (await db.pool.query(`select a.* from tax.invoice a join tax.reversal q on q.red_invoice_id = a.id where q.id = $1`, [rows[0].id])).rows[0];
        return r.invoice_status === 'issuing' ? r : null;
      }, { what: 'the red form submitted' });
      const formQueries = async () => (await db.pool.query(`select count(*)::int n from cloud.log l join cloud.outbox o using (request_id) where o.operation = 'tax.red_query' and o.aggregate_id = $1`, [red.id])).rows[0].n;
      expect(await formQueries()).toBe(0);
      const body = new URLSearchParams({ operater: 'redConfirmCallback', orderno: red.order_no, content: JSON.stringify({ billId: rows[0].bill_id, billStatus: '04' }) });
      const answer = await fetch(`${inbound.url}/callbacks/nuonuo`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: body.toString() });
      expect(await answer.json()).toEqual({ status: '0000', message: '同步成功' });
      await waitFor(async () => (await formQueries()) >= 1 ? true : null, { what: 'the form query the callback moved up' });
    } finally {
      await inbound.close();
    }
  });

  it('is refused from a source outside the configured ranges, and nobody is admitted when none is configured', async () => {
    const log = createLogger('silent');
    for (const env of [{ ERP_CLOUD_NUONUO_CALLBACK_CIDRS: '10.0.0.0/8' }, {}]) {
      const inbound = await startInboundServer('127.0.0.1', 0, { pool: db.pool, log, secret: async () => '', env });
      try {
        const r = await fetch(`${inbound.url}/callbacks/nuonuo`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: 'operater=callback&orderno=x&content=%7B%7D' });
        expect(r.status).toBe(403);
      } finally {
        await inbound.close();
      }
    }
  });
});
