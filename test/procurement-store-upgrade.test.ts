/**
 * Migration 0020 on an installation that has been buying: a database migrated to 0019 with live
 * procurement data (a published PO the supplier confirmed, a closed PO, a draft, accepted and
 * rejected ASNs, a portal login bound to its supplier, and a PO whose publish the cloud refused
 * with its close parked behind it) is migrated to 0020. Suppliers, POs that left draft and ASNs
 * keep their ids and contents in scm.*, the outbox names scm.purchase_order, the portal login
 * still sees only its own supplier, the parked key resumes, and the reference ERP keeps
 * publishing through the contract without sending a revision for nothing.
 */
import { copyFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { migrationFilesThrough } from './helpers/legacy-release.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { createTestDb, urlFor, waitFor, type TestDb } from './helpers/db.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { addPo, addSuppliers, asnDoc, setupYonbip } from './helpers/scm.js';
import { migrateWith } from './helpers/examples.js';

let db: TestDb;
let sim: YonbipSim;
let listener: InProcessListener | null = null;
let dir19: string;
const login = `portal_up_${randomBytes(4).toString('hex')}`;

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
  db = await createTestDb('procurement_store_upgrade', { template: null });
  dir19 = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-0019-'));
  for (const f of readdirSync(migrationsDir).filter((x) => x.endsWith('.sql')).sort().slice(0, 19)) {
    copyFileSync(path.join(migrationsDir, f), path.join(dir19, f));
  }
  sim = await startYonbipSim();
});
afterAll(async () => {
  await listener?.stop();
  await sim?.close();
  await db?.drop();
  await admin(`drop role if exists ${login}`);
  if (dir19) rmSync(dir19, { recursive: true, force: true });
});

const cloudStatus = async (id: number) => (await db.pool.query(`select cloud_status from erp.purchase_order where id = $1`, [id])).rows[0]?.cloud_status as string | undefined;
const until = (id: number, status: string) => waitFor(async () => (await cloudStatus(id)) === status, { timeoutMs: 20_000, intervalMs: 50, what: `PO ${id} ${status}` });

const snapshot = {
  pos: `select id, po_no, supplier_id, status, currency, order_date, cloud_status, cloud_ref, cloud_error from erp.purchase_order order by id`,
  cloudSideBefore: `select id, cloud_revision, cloud_payload_hash, cloud_synced_at, supplier_confirmed_at from erp.purchase_order where status <> 'draft' order by id`,
  cloudSideAfter: `select id, cloud_revision, cloud_payload_hash, cloud_synced_at, supplier_confirmed_at from scm.purchase_order order by id`,
  suppliersBefore: `select id, code, name, tax_id, cloud_id from erp.supplier order by id`,
  suppliersAfter: `select id, code, name, tax_id, cloud_id from scm.supplier order by id`,
  asnsBefore: `select id, asn_no, supplier_code, supplier_id, po_no, po_id, status, reject_code, reject_reason, detail, source, cloud_event_id, received_at
                 from erp.asn_document order by id`,
  asnsAfter: `select id, asn_no, supplier_code, supplier_id, po_no, po_id, status, reject_code, reject_reason, detail, received_via as source, cloud_event_id, received_at
                from scm.asn order by id`,
  asnLinesBefore: `select * from erp.asn_line order by id`,
  asnLinesAfter: `select * from scm.asn_line order by id`,
  outbox: `select request_id, operation, status, aggregate_type, aggregate_id, ordering_key, attempts from cloud.outbox where operation like 'scm.po_%' order by request_id`,
  logins: `select login_role, supplier_id from scm.portal_login order by 1`,
};

