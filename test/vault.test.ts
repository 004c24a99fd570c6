/**
 * System_Vault's promises: values encrypted at rest under a key the database
 * never stores, clear SQLSTATEs for a wrong key or a missing secret, rotation
 * and rekey, who may call what, and the listener side (key loading, the
 * resolver's environment-first lookup and cache, the CLI reading stdin).
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../listener/kernel/config.js';
import { SqlState } from '../listener/kernel/errors.js';
import { loadVaultKey, SecretResolver, SecretUnavailableError, secretEnvName } from '../listener/kernel/vault.js';
import { createTestDb, rolledBack, sqlstateOf, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

const KEY = 'test-master-key-0001-abcdef';
const OTHER_KEY = 'another-master-key-0002-xyz';
const VALUE = 'SDDED2523BED4643-plaintext-value';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('vault');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());
beforeEach(async () => {
  await resetProductState(db.pool);
});

const put = (name: string, value: string | null, key: string | null = KEY, description: string | null = null) =>
  q('select * from vault.put_secret($1, $2, $3, $4)', [name, value, key, description]);
const read = async (name: string, key: string | null = KEY) => (await q<{ v: string }>('select vault.read_secret($1, $2) as v', [name, key])).rows[0]!.v;
const rows = async () => (await q('select name, version, key_id, rotated_at is not null as rotated from vault.secret order by name')).rows;

/** Everything a failed call hands the client (and so a log line built from it): must not contain `needles`. */
async function errorOf(p: Promise<unknown>): Promise<Record<string, unknown>> {
  try {
    await p;
  } catch (err) {
    return { ...(err as object), message: (err as Error).message };
  }
  throw new Error('expected the call to fail');
}

describe('encryption at rest', () => {
  it('a secret put with the master key reads back as the same value', async () => {
    const summary = (await put('nuonuo.app_secret', VALUE, KEY, 'Nuonuo app secret')).rows[0];
    expect(summary).toMatchObject({ name: 'nuonuo.app_secret', version: 1, description: 'Nuonuo app secret' });
    expect(summary.key_id).toMatch(/^[0-9a-f]{12}$/);
    expect(summary).not.toHaveProperty('value');
    expect(await read('nuonuo.app_secret')).toBe(VALUE);
  });

  it('the stored ciphertext does not contain the plaintext, and two puts of one value differ (salted)', async () => {
    await put('a', VALUE);
    await put('b', VALUE);
    const { rows: r } = await q<{ ciphertext: Buffer }>('select ciphertext from vault.secret order by name');
    for (const { ciphertext } of r) {
      expect(ciphertext.includes(Buffer.from(VALUE))).toBe(false);
      expect(ciphertext.includes(Buffer.from(VALUE.slice(0, 8)))).toBe(false);
      expect(ciphertext.includes(Buffer.from(KEY))).toBe(false);
    }
    expect(r[0]!.ciphertext.equals(r[1]!.ciphertext)).toBe(false);
  });

  it('the database never holds the master key, only its 12-digit fingerprint', async () => {
    await put('a', VALUE);
    const dump = JSON.stringify((await q(`select s.*, encode(s.ciphertext, 'escape') as raw from vault.secret s`)).rows);
    expect(dump).not.toContain(KEY);
    const { rows: r } = await q<{ key_id: string }>('select key_id from vault.secret_version');
    expect(r).toHaveLength(1);
    expect(r[0]!.key_id).toMatch(/^[0-9a-f]{12}$/);
  });
});

