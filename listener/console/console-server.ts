/**
 * The operations console's HTTP server (erp-cloud console): sign-in through
 * erp-cloud's OpenID Provider, sessions in memory, the pages, and the
 * actions. Every request of a signed-in user runs in one transaction as the
 * database role of the user's console role (SET LOCAL ROLE) with the ERP
 * login in erp_cloud.console_user, so the database authorises each read and
 * action again. Every POST needs the session's CSRF token.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type pg from 'pg';
import type { Logger } from 'pino';
import { inTransaction } from '../kernel/db.js';
import { describePgError } from '../kernel/errors.js';
import { CONSOLE_CSS, CONSOLE_JS } from './assets.js';
import type { ConsoleConfig } from './config.js';
import { t, type Lang } from './i18n.js';
import { discover, finishLogin, startLogin, type Client, type PendingLogin, type ProviderMetadata } from './oidc.js';
import {
  asnPage, attentionPage, errorPage, layout, messagePage, noRolePage, orderPage, overviewPage, procurementPage, searchPage, settingsPage, taxDocumentPage,
  type ConsoleRole, type PageContext, type Row,
} from './pages.js';
import { PAGE_SIZE, consoleSql } from './queries.js';
import { html } from './html.js';

/** The database role each console role works as; a user without a console role only ever reaches erp_cloud_console. */
export const DATABASE_ROLE = { none: 'erp_cloud_console', finance: 'erp_cloud_console_finance', operator: 'erp_cloud_console_operator' } as const;

const SESSION_COOKIE = 'erp_console';
const LANG_COOKIE = 'erp_console_lang';
const PENDING_TTL_MS = 10 * 60_000;
const MAX_PENDING = 10_000;
const MAX_BODY = 64 * 1024;

interface Session {
  id: string;
  login: string;
  name: string;
  csrf: string;
  expiresAt: number;
  flash: PageContext['flash'];
}

export interface ConsoleServerOptions {
  config: ConsoleConfig;
  pool: pg.Pool;
  log: Logger;
}

export interface ConsoleServer {
  url: string;
  close(): Promise<void>;
}

const HTML_HEADERS = {
  'content-type': 'text/html; charset=utf-8',
  'cache-control': 'no-store',
  'referrer-policy': 'same-origin',
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'content-security-policy': "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
} as const;

class Refusal extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

function readCookies(req: IncomingMessage): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0) {
      try {
        out.set(part.slice(0, i).trim(), decodeURIComponent(part.slice(i + 1).trim()));
      } catch {
        // a cookie that is not ours
      }
    }
  }
  return out;
}

