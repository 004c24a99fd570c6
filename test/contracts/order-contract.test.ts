/**
 * The procurement contract any ERP calls (sql/migrations/0020_procurement_contract.sql):
 * scm.enqueue_order / scm.enqueue_order_close by (source, reference), the order's cloud state
 * by that key in scm.order_status, the source's on_order callback in the completing
 * transaction, and errors in the caller's own terms. A small ERP "buy" with its own role,
 * tables and pinyin names plays the caller; the cloud's answers are written as the write-backs
 * (scm.record_po_delivered / scm.record_po_refused) write them.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqlState } from '../../listener/kernel/errors.js';
import { createTestDb, inTransaction, urlFor, waitFor, type TestDb } from '../helpers/db.js';

let db: TestDb;
const owner = `buy_owner_${randomBytes(4).toString('hex')}`;
const portalLogin = `buy_portal_${randomBytes(4).toString('hex')}`;

const FIELD_NAMES = {
  reference: 'po_head.djbh', po_no: 'po_head.ddh', 'supplier.code': 'gys.gysbm', 'supplier.name': 'gys.gysmc',
  'lines[].line_no': 'po_line.hh', 'lines[].quantity': 'po_line.sl', 'lines[].price': 'po_line.dj', 'lines[].material_code': 'po_line.wlbm',
};

async function admin(sql: string): Promise<void> {
  const c = new pg.Client({ connectionString: urlFor('postgres') });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

beforeAll(async () => {
  db = await createTestDb('order_contract');
  const q = (sql: string) => db.pool.query(sql);
  await q(`select cloud.put_endpoint('yonbip', 'http://127.0.0.1:9', 'yonbip')`);
  await q(`create role ${owner} nologin in role erp_cloud_app`);
  await q(`create schema buy authorization ${owner}`);
  await q(`create table buy.result (reference text primary key, state text, operation text, cloud_status text, cloud_ref text, cloud_error text,
                                    revision integer, supplier_confirmed_at timestamptz, calls integer not null default 1)`);
  await q(`create table buy.switch (fail boolean not null)`);
  await q(`insert into buy.switch values (false)`);
  await q(`alter table buy.result owner to ${owner}`);
  await q(`alter table buy.switch owner to ${owner}`);
  // whole state in, UPDATE … SET out: being called twice is harmless (calls only counts them for the test)
  await q(`create function buy.on_order(r scm.order_result) returns void language plpgsql security definer set search_path = '' as $$
           begin
             if (select fail from buy.switch) then
               raise exception 'buyer desk is closed' using errcode = 'P0001';
             end if;
             insert into buy.result values (r.reference, r.state, r.operation, r.cloud_status, r.cloud_ref, r.cloud_error, r.revision, r.supplier_confirmed_at)
             on conflict (reference) do update set state = excluded.state, operation = excluded.operation, cloud_status = excluded.cloud_status,
               cloud_ref = excluded.cloud_ref, cloud_error = excluded.cloud_error, revision = excluded.revision,
               supplier_confirmed_at = excluded.supplier_confirmed_at, calls = buy.result.calls + 1;
           end $$`);
  await q(`create function buy.invoker_callback(r scm.order_result) returns void language sql as $$ select $$`);
  await q(`create function buy.wrong_signature(r text) returns void language sql security definer set search_path = '' as $$ select $$`);
  await q(`create function buy.superuser_callback(r scm.order_result) returns void language sql security definer set search_path = '' as $$ select $$`);
  for (const f of ['on_order(scm.order_result)', 'invoker_callback(scm.order_result)', 'wrong_signature(text)']) {
    await q(`alter function buy.${f} owner to ${owner}`);
  }
  await db.pool.query(`select scm.put_source('buy', p_document_label => '采购订单', p_on_order => 'buy.on_order(scm.order_result)', p_field_names => $1)`,
    [JSON.stringify(FIELD_NAMES)]);
});

afterAll(async () => {
  await db.drop();
  await admin(`drop role if exists ${owner}`);
  await admin(`drop role if exists ${portalLogin}`);
});

let refSeq = 0;
const newRef = () => `CG-${process.pid}-${++refSeq}`;

function order(o: { poNo: string; supplier?: string; lines?: Array<Record<string, unknown>>; note?: string }) {
  return {
    po_no: o.poNo,
    supplier: { code: o.supplier ?? 'GYS01', name: o.supplier === 'GYS02' ? '宁波港务物流' : '苏州精密制造', tax_id: '91320500MA1W0000X1' },
    currency: 'CNY', order_date: '2026-12-06', purchase_org: 'ORG-SH', note: o.note ?? null,
    lines: o.lines ?? [
      { line_no: 1, material_code: 'M-100', material_name: '六角螺栓 M8', quantity: 100, unit: 'PCS', price: 1.5, tax_rate: 0.13, delivery_date: '2026-12-20' },
      { line_no: 2, material_code: 'M-200', material_name: '垫圈 8mm', quantity: '50', price: '0.2', tax_rate: 0.13 },
    ],
  };
}

type Enqueued = { order_id: string; operation: string | null; request_id: string | null };
const enqueue = (ref: string, doc: unknown, client: pg.Pool | pg.PoolClient = db.pool, source = 'buy') =>
  client.query(`select (r).* from scm.enqueue_order($1, $2, $3) r`, [source, ref, JSON.stringify(doc)]).then((r) => r.rows[0] as Enqueued);
const close = (ref: string, state = 'closed', client: pg.Pool | pg.PoolClient = db.pool) =>
  client.query(`select scm.enqueue_order_close('buy', $1, $2) id`, [ref, state]).then((r) => r.rows[0].id as string | null);

interface PgError { code: string; message: string; detail?: string; hint?: string }
const refusal = (p: Promise<unknown>) => p.then(() => { throw new Error('expected a refusal'); }, (e: PgError) => e);

const messagesOf = async (ref: string) => (await db.pool.query(
  `select o.operation, o.status, o.request_id, o.ordering_key, o.payload from cloud.outbox o
     join scm.order_status s on o.aggregate_type = 'scm.purchase_order' and o.aggregate_id = s.order_id::text
    where s.source = 'buy' and s.reference = $1 order by o.id`, [ref])).rows;
const statusOf = async (ref: string) => (await db.pool.query(`select * from scm.order_status where source = 'buy' and reference = $1`, [ref])).rows[0];
const resultOf = async (ref: string) => (await db.pool.query(`select * from buy.result where reference = $1`, [ref])).rows[0];

/** What the write-back does when the cloud accepts (or refuses) the message with this request_id. */
const delivered = (requestId: string, orderId = 'YC-1') =>
  db.pool.query(`select scm.record_po_delivered(o, $2) from cloud.outbox o where request_id = $1`, [requestId, JSON.stringify({ code: '200', data: { orderId } })]);
