/**
 * The oidc-provider configuration: authorization code flow only, PKCE (S256)
 * required for every client, ID tokens carrying the claims the platform needs
 * (conformIdTokenClaims off), accounts from sso.app_user (inactive users do not
 * exist for the provider), clients and storage in PostgreSQL, no development
 * interactions, RP-initiated logout, every protocol error audited and counted
 * toward throttling (sso.audit_failure), every answer unframeable. Only what
 * the product uses is on: client_secret_basic (what clients are registered
 * with), no pushed authorization requests, DPoP or resource indicators.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import Provider, { interactionPolicy, type Configuration, type KoaContextWithOIDC } from 'oidc-provider';
import type pg from 'pg';
import type { Logger } from 'pino';
import { PgAdapter } from './adapter.js';
import type { SsoConfig } from './config.js';
import type { Jwk } from './keys.js';
import { htmlPage, esc } from './pages.js';

export const JUMP_COOKIE = 'erp_jump';

export const providerSql = {
  account: `select id, login, display_name, email, company_code, company_name, scm_role
              from sso.app_user where id = $1::bigint and active`,
  auditEvent: 'select sso.audit_event($1, $2, $3, $4, $5, $6)',
  auditFailure: `select sso.audit_failure($1, $2, $3, $4, $5, $6, $7, $8, make_interval(secs => $9), $10) as retry_after`,
  throttleWait: `select sso.throttle_wait($1, $2, $3, $4, make_interval(secs => $5)) as retry_after`,
  tokenOwner: 'select account_id, client_id from sso.token_owner($1, $2)',
} as const;

/** Headers on every answer the provider serves: no page of ours may be framed (clickjacking of the logout or sign-in pages). */
export const FRAME_DENY_HEADERS = { 'x-frame-options': 'DENY', 'content-security-policy': "frame-ancestors 'none'" } as const;

/** A Content-Security-Policy with frame-ancestors 'none' added (kept as is when it already refuses framing). */
export function withFrameAncestorsNone(csp: string | undefined): string {
  if (!csp) return FRAME_DENY_HEADERS['content-security-policy'];
  if (/(^|;)\s*frame-ancestors\s+'none'\s*(;|$)/.test(csp)) return csp;
  return `${csp.replace(/(^|;)\s*frame-ancestors[^;]*/g, '').replace(/;\s*$/, '')}; frame-ancestors 'none'`;
}

/** An address as the audit keeps it (IPv4-mapped IPv6 shortened), or null when it is not an address. */
export function sourceAddress(ip: string | undefined): string | null {
  if (!ip) return null;
  const s = ip.replace(/^::ffff:/, '');
  return /^[0-9a-fA-F:.]+$/.test(s) ? s : null;
}

export type AuditEvent = 'ticket_issued' | 'ticket_consumed' | 'login' | 'logout' | 'failure';

/** What failed, for throttling: each kind is counted on its own per (source, client). */
export type FailureKind = 'client_auth' | 'ticket' | 'authorization' | 'userinfo' | 'end_session' | 'other';

interface AuditEntry { clientId?: string | null; userId?: string | number | null; source?: string | null; code?: string | null; detail?: string | null }

export interface Audit {
  record(event: AuditEvent, e: AuditEntry): Promise<void>;
  /**
   * Audits a failure and counts it toward throttling of (source, throttleClient, kind):
   * one audit row each up to the threshold, then one aggregate row per window.
   * `audited`: the SQL that refused it already wrote its row (jump tickets).
   * Resolves to the seconds that key is throttled for now, or null.
   */
  failure(kind: FailureKind, e: AuditEntry & { throttleClient?: string | null; audited?: boolean }): Promise<number | null>;
  /** Seconds (source, throttleClient, kind) is throttled for now, or null. */
  throttled(kind: FailureKind, source: string | null | undefined, throttleClient: string | null | undefined): Promise<number | null>;
}

export interface ThrottleSettings {
  /** failures per (source, client, kind) per window before 429 */
  failures: number;
  windowS: number;
}

