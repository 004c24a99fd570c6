/**
 * What approval refuses before anything is written or sent, by class:
 * buyer tax ids against GB 32100's structure (and the override that only
 * forgives a check digit), numbers by their significant decimals, every text
 * the payload carries against the platform's length, and splitting that keeps
 * each invoice within the 1.27 tolerance. The flow through the simulator is in
 * invoicing-flow.test.ts.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, type TestDb } from './helpers/db.js';
import { approve, configureTax, customer, documentOf, invoicesOf, OATS, settlement, USCC_OK, withUsccCheckDigit, type CustomerOptions, type Line } from './helpers/invoicing.js';

let db: TestDb;
const good: Line = { item: '软件维护', amount: 106 };

beforeAll(async () => {
  db = await createTestDb('invoice_validation');
});
afterAll(async () => {
  await db.drop();
});
beforeEach(async () => {
  await configureTax(db.pool, 'http://127.0.0.1:9', 'app');
  await db.pool.query(`update tax.config set max_parts = 100`);
});

interface Refusal {
  code?: string;
  message: string;
  hint?: string;
}

async function taxMessages(): Promise<number> {
  const { rows } = await db.pool.query(`select count(*)::int n from cloud.outbox where operation like 'tax.%'`);
  return rows[0].n;
}

/** Approves a new settlement and returns the refusal, after checking that nothing was written or enqueued. */
async function refusal(c: CustomerOptions, lines: Line[] = [good], o: { no?: string } = {}): Promise<Refusal> {
  const id = await customer(db.pool, c);
  const s = await settlement(db.pool, id, lines, 'normal', o);
  const before = await taxMessages();
  const err = await approve(db.pool, s.id).then(() => null, (e: Refusal) => e);
  expect(err, `approval of ${JSON.stringify(c).slice(0, 80)} was refused`).not.toBeNull();
  expect(await taxMessages()).toBe(before);
  expect(await invoicesOf(db.pool, s.id)).toHaveLength(0);
  const st = await db.pool.query(`select status from erp.settlement where id = $1`, [s.id]);
  expect(st.rows[0].status).toBe('draft');
  return err!;
}

async function issued(c: CustomerOptions, lines: Line[] = [good], o: { no?: string } = {}) {
  const id = await customer(db.pool, c);
  const s = await settlement(db.pool, id, lines, 'normal', o);
  await approve(db.pool, s.id);
  const inv = await invoicesOf(db.pool, s.id);
  expect(inv.length).toBeGreaterThan(0);
  return { s, inv };
}

/** Puts `ch` at 1-based position `pos` of `id`. */
const at = (id: string, pos: number, ch: string) => id.slice(0, pos - 1) + ch + id.slice(pos);

