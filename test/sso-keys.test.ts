/**
 * The provider's keys and storage: signing keys rotate without breaking a
 * token (published before they sign, kept until their tokens expire, private
 * halves only in the vault), and the provider keeps working across a restart
 * because sessions, interactions and grants live in PostgreSQL.
 */
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import * as oidc from 'openid-client';
import pg from 'pg';
import { loadSsoConfig } from '../listener/sso/config.js';
import { startSsoServer } from '../listener/sso/sso-server.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Browser, completeJump, startDemoRp } from '../listener/sim/demo-rp.js';
import { rotateSigningKey, SIGNING_KEYS_SECRET } from '../listener/sso/keys.js';
import { sqlstateOf } from './helpers/db.js';
import { discoverProvider, freePort, kidOf, startSsoWorld, verifiesAgainstJwks, type SsoWorld } from './helpers/sso.js';

let w: SsoWorld;
beforeAll(async () => {
  w = await startSsoWorld('sso_keys');
});
afterAll(async () => {
  await w?.close();
});

async function jwksKids(): Promise<string[]> {
  return ((await (await fetch(`${w.issuer}/jwks`)).json()) as { keys: Array<{ kid: string }> }).keys.map((k) => k.kid);
}

async function vaultKids(): Promise<string[]> {
  const { rows } = await w.db.pool.query('select vault.read_secret($1, $2) as v', [SIGNING_KEYS_SECRET, w.masterKey]);
  return Object.keys(JSON.parse(rows[0].v)).sort();
}

/** The platform's relying party, pointed at another provider instance (same client, same callback port is taken: a new one is not needed). */
async function startDemoRpFor(issuer: string) {
  const port = Number(new URL(w.rp.url).port);
  await w.rp.close();
  const rp = await startDemoRp({ issuer, clientId: 'procurement', clientSecret: w.rpSecret, port });
  return {
    async close() {
      await rp.close();
      w.rp = await startDemoRp({ issuer: w.issuer, clientId: 'procurement', clientSecret: w.rpSecret, port });
    },
  };
}

/** The relying party as it is after its JWKS cache expired: the same platform, restarted with an empty cache. */
async function renewRpJwksCache(): Promise<void> {
  const port = Number(new URL(w.rp.url).port);
  await w.rp.close();
  w.rp = await startDemoRp({ issuer: w.issuer, clientId: 'procurement', clientSecret: w.rpSecret, port });
}

async function jumpIdToken(): Promise<string> {
  const r = await completeJump(await w.issue('zhang.wei', 'procurement'));
  expect(r.error_description ?? null).toBeNull();
  return r.id_token!;
}

describe('signing keys', () => {
  it('the first key was made on first start; its private half is only in the vault, encrypted', async () => {
    const { rows } = await w.db.pool.query(`select kid, state, public_jwk from sso.signing_key_status`);
    expect(rows).toHaveLength(1);
    expect(rows[0].state).toBe('signing');
    expect(Object.keys(rows[0].public_jwk).sort()).toEqual(['alg', 'e', 'kid', 'kty', 'n', 'use']);
    expect(await vaultKids()).toEqual([rows[0].kid]);
    const raw = await w.db.pool.query(`select position(convert_to($1, 'UTF8') in ciphertext) as at from vault.secret where name = $2`, ['"d":', SIGNING_KEYS_SECRET]);
    expect(raw.rows[0].at).toBe(0);
  });

  it('tokens keep verifying across a rotation: the new key is published before it signs, the old one stays until its tokens expire', async () => {
    const [first] = await jwksKids();
    const t1 = await jumpIdToken();
    expect(kidOf(t1)).toBe(first);

    const next = await rotateSigningKey(w.db.pool, w.masterKey, { publishLeadS: 600, tokenLifetimeS: 3600 });
    expect(await sqlstateOf(rotateSigningKey(w.db.pool, w.masterKey, { publishLeadS: 600, tokenLifetimeS: 3600 }))).toBe('EO009');
    expect(await w.op.refreshKeys()).toBe(true);
    // published, not signing yet
    expect(await jwksKids()).toEqual([first, next.kid]);
    const t2 = await jumpIdToken();
    expect(kidOf(t2)).toBe(first);

    // the publish lead has passed: the new key signs, the old one still verifies.
    // The platform's JWKS cache (openid-client keeps one at most 5 minutes)
    // has renewed within that lead: a fresh relying party stands for it
    w.clock.offsetMs = 601_000;
    await renewRpJwksCache();
    expect(await w.op.refreshKeys()).toBe(true);
    expect(await jwksKids()).toEqual([next.kid, first]);
    const t3 = await jumpIdToken();
    expect(kidOf(t3)).toBe(next.kid);
    for (const t of [t1, t2, t3]) expect(await verifiesAgainstJwks(t, w.issuer)).toBe(true);

    // the old key's tokens have all expired: it leaves the JWKS and the vault
    w.clock.offsetMs = 601_000 + 3_601_000;
    expect(await w.op.refreshKeys()).toBe(true);
    expect(await jwksKids()).toEqual([next.kid]);
    expect(await vaultKids()).toEqual([next.kid]);
    expect(await verifiesAgainstJwks(t3, w.issuer)).toBe(true);
    expect(await verifiesAgainstJwks(t1, w.issuer)).toBe(false);
    expect((await w.db.pool.query(`select kid, state from sso.signing_keys_at(now() + interval '4202 seconds')`)).rows).toEqual([{ kid: next.kid, state: 'signing' }]);
  });
});

