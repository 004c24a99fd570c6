/**
 * Cloud webhooks get in only from their configured source ranges (the inbound 白名单), fail-closed,
 * and only in the media types each receiver speaks (415 before anything else is done).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import type pg from 'pg';
import { pino } from 'pino';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { admitSource, contentTypeRefusal, parseMediaType, sourceAllowed, type InboundPolicy } from '../listener/inbound/admission.js';
import { inboundRoutes, registerInboundRoute, startInboundServer } from '../listener/inbound/inbound-server.js';
import '../listener/inbound/routes.js';
import { createTestDb, type TestDb } from './helpers/db.js';

async function withReceiver(policy: InboundPolicy, fn: (url: string) => Promise<void>): Promise<void> {
  const server = http.createServer((req, res) => {
    if (!admitSource(req, res, policy)) return;
    res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    await fn(`http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`);
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
}

const post = (url: string) => fetch(url, { method: 'POST', body: '{}', signal: AbortSignal.timeout(2000) });

describe('inbound source ranges', () => {
  it('a webhook from outside the configured ranges gets 403; from inside, it goes through', async () => {
    await withReceiver({ name: 'asn', allowCidrs: ['203.0.113.0/24'] }, async (url) => {
      const res = await post(url);
      expect(res.status).toBe(403);
      expect(await res.json()).toEqual({ error: 'source_not_allowed' });
    });
    await withReceiver({ name: 'asn', allowCidrs: ['203.0.113.0/24', '127.0.0.0/8'] }, async (url) => {
      expect((await post(url)).status).toBe(200);
    });
  });

  it('no configured range lets nobody in, and a forwarded-for header changes nothing', async () => {
    await withReceiver({ name: 'asn', allowCidrs: [] }, async (url) => {
      const res = await fetch(url, { method: 'POST', body: '{}', headers: { 'x-forwarded-for': '127.0.0.1' }, signal: AbortSignal.timeout(2000) });
      expect(res.status).toBe(403);
    });
  });

  it('IPv4-mapped IPv6 peers are judged as IPv4; unknown or malformed input is refused', () => {
    const p = { name: 'x', allowCidrs: ['10.0.0.0/8'] };
    expect(sourceAllowed('::ffff:10.1.2.3', p)).toBe(true);
    expect(sourceAllowed('10.1.2.3', p)).toBe(true);
    expect(sourceAllowed('11.1.2.3', p)).toBe(false);
    expect(sourceAllowed(undefined, p)).toBe(false);
    expect(sourceAllowed('10.1.2.3', { name: 'x', allowCidrs: ['not-a-range'] })).toBe(false);
  });
});

describe('the media types a receiver speaks', () => {
  it('a Content-Type is read as RFC 9110 writes it: type and parameter names in any case, parameters and quoted values allowed', () => {
    expect(parseMediaType('Application/JSON ; Charset="UTF-8";  q=1')).toEqual({ essence: 'application/json', params: new Map([['charset', 'UTF-8'], ['q', '1']]) });
    expect(parseMediaType('application/x-www-form-urlencoded')).toEqual({ essence: 'application/x-www-form-urlencoded', params: new Map() });
    for (const bad of ['', 'json', 'application/', '/json', 'application/json charset=utf-8', 'application/json; charset', 'application/json; charset="utf-8',
      'application/json, text/plain', 'application/json; charset=utf-8; charset=gbk']) {
      expect({ bad, parsed: parseMediaType(bad) }).toEqual({ bad, parsed: null });
    }
  });

  it.each([
    ['application/json', null],
    ['APPLICATION/JSON', null],
    ['application/json; charset=utf-8', null],
    ['application/json;charset=UTF-8', null],
    ['Application/Json; Charset="utf-8"', null],
    ['application/json; charset=utf8', null],
    ['application/json; version=2', null],
    [undefined, 'no Content-Type'],
    ['', 'no Content-Type'],
    ['text/plain', 'text/plain is not application/json'],
    ['text/plain;charset=UTF-8', 'text/plain is not application/json'],
    ['application/x-www-form-urlencoded', 'application/x-www-form-urlencoded is not application/json'],
    ['multipart/form-data; boundary=x', 'multipart/form-data is not application/json'],
    ['application/json; charset=gbk', 'charset gbk is not UTF-8'],
    ['application/json; charset=ISO-8859-1', 'charset ISO-8859-1 is not UTF-8'],
    ['application/json; charset=utf-16', 'charset utf-16 is not UTF-8'],
    ['application/jsonx', 'application/jsonx is not application/json'],
    ['application/json garbage', 'Content-Type is not a media type'],
  ])('a JSON receiver given %j: %s', (value, refusal) => {
    expect(contentTypeRefusal(value, ['application/json'])).toBe(refusal);
  });

  it('a receiver must declare what it speaks as bare lower-case types', () => {
    const route = { name: 'x', method: 'POST' as const, path: '/x-never-served', handle: async () => undefined };
    for (const accepts of [[], ['application/JSON'], ['application/json; charset=utf-8'], ['json']]) {
      expect(() => registerInboundRoute({ ...route, accepts })).toThrow(/accepts must list media types/);
    }
    expect(inboundRoutes().some((r) => r.path === '/x-never-served')).toBe(false);
  });
});

// ------------------------------------------- every receiver, through the listener's inbound server

let db: TestDb;
let inbound: { url: string; close(): Promise<void> };
const env: Record<string, string> = {};
const dbCalls: string[] = [];
const secretCalls: string[] = [];
const logLines: Array<{ msg: string; receiver?: string; reason?: string }> = [];

/** The test database's pool, recording every query and checkout the receivers make. */
function recording(pool: pg.Pool): pg.Pool {
  return new Proxy(pool, {
    get(target, prop) {
      const v = Reflect.get(target, prop, target) as unknown;
      if (typeof v !== 'function') return v;
      return (...args: unknown[]) => {
        if (prop === 'query' || prop === 'connect') dbCalls.push(prop === 'query' ? String(args[0]) : 'connect');
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

/** A POST with exactly these headers (no Content-Type at all when none is given). */
function send(path: string, body: string, contentType: string | undefined): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { 'content-length': String(Buffer.byteLength(body)) };
    if (contentType !== undefined) headers['content-type'] = contentType;
    const req = http.request(inbound.url + path, { method: 'POST', headers, timeout: 5000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end(body);
  });
}

const WRONG_FOR_JSON = ['text/plain', 'text/plain;charset=UTF-8', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=----x', undefined,
  'application/json; charset=gbk', 'application/json; charset=iso-8859-1', 'application/json, text/plain'];

describe('a receiver refuses a content type it does not speak with 415 before anything else', () => {
  beforeAll(async () => {
    db = await createTestDb('inbound');
    const sink = new Writable({ write(chunk, _enc, cb) { for (const l of String(chunk).trim().split('\n')) logLines.push(JSON.parse(l)); cb(); } });
    inbound = await startInboundServer('127.0.0.1', 0, {
      pool: recording(db.pool),
      log: pino({ level: 'info' }, sink),
      env,
      secret: async (name) => {
        secretCalls.push(name);
        return 'a-secret-value-0000'; // secret-scan: allow (a test fixture)
      },
    });
  });
  afterAll(async () => {
    await inbound.close();
    await db.drop();
  });
  beforeEach(() => {
    for (const k of Object.keys(env)) delete env[k];
    Object.assign(env, { ERP_CLOUD_ASN_WEBHOOK_CIDRS: '127.0.0.0/8', ERP_CLOUD_NUONUO_CALLBACK_CIDRS: '127.0.0.0/8' });
    dbCalls.length = 0;
    secretCalls.length = 0;
    logLines.length = 0;
  });

  it('every receiver declares the types it speaks: the ASN webhook and YonBIP events JSON, the Nuonuo callback a form', () => {
    expect(Object.fromEntries(inboundRoutes().map((r) => [r.path, r.accepts]))).toEqual({
      '/scm/asn': ['application/json'],
      '/scm/yonbip/events': ['application/json'],
      '/callbacks/nuonuo': ['application/x-www-form-urlencoded'],
    });
  });

  it('each receiver answers 415 with Accept-Post to every wrong, unparseable, non-UTF-8 or missing type, unread: no secret looked up, no database call', async () => {
    for (const route of inboundRoutes()) {
      const form = route.accepts[0] === 'application/x-www-form-urlencoded';
      const wrong = form
        ? ['application/json', 'text/plain', 'multipart/form-data; boundary=----x', undefined, 'application/x-www-form-urlencoded; charset=gbk', 'text/html; charset=utf-8']
        : WRONG_FOR_JSON;
      const body = form ? 'operater=callback&orderno=NO-1&content=%7B%7D' : '{"eventId":"e-415","asn":{}}';
      for (const type of wrong) {
        const res = await send(route.path, body, type);
        expect({ path: route.path, type, status: res.status, acceptPost: res.headers['accept-post'], error: JSON.parse(res.body).error })
          .toEqual({ path: route.path, type, status: 415, acceptPost: route.accepts.join(', '), error: 'unsupported_media_type' });
        expect(logLines.at(-1)).toMatchObject({ msg: 'inbound request refused: unsupported content type', receiver: route.name });
      }
    }
    expect(dbCalls).toEqual([]);
    expect(secretCalls).toEqual([]);
  });

  it('an outsider is refused 403 whatever the type: the source check comes first and says nothing of the types', async () => {
    env.ERP_CLOUD_ASN_WEBHOOK_CIDRS = '203.0.113.0/24';
    env.ERP_CLOUD_NUONUO_CALLBACK_CIDRS = '';
    for (const route of inboundRoutes()) {
      const res = await send(route.path, '{}', 'text/plain');
      expect({ path: route.path, status: res.status, acceptPost: res.headers['accept-post'] }).toEqual({ path: route.path, status: 403, acceptPost: undefined });
    }
    expect(dbCalls).toEqual([]);
  });

  it('the Nuonuo callback sent as JSON is refused 415 and moves nothing up; as a form, in any case and with a UTF-8 charset, it is taken', async () => {
    const json = JSON.stringify({ operater: 'callback', orderno: 'NO-404', content: JSON.stringify({ c_status: '1', c_orderno: 'NO-404' }) });
    const asJson = await send('/callbacks/nuonuo', json, 'application/json; charset=utf-8');
    expect({ status: asJson.status, acceptPost: asJson.headers['accept-post'] }).toEqual({ status: 415, acceptPost: 'application/x-www-form-urlencoded' });
    expect(JSON.parse(asJson.body)).toMatchObject({ detail: 'application/json is not application/x-www-form-urlencoded' });
    expect(dbCalls).toEqual([]);

    const form = new URLSearchParams({ operater: 'callback', orderno: 'NO-404', content: JSON.stringify({ c_status: '1', c_orderno: 'NO-404' }) }).toString();
    for (const type of ['application/x-www-form-urlencoded', 'APPLICATION/X-WWW-FORM-URLENCODED', 'application/x-www-form-urlencoded; charset=UTF-8', 'Application/x-www-form-urlencoded;charset="utf-8"']) {
      dbCalls.length = 0;
      const res = await send('/callbacks/nuonuo', form, type);
      expect({ type, status: res.status, body: JSON.parse(res.body) }).toEqual({ type, status: 200, body: { status: '0000', message: '同步成功' } });
      expect(dbCalls.filter((q) => q.includes('tax.ingest_invoice_callback'))).toHaveLength(1);
    }
  });
});
