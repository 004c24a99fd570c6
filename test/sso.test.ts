/**
 * Single sign-on: an ERP user clicks "open the procurement platform" and lands
 * there signed in. The platform is played by openid-client (listener/sso/demo-rp.ts),
 * the browser by an HTTP client that follows redirects and keeps cookies.
 */
import { createHash } from 'node:crypto';
import * as oidc from 'openid-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PgAdapter } from '../listener/sso/adapter.js';
import { Browser, completeJump } from '../listener/sim/demo-rp.js';
import { rolledBack, sqlstateOf } from './helpers/db.js';
import { loadSsoConfig } from '../listener/sso/config.js';
import { startSsoServer } from '../listener/sso/sso-server.js';
import { discoverProvider, freePort, startSsoWorld, verifiesAgainstJwks, type SsoWorld } from './helpers/sso.js';

let w: SsoWorld;
beforeAll(async () => {
  w = await startSsoWorld('sso');
});
afterAll(async () => {
  await w?.close();
});

/** The ERP puts li.na as it has her now (sso.put_user), active or not. */
async function putLiNa({ active }: { active: boolean }) {
  await w.db.pool.query(`select sso.put_user('li.na', '李娜', 'li.na@example.com', $1, 'C001', '华东机电有限公司', 'viewer')`, [active]);
}

/** openid-client reports a 401 with WWW-Authenticate as a challenge error; either way the OAuth error code is there. */
function isOAuthError(code: string) {
  return (err: unknown) => {
    const e = err as { error?: string; cause?: Array<{ parameters?: { error?: string } }> };
    return (e.error ?? e.cause?.[0]?.parameters?.error) === code;
  };
}