describe('restart', () => {
  it('a sign-in started on one provider instance finishes on a new one, and the session carries on there', async () => {
    const browser = new Browser();
    const hop = await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: `${w.issuer}/interaction/` });
    expect(hop.location).toMatch(/\/interaction\/[A-Za-z0-9_-]+$/);

    // the first instance goes away; a new one starts on the same database (and address)
    await w.op.close();
    w.op = await w.startOp();

    const done = JSON.parse((await browser.get(hop.location!)).body);
    expect(done).toMatchObject({ ok: true, claims: { preferred_username: 'zhang.wei', iss: w.issuer } });
    // the session made before is known to the new instance: no ticket needed
    const again = JSON.parse((await browser.get(w.rp.loginUrl)).body);
    expect(again).toMatchObject({ ok: true, claims: { preferred_username: 'zhang.wei' } });
    const stored = await w.db.pool.query(`select model, count(*)::int n from sso.oidc_payload where model in ('Session', 'Grant', 'AuthorizationCode') group by 1 order by 1`);
    expect(stored.rows.map((r) => r.model)).toEqual(['AuthorizationCode', 'Grant', 'Session']);
  });

  it('two instances serve one issuer side by side: a sign-in started on one finishes on the other', async () => {
    const port = await freePort();
    const config = loadSsoConfig({ DATABASE_URL: w.db.url, ERP_CLOUD_SSO_ISSUER: w.issuer, ERP_CLOUD_SSO_PORT: String(port), ERP_CLOUD_VAULT_KEY: w.masterKey, ERP_CLOUD_LOG_LEVEL: 'silent' });
    const second = await startSsoServer({ config, pool: w.db.pool, log: w.log, masterKey: w.masterKey, env: {} });
    try {
      const browser = new Browser();
      const hop = await browser.get(await w.issue('li.na', 'procurement'), { stopAt: `${w.issuer}/interaction/` });
      // the load balancer sends the next request to the other instance
      const elsewhere = hop.location!.replace(w.issuer, second.url);
      const done = JSON.parse((await browser.get(elsewhere)).body);
      expect(done).toMatchObject({ ok: true, claims: { preferred_username: 'li.na', iss: w.issuer } });
    } finally {
      await second.close();
    }
  });

  it('an authorization code is single use, also across instances', async () => {
    const browser = new Browser();
    await browser.get(await w.issue('zhang.wei', 'procurement'), { stopAt: w.rp.loginUrl });
    const config = await discoverProvider(w.issuer, 'procurement', w.rpSecret);
    const verifier = oidc.randomPKCECodeVerifier();
    const state = oidc.randomState();
    const url = oidc.buildAuthorizationUrl(config, {
      redirect_uri: w.rp.callbackUrl, scope: 'openid', state,
      code_challenge: await oidc.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256',
    });
    const back = new URL((await browser.get(url.toString(), { stopAt: w.rp.callbackUrl })).location!);
    await oidc.authorizationCodeGrant(config, back, { pkceCodeVerifier: verifier, expectedState: state });
    await w.op.close();
    w.op = await w.startOp();
    const since = await w.lastAuditId();
    await expect(oidc.authorizationCodeGrant(config, back, { pkceCodeVerifier: verifier, expectedState: state })).rejects.toMatchObject({ error: 'invalid_grant' });
    expect((await w.audit(since)).map((a) => [a.event, a.code])).toEqual([['failure', 'invalid_grant']]);
  });
});

