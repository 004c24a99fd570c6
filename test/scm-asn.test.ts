/**
 * ASNs into the ERP: the one ingest function's rules, the webhook (push) with
 * its refusals, the pull through the YonBIP adapter, and idempotency across
 * the paths.
 */
import { Writable } from 'node:stream';
import pg from 'pg';
import { pino } from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { ASN_WEBHOOK_PATH } from '../listener/inbound/asn-webhook.js';
import { startInboundServer } from '../listener/inbound/inbound-server.js';
import { clearTokenMemo } from '../listener/delivery/provider-context.js';
import { signWebhookBody } from '../listener/providers/webhook.js';
import { clearYonbipCaches } from '../listener/providers/yonbip.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { createTestDb, sqlstateOf, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { startListener, type InProcessListener } from './helpers/listener.js';
import { addPo, addSuppliers, asnDoc, setupYonbip } from './helpers/scm.js';

const WEBHOOK_SECRET = 'asn-webhook-shared-secret-for-tests'; // secret-scan: allow (a test fixture)

let db: TestDb;
let sim: YonbipSim;
let listener: InProcessListener | null = null;
let suppliers: { s1: number; s2: number };
let poId: number;
let inbound: { url: string; close(): Promise<void> };
let inboundEnv: Record<string, string>;
const logLines: Array<{ msg: string; level: number }> = [];

beforeAll(async () => {
  db = await createTestDb('scm_asn');
  sim = await startYonbipSim();
  const sink = new Writable({ write(chunk, _enc, cb) { for (const l of String(chunk).trim().split('\n')) logLines.push(JSON.parse(l)); cb(); } });
  inboundEnv = { ERP_CLOUD_ASN_WEBHOOK_CIDRS: '127.0.0.0/8' };
  inbound = await startInboundServer('127.0.0.1', 0, {
    pool: db.pool,
    log: pino({ level: 'info' }, sink),
    env: inboundEnv,
    secret: async (name) => {
      if (name === 'scm.asn_webhook_secret' && inboundEnv.SECRET_SET !== 'no') return WEBHOOK_SECRET;
      throw new Error(`no secret ${name}`);
    },
  });
});
afterAll(async () => {
  await listener?.stop();
  await inbound.close();
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await listener?.stop();
  listener = null;
  sim.reset();
  clearTokenMemo();
  clearYonbipCaches();
  logLines.length = 0;
  inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '127.0.0.0/8';
  delete inboundEnv.SECRET_SET;
  await resetProductState(db.pool);
  await setupYonbip(db.pool, sim);
  suppliers = await addSuppliers(db.pool);
  poId = await addPo(db.pool, 'PO-A', suppliers.s1);
});

const ingest = async (doc: unknown, source = 'push', eventId: string | null = null) =>
  (await db.pool.query(`select * from scm.ingest_asn($1::jsonb, $2, $3)`, [JSON.stringify(doc), source, eventId])).rows[0];
const asnCount = async () => (await db.pool.query(`select count(*)::int n from scm.asn`)).rows[0].n as number;
const lineCount = async () => (await db.pool.query(`select count(*)::int n from scm.asn_line`)).rows[0].n as number;

