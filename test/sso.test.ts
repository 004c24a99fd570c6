/**
 * Single sign-on: an ERP user clicks "open the procurement platform" and lands
 * there signed in. The platform is played by openid-client (listener/sso/demo-rp.ts),
 * the browser by an HTTP client that follows redirects and keeps cookies.
 */
import { createHash } from 'node:crypto';
import * as oidc from 'openid-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Browser, completeJump } from '../listener/sso/demo-rp.js';
import { sqlstateOf } from './helpers/db.js';
import { discoverProvider, startSsoWorld, verifiesAgainstJwks, type SsoWorld } from './helpers/sso.js';

let w: SsoWorld;
beforeAll(async () => {
  w = await startSsoWorld('sso');
});
afterAll(async () => {
  await w?.close();
});

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
