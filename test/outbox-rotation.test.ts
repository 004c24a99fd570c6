/**
 * What the ERP pays per enqueue and what the queue leaves behind (issue 15, ADR 0002): the enqueue
 * keeps its guarantees and errors with one look-up and no CHECK constraint on the insert; sent
 * messages leave the hot table by rotation (cloud.rotate_outbox: archive + TRUNCATE), so its dead
 * tuples stay bounded by what flows between two rotations even while a snapshot is held, and every
 * message still has one answer in cloud.outbox.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, rolledBack, sqlstateOf, statusCounts, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { keepAutovacuumOffTheQueue, reportDelivered, whereMessages } from './helpers/outbox.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('rotation');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
  // every test here asserts what one rotation did (and counts dead tuples autovacuum would remove)
  await keepAutovacuumOffTheQueue(db.pool);
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook', p_max_attempts => 3)`);
});

const enqueueMany = async (n: number, key: string | null = null) =>
  (await q<{ id: string }>(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('i', g), 'erp.doc', g::text, $2) as id
                               from generate_series(1, $1) g`, [n, key])).rows.map((r) => r.id);

const ok = (worker: string, claimed: Array<{ request_id: string; attempt: number }>) => reportDelivered(db.pool, worker, claimed);
const where = () => whereMessages(db.pool);

const claim = async (worker: string, limit = 1000) =>
  (await q<{ request_id: string; attempt: number; ordering_key: string | null }>(`select * from cloud.claim_messages($1, $2)`, [worker, limit])).rows;

// the pages of the hot table and of the intake the ERP writes (0029), and of their indexes (the statistics counters lag: pages do not)
const hotSize = async () =>
  (await q<{ heap: number; idx: number }>(`select (pg_relation_size('cloud.outbox') + pg_relation_size('cloud.outbox_intake'))::int as heap,
                                                  (pg_indexes_size('cloud.outbox') + pg_indexes_size('cloud.outbox_intake'))::int as idx`)).rows[0]!;

describe('what the ERP pays per enqueue', () => {
  it('a message enqueued by a rolled-back ERP transaction never reaches the cloud', async () => {
    await rolledBack(db.pool, (c) => c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}') from generate_series(1, 5)`));
    expect(await statusCounts(db.pool)).toEqual({});
    expect(await claim('w1')).toEqual([]);
  });

  it('bad input is still refused at enqueue with EC001–EC004, and writes nothing', async () => {
    expect(await sqlstateOf(q(`select cloud.enqueue_message('nope', 'demo.ping', '{}')`))).toBe(SqlState.unknownEndpoint);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'Bad Op!', '{}')`))).toBe(SqlState.invalidOperation);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', '3')`))).toBe(SqlState.invalidPayload);
    const [id] = await enqueueMany(1);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', '{}', p_request_id => $1)`, [id]))).toBe(SqlState.duplicateRequestId);
    expect(await statusCounts(db.pool)).toEqual({ pending: 1 });
  });

  it('a request_id sent and rotated into the archive is still refused a second time (EC004)', async () => {
    const ids = await enqueueMany(3);
    await ok('w1', await claim('w1'));
    expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(3);
    expect(await where()).toEqual({ 'cloud.outbox_archive sent': 3 });
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', '{}', p_request_id => $1)`, [ids[1]]))).toBe(SqlState.duplicateRequestId);
    expect(await statusCounts(db.pool)).toEqual({ sent: 3 });
  });

  it('an update that leaves a message with an unknown status, or a lease outside in_flight, is refused with 23514 naming the invariant', async () => {
    const [id] = await enqueueMany(1);
    for (const [sql, name] of [
      [`update cloud.outbox set status = 'lost' where request_id = $1`, 'outbox_status_known'],
      [`update cloud.outbox set locked_until = now() where request_id = $1`, 'outbox_lease_only_in_flight'],
      [`update cloud.outbox set status = 'in_flight' where request_id = $1`, 'outbox_lease_only_in_flight'],
    ] as const) {
      const err = await q(sql, [id]).then(() => null, (e: { code?: string; message?: string }) => e);
      expect(err?.code, sql).toBe('23514');
      expect(err?.message, sql).toContain(name);
    }
    expect((await q(`select status, locked_until from cloud.outbox where request_id = $1`, [id])).rows).toEqual([{ status: 'pending', locked_until: null }]);
  });
});

describe('no bloat while a snapshot is held', () => {
  it('rotation never loses an in-flight message: pending, leased, failed and dead ones go back unchanged, and the lease is finished after it', async () => {
    await enqueueMany(40);
    const claimed = await claim('w1', 30);
    await ok('w1', claimed.slice(0, 10));
    // 10 sent, 20 leased, 10 pending; one leased fails permanently
    await q(`select * from cloud.record_attempts('w1', $1::jsonb)`, [JSON.stringify([{ request_id: claimed[10]!.request_id, attempt: 1, outcome: 'permanent', http_status: 400, started_at: new Date().toISOString() }])]);
    const before = (await q(`select request_id, id, status, attempts, locked_by, locked_until, next_attempt_at, payload from cloud.outbox
                              where status <> 'sent' order by id`)).rows;
    expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(10);
    const after = (await q(`select request_id, id, status, attempts, locked_by, locked_until, next_attempt_at, payload from cloud.outbox
                             where status <> 'sent' order by id`)).rows;
    expect(after).toEqual(before);
    expect(await where()).toEqual({ 'cloud.outbox failed': 1, 'cloud.outbox in_flight': 19, 'cloud.outbox pending': 10, 'cloud.outbox_archive sent': 10 });
    // the listener finishes the leases it held before the rotation, and claims the rest
    const outcomes = (await ok('w1', claimed.slice(11))).rows.map((r) => r.status);
    expect(outcomes).toEqual(Array(19).fill('sent'));
    await ok('w2', await claim('w2'));
    expect(await statusCounts(db.pool)).toEqual({ sent: 39, failed: 1 });
  });

  it('rotation keeps each ordering key in enqueue order: the head still parks its key, the next waits', async () => {
    const ids = await enqueueMany(3, 'po:1');
    const [head] = await claim('w1');
    expect(head!.request_id).toBe(ids[0]);
    await q(`select * from cloud.record_attempts('w1', $1::jsonb)`, [JSON.stringify([{ request_id: head!.request_id, attempt: 1, outcome: 'permanent', http_status: 422, started_at: new Date().toISOString() }])]);
    await q(`select cloud.rotate_outbox(0)`);
    expect(await claim('w1')).toEqual([]);  // parked behind the failed head
    await q(`select cloud.skip_message($1, 'test: give up the head')`, [ids[0]]);
    expect((await claim('w1')).map((m) => m.request_id)).toEqual([ids[1]]);
  });

  it('while a snapshot is held the hot table\'s dead tuples stay bounded by the rotation size, not by the messages that flowed, and it shrinks back', async () => {
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      await holder.query(`begin isolation level repeatable read`);
      await holder.query(`select count(*) from cloud.endpoint`);  // holds the xmin horizon, not a lock on the outbox
      const rounds = 8, perRound = 200;
      const peak = { heap: 0, idx: 0 };
      for (let r = 0; r < rounds; r++) {
        await enqueueMany(perRound);
        await ok('w1', await claim('w1'));
        const grown = await hotSize();
        peak.heap = Math.max(peak.heap, grown.heap);
        peak.idx = Math.max(peak.idx, grown.idx);
        expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(perRound);
        // what 200 messages left behind (an intake row moved out, three row versions in the hot table, all dead but
        // one and unreclaimable) is gone: each index is back to its metapage (3 on the hot table, 2 on the intake)
        expect(await hotSize()).toEqual({ heap: 0, idx: 5 * 8192 });
      }
      // the hot table never held more than one round's pages: bounded by the rotation, not by the 1,600 messages
      expect(peak.heap).toBeLessThan(3 * perRound * 1024);
      expect(await statusCounts(db.pool)).toEqual({ sent: rounds * perRound });
      // the archive only grew by inserts: every row version in it is live
      expect((await q(`select count(*)::int as n from cloud.outbox_archive`)).rows[0].n).toBe(rounds * perRound);
    } finally {
      await holder.query('rollback').catch(() => {});
      await holder.end();
    }
  });

  it('rotation waits for a pg_dump-like lock holder instead of blocking the ERP: it gives up, the ERP enqueues, and the next round rotates', async () => {
    await enqueueMany(5);
    await ok('w1', await claim('w1'));
    const dump = new pg.Client({ connectionString: db.url });
    await dump.connect();
    try {
      await dump.query(`begin isolation level repeatable read`);
      await dump.query(`select count(*) from cloud.outbox`);  // ACCESS SHARE until commit, as pg_dump holds it
      expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBeNull();  // a young holder: tried, gave up in 50 ms
      await dump.query(`select pg_sleep(1.1)`);
      expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBeNull();  // a long one: not even tried
      // nothing was copied for good, nor left behind as dead rows of undone copies beyond the first try's
      expect((await q(`select count(*)::int as n from cloud.outbox_archive`)).rows[0].n).toBe(0);
      // the ERP is not queued behind a waiting rotation: its enqueue goes through while the holder still holds
      await enqueueMany(2);
      expect((await dump.query(`select count(*)::int as n from cloud.outbox`)).rows[0].n).toBe(5);  // its snapshot is intact
      expect((await q(`select cloud.reap_expired_leases() as n`)).rows[0].n).toBe(0);  // maintenance goes on without the rotation
    } finally {
      await dump.query('commit').catch(() => {});
      await dump.end();
    }
    // the two new messages wait in the intake (0029) until a claim or the next rotation moves them into the hot table
    expect(await where()).toEqual({ 'cloud.outbox sent': 5, 'cloud.outbox_intake pending': 2 });
    expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(5);
    expect(await where()).toEqual({ 'cloud.outbox pending': 2, 'cloud.outbox_archive sent': 5 });
  });

  it('a backlog of over 1,000 messages in the intake stays there through a rotation, and the ERP enqueues while the rotation holds the hot table', async () => {
    await enqueueMany(3);
    await ok('w1', await claim('w1'));
    expect(await where()).toEqual({ 'cloud.outbox sent': 3 });
    await enqueueMany(1001);
    const rotation = await db.pool.connect();
    const erp = await db.pool.connect();
    try {
      await rotation.query('begin');
      expect((await rotation.query(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(3);
      // the rotation holds the hot table until it commits; the ERP's enqueue writes only the intake, which it left alone
      await erp.query(`set lock_timeout = '100ms'`);
      await erp.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}')`);
      await rotation.query('commit');
    } finally {
      await rotation.query('rollback').catch(() => undefined);
      rotation.release();
      erp.release();
    }
    expect(await where()).toEqual({ 'cloud.outbox_archive sent': 3, 'cloud.outbox_intake pending': 1002 });
    // at 1,000 or fewer, what waits in the intake joins the hot table and the intake is emptied with it
    await ok('w1', await claim('w1', 500));
    expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(500);
    expect(await where()).toEqual({ 'cloud.outbox pending': 502, 'cloud.outbox_archive sent': 503 });
  });

  it('a backlog the claims have mostly worked through goes with the rotation: the intake\'s dead tuples stay bounded by what waits in it', async () => {
    const claimer = await db.pool.connect();
    try {
      await enqueueMany(4000);
      const take = async (n: number) => {
        const claimed = (await claimer.query(`select * from cloud.claim_messages('w1', $1)`, [n])).rows;
        await claimer.query(`select pg_stat_force_next_flush()`);  // the claim's deletes reach the statistics now, not within 10 s
        await ok('w1', claimed);
      };
      await take(1000);  // 3,000 wait, 1,000 dead: the backlog stays where it is
      expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(1000);
      expect(await where()).toEqual({ 'cloud.outbox_archive sent': 1000, 'cloud.outbox_intake pending': 3000 });
      await take(1500);  // 1,500 wait, 2,500 dead: copied into the hot table, the intake emptied
      expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(1500);
      expect(await where()).toEqual({ 'cloud.outbox pending': 1500, 'cloud.outbox_archive sent': 2500 });
      expect((await q(`select pg_relation_size('cloud.outbox_intake')::int as bytes`)).rows[0].bytes).toBe(0);
    } finally {
      claimer.release();
    }
  });

  it('two rotations at once (two listeners reaping together) archive each sent message once and lose none', async () => {
    await enqueueMany(50);
    await ok('w1', await claim('w1', 30));
    const a = await db.pool.connect();
    const b = await db.pool.connect();
    try {
      await a.query('begin');
      await b.query('begin');
      const first = (await a.query(`select cloud.rotate_outbox(0) as n`)).rows[0].n;
      const second = (await b.query(`select cloud.rotate_outbox(0) as n`)).rows[0].n;  // while the first is not committed
      await a.query('commit');
      await b.query('commit');
      expect([first, second]).toEqual([30, null]);
    } finally {
      await a.query('rollback').catch(() => {});
      await b.query('rollback').catch(() => {});
      a.release();
      b.release();
    }
    expect(await where()).toEqual({ 'cloud.outbox pending': 20, 'cloud.outbox_archive sent': 30 });
    expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(0);
  });

  it('an archived message reads like any other: one row per request_id in cloud.outbox, its attempts in cloud.log, purged after the retention period', async () => {
    const ids = await enqueueMany(4);
    await ok('w1', await claim('w1'));
    await q(`select cloud.rotate_outbox(0)`);
    const { rows } = await q(`select request_id, status, attempts, response from cloud.outbox where request_id = any ($1::uuid[]) order by id`, [ids]);
    expect(rows).toEqual(ids.map((id) => ({ request_id: id, status: 'sent', attempts: 1, response: { ok: true } })));
    expect(await sqlstateOf(q(`select cloud.replay_message($1, 'test')`, [ids[0]]))).toBe(SqlState.messageNotReplayable);
    expect((await q(`select count(*)::int as n from cloud.log where request_id = any ($1::uuid[])`, [ids])).rows[0].n).toBe(4);
    expect((await q(`select cloud.purge_finished_messages('7 days', 1000, now() + interval '8 days') as n`)).rows[0].n).toBe(4);
    expect(await statusCounts(db.pool)).toEqual({});
  });

  it('maintenance rotates only when enough sent messages wait in the hot table', async () => {
    await enqueueMany(3);
    await ok('w1', await claim('w1'));
    expect((await q(`select cloud.rotate_outbox() as n`)).rows[0].n).toBe(0);  // default: 10,000 (0033)
    await q(`select cloud.reap_expired_leases()`);
    expect(await where()).toEqual({ 'cloud.outbox sent': 3 });
    // the listener's reaping (every few seconds) rotates once 10,000 sent messages wait
    await enqueueMany(9996);
    for (let round = 0; round < 5; round++) await ok('w1', await claim('w1', 2000));
    expect((await q(`select cloud.reap_expired_leases() as n`)).rows[0].n).toBe(0);
    expect(await where()).toEqual({ 'cloud.outbox sent': 9999 });
    await enqueueMany(1);
    await ok('w1', await claim('w1'));
    await enqueueMany(5);
    expect((await q(`select cloud.reap_expired_leases() as n`)).rows[0].n).toBe(0);
    expect(await where()).toEqual({ 'cloud.outbox pending': 5, 'cloud.outbox_archive sent': 10000 });
  });
});