describe('ASN ingest (the one door)', () => {
  it('an ASN against an open PO line is accepted with its lines and the original document', async () => {
    const doc = asnDoc('ASN-1', 'PO-A', [{ line: 1, qty: 60, batch: 'B1' }, { line: 1, qty: 40, batch: 'B2' }, { line: 2, qty: 50 }]);
    expect(await ingest(doc, 'push', 'ev-1')).toMatchObject({ asn_no: 'ASN-1', status: 'accepted', reject_code: null });
    const { rows } = await db.pool.query(`select supplier_id, po_id, ship_date::text, eta::text, carrier, tracking_no, detail, received_via as source, cloud_event_id from scm.asn`);
    expect(rows[0]).toMatchObject({ supplier_id: (await db.pool.query(`select id::text from scm.supplier where code = 'S001'`)).rows[0].id, po_id: (await db.pool.query(`select order_id from scm.order_status where po_no = 'PO-A'`)).rows[0].order_id, ship_date: '2026-11-25', eta: '2026-11-27', carrier: '顺丰速运', source: 'push', cloud_event_id: 'ev-1' });
    expect(rows[0].detail).toEqual(doc);
    const lines = await db.pool.query(`select po_line_no, material_code, batch_no, quantity::float8 q from scm.asn_line order by line_no`);
    expect(lines.rows).toEqual([
      { po_line_no: 1, material_code: 'M-100', batch_no: 'B1', q: 60 },
      { po_line_no: 1, material_code: 'M-100', batch_no: 'B2', q: 40 },
      { po_line_no: 2, material_code: 'M-200', batch_no: 'B-ASN-1-3', q: 50 },
    ]);
  });

  it('the same event or the same ASN number again changes nothing, even from two sessions at once', async () => {
    const doc = asnDoc('ASN-2', 'PO-A', [{ line: 1, qty: 10 }]);
    const a = new pg.Client({ connectionString: db.url });
    const b = new pg.Client({ connectionString: db.url });
    await Promise.all([a.connect(), b.connect()]);
    try {
      const q = (c: pg.Client, ev: string) => c.query(`select status from scm.ingest_asn($1::jsonb, 'push', $2)`, [JSON.stringify(doc), ev]);
      const results = await Promise.all([q(a, 'ev-a'), q(b, 'ev-b')]);
      expect(results.map((r) => r.rows[0].status).sort()).toEqual(['accepted', 'duplicate']);
    } finally {
      await Promise.all([a.end(), b.end()]);
    }
    const winner = (await db.pool.query(`select cloud_event_id from scm.asn`)).rows[0].cloud_event_id as string;
    // the same event id with another ASN is a conflict, not a silent duplicate: nothing is stored
    expect(await sqlstateOf(ingest({ ...doc, code: 'ASN-OTHER-NUMBER' }, 'push', winner))).toBe('ES017');
    expect(await sqlstateOf(ingest({ ...doc, supplier: 'S002' }, 'push', winner))).toBe('ES017');
    expect(await ingest(doc, 'pull', null)).toMatchObject({ status: 'duplicate' });
    expect(await asnCount()).toBe(1);
    expect(await lineCount()).toBe(1);
  });

  it('two ASNs racing for the same open quantity: one is accepted, the other rejected with ES015', async () => {
    const a = new pg.Client({ connectionString: db.url });
    const b = new pg.Client({ connectionString: db.url });
    await Promise.all([a.connect(), b.connect()]);
    try {
      const q = (c: pg.Client, code: string) => c.query(`select status, reject_code from scm.ingest_asn($1::jsonb, 'push')`, [JSON.stringify(asnDoc(code, 'PO-A', [{ line: 1, qty: 60 }]))]);
      const results = await Promise.all([q(a, 'RACE-1'), q(b, 'RACE-2')]);
      expect(results.map((r) => r.rows[0].status).sort()).toEqual(['accepted', 'rejected']);
      expect(results.map((r) => r.rows[0].reject_code).filter(Boolean)).toEqual(['ES015']);
    } finally {
      await Promise.all([a.end(), b.end()]);
    }
  });

  it.each([
    ['an unknown supplier', asnDoc('R-1', 'PO-A', [{ line: 1, qty: 1 }], 'S999'), 'ES010'],
    ['an unknown purchase order', asnDoc('R-2', 'PO-NONE', [{ line: 1, qty: 1 }]), 'ES011'],
    ["another supplier's purchase order", asnDoc('R-3', 'PO-A', [{ line: 1, qty: 1 }], 'S002'), 'ES012'],
    ['a line the PO does not have', asnDoc('R-4', 'PO-A', [{ line: 9, qty: 1 }]), 'ES013'],
    ['a material that differs from the PO line', asnDoc('R-5', 'PO-A', [{ line: 1, material: 'M-999', qty: 1 }]), 'ES013'],
    ['a zero quantity', asnDoc('R-6', 'PO-A', [{ line: 1, qty: 0 }]), 'ES014'],
    ['a negative quantity', asnDoc('R-7', 'PO-A', [{ line: 2, qty: -5 }]), 'ES014'],
    ['more than the line orders', asnDoc('R-8', 'PO-A', [{ line: 1, qty: 60 }, { line: 1, qty: 41 }]), 'ES015'],
  ])('an ASN naming %s is kept as rejected, with its reason, and ships nothing', async (_what, doc, code) => {
    expect(await ingest(doc)).toMatchObject({ status: 'rejected', reject_code: code });
    const { rows } = await db.pool.query(`select status, reject_code, reject_reason, detail from scm.asn`);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ status: 'rejected', reject_code: code });
    expect(rows[0].reject_reason.length).toBeGreaterThan(10);
    expect(rows[0].detail).toEqual(doc);
    // nothing of the line's open quantity was used: the full line still ships
    expect(await ingest(asnDoc('OK-AFTER', 'PO-A', [{ line: 1, qty: 100 }]))).toMatchObject({ status: 'accepted' });
  });

  it('the open quantity counts earlier accepted ASNs, and a closed PO takes no deliveries', async () => {
    expect(await ingest(asnDoc('Q-1', 'PO-A', [{ line: 2, qty: 30 }]))).toMatchObject({ status: 'accepted' });
    expect(await ingest(asnDoc('Q-2', 'PO-A', [{ line: 2, qty: 21 }]))).toMatchObject({ status: 'rejected', reject_code: 'ES015' });
    expect(await ingest(asnDoc('Q-3', 'PO-A', [{ line: 2, qty: 20 }]))).toMatchObject({ status: 'accepted' });
    await db.pool.query(`update erp.purchase_order set status = 'closed' where id = $1`, [poId]);
    expect(await ingest(asnDoc('Q-4', 'PO-A', [{ line: 1, qty: 1 }]))).toMatchObject({ status: 'rejected', reject_code: 'ES016' });
  });

  it.each([
    ['not an object', [1, 2]],
    ['no ASN number', { ...asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), code: '' }],
    ['no supplier', { ...asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), supplier: null }],
    ['no lines', { ...asnDoc('X', 'PO-A', []) }],
    ['a quantity that is not a number', asnDoc('X', 'PO-A', [{ line: 1, qty: 'ten' as unknown as number }])],
    ['an impossible date', { ...asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), deliveryDate: '2026-02-31' }],
    ['a line number that is not a number', withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), 0, { lineno: 'one' })],
    ['a line number used twice', withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }, { line: 2, qty: 1 }]), 1, { lineno: 1 })],
    ['a line number that repeats another line\'s position', withLine(withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }, { line: 2, qty: 1 }]), 0, { lineno: undefined }), 1, { lineno: 1 })],
    ['a line without its PO line (orderDetailId)', withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), 0, { orderDetailId: 'first' })],
    ['an impossible planned arrival on a line', withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), 0, { planArrivalDate: '2026-13-01' })],
  ])('a malformed ASN (%s) is refused with ES004 and nothing is written', async (_what, doc) => {
    expect(await sqlstateOf(ingest(doc))).toBe(SqlState.asnMalformed);
    expect(await asnCount()).toBe(0);
  });

  it('ES004 names the field in its DETAIL', async () => {
    const doc = withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }, { line: 2, qty: 1 }]), 1, { planArrivalDate: 'soon' });
    await expect(ingest(doc)).rejects.toMatchObject({ code: 'ES004', detail: 'field: details[2].planArrivalDate' });
    await expect(ingest(withLine(asnDoc('X', 'PO-A', [{ line: 1, qty: 1 }]), 0, { lineno: '1.5' }))).rejects.toMatchObject({ detail: 'field: details[1].lineno' });
  });

  it("reads the reference's 发货单 fields: supplier, orderCode, orderDetailId; statuses that are no shipment are not ingested", async () => {
    const doc = asnDoc('REF-1', 'PO-A', [{ line: 2, qty: 3 }]);
    expect(Object.keys(doc)).toContain('supplier');
    expect(await ingest({ ...doc, status: 1 })).toMatchObject({ status: 'accepted' });
    expect((await db.pool.query(`select po_line_no from scm.asn_line`)).rows).toEqual([{ po_line_no: 2 }]);
    // 0 待发布, 4 拒签, 9 正在发布, 10 发布失败
    for (const status of [0, 4, 9, 10, '10']) {
      expect(await ingest({ ...asnDoc(`REF-S${status}`, 'PO-A', [{ line: 1, qty: 1 }]), status })).toMatchObject({ status: 'not_shipped', asn_id: null });
    }
    expect(await asnCount()).toBe(1);
    // the old, unlisted names are not read
    const old = { ...asnDoc('REF-OLD', 'PO-A', [{ line: 1, qty: 1 }]), supplier: undefined, supplierCode: 'S001' };
    expect(await sqlstateOf(ingest(old))).toBe(SqlState.asnMalformed);
  });
});

