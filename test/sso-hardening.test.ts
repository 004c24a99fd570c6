/**
 * The OpenID Provider's hardening: only the client authentication clients are
 * registered with, nothing served that the product does not use, every
 * failure audited, failures throttled per source and client with a bounded
 * audit, no page that can be framed, and refused codes and tokens that still
 * name their user and client.
 *
 * The provider runs behind the proxy flag here, so a test can speak from
 * several source addresses (the rightmost X-Forwarded-For entry); the
 * throttle is small (5 failures per hour-long window).
 */
import * as oidc from 'openid-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Browser } from '../listener/sim/demo-rp.js';
import { SqlState } from '../listener/kernel/errors.js';
import { loadSsoConfig } from '../listener/sso/config.js';
import { startSsoServer } from '../listener/sso/sso-server.js';
import { freePort, startSsoWorld, type SsoWorld } from './helpers/sso.js';

const THRESHOLD = 5;
const WINDOW_S = 3600;

let w: SsoWorld;
beforeAll(async () => {
  w = await startSsoWorld('sso_hardening', {
    ERP_CLOUD_SSO_PROXY: 'true', ERP_CLOUD_SSO_THROTTLE_FAILURES: String(THRESHOLD), ERP_CLOUD_SSO_THROTTLE_WINDOW_S: String(WINDOW_S),
  });
});
afterAll(async () => {
  await w?.close();
});

const basic = (id: string, secret: string) => `Basic ${Buffer.from(`${encodeURIComponent(id)}:${encodeURIComponent(secret)}`).toString('base64')}`;

/** A request from a given source address (as our proxy would report it). */
function from(source: string, init: RequestInit & { headers?: Record<string, string> } = {}): RequestInit {
  return { redirect: 'manual', ...init, headers: { 'x-forwarded-for': `203.0.113.250, ${source}`, ...(init.headers ?? {}) } };
}

/** An authorization request of our own, after a jump, followed until it comes back to the platform with a code. */
async function signedInCode(browser: Browser) {
  await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
  const verifier = oidc.randomPKCECodeVerifier();
  const state = oidc.randomState();
  const nonce = oidc.randomNonce();
  const url = oidc.buildAuthorizationUrl(w.rp.config, {
    redirect_uri: w.rp.callbackUrl, scope: 'openid profile', state, nonce,
    code_challenge: await oidc.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256',
  });
  const res = await browser.get(url.toString(), { stopAt: w.rp.callbackUrl });
  const callback = new URL(res.location!);
  return { callback, code: callback.searchParams.get('code')!, verifier, state, nonce };
}

async function failuresFrom(since: number, source: string) {
  return (await w.audit(since)).filter((a) => a.event === 'failure' && a.source_addr === source);
}

describe('client authentication: only what clients are registered with', () => {
  it('discovery offers exactly client_secret_basic at every endpoint that authenticates clients', async () => {
    const meta = await (await fetch(`${w.issuer}/.well-known/openid-configuration`)).json() as Record<string, unknown>;
    const methods = Object.entries(meta).filter(([k]) => k.endsWith('_endpoint_auth_methods_supported'));
    expect(methods.length).toBeGreaterThan(0);
    for (const [k, v] of methods) expect([k, v]).toEqual([k, ['client_secret_basic']]);
    expect(meta.token_endpoint_auth_methods_supported).toEqual(['client_secret_basic']);
    // no JWT client authentication, so no signing algorithms for it either
    expect(meta.token_endpoint_auth_signing_alg_values_supported).toBeUndefined();
  });

  it('a client secret in the request body is refused as invalid_client and audited, while the same code still exchanges with HTTP Basic', async () => {
    const browser = new Browser();
    const a = await signedInCode(browser);
    const since = await w.lastAuditId();
    const body = new URLSearchParams({
      grant_type: 'authorization_code', code: a.code, redirect_uri: w.rp.callbackUrl, code_verifier: a.verifier,
      client_id: 'procurement', client_secret: w.rpSecret,
    });
    const res = await fetch(`${w.issuer}/token`, from('198.51.100.1', { method: 'POST', body, headers: { 'content-type': 'application/x-www-form-urlencoded' } }));
    expect(res.status).toBe(401);
    expect(await res.json()).toMatchObject({ error: 'invalid_client' });
    expect((await failuresFrom(since, '198.51.100.1')).map((f) => [f.code, f.client_id])).toEqual([['invalid_client', 'procurement']]);
    // a refused authentication does not use the code up: the registered method still works
    const tokens = await oidc.authorizationCodeGrant(w.rp.config, a.callback, { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce });
    expect(tokens.claims()!.sub).toBe(await w.userId('zhang.wei'));
  });

  it('the right secret in the body does not rescue a wrong one in HTTP Basic', async () => {
    const since = await w.lastAuditId();
    const body = new URLSearchParams({ grant_type: 'authorization_code', code: 'x', redirect_uri: w.rp.callbackUrl, client_id: 'procurement', client_secret: w.rpSecret });
    const res = await fetch(`${w.issuer}/token`, from('198.51.100.2', {
      method: 'POST', body, headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic('procurement', 'wrong-secret') },
    }));
    expect(res.status).toBe(401);
    expect(await res.json()).toMatchObject({ error: 'invalid_client' });
    expect((await failuresFrom(since, '198.51.100.2')).map((f) => [f.code, f.client_id])).toEqual([['invalid_client', 'procurement']]);
  });
});

