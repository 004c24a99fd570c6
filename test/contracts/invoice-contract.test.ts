/**
 * The e-invoicing contract any ERP calls (sql/migrations/0019_invoice_contract.sql):
 * tax.enqueue_invoices by (source, reference), results by that key in tax.invoice_status,
 * the source's callback in the completing transaction, reversal / requery / reissue by
 * reference, and errors in the caller's own terms. A small ERP "shop" with its own role,
 * tables and names plays the caller; the cloud's answers are written as a write-back would.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqlState } from '../../listener/kernel/errors.js';
import { createTestDb, inTransaction, sqlstateOf, urlFor, waitFor, type TestDb } from '../helpers/db.js';
import { configureTax, OATS, SOFTWARE, USCC_OK } from '../helpers/invoicing.js';

let db: TestDb;
const owner = `shop_owner_${randomBytes(4).toString('hex')}`;

const FIELD_NAMES = {
  reference: 'so_head.djbh', kind: 'so_head.fplx', 'buyer.name': 'customer.khmc', 'buyer.tax_id': 'customer.khsh',
  'buyer.email': 'customer.yx', 'lines[].line_no': 'so_line.hh', 'lines[].item_name': 'so_line.spmc', 'lines[].tax_code': 'so_line.ssbm',
  'lines[].amount': 'so_line.je', 'lines[].tax_rate': 'so_line.slv',
};

beforeAll(async () => {
  db = await createTestDb('invoice_contract');
  await configureTax(db.pool, 'http://127.0.0.1:9', 'contract-test', { maxLines: 2 });
  const q = (sql: string) => db.pool.query(sql);
  await q(`create role ${owner} nologin in role erp_cloud_app`);
  await q(`create schema shop authorization ${owner}`);
  await q(`create table shop.customer (khbh text primary key, khmc text, khsh text)`);
  await q(`create table shop.result (reference text, invoice_id bigint, invoice_type text, event text, status text, invoice_no text, original_reference text,
                                     primary key (invoice_id, event))`);
  await q(`create table shop.switch (fail boolean not null)`);
  await q(`insert into shop.switch values (false)`);
  await q(`alter table shop.customer owner to ${owner}`);
  await q(`alter table shop.result owner to ${owner}`);
  await q(`alter table shop.switch owner to ${owner}`);
  await q(`create function shop.on_invoice(r tax.invoice_result) returns void language plpgsql security definer set search_path = '' as $$
           begin
             if (select fail from shop.switch) then
               raise exception 'shop is closed' using errcode = 'P0001';
             end if;
             insert into shop.result values (r.reference, r.invoice_id, r.invoice_type, r.event, r.status, r.invoice_no, r.original_reference)
             on conflict (invoice_id, event) do update set status = excluded.status, invoice_no = excluded.invoice_no;
           end $$`);
  await q(`create function shop.buyer_of(p_djbh text) returns jsonb language sql stable security definer set search_path = '' as $$
             select jsonb_build_object('name', c.khmc, 'tax_id', c.khsh) from shop.customer c where c.khbh = 'C1' $$`);
  await q(`create function shop.invoker_callback(r tax.invoice_result) returns void language sql as $$ select $$`);
  await q(`create function shop.wrong_signature(r text) returns void language sql security definer set search_path = '' as $$ select $$`);
  await q(`create function shop.superuser_callback(r tax.invoice_result) returns void language sql security definer set search_path = '' as $$ select $$`);
  for (const f of ['on_invoice(tax.invoice_result)', 'buyer_of(text)', 'invoker_callback(tax.invoice_result)', 'wrong_signature(text)']) {
    await q(`alter function shop.${f} owner to ${owner}`);
  }
  await db.pool.query(`select tax.put_source('shop', p_document_label => '销售开票单', p_on_invoice => 'shop.on_invoice(tax.invoice_result)',
                         p_field_names => $1)`, [JSON.stringify(FIELD_NAMES)]);
});

afterAll(async () => {
  await db.drop();
  const c = await db.pool.connect().catch(() => null);
  c?.release();
  const { default: pgm } = await import('pg');
  const admin = new pgm.Client({ connectionString: urlFor('postgres') });
  await admin.connect();
  await admin.query(`drop role if exists ${owner}`);
  await admin.end();
});

let refSeq = 0;
const newRef = () => `SO-${process.pid}-${++refSeq}`;

function document(o: { kind?: string; buyer?: Record<string, unknown>; lines?: Array<Record<string, unknown>> } = {}) {
  return {
    kind: o.kind ?? 'normal',
    buyer: o.buyer ?? { name: '华东机电有限公司', tax_id: USCC_OK[0] },
    lines: o.lines ?? [
      { line_no: 10, item_name: '软件服务', tax_code: SOFTWARE, amount: 106, tax_rate: 0.06 },
      { line_no: 20, item_name: '燕麦', tax_code: OATS, quantity: '2', unit_price: '50', amount: '100.00', tax_rate: 0.09 },
      { line_no: 30, item_name: '维护', tax_code: SOFTWARE, amount: 53, tax_rate: 0.06 },
    ],
  };
}

const enqueue = (ref: string, doc: unknown, source = 'shop', client: pg.Pool | pg.PoolClient = db.pool) =>
  client.query(`select tax.enqueue_invoices($1, $2, $3) ids`, [source, ref, JSON.stringify(doc)]).then((r) => (r.rows[0].ids as string[]).map(Number));

interface PgError { code: string; message: string; detail?: string; hint?: string }
const refusal = (p: Promise<unknown>) => p.then(() => { throw new Error('expected a refusal'); }, (e: PgError) => e);

async function countsOf(ref: string) {
  const { rows } = await db.pool.query(
    `select (select count(*)::int from tax.document where source = 'shop' and reference = $1) documents,
            (select count(*)::int from tax.invoice_status where source = 'shop' and reference = $1) invoices,
            (select count(*)::int from cloud.outbox o join tax.invoice_status s on o.aggregate_type = 'tax.invoice' and o.aggregate_id = s.invoice_id::text
              where s.source = 'shop' and s.reference = $1) messages`, [ref]);
  return rows[0] as { documents: number; invoices: number; messages: number };
}

/** What a write-back does when the cloud answers: the invoice is issued (or refused). */
const answer = (id: number, set: string) => db.pool.query(`update tax.invoice set ${set}, updated_at = now() where id = $1`, [id]);

