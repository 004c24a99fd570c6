/**
 * A message the ERP enqueued goes into the hot table already leased when it can go at once (issue 15 §2,
 * §3, migration 0032): cloud.claim_messages takes what waits in cloud.outbox_intake through
 * cloud._lease_intake, which writes each message into cloud.outbox once, in_flight with its lease when it
 * is due, heads its ordering key and its endpoint is enabled, unlimited and has nothing older due; pending
 * otherwise, for the claim's loop (budgets, limits, order) to take as before. These tests hold that every
 * rule of the claim still holds on this path, and that the path writes each message once. Counts and
 * order only, never a duration.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { reportDelivered, whereMessages } from './helpers/outbox.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('lease_on_the_way_in');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook', p_timeout_ms => 7000)`);
  await q(`select cloud.put_endpoint('other', 'http://127.0.0.1:9/other')`);
});

interface Claimed { request_id: string; endpoint: string; attempt: number; locked_until: Date; ordering_key: string | null }

const enqueue = async (opts: { endpoint?: string; key?: string | null; n?: number; notBefore?: string } = {}) =>
  (await q<{ id: string }>(
    `select cloud.enqueue_message($1, 'demo.ping', jsonb_build_object('i', g), 'erp.doc', g::text, $2, p_not_before => $4::timestamptz) as id
       from generate_series(1, $3) g`,
    [opts.endpoint ?? 'hook', opts.key ?? null, opts.n ?? 1, opts.notBefore ?? null])).rows.map((r) => r.id);

const ok = (worker: string, claimed: Array<{ request_id: string; attempt: number }>) => reportDelivered(db.pool, worker, claimed);
const where = () => whereMessages(db.pool);

const claim = async (worker = 'w1', limit = 100, endpoints: string[] | null = null) =>
  (await q<Claimed>(`select * from cloud.claim_messages($1, $2, $3)`, [worker, limit, endpoints])).rows;

const statusOf = async (id: string) =>
  (await q<{ t: string; status: string; attempts: number; locked_by: string | null }>(
    `select tableoid::regclass::text as t, status, attempts, locked_by from cloud.outbox where request_id = $1`, [id])).rows[0];

describe('a message the ERP enqueued is leased on its way into the hot table', () => {
  it('is written into the hot table once: inserted leased, never updated from pending to in_flight', async () => {
    const ids = await enqueue({ n: 5 });
    const c = await db.pool.connect();
    try {
      await c.query('begin');
      const claimed = (await c.query<Claimed>(`select * from cloud.claim_messages('w1', 100)`)).rows;
      // this transaction's own writes to the hot table, before they are flushed to the statistics
      const { rows: [writes] } = await c.query<{ ins: number; upd: number }>(
        `select n_tup_ins::int as ins, n_tup_upd::int as upd from pg_stat_xact_user_tables where relid = 'cloud.outbox'::regclass`);
      await c.query('commit');
      expect(claimed.map((m) => m.request_id)).toEqual(ids);
      expect(writes).toEqual({ ins: 5, upd: 0 });
    } finally {
      c.release();
    }
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 5 });
  });

  it('carries the same lease as any claim: one attempt, this worker, the endpoint timeout plus the margin', async () => {
    const [id] = await enqueue();
    const [m] = (await q<Claimed>(`select * from cloud.claim_messages('w1', 10, null, interval '3 seconds')`)).rows;
    const { rows: [row] } = await q<{ attempts: number; lease_s: number; locked_by: string; locked_until: Date }>(
      `select attempts, extract(epoch from locked_until - updated_at)::float8 as lease_s, locked_by, locked_until
         from cloud.outbox where request_id = $1`, [id]);
    expect(m).toMatchObject({ request_id: id, attempt: 1, locked_until: row!.locked_until });
    expect(row).toMatchObject({ attempts: 1, lease_s: 10, locked_by: 'w1' });  // 7 s timeout + 3 s margin
    expect(await claim('w2')).toEqual([]);  // leased once: another listener finds nothing
  });

  it('while a snapshot is held, messages leased on their way in leave no dead index entries for the next claim to walk', async () => {
    // before 0032 each claimed message left its pending version's outbox_active entry behind, and no scan may mark
    // it dead while a REPEATABLE READ snapshot holds the xmin horizon: the next claim walked all 400
    const holder = new pg.Client({ connectionString: db.url });
    const claimer = new pg.Client({ connectionString: db.url });
    await Promise.all([holder.connect(), claimer.connect()]);
    try {
      await holder.query(`begin isolation level repeatable read`);
      await holder.query(`select count(*) from cloud.endpoint`);  // the snapshot is taken: the horizon is held
      await enqueue({ n: 400 });
      for (let i = 0; i < 8; i++) expect((await claimer.query(`select * from cloud.claim_messages('w1', 50)`)).rows).toHaveLength(50);
      await enqueue({ n: 10 });
      await claimer.query(`select pg_stat_force_next_flush()`);
      const read = async () =>
        Number((await q(`select idx_tup_read from pg_stat_user_indexes where schemaname = 'cloud' and indexrelname = 'outbox_active'`)).rows[0].idx_tup_read);
      const before = await read();
      expect((await claimer.query(`select * from cloud.claim_messages('w1', 10)`)).rows).toHaveLength(10);
      await claimer.query(`select pg_stat_force_next_flush()`);
      // claim.test.ts reads 400 or more here for messages that had a pending version in the hot table
      expect((await read()) - before).toBeLessThan(20);
    } finally {
      await holder.query('rollback').catch(() => undefined);
      await Promise.all([holder.end(), claimer.end()]);
    }
  });

  it('older due work of the same endpoint in the hot table goes first', async () => {
    const [old] = await enqueue();
    const [first] = await claim();
    await q(`select cloud.give_back_messages('w1', array[$1::uuid])`, [first!.request_id]);  // pending again, in the hot table
    const [young] = await enqueue();
    const one = await claim('w1', 1);
    expect(one.map((m) => m.request_id)).toEqual([old]);
    expect(await statusOf(young!)).toMatchObject({ t: 'cloud.outbox', status: 'pending' });
    expect((await claim('w1', 1)).map((m) => m.request_id)).toEqual([young]);
  });

  it('of two messages of one ordering key taken together only the first goes; the second follows once it is sent', async () => {
    const [first, second] = await enqueue({ key: 'po:7', n: 2 });
    const claimed = await claim();
    expect(claimed.map((m) => m.request_id)).toEqual([first]);
    expect(await statusOf(second!)).toMatchObject({ t: 'cloud.outbox', status: 'pending', attempts: 0 });
    await ok('w1', claimed);
    expect((await claim()).map((m) => m.request_id)).toEqual([second]);
  });

  it('a message whose key has a failed or a dead message before it waits behind it', async () => {
    // failed: the cloud refused it for good; dead: its one allowed attempt failed
    for (const [state, outcome, status] of [['failed', 'permanent', 400], ['dead', 'retryable', 503]] as const) {
      await resetProductState(db.pool);
      await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook', p_max_attempts => 1)`);
      const [head] = await enqueue({ key: 'po:9' });
      const [m] = await claim();
      await q(`select * from cloud.record_attempts('w1', $1::jsonb)`, [JSON.stringify([{
        request_id: m!.request_id, attempt: m!.attempt, outcome, method: 'POST', url: 'http://127.0.0.1:9/webhook',
        http_status: status, duration_ms: 1, started_at: new Date().toISOString(), error_class: `http_${status}`, error_message: 'no' }])]);
      expect(await statusOf(head!)).toMatchObject({ status: state });
      const [next] = await enqueue({ key: 'po:9' });
      expect(await claim()).toEqual([]);
      expect(await statusOf(next!)).toMatchObject({ t: 'cloud.outbox', status: 'pending', attempts: 0 });
    }
  });

  it('a message of another key, or of none, is not held back by a parked key', async () => {
    const [a1, a2] = await enqueue({ key: 'po:1', n: 2 });
    const [b1] = await enqueue({ key: 'po:2' });
    const [free] = await enqueue();
    const claimed = await claim();
    expect(claimed.map((m) => m.request_id).sort()).toEqual([a1, b1, free].sort());
    expect(await statusOf(a2!)).toMatchObject({ status: 'pending' });
  });

  it('a rate-limited endpoint\'s messages go through its budget, not around it', async () => {
    await q(`select cloud.put_endpoint_limits('hook', p_rate_per_s => 1, p_burst => 2)`);
    await enqueue({ n: 5 });
    const claimed = await claim();
    expect(claimed).toHaveLength(2);
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 2, 'cloud.outbox pending': 3 });
  });

  it('a paused endpoint, an open circuit or a disabled endpoint leases nothing: its messages wait pending in the hot table', async () => {
    const cases = [
      `update cloud.endpoint set paused_until = now() + interval '1 minute', pause_reason = 'HTTP 429' where name = 'hook'`,
      `update cloud.endpoint set circuit_state = 'open', circuit_opened_at = now(), circuit_reason = '5 failures in a row' where name = 'hook'`,
      `update cloud.endpoint set enabled = false where name = 'hook'`,
    ];
    for (const setUp of cases) {
      await resetProductState(db.pool);
      await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook')`);
      await q(setUp);
      await enqueue({ n: 3 });
      expect(await claim()).toEqual([]);
      expect(await where()).toEqual({ 'cloud.outbox pending': 3 });
    }
  });

  it('a message not due yet (p_not_before) waits pending, and goes when due', async () => {
    const [later] = await enqueue({ notBefore: new Date(Date.now() + 3_600_000).toISOString() });
    expect(await claim()).toEqual([]);
    expect(await statusOf(later!)).toMatchObject({ t: 'cloud.outbox', status: 'pending', attempts: 0 });
    const due = (await q<Claimed>(`select * from cloud.claim_messages('w1', 10, null, interval '5 seconds', now() + interval '2 hours')`)).rows;
    expect(due.map((m) => m.request_id)).toEqual([later]);
  });

  it('takes no more than the claim\'s limit, and only the endpoints the listener serves', async () => {
    const hook = await enqueue({ n: 5 });
    const other = await enqueue({ endpoint: 'other', n: 2 });
    const claimed = await claim('w1', 2, ['hook']);
    expect(claimed.map((m) => m.request_id)).toEqual(hook.slice(0, 2));
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 2, 'cloud.outbox_intake pending': 5 });
    const rest = await claim('w2', 100, ['other']);
    expect(rest.map((m) => m.request_id)).toEqual(other);
  });

  it('two listeners claiming at once lease each message once', async () => {
    const ids = await enqueue({ n: 200 });
    const a = await db.pool.connect();
    const b = await db.pool.connect();
    try {
      await a.query('begin');
      await b.query('begin');
      const first = (await a.query<Claimed>(`select * from cloud.claim_messages('w1', 150)`)).rows;
      // the second skips what the first holds in the intake, and takes the rest: all but the rows the
      // first read past its limit to know it had reached it (0036: at most two, held until it commits)
      const second = (await b.query<Claimed>(`select * from cloud.claim_messages('w2', 150)`)).rows;
      await a.query('commit');
      await b.query('commit');
      expect(first).toHaveLength(150);
      expect(second.length).toBeGreaterThanOrEqual(48);
      const third = await claim('w3', 150);
      expect(first.length + second.length + third.length).toBe(200);
      const all = [...first, ...second, ...third].map((m) => m.request_id);
      expect(new Set(all).size).toBe(all.length);
      expect(all.sort()).toEqual([...ids].sort());
    } finally {
      a.release();
      b.release();
    }
  });

  it('a claim rolled back leaves its messages in the intake, as they were', async () => {
    const ids = await enqueue({ n: 3 });
    const c = await db.pool.connect();
    try {
      await c.query('begin');
      expect((await c.query(`select * from cloud.claim_messages('w1', 100)`)).rows).toHaveLength(3);
      await c.query('rollback');
    } finally {
      c.release();
    }
    expect(await where()).toEqual({ 'cloud.outbox_intake pending': 3 });
    expect((await claim()).map((m) => m.request_id)).toEqual(ids);
  });
});
