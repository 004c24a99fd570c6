/**
 * Listener configuration: environment → typed, validated config. A bad value
 * stops the process with a message that names the variable.
 */
import os from 'node:os';
import type { z } from 'zod';

/**
 * One variable of the listener's configuration: how its text becomes a value, and its default.
 * Checked by hand rather than with a zod schema: zod is 70 ms of CPU at every start of a
 * listener, which reads these few numbers once (the SSO and console configs keep zod: parseEnv).
 */
type Field<T> = { parse(text: string): T | { error: string }; fallback: () => T };

const failed = (v: unknown): v is { error: string } => typeof v === 'object' && v !== null && 'error' in v && !Array.isArray(v);

/** An integer from min to max (a number in any form Number() reads: ' 64 ', 1e3). */
const int = (min: number, max: number, fallback: number): Field<number> => ({
  parse(text) {
    const n = Number(text);
    if (text.trim() === '' || !Number.isInteger(n)) return { error: `must be an integer from ${min} to ${max}` };
    return n < min || n > max ? { error: `must be an integer from ${min} to ${max}` } : n;
  },
  fallback: () => fallback,
});
const str = (fallback: () => string, check: (s: string) => string | null = () => null): Field<string> => ({
  parse: (text) => {
    const err = check(text);
    return err === null ? text : { error: err };
  },
  fallback,
});
const optional = (check: (s: string) => string | null = () => null): Field<string | undefined> => ({
  parse: (text) => {
    const err = check(text);
    return err === null ? text : { error: err };
  },
  fallback: () => undefined,
});
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export interface Config {
  DATABASE_URL: string;
  ERP_CLOUD_WORKER_ID: string;
  ERP_CLOUD_ENDPOINTS: string[] | null;
  ERP_CLOUD_CONCURRENCY: number;
  ERP_CLOUD_BATCH_SIZE: number;
  ERP_CLOUD_POLL_MS: number;
  ERP_CLOUD_MAINTENANCE_MS: number;
  ERP_CLOUD_ROTATE_MS: number;
  ERP_CLOUD_LEASE_MARGIN_MS: number;
  ERP_CLOUD_SHUTDOWN_GRACE_MS: number;
  ERP_CLOUD_POOL_SIZE: number;
  ERP_CLOUD_START_WAIT_MS: number;
  ERP_CLOUD_HTTP_HOST: string;
  ERP_CLOUD_HTTP_PORT: number;
  ERP_CLOUD_INBOUND_HOST: string;
  ERP_CLOUD_INBOUND_PORT: number;
  ERP_CLOUD_LOG_LEVEL: (typeof LOG_LEVELS)[number];
  ERP_CLOUD_LOG_BODY_BYTES: number;
  ERP_CLOUD_VAULT_KEY?: string;
  ERP_CLOUD_VAULT_KEY_FILE?: string;
  ERP_CLOUD_SECRET_TTL_MS: number;
}