describe('bad paths carry their own SQLSTATE, write nothing and quote no key or value', () => {
  it('a wrong key is refused with EC021 (not a pgcrypto error)', async () => {
    await put('a', VALUE);
    const err = await errorOf(read('a', OTHER_KEY));
    expect(err.code).toBe(SqlState.vaultKeyMismatch);
    expect(JSON.stringify(err)).not.toContain(OTHER_KEY);
    expect(JSON.stringify(err)).not.toContain(KEY);
  });

  it('a put under a different key than the vault already uses is refused with EC021, so the vault keeps one key', async () => {
    await put('a', VALUE);
    expect(await sqlstateOf(put('b', VALUE, OTHER_KEY))).toBe(SqlState.vaultKeyMismatch);
    expect(await sqlstateOf(put('a', 'new', OTHER_KEY))).toBe(SqlState.vaultKeyMismatch);
    expect(await rows()).toEqual([{ name: 'a', version: 1, key_id: expect.any(String), rotated: false }]);
  });

  it('a missing secret is EC020 for read and rotate', async () => {
    expect(await sqlstateOf(read('nope'))).toBe(SqlState.secretNotFound);
    expect(await sqlstateOf(q('select vault.rotate_secret($1, $2, $3)', ['nope', VALUE, KEY]))).toBe(SqlState.secretNotFound);
    expect(await rows()).toEqual([]);
  });

  it('a missing or short key is EC022, a bad name EC023, an empty value EC024; none of them echo the input', async () => {
    const short = 'short-key-12345'; // 15 characters
    for (const [call, code] of [
      [() => put('a', VALUE, short), SqlState.vaultKeyInvalid],
      [() => put('a', VALUE, null), SqlState.vaultKeyInvalid],
      [() => read('a', short), SqlState.vaultKeyInvalid],
      [() => put('Bad Name!', VALUE), SqlState.invalidSecretName],
      [() => put('a', ''), SqlState.secretValueEmpty],
      [() => put('a', null), SqlState.secretValueEmpty],
    ] as const) {
      const err = await errorOf(call());
      expect(err.code).toBe(code);
      const text = JSON.stringify(err);
      expect(text).not.toContain(short);
      expect(text).not.toContain(VALUE);
      expect(text).not.toContain(KEY);
    }
    expect(await rows()).toEqual([]);
  });

  it('a name that is not one — a value or the key given in its place — is EC023 and never quoted; a missing proper name is EC020 and named', async () => {
    await put('a', VALUE);
    const misplaced = 'Misplaced-Value-7Qx2-not-a-name';
    for (const call of [
      () => put(misplaced, VALUE),                                                             // value where the name belongs
      () => q('select vault.read_secret($1, $2)', [misplaced, KEY]),
      () => q('select vault.read_secret($1, $2)', [KEY, 'nuonuo.app_secret']),                  // name and key swapped: the key looks like a name
      () => q('select vault.rotate_secret($1, $2, $3)', [KEY, VALUE, KEY]),
      () => q('select * from vault.put_secret($1, $2, $3)', [KEY, VALUE, KEY]),
    ]) {
      const err = await errorOf(call());
      expect(err.code).toBe(SqlState.invalidSecretName);
      const text = JSON.stringify(err);
      for (const secret of [misplaced, KEY, VALUE]) expect(text).not.toContain(secret);
      expect(String(err.hint)).toMatch(/name/);
    }
    const missing = await errorOf(read('nope'));
    expect(missing.code).toBe(SqlState.secretNotFound);
    expect(missing.message).toContain('nope');
    expect(await rows()).toEqual([{ name: 'a', version: 1, key_id: expect.any(String), rotated: false }]);
  });

  it('a damaged ciphertext under the right key is EC025, not an internal error', async () => {
    await put('a', VALUE);
    await q(`update vault.secret set ciphertext = substring(ciphertext from 1 for 20) || '\\x00'::bytea`);
    expect(await sqlstateOf(read('a'))).toBe(SqlState.secretUndecryptable);
  });
});

