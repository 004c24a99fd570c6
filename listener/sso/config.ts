/**
 * Configuration of the OpenID Provider (erp-cloud sso serve): environment →
 * typed, validated config, in the style of listener/config.ts. A bad value
 * stops the process with a message naming the variable.
 */
import { z } from 'zod';
import { parseEnv } from '../kernel/config.js';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const bool = z.enum(['true', 'false', '1', '0', 'yes', 'no']).transform((v) => ['true', '1', 'yes'].includes(v));

const schema = z.object({
  DATABASE_URL: z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgres:// connection URL'),
  // the URL browsers and relying parties reach; https in production, no trailing slash
  // (an origin: the provider's routes are served at the root of its host)
  ERP_CLOUD_SSO_ISSUER: z.string().regex(/^https?:\/\/[^\s/?#]+$/, 'must be an http(s) origin such as https://sso.erp.example.com (no path, no trailing slash)'),
  ERP_CLOUD_SSO_HOST: z.string().default('127.0.0.1'),
  ERP_CLOUD_SSO_PORT: int(0, 65535).default(8090),
  // behind a TLS-terminating proxy: trust X-Forwarded-Proto / -For
  ERP_CLOUD_SSO_PROXY: bool.default(false),
  ERP_CLOUD_SSO_ID_TOKEN_TTL_S: int(60, 86_400).default(3600),
  ERP_CLOUD_SSO_ACCESS_TOKEN_TTL_S: int(60, 86_400).default(3600),
  ERP_CLOUD_SSO_SESSION_TTL_S: int(60, 30 * 86_400).default(8 * 3600),
  ERP_CLOUD_SSO_KEY_PUBLISH_LEAD_S: int(0, 30 * 86_400).default(600),
  ERP_CLOUD_SSO_KEY_CHECK_MS: int(100, 3_600_000).default(30_000),
  // how long sso.audit keeps a row: six months at least (the Cybersecurity Law's minimum for network logs)
  ERP_CLOUD_SSO_AUDIT_RETENTION_DAYS: int(180, 36_500).default(400),
  // failed requests of one (source address, client, kind) in one window before
  // the provider answers 429 with Retry-After until the window ends; past the
  // threshold the audit keeps one aggregate row per window with the count
  ERP_CLOUD_SSO_THROTTLE_FAILURES: int(1, 100_000).default(10),
  ERP_CLOUD_SSO_THROTTLE_WINDOW_S: int(1, 86_400).default(300),
  // where the "start from the ERP" page sends people (optional)
  ERP_CLOUD_SSO_ERP_URL: z.string().url().optional(),
  ERP_CLOUD_SSO_POOL_SIZE: int(2, 100).default(4),
  ERP_CLOUD_LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  ERP_CLOUD_VAULT_KEY: z.string().min(16, 'must be at least 16 characters').optional(),
  ERP_CLOUD_VAULT_KEY_FILE: z.string().min(1).optional(),
});

export type SsoConfig = z.infer<typeof schema>;

/** Parses the environment for the SSO server. Throws ConfigError naming every bad variable. */
export function loadSsoConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<Record<keyof SsoConfig, string>> = {}): SsoConfig {
  return parseEnv(schema, env, overrides, 'invalid SSO configuration');
}
