/**
 * The foreign-shaped example ERP (sql/examples/acme), its procurement half, end to end through the
 * listener, the YonBIP simulator and the ASN webhook: acme's own 采购单 tables (pinyin columns, its own
 * status codes 0 录入 / 1 审核 / 2 变更 / 8 关闭 / 9 作废, its own supplier table) publish, revise and close
 * orders through scm.enqueue_order(_close) only; the cloud state comes back into po_head through
 * acme.on_order, and the suppliers' ASNs land in acme.dh_inbox through acme.on_asn.
 */
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ASN_WEBHOOK_PATH } from '../../listener/inbound/asn-webhook.js';
import { startInboundServer } from '../../listener/inbound/inbound-server.js';
import { SqlState } from '../../listener/kernel/errors.js';
import { startYonbipSim, type YonbipSim } from '../../listener/sim/yonbip.js';
import { createTestDb, inTransaction, waitFor, type TestDb } from '../helpers/db.js';
import { installExample } from '../helpers/examples.js';
import { startListener, type InProcessListener } from '../helpers/listener.js';
import { asnDoc, setupYonbip } from '../helpers/scm.js';

const WEBHOOK_SECRET = 'acme-asn-webhook-secret-for-tests'; // secret-scan: allow (a test fixture)
const GYS = 'GYS-SZ01';

let db: TestDb;
let sim: YonbipSim;
let listener: InProcessListener;
let inbound: { url: string; close(): Promise<void> };

beforeAll(async () => {
  db = await createTestDb('acme_procurement');
  await installExample(db, 'acme');
  sim = await startYonbipSim();
  await setupYonbip(db.pool, sim);
  inbound = await startInboundServer('127.0.0.1', 0, {
    pool: db.pool,
    log: pino({ level: 'silent' }, new Writable({ write(_c, _e, cb) { cb(); } })),
    env: { ERP_CLOUD_ASN_WEBHOOK_CIDRS: '127.0.0.0/8' },
    secret: async (name) => {
      if (name === 'scm.asn_webhook_secret') return WEBHOOK_SECRET;
      throw new Error(`no secret ${name}`);
    },
  });
  await db.pool.query(`insert into acme.gys (gysbh, gysmc, gyssh) values ($1, '苏州精密制造有限公司', '91320500MA1W2X3Y4Z')`, [GYS]);
  listener = await startListener(db.url);
});
afterAll(async () => {
  await listener?.stop();
  await inbound?.close();
  await sim?.close();
  await db?.drop();
});

let seq = 0;
/** A 采购单 in draft (zt 0) with two lines (M-100 × 100, M-200 × 50), written the way the ERP writes it. */
async function draft(o: { sl1?: number } = {}): Promise<string> {
  const cgdh = `CG${process.pid}-${++seq}`;
  await inTransaction(db.pool, async (c) => {
    await c.query(`insert into acme.po_head (cgdh, gysbh, cgrq, dhrq) values ($1, $2, '2026-12-06', '2026-12-20')`, [cgdh, GYS]);
    await c.query(`insert into acme.po_line (cgdh, hh, wlbm, wlmc, sl, dw, dj, slv) values
                     ($1, 1, 'M-100', '六角螺栓 M8×30', $2, 'PCS', 0.42, 0.13), ($1, 2, 'M-200', '平垫圈 8mm', 50, 'PCS', 0.05, 0.13)`, [cgdh, o.sl1 ?? 100]);
  });
  return cgdh;
}
const setZt = (cgdh: string, zt: string) => db.pool.query(`update acme.po_head set zt = $2 where cgdh = $1`, [cgdh, zt]);
const head = async (cgdh: string) => (await db.pool.query(`select zt, yzt, yddh, ycw from acme.po_head where cgdh = $1`, [cgdh])).rows[0];
/** Waits until po_head shows yzt (written by acme.on_order) and no message of the order is open. */
async function cloudState(cgdh: string, yzt: string): Promise<Record<string, unknown>> {
  return waitFor(async () => {
    const h = await head(cgdh);
    if (h?.yzt !== yzt) return null;
    const open = await db.pool.query(`select count(*)::int n from cloud.outbox o join scm.order_status s on o.aggregate_type = 'scm.purchase_order'
                                        and o.aggregate_id = s.order_id::text where s.source = 'acme' and s.reference = $1 and o.status <> 'sent'`, [cgdh]);
    return open.rows[0].n === 0 ? h : null;
  }, { timeoutMs: 30_000, what: `${cgdh} to show yzt ${yzt}` });
}
const ledgerOf = (cgdh: string) => sim.poLedger().filter((e) => e.orderno === cgdh).map((e) => [e.op, e.revision, e.lines]);
const orderStatus = async (cgdh: string) => (await db.pool.query(`select state, cloud_status, revision from scm.order_status where source = 'acme' and reference = $1`, [cgdh])).rows;
const outboxCount = async () => (await db.pool.query(`select count(*)::int n from cloud.outbox`)).rows[0].n as number;