describe('nothing served that the product does not use', () => {
  it('pushed authorization requests (/request), DPoP, resource indicators, introspection, revocation and registration are neither served nor advertised', async () => {
    const meta = await (await fetch(`${w.issuer}/.well-known/openid-configuration`)).json() as Record<string, unknown>;
    for (const key of ['pushed_authorization_request_endpoint', 'require_pushed_authorization_requests', 'dpop_signing_alg_values_supported',
      'introspection_endpoint', 'revocation_endpoint', 'registration_endpoint', 'request_object_signing_alg_values_supported']) {
      expect([key, meta[key]]).toEqual([key, undefined]);
    }
    for (const path of ['/request', '/token/introspection', '/token/revocation', '/reg']) {
      const res = await fetch(`${w.issuer}${path}`, from('198.51.100.3', {
        method: 'POST', body: new URLSearchParams({ client_id: 'procurement', response_type: 'code', token: 'x' }),
        headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic('procurement', w.rpSecret) },
      }));
      expect([path, res.status]).toEqual([path, 404]);
    }
  });
});

describe('every failure at every endpoint leaves an audit row', () => {
  it('token, authorization, end_session, userinfo and the jump each record their refusal with its client and where it happened', async () => {
    const cases: Array<{ source: string; request: () => Promise<Response>; code: string; where: string; client: string | null }> = [
      {
        source: '198.51.100.21', code: 'invalid_grant', where: 'grant', client: 'procurement',
        request: () => fetch(`${w.issuer}/token`, from('198.51.100.21', {
          method: 'POST', body: new URLSearchParams({ grant_type: 'authorization_code', code: 'no-such-code', redirect_uri: w.rp.callbackUrl, code_verifier: 'x'.repeat(43) }),
          headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic('procurement', w.rpSecret) },
        })),
      },
      {
        source: '198.51.100.22', code: 'invalid_client', where: 'grant', client: 'procurement',
        request: () => fetch(`${w.issuer}/token`, from('198.51.100.22', {
          method: 'POST', body: new URLSearchParams({ grant_type: 'authorization_code', code: 'x' }),
          headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic('procurement', 'wrong-secret') },
        })),
      },
      {
        source: '198.51.100.23', code: 'invalid_redirect_uri', where: 'authorization', client: 'procurement',
        request: () => fetch(`${w.issuer}/auth?${new URLSearchParams({ client_id: 'procurement', redirect_uri: 'https://evil.example/cb', response_type: 'code', scope: 'openid' })}`, from('198.51.100.23')),
      },
      {
        source: '198.51.100.24', code: 'invalid_client', where: 'authorization', client: 'no-such-client',
        request: () => fetch(`${w.issuer}/auth?${new URLSearchParams({ client_id: 'no-such-client', redirect_uri: 'https://evil.example/cb', response_type: 'code', scope: 'openid' })}`, from('198.51.100.24')),
      },
      {
        source: '198.51.100.25', code: 'invalid_request', where: 'end_session', client: 'procurement',
        request: () => fetch(`${w.issuer}/session/end?${new URLSearchParams({ client_id: 'procurement', post_logout_redirect_uri: 'https://evil.example/bye' })}`, from('198.51.100.25')),
      },
      {
        source: '198.51.100.26', code: 'invalid_token', where: 'userinfo', client: null,
        request: () => fetch(`${w.issuer}/me`, from('198.51.100.26', { headers: { authorization: 'Bearer not-a-token' } })),
      },
      {
        source: '198.51.100.27', code: 'EO020', where: 'jump', client: null,
        request: () => fetch(`${w.issuer}/jump?ticket=not-a-ticket`, from('198.51.100.27')),
      },
      {
        source: '198.51.100.28', code: 'invalid_request', where: 'jump', client: null,
        request: () => fetch(`${w.issuer}/jump`, from('198.51.100.28')),
      },
    ];
    for (const c of cases) {
      const since = await w.lastAuditId();
      const res = await c.request();
      expect([c.where, c.code, res.status >= 400]).toEqual([c.where, c.code, true]);
      const rows = await failuresFrom(since, c.source);
      expect(rows.map((r) => [r.code, r.client_id, r.occurrences])).toEqual([[c.code, c.client, 1]]);
      if (c.code !== 'EO020') expect(rows[0]!.detail).toMatch(new RegExp(`^${c.where}: `));
    }
  });

  it('a replayed code and the access token it revoked are audited with their user and client', async () => {
    const browser = new Browser();
    const a = await signedInCode(browser);
    const tokens = await oidc.authorizationCodeGrant(w.rp.config, a.callback, { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce });
    const sub = tokens.claims()!.sub;
    expect(await oidc.fetchUserInfo(w.rp.config, tokens.access_token, sub)).toMatchObject({ sub });

    const since = await w.lastAuditId();
    await expect(oidc.authorizationCodeGrant(w.rp.config, a.callback, { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce }))
      .rejects.toMatchObject({ error: 'invalid_grant' });
    // the replay revoked what the code gave; using the token now is refused, and still names whose it was
    const res = await fetch(`${w.issuer}/me`, { headers: { authorization: `Bearer ${tokens.access_token}` } });
    expect(res.status).toBe(401);
    const failures = (await w.audit(since)).filter((r) => r.event === 'failure');
    expect(failures.map((r) => [r.code, r.user_id, r.client_id])).toEqual([
      ['invalid_grant', sub, 'procurement'],
      ['invalid_token', sub, 'procurement'],
    ]);
  });
});