function withLine(doc: Record<string, unknown>, i: number, patch: Record<string, unknown>): Record<string, unknown> {
  const details = (doc.details as Array<Record<string, unknown>>).map((d, j) => (j === i ? { ...d, ...patch } : d));
  return { ...doc, details: JSON.parse(JSON.stringify(details)) };
}

async function push(body: string, opts: { secret?: string; at?: number; eventId?: string } = {}): Promise<Response> {
  const at = opts.at ?? Math.floor(Date.now() / 1000);
  return fetch(inbound.url + ASN_WEBHOOK_PATH, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-scm-signature': signWebhookBody(opts.secret ?? WEBHOOK_SECRET, body, at), ...(opts.eventId ? { 'x-scm-event-id': opts.eventId } : {}) },
    body,
    signal: AbortSignal.timeout(5000),
  });
}
const lastLog = () => logLines.at(-1)?.msg;

/** A correctly signed push with exactly this Content-Type, none when undefined (a byte body: fetch adds none of its own). */
function pushAs(body: string, contentType: string | undefined): Promise<Response> {
  return fetch(inbound.url + ASN_WEBHOOK_PATH, {
    method: 'POST',
    headers: { 'x-scm-signature': signWebhookBody(WEBHOOK_SECRET, body, Math.floor(Date.now() / 1000)), ...(contentType === undefined ? {} : { 'content-type': contentType }) },
    body: new TextEncoder().encode(body),
    signal: AbortSignal.timeout(5000),
  });
}
/** Rows in every table of the product schemas, from the catalog: what "nothing written" is checked against. */
const rowsEverywhere = async () => (await db.pool.query(`
  select table_schema || '.' || table_name t,
         (xpath('/row/n/text()', query_to_xml(format('select count(*) n from %I.%I', table_schema, table_name), false, true, '')))[1]::text::int n
    from information_schema.tables
   where table_type = 'BASE TABLE' and table_schema in ('cloud', 'erp', 'tax', 'scm', 'vault', 'sso')
   order by 1`)).rows;

