/**
 * The oidc-provider configuration: authorization code flow only, PKCE (S256)
 * required for every client, ID tokens carrying the claims the platform needs
 * (conformIdTokenClaims off), accounts from erp.app_user (inactive users do not
 * exist for the provider), clients and storage in PostgreSQL, no development
 * interactions, RP-initiated logout, every protocol error audited.
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
              from erp.app_user where id = $1::bigint and active`,
  recordEvent: 'select sso.record_event($1, $2, $3, $4, $5, $6)',
} as const;

/** An address as the audit keeps it (IPv4-mapped IPv6 shortened), or null when it is not an address. */
export function sourceAddress(ip: string | undefined): string | null {
  if (!ip) return null;
  const s = ip.replace(/^::ffff:/, '');
  return /^[0-9a-fA-F:.]+$/.test(s) ? s : null;
}

export type AuditEvent = 'ticket_issued' | 'ticket_consumed' | 'login' | 'logout' | 'failure';

export interface Audit {
  record(event: AuditEvent, e: { clientId?: string | null; userId?: string | number | null; source?: string | null; code?: string | null; detail?: string | null }): Promise<void>;
}

export function createAudit(pool: Pick<pg.Pool, 'query'>, log: Logger): Audit {
  return {
    async record(event, e) {
      const userId = e.userId !== undefined && e.userId !== null && /^\d+$/.test(String(e.userId)) ? String(e.userId) : null;
      try {
        await pool.query(providerSql.recordEvent, [event, e.clientId ?? null, userId, sourceAddress(e.source ?? undefined), e.code ?? null, e.detail ?? null]);
      } catch (err) {
        // an audit row that cannot be written is an operator's problem, never the user's answer
        log.error({ err, event, code: e.code }, 'could not write the SSO audit row');
      }
    },
  };
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
    clientDefaults: {
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'RS256',
    },
    enabledJWA: { idTokenSigningAlgValues: ['RS256'] },
    features: {
      devInteractions: { enabled: false },
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
  // from where. Events are synchronous, so the writes are collected on the
  // request and awaited before the answer goes out (the row exists when the
  // browser or platform sees the error).
  provider.use(async (ctx, next) => {
    const writes: Array<Promise<void>> = [];
    ctx.state.auditWrites = writes;
    await next();
    await Promise.all(writes);
  });
  const failure = (where: string) => (ctx: KoaContextWithOIDC, err: { error?: string; error_description?: string; message?: string }) => {
    const write = (async () => {
      const oidc = ctx.oidc;
      const entities = (oidc?.entities ?? {}) as Record<string, { accountId?: string } | undefined>;
      let userId = entities.AuthorizationCode?.accountId ?? entities.AccessToken?.accountId ?? entities.Account?.accountId ?? oidc?.session?.accountId ?? null;
      const code = oidc?.params?.code;
      if (!userId && typeof code === 'string') {
        // e.g. a wrong PKCE verifier is refused before the code becomes an entity
        userId = (await provider.AuthorizationCode.find(code, { ignoreExpiration: true }).catch(() => undefined))?.accountId ?? null;
      }
      const clientId = oidc?.client?.clientId ?? (typeof oidc?.params?.client_id === 'string' ? oidc.params.client_id : null) ?? basicClientId(ctx.get('authorization'));
      await audit.record('failure', {
        clientId, userId, source: ctx.ip, code: err.error ?? 'server_error',
        detail: `${where}: ${err.error_description ?? err.message ?? ''}`,
      });
    })();
    (ctx.state?.auditWrites as Array<Promise<void>> | undefined)?.push(write);
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