describe('throttling: failures per source and client', () => {
  it(`after ${THRESHOLD} failed client secrets one source gets 429 with Retry-After for that client; other sources and clients are not throttled; the audit stays bounded and counts every attempt`, async () => {
    const attacker = '198.51.100.40';
    const N = 3 * THRESHOLD;
    const since = await w.lastAuditId();
    const attempt = (source: string, client = 'procurement') => fetch(`${w.issuer}/token`, from(source, {
      method: 'POST', body: new URLSearchParams({ grant_type: 'authorization_code', code: 'x', redirect_uri: w.rp.callbackUrl }),
      headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic(client, 'guess') },
    }));
    const statuses: number[] = [];
    const retryAfter: number[] = [];
    for (let i = 0; i < N; i++) {
      const res = await attempt(attacker);
      statuses.push(res.status);
      if (res.status === 429) {
        retryAfter.push(Number(res.headers.get('retry-after')));
        expect(await res.json()).toMatchObject({ error: 'too_many_requests' });
      } else await res.body?.cancel();
    }
    expect(statuses).toEqual([...Array(THRESHOLD).fill(401), ...Array(N - THRESHOLD).fill(429)]);
    for (const s of retryAfter) {
      expect(Number.isInteger(s)).toBe(true);
      expect(s).toBeGreaterThanOrEqual(1);
      expect(s).toBeLessThanOrEqual(WINDOW_S);
    }
    // another source, and the same source for another client, are answered normally
    expect((await attempt('198.51.100.41')).status).toBe(401);
    expect((await attempt(attacker, 'rotating-other')).status).toBe(401);

    const rows = await failuresFrom(since, attacker);
    const procurement = rows.filter((r) => r.client_id === 'procurement');
    expect(procurement.length).toBe(THRESHOLD + 1);
    expect(procurement.reduce((n, r) => n + r.occurrences, 0)).toBe(N);
    expect(procurement.filter((r) => r.code === 'throttled').map((r) => r.occurrences)).toEqual([N - THRESHOLD]);
    expect(procurement.filter((r) => r.code === 'invalid_client')).toHaveLength(THRESHOLD);
    // the window is shared through the database (every instance sees it)
    const { rows: windows } = await w.db.pool.query(`select failures from sso.failure_window where source_key = $1 and client_key = 'procurement' and kind = 'client_auth'`, [attacker]);
    expect(windows).toEqual([{ failures: N }]);
  });

  it(`after ${THRESHOLD} unusable jump links one source gets 429 with Retry-After, and the audit holds ${THRESHOLD} rows and one aggregate`, async () => {
    const guesser = '198.51.100.50';
    const N = 2 * THRESHOLD + 3;
    const since = await w.lastAuditId();
    const statuses: number[] = [];
    for (let i = 0; i < N; i++) {
      const res = await fetch(`${w.issuer}/jump?ticket=guess-${i}`, from(guesser));
      statuses.push(res.status);
      if (res.status === 429) expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      await res.body?.cancel();
    }
    expect(statuses).toEqual([...Array(THRESHOLD).fill(400), ...Array(N - THRESHOLD).fill(429)]);
    // a real link from another address still works
    const other = await fetch(await w.issue('zhang.wei', 'procurement'), from('198.51.100.51'));
    expect(other.status).toBe(303);
    const rows = await failuresFrom(since, guesser);
    expect(rows.map((r) => [r.code, r.occurrences])).toEqual([...Array(THRESHOLD).fill(['EO020', 1]), ['throttled', N - THRESHOLD]]);
  });

  it('the count is shared by every provider instance: failures at one and at another add up to one throttle', async () => {
    const port = await freePort();
    const config = loadSsoConfig({
      DATABASE_URL: w.db.url, ERP_CLOUD_SSO_ISSUER: w.issuer, ERP_CLOUD_SSO_PORT: String(port), ERP_CLOUD_SSO_PROXY: 'true',
      ERP_CLOUD_VAULT_KEY: w.masterKey, ERP_CLOUD_LOG_LEVEL: 'silent', ERP_CLOUD_SSO_KEY_CHECK_MS: '3600000',
      ERP_CLOUD_SSO_THROTTLE_FAILURES: String(THRESHOLD), ERP_CLOUD_SSO_THROTTLE_WINDOW_S: String(WINDOW_S),
    });
    const second = await startSsoServer({ config, pool: w.db.pool, log: w.log, masterKey: w.masterKey, env: {} });
    try {
      const source = '198.51.100.45';
      const statuses: number[] = [];
      for (let i = 0; i <= THRESHOLD; i++) {
        // alternate between the two instances
        const base = i % 2 === 0 ? w.op.url : second.url;
        const res = await fetch(`${base}/jump?ticket=guess-${i}`, from(source));
        statuses.push(res.status);
        await res.body?.cancel();
      }
      expect(statuses).toEqual([...Array(THRESHOLD).fill(400), 429]);
    } finally {
      await second.close();
    }
  });

  it('concurrent failures of one source from several database sessions are each counted once, and the audit stays bounded', async () => {
    const N = 4 * THRESHOLD;
    const since = await w.lastAuditId();
    const results = await Promise.all(Array.from({ length: N }, () => w.db.pool.query<{ retry: number | null }>(
      `select sso.audit_failure('192.0.2.99', 'procurement', 'client_auth', 'procurement', null, 'invalid_client', 'grant: concurrent', $1, make_interval(secs => $2)) as retry`,
      [THRESHOLD, WINDOW_S])));
    // exactly the failures from the threshold on are told to throttle
    expect(results.filter((r) => r.rows[0]!.retry === null)).toHaveLength(THRESHOLD - 1);
    const rows = await failuresFrom(since, '192.0.2.99');
    expect(rows).toHaveLength(THRESHOLD + 1);
    expect(rows.reduce((n, r) => n + r.occurrences, 0)).toBe(N);
  });

  it('successes do not count toward the threshold', async () => {
    const since = await w.lastAuditId();
    for (let i = 0; i < THRESHOLD + 2; i++) {
      const res = await fetch(`${w.issuer}/.well-known/openid-configuration`, from('198.51.100.60'));
      expect(res.status).toBe(200);
      await res.body?.cancel();
    }
    expect(await failuresFrom(since, '198.51.100.60')).toEqual([]);
    const { rows } = await w.db.pool.query(`select count(*)::int n from sso.failure_window where source_key = '198.51.100.60'`);
    expect(rows[0].n).toBe(0);
  });

  it('a bad threshold or window is refused with EO027 and counts nothing', async () => {
    const before = (await w.db.pool.query('select count(*)::int n from sso.failure_window')).rows[0].n;
    for (const [threshold, window] of [[0, '1 minute'], [5, '0 seconds'], [5, '2 days'], [null, '1 minute']] as const) {
      const err = await w.db.pool.query(`select sso.audit_failure('192.0.2.1', 'procurement', 'client_auth', 'procurement', null, 'invalid_client', 'x', $1, $2::interval)`, [threshold, window])
        .then(() => null, (e: unknown) => e as { code?: string; hint?: string });
      expect(err?.code).toBe(SqlState.ssoThrottleInvalid);
      expect(err?.hint).toMatch(/ERP_CLOUD_SSO_THROTTLE_FAILURES/);
    }
    expect((await w.db.pool.query('select count(*)::int n from sso.failure_window')).rows[0].n).toBe(before);
  });
});

