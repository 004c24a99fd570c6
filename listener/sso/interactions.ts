/**
 * The provider's own pages, around oidc-provider:
 *
 *   GET /jump?ticket=…            the URL the ERP's button opens (sso.issue_jump_ticket). Binds the ticket
 *                                 to this browser (sso.open_jump_ticket: a random value, kept in the
 *                                 HttpOnly cookie with the ticket, its hash with the ticket; a second
 *                                 browser opening the same link is refused), and sends the browser to the platform's
 *                                 login-initiation URL (?iss=issuer), so the platform starts a normal
 *                                 authorization request with its own state, nonce and PKCE.
 *   GET /interaction/:uid         where oidc-provider sends the browser when it needs a login or consent:
 *                                 consumes the ticket (sso.consume_jump_ticket), signs the user in, records
 *                                 the grant and continues to the platform's redirect URI; a refused ticket
 *                                 goes back to the platform as access_denied. Without a ticket and without a
 *                                 session: the "start from the ERP" page.
 *   GET /interaction/:uid/abort   that page's way back: login_required to the platform.
 *
 * Every refusal at /jump is audited and counted per source address
 * (sso.audit_failure, kind "ticket"); past ERP_CLOUD_SSO_THROTTLE_FAILURES in a
 * window the address gets 429 with Retry-After and one aggregate audit row.
 * Every page refuses framing (X-Frame-Options, frame-ancestors).
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type Provider from 'oidc-provider';
import type { InteractionResults } from 'oidc-provider';
import type pg from 'pg';
import type { Logger } from 'pino';
import type { SsoConfig } from './config.js';
import { esc, htmlPage } from './pages.js';
import { FRAME_DENY_HEADERS, JUMP_COOKIE, sourceAddress, type Audit } from './provider.js';

export const interactionSql = {
  open: 'select * from sso.open_jump_ticket($1, $2, $3)',
  consume: 'select * from sso.consume_jump_ticket($1, $2, $3, $4)',
} as const;

interface JumpOutcome {
  user_id: string | null;
  client_id: string | null;
  initiate_login_uri: string | null;
  code: string | null;
  reason: string | null;
}

export interface InteractionContext {
  config: SsoConfig;
  pool: pg.Pool;
  log: Logger;
  audit: Audit;
  provider(): Provider;
}

/** How long the ticket may wait in its cookie for the platform to come back (the ticket's own expiry still applies). */
const JUMP_COOKIE_MAX_AGE_S = 120;

/**
 * The browser's address: the socket peer, or behind the proxy
 * (ERP_CLOUD_SSO_PROXY) the rightmost X-Forwarded-For entry, the one our
 * proxy appended; anything left of it came from the browser and may be forged.
 * Same rule as provider.maxIpsCount = 1 for oidc-provider's ctx.ip.
 */
export function remoteAddress(req: IncomingMessage, proxy: boolean): string | null {
  if (proxy) {
    const xff = req.headers['x-forwarded-for'];
    const last = (Array.isArray(xff) ? xff.join(',') : xff)?.split(',').pop()?.trim();
    if (last) return sourceAddress(last);
  }
  return sourceAddress(req.socket.remoteAddress);
}

/** The jump cookie holds the ticket and this browser's binding value: `ticket.binding` (both base64url). */
function splitJumpCookie(value: string): { ticket: string; binding: string | null } {
  const i = value.indexOf('.');
  return i < 0 ? { ticket: value, binding: null } : { ticket: value.slice(0, i), binding: value.slice(i + 1) };
}

function readCookie(req: IncomingMessage, name: string): string | null {
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0 && part.slice(0, i).trim() === name) return decodeURIComponent(part.slice(i + 1).trim());
  }
  return null;
}

function jumpCookie(config: SsoConfig, value: string, maxAge: number): string {
  const secure = config.ERP_CLOUD_SSO_ISSUER.startsWith('https:') ? '; Secure' : '';
  return `${JUMP_COOKIE}=${encodeURIComponent(value)}; Path=/; Max-Age=${maxAge}; HttpOnly; SameSite=Lax${secure}`;
}