describe('rotation and rekey', () => {
  it('rotate bumps the version, stamps rotated_at, keeps the description, and read returns the new value', async () => {
    await put('a', 'first-value', KEY, 'kept');
    const r = (await q('select * from vault.rotate_secret($1, $2, $3)', ['a', 'second-value', KEY])).rows[0];
    expect(r).toMatchObject({ name: 'a', version: 2, description: 'kept' });
    expect(r.rotated_at).toBeInstanceOf(Date);
    expect(await read('a')).toBe('second-value');
    const again = (await put('a', 'third-value')).rows[0];
    expect(again).toMatchObject({ version: 3, description: 'kept' });
    expect(await read('a')).toBe('third-value');
    const history = (await q('select version, action from vault.secret_version order by version')).rows;
    expect(history).toEqual([{ version: 1, action: 'create' }, { version: 2, action: 'rotate' }, { version: 3, action: 'replace' }]);
    expect(Object.keys((await q('select * from vault.secret_version limit 1')).rows[0])).not.toContain('ciphertext');
  });

  it('rekey re-encrypts every secret under the new key; the old key then fails with EC021', async () => {
    await put('a', 'value-a');
    await put('b', 'value-b');
    const before = (await q<{ key_id: string }>('select distinct key_id from vault.secret')).rows;
    expect((await q('select vault.rekey_secrets($1, $2) as n', [KEY, OTHER_KEY])).rows[0].n).toBe(2);
    expect(await read('a', OTHER_KEY)).toBe('value-a');
    expect(await read('b', OTHER_KEY)).toBe('value-b');
    expect(await sqlstateOf(read('a', KEY))).toBe(SqlState.vaultKeyMismatch);
    const after = (await q<{ key_id: string; version: number; rekeyed: boolean }>(
      'select distinct key_id, version, rekeyed_at is not null as rekeyed from vault.secret')).rows;
    expect(after).toHaveLength(1);
    expect(after[0]!.key_id).not.toBe(before[0]!.key_id);
    expect(after[0]).toMatchObject({ version: 1, rekeyed: true }); // the value did not change
  });

  it('rekey with a wrong old key (EC021) or the same key (EC026) changes nothing', async () => {
    await put('a', VALUE);
    const before = (await q('select ciphertext, key_id from vault.secret')).rows;
    expect(await sqlstateOf(q('select vault.rekey_secrets($1, $2)', [OTHER_KEY, 'third-master-key-0003']))).toBe(SqlState.vaultKeyMismatch);
    expect(await sqlstateOf(q('select vault.rekey_secrets($1, $2)', [KEY, KEY]))).toBe(SqlState.vaultKeyUnchanged);
    expect(await sqlstateOf(q('select vault.rekey_secrets($1, $2)', [KEY, 'too-short']))).toBe(SqlState.vaultKeyInvalid);
    expect((await q('select ciphertext, key_id from vault.secret')).rows).toEqual(before);
  });
});

