import { describe, it, expect, beforeAll, afterAll, beforeEach } from 'vitest';
import { randomBytes } from 'node:crypto';
import { startSim, webhookRoutes, type SimServer, type SimRoute, type FaultPlan } from '../listener/sim/index.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { nuonuoSign } from '../listener/providers/nuonuo.js';

/** POSTs JSON with an optional Idempotency-Key; every call is bounded so a hung server fails the test fast. */
async function post(base: string, path: string, body: unknown, key?: string, timeoutMs = 2_000): Promise<Response> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (key !== undefined) headers['idempotency-key'] = key;
  return fetch(base + path, { method: 'POST', headers, body: JSON.stringify(body), signal: AbortSignal.timeout(timeoutMs) });
}

async function control(base: string, method: string, path: string, body?: unknown): Promise<Response> {
  return fetch(`${base}/__sim/${path}`, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(2_000),
  });
}

describe('cloud simulator framework', () => {
  let sim: SimServer;
  let base: string;
  let handlerCalls = 0;

  // A route whose handler fails with a 503 the first time each body says so, to show that a
  // handler-side 5xx does not poison the key.
  const flaky: SimRoute = {
    method: 'POST',
    path: '/flaky',
    handler: (ctx) => {
      handlerCalls += 1;
      const body = ctx.body as { failFirst?: boolean };
      return body.failFirst && handlerCalls === 1 ? { status: 503, body: { error: 'busy' } } : { status: 201, body: { created: ctx.seq } };
    },
  };
  const counter: SimRoute = { method: 'POST', path: '/counter', idempotent: false, handler: () => ({ status: 200, body: { calls: ++handlerCalls } }) };

  beforeAll(async () => {
    sim = await startSim({ name: 'test-cloud', routes: [...webhookRoutes(), flaky, counter], maxBodyBytes: 4 * 1024 });
    base = sim.url;
  });

  afterAll(async () => {
    await sim.close();
  });

  beforeEach(() => {
    sim.reset();
    handlerCalls = 0;
  });

  it('listens on 127.0.0.1 with an ephemeral port and answers health', async () => {
    expect(sim.url).toBe(`http://127.0.0.1:${sim.port}`);
    expect(sim.port).toBeGreaterThan(0);
    const res = await control(base, 'GET', 'health');
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ ok: true });
    expect(sim.requests()).toEqual([]); // control traffic is not logged
  });

  it('a webhook POST is accepted and tells the seq of its effect', async () => {
    const res = await post(base, '/webhook/orders', { id: 1 }, 'k-1');
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ ok: true, received: 'k-1', seq: 1 });
    const res2 = await post(base, '/webhooks/invoices', { id: 2 }, 'k-2');
    expect(await res2.json()).toEqual({ ok: true, received: 'k-2', seq: 2 });
    expect(sim.ledger().map((e) => [e.key, e.seq, e.path])).toEqual([
      ['k-1', 1, '/webhook/orders'],
      ['k-2', 2, '/webhooks/invoices'],
    ]);
  });

  it('the same Idempotency-Key returns the first answer and is counted once', async () => {
    const first = await post(base, '/webhook', { amount: 10 }, 'dup');
    const firstBody = await first.json();
    const second = await post(base, '/webhook', { amount: 999 }, 'dup');
    expect(second.status).toBe(first.status);
    expect(await second.json()).toEqual(firstBody);
    expect(second.headers.get('idempotent-replayed')).toBe('true');

    const ledger = sim.ledger();
    expect(ledger).toHaveLength(1);
    expect(ledger[0]).toMatchObject({ key: 'dup', method: 'POST', path: '/webhook', body: { amount: 10 }, status: 200, response: firstBody, hits: 2, seq: 1 });
    expect(sim.requests()).toHaveLength(2);
  });

  it('concurrent duplicates of one key still produce exactly one effect', async () => {
    const answers = await Promise.all(Array.from({ length: 10 }, () => post(base, '/webhook', { n: 1 }, 'race').then((r) => r.json())));
    expect(new Set(answers.map((a) => JSON.stringify(a))).size).toBe(1);
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'race', hits: 10, seq: 1 })]);
  });

  it('X-Request-Id is the key when there is no Idempotency-Key', async () => {
    for (let i = 0; i < 2; i++) {
      await fetch(`${base}/webhook`, { method: 'POST', headers: { 'x-request-id': 'rid-7' }, body: 'not json', signal: AbortSignal.timeout(2_000) });
    }
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'rid-7', body: 'not json', hits: 2 })]);
  });

  it('requests without a key reach the handler every time and bypass the ledger', async () => {
    const a = await (await post(base, '/webhook', {})).json();
    expect(a).toEqual({ ok: true, received: null, seq: null });
    await post(base, '/webhook', {});
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests().map((r) => r.key)).toEqual([null, null]);
  });

  it('non-idempotent routes run the handler for every request even with a key', async () => {
    await post(base, '/counter', {}, 'same');
    const res = await post(base, '/counter', {}, 'same');
    expect(await res.json()).toEqual({ calls: 2 });
    expect(sim.ledger()).toEqual([]);
  });

  it('a scheduled 500 produces no effect and the retry is recorded once', async () => {
    sim.setFaults({ schedule: [{ kind: 'status', status: 500 }] });
    const failed = await post(base, '/webhook', { x: 1 }, 'retry-me');
    expect(failed.status).toBe(500);
    expect(await failed.json()).toEqual({ error: 'injected', status: 500 });
    expect(sim.ledger()).toEqual([]);

    const retried = await post(base, '/webhook', { x: 1 }, 'retry-me');
    expect(retried.status).toBe(200);
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'retry-me', hits: 1, seq: 1 })]);
    expect(sim.requests().map((r) => [r.fault, r.status])).toEqual([
      ['status', 500],
      [null, 200],
    ]);
  });

  it('schedule entries are used one per request, with null and {kind:"ok"} meaning a normal answer', async () => {
    sim.setFaults({ schedule: [null, { kind: 'status', status: 400, body: { error: 'bad' } }, { kind: 'ok' }, { kind: 'status', status: 502 }] });
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) statuses.push((await post(base, '/webhook', {}, `s-${i}`)).status);
    expect(statuses).toEqual([200, 400, 200, 502, 200]);
    expect(sim.ledger().map((e) => e.key)).toEqual(['s-0', 's-2', 's-4']);
  });

  it('429 carries Retry-After', async () => {
    sim.setFaults({ schedule: [{ kind: 'status', status: 429, retryAfter: 7 }] });
    const res = await post(base, '/webhook', {}, 'rl');
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('7');
  });

  it('a handler-side 5xx does not poison the key', async () => {
    const first = await post(base, '/flaky', { failFirst: true }, 'fk');
    expect(first.status).toBe(503);
    expect(sim.ledger()).toEqual([]);
    const second = await post(base, '/flaky', { failFirst: true }, 'fk');
    expect(second.status).toBe(201);
    expect(await second.json()).toEqual({ created: 1 });
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'fk', status: 201, hits: 1, seq: 1 })]);
  });

  it('a dropped connection gives the client a socket error', async () => {
    sim.setFaults({ schedule: [{ kind: 'drop' }] });
    await expect(post(base, '/webhook', {}, 'drop-me')).rejects.toThrow(TypeError);
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests()).toEqual([expect.objectContaining({ key: 'drop-me', fault: 'drop', status: null })]);
  });

  it('a timeout fault holds the request until the client gives up (client AbortSignal.timeout(200))', async () => {
    sim.setFaults({ schedule: [{ kind: 'timeout' }] });
    const started = performance.now();
    const error = await post(base, '/webhook', {}, 'hang', 200).then(
      () => null,
      (err: unknown) => err,
    );
    expect((error as Error | null)?.name).toBe('TimeoutError');
    expect(performance.now() - started).toBeGreaterThanOrEqual(190);
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests()).toEqual([expect.objectContaining({ fault: 'timeout', status: null })]);
  });

  it('a timeout fault with ms destroys the socket after that long', async () => {
    sim.setFaults({ schedule: [{ kind: 'timeout', ms: 50 }] });
    await expect(post(base, '/webhook', {}, 'short-hang', 1_000)).rejects.toThrow(TypeError);
  });

  it('slow answers still reach the ledger', async () => {
    sim.setFaults({ schedule: [{ kind: 'slow', ms: 100 }] });
    const started = performance.now();
    const res = await post(base, '/webhook', { slow: true }, 'slowpoke');
    expect(performance.now() - started).toBeGreaterThanOrEqual(95);
    expect(res.status).toBe(200);
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'slowpoke', hits: 1 })]);
    expect(sim.requests()).toEqual([expect.objectContaining({ fault: 'slow', status: 200 })]);
  });

  it('a slow answer the client gave up on still produces its effect, and the retry gets the replay', async () => {
    sim.setFaults({ schedule: [{ kind: 'slow', ms: 150 }] });
    await expect(post(base, '/webhook', {}, 'gave-up', 50)).rejects.toThrow();
    await new Promise((r) => setTimeout(r, 200));
    const retry = await post(base, '/webhook', {}, 'gave-up');
    expect(retry.headers.get('idempotent-replayed')).toBe('true');
    expect(sim.ledger()).toEqual([expect.objectContaining({ key: 'gave-up', hits: 2 })]);
    expect(sim.requests().map((r) => r.status)).toEqual([null, 200]);
  });

  it('a key-matched persistent fault fails only that key', async () => {
    sim.setFaults({ key: 'doomed', schedule: [{ kind: 'status', status: 503, retryAfter: 1 }], persist: true });
    for (let i = 0; i < 3; i++) expect((await post(base, '/webhook', {}, 'doomed')).status).toBe(503);
    expect((await post(base, '/webhook', {}, 'fine')).status).toBe(200);
    expect(sim.ledger().map((e) => e.key)).toEqual(['fine']);
  });

  it('a path-prefix fault affects only matching paths', async () => {
    sim.setFaults({ pathPrefix: '/webhook/tax', fault: { kind: 'status', status: 500 } });
    expect((await post(base, '/webhook/tax/1', {}, 'a')).status).toBe(500);
    expect((await post(base, '/webhook/po/1', {}, 'b')).status).toBe(200);
  });

  it('a rate fault hits each request independently with the given probability', async () => {
    const values = [0.1, 0.9, 0.2, 0.6];
    const rated = await startSim({ routes: webhookRoutes(), random: () => values.shift() ?? 1 });
    try {
      rated.setFaults({ rate: 0.5, fault: { kind: 'status', status: 500 } });
      const statuses: number[] = [];
      for (let i = 0; i < 4; i++) statuses.push((await post(rated.url, '/webhook', {}, `r-${i}`)).status);
      expect(statuses).toEqual([500, 200, 500, 200]);
    } finally {
      await rated.close();
    }
  });

  it('invalid fault plans are rejected', async () => {
    expect(() => sim.setFaults({ rate: 2, fault: { kind: 'drop' } })).toThrow(/rate/);
    expect(() => sim.setFaults({ schedule: [{ kind: 'explode' }] } as unknown as FaultPlan)).toThrow(/unknown fault kind/);
    const res = await control(base, 'POST', 'faults', { fault: { kind: 'status', status: 42 } });
    expect(res.status).toBe(400);
  });

  it('faults can be set and cleared over HTTP', async () => {
    expect((await control(base, 'POST', 'faults', { schedule: [{ kind: 'status', status: 503 }], persist: true })).status).toBe(200);
    expect((await post(base, '/webhook', {}, 'h1')).status).toBe(503);
    expect((await control(base, 'DELETE', 'faults')).status).toBe(200);
    expect((await post(base, '/webhook', {}, 'h1')).status).toBe(200);
    // POSTing null also clears.
    await control(base, 'POST', 'faults', { schedule: [{ kind: 'drop' }], persist: true });
    await control(base, 'POST', 'faults', null);
    expect((await post(base, '/webhook', {}, 'h2')).status).toBe(200);
  });

  it('the ledger read-back over HTTP matches ledger()', async () => {
    sim.setFaults({ schedule: [{ kind: 'status', status: 500 }] });
    await post(base, '/webhook', { a: 1 }, 'l-1');
    await post(base, '/webhook', { a: 1 }, 'l-1');
    await post(base, '/webhook', { b: 2 }, 'l-2');
    await post(base, '/webhook', { a: 1 }, 'l-1');

    const res = await control(base, 'GET', 'ledger');
    const payload = (await res.json()) as { entries: unknown[]; effects: number; requests: unknown[] };
    expect(payload.entries).toEqual(sim.ledger());
    expect(payload.requests).toEqual(sim.requests());
    expect(payload.effects).toBe(2);
    expect(sim.ledger().map((e) => [e.key, e.seq, e.hits])).toEqual([
      ['l-1', 1, 2],
      ['l-2', 2, 1],
    ]);
    const [first, second] = sim.ledger();
    expect(first!.firstAt).toBeLessThan(second!.firstAt);
  });

  it('unknown routes get 404 JSON and known paths with the wrong method get 405', async () => {
    const missing = await post(base, '/nope', {}, 'x');
    expect(missing.status).toBe(404);
    expect(await missing.json()).toMatchObject({ error: 'not_found' });
    const wrong = await fetch(`${base}/webhook`, { signal: AbortSignal.timeout(2_000) });
    expect(wrong.status).toBe(405);
    expect(wrong.headers.get('allow')).toBe('POST');
    expect((await control(base, 'GET', 'nope')).status).toBe(404);
  });

  it('oversized bodies get 413', async () => {
    const res = await post(base, '/webhook', { blob: 'x'.repeat(8 * 1024) }, 'big');
    expect(res.status).toBe(413);
    expect(await res.json()).toMatchObject({ error: 'payload_too_large' });
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests()).toEqual([expect.objectContaining({ key: 'big', status: 413 })]);
    // The connection stays usable afterwards.
    expect((await post(base, '/webhook', { small: true }, 'small')).status).toBe(200);
  });

  it('reset clears everything', async () => {
    await post(base, '/webhook', {}, 'before');
    sim.setFaults({ schedule: [{ kind: 'status', status: 500 }], persist: true });
    expect((await control(base, 'POST', 'reset')).status).toBe(200);
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests()).toEqual([]);
    const res = await post(base, '/webhook', {}, 'before');
    expect(await res.json()).toEqual({ ok: true, received: 'before', seq: 1 });
    sim.reset();
    expect(sim.ledger()).toEqual([]);
    expect(sim.requests()).toEqual([]);
  });

  it('a gateway rate limit answers 429 with Retry-After past its burst, and produces no effect', async () => {
    expect((await control(base, 'POST', 'rate-limit', { perSecond: 0.001, burst: 2 })).status).toBe(200);
    const statuses = [];
    for (const k of ['r1', 'r2', 'r3']) statuses.push((await post(base, '/webhook', {}, k)).status);
    expect(statuses).toEqual([200, 200, 429]);
    expect(sim.requests()[2]).toMatchObject({ key: 'r3', fault: 'rate_limited', status: 429 });
    expect(sim.ledger().map((e) => e.key)).toEqual(['r1', 'r2']);
    expect((await control(base, 'POST', 'rate-limit', { perSecond: -1 })).status).toBe(400);
    sim.setRateLimit(null);
    expect((await post(base, '/webhook', {}, 'r4')).status).toBe(200);
  });

  it('close() does not wait for held timeout sockets', async () => {
    const held = await startSim({ routes: webhookRoutes() });
    held.setFaults({ fault: { kind: 'timeout' } });
    const pending = post(held.url, '/webhook', {}, 'held', 5_000).catch((err: unknown) => err);
    // Wait until the server has the request, then close while it is held.
    while (held.requests().length === 0) await new Promise((r) => setTimeout(r, 5));
    const started = performance.now();
    await held.close();
    expect(performance.now() - started).toBeLessThan(500);
    expect(await pending).toBeInstanceOf(TypeError);
  });
});

