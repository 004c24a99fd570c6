/**
 * A lease is committed without waiting for its WAL flush, and a crash of PostgreSQL raises a fence
 * instead (issue 15 §4, migration 0034). What a crash can lose is a lease committed just before it,
 * whose HTTP call may still be in flight: cloud.delivery_fence is UNLOGGED, so crash recovery empties
 * it, and the first claim after the crash raises it again. Until the longest lease a claim could have
 * given before the crash has run out, nothing enqueued before the crash is leased; what the ERP
 * enqueues afterwards goes at once. Here the crash is what recovery does to the table (TRUNCATE);
 * test/restart.test.ts crashes a real cluster. Time is the claim's p_now: order and counts only.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { reportDelivered } from './helpers/outbox.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('delivery_fence');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook', p_timeout_ms => 7000)`);
  await q(`select cloud.put_endpoint('slow', 'http://127.0.0.1:9/slow', p_timeout_ms => 20000)`);
});

interface Claimed { request_id: string; endpoint: string; attempt: number }
interface Fence { fence_id: string; fence_until: Date }

const T0 = Date.parse('2030-01-01T00:00:00Z');
const at = (ms: number) => new Date(T0 + ms).toISOString();

const enqueue = async (n: number, opts: { endpoint?: string; key?: string; notBefore?: string } = {}) =>
  (await q<{ id: string }>(
    `select cloud.enqueue_message($1, 'demo.ping', jsonb_build_object('i', g), 'erp.doc', g::text, $2, p_not_before => $4::timestamptz) as id
       from generate_series(1, $3) g`,
    [opts.endpoint ?? 'hook', opts.key ?? null, n, opts.notBefore ?? at(0)])).rows.map((r) => r.id);

/** A claim at T0 + ms with a 5-s lease margin, as a listener makes it. */
const claimAt = async (ms: number, worker = 'w1', c: pg.Pool | pg.ClientBase = db.pool) =>
  (await c.query<Claimed>(`select * from cloud.claim_messages($1, 100, null, interval '5 seconds', $2::timestamptz)`, [worker, at(ms)])).rows;

/** What crash recovery does to an unlogged table. */
const crash = () => q('truncate cloud.delivery_fence');
const fence = async () => (await q<Fence>('select fence_id::text, fence_until from cloud.delivery_fence')).rows;
const maxId = async (ids: string[]) =>
  (await q<{ id: string }>('select max(id)::text as id from cloud.outbox where request_id = any ($1::uuid[])', [ids])).rows[0]!.id;

describe('a claim commits without waiting for the WAL flush', () => {
  it('turns synchronous_commit off for its own transaction only; the report after it waits for the flush, and that flush carries the claim', async () => {
    await enqueue(2);
    const c = await db.pool.connect();
    try {
      await c.query('begin');
      const claimed = (await c.query<Claimed>(`select * from cloud.claim_messages('w1', 100, null, interval '5 seconds', $1)`, [at(0)])).rows;
      expect((await c.query<{ s: string }>(`select current_setting('synchronous_commit') as s`)).rows[0]!.s).toBe('off');
      await c.query('commit');
      const { rows: [afterClaim] } = await c.query<{ lsn: string }>('select pg_current_wal_insert_lsn()::text as lsn');
      expect((await c.query<{ s: string }>(`select current_setting('synchronous_commit') as s`)).rows[0]!.s).toBe('on');

      await c.query('begin');
      await reportDelivered(c, 'w1', claimed);
      expect((await c.query<{ s: string }>(`select current_setting('synchronous_commit') as s`)).rows[0]!.s).toBe('on');
      await c.query('commit');
      // the report's commit returned only once the WAL was on disk up to it, the claim's records included
      const { rows: [flushed] } = await c.query<{ ok: boolean }>('select pg_current_wal_flush_lsn() >= $1::pg_lsn as ok', [afterClaim!.lsn]);
      expect(flushed!.ok).toBe(true);
    } finally {
      c.release();
    }
    expect((await q<{ n: number }>(`select count(*)::int as n from cloud.outbox where status = 'sent'`)).rows[0]!.n).toBe(2);
  });

  it('fences nothing on a database that never crashed: the migration wrote a fence that ended at -infinity', async () => {
    expect(await fence()).toEqual([{ fence_id: '0', fence_until: expect.anything() }]);
    expect((await q<{ inf: boolean }>(`select fence_until = '-infinity' as inf from cloud.delivery_fence`)).rows[0]!.inf).toBe(true);
    const ids = await enqueue(3);
    expect((await claimAt(0)).map((m) => m.request_id)).toEqual(ids);
  });
});

