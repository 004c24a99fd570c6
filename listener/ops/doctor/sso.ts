/** Doctor, 6. SSO (schema sso, erp-cloud sso serve): issuer, signing keys and their private halves, clients, expired storage. */
import type pg from 'pg';
import { loadVaultKey } from '../../kernel/vault.js';
import { errText, iso, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

/** A signing key older than this gets a warning: rotate it (erp-cloud sso rotate-keys). */
const SIGNING_KEY_WARN_DAYS = 365;

interface SsoClientRow { client_id: string; enabled: boolean; redirect_uris: number; initiate_login_uri: string | null }
interface SsoKeyRow { kid: string; state: string; public_jwk: Record<string, unknown>; signs_from: Date; age_days: number }

/**
 * The OpenID Provider's state as the database holds it: issuer recorded, a key
 * that signs with its private half in the vault, clients a jump can reach, and
 * expired storage being purged. Nothing is checked while no client is registered.
 */
export async function checkSso(c: pg.Client, env: NodeJS.ProcessEnv): Promise<CheckLine[]> {
  try {
    if (!(await c.query(q.ssoInstalled)).rows[0].installed) return [];
    const clients = (await c.query<SsoClientRow>(q.ssoClients)).rows;
    if (clients.length === 0) return [line('sso', 'sso.client', 'ok', 'not in use: no client registered')];
    const out: CheckLine[] = [];
    const issuer = (await c.query<{ issuer: string }>(q.ssoIssuer)).rows[0]?.issuer ?? null;
    out.push(ssoIssuerLine(issuer, env.ERP_CLOUD_SSO_ISSUER));
    const keys = (await c.query<SsoKeyRow>(q.ssoSigningKeys)).rows;
    const vault = (await c.query<{ version: number; written_at: Date }>(q.ssoVaultSecret)).rows[0] ?? null;
    out.push(...ssoKeyLines(keys, issuer !== null));
    if (keys.length > 0) out.push(await ssoPrivateKeysLine(c, keys, vault !== null, env));
    for (const cl of clients) out.push(ssoClientLine(cl));
    const stale = (await c.query<{ stale: number | null }>(q.ssoStaleStorage)).rows[0]?.stale ?? null;
    if (stale !== null) {
      out.push(stale === 0
        ? line('sso storage', 'sso.oidc_payload', 'ok', 'no session, code or grant more than an hour past its expiry')
        : line('sso storage', 'sso.oidc_payload', 'warn', `${stale} row(s) more than an hour past expiry: no provider has run sso.purge_expired() lately (is erp-cloud sso serve running?)`));
    }
    return out;
  } catch (err) {
    return [line('sso', 'schema sso', 'fail', errText(err))];
  }
}

function ssoIssuerLine(recorded: string | null, configured: string | undefined): CheckLine {
  if (recorded === null) return line('sso issuer', 'sso.setting', 'warn', 'no issuer recorded: erp-cloud sso serve has not started yet, so jump URLs cannot be built');
  if (configured && configured !== recorded) {
    return line('sso issuer', recorded, 'warn', `ERP_CLOUD_SSO_ISSUER here is ${configured}, but the running provider recorded ${recorded}: relying parties validate the issuer exactly`);
  }
  let host = '';
  try {
    host = new URL(recorded).hostname;
  } catch {
    return line('sso issuer', recorded, 'fail', 'not a URL');
  }
  const loopback = host === 'localhost' || host === '[::1]' || /^127\./.test(host);
  if (recorded.startsWith('http:') && !loopback) {
    return line('sso issuer', recorded, 'fail', 'plain http on a non-loopback host: sessions and codes would cross the network in clear; use https');
  }
  return line('sso issuer', recorded, 'ok', recorded.startsWith('https:') ? 'https' : 'http on loopback (development only)');
}

function ssoKeyLines(keys: SsoKeyRow[], started: boolean): CheckLine[] {
  const signing = keys.find((k) => k.state === 'signing');
  if (!signing) {
    return [line('sso signing key', 'sso.signing_key', started ? 'fail' : 'warn', started
      ? 'no key signs now: ID tokens cannot be issued (erp-cloud sso rotate-keys makes one)'
      : 'none yet: the first erp-cloud sso serve makes one')];
  }
  if (signing.age_days > SIGNING_KEY_WARN_DAYS) {
    return [line('sso signing key', signing.kid, 'warn', `signing for ${signing.age_days} days: rotate it (erp-cloud sso rotate-keys)`)];
  }
  const pending = keys.find((k) => k.state === 'published');
  return [line('sso signing key', signing.kid, 'ok', `signing since ${iso(signing.signs_from)} (${signing.age_days} days)` +
    `${pending ? `; ${pending.kid} published, signs from ${iso(pending.signs_from)}` : ''}; ${keys.length} key(s) in the JWKS`)];
}

/**
 * Every key that signs or will sign has its private half in the vault secret
 * sso.signing_keys. Decrypted and checked kid by kid when this login may read the
 * vault and the vault key is set here; otherwise only the secret's presence is known.
 */
async function ssoPrivateKeysLine(c: pg.Client, keys: SsoKeyRow[], present: boolean, env: NodeJS.ProcessEnv): Promise<CheckLine> {
  const name = 'sso private keys';
  const target = 'vault sso.signing_keys';
  if (!present) return line(name, target, 'fail', 'missing from the vault: the provider cannot sign with the published keys; rotate (erp-cloud sso rotate-keys) to make new ones');
  let key: string | null = null;
  try {
    key = loadVaultKey({ ERP_CLOUD_VAULT_KEY: env.ERP_CLOUD_VAULT_KEY || undefined, ERP_CLOUD_VAULT_KEY_FILE: env.ERP_CLOUD_VAULT_KEY_FILE || undefined }, { optional: true });
  } catch {
    key = null; // the vault key line says what is wrong with it
  }
  const canRead = (await c.query<{ can: boolean }>(q.ssoCanReadVault)).rows[0]?.can ?? false;
  if (key === null || !canRead) {
    return line(name, target, 'warn', `present, not verified: ${key === null ? 'no vault key here (ERP_CLOUD_VAULT_KEY)' : 'this login may not read the vault (vault.read_secret)'}`);
  }
  let stored: unknown;
  try {
    stored = JSON.parse((await c.query<{ value: string }>(q.ssoReadVault, [key])).rows[0]!.value);
  } catch (err) {
    return line(name, target, 'fail', `cannot be read: ${err instanceof SyntaxError ? 'not JSON' : errText(err)}`);
  }
  if (!stored || typeof stored !== 'object' || Array.isArray(stored)) return line(name, target, 'fail', 'cannot be read: not a JSON object of kid -> JWK');
  const privates = stored as Record<string, unknown>;
  const needed = keys.filter((k) => k.state !== 'verifying'); // a key that only verifies no longer signs
  const bad = needed.filter((k) => !privateHalfMatches(privates[k.kid], k.public_jwk)).map((k) => k.kid);
  return bad.length
    ? line(name, target, 'fail', `no private half matching the published key for ${bad.join(', ')}: the provider cannot sign with it; rotate (erp-cloud sso rotate-keys)`)
    : line(name, target, 'ok', `private halves of ${needed.map((k) => k.kid).join(', ')} present, readable and matching the published keys`);
}

/** A private JWK belongs to the published one: it has its private exponent and the same public members (RSA n, e). */
function privateHalfMatches(priv: unknown, pub: Record<string, unknown>): boolean {
  if (!priv || typeof priv !== 'object') return false;
  const p = priv as Record<string, unknown>;
  return typeof p.d === 'string' && p.kty === pub.kty && p.n === pub.n && p.e === pub.e;
}

function ssoClientLine(cl: SsoClientRow): CheckLine {
  if (!cl.enabled) return line('sso client', cl.client_id, 'ok', 'disabled (sso.put_client_enabled(client_id, true) to let it sign in again)');
  if (!cl.initiate_login_uri) {
    return line('sso client', cl.client_id, 'warn', `enabled, ${cl.redirect_uris} redirect URI(s), but no initiate_login_uri: jump tickets for it have nowhere to go (sso.put_client_uris)`);
  }
  return line('sso client', cl.client_id, 'ok', `enabled, ${cl.redirect_uris} redirect URI(s), jumps start at ${cl.initiate_login_uri}`);
}
