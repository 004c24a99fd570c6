/**
 * The Nuonuo adapter and simulator on their own: the X-Nuonuo-Sign signature
 * against the reference's two test vectors (computed outside this project),
 * the platform's error codes for bad app keys, tokens and signatures, the
 * token quota, and the PDF download's egress rules.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { attemptDelivery } from '../listener/delivery/http.js';
import { nuonuoAdapter, nuonuoSign, orderNoFor, rememberedTokens, TOKEN_OF_MAX } from '../listener/providers/nuonuo.js';
import type { ClaimedMessage, ProviderContext } from '../listener/providers/index.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';

describe('X-Nuonuo-Sign', () => {
  it('matches test vector 1 (frozen against the official NNOpenSDK get_sign)', () => {
    expect(nuonuoSign({ appSecret: 'secret', appKey: 'app', senid: 'a'.repeat(32), nonce: '12345678', timestamp: '1700000000', body: '{"name":"中文"}' }))
      .toBe('4BzcKzrcoqxPis0W/W3X2ae0uIo=');
  });

  it('matches test vector 2 (the published sandbox key)', () => {
    expect(nuonuoSign({
      appSecret: 'SDDED2523BED4643', appKey: 'SD63236305', // secret-scan: allow (Nuonuo's published sandbox key, reference §1.4)
      senid: '0123456789abcdef0123456789abcdef', nonce: 87654321, timestamp: 1700000000,
      body: '{"orderNos":["T1"],"isOfferInvoiceDetail":"0"}',
    })).toBe('wTlmOgC2DPpecdqvFtzLZ1ANwWI=');
  });

  it('changes with one byte of the body, so the signed string must be the one sent', () => {
    const base = { appSecret: 'secret', appKey: 'app', senid: 'a'.repeat(32), nonce: '12345678', timestamp: '1700000000' };
    expect(nuonuoSign({ ...base, body: '{"name":"中文"}' })).not.toBe(nuonuoSign({ ...base, body: '{"name": "中文"}' }));
  });

  it('orderNo is the request_id without dashes: every retry carries the same one', () => {
    expect(orderNoFor('0b7e1c9a-3f2d-4c1e-9a8b-123456789abc')).toBe('0b7e1c9a3f2d4c1e9a8b123456789abc');
  });
});

describe('the simulated platform', () => {
  const appKey = 'unit-app';
  const appSecret = randomBytes(12).toString('hex');
  let sim: NuonuoSim;
  beforeAll(async () => {
    sim = await startNuonuoSim({ appKey, appSecret, tokenQuota: 2, issueDelayMs: 50 });
  });
  afterAll(async () => {
    await sim.close();
  });

  const tokenCall = (secret: string) => fetch(`${sim.url}/accessToken`, {
    method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ client_id: appKey, client_secret: secret, grant_type: 'client_credentials' }).toString(),
  }).then(async (r) => ({ status: r.status, body: await r.json() as Record<string, unknown> }));

  async function gateway(o: { token: string; key?: string; secret?: string; body: string; sign?: string; method?: string }) {
    const q = { senid: 'b'.repeat(32), nonce: '12345678', timestamp: String(Math.floor(Date.now() / 1000)) };
    const sign = o.sign ?? nuonuoSign({ appSecret: o.secret ?? appSecret, appKey: o.key ?? appKey, ...q, body: o.body });
    const r = await fetch(`${sim.url}/open/v1/services?${new URLSearchParams({ ...q, appkey: o.key ?? appKey })}`, {
      method: 'POST', body: o.body,
      headers: { 'content-type': 'application/json', accesstoken: o.token, 'x-nuonuo-sign': sign, method: o.method ?? 'nuonuo.OpeMplatform.queryInvoiceResult' },
    });
    return (await r.json()) as { code: string; describe: string; result: unknown };
  }

  it("checks the app key (070101), the token (070305) and the signature (070601) with the platform's codes", async () => {
    const t = await tokenCall(appSecret);
    expect(t.body).toMatchObject({ expires_in: 86400 });
    const token = String(t.body.access_token);
    const body = '{"orderNos":["nope"],"isOfferInvoiceDetail":"0"}';
    expect((await gateway({ token, body })).code).toBe('E9500'); // well-formed: the order is simply unknown
    expect((await gateway({ token, body, key: 'someone-else' })).code).toBe('070101');
    expect((await gateway({ token: 'forged', body })).code).toBe('070305');
    expect((await gateway({ token, body, secret: 'wrong-secret' })).code).toBe('070601');
    // a body changed after signing
    const sign = nuonuoSign({ appSecret, appKey, senid: 'b'.repeat(32), nonce: '12345678', timestamp: String(Math.floor(Date.now() / 1000)), body });
    expect((await gateway({ token, body: body.replace('nope', 'nope2'), sign })).code).toBe('070601');
  });

  it('refuses bad client credentials, and token calls beyond the quota (070306)', async () => {
    expect((await tokenCall('wrong')).body).toMatchObject({ error: 'invalid_client' });
    sim.reset();
    expect((await tokenCall(appSecret)).body.access_token).toBeTruthy();
    expect((await tokenCall(appSecret)).body.access_token).toBeTruthy();
    expect((await tokenCall(appSecret)).body).toMatchObject({ error: '070306' });
  });

  it('issues asynchronously (20, then 2 with a PDF), and answers a resubmitted orderNo with E9106', async () => {
    sim.reset();
    sim.configure({ issueDelayMs: 2000 }); // long enough to see status 20 however slow this machine is today
    const token = String((await tokenCall(appSecret)).body.access_token);
    const order = { orderNo: 'order-1', buyerName: '买方', salerTaxNum: '339902999999789113',
      invoiceDetail: [{ goodsName: '服务', goodsCode: '3040201030000000000', taxRate: '0.06', taxExcludedAmount: '100.00', tax: '6.00', taxIncludedAmount: '106.00' }] };
    const body = JSON.stringify({ order });
    const first = await gateway({ token, body, method: 'nuonuo.OpeMplatform.requestBillingNew' });
    expect(first).toMatchObject({ code: 'E0000', result: { invoiceSerialNum: expect.any(String) } });
    const q = JSON.stringify({ orderNos: ['order-1'], isOfferInvoiceDetail: '0' });
    expect((await gateway({ token, body: q })).result).toMatchObject([{ status: '20' }]);
    expect((await gateway({ token, body, method: 'nuonuo.OpeMplatform.requestBillingNew' })).code).toBe('E9106');
    let done: Array<{ status: string; pdfUrl: string; allElectronicInvoiceNumber: string }> = [];
    for (let i = 0; i < 100 && done[0]?.status !== '2'; i++) {
      await new Promise((r) => setTimeout(r, 100));
      done = (await gateway({ token, body: q })).result as typeof done;
    }
    expect(done[0]).toMatchObject({ status: '2' });
    expect(done[0]!.allElectronicInvoiceNumber).toMatch(/^\d{20}$/);
    const pdf = Buffer.from(await (await fetch(done[0]!.pdfUrl)).arrayBuffer());
    expect(pdf.subarray(0, 5).toString()).toBe('%PDF-');
    expect(sim.invoices()).toHaveLength(1);
  });

  it('fails an invoice whose line tax is more than 0.06 off (22 with the cause)', async () => {
    sim.reset();
    sim.configure({ issueDelayMs: 50 });
    const token = String((await tokenCall(appSecret)).body.access_token);
    const order = { orderNo: 'order-bad', buyerName: '买方', salerTaxNum: '339902999999789113',
      invoiceDetail: [{ goodsName: '服务', goodsCode: '3040201030000000000', taxRate: '0.06', taxExcludedAmount: '100.00', tax: '6.07', taxIncludedAmount: '106.07' }] };
    await gateway({ token, body: JSON.stringify({ order }), method: 'nuonuo.OpeMplatform.requestBillingNew' });
    let res: Array<{ status: string; failCause: string }> = [];
    for (let i = 0; i < 100 && res[0]?.status !== '22'; i++) {
      await new Promise((r) => setTimeout(r, 50));
      res = (await gateway({ token, body: JSON.stringify({ orderNos: ['order-bad'] }) })).result as typeof res;
    }
    expect(res[0]).toMatchObject({ status: '22', failCause: expect.stringContaining('6分钱') });
  });
});

describe('gateway answers', () => {
  const msg = (operation: string): ClaimedMessage => ({
    request_id: '00000000-0000-4000-8000-000000000002', endpoint: 'nuonuo', operation, payload: {}, attempt: 1,
    aggregate_type: null, aggregate_id: null, ordering_key: null, provider: 'nuonuo', base_url: 'https://sdk.nuonuo.example/open/v1/services',
    timeout_ms: 1000, endpoint_config: { app_key: 'k' }, locked_until: new Date(), send_at: new Date(),
  });
  const answer = (body: unknown, status = 200) => ({ status, headers: {}, body: JSON.stringify(body), raw: Buffer.from(JSON.stringify(body)) });

  it('are classified: E0000 ok, E9106 ok (already submitted), token refusals and quota retried, signature and business errors permanent', () => {
    expect(nuonuoAdapter.classify(answer({ code: 'E0000', result: { invoiceSerialNum: 's' } }), msg('tax.issue'))).toMatchObject({ outcome: 'ok' });
    expect(nuonuoAdapter.classify(answer({ code: 'E9106', describe: '订单编号或流水号不能重复' }), msg('tax.issue')))
      .toMatchObject({ outcome: 'ok', response: { code: 'E9106', duplicate: true } });
    expect(nuonuoAdapter.classify(answer({ code: 'E9500' }), msg('tax.query'))).toMatchObject({ outcome: 'ok' });
    expect(nuonuoAdapter.classify(answer({ code: 'E9500' }), msg('tax.issue'))).toMatchObject({ outcome: 'permanent', errorClass: 'nuonuo_E9500' });
    expect(nuonuoAdapter.classify(answer({ code: '070305' }), msg('tax.issue'))).toMatchObject({ outcome: 'retryable', errorClass: 'token_refused' });
    expect(nuonuoAdapter.classify(answer({ code: '070306' }), msg('tax.issue'))).toMatchObject({ outcome: 'retryable', errorClass: 'token_quota', retryAfterMs: 900_000 });
    expect(nuonuoAdapter.classify(answer({ code: '070601' }), msg('tax.issue'))).toMatchObject({ outcome: 'permanent', errorClass: 'sign_mismatch' });
    expect(nuonuoAdapter.classify(answer({ code: 'E9999', describe: '参数错误' }), msg('tax.issue'))).toMatchObject({ outcome: 'permanent', message: 'E9999 参数错误' });
    expect(nuonuoAdapter.classify(answer({ error: 'x' }, 503), msg('tax.issue'))).toMatchObject({ outcome: 'retryable', errorClass: 'http_503' });
    expect(nuonuoAdapter.classify({ status: 200, headers: {}, body: '<html>', raw: Buffer.from('<html>') }, msg('tax.query'))).toMatchObject({ outcome: 'retryable' });
  });
});

describe('gateway requests', () => {
  const msg = (requestId: string, operation: string, payload: Record<string, unknown>, config: Record<string, unknown> = {}): ClaimedMessage => ({
    request_id: requestId, endpoint: 'nuonuo', operation, payload, attempt: 1,
    aggregate_type: 'tax.invoice', aggregate_id: '1', ordering_key: null, provider: 'nuonuo', base_url: 'https://sdk.nuonuo.example/open/v1/services',
    timeout_ms: 1000, endpoint_config: { app_key: 'k', ...config }, locked_until: new Date(), send_at: new Date(),
  });
  const forgotten: string[] = [];
  const ctx = {
    secret: async () => 'secret', token: async () => 'tok', forgetToken: async (_k: string, t: string) => { forgotten.push(t); },
    fetch: async () => { throw new Error('no auxiliary call expected'); },
  } as unknown as ProviderContext;
  const rid = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;

  it("send the orderNo SQL built into the payload, not one recomputed from the request_id", async () => {
    const req = await nuonuoAdapter.buildRequest(msg(rid(1), 'tax.issue', { order: { orderNo: 'ab12cd34ab12cd34ab12cd34ab12cd34', buyerName: 'x' } }), ctx);
    expect(JSON.parse(req.body as string)).toEqual({ order: { orderNo: 'ab12cd34ab12cd34ab12cd34ab12cd34', buyerName: 'x' } });
    await expect(nuonuoAdapter.buildRequest(msg(rid(2), 'tax.issue', { order: { buyerName: 'x' } }), ctx)).rejects.toMatchObject({ outcome: 'permanent', errorClass: 'no_order_no' });
  });

  it('retry signing (reInvoice) on 诺税通 only', async () => {
    const req = await nuonuoAdapter.buildRequest(msg(rid(3), 'tax.reinvoice', { fpqqlsh: 's1', orderno: 'o1' }), ctx);
    expect(req.headers?.method).toBe('nuonuo.OpeMplatform.reInvoice');
    await expect(nuonuoAdapter.buildRequest(msg(rid(4), 'tax.reinvoice', { fpqqlsh: 's1' }, { method_prefix: 'nuonuo.ElectronInvoice' }), ctx))
      .rejects.toMatchObject({ outcome: 'permanent', errorClass: 'unsupported' });
  });

  it('remember the token of at most TOKEN_OF_MAX requests, evicting the oldest, so a refusal of a recent one still forgets its token', async () => {
    for (let i = 0; i < TOKEN_OF_MAX + 200; i++) await nuonuoAdapter.buildRequest(msg(rid(1000 + i), 'tax.query', { orderNos: ['o'] }), ctx);
    expect(rememberedTokens()).toBe(TOKEN_OF_MAX);
    const last = msg(rid(1000 + TOKEN_OF_MAX + 199), 'tax.query', {});
    expect(nuonuoAdapter.classify({ status: 200, headers: {}, body: '{"code":"070305"}', raw: Buffer.alloc(0) }, last)).toMatchObject({ errorClass: 'token_refused' });
    await nuonuoAdapter.buildRequest(msg(rid(9), 'tax.query', { orderNos: ['o'] }), ctx);
    expect(forgotten).toEqual(['tok']);
  });
});

describe('the PDF download', () => {
  const msg = (url: string): ClaimedMessage => ({
    request_id: '00000000-0000-4000-8000-000000000001', endpoint: 'nuonuo', operation: 'tax.download_pdf',
    payload: { url, max_bytes: 1_000_000 }, attempt: 1, aggregate_type: 'tax.invoice', aggregate_id: '1', ordering_key: null,
    provider: 'nuonuo', base_url: 'https://sdk.nuonuo.example/open/v1/services', timeout_ms: 1000, endpoint_config: {},
    locked_until: new Date(Date.now() + 5000), send_at: new Date(),
  });
  const noContext = {} as ProviderContext;

  it('to a host the endpoint allows but that resolves to loopback is refused inside the DNS lookup (no private addresses allowed)', async () => {
    const policy = { endpoint: 'nuonuo', baseHost: 'sdk.nuonuo.example', allowHosts: [], downloadHosts: ['localhost:9'], allowCidrs: [], allowPrivate: false };
    const r = await attemptDelivery(msg('http://localhost:9/files/1.pdf'), { logBodyBytes: 1000, policy, context: noContext });
    expect(r).toMatchObject({ outcome: 'permanent', error_class: 'egress_refused', http_status: null });
    expect(r.error_message).toMatch(/loopback/);
  });

  it('to a host the endpoint does not allow is refused before any connection', async () => {
    const policy = { endpoint: 'nuonuo', baseHost: 'sdk.nuonuo.example', allowHosts: [], allowCidrs: [], allowPrivate: true };
    const r = await attemptDelivery(msg('http://127.0.0.1:9/files/1.pdf'), { logBodyBytes: 1000, policy, context: noContext });
    expect(r).toMatchObject({ outcome: 'permanent', error_class: 'egress_refused' });
  });

  it('classifies a redirect as a permanent refusal naming its target, and a PDF as the attachment-to-be', () => {
    const m = msg('https://sdk.nuonuo.example/x.pdf');
    const redirect = nuonuoAdapter.classify({ status: 302, headers: { location: 'http://169.254.169.254/' }, body: '', raw: Buffer.alloc(0) }, m);
    expect(redirect).toMatchObject({ outcome: 'permanent', errorClass: 'redirect_refused' });
    expect((redirect as { message: string }).message).toContain('169.254.169.254');
    const pdf = Buffer.from('%PDF-1.7\n%…');
    expect(nuonuoAdapter.classify({ status: 200, headers: {}, body: '', raw: pdf }, m))
      .toEqual({ outcome: 'ok', response: { content_base64: pdf.toString('base64'), byte_size: pdf.length, content_type: 'application/pdf' } });
    expect(nuonuoAdapter.classify({ status: 200, headers: {}, body: '<html>', raw: Buffer.from('<html>') }, m)).toMatchObject({ outcome: 'permanent', errorClass: 'not_pdf' });
  });
});
