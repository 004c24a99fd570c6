/**
 * The e-invoicing contract, the same through every tax platform: one suite run
 * against the Nuonuo and the Baiwang simulators, the platform chosen by the
 * endpoint alone (cloud.endpoint.provider; tax.put_config(p_endpoint)). A
 * small ERP ("parity", its own role, callback and document numbers) calls only
 * the contract: issue, split, the on_invoice callback, tax.invoice_status, the
 * PDF attachment, red-letter reversal, refusal and reissue, requery, and
 * timeouts and 5xx during issue and during result retrieval with exactly one
 * invoice in the platform's ledger. Real listener, real HTTP, real PostgreSQL.
 */
import { createHash, randomBytes } from 'node:crypto';
import type pg from 'pg';
import { PDFDocument } from 'pdf-lib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { baiwangPasswordHash } from '../listener/providers/baiwang-crypto.js';
import { startBaiwangSim, type BaiwangSim } from '../listener/sim/baiwang.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { createTestDb, urlFor, waitFor, type TestDb } from './helpers/db.js';
import { SOFTWARE, USCC_OK } from './helpers/invoicing.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

type Name = 'nuonuo' | 'baiwang';

/** What the suite needs of a platform's simulator, in the contract's terms. */
interface Platform {
  sim: NuonuoSim | BaiwangSim;
  /** The gateway's path (fault plans aim at it; PDF downloads are elsewhere). */
  gatewayPath: string;
  /** cloud.put_endpoint's provider, base URL and config. */
  endpoint(): { provider: Name; baseUrl: string; config: Record<string, unknown> };
  /** The platform's invoices under one idempotency key (Nuonuo orderNo, Baiwang serialNo). */
  ledger(key: string): Array<{ issued: boolean; submits: number; invoiceNo: string; red: boolean; blueInvoiceNo: string | null }>;
  issuedWithNumber(no: string): number;
  reject(buyer: string, reason: string): void;
  /** Report this file URL, or answer file downloads with a redirect to this. */
  files(o: { pdfUrlOverride?: string | null; pdfRedirectTo?: string | null }): void;
  /** The code the ERP sees for a refusal by the platform, and for a request signed with a wrong app secret. */
  refusalCode: string;
  signCode: string;
  restoreSettings(): void;
  pdfOf(no: string): Buffer | undefined;
}

const SECRET = randomBytes(12).toString('hex');
const PASSWORD = randomBytes(8).toString('hex');
const SALT = randomBytes(4).toString('hex');

async function startPlatform(name: Name): Promise<Platform> {
  if (name === 'nuonuo') {
    process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = SECRET;
    const sim = await startNuonuoSim({ appKey: 'parity-nn', appSecret: SECRET, issueDelayMs: 300 });
    return {
      sim, gatewayPath: '/open/v1/services', refusalCode: 'nuonuo_22', signCode: '070601',
      endpoint: () => ({ provider: 'nuonuo', baseUrl: `${sim.url}/open/v1/services`, config: { app_key: 'parity-nn', app_secret_name: 'nuonuo.app_secret' } }),
      ledger: (key) => sim.invoices().filter((i) => i.orderNo === key).map((i) => ({ issued: i.status === '2', submits: i.submits, invoiceNo: i.invoiceNo, red: i.red, blueInvoiceNo: i.blueInvoiceNo })),
      issuedWithNumber: (no) => sim.invoices().filter((i) => i.invoiceNo === no && i.status === '2').length,
      reject: (buyer, reason) => sim.configure({ rejectBuyers: { [buyer]: reason } }),
      files: (o) => sim.configure(o),
      restoreSettings: () => sim.configure({ rejectBuyers: {}, issueDelayMs: 300, pdfUrlOverride: null, pdfRedirectTo: null, signFailBuyers: [], redAwaitBuyer: false }),
      pdfOf: (no) => sim.pdfOf(no),
    };
  }
  process.env.ERP_CLOUD_SECRET_BAIWANG_APP_SECRET = SECRET;
  process.env.ERP_CLOUD_SECRET_BAIWANG_PASSWORD = PASSWORD;
  process.env.ERP_CLOUD_SECRET_BAIWANG_SALT = SALT;
  const sim = await startBaiwangSim({ appKey: 'parity-bw', appSecret: SECRET, username: 'parity-user', password: PASSWORD, salt: SALT, issueDelayMs: 300 });
  return {
    sim, gatewayPath: '/router/rest', refusalCode: 'baiwang_70001', signCode: 'baiwang_100007',
    endpoint: () => ({ provider: 'baiwang', baseUrl: `${sim.url}/router/rest`, config: { app_key: 'parity-bw', username: 'parity-user', tax_no: '339902999999789113' } }),
    ledger: (key) => sim.invoices().filter((i) => i.serialNo === key).map((i) => ({ issued: i.status === '00', submits: i.submits, invoiceNo: i.invoiceNo, red: i.red, blueInvoiceNo: i.blueInvoiceNo })),
    issuedWithNumber: (no) => sim.invoices().filter((i) => i.invoiceNo === no && i.status === '00').length,
    reject: (buyer, reason) => sim.configure({ rejectBuyers: { [buyer]: reason } }),
    files: (o) => sim.configure(o),
    restoreSettings: () => sim.configure({ rejectBuyers: {}, issueDelayMs: 300, pdfUrlOverride: null, pdfRedirectTo: null, redAwaitBuyer: false, asyncIssue: false }),
    pdfOf: (no) => sim.pdfOf(no),
  };
}