const refused = (requestId: string, message: string) =>
  db.pool.query(`select scm.record_po_refused(o, $2) from cloud.outbox o where request_id = $1`, [requestId, JSON.stringify({ status: 'failed', response: { message } })]);
const markSent = (requestId: string) => db.pool.query(`update cloud.outbox set status = 'sent' where request_id = $1`, [requestId]);

describe('an order goes in by (source, reference): publish, revise, nothing, close', () => {
  it('a new order is published: one scm.po_publish, ordered by its key, revision 0, state open, the lines as the cloud has them', async () => {
    const ref = newRef();
    const r = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    expect(r.operation).toBe('publish');
    const msgs = await messagesOf(ref);
    expect(msgs.map((m) => [m.operation, m.status, m.request_id, m.ordering_key])).toEqual([['scm.po_publish', 'pending', r.request_id, `scm.purchase_order:${r.order_id}`]]);
    expect(msgs[0].payload).toMatchObject({ revision: 0, orderdatas: [{ orderno: `PO-${ref}`, supplierCode: 'GYS01', currencyCode: 'CNY' }] });
    expect(msgs[0].payload.itemdatas).toHaveLength(2);
    const s = await statusOf(ref);
    expect(s).toMatchObject({ order_id: r.order_id, po_no: `PO-${ref}`, supplier_code: 'GYS01', state: 'open', operation: 'publish', cloud_status: 'queued', revision: 0 });
    expect(s.lines.map((l: { line_no: number; quantity: string }) => [l.line_no, Number(l.quantity)])).toEqual([[1, 100], [2, 50]]);
    // the caller has the result: its own call does not call it back
    expect(await resultOf(ref)).toBeUndefined();
  });

  it('handed in again unchanged, nothing is sent; changed, one revision follows; closed, the close follows, once', async () => {
    const ref = newRef();
    const first = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    expect(await enqueue(ref, order({ poNo: `PO-${ref}` }))).toEqual({ order_id: first.order_id, operation: null, request_id: null });
    const rev = await enqueue(ref, order({ poNo: `PO-${ref}`, note: '加急' }));
    expect(rev).toMatchObject({ order_id: first.order_id, operation: 'revise' });
    const closing = await close(ref);
    expect(closing).toBeTruthy();
    expect(await close(ref)).toBeNull(); // closed already: nothing more
    const msgs = await messagesOf(ref);
    expect(msgs.map((m) => [m.operation, m.payload.revision ?? null])).toEqual([['scm.po_publish', 0], ['scm.po_revise', 1], ['scm.po_close', null]]);
    expect(msgs[2].request_id).toBe(closing);
    expect(await statusOf(ref)).toMatchObject({ state: 'closed', operation: 'close', revision: 2 });
    // a closed order is final
    const err = await refusal(enqueue(ref, order({ poNo: `PO-${ref}`, note: '再来' })));
    expect(err.code).toBe(SqlState.poFinal);
  });

  it('changed several times in one transaction, one revision goes, built from the last document', async () => {
    const ref = newRef();
    const published = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await markSent(published.request_id!);
    const requestIds = await inTransaction(db.pool, async (c) => {
      const a = await enqueue(ref, order({ poNo: `PO-${ref}`, note: 'first' }), c);
      const b = await enqueue(ref, order({ poNo: `PO-${ref}`, note: 'second', lines: [
        { line_no: 1, material_code: 'M-100', material_name: '六角螺栓 M8', quantity: 120, price: 1.5 }] }), c);
      return [a, b];
    });
    expect(requestIds.map((r) => r.operation)).toEqual(['revise', 'revise']);
    expect(requestIds[1]!.request_id).toBe(requestIds[0]!.request_id);
    const msgs = await messagesOf(ref);
    expect(msgs.map((m) => m.operation)).toEqual(['scm.po_publish', 'scm.po_revise']);
    expect(msgs[1].payload).toMatchObject({ revision: 1, orderdatas: [{ memo: 'second' }], itemdatas: [{ lineNum: 1, purchaseNum: 120 }] });
    expect(msgs[1].payload.itemdatas).toHaveLength(1);
    expect((await statusOf(ref)).revision).toBe(1);
    // a publish and its changes in one transaction are one publish
    const other = newRef();
    await inTransaction(db.pool, async (c) => {
      await enqueue(other, order({ poNo: `PO-${other}` }), c);
      await enqueue(other, order({ poNo: `PO-${other}`, note: 'changed before commit' }), c);
    });
    expect((await messagesOf(other)).map((m) => [m.operation, m.payload.revision, m.payload.orderdatas[0].memo])).toEqual([['scm.po_publish', 0, 'changed before commit']]);
  });

  it('an order published and cancelled in one transaction (a cancelled draft) sends nothing at all', async () => {
    const ref = newRef();
    const closed = await inTransaction(db.pool, async (c) => {
      await enqueue(ref, order({ poNo: `PO-${ref}` }), c);
      return close(ref, 'cancelled', c);
    });
    expect(closed).toBeNull();
    expect(await messagesOf(ref)).toEqual([]);
    expect(await statusOf(ref)).toMatchObject({ state: 'cancelled', revision: null, cloud_status: null });
  });

  it("rolled back with the caller's transaction, nothing exists and nothing is sent", async () => {
    const ref = newRef();
    await inTransaction(db.pool, async (c) => {
      expect((await enqueue(ref, order({ poNo: `PO-${ref}` }), c)).operation).toBe('publish');
    }, false);
    expect(await statusOf(ref)).toBeUndefined();
    expect((await enqueue(ref, order({ poNo: `PO-${ref}` }))).operation).toBe('publish');
  });

  it("the ERP's role calls the contract and reads the view, and cannot write erp-cloud's tables", async () => {
    const ref = newRef();
    await inTransaction(db.pool, async (c) => {
      await c.query(`set local role ${owner}`);
      expect((await enqueue(ref, order({ poNo: `PO-${ref}` }), c)).operation).toBe('publish');
      expect((await c.query(`select state from scm.order_status where source = 'buy' and reference = $1`, [ref])).rows).toEqual([{ state: 'open' }]);
      await c.query('savepoint s');
      await expect(c.query(`update scm.purchase_order set cloud_status = 'published'`)).rejects.toMatchObject({ code: '42501' });
      await c.query('rollback to savepoint s');
      await expect(c.query(`select scm.put_source('buy', p_document_label => 'x')`)).rejects.toMatchObject({ code: '42501' });
    });
  });
});

