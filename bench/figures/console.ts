/**
 * Figure: the operations console's page times on a large database. Seeds,
 * set-based in SQL, 100,000 invoiced documents with one invoice each (1 % refused),
 * one outbox message per invoice and 1,000,000 cloud.log attempts (ten per
 * message) spread over the last 30 days (quick: a tenth of each), then signs
 * in through the real OpenID Provider (jump ticket, authorization code + PKCE)
 * and times each page over HTTP as a browser asks for it: the overview, needs
 * attention, procurement, settings, a search by invoice number, a document's
 * timeline and a message's page. console_page_p50_ms is the worst page's
 * median; each page's p50 / p95 / max is recorded.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { startConsoleServer } from '../../listener/console/console-server.js';
import { loadConsoleConfig } from '../../listener/console/config.js';
import { createPool } from '../../listener/kernel/db.js';
import { createLogger } from '../../listener/kernel/logger.js';
import { loadSsoConfig } from '../../listener/sso/config.js';
import { startSsoServer } from '../../listener/sso/sso-server.js';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchClient } from '../lib/db.js';
import { percentile, progress, round } from '../lib/util.js';

export interface ConsoleResult {
  console_page_p50_ms: number;
  console: {
    invoices: number;
    log_rows: number;
    seed_s: number;
    requests_per_page: number;
    pages: Record<string, { p50_ms: number; p95_ms: number; max_ms: number; bytes: number }>;
  };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/** A browser's cookie jar, enough for two loopback servers (names differ; paths and ports are ignored). */
class Jar {
  private cookies = new Map<string, string>();
  take(res: Response): void {
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair!.indexOf('=');
      if (i > 0) this.cookies.set(pair!.slice(0, i).trim(), pair!.slice(i + 1).trim());
    }
  }
  header(): string {
    return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }
}

async function follow(jar: Jar, url: string, hops = 12): Promise<Response> {
  let at = url;
  for (let i = 0; i < hops; i++) {
    const res = await fetch(at, { redirect: 'manual', headers: { cookie: jar.header() } });
    jar.take(res);
    const to = res.headers.get('location');
    if (res.status < 300 || res.status >= 400 || !to) return res;
    await res.arrayBuffer();
    at = new URL(to, at).toString();
  }
  throw new Error(`too many redirects from ${url}`);
}