describe('the Nuonuo simulator', () => {
  const appKey = 'sim-settings-app';
  const appSecret = randomBytes(12).toString('hex');
  let nn: NuonuoSim;
  const settingsUrl = () => `${nn.url}/__nuonuo/settings`;
  const getSettings = async () => (await (await fetch(settingsUrl(), { signal: AbortSignal.timeout(2_000) })).json()) as { settings: Record<string, unknown> };
  const postRaw = (body: string) => fetch(settingsUrl(), { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(2_000) });

  beforeAll(async () => {
    nn = await startNuonuoSim({ appKey, appSecret, issueDelayMs: 20 });
  });
  afterAll(async () => {
    await nn.close();
  });

  it('GET /__nuonuo/settings returns the current settings; POST changes only the keys it names', async () => {
    expect((await getSettings()).settings).toEqual({ issueDelayMs: 20, rejectBuyers: {}, pdfUrlOverride: null, pdfRedirectTo: null, signFailBuyers: [], redAwaitBuyer: false });
    const res = await postRaw(JSON.stringify({ issueDelayMs: 0, rejectBuyers: { '91330106MA2AYNWD8M': '不存在' }, redAwaitBuyer: true }));
    expect(res.status).toBe(200);
    expect((await getSettings()).settings).toEqual({ issueDelayMs: 0, rejectBuyers: { '91330106MA2AYNWD8M': '不存在' }, pdfUrlOverride: null,
      pdfRedirectTo: null, signFailBuyers: [], redAwaitBuyer: true });
    expect((await postRaw(JSON.stringify({ issueDelayMs: 20, rejectBuyers: {}, redAwaitBuyer: false }))).status).toBe(200);
  });

  it('POST /__nuonuo/settings refuses nonsense with 400 naming the field, and changes nothing', async () => {
    const before = await getSettings();
    const bad: Array<[string, string]> = [
      [JSON.stringify({ issueDelayMs: -100 }), 'issueDelayMs'],
      [JSON.stringify({ issueDelayMs: 'abc' }), 'issueDelayMs'],
      [JSON.stringify({ issueDelayMs: 1.5 }), 'issueDelayMs'],
      [JSON.stringify({ issueDelayMs: 10_000_000 }), 'issueDelayMs'],
      [JSON.stringify({ issueDelay: 5 }), 'issueDelay'],
      [JSON.stringify({ issueDelayMs: 5, colour: 'red' }), 'colour'],
      [JSON.stringify({ rejectBuyers: ['91330106MA2AYNWD8M'] }), 'rejectBuyers'],
      [JSON.stringify({ rejectBuyers: { '91330106MA2AYNWD8M': 7 } }), 'rejectBuyers.91330106MA2AYNWD8M'],
      [JSON.stringify({ pdfUrlOverride: 'not a url' }), 'pdfUrlOverride'],
      [JSON.stringify({ pdfRedirectTo: 42 }), 'pdfRedirectTo'],
      [JSON.stringify({ signFailBuyers: 'x' }), 'signFailBuyers'],
      [JSON.stringify({ redAwaitBuyer: 'yes' }), 'redAwaitBuyer'],
      [JSON.stringify([1, 2]), '(body)'],
      ['"issueDelayMs"', '(body)'],
    ];
    for (const [body, field] of bad) {
      const res = await postRaw(body);
      expect(res.status, body).toBe(400);
      const answer = (await res.json()) as { error: string; issues: Array<{ field: string; message: string }> };
      expect(answer.error, body).toBe('invalid_settings');
      expect(answer.issues.map((i) => i.field), body).toContain(field);
    }
    expect(await getSettings()).toEqual(before);
  });

  /** One signed requestBillingNew, then the platform's verdict once it is final (bounded wait). */
  async function issueOn(order: Record<string, unknown>): Promise<{ status: string; failCause: string }> {
    const tokenRes = await fetch(`${nn.url}/accessToken`, {
      method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ client_id: appKey, client_secret: appSecret, grant_type: 'client_credentials' }).toString(), signal: AbortSignal.timeout(2_000),
    });
    const { access_token: token } = (await tokenRes.json()) as { access_token: string };
    const orderNo = randomBytes(10).toString('hex');
    const body = JSON.stringify({ order: { orderNo, buyerName: '华东机电有限公司', salerTaxNum: '339902999999789113', ...order } });
    const senid = randomBytes(16).toString('hex');
    const nonce = '12345678';
    const timestamp = String(Math.floor(Date.now() / 1000));
    const res = await fetch(`${nn.url}/open/v1/services?senid=${senid}&nonce=${nonce}&timestamp=${timestamp}&appkey=${appKey}`, {
      method: 'POST', body, signal: AbortSignal.timeout(5_000),
      headers: { 'content-type': 'application/json', accessToken: token, method: 'nuonuo.OpeMplatform.requestBillingNew',
        'x-nuonuo-sign': nuonuoSign({ appSecret, appKey, senid, nonce, timestamp, body }) },
    });
    expect(((await res.json()) as { code: string }).code).toBe('E0000');
    const deadline = Date.now() + 10_000;
    for (;;) {
      const inv = nn.invoices().find((i) => i.orderNo === orderNo);
      if (inv && inv.status !== '20') return inv;
      if (Date.now() > deadline) throw new Error('the simulator never finished the invoice');
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  const oneYuan = (n: number, goodsName = '配件') => Array.from({ length: n }, () => ({
    goodsName, goodsCode: '1010101070000000000', taxRate: '0.13', taxExcludedAmount: '0.88', tax: '0.12', taxIncludedAmount: '1.00', withTaxFlag: '1',
  }));

  it('like the platform, fails an invoice over the 1.27 tolerance, a text over its length or more than 8 decimals, and issues one within them', async () => {
    expect(await issueOn({ invoiceDetail: oneYuan(226) })).toMatchObject({ status: '2' });
    expect(await issueOn({ invoiceDetail: oneYuan(227) })).toMatchObject({ status: '22', failCause: expect.stringContaining('1.27') });
    expect(await issueOn({ invoiceDetail: oneYuan(1, '中'.repeat(90)) })).toMatchObject({ status: '2' });
    expect(await issueOn({ invoiceDetail: oneYuan(1, '中'.repeat(91)) })).toMatchObject({ status: '22', failCause: expect.stringContaining('goodsName') });
    expect(await issueOn({ invoiceDetail: oneYuan(1), buyerAddress: '中'.repeat(60), buyerTel: '8'.repeat(41) })).toMatchObject({ status: '22' });
    expect(await issueOn({ invoiceDetail: [{ ...oneYuan(1)[0], num: '1.000000001', price: '1' }] })).toMatchObject({ status: '22' });
  });
});
