/**
 * Purchase orders out to the YonBIP procurement cloud: the token signature
 * (the reference's test vector), discovery and tokens per tenant, publish /
 * revise / close in order under faults, the write-back, refusals.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { clearTokenMemo } from '../listener/delivery/provider-context.js';
import type { ClaimedMessage } from '../listener/providers/types.js';
import { businessBody, clearYonbipCaches, resubmitCheckKey, signTokenRequest, tokenQuery, YONBIP_PATHS } from '../listener/providers/yonbip.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { createTestDb, sqlstateOf, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { addPo, addSuppliers, asnDoc, setupYonbip } from './helpers/scm.js';

describe('the YonBIP self-built-app token signature', () => {
  it('matches the reference test vector and is URL-encoded exactly once', () => {
    const sig = signTokenRequest('41832a3d2df94989b500da6a22268747', '1568098531823', 'secret');
    expect(sig).toBe('H8cSr2Q0WF/TYdKqbd85nYzjFWiK5a2PHUyIK1tbRfc=');
    const q = tokenQuery('41832a3d2df94989b500da6a22268747', '1568098531823', sig);
    expect(q).toBe('appKey=41832a3d2df94989b500da6a22268747&timestamp=1568098531823&signature=H8cSr2Q0WF%2FTYdKqbd85nYzjFWiK5a2PHUyIK1tbRfc%3D');
    expect(new URLSearchParams(q).get('signature')).toBe(sig); // one decode gives the base64 back
  });

  it('resubmitCheckKey is the request_id in 32 characters, and array fields go out as JSON strings', () => {
    const id = '0b9e1f7c-2a34-4c1d-9e8f-123456789abc';
    expect(resubmitCheckKey(id)).toBe('0b9e1f7c2a344c1d9e8f123456789abc');
    expect(resubmitCheckKey(id)).toHaveLength(32);
    const msg = { request_id: id, operation: 'scm.po_publish', payload: { orderdatas: [{ orderno: 'PO-1' }], revision: 0 } } as unknown as ClaimedMessage;
    expect(businessBody(msg)).toEqual({ resubmitCheckKey: resubmitCheckKey(id), orderdatas: '[{"orderno":"PO-1"}]', revision: 0 });
  });
});

let db: TestDb;
let sim: YonbipSim;
let listener: InProcessListener | null = null;
let suppliers: { s1: number; s2: number };

beforeAll(async () => {
  db = await createTestDb('yonbip');
  sim = await startYonbipSim();
});
afterAll(async () => {
  await listener?.stop();
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await listener?.stop();
  listener = null;
  sim.reset();
  clearTokenMemo();
  clearYonbipCaches();
  await resetProductState(db.pool);
  await setupYonbip(db.pool, sim);
  suppliers = await addSuppliers(db.pool);
});

async function listen(): Promise<void> {
  listener = await startListener(db.url);
}

// the ERP's PO (its own columns, written by its on_order callback) and, by its reference, the order's revision in erp-cloud
const po = async (id: number) => (await db.pool.query(`select p.status, p.cloud_status, p.cloud_ref, p.cloud_error, s.revision as cloud_revision
                                                          from erp.purchase_order p left join scm.order_status s on s.source = 'reference-erp' and s.reference = p.po_no
                                                         where p.id = $1`, [id])).rows[0];
/** erp-cloud's id of the ERP's PO (its order under reference-erp), or null while it never left draft. */
const orderId = async (id: number) => (await db.pool.query(`select s.order_id from erp.purchase_order p join scm.order_status s on s.source = 'reference-erp' and s.reference = p.po_no
                                                             where p.id = $1`, [id])).rows[0]?.order_id as string | undefined;
const outboxOf = async (id: number) => (await db.pool.query(`select operation, status from cloud.outbox where aggregate_type = 'scm.purchase_order' and aggregate_id = $1 order by id`,
  [(await orderId(id)) ?? 'none'])).rows;
const allSent = async (id: number) => {
  const rows = await outboxOf(id);
  return rows.length > 0 && rows.every((r) => r.status === 'sent');
};