describe('a document goes in by (source, reference), once', () => {
  it('returns the invoice ids in part order and enqueues one tax.issue per part', async () => {
    const ref = newRef();
    const ids = await enqueue(ref, document());
    expect(ids).toHaveLength(2); // three lines, at most two per invoice
    const { rows } = await db.pool.query(`select invoice_id, part_no, part_count, status, lines from tax.invoice_status where source = 'shop' and reference = $1 order by part_no`, [ref]);
    expect(rows.map((r) => Number(r.invoice_id))).toEqual(ids);
    expect(rows.map((r) => [r.part_no, r.part_count, r.status])).toEqual([[1, 2, 'pending'], [2, 2, 'pending']]);
    expect(rows.flatMap((r) => r.lines.map((l: { source_line_no: number }) => l.source_line_no))).toEqual([10, 20, 30]);
    expect(await countsOf(ref)).toEqual({ documents: 1, invoices: 2, messages: 2 });
    const payload = await db.pool.query(`select payload->'order'->>'remark' remark from cloud.outbox where aggregate_type = 'tax.invoice' and aggregate_id = $1`, [String(ids[0])]);
    expect(payload.rows[0].remark).toBe(`${ref} (1/2)`);
  });

  it('handed in again, the same ids come back and nothing more is enqueued; other content only warns', async () => {
    const ref = newRef();
    const first = await enqueue(ref, document());
    expect(await enqueue(ref, document())).toEqual(first);
    const warnings: string[] = [];
    const c = await db.pool.connect();
    try {
      c.on('notice', (n) => warnings.push(n.message ?? ''));
      expect(await enqueue(ref, document({ kind: 'special' }), 'shop', c)).toEqual(first);
    } finally {
      c.release();
    }
    expect(warnings.some((w) => w.includes('other content'))).toBe(true);
    expect(await countsOf(ref)).toEqual({ documents: 1, invoices: 2, messages: 2 });
  });

  it("rolled back with the caller's transaction, nothing exists and nothing is sent", async () => {
    const ref = newRef();
    await inTransaction(db.pool, async (c) => {
      expect(await enqueue(ref, document(), 'shop', c)).toHaveLength(2);
    }, false);
    expect(await countsOf(ref)).toEqual({ documents: 0, invoices: 0, messages: 0 });
    expect(await enqueue(ref, document())).toHaveLength(2);
  });

  it('an unregistered source is refused with EI026, saying how to register it', async () => {
    const err = await refusal(enqueue(newRef(), document(), 'nobody'));
    expect(err.code).toBe(SqlState.invoiceSourceUnknown);
    expect(err.hint).toContain('tax.put_source');
  });

  it("the ERP's role calls the contract and reads the views, and cannot write erp-cloud's tables", async () => {
    const ref = newRef();
    await inTransaction(db.pool, async (c) => {
      await c.query(`set local role ${owner}`);
      expect(await enqueue(ref, document(), 'shop', c)).toHaveLength(2);
      expect((await c.query(`select count(*)::int n from tax.invoice_status where reference = $1`, [ref])).rows[0].n).toBe(2);
      expect(await sqlstateOf(c.query(`update tax.invoice set invoice_no = 'x'`))).toBe('42501');
    }, false);
  });
});