export async function consoleFigure(ctx: BenchContext): Promise<ConsoleResult> {
  const invoices = ctx.quick ? 10_000 : 100_000;
  const attemptsEach = 10;
  const requests = ctx.quick ? 10 : 30;
  progress(`figure: console page times over ${invoices.toLocaleString('en')} invoices and ${(invoices * attemptsEach).toLocaleString('en')} cloud.log rows`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('console');
  const c = benchClient(db.url, 'console');
  await c.connect();
  phase('seed');
  const t0 = performance.now();
  try {
    await c.query(`select cloud.put_endpoint('bench_tax', 'http://127.0.0.1:9/', 'nuonuo', 'invoice_request')`);
    await c.query(`select tax.put_config(p_endpoint => 'bench_tax', p_seller_tax_id => '339902999999789113', p_seller_name => 'bench seller')`);
    await c.query(`select tax.put_source('bench', 'settlement')`);
    await c.query(`select sso.put_user('bench.ops', 'bench operator'), cloud.put_console_role('bench.ops', 'operator')`);
    const chunk = 10_000;
    for (let from = 1; from <= invoices; from += chunk) {
      const to = Math.min(invoices, from + chunk - 1);
      await c.query(`insert into tax.document (source, reference, kind, doc, doc_sha256, received_at)
                     select 'bench', 'JS-' || g, 'normal', '{}', md5(g::text), now() - (g % 43200) * interval '1 minute'
                       from generate_series($1::int, $2::int) g`, [from, to]);
      await c.query(`
        with m as (
          select g, cloud.enqueue_message('bench_tax', 'tax.issue', jsonb_build_object('n', g), 'tax.invoice', null) as rid
            from generate_series($1::int, $2::int) g)
        insert into tax.invoice (invoice_kind, request_id, order_no, buyer_name, buyer_tax_id, invoice_no, invoice_status, invoice_date,
                                 amount_excl_tax, tax_amount, amount_incl_tax, document_id, error_code, error_message)
        select 'normal', m.rid, tax.order_no_for(m.rid), '买方 ' || g, '91330106MA2AYNWD8M',
               case when g % 100 = 0 then null else lpad(g::text, 20, '2') end,
               case when g % 100 = 0 then 'failed' else 'issued' end, now(), 100, 6, 106,
               d.id, case when g % 100 = 0 then 'nuonuo_22' end, case when g % 100 = 0 then '购买方纳税人识别号不存在' end
          from m join tax.document d on d.source = 'bench' and d.reference = 'JS-' || g`, [from, to]);
      await c.query(`update cloud.outbox o set aggregate_id = i.id::text,
                            status = case when i.invoice_status = 'failed' then 'dead' else 'sent' end, sent_at = now(), attempts = ${attemptsEach}
                       from tax.invoice i where i.request_id = o.request_id and o.aggregate_id is null`);
      await c.query(`insert into cloud.log (request_id, attempt, endpoint, operation, method, url, request_body, http_status, response_body,
                                            duration_ms, outcome, error_class, error_message, started_at)
                     select i.request_id, a, 'bench_tax', 'tax.issue', 'POST', 'http://127.0.0.1:9/', '{"n": 1}',
                            case when a = ${attemptsEach} and i.invoice_status = 'issued' then 200 else 503 end, '{"code": "E0000"}', 20 + a,
                            case when a = ${attemptsEach} and i.invoice_status = 'issued' then 'ok' else 'retryable' end,
                            case when a = ${attemptsEach} and i.invoice_status = 'issued' then null else 'http_5xx' end, null,
                            now() - ((i.id * 37 + a * 11) % 43200) * interval '1 minute'
                       from tax.invoice i, generate_series(1, ${attemptsEach}) a where i.id between $1 and $2`, [from, to]);
    }
    await c.query('analyze');
    const seedS = (performance.now() - t0) / 1000;
    const logRows = Number((await c.query('select count(*) from cloud.log')).rows[0].count);
    progress(`  seeded in ${round(seedS, 1)} s (${logRows.toLocaleString('en')} log rows)`);

    // the OpenID Provider and the console, in this process (the previous figure's tail may still run: see below)
    phase('servers and sign-in');
    const log = createLogger('silent');
    const ssoPort = await freePort();
    const consolePort = await freePort();
    const issuer = `http://127.0.0.1:${ssoPort}`;
    const consoleUrl = `http://127.0.0.1:${consolePort}`;
    const masterKey = randomBytes(16).toString('hex');
    const pool = createPool(db.url, 6, log);
    const sso = await startSsoServer({
      config: loadSsoConfig({ DATABASE_URL: db.url, ERP_CLOUD_SSO_ISSUER: issuer, ERP_CLOUD_SSO_PORT: String(ssoPort), ERP_CLOUD_VAULT_KEY: masterKey, ERP_CLOUD_LOG_LEVEL: 'silent' }),
      pool, log, masterKey, env: {},
    });
    const secret = (await c.query(`select client_secret from sso.register_client('console', 'console', $1, '{}', $2)`,
      [[`${consoleUrl}/callback`], `${consoleUrl}/login`])).rows[0].client_secret as string;
    const server = await startConsoleServer({
      config: loadConsoleConfig({ DATABASE_URL: db.url, ERP_CLOUD_CONSOLE_URL: consoleUrl, ERP_CLOUD_CONSOLE_PORT: String(consolePort),
        ERP_CLOUD_CONSOLE_ISSUER: issuer, ERP_CLOUD_CONSOLE_CLIENT_SECRET: secret, ERP_CLOUD_LOG_LEVEL: 'silent' }),
      pool, log,
    });
    try {
      const jar = new Jar();
      const jump = (await c.query(`select sso.issue_jump_ticket('bench.ops', 'console') as url`)).rows[0].url as string;
      const home = await follow(jar, jump);
      if (home.status !== 200 || !res_url_is(home, consoleUrl)) throw new Error(`sign-in did not reach the console (HTTP ${home.status} at ${home.url})`);
      await home.arrayBuffer();

      const someInvoice = (await c.query(`select invoice_no, document_id, request_id from tax.invoice where invoice_no is not null order by id desc offset 12345 % $1 limit 1`, [invoices])).rows[0];
      // the previous figure may still be finishing (its tail, in its own database): measure only after it
      phase('wait for the previous figure\'s tail');
      await ctx.previousTail;
      const pages: Record<string, string> = {
        overview: '/',
        attention: '/attention',
        procurement: '/procurement',
        settings: '/settings',
        search_invoice_no: `/documents?q=${someInvoice.invoice_no}`,
        document: `/documents/tax/${someInvoice.document_id}`,
        message: `/documents/message/${someInvoice.request_id}`,
      };
      phase('pages');
      const out: ConsoleResult['console']['pages'] = {};
      for (const [name, path] of Object.entries(pages)) {
        const ms: number[] = [];
        let bytes = 0;
        for (let i = 0; i < requests; i++) {
          const s = performance.now();
          const res = await fetch(`${consoleUrl}${path}`, { redirect: 'manual', headers: { cookie: jar.header() } });
          const body = await res.arrayBuffer();
          ms.push(performance.now() - s);
          if (res.status !== 200 && !(name === 'search_invoice_no' && res.status === 302)) throw new Error(`${name}: HTTP ${res.status}`);
          bytes = body.byteLength;
        }
        out[name] = { p50_ms: round(percentile(ms, 50), 1), p95_ms: round(percentile(ms, 95), 1), max_ms: round(Math.max(...ms), 1), bytes };
        progress(`  ${name}: p50 ${out[name]!.p50_ms} ms, p95 ${out[name]!.p95_ms} ms`);
      }
      return {
        console_page_p50_ms: Math.max(...Object.values(out).map((p) => p.p50_ms)),
        console: { invoices, log_rows: logRows, seed_s: round(seedS, 1), requests_per_page: requests, pages: out },
      };
    } finally {
      phase('teardown');
      await server.close();
      await sso.close();
      await pool.end();
    }
  } finally {
    await c.end();
  }
}

function res_url_is(res: Response, origin: string): boolean {
  return res.url === '' || res.url.startsWith(origin);
}