describe('suppliers', () => {
  it("a supplier the ERP puts by code gets erp-cloud's own id, the same one every time; the ERP looks it up by code", async () => {
    const put = async (code: string, name: string) => (await db.pool.query(`select (scm.put_supplier($1, $2)).id`, [code, name])).rows[0].id as string;
    const first = await put('REF-SUP-1', '参考供应商');
    expect(await put('REF-SUP-1', '参考供应商（改）')).toBe(first);
    expect((await db.pool.query(`select name from scm.supplier where id = $1`, [first])).rows[0].name).toBe('参考供应商（改）');
    // the reference example's trigger puts its suppliers the same way, whatever its own ids are
    const { rows } = await db.pool.query(`insert into erp.supplier (id, code, name) overriding system value values (900, 'REF-SUP-2', '参考供应商') returning id`);
    expect(rows[0].id).toBe('900');
    const second = (await db.pool.query(`select id from scm.supplier where code = 'REF-SUP-2'`)).rows[0].id as string;
    expect(Number(second)).toBeGreaterThan(Number(first));
    expect((await refusal(db.pool.query(`select scm.put_supplier('bad code', 'x')`))).code).toBe(SqlState.orderDocumentMalformed);
    await db.pool.query(`delete from scm.supplier where code in ('REF-SUP-1', 'REF-SUP-2')`);
    await db.pool.query(`delete from erp.supplier where code in ('REF-SUP-2')`);
  });
});

