/**
 * Listener configuration: environment → typed, validated config. A bad value
 * stops the process with a message that names the variable.
 */
import os from 'node:os';
import { z } from 'zod';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const schema = z.object({
  DATABASE_URL: z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgres:// connection URL'),
  ERP_CLOUD_WORKER_ID: z.string().min(1).max(120).default(`${os.hostname()}-${process.pid}`),
  ERP_CLOUD_ENDPOINTS: z
    .string()
    .optional()
    .transform((s) => (s ? s.split(',').map((x) => x.trim()).filter(Boolean) : null)),
  ERP_CLOUD_CONCURRENCY: int(1, 1000).default(64),
  ERP_CLOUD_BATCH_SIZE: int(1, 1000).default(100),
  ERP_CLOUD_POLL_MS: int(10, 60_000).default(500),
  ERP_CLOUD_MAINTENANCE_MS: int(100, 600_000).default(5000),
  ERP_CLOUD_LEASE_MARGIN_MS: int(200, 600_000).default(5000),
  ERP_CLOUD_SHUTDOWN_GRACE_MS: int(0, 600_000).default(10_000),
  ERP_CLOUD_POOL_SIZE: int(2, 100).default(8),
  // how long `listen` waits for its database at start (db.ts waitForDatabase); 0 = exit 1 at once
  ERP_CLOUD_START_WAIT_MS: int(0, 86_400_000).default(300_000),
  ERP_CLOUD_HTTP_HOST: z.string().default('127.0.0.1'),
  ERP_CLOUD_HTTP_PORT: int(-1, 65535).default(9464),
  // the inbound door clouds push to (listener/inbound-server.ts); -1 = off
  ERP_CLOUD_INBOUND_HOST: z.string().default('0.0.0.0'),
  ERP_CLOUD_INBOUND_PORT: int(-1, 65535).default(-1),
  ERP_CLOUD_LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  ERP_CLOUD_LOG_BODY_BYTES: int(0, 10 * 1024 * 1024).default(64 * 1024),
  // System_Vault (listener/vault.ts): the master key, or a file holding it; never both
  ERP_CLOUD_VAULT_KEY: z.string().min(16, 'must be at least 16 characters').optional(),
  ERP_CLOUD_VAULT_KEY_FILE: z.string().min(1).optional(),
  ERP_CLOUD_SECRET_TTL_MS: int(0, 86_400_000).default(60_000),
});

/** Variables whose value never appears in a message, not even when it is wrong. */
const SECRET_VARIABLES: ReadonlySet<string> = new Set(['ERP_CLOUD_VAULT_KEY', 'ERP_CLOUD_CONSOLE_CLIENT_SECRET']);

export type Config = z.infer<typeof schema>;

export class ConfigError extends Error {}

/** Parses the environment. Throws ConfigError naming every bad variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<Record<keyof Config, string>> = {}): Config {
  return parseEnv(schema, env, overrides, 'invalid configuration');
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
    const lines = parsed.error.issues.map((i) => {
      const name = String(i.path[0]);
      const got = input[name];
      if (got === undefined) return `${name}: is required`;
      return SECRET_VARIABLES.has(name) ? `${name}: ${i.message} (value not shown)` : `${name}: ${i.message} (got ${JSON.stringify(redactUrl(got))})`;
    });
    throw new ConfigError(`${title}:\n  ${lines.join('\n  ')}`);
  }
  return parsed.data;
}

/** A connection URL with its password replaced, for messages and logs. */
export function redactUrl(s: string): string {
  return s.replace(/(postgres(?:ql)?:\/\/[^:/@]+:)[^@]*@/, '$1***@').replace(/([?&](?:password|sslpassword)=)[^&]*/gi, '$1***');
}