async function readForm(req: IncomingMessage): Promise<URLSearchParams> {
  const type = String(req.headers['content-type'] ?? '');
  if (!type.startsWith('application/x-www-form-urlencoded')) throw new Refusal(415, 'actions are sent as application/x-www-form-urlencoded forms');
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new Refusal(413, 'the form is too large');
    chunks.push(chunk as Buffer);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function sameToken(a: string | null, b: string): boolean {
  if (!a) return false;
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** A path of this console to go back to (never another origin). */
function safeBack(v: string | null): string {
  return v && /^\/(?!\/)[^\s\\]*$/.test(v) ? v : '/';
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const cursor = (v: string | null) => (v && /^\d{1,18}$/.test(v) ? v : null);

export async function startConsoleServer(opts: ConsoleServerOptions): Promise<ConsoleServer> {
  const { config, pool, log } = opts;
  const secure = config.ERP_CLOUD_CONSOLE_URL.startsWith('https:');
  const client: Client = {
    issuer: config.ERP_CLOUD_CONSOLE_ISSUER, clientId: config.ERP_CLOUD_CONSOLE_CLIENT_ID, clientSecret: config.ERP_CLOUD_CONSOLE_CLIENT_SECRET,
    redirectUri: `${config.ERP_CLOUD_CONSOLE_URL}/callback`,
  };
  const sessions = new Map<string, Session>();
  const pending = new Map<string, PendingLogin>();
  let metadata: ProviderMetadata | null = null;
  const provider = async () => (metadata ??= await discover(config.ERP_CLOUD_CONSOLE_ISSUER));

  const cookie = (name: string, value: string, maxAgeS: number) =>
    `${name}=${encodeURIComponent(value)}; Path=/; Max-Age=${maxAgeS}; HttpOnly; SameSite=Lax${secure ? '; Secure' : ''}`;

  /** One transaction as the database role of `role`, with the user named for the database's checks and audit. */
  async function asUser<T>(role: keyof typeof DATABASE_ROLE, login: string, readOnly: boolean, fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    return inTransaction(pool, async (c) => {
      await c.query(`set local role ${DATABASE_ROLE[role]}`); // one of three fixed names
      await c.query(`select set_config('erp_cloud.console_user', $1, true)`, [login]);
      return fn(c);
    }, readOnly ? 'begin isolation level repeatable read read only' : 'begin');
  }

  const roleOf = (login: string) => asUser('none', login, true, async (c) => (await c.query(consoleSql.roleOf, [login])).rows[0]?.role as ConsoleRole | null);

  function send(res: ServerResponse, status: number, body: string, headers: Record<string, string> = {}): void {
    res.writeHead(status, { ...HTML_HEADERS, ...headers });
    res.end(body);
  }

  function redirect(res: ServerResponse, location: string, headers: Record<string, string | string[]> = {}, status = 303): void {
    res.writeHead(status, { location, 'cache-control': 'no-store', ...headers });
    res.end();
  }

  function sessionOf(req: IncomingMessage): Session | null {
    const id = readCookies(req).get(SESSION_COOKIE);
    const s = id ? sessions.get(id) : undefined;
    if (!s) return null;
    if (s.expiresAt < Date.now()) {
      sessions.delete(s.id);
      return null;
    }
    s.expiresAt = Date.now() + config.ERP_CLOUD_CONSOLE_SESSION_TTL_S * 1000;
    return s;
  }

  async function handleLogin(res: ServerResponse, url: URL): Promise<void> {
    const iss = url.searchParams.get('iss');
    if (iss && iss !== config.ERP_CLOUD_CONSOLE_ISSUER) throw new Refusal(400, `sign-in started by another provider (${iss})`);
    const meta = await provider();
    const { pending: p, url: to } = startLogin(meta, client);
    const now = Date.now();
    for (const [k, v] of pending) if (now - v.createdAt > PENDING_TTL_MS || pending.size > MAX_PENDING) pending.delete(k);
    pending.set(p.state, p);
    redirect(res, to, {}, 302);
  }

  async function handleCallback(res: ServerResponse, url: URL): Promise<void> {
    const state = url.searchParams.get('state') ?? '';
    const p = pending.get(state);
    pending.delete(state);
    if (url.searchParams.get('error')) throw new Refusal(401, `${url.searchParams.get('error')}: ${url.searchParams.get('error_description') ?? ''}`);
    if (!p || Date.now() - p.createdAt > PENDING_TTL_MS) throw new Refusal(400, 'this sign-in is unknown or expired; open the console from the ERP again');
    const code = url.searchParams.get('code');
    if (!code) throw new Refusal(400, 'the provider sent no code');
    const user = await finishLogin(await provider(), client, p, code);
    const s: Session = {
      id: randomBytes(32).toString('base64url'), login: user.login, name: user.name, csrf: randomBytes(32).toString('base64url'),
      expiresAt: Date.now() + config.ERP_CLOUD_CONSOLE_SESSION_TTL_S * 1000, flash: null,
    };
    sessions.set(s.id, s);
    log.info({ login: user.login }, 'console: signed in');
    redirect(res, '/', { 'set-cookie': cookie(SESSION_COOKIE, s.id, config.ERP_CLOUD_CONSOLE_SESSION_TTL_S) });
  }

  async function action(s: Session, role: ConsoleRole, path: string, form: URLSearchParams): Promise<string> {
    const reason = form.get('reason') ?? '';
    const requestId = form.get('request_id') ?? '';
    const invoiceId = form.get('invoice_id') ?? '';
    return asUser(role, s.login, false, async (c) => {
      switch (path) {
        case '/actions/replay':
        case '/actions/skip': {
          if (!UUID.test(requestId)) throw new Refusal(400, 'request_id must be a UUID');
          const { rows } = await c.query(path === '/actions/replay' ? consoleSql.replay : consoleSql.skip, [requestId, reason]);
          return String(rows[0].result);
        }
        case '/actions/requery': {
          if (!/^\d{1,18}$/.test(invoiceId)) throw new Refusal(400, 'invoice_id must be a number');
          const { rows } = await c.query(consoleSql.requery, [invoiceId, reason]);
          return String(rows[0].result);
        }
        case '/actions/reissue': {
          if (!/^\d{1,18}$/.test(invoiceId)) throw new Refusal(400, 'invoice_id must be a number');
          let buyer: Record<string, string> | null = null;
          if (form.get('use') !== 'erp') {
            buyer = {};
            for (const [field, key] of [['buyer_name', 'name'], ['buyer_tax_id', 'tax_id'], ['buyer_address', 'address'], ['buyer_phone', 'phone'],
              ['buyer_bank_name', 'bank_name'], ['buyer_account', 'bank_account'], ['buyer_email', 'email']] as const) {
              const v = (form.get(field) ?? '').trim();
              if (v) buyer[key] = v;
            }
          }
          const { rows } = await c.query(consoleSql.reissue, [invoiceId, buyer === null ? null : JSON.stringify(buyer), reason]);
          return String(rows[0].result);
        }
        default:
          throw new Refusal(404, 'no such action');
      }
    });
  }

  async function page(ctx: PageContext, role: ConsoleRole, url: URL, res: ServerResponse): Promise<void> {
    const p = url.pathname;
    const read = <T>(fn: (c: pg.PoolClient) => Promise<T>) => asUser(role, ctx.login, true, fn);
    if (p === '/') {
      const hours = config.ERP_CLOUD_CONSOLE_CHART_HOURS;
      const data = await read(async (c) => ({
        status: (await c.query(consoleSql.endpointStatus)).rows,
        settings: (await c.query(consoleSql.endpointSettings)).rows,
        minutes: (await c.query(consoleSql.attemptsPerMinute, [hours])).rows,
        now: (await c.query<{ now: Date }>('select now()')).rows[0]!.now,
      }));
      send(res, 200, overviewPage(ctx, { ...data, hours }));
      return;
    }
    if (p === '/documents') {
      const q = (url.searchParams.get('q') ?? '').trim().slice(0, 200);
      const hits = q ? await read(async (c) => (await c.query(consoleSql.search, [q, UUID.test(q) ? q : null])).rows) : null;
      if (hits && hits.length === 1) {
        const h = hits[0]!;
        redirect(res, h.kind === 'message' ? `/documents/message/${h.key}` : `/documents/${h.kind}/${h.key}`, {}, 302);
        return;
      }
      send(res, 200, searchPage(ctx, q, hits));
      return;
    }
    let m = /^\/documents\/tax\/(\d{1,18})$/.exec(p);
    if (m) {
      const id = m[1]!;
      const data = await read(async (c) => {
        const doc = (await c.query(consoleSql.taxDocument, [id])).rows[0];
        if (!doc) return null;
        const invoices = (await c.query(consoleSql.invoicesOfDocument, [doc.source, doc.reference])).rows;
        const blueIds = invoices.map((i) => String(i.invoice_id));
        const reds = (await c.query(consoleSql.redInvoicesOf, [blueIds])).rows;
        const ids = [...blueIds, ...reds.map((r) => String(r.invoice_id))];
        const events = (await c.query(consoleSql.invoiceEvents, [ids])).rows;
        const messages = (await c.query(consoleSql.messagesOf, ['tax.invoice', ids])).rows;
        const requestIds = [...new Set([...messages.map((x) => String(x.request_id)), ...[...invoices, ...reds].flatMap((i) => [i.request_id, i.next_query_id]).filter(Boolean).map(String)])];
        const attempts = (await c.query(consoleSql.attemptsOf, [requestIds])).rows;
        const audit = (await c.query(consoleSql.auditOf, [requestIds, [...requestIds, ...ids]])).rows;
        const refused = invoices.filter((i) => i.outcome === 'refused').map((i) => String(i.invoice_id));
        const buyers = new Map((refused.length ? (await c.query(consoleSql.invoiceBuyers, [refused])).rows : []).map((b) => [String(b.id), b]));
        return { doc, invoices, reds, events, messages, attempts, audit, buyers };
      });
      if (!data) throw new Refusal(404, t(ctx.lang, 'notFound'));
      send(res, 200, taxDocumentPage(ctx, data));
      return;
    }
    m = /^\/invoices\/(\d{1,18})\/pdf$/.exec(p);
    if (m) {
      const pdf = await read(async (c) => (await c.query(consoleSql.invoicePdf, [m![1]])).rows[0]);
      if (!pdf) throw new Refusal(404, t(ctx.lang, 'notFound'));
      res.writeHead(200, {
        'content-type': 'application/pdf', 'content-disposition': `inline; filename="${String(pdf.file_name).replace(/[^\w.-]/g, '_')}"`,
        'cache-control': 'private, no-store', 'x-content-type-options': 'nosniff', 'x-frame-options': 'SAMEORIGIN',
        'content-security-policy': "frame-ancestors 'self'",
      });
      res.end(pdf.content as Buffer);
      return;
    }
    m = /^\/invoices\/(\d{1,18})$/.exec(p);
    if (m) {
      const doc = await read(async (c) => (await c.query(consoleSql.invoiceDocument, [m![1]])).rows[0]);
      if (!doc?.document_id) throw new Refusal(404, t(ctx.lang, 'notFound'));
      redirect(res, `/documents/tax/${doc.document_id}`, {}, 302);
      return;
    }
    m = /^\/documents\/message\/([0-9a-f-]{36})$/i.exec(p);
    if (m && UUID.test(m[1]!)) {
      const rid = m[1]!.toLowerCase();
      const data = await read(async (c) => ({
        msg: (await c.query(consoleSql.message, [rid])).rows[0] ?? null,
        attempts: (await c.query(consoleSql.attemptsOf, [[rid]])).rows,
        audit: (await c.query(consoleSql.auditOf, [[rid], [rid]])).rows,
      }));
      if (!data.msg && !data.attempts.length) throw new Refusal(404, t(ctx.lang, 'notFound'));
      send(res, 200, messagePage(ctx, data.msg, rid, data.attempts, data.audit));
      return;
    }
    m = /^\/documents\/po\/(\d{1,18})$/.exec(p);
    if (m) {
      const data = await read(async (c) => {
        const po = (await c.query(consoleSql.purchaseOrder, [m![1]])).rows[0];
        if (!po) return null;
        const asns = (await c.query(consoleSql.asnsOfOrder, [po.reference, po.source])).rows;
        const messages = (await c.query(consoleSql.messagesOf, ['scm.purchase_order', [String(po.order_id)]])).rows;
        const rids = messages.map((x) => String(x.request_id));
        const attempts = (await c.query(consoleSql.attemptsOf, [rids])).rows;
        const audit = (await c.query(consoleSql.auditOf, [rids, rids])).rows;
        return { po, asns, messages, attempts, audit };
      });
      if (!data) throw new Refusal(404, t(ctx.lang, 'notFound'));
      send(res, 200, orderPage(ctx, data.po, data.asns, data.messages, data.attempts, data.audit));
      return;
    }
    m = /^\/documents\/asn\/(\d{1,18})$/.exec(p);
    if (m) {
      const a = await read(async (c) => (await c.query(consoleSql.asn, [m![1]])).rows[0]);
      if (!a) throw new Refusal(404, t(ctx.lang, 'notFound'));
      send(res, 200, asnPage(ctx, a));
      return;
    }
    if (p === '/attention') {
      const data = await read(async (c) => {
        const messages = (await c.query(consoleSql.failedMessages, [cursor(url.searchParams.get('messages_before'))])).rows;
        const invoices = (await c.query(consoleSql.failedInvoices, [cursor(url.searchParams.get('invoices_before'))])).rows;
        const reds = (await c.query(consoleSql.failedRedInvoices, [cursor(url.searchParams.get('reds_before'))])).rows;
        const refused = invoices.filter((i) => i.outcome === 'refused').map((i) => String(i.invoice_id));
        const buyers = new Map((refused.length ? (await c.query(consoleSql.invoiceBuyers, [refused])).rows : []).map((b: Row) => [String(b.id), b]));
        return { messages, invoices, reds, buyers };
      });
      send(res, 200, attentionPage(ctx, data.messages, data.invoices, data.reds, data.buyers, PAGE_SIZE));
      return;
    }
    if (p === '/procurement') {
      const data = await read(async (c) => ({
        orders: (await c.query(consoleSql.orders, [cursor(url.searchParams.get('orders_before'))])).rows,
        asns: (await c.query(consoleSql.asns, [cursor(url.searchParams.get('asns_before'))])).rows,
        quarantine: (await c.query(consoleSql.quarantine, [cursor(url.searchParams.get('quarantine_before'))])).rows,
      }));
      send(res, 200, procurementPage(ctx, data.orders, data.asns, data.quarantine, PAGE_SIZE));
      return;
    }
    if (p === '/settings') {
      const data = await read(async (c) => ({
        endpoints: (await c.query(consoleSql.endpointSettings)).rows,
        users: (await c.query(consoleSql.consoleUsers)).rows,
        tax: (await c.query(consoleSql.taxSources)).rows,
        scm: (await c.query(consoleSql.scmSources)).rows,
      }));
      send(res, 200, settingsPage(ctx, data.endpoints, data.users, data.tax, data.scm));
      return;
    }
    throw new Refusal(404, t(ctx.lang, 'notFound'));
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', config.ERP_CLOUD_CONSOLE_URL);
    const cookies = readCookies(req);
    const asked = url.searchParams.get('lang');
    const lang: Lang = asked === 'en' || asked === 'zh' ? asked : cookies.get(LANG_COOKIE) === 'en' ? 'en' : 'zh';
    if (asked === 'en' || asked === 'zh') res.setHeader('set-cookie', cookie(LANG_COOKIE, asked, 365 * 86_400));
    if (asked) url.searchParams.delete('lang');

    if (req.method === 'GET' && url.pathname === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      return;
    }
    if (req.method === 'GET' && (url.pathname === '/static/console.css' || url.pathname === '/static/console.js')) {
      const css = url.pathname.endsWith('.css');
      res.writeHead(200, { 'content-type': css ? 'text/css; charset=utf-8' : 'text/javascript; charset=utf-8', 'cache-control': 'public, max-age=300', 'x-content-type-options': 'nosniff' });
      res.end(css ? CONSOLE_CSS : CONSOLE_JS);
      return;
    }
    if (req.method === 'GET' && url.pathname === '/login') return handleLogin(res, url);
    if (req.method === 'GET' && url.pathname === '/callback') return handleCallback(res, url);
    if (req.method === 'GET' && url.pathname === '/signed-out') {
      send(res, 200, `<!DOCTYPE html><html lang="${lang === 'zh' ? 'zh-CN' : 'en'}"><head><meta charset="utf-8"><link rel="stylesheet" href="/static/console.css"><title>${t(lang, 'title')}</title></head><body><main>${html`<p class="flash ok">${t(lang, 'signInFirst')}</p>`}</main></body></html>`);
      return;
    }

    const s = sessionOf(req);
    if (!s) {
      if (req.method === 'GET') redirect(res, '/login', {}, 302);
      else send(res, 403, `<!DOCTYPE html><p>${t(lang, 'signInFirst')}</p>`);
      return;
    }
    const role = await roleOf(s.login);
    const here = `${url.pathname}${url.search}`;
    const ctx: PageContext = { lang, login: s.login, name: s.name, role, csrf: s.csrf, timeZone: config.ERP_CLOUD_CONSOLE_TIME_ZONE, here, flash: s.flash };
    s.flash = null;

    if (req.method === 'POST') {
      const form = await readForm(req);
      if (!sameToken(form.get('csrf'), s.csrf)) {
        log.warn({ login: s.login, path: url.pathname }, 'console: action refused without its CSRF token');
        send(res, 403, errorPage(ctx, 403, t(lang, 'csrfRefused')));
        return;
      }
      if (url.pathname === '/logout') {
        sessions.delete(s.id);
        redirect(res, '/signed-out', { 'set-cookie': cookie(SESSION_COOKIE, '', 0) });
        return;
      }
      if (!role) {
        send(res, 403, noRolePage(ctx));
        return;
      }
      const back = safeBack(form.get('back'));
      const what = url.pathname.replace('/actions/', '');
      try {
        const result = await action(s, role, url.pathname, form);
        s.flash = { ok: true, text: t(lang, what === 'replay' ? 'done_replay' : what === 'skip' ? 'done_skip' : what === 'requery' ? 'done_requery' : 'done_reissue', result) };
        log.info({ login: s.login, role, action: what }, 'console: action done');
      } catch (err) {
        if (err instanceof Refusal) throw err;
        const code = (err as { code?: string }).code;
        if (!code) throw err;
        s.flash = { ok: false, text: `${t(lang, 'refused')}: ${describePgError(err)}` };
        log.warn({ login: s.login, role, action: what, code }, 'console: action refused by the database');
      }
      redirect(res, back);
      return;
    }
    if (req.method !== 'GET') throw new Refusal(405, 'GET or POST');
    if (!role) {
      send(res, 403, noRolePage(ctx));
      return;
    }
    await page(ctx, role, url, res);
  }

  const server = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      const status = err instanceof Refusal ? err.status : 500;
      if (status === 500) log.error({ err }, 'console request failed');
      if (res.headersSent) {
        res.end();
        return;
      }
      const text = err instanceof Refusal ? err.message : 'the console could not answer; see its log';
      send(res, status, `<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="stylesheet" href="/static/console.css"><title>${status}</title></head><body><main>${html`<p class="flash bad">${status} — ${text}</p><p><a href="/">←</a></p>`}</main></body></html>`);
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.ERP_CLOUD_CONSOLE_PORT, config.ERP_CLOUD_CONSOLE_HOST, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  return {
    url: `http://${host}:${addr.port}`,
    async close() {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

export { layout };