describe('erp-cloud sso serve', () => {
  const cli = (args: string[], env: Record<string, string>) => promisify(execFile)(process.execPath, ['dist/listener/cli.js', ...args], {
    env: { PATH: process.env.PATH, DATABASE_URL: w.db.url, ...env },
  }).then(() => ({ code: 0, stderr: '' }), (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }));

  it('refuses a bad issuer or a missing vault key, naming the variable and never the key', async () => {
    const badIssuer = await cli(['sso', 'serve'], { ERP_CLOUD_SSO_ISSUER: 'https://sso.example.com/', ERP_CLOUD_VAULT_KEY: w.masterKey });
    expect(badIssuer.code).toBe(1);
    expect(badIssuer.stderr).toContain('ERP_CLOUD_SSO_ISSUER');
    expect(badIssuer.stderr).not.toContain(w.masterKey);
    const noKey = await cli(['sso', 'serve'], { ERP_CLOUD_SSO_ISSUER: 'https://sso.example.com' });
    expect(noKey).toMatchObject({ code: 1, stderr: expect.stringContaining('ERP_CLOUD_VAULT_KEY') });
  });

  it('serves discovery for its issuer and stops cleanly on SIGTERM', async () => {
    const proc = spawn(process.execPath, ['dist/listener/cli.js', 'sso', 'serve'], {
      env: { PATH: process.env.PATH, DATABASE_URL: w.db.url, ERP_CLOUD_SSO_ISSUER: 'https://sso.erp.example.com', ERP_CLOUD_SSO_PORT: '0',
        ERP_CLOUD_VAULT_KEY: w.masterKey, ERP_CLOUD_LOG_LEVEL: 'warn' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    proc.stdout!.on('data', (d) => (out += d));
    proc.stderr!.on('data', (d) => (err += d));
    const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
    try {
      const deadline = Date.now() + 20_000;
      while (!out.includes('"url"') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(out, err).toContain('"url"');
      const { url, issuer } = JSON.parse(out.split('\n')[0]!) as { url: string; issuer: string };
      expect(issuer).toBe('https://sso.erp.example.com');
      const meta = await (await fetch(`${url}/.well-known/openid-configuration`)).json();
      // endpoint URLs follow the request's host (the proxy forwards the public one)
      expect(meta).toMatchObject({ issuer, jwks_uri: `${url}/jwks`, end_session_endpoint: `${url}/session/end`, code_challenge_methods_supported: ['S256'] });
    } finally {
      proc.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
  });
});

describe('roles', () => {
  it('the provider runs, purges and rotates keys as a login holding only erp_cloud_sso (its own vault secrets only), the ERP issues tickets with only erp_cloud_app at the database\'s clock, operators manage clients through the URI-checking functions with only erp_cloud_operator', async () => {
    const suffix = Math.random().toString(36).slice(2, 8);
    const ssoLogin = `sso_login_${suffix}`;
    const erpLogin = `erp_login_${suffix}`;
    const opLogin = `op_login_${suffix}`;
    await w.db.pool.query(`create role ${ssoLogin} login in role erp_cloud_sso`);
    await w.db.pool.query(`create role ${erpLogin} login in role erp_cloud_app`);
    await w.db.pool.query(`create role ${opLogin} login in role erp_cloud_operator`);
    const as = (role: string) => {
      const u = new URL(w.db.url);
      u.username = role;
      return new pg.Pool({ connectionString: u.toString(), max: 4 });
    };
    const ssoPool = as(ssoLogin);
    const erpPool = as(erpLogin);
    const opPool = as(opLogin);
    const port = await freePort();
    const config = loadSsoConfig({ DATABASE_URL: w.db.url, ERP_CLOUD_SSO_ISSUER: `http://127.0.0.1:${port}`, ERP_CLOUD_SSO_PORT: String(port), ERP_CLOUD_VAULT_KEY: w.masterKey, ERP_CLOUD_LOG_LEVEL: 'silent' });
    const provider = await startSsoServer({ config, pool: ssoPool, log: w.log, masterKey: w.masterKey, env: {} });
    const rp = await startDemoRpFor(`http://127.0.0.1:${port}`);
    try {
      expect(await provider.refreshKeys()).toBe(false);
      const { rows } = await erpPool.query(`select sso.issue_jump_ticket('zhang.wei', 'procurement') as url`);
      const result = await completeJump(rows[0].url);
      expect(result.error_description ?? null).toBeNull();
      expect(result.claims).toMatchObject({ preferred_username: 'zhang.wei', iss: `http://127.0.0.1:${port}` });
      expect(await sqlstateOf(erpPool.query('select * from sso.audit'))).toBe('42501');
      expect(await sqlstateOf(erpPool.query(`select * from sso.consume_jump_ticket('x', 'procurement')`))).toBe('42501');
      // the ERP cannot choose the ticket's clock (a lifetime or audit time of its own)
      expect(await sqlstateOf(erpPool.query(`select sso.issue_jump_ticket('zhang.wei', 'procurement', null, '60 seconds', now() + interval '1 day')`))).toBe('42883');

      // operators manage clients through the functions, which check every URI; no raw writes
      const reg = await opPool.query(`select * from sso.register_client('op-client', 'Operator''s client', array['https://op.example.com/cb'])`);
      expect(reg.rows[0].client_secret).toMatch(/^[A-Za-z0-9_-]{43}$/);
      await opPool.query(`select sso.put_client_uris('op-client', array['https://op.example.com/cb2'], '{}', 'https://op.example.com/login')`);
      expect((await opPool.query(`select redirect_uris, initiate_login_uri from sso.client_status where client_id = 'op-client'`)).rows[0])
        .toEqual({ redirect_uris: ['https://op.example.com/cb2'], initiate_login_uri: 'https://op.example.com/login' });
      expect(await sqlstateOf(opPool.query(`select sso.put_client_uris('op-client', array['javascript:alert(1)'], '{}', null)`))).toBe('EO003');
      expect(await sqlstateOf(opPool.query(`update sso.client set redirect_uris = array['http://evil.example.com/cb'] where client_id = 'op-client'`))).toBe('42501');
      expect(await sqlstateOf(opPool.query(`insert into sso.client (client_id, display_name, redirect_uris, secret_sha256) values ('raw', 'x', array['http://evil.example.com/'], '\\x00')`))).toBe('42501');
      // even the owner's raw writes pass the URI check
      expect(await sqlstateOf(w.db.pool.query(`update sso.client set initiate_login_uri = 'http://evil.example.com/' where client_id = 'op-client'`))).toBe('EO003');
      await opPool.query(`select sso.put_client_enabled('op-client', false)`);

      // signing keys change only with their private halves: operators read the schedule, the provider's login rotates
      expect((await opPool.query('select count(*)::int n from sso.signing_key_status')).rows[0].n).toBeGreaterThan(0);
      expect(await sqlstateOf(opPool.query(`update sso.signing_key set signs_until = now()`))).toBe('42501');
      expect(await sqlstateOf(opPool.query(`select sso.schedule_signing_key('kid-op-12345', '{"kty":"RSA","n":"x","e":"AQAB"}')`))).toBe('42501');
      const later = new Date(Date.now() + 10_000_000);
      expect(await sqlstateOf(rotateSigningKey(opPool, w.masterKey, { publishLeadS: 60, tokenLifetimeS: 60, now: later }))).toBe('42501');
      // the rotation keeps the retiring key as long as the servers' recorded ID-token lifetime (3600 s), not the 60 s asked
      expect((await ssoPool.query(`select value from sso.setting where name = 'id_token_ttl_s'`)).rows[0].value).toBe('3600');
      const rotated = await rotateSigningKey(ssoPool, w.masterKey, { publishLeadS: 60, tokenLifetimeS: 60, now: later });
      const kept = await ssoPool.query(`select extract(epoch from verify_until - signs_until)::int s from sso.signing_key where signs_until = $1`, [rotated.signs_from]);
      expect(kept.rows).toEqual([{ s: 3600 }]);

      // the provider's vault: only its own sso.* secrets
      await w.db.pool.query(`select vault.put_secret('nuonuo.app_secret', 'another-service-secret', $1)`, [w.masterKey]);
      expect(await sqlstateOf(ssoPool.query(`select sso.read_vault_secret('nuonuo.app_secret', $1)`, [w.masterKey]))).toBe('EO012');
      expect(await sqlstateOf(ssoPool.query(`select sso.put_vault_secret('nuonuo.app_secret', 'overwritten', $1)`, [w.masterKey]))).toBe('EO012');
      expect(await sqlstateOf(ssoPool.query(`select vault.read_secret('nuonuo.app_secret', $1)`, [w.masterKey]))).toBe('42501');
      expect(await sqlstateOf(ssoPool.query(`select vault.put_secret('sso.signing_keys', '{}', $1)`, [w.masterKey]))).toBe('42501');
      expect(Object.keys(JSON.parse((await ssoPool.query(`select sso.read_vault_secret('sso.signing_keys', $1) as v`, [w.masterKey])).rows[0].v)))
        .toContain(rotated.kid);

      // the provider appends to the audit only through sso.audit_event, at the database's time: no backdated rows
      expect(await sqlstateOf(ssoPool.query(`insert into sso.audit (at, event, login) values (now() - interval '1 year', 'login', 'zhang.wei')`))).toBe('42501');
      expect(await sqlstateOf(ssoPool.query(`update sso.audit set at = now() - interval '1 year'`))).toBe('42501');
      await ssoPool.query(`select sso.audit_event('login', 'procurement', null, null, 'jump', 'recorded-now')`);
      expect((await w.db.pool.query(`select at > now() - interval '1 minute' as fresh from sso.audit where detail = 'recorded-now'`)).rows).toEqual([{ fresh: true }]);

      // the provider's purge removes expired storage and old tickets under its own role
      await w.db.pool.query(`insert into sso.oidc_payload (model, id, payload, expires_at) values
        ('Session', 'purge-old', '{}', now() - interval '1 second'), ('Session', 'purge-live', '{}', now() + interval '1 hour')`);
      const oldTicket = await w.issue('zhang.wei', 'procurement');
      await w.ageTicket(oldTicket, 2 * 86_400);
      const liveTicket = await w.issue('zhang.wei', 'procurement');
      const purged = await ssoPool.query('select sso.purge_expired() as n');
      expect(purged.rows[0].n).toBeGreaterThanOrEqual(2);
      expect((await w.db.pool.query(`select id from sso.oidc_payload where id like 'purge-%'`)).rows).toEqual([{ id: 'purge-live' }]);
      const tickets = await w.db.pool.query(`select count(*) filter (where ticket_sha256 = sha256(convert_to($1, 'UTF8')))::int old,
                                                    count(*) filter (where ticket_sha256 = sha256(convert_to($2, 'UTF8')))::int live from sso.jump_ticket`,
      [new URL(oldTicket).searchParams.get('ticket'), new URL(liveTicket).searchParams.get('ticket')]);
      expect(tickets.rows[0]).toEqual({ old: 0, live: 1 });

      // the audit keeps a row for the retention (400 days by default, never under 180), then the purge takes it
      await w.db.pool.query(`insert into sso.audit (at, event, login, detail) values
        (now() - interval '401 days', 'login', 'zhang.wei', 'audit-old'), (now() - interval '200 days', 'login', 'zhang.wei', 'audit-kept')`);
      await ssoPool.query('select sso.purge_expired()');
      expect((await w.db.pool.query(`select detail from sso.audit where detail like 'audit-%'`)).rows).toEqual([{ detail: 'audit-kept' }]);
      expect(await sqlstateOf(ssoPool.query(`select sso.purge_expired(interval '30 days')`))).toBe('EO025');
      expect((await w.db.pool.query(`select count(*)::int n from sso.audit where detail = 'audit-kept'`)).rows[0].n).toBe(1);
      await ssoPool.query(`select sso.purge_expired(interval '180 days')`);
      expect((await w.db.pool.query(`select count(*)::int n from sso.audit where detail like 'audit-%'`)).rows[0].n).toBe(0);
      expect(() => loadSsoConfig({ DATABASE_URL: 'postgres://x@127.0.0.1/db', ERP_CLOUD_SSO_ISSUER: 'https://sso.example.com', ERP_CLOUD_SSO_AUDIT_RETENTION_DAYS: '90' }))
        .toThrow(/ERP_CLOUD_SSO_AUDIT_RETENTION_DAYS/);
    } finally {
      await rp.close();
      await provider.close();
      await ssoPool.end();
      await erpPool.end();
      await opPool.end();
      await w.db.pool.query(`select sso.put_issuer($1)`, [w.issuer]);
      await w.db.pool.query(`drop role ${opLogin}`);
      await w.db.pool.query(`drop role ${ssoLogin}`);
      await w.db.pool.query(`drop role ${erpLogin}`);
    }
  });
});