export function createAudit(pool: Pick<pg.Pool, 'query'>, log: Logger, throttle: ThrottleSettings): Audit {
  const userIdOf = (u: AuditEntry['userId']) => (u !== undefined && u !== null && /^\d+$/.test(String(u)) ? String(u) : null);
  return {
    async record(event, e) {
      try {
        await pool.query(providerSql.auditEvent, [event, e.clientId ?? null, userIdOf(e.userId), sourceAddress(e.source ?? undefined), e.code ?? null, e.detail ?? null]);
      } catch (err) {
        // an audit row that cannot be written is an operator's problem, never the user's answer
        log.error({ err, event, code: e.code }, 'could not write the SSO audit row');
      }
    },
    async failure(kind, e) {
      try {
        const { rows } = await pool.query<{ retry_after: number | null }>(providerSql.auditFailure, [
          sourceAddress(e.source ?? undefined), e.throttleClient ?? null, kind, e.clientId ?? null, userIdOf(e.userId),
          e.code ?? null, e.detail ?? null, throttle.failures, throttle.windowS, e.audited ?? false]);
        return rows[0]?.retry_after ?? null;
      } catch (err) {
        log.error({ err, kind, code: e.code }, 'could not write the SSO audit row');
        return null;
      }
    },
    async throttled(kind, source, throttleClient) {
      try {
        const { rows } = await pool.query<{ retry_after: number | null }>(providerSql.throttleWait, [
          sourceAddress(source ?? undefined), throttleClient ?? null, kind, throttle.failures, throttle.windowS]);
        return rows[0]?.retry_after ?? null;
      } catch (err) {
        // the check failing must not lock everyone out
        log.error({ err, kind }, 'could not read the SSO throttle');
        return null;
      }
    },
  };
}

/** The throttle kind of an oidc-provider route (by path), or null for routes that cannot fail on a secret (discovery, JWKS). */
export function failureKindOf(path: string): FailureKind | null {
  if (path === '/token' || path.startsWith('/token/')) return 'client_auth';
  if (path === '/auth' || path.startsWith('/auth/')) return 'authorization';
  if (path === '/me') return 'userinfo';
  if (path === '/session/end' || path.startsWith('/session/end/')) return 'end_session';
  if (path === '/jwks' || path.startsWith('/.well-known/')) return null;
  return 'other';
}

export interface ProviderOptions {
  config: SsoConfig;
  pool: pg.Pool;
  log: Logger;
  audit: Audit;
  jwks: Jwk[];
  cookieKeys: string[];
}

function sha256Hex(s: string): string {
  return createHash('sha256').update(s, 'utf8').digest('hex');
}