describe.each(['nuonuo', 'baiwang'] as const)('through %s, the e-invoicing contract', (name) => {
  let db: TestDb;
  let platform: Platform;
  let listener: InProcessListener;
  const owner = `parity_owner_${randomBytes(4).toString('hex')}`;
  let refSeq = 0;
  const newRef = () => `PAR-${name}-${process.pid}-${++refSeq}`;

  async function configure(o: { timeoutMs?: number; backoffBaseMs?: number; maxLines?: number; config?: Record<string, unknown> } = {}) {
    const e = platform.endpoint();
    e.config = { ...e.config, ...o.config };
    await db.pool.query(`select cloud.put_endpoint($1, $2, $3, 'invoice_request', p_timeout_ms => $4, p_max_attempts => 8,
                           p_backoff_base_ms => $5, p_backoff_cap_ms => greatest($5, 500), p_config => $6)`,
    [name, e.baseUrl, e.provider, o.timeoutMs ?? 2000, o.backoffBaseMs ?? 100, JSON.stringify(e.config)]);
    await db.pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [name]);
    await db.pool.query(`select cloud.put_endpoint_download_hosts($1, '{}')`, [name]);
    // failing many attempts in a row on purpose must not open the circuit breaker for the tests after
    await db.pool.query(`select cloud.put_endpoint_limits($1, null, 1, 1000, 30000)`, [name]);
    await db.pool.query(`select tax.put_config(p_endpoint => $1, p_seller_tax_id => '339902999999789113', p_seller_name => '浙江测试科技', p_clerk => '张三',
                           p_max_invoice_lines => $2, p_first_poll_ms => 200, p_poll_cap_ms => 1000, p_max_polls => 30, p_max_pdf_bytes => 5242880,
                           p_unset => array['max_invoice_amount', 'callback_url'])`, [name, o.maxLines ?? 200]);
  }

  beforeAll(async () => {
    db = await createTestDb(`invoicing_${name}`);
    platform = await startPlatform(name);
    await configure();
    const q = (sql: string) => db.pool.query(sql);
    await q(`create role ${owner} nologin in role erp_cloud_app`);
    await q(`create schema parity authorization ${owner}`);
    await q(`create table parity.event (invoice_id bigint, reference text, event text, status text, outcome text, invoice_no text, pdf_attachment_id bigint)`);
    await q(`alter table parity.event owner to ${owner}`);
    await q(`create function parity.on_invoice(r tax.invoice_result) returns void language sql security definer set search_path = '' as $$
               insert into parity.event values (r.invoice_id, r.reference, r.event, r.status, r.outcome, r.invoice_no, r.pdf_attachment_id) $$`);
    await q(`alter function parity.on_invoice(tax.invoice_result) owner to ${owner}`);
    await q(`select tax.put_source('parity', p_document_label => '开票单', p_on_invoice => 'parity.on_invoice(tax.invoice_result)')`);
    listener = await startListener(db.url);
    // the platform's token is obtained (and cached) before any test aims faults at the gateway
    const [id] = await enqueue(newRef(), doc());
    await final(id!);
  });
  afterAll(async () => {
    await listener.stop();
    await platform.sim.close();
    await db.drop();
    const { default: pgm } = await import('pg');
    const admin = new pgm.Client({ connectionString: urlFor('postgres') });
    await admin.connect();
    await admin.query(`drop role if exists ${owner}`);
    await admin.end();
  });
  beforeEach(async () => {
    platform.sim.setFaults(null);
    platform.restoreSettings();
    await configure();
  });

  function doc(o: { buyer?: Record<string, unknown>; lines?: Array<Record<string, unknown>> } = {}) {
    return {
      kind: 'normal',
      buyer: o.buyer ?? { name: '华东机电有限公司', tax_id: USCC_OK[0] },
      lines: o.lines ?? [
        { line_no: 1, item_name: '软件维护', tax_code: SOFTWARE, amount: 106, tax_rate: 0.06 },
        { line_no: 2, item_name: '燕麦', tax_code: '1010101070000000000', quantity: '10', unit_price: '11.3', amount: '113.00', tax_rate: 0.13 },
      ],
    };
  }
  const enqueue = (ref: string, d: unknown, c: pg.Pool = db.pool) =>
    c.query(`select tax.enqueue_invoices('parity', $1, $2) ids`, [ref, JSON.stringify(d)]).then((r) => (r.rows[0].ids as string[]).map(String));

  /** The invoice once it stopped moving: final status, and no message of its chain still open (the PDF comes last). */
  const final = (id: string) => waitFor(async () => {
    const { rows } = await db.pool.query(`select i.*, (select count(*)::int from cloud.outbox o where o.aggregate_type = 'tax.invoice' and o.aggregate_id = i.id::text
                                              and o.status in ('pending', 'in_flight')) open
                                            from tax.invoice i where i.id = $1`, [id]);
    const r = rows[0];
    return r && r.invoice_status !== 'pending' && r.invoice_status !== 'issuing' && r.open === 0 ? r : null;
  }, { timeoutMs: 30_000, intervalMs: 100, what: `invoice ${id} to settle` });
  const status = (ref: string) => db.pool.query(`select * from tax.invoice_status where source = 'parity' and reference = $1 order by part_no`, [ref]).then((r) => r.rows);
  const events = (id: string) => db.pool.query(`select event, status, invoice_no from parity.event where invoice_id = $1 order by ctid`, [id]).then((r) => r.rows);
  const attachments = (id: string) => db.pool.query(`select * from tax.attachment where invoice_id = $1`, [id]).then((r) => r.rows);

  it('issues a document once: the number, the status view, the callback and the platform\'s PDF attached', async () => {
    const ref = newRef();
    const [id, ...more] = await enqueue(ref, doc());
    expect(more).toHaveLength(0);
    const inv = await final(id!);
    const [row] = await status(ref);
    expect(row).toMatchObject({ status: 'issued', outcome: null, amount_excl_tax: '200.00', tax_amount: '19.00', amount_incl_tax: '219.00', error_code: null });
    expect(row.invoice_no).toMatch(/^\d{20}$/);
    expect(row.invoice_date).toBeInstanceOf(Date);
    expect(row.ofd_url).toMatch(/\.ofd$/);
    expect(platform.ledger(inv.order_no)).toMatchObject([{ issued: true, invoiceNo: row.invoice_no, submits: 1 }]);
    const [att, ...moreAtt] = await attachments(id!);
    expect(moreAtt).toHaveLength(0);
    expect(att).toMatchObject({ content_type: 'application/pdf', file_name: `${row.invoice_no}.pdf` });
    expect(att.sha256).toBe(createHash('sha256').update(att.content).digest('hex'));
    expect((att.content as Buffer).equals(platform.pdfOf(row.invoice_no)!)).toBe(true);
    expect((await PDFDocument.load(att.content)).getTitle()).toBe(`Invoice ${row.invoice_no}`);
    expect(row.pdf_attachment_id).toBe(att.id);
    const seen = await events(id!);
    expect(seen.map((e) => e.event)).toEqual(['submitted', 'issued', 'pdf_stored']);
    expect(seen[1]).toMatchObject({ status: 'issued', invoice_no: row.invoice_no });
    // nothing logged shows a credential: the app secret, the password, its hash, the access or refresh token
    const logged = JSON.stringify((await db.pool.query(`select * from cloud.log where endpoint = $1`, [name])).rows);
    const tokens = (await db.pool.query(`select token from cloud.provider_token where endpoint = $1`, [name])).rows.map((r) => r.token as string);
    expect(tokens.length).toBeGreaterThan(0);
    for (const secret of [SECRET, PASSWORD, baiwangPasswordHash(PASSWORD, SALT), ...tokens]) expect(logged).not.toContain(secret);
  });

  it("refuses for good a request signed with a wrong app secret: the platform's code and a readable reason reach the ERP, nothing is issued", async () => {
    process.env.ERP_CLOUD_SECRET_PARITY_WRONG_SECRET = randomBytes(12).toString('hex');
    await configure({ config: { app_secret_name: 'parity.wrong_secret' } });
    const ref = newRef();
    const [id] = await enqueue(ref, doc());
    const failed = await final(id!);
    const [row] = await status(ref);
    expect(row).toMatchObject({ status: 'failed', outcome: 'refused', error_code: platform.signCode });
    expect(row.error_message).toMatch(/\S/);
    expect(platform.ledger(failed.order_no)).toHaveLength(0);
  });

  it('splits a document by the line limit and issues every part once', async () => {
    await configure({ maxLines: 1 });
    const ref = newRef();
    const ids = await enqueue(ref, doc({ lines: [1, 2, 3].map((n) => ({ line_no: n * 10, item_name: `服务${n}`, tax_code: SOFTWARE, amount: (10.6 * n).toFixed(2), tax_rate: 0.06 })) }));
    expect(ids).toHaveLength(3);
    const invs = await Promise.all(ids.map(final));
    const rows = await status(ref);
    expect(rows.map((r) => [r.part_no, r.part_count, r.status])).toEqual([[1, 3, 'issued'], [2, 3, 'issued'], [3, 3, 'issued']]);
    expect(new Set(rows.map((r) => r.invoice_no)).size).toBe(3);
    for (const i of invs) expect(platform.ledger(i.order_no)).toMatchObject([{ issued: true, submits: 1 }]);
    for (const id of ids) expect(await attachments(id)).toHaveLength(1);
  });

  it("reaches the ERP as refused with the platform's readable reason when the platform refuses; reissue with a corrected buyer issues it once", async () => {
    const buyer = USCC_OK[2]!;
    platform.reject(buyer, '购买方纳税人识别号在税务局登记信息中不存在');
    const ref = newRef();
    const [id] = await enqueue(ref, doc({ buyer: { name: '华南贸易有限公司', tax_id: buyer } }));
    const failed = await final(id!);
    const [row] = await status(ref);
    expect(row).toMatchObject({ status: 'failed', outcome: 'refused', error_code: platform.refusalCode, error_message: '购买方纳税人识别号在税务局登记信息中不存在', invoice_no: null });
    // the platform's own answer is kept for audit
    expect(JSON.stringify(row.responses)).toContain('购买方纳税人识别号在税务局登记信息中不存在');
    if (name === 'baiwang') expect(JSON.stringify(row.responses)).toContain('platform_answer');
    expect((await events(id!)).map((e) => e.event)).toContain('failed');
    expect(await attachments(id!)).toHaveLength(0);

    await db.pool.query(`select tax.reissue_invoices('parity', $1, $2)`, [ref, JSON.stringify({ name: '华南贸易有限公司', tax_id: USCC_OK[3] })]);
    const again = await final(id!);
    expect(again).toMatchObject({ invoice_status: 'issued', error_code: null, buyer_tax_id: USCC_OK[3] });
    expect(again.order_no).not.toBe(failed.order_no);
    expect(platform.ledger(again.order_no)).toMatchObject([{ issued: true, submits: 1 }]);
    expect(platform.ledger(failed.order_no).filter((l) => l.issued)).toHaveLength(0);
    expect((await events(id!)).map((e) => e.event)).toContain('reissued');
    expect(await attachments(id!)).toHaveLength(1);
  });

  for (const [what, settings, errorClass] of [
    ['the cloud metadata address', { pdfUrlOverride: 'http://169.254.169.254/latest/meta-data/iam.pdf' }, 'egress_refused'],
    ['a redirect to loopback', { pdfRedirectTo: 'http://127.0.0.1:9/admin.pdf' }, 'redirect_refused'],
  ] as const) {
    it(`refuses a PDF download from ${what} under the egress guard; the invoice stays issued without an attachment`, async () => {
      platform.files(settings);
      const ref = newRef();
      const [id] = await enqueue(ref, doc());
      const inv = await final(id!);
      expect(inv).toMatchObject({ invoice_status: 'issued', error_code: 'pdf_download' });
      expect(inv.error_message).toContain(errorClass);
      expect(await attachments(id!)).toHaveLength(0);
    });
  }

  it('reverses an issued invoice through the 数电 red-letter confirmation: the red invoice issued, the original reversed, the ERP told', async () => {
    const ref = newRef();
    const [blueId] = await enqueue(ref, doc());
    const blue = await final(blueId!);
    const [redId] = await db.pool.query(`select tax.enqueue_reversal('parity', $1, $2, 'error') ids`, [ref, `${ref}-R`]).then((r) => (r.rows[0].ids as string[]).map(String));
    const red = await final(redId!);
    expect(red).toMatchObject({ invoice_type: 'red', invoice_status: 'issued', original_invoice_id: blue.id, amount_incl_tax: '-219.00', tax_amount: '-19.00' });
    expect(red.invoice_no).toMatch(/^\d{20}$/);
    expect(red.invoice_no).not.toBe(blue.invoice_no);
    const rev = (await db.pool.query(`select status, bill_status from tax.reversal where red_invoice_id = $1`, [redId])).rows[0];
    expect(rev).toEqual({ status: 'issued', bill_status: '04' });
    const redView = (await db.pool.query(`select status, invoice_no, original_reference from tax.red_invoice_status where source = 'parity' and reference = $1`, [`${ref}-R`])).rows;
    expect(redView).toEqual([{ status: 'issued', invoice_no: red.invoice_no, original_reference: ref }]);
    expect((await status(ref))[0].status).toBe('reversed');
    expect((await events(blueId!)).map((e) => e.event)).toContain('reversed');
    expect(platform.ledger(red.order_no)).toMatchObject([{ issued: true, red: true, blueInvoiceNo: blue.invoice_no }]);
    expect(await attachments(redId!)).toHaveLength(1);
  });

  it('gives exactly one invoice in the platform\'s ledger through timeouts and 5xx during the issue and during result retrieval', async () => {
    await configure({ timeoutMs: 1500 });
    // gateway faults in arrival order: the issue times out, then 503, then goes through; the first query 500s, the next times out
    platform.sim.setFaults({ pathPrefix: platform.gatewayPath, schedule: [{ kind: 'timeout', ms: 5000 }, { kind: 'status', status: 503 }, { kind: 'ok' },
      { kind: 'status', status: 500 }, { kind: 'timeout', ms: 5000 }] });
    const ref = newRef();
    const [id] = await enqueue(ref, doc());
    const inv = await final(id!);
    expect(inv.invoice_status).toBe('issued');
    expect(platform.ledger(inv.order_no)).toMatchObject([{ issued: true }]);
    expect(platform.issuedWithNumber(inv.invoice_no)).toBe(1);
    const log = await db.pool.query(`select l.operation, l.error_class from cloud.log l join cloud.outbox o using (request_id)
                                      where o.aggregate_id = $1 and l.outcome <> 'ok' order by l.started_at`, [id]);
    expect(log.rows.map((r) => `${r.operation} ${r.error_class}`)).toEqual(['tax.issue timeout', 'tax.issue http_503', 'tax.query http_500', 'tax.query timeout']);
    expect(await attachments(id!)).toHaveLength(1);
  });

  it('looks up an issue whose answer was lost (the platform took it) instead of issuing it twice', async () => {
    // the platform takes the issue but answers after the client gave up; the retry comes after it finished
    await configure({ timeoutMs: 1000, backoffBaseMs: 3000 });
    platform.sim.setFaults({ pathPrefix: platform.gatewayPath, schedule: [{ kind: 'slow', ms: 2000 }] });
    const ref = newRef();
    const [id] = await enqueue(ref, doc());
    const inv = await final(id!);
    expect(inv.invoice_status).toBe('issued');
    expect(platform.ledger(inv.order_no)).toMatchObject([{ issued: true, submits: 2 }]); // the retry was refused as a duplicate
    expect(inv.tax_cloud_response.submit).toMatchObject({ duplicate: true });
    expect(platform.issuedWithNumber(inv.invoice_no)).toBe(1);
  });

  it('marks an invoice whose result retrieval keeps failing as unknown, and requery books the one invoice', async () => {
    // the issue goes through, every result query then meets a 503 until the attempts run out
    platform.sim.setFaults({ pathPrefix: platform.gatewayPath, schedule: [{ kind: 'ok' }, { kind: 'status', status: 503 }], persist: true });
    const ref = newRef();
    const [id] = await enqueue(ref, doc());
    const failed = await final(id!);
    expect(failed).toMatchObject({ invoice_status: 'failed', error_code: 'unknown_outcome' });
    expect((await status(ref))[0].outcome).toBe('unknown');
    platform.sim.setFaults(null);
    await db.pool.query(`select tax.requery_invoices('parity', $1)`, [ref]);
    const inv = await final(id!);
    expect(inv).toMatchObject({ invoice_status: 'issued', order_no: failed.order_no });
    expect(platform.ledger(inv.order_no)).toMatchObject([{ issued: true, submits: 1 }]);
    expect((await events(id!)).map((e) => e.event)).toEqual(expect.arrayContaining(['failed', 'requeried', 'issued']));
    expect(await attachments(id!)).toHaveLength(1);
  });

  it('polls an issue the platform answers asynchronously (Nuonuo always, Baiwang when it answers 01 开具中) to the same result', async () => {
    if (name === 'baiwang') (platform.sim as BaiwangSim).configure({ asyncIssue: true });
    const ref = newRef();
    const [id] = await enqueue(ref, doc());
    const inv = await final(id!);
    expect(inv.invoice_status).toBe('issued');
    expect(platform.ledger(inv.order_no)).toMatchObject([{ issued: true, submits: 1 }]);
    expect(await attachments(id!)).toHaveLength(1);
  });
});

