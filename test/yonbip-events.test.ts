/**
 * YonBIP's own event push (EncryptionHolder, cloud-protocols.md §4.5): the crypto checked
 * against the openssl and sha1sum command-line tools (not against itself), then the
 * receiver end to end through the listener's inbound server into scm.ingest_asn, its
 * refusals, and the simulator pushing in the platform's format.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { YONBIP_EVENTS_PATH } from '../listener/inbound/yonbip-events.js';
import { startInboundServer } from '../listener/inbound/inbound-server.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { decryptEvent, deriveAesKey, encryptEvent, eventSignature, YonbipCryptoError, type SignatureAlgorithm } from '../listener/providers/yonbip-crypto.js';
import { createTestDb, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { addPo, addSuppliers, APP_KEY, APP_SECRET_VALUE, asnDoc, setupYonbip } from './helpers/scm.js';

// a YonBIP-like app secret: 32 hex digits in 8-4-4-4-12 groups (the dashes are removed, then padded with 0 to 43)
const EVENT_SECRET = '3f2a9c1e-7b4d-4e8a-9c0f-5d6e7f8a9b0c'; // secret-scan: allow (a test fixture)

let tmp: string;
const openssl = (args: string[], input?: Buffer): Buffer => execFileSync('openssl', args, input === undefined ? {} : { input });

describe('the event crypto, checked against openssl and sha1sum', () => {
  beforeAll(() => { tmp = mkdtempSync(join(tmpdir(), 'yonbip-crypto-')); });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it.each([
    ['a dashed secret shorter than 43 characters (padded with 0)', EVENT_SECRET, '3f2a9c1e7b4d4e8a9c0f5d6e7f8a9b0c00000000000'],
    ['a secret longer than 43 characters (cut)', 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123', 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ'],
  ])('the AES key from %s is base64decode(key43 + "=")', (_what, secret, key43) => {
    const want = openssl(['base64', '-d', '-A'], Buffer.from(`${key43}=`));
    expect(want).toHaveLength(32);
    expect(deriveAesKey(secret).equals(want)).toBe(true);
  });

  it('encryptEvent makes the bytes openssl makes (AES-256-CBC, no padding, IV = key[0..16], PKCS7 to 32 bytes), and decryptEvent reads them', () => {
    const key = deriveAesKey(EVENT_SECRET);
    const random = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    // 16 + 4 + 21 + 11 = 52 bytes (pads 12) and 16 + 4 + 33 + 11 = 64 bytes (a whole block of 32 × 0x20 follows)
    for (const message of ['{"eventId":"发货-1"}XX', '{"eventId":"e-64","type":"x"}1234']) {
      const msg = Buffer.from(message, 'utf8');
      const len = Buffer.alloc(4);
      len.writeUInt32BE(msg.length);
      const plain = Buffer.concat([random, len, msg, Buffer.from(APP_KEY)]);
      const n = 32 - (plain.length % 32); // PKCS7 with a 32-byte block, done here by hand
      const padded = Buffer.concat([plain, Buffer.alloc(n, n)]);
      const file = join(tmp, 'plain.bin');
      writeFileSync(file, padded);
      const expected = openssl(['enc', '-aes-256-cbc', '-nopad', '-K', key.toString('hex'), '-iv', key.subarray(0, 16).toString('hex'), '-in', file]);
      expect(expected.length % 32).toBe(0);
      expect(encryptEvent(message, APP_KEY, key, random)).toBe(expected.toString('base64'));
      expect(decryptEvent(expected.toString('base64'), key, APP_KEY)).toBe(message);
    }
    expect(Buffer.from(encryptEvent('{"eventId":"e-64","type":"x"}1234', APP_KEY, key, random), 'base64')).toHaveLength(96);
  });

  it('decryptEvent refuses another app’s event, a bad padding and a ciphertext cut short', () => {
    const key = deriveAesKey(EVENT_SECRET);
    const reason = (f: () => unknown) => { try { f(); return 'opened'; } catch (e) { return e instanceof YonbipCryptoError ? e.reason : String(e); } };
    expect(reason(() => decryptEvent(encryptEvent('{}', 'another-app', key), key, APP_KEY))).toBe('wrong_app_key');
    // 64 bytes whose last byte says 0x21 (more than the 32-byte block), encrypted by openssl
    const file = join(tmp, 'badpad.bin');
    writeFileSync(file, Buffer.concat([Buffer.alloc(63, 7), Buffer.from([0x21])]));
    const bad = openssl(['enc', '-aes-256-cbc', '-nopad', '-K', key.toString('hex'), '-iv', key.subarray(0, 16).toString('hex'), '-in', file]);
    expect(reason(() => decryptEvent(bad.toString('base64'), key, APP_KEY))).toBe('bad_padding');
    writeFileSync(file, Buffer.concat([Buffer.alloc(60, 7), Buffer.from([4, 4, 3, 4])])); // the pad bytes disagree
    const uneven = openssl(['enc', '-aes-256-cbc', '-nopad', '-K', key.toString('hex'), '-iv', key.subarray(0, 16).toString('hex'), '-in', file]);
    expect(reason(() => decryptEvent(uneven.toString('base64'), key, APP_KEY))).toBe('bad_padding');
    const good = Buffer.from(encryptEvent('{"eventId":"x"}', APP_KEY, key), 'base64');
    expect(reason(() => decryptEvent(good.subarray(0, 16).toString('base64'), key, APP_KEY))).toBe('bad_length');
    expect(reason(() => decryptEvent('not base64!', key, APP_KEY))).toBe('bad_base64');
    expect(reason(() => decryptEvent(encryptEvent('{"eventId":"x"}', APP_KEY, deriveAesKey('another-secret')), key, APP_KEY))).not.toBe('opened');
  });

  it.each([['sha1', 'sha1sum'], ['sha256', 'sha256sum']] as const)('the %s signature is %s over the four parts sorted byte-wise and joined', (algorithm, tool) => {
    const parts = [EVENT_SECRET, '1764000000123', 'n0nce42', 'QkFTRTY0+/encrypted=='];
    const sorted = execFileSync('sort', [], { input: `${parts.join('\n')}\n`, env: { ...process.env, LC_ALL: 'C' } }).toString().split('\n').join('');
    const want = execFileSync(tool, [], { input: sorted }).toString().split(' ')[0];
    expect(eventSignature(parts[0]!, parts[1]!, parts[2]!, parts[3]!, algorithm)).toBe(want);
  });
});

// ---------------------------------------------------------------- end to end

let db: TestDb;
let sim: YonbipSim;
let inbound: { url: string; close(): Promise<void> };
let inboundEnv: Record<string, string>;
let secrets: Record<string, string>;
const logLines: Array<{ msg: string; level: number }> = [];
const lastLog = () => logLines.at(-1)?.msg;

function holder(message: unknown, o: { secret?: string; appKey?: string; timestamp?: string; algorithm?: SignatureAlgorithm; field?: 'signature' | 'msgSignature' } = {}) {
  const secret = o.secret ?? EVENT_SECRET;
  const timestamp = o.timestamp ?? String(Date.now());
  const nonce = Math.random().toString(36).slice(2);
  const encrypt = encryptEvent(typeof message === 'string' ? message : JSON.stringify(message), o.appKey ?? APP_KEY, deriveAesKey(secret));
  return { [o.field ?? 'signature']: eventSignature(secret, timestamp, nonce, encrypt, o.algorithm), timestamp, nonce, encrypt };
}
const post = (body: unknown) => fetch(inbound.url + YONBIP_EVENTS_PATH, {
  method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body), signal: AbortSignal.timeout(5000),
});
/** A POST with exactly this Content-Type, none when undefined (a byte body: fetch adds none of its own). */
const postAs = (body: unknown, contentType: string | undefined) => fetch(inbound.url + YONBIP_EVENTS_PATH, {
  method: 'POST', headers: contentType === undefined ? {} : { 'content-type': contentType },
  body: new TextEncoder().encode(typeof body === 'string' ? body : JSON.stringify(body)), signal: AbortSignal.timeout(5000),
});
/** Rows in every table of the product schemas, from the catalog: what "nothing written" is checked against. */
const rowsEverywhere = async () => (await db.pool.query(`
  select table_schema || '.' || table_name t,
         (xpath('/row/n/text()', query_to_xml(format('select count(*) n from %I.%I', table_schema, table_name), false, true, '')))[1]::text::int n
    from information_schema.tables
   where table_type = 'BASE TABLE' and table_schema in ('cloud', 'erp', 'tax', 'scm', 'vault', 'sso')
   order by 1`)).rows;