describe('buyer tax ids: an 18-character USCC follows GB 32100', () => {
  const base = USCC_OK[0]!; // 91330106MA2AYNWD8M

  it('I, O, S, V or Z in any position is refused as a malformed code (EI020) naming the position, even with the override', async () => {
    for (let pos = 1; pos <= 18; pos++) {
      for (const letter of pos === 1 || pos === 18 ? ['I', 'O', 'S', 'V', 'Z'] : ['IOSVZ'[pos % 5]!]) {
        const id = at(base, pos, letter);
        for (const override of pos % 2 ? [true] : [true, false]) {
          const err = await refusal({ taxId: id, override });
          expect(err.code, `${id} override ${override}`).toBe(SqlState.invoiceUsccForbiddenCharacter);
          expect(err.message).toContain(`position ${pos} is '${letter}'`);
          expect(err.hint).toMatch(/never admits a malformed code/);
        }
      }
    }
  });

  it('a registration authority or an entity type the standard does not assign is refused (EI021), never as a check-digit failure', async () => {
    const bad = ['01', 'B1', 'C1', 'M1', 'X1', '94', '99', '10', '14', '24', '54', '73', '95', 'Y2', 'A2', 'N4'];
    for (const head of bad) {
      for (const override of [false, true]) {
        const id = withUsccCheckDigit(head + base.slice(2, 17));
        const err = await refusal({ taxId: id, override });
        expect(err.code, `${id} override ${override}`).toBe(SqlState.invoiceUsccAuthorityOrType);
        expect(err.message).toMatch(/position [12] \((registration authority|entity type)\)/);
      }
    }
  });

  it('a region code (positions 3–8) that is not six digits of a GB/T 2260 province is refused (EI022), even with the override', async () => {
    for (const region of ['000000', '990106', '700000', '093301', '20A106', '3301L6', '1A0000']) {
      for (const override of [false, true]) {
        const id = withUsccCheckDigit('91' + region + base.slice(8, 17));
        const err = await refusal({ taxId: id, override });
        expect(err.code, `${id} override ${override}`).toBe(SqlState.invoiceUsccRegion);
        expect(err.message).toContain('positions 3–8 (region code)');
      }
    }
  });

  it('every authority and type pair the standard assigns, national and provincial regions, with a right check digit, is issued', async () => {
    const heads = ['11', '12', '13', '19', '21', '29', '31', '32', '33', '34', '35', '39', '41', '51', '52', '53', '59', '61', '62', '69',
      '71', '72', '81', '89', '91', '92', '93', 'A1', 'A9', 'N1', 'N2', 'N3', 'N9', 'Y1'];
    for (const head of heads) await issued({ taxId: withUsccCheckDigit(head + '330106' + 'MA2AYNWD8') });
    for (const region of ['100000', '110000', '650102', '820000', '460100']) await issued({ taxId: withUsccCheckDigit('91' + region + 'MA2AYNWD8') });
    for (const id of USCC_OK) await issued({ taxId: id });
  });

  it('the override admits a well-formed code whose check digit fails (with a warning), and nothing else', async () => {
    const wrongDigit = at(base, 18, 'N');
    expect((await refusal({ taxId: wrongDigit })).code).toBe(SqlState.invoiceTaxIdCheckDigit);
    const { inv } = await issued({ taxId: wrongDigit, override: true });
    const { rows } = await db.pool.query(`select tax_id_warning from tax.invoice where id = $1`, [inv[0]!.id]);
    expect(rows[0].tax_id_warning).toMatch(/GB 32100 check digit/);
    // a malformed one fails for its structure, however its check digit comes out
    for (const id of [at(wrongDigit, 3, 'O'), at(wrongDigit, 1, '0'), at(wrongDigit, 4, '0'), at(base, 10, 'Z')]) {
      const err = await refusal({ taxId: id, override: true });
      expect(err.code, id).not.toBe(SqlState.invoiceTaxIdCheckDigit);
      expect([SqlState.invoiceUsccForbiddenCharacter, SqlState.invoiceUsccAuthorityOrType, SqlState.invoiceUsccRegion]).toContain(err.code);
    }
  });

  it('an 18-character resident identity number (GB 11643) is a legal buyer id; 15-, 17- and 20-character ids are accepted as before', async () => {
    for (const id of ['11010519491231002X', '440524198001010013', '510107200012315672', '33010619900101123X']) await issued({ taxId: id });
    for (const id of ['330106123456789', '33010619900101123', '33010619900101123401', '3301061234567AB']) await issued({ taxId: id });
    // a wrong check character or a date that never was: then it is read as a USCC, and refused for its structure
    for (const id of ['110105194912310021', '110105194913310023']) {
      expect([SqlState.invoiceUsccRegion, SqlState.invoiceUsccAuthorityOrType], id).toContain((await refusal({ taxId: id, override: true })).code);
    }
  });
});