describe("bad documents are refused in the caller's terms, and nothing is half-written", () => {
  const malformed: Array<[string, unknown, string, string]> = [
    ['not an object', [1, 2], '$', '$'],
    ['no kind', { ...document(), kind: undefined }, '$.kind', 'so_head.fplx'],
    ['a kind of its own', document({ kind: '01' }), '$.kind', 'so_head.fplx'],
    ['no buyer', { ...document(), buyer: undefined }, '$.buyer', 'buyer'],
    ['lines not an array', { ...document(), lines: { a: 1 } }, '$.lines', 'lines'],
    ['a line that is no object', document({ lines: [1] }), '$.lines[0]', 'lines[]'],
    ['a line without line_no', document({ lines: [{ item_name: 'x', tax_code: SOFTWARE, amount: 1, tax_rate: 0.06 }] }), '$.lines[0].line_no', 'so_line.hh'],
    ['a line number twice', document({ lines: [{ line_no: 1, item_name: 'a', tax_code: SOFTWARE, amount: 1, tax_rate: 0.06 }, { line_no: 1, item_name: 'b', tax_code: SOFTWARE, amount: 1, tax_rate: 0.06 }] }), '$.lines[1].line_no', 'so_line.hh'],
    ['an amount that is no number', document({ lines: [{ line_no: 1, item_name: 'a', tax_code: SOFTWARE, amount: '一百', tax_rate: 0.06 }] }), '$.lines[0].amount', 'so_line.je'],
    ['a rate given as true', document({ lines: [{ line_no: 1, item_name: 'a', tax_code: SOFTWARE, amount: 1, tax_rate: true }] }), '$.lines[0].tax_rate', 'so_line.slv'],
    ['a name given as an object', document({ buyer: { name: { zh: '华东' } } }), '$.buyer.name', 'customer.khmc'],
  ];
  for (const [what, doc, path, name] of malformed) {
    it(`${what}: EI025 naming ${name}, DETAIL ${path}`, async () => {
      const ref = newRef();
      const err = await refusal(enqueue(ref, doc));
      expect(err.code).toBe(SqlState.invoiceDocumentMalformed);
      expect(err.message).toContain(`销售开票单 ${ref}`);
      expect(err.message).toContain(name);
      expect(err.detail).toBe(path);
      expect(err.hint).toBeTruthy();
      expect(await countsOf(ref)).toEqual({ documents: 0, invoices: 0, messages: 0 });
    });
  }

  const invalid: Array<[string, ReturnType<typeof document>, string, string, string]> = [
    ['a malformed buyer tax id', document({ buyer: { name: '华东', tax_id: '9133 0106' } }), SqlState.invoiceTaxIdMalformed, 'customer.khsh', '$.buyer.tax_id'],
    ["a 专票 without the buyer's tax id", document({ kind: 'special', buyer: { name: '华东' } }), SqlState.invoiceSpecialNeedsTaxId, 'customer.khsh', '$.buyer.tax_id'],
    ['a buyer without a name', document({ buyer: { name: ' ' } }), SqlState.invoiceBuyerNameMissing, 'customer.khmc', '$.buyer.name'],
    ['a tax code that is not 19 digits', document({ lines: [{ line_no: 1, item_name: '好', tax_code: SOFTWARE, amount: 1, tax_rate: 0.06 }, { line_no: 2, item_name: '坏编码', tax_code: '304', amount: 1, tax_rate: 0.06 }] }),
      SqlState.invoiceTaxCodeInvalid, 'line 2 (坏编码): so_line.ssbm', '$.lines[1].tax_code'],
    ['a rate not in use', document({ lines: [{ line_no: 7, item_name: '行', tax_code: SOFTWARE, amount: 1, tax_rate: 0.07 }] }), SqlState.invoiceTaxRateInvalid, 'line 7 (行): so_line.slv', '$.lines[0].tax_rate'],
    ["an item name over the platform's length", document({ lines: [{ line_no: 1, item_name: '长'.repeat(91), tax_code: SOFTWARE, amount: 1, tax_rate: 0.06 }] }),
      SqlState.invoiceTextTooLong, 'so_line.spmc (item_name) is 91 characters long', '$.lines[0].item_name'],
  ];
  for (const [what, doc, code, inMessage, path] of invalid) {
    it(`${what}: ${code} names ${inMessage.split(': ').pop()!.split(' ')[0]} in the message and the hint, DETAIL ${path}`, async () => {
      const ref = newRef();
      const err = await refusal(enqueue(ref, doc));
      expect(err.code).toBe(code);
      expect(err.message).toContain(`销售开票单 ${ref}`);
      expect(err.message).toContain(inMessage);
      expect(err.detail).toBe(path);
      expect(err.hint).toBeTruthy();
      expect(await countsOf(ref)).toEqual({ documents: 0, invoices: 0, messages: 0 });
    });
  }

  it("a source without a field map hears the contract's own names", async () => {
    await db.pool.query(`select tax.put_source('plain')`);
    const err = await refusal(enqueue(newRef(), document({ buyer: { name: '华东', tax_id: 'abc' } }), 'plain'));
    expect(err.code).toBe(SqlState.invoiceTaxIdMalformed);
    expect(err.message).toContain('document SO-');
    expect(err.message).toContain(`buyer.tax_id 'abc'`);
  });
});