describe('no page of the provider can be framed', () => {
  it('the logout page, the /auth error page, the interaction and jump pages, JSON errors, discovery and JWKS all refuse framing', async () => {
    const browser = new Browser();
    const start = await browser.get(w.rp.loginUrl); // an interaction page ("start from the ERP")
    expect(start.status).toBe(401);
    const urls: Array<[string, string]> = [
      ['logout without a session', `${w.issuer}/session/end`],
      ['/auth error page', `${w.issuer}/auth?client_id=no-such-client&response_type=code&scope=openid`],
      ['interaction error page', `${w.issuer}/interaction/no-such-interaction`],
      ['jump refusal', `${w.issuer}/jump?ticket=framed`],
      ['jump without ticket', `${w.issuer}/jump`],
      ['userinfo error', `${w.issuer}/me`],
      ['discovery', `${w.issuer}/.well-known/openid-configuration`],
      ['jwks', `${w.issuer}/jwks`],
      ['unknown path', `${w.issuer}/no-such-page`],
      ['health', `${w.issuer}/healthz`],
    ];
    const refusesFraming = (name: string, res: Response) => {
      const csp = res.headers.get('content-security-policy') ?? '';
      expect([name, res.headers.get('x-frame-options'), /(^|;)\s*frame-ancestors 'none'\s*(;|$)/.test(csp)]).toEqual([name, 'DENY', true]);
    };
    for (const [name, url] of urls) {
      const res = await fetch(url, from('198.51.100.70'));
      refusesFraming(name, res);
      await res.body?.cancel();
    }
    // the logout confirmation page, as a signed-in browser gets it
    const signedIn = new Browser();
    await signedInCode(signedIn);
    const logout = `${w.issuer}/session/end?client_id=procurement`;
    const confirm = await fetch(logout, { redirect: 'manual', headers: { cookie: await signedIn.jar.getCookieString(logout) } });
    refusesFraming('logout confirmation', confirm);
    expect(await confirm.text()).toContain('op.logoutForm');
    // the "start from the ERP" interaction page itself, fetched with the browser's cookies
    const page = new URL(/href="(\/interaction\/[^"]+)\/abort"/.exec(start.body)![1]!, w.issuer).toString();
    const again = await fetch(page, { redirect: 'manual', headers: { cookie: await browser.jar.getCookieString(page) } });
    expect([again.status, again.headers.get('x-frame-options'), again.headers.get('content-security-policy')]).toEqual([401, 'DENY', expect.stringContaining("frame-ancestors 'none'")]);
    await again.body?.cancel();
  });
});