describe('the ASN webhook (push)', () => {
  it('a supplier ships and the cloud pushes the ASN: it is in the ERP, and the same push again changes nothing', async () => {
    const shipped = await sim.ship({ asn: asnDoc('ASN-P1', 'PO-A', [{ line: 1, qty: 5 }]), via: 'push', webhookUrl: inbound.url + ASN_WEBHOOK_PATH, webhookSecret: WEBHOOK_SECRET });
    expect(shipped).toMatchObject({ status: 200, body: 'success' });
    const { rows } = await db.pool.query(`select asn_no, status, received_via as source, cloud_event_id from scm.asn`);
    expect(rows).toEqual([{ asn_no: 'ASN-P1', status: 'accepted', source: 'push', cloud_event_id: shipped.eventId }]);
    const body = JSON.stringify({ eventId: shipped.eventId, asn: asnDoc('ASN-P1', 'PO-A', [{ line: 1, qty: 5 }]) });
    const again = await push(body, { eventId: shipped.eventId });
    expect(again.status).toBe(200);
    expect(again.headers.get('x-scm-asn-status')).toBe('duplicate');
    expect(await asnCount()).toBe(1);
  });

  it('a bad signature is 401, a stale timestamp is 401, each with its own log line, and nothing is written', async () => {
    const body = JSON.stringify({ eventId: 'e1', asn: asnDoc('ASN-S', 'PO-A', [{ line: 1, qty: 5 }]) });
    const bad = await push(body, { secret: 'some-other-secret-value' });
    expect(bad.status).toBe(401);
    expect(await bad.json()).toEqual({ error: 'bad_signature' });
    expect(lastLog()).toBe('ASN webhook refused: bad signature');
    const unsigned = await fetch(inbound.url + ASN_WEBHOOK_PATH, { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(5000) });
    expect(unsigned.status).toBe(401);
    const stale = await push(body, { at: Math.floor(Date.now() / 1000) - 600 });
    expect(stale.status).toBe(401);
    expect(await stale.json()).toEqual({ error: 'stale_timestamp' });
    expect(lastLog()).toBe('ASN webhook refused: stale timestamp (replay?)');
    // the body signed, then changed in transit
    const tampered = await fetch(inbound.url + ASN_WEBHOOK_PATH, {
      method: 'POST', body: body.replace('"purchaseNum":5', '"purchaseNum":50'),
      headers: { 'content-type': 'application/json', 'x-scm-signature': signWebhookBody(WEBHOOK_SECRET, body, Math.floor(Date.now() / 1000)) }, signal: AbortSignal.timeout(5000),
    });
    expect(tampered.status).toBe(401);
    expect(await asnCount()).toBe(0);
  });

  it('an unknown source is 403, an oversized body 413, a malformed body 400 or 422: each logged, nothing written', async () => {
    const good = JSON.stringify({ eventId: 'e2', asn: asnDoc('ASN-Z', 'PO-A', [{ line: 1, qty: 5 }]) });
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '203.0.113.0/24';
    const foreign = await push(good);
    expect(foreign.status).toBe(403);
    expect(lastLog()).toBe('inbound request refused: source address not allowed');
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '';
    expect((await push(good)).status).toBe(403); // no ranges configured: nobody gets in
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '127.0.0.0/8';

    const huge = JSON.stringify({ eventId: 'e3', asn: { ...asnDoc('ASN-H', 'PO-A', [{ line: 1, qty: 5 }]), pad: 'x'.repeat(300 * 1024) } });
    const big = await push(huge);
    expect(big.status).toBe(413);
    expect(lastLog()).toBe('inbound request refused: body too large');

    const notJson = await push('{"eventId": "e4", "asn": ');
    expect(notJson.status).toBe(400);
    expect(lastLog()).toBe('ASN webhook refused: malformed body (not JSON)');
    const noAsn = await push('{"eventId": "e5"}');
    expect(noAsn.status).toBe(400);
    const badAsn = await push(JSON.stringify({ eventId: 'e6', asn: { code: 'ASN-Q', supplier: 'S001', details: [] } }));
    expect(badAsn.status).toBe(422);
    expect(await badAsn.json()).toMatchObject({ error: 'malformed_asn', code: 'ES004' });
    expect(lastLog()).toBe('ASN webhook refused: malformed ASN');

    inboundEnv.SECRET_SET = 'no';
    const unconfigured = await push(good);
    expect(unconfigured.status).toBe(503);
    expect(lastLog()).toBe('ASN webhook refused: shared secret not configured');
    expect(await asnCount()).toBe(0);
  });

  it('a correctly signed ASN sent as text/plain, a form, multipart, in GBK or without a Content-Type is refused 415 with Accept-Post, and nothing is written anywhere', async () => {
    const before = await rowsEverywhere();
    for (const type of ['text/plain', 'text/plain;charset=UTF-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=----x',
      undefined, 'application/json; charset=gbk', 'application/json;charset=Big5', 'application/json, text/plain']) {
      const body = JSON.stringify({ eventId: `e-415-${String(type)}`, asn: asnDoc('ASN-415', 'PO-A', [{ line: 1, qty: 5 }]) });
      const res = await pushAs(body, type);
      expect({ type, status: res.status, acceptPost: res.headers.get('accept-post'), error: (await res.json()).error })
        .toEqual({ type, status: 415, acceptPost: 'application/json', error: 'unsupported_media_type' });
      expect(lastLog()).toBe('inbound request refused: unsupported content type');
    }
    expect(await asnCount()).toBe(0);
    expect(await rowsEverywhere()).toEqual(before);
  });

  it('the right type is taken in any case, with parameters and a UTF-8 charset', async () => {
    const types = ['application/json', 'APPLICATION/JSON', 'application/json; charset=utf-8', 'Application/Json;Charset="UTF-8"'];
    for (const [i, type] of types.entries()) {
      const res = await pushAs(JSON.stringify({ eventId: `e-ct-${i}`, asn: asnDoc(`ASN-CT${i}`, 'PO-A', [{ line: 1, qty: 1 }]) }), type);
      expect({ type, status: res.status, asn: res.headers.get('x-scm-asn-status') }).toEqual({ type, status: 200, asn: 'accepted' });
    }
    expect(await asnCount()).toBe(types.length);
  });

  it('the event id is the signed one in the body: a header cannot change it, and a known event id with another ASN is 409', async () => {
    const body = JSON.stringify({ eventId: 'ev-signed', asn: asnDoc('ASN-E1', 'PO-A', [{ line: 1, qty: 5 }]) });
    expect((await push(body, { eventId: 'ev-from-header' })).status).toBe(200);
    expect((await db.pool.query(`select cloud_event_id from scm.asn`)).rows).toEqual([{ cloud_event_id: 'ev-signed' }]);
    const other = JSON.stringify({ eventId: 'ev-signed', asn: asnDoc('ASN-E2', 'PO-A', [{ line: 1, qty: 5 }]) });
    const conflict = await push(other);
    expect(conflict.status).toBe(409);
    expect(await conflict.json()).toMatchObject({ error: 'event_conflict', code: 'ES017' });
    expect(lastLog()).toBe('ASN webhook refused: event id already used for another ASN');
    expect(await asnCount()).toBe(1);
  });

  it('an unlisted source is refused before its body is read; the size limit is read from the environment per request', async () => {
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '203.0.113.0/24';
    // an oversized body from outside: 403 (the source check runs first), not 413
    const huge = JSON.stringify({ eventId: 'e-big', asn: { ...asnDoc('ASN-H', 'PO-A', [{ line: 1, qty: 5 }]), pad: 'x'.repeat(300 * 1024) } });
    const res = await push(huge);
    expect(res.status).toBe(403);
    expect(lastLog()).toBe('inbound request refused: source address not allowed');
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '127.0.0.0/8';
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES = '1024';
    try {
      const small = JSON.stringify({ eventId: 'e-2k', asn: { ...asnDoc('ASN-K', 'PO-A', [{ line: 1, qty: 5 }]), pad: 'x'.repeat(2048) } });
      expect((await push(small)).status).toBe(413);
    } finally {
      delete inboundEnv.ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES;
    }
    expect(await asnCount()).toBe(0);
  });

  it('a push that waits on a locked purchase order is answered 503 with Retry-After, and succeeds once the lock is gone', async () => {
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS = '200';
    const holder = await db.pool.connect();
    try {
      await holder.query('begin');
      await holder.query(`select id from scm.purchase_order where po_no = (select po_no from erp.purchase_order where id = $1) for update`, [poId]);
      const body = JSON.stringify({ eventId: 'ev-locked', asn: asnDoc('ASN-LOCK', 'PO-A', [{ line: 1, qty: 5 }]) });
      const busy = await push(body);
      expect(busy.status).toBe(503);
      expect(busy.headers.get('retry-after')).toBe('5');
      expect(lastLog()).toBe('ASN webhook deferred: purchase order locked');
      await holder.query('rollback');
      const later = await push(body);
      expect(later.status).toBe(200);
      expect(later.headers.get('x-scm-asn-status')).toBe('accepted');
    } finally {
      await holder.query('rollback').catch(() => undefined);
      holder.release();
      delete inboundEnv.ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS;
    }
  });

  it('a rejected ASN is still answered success (the cloud must not retry it) and kept with its reason', async () => {
    const res = await sim.ship({ asn: asnDoc('ASN-R', 'PO-A', [{ line: 1, qty: 500 }]), via: 'push', webhookUrl: inbound.url + ASN_WEBHOOK_PATH, webhookSecret: WEBHOOK_SECRET });
    expect(res.status).toBe(200);
    const { rows } = await db.pool.query(`select status, reject_code from scm.asn`);
    expect(rows).toEqual([{ status: 'rejected', reject_code: 'ES015' }]);
  });
});

