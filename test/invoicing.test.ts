/**
 * E-invoicing in the database: what approving a settlement writes and
 * enqueues, validation (each failure with its SQLSTATE, nothing enqueued,
 * nothing half-written), price–tax separation in numeric, splitting.
 * No cloud here: the flow through the simulator is in invoicing-flow.test.ts.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, sqlstateOf, type TestDb } from './helpers/db.js';
import { approve, configureTax, customer, documentOf, invoicesOf, OATS, post, settlement, shipment, SOFTWARE, USCC_OK, type Line } from './helpers/invoicing.js';

let db: TestDb;
const good: Line = { item: '软件维护', amount: 106 };

beforeAll(async () => {
  db = await createTestDb('invoicing');
  await configureTax(db.pool, 'http://127.0.0.1:9', 'app');
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await configureTax(db.pool, 'http://127.0.0.1:9', 'app');
});

async function outboxCount(): Promise<number> {
  const { rows } = await db.pool.query(`select count(*)::int n from cloud.outbox where operation like 'tax.%'`);
  return rows[0].n;
}

describe('approving a settlement', () => {
  it('creates one pending invoice with tax separated line by line in numeric and enqueues its payload in the same transaction', async () => {
    const c = await customer(db.pool, { email: 'ap@example.com' });
    const s = await settlement(db.pool, c, [
      { item: '燕麦', code: OATS, rate: 0.13, qty: 10, price: 11.3, amount: 113.0, unit: 'kg' },
      { item: '软件维护', rate: 0.06, amount: 100.01 },
      { item: '运输服务', code: '3010101000000000000', rate: 0.09, qty: 3, price: 33.333333, amount: 100.0 },
    ]);
    const before = await outboxCount();
    await approve(db.pool, s.id);
    const [inv, ...more] = await invoicesOf(db.pool, s.id);
    expect(more).toHaveLength(0);
    // 113/1.13 = 100.00 + 13.00; 100.01/1.06 = 94.349… → 94.35 + 5.66; 100/1.09 = 91.743… → 91.74 + 8.26
    expect(inv).toMatchObject({ invoice_status: 'pending', amount_excl_tax: '286.09', tax_amount: '26.92', amount_incl_tax: '313.01' });
    const lines = await db.pool.query(`select amount_excl_tax, tax_amount, amount_incl_tax from tax.invoice_line where invoice_id = $1 order by line_no`, [inv!.id]);
    expect(lines.rows).toEqual([
      { amount_excl_tax: '100.00', tax_amount: '13.00', amount_incl_tax: '113.00' },
      { amount_excl_tax: '94.35', tax_amount: '5.66', amount_incl_tax: '100.01' },
      { amount_excl_tax: '91.74', tax_amount: '8.26', amount_incl_tax: '100.00' },
    ]);
    expect(await outboxCount()).toBe(before + 1);
    const { rows } = await db.pool.query(`select o.endpoint, o.operation, o.payload, e.wake_channel from cloud.outbox o join cloud.endpoint e on e.name = o.endpoint
                                           where o.request_id = (select request_id from tax.invoice where id = $1)`, [inv!.id]);
    expect(rows[0]).toMatchObject({ endpoint: 'nuonuo', operation: 'tax.issue', wake_channel: 'invoice_request' });
    const order = rows[0].payload.order;
    expect(order).toMatchObject({ buyerName: '华东机电有限公司', buyerTaxNum: USCC_OK[0], salerTaxNum: '339902999999789113', orderNo: inv!.order_no,
      invoiceLine: 'pc', invoiceType: '1', pushMode: '0', email: 'ap@example.com', clerk: '张三' });
    expect(order.invoiceDetail[0]).toEqual({ goodsName: '燕麦', goodsCode: OATS, unit: 'kg', num: '10', price: '11.3', withTaxFlag: '1', taxRate: '0.13',
      taxExcludedAmount: '100.00', tax: '13.00', taxIncludedAmount: '113.00', invoiceLineProperty: '0' });
    expect(order.invoiceDetail[1].taxRate).toBe('0.06');
    expect(inv!.order_no).toMatch(/^[0-9a-f]{32}$/);
  });

  it('twice, or approving and then posting its shipment, never invoices twice', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 500 }]);
    await approve(db.pool, s.id);
    const before = await outboxCount();
    await db.pool.query(`update erp.settlement set status = 'approved', remark = 'again' where id = $1`, [s.id]);
    await db.pool.query(`update erp.settlement set status = 'draft' where id = $1`, [s.id]);
    await approve(db.pool, s.id);
    const sh = await shipment(db.pool, c, [{ item: '软件维护', amount: 500 }], s.id);
    await post(db.pool, sh.id);
    expect(await invoicesOf(db.pool, s.id)).toHaveLength(1);
    expect(await invoicesOf(db.pool, sh.id, 'shipment')).toHaveLength(0);
    expect(await outboxCount()).toBe(before);
  });

  it('by two clerks at the same moment issues once', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 500 }]);
    const [a, b] = [await db.pool.connect(), await db.pool.connect()];
    try {
      await a.query('begin');
      await b.query('begin');
      await a.query(`update erp.settlement set status = 'approved' where id = $1`, [s.id]);
      const second = b.query(`update erp.settlement set status = 'approved' where id = $1`, [s.id]); // waits for a
      await a.query('commit');
      await second;
      await b.query('commit');
    } finally {
      a.release();
      b.release();
    }
    expect(await invoicesOf(db.pool, s.id)).toHaveLength(1);
  });

  it('for a customer invoiced on shipment issues nothing; posting the shipment issues it', async () => {
    const c = await customer(db.pool, { invoiceOn: 'shipment', name: '苏州精密制造' });
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 200 }]);
    await approve(db.pool, s.id);
    expect(await invoicesOf(db.pool, s.id)).toHaveLength(0);
    const sh = await shipment(db.pool, c, [{ item: '燕麦', code: OATS, rate: 0.13, amount: 226 }], s.id);
    await post(db.pool, sh.id);
    const inv = await invoicesOf(db.pool, sh.id, 'shipment');
    expect(inv).toHaveLength(1);
    expect(inv[0]).toMatchObject({ amount_excl_tax: '200.00', tax_amount: '26.00' });
    const posted = await db.pool.query(`select posted_at from erp.shipment where id = $1`, [sh.id]);
    expect(posted.rows[0].posted_at).not.toBeNull();
  });
});

describe('splitting', () => {
  it('an invoice over the amount limit is split into several, lines kept whole and in order', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxAmount: 1000 });
    const c = await customer(db.pool);
    const amounts = [400, 500, 300, 1000, 50, 60];
    const s = await settlement(db.pool, c, amounts.map((a, i) => ({ item: `服务${i + 1}`, amount: a, rate: i % 2 ? 0.06 : 0.13, code: i % 2 ? SOFTWARE : OATS })));
    await approve(db.pool, s.id);
    const inv = await invoicesOf(db.pool, s.id);
    expect(inv.map((i) => i.amount_incl_tax)).toEqual(['900.00', '300.00', '1000.00', '110.00']);
    const { rows } = await db.pool.query(`select i.part_no, i.part_count, array_agg(l.source_line_no order by l.line_no) lines
                                            from tax.invoice i join tax.invoice_line l on l.invoice_id = i.id
                                           where i.document_id = ${documentOf()} group by 1, 2 order by 1`, [s.id]);
    expect(rows.map((r) => r.lines)).toEqual([[1, 2], [3], [4], [5, 6]]);
    expect(rows.every((r) => r.part_count === 4)).toBe(true);
    const payloads = await db.pool.query(`select o.payload->'order'->>'remark' remark from cloud.outbox o join tax.invoice i on i.request_id = o.request_id
                                           where i.document_id = ${documentOf()} order by i.part_no`, [s.id]);
    expect(payloads.rows.map((r) => r.remark)).toEqual([`${s.no} (1/4)`, `${s.no} (2/4)`, `${s.no} (3/4)`, `${s.no} (4/4)`]);
  });

  it('an invoice over the line limit is split by line count', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxLines: 2 });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [1, 2, 3, 4, 5].map((n) => ({ item: `服务${n}`, amount: n * 10 })));
    await approve(db.pool, s.id);
    expect((await invoicesOf(db.pool, s.id)).map((i) => i.amount_incl_tax)).toEqual(['30.00', '70.00', '50.00']);
  });

  it('a single line over the amount limit stops the approval with EI011: a line is never split', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxAmount: 1000 });
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '小件', amount: 10 }, { item: '大件', amount: 1000.01 }]);
    expect(await sqlstateOf(approve(db.pool, s.id))).toBe(SqlState.invoiceLineOverLimit);
  });
});

describe('validation stops the approval with its SQLSTATE; nothing is enqueued and nothing half-written', () => {
  const cases: Array<[string, string, { taxId?: string | null; kind?: 'normal' | 'special'; name?: string; lines?: Line[] }]> = [
    ['a tax id of the wrong length', SqlState.invoiceTaxIdMalformed, { taxId: '9133010612345' }],
    ['a tax id with lower-case letters', SqlState.invoiceTaxIdMalformed, { taxId: '91330106ma2aynwd8m' }],
    ['a USCC whose check digit is wrong', SqlState.invoiceTaxIdCheckDigit, { taxId: '91110108MA01KPGP0L' }],
    ['a tax code that is not 19 digits', SqlState.invoiceTaxCodeInvalid, { lines: [good, { item: '坏编码', code: '30402010300', amount: 10 }] }],
    ['a tax rate not in use', SqlState.invoiceTaxRateInvalid, { lines: [{ item: '怪税率', rate: 0.07, amount: 10 }] }],
    ['a zero amount', SqlState.invoiceLineAmountInvalid, { lines: [{ item: '零', amount: 0 }] }],
    ['quantity × price that does not make the amount', SqlState.invoiceLineAmountInvalid, { lines: [{ item: '错价', qty: 3, price: 10, amount: 31 }] }],
    ['a quantity without a price', SqlState.invoiceLineAmountInvalid, { lines: [{ item: '缺价', qty: 3, amount: 30 }] }],
    ['more than 8 decimals in a price', SqlState.invoiceLineAmountInvalid, { lines: [{ item: '精度', qty: 1, price: '10.123456789', amount: 10.12 }] }],
    ['no lines at all', SqlState.invoiceLinesMissingOrTooMany, { lines: [] }],
    ['a line tax more than 0.06 off', SqlState.invoiceLineTaxTolerance, { lines: [{ item: '税错', amount: 106, tax: 6.07 }] }],
    ['a USCC with a letter GB 32100 never uses (O for 0)', SqlState.invoiceUsccForbiddenCharacter, { taxId: '91330106MA2AYNWD8O' }],
    ['a USCC whose registration authority does not exist', SqlState.invoiceUsccAuthorityOrType, { taxId: '01330106MA2AYNWD8M' }],
    ['a USCC whose region code is no province', SqlState.invoiceUsccRegion, { taxId: '91990106MA2AYNWD8M' }],
    ['an item name longer than the platform takes', SqlState.invoiceTextTooLong, { lines: [{ item: '长'.repeat(1000), amount: 10 }] }],
    ['a buyer without a name', SqlState.invoiceBuyerNameMissing, { name: ' ' }],
    ['a 数电专票 for a buyer without a tax id', SqlState.invoiceSpecialNeedsTaxId, { taxId: null, kind: 'special' }],
  ];
  for (const [what, code, o] of cases) {
    it(`${what}: ${code}`, async () => {
      const c = await customer(db.pool, { taxId: o.taxId, name: o.name });
      const s = await settlement(db.pool, c, o.lines ?? [good], o.kind ?? 'normal');
      const before = await outboxCount();
      expect(await sqlstateOf(approve(db.pool, s.id))).toBe(code);
      expect(await outboxCount()).toBe(before);
      const st = await db.pool.query(`select status, approved_at from erp.settlement where id = $1`, [s.id]);
      expect(st.rows[0]).toEqual({ status: 'draft', approved_at: null });
      expect(await invoicesOf(db.pool, s.id)).toHaveLength(0);
      const lines = await db.pool.query(`select count(*)::int n from tax.invoice_line l join tax.invoice i on i.id = l.invoice_id where i.document_id = ${documentOf()}`, [s.id]);
      expect(lines.rows[0].n).toBe(0);
    });
  }

  it('the message names the line and the field, and a hint says what to do', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good, { item: '坏编码', code: '123', amount: 10 }]);
    const err = await approve(db.pool, s.id).then(() => null, (e: { message: string; hint?: string }) => e);
    expect(err?.message).toContain(`document settlement/${s.no} line 2 (坏编码): tax_code`);
    expect(err?.hint).toMatch(/19-digit/);
  });

  it('without a configured seller nothing is issued: EI012', async () => {
    await db.pool.query(`update tax.config set seller_tax_id = null`);
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    expect(await sqlstateOf(approve(db.pool, s.id))).toBe(SqlState.invoicingNotConfigured);
  });

  it('a USCC failing its check digit is issued with a warning once an operator overrides the check', async () => {
    const c = await customer(db.pool, { taxId: '91110108MA01KPGP0L', override: true });
    const s = await settlement(db.pool, c, [good]);
    await approve(db.pool, s.id);
    const [inv] = await invoicesOf(db.pool, s.id);
    expect(inv).toBeDefined();
    const { rows } = await db.pool.query(`select tax_id_warning from tax.invoice where id = $1`, [inv!.id]);
    expect(rows[0].tax_id_warning).toMatch(/GB 32100/);
  });

  it('bad settings are refused with EI017', async () => {
    expect(await sqlstateOf(db.pool.query(`select tax.put_config(p_max_invoice_lines => 0)`))).toBe(SqlState.invoicingSettingInvalid);
    expect(await sqlstateOf(db.pool.query(`select tax.put_config(p_seller_tax_id => 'abc')`))).toBe(SqlState.invoicingSettingInvalid);
    // no hot loop: the first poll is at least 50 ms
    expect(await sqlstateOf(db.pool.query(`select tax.put_config(p_first_poll_ms => 0)`))).toBe(SqlState.invoicingSettingInvalid);
    expect(await sqlstateOf(db.pool.query(`select tax.put_config(p_max_pdf_bytes => 200)`))).toBe(SqlState.invoicingSettingInvalid);
  });

  it('a setting left out keeps its value; only p_unset clears an optional one; the limits hold for a direct UPDATE too', async () => {
    await db.pool.query(`select tax.put_config(p_max_invoice_amount => 5000, p_max_pdf_bytes => 2048, p_callback_url => 'http://127.0.0.1:9/cb')`);
    const cfg = (await db.pool.query(`select * from tax.put_config(p_max_polls => 7)`)).rows[0];
    expect(cfg).toMatchObject({ max_polls: 7, max_invoice_amount: '5000.00', max_pdf_bytes: 2048, callback_url: 'http://127.0.0.1:9/cb',
      seller_tax_id: '339902999999789113', clerk: '张三', first_poll_ms: 200, endpoint: 'nuonuo' });
    const cleared = (await db.pool.query(`select * from tax.put_config(p_unset => '{max_invoice_amount,callback_url}')`)).rows[0];
    expect(cleared).toMatchObject({ max_invoice_amount: null, callback_url: null, max_pdf_bytes: 2048 });
    expect(await sqlstateOf(db.pool.query(`select tax.put_config(p_unset => '{seller_tax_id}')`))).toBe(SqlState.invoicingSettingInvalid);
    for (const sql of [`update tax.config set max_pdf_bytes = 200`, `update tax.config set first_poll_ms = 0`,
      `update tax.config set poll_cap_ms = 10`, `update tax.config set max_polls = 0`, `update tax.config set max_invoice_lines = 0`]) {
      expect(await sqlstateOf(db.pool.query(sql)), sql).toBe('23514');
    }
  });

  it('the wait between queries doubles up to the cap and never overflows, however many polls', async () => {
    await db.pool.query(`select tax.put_config(p_first_poll_ms => 3000, p_poll_cap_ms => 60000)`);
    const { rows } = await db.pool.query(`select p, tax._poll_delay_ms(p)::int ms from unnest(array[1, 2, 3, 5, 6, 53, 64, 1000, 2147483647]) p order by p`);
    expect(rows.map((r) => r.ms)).toEqual([3000, 6000, 12000, 48000, 60000, 60000, 60000, 60000, 60000]);
  });
});

describe('operator recovery', () => {
  it('requery is refused (EI019) for an invoice not waiting for an answer, reissue (EI018) for one not refused for certain', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    await approve(db.pool, s.id);
    const [inv] = await invoicesOf(db.pool, s.id);
    expect(await sqlstateOf(db.pool.query(`select tax.requery_invoice($1)`, [inv!.id]))).toBe(SqlState.invoiceRequeryRefused);
    expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id]))).toBe(SqlState.invoiceReissueRefused);
    for (const code of ['unknown_outcome', 'poll_limit']) {
      await db.pool.query(`update tax.invoice set invoice_status = 'failed', error_code = $2 where id = $1`, [inv!.id, code]);
      expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id])), code).toBe(SqlState.invoiceReissueRefused);
    }
    await db.pool.query(`select tax.requery_invoice($1)`, [inv!.id]);
    const q = await db.pool.query(`select payload from cloud.outbox where operation = 'tax.query' and aggregate_id = $1`, [inv!.id]);
    expect(q.rows).toEqual([{ payload: { orderNos: [inv!.order_no], isOfferInvoiceDetail: '0' } }]);
  });
});

describe('what a failure proves', () => {
  it('only a permanent error when no earlier attempt reached the platform (counted in cloud.log), or a business refusal of this orderNo, proves nothing was created', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    await approve(db.pool, s.id);
    const [inv] = await invoicesOf(db.pool, s.id);
    const msg = (await db.pool.query(`select request_id from cloud.outbox where operation = 'tax.issue' and aggregate_id = $1`, [inv!.id])).rows[0];
    // earlier attempts as cloud.log has them; outbox.attempts says nothing (a replay resets it to 0)
    const refused = async (earlier: { http: number | null; cls: string | null }[], e: unknown) => {
      await db.pool.query(`delete from cloud.log where request_id = $1`, [msg.request_id]);
      await db.pool.query(`update cloud.outbox set attempts = 0 where request_id = $1`, [msg.request_id]);
      const all = [...earlier, { http: (e as { http_status: number | null }).http_status, cls: (e as { error_class: string }).error_class }];
      for (const [i, a] of all.entries()) {
        await db.pool.query(`insert into cloud.log (request_id, attempt, endpoint, operation, http_status, outcome, error_class, started_at)
                             values ($1, $2, 'nuonuo', 'tax.issue', $3, 'permanent', $4, now())`, [msg.request_id, i + 1, a.http, a.cls]);
      }
      const { rows } = await db.pool.query(`select tax._issue_refused(o, $2::jsonb) r from cloud.outbox o where request_id = $1`, [msg.request_id, JSON.stringify(e)]);
      return rows[0].r;
    };
    const timeout = { http: null, cls: 'timeout' };
    expect(await refused([timeout, { http: 503, cls: 'http_503' }], { status: 'dead', error_class: 'http_503', http_status: 503 })).toBe(false);
    expect(await refused([timeout], { status: 'dead', error_class: 'timeout', http_status: null })).toBe(false);
    expect(await refused([], { status: 'failed', error_class: 'sign_mismatch', http_status: 200, response: { code: '070601' } })).toBe(true);
    expect(await refused([timeout, timeout], { status: 'failed', error_class: 'nuonuo_E9999', http_status: 200, response: { code: 'E9999' } })).toBe(true);
    // an earlier attempt may have got through, and the last one was not answered by the platform
    expect(await refused([timeout, timeout], { status: 'failed', error_class: 'config', http_status: null, response: { code: 'E9999' } })).toBe(false);
    expect(await refused([timeout, timeout], { status: 'failed', error_class: 'http_400', http_status: 400 })).toBe(false);
    // a gateway / credential refusal (070…) says nothing about the orderNo: after a timeout it proves nothing
    for (const [cls, code] of [['sign_mismatch', '070601'], ['nuonuo_070304', '070304'], ['token_refused', '070101']]) {
      expect(await refused([timeout], { status: 'failed', error_class: cls, http_status: 200, response: { code } }), code).toBe(false);
    }
    // attempts that never left (refused before sending) do not count
    expect(await refused([{ http: null, cls: 'egress_refused' }], { status: 'failed', error_class: 'nuonuo_E9999', http_status: 200, response: { code: 'E9999' } })).toBe(true);
  });

  it('max_polls answers of E9500 by orderNo (never E9106, never anything else) long enough after the submit let a new orderNo issue it', async () => {
    const c = await customer(db.pool);
    await db.pool.query(`select tax.put_config(p_e9500_min_wait_ms => 600000)`);
    const cases = [
      { what: 'only E9500, 11 min after the submit', submit: {}, since: '11 minutes', known: false, code: 'nuonuo_E9500' },
      { what: 'after E9106', submit: { submit: { code: 'E9106', duplicate: true } }, since: '11 minutes', known: false, code: 'poll_limit' },
      { what: 'only 2 min after the submit', submit: {}, since: '2 minutes', known: false, code: 'poll_limit' },
      { what: 'once answered 20 (开票中)', submit: {}, since: '11 minutes', known: true, code: 'poll_limit' },
    ];
    for (const k of cases) {
      const s = await settlement(db.pool, c, [good]);
      await approve(db.pool, s.id);
      const [inv] = await invoicesOf(db.pool, s.id);
      await db.pool.query(`update tax.invoice set invoice_status = 'issuing', polls = 28, tax_cloud_response = $2,
                             submitted_at = now() - $3::interval where id = $1`, [inv!.id, JSON.stringify(k.submit), k.since]);
      const query = (answer: unknown) => db.pool.query(`select tax.record_query_answered(o, $2::jsonb) from cloud.outbox o
                            where operation = 'tax.issue' and aggregate_id = $1`, [inv!.id, JSON.stringify(answer)]);
      await query(k.known ? { code: 'E0000', result: [{ orderNo: inv!.order_no, status: '20', statusMsg: '开票中' }] } : { code: 'E9500', describe: '发票不存在' });
      await query({ code: 'E9500', describe: '发票不存在' });
      const after = (await invoicesOf(db.pool, s.id))[0]!;
      expect(after.error_code, k.what).toBe(k.code);
      if (k.code === 'poll_limit') {
        expect(await sqlstateOf(db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id])), k.what).toBe(SqlState.invoiceReissueRefused);
      } else {
        await db.pool.query(`select tax.reissue_invoice($1)`, [inv!.id]);
        expect((await invoicesOf(db.pool, s.id))[0], k.what).toMatchObject({ invoice_status: 'pending', error_code: null });
      }
    }
  });

  it('a 20 (开票中) answer keeps the serial no.: the next query asks by it, and a later E9500 is never a refusal', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    await approve(db.pool, s.id);
    const [inv] = await invoicesOf(db.pool, s.id);
    await db.pool.query(`update tax.invoice set invoice_status = 'issuing', polls = 0, submitted_at = now() - interval '1 day' where id = $1`, [inv!.id]);
    await db.pool.query(`select tax.record_query_answered(o, $2::jsonb) from cloud.outbox o where operation = 'tax.issue' and aggregate_id = $1`,
      [inv!.id, JSON.stringify({ code: 'E0000', result: [{ serialNo: '24112400000000000001', orderNo: inv!.order_no, status: '20' }] })]);
    const row = (await db.pool.query(`select invoice_serial_no, order_known, next_query_id from tax.invoice where id = $1`, [inv!.id])).rows[0];
    expect(row).toMatchObject({ invoice_serial_no: '24112400000000000001', order_known: true });
    const q = await db.pool.query(`select payload from cloud.outbox where request_id = $1`, [row.next_query_id]);
    expect(q.rows[0].payload).toEqual({ serialNos: ['24112400000000000001'], isOfferInvoiceDetail: '0' });
  });
});

describe('tax ids', () => {
  it('the GB 32100 check digit accepts the reference examples and refuses a wrong one', async () => {
    const { rows } = await db.pool.query(`select c, tax.uscc_check_digit_ok(c) ok from unnest($1::text[]) c`,
      [[...USCC_OK, '91330108MA2H2FMAXF', '91110000802100433B', '91110108MA01KPGP0L', '91330106MA2AYNWD8N', '91330106MA2AYNWD8']]);
    expect(rows.map((r) => r.ok)).toEqual([true, true, true, true, true, true, false, false, false]);
  });

  it('15-, 17- and 20-character taxpayer numbers are accepted as they are', async () => {
    for (const id of ['330106123456789', '33010619900101123', '33010619900101123401']) {
      const c = await customer(db.pool, { taxId: id });
      const s = await settlement(db.pool, c, [good]);
      await approve(db.pool, s.id);
      expect(await invoicesOf(db.pool, s.id)).toHaveLength(1);
    }
  });
});

describe('the invoice event log', () => {
  it('records every change of invoice_no (trigger invoice_800_record_event), and nothing else', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    await approve(db.pool, s.id);
    const [inv] = await invoicesOf(db.pool, s.id);
    await db.pool.query(`update tax.invoice set invoice_status = 'issuing' where id = $1`, [inv!.id]);
    await db.pool.query(`update tax.invoice set invoice_no = '26352000000000000001', invoice_status = 'issued' where id = $1`, [inv!.id]);
    await db.pool.query(`update tax.invoice set invoice_no = invoice_no where id = $1`, [inv!.id]);
    await db.pool.query(`update tax.invoice set invoice_no = '26352000000000000002' where id = $1`, [inv!.id]);
    const { rows } = await db.pool.query(`select old_invoice_no, new_invoice_no, invoice_status from tax.invoice_event where invoice_id = $1 order by id`, [inv!.id]);
    expect(rows).toEqual([
      { old_invoice_no: null, new_invoice_no: '26352000000000000001', invoice_status: 'issued' },
      { old_invoice_no: '26352000000000000001', new_invoice_no: '26352000000000000002', invoice_status: 'issued' },
    ]);
    const trig = await db.pool.query(`select tgname, pg_get_triggerdef(oid) def from pg_trigger where tgrelid = 'tax.invoice'::regclass and not tgisinternal`);
    expect(trig.rows.map((r) => r.tgname)).toContain('invoice_800_record_event');
    expect(trig.rows.find((r) => r.tgname === 'invoice_800_record_event')!.def).toMatch(/AFTER UPDATE OF invoice_no ON tax\.invoice FOR EACH ROW EXECUTE FUNCTION tax\.tg_invoice__800_record_event\(\)/);
  });
});

describe('roles', () => {
  it('the ERP role approves (which issues) with no privilege on tax.config or the outbox, and cannot write any tax table itself', async () => {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [good]);
    const client = await db.pool.connect();
    try {
      await client.query('set role erp_cloud_app');
      await client.query(`update erp.settlement set status = 'approved' where id = $1`, [s.id]);
      expect(await sqlstateOf(client.query(`select * from tax.config`))).toBe('42501');
      expect(await sqlstateOf(client.query(`select count(*) from cloud.outbox`))).toBe('42501');
      expect(await sqlstateOf(client.query(`update tax.invoice set invoice_no = '26352000000000000009'`))).toBe('42501');
      // no tax table is the ERP role's to write: it hands documents and reversal requests in through the contracts only
      const [inv] = await invoicesOf(db.pool, s.id);
      const { rows: writable } = await client.query(`select c.oid::regclass::text t from pg_class c
          where c.relnamespace = 'tax'::regnamespace and c.relkind in ('r', 'p')
            and (has_table_privilege(c.oid, 'insert') or has_table_privilege(c.oid, 'update') or has_table_privilege(c.oid, 'delete')
                 or has_any_column_privilege(c.oid, 'insert') or has_any_column_privilege(c.oid, 'update'))`);
      expect(writable).toEqual([]);
      expect(await sqlstateOf(client.query(`insert into tax.reversal (invoice_id, reason, line_nos) values ($1, 'error', '{1}')`, [inv!.id]))).toBe('42501');
      // its own reversal request reaches the contract as its role (the invoice is not issued yet: EI013)
      expect(await sqlstateOf(client.query(`insert into erp.invoice_reversal (invoice_id, reason, line_nos) values ($1, '2', '{1}')`, [inv!.id])))
        .toBe(SqlState.reversalInvoiceNotIssued);
      expect(await sqlstateOf(client.query(`select tax.requery_invoice($1)`, [inv!.id]))).toBe('42501');
    } finally {
      await client.query('reset role');
      client.release();
    }
    expect(await invoicesOf(db.pool, s.id)).toHaveLength(1);
  });
});

