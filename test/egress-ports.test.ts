/**
 * Egress by (scheme, host, port), and downloads held to their own allowlist:
 * a cloud's answer cannot send the PDF download to another port of an allowed
 * host, nor to 127.0.0.1 in any spelling, nor anywhere the API may go but
 * downloads may not; private and metadata IP literals are refused (or warned
 * about) when the allowlist is set.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { assertUrlAllowed, EgressRefused, normaliseHost, policyOf, type EgressPolicy } from '../listener/delivery/egress.js';
import { SqlState } from '../listener/kernel/errors.js';
import { attemptDelivery } from '../listener/delivery/http.js';
import type { ClaimedMessage, ProviderContext } from '../listener/providers/index.js';
import { startNuonuoSim, type NuonuoSim } from '../listener/sim/nuonuo.js';
import { createTestDb, sqlstateOf, waitFor, type TestDb } from './helpers/db.js';
import { approve, configureTax, customer, invoicesOf, settlement } from './helpers/invoicing.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

/** Every spelling WHATWG URL accepts for 127.0.0.1, and for the private address 10.1.2.3. */
const LOOPBACK_SPELLINGS = ['127.0.0.1', '0x7f000001', '2130706433', '127.1', '0177.0.0.1', '0x7f.0.0.1', '127.0.1', '[::ffff:127.0.0.1]', '[::ffff:7f00:1]', '127.0.0.1.'];
const PRIVATE_SPELLINGS = ['10.1.2.3', '167838211', '0xa010203', '10.1.515', '012.1.2.3', '[::ffff:10.1.2.3]'];

/** A server that counts what reaches it and answers a tiny PDF. */
async function countingServer(): Promise<{ port: number; hits: string[]; close(): Promise<void> }> {
  const hits: string[] = [];
  const server = http.createServer((req, res) => {
    hits.push(req.url ?? '');
    res.writeHead(200, { 'content-type': 'application/pdf' }).end('%PDF-1.4\n%%EOF\n');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as AddressInfo).port, hits, close: () => new Promise((r) => server.close(() => r())) };
}

describe('the egress policy (egress.ts)', () => {
  const policy = (over: Partial<Parameters<typeof policyOf>[0]> = {}): EgressPolicy => policyOf({
    name: 'tax', base_url: 'https://sdk.nuonuo.com/open/v1/services', allow_hosts: ['*.nuonuo.com', 'files.example.com:8443'],
    allow_cidrs: [], allow_private: false, download_hosts: ['pdf.example.net'], ...over,
  });

  it('hosts are compared in their WHATWG-normalised form: every spelling of 127.0.0.1 is 127.0.0.1', () => {
    for (const s of LOOPBACK_SPELLINGS) expect(normaliseHost(s), s).toBe('127.0.0.1');
    for (const s of PRIVATE_SPELLINGS) expect(normaliseHost(s), s).toBe('10.1.2.3');
    expect(normaliseHost('SDK.NuoNuo.com.')).toBe('sdk.nuonuo.com');
  });

  it('an allowed host on another port is refused, for the API and for downloads alike', () => {
    for (const url of ['https://sdk.nuonuo.com:6379/x', 'https://a.nuonuo.com:8443/x', 'http://sdk.nuonuo.com:443/x', 'https://files.example.com/x', 'https://files.example.com:8444/x']) {
      expect(() => assertUrlAllowed(url, policy()), url).toThrow(EgressRefused);
      expect(() => assertUrlAllowed(url, policy()), url).toThrow(/is not allowed on port/);
    }
    expect(() => assertUrlAllowed('https://sdk.nuonuo.com:6379/x.pdf', policy(), 'download')).toThrow(EgressRefused);
    expect(() => assertUrlAllowed('https://pdf.example.net:8080/x.pdf', policy(), 'download')).toThrow(EgressRefused);
  });

  it('the base URL origin, and a listed (host, port), are allowed; an entry without a port means the scheme default', () => {
    for (const url of ['https://sdk.nuonuo.com/x', 'https://SDK.nuonuo.com.:443/x', 'https://a.nuonuo.com/x', 'https://files.example.com:8443/x']) {
      expect(() => assertUrlAllowed(url, policy()), url).not.toThrow();
    }
    expect(() => assertUrlAllowed('https://sdk.nuonuo.com/x.pdf', policy(), 'download')).not.toThrow();
    expect(() => assertUrlAllowed('https://pdf.example.net/x.pdf', policy(), 'download')).not.toThrow();
    expect(() => assertUrlAllowed('http://pdf.example.net/x.pdf', policy(), 'download')).not.toThrow(); // port 80 for http
    const local = policy({ base_url: 'http://127.0.0.1:5555/api', allow_private: true, download_hosts: ['127.0.0.1:6000'] });
    expect(() => assertUrlAllowed('http://127.0.0.1:5555/files/1.pdf', local, 'download')).not.toThrow();
    expect(() => assertUrlAllowed('http://0x7f000001:6000/files/1.pdf', local, 'download')).not.toThrow();
  });

  it('the download allowlist is independent of the API allowlist', () => {
    // API hosts are not download hosts, and download hosts are not API hosts
    expect(() => assertUrlAllowed('https://a.nuonuo.com/x.pdf', policy(), 'download')).toThrow(/for a download from endpoint tax/);
    expect(() => assertUrlAllowed('https://files.example.com:8443/x.pdf', policy(), 'download')).toThrow(EgressRefused);
    expect(() => assertUrlAllowed('https://pdf.example.net/x', policy())).toThrow(EgressRefused);
  });

  it('with private addresses allowed for a loopback base URL, no other port of 127.0.0.1 in any spelling can be reached', () => {
    const local = policy({ base_url: 'http://127.0.0.1:5555/api', allow_hosts: [], allow_private: true, download_hosts: [] });
    for (const s of LOOPBACK_SPELLINGS) {
      for (const purpose of ['api', 'download'] as const) {
        expect(() => assertUrlAllowed(`http://${s}:5432/`, local, purpose), `${s} ${purpose}`).toThrow(EgressRefused);
        expect(() => assertUrlAllowed(`http://${s}/`, local, purpose), `${s} ${purpose}`).toThrow(EgressRefused);
        expect(() => assertUrlAllowed(`http://${s}:5555/`, local, purpose), `${s} ${purpose}`).not.toThrow();
      }
    }
    for (const s of PRIVATE_SPELLINGS) expect(() => assertUrlAllowed(`http://${s}:5555/x.pdf`, local, 'download'), s).toThrow(EgressRefused);
  });
});

