/**
 * System_Vault from the listener's side: the master key (from the environment
 * or a key file) and SecretResolver, which turns a secret's name into its
 * value: the environment first (ERP_CLOUD_SECRET_<NAME>, the twelve-factor
 * path), else vault.read_secret, cached for a short TTL so a rotation is
 * picked up without a restart. Nothing here logs a value; the key and values
 * go to PostgreSQL only as bind parameters.
 */
import { readFileSync } from 'node:fs';
import type pg from 'pg';
import { ConfigError, type Config } from './config.js';
import { redactText } from './format.js';

/** SQL text, one place per operation; values always as bind parameters. */
export const vaultSql = {
  read: 'select vault.read_secret($1, $2) as value',
  put: 'select * from vault.put_secret($1, $2, $3, $4)',
  rotate: 'select * from vault.rotate_secret($1, $2, $3)',
  rekey: 'select vault.rekey_secrets($1, $2) as rekeyed',
  list: 'select * from vault.list_secrets()',
} as const;

export const MIN_KEY_LENGTH = 16;

/** Checks a key taken from variable `source`; the message names the variable, never the value. */
export function checkVaultKey(source: string, value: string | undefined): string {
  const key = (value ?? '').replace(/(\r?\n)+$/, '');
  if (key === '') throw new ConfigError(`${source} is empty: the vault master key must be at least ${MIN_KEY_LENGTH} characters`);
  if (key.length < MIN_KEY_LENGTH) {
    throw new ConfigError(`${source} is too short: the vault master key must be at least ${MIN_KEY_LENGTH} characters (generate one with: openssl rand -base64 32)`);
  }
  return key;
}

type VaultKeyConfig = Pick<Config, 'ERP_CLOUD_VAULT_KEY' | 'ERP_CLOUD_VAULT_KEY_FILE'>;

/**
 * The vault master key from ERP_CLOUD_VAULT_KEY or the file named by
 * ERP_CLOUD_VAULT_KEY_FILE (trailing newline removed). Refuses both set, an
 * empty key and one shorter than 16 characters, naming the variable. With
 * `optional`, returns null when neither is set (a listener that takes every
 * secret from the environment needs no key).
 */
export function loadVaultKey(config: VaultKeyConfig): string;
export function loadVaultKey(config: VaultKeyConfig, opts: { optional: true }): string | null;
export function loadVaultKey(config: VaultKeyConfig, opts: { optional?: boolean } = {}): string | null {
  const { ERP_CLOUD_VAULT_KEY: inline, ERP_CLOUD_VAULT_KEY_FILE: file } = config;
  if (inline !== undefined && file !== undefined) {
    throw new ConfigError('ERP_CLOUD_VAULT_KEY and ERP_CLOUD_VAULT_KEY_FILE are both set: set only one');
  }
  if (file !== undefined) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new ConfigError(`ERP_CLOUD_VAULT_KEY_FILE: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
    }
    return checkVaultKey(`ERP_CLOUD_VAULT_KEY_FILE (${file})`, text);
  }
  if (inline !== undefined) return checkVaultKey('ERP_CLOUD_VAULT_KEY', inline);
  if (opts.optional) return null;
  throw new ConfigError('no vault master key: set ERP_CLOUD_VAULT_KEY, or ERP_CLOUD_VAULT_KEY_FILE to a file that holds it');
}

/** The environment variable that overrides a vault secret: ERP_CLOUD_SECRET_<NAME>, upper-cased, non-alphanumerics as _. */
export function secretEnvName(name: string): string {
  return `ERP_CLOUD_SECRET_${name.toUpperCase().replace(/[^A-Z0-9]/g, '_')}`;
}

export interface SecretResolverOptions {
  /** Where vault.read_secret runs (the listener's pool). */
  pool: Pick<pg.Pool, 'query'>;
  /** The master key; null when every secret comes from the environment. */
  masterKey: string | null;
  /** How long a value read from the vault is reused (ERP_CLOUD_SECRET_TTL_MS). */
  ttlMs?: number;
  env?: NodeJS.ProcessEnv;
  /** The clock, in ms (tests). */
  now?: () => number;
}

/** A lookup that failed without reaching the vault (no key, no variable). Never carries a value. */
export class SecretUnavailableError extends Error {
  constructor(readonly secretName: string, message: string) {
    super(message);
  }
}

/**
 * Secret name → value. The environment wins (read on every call, so it is
 * never stale); otherwise the vault, cached for ttlMs. Concurrent lookups of
 * one name share one query. Vault errors keep their SQLSTATE (EC020 missing,
 * EC021 wrong key) and never contain a value.
 */
export class SecretResolver {
  private readonly cache = new Map<string, { value: string; expiresAt: number }>();
  private readonly inflight = new Map<string, Promise<string>>();
  private readonly ttlMs: number;
  private readonly env: NodeJS.ProcessEnv;
  private readonly now: () => number;

  constructor(private readonly opts: SecretResolverOptions) {
    this.ttlMs = opts.ttlMs ?? 60_000;
    this.env = opts.env ?? process.env;
    this.now = opts.now ?? Date.now;
  }

  async resolve(name: string): Promise<string> {
    const fromEnv = this.env[secretEnvName(name)];
    if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
    const hit = this.cache.get(name);
    if (hit && hit.expiresAt > this.now()) return hit.value;
    const pending = this.inflight.get(name);
    if (pending) return pending;
    const lookup = this.readVault(name).finally(() => this.inflight.delete(name));
    this.inflight.set(name, lookup);
    return lookup;
  }

  /** Forgets cached values (one name, or all), e.g. after an operator rotated a secret and wants it now. */
  invalidate(name?: string): void {
    if (name === undefined) this.cache.clear();
    else this.cache.delete(name);
  }

  /** text with every value this resolver currently holds replaced by [redacted] (for log lines and error messages). */
  redact(text: string): string {
    return redactText(text, [...this.cache.values()].map((c) => c.value));
  }

  private async readVault(name: string): Promise<string> {
    if (this.opts.masterKey === null) {
      throw new SecretUnavailableError(name, `secret ${name}: ${secretEnvName(name)} is not set and no vault key is configured (ERP_CLOUD_VAULT_KEY or ERP_CLOUD_VAULT_KEY_FILE)`);
    }
    const { rows } = await this.opts.pool.query<{ value: string }>(vaultSql.read, [name, this.opts.masterKey]);
    const value = rows[0]!.value;
    if (this.ttlMs > 0) this.cache.set(name, { value, expiresAt: this.now() + this.ttlMs });
    return value;
  }
}
