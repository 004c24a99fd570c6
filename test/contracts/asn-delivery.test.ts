/**
 * ASNs delivered to the ERP that owns the order (sql/migrations/0020_procurement_contract.sql):
 * scm.ingest_asn checks an ASN against the order erp-cloud knows, keeps it in scm.asn, and hands
 * an accepted one to the on_asn its order's source registered, in the ingest transaction. A
 * rejected ASN is kept with its reason and not delivered; a failing on_asn is kept as the ASN's
 * delivery_error and delivered again by scm.replay_callbacks.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqlState } from '../../listener/kernel/errors.js';
import { createTestDb, urlFor, type TestDb } from '../helpers/db.js';
import { asnDoc } from '../helpers/scm.js';

let db: TestDb;
const owner = `dock_owner_${randomBytes(4).toString('hex')}`;

beforeAll(async () => {
  db = await createTestDb('asn_delivery');
  const q = (sql: string) => db.pool.query(sql);
  await q(`select cloud.put_endpoint('yonbip', 'http://127.0.0.1:9', 'yonbip')`);
  await q(`create role ${owner} nologin in role erp_cloud_app`);
  await q(`create schema dock authorization ${owner}`);
  // the ERP's goods-receipt inbox: one row per ASN (a redelivery overwrites), one per line
  await q(`create table dock.inbox (asn_id bigint primary key, order_reference text, po_no text, asn_no text, supplier_code text, received_via text,
                                   carrier text, line_count integer, detail_code text, deliveries integer not null default 1)`);
  await q(`create table dock.inbox_line (asn_id bigint, line_no integer, po_line_no integer, material_code text, batch_no text, quantity numeric,
                                        primary key (asn_id, line_no))`);
  await q(`create table dock.switch (fail boolean not null)`);
  await q(`insert into dock.switch values (false)`);
  for (const t of ['inbox', 'inbox_line', 'switch']) await q(`alter table dock.${t} owner to ${owner}`);
  await q(`create function dock.on_asn(d scm.asn_delivery) returns void language plpgsql security definer set search_path = '' as $$
           begin
             insert into dock.inbox values (d.asn_id, d.order_reference, d.po_no, d.asn_no, d.supplier_code, d.received_via, d.carrier,
                                            cardinality(d.lines), d.detail ->> 'code')
             on conflict (asn_id) do update set deliveries = dock.inbox.deliveries + 1;
             insert into dock.inbox_line select d.asn_id, l.line_no, l.po_line_no, l.material_code, l.batch_no, l.quantity from unnest(d.lines) l
             on conflict do nothing;
             if (select fail from dock.switch) then
               raise exception 'receiving dock is closed' using errcode = 'P0001';
             end if;
           end $$`);
  await q(`alter function dock.on_asn(scm.asn_delivery) owner to ${owner}`);
  await q(`select scm.put_source('dock', p_document_label => '采购订单', p_on_asn => 'dock.on_asn(scm.asn_delivery)')`);
  // the orders the ASNs ship against: supplier S001, lines 1 (M-100 × 100) and 2 (M-200 × 50)
  for (const ref of ['CG-1', 'CG-2']) {
    await db.pool.query(`select scm.enqueue_order('dock', $1, $2)`, [ref, JSON.stringify({
      po_no: `PO-${ref}`, supplier: { code: 'S001', name: '苏州精密制造' },
      lines: [{ line_no: 1, material_code: 'M-100', material_name: '六角螺栓 M8', quantity: 100, price: 1.5 },
        { line_no: 2, material_code: 'M-200', material_name: '垫圈 8mm', quantity: 50, price: 0.2 }],
    })]);
  }
});

afterAll(async () => {
  await db.drop();
  const admin = new pg.Client({ connectionString: urlFor('postgres') });
  await admin.connect();
  await admin.query(`drop role if exists ${owner}`);
  await admin.end();
});

const ingest = (doc: unknown, via = 'push', eventId: string | null = null) =>
  db.pool.query(`select (r).* from scm.ingest_asn($1::jsonb, $2, $3) r`, [JSON.stringify(doc), via, eventId]).then((r) => r.rows[0] as {
    asn_id: string; status: string; reject_code: string | null });
const inbox = async (asnId: string) => (await db.pool.query(`select * from dock.inbox where asn_id = $1`, [asnId])).rows[0];
const statusOf = async (asnId: string) => (await db.pool.query(`select * from scm.asn_status where asn_id = $1`, [asnId])).rows[0];

describe('an accepted ASN is delivered to the on_asn of its order\'s source', () => {
  it('in the ingest transaction, once, by the order\'s reference, with its lines and the original document', async () => {
    const r = await ingest(asnDoc('ASN-1', 'PO-CG-1', [{ line: 1, qty: 30, batch: 'LOT-A' }, { line: 2, qty: 10 }]), 'push', 'ev-1');
    expect(r.status).toBe('accepted');
    expect(await inbox(r.asn_id)).toMatchObject({ order_reference: 'CG-1', po_no: 'PO-CG-1', asn_no: 'ASN-1', supplier_code: 'S001', received_via: 'push',
      carrier: '顺丰速运', line_count: 2, detail_code: 'ASN-1', deliveries: 1 });
    const lines = (await db.pool.query(`select po_line_no, material_code, batch_no, quantity::float8 q from dock.inbox_line where asn_id = $1 order by line_no`, [r.asn_id])).rows;
    expect(lines).toEqual([{ po_line_no: 1, material_code: 'M-100', batch_no: 'LOT-A', q: 30 }, { po_line_no: 2, material_code: 'M-200', batch_no: 'B-ASN-1-2', q: 10 }]);
    const s = await statusOf(r.asn_id);
    expect(s).toMatchObject({ source: 'dock', order_reference: 'CG-1', status: 'accepted', received_via: 'push', delivery_error: null });
    expect(s.delivered_at).not.toBeNull();
    expect(s.lines).toHaveLength(2);

    // the same ASN again (a pull after the push, the same event again) is a duplicate and is not delivered again
    expect((await ingest(asnDoc('ASN-1', 'PO-CG-1', [{ line: 1, qty: 30, batch: 'LOT-A' }, { line: 2, qty: 10 }]), 'pull')).status).toBe('duplicate');
    expect((await ingest(asnDoc('ASN-1', 'PO-CG-1', [{ line: 1, qty: 30, batch: 'LOT-A' }, { line: 2, qty: 10 }]), 'push', 'ev-1')).status).toBe('duplicate');
    expect((await inbox(r.asn_id)).deliveries).toBe(1);
    expect((await db.pool.query(`select count(*)::int n from dock.inbox`)).rows[0].n).toBe(1);
  });

  it('a rejected ASN is kept with its reason, visible in scm.asn_status, and never delivered', async () => {
    const over = await ingest(asnDoc('ASN-OVER', 'PO-CG-2', [{ line: 1, qty: 500 }]));
    expect([over.status, over.reject_code]).toEqual(['rejected', SqlState.asnQuantityOverOpen]);
    const unknown = await ingest(asnDoc('ASN-NOPO', 'PO-NONE', [{ line: 1, qty: 1 }]));
    expect([unknown.status, unknown.reject_code]).toEqual(['rejected', SqlState.asnUnknownPurchaseOrder]);
    for (const id of [over.asn_id, unknown.asn_id]) expect(await inbox(id)).toBeUndefined();
    expect(await statusOf(over.asn_id)).toMatchObject({ source: 'dock', order_reference: 'CG-2', status: 'rejected', reject_code: 'ES015', delivered_at: null, delivery_error: null });
    expect(await statusOf(unknown.asn_id)).toMatchObject({ source: null, order_reference: null, po_no: 'PO-NONE', status: 'rejected', delivered_at: null });
    // a closed order takes no deliveries
    await db.pool.query(`select scm.enqueue_order_close('dock', 'CG-2')`);
    const late = await ingest(asnDoc('ASN-LATE', 'PO-CG-2', [{ line: 1, qty: 1 }]));
    expect([late.status, late.reject_code]).toEqual(['rejected', SqlState.asnOrderNotOpen]);
    expect(await inbox(late.asn_id)).toBeUndefined();
  });

  it('a delivery that fails leaves the ASN accepted with its delivery_error, and scm.replay_callbacks delivers it', async () => {
    await db.pool.query(`update dock.switch set fail = true`);
    let r: Awaited<ReturnType<typeof ingest>>;
    try {
      r = await ingest(asnDoc('ASN-2', 'PO-CG-1', [{ line: 1, qty: 5 }]), 'portal');
    } finally {
      await db.pool.query(`update dock.switch set fail = false`);
    }
    expect(r.status).toBe('accepted');
    expect(await inbox(r.asn_id)).toBeUndefined(); // the callback's own writes were rolled back
    expect(await statusOf(r.asn_id)).toMatchObject({ status: 'accepted', delivered_at: null, delivery_error: 'P0001: receiving dock is closed' });
    const failures = await db.pool.query(`select source, event, sqlstate, replayed_at from scm.callback_failure where object_id = $1`, [r.asn_id]);
    expect(failures.rows).toEqual([{ source: 'dock', event: 'asn', sqlstate: 'P0001', replayed_at: null }]);
    // its quantity counts against the order although the ERP has not taken it yet
    expect((await ingest(asnDoc('ASN-3', 'PO-CG-1', [{ line: 1, qty: 66 }]))).reject_code).toBe(SqlState.asnQuantityOverOpen);

    expect((await db.pool.query(`select scm.replay_callbacks('dock') n`)).rows[0].n).toBe(1);
    expect(await inbox(r.asn_id)).toMatchObject({ asn_no: 'ASN-2', received_via: 'portal', deliveries: 1 });
    const s = await statusOf(r.asn_id);
    expect(s.delivery_error).toBeNull();
    expect(s.delivered_at).not.toBeNull();
    expect((await db.pool.query(`select scm.replay_callbacks('dock') n`)).rows[0].n).toBe(0);
  });

  it('an ASN whose order\'s source registered no on_asn is only kept', async () => {
    await db.pool.query(`select scm.put_source('dock', p_unset => '{on_asn}')`);
    try {
      const r = await ingest(asnDoc('ASN-4', 'PO-CG-1', [{ line: 2, qty: 1 }]));
      expect(r.status).toBe('accepted');
      expect(await inbox(r.asn_id)).toBeUndefined();
      expect(await statusOf(r.asn_id)).toMatchObject({ source: 'dock', delivered_at: null, delivery_error: null });
    } finally {
      await db.pool.query(`select scm.put_source('dock', p_on_asn => 'dock.on_asn(scm.asn_delivery)')`);
    }
  });
});