describe('an attempt that is refused sends nothing', () => {
  let target: Awaited<ReturnType<typeof countingServer>>;
  beforeAll(async () => { target = await countingServer(); });
  afterAll(async () => { await target.close(); });

  const msg = (url: string): ClaimedMessage => ({
    request_id: '00000000-0000-4000-8000-000000000001', endpoint: 'nuonuo', operation: 'tax.download_pdf',
    payload: { url, max_bytes: 1_000_000 }, attempt: 1, aggregate_type: 'tax.invoice', aggregate_id: '1', ordering_key: null,
    provider: 'nuonuo', base_url: 'http://127.0.0.1:9/open/v1/services', timeout_ms: 2000, endpoint_config: {},
    locked_until: new Date(Date.now() + 5000), send_at: new Date(), allow_hosts: [], allow_cidrs: [], allow_private: true,
  });

  it('a PDF URL on another port of the loopback simulator host, in every spelling, is refused before any connection', async () => {
    const policy = policyOf({ name: 'nuonuo', base_url: 'http://127.0.0.1:9/open/v1/services', allow_hosts: [`127.0.0.1:${target.port}`], allow_cidrs: [], allow_private: true, download_hosts: [] });
    for (const s of LOOPBACK_SPELLINGS) {
      const r = await attemptDelivery(msg(`http://${s}:${target.port}/files/1.pdf`), { logBodyBytes: 1000, policy, context: {} as ProviderContext });
      expect(r, s).toMatchObject({ outcome: 'permanent', error_class: 'egress_refused', http_status: null });
    }
    expect(target.hits).toEqual([]);
    // listed as a download host, the same URL goes through
    const listed = { ...policy, downloadHosts: [`127.0.0.1:${target.port}`] };
    const ok = await attemptDelivery(msg(`http://127.1:${target.port}/files/1.pdf`), { logBodyBytes: 1000, policy: listed, context: {} as ProviderContext });
    expect(ok).toMatchObject({ outcome: 'ok', http_status: 200 });
    expect(target.hits).toEqual(['/files/1.pdf']);
  });
});

