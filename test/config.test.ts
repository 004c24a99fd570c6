/**
 * The listener's configuration (listener/kernel/config.ts): ERP_CLOUD_* variables → typed values,
 * read by hand (no zod at a listener's start), every bad variable named with what is wrong.
 */
import os from 'node:os';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../listener/kernel/config.js';

const URL_ = 'postgres://x@127.0.0.1/db';

function problems(env: Record<string, string>): string {
  try {
    loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error('loadConfig accepted a bad configuration');
}

describe('listener configuration', () => {
  it('an environment with only DATABASE_URL gets the documented defaults', () => {
    expect(loadConfig({ DATABASE_URL: URL_ })).toEqual({
      DATABASE_URL: URL_,
      ERP_CLOUD_WORKER_ID: `${os.hostname()}-${process.pid}`,
      ERP_CLOUD_ENDPOINTS: null,
      ERP_CLOUD_CONCURRENCY: 64,
      ERP_CLOUD_BATCH_SIZE: 100,
      ERP_CLOUD_POLL_MS: 500,
      ERP_CLOUD_MAINTENANCE_MS: 5000,
      ERP_CLOUD_ROTATE_MS: 1000,
      ERP_CLOUD_LEASE_MARGIN_MS: 5000,
      ERP_CLOUD_SHUTDOWN_GRACE_MS: 10_000,
      ERP_CLOUD_POOL_SIZE: 8,
      ERP_CLOUD_START_WAIT_MS: 300_000,
      ERP_CLOUD_HTTP_HOST: '127.0.0.1',
      ERP_CLOUD_HTTP_PORT: 9464,
      ERP_CLOUD_INBOUND_HOST: '0.0.0.0',
      ERP_CLOUD_INBOUND_PORT: -1,
      ERP_CLOUD_LOG_LEVEL: 'info',
      ERP_CLOUD_LOG_BODY_BYTES: 65_536,
      ERP_CLOUD_SECRET_TTL_MS: 60_000,
    });
  });

  it('values are read as numbers, lists and names; an empty variable counts as unset; overrides win over the environment', () => {
    const c = loadConfig({
      DATABASE_URL: 'postgresql://u@h/d', ERP_CLOUD_CONCURRENCY: ' 32 ', ERP_CLOUD_HTTP_PORT: '-1', ERP_CLOUD_ENDPOINTS: 'nuonuo, hook,,',
      ERP_CLOUD_LOG_LEVEL: 'warn', ERP_CLOUD_POLL_MS: '', ERP_CLOUD_WORKER_ID: 'w-1', ERP_CLOUD_VAULT_KEY_FILE: '/run/key',
    }, { ERP_CLOUD_BATCH_SIZE: '10' });
    expect(c).toMatchObject({
      DATABASE_URL: 'postgresql://u@h/d', ERP_CLOUD_CONCURRENCY: 32, ERP_CLOUD_HTTP_PORT: -1, ERP_CLOUD_ENDPOINTS: ['nuonuo', 'hook'],
      ERP_CLOUD_LOG_LEVEL: 'warn', ERP_CLOUD_POLL_MS: 500, ERP_CLOUD_WORKER_ID: 'w-1', ERP_CLOUD_VAULT_KEY_FILE: '/run/key', ERP_CLOUD_BATCH_SIZE: 10,
    });
    expect(c.ERP_CLOUD_VAULT_KEY).toBeUndefined();
  });

  it('one ConfigError names every bad variable with what is wrong and what it got, and never a secret\'s value or a password', () => {
    const message = problems({
      DATABASE_URL: 'mysql://db', ERP_CLOUD_CONCURRENCY: 'lots', ERP_CLOUD_POOL_SIZE: '1', ERP_CLOUD_POLL_MS: '2.5',
      ERP_CLOUD_LOG_LEVEL: 'loud', ERP_CLOUD_VAULT_KEY: 'short-secret', ERP_CLOUD_WORKER_ID: 'w'.repeat(121),
    });
    expect(message).toMatch(/^invalid configuration:/);
    expect(message).toContain('DATABASE_URL: must be a postgres:// connection URL (got "mysql://db")');
    expect(message).toContain('ERP_CLOUD_CONCURRENCY: must be an integer from 1 to 1000 (got "lots")');
    expect(message).toContain('ERP_CLOUD_POOL_SIZE: must be an integer from 2 to 100 (got "1")');
    expect(message).toContain('ERP_CLOUD_POLL_MS: must be an integer from 10 to 60000 (got "2.5")');
    expect(message).toContain('ERP_CLOUD_LOG_LEVEL: must be one of fatal, error, warn, info, debug, trace, silent (got "loud")');
    expect(message).toContain('ERP_CLOUD_VAULT_KEY: must be at least 16 characters (value not shown)');
    expect(message).toContain('ERP_CLOUD_WORKER_ID: must be at most 120 characters');
    expect(message).not.toContain('short-secret');
    expect(problems({})).toContain('DATABASE_URL: is required');
    expect(problems({ DATABASE_URL: 'postgres://u:hunter2@h/d', ERP_CLOUD_HTTP_PORT: '70000' })).toContain('ERP_CLOUD_HTTP_PORT: must be an integer from -1 to 65535 (got "70000")');
  });
});