/** The client id of an HTTP Basic client authentication (for auditing an unknown or disabled client). */
function basicClientId(header: string): string | null {
  const m = /^Basic\s+([A-Za-z0-9+/=]+)$/i.exec(header ?? '');
  if (!m) return null;
  const decoded = Buffer.from(m[1]!, 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  try {
    return i > 0 ? decodeURIComponent(decoded.slice(0, i)).slice(0, 100) : null;
  } catch {
    return null;
  }
}

/**
 * The client a request claims before oidc-provider reads it (the HTTP Basic
 * user, or client_id in the URL): the throttle key, the same whether the
 * request is checked before or counted after it failed.
 */
function claimedClient(ctx: { get(h: string): string; query: Record<string, unknown> }): string | null {
  const q = ctx.query.client_id;
  return basicClientId(ctx.get('authorization')) ?? (typeof q === 'string' && q.length <= 100 ? q : null);
}

/** 429 with Retry-After: an HTML page where a browser is (authorization, logout), else an OAuth-style JSON error. */
function tooManyRequests(ctx: { status: number; set(field: string, val: string): void; type: string; body: unknown }, kind: FailureKind, retryAfterS: number): void {
  ctx.status = 429;
  ctx.set('Retry-After', String(retryAfterS));
  ctx.set('Cache-Control', 'no-store');
  const description = `too many failed attempts from this address; try again in ${retryAfterS} seconds`;
  if (kind === 'authorization' || kind === 'end_session') {
    ctx.type = 'html';
    ctx.body = htmlPage('Too many attempts', `<h1>Too many attempts</h1><p class="error">${esc(description)}.</p>`);
  } else {
    ctx.type = 'json';
    ctx.body = { error: 'too_many_requests', error_description: description };
  }
}

export function buildProvider(opts: ProviderOptions): Provider {
  const { config, pool, audit } = opts;

  // a jump ticket waiting in its cookie means "sign this person in now", even
  // over an existing session (which may belong to someone else)
  const policy = interactionPolicy.base();
  policy.get('login')!.checks.push(new interactionPolicy.Check(
    'erp_jump_pending', 'a jump from the ERP is waiting to be used',
    (ctx: KoaContextWithOIDC) => Boolean(ctx.cookies.get(JUMP_COOKIE, { signed: false })),
  ));
  // a session whose user findAccount no longer returns (deactivated in the
  // ERP) is no sign-in: without this, oidc-provider would go on to consent
  // with no account at all
  policy.get('login')!.checks.push(new interactionPolicy.Check(
    'erp_account_inactive', 'the signed-in ERP user is inactive',
    (ctx: KoaContextWithOIDC) => Boolean(ctx.oidc.session?.accountId && !ctx.oidc.account),
  ));

  const configuration: Configuration = {
    adapter: (name: string) => new PgAdapter(name, pool),
    async findAccount(_ctx, sub) {
      if (!/^\d+$/.test(sub)) return undefined;
      const { rows } = await pool.query(providerSql.account, [sub]);
      const u = rows[0];
      if (!u) return undefined;
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            name: u.display_name,
            preferred_username: u.login,
            ...(u.email ? { email: u.email } : {}),
            ...(u.company_code ? { company: u.company_code } : {}),
            ...(u.company_name ? { company_name: u.company_name } : {}),
            ...(u.scm_role ? { scm_role: u.scm_role } : {}),
          };
        },
      };
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email'],
      erp: ['company', 'company_name', 'scm_role'],
    },
    scopes: ['openid', 'profile', 'email', 'erp'],
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    responseTypes: ['code'],
    // the platform exchanges codes server-side; no browser-side token calls
    clientBasedCORS: () => false,
    // what clients are registered with (sso.client_metadata); a secret in the
    // request body is refused as invalid_client, and discovery offers only this
    clientAuthMethods: ['client_secret_basic'],
    clientDefaults: {
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'RS256',
    },
    enabledJWA: { idTokenSigningAlgValues: ['RS256'] },
    features: {
      devInteractions: { enabled: false },
      // on by default in oidc-provider, unused by the product: off, so they are neither served nor advertised
      pushedAuthorizationRequests: { enabled: false },
      dPoP: { enabled: false },
      resourceIndicators: { enabled: false },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.body = htmlPage('Sign out', `<h1>Sign out of the ERP single sign-on?</h1>${form}
            <button autofocus type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
            <button type="submit" form="op.logoutForm">No, stay signed in</button>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = htmlPage('Signed out', `<h1>Signed out</h1><p>You are signed out of ${esc(ctx.oidc.client?.clientName ?? 'the platform')}.</p>`);
        },
      },
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}`, policy },
    cookies: { keys: opts.cookieKeys },
    jwks: { keys: opts.jwks as never },
    ttl: {
      AccessToken: config.ERP_CLOUD_SSO_ACCESS_TOKEN_TTL_S,
      AuthorizationCode: 60,
      IdToken: config.ERP_CLOUD_SSO_ID_TOKEN_TTL_S,
      Interaction: 600,
      Session: config.ERP_CLOUD_SSO_SESSION_TTL_S,
      Grant: config.ERP_CLOUD_SSO_SESSION_TTL_S,
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = htmlPage('Sign-in failed', `<h1>Sign-in failed</h1>
        <p class="error"><strong>${esc(String(out.error))}</strong>: ${esc(String(out.error_description ?? ''))}</p>
        <p>Go back to the ERP and open the platform again. If it keeps failing, tell the ERP administrator the time and this code.</p>`);
    },
  };

  const provider = new Provider(config.ERP_CLOUD_SSO_ISSUER, configuration);
  provider.proxy = config.ERP_CLOUD_SSO_PROXY;
  // behind the proxy, ctx.ip is the X-Forwarded-For entry our proxy appended
  // (the rightmost); entries to its left come from the browser and may be forged
  provider.maxIpsCount = 1;

  // only the SHA-256 of a client secret is stored (sso.client.secret_sha256);
  // the metadata's client_secret carries that hash, and after a rotation with a
  // grace period the replaced one too ('sha256:<new>,sha256:<old>', sso.client_metadata)
  provider.Client.prototype.compareClientSecret = async function compareClientSecret(this: { clientSecret?: string }, actual: string) {
    const given = Buffer.from(`sha256:${sha256Hex(actual ?? '')}`, 'utf8');
    let match = false;
    for (const hash of (this.clientSecret ?? '').split(',')) {
      const expected = Buffer.from(hash, 'utf8');
      if (expected.length === given.length && timingSafeEqual(expected, given)) match = true; // no early exit
    }
    return match;
  };

  // every protocol error leaves an audit row: who (if known), which client,
  // from where, and counts toward throttling its (source, client, kind).
  // Events are synchronous, so the writes are collected on the request and
  // awaited before the answer goes out (the row exists when the browser or
  // platform sees the error).
  provider.use(async (ctx, next) => {
    const writes: Array<Promise<unknown>> = [];
    ctx.state.auditWrites = writes;
    try {
      const kind = failureKindOf(ctx.path);
      const wait = kind ? await audit.throttled(kind, ctx.ip, claimedClient(ctx)) : null;
      if (kind && wait !== null) {
        // throttled: not handled, counted into this window's aggregate audit row
        await audit.failure(kind, {
          throttleClient: claimedClient(ctx), clientId: claimedClient(ctx), source: ctx.ip, code: 'too_many_requests',
          detail: `${kind}: throttled`,
        });
        tooManyRequests(ctx, kind, wait);
        return;
      }
      // the failure that reaches the threshold is answered as usual; the next ones get 429
      await next();
      await Promise.all(writes);
    } finally {
      ctx.set('X-Frame-Options', FRAME_DENY_HEADERS['x-frame-options']);
      ctx.set('Content-Security-Policy', withFrameAncestorsNone(ctx.response.get('Content-Security-Policy') || undefined));
    }
  });

  /** The user and client a presented code or access token was issued to, also once consumed or revoked. */
  type Owner = { account_id: string | null; client_id: string | null };
  const ownerOf = async (model: string, id: unknown): Promise<Owner | undefined> => {
    if (typeof id !== 'string' || id.length === 0 || id.length > 200) return undefined;
    const { rows } = await pool.query<Owner>(providerSql.tokenOwner, [model, id]).catch(() => ({ rows: [] as Owner[] }));
    return rows[0];
  };
  const failure = (where: string) => (ctx: KoaContextWithOIDC, err: { error?: string; error_description?: string; message?: string }) => {
    const write = (async () => {
      const oidc = ctx.oidc;
      const entities = (oidc?.entities ?? {}) as Record<string, { accountId?: string; clientId?: string } | undefined>;
      let userId = entities.AuthorizationCode?.accountId ?? entities.AccessToken?.accountId ?? entities.Account?.accountId ?? oidc?.session?.accountId ?? null;
      let tokenClient = entities.AuthorizationCode?.clientId ?? entities.AccessToken?.clientId ?? null;
      if (!userId) {
        // a wrong PKCE verifier is refused before the code becomes an entity; a
        // replayed code or a revoked token is no entity at all (the storage
        // keeps its owner until it expires: sso.token_owner)
        const bearer = /^Bearer\s+(\S+)$/i.exec(ctx.get('authorization'))?.[1] ?? oidc?.params?.access_token;
        const owner = await ownerOf('AuthorizationCode', oidc?.params?.code) ?? await ownerOf('AccessToken', bearer);
        userId = owner?.account_id ?? null;
        tokenClient ??= owner?.client_id ?? null;
      }
      const clientId = oidc?.client?.clientId ?? (typeof oidc?.params?.client_id === 'string' ? oidc.params.client_id : null)
        ?? basicClientId(ctx.get('authorization')) ?? tokenClient;
      await audit.failure(failureKindOf(ctx.path) ?? 'other', {
        throttleClient: claimedClient(ctx), clientId, userId, source: ctx.ip, code: err.error ?? 'server_error',
        detail: `${where}: ${err.error_description ?? err.message ?? ''}`,
      });
    })();
    (ctx.state?.auditWrites as Array<Promise<unknown>> | undefined)?.push(write);
  };
  for (const event of ['authorization.error', 'grant.error', 'userinfo.error', 'end_session.error', 'end_session_confirm.error',
    'introspection.error', 'revocation.error', 'jwks.error', 'discovery.error'] as const) {
    (provider.on as (e: string, fn: (...args: never[]) => void) => void)(event, failure(event.replace('.error', '')));
  }
  provider.on('server_error', (ctx: KoaContextWithOIDC, err: Error) => {
    opts.log.error({ err }, 'SSO provider error');
    failure('server')(ctx, { error: 'server_error', error_description: err.message });
  });
  // a platform login answered from an existing session and grant never
  // reaches /interaction: audit it here. After an interaction (route resume)
  // the interaction already recorded the login.
  provider.on('authorization.success', (ctx: KoaContextWithOIDC) => {
    if (ctx.oidc.route !== 'authorization') return;
    const write = audit.record('login', { clientId: ctx.oidc.client?.clientId ?? null, userId: ctx.oidc.session?.accountId ?? null, source: ctx.ip, code: 'session' });
    (ctx.state?.auditWrites as Array<Promise<void>> | undefined)?.push(write);
  });
  provider.on('end_session.success', (ctx: KoaContextWithOIDC) => {
    const write = audit.record('logout', { clientId: ctx.oidc.client?.clientId ?? null, userId: ctx.oidc.session?.accountId ?? null, source: ctx.ip });
    (ctx.state?.auditWrites as Array<Promise<void>> | undefined)?.push(write);
  });
  return provider;
}