describe('allowlist entries are checked when they are set', () => {
  let db: TestDb;
  beforeAll(async () => {
    db = await createTestDb('egress_ports_config');
    await db.pool.query(`select cloud.put_endpoint('tax', 'https://sdk.nuonuo.com/open/v1/services', 'nuonuo', 'invoice_request')`);
  });
  afterAll(async () => { await db.drop(); });

  const row = async () => (await db.pool.query(`select allow_hosts, download_hosts, allow_private from cloud.endpoint where name = 'tax'`)).rows[0];

  /** Runs a statement on its own connection and returns its warnings. */
  async function warnings(statement: string, params: unknown[]): Promise<string[]> {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const seen: string[] = [];
    client.on('notice', (n) => { if (n.severity === 'WARNING') seen.push(n.message ?? ''); });
    try {
      await client.query(statement, params);
    } finally {
      await client.end();
    }
    return seen;
  }

  it('a loopback or private IP literal in any spelling is refused with EC011 naming it, for API and download hosts, unless private addresses are allowed', async () => {
    const before = await row();
    for (const entry of [...LOOPBACK_SPELLINGS, ...PRIVATE_SPELLINGS, '[::1]', '169.254.1.1', `0x7f000001:5432`]) {
      for (const [sql, params] of [
        [`select cloud.put_endpoint_allowlist('tax', $1::text[], '{}', false)`, [[entry]]],
        [`select cloud.put_endpoint_download_hosts('tax', $1::text[])`, [[entry]]],
      ] as const) {
        const err = await db.pool.query(sql, params as unknown[]).then(() => null, (e: pg.DatabaseError) => e);
        expect(err?.code, `${entry}: ${sql}`).toBe(SqlState.invalidAllowlistSetting);
        expect(err?.message).toContain(entry.toLowerCase());
        expect(err?.hint).toMatch(/allow_private/);
      }
    }
    expect(await row()).toEqual(before); // nothing written
  });

  it('a metadata IP literal in any spelling is refused even where private addresses are allowed', async () => {
    await db.pool.query(`select cloud.put_endpoint_allowlist('tax', '{}', '{}', true)`);
    const before = await row();
    for (const entry of ['169.254.169.254', '2852039166', '0xa9fea9fe', '169.254.43518', '[::ffff:169.254.169.254]', '100.100.100.200', '[fd00:ec2::254]', '169.254.169.254:80']) {
      expect(await sqlstateOf(db.pool.query(`select cloud.put_endpoint_allowlist('tax', $1::text[], '{}', true)`, [[entry]])), entry).toBe(SqlState.invalidAllowlistSetting);
      expect(await sqlstateOf(db.pool.query(`select cloud.put_endpoint_download_hosts('tax', $1::text[])`, [[entry]])), entry).toBe(SqlState.invalidAllowlistSetting);
    }
    expect(await row()).toEqual(before);
  });

  it('under allow_private a private IP literal is accepted with a WARNING naming it', async () => {
    for (const entry of ['127.1', '0x7f000001:6379', '10.1.515']) {
      await db.pool.query(`select cloud.put_endpoint_download_hosts('tax', '{}')`);
      const seen = await warnings(`select cloud.put_endpoint_allowlist('tax', $1::text[], '{}', true)`, [[entry]]);
      expect(seen.length, entry).toBe(1);
      expect(seen[0]).toContain(entry);
      const seenDl = await warnings(`select cloud.put_endpoint_download_hosts('tax', $1::text[])`, [[entry]]);
      expect(seenDl[0]).toContain(entry);
      expect(await row()).toEqual({ allow_hosts: [entry], download_hosts: [entry], allow_private: true });
    }
    // turning private addresses off again is refused while a download host is private
    expect(await sqlstateOf(db.pool.query(`select cloud.put_endpoint_allowlist('tax', '{}', '{}', false)`))).toBe(SqlState.invalidAllowlistSetting);
    await db.pool.query(`select cloud.put_endpoint_download_hosts('tax', '{}')`);
    await db.pool.query(`select cloud.put_endpoint_allowlist('tax', '{}', '{}', false)`);
  });

  it('entries with a bad port or that are not host names are refused; names with ports and wildcards are accepted', async () => {
    for (const entry of ['files.example.com:0', 'files.example.com:65536', 'files.example.com:', 'files.example.com:99999999', 'https://files.example.com/', 'a@b.example', '256.1.1.1', '1.2.3.4.5', '*.10.0.0.1']) {
      const err = await db.pool.query(`select cloud.put_endpoint_download_hosts('tax', $1::text[])`, [[entry]]).then(() => null, (e: pg.DatabaseError) => e);
      expect(err?.code, entry).toBe(SqlState.invalidAllowlistSetting);
      expect(err?.message, entry).toContain(entry);
    }
    await db.pool.query(`select cloud.put_endpoint_download_hosts('tax', $1::text[])`, [['files.example.com:8443', '*.nuonuo.com:443', 'pdf.example.net', '203.0.113.7:8080']]);
    await db.pool.query(`select cloud.put_endpoint_allowlist('tax', $1::text[], '{}', false)`, [['*.nuonuo.com:443', 'api.example.com']]);
    expect(await row()).toEqual({ allow_hosts: ['*.nuonuo.com:443', 'api.example.com'], download_hosts: ['files.example.com:8443', '*.nuonuo.com:443', 'pdf.example.net', '203.0.113.7:8080'], allow_private: false });
    expect(await sqlstateOf(db.pool.query(`select cloud.put_endpoint_download_hosts('nope', '{}')`))).toBe(SqlState.unknownEndpoint);
  });

  it('the claim carries the download hosts', async () => {
    const { rows } = await db.pool.query(`select a.attname from pg_attribute a where a.attrelid = 'cloud.claimed_message'::regclass and a.attname = 'download_hosts' and not a.attisdropped`);
    expect(rows).toHaveLength(1);
  });
});