/** An authorization request of our own (for the cases the demo RP does not make), followed until it comes back to redirectUri. */
async function authorize(browser: Browser, config: oidc.Configuration, redirectUri: string, opts: { pkce?: boolean; redirect?: string } = {}) {
  const verifier = oidc.randomPKCECodeVerifier();
  const state = oidc.randomState();
  const nonce = oidc.randomNonce();
  const params: Record<string, string> = { redirect_uri: opts.redirect ?? redirectUri, scope: 'openid profile', state, nonce };
  if (opts.pkce !== false) Object.assign(params, { code_challenge: await oidc.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256' });
  const res = await browser.get(oidc.buildAuthorizationUrl(config, params).toString(), { stopAt: redirectUri });
  return { res, verifier, state, nonce };
}

/** With a signed-in browser: one more sign-in at the platform, done by hand to keep the access token. */
async function completeJumpTokens(browser: Browser): Promise<{ access_token: string; sub: string }> {
  const a = await authorize(browser, w.rp.config, w.rp.callbackUrl);
  const tokens = await oidc.authorizationCodeGrant(w.rp.config, new URL(a.res.location!), { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce });
  return { access_token: tokens.access_token, sub: tokens.claims()!.sub };
}

describe('the jump from the ERP', () => {
  it('a signed-in ERP user lands on the platform signed in: verified ID token with name, email, company and role, userinfo, audit', async () => {
    const since = await w.lastAuditId();
    const jumpUrl = await w.issue('zhang.wei', 'procurement');
    expect(jumpUrl).toMatch(new RegExp(`^${w.issuer}/jump\\?ticket=[A-Za-z0-9_-]{43}$`));
    const ticket = new URL(jumpUrl).searchParams.get('ticket')!;
    // only the hash is stored
    const stored = await w.db.pool.query(`select count(*)::int n, bool_or(row_to_json(t)::text like '%' || $2 || '%') leaked
                                            from sso.jump_ticket t where encode(ticket_sha256, 'hex') = $1`,
    [createHash('sha256').update(ticket).digest('hex'), ticket]);
    expect(stored.rows[0]).toEqual({ n: 1, leaked: false });

    const result = await completeJump(jumpUrl);
    expect(result.error_description ?? null).toBeNull();
    expect(result.ok).toBe(true);
    const sub = await w.userId('zhang.wei');
    expect(result.claims).toMatchObject({
      iss: w.issuer, aud: 'procurement', sub, name: '张伟', preferred_username: 'zhang.wei', email: 'zhang.wei@example.com',
      company: 'C001', company_name: '华东机电有限公司', scm_role: 'buyer',
    });
    expect(typeof result.claims!.nonce).toBe('string');
    expect(result.userinfo).toMatchObject({ sub, email: 'zhang.wei@example.com', company: 'C001' });
    expect(await verifiesAgainstJwks(result.id_token!, w.issuer)).toBe(true);

    const audit = await w.audit(since);
    expect(audit.map((a) => [a.event, a.user_id, a.client_id, a.code])).toEqual([
      ['ticket_issued', sub, 'procurement', null],
      ['ticket_consumed', sub, 'procurement', null],
      ['login', sub, 'procurement', 'jump'],
    ]);
    expect(audit[0]!.source_addr).toBe('203.0.113.7');
    expect(audit[1]!.source_addr).toBe('127.0.0.1');
  });

  it('discovery offers the code flow with S256 PKCE only, and the JWKS has public keys only', async () => {
    const meta = await (await fetch(`${w.issuer}/.well-known/openid-configuration`)).json();
    expect(meta).toMatchObject({ issuer: w.issuer, response_types_supported: ['code'], code_challenge_methods_supported: ['S256'] });
    expect(meta.claims_supported).toEqual(expect.arrayContaining(['company', 'scm_role', 'email', 'name']));
    const jwks = await (await fetch(`${w.issuer}/jwks`)).json();
    expect(jwks.keys.length).toBeGreaterThan(0);
    for (const k of jwks.keys) expect(Object.keys(k).filter((x) => ['d', 'p', 'q', 'dp', 'dq', 'qi'].includes(x))).toEqual([]);
  });
});

describe('refusals: each one a protocol error and an audit row', () => {
  it('a leaked jump link works in one browser only: of two browsers racing to open it, the second is refused at /jump, and the link is single use', async () => {
    const jumpUrl = await w.issue('zhang.wei', 'procurement');
    const since = await w.lastAuditId();
    const [a, b] = [new Browser(), new Browser()];
    const hops = await Promise.all([a.get(jumpUrl, { stopAt: w.rp.loginUrl }), b.get(jumpUrl, { stopAt: w.rp.loginUrl })]);
    const winner = hops[0]!.location ? 0 : 1;
    const loser = 1 - winner;
    expect(hops[winner]!.location).toContain(`${w.rp.loginUrl}?iss=`);
    expect(hops[loser]).toMatchObject({ status: 400, location: null });
    expect(hops[loser]!.body).toContain('already opened in another browser');

    // the losing browser, even carrying the ticket in a cookie of its own, is refused
    const thief = [a, b][loser]!;
    await thief.jar.setCookie(`erp_jump=${new URL(jumpUrl).searchParams.get('ticket')}.${'x'.repeat(43)}; Path=/`, w.issuer);
    const stolen = await thief.get(w.rp.loginUrl);
    expect(JSON.parse(stolen.body)).toMatchObject({ error: 'access_denied', error_description: 'the jump link was opened in another browser' });
    // which used the ticket up: the first browser can no longer finish either
    const late = await [a, b][winner]!.get(hops[winner]!.location!);
    expect(JSON.parse(late.body)).toMatchObject({ error: 'access_denied', error_description: 'the jump link was already used' });
    const again = await new Browser().get(jumpUrl);
    expect(again.status).toBe(400);
    expect(again.body).toContain('already used');
    const user = await w.userId('zhang.wei');
    expect((await w.audit(since)).filter((a) => a.event === 'failure').map((a) => [a.code, a.client_id, a.user_id])).toEqual([
      ['EO024', 'procurement', user], ['EO024', 'procurement', user], ['access_denied', 'procurement', null],
      ['EO021', 'procurement', user], ['access_denied', 'procurement', null], ['EO021', 'procurement', user]]);
  });

  it('the browser that opened the jump link signs in with it; the same link opened again is refused', async () => {
    const jumpUrl = await w.issue('zhang.wei', 'procurement');
    expect((await completeJump(jumpUrl)).ok).toBe(true);
    const again = await new Browser().get(jumpUrl);
    expect(again.status).toBe(400);
    expect(again.body).toContain('already used');
  });

  it('an expired ticket is refused: at the jump, and as access_denied when it expires on the way', async () => {
    const since = await w.lastAuditId();
    const stale = await w.issue('zhang.wei', 'procurement');
    await w.ageTicket(stale, 120);
    const page = await new Browser().get(stale);
    expect(page.status).toBe(400);
    expect(page.body).toContain('expired');

    // it expires between the jump and the platform's request
    const short = await w.issue('zhang.wei', 'procurement');
    const browser = new Browser();
    const hop = await browser.get(short, { stopAt: w.rp.loginUrl });
    expect(hop.location).toBeTruthy();
    await w.ageTicket(short, 61);
    const answer = JSON.parse((await browser.get(hop.location!)).body);
    expect(answer).toMatchObject({ error: 'access_denied', error_description: 'the jump link has expired' });
    expect((await w.audit(since)).filter((a) => a.event === 'failure').map((a) => a.code)).toEqual(['EO022', 'EO022', 'access_denied']);
  });

  it('a ticket for another client is refused as access_denied at that client, and is used up', async () => {
    const other = await w.registerClient('other-platform');
    const otherConfig = await discoverProvider(w.issuer, 'other-platform', other.secret);
    const jumpUrl = await w.issue('zhang.wei', 'procurement');
    const browser = new Browser();
    await browser.get(jumpUrl, { stopAt: w.rp.loginUrl });
    const since = await w.lastAuditId();
    const { res, state } = await authorize(browser, otherConfig, other.redirectUri);
    const back = new URL(res.location!);
    expect(back.searchParams.get('error')).toBe('access_denied');
    expect(back.searchParams.get('state')).toBe(state);
    await expect(oidc.authorizationCodeGrant(otherConfig, back, { expectedState: state })).rejects.toMatchObject({ error: 'access_denied' });
    const failures = (await w.audit(since)).filter((a) => a.event === 'failure');
    expect(failures.map((a) => [a.code, a.client_id])).toEqual([['EO023', 'other-platform'], ['access_denied', 'other-platform']]);
    expect(failures[0]!.detail).toContain('issued for procurement');
    expect((await completeJump(jumpUrl)).ok).toBeFalsy();
  });

  it('an inactive user gets no ticket, and a ticket issued before the user was deactivated is refused as access_denied', async () => {
    const jumpUrl = await w.issue('li.na', 'procurement');
    await putLiNa({ active: false });
    try {
      expect(await sqlstateOf(w.issue('li.na', 'procurement'))).toBe('EO007');
      const since = await w.lastAuditId();
      const answer = await completeJump(jumpUrl);
      expect(answer).toMatchObject({ error: 'access_denied', error_description: 'the ERP user is inactive' });
      expect((await w.audit(since)).filter((a) => a.event === 'failure').map((a) => [a.code, a.user_id]))
        .toEqual([['EO007', await w.userId('li.na')], ['access_denied', null]]);
    } finally {
      await putLiNa({ active: true });
    }
    expect(await sqlstateOf(w.issue('nobody', 'procurement'))).toBe('EO006');
  });

  it('a disabled client gets no tickets, its authorization requests end in invalid_client, and its codes no longer exchange', async () => {
    // a code obtained while the client was enabled
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const before = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    expect(new URL(before.res.location!).searchParams.get('code')).toBeTruthy();

    await w.db.pool.query(`select sso.put_client_enabled('procurement', false)`);
    try {
      const since = await w.lastAuditId();
      expect(await sqlstateOf(w.issue('zhang.wei', 'procurement'))).toBe('EO005');
      const page = await new Browser().get(w.rp.loginUrl);
      expect(page.status).toBe(400);
      expect(page.body).toContain('invalid_client');
      await expect(oidc.authorizationCodeGrant(w.rp.config, new URL(before.res.location!), { pkceCodeVerifier: before.verifier, expectedState: before.state, expectedNonce: before.nonce }))
        .rejects.toSatisfy(isOAuthError('invalid_client'));
      const failures = (await w.audit(since)).filter((a) => a.event === 'failure');
      expect(failures.map((a) => [a.code, a.client_id])).toEqual([['invalid_client', 'procurement'], ['invalid_client', 'procurement']]);
    } finally {
      await w.db.pool.query(`select sso.put_client_enabled('procurement', true)`);
    }
    expect(await sqlstateOf(w.db.pool.query(`select sso.put_client_enabled('no-such-client', false)`))).toBe('EO001');
  });

  it('putting a client\'s enabled flag twice is one change; a null flag is EO029 and changes nothing; the deprecated enable/disable still work', async () => {
    const state = async () => (await w.db.pool.query(`select enabled, disabled_at from sso.client where client_id = 'procurement'`)).rows[0];
    try {
      await w.db.pool.query(`select sso.put_client_enabled('procurement', false)`);
      const disabled = await state();
      expect(disabled.enabled).toBe(false);
      await w.db.pool.query(`select sso.put_client_enabled('procurement', false)`);
      expect(await state()).toEqual(disabled); // the first disabled_at stays
      expect(await sqlstateOf(w.db.pool.query(`select sso.put_client_enabled('procurement', null)`))).toBe('EO029');
      expect(await state()).toEqual(disabled);
      // the names of the previous release (one release, for a rolling restart)
      await w.db.pool.query(`select sso.enable_client('procurement')`);
      expect(await state()).toEqual({ enabled: true, disabled_at: null });
      await w.db.pool.query(`select sso.disable_client('procurement')`);
      expect((await state()).enabled).toBe(false);
    } finally {
      await w.db.pool.query(`select sso.put_client_enabled('procurement', true)`);
    }
    expect(await state()).toEqual({ enabled: true, disabled_at: null });
  });

  it('an unregistered redirect URI is refused on the provider\'s page and never redirected to; bad URIs cannot be registered', async () => {
    const since = await w.lastAuditId();
    const { res } = await authorize(new Browser(), w.rp.config, w.rp.callbackUrl, { redirect: 'http://127.0.0.1:9/steal' });
    expect(res.status).toBe(400);
    expect(res.location).toBeNull();
    expect(res.body).toContain('invalid_redirect_uri');
    expect((await w.audit(since)).map((a) => [a.event, a.code, a.client_id])).toEqual([['failure', 'invalid_redirect_uri', 'procurement']]);
    for (const uri of ['http://platform.example.com/callback', 'https://platform.example.com/cb#frag', 'javascript:alert(1)']) {
      expect(await sqlstateOf(w.db.pool.query(`select sso.register_client('bad-uri', 'x', $1)`, [[uri]]))).toBe('EO003');
    }
  });

  it('an authorization request without PKCE is refused with invalid_request, and a wrong verifier with invalid_grant', async () => {
    const since = await w.lastAuditId();
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const noPkce = await authorize(browser, w.rp.config, w.rp.callbackUrl, { pkce: false });
    const back = new URL(noPkce.res.location!);
    expect(back.searchParams.get('error')).toBe('invalid_request');
    expect(back.searchParams.get('error_description')).toMatch(/PKCE/);

    const ok = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    await expect(oidc.authorizationCodeGrant(w.rp.config, new URL(ok.res.location!), {
      pkceCodeVerifier: oidc.randomPKCECodeVerifier(), expectedState: ok.state, expectedNonce: ok.nonce,
    })).rejects.toMatchObject({ error: 'invalid_grant' });
    const failures = (await w.audit(since)).filter((a) => a.event === 'failure');
    expect(failures.map((a) => [a.code, a.client_id])).toEqual([['invalid_request', 'procurement'], ['invalid_grant', 'procurement']]);
    expect(failures[1]!.user_id).toBe(await w.userId('zhang.wei'));
  });

  it('an authorization code redeemed by several token requests at once gives tokens to exactly one of them, and the reuse revokes its access token', async () => {
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const a = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    const redeem = () => oidc.authorizationCodeGrant(w.rp.config, new URL(a.res.location!), { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce });
    const results = await Promise.allSettled([redeem(), redeem(), redeem()]);
    const won = results.filter((r) => r.status === 'fulfilled');
    expect(won).toHaveLength(1);
    for (const r of results) if (r.status === 'rejected') expect(r.reason).toMatchObject({ error: 'invalid_grant' });
    // a code presented twice may have leaked: what was issued under it no longer opens userinfo
    const tokens = (won[0] as PromiseFulfilledResult<Awaited<ReturnType<typeof redeem>>>).value;
    const sub = tokens.claims()!.sub;
    await expect(oidc.fetchUserInfo(w.rp.config, tokens.access_token, sub)).rejects.toSatisfy(isOAuthError('invalid_token'));
    // while a code redeemed once keeps working
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const b = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    const once = await oidc.authorizationCodeGrant(w.rp.config, new URL(b.res.location!), { pkceCodeVerifier: b.verifier, expectedState: b.state, expectedNonce: b.nonce });
    expect(await oidc.fetchUserInfo(w.rp.config, once.access_token, once.claims()!.sub)).toMatchObject({ sub: once.claims()!.sub });
  });

  it('storage: a code consumed a second time (two instances racing past the provider\'s own check) takes everything issued under its grant with it', async () => {
    await w.db.pool.query(`insert into sso.oidc_payload (model, id, payload, grant_id, expires_at) values
      ('AuthorizationCode', 'race-code', '{"grantId":"race-g1"}', 'race-g1', now() + interval '1 minute'),
      ('AccessToken', 'race-at1', '{"grantId":"race-g1"}', 'race-g1', now() + interval '1 hour'),
      ('Grant', 'race-g1', '{}', null, now() + interval '1 hour'),
      ('AccessToken', 'race-at2', '{"grantId":"race-g2"}', 'race-g2', now() + interval '1 hour'),
      ('Grant', 'race-g2', '{}', null, now() + interval '1 hour')`);
    const codes = new PgAdapter('AuthorizationCode', w.db.pool);
    await codes.consume('race-code');
    // revoked rows stay (marked) until they expire, so the audit can still name their user and client; the provider no longer finds them
    const rows = async () => (await w.db.pool.query(`select id from sso.oidc_payload where id like 'race-%' and revoked_at is null order by id`)).rows.map((r) => r.id);
    expect(await rows()).toEqual(['race-at1', 'race-at2', 'race-code', 'race-g1', 'race-g2']);
    await expect(codes.consume('race-code')).rejects.toMatchObject({ error: 'invalid_grant' });
    expect(await rows()).toEqual(['race-at2', 'race-g2']);
    expect(await new PgAdapter('AccessToken', w.db.pool).find('race-at1')).toBeUndefined();
    expect(await new PgAdapter('AccessToken', w.db.pool).find('race-at2')).toBeDefined();
    await w.db.pool.query(`delete from sso.oidc_payload where id like 'race-%'`);
  });

  it('behind the proxy, the audit keeps the address the proxy saw, not one the browser put in X-Forwarded-For', async () => {
    const port = await freePort();
    const config = loadSsoConfig({ DATABASE_URL: w.db.url, ERP_CLOUD_SSO_ISSUER: w.issuer, ERP_CLOUD_SSO_PORT: String(port), ERP_CLOUD_SSO_PROXY: 'true',
      ERP_CLOUD_VAULT_KEY: w.masterKey, ERP_CLOUD_LOG_LEVEL: 'silent', ERP_CLOUD_SSO_KEY_CHECK_MS: '3600000' });
    const proxied = await startSsoServer({ config, pool: w.db.pool, log: w.log, masterKey: w.masterKey, env: {} });
    try {
      // the browser forged the first entry; our proxy appended the address it really saw
      const headers = { 'x-forwarded-for': '198.51.100.66, 192.0.2.44' };
      const since = await w.lastAuditId();
      expect((await fetch(`${proxied.url}/jump?ticket=not-a-ticket`, { headers })).status).toBe(400);
      const auth = new URL(`${proxied.url}/auth`);
      auth.search = new URLSearchParams({ client_id: 'procurement', redirect_uri: 'http://127.0.0.1:9/steal', response_type: 'code', scope: 'openid' }).toString();
      expect((await fetch(auth, { headers, redirect: 'manual' })).status).toBe(400);
      expect((await w.audit(since)).map((a) => [a.code, a.source_addr])).toEqual([['EO020', '192.0.2.44'], ['invalid_redirect_uri', '192.0.2.44']]);
    } finally {
      await proxied.close();
    }
  });

  it('a wrong client secret is refused with invalid_client, and a rotated secret works at once', async () => {
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const a = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    const wrong = await discoverProvider(w.issuer, 'procurement', 'not-the-secret');
    await expect(oidc.authorizationCodeGrant(wrong, new URL(a.res.location!), { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce }))
      .rejects.toSatisfy(isOAuthError('invalid_client'));
    const other = await w.registerClient('rotating');
    const { rows } = await w.db.pool.query(`select * from sso.rotate_client_secret('rotating')`);
    expect(rows[0].client_secret).not.toBe(other.secret);
    const stored = await w.db.pool.query(`select row_to_json(c)::text like '%' || $1 || '%' as leaked from sso.client c where client_id = 'rotating'`, [rows[0].client_secret]);
    expect(stored.rows[0].leaked).toBe(false);
  });
});

describe('client secret rotation', () => {
  /** A fresh jump and code, exchanged with the given secret for client procurement. */
  async function exchange(secret: string) {
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const a = await authorize(browser, w.rp.config, w.rp.callbackUrl);
    const config = await discoverProvider(w.issuer, 'procurement', secret);
    return oidc.authorizationCodeGrant(config, new URL(a.res.location!), { pkceCodeVerifier: a.verifier, expectedState: a.state, expectedNonce: a.nonce });
  }
  const rotate = async (grace: string) => (await w.db.pool.query(`select client_secret from sso.rotate_client_secret('procurement', $1::interval)`, [grace])).rows[0].client_secret as string;

  it('with a grace period the old secret keeps working until it ends, then only the new one does; without one the old stops at once', async () => {
    try {
      const second = await rotate('1 hour');
      expect(await exchange(w.rpSecret)).toHaveProperty('access_token'); // the platform has not switched yet
      expect(await exchange(second)).toHaveProperty('access_token');
      const status = await w.db.pool.query(`select previous_secret_until > now() + interval '59 minutes' as graced from sso.client_status where client_id = 'procurement'`);
      expect(status.rows[0].graced).toBe(true);
      await w.db.pool.query(`update sso.client set previous_secret_until = now() - interval '1 second' where client_id = 'procurement'`);
      await expect(exchange(w.rpSecret)).rejects.toSatisfy(isOAuthError('invalid_client'));
      expect(await exchange(second)).toHaveProperty('access_token');
      const third = await rotate('0');
      await expect(exchange(second)).rejects.toSatisfy(isOAuthError('invalid_client'));
      expect(await exchange(third)).toHaveProperty('access_token');
      for (const bad of ['8 days', '-1 minute']) {
        expect(await sqlstateOf(w.db.pool.query(`select sso.rotate_client_secret('procurement', $1::interval)`, [bad]))).toBe('EO026');
      }
    } finally {
      await w.db.pool.query(`update sso.client set secret_sha256 = sha256(convert_to($1, 'UTF8')), previous_secret_sha256 = null, previous_secret_until = null
                              where client_id = 'procurement'`, [w.rpSecret]);
    }
  });
});

describe('sign-in started at the platform, sessions and logout', () => {
  it('without a jump and without a session the provider shows "start from the ERP", and going back gives the platform login_required', async () => {
    const since = await w.lastAuditId();
    const browser = new Browser();
    const page = await browser.get(w.rp.loginUrl);
    expect(page.status).toBe(401);
    expect(page.body).toContain('Please start from the ERP');
    expect(page.body).toContain('https://erp.example.com/');
    const abort = /href="(\/interaction\/[^"]+\/abort)"/.exec(page.body)![1]!;
    const answer = JSON.parse((await browser.get(new URL(abort, w.issuer).toString())).body);
    expect(answer).toMatchObject({ error: 'login_required' });
    // the page, then the protocol error the platform received
    expect((await w.audit(since)).map((a) => [a.event, a.code, a.client_id]))
      .toEqual([['failure', 'login_required', 'procurement'], ['failure', 'login_required', 'procurement']]);
  });

  it('after a jump the platform can sign the user in again without a ticket; RP-initiated logout ends the provider session', async () => {
    const browser = new Browser();
    expect((await completeJump(await w.issue('zhang.wei', 'procurement'), browser)).ok).toBe(true);
    const again = JSON.parse((await browser.get(w.rp.loginUrl)).body);
    expect(again).toMatchObject({ ok: true, claims: { sub: await w.userId('zhang.wei') } });

    const since = await w.lastAuditId();
    const confirm = await browser.get(w.rp.logoutUrl);
    expect(confirm.body).toContain('op.logoutForm');
    const done = await browser.confirmLogout(confirm);
    expect(JSON.parse(done.body)).toMatchObject({ logged_out: true });
    expect((await w.audit(since)).map((a) => [a.event, a.client_id, a.user_id])).toEqual([['logout', 'procurement', await w.userId('zhang.wei')]]);
    expect((await browser.get(w.rp.loginUrl)).body).toContain('Please start from the ERP');
  });

  it('a platform login answered from the existing session, without any page of ours, is audited as a login', async () => {
    const browser = new Browser();
    expect((await completeJump(await w.issue('zhang.wei', 'procurement'), browser)).ok).toBe(true);
    const since = await w.lastAuditId();
    expect(JSON.parse((await browser.get(w.rp.loginUrl)).body)).toMatchObject({ ok: true });
    expect((await w.audit(since)).map((a) => [a.event, a.client_id, a.user_id, a.code, a.source_addr]))
      .toEqual([['login', 'procurement', await w.userId('zhang.wei'), 'session', '127.0.0.1']]);
  });

  it('a user deactivated after signing in can no longer pass through the session, nor read userinfo with an earlier token', async () => {
    const browser = new Browser();
    const first = await completeJump(await w.issue('li.na', 'procurement'), browser);
    expect(first.ok).toBe(true);
    const callback = await completeJumpTokens(browser);
    await putLiNa({ active: false });
    try {
      const page = await browser.get(w.rp.loginUrl);
      expect(page.body).toContain('Please start from the ERP');
      await expect(oidc.fetchUserInfo(w.rp.config, callback.access_token, callback.sub)).rejects.toSatisfy(isOAuthError('invalid_token'));
    } finally {
      await putLiNa({ active: true });
    }
  });

  it('a jump for another user replaces the session of the user signed in before', async () => {
    const browser = new Browser();
    expect((await completeJump(await w.issue('zhang.wei', 'procurement'), browser)).claims!.preferred_username).toBe('zhang.wei');
    const second = await completeJump(await w.issue('li.na', 'procurement'), browser);
    expect(second.error_description ?? null).toBeNull();
    expect(second.claims).toMatchObject({ preferred_username: 'li.na', sub: await w.userId('li.na'), scm_role: 'viewer' });
  });
});

