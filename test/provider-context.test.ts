/**
 * What the listener gives provider adapters: tokens cached in the database and
 * shared by every listener (obtained once, even when several ask at once), and
 * auxiliary HTTP calls held to the endpoint's egress guard.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { policyOf } from '../listener/delivery/egress.js';
import { attemptDelivery } from '../listener/delivery/http.js';
import { registerAdapter, type ClaimedMessage } from '../listener/providers/index.js';
import { SqlState } from '../listener/kernel/errors.js';
import { clearTokenMemo, providerContext } from '../listener/delivery/provider-context.js';
import { createTestDb, sqlstateOf, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

let db: TestDb;
let otherPool: pg.Pool; // a second "listener" with its own connections
let server: http.Server;
let url: string;

beforeAll(async () => {
  db = await createTestDb('provider_context');
  otherPool = new pg.Pool({ connectionString: db.url, max: 4 });
  server = http.createServer((req, res) => {
    if (req.url === '/big') res.end(Buffer.alloc(4096, 1));
    else res.writeHead(201, { 'content-type': 'text/plain' }).end('hello');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await otherPool.end();
  await new Promise((r) => server.close(r));
  await db.drop();
});
beforeEach(async () => {
  clearTokenMemo();
  await resetProductState(db.pool);
  await db.pool.query(`select cloud.put_endpoint('tax', $1)`, [`${url}/api`]);
});

function ctxFor(pool: pg.Pool, allowPrivate = false, tokenLockTimeoutMs?: number) {
  const policy = policyOf({ name: 'tax', base_url: `${url}/api`, allow_hosts: [], allow_cidrs: [], allow_private: allowPrivate });
  return providerContext({ pool, endpoint: 'tax', policy, timeoutMs: 2000, secret: async () => 'unused', tokenLockTimeoutMs });
}

describe('provider tokens', () => {
  it('are obtained once and shared by every listener, even when they all ask at the same moment', async () => {
    let calls = 0;
    const obtain = async () => {
      calls += 1;
      await new Promise((r) => setTimeout(r, 100)); // a slow token endpoint
      return { token: `tok-${calls}`, expiresAt: new Date(Date.now() + 3600_000) };
    };
    const a = ctxFor(db.pool);
    const b = ctxFor(otherPool);
    const got = await Promise.all([a.token('app1', obtain), b.token('app1', obtain), a.token('app1', obtain), b.token('app1', obtain)]);
    expect(calls).toBe(1);
    expect(new Set(got)).toEqual(new Set(['tok-1']));
    clearTokenMemo(); // a listener that starts later finds it in the database
    expect(await ctxFor(otherPool).token('app1', obtain)).toBe('tok-1');
    expect(calls).toBe(1);
    const { rows } = await db.pool.query(`select obtained_count from cloud.provider_token where endpoint = 'tax' and token_key = 'app1'`);
    expect(rows[0].obtained_count).toBe('1');
  });

  it('are obtained again shortly before they expire, and after the cloud refused one', async () => {
    let n = 0;
    const obtain = async () => ({ token: `t${++n}`, expiresAt: new Date(Date.now() + 60_000) });
    const ctx = ctxFor(db.pool);
    expect(await ctx.token('k', obtain, { marginMs: 1000 })).toBe('t1');
    expect(await ctx.token('k', obtain, { marginMs: 1000 })).toBe('t1');
    expect(await ctx.token('k', obtain, { marginMs: 120_000 })).toBe('t2'); // inside the refresh margin
    await ctx.forgetToken('k', 't1'); // a stale refusal does not drop the newer token
    expect(await ctx.token('k', obtain, { marginMs: 1000 })).toBe('t2');
    await ctx.forgetToken('k', 't2');
    expect(await ctx.token('k', obtain, { marginMs: 1000 })).toBe('t3');
  });

  it('are not waited for forever: a listener stuck obtaining one costs the others a retryable attempt, and no lock is left behind', async () => {
    const stuck = await otherPool.connect(); // another listener that took the lock and went quiet
    try {
      await stuck.query(`select cloud.lock_provider_token('tax', 'k')`);
      const err = await ctxFor(db.pool, false, 200).token('k', async () => ({ token: 'never', expiresAt: new Date(Date.now() + 3600_000) })).catch((e) => e);
      expect(err).toMatchObject({ outcome: 'retryable', errorClass: 'token_cache_unavailable' });
    } finally {
      await stuck.query(`select cloud.unlock_provider_token('tax', 'k')`);
      stuck.release();
    }
    expect(await ctxFor(db.pool, false, 200).token('k', async () => ({ token: 'now', expiresAt: new Date(Date.now() + 3600_000) }))).toBe('now');
    // this database's advisory locks only: other test files (a migration's lock, say) hold theirs at the same moment
    const held = await db.pool.query(`select count(*)::int as n from pg_locks
                                       where locktype = 'advisory' and granted and database = (select oid from pg_database where datname = current_database())`);
    expect(held.rows[0].n).toBe(0);
  });

  it('that are empty or already expired are refused with EC014 and nothing is kept', async () => {
    expect(await sqlstateOf(db.pool.query(`select cloud.store_provider_token('tax', 'k', 'abc', now() - interval '1 second')`)))
      .toBe(SqlState.invalidProviderToken);
    const ctx = ctxFor(db.pool);
    await expect(ctx.token('k', async () => ({ token: '', expiresAt: new Date(Date.now() + 3600_000) }))).rejects.toThrow(/empty, without a key, or already expired/);
    expect((await db.pool.query(`select count(*)::int as n from cloud.provider_token`)).rows[0].n).toBe(0);
  });

  it('are readable by the listener role only: an operator may only make one be obtained again', async () => {
    await db.pool.query(`select cloud.store_provider_token('tax', 'k', 'secret-token-value', now() + interval '1 hour')`);
    const c = await db.pool.connect();
    try {
      await c.query('begin; set local role erp_cloud_operator');
      expect(await sqlstateOf(c.query(`select cloud.valid_provider_token('tax', 'k')`))).toBe('42501');
      await c.query('rollback; begin; set local role erp_cloud_operator');
      expect((await c.query(`select cloud.forget_provider_token('tax', 'k') as gone`)).rows[0].gone).toBe(true);
    } finally {
      await c.query('rollback');
      c.release();
    }
  });

  it('are readable by the listener role only, never by the ERP', async () => {
    const c = await db.pool.connect();
    try {
      await c.query('begin; set local role erp_cloud_app');
      expect(await sqlstateOf(c.query('select * from cloud.provider_token'))).toBe('42501');
      await c.query('rollback; begin; set local role erp_cloud_app');
      expect(await sqlstateOf(c.query(`select cloud.valid_provider_token('tax', 'k')`))).toBe('42501');
    } finally {
      await c.query('rollback');
      c.release();
    }
  });
});

describe('auxiliary calls', () => {
  it('reach an allowed address and return status, headers and bytes', async () => {
    const ans = await ctxFor(db.pool, true).fetch({ method: 'GET', url: `${url}/file` });
    expect(ans.status).toBe(201);
    expect(ans.text()).toBe('hello');
  });

  it('are refused by the egress guard where the endpoint may not go', async () => {
    await expect(ctxFor(db.pool, false).fetch({ method: 'GET', url: `${url}/file` })).rejects.toMatchObject({ code: 'EEGRESS' });
    await expect(ctxFor(db.pool, true).fetch({ method: 'GET', url: 'http://elsewhere.example.com/file' })).rejects.toMatchObject({ code: 'EEGRESS' });
  });

  it('refuse an answer larger than the cap', async () => {
    await expect(ctxFor(db.pool, true).fetch({ method: 'GET', url: `${url}/big`, maxBytes: 1000 })).rejects.toMatchObject({ code: 'ETOOLARGE' });
  });
});

describe('binary answers', () => {
  registerAdapter({
    name: 'test_download',
    buildRequest: (msg) => ({ method: 'GET', url: `${url}${(msg.payload as { path: string }).path}`, headers: {}, binaryResponse: true, maxResponseBytes: 1000 }),
    classify: (answer) => ({ outcome: 'ok', response: { bytes: answer.raw.length } }),
  });
  const msg = (path: string): ClaimedMessage => ({
    request_id: '00000000-0000-4000-8000-000000000001', endpoint: 'tax', operation: 'download', payload: { path }, attempt: 1,
    aggregate_type: null, aggregate_id: null, ordering_key: null, provider: 'test_download', base_url: `${url}/api`, timeout_ms: 2000,
    endpoint_config: {}, locked_until: new Date(Date.now() + 10_000), send_at: new Date(),
  });
  const policy = () => policyOf({ name: 'tax', base_url: `${url}/api`, allow_hosts: [], allow_cidrs: [], allow_private: true });

  it('are refused while they download once they pass the cap, as a permanent failure', async () => {
    const r = await attemptDelivery(msg('/big'), { logBodyBytes: 1000, policy: policy() });
    expect(r.outcome).toBe('permanent');
    expect(r.error_class).toBe('response_too_large');
    expect(r.error_message).toMatch(/exceeds 1000 bytes/);
  });

  it('under the cap reach the adapter whole, and cloud.log gets their size instead of their bytes', async () => {
    const r = await attemptDelivery(msg('/file'), { logBodyBytes: 1000, policy: policy() });
    expect(r.outcome).toBe('ok');
    expect(r.response).toEqual({ bytes: 5 });
    expect(r.response_body).toMatch(/^\[binary: 5 bytes, text\/plain\]$/);
  });
});