describe("errors speak the caller's terms", () => {
  it("a malformed order is ES019: the message names the caller's field and line, DETAIL the JSON path, the hint what to do", async () => {
    const ref = newRef();
    const bad = order({ poNo: `PO-${ref}`, lines: [
      { line_no: 1, material_code: 'M-100', material_name: 'x', quantity: 1, price: 1 },
      { line_no: 2, material_code: 'M-200', material_name: 'y', quantity: -3, price: 1 }] });
    const err = await refusal(enqueue(ref, bad));
    expect(err.code).toBe(SqlState.orderDocumentMalformed);
    expect(err.message).toBe(`采购订单 ${ref} line 2: po_line.sl is -3, not a positive quantity`);
    expect(err.detail).toBe('$.lines[1].quantity');
    expect(err.hint).toContain('po_line.sl');
    const noCode = await refusal(enqueue(ref, { ...order({ poNo: `PO-${ref}` }), supplier: { name: '无编码' } }));
    expect(noCode.code).toBe(SqlState.orderDocumentMalformed);
    expect(noCode.message).toContain('gys.gysbm is missing');
    expect(noCode.detail).toBe('$.supplier.code');
    const badNumber = await refusal(enqueue(ref, order({ poNo: `PO-${ref}`, lines: [{ line_no: 1, material_code: 'M', material_name: 'x', quantity: 'lots', price: 1 }] })));
    expect([badNumber.code, badNumber.detail]).toEqual([SqlState.orderDocumentMalformed, '$.lines[0].quantity']);
    const twice = await refusal(enqueue(ref, order({ poNo: `PO-${ref}`, lines: [
      { line_no: 1, material_code: 'M', material_name: 'x', quantity: 1, price: 1 }, { line_no: 1, material_code: 'N', material_name: 'y', quantity: 1, price: 1 }] })));
    expect([twice.code, twice.detail]).toEqual([SqlState.orderDocumentMalformed, '$.lines[1].line_no']);
    expect(twice.message).toContain('po_line.hh');
    const empty = await refusal(enqueue(ref, order({ poNo: `PO-${ref}`, lines: [] })));
    expect(empty.code).toBe(SqlState.poWithoutLines);
    expect(await statusOf(ref)).toBeUndefined(); // nothing half-written
  });

  it("an order number another reference owns is ES022; a published order keeps its number and supplier (ES003)", async () => {
    const a = newRef();
    const b = newRef();
    await enqueue(a, order({ poNo: `PO-${a}` }));
    const taken = await refusal(enqueue(b, order({ poNo: `PO-${a}` })));
    expect(taken.code).toBe(SqlState.orderNumberTaken);
    expect(taken.message).toContain('po_head.ddh');
    expect(taken.message).toContain(a);
    expect(taken.detail).toBe('$.po_no');
    const renamed = await refusal(enqueue(a, order({ poNo: `PO-${a}-2` })));
    expect(renamed.code).toBe(SqlState.poFinal);
    expect(renamed.message).toContain('po_head.ddh');
    expect((await refusal(enqueue(a, order({ poNo: `PO-${a}`, supplier: 'GYS02' })))).code).toBe(SqlState.poFinal);
    expect(await statusOf(b)).toBeUndefined();
    expect((await messagesOf(a)).map((m) => m.operation)).toEqual(['scm.po_publish']);
  });

  it('closing an order never handed in is ES023; an unknown source is ES020; a state other than closed or cancelled is ES019', async () => {
    expect((await refusal(close('no-such-order'))).code).toBe(SqlState.orderUnknown);
    const unknown = await refusal(enqueue(newRef(), order({ poNo: 'PO-NOBODY' }), db.pool, 'nobody'));
    expect(unknown.code).toBe(SqlState.procurementSourceUnknown);
    expect(unknown.hint).toContain('scm.put_source');
    const ref = newRef();
    await enqueue(ref, order({ poNo: `PO-${ref}` }));
    expect((await refusal(close(ref, 'finished'))).code).toBe(SqlState.orderDocumentMalformed);
  });

  it.each([
    ['a callback of another signature', `select scm.put_source('buy', p_on_order => 'buy.wrong_signature(text)')`],
    ["a callback that would run with erp-cloud's rights (SECURITY INVOKER)", `select scm.put_source('buy', p_on_order => 'buy.invoker_callback(scm.order_result)')`],
    ['a callback owned by a superuser', `select scm.put_source('buy', p_on_order => 'buy.superuser_callback(scm.order_result)')`],
    ['an on_asn that takes an order result', `select scm.put_source('buy', p_on_asn => 'buy.on_order(scm.order_result)')`],
    ['a field map naming a path the order does not have', `select scm.put_source('buy', p_field_names => '{"buyer.tax_id": "x"}')`],
    ['a name that is not a plain identifier', `select scm.put_source('Buy Desk')`],
  ])('a source registration with %s is refused with ES021 and changes nothing', async (_what, sql) => {
    expect((await refusal(db.pool.query(sql))).code).toBe(SqlState.procurementSourceInvalid);
    expect((await db.pool.query(`select on_order::text, on_asn, field_names from scm.source where name = 'buy'`)).rows[0])
      .toEqual({ on_order: 'buy.on_order(scm.order_result)', on_asn: null, field_names: FIELD_NAMES });
  });
});

