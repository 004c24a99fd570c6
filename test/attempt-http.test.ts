/**
 * One attempt's HTTP exchange (listener/delivery/http.ts attemptDelivery) against
 * small servers on 127.0.0.1: what goes out, how answers are read, and how a
 * failed exchange is classed for the retry rules; and the egress verdicts the
 * attempt reuses per allowlist (egress.ts policyFor / routeFor).
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { gzipSync } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { closeAgents, EgressRefused, policyFor, routeFor } from '../listener/delivery/egress.js';
import { attemptDelivery } from '../listener/delivery/http.js';
import type { ClaimedMessage } from '../listener/providers/index.js';

const servers: http.Server[] = [];
afterEach(async () => {
  closeAgents();
  await Promise.all(servers.splice(0).map((s) => new Promise<void>((r) => { s.closeAllConnections(); s.close(() => r()); })));
});

interface Seen { method: string; headers: http.IncomingHttpHeaders; body: string }

async function serve(answer: (req: http.IncomingMessage, res: http.ServerResponse) => void): Promise<{ url: string; seen: Seen[] }> {
  const seen: Seen[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => { body += c.toString(); });
    req.on('end', () => {
      seen.push({ method: req.method ?? '', headers: req.headers, body });
      answer(req, res);
    });
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen };
}

function message(baseUrl: string, over: Partial<ClaimedMessage> = {}): ClaimedMessage {
  return {
    request_id: '0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b', endpoint: 'hook', operation: 'demo.ping', payload: { invoice: 'S-1' }, attempt: 1,
    aggregate_type: null, aggregate_id: null, ordering_key: null, provider: 'webhook', base_url: `${baseUrl}/webhook`, timeout_ms: 10_000,
    endpoint_config: {}, locked_until: new Date(Date.now() + 60_000), send_at: new Date(), allow_hosts: [], allow_cidrs: [], allow_private: true,
    download_hosts: [], ...over,
  };
}

const policyOfMessage = (m: ClaimedMessage) =>
  policyFor({ name: m.endpoint, base_url: m.base_url, allow_hosts: m.allow_hosts, allow_cidrs: m.allow_cidrs, allow_private: m.allow_private, download_hosts: m.download_hosts });

async function attempt(m: ClaimedMessage) {
  return attemptDelivery(m, { logBodyBytes: 64 * 1024, policy: policyOfMessage(m) });
}

describe('an attempt over HTTP', () => {
  it('sends the payload with its length and the Request_ID as Idempotency-Key, and logs the answer', async () => {
    const cloud = await serve((_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}'));
    const m = message(cloud.url);
    const r = await attempt(m);
    expect(r).toMatchObject({ outcome: 'ok', http_status: 200, response: { ok: true }, response_body: '{"ok":true}', error_class: null, method: 'POST' });
    expect(cloud.seen).toHaveLength(1);
    const body = JSON.stringify(m.payload);
    expect(cloud.seen[0]).toMatchObject({ method: 'POST', body });
    expect(cloud.seen[0]!.headers).toMatchObject({ 'idempotency-key': m.request_id, 'x-request-id': m.request_id, 'content-length': String(Buffer.byteLength(body)) });
  });

  it('an answer the cloud compresses with gzip is read and logged decompressed', async () => {
    const cloud = await serve((_req, res) =>
      res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(gzipSync('{"accepted":"S-1"}')));
    const r = await attempt(message(cloud.url));
    expect(r).toMatchObject({ outcome: 'ok', response: { accepted: 'S-1' }, response_body: '{"accepted":"S-1"}' });
  });

  it('a redirect is an answer, never followed: the attempt fails permanently and nothing goes to the Location', async () => {
    const elsewhere = await serve((_req, res) => res.writeHead(200).end('{}'));
    const cloud = await serve((_req, res) => res.writeHead(302, { location: `${elsewhere.url}/steal` }).end());
    const r = await attempt(message(cloud.url));
    expect(r).toMatchObject({ outcome: 'permanent', error_class: 'redirect', http_status: 302 });
    expect(elsewhere.seen).toHaveLength(0);
  });

  it('no answer within the endpoint\'s timeout is a retryable timeout', async () => {
    const cloud = await serve(() => undefined); // reads the request, never answers
    const r = await attempt(message(cloud.url, { timeout_ms: 200 }));
    expect(r).toMatchObject({ outcome: 'retryable', error_class: 'timeout', http_status: null });
  });

  it('a refused connection is a retryable failure named by its network error', async () => {
    const gone = await serve(() => undefined);
    const url = gone.url;
    await new Promise<void>((r) => { const s = servers.pop()!; s.close(() => r()); });
    const r = await attempt(message(url));
    expect(r).toMatchObject({ outcome: 'retryable', error_class: 'econnrefused', http_status: null });
  });

  it('an aborted attempt (the listener shutting down) gives no answer and is retryable', async () => {
    const cloud = await serve(() => undefined);
    const abort = new AbortController();
    const m = message(cloud.url);
    const pending = attemptDelivery(m, { logBodyBytes: 1024, policy: policyOfMessage(m), signal: abort.signal });
    while (cloud.seen.length === 0) await new Promise((r) => setTimeout(r, 10));
    abort.abort();
    expect(await pending).toMatchObject({ outcome: 'retryable', http_status: null });
  });
});

describe('egress verdicts per allowlist', () => {
  const row = { name: 'hook', base_url: 'http://127.0.0.1:9/webhook', allow_hosts: [] as string[], allow_cidrs: [] as string[], allow_private: true, download_hosts: [] as string[] };

  it('the same endpoint row gives the same policy; a changed allowlist gives another one', () => {
    expect(policyFor(row)).toBe(policyFor({ ...row }));
    expect(policyFor({ ...row, allow_hosts: ['api.example.com'] })).not.toBe(policyFor(row));
    expect(policyFor({ ...row, allow_private: false })).not.toBe(policyFor(row));
  });

  it('a URL allowed under one allowlist is still refused under another that does not allow it', () => {
    const open = policyFor(row);
    const closed = policyFor({ ...row, allow_private: false });
    for (let i = 0; i < 2; i++) {
      expect(routeFor('http://127.0.0.1:9/webhook', open)).toMatchObject({ followRedirect: false });
      expect(() => routeFor('http://127.0.0.1:9/webhook', closed)).toThrow(EgressRefused);
    }
    expect(() => routeFor('http://127.0.0.1:10/webhook', open)).toThrow(EgressRefused);
  });

  it('a policy cannot be changed after it was judged', () => {
    const p = policyFor(row);
    expect(() => { (p as { allowPrivate: boolean }).allowPrivate = false; }).toThrow(TypeError);
    expect(() => { p.allowHosts.push('evil.example.com'); }).toThrow(TypeError);
  });
});