describe('registering a source (tax.put_source) refuses what would not work, with EI027', () => {
  const cases: Array<[string, string, unknown[]]> = [
    ['a name with capitals', `select tax.put_source('Shop')`, []],
    ['a field map naming no path of the document', `select tax.put_source('shop', p_field_names => '{"buyer.taxid": "customer.khsh"}')`, []],
    ['a field map with an empty name', `select tax.put_source('shop', p_field_names => '{"buyer.tax_id": ""}')`, []],
    ['a callback of another signature', `select tax.put_source('shop', p_on_invoice => 'shop.wrong_signature(text)')`, []],
    ["a callback that would run with erp-cloud's rights (SECURITY INVOKER)", `select tax.put_source('shop', p_on_invoice => 'shop.invoker_callback(tax.invoice_result)')`, []],
    ['a callback owned by a superuser', `select tax.put_source('shop', p_on_invoice => 'shop.superuser_callback(tax.invoice_result)')`, []],
    ['a refresh_buyer of another signature', `select tax.put_source('shop', p_refresh_buyer => 'shop.on_invoice(tax.invoice_result)')`, []],
    ['p_unset naming something else', `select tax.put_source('shop', p_unset => '{seller}')`, []],
  ];
  for (const [what, sql, params] of cases) {
    it(what, async () => {
      const err = await refusal(db.pool.query(sql, params));
      expect(err.code).toBe(SqlState.invoiceSourceRegistrationInvalid);
      expect(err.hint).toBeTruthy();
      const { rows } = await db.pool.query(`select on_invoice::text, refresh_buyer, field_names from tax.source where name = 'shop'`);
      expect(rows[0]).toEqual({ on_invoice: 'shop.on_invoice(tax.invoice_result)', refresh_buyer: null, field_names: FIELD_NAMES });
    });
  }
});