describe('results come back by (source, reference), and through on_order in the completing transaction', () => {
  it('on_order gets the whole state in the write-back that changed it: published, then revised, refused, closed', async () => {
    const ref = newRef();
    const pub = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await delivered(pub.request_id!, 'YC-77');
    expect(await resultOf(ref)).toMatchObject({ state: 'open', operation: 'publish', cloud_status: 'published', cloud_ref: 'YC-77', cloud_error: null, revision: 0, calls: 1 });
    await markSent(pub.request_id!);
    const rev = await enqueue(ref, order({ poNo: `PO-${ref}`, note: '改' }));
    expect((await resultOf(ref)).calls).toBe(1); // the enqueue itself does not call back
    await refused(rev.request_id!, '供应商未确认');
    expect(await resultOf(ref)).toMatchObject({ operation: 'revise', cloud_status: 'rejected', cloud_ref: 'YC-77', cloud_error: '供应商未确认', revision: 1, calls: 2 });
    const closing = await close(ref);
    await markSent(rev.request_id!);
    await delivered(closing!, 'YC-77');
    expect(await resultOf(ref)).toMatchObject({ state: 'closed', operation: 'close', cloud_status: 'closed', cloud_error: null, revision: 2, calls: 3 });
    expect(await statusOf(ref)).toMatchObject({ cloud_status: 'closed', cloud_ref: 'YC-77' });
  });

  it("the supplier's confirmation reaches on_order too", async () => {
    const ref = newRef();
    const pub = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await db.pool.query(`update scm.purchase_order set supplier_confirmed_at = '2026-12-07T08:00:00Z' where id = $1`, [pub.order_id]);
    expect((await resultOf(ref)).supplier_confirmed_at.toISOString()).toBe('2026-12-07T08:00:00.000Z');
    // and nothing is sent for it: the cloud's side did not change
    expect((await enqueue(ref, order({ poNo: `PO-${ref}` }))).operation).toBeNull();
  });

  it('a callback that fails never fails the write-back; the failure is kept and scm.replay_callbacks calls it again', async () => {
    const ref = newRef();
    const pub = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await db.pool.query(`update buy.switch set fail = true`);
    try {
      await delivered(pub.request_id!, 'YC-88');
    } finally {
      await db.pool.query(`update buy.switch set fail = false`);
    }
    expect(await statusOf(ref)).toMatchObject({ cloud_status: 'published', cloud_ref: 'YC-88' });
    expect(await resultOf(ref)).toBeUndefined();
    const failures = await db.pool.query(`select event, sqlstate, message, replayed_at from scm.callback_failure where object_id = $1 and event = 'order'`, [pub.order_id]);
    expect(failures.rows).toEqual([{ event: 'order', sqlstate: 'P0001', message: 'buyer desk is closed', replayed_at: null }]);
    expect((await db.pool.query(`select scm.replay_callbacks('buy') n`)).rows[0].n).toBeGreaterThanOrEqual(1);
    expect(await resultOf(ref)).toMatchObject({ cloud_status: 'published', cloud_ref: 'YC-88', calls: 1 });
    expect((await db.pool.query(`select count(*)::int n from scm.callback_failure where object_id = $1 and replayed_at is null`, [pub.order_id])).rows[0].n).toBe(0);
    expect((await db.pool.query(`select scm.replay_callbacks('buy') n`)).rows[0].n).toBe(0); // nothing left to replay
  });
});

/** Waits (bounded) until the backend with this pid waits for a lock. */
const waitsForLock = (pid: number) => waitFor(async () => (await db.pool.query(
  `select 1 from pg_stat_activity where pid = $1 and wait_event_type = 'Lock'`, [pid])).rowCount, { what: `backend ${pid} waiting for a lock` });
const deferredOf = async (orderId: string) => (await db.pool.query(
  `select sqlstate, attempts, replayed_at is not null as replayed from scm.callback_failure where object_id = $1 and event = 'order' order by id`, [orderId])).rows;

