/**
 * `erp-cloud console` as a person starts it (the built CLI, dist/ from `make test`):
 * a configuration mistake is named before anything listens, `console link` makes the
 * one-time sign-in link the ERP's button would, and `console` serves its health check.
 */
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';
import { freePort } from './helpers/sso.js';

const run = promisify(execFile);
let db: TestDb;

beforeAll(async () => {
  db = await createTestDb('console_cli');
  await db.pool.query(`select sso.put_user('ops', '运维'), sso.put_issuer('http://127.0.0.1:9')`);
  await db.pool.query(`select sso.register_client('console', 'console', array['http://127.0.0.1:8091/callback'], '{}', 'http://127.0.0.1:8091/login')`);
});
afterAll(() => db.drop());

const cli = (args: string[], env: Record<string, string> = {}) =>
  run(process.execPath, ['dist/listener/cli.js', '-c', db.url, ...args], { env: { PATH: process.env.PATH, ...env }, timeout: 30_000 })
    .then((r) => ({ code: 0, ...r }), (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }));

describe('erp-cloud console', () => {
  it('without its configuration it names every missing variable, shows no secret, and exits 1', async () => {
    const r = await cli(['console'], { ERP_CLOUD_CONSOLE_CLIENT_SECRET: 'short-secret' });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('ERP_CLOUD_CONSOLE_URL: is required');
    expect(r.stderr).toContain('ERP_CLOUD_CONSOLE_ISSUER: is required');
    expect(r.stderr).toContain('ERP_CLOUD_CONSOLE_CLIENT_SECRET');
    expect(r.stderr).not.toContain('short-secret');
  });

  it('console link prints the one-time sign-in link of an ERP user for the console client', async () => {
    const r = await cli(['console', 'link', 'ops']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(/^http:\/\/127\.0\.0\.1:9\/jump\?ticket=[A-Za-z0-9_-]{20,}$/);
    const { rows } = await db.pool.query(`select count(*)::int n from sso.jump_ticket t join sso.app_user u on u.id = t.user_id where u.login = 'ops' and t.client_id = 'console'`);
    expect(rows[0].n).toBe(1);
    const unknown = await cli(['console', 'link', 'nobody']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain('EO006');
  });

  it('console serves its health check where ERP_CLOUD_CONSOLE_PORT says, and stops on SIGTERM', async () => {
    const port = await freePort();
    const child = spawn(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'console'], {
      env: {
        PATH: process.env.PATH, ERP_CLOUD_CONSOLE_URL: `http://127.0.0.1:${port}`, ERP_CLOUD_CONSOLE_PORT: String(port),
        ERP_CLOUD_CONSOLE_ISSUER: 'http://127.0.0.1:9', ERP_CLOUD_CONSOLE_CLIENT_SECRET: 'x'.repeat(32), ERP_CLOUD_LOG_LEVEL: 'silent',
      },
    });
    let out = '';
    child.stdout.on('data', (d) => (out += String(d)));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      await waitFor(async () => out.includes('"console"'), { timeoutMs: 20_000, what: 'the console to listen' });
      const res = await fetch(`http://127.0.0.1:${port}/healthz`);
      expect(await res.text()).toBe('ok\n');
      // no session: every page sends the browser to sign in
      const page = await fetch(`http://127.0.0.1:${port}/attention`, { redirect: 'manual' });
      expect(page.status).toBe(302);
      expect(page.headers.get('location')).toBe('/login');
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
  });
});
