/**
 * Configuration of the operations console (erp-cloud console): environment →
 * typed, validated config. A bad value stops the process with a message
 * naming the variable.
 */
import { z } from 'zod';
import { parseEnv } from '../kernel/config.js';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const schema = z.object({
  DATABASE_URL: z.string().regex(/^postgres(ql)?:\/\//, 'must be a postgres:// connection URL'),
  // where browsers reach the console (an origin: its pages are served at the root); the SSO client's redirect URI is <this>/callback
  ERP_CLOUD_CONSOLE_URL: z.string().regex(/^https?:\/\/[^\s/?#]+$/, 'must be an http(s) origin such as https://console.erp.example.com (no path, no trailing slash)'),
  ERP_CLOUD_CONSOLE_HOST: z.string().default('127.0.0.1'),
  ERP_CLOUD_CONSOLE_PORT: int(0, 65535).default(8091),
  // erp-cloud's own OpenID Provider (erp-cloud sso serve) and the console's client there (sso.register_client)
  ERP_CLOUD_CONSOLE_ISSUER: z.string().regex(/^https?:\/\/[^\s/?#]+$/, 'must be the OpenID Provider\'s issuer, e.g. https://sso.erp.example.com'),
  ERP_CLOUD_CONSOLE_CLIENT_ID: z.string().min(1).default('console'),
  ERP_CLOUD_CONSOLE_CLIENT_SECRET: z.string().min(16, 'must be the client secret sso.register_client printed (at least 16 characters)'),
  // how long a console sign-in lasts without use
  ERP_CLOUD_CONSOLE_SESSION_TTL_S: int(60, 86_400).default(8 * 3600),
  // the overview chart's span
  ERP_CLOUD_CONSOLE_CHART_HOURS: int(1, 48).default(3),
  // times are shown in this zone
  ERP_CLOUD_CONSOLE_TIME_ZONE: z.string().default('Asia/Shanghai'),
  ERP_CLOUD_CONSOLE_POOL_SIZE: int(2, 100).default(4),
  ERP_CLOUD_LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
});

export type ConsoleConfig = z.infer<typeof schema>;

/** Parses the environment for the console. Throws ConfigError naming every bad variable. */
export function loadConsoleConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<Record<keyof ConsoleConfig, string>> = {}): ConsoleConfig {
  return parseEnv(schema, env, overrides, 'invalid console configuration');
}