describe('a callback gives way to the ERP: it never makes PostgreSQL abort the ERP\'s transaction', () => {
  /** An order published, delivered (so buy.result has its row) and revised: the revision's answer is still to come. */
  async function revisedOrder() {
    const ref = newRef();
    const pub = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await delivered(pub.request_id!, 'YC-5');
    await markSent(pub.request_id!);
    const rev = await enqueue(ref, order({ poNo: `PO-${ref}`, note: '改期' }));
    return { ref, orderId: pub.order_id, rev: rev.request_id! };
  }

  it("the ERP closes an order while the write-back of its revision calls on_order on the ERP's row: the close commits, the callback is kept as deferred, and called again with the current state", async () => {
    const { ref, orderId, rev } = await revisedOrder();
    const erp = await db.pool.connect();
    const writeBack = await db.pool.connect();
    try {
      const erpPid = (await erp.query('select pg_backend_pid() pid')).rows[0].pid as number;
      await writeBack.query('begin');
      // the write-back has erp-cloud's order row …
      await writeBack.query('select 1 from scm.purchase_order where id = $1 for update', [orderId]);
      // … the ERP has its own row and, closing the order, waits for erp-cloud's
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = $1 for update', [ref]);
      const closing = erp.query(`select scm.enqueue_order_close('buy', $1) id`, [ref]);
      await waitsForLock(erpPid);
      // the write-back's callback now needs the ERP's row: the two wait for each other, the ERP since first
      await writeBack.query(`select scm.record_po_delivered(o, $2) from cloud.outbox o where request_id = $1`,
        [rev, JSON.stringify({ code: '200', data: { orderId: 'YC-5' } })]);
      await writeBack.query('commit');
      expect((await closing).rows[0].id).toBeTruthy();
      await erp.query('commit');
    } finally {
      await erp.query('rollback').catch(() => undefined);
      await writeBack.query('rollback').catch(() => undefined);
      erp.release();
      writeBack.release();
    }
    expect(await statusOf(ref)).toMatchObject({ state: 'closed', operation: 'close', cloud_status: 'queued' });
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: false }]);
    expect(await resultOf(ref)).toMatchObject({ operation: 'publish', revision: 0, calls: 1 }); // the ERP's row as it was
    expect((await db.pool.query(`select scm.replay_deferred_callbacks() n`)).rows[0].n).toBe(1);
    expect(await resultOf(ref)).toMatchObject({ state: 'closed', operation: 'close', cloud_status: 'queued', revision: 2, calls: 2 });
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: true }]);
    expect((await db.pool.query(`select scm.replay_deferred_callbacks() n`)).rows[0].n).toBe(0);
  });

  it('while the ERP still holds its row, each try gives way again on the same row, counted, no sooner than due; once the row is free the next try goes through', async () => {
    const { ref, orderId, rev } = await revisedOrder();
    const erp = await db.pool.connect();
    try {
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = $1 for update', [ref]);
      await delivered(rev);
      expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: false }]);
      // "now" for each try is the row's own last try plus so many ms: the test does not depend on the clock
      const replayAfter = (ms: number) => db.pool.query(`select scm.replay_deferred_callbacks(f.last_attempt_at + $2 * interval '1 ms') n
                                                            from scm.callback_failure f where f.object_id = $1`, [orderId, ms]).then((r) => r.rows[0].n);
      expect(await replayAfter(0)).toBe(0); // the first try is due at once: it gives way again
      expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 2, replayed: false }]);
      expect(await replayAfter(4_999)).toBe(0); // the next is due 5 s after that: asked earlier, nothing is called
      expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 2, replayed: false }]);
      expect(await replayAfter(5_000)).toBe(0); // due: it gives way again, on the same row
      expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 3, replayed: false }]);
      expect(await replayAfter(9_999)).toBe(0); // then 10 s
      await erp.query('commit');
      expect(await replayAfter(10_000)).toBe(1);
    } finally {
      await erp.query('rollback').catch(() => undefined);
      erp.release();
    }
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 3, replayed: true }]);
    expect(await resultOf(ref)).toMatchObject({ operation: 'revise', cloud_status: 'revised', revision: 1, calls: 2 });
  });

  it('a later call for the order that goes through delivers the whole state: the deferred one is done, never called after it', async () => {
    const { ref, orderId, rev } = await revisedOrder();
    const erp = await db.pool.connect();
    try {
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = $1 for update', [ref]);
      await delivered(rev);
    } finally {
      await erp.query('rollback');
      erp.release();
    }
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: false }]);
    await db.pool.query(`update scm.purchase_order set supplier_confirmed_at = '2026-12-08T09:00:00Z' where id = $1`, [orderId]);
    expect(await resultOf(ref)).toMatchObject({ operation: 'revise', cloud_status: 'revised', calls: 2 });
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: true }]);
    await db.pool.query(`select scm.replay_deferred_callbacks()`);
    expect((await resultOf(ref)).calls).toBe(2);
  });

  it('a fault of the callback is not called again by itself: it waits for the operator', async () => {
    const ref = newRef();
    const pub = await enqueue(ref, order({ poNo: `PO-${ref}` }));
    await db.pool.query(`update buy.switch set fail = true`);
    try {
      await delivered(pub.request_id!, 'YC-6');
    } finally {
      await db.pool.query(`update buy.switch set fail = false`);
    }
    expect(await deferredOf(pub.order_id)).toEqual([{ sqlstate: 'P0001', attempts: 1, replayed: false }]);
    expect((await db.pool.query(`select scm.replay_deferred_callbacks() n`)).rows[0].n).toBe(0);
    expect(await resultOf(ref)).toBeUndefined();
    expect(await deferredOf(pub.order_id)).toEqual([{ sqlstate: 'P0001', attempts: 1, replayed: false }]);
    await db.pool.query(`select scm.replay_callbacks('buy')`);
    expect(await resultOf(ref)).toMatchObject({ cloud_ref: 'YC-6' });
  });

  it('an ERP transaction closing 30 orders while one write-back answers all 30 commits: the write-back waits on the ERP once, not 30 times past the ERP\'s deadlock check', async () => {
    const orders = [];
    for (let i = 0; i < 30; i++) orders.push(await revisedOrder());
    const refs = orders.map((o) => o.ref);
    const erp = await db.pool.connect();
    const writeBack = await db.pool.connect();
    try {
      const erpPid = (await erp.query('select pg_backend_pid() pid')).rows[0].pid as number;
      await writeBack.query('begin');
      await writeBack.query('select 1 from scm.purchase_order where id = any($1) order by id for update', [orders.map((o) => o.orderId)]);
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = any($1) order by reference for update', [refs]);
      const closing = erp.query(`select count(scm.enqueue_order_close('buy', r))::int n from unnest($1::text[]) r`, [refs]);
      await waitsForLock(erpPid);
      await writeBack.query(`select count(scm.record_po_delivered(o, '{"code": "200"}')) from cloud.outbox o where request_id = any($1)`, [orders.map((o) => o.rev)]);
      await writeBack.query('commit');
      expect((await closing).rows[0].n).toBe(30);
      await erp.query('commit');
    } finally {
      await erp.query('rollback').catch(() => undefined);
      await writeBack.query('rollback').catch(() => undefined);
      erp.release();
      writeBack.release();
    }
    for (const ref of refs) expect(await statusOf(ref)).toMatchObject({ state: 'closed' });
    const kept = await db.pool.query(`select count(*)::int n, count(*) filter (where message like 'not called:%')::int not_called
                                        from scm.callback_failure where object_id = any($1) and replayed_at is null`, [orders.map((o) => o.orderId)]);
    expect(kept.rows[0]).toEqual({ n: 30, not_called: 29 });
    for (let round = 0; round < 3; round++) await db.pool.query(`select scm.replay_deferred_callbacks(now() + interval '1 hour', 10)`);
    for (const ref of refs) expect(await resultOf(ref)).toMatchObject({ state: 'closed', calls: 2 });
  });

  it('once a callback of a transaction gave way, its later callbacks are not called: the write-back waits on the ERP once, and both are called again later', async () => {
    const one = await revisedOrder();
    const two = await revisedOrder();
    const erp = await db.pool.connect();
    try {
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = any($1) for update', [[one.ref, two.ref]]);
      await inTransaction(db.pool, async (c) => {
        for (const o of [one, two]) {
          await c.query(`select scm.record_po_delivered(o, '{"code": "200"}') from cloud.outbox o where request_id = $1`, [o.rev]);
        }
        expect((await c.query(`select cloud.callback_gave_way() g`)).rows[0].g).toBe(true);
      });
      expect((await db.pool.query(`select cloud.callback_gave_way() g`)).rows[0].g).toBe(false); // that transaction's, not the session's
      const kept = await db.pool.query(`select object_id, sqlstate, message from scm.callback_failure where object_id = any($1) and replayed_at is null order by id`,
        [[one.orderId, two.orderId]]);
      expect(kept.rows.map((r) => [r.object_id, r.sqlstate])).toEqual([[one.orderId, '55P03'], [two.orderId, '55P03']]);
      expect(kept.rows[0].message).toMatch(/lock timeout/);
      expect(kept.rows[1].message).toBe('not called: a callback earlier in this transaction gave way to a lock');
      // a round that gives way again ends there: the second is not tried, so its tries are not counted
      await db.pool.query(`select scm.replay_deferred_callbacks(now() + interval '1 hour')`);
      expect((await db.pool.query(`select object_id, attempts from scm.callback_failure where object_id = any($1) order by id`, [[one.orderId, two.orderId]])).rows
        .map((r) => r.attempts)).toEqual([2, 1]);
      await erp.query('commit');
    } finally {
      await erp.query('rollback').catch(() => undefined);
      erp.release();
    }
    expect((await db.pool.query(`select scm.replay_deferred_callbacks(now() + interval '1 hour') n`)).rows[0].n).toBe(2);
    for (const o of [one, two]) expect(await resultOf(o.ref)).toMatchObject({ operation: 'revise', cloud_status: 'revised', calls: 2 });
  });

  it('a deferred callback that faults when called again is the operator\'s: its waiting row ends, the fault is kept', async () => {
    const { ref, orderId, rev } = await revisedOrder();
    const erp = await db.pool.connect();
    try {
      await erp.query('begin');
      await erp.query('select 1 from buy.result where reference = $1 for update', [ref]);
      await delivered(rev);
    } finally {
      await erp.query('rollback');
      erp.release();
    }
    await db.pool.query(`update buy.switch set fail = true`);
    try {
      expect((await db.pool.query(`select scm.replay_deferred_callbacks(now() + interval '1 hour') n`)).rows[0].n).toBe(0);
    } finally {
      await db.pool.query(`update buy.switch set fail = false`);
    }
    expect(await deferredOf(orderId)).toEqual([{ sqlstate: '55P03', attempts: 1, replayed: true }, { sqlstate: 'P0001', attempts: 1, replayed: false }]);
    expect((await db.pool.query(`select scm.replay_deferred_callbacks(now() + interval '1 hour') n`)).rows[0].n).toBe(0);
    await db.pool.query(`select scm.replay_callbacks('buy')`);
    expect(await resultOf(ref)).toMatchObject({ operation: 'revise', cloud_status: 'revised', calls: 2 });
  });

  it("the callback waits for a lock 50 ms, or the caller's shorter lock_timeout, and the caller's setting is as it was after it", async () => {
    const { ref, rev } = await revisedOrder();
    await inTransaction(db.pool, async (c) => {
      expect((await c.query(`select cloud.callback_lock_timeout() t`)).rows[0].t).toBe('50ms');
      await c.query(`set local lock_timeout = '10ms'`);
      expect((await c.query(`select cloud.callback_lock_timeout() t`)).rows[0].t).toBe('10ms');
      await c.query(`set local lock_timeout = '3s'`);
      expect((await c.query(`select cloud.callback_lock_timeout() t`)).rows[0].t).toBe('50ms');
      await c.query(`select scm.record_po_delivered(o, '{"code": "200"}') from cloud.outbox o where request_id = $1`, [rev]);
      expect((await c.query(`select current_setting('lock_timeout') t`)).rows[0].t).toBe('3s');
    });
    expect(await resultOf(ref)).toMatchObject({ operation: 'revise', cloud_status: 'revised' });
  });

  it.each([
    ['2s', '2000 ms'], ['0', '0 (no limit)'], ['1000', '1000 ms'], ['5min', '300000 ms'],
  ])('an on_order that sets its own lock_timeout %s is refused with ES021 (it would give the deadlock back to the ERP); under deadlock_timeout it is accepted', async (value, shown) => {
    await db.pool.query(`create or replace function buy.patient(r scm.order_result) returns void language sql security definer set search_path = '' set lock_timeout = '${value}' as $$ select $$`);
    await db.pool.query(`alter function buy.patient(scm.order_result) owner to ${owner}`);
    const e = await refusal(db.pool.query(`select scm.put_source('buy', p_on_order => 'buy.patient(scm.order_result)')`));
    expect(e).toMatchObject({ code: SqlState.procurementSourceInvalid });
    expect(e.message).toContain(`on_order buy.patient(scm.order_result) sets lock_timeout ${shown}`);
    expect(e.hint).toContain('Leave lock_timeout out');
    expect((await db.pool.query(`select on_order::text from scm.source where name = 'buy'`)).rows[0].on_order).toBe('buy.on_order(scm.order_result)');
    await db.pool.query(`alter function buy.patient(scm.order_result) set lock_timeout = '200ms'`);
    await db.pool.query(`select scm.put_source('buy', p_on_order => 'buy.patient(scm.order_result)')`);
    await db.pool.query(`select scm.put_source('buy', p_on_order => 'buy.on_order(scm.order_result)')`);
  });
});

