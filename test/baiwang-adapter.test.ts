/**
 * The Baiwang (百望云) adapter and simulator on their own: the MD5 sign and the
 * password hash checked against `md5sum`, `openssl` and `sha256sum` run on the
 * exact bytes (not against this project's own code); the request the adapter
 * sends signs the very body it carries; the simulator's token and signature
 * refusals with the platform's codes; how answers are classified; and the
 * token, cached in cloud.provider_token, obtained once for many requests,
 * renewed early with the refresh token, and by password when that is refused.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clearTokenMemo, providerContext } from '../listener/delivery/provider-context.js';
import { baiwangPasswordHash, baiwangSign, baiwangSignString, queryRecord } from '../listener/providers/baiwang-crypto.js';
import { baiwangAdapter, chinaTimeMs } from '../listener/providers/baiwang.js';
import type { ClaimedMessage, HttpAnswer, ProviderContext } from '../listener/providers/index.js';
import { startBaiwangSim, type BaiwangSim } from '../listener/sim/baiwang.js';
import { createTestDb, type TestDb } from './helpers/db.js';

const md5sum = (b: Buffer) => execFileSync('md5sum', [], { input: b }).toString().split(' ')[0]!.toUpperCase();
const opensslMd5 = (b: Buffer) => execFileSync('openssl', ['dgst', '-md5', '-r'], { input: b }).toString().split(' ')[0]!.toUpperCase();
const sha256sum = (b: Buffer) => execFileSync('sha256sum', [], { input: b }).toString().split(' ')[0]!;

describe('the Baiwang sign, checked against md5sum and openssl', () => {
  const secret = randomBytes(8).toString('hex');
  const params = { version: '6.0', method: 'baiwang.output.invoice.issue', appKey: 'bw-app', timestamp: '1700000000000', token: 'tok', format: 'json', type: 'sync', requestId: 'r-1' };
  const body = '{"taxNo":"339902999999789113","data":{"buyerName":"华东机电有限公司","goodsName":"*谷物*燕麦"}}';

  it('is upper-case MD5 of appSecret + the parameters sorted by key as key+value + the body + appSecret, byte for byte', () => {
    const expected = Buffer.from(`${secret}appKeybw-appformatjsonmethodbaiwang.output.invoice.issuerequestIdr-1timestamp1700000000000tokentoktypesyncversion6.0${body}${secret}`, 'utf8');
    expect(baiwangSignString(secret, params, body)).toBe(expected.toString('utf8'));
    expect(baiwangSign(secret, params, body)).toBe(md5sum(expected));
    expect(baiwangSign(secret, params, body)).toBe(opensslMd5(expected));
  });

  it('leaves out the sign itself and empty values', () => {
    const withExtras = { ...params, sign: 'OLD', encryptScope: '', token2: undefined };
    expect(baiwangSign(secret, withExtras, body)).toBe(baiwangSign(secret, params, body));
  });

  it('changes with one byte of the body (compact JSON only: a space breaks it)', () => {
    expect(baiwangSign(secret, params, body)).not.toBe(baiwangSign(secret, params, body.replace('{"taxNo"', '{ "taxNo"')));
  });

  it("the token call's password is SHA-256 of password + salt, as sha256sum computes it", () => {
    expect(baiwangPasswordHash('密码pass', 'salt-1')).toBe(sha256sum(Buffer.from('密码passsalt-1', 'utf8')));
  });

  it('an invoice date (YYYYMMDDHHmmss, China time) becomes the right instant', () => {
    expect(chinaTimeMs('20261206083000')).toBe(Date.parse('2026-12-06T00:30:00Z'));
    expect(chinaTimeMs('nonsense')).toBeNull();
  });
});

const APP_KEY = 'bw-unit-app';
const APP_SECRET = randomBytes(12).toString('hex');
const USERNAME = 'bw-user';
const PASSWORD = randomBytes(6).toString('hex');
const SALT = randomBytes(4).toString('hex');

function message(operation: string, payload: unknown, requestId = `00000000-0000-4000-8000-${randomBytes(6).toString('hex')}`, baseUrl = 'https://openapi.baiwang.example/router/rest'): ClaimedMessage {
  return {
    request_id: requestId, endpoint: 'baiwang', operation, payload, attempt: 1, aggregate_type: 'tax.invoice', aggregate_id: '1', ordering_key: null,
    provider: 'baiwang', base_url: baseUrl, timeout_ms: 2000,
    endpoint_config: { app_key: APP_KEY, username: USERNAME, tax_no: '339902999999789113' },
    locked_until: new Date(Date.now() + 5000), send_at: new Date(), allow_hosts: [], allow_cidrs: [], allow_private: true,
  };
}

const ORDER = {
  orderNo: 'ab12cd34ab12cd34ab12cd34ab12cd34', buyerName: '华东机电有限公司', buyerTaxNum: '91330106MA2AYNWD8M', salerTaxNum: '339902999999789113', clerk: '张三',
  invoiceLine: 'pc', remark: 'SO-1',
  invoiceDetail: [{ goodsName: '软件维护', goodsCode: '3040201030000000000', taxRate: '0.06', num: '1', price: '106', taxExcludedAmount: '100.00', tax: '6.00', taxIncludedAmount: '106.00', withTaxFlag: '1', invoiceLineProperty: '0' }],
};

describe('the request the adapter sends', () => {
  const ctx = {
    secret: async (name: string) => (name === 'baiwang.app_secret' ? APP_SECRET : 'x'),
    token: async () => 'tok-1', forgetToken: async () => undefined,
    fetch: async () => { throw new Error('no auxiliary call expected'); },
  } as unknown as ProviderContext;

  it('is signed over the exact body it carries (recomputed with md5sum from the URL and the body)', async () => {
    const req = await baiwangAdapter.buildRequest(message('tax.issue', { order: ORDER }), ctx);
    const url = new URL(req.url);
    const q = queryRecord(url.searchParams);
    expect(q).toMatchObject({ method: 'baiwang.output.invoice.issue', version: '6.0', appKey: APP_KEY, format: 'json', token: 'tok-1', type: 'sync' });
    const sorted = Object.keys(q).filter((k) => k !== 'sign' && q[k] !== '').sort().map((k) => `${k}${q[k]}`).join('');
    expect(q.sign).toBe(md5sum(Buffer.from(`${APP_SECRET}${sorted}${req.body}${APP_SECRET}`, 'utf8')));
    expect(req.secrets).toEqual(expect.arrayContaining([APP_SECRET, 'tok-1']));
    // the serialNo is the orderNo SQL built (the request_id's), the same on every retry
    const body = JSON.parse(req.body!) as { taxNo: string; data: Record<string, unknown> };
    expect(body).toMatchObject({ taxNo: '339902999999789113', data: { serialNo: ORDER.orderNo, invoiceType: '0', invoiceTypeCode: '02', invoiceTotalPrice: '100.00', invoiceTotalTax: '6.00', invoiceTotalPriceTax: '106.00' } });
    expect(req.body).toBe(JSON.stringify(body)); // compact
  });

  it('of the red-letter flow use the 7.0 methods with their sign parameters', async () => {
    const add = await baiwangAdapter.buildRequest(message('tax.red_confirm', { billId: 'b1', blueElecInvoiceNumber: '26442000000000000001', redReason: '1', sellerTaxNo: 's', applySource: '0' }), ctx);
    const q = queryRecord(new URL(add.url).searchParams);
    expect(q).toMatchObject({ method: 'baiwang.output.redinvoice.add', version: '7.0', signType: 'MD5', encryptType: 'NONE', encryptScope: '00' });
    // Nuonuo's reason 1 (销货退回) is the bureau's 02
    expect(JSON.parse(add.body!)).toMatchObject({ redConfirmSerialNo: 'b1', entryIdentity: '01', redInvoiceLabel: '02', autoIssueSwitch: 'Y' });
    for (const [op, method] of [['tax.red_query', 'redforminfo'], ['tax.red_operate', 'operate'], ['tax.red_list', 'formlist']] as const) {
      const r = await baiwangAdapter.buildRequest(message(op, { billId: 'b1', confirmType: '01' }), ctx);
      expect(new URL(r.url).searchParams.get('method')).toBe(`baiwang.output.redinvoice.${method}`);
    }
    await expect(baiwangAdapter.buildRequest(message('tax.reinvoice', { fpqqlsh: 's' }), ctx)).rejects.toMatchObject({ outcome: 'permanent', errorClass: 'unsupported' });
    await expect(baiwangAdapter.buildRequest(message('tax.issue', { order: { buyerName: 'x' } }), ctx)).rejects.toMatchObject({ outcome: 'permanent', errorClass: 'no_order_no' });
  });
});

describe("the adapter's verdicts", () => {
  const answer = (body: unknown, status = 200): HttpAnswer => ({ status, headers: {}, body: JSON.stringify(body), raw: Buffer.from(JSON.stringify(body)) });
  const err = (code: number, message: string) => ({ success: false, errorResponse: { code, message } });
  const issue = message('tax.issue', { order: ORDER });

  it('turn a duplicate serial into "already submitted: look it up", never an error', () => {
    const v = baiwangAdapter.classify(answer({ success: true, response: { success: [], fail: [{ serialNo: ORDER.orderNo, errorCode: '70016', errorMessage: '流水号重复' }] } }), issue);
    expect(v).toMatchObject({ outcome: 'ok', response: { code: 'E0000', duplicate: true, result: { invoiceSerialNum: ORDER.orderNo } } });
  });

  it('retry a refused or expired token (100001, 100002) and refuse a bad sign (100007) for good, with a readable reason', () => {
    expect(baiwangAdapter.classify(answer(err(100001, 'token 无效')), issue)).toMatchObject({ outcome: 'retryable', errorClass: 'token_refused' });
    expect(baiwangAdapter.classify(answer(err(100002, 'token 已过期')), issue)).toMatchObject({ outcome: 'retryable', errorClass: 'token_refused' });
    const sign = baiwangAdapter.classify(answer(err(100007, '签名错误')), issue);
    expect(sign).toMatchObject({ outcome: 'permanent', errorClass: 'sign_mismatch', response: { code: 'baiwang_100007' } });
    expect((sign as { response: { describe: string } }).response.describe).toMatch(/app key and app secret/);
  });

  it("give a refused invoice the platform's reason, its code prefixed baiwang_, and keep the raw answer", () => {
    const raw = { success: true, response: { success: [], fail: [{ serialNo: ORDER.orderNo, errorCode: '70001', errorMessage: '购买方纳税人识别号不存在' }] } };
    expect(baiwangAdapter.classify(answer(raw), issue)).toMatchObject({
      outcome: 'permanent', errorClass: 'baiwang_70001', response: { code: 'baiwang_70001', describe: '购买方纳税人识别号不存在', platform_answer: raw },
    });
  });

  it('translate a query answer into the write-back shape: 00 issued, 01 issuing, 02 failed with its reason, unknown serial not found yet', () => {
    const q = message('tax.query', { serialNos: ['s1'] });
    const one = (e: Record<string, unknown>) => baiwangAdapter.classify(answer({ success: true, response: [{ serialNo: 's1', ...e }] }), q);
    expect(one({ invoiceStatus: '00', invoiceNo: '26442000000000000001', invoiceDate: '20261206083000', pdfUrl: 'http://x/1.pdf' }))
      .toMatchObject({ outcome: 'ok', response: { code: 'E0000', result: [{ status: '2', allElectronicInvoiceNumber: '26442000000000000001', invoiceTime: Date.parse('2026-12-06T00:30:00Z'), pdfUrl: 'http://x/1.pdf' }] } });
    expect(one({ invoiceStatus: '01' })).toMatchObject({ response: { result: [{ status: '20' }] } });
    expect(one({ invoiceStatus: '02', errorCode: '70001', errorMessage: '税额误差' })).toMatchObject({ response: { result: [{ status: '22', failCause: '税额误差', errorCode: 'baiwang_70001' }] } });
    expect(baiwangAdapter.classify(answer(err(70018, '发票不存在')), q)).toMatchObject({ outcome: 'ok', response: { code: 'E9500' } });
    expect(baiwangAdapter.classify(answer({ error: 'x' }, 503), q)).toMatchObject({ outcome: 'retryable', errorClass: 'http_503' });
    expect(baiwangAdapter.classify({ status: 200, headers: {}, body: '<html>', raw: Buffer.from('<html>') }, q)).toMatchObject({ outcome: 'retryable', errorClass: 'baiwang_garbled' });
  });

  it('read a red form back in the write-back shape, confirmState as billStatus', () => {
    const v = baiwangAdapter.classify(answer({ success: true, response: { redConfirmSerialNo: 'b1', redConfirmNo: 'n1', confirmState: '04', redInvoiceNo: '26442000000000000002', redInvoiceSerialNo: 'b1' } }), message('tax.red_query', { billId: 'b1' }));
    expect(v).toMatchObject({ outcome: 'ok', response: { result: { list: [{ billStatus: '04', invoiceSerialNum: 'b1', redInvoiceNumber: '26442000000000000002' }] } } });
  });

  it('download an OFD and an XML as well as a PDF, checking what each file is', () => {
    const dl = (format: string) => message('tax.download_file', { url: 'http://x/1', format, max_bytes: 1000 });
    const raw = (b: string) => ({ status: 200, headers: {}, body: b, raw: Buffer.from(b, 'latin1') });
    expect(baiwangAdapter.classify(raw('PK\u0003\u0004rest'), dl('ofd'))).toMatchObject({ outcome: 'ok', response: { content_type: 'application/ofd' } });
    expect(baiwangAdapter.classify(raw('<?xml version="1.0"?><a/>'), dl('xml'))).toMatchObject({ outcome: 'ok', response: { content_type: 'application/xml' } });
    expect(baiwangAdapter.classify(raw('%PDF-1.7'), dl('ofd'))).toMatchObject({ outcome: 'permanent', errorClass: 'not_ofd' });
  });
});

describe('the simulated platform', () => {
  let sim: BaiwangSim;
  beforeAll(async () => {
    sim = await startBaiwangSim({ appKey: APP_KEY, appSecret: APP_SECRET, username: USERNAME, password: PASSWORD, salt: SALT, issueDelayMs: 20 });
  });
  afterAll(async () => {
    await sim.close();
  });

  const post = async (params: Record<string, string>, body: string) => {
    const r = await fetch(`${sim.url}/router/rest?${new URLSearchParams(params)}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    return (await r.json()) as { success: boolean; errorResponse?: { code: number }; response?: Record<string, unknown> };
  };
  const tokenCall = (password: string) => post({ method: 'baiwang.oauth.token', grant_type: 'password', client_id: APP_KEY, version: '7.0' },
    JSON.stringify({ username: USERNAME, password: baiwangPasswordHash(password, SALT), client_secret: APP_SECRET }));
  const call = (token: string, body: string, o: { secret?: string; appKey?: string; sign?: string } = {}) => {
    const params: Record<string, string> = { method: 'baiwang.output.invoice.query', version: '6.0', appKey: o.appKey ?? APP_KEY, format: 'json', timestamp: String(Date.now()), token, type: 'sync' };
    return post({ ...params, sign: o.sign ?? baiwangSign(o.secret ?? APP_SECRET, params, body) }, body);
  };

  it("refuses a wrong password at the token call, then checks the app key, the token (100001, 100002) and the sign (100007) with the platform's codes", async () => {
    expect(await tokenCall('wrong')).toMatchObject({ success: false, errorResponse: { code: 100005 } });
    const t = await tokenCall(PASSWORD);
    expect(t).toMatchObject({ success: true, response: { expires_in: 28_800 } });
    const token = String(t.response!.access_token);
    const body = '{"taxNo":"339902999999789113","data":{"serialNo":"nope"}}';
    expect((await call(token, body)).errorResponse?.code).toBe(70018); // well-formed: the serial is simply unknown
    expect((await call(token, body, { appKey: 'someone-else' })).errorResponse?.code).toBe(100003);
    expect((await call('forged', body)).errorResponse?.code).toBe(100001);
    expect((await call(token, body, { secret: 'wrong-secret' })).errorResponse?.code).toBe(100007);
    // a body changed after signing (one space) is refused as a bad sign
    const params = { method: 'baiwang.output.invoice.query', version: '6.0', appKey: APP_KEY, format: 'json', timestamp: String(Date.now()), token, type: 'sync' };
    expect((await post({ ...params, sign: baiwangSign(APP_SECRET, params, body) }, body.replace('{"taxNo"', '{ "taxNo"'))).errorResponse?.code).toBe(100007);
    sim.expireTokens();
    expect((await call(token, body)).errorResponse?.code).toBe(100002);
  });
});

describe('the token, through the listener\'s cache', () => {
  let db: TestDb;
  let sim: BaiwangSim;
  beforeAll(async () => {
    db = await createTestDb('baiwang_token');
    sim = await startBaiwangSim({ appKey: APP_KEY, appSecret: APP_SECRET, username: USERNAME, password: PASSWORD, salt: SALT, issueDelayMs: 20 });
    await db.pool.query(`select cloud.put_endpoint('baiwang', $1, 'baiwang', 'invoice_request')`, [`${sim.url}/router/rest`]);
  });
  afterAll(async () => {
    await sim.close();
    await db.drop();
  });

  const secrets: Record<string, string> = { 'baiwang.app_secret': APP_SECRET, 'baiwang.password': PASSWORD, 'baiwang.salt': SALT };
  const context = () => providerContext({
    pool: db.pool, endpoint: 'baiwang', timeoutMs: 2000,
    policy: { endpoint: 'baiwang', baseHost: '127.0.0.1', baseScheme: 'http:', basePort: sim.port, allowHosts: [], allowCidrs: [], allowPrivate: true },
    secret: async (n) => secrets[n]!,
  });
  const build = (ctx = context()) => baiwangAdapter.buildRequest(message('tax.query', { serialNos: ['s1'] }, undefined, `${sim.url}/router/rest`), ctx);
  const tokenIn = (url: string) => new URL(url).searchParams.get('token');
  const cached = async () => (await db.pool.query(`select token_key, token from cloud.provider_token where endpoint = 'baiwang' order by token_key`)).rows;

  it('is obtained once by password for many concurrent requests and cached with its refresh token', async () => {
    const reqs = await Promise.all(Array.from({ length: 6 }, () => build()));
    expect(new Set(reqs.map((r) => tokenIn(r.url))).size).toBe(1);
    expect(sim.tokenCalls()).toBe(1);
    const rows = await cached();
    expect(rows.map((r) => r.token_key)).toEqual([`${APP_KEY}:${USERNAME}`, `${APP_KEY}:${USERNAME}#refresh`]);
    // and the sim takes it: a real call through the request built
    const req = reqs[0]!;
    const r = await fetch(req.url, { method: 'POST', headers: req.headers, body: req.body });
    expect(((await r.json()) as { errorResponse: { code: number } }).errorResponse.code).toBe(70018);
  });

  it('is renewed early (within 15 minutes of expiry) with the refresh token, not the password', async () => {
    const before = (await cached())[0]!.token;
    await db.pool.query(`update cloud.provider_token set expires_at = now() + interval '10 minutes' where endpoint = 'baiwang' and token_key not like '%#refresh'`);
    clearTokenMemo(); // this process remembered the token's old lifetime
    const req = await build(context());
    expect(tokenIn(req.url)).not.toBe(before);
    expect(sim.refreshCalls()).toBe(1);
    expect(sim.tokenCalls()).toBe(1);
  });

  it('falls back to the password when the refresh token is refused, and a token the gateway refuses is replaced', async () => {
    await db.pool.query(`update cloud.provider_token set expires_at = now() where endpoint = 'baiwang' and token_key not like '%#refresh'`);
    clearTokenMemo();
    sim.reset(); // the platform forgets every token, refresh tokens too
    const req = await build(context());
    expect(sim.refreshCalls()).toBe(1); // tried, refused
    expect(sim.tokenCalls()).toBe(1); // then the password
    const r = await fetch(req.url, { method: 'POST', headers: req.headers, body: req.body });
    const m = message('tax.query', { serialNos: ['s1'] }, undefined, `${sim.url}/router/rest`);
    // the sim answers with the token it knows; an expired one is refused and forgotten
    expect(((await r.json()) as { errorResponse: { code: number } }).errorResponse.code).toBe(70018);
    sim.expireTokens();
    const refusedReq = await baiwangAdapter.buildRequest(m, context());
    const refused = await fetch(refusedReq.url, { method: 'POST', headers: refusedReq.headers, body: refusedReq.body });
    const text = await refused.text();
    expect(baiwangAdapter.classify({ status: 200, headers: {}, body: text, raw: Buffer.from(text) }, m)).toMatchObject({ outcome: 'retryable', errorClass: 'token_refused' });
    const next = await build(context());
    expect(tokenIn(next.url)).not.toBe(tokenIn(refusedReq.url));
  });
});