describe('privileges', () => {
  const as = <T>(role: string, sql: string, params: unknown[] = []) =>
    rolledBack(db.pool, async (c) => {
      await c.query(`set local role ${role}`);
      return (await c.query(sql, params)).rows as T[];
    });

  beforeEach(async () => {
    await put('nuonuo.app_secret', VALUE, KEY, 'd');
  });

  it('the ERP role (erp_cloud_app) cannot read, list or write: 42501', async () => {
    expect(await sqlstateOf(as('erp_cloud_app', 'select vault.read_secret($1, $2)', ['nuonuo.app_secret', KEY]))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_app', 'select * from vault.list_secrets()'))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_app', 'select vault.put_secret($1, $2, $3)', ['x', VALUE, KEY]))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_app', 'select * from vault.secret'))).toBe('42501');
  });

  it('an operator can put, rotate and list but not read a value, not even with the key', async () => {
    expect(await sqlstateOf(as('erp_cloud_operator', 'select vault.read_secret($1, $2)', ['nuonuo.app_secret', KEY]))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_operator', 'select * from vault.secret'))).toBe('42501');
    const listed = await as<{ name: string }>('erp_cloud_operator', 'select * from vault.list_secrets()');
    expect(listed.map((r) => r.name)).toEqual(['nuonuo.app_secret']);
    await expect(as('erp_cloud_operator', 'select vault.put_secret($1, $2, $3)', ['x', VALUE, KEY])).resolves.toHaveLength(1);
    await expect(as('erp_cloud_operator', 'select vault.rotate_secret($1, $2, $3)', ['nuonuo.app_secret', VALUE, KEY])).resolves.toHaveLength(1);
  });

  it('the listener can read a value and nothing else', async () => {
    expect(await as('erp_cloud_listener', 'select vault.read_secret($1, $2) as v', ['nuonuo.app_secret', KEY])).toEqual([{ v: VALUE }]);
    expect(await sqlstateOf(as('erp_cloud_listener', 'select * from vault.list_secrets()'))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_listener', 'select vault.put_secret($1, $2, $3)', ['x', VALUE, KEY]))).toBe('42501');
    expect(await sqlstateOf(as('erp_cloud_listener', 'select * from vault.secret'))).toBe('42501');
  });

  it('the public functions are SECURITY DEFINER with an empty search_path, owned by the nologin vault owner', async () => {
    const { rows: r } = await q(`select p.proname, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner) as owner, r.rolcanlogin
                                   from pg_proc p join pg_roles r on r.oid = p.proowner
                                  where p.pronamespace = 'vault'::regnamespace and p.proname !~ '^_' order by 1`);
    expect(r.map((x) => x.proname)).toEqual(['list_secrets', 'put_secret', 'read_secret', 'rekey_secrets', 'rotate_secret']);
    for (const x of r) expect(x).toMatchObject({ prosecdef: true, proconfig: ['search_path=""'], owner: 'erp_cloud_vault_owner', rolcanlogin: false });
  });
});

describe('list', () => {
  it('list_secrets shows names, versions, key id and dates, never a value or ciphertext', async () => {
    await put('nuonuo.app_secret', VALUE, KEY, 'the app secret');
    await put('yonyou.token', 'another-secret-value');
    const { rows: r, fields } = await q('select * from vault.list_secrets()');
    expect(fields.map((f) => f.name)).toEqual(['name', 'version', 'description', 'key_id', 'created_at', 'rotated_at', 'rekeyed_at']);
    expect(r.map((x) => x.name)).toEqual(['nuonuo.app_secret', 'yonyou.token']);
    const text = JSON.stringify(r);
    expect(text).not.toContain(VALUE);
    expect(text).not.toContain('another-secret-value');
  });
});

describe('the listener side', () => {
  function counting() {
    let n = 0;
    const pool = { query: (...args: unknown[]) => (n++, (db.pool.query as (...a: unknown[]) => unknown)(...args)) } as unknown as pg.Pool;
    return { pool, queries: () => n };
  }

  it('the resolver prefers ERP_CLOUD_SECRET_<NAME> over the vault', async () => {
    await put('nuonuo.app_secret', VALUE);
    const { pool, queries } = counting();
    expect(secretEnvName('nuonuo.app-secret')).toBe('ERP_CLOUD_SECRET_NUONUO_APP_SECRET');
    const r = new SecretResolver({ pool, masterKey: KEY, env: { ERP_CLOUD_SECRET_NUONUO_APP_SECRET: 'from-env' } });
    expect(await r.resolve('nuonuo.app_secret')).toBe('from-env');
    expect(queries()).toBe(0);
    const noEnv = new SecretResolver({ pool, masterKey: KEY, env: {} });
    expect(await noEnv.resolve('nuonuo.app_secret')).toBe(VALUE);
  });

  it('the resolver caches vault values and picks up a rotation once the TTL has passed', async () => {
    await put('a', 'value-1');
    let now = 1_000_000;
    const { pool, queries } = counting();
    const r = new SecretResolver({ pool, masterKey: KEY, env: {}, ttlMs: 60_000, now: () => now });
    expect(await Promise.all([r.resolve('a'), r.resolve('a')])).toEqual(['value-1', 'value-1']);
    expect(queries()).toBe(1); // concurrent lookups share one query
    await q('select vault.rotate_secret($1, $2, $3)', ['a', 'value-2', KEY]);
    now += 59_000;
    expect(await r.resolve('a')).toBe('value-1');
    expect(queries()).toBe(1);
    expect(r.redact('sent value-1 to the cloud')).toBe('sent [redacted] to the cloud');
    now += 2_000;
    expect(await r.resolve('a')).toBe('value-2');
    expect(queries()).toBe(2);
  });

  it('the resolver keeps the vault SQLSTATE for a missing secret and says what to set when there is no key', async () => {
    const r = new SecretResolver({ pool: db.pool, masterKey: KEY, env: {} });
    expect(await sqlstateOf(r.resolve('nope'))).toBe(SqlState.secretNotFound);
    const noKey = new SecretResolver({ pool: db.pool, masterKey: null, env: {} });
    const err = await noKey.resolve('nuonuo.app_secret').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SecretUnavailableError);
    expect((err as Error).message).toContain('ERP_CLOUD_SECRET_NUONUO_APP_SECRET');
  });

  it('loadVaultKey reads a key file without its trailing newline and refuses short, empty or doubly-set keys by variable name', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-vault-'));
    try {
      const file = path.join(dir, 'key');
      writeFileSync(file, `${KEY}\n`, { mode: 0o600 });
      expect(loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: file, ERP_CLOUD_VAULT_KEY: undefined })).toBe(KEY);
      writeFileSync(file, 'short\n');
      expect(() => loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: file, ERP_CLOUD_VAULT_KEY: undefined })).toThrow(/ERP_CLOUD_VAULT_KEY_FILE.*too short/);
      writeFileSync(file, '\n');
      expect(() => loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: file, ERP_CLOUD_VAULT_KEY: undefined })).toThrow(/ERP_CLOUD_VAULT_KEY_FILE.*empty/);
      expect(() => loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: file, ERP_CLOUD_VAULT_KEY: KEY })).toThrow(/both set/);
      expect(() => loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: undefined, ERP_CLOUD_VAULT_KEY: undefined })).toThrow(ConfigError);
      expect(loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: undefined, ERP_CLOUD_VAULT_KEY: undefined }, { optional: true })).toBeNull();
      try {
        loadVaultKey({ ERP_CLOUD_VAULT_KEY_FILE: undefined, ERP_CLOUD_VAULT_KEY: 'tiny-key-123' });
        expect.unreachable();
      } catch (err) {
        expect((err as Error).message).toContain('ERP_CLOUD_VAULT_KEY');
        expect((err as Error).message).not.toContain('tiny-key-123');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a config error for a too-short ERP_CLOUD_VAULT_KEY names the variable and does not print the value', () => {
    const bad = 'sh0rt-k3y-value';
    let message = '';
    try {
      loadConfig({ DATABASE_URL: 'postgres://x@127.0.0.1/db', ERP_CLOUD_VAULT_KEY: bad });
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      message = (err as Error).message;
    }
    expect(message).toContain('ERP_CLOUD_VAULT_KEY');
    expect(message).not.toContain(bad);
    expect(loadConfig({ DATABASE_URL: 'postgres://x@127.0.0.1/db', ERP_CLOUD_VAULT_KEY: KEY }).ERP_CLOUD_SECRET_TTL_MS).toBe(60_000);
  });
});