describe('after a crash of PostgreSQL the first claim raises the fence', () => {
  it('leases nothing enqueued before the crash until the longest lease could have run out; what is enqueued after goes at once', async () => {
    const before = await enqueue(2, { notBefore: at(1000) });
    await claimAt(0); // not due yet: taken into the hot table as pending
    const intake = await enqueue(2);
    await crash();

    expect(await claimAt(2000)).toEqual([]);
    const [f] = await fence();
    expect(f!.fence_id).toBe(await maxId([...before, ...intake]));
    // the claim's now + the longest endpoint timeout (20 s, 'slow') + the lease margin (5 s)
    expect(f!.fence_until.getTime()).toBe(T0 + 2000 + 20_000 + 5000);

    const after = await enqueue(2, { notBefore: at(2000) });
    expect((await claimAt(2000)).map((m) => m.request_id)).toEqual(after);
    expect(await claimAt(26_999)).toEqual([]);
    // the fence lifts: what waited goes, oldest first
    expect((await claimAt(27_000)).map((m) => m.request_id)).toEqual([...before, ...intake]);
  });

  it('is raised once: a second claim does not move it, and a claim beside the first waits for it and reads it', async () => {
    await enqueue(3);
    await crash();
    const c1 = await db.pool.connect();
    const c2 = await db.pool.connect();
    try {
      await c1.query('begin');
      expect(await claimAt(0, 'w1', c1)).toEqual([]);
      const second = claimAt(0, 'w2', c2); // waits on the fence's key until the first commits
      await c1.query('commit');
      expect(await second).toEqual([]);
    } finally {
      c1.release();
      c2.release();
    }
    const [f] = await fence();
    expect(await claimAt(10_000)).toEqual([]);
    expect(await fence()).toEqual([f]);
    expect((await claimAt(25_000)).length).toBe(3);
  });

  it('keeps per-key order across the fence: a message enqueued after the crash waits behind its key\'s fenced head', async () => {
    const [head] = await enqueue(1, { key: 'doc-1' });
    await crash();
    expect(await claimAt(0)).toEqual([]);
    const [next] = await enqueue(1, { key: 'doc-1' });
    const [free] = await enqueue(1);
    expect((await claimAt(0)).map((m) => m.request_id)).toEqual([free]);
    const lifted = await claimAt(25_000);
    expect(lifted.map((m) => m.request_id)).toEqual([head]);
    await reportDelivered(db.pool, 'w1', lifted);
    expect((await claimAt(25_001)).map((m) => m.request_id)).toEqual([next]);
  });

  it('holds a rate-limited endpoint\'s messages too, and spends none of its budget on them', async () => {
    await q(`select cloud.put_endpoint_limits('hook', 100, 100)`);
    await enqueue(3);
    await crash();
    const bucket = async () => (await q(`select tokens, tokens_at from cloud.endpoint where name = 'hook'`)).rows[0];
    const full = await bucket();
    expect(await claimAt(1000)).toEqual([]);
    expect(await bucket()).toEqual(full);
    expect((await claimAt(30_000)).length).toBe(3);
  });

  it('names its end as the next moment to look again, while fenced messages wait', async () => {
    await enqueue(1);
    await crash();
    await claimAt(0);
    const due = (await q<{ at: Date | null }>(`select cloud.next_due_at(null, $1) as at`, [at(1000)])).rows[0]!.at;
    expect(due?.getTime()).toBe(T0 + 25_000);
    expect((await q<{ at: Date | null }>(`select cloud.next_due_at(null, $1) as at`, [at(25_000)])).rows[0]!.at).toBeNull();
  });
});