describe('the ERP keeps its users current (sso.put_user)', () => {
  const put = (args: unknown[]) => w.db.pool.query(`select sso.put_user($1, $2, $3, $4, $5, $6, $7)::text as id`, args);

  it('a new login gets a new subject id, the same login keeps it whatever else changes, and the next sign-in carries what the ERP put last', async () => {
    const first = (await put(['zhao.lei', '赵磊', 'zhao.lei@example.com', true, 'C001', '华东机电有限公司', 'viewer'])).rows[0].id as string;
    expect(first).toBe(await w.userId('zhao.lei'));
    expect(first).not.toBe(await w.userId('zhang.wei'));
    // the same again changes nothing, not even updated_at
    await w.db.pool.query(`update sso.app_user set updated_at = '2020-01-01T00:00:00Z' where login = 'zhao.lei'`);
    expect((await put(['zhao.lei', '赵磊', 'zhao.lei@example.com', true, 'C001', '华东机电有限公司', 'viewer'])).rows[0].id).toBe(first);
    const stamp = async () => (await w.db.pool.query(`select updated_at > '2020-01-01T00:00:00Z' as moved from sso.app_user where login = 'zhao.lei'`)).rows[0].moved;
    expect(await stamp()).toBe(false);
    expect((await put(['zhao.lei', '赵磊 (采购)', null, true, 'C002', '华南贸易有限公司', 'buyer'])).rows[0].id).toBe(first);
    expect(await stamp()).toBe(true);

    const result = await completeJump(await w.issue('zhao.lei', 'procurement'));
    expect(result.ok).toBe(true);
    expect(result.claims).toMatchObject({ sub: first, name: '赵磊 (采购)', company: 'C002', company_name: '华南贸易有限公司', scm_role: 'buyer' });
    expect(result.claims).not.toHaveProperty('email');
  });

  it('an invalid field is refused with EO028, the message and detail naming the field, and nothing is written', async () => {
    const count = async () => (await w.db.pool.query('select count(*)::int n, max(updated_at) at from sso.app_user')).rows[0];
    const before = await count();
    const cases: Array<[unknown[], string, string]> = [
      [[null, 'X', null, true, null, null, null], 'p_login', 'login'],
      [['has space', 'X', null, true, null, null, null], 'p_login', 'login'],
      [['-leading', 'X', null, true, null, null, null], 'p_login', 'login'],
      [['zhang.wei', null, null, true, null, null, null], 'p_display_name', 'display_name'],
      [['zhang.wei', '  ', null, true, null, null, null], 'p_display_name', 'display_name'],
      [['zhang.wei', '张伟', 'no-at-sign', true, null, null, null], 'p_email', 'email'],
      [['zhang.wei', '张伟', null, null, null, null, null], 'p_active', 'active'],
      [['zhang.wei', '张伟', null, true, null, null, 'Buyer Manager'], 'p_scm_role', 'scm_role'],
    ];
    for (const [args, detail, field] of cases) {
      const err = await put(args).then(() => null, (e: { code?: string; detail?: string; message?: string; hint?: string }) => e);
      expect(err, `put_user(${JSON.stringify(args)})`).toMatchObject({ code: 'EO028', detail });
      expect(err!.message).toContain(field);
      expect(err!.hint).toBeTruthy();
    }
    expect(await count()).toEqual(before);
    expect((await w.db.pool.query(`select display_name, email, scm_role from sso.app_user where login = 'zhang.wei'`)).rows[0])
      .toEqual({ display_name: '张伟', email: 'zhang.wei@example.com', scm_role: 'buyer' });
  });

  it('the ERP and operators may put users, the provider may only read them', async () => {
    const grants = (await w.db.pool.query(`select has_function_privilege('erp_cloud_app', 'sso.put_user(text, text, text, boolean, text, text, text)', 'execute') as app,
                                                  has_function_privilege('erp_cloud_operator', 'sso.put_user(text, text, text, boolean, text, text, text)', 'execute') as operator,
                                                  has_function_privilege('erp_cloud_sso', 'sso.put_user(text, text, text, boolean, text, text, text)', 'execute') as sso,
                                                  has_table_privilege('erp_cloud_sso', 'sso.app_user', 'select') as sso_reads,
                                                  has_table_privilege('erp_cloud_sso', 'sso.app_user', 'update') as sso_writes`)).rows[0];
    expect(grants).toEqual({ app: true, operator: true, sso: false, sso_reads: true, sso_writes: false });
    await rolledBack(w.db.pool, async (c) => {
      await c.query('set local role erp_cloud_operator');
      const id = (await c.query(`select sso.put_user('ops.test', 'Ops')::text as id`)).rows[0].id;
      expect((await c.query(`select id::text from sso.app_user where login = 'ops.test'`)).rows).toEqual([{ id }]);
    });
  });
});