const fields: { [K in keyof Config]-?: Field<Config[K]> } = {
  DATABASE_URL: {
    parse: (text) => (/^postgres(ql)?:\/\//.test(text) ? text : { error: 'must be a postgres:// connection URL' }),
    fallback: () => ({ error: 'is required' }) as never,
  },
  ERP_CLOUD_WORKER_ID: str(() => `${os.hostname()}-${process.pid}`, (s) => (s.length > 120 ? 'must be at most 120 characters' : null)),
  ERP_CLOUD_ENDPOINTS: {
    parse: (text) => text.split(',').map((x) => x.trim()).filter(Boolean),
    fallback: () => null,
  },
  ERP_CLOUD_CONCURRENCY: int(1, 1000, 64),
  ERP_CLOUD_BATCH_SIZE: int(1, 1000, 100),
  ERP_CLOUD_POLL_MS: int(10, 60_000, 500),
  ERP_CLOUD_MAINTENANCE_MS: int(100, 600_000, 5000),
  // how often a listener that reported sent messages asks cloud.rotate_outbox (0031); 0 = only at maintenance
  ERP_CLOUD_ROTATE_MS: int(0, 600_000, 1000),
  ERP_CLOUD_LEASE_MARGIN_MS: int(200, 600_000, 5000),
  ERP_CLOUD_SHUTDOWN_GRACE_MS: int(0, 600_000, 10_000),
  ERP_CLOUD_POOL_SIZE: int(2, 100, 8),
  // how long `listen` waits for its database at start (db.ts waitForDatabase); 0 = exit 1 at once
  ERP_CLOUD_START_WAIT_MS: int(0, 86_400_000, 300_000),
  ERP_CLOUD_HTTP_HOST: str(() => '127.0.0.1'),
  ERP_CLOUD_HTTP_PORT: int(-1, 65535, 9464),
  // the inbound door clouds push to (listener/inbound-server.ts); -1 = off
  ERP_CLOUD_INBOUND_HOST: str(() => '0.0.0.0'),
  ERP_CLOUD_INBOUND_PORT: int(-1, 65535, -1),
  ERP_CLOUD_LOG_LEVEL: {
    parse: (text) => ((LOG_LEVELS as readonly string[]).includes(text) ? text as Config['ERP_CLOUD_LOG_LEVEL'] : { error: `must be one of ${LOG_LEVELS.join(', ')}` }),
    fallback: () => 'info',
  },
  ERP_CLOUD_LOG_BODY_BYTES: int(0, 10 * 1024 * 1024, 64 * 1024),
  // System_Vault (listener/vault.ts): the master key, or a file holding it; never both
  ERP_CLOUD_VAULT_KEY: optional((s) => (s.length < 16 ? 'must be at least 16 characters' : null)),
  ERP_CLOUD_VAULT_KEY_FILE: optional(),
  ERP_CLOUD_SECRET_TTL_MS: int(0, 86_400_000, 60_000),
};

/** Variables whose value never appears in a message, not even when it is wrong. */
const SECRET_VARIABLES: ReadonlySet<string> = new Set(['ERP_CLOUD_VAULT_KEY', 'ERP_CLOUD_CONSOLE_CLIENT_SECRET']);

export class ConfigError extends Error {}

/** Parses the environment. Throws ConfigError naming every bad variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<Record<keyof Config, string>> = {}): Config {
  const out: Record<string, unknown> = {};
  const bad: string[] = [];
  for (const [name, field] of Object.entries(fields) as Array<[keyof Config, Field<unknown>]>) {
    const raw = overrides[name] ?? env[name];
    const text = raw === '' ? undefined : raw;
    const value = text === undefined ? field.fallback() : field.parse(text);
    if (failed(value)) bad.push(problem(name, value.error, text));
    else out[name] = value;
  }
  if (bad.length > 0) throw new ConfigError(`invalid configuration:\n  ${bad.join('\n  ')}`);
  return out as unknown as Config;
}

/** One line of a ConfigError: the variable, what is wrong, and what it got (never a secret's value). */
function problem(name: string, message: string, got: string | undefined): string {
  if (got === undefined) return `${name}: is required`;
  return SECRET_VARIABLES.has(name) ? `${name}: ${message} (value not shown)` : `${name}: ${message} (got ${JSON.stringify(redactUrl(got))})`;
}

/**
 * Reads a zod object schema's variables from the environment (overrides win,
 * empty means unset) and throws one ConfigError naming every bad variable;
 * a secret variable's value is never shown. Shared by every erp-cloud process.
 */
export function parseEnv<S extends z.ZodObject>(schema: S, env: NodeJS.ProcessEnv, overrides: Partial<Record<string, string>>, title: string): z.infer<S> {
  const input: Record<string, string | undefined> = {};
  for (const key of Object.keys(schema.shape)) {
    const value = overrides[key] ?? env[key];
    input[key] = value === '' ? undefined : value;
  }
  const parsed = schema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => problem(String(i.path[0]), i.message, input[String(i.path[0])]));
    throw new ConfigError(`${title}:\n  ${lines.join('\n  ')}`);
  }
  return parsed.data;
}

/** A connection URL with its password replaced, for messages and logs. */
export function redactUrl(s: string): string {
  return s.replace(/(postgres(?:ql)?:\/\/[^:/@]+:)[^@]*@/, '$1***@').replace(/([?&](?:password|sslpassword)=)[^&]*/gi, '$1***');
}