function send(res: ServerResponse, status: number, html: string, extra: Record<string, string> = {}): void {
  res.writeHead(status, {
    ...extra, 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store', 'referrer-policy': 'no-referrer',
    'x-frame-options': 'DENY', 'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
  });
  res.end(html);
}

function refusalPage(title: string, reason: string, erpUrl: string | undefined): string {
  return htmlPage(title, `<h1>${esc(title)}</h1><p class="error">${esc(reason)}.</p>
    <p>Go back to the ERP and open the platform again from there${erpUrl ? `: <a href="${esc(erpUrl)}">open the ERP</a>` : ''}.</p>`);
}

/** GET /jump?ticket=… */
async function jump(ctx: InteractionContext, req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
  const ticket = url.searchParams.get('ticket');
  const source = remoteAddress(req, ctx.config.ERP_CLOUD_SSO_PROXY);
  // ticket guessing is throttled per source address (a guesser names no client)
  const wait = await ctx.audit.throttled('ticket', source, null);
  if (wait !== null) {
    await ctx.audit.failure('ticket', { source, code: 'too_many_requests', detail: 'jump: throttled' });
    send(res, 429, refusalPage('Too many attempts', `Too many jump links from this address could not be used; try again in ${wait} seconds`, ctx.config.ERP_CLOUD_SSO_ERP_URL),
      { 'retry-after': String(wait) });
    return;
  }
  if (!ticket) {
    await ctx.audit.failure('ticket', { source, code: 'invalid_request', detail: 'jump: no ticket in the link' });
    send(res, 400, refusalPage('No jump ticket', 'This address needs the link the ERP makes when you click "open the platform"', ctx.config.ERP_CLOUD_SSO_ERP_URL));
    return;
  }
  const binding = randomBytes(32).toString('base64url');
  const { rows } = await ctx.pool.query<JumpOutcome>(interactionSql.open, [ticket, binding, source]);
  const live = rows[0];
  if (!live) {
    // not usable: consume records why (unknown, used, expired, client disabled); counted for throttling
    const outcome = (await ctx.pool.query<JumpOutcome>(interactionSql.consume, [ticket, null, source, null])).rows[0]!;
    await ctx.audit.failure('ticket', { source, code: outcome.code, audited: true });
    send(res, 400, refusalPage('This jump link cannot be used', outcome.reason ?? 'the jump link is not valid', ctx.config.ERP_CLOUD_SSO_ERP_URL));
    return;
  }
  if (live.code) {
    // EO024: another browser opened it first (audited by sso.open_jump_ticket)
    await ctx.audit.failure('ticket', { source, code: live.code, audited: true });
    send(res, 400, refusalPage('This jump link cannot be used', live.reason ?? 'the jump link was already opened', ctx.config.ERP_CLOUD_SSO_ERP_URL));
    return;
  }
  const target = new URL(live.initiate_login_uri!);
  target.searchParams.set('iss', ctx.config.ERP_CLOUD_SSO_ISSUER);
  res.writeHead(303, {
    ...FRAME_DENY_HEADERS, location: target.toString(), 'set-cookie': jumpCookie(ctx.config, `${ticket}.${binding}`, JUMP_COOKIE_MAX_AGE_S),
    'cache-control': 'no-store', 'referrer-policy': 'no-referrer',
  });
  res.end();
}

async function grantFor(provider: Provider, details: Awaited<ReturnType<Provider['interactionDetails']>>, accountId: string): Promise<string> {
  const clientId = String(details.params.client_id);
  let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
  if (!grant || grant.accountId !== accountId || grant.clientId !== clientId) grant = new provider.Grant({ accountId, clientId });
  // the client was registered by the ERP's administrators: that registration is the consent
  grant.addOIDCScope(typeof details.params.scope === 'string' ? details.params.scope : 'openid');
  const missingClaims = (details.prompt.details as { missingOIDCClaims?: string[] }).missingOIDCClaims;
  if (missingClaims?.length) grant.addOIDCClaims(missingClaims);
  return grant.save();
}