describe('the sso schema', () => {
  it('bad registrations and jump requests are refused with their own SQLSTATE', async () => {
    const q = (sql: string, params: unknown[] = []) => w.db.pool.query(sql, params);
    expect(await sqlstateOf(q(`select sso.register_client('Bad Id', 'x', array['https://x.example.com/cb'])`))).toBe('EO004');
    expect(await sqlstateOf(q(`select sso.register_client('no-name', ' ', array['https://x.example.com/cb'])`))).toBe('EO004');
    expect(await sqlstateOf(q(`select sso.register_client('no-uris', 'x', '{}')`))).toBe('EO003');
    expect(await sqlstateOf(q(`select sso.register_client('procurement', 'x', array['https://x.example.com/cb'])`))).toBe('EO002');
    await q(`select sso.register_client('no-login-uri', 'x', array['https://x.example.com/cb'])`);
    expect(await sqlstateOf(w.issue('zhang.wei', 'no-login-uri'))).toBe('EO008');
    expect(await sqlstateOf(w.issue('zhang.wei', 'procurement', { ttl: '1 hour' }))).toBe('EO010');
    expect(await sqlstateOf(w.issue('zhang.wei', 'no-such-client'))).toBe('EO001');
    await rolledBack(w.db.pool, async (client) => {
      await client.query(`delete from sso.setting where name = 'issuer'`);
      expect(await sqlstateOf(client.query(`select sso.issue_jump_ticket('zhang.wei', 'procurement')`))).toBe('EO011');
    });
    expect(await sqlstateOf(q(`select sso.schedule_signing_key('kid-12345', '{"kty":"RSA","d":"private"}')`))).toBe('EO010');
  });

  it('the ERP role may only issue tickets; the provider role keeps its storage and no vault secret', async () => {
    const q = (s: string) => w.db.pool.query(s);
    const app = (await q(`select has_function_privilege('erp_cloud_app', 'sso.issue_jump_ticket(text, text, inet, interval)', 'execute') as issue,
                                 has_function_privilege('erp_cloud_app', 'sso.consume_jump_ticket(text, text, inet, text)', 'execute') as consume,
                                 has_table_privilege('erp_cloud_app', 'sso.jump_ticket', 'select') as tickets,
                                 has_table_privilege('erp_cloud_app', 'sso.audit', 'select') as audit,
                                 has_table_privilege('erp_cloud_sso', 'sso.oidc_payload', 'insert') as sso_storage,
                                 has_function_privilege('erp_cloud_sso', 'vault.read_secret(text, text)', 'execute')
                                   or has_function_privilege('erp_cloud_sso', 'vault.put_secret(text, text, text, text)', 'execute') as sso_vault,
                                 has_function_privilege('erp_cloud_sso', 'vault.rekey_secrets(text, text)', 'execute') as sso_rekey`)).rows[0];
    expect(app).toEqual({ issue: true, consume: false, tickets: false, audit: false, sso_storage: true, sso_vault: false, sso_rekey: false });
  });
});