describe('purchase orders to the procurement cloud', () => {
  it('an approved PO is published with string-packed arrays, and its cloud reference and status are written back', async () => {
    await listen();
    const id = await addPo(db.pool, 'PO-2026-0001', suppliers.s1);
    await waitFor(async () => (await po(id))?.cloud_status === 'published', { what: 'published' });
    const [effect] = sim.poLedger();
    expect(effect).toMatchObject({ op: 'publish', orderno: 'PO-2026-0001', revision: 0, lines: 2 });
    const order = sim.orders()[0]!;
    expect(order.items).toEqual([
      expect.objectContaining({ lineNum: 1, materialCode: 'M-100', purchaseNum: 100, price: 1.5, taxPrice: 1.695, taxrate: 13 }),
      expect.objectContaining({ lineNum: 2, materialCode: 'M-200', purchaseNum: 50 }),
    ]);
    expect(await po(id)).toMatchObject({ cloud_status: 'published', cloud_ref: order.orderId, cloud_error: null });
    // a delivery against it carries what 发货单 lines carry: the cloud's order id beside orderCode and orderDetailId
    await sim.ship({ asn: asnDoc('ASN-REF', 'PO-2026-0001', [{ line: 1, qty: 1 }]), via: 'list' });
    expect(sim.deliveries()[0]).toMatchObject({ code: 'ASN-REF', supplier: 'S001', status: 1,
      details: [expect.objectContaining({ orderId: order.orderId, orderCode: 'PO-2026-0001', orderDetailId: 1 })] });
    // the body really carried strings, and the resubmitCheckKey is the request_id
    const { rows } = await db.pool.query(`select request_id, request_body from cloud.log where endpoint = 'yonbip' and outcome = 'ok'`);
    const body = JSON.parse(rows[0].request_body);
    expect(typeof body.orderdatas).toBe('string');
    expect(body.resubmitCheckKey).toBe(String(rows[0].request_id).replace(/-/g, ''));
  });

  it('a draft is not sent; editing an approved PO sends one revision per committed change, and closing sends the close', async () => {
    await listen();
    const id = await addPo(db.pool, 'PO-2026-0002', suppliers.s1, 'draft');
    expect(await outboxOf(id)).toEqual([]);
    await db.pool.query(`update erp.purchase_order set status = 'approved' where id = $1`, [id]);
    await waitFor(() => allSent(id), { what: 'publish sent' });
    // header and two lines changed in one transaction: one revision, built from the final rows
    const c = await db.pool.connect();
    await c.query('begin');
    await c.query(`update erp.purchase_order set status = 'changed', note = '加急' where id = $1`, [id]);
    await c.query(`update erp.purchase_order_line set quantity = 120 where po_id = $1 and line_no = 1`, [id]);
    await c.query(`insert into erp.purchase_order_line (po_id, line_no, material_code, material_name, quantity, price) values ($1, 3, 'M-300', '弹簧垫圈', 10, 0.1)`, [id]);
    await c.query('commit');
    c.release();
    // a change the cloud would not see (the supplier's confirmation) sends nothing
    await db.pool.query(`update scm.purchase_order set supplier_confirmed_at = now() where id = $1`, [await orderId(id)]);
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [id]);
    await waitFor(async () => (await po(id))?.cloud_status === 'closed', { what: 'closed' });
    expect((await outboxOf(id)).map((r) => r.operation)).toEqual(['scm.po_publish', 'scm.po_revise', 'scm.po_close']);
    expect(sim.poLedger().map((e) => [e.op, e.revision, e.lines])).toEqual([['publish', 0, 2], ['revise', 1, 3], ['close', null, 0]]);
    expect(sim.orders()[0]).toMatchObject({ status: 'closed', revision: 1 });
  });

  it('publish, revision and close reach the cloud in order and once each, although the cloud fails, drops and rate-limits', async () => {
    sim.setFaults({
      pathPrefix: '/iuap-api-gateway/yonbip/cpu/puorder',
      schedule: [{ kind: 'status', status: 500 }, { kind: 'drop' }, { kind: 'status', status: 503 }, { kind: 'ok' },
        { kind: 'status', status: 429, retryAfter: 0 }, { kind: 'drop' }, { kind: 'ok' }, { kind: 'status', status: 502 }],
    });
    const id = await addPo(db.pool, 'PO-2026-0003', suppliers.s1);
    await db.pool.query(`update erp.purchase_order_line set quantity = 90 where po_id = $1 and line_no = 2`, [id]);
    await db.pool.query(`update erp.purchase_order set status = 'cancelled' where id = $1`, [id]);
    await listen(); // all three are waiting before the first call
    await waitFor(() => allSent(id), { timeoutMs: 30_000, what: 'all three sent' });
    expect(sim.poLedger().map((e) => e.op)).toEqual(['publish', 'revise', 'close']);
    const keys = sim.poLedger().map((e) => e.resubmitCheckKey);
    expect(new Set(keys).size).toBe(3);
    expect((await po(id)).cloud_status).toBe('closed');
    const failures = await db.pool.query(`select count(*)::int n from cloud.log where endpoint = 'yonbip' and outcome <> 'ok'`);
    expect(failures.rows[0].n).toBeGreaterThanOrEqual(5);
  });

  it('a publish the cloud applies but answers too late is retried with the same resubmitCheckKey, and the cloud holds one order', async () => {
    // the first answer comes after the endpoint's 2 s timeout (the cloud still applies it); the retry is answered in time
    sim.setFaults({ pathPrefix: '/iuap-api-gateway/yonbip/cpu/puorder', schedule: [{ kind: 'slow', ms: 2600 }, { kind: 'slow', ms: 1000 }] });
    await listen();
    const id = await addPo(db.pool, 'PO-2026-SLOW', suppliers.s1);
    await waitFor(async () => (await po(id))?.cloud_status === 'published', { timeoutMs: 20_000, what: 'published after a timeout' });
    const attempts = await db.pool.query(`select outcome, request_id from cloud.log where endpoint = 'yonbip' and operation = 'scm.po_publish' order by started_at, attempt`);
    expect(attempts.rows.length).toBeGreaterThanOrEqual(2);
    expect(attempts.rows[0].outcome).not.toBe('ok');
    expect(new Set(attempts.rows.map((r) => r.request_id)).size).toBe(1); // one message, so one resubmitCheckKey
    expect(sim.poLedger().map((e) => [e.op, e.orderno])).toEqual([['publish', 'PO-2026-SLOW']]);
    expect(sim.orders()).toHaveLength(1);
    expect((await po(id)).cloud_ref).toBe(sim.orders()[0]!.orderId);
  });

  it('one discovery and one token serve every call of a tenant; the long token with + / = is URL-encoded once', async () => {
    await listen();
    const a = await addPo(db.pool, 'PO-2026-0004', suppliers.s1);
    const b = await addPo(db.pool, 'PO-2026-0005', suppliers.s2);
    await waitFor(async () => (await allSent(a)) && (await allSent(b)), { what: 'both sent' });
    expect(sim.tokensIssued()).toBe(1);
    expect(sim.requests().filter((r) => r.path === YONBIP_PATHS.discovery)).toHaveLength(1);
    const token = (await db.pool.query(`select token from cloud.provider_token where endpoint = 'yonbip'`)).rows[0].token as string;
    expect(token).toMatch(/[+/=]/);
    // the token never reaches cloud.log
    const logged = await db.pool.query(`select count(*)::int n from cloud.log where url like '%' || $1 || '%' or url like '%' || $2 || '%'`, [token, encodeURIComponent(token)]);
    expect(logged.rows[0].n).toBe(0);
  });

  it('a token the cloud stops accepting is forgotten and a new one obtained; the PO still goes exactly once', async () => {
    await listen();
    const id = await addPo(db.pool, 'PO-2026-0006', suppliers.s1);
    await waitFor(() => allSent(id), { what: 'publish' });
    sim.revokeTokens();
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [id]);
    await waitFor(async () => (await po(id))?.cloud_status === 'closed', { what: 'closed with a new token' });
    expect(sim.tokensIssued()).toBe(2);
    const classes = await db.pool.query(`select error_class from cloud.log where endpoint = 'yonbip' and outcome <> 'ok'`);
    expect(classes.rows.map((r) => r.error_class)).toEqual(['token_rejected']);
    expect(sim.poLedger().map((e) => e.op)).toEqual(['publish', 'close']);
  });

  it("a business rejection (code other than '200') writes the cloud's reason on the PO and parks its later messages", async () => {
    sim.setFaults({ pathPrefix: '/iuap-api-gateway/yonbip/cpu/puorder/pubOrderToYC', schedule: [{ kind: 'status', status: 200, body: { code: '999', message: '供应商 S001 未在云采注册' } }] });
    await listen();
    const id = await addPo(db.pool, 'PO-2026-0007', suppliers.s1);
    await waitFor(async () => (await po(id))?.cloud_status === 'rejected', { what: 'rejected' });
    expect((await po(id)).cloud_error).toBe('供应商 S001 未在云采注册');
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [id]);
    expect((await outboxOf(id)).map((r) => [r.operation, r.status])).toEqual([['scm.po_publish', 'failed'], ['scm.po_close', 'pending']]);
    expect(sim.poLedger()).toEqual([]);
  });

  it('a gateway discovery that fails (503) is retried without sending anything; a missing tenant is a permanent config error', async () => {
    sim.setFaults({ pathPrefix: YONBIP_PATHS.discovery, schedule: [{ kind: 'status', status: 503 }] });
    await listen();
    const id = await addPo(db.pool, 'PO-2026-0009', suppliers.s1);
    await waitFor(async () => (await po(id))?.cloud_status === 'published', { what: 'published after the retry' });
    const log = await db.pool.query(`select outcome, error_class, http_status from cloud.log where endpoint = 'yonbip' order by started_at`);
    expect(log.rows.map((r) => [r.outcome, r.error_class])).toEqual([['retryable', 'gateway_discovery_http_503'], ['ok', null]]);
    expect(sim.poLedger()).toHaveLength(1);

    await db.pool.query(`update cloud.endpoint set config = config - 'tenant_id' where name = 'yonbip'`);
    const other = await addPo(db.pool, 'PO-2026-0010', suppliers.s1);
    await waitFor(async () => (await po(other))?.cloud_status === 'rejected', { what: 'rejected for config' });
    expect((await po(other)).cloud_error).toMatch(/config\.tenant_id is missing/);
    expect(sim.poLedger()).toHaveLength(1);
  });

  it('a wrong app secret fails the token call: nothing is published and the PO says why', async () => {
    process.env.ERP_CLOUD_SECRET_YONBIP_APP_SECRET = 'not-the-app-secret-at-all'; // secret-scan: allow
    try {
      await listen();
      const id = await addPo(db.pool, 'PO-2026-0008', suppliers.s1);
      await waitFor(async () => (await po(id))?.cloud_status === 'rejected', { what: 'rejected' });
      expect((await po(id)).cloud_error).toMatch(/token.*signature invalid/);
      expect(sim.poLedger()).toEqual([]);
      expect(sim.tokensIssued()).toBe(0);
    } finally {
      process.env.ERP_CLOUD_SECRET_YONBIP_APP_SECRET = undefined;
      delete process.env.ERP_CLOUD_SECRET_YONBIP_APP_SECRET;
    }
  });
});