describe('the ASN pull (delivery list by watermark)', () => {
  const pullDone = async () => (await db.pool.query(`select count(*)::int n from cloud.outbox where operation = 'scm.asn_pull' and status <> 'sent'`)).rows[0].n === 0;

  it('the pull job fetches new deliveries page by page through the adapter, ingests them and advances the watermark', async () => {
    await db.pool.query(`select scm.put_asn_pull('yonbip', p_page_size => 2)`);
    await sim.ship({ asn: asnDoc('ASN-L1', 'PO-A', [{ line: 1, qty: 10 }]), via: 'list', ts: '2026-11-24 09:00:00' });
    await sim.ship({ asn: asnDoc('ASN-L2', 'PO-A', [{ line: 1, qty: 10 }]), via: 'list', ts: '2026-11-24 09:05:00' });
    await sim.ship({ asn: asnDoc('ASN-L3', 'PO-A', [{ line: 2, qty: 10 }]), via: 'list', ts: '2026-11-24 09:10:00' });
    expect((await db.pool.query(`select scm.enqueue_asn_pulls() n`)).rows[0].n).toBe(1);
    expect((await db.pool.query(`select scm.enqueue_asn_pulls() n`)).rows[0].n).toBe(0); // one at a time per endpoint
    listener = await startListener(db.url);
    await waitFor(async () => (await asnCount()) === 3 && (await pullDone()), { what: 'three ASNs pulled' });
    const { rows } = await db.pool.query(`select asn_no, status, received_via as source from scm.asn order by asn_no`);
    expect(rows).toEqual(['ASN-L1', 'ASN-L2', 'ASN-L3'].map((n) => ({ asn_no: n, status: 'accepted', source: 'pull' })));
    const wm = await db.pool.query(`select to_char(watermark at time zone 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') w from scm.asn_pull`);
    expect(wm.rows[0].w).toBe('2026-11-24 09:10:00');
    const pages = await db.pool.query(`select payload->>'pageIndex' p, payload->>'ts' ts from cloud.outbox where operation = 'scm.asn_pull' order by id`);
    expect(pages.rows).toEqual([{ p: '1', ts: '2000-01-01 08:00:00' }, { p: '2', ts: '2000-01-01 08:00:00' }]);

    // the next run asks from the watermark: only the newer delivery is new, the re-listed one changes nothing
    await sim.ship({ asn: asnDoc('ASN-L4', 'PO-A', [{ line: 2, qty: 5 }]), via: 'list', ts: '2026-11-24 10:00:00' });
    expect((await db.pool.query(`select scm.enqueue_asn_pulls() n`)).rows[0].n).toBe(1);
    await waitFor(async () => (await asnCount()) === 4 && (await pullDone()), { what: 'fourth ASN pulled' });
    const last = await db.pool.query(`select payload->>'ts' ts from cloud.outbox where operation = 'scm.asn_pull' order by id desc limit 1`);
    expect(last.rows[0].ts).toBe('2026-11-24 09:10:00');
    expect(await lineCount()).toBe(4);
  });

  it('a malformed record in a page goes to quarantine with the reason; the rest is ingested and the watermark moves on', async () => {
    await db.pool.query(`select scm.put_asn_pull('yonbip')`);
    const bad = withLine(asnDoc('ASN-QB', 'PO-A', [{ line: 1, qty: 1 }, { line: 2, qty: 1 }]), 1, { lineno: 1 });
    await sim.ship({ asn: bad, via: 'list', ts: '2026-11-24 08:00:00' });
    await sim.ship({ asn: { ...asnDoc('ASN-Q0', 'PO-A', [{ line: 1, qty: 1 }]), status: 0 }, via: 'list', ts: '2026-11-24 08:30:00' });
    await sim.ship({ asn: asnDoc('ASN-QG', 'PO-A', [{ line: 1, qty: 2 }]), via: 'list', ts: '2026-11-24 09:00:00' });
    listener = await startListener(db.url);
    await db.pool.query(`select scm.enqueue_asn_pulls()`);
    await waitFor(pullDone, { what: 'pull finished' });
    expect((await db.pool.query(`select status from cloud.outbox where operation = 'scm.asn_pull'`)).rows).toEqual([{ status: 'sent' }]);
    expect((await db.pool.query(`select asn_no, detail -> 'details' -> 0 ->> 'orderId' order_id from scm.asn`)).rows)
      .toEqual([{ asn_no: 'ASN-QG', order_id: null }]); // (PO-A was not yet published when shipped: no cloud order id to add)
    const q = await db.pool.query(`select source, sqlstate, reason, doc ->> 'code' code from scm.asn_quarantine`);
    expect(q.rows).toEqual([{ source: 'pull', sqlstate: 'ES004', reason: expect.stringMatching(/lineno/), code: 'ASN-QB' }]);
    const wm = await db.pool.query(`select to_char(watermark at time zone 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') w from scm.asn_pull`);
    expect(wm.rows[0].w).toBe('2026-11-24 09:00:00');
  });

  it('an ASN that was pushed and is then listed for the pull is ingested once', async () => {
    await db.pool.query(`select scm.put_asn_pull('yonbip')`);
    const shipped = await sim.ship({ asn: asnDoc('ASN-B', 'PO-A', [{ line: 1, qty: 7 }]), via: 'push', webhookUrl: inbound.url + ASN_WEBHOOK_PATH, webhookSecret: WEBHOOK_SECRET });
    expect(shipped.status).toBe(200);
    listener = await startListener(db.url);
    await db.pool.query(`select scm.enqueue_asn_pulls()`);
    await waitFor(pullDone, { what: 'pull finished' });
    expect(await asnCount()).toBe(1);
    expect((await db.pool.query(`select received_via as source from scm.asn`)).rows[0].source).toBe('push');
  });

  it('the pull is refused by the cloud without its required date range: the message fails and no watermark moves', async () => {
    await db.pool.query(`select scm.put_asn_pull('yonbip')`);
    sim.setFaults({ pathPrefix: '/iuap-api-gateway/yonbip/cpu/deliveryOrderApi', schedule: [{ kind: 'status', status: 200, body: { code: '999', message: 'deliveryDateStart is required' } }] });
    listener = await startListener(db.url);
    await db.pool.query(`select scm.enqueue_asn_pulls()`);
    await waitFor(async () => (await db.pool.query(`select status from cloud.outbox where operation = 'scm.asn_pull'`)).rows[0]?.status === 'failed', { what: 'failed' });
    const wm = await db.pool.query(`select watermark = '2000-01-01 00:00:00+00' as unchanged from scm.asn_pull`);
    expect(wm.rows[0].unchanged).toBe(true);
    expect(await sqlstateOf(db.pool.query(`select scm.put_asn_pull('yonbip', p_page_size => 51)`))).toBe(SqlState.invalidAsnPullSetting);
    expect(await sqlstateOf(db.pool.query(`select scm.put_asn_pull('nowhere')`))).toBe(SqlState.unknownEndpoint);
  });
});