describe('numbers: decimals are counted where they carry a value, not by the column scale', () => {
  it('quantities and prices with trailing zeros at any scale are accepted and sent without them', async () => {
    const cases: Array<[string, string, number, string, string]> = [
      ['2.0', '53.0', 106, '2', '53'],
      ['2.00000000', '53.00000000', 106, '2', '53'],
      ['2.0000000000', '53.0000000000', 106, '2', '53'],
      ['2.000000000000000000', '53.000000000000000000', 106, '2', '53'],
      ['100.0000000000', '0.1234567800000', 12.35, '100', '0.12345678'],
      ['0.50000000000000', '212.0000000000', 106, '0.5', '212'],
    ];
    for (const [qty, price, amount, num, sentPrice] of cases) {
      const { inv } = await issued({}, [{ item: '精度', qty, price, amount }]);
      const { rows } = await db.pool.query(`select payload->'order'->'invoiceDetail'->0 d from cloud.outbox where request_id = (select request_id from tax.invoice where id = $1)`, [inv[0]!.id]);
      expect(rows[0].d, qty).toMatchObject({ num, price: sentPrice });
    }
  });

  it('more than 8 significant decimals is still refused (EI005), whatever the scale, naming the field', async () => {
    for (const [qty, price, amount, field] of [['1.123456789', '10', 11.23, 'quantity'], ['1.1234567890000', '10', 11.23, 'quantity'],
      ['1', '10.123456789', 10.12, 'unit_price'], ['1.0000000000', '10.1234567891000', 10.12, 'unit_price']] as const) {
      const err = await refusal({}, [{ item: '精度', qty, price, amount }]);
      expect(err.code).toBe(SqlState.invoiceLineAmountInvalid);
      expect(err.message).toContain(`${field} `);
      expect(err.hint).toMatch(/8 decimals/);
    }
  });

  it('amounts, tax amounts and rates count significant decimals too', async () => {
    const check = (amount: string, rate: string, tax: string | null) =>
      db.pool.query(`select tax.validate_line(row(1, '行', $4, null, null, null, null, $1::numeric, $2::numeric, $3::numeric)::tax.source_line, 'doc')`,
        [amount, rate, tax, OATS]).then(() => 'ok', (e: { code: string }) => e.code);
    expect(await check('113.0000000000', '0.1300000000', null)).toBe('ok');
    expect(await check('113.0000000000', '0.1300000000', '13.0000000000')).toBe('ok');
    expect(await check('113.005', '0.13', null)).toBe(SqlState.invoiceLineAmountInvalid);
    expect(await check('113.00', '0.13', '13.001')).toBe(SqlState.invoiceLineTaxTolerance);
    expect(await check('113.00', '0.1300001', null)).toBe(SqlState.invoiceTaxRateInvalid);
  });
});