/** The pg error a promise rejects with. */
async function pgError(p: Promise<unknown>): Promise<{ code?: string; message: string; detail?: string; hint?: string }> {
  try {
    await p;
  } catch (err) {
    return err as { code?: string; message: string; detail?: string; hint?: string };
  }
  throw new Error('expected the statement to fail');
}

describe('acme approves a 采购单 in its own table', () => {
  it('approval (zt 1) publishes it: the cloud has the order, and yzt F and the cloud\'s order id land in po_head through acme.on_order', async () => {
    const cgdh = await draft();
    expect(await orderStatus(cgdh)).toEqual([]); // a draft is the ERP's own business
    await setZt(cgdh, '1');
    const h = await cloudState(cgdh, 'F');
    expect(ledgerOf(cgdh)).toEqual([['publish', 0, 2]]);
    const order = sim.orders().find((o) => o.orderno === cgdh)!;
    expect(order.items).toEqual([
      expect.objectContaining({ lineNum: 1, materialCode: 'M-100', purchaseNum: 100, price: 0.42, taxrate: 13 }),
      expect.objectContaining({ lineNum: 2, materialCode: 'M-200', purchaseNum: 50 }),
    ]);
    expect(h).toEqual({ zt: '1', yzt: 'F', yddh: order.orderId, ycw: null });
    expect(await orderStatus(cgdh)).toEqual([{ state: 'open', cloud_status: 'published', revision: 0 }]);
  });

  it('a changed line with zt 2 (变更) sends one revision built from the committed rows; zt 8 (关闭) sends the close after it', async () => {
    const cgdh = await draft();
    await setZt(cgdh, '1');
    await cloudState(cgdh, 'F');
    await inTransaction(db.pool, async (c) => {
      await c.query(`update acme.po_line set sl = 120 where cgdh = $1 and hh = 1`, [cgdh]);
      await c.query(`insert into acme.po_line (cgdh, hh, wlbm, wlmc, sl, dw, dj) values ($1, 3, 'M-300', '弹簧垫圈', 10, 'PCS', 0.1)`, [cgdh]);
      await c.query(`update acme.po_head set zt = '2' where cgdh = $1`, [cgdh]);
    });
    await cloudState(cgdh, 'B');
    expect(ledgerOf(cgdh)).toEqual([['publish', 0, 2], ['revise', 1, 3]]);
    expect(sim.orders().find((o) => o.orderno === cgdh)!.items).toContainEqual(expect.objectContaining({ lineNum: 1, purchaseNum: 120 }));
    expect(await orderStatus(cgdh)).toEqual([{ state: 'open', cloud_status: 'revised', revision: 1 }]);
    // saving the approved order again, unchanged, sends nothing
    await setZt(cgdh, '2');
    await setZt(cgdh, '8');
    expect(await cloudState(cgdh, 'G')).toMatchObject({ zt: '8', ycw: null });
    expect(ledgerOf(cgdh)).toEqual([['publish', 0, 2], ['revise', 1, 3], ['close', null, 0]]);
    expect(sim.orders().find((o) => o.orderno === cgdh)).toMatchObject({ status: 'closed', revision: 1 });
    expect(await orderStatus(cgdh)).toMatchObject([{ state: 'closed', cloud_status: 'closed' }]);
  });

  it('a draft cancelled (zt 9, 作废) sends nothing: erp-cloud never hears of it', async () => {
    const cgdh = await draft();
    const before = await outboxCount();
    await setZt(cgdh, '9');
    expect(await head(cgdh)).toEqual({ zt: '9', yzt: null, yddh: null, ycw: null });
    expect(await orderStatus(cgdh)).toEqual([]);
    expect(await outboxCount()).toBe(before);
    expect(ledgerOf(cgdh)).toEqual([]);
  });

  it('an approved order cancelled (zt 9, 作废) is closed in the cloud as cancelled', async () => {
    const cgdh = await draft();
    await setZt(cgdh, '1');
    await cloudState(cgdh, 'F');
    await setZt(cgdh, '9');
    await cloudState(cgdh, 'G');
    expect(ledgerOf(cgdh)).toEqual([['publish', 0, 2], ['close', null, 0]]);
    expect(await orderStatus(cgdh)).toMatchObject([{ state: 'cancelled', cloud_status: 'closed' }]);
  });

  it('a malformed order (sl 0) fails the approval with ES019 naming po_line.sl, the JSON path in DETAIL, and nothing is written', async () => {
    const cgdh = await draft({ sl1: 0 });
    const before = await outboxCount();
    const err = await pgError(setZt(cgdh, '1'));
    expect(err.code).toBe(SqlState.orderDocumentMalformed);
    expect(err.message).toContain('po_line.sl');
    expect(err.message).toContain(cgdh);
    expect(err.message).not.toMatch(/lines\[|purchaseNum/); // the clerk's column, not the contract's path
    expect(err.detail).toBe('$.lines[0].quantity');
    expect(err.hint).toContain('po_line.sl');
    expect(await head(cgdh)).toEqual({ zt: '0', yzt: null, yddh: null, ycw: null });
    expect(await orderStatus(cgdh)).toEqual([]);
    expect(await outboxCount()).toBe(before);
  });
});

describe('the supplier ships against an acme 采购单', () => {
  const inbox = async (fhdh: string) => (await db.pool.query(`select gysbh, fhdh, hh, cgdh, cghh, wlbm, sl::float8 sl, ph, yjdh::text, cys, qd
                                                                  from acme.dh_inbox where fhdh = $1 order by hh`, [fhdh])).rows;
  const push = (asn: Record<string, unknown>) => sim.ship({ asn, via: 'push', webhookUrl: inbound.url + ASN_WEBHOOK_PATH, webhookSecret: WEBHOOK_SECRET });

  it('the pushed ASN lands in acme.dh_inbox through acme.on_asn, one row per line, and once although the cloud pushes it twice', async () => {
    const cgdh = await draft();
    await setZt(cgdh, '1');
    await cloudState(cgdh, 'F');
    const fhdh = `FH${process.pid}-${++seq}`;
    const doc = asnDoc(fhdh, cgdh, [{ line: 1, qty: 60, batch: 'LOT-2612-A' }, { line: 2, qty: 50 }], GYS);
    for (let i = 0; i < 2; i++) expect(await push(doc)).toMatchObject({ status: 200, body: 'success' });
    const want = [
      { gysbh: GYS, fhdh, hh: 1, cgdh, cghh: 1, wlbm: 'M-100', sl: 60, ph: 'LOT-2612-A', yjdh: '2026-11-27', cys: '顺丰速运', qd: 'push' },
      { gysbh: GYS, fhdh, hh: 2, cgdh, cghh: 2, wlbm: 'M-200', sl: 50, ph: `B-${fhdh}-2`, yjdh: '2026-11-27', cys: '顺丰速运', qd: 'push' },
    ];
    expect(await inbox(fhdh)).toEqual(want);
    const s = (await db.pool.query(`select status, delivered_at is not null delivered from scm.asn_status where source = 'acme' and order_reference = $1`, [cgdh])).rows;
    expect(s).toEqual([{ status: 'accepted', delivered: true }]);
  });

  it('an ASN over the ordered quantity is rejected (ES015), kept with its reason in scm.asn_status, and never reaches dh_inbox', async () => {
    const cgdh = await draft();
    await setZt(cgdh, '1');
    await cloudState(cgdh, 'F');
    const fhdh = `FH${process.pid}-${++seq}`;
    expect(await push(asnDoc(fhdh, cgdh, [{ line: 1, qty: 500 }], GYS))).toMatchObject({ status: 200 });
    expect(await inbox(fhdh)).toEqual([]);
    const s = (await db.pool.query(`select asn_no, status, reject_code, delivered_at from scm.asn_status where source = 'acme' and order_reference = $1`, [cgdh])).rows;
    expect(s).toEqual([{ asn_no: fhdh, status: 'rejected', reject_code: SqlState.asnQuantityOverOpen, delivered_at: null }]);
  });
});
