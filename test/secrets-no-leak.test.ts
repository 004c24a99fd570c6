/**
 * Secrets never leak: a full delivery cycle with a bearer token and a signing
 * key from System_Vault — successes, a retry, a permanent failure, a cloud
 * that echoes the token back — and then every output an operator or an
 * attacker could read is searched for the secret values.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { signWebhookBody } from '../listener/providers/webhook.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';

const run = promisify(execFile);
const masterKey = `vault-master-${randomBytes(12).toString('hex')}`;
const token = `tok_${randomBytes(16).toString('hex')}`;
const signingKey = `sig_${randomBytes(16).toString('hex')}`;
const SECRETS = [masterKey, token, signingKey];

let db: TestDb;
let sim: SimServer;
let listener: ChildListener | undefined;

beforeAll(async () => {
  db = await createTestDb('noleak');
  sim = await startSim({
    routes: [
      ...webhookRoutes(),
      // a cloud that checks the token and the signature over the exact body
      {
        method: 'POST', path: '/verify', handler: (ctx) => {
          const sig = String(ctx.headers['x-erp-cloud-signature'] ?? '');
          const t = Number(/^t=(\d+),/.exec(sig)?.[1]);
          const fresh = Math.abs(Date.now() / 1000 - t) < 300;
          const ok = ctx.headers.authorization === `Bearer ${token}` && fresh && sig === signWebhookBody(signingKey, ctx.rawBody, t);
          return ok ? { status: 200, body: { ok: true } } : { status: 401, body: { error: 'bad signature or token' } };
        },
      },
      // a careless cloud that quotes the Authorization header back in its error
      { method: 'POST', path: '/echo', handler: (ctx) => ({ status: 400, body: { error: 'bad request', you_sent: ctx.headers.authorization } }) },
    ],
  });
  await db.pool.query(`select vault.put_secret('hook.token', $1, $2)`, [token, masterKey]);
  await db.pool.query(`select vault.put_secret('hook.signing', $1, $2)`, [signingKey, masterKey]);
  const config = { bearer_secret: 'hook.token', signing_secret: 'hook.signing' };
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_config => $2, p_timeout_ms => 300, p_backoff_base_ms => 50, p_backoff_cap_ms => 100)`, [`${sim.url}/verify`, config]);
  await db.pool.query(`select cloud.put_endpoint('echo', $1, p_config => $2)`, [`${sim.url}/echo`, config]);
  for (const e of ['hook', 'echo']) await db.pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [e]);
});
afterAll(async () => {
  listener?.proc.kill('SIGKILL');
  await sim.close();
  await db.drop();
});

describe('secrets', () => {
  it('a full delivery cycle with vault secrets leaves them in no log, table, status, metric or error', async () => {
    sim.setFaults({ schedule: [{ kind: 'status', status: 503 }, { kind: 'timeout', ms: 1000 }] });
    listener = spawnListener(db.url, { ERP_CLOUD_VAULT_KEY: masterKey, ERP_CLOUD_LOG_LEVEL: 'debug', ERP_CLOUD_HTTP_PORT: '0' });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 5) g`);
    await db.pool.query(`select cloud.enqueue_message('echo', 'demo.ping', '{"n":99}')`);
    await waitFor(async () => {
      const c = await statusCounts(db.pool);
      return c.sent === 5 && c.failed === 1;
    }, { timeoutMs: 20_000, what: '5 sent and the echo failed' });

    // the secrets were really used: the /verify cloud accepted the token and the signature 5 times
    expect(sim.ledger().filter((e) => e.path === '/verify' && e.status === 200)).toHaveLength(5);
    const { rows: logged } = await db.pool.query(`select request_headers from cloud.log where outcome = 'ok' limit 1`);
    expect(logged[0].request_headers).toMatchObject({ authorization: '[redacted]', 'x-erp-cloud-signature': '[redacted]' });

    const outputs: Record<string, string> = {
      'cloud.log': JSON.stringify((await db.pool.query(`select * from cloud.log`)).rows),
      'cloud.outbox': JSON.stringify((await db.pool.query(`select * from cloud.outbox`)).rows),
      'cloud.endpoint': JSON.stringify((await db.pool.query(`select * from cloud.endpoint`)).rows),
      'vault.secret': JSON.stringify((await db.pool.query(`select name, encode(ciphertext, 'escape') as c from vault.secret`)).rows),
      status: (await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'status', '--json'])).stdout,
      doctor: await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'doctor', '--json'], {
        env: { PATH: process.env.PATH, ERP_CLOUD_VAULT_KEY: masterKey },
      }).then((r) => r.stdout + r.stderr, (e: { stdout: string; stderr: string }) => e.stdout + e.stderr),
      tail: (await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'tail', '--once', '--lines', '100', '--json'])).stdout,
    };
    expect(outputs.doctor).toMatch(/vault/i); // doctor did check the vault key, and printed no key
    const metricsUrl = /"url":"(http:\/\/127\.0\.0\.1:\d+)","msg":"health and metrics"/.exec(listener.output())?.[1];
    expect(metricsUrl).toBeTruthy();
    outputs.metrics = await (await fetch(`${metricsUrl}/metrics`, { signal: AbortSignal.timeout(3000) })).text();
    outputs.healthz = await (await fetch(`${metricsUrl}/healthz`, { signal: AbortSignal.timeout(3000) })).text();
    listener.proc.kill('SIGTERM');
    expect(await listener.exited).toBe(0);
    outputs['listener logs'] = listener.output();

    // the echo's answer did carry the token back; what was stored of it is redacted
    expect(outputs['cloud.log']).toContain('Bearer [redacted]');
    for (const [where, text] of Object.entries(outputs)) {
      for (const secret of SECRETS) expect(text.includes(secret), `${where} contains a secret`).toBe(false);
    }
  });

  it('a secret that cannot be read is a retryable attempt with a reason, and the reason names no value', async () => {
    await db.pool.query(`truncate cloud.outbox, cloud.log`);
    listener = spawnListener(db.url, { ERP_CLOUD_VAULT_KEY: `wrong-key-${randomBytes(8).toString('hex')}` });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await db.pool.query(`select count(*)::int n from cloud.log`)).rows[0].n > 0, { what: 'an attempt' });
    listener.proc.kill('SIGKILL');
    const { rows } = await db.pool.query(`select outcome, error_class, error_message, http_status from cloud.log limit 1`);
    expect(rows[0]).toMatchObject({ outcome: 'retryable', error_class: 'secret_unavailable', http_status: null });
    expect(rows[0].error_message).toMatch(/EC021|master key/i);
    for (const secret of SECRETS) expect(JSON.stringify(rows)).not.toContain(secret);
  });
});