const asnEvent = (eventId: string, doc: unknown, extra: Record<string, unknown> = {}) => ({ eventId, type: 'scm.asn.created', tenantId: 't1', content: JSON.stringify(doc), ...extra });
const asnCount = async () => (await db.pool.query(`select count(*)::int n from scm.asn`)).rows[0].n as number;
const quarantined = async () => (await db.pool.query(`select source, event_id, sqlstate, reason, doc from scm.asn_quarantine order by event_id`)).rows;

describe('the YonBIP event receiver (POST /scm/yonbip/events)', () => {
  beforeAll(async () => {
    db = await createTestDb('yonbip_events');
    sim = await startYonbipSim();
    const sink = new Writable({ write(chunk, _enc, cb) { for (const l of String(chunk).trim().split('\n')) logLines.push(JSON.parse(l)); cb(); } });
    inboundEnv = {};
    secrets = {};
    inbound = await startInboundServer('127.0.0.1', 0, {
      pool: db.pool,
      log: pino({ level: 'info' }, sink),
      env: inboundEnv,
      secret: async (name) => {
        if (secrets[name] !== undefined) return secrets[name]!;
        throw new Error(`no secret ${name}`);
      },
    });
  });
  afterAll(async () => {
    await inbound.close();
    await sim.close();
    await db.drop();
  });
  beforeEach(async () => {
    sim.reset();
    logLines.length = 0;
    for (const k of Object.keys(inboundEnv)) delete inboundEnv[k];
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '127.0.0.0/8';
    for (const k of Object.keys(secrets)) delete secrets[k];
    Object.assign(secrets, { 'yonbip.app_key': APP_KEY, 'yonbip.app_secret': EVENT_SECRET });
    await resetProductState(db.pool);
    await setupYonbip(db.pool, sim);
    const s = await addSuppliers(db.pool);
    await addPo(db.pool, 'PO-Y', s.s1);
  });

  it('a pushed ASN event is decrypted and ingested with the original document; the same eventId again changes nothing', async () => {
    const doc = asnDoc('ASN-Y1', 'PO-Y', [{ line: 1, qty: 30, batch: 'LOT-Y' }]);
    const body = holder(asnEvent('evt-1', doc));
    const res = await post(body);
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('success');
    expect(res.headers.get('x-scm-asn-status')).toBe('accepted');
    const { rows } = await db.pool.query(`select asn_no, status, received_via as source, cloud_event_id, detail from scm.asn`);
    expect(rows).toEqual([{ asn_no: 'ASN-Y1', status: 'accepted', source: 'push', cloud_event_id: 'evt-1', detail: doc }]);
    expect((await db.pool.query(`select batch_no, quantity::float8 q from scm.asn_line`)).rows).toEqual([{ batch_no: 'LOT-Y', q: 30 }]);
    // the cloud's retry: the same holder, and the same event encrypted afresh (new nonce, new timestamp)
    for (const again of [body, holder(asnEvent('evt-1', doc))]) {
      const r = await post(again);
      expect(r.status).toBe(200);
      expect(await r.text()).toBe('success');
      expect(r.headers.get('x-scm-asn-status')).toBe('duplicate');
    }
    expect(await asnCount()).toBe(1);
  });

  it('reads msgSignature, a timestamp in seconds, content as an object or wrapped in {data}, and the sha256 variant when set', async () => {
    const seconds = String(Math.floor(Date.now() / 1000));
    const a = await post(holder(asnEvent('evt-s', asnDoc('ASN-S1', 'PO-Y', [{ line: 1, qty: 1 }]), { content: asnDoc('ASN-S1', 'PO-Y', [{ line: 1, qty: 1 }]) }), { field: 'msgSignature', timestamp: seconds }));
    expect(a.headers.get('x-scm-asn-status')).toBe('accepted');
    const b = await post(holder(asnEvent('evt-d', null, { content: JSON.stringify({ data: asnDoc('ASN-S2', 'PO-Y', [{ line: 2, qty: 1 }]) }) })));
    expect(b.headers.get('x-scm-asn-status')).toBe('accepted');
    inboundEnv.ERP_CLOUD_YONBIP_EVENTS_SIGNATURE = 'sha256';
    const sha1Signed = await post(holder(asnEvent('evt-h1', asnDoc('ASN-S3', 'PO-Y', [{ line: 1, qty: 1 }]))));
    expect(sha1Signed.status).toBe(401);
    const sha256Signed = await post(holder(asnEvent('evt-h2', asnDoc('ASN-S3', 'PO-Y', [{ line: 1, qty: 1 }])), { algorithm: 'sha256' }));
    expect(sha256Signed.headers.get('x-scm-asn-status')).toBe('accepted');
    expect((await db.pool.query(`select asn_no from scm.asn order by asn_no`)).rows.map((r) => r.asn_no)).toEqual(['ASN-S1', 'ASN-S2', 'ASN-S3']);
  });

  it('a bad signature, a stale or future timestamp, another app’s key, a tampered or unopenable ciphertext are each 401 with their own log line, and nothing is written', async () => {
    const event = asnEvent('evt-bad', asnDoc('ASN-B', 'PO-Y', [{ line: 1, qty: 5 }]));
    const cases: Array<[string, unknown, string, string]> = [
      ['signed with another secret', holder(event, { secret: 'another-app-secret-0000' }), 'bad_signature', 'YonBIP event refused: bad signature'],
      // the window outlasts the cloud's 24 h of retries (a retry may resend the body as first signed)
      ['26 hours old (ms)', holder(event, { timestamp: String(Date.now() - 26 * 3600_000) }), 'stale_timestamp', 'YonBIP event refused: stale timestamp (replay?)'],
      ['26 hours old (s)', holder(event, { timestamp: String(Math.floor(Date.now() / 1000) - 26 * 3600) }), 'stale_timestamp', 'YonBIP event refused: stale timestamp (replay?)'],
      ['ten minutes ahead', holder(event, { timestamp: String(Date.now() + 600_000) }), 'stale_timestamp', 'YonBIP event refused: stale timestamp (replay?)'],
      ['encrypted for another app', holder(event, { appKey: 'foreign-app' }), 'wrong_app_key', 'YonBIP event refused: encrypted for another app (wrong appKey)'],
    ];
    const good = holder(event);
    const flipped = good.encrypt[10] === 'A' ? 'B' : 'A';
    cases.push(['a tampered ciphertext', { ...good, encrypt: good.encrypt.slice(0, 10) + flipped + good.encrypt.slice(11) }, 'bad_signature', 'YonBIP event refused: bad signature']);
    // a ciphertext that does not open (other key), signed correctly: the padding check refuses it
    const otherKey = encryptEvent(JSON.stringify(event), APP_KEY, deriveAesKey('zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz'));
    const ts = String(Date.now());
    cases.push(['a ciphertext that does not decrypt', { signature: eventSignature(EVENT_SECRET, ts, 'n', otherKey), timestamp: ts, nonce: 'n', encrypt: otherKey }, 'bad_padding', 'YonBIP event refused: ciphertext does not decrypt (bad padding)']);
    for (const [what, body, error, log] of cases) {
      const res = await post(body);
      expect({ what, status: res.status, error: (await res.json()).error, log: lastLog() }).toEqual({ what, status: 401, error, log });
    }
    expect(await asnCount()).toBe(0);
    expect(await quarantined()).toEqual([]);
    // a body signed 23 hours ago (a late retry) is still taken, once
    const late = holder(event, { timestamp: String(Date.now() - 23 * 3600_000) });
    expect((await post(late)).headers.get('x-scm-asn-status')).toBe('accepted');
    expect((await post(late)).headers.get('x-scm-asn-status')).toBe('duplicate');
    expect(await asnCount()).toBe(1);
  });

  it('an unknown source is 403 unread, an oversized body 413, a malformed holder 400, a missing secret 503: each logged, nothing written or kept', async () => {
    const body = holder(asnEvent('evt-r', asnDoc('ASN-R', 'PO-Y', [{ line: 1, qty: 5 }])));
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '203.0.113.0/24';
    expect((await post(body)).status).toBe(403);
    expect(lastLog()).toBe('inbound request refused: source address not allowed');
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '';
    expect((await post(body)).status).toBe(403);
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '127.0.0.0/8';

    const huge = holder(asnEvent('evt-big', { ...asnDoc('ASN-H', 'PO-Y', [{ line: 1, qty: 5 }]), pad: 'x'.repeat(300 * 1024) }));
    expect((await post(huge)).status).toBe(413);
    expect(lastLog()).toBe('inbound request refused: body too large');

    expect((await post('{"encrypt": ')).status).toBe(400);
    expect(lastLog()).toBe('YonBIP event refused: malformed holder (not a JSON object)');
    const { nonce: _n, ...noNonce } = body;
    expect((await post(noNonce)).status).toBe(400);
    expect(lastLog()).toBe('YonBIP event refused: malformed holder (signature, timestamp, nonce and encrypt are required)');

    delete secrets['yonbip.app_secret'];
    const unconfigured = await post(body);
    expect(unconfigured.status).toBe(503);
    expect(unconfigured.headers.get('retry-after')).toBe('60');
    expect(lastLog()).toBe('YonBIP event refused: app key or secret not configured');
    secrets['yonbip.app_secret'] = EVENT_SECRET;
    inboundEnv.ERP_CLOUD_YONBIP_EVENTS_SIGNATURE = 'md5';
    expect((await post(body)).status).toBe(503);
    expect(await asnCount()).toBe(0);
    expect(await quarantined()).toEqual([]);
  });

  it('a correctly signed event sent as text/plain, a form, multipart, in GBK or without a Content-Type is refused 415 with Accept-Post: nothing ingested, quarantined or written anywhere', async () => {
    const before = await rowsEverywhere();
    for (const type of ['text/plain', 'text/plain;charset=UTF-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=----x',
      undefined, 'application/json; charset=gbk', 'application/json; charset=GB18030', 'application/xml']) {
      // a fresh eventId each time, so that a refusal that went on to ingest would show as a row
      const res = await postAs(holder(asnEvent(`evt-415-${String(type)}`, asnDoc('ASN-415', 'PO-Y', [{ line: 1, qty: 5 }]))), type);
      expect({ type, status: res.status, acceptPost: res.headers.get('accept-post'), error: (await res.json()).error })
        .toEqual({ type, status: 415, acceptPost: 'application/json', error: 'unsupported_media_type' });
      expect(lastLog()).toBe('inbound request refused: unsupported content type');
    }
    // an authentic event that would have been quarantined (no ASN content) is not kept either
    expect((await postAs(holder({ eventId: 'evt-415-q', type: 'scm.asn.created', content: 'not json' }), 'text/plain')).status).toBe(415);
    expect(await quarantined()).toEqual([]);
    expect(await asnCount()).toBe(0);
    expect(await rowsEverywhere()).toEqual(before);
  });

  it('the right type is taken in any case, with parameters and a UTF-8 charset', async () => {
    const types = ['application/json', 'APPLICATION/JSON', 'application/json; charset=utf-8', 'Application/Json;Charset="UTF-8"'];
    for (const [i, type] of types.entries()) {
      const res = await postAs(holder(asnEvent(`evt-ct-${i}`, asnDoc(`ASN-CT${i}`, 'PO-Y', [{ line: 1, qty: 1 }]))), type);
      expect({ type, status: res.status, asn: res.headers.get('x-scm-asn-status') }).toEqual({ type, status: 200, asn: 'accepted' });
    }
    expect(await asnCount()).toBe(types.length);
  });

  it('an authentic event that cannot be ingested is answered success and kept in quarantine once per eventId, never refused or dropped', async () => {
    const bad = asnEvent('evt-q', { code: 'ASN-Q', supplier: 'S001', details: [] });
    for (let i = 0; i < 2; i++) { // the cloud's retry, signed anew, is kept once
      const res = await post(holder({ ...bad, sentAt: i }));
      expect(res.status).toBe(200);
      expect(await res.text()).toBe('success');
      expect(res.headers.get('x-scm-asn-status')).toBe('quarantined');
      expect(lastLog()).toBe('YonBIP event quarantined: ASN not ingestible');
    }
    const cases: Array<[unknown, string]> = [
      [{ eventId: 'evt-nc', type: 'scm.asn.created', content: 'not json' }, 'YonBIP event quarantined: no ASN content'],
      ['this is not json', 'YonBIP event quarantined: message not a JSON object'],
      [{ type: 'scm.asn.created', content: '{}' }, 'YonBIP event quarantined: no eventId'],
    ];
    for (const [message, log] of cases) {
      const res = await post(holder(message));
      expect({ status: res.status, text: await res.text(), log: lastLog() }).toEqual({ status: 200, text: 'success', log });
    }
    // an eventId already used for another ASN (ES017) is kept too, not answered 409 until the cloud gives up
    expect((await post(holder(asnEvent('evt-used', asnDoc('ASN-U1', 'PO-Y', [{ line: 1, qty: 5 }]))))).headers.get('x-scm-asn-status')).toBe('accepted');
    const conflict = await post(holder(asnEvent('evt-used', asnDoc('ASN-U2', 'PO-Y', [{ line: 1, qty: 6 }]))));
    expect(conflict.status).toBe(200);
    expect(conflict.headers.get('x-scm-asn-status')).toBe('quarantined');
    expect(await asnCount()).toBe(1);
    expect((await quarantined()).map((r) => [r.event_id, r.sqlstate, r.source])).toEqual([
      ['evt-nc', 'ES004', 'yonbip_event'], ['evt-q', 'ES004', 'yonbip_event'], ['evt-used', 'ES017', 'yonbip_event'], [null, 'ES004', 'yonbip_event'], [null, 'ES004', 'yonbip_event'],
    ]);
    const kept = await quarantined();
    expect(kept.find((r) => r.event_id === 'evt-q')).toMatchObject({ doc: expect.objectContaining({ eventId: 'evt-q', sentAt: 0 }), reason: expect.stringMatching(/.+/) });
    expect(kept.find((r) => r.doc === 'this is not json')).toBeTruthy();
    // an operator who fixes the document re-ingests it through the same door
    await db.pool.query(`select scm.ingest_asn($1, 'push', 'evt-q')`, [asnDoc('ASN-Q', 'PO-Y', [{ line: 1, qty: 5 }])]);
    expect(await asnCount()).toBe(2);
  });

  it('a reused eventId: each different ASN under it is kept in its own row; a retry of one updates its reason instead of adding a row', async () => {
    expect((await post(holder(asnEvent('evt-dup', asnDoc('ASN-D1', 'PO-Y', [{ line: 1, qty: 1 }]))))).headers.get('x-scm-asn-status')).toBe('accepted');
    for (const [asnNo, qty] of [['ASN-D2', 2], ['ASN-D3', 3], ['ASN-D2', 2]] as const) {
      const res = await post(holder(asnEvent('evt-dup', asnDoc(asnNo, 'PO-Y', [{ line: 1, qty }]))));
      expect(res.headers.get('x-scm-asn-status')).toBe('quarantined');
    }
    const rows = (await quarantined()).map((r) => [r.event_id, r.sqlstate, JSON.parse(r.doc.content).code]);
    expect(rows.sort()).toEqual([['evt-dup', 'ES017', 'ASN-D2'], ['evt-dup', 'ES017', 'ASN-D3']]);
  });

  it('an event holding text the database cannot store as JSON (\\u0000) is kept as base64, not refused until the cloud gives up', async () => {
    const message = JSON.stringify(asnEvent('evt-nul', { ...asnDoc('ASN-NUL', 'PO-Y', [{ line: 1, qty: 1 }]), carrier: 'SF\u0000Express' }));
    expect(message).toContain('\\u0000');
    const res = await post(holder(message));
    expect({ status: res.status, text: await res.text(), kept: res.headers.get('x-yonbip-event') }).toEqual({ status: 200, text: 'success', kept: 'quarantined' });
    expect(lastLog()).toBe('YonBIP event quarantined: message not storable as JSON');
    const [row] = await quarantined();
    expect(row).toMatchObject({ event_id: 'evt-nul', sqlstate: 'ES004' });
    expect(Buffer.from(row.doc.message_base64, 'base64').toString('utf8')).toBe(message);
    expect(await asnCount()).toBe(0);
  });

  it('an event for a locked purchase order is answered 503 with Retry-After and kept nowhere, so the cloud retries it', async () => {
    inboundEnv.ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS = '200';
    const lock = await db.pool.connect();
    try {
      await lock.query('begin');
      await lock.query(`select id from scm.purchase_order where po_no = 'PO-Y' for update`);
      const body = holder(asnEvent('evt-lock', asnDoc('ASN-L', 'PO-Y', [{ line: 1, qty: 1 }])));
      const busy = await post(body);
      expect(busy.status).toBe(503);
      expect(busy.headers.get('retry-after')).toBe('5');
      expect(lastLog()).toBe('YonBIP event deferred: purchase order locked');
      expect(await quarantined()).toEqual([]);
      await lock.query('rollback');
      expect((await post(body)).headers.get('x-scm-asn-status')).toBe('accepted');
    } finally {
      await lock.query('rollback').catch(() => undefined);
      lock.release();
    }
  });

  it("the platform's address check (CHECK_URL) is answered success and kept nowhere; an event of another type is kept in quarantine (ES018)", async () => {
    const check = await post(holder({ eventId: 'evt-check', type: 'CHECK_URL', content: 'hello' }));
    expect(check.status).toBe(200);
    expect(await check.text()).toBe('success');
    expect(check.headers.get('x-yonbip-event')).toBe('handshake');
    expect(await quarantined()).toEqual([]);
    const res = await post(holder({ eventId: 'evt-yc-1', type: 'YC_DELIVERY_ORDER', content: JSON.stringify(asnDoc('ASN-YC0', 'PO-Y', [{ line: 1, qty: 5 }])) }));
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('success');
    expect(res.headers.get('x-yonbip-event')).toBe('quarantined');
    expect(logLines.at(-1)).toMatchObject({ msg: 'YonBIP event quarantined: not an ASN event type (ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES)', event_type: 'YC_DELIVERY_ORDER' });
    expect(await quarantined()).toEqual([{ source: 'yonbip_event', event_id: 'evt-yc-1', sqlstate: 'ES018', reason: expect.stringContaining('YC_DELIVERY_ORDER'), doc: expect.objectContaining({ type: 'YC_DELIVERY_ORDER' }) }]);
    expect(await asnCount()).toBe(0);
    // the same type becomes an ASN event when configured as one
    inboundEnv.ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES = 'scm.asn.created, YC_DELIVERY_ORDER';
    const configured = await post(holder(asnEvent('evt-yc', asnDoc('ASN-YC', 'PO-Y', [{ line: 1, qty: 5 }]), { type: 'YC_DELIVERY_ORDER' })));
    expect(configured.headers.get('x-scm-asn-status')).toBe('accepted');
    expect(await asnCount()).toBe(1);
  });

  it('a rejected ASN is answered success and kept with its reason', async () => {
    const res = await post(holder(asnEvent('evt-over', asnDoc('ASN-O', 'PO-Y', [{ line: 1, qty: 500 }]))));
    expect(await res.text()).toBe('success');
    expect((await db.pool.query(`select status, reject_code from scm.asn`)).rows).toEqual([{ status: 'rejected', reject_code: 'ES015' }]);
  });

  it('the simulator’s supplier ships and the cloud pushes in its own format: the ASN is in the ERP; a retry changes nothing', async () => {
    secrets['yonbip.app_secret'] = APP_SECRET_VALUE; // the app setupYonbip registered with the simulator
    const shipped = await sim.ship({ asn: asnDoc('ASN-SIM', 'PO-Y', [{ line: 2, qty: 20 }]), via: 'push', pushFormat: 'yonbip', webhookUrl: inbound.url + YONBIP_EVENTS_PATH });
    expect(shipped).toMatchObject({ status: 200, body: 'success' });
    const { rows } = await db.pool.query(`select asn_no, status, received_via as source, cloud_event_id from scm.asn`);
    expect(rows).toEqual([{ asn_no: 'ASN-SIM', status: 'accepted', source: 'push', cloud_event_id: shipped.eventId }]);
    const again = await sim.ship({ asn: asnDoc('ASN-SIM', 'PO-Y', [{ line: 2, qty: 20 }]), via: 'push', pushFormat: 'yonbip', eventId: shipped.eventId, webhookUrl: inbound.url + YONBIP_EVENTS_PATH });
    expect(again).toMatchObject({ status: 200, body: 'success' });
    expect(await asnCount()).toBe(1);
    // a simulator app whose secret the ERP does not hold is refused
    sim.addApp('stranger-app', 'stranger-secret-0000');
    const stranger = await sim.ship({ asn: asnDoc('ASN-X', 'PO-Y', [{ line: 2, qty: 1 }]), via: 'push', pushFormat: 'yonbip', appKey: 'stranger-app', webhookUrl: inbound.url + YONBIP_EVENTS_PATH });
    expect(stranger.status).toBe(401);
    expect(await asnCount()).toBe(1);
  });
});