describe('purchase order rules in the ERP', () => {
  it('approving a PO without lines is refused at commit with ES002, and nothing is enqueued', async () => {
    const { rows } = await db.pool.query(`insert into erp.purchase_order (po_no, supplier_id) values ('PO-EMPTY', $1) returning id`, [suppliers.s1]);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order set status = 'approved' where id = $1`, [rows[0].id]))).toBe(SqlState.poWithoutLines);
    expect((await po(Number(rows[0].id))).status).toBe('draft');
    expect(await outboxOf(Number(rows[0].id))).toEqual([]);
  });

  it('closed orders are final: reopening is ES001, changing a line is ES003', async () => {
    const id = await addPo(db.pool, 'PO-FINAL', suppliers.s1);
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [id]);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order set status = 'approved' where id = $1`, [id]))).toBe(SqlState.poStatusChangeNotAllowed);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order_line set quantity = 1 where po_id = $1`, [id]))).toBe(SqlState.poFinal);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order set status = 'changed' where po_no = 'PO-FINAL'`))).toBe(SqlState.poStatusChangeNotAllowed);
  });

  it("the ERP's own role (erp_cloud_app) enters and approves a PO, and its publication is enqueued", async () => {
    const c = await db.pool.connect();
    try {
      await c.query('begin');
      await c.query('set local role erp_cloud_app');
      const { rows } = await c.query(`insert into erp.purchase_order (po_no, supplier_id, status) values ('PO-APP', $1, 'approved') returning id`, [suppliers.s1]);
      await c.query(`insert into erp.purchase_order_line (po_id, line_no, material_code, material_name, quantity, price) values ($1, 1, 'M-1', 'x', 1, 1)`, [rows[0].id]);
      await c.query('commit');
      expect(await outboxOf(Number(rows[0].id))).toEqual([{ operation: 'scm.po_publish', status: 'pending' }]);
      expect(await sqlstateOf(c.query(`set role erp_cloud_app; select * from cloud.outbox`))).toBe('42501');
    } finally {
      await c.query('reset role');
      c.release();
    }
  });

  it('neither the ERP nor the portal can call the ERP\'s internal enqueue function (it locks any PO); the triggers still run it', async () => {
    const id = await addPo(db.pool, 'PO-SYNC', suppliers.s1);
    const c = await db.pool.connect();
    try {
      for (const role of ['erp_cloud_app', 'erp_cloud_supplier_portal', 'erp_cloud_listener']) {
        await c.query(`set role ${role}`);
        expect(await sqlstateOf(c.query(`select erp._enqueue_order($1)`, [id])), role).toBe('42501'); // no EXECUTE (the portal and listener: no USAGE on erp either)
        await c.query('reset role');
      }
    } finally {
      await c.query('reset role');
      c.release();
    }
    const { rows } = await db.pool.query(`select p.prosecdef, p.proconfig from pg_proc p where p.pronamespace = 'erp'::regnamespace and p.proname in ('tg_purchase_order__500_enqueue', 'tg_purchase_order_line__500_enqueue')`);
    expect(rows).toEqual([{ prosecdef: true, proconfig: ['search_path=""'] }, { prosecdef: true, proconfig: ['search_path=""'] }]);
  });

  it('a published PO keeps its number and supplier (ES003), and only a draft can be deleted (ES009)', async () => {
    const id = await addPo(db.pool, 'PO-ID', suppliers.s1);
    expect((await po(id)).cloud_revision).toBe(0);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order set po_no = 'PO-ID-2' where id = $1`, [id]))).toBe(SqlState.poFinal);
    expect(await sqlstateOf(db.pool.query(`update erp.purchase_order set supplier_id = $2 where id = $1`, [id, suppliers.s2]))).toBe(SqlState.poFinal);
    const c = await db.pool.connect();
    try {
      await c.query('set role erp_cloud_app');
      expect(await sqlstateOf(c.query(`delete from erp.purchase_order where id = $1`, [id]))).toBe(SqlState.poDeleteNotAllowed);
      await c.query(`update erp.purchase_order set status = 'cancelled' where id = $1`, [id]);
      expect(await sqlstateOf(c.query(`delete from erp.purchase_order where id = $1`, [id]))).toBe(SqlState.poDeleteNotAllowed);
    } finally {
      await c.query('reset role');
      c.release();
    }
    expect((await po(id))).toMatchObject({ status: 'cancelled' });
    expect((await outboxOf(id)).map((r) => r.operation)).toEqual(['scm.po_publish', 'scm.po_close']);
    // a draft is still the ERP's to rename, move or delete
    const draft = await addPo(db.pool, 'PO-DRAFT', suppliers.s1, 'draft');
    await db.pool.query(`update erp.purchase_order set po_no = 'PO-DRAFT-2', supplier_id = $2 where id = $1`, [draft, suppliers.s2]);
    expect((await db.pool.query(`delete from erp.purchase_order where id = $1`, [draft])).rowCount).toBe(1);
  });

  it('the publication written back while a revision is still queued leaves the PO queued; the revision makes it revised', async () => {
    const id = await addPo(db.pool, 'PO-QUEUED', suppliers.s1);
    await db.pool.query(`update erp.purchase_order_line set quantity = 80 where po_id = $1 and line_no = 1`, [id]);
    expect((await outboxOf(id)).map((r) => r.operation)).toEqual(['scm.po_publish', 'scm.po_revise']);
    const order = await orderId(id);
    const writeBack = (op: string) => db.pool.query(`select scm.record_po_delivered(o, '{"code":"200","data":{"orderId":"YC77"}}') from cloud.outbox o where aggregate_id = $1 and operation = $2`, [order, op]);
    await writeBack('scm.po_publish');
    expect(await po(id)).toMatchObject({ cloud_status: 'queued', cloud_ref: 'YC77' });
    await db.pool.query(`update cloud.outbox set status = 'sent', locked_until = null where aggregate_id = $1`, [order]);
    await writeBack('scm.po_revise');
    expect(await po(id)).toMatchObject({ cloud_status: 'revised', cloud_ref: 'YC77' });
  });

  it('a draft cancelled before approval never reaches the cloud', async () => {
    const id = await addPo(db.pool, 'PO-NEVER', suppliers.s1, 'draft');
    await db.pool.query(`update erp.purchase_order set status = 'cancelled' where id = $1`, [id]);
    expect(await outboxOf(id)).toEqual([]);
  });
});