describe('results come back by (source, reference), and through the callback in the completing transaction', () => {
  it('the callback gets the whole state with the event, in the transaction that issued the invoice', async () => {
    const ref = newRef();
    const [a, b] = await enqueue(ref, document());
    await inTransaction(db.pool, async (c) => {
      await c.query(`update tax.invoice set invoice_status = 'issued', invoice_no = '26330000000000000001', updated_at = now() where id = $1`, [a]);
      const seen = await c.query(`select * from shop.result where invoice_id = $1`, [a]);
      expect(seen.rows).toEqual([{ reference: ref, invoice_id: String(a), invoice_type: 'blue', event: 'issued', status: 'issued', invoice_no: '26330000000000000001', original_reference: null }]);
    }, false);
    expect((await db.pool.query(`select count(*)::int n from shop.result where invoice_id = $1`, [a])).rows[0].n).toBe(0); // rolled back with it
    await answer(b!, `invoice_status = 'failed', error_code = 'E9106', error_message = '购方税号有误'`);
    const failed = await db.pool.query(`select event, status from shop.result where invoice_id = $1`, [b]);
    expect(failed.rows).toEqual([{ event: 'failed', status: 'failed' }]);
    const view = await db.pool.query(`select status, outcome, error_code from tax.invoice_status where invoice_id = $1`, [b]);
    expect(view.rows[0]).toEqual({ status: 'failed', outcome: 'refused', error_code: 'E9106' });
  });

  it('a callback that fails never fails the write-back; the failure is kept and tax.replay_callbacks calls it again', async () => {
    const ref = newRef();
    const [a] = await enqueue(ref, document());
    await db.pool.query(`update shop.switch set fail = true`);
    try {
      await answer(a!, `invoice_status = 'issued', invoice_no = '26330000000000000002'`);
    } finally {
      await db.pool.query(`update shop.switch set fail = false`);
    }
    expect((await db.pool.query(`select invoice_no from tax.invoice where id = $1`, [a])).rows[0].invoice_no).toBe('26330000000000000002');
    expect((await db.pool.query(`select count(*)::int n from shop.result where invoice_id = $1`, [a])).rows[0].n).toBe(0);
    const failures = await db.pool.query(`select event, sqlstate, message, replayed_at from tax.callback_failure where invoice_id = $1`, [a]);
    expect(failures.rows).toEqual([{ event: 'issued', sqlstate: 'P0001', message: 'shop is closed', replayed_at: null }]);
    expect((await db.pool.query(`select tax.replay_callbacks('shop') n`)).rows[0].n).toBeGreaterThanOrEqual(1);
    expect((await db.pool.query(`select event, invoice_no from shop.result where invoice_id = $1`, [a])).rows).toEqual([{ event: 'issued', invoice_no: '26330000000000000002' }]);
    expect((await db.pool.query(`select count(*)::int n from tax.callback_failure where invoice_id = $1 and replayed_at is null`, [a])).rows[0].n).toBe(0);
    expect((await db.pool.query(`select tax.replay_callbacks('shop') n`)).rows[0].n).toBe(0); // nothing left to replay
  });
});