describe('the supplier portal', () => {
  it('a supplier sees only its own orders through scm.order_status', async () => {
    const mine = newRef();
    const theirs = newRef();
    await enqueue(mine, order({ poNo: `PO-${mine}` }));
    await enqueue(theirs, order({ poNo: `PO-${theirs}`, supplier: 'GYS02' }));
    await admin(`create role ${portalLogin} login noinherit`);
    await admin(`grant erp_cloud_supplier_portal to ${portalLogin}`);
    await db.pool.query(`select scm.bind_portal_login($1, 'GYS02')`, [portalLogin]);
    const u = new URL(db.url);
    u.username = portalLogin;
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      await c.query('set role erp_cloud_supplier_portal');
      const { rows } = await c.query(`select reference, supplier_code from scm.order_status order by reference`);
      expect(rows).toEqual([{ reference: theirs, supplier_code: 'GYS02' }]);
      expect((await c.query(`select count(*)::int n from scm.order_status where reference = $1`, [mine])).rows[0].n).toBe(0);
      // it confirms its own order, and the ERP hears of it
      expect((await c.query(`update scm.purchase_order set supplier_confirmed_at = now() where po_no in ($1, $2)`, [`PO-${mine}`, `PO-${theirs}`])).rowCount).toBe(1);
    } finally {
      await c.end();
      await db.pool.query(`select scm.bind_portal_login($1, null)`, [portalLogin]);
    }
    expect((await resultOf(theirs)).supplier_confirmed_at).not.toBeNull();
  });
});