describe('texts: every field the invoice carries is refused over the platform length (in characters), accepted at it', () => {
  const x = (n: number, ch = '中') => ch.repeat(n);
  // field, its limit, the settlement that puts n characters into it
  const fields: Array<[string, number, (n: number) => { c: CustomerOptions; lines?: Line[]; no?: string }]> = [
    ['buyer_name', 100, (n) => ({ c: { name: x(n) } })],
    ['buyer_address', 80, (n) => ({ c: { address: x(n), phone: '1' } })],
    ['buyer_phone', 50, (n) => ({ c: { phone: x(n, '8'), address: '杭州' } })],
    ['buyer_address_phone', 100, (n) => ({ c: { address: x(60), phone: x(n - 60, '8') } })],
    ['buyer_account', 100, (n) => ({ c: { bankName: x(n - 21), bankAccount: x(20, '1') } })],
    ['buyer_email', 50, (n) => ({ c: { email: `${x(n - 12, 'a')}@example.com` } })],
    ['item_name', 90, (n) => ({ c: {}, lines: [good, { item: x(n), amount: 10 }] })],
    ['spec', 40, (n) => ({ c: {}, lines: [{ ...good, spec: x(n) }] })],
    ['unit', 20, (n) => ({ c: {}, lines: [{ ...good, unit: x(n) }] })],
    ['remark', 200, (n) => ({ c: {}, no: `JS-${x(n - 12, '号')}-${Math.random().toString(36).slice(2, 10).padEnd(8, '0')}` })],
  ];
  for (const [field, limit, make] of fields) {
    it(`${field}: ${limit} characters are sent, ${limit + 1} stop the approval with EI023 naming the field and the limit`, async () => {
      const atLimit = make(limit);
      await issued(atLimit.c, atLimit.lines, { no: atLimit.no });
      const over = make(limit + 1);
      const err = await refusal(over.c, over.lines, { no: over.no });
      expect(err.code).toBe(SqlState.invoiceTextTooLong);
      expect(err.message).toContain(`(${field}) is ${limit + 1} characters long`);
      expect(err.message).toContain(`at most ${limit}`);
      expect(err.hint).toMatch(/never cut short/);
    });
  }

  it('a 1,000-character item name is refused, and the message stays short', async () => {
    const err = await refusal({}, [{ item: '长'.repeat(1000), amount: 10 }]);
    expect(err.code).toBe(SqlState.invoiceTextTooLong);
    expect(err.message).toContain('(item_name) is 1000 characters long');
    expect(err.message.length).toBeLessThan(300);
  });

  it('the seller texts from tax.put_config are checked at approval too', async () => {
    for (const [param, field, limit] of [['p_seller_address', 'seller_address', 80], ['p_seller_phone', 'seller_phone', 20],
      ['p_seller_bank_account', 'seller_account', 100], ['p_clerk', 'clerk', 20]] as const) {
      const unset = field === 'seller_account' ? 'seller_bank_account' : field;
      try {
        await db.pool.query(`select tax.put_config(${param} => $1)`, ['中'.repeat(limit)]);
        await issued({});
        await db.pool.query(`select tax.put_config(${param} => $1)`, ['中'.repeat(limit + 1)]);
        const err = await refusal({});
        expect(err.code, field).toBe(SqlState.invoiceTextTooLong);
        expect(err.message).toContain(`(${field})`);
        expect(err.hint).toContain(param);
      } finally {
        await db.pool.query(field === 'clerk' ? `select tax.put_config(p_clerk => '张三')` : `select tax.put_config(p_unset => $1)`, field === 'clerk' ? [] : [[unset]]);
      }
    }
  });

  it('a limit is a setting (tax.put_text_limit); bad ones are refused with EI024', async () => {
    try {
      await db.pool.query(`select tax.put_text_limit('item_name', 120)`);
      await issued({}, [{ item: '中'.repeat(120), amount: 10 }]);
      expect((await refusal({}, [{ item: '中'.repeat(121), amount: 10 }])).code).toBe(SqlState.invoiceTextTooLong);
    } finally {
      await db.pool.query(`select tax.put_text_limit('item_name', 90)`);
    }
    for (const [f, n] of [['item_nam', 10], ['item_name', 0], ['item_name', 10001], ['item_name', null]] as const) {
      const err = await db.pool.query(`select tax.put_text_limit($1, $2)`, [f, n]).then(() => null, (e: Refusal) => e);
      expect(err?.code, `${f} ${n}`).toBe(SqlState.invoiceTextLimitSettingInvalid);
    }
    const { rows } = await db.pool.query(`select max_chars from tax.text_limit where field = 'item_name'`);
    expect(rows[0].max_chars).toBe(90);
  });
});