describe("reversal (红冲) by the caller's reference: red and blue are keyed apart", () => {
  it("a reversal by the document's own line numbers makes a red invoice under the reversal's reference and leaves the blue one's number alone", async () => {
    const ref = newRef();
    const [a, b] = await enqueue(ref, document());
    await answer(a!, `invoice_status = 'issued', invoice_no = '26330000000000000011'`);
    await answer(b!, `invoice_status = 'issued', invoice_no = '26330000000000000012'`);
    const red = `HC-${ref}`;
    const ids = (await db.pool.query(`select tax.enqueue_reversal('shop', $1, $2, 'error', '{30}') ids`, [ref, red])).rows[0].ids.map(Number);
    expect(ids).toHaveLength(1); // line 30 is on the second part only
    const { rows } = await db.pool.query(`select reference, original_invoice_id, original_reference, reason, source_line_nos, status from red_invoice_status_v where invoice_id = $1`
      .replace('red_invoice_status_v', 'tax.red_invoice_status'), [ids[0]]);
    expect(rows[0]).toEqual({ reference: red, original_invoice_id: String(b), original_reference: ref, reason: 'error', source_line_nos: [30], status: 'pending' });
    // the red one is not a row of the document's invoices, and the blue one keeps its number
    expect((await db.pool.query(`select invoice_id, invoice_no from tax.invoice_status where reference = $1 order by part_no`, [ref])).rows)
      .toEqual([{ invoice_id: String(a), invoice_no: '26330000000000000011' }, { invoice_id: String(b), invoice_no: '26330000000000000012' }]);
    const payload = await db.pool.query(`select payload->>'redReason' reason from cloud.outbox where operation = 'tax.red_confirm' and aggregate_id = $1`, [String(ids[0])]);
    expect(payload.rows[0].reason).toBe('2'); // the platform's digit is the builder's business
    // asked again with the same reference: the same red invoice; with other lines: EI028
    expect((await db.pool.query(`select tax.enqueue_reversal('shop', $1, $2, 'error', '{30}') ids`, [ref, red])).rows[0].ids.map(Number)).toEqual(ids);
    expect((await refusal(db.pool.query(`select tax.enqueue_reversal('shop', $1, $2, 'allowance', '{30}')`, [ref, red]))).code).toBe(SqlState.reversalReferenceReused);
    // the red invoice's callback names the reversal, not the document
    await answer(ids[0], `invoice_status = 'issued', invoice_no = '26330000000000000013'`);
    const seen = await db.pool.query(`select reference, invoice_type, original_reference from shop.result where invoice_id = $1`, [ids[0]]);
    expect(seen.rows[0]).toEqual({ reference: red, invoice_type: 'red', original_reference: ref });
  });

  it('a reversal of lines the document does not have (EI015), of an unknown document (EI030) or with an unknown reason (EI014) is refused', async () => {
    const ref = newRef();
    const [a, b] = await enqueue(ref, document());
    await answer(a!, `invoice_status = 'issued', invoice_no = '26330000000000000021'`);
    await answer(b!, `invoice_status = 'issued', invoice_no = '26330000000000000022'`);
    expect((await refusal(db.pool.query(`select tax.enqueue_reversal('shop', $1, 'HC-x', 'error', '{99}')`, [ref]))).code).toBe(SqlState.reversalLineUnknown);
    expect((await refusal(db.pool.query(`select tax.enqueue_reversal('shop', 'no-such', 'HC-x', 'error')`))).code).toBe(SqlState.invoiceDocumentUnknown);
    expect((await refusal(db.pool.query(`select tax.enqueue_reversal('shop', $1, 'HC-y', '2')`, [ref]))).code).toBe(SqlState.reversalReasonInvalid);
    expect((await db.pool.query(`select count(*)::int n from tax.reversal r join tax.invoice i on i.id = r.invoice_id where i.id in ($1, $2)`, [a, b])).rows[0].n).toBe(0);
  });
});

