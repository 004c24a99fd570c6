/** Cloud webhooks get in only from their configured source ranges (the inbound 白名单), fail-closed. */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { admitSource, sourceAllowed, type InboundPolicy } from '../listener/inbound.js';

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