/** GET /interaction/:uid and /interaction/:uid/abort */
async function interaction(ctx: InteractionContext, req: IncomingMessage, res: ServerResponse, abort: boolean): Promise<void> {
  const provider = ctx.provider();
  const source = remoteAddress(req, ctx.config.ERP_CLOUD_SSO_PROXY);
  const details = await provider.interactionDetails(req, res);
  const clientId = String(details.params.client_id);
  const finish = (result: InteractionResults) => provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });

  if (abort) {
    await finish({ error: 'login_required', error_description: 'sign in by opening the platform from the ERP' });
    return;
  }

  const cookie = readCookie(req, JUMP_COOKIE);
  if (cookie) {
    res.setHeader('set-cookie', jumpCookie(ctx.config, '', 0));
    const { ticket, binding } = splitJumpCookie(cookie);
    const outcome = (await ctx.pool.query<JumpOutcome>(interactionSql.consume, [ticket, clientId, source, binding])).rows[0]!;
    if (outcome.code) {
      // audited by sso.consume_jump_ticket; the platform gets a proper OAuth error
      await finish({ error: 'access_denied', error_description: outcome.reason ?? 'the jump link cannot be used' });
      return;
    }
    const accountId = String(outcome.user_id);
    const grantId = await grantFor(provider, details, accountId);
    await ctx.audit.record('login', { clientId, userId: accountId, source, code: 'jump' });
    await finish({ login: { accountId }, consent: { grantId } });
    return;
  }

  const sessionAccount = details.session?.accountId;
  if (details.prompt.name === 'consent' && sessionAccount) {
    // signed in by an earlier jump; another registered platform asks: same consent rule
    const grantId = await grantFor(provider, details, sessionAccount);
    await ctx.audit.record('login', { clientId, userId: sessionAccount, source, code: 'session' });
    await finish({ consent: { grantId } });
    return;
  }

  await ctx.audit.record('failure', { clientId, source, code: 'login_required', detail: 'sign-in started at the platform without a jump from the ERP' });
  const erp = ctx.config.ERP_CLOUD_SSO_ERP_URL;
  send(res, 401, htmlPage('Start from the ERP', `<h1>Please start from the ERP</h1>
    <p>This platform signs you in with your ERP account. Open the ERP, sign in there, and use its
    "open the procurement platform" button: you will arrive here already signed in.</p>
    <p>${erp ? `<a class="button" href="${esc(erp)}">Open the ERP</a>` : ''}
    <a class="button" href="/interaction/${esc(details.uid)}/abort">Back to the platform</a></p>`));
}

/** Handles the provider's own pages; returns false for anything else (oidc-provider's routes). */
export async function handleInteractionRoute(ctx: InteractionContext, req: IncomingMessage, res: ServerResponse): Promise<boolean> {
  if (req.method !== 'GET') return false;
  const url = new URL(req.url ?? '/', 'http://localhost');
  if (url.pathname === '/jump') {
    await guarded(ctx, req, res, () => jump(ctx, req, res, url));
    return true;
  }
  const m = /^\/interaction\/([A-Za-z0-9_-]{1,64})(\/abort)?$/.exec(url.pathname);
  if (m) {
    await guarded(ctx, req, res, () => interaction(ctx, req, res, m[2] !== undefined));
    return true;
  }
  return false;
}

async function guarded(ctx: InteractionContext, req: IncomingMessage, res: ServerResponse, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (err) {
    const e = err as { error?: string; error_description?: string; message?: string; name?: string };
    // e.g. SessionNotFound: the interaction expired, or its cookie did not come back
    const code = e.error ?? 'server_error';
    if (code === 'server_error') ctx.log.error({ err }, 'SSO interaction failed');
    await ctx.audit.record('failure', { source: remoteAddress(req, ctx.config.ERP_CLOUD_SSO_PROXY), code, detail: `interaction: ${e.error_description ?? e.message ?? ''}` });
    if (!res.headersSent) {
      send(res, code === 'server_error' ? 500 : 400, refusalPage('Sign-in failed', `${code}: ${e.error_description ?? 'the sign-in could not continue'}`, ctx.config.ERP_CLOUD_SSO_ERP_URL));
    } else res.end();
  }
}