describe("a callback gives way to the ERP: it never makes PostgreSQL abort the ERP's transaction", () => {
  it("the ERP asks for a reversal while a write-back calls on_invoice on a table the ERP holds: the reversal commits, the callback is kept as deferred and called again", async () => {
    const ref = newRef();
    const [a, b] = await enqueue(ref, document());
    await answer(a!, `invoice_status = 'issued', invoice_no = '26330000000000000021'`);
    await answer(b!, `invoice_status = 'issued', invoice_no = '26330000000000000022'`);
    const erp = await db.pool.connect();
    const writeBack = await db.pool.connect();
    let reversal: number[] = [];
    try {
      const erpPid = (await erp.query('select pg_backend_pid() pid')).rows[0].pid as number;
      await writeBack.query('begin');
      await writeBack.query('select 1 from tax.invoice where id = any($1) for update', [[a, b]]);
      await erp.query('begin');
      await erp.query('lock table shop.result in share row exclusive mode'); // an ERP job: nobody else writes it now
      const asked = erp.query(`select tax.enqueue_reversal('shop', $1, $2, 'error', '{30}') ids`, [ref, `HC-${ref}`]);
      await waitFor(async () => (await db.pool.query(`select 1 from pg_stat_activity where pid = $1 and wait_event_type = 'Lock'`, [erpPid])).rowCount,
        { what: 'the ERP waiting for the invoice' });
      // the write-back's callback now needs the ERP's table: the two wait for each other, the ERP since first
      await writeBack.query(`update tax.invoice set error_code = 'W01', updated_at = now() where id = $1`, [a]);
      await writeBack.query('commit');
      reversal = (await asked).rows[0].ids.map(Number);
      await erp.query('commit');
    } finally {
      await erp.query('rollback').catch(() => undefined);
      await writeBack.query('rollback').catch(() => undefined);
      erp.release();
      writeBack.release();
    }
    expect(reversal).toHaveLength(1);
    const kept = () => db.pool.query(`select event, sqlstate, attempts, replayed_at is not null replayed from tax.callback_failure where invoice_id = $1`, [a])
      .then((r) => r.rows);
    expect(await kept()).toEqual([{ event: 'changed', sqlstate: '55P03', attempts: 1, replayed: false }]);
    expect((await db.pool.query(`select count(*)::int n from shop.result where invoice_id = $1 and event = 'changed'`, [a])).rows[0].n).toBe(0);
    expect((await db.pool.query(`select tax.replay_deferred_callbacks() n`)).rows[0].n).toBeGreaterThanOrEqual(1);
    expect((await db.pool.query(`select status, invoice_no from shop.result where invoice_id = $1 and event = 'changed'`, [a])).rows)
      .toEqual([{ status: 'issued', invoice_no: '26330000000000000021' }]);
    expect(await kept()).toEqual([{ event: 'changed', sqlstate: '55P03', attempts: 1, replayed: true }]);
  });

  it('an on_invoice that sets its own lock_timeout of deadlock_timeout or more is refused with EI027; a refresh_buyer may (it reads, in the caller\'s transaction)', async () => {
    await db.pool.query(`create or replace function shop.patient(r tax.invoice_result) returns void language sql security definer set search_path = '' set lock_timeout = '1s' as $$ select $$`);
    await db.pool.query(`create or replace function shop.patient_buyer(p text) returns jsonb language sql stable security definer set search_path = '' set lock_timeout = '2s' as $$ select '{}'::jsonb $$`);
    await db.pool.query(`alter function shop.patient(tax.invoice_result) owner to ${owner}`);
    await db.pool.query(`alter function shop.patient_buyer(text) owner to ${owner}`);
    const e = await refusal(db.pool.query(`select tax.put_source('shop', p_on_invoice => 'shop.patient(tax.invoice_result)')`));
    expect(e).toMatchObject({ code: SqlState.invoiceSourceRegistrationInvalid });
    expect(e.message).toContain('on_invoice shop.patient(tax.invoice_result) sets lock_timeout 1000 ms');
    expect(e.detail).toContain('deadlock_timeout is 1s');
    expect((await db.pool.query(`select on_invoice::text from tax.source where name = 'shop'`)).rows[0].on_invoice).toBe('shop.on_invoice(tax.invoice_result)');
    const before = (await db.pool.query(`select refresh_buyer::text from tax.source where name = 'shop'`)).rows[0].refresh_buyer;
    await db.pool.query(`select tax.put_source('shop', p_refresh_buyer => 'shop.patient_buyer(text)')`);
    if (before) await db.pool.query(`select tax.put_source('shop', p_refresh_buyer => $1::regprocedure)`, [before]);
    else await db.pool.query(`select tax.put_source('shop', p_unset => '{refresh_buyer}')`);
  });
});