describe('the PDF download through a real listener and the Nuonuo simulator', () => {
  const APP_KEY = 'ports-app';
  const APP_SECRET = randomBytes(12).toString('hex');
  let db: TestDb;
  let sim: NuonuoSim;
  let listener: InProcessListener;
  let other: Awaited<ReturnType<typeof countingServer>>;

  beforeAll(async () => {
    process.env.ERP_CLOUD_SECRET_NUONUO_APP_SECRET = APP_SECRET;
    db = await createTestDb('egress_ports_flow');
    sim = await startNuonuoSim({ appKey: APP_KEY, appSecret: APP_SECRET, issueDelayMs: 100 });
    other = await countingServer();
    listener = await startListener(db.url);
  });
  afterAll(async () => {
    await listener?.stop();
    await sim?.close();
    await other?.close();
    await db?.drop();
  });
  beforeEach(async () => {
    sim.configure({ pdfUrlOverride: null, pdfRedirectTo: null });
    await configureTax(db.pool, sim.url, APP_KEY);
    await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', '{}')`);
  });

  async function issued(): Promise<{ id: string; error_code: string | null; error_message: string | null }> {
    const c = await customer(db.pool);
    const s = await settlement(db.pool, c, [{ item: '软件维护', amount: 106 }]);
    await approve(db.pool, s.id);
    return waitFor(async () => {
      const [inv] = await invoicesOf(db.pool, s.id);
      if (!inv || inv.invoice_status !== 'issued') return null;
      const { rows } = await db.pool.query(`select count(*)::int n from cloud.outbox where aggregate_type = 'tax.invoice' and aggregate_id = $1 and status in ('pending', 'in_flight')`, [inv.id]);
      if (rows[0].n !== 0) return null;
      return (await db.pool.query(`select id, error_code, error_message from tax.invoice where id = $1`, [inv.id])).rows[0];
    }, { timeoutMs: 30_000, intervalMs: 100, what: 'the invoice to be issued and its PDF step to finish' });
  }
  const attachments = async (id: string) => (await db.pool.query(`select count(*)::int n from tax.attachment where invoice_id = $1`, [id])).rows[0].n;

  it('a PDF URL on another port of the simulator host (loopback, private addresses allowed) is refused in every spelling, and nothing reaches that port', async () => {
    for (const s of ['127.0.0.1', '0x7f000001', '2130706433', '127.1', '[::ffff:127.0.0.1]']) {
      sim.configure({ pdfUrlOverride: `http://${s}:${other.port}/files/x.pdf` });
      const inv = await issued();
      expect(inv.error_code, s).toBe('pdf_download');
      expect(inv.error_message).toContain('egress_refused');
      expect(await attachments(inv.id)).toBe(0);
    }
    expect(other.hits).toEqual([]);
  });

  it('the same URL is downloaded once its (host, port) is a download host, and only then; the API allowlist does not admit it', async () => {
    await db.pool.query(`select cloud.put_endpoint_allowlist('nuonuo', $1::text[], '{}', true)`, [[`127.0.0.1:${other.port}`]]);
    sim.configure({ pdfUrlOverride: `http://127.1:${other.port}/files/api-listed.pdf` });
    const refused = await issued();
    expect(refused.error_message).toContain('egress_refused');
    expect(other.hits).toEqual([]);
    await db.pool.query(`select cloud.put_endpoint_allowlist('nuonuo', '{}', '{}', true)`);
    await db.pool.query(`select cloud.put_endpoint_download_hosts('nuonuo', $1::text[])`, [[`127.0.0.1:${other.port}`]]);
    sim.configure({ pdfUrlOverride: `http://127.1:${other.port}/files/listed.pdf` });
    const ok = await issued();
    expect(ok.error_code).toBeNull();
    expect(await attachments(ok.id)).toBe(1);
    expect(other.hits).toEqual(['/files/listed.pdf']);
  });

  it('the simulator\'s own PDF (the base URL origin) is downloaded with no download host listed; a redirect from it is not followed', async () => {
    const ok = await issued();
    expect(ok.error_code).toBeNull();
    expect(await attachments(ok.id)).toBe(1);
    sim.configure({ pdfRedirectTo: `http://127.0.0.1:${other.port}/files/redirected.pdf` });
    const redirected = await issued();
    expect(redirected.error_message).toContain('redirect_refused');
    expect(await attachments(redirected.id)).toBe(0);
    expect(other.hits.filter((h) => h.includes('redirected'))).toEqual([]);
  });
});