describe('an installation that has been buying, upgraded to 0020', () => {
  const before: Record<string, Array<Record<string, unknown>>> = {};
  const po: Record<string, number> = {};
  let suppliers: { s1: number; s2: number };
  let parkedPublish: string;

  beforeAll(async () => {
    await migrateWith(db, dir19);
    await setupYonbip(db.pool, sim);
    suppliers = await addSuppliers(db.pool);
    listener = await startListener(db.url);

    // published, and confirmed by the supplier in the portal
    po.pub = await addPo(db.pool, 'PO-UP-PUB', suppliers.s1);
    await until(po.pub, 'published');
    await db.pool.query(`update erp.purchase_order set supplier_confirmed_at = '2026-12-01T09:00:00Z' where id = $1`, [po.pub]);
    // published, then closed
    po.closed = await addPo(db.pool, 'PO-UP-CLOSED', suppliers.s2);
    await until(po.closed, 'published');
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [po.closed]);
    await until(po.closed, 'closed');
    // a draft the cloud never saw
    po.draft = await addPo(db.pool, 'PO-UP-DRAFT', suppliers.s1, 'draft');
    // a publish the cloud refused; the close queued behind it is parked on the PO's ordering key
    sim.setFaults({ pathPrefix: '/iuap-api-gateway/yonbip/cpu/puorder/pubOrderToYC', schedule: [{ kind: 'status', status: 200, body: { code: '999', message: '供应商未注册' } }] });
    po.park = await addPo(db.pool, 'PO-UP-PARK', suppliers.s1);
    await until(po.park, 'rejected');
    sim.setFaults(null);
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [po.park]);
    await listener.stop();
    listener = null;

    // ASNs: accepted on the published PO; rejected on the closed one and on the draft
    const ingest = (doc: unknown) => db.pool.query(`select scm.ingest_asn($1::jsonb, 'push')`, [JSON.stringify(doc)]);
    await ingest(asnDoc('ASN-UP-1', 'PO-UP-PUB', [{ line: 1, qty: 30, batch: 'LOT-1' }, { line: 2, qty: 5 }]));
    await ingest(asnDoc('ASN-UP-2', 'PO-UP-CLOSED', [{ line: 1, qty: 1 }], 'S002'));
    await ingest(asnDoc('ASN-UP-3', 'PO-UP-DRAFT', [{ line: 1, qty: 1 }]));

    // a portal login bound to S001
    await admin(`create role ${login} login noinherit`);
    await admin(`grant erp_cloud_supplier_portal to ${login}`);
    await db.pool.query(`select scm.bind_portal_login($1, 'S001')`, [login]);

    for (const [k, sql] of Object.entries(snapshot)) if (!k.endsWith('After')) before[k.replace(/Before$/, '')] = (await db.pool.query(sql)).rows;
    parkedPublish = (before.outbox!.find((m) => m.operation === 'scm.po_publish' && m.status === 'failed')!).request_id as string;

    const through22 = migrationFilesThrough(migrationsDir, 22); // up to 0022: 0023 makes the reference ERP an example
    try {
      await migrateWith(db, through22.dir);
    } finally {
      through22.remove();
    }
  }, 120_000);

  it('the live data is what this test meant to build before the upgrade', () => {
    expect(before.pos!.map((r) => [r.po_no, r.status, r.cloud_status])).toEqual([
      ['PO-UP-PUB', 'approved', 'published'], ['PO-UP-CLOSED', 'closed', 'closed'], ['PO-UP-DRAFT', 'draft', null], ['PO-UP-PARK', 'closed', 'queued']]);
    expect(before.asns!.map((r) => [r.asn_no, r.status, r.reject_code])).toEqual([['ASN-UP-1', 'accepted', null], ['ASN-UP-2', 'rejected', 'ES016'], ['ASN-UP-3', 'rejected', 'ES016']]);
    expect(before.outbox!.map((m) => `${m.operation}:${m.status}:${m.aggregate_type}`)).toEqual(expect.arrayContaining([
      'scm.po_publish:failed:erp.purchase_order', 'scm.po_close:pending:erp.purchase_order', 'scm.po_close:sent:erp.purchase_order']));
    expect(before.logins).toEqual([{ login_role: login, supplier_id: String(suppliers.s1) }]);
  });

  it('keeps suppliers and every PO that left draft with its id and cloud side in scm; the ERP keeps its own columns', async () => {
    expect((await db.pool.query(snapshot.suppliersAfter)).rows).toEqual(before.suppliers);
    expect((await db.pool.query(snapshot.cloudSideAfter)).rows).toEqual(before.cloudSide);
    expect((await db.pool.query(snapshot.pos)).rows).toEqual(before.pos);
    const { rows } = await db.pool.query(`select source, reference, order_id, po_no, supplier_code, state, cloud_status, revision from scm.order_status order by order_id`);
    expect(rows).toEqual([
      { source: 'reference-erp', reference: 'PO-UP-PUB', order_id: String(po.pub), po_no: 'PO-UP-PUB', supplier_code: 'S001', state: 'open', cloud_status: 'published', revision: 0 },
      { source: 'reference-erp', reference: 'PO-UP-CLOSED', order_id: String(po.closed), po_no: 'PO-UP-CLOSED', supplier_code: 'S002', state: 'closed', cloud_status: 'closed', revision: 1 },
      { source: 'reference-erp', reference: 'PO-UP-PARK', order_id: String(po.park), po_no: 'PO-UP-PARK', supplier_code: 'S001', state: 'closed', cloud_status: 'queued', revision: 1 },
    ]);
    const cols = (await db.pool.query(`select column_name from information_schema.columns where table_schema = 'erp' and table_name = 'purchase_order'
                                         and column_name in ('cloud_revision', 'cloud_payload_hash', 'cloud_synced_at', 'supplier_confirmed_at', 'cloud_status')`)).rows;
    expect(cols).toEqual([{ column_name: 'cloud_status' }]);
    expect((await db.pool.query(snapshot.logins)).rows).toEqual(before.logins);
  });

  it('moves every ASN and line in place with its id; the link to a draft is dropped; the old names still read', async () => {
    const after = (await db.pool.query(snapshot.asnsAfter)).rows;
    expect(after).toEqual(before.asns!.map((r) => (r.asn_no === 'ASN-UP-3' ? { ...r, po_id: null } : r)));
    expect((await db.pool.query(snapshot.asnLinesAfter)).rows).toEqual(before.asnLines);
    expect((await db.pool.query(snapshot.asnsBefore)).rows).toEqual(after); // the compatibility view
    expect((await db.pool.query(snapshot.asnLinesBefore)).rows).toEqual(before.asnLines);
    expect((await db.pool.query(`select pg_get_indexdef('scm.asn_detail'::regclass) d`)).rows[0].d).toMatch(/USING gin \(detail jsonb_path_ops\)/);
    expect((await db.pool.query(`select asn_no, source, order_reference, delivered_at from scm.asn_status order by asn_id`)).rows.map((r) => [r.asn_no, r.order_reference]))
      .toEqual([['ASN-UP-1', 'PO-UP-PUB'], ['ASN-UP-2', 'PO-UP-CLOSED'], ['ASN-UP-3', null]]);
  });

  it('rewrites the aggregate type and ordering key of every PO message, whatever its status, and nothing else', async () => {
    expect((await db.pool.query(snapshot.outbox)).rows).toEqual(before.outbox!.map((m) => ({
      ...m, aggregate_type: 'scm.purchase_order', ordering_key: `scm.purchase_order:${m.aggregate_id}` })));
  });

  it('the bound portal login still sees only its own supplier\'s orders and ASNs', async () => {
    const u = new URL(db.url);
    u.username = login;
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      await c.query('set role erp_cloud_supplier_portal');
      expect((await c.query(`select po_no from scm.order_status order by po_no`)).rows).toEqual([{ po_no: 'PO-UP-PARK' }, { po_no: 'PO-UP-PUB' }]);
      expect((await c.query(`select asn_no from scm.asn_status order by asn_no`)).rows).toEqual([{ asn_no: 'ASN-UP-1' }, { asn_no: 'ASN-UP-3' }]);
      expect((await c.query(`select code from scm.supplier`)).rows).toEqual([{ code: 'S001' }]);
    } finally {
      await c.end();
    }
  });

  it('the parked key resumes once its publish is replayed, the ERP hears of it, and the reference ERP publishes through the contract', async () => {
    listener = await startListener(db.url);
    await db.pool.query(`select cloud.replay_message($1, 'supplier registered in the cloud')`, [parkedPublish]);
    await until(po.park, 'closed');
    expect((await db.pool.query(`select cloud_status, cloud_ref from scm.order_status where order_id = $1`, [po.park])).rows[0].cloud_status).toBe('closed');
    expect(sim.poLedger().filter((e) => e.orderno === 'PO-UP-PARK').map((e) => e.op)).toEqual(['publish', 'close']);

    // an ERP write that changes nothing the cloud sees sends nothing (the payload hash carried over)
    await db.pool.query(`update erp.purchase_order set status = 'changed' where id = $1`, [po.pub]);
    expect((await db.pool.query(`select count(*)::int n from cloud.outbox where ordering_key = $1`, [`scm.purchase_order:${po.pub}`])).rows[0].n).toBe(1);
    // a real change is revision 1 of the same order, under the same key
    await db.pool.query(`update erp.purchase_order_line set quantity = 80 where po_id = $1 and line_no = 1`, [po.pub]);
    await until(po.pub, 'revised');
    expect(sim.poLedger().filter((e) => e.orderno === 'PO-UP-PUB').map((e) => [e.op, e.revision])).toEqual([['publish', 0], ['revise', 1]]);
    // and a new PO goes the contract's way from the start
    const fresh = await addPo(db.pool, 'PO-UP-NEW', suppliers.s1);
    await until(fresh, 'published');
    expect((await db.pool.query(`select source, reference, revision from scm.order_status where po_no = 'PO-UP-NEW'`)).rows)
      .toEqual([{ source: 'reference-erp', reference: 'PO-UP-NEW', revision: 0 }]);
  }, 90_000);
});
