/**
 * The provider's keys. ID-token signing keys: the public half and the
 * rotation schedule live in sso.signing_key; the private halves live in
 * System_Vault as one secret, sso.signing_keys (a JSON object kid → private
 * JWK), encrypted under the vault master key like every other secret. Because
 * the vault keeps no old values, a retired key is really gone. Cookie keys
 * (signing the provider's session cookies) are the vault secret
 * sso.cookie_keys (comma-separated, newest first), or ERP_CLOUD_SECRET_SSO_COOKIE_KEYS.
 *
 * Every change (first key, rotation, retirement) runs in one transaction
 * under sso.lock_signing_keys(), so instances and the CLI never race.
 */
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import type pg from 'pg';
import { secretEnvName } from '../kernel/vault.js';
import { inTransaction } from '../kernel/db.js';
import { SqlState } from '../kernel/errors.js';

export const SIGNING_KEYS_SECRET = 'sso.signing_keys';
export const COOKIE_KEYS_SECRET = 'sso.cookie_keys';

export const keySql = {
  lock: 'select sso.lock_signing_keys()',
  schedule: 'select * from sso.schedule_signing_key($1, $2, make_interval(secs => $3), make_interval(secs => $4), $5)',
  at: 'select * from sso.signing_keys_at($1)',
  retire: 'select k as kid from sso.retire_signing_keys($1) k',
  // the vault, limited to secrets named sso.* (migration 0009)
  readVault: 'select sso.read_vault_secret($1, $2) as value',
  putVault: 'select * from sso.put_vault_secret($1, $2, $3, $4)',
} as const;

export type Jwk = Record<string, string>;

export interface KeyState {
  kid: string;
  alg: string;
  state: 'published' | 'signing' | 'verifying';
  public_jwk: Jwk;
  signs_from: Date;
  signs_until: Date | null;
  verify_until: Date | null;
}

export interface SigningKeys {
  /** Private JWKs in the order the provider needs: the signing key first. */
  jwks: Jwk[];
  states: KeyState[];
  /** Changes whenever the published set or the signing key changes. */
  fingerprint: string;
  /** The next moment the set changes by itself (a scheduled key starts signing, an old one retires). */
  nextChange: Date | null;
}

/** A vault secret's value, or null when there is none yet (inside the caller's transaction, hence the savepoint). */
async function readVault(c: pg.ClientBase, name: string, masterKey: string): Promise<string | null> {
  await c.query('savepoint sso_read_vault');
  try {
    const { rows } = await c.query<{ value: string }>(keySql.readVault, [name, masterKey]);
    await c.query('release savepoint sso_read_vault');
    return rows[0]!.value;
  } catch (err) {
    await c.query('rollback to savepoint sso_read_vault');
    if ((err as { code?: string }).code === SqlState.secretNotFound) return null;
    throw err;
  }
}

async function putVault(c: pg.ClientBase, name: string, value: string, masterKey: string, description: string): Promise<void> {
  await c.query(keySql.putVault, [name, value, masterKey, description]);
}

async function readPrivateKeys(c: pg.ClientBase, masterKey: string): Promise<Record<string, Jwk>> {
  const text = await readVault(c, SIGNING_KEYS_SECRET, masterKey);
  return text === null ? {} : (JSON.parse(text) as Record<string, Jwk>);
}

async function writePrivateKeys(c: pg.ClientBase, keys: Record<string, Jwk>, masterKey: string): Promise<void> {
  await putVault(c, SIGNING_KEYS_SECRET, JSON.stringify(keys), masterKey, 'Private halves of the SSO ID-token signing keys (kid -> JWK); managed by erp-cloud sso');
}

/** A new RS256 key pair as JWKs; the kid is the RFC 7638 thumbprint of the public key. */
export function generateSigningKey(): { kid: string; privateJwk: Jwk; publicJwk: Jwk } {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' }) as Jwk;
  const kid = createHash('sha256').update(JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n })).digest('base64url');
  const common = { kid, alg: 'RS256', use: 'sig' };
  return { kid, privateJwk: { ...jwk, ...common }, publicJwk: { kty: jwk.kty!, n: jwk.n!, e: jwk.e!, ...common } };
}