describe('an ERP switching platforms', () => {
  let db: TestDb;
  let nuonuo: Platform;
  let baiwang: Platform;
  let listener: InProcessListener;

  beforeAll(async () => {
    db = await createTestDb('invoicing_switch');
    nuonuo = await startPlatform('nuonuo');
    baiwang = await startPlatform('baiwang');
    await db.pool.query(`select cloud.put_endpoint('einvoicing', 'http://127.0.0.1:9/', 'nuonuo', 'invoice_request')`);
    await db.pool.query(`select tax.put_config(p_endpoint => 'einvoicing', p_seller_tax_id => '339902999999789113', p_seller_name => '浙江测试科技', p_clerk => '张三',
                           p_first_poll_ms => 200, p_poll_cap_ms => 1000)`);
    await db.pool.query(`select tax.put_source('switching')`);
    listener = await startListener(db.url);
  });
  afterAll(async () => {
    await listener.stop();
    await nuonuo.sim.close();
    await baiwang.sim.close();
    await db.drop();
  });

  /** The endpoint `name` on the platform, and e-invoicing pointed at it. */
  const point = async (p: Platform, name = 'einvoicing') => {
    const e = p.endpoint();
    await db.pool.query(`select cloud.put_endpoint($4, $1, $2, 'invoice_request', p_timeout_ms => 2000, p_backoff_base_ms => 100, p_config => $3)`,
      [e.baseUrl, e.provider, JSON.stringify(e.config), name]);
    await db.pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [name]);
    await db.pool.query(`select tax.put_config(p_endpoint => $1)`, [name]);
  };
  const issue = async (ref: string) => {
    const { rows } = await db.pool.query(`select tax.enqueue_invoices('switching', $1, $2) ids`, [ref, JSON.stringify({
      kind: 'normal', buyer: { name: '华东机电有限公司', tax_id: USCC_OK[0] }, lines: [{ line_no: 1, item_name: '软件维护', tax_code: SOFTWARE, amount: 106, tax_rate: 0.06 }] })]);
    return waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.invoice_status where source = 'switching' and reference = $1 and pdf_attachment_id is not null`, [ref])).rows[0];
      return r?.status === 'issued' ? { ...r, order_no: (await db.pool.query(`select order_no from tax.invoice where id = $1`, [rows[0].ids[0]])).rows[0].order_no as string } : null;
    }, { timeoutMs: 30_000, what: `${ref} to be issued with its PDF` });
  };

  it('changes only the endpoint: the same source, document shape and views, the next invoice through the other platform', async () => {
    await point(nuonuo);
    const first = await issue(`SW-${process.pid}-1`);
    expect(nuonuo.ledger(first.order_no)).toMatchObject([{ issued: true }]);
    await point(baiwang);
    const second = await issue(`SW-${process.pid}-2`);
    expect(baiwang.ledger(second.order_no)).toMatchObject([{ issued: true }]);
    expect(nuonuo.ledger(second.order_no)).toHaveLength(0);
    expect([first.invoice_no, second.invoice_no].every((n: string) => /^\d{20}$/.test(n))).toBe(true);
  });

  it('keeps an invoice with the platform that took it: one under way when the ERP switches, and a later reversal of it, stay on that platform', async () => {
    await point(nuonuo, 'nuonuo');
    // slow issuing on Nuonuo: the invoice is still issuing when the ERP switches
    (nuonuo.sim as NuonuoSim).configure({ issueDelayMs: 1500 });
    const ref = `SW-${process.pid}-3`;
    const { rows } = await db.pool.query(`select tax.enqueue_invoices('switching', $1, $2) ids`, [ref, JSON.stringify({
      kind: 'normal', buyer: { name: '华东机电有限公司', tax_id: USCC_OK[0] }, lines: [{ line_no: 1, item_name: '软件维护', tax_code: SOFTWARE, amount: 212, tax_rate: 0.06 }] })]);
    const id = String(rows[0].ids[0]);
    await waitFor(async () => (await db.pool.query(`select invoice_status from tax.invoice where id = $1`, [id])).rows[0].invoice_status === 'issuing' || null,
      { what: 'the invoice to be submitted to Nuonuo' });
    await point(baiwang, 'baiwang'); // e-invoicing now names another endpoint, on another platform
    const issued = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.invoice_status where source = 'switching' and reference = $1 and pdf_attachment_id is not null`, [ref])).rows[0];
      return r?.status === 'issued' ? r : null;
    }, { timeoutMs: 30_000, what: `${ref} to be issued on Nuonuo` });
    const orderNo = (await db.pool.query(`select order_no from tax.invoice where id = $1`, [id])).rows[0].order_no as string;
    expect(nuonuo.ledger(orderNo)).toMatchObject([{ issued: true, invoiceNo: issued.invoice_no }]);
    expect(baiwang.ledger(orderNo)).toHaveLength(0);
    const byEndpoint = await db.pool.query(`select operation, endpoint from cloud.outbox where aggregate_id = $1 order by created_at`, [id]);
    expect(byEndpoint.rows.map((r) => r.endpoint)).toEqual(byEndpoint.rows.map(() => 'nuonuo'));
    // reversing it while e-invoicing points at Baiwang: the red-letter form goes to Nuonuo, which issued it
    (nuonuo.sim as NuonuoSim).configure({ issueDelayMs: 300 });
    const [redId] = (await db.pool.query(`select tax.enqueue_reversal('switching', $1, $2, 'error') ids`, [ref, `${ref}-R`])).rows[0].ids as string[];
    const red = await waitFor(async () => {
      const r = (await db.pool.query(`select * from tax.invoice where id = $1`, [redId])).rows[0];
      return r.invoice_status === 'issued' || r.invoice_status === 'failed' ? r : null;
    }, { timeoutMs: 30_000, what: 'the red invoice' });
    expect(red).toMatchObject({ invoice_status: 'issued', invoice_type: 'red' });
    expect(nuonuo.ledger(red.order_no)).toMatchObject([{ issued: true, red: true, blueInvoiceNo: issued.invoice_no }]);
    // and a new document goes to Baiwang
    const next = await issue(`SW-${process.pid}-4`);
    expect(baiwang.ledger(next.order_no)).toMatchObject([{ issued: true }]);
  });
});