describe('the 1.27 invoice tax tolerance', () => {
  /** Σ(tax − excl × rate) of each enqueued payload, as the platform computes it. */
  async function payloadDeviations(settlementId: number): Promise<number[]> {
    const { rows } = await db.pool.query(`
      select (select sum((d->>'tax')::numeric - (d->>'taxExcludedAmount')::numeric * (d->>'taxRate')::numeric)
                from jsonb_array_elements(o.payload->'order'->'invoiceDetail') d)::float8 dev
        from tax.invoice i join cloud.outbox o on o.request_id = i.request_id
       where i.document_id = ${documentOf()} order by i.part_no`, [settlementId]);
    return rows.map((r) => r.dev);
  }

  it('300 lines of 1.00 at 13% with database-computed taxes split into invoices that each pass, adding up to the settlement exactly', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxLines: 2000 });
    const lines: Line[] = Array.from({ length: 300 }, (_, i) => ({ item: `配件${i + 1}`, code: OATS, rate: 0.13, amount: '1.00' }));
    const { s, inv } = await issued({}, lines);
    // 0.12 − 0.88 × 0.13 = 0.0056 a line: 226 lines reach 1.2656, the 227th would pass 1.27
    expect(inv.map((i) => i.part_no)).toEqual([1, 2]);
    for (const dev of await payloadDeviations(s.id)) expect(Math.abs(dev)).toBeLessThanOrEqual(1.27);
    const { rows } = await db.pool.query(`
      select count(*)::int lines, sum(l.amount_incl_tax)::text incl, sum(l.amount_excl_tax)::text excl, sum(l.tax_amount)::text tax,
             array_agg(l.source_line_no order by i.part_no, l.line_no) = array(select generate_series(1, 300)) in_order
        from tax.invoice i join tax.invoice_line l on l.invoice_id = i.id where i.document_id = ${documentOf()}`, [s.id]);
    expect(rows[0]).toEqual({ lines: 300, incl: '300.00', excl: '264.00', tax: '36.00', in_order: true });
    // each header is the sum of its lines, and the headers add up to the settlement
    const heads = await db.pool.query(`
      select bool_and(i.amount_incl_tax = t.inc and i.amount_excl_tax = t.ex and i.tax_amount = t.tx and i.part_count = 2) consistent,
             sum(i.amount_incl_tax)::text incl
        from tax.invoice i
        cross join lateral (select sum(amount_incl_tax) inc, sum(amount_excl_tax) ex, sum(tax_amount) tx from tax.invoice_line where invoice_id = i.id) t
       where i.document_id = ${documentOf()}`, [s.id]);
    expect(heads.rows[0]).toEqual({ consistent: true, incl: '300.00' });
  });

  it('clerk-set line taxes within 0.06 each but more than 1.27 together are split too, each invoice within the tolerance', async () => {
    const lines: Line[] = Array.from({ length: 25 }, (_, i) => ({ item: `行${i + 1}`, amount: 106, tax: 6.05 }));
    const { s, inv } = await issued({}, lines);
    expect(inv.length).toBe(2);
    for (const dev of await payloadDeviations(s.id)) expect(Math.abs(dev)).toBeLessThanOrEqual(1.27);
    expect(inv.reduce((sum, i) => sum + Math.round(Number(i.amount_incl_tax) * 100), 0)).toBe(2650_00);
  });

  it('when the tolerance needs more invoices than max_parts: EI008, and the hint never asks to clear a tax amount the clerk did not set', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxLines: 2000 });
    await db.pool.query(`update tax.config set max_parts = 1`);
    const computed = await refusal({}, Array.from({ length: 300 }, (_, i) => ({ item: `配件${i + 1}`, code: OATS, rate: 0.13, amount: '1.00' })));
    expect(computed.code).toBe(SqlState.invoiceTotalTaxTolerance);
    expect(computed.message).toContain('1.27');
    expect(computed.hint).not.toMatch(/tax_amount|tax amount|clear/i);
    expect(computed.hint).toMatch(/max_parts/);
    const clerk = await refusal({}, [good, ...Array.from({ length: 25 }, (_, i) => ({ item: `行${i + 2}`, amount: 106, tax: 6.05 }))]);
    expect(clerk.code).toBe(SqlState.invoiceTotalTaxTolerance);
    expect(clerk.hint).toMatch(/^Line\(s\) 2, 3, 4, .* carry a tax_amount of their own: clear it/);
    expect(clerk.hint).not.toMatch(/\b1, 2\b/);
  });

  it('when the line and amount limits alone need more invoices than max_parts, it stays EI006', async () => {
    await configureTax(db.pool, 'http://127.0.0.1:9', 'app', { maxLines: 1 });
    await db.pool.query(`update tax.config set max_parts = 2`);
    expect((await refusal({}, [good, good, good])).code).toBe(SqlState.invoiceLinesMissingOrTooMany);
  });
});