describe('requery and reissue by (source, reference)', () => {
  it('a refused invoice is reissued with the buyer the ERP has now (refresh_buyer), checked again in its terms', async () => {
    const ref = newRef();
    const [a, b] = await enqueue(ref, document());
    await answer(a!, `invoice_status = 'issued', invoice_no = '26330000000000000031'`);
    await answer(b!, `invoice_status = 'failed', error_code = 'E9106', error_message = '购方税号有误'`);
    // no buyer given and no refresh_buyer registered
    expect((await refusal(db.pool.query(`select tax.reissue_invoices('shop', $1)`, [ref]))).code).toBe(SqlState.invoiceReissueWithoutBuyer);
    await db.pool.query(`select tax.put_source('shop', p_refresh_buyer => 'shop.buyer_of(text)')`);
    try {
      await db.pool.query(`insert into shop.customer values ('C1', '华东机电有限公司', 'BAD ID') on conflict (khbh) do update set khsh = excluded.khsh`);
      const bad = await refusal(db.pool.query(`select tax.reissue_invoices('shop', $1)`, [ref]));
      expect(bad.code).toBe(SqlState.invoiceTaxIdMalformed);
      expect(bad.message).toContain('customer.khsh');
      await db.pool.query(`update shop.customer set khsh = $1 where khbh = 'C1'`, [USCC_OK[1]]);
      const reqs = (await db.pool.query(`select tax.reissue_invoices('shop', $1) ids`, [ref])).rows[0].ids;
      expect(reqs).toHaveLength(1); // only the refused part
      const sent = await db.pool.query(`select payload->'order'->>'buyerTaxNum' tax_id from cloud.outbox where request_id = $1`, [reqs[0]]);
      expect(sent.rows[0].tax_id).toBe(USCC_OK[1]);
      expect((await db.pool.query(`select event from shop.result where invoice_id = $1 order by event`, [b])).rows.map((r) => r.event)).toEqual(['failed', 'reissued']);
    } finally {
      await db.pool.query(`select tax.put_source('shop', p_unset => '{refresh_buyer}')`);
    }
  });

  it('a corrected buyer can be handed in directly; nothing to reissue (EI018), nothing waiting (EI019), an unknown document (EI030)', async () => {
    const ref = newRef();
    const [a] = await enqueue(ref, document({ lines: [{ line_no: 1, item_name: '软件服务', tax_code: SOFTWARE, amount: 106, tax_rate: 0.06 }] }));
    expect((await refusal(db.pool.query(`select tax.reissue_invoices('shop', $1)`, [ref]))).code).toBe(SqlState.invoiceReissueRefused);
    expect((await refusal(db.pool.query(`select tax.requery_invoices('shop', $1)`, [ref]))).code).toBe(SqlState.invoiceRequeryRefused);
    expect((await refusal(db.pool.query(`select tax.requery_invoices('shop', 'no-such')`))).code).toBe(SqlState.invoiceDocumentUnknown);
    await answer(a!, `invoice_status = 'failed', error_code = 'E9106'`);
    const buyer = { name: '华南机电有限公司', tax_id: USCC_OK[2] };
    await db.pool.query(`select tax.reissue_invoices('shop', $1, $2)`, [ref, JSON.stringify(buyer)]);
    const { rows } = await db.pool.query(`select buyer_name, buyer_tax_id, status from tax.invoice_status where invoice_id = $1`, [a]);
    expect(rows[0]).toEqual({ buyer_name: buyer.name, buyer_tax_id: buyer.tax_id, status: 'pending' });
    await answer(a!, `invoice_status = 'failed', error_code = 'unknown_outcome'`);
    expect((await db.pool.query(`select tax.requery_invoices('shop', $1) ids`, [ref])).rows[0].ids).toHaveLength(1);
    expect((await db.pool.query(`select status from tax.invoice_status where invoice_id = $1`, [a])).rows[0].status).toBe('issuing');
  });
});