async function addKey(c: pg.ClientBase, masterKey: string, publishLeadS: number, tokenLifetimeS: number, now: Date): Promise<KeyState> {
  const key = generateSigningKey();
  const { rows } = await c.query(keySql.schedule, [key.kid, key.publicJwk, publishLeadS, tokenLifetimeS, now]);
  const privateKeys = await readPrivateKeys(c, masterKey);
  privateKeys[key.kid] = key.privateJwk;
  await writePrivateKeys(c, privateKeys, masterKey);
  return { ...rows[0], state: rows[0].signs_from > now ? 'published' : 'signing' } as KeyState;
}

/** First start: a signing key when there is none. Returns true when it made one. */
export async function ensureSigningKey(pool: pg.Pool, masterKey: string, now = new Date()): Promise<boolean> {
  return inTransaction(pool, async (c) => {
    await c.query(keySql.lock);
    const { rows } = await c.query<KeyState>(keySql.at, [now]);
    // any key at all will do: with only a published one (clocks apart across
    // instances), that one signs until the schedule catches up
    if (rows.length) return false;
    await addKey(c, masterKey, 0, 0, now);
    return true;
  });
}

/**
 * Rotation: a new key, published now, signing after publishLeadS; the current
 * key stays in the JWKS for tokenLifetimeS after it stops signing. EO009 when
 * a rotation is already pending.
 */
export async function rotateSigningKey(pool: pg.Pool, masterKey: string, opts: { publishLeadS: number; tokenLifetimeS: number; now?: Date }): Promise<KeyState> {
  return inTransaction(pool, async (c) => {
    await c.query(keySql.lock);
    return addKey(c, masterKey, opts.publishLeadS, opts.tokenLifetimeS, opts.now ?? new Date());
  });
}

/**
 * The keys as of `now`: retires keys whose tokens have all expired (dropping
 * their private halves from the vault in the same transaction), then returns
 * the JWKS in signing order.
 */
export async function loadSigningKeys(pool: pg.Pool, masterKey: string, now = new Date()): Promise<SigningKeys> {
  return inTransaction(pool, async (c) => {
    await c.query(keySql.lock);
    const retired = (await c.query<{ kid: string }>(keySql.retire, [now])).rows.map((r) => r.kid);
    const privateKeys = await readPrivateKeys(c, masterKey);
    if (retired.length) {
      for (const kid of retired) delete privateKeys[kid];
      await writePrivateKeys(c, privateKeys, masterKey);
    }
    const states = (await c.query<KeyState>(keySql.at, [now])).rows;
    const jwks = states.map((s) => {
      const jwk = privateKeys[s.kid];
      if (!jwk) throw new Error(`signing key ${s.kid} is in sso.signing_key but its private half is missing from vault secret ${SIGNING_KEYS_SECRET}`);
      return jwk;
    });
    const boundaries = states.flatMap((s) => [s.signs_from, s.signs_until, s.verify_until])
      .filter((d): d is Date => d !== null && d.getTime() > now.getTime())
      .sort((a, b) => a.getTime() - b.getTime());
    return {
      jwks,
      states,
      fingerprint: states.map((s) => `${s.kid}:${s.state}`).join(','),
      nextChange: boundaries[0] ?? null,
    };
  });
}

/** The cookie keys: ERP_CLOUD_SECRET_SSO_COOKIE_KEYS, else the vault secret (made on first start). Newest first. */
export async function loadCookieKeys(pool: pg.Pool, masterKey: string, env: NodeJS.ProcessEnv = process.env): Promise<string[]> {
  const split = (v: string) => v.split(',').map((s) => s.trim()).filter(Boolean);
  const fromEnv = env[secretEnvName(COOKIE_KEYS_SECRET)];
  if (fromEnv) return split(fromEnv);
  return inTransaction(pool, async (c) => {
    await c.query(keySql.lock);
    const stored = await readVault(c, COOKIE_KEYS_SECRET, masterKey);
    if (stored !== null) return split(stored);
    const key = randomBytes(32).toString('base64url');
    await putVault(c, COOKIE_KEYS_SECRET, key, masterKey, 'Keys signing the SSO provider cookies, newest first, comma-separated; prepend a new one to rotate');
    return [key];
  });
}