describe('the CLI', () => {
  function cli(args: string[], opts: { input?: string; env?: Record<string, string> } = {}) {
    const env: NodeJS.ProcessEnv = { ...process.env, ERP_CLOUD_VAULT_KEY: KEY, ...opts.env };
    delete env.ERP_CLOUD_VAULT_KEY_FILE;
    const child = spawn(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'vault', ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.stdin.end(opts.input ?? '');
    return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  }

  it('vault put reads the value from stdin (echo\'s newline dropped) and vault list shows the name, never the value', async () => {
    const put1 = await cli(['put', 'nuonuo.app_secret', '--description', 'Nuonuo app secret'], { input: `${VALUE}\n` });
    expect(put1).toMatchObject({ code: 0 });
    expect(put1.stdout).toContain('stored nuonuo.app_secret (version 1');
    expect(await read('nuonuo.app_secret')).toBe(VALUE);
    const rotated = await cli(['rotate', 'nuonuo.app_secret'], { input: 'rotated-value-42' });
    expect(rotated).toMatchObject({ code: 0 });
    expect(await read('nuonuo.app_secret')).toBe('rotated-value-42');
    const list = await cli(['list']);
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(/nuonuo\.app_secret\s+2\s/);
    expect(list.stdout).toContain('Nuonuo app secret');
    expect(list.stdout + list.stderr).not.toContain(VALUE);
    expect(list.stdout + list.stderr).not.toContain('rotated-value-42');
  });

  it('vault rekey takes the new key from ERP_CLOUD_VAULT_NEW_KEY', async () => {
    await put('a', VALUE);
    const r = await cli(['rekey'], { env: { ERP_CLOUD_VAULT_NEW_KEY: OTHER_KEY } });
    expect(r).toMatchObject({ code: 0 });
    expect(r.stdout).toContain('re-encrypted 1 secret(s)');
    expect(await read('a', OTHER_KEY)).toBe(VALUE);
  });

  it('failures exit 1 with the SQLSTATE or the variable name, never a key or value', async () => {
    const missing = await cli(['rotate', 'nope'], { input: VALUE });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(`[${SqlState.secretNotFound}]`);
    const empty = await cli(['put', 'a'], { input: '' });
    expect(empty.code).toBe(1);
    expect(empty.stderr).toContain(`[${SqlState.secretValueEmpty}]`);
    const short = await cli(['put', 'a'], { input: VALUE, env: { ERP_CLOUD_VAULT_KEY: 'sh0rt-k3y-value' } });
    expect(short.code).toBe(1);
    expect(short.stderr).toContain('ERP_CLOUD_VAULT_KEY');
    expect(short.stderr).not.toContain('sh0rt-k3y-value');
    const noNewKey = await cli(['rekey'], { env: { ERP_CLOUD_VAULT_NEW_KEY: '' } });
    expect(noNewKey.code).toBe(1);
    expect(noNewKey.stderr).toContain('ERP_CLOUD_VAULT_NEW_KEY');
    for (const r of [missing, empty, short, noNewKey]) {
      expect(r.stderr).not.toContain(VALUE);
      expect(r.stderr).not.toContain(KEY);
    }
    expect(await rows()).toEqual([]);
  });
});
