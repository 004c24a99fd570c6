/**
 * What waits in cloud.outbox_intake leaves it in bounded steps, whatever it is (issue 15, migration 0036).
 * A claim reads the intake in its own order up to the p_limit-th message it may lease on the way in or the
 * 2,000th it may not, and moves every message it read into the hot table: so messages of endpoints this
 * listener may not lease now (paused, limited, disabled), or does not serve and whose own listener has left
 * them waiting over a second, neither make every claim read them again nor hold back the messages enqueued
 * after them for more than one claim per 2,000. Another listener's fresh messages are left to it. Counts,
 * rows read and order only, never a duration.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';
import { startListener } from './helpers/listener.js';
import { resetProductState } from './helpers/reset.js';
import { reportDelivered, whereMessages } from './helpers/outbox.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('intake_drain');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('mine', 'http://127.0.0.1:9/mine')`);
  await q(`select cloud.put_endpoint('theirs', 'http://127.0.0.1:9/theirs')`);
});

interface Claimed { request_id: string; endpoint: string; attempt: number }

/** n messages for the endpoint, in order (one statement: ids ascending). */
const enqueue = async (endpoint: string, n: number, key: string | null = null) =>
  (await q<{ id: string }>(
    `select cloud.enqueue_message($1, 'demo.ping', jsonb_build_object('i', g), null, null, $2) as id
       from generate_series(1, $3::int) g order by g`, [endpoint, key, n])).rows.map((r) => r.id);

/**
 * The claim's now: `laterS` seconds after the newest message was enqueued, not the clock, so that what counts as
 * fresh (another listener's messages are a claim's to move only once they have waited a second) does not depend on
 * how fast a loaded machine runs the test. As text: a JavaScript Date would drop the microseconds.
 */
const nowAfter = async (laterS = 0) =>
  (await q<{ at: string }>(`select (coalesce(max(created_at), clock_timestamp()) + make_interval(secs => $1))::text as at
                              from cloud.outbox`, [laterS])).rows[0]!.at;

const claim = async (worker: string, limit: number, endpoints: string[] | null, laterS = 0) =>
  (await q<Claimed>(`select * from cloud.claim_messages($1, $2, $3, p_now => $4::timestamptz)`,
    [worker, limit, endpoints, await nowAfter(laterS)])).rows;

/** A claim, and how many intake rows its scans read. */
async function claimCounted(worker: string, limit: number, endpoints: string[] | null, laterS = 0) {
  const at = await nowAfter(laterS);
  const c = await db.pool.connect();
  try {
    // the backend's counts not yet flushed to the statistics include what it read before: a difference
    const counted = async () => Number((await c.query<{ n: string }>(
      `select pg_stat_get_xact_tuples_returned('cloud.outbox_intake'::regclass) as n`)).rows[0]!.n);
    await c.query('begin');
    const before = await counted();
    const claimed = (await c.query<Claimed>(`select * from cloud.claim_messages($1, $2, $3, p_now => $4::timestamptz)`,
      [worker, limit, endpoints, at])).rows;
    const read = (await counted()) - before;
    await c.query('commit');
    return { claimed, read };
  } finally {
    c.release();
  }
}

const where = () => whereMessages(db.pool);

/** Where the messages of one endpoint are, and whether any was ever tried or leased. */
const stateOf = async (endpoint: string) =>
  (await q<{ place: string; n: number; tried: number; leased: number }>(
    `select tableoid::regclass::text || ' ' || status as place, count(*)::int as n,
            count(*) filter (where attempts > 0)::int as tried, count(*) filter (where locked_by is not null)::int as leased
       from cloud.outbox where endpoint = $1 group by 1 order by 1`, [endpoint])).rows;

describe('the intake drains in bounded steps, whatever waits in it', () => {
  it('another listener\'s backlog that has waited is read once, 2,000 a claim, and joins the hot table untouched', async () => {
    await enqueue('theirs', 2500);
    const mine = await enqueue('mine', 3);

    // two seconds on: their listener has left them waiting (it is down)
    const first = await claimCounted('w1', 10, ['mine'], 2);
    expect(first.claimed).toEqual([]);
    // the 2,000 it may not lease, and the one that told it to stop (and the one the read fetched ahead)
    expect(first.read).toBeGreaterThanOrEqual(2000);
    expect(first.read).toBeLessThanOrEqual(2002);
    expect(await where()).toEqual({ 'cloud.outbox pending': 2000, 'cloud.outbox_intake pending': 503 });

    // the next claim reaches this listener's messages: before 0036 each claim read the whole backlog again
    const second = await claimCounted('w1', 10, ['mine'], 2);
    expect(second.claimed.map((m) => m.request_id)).toEqual(mine);
    expect(second.read).toBeLessThanOrEqual(503);
    expect(await stateOf('theirs')).toEqual([{ place: 'cloud.outbox pending', n: 2500, tried: 0, leased: 0 }]);

    // their own listener takes them from the hot table, oldest first
    const theirs = await claim('w2', 100, ['theirs']);
    expect(theirs).toHaveLength(100);
    const order = (await q<{ request_id: string }>(
      `select request_id from cloud.outbox where endpoint = 'theirs' order by id limit 100`)).rows.map((r) => r.request_id);
    expect(theirs.map((m) => m.request_id)).toEqual(order);
  });

  it('another listener\'s fresh messages are left to it: a claim beside its claim neither takes nor holds them', async () => {
    const theirs = await enqueue('theirs', 3);
    const mine = await enqueue('mine', 2);
    const a = await db.pool.connect();
    const b = await db.pool.connect();
    try {
      await a.query('begin');
      await b.query('begin');
      const at = await nowAfter();
      const first = (await a.query<Claimed>(`select * from cloud.claim_messages('w1', 1, '{mine}', p_now => $1::timestamptz)`, [at])).rows;
      // their own listener's claim, woken by the same NOTIFY while the first is open, gets every one of them
      const second = (await b.query<Claimed>(`select * from cloud.claim_messages('w2', 10, '{theirs}', p_now => $1::timestamptz)`, [at])).rows;
      await a.query('commit');
      await b.query('commit');
      expect(first.map((m) => m.request_id)).toEqual(mine.slice(0, 1));
      expect(second.map((m) => m.request_id)).toEqual(theirs);
      expect(await where()).toEqual({ 'cloud.outbox in_flight': 4, 'cloud.outbox_intake pending': 1 });
    } finally {
      a.release();
      b.release();
    }
  });

  it('a paused endpoint\'s backlog leaves the intake 2,000 a claim; what was enqueued after it goes in the claim that reaches it', async () => {
    await q(`update cloud.endpoint set paused_until = now() + interval '1 hour', pause_reason = 'test' where name = 'theirs'`);
    await enqueue('theirs', 4100);
    const mine = await enqueue('mine', 2);
    const claims: Claimed[][] = [];
    for (let i = 0; i < 3; i++) claims.push(await claim('w1', 10, null));
    // before 0036 a claim moved 10 of the paused messages and leased nothing: 411 claims to reach these
    expect(claims.map((c) => c.length)).toEqual([0, 0, 2]);
    expect(claims[2]!.map((m) => m.request_id)).toEqual(mine);
    expect(await stateOf('theirs')).toEqual([{ place: 'cloud.outbox pending', n: 4100, tried: 0, leased: 0 }]);
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 2, 'cloud.outbox pending': 4100 });
  });

  it('a disabled or rate-limited endpoint\'s backlog leaves the intake the same way', async () => {
    await q(`update cloud.endpoint set enabled = false where name = 'theirs'`);
    await q(`select cloud.put_endpoint('limited', 'http://127.0.0.1:9/limited')`);
    await q(`select cloud.put_endpoint_limits('limited', 1)`);
    await enqueue('theirs', 1500);
    await enqueue('limited', 1500);
    const mine = await enqueue('mine', 1);
    const first = await claim('w1', 10, null);
    // the limited endpoint's budget (burst 1) lets its oldest go from the hot table; the rest wait pending
    expect(first.filter((m) => m.endpoint === 'mine')).toEqual([]);
    const second = await claim('w1', 10, null);
    expect(second.filter((m) => m.endpoint === 'mine').map((m) => m.request_id)).toEqual(mine);
    expect(await stateOf('theirs')).toEqual([{ place: 'cloud.outbox pending', n: 1500, tried: 0, leased: 0 }]);
    expect((await q(`select count(*)::int as n from only cloud.outbox_intake`)).rows[0].n).toBe(0);
  });

  it('a claim reads no more of the intake than it takes, and leaves the rest of its own messages there', async () => {
    const ids = await enqueue('mine', 5000);
    const { claimed, read } = await claimCounted('w1', 10, ['mine']);
    expect(claimed.map((m) => m.request_id)).toEqual(ids.slice(0, 10));
    expect(read).toBeLessThanOrEqual(12);
    // the other 4,990 are still in the intake: each goes into the hot table once, leased, by a later claim
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 10, 'cloud.outbox_intake pending': 4990 });
  });

  it('a claim of no message takes nothing from the intake, and holds nothing there', async () => {
    await enqueue('theirs', 5);
    await enqueue('mine', 5);
    const c = await db.pool.connect();
    try {
      await c.query('begin');
      expect((await c.query(`select * from cloud.claim_messages('w1', 0, '{mine}')`)).rows).toEqual([]);
      expect((await c.query(`select * from cloud.claim_messages('w1', 0, null)`)).rows).toEqual([]);
      // while that transaction is open, every row can be locked by another
      const free = await q<{ n: number }>(`select count(*)::int as n from (select from only cloud.outbox_intake for update skip locked) s`);
      expect(free.rows[0]!.n).toBe(10);
      await c.query('commit');
    } finally {
      c.release();
    }
    expect(await where()).toEqual({ 'cloud.outbox_intake pending': 10 });
  });

  it('messages not due yet leave the intake 2,000 a claim and do not hold back one due behind them', async () => {
    await q(`select cloud.enqueue_message('mine', 'demo.ping', jsonb_build_object('i', g), p_not_before => now() + interval '1 hour')
               from generate_series(1, 500) g`);
    const due = await enqueue('mine', 1);
    // before, each claim of 10 moved 10 of them and leased none: the due one went in the 51st
    expect((await claim('w1', 10, ['mine'])).map((m) => m.request_id)).toEqual(due);
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 1, 'cloud.outbox pending': 500 });
  });

  it('per-key order holds across endpoints: a key\'s message waits for an older one another listener sends', async () => {
    const [older] = await enqueue('theirs', 1, 'order-7');
    const [newer] = await enqueue('mine', 1, 'order-7');
    expect(await claim('w1', 10, ['mine'])).toEqual([]);
    // the older one is fresh, so it stays in the intake for its own listener; it holds the key there too
    expect(await where()).toEqual({ 'cloud.outbox pending': 1, 'cloud.outbox_intake pending': 1 });
    expect(await claim('w1', 10, ['mine'], 2)).toEqual([]);
    expect(await where()).toEqual({ 'cloud.outbox pending': 2 });
    const theirs = await claim('w2', 10, ['theirs']);
    expect(theirs.map((m) => m.request_id)).toEqual([older]);
    expect(await claim('w1', 10, ['mine'])).toEqual([]);
    await reportDelivered(db.pool, 'w2', theirs);
    expect((await claim('w1', 10, ['mine'])).map((m) => m.request_id)).toEqual([newer]);
  });

  it('two listeners serving different endpoints drain a mixed intake between them, each message once', async () => {
    const mineIds = await enqueue('mine', 300);
    const theirIds = await enqueue('theirs', 300);
    const seen = new Map<string, string>();
    for (let round = 0; round < 20 && seen.size < 600; round++) {
      for (const [worker, endpoint] of [['w1', 'mine'], ['w2', 'theirs']] as const) {
        const got = await claim(worker, 50, [endpoint]);
        for (const m of got) {
          expect(m.endpoint).toBe(endpoint);
          expect(seen.has(m.request_id)).toBe(false);
          seen.set(m.request_id, worker);
        }
        await reportDelivered(db.pool, worker, got);
      }
    }
    expect([...seen.keys()].sort()).toEqual([...mineIds, ...theirIds].sort());
  });
});

describe('a listener whose claim leased nothing looks again at once while the intake holds work it may take (0038)', () => {
  /** cloud.next_due_at for these endpoints at the claim's "now", as seconds after that now (null: none). */
  const dueIn = async (endpoints: string[] | null, laterS = 0) => {
    const at = await nowAfter(laterS);
    const r = (await q<{ s: number | null }>(`select extract(epoch from cloud.next_due_at($1, $2::timestamptz) - $2::timestamptz)::float8 as s`,
      [endpoints, at])).rows[0]!.s;
    return r === null ? null : Math.round(r * 1000) / 1000;
  };

  it('in 50 ms while its own messages or ones waiting over a second are in the intake; not for another listener\'s fresh ones, nor an empty intake', async () => {
    expect(await dueIn(['mine'])).toBeNull();
    await enqueue('theirs', 10);
    expect(await dueIn(['mine'])).toBeNull(); // theirs are fresh: their own listener's to take
    expect(await dueIn(null)).toBe(0.05); // a listener of every endpoint takes them
    expect(await dueIn(['mine'], 2)).toBe(0.05); // waited over a second: any claim moves them
    await enqueue('mine', 1);
    expect(await dueIn(['mine'])).toBe(0.05);
    // a claim that takes the intake empty: nothing to look again for (theirs now wait in the hot table for their own listener)
    expect(await claim('w1', 10, ['mine'], 2)).toHaveLength(1);
    expect(await where()).toEqual({ 'cloud.outbox pending': 10, 'cloud.outbox in_flight': 1 });
    expect(await dueIn(['mine'], 2)).toBeNull();
  });

  it('an idle listener sends its own message from behind 2,500 of another listener\'s that have waited, without waiting for its poll', async () => {
    // their listener has its own wake channel (as a split usually does): their enqueues and the maintenance's wake are not ours
    await q(`select cloud.put_endpoint('theirs', 'http://127.0.0.1:9/theirs', p_wake_channel => 'theirs_wake')`);
    // polls and maintenance a minute apart: after its start, only a NOTIFY on its channel or its own look-ahead make it claim
    const listener = await startListener(db.url, { ERP_CLOUD_ENDPOINTS: 'mine', ERP_CLOUD_POLL_MS: '60000', ERP_CLOUD_MAINTENANCE_MS: '60000' });
    try {
      await waitFor(async () => listener.worker.health().listen, { what: 'the listener listening' });
      await new Promise((r) => setTimeout(r, 300)); // its start-up claims are over (a later one would only make this test pass for the wrong reason)
      await enqueue('theirs', 2500);
      await q(`update cloud.outbox_intake set created_at = created_at - interval '2 seconds'`);
      // the NOTIFY of this enqueue makes it claim: that claim moves 2,000 of theirs and leases nothing; what sends
      // the message is the claim again 50 ms later
      const [mine] = await enqueue('mine', 1);
      await waitFor(async () => (await q(`select 1 from cloud.log where request_id = $1`, [mine])).rowCount, { what: 'the attempt of the message behind the backlog' });
    } finally {
      await listener.stop();
    }
    expect((await q<{ n: number }>(`select count(*)::int n from cloud.outbox_intake`)).rows[0]!.n).toBe(0);
    expect((await q<{ n: number }>(`select count(*)::int n from cloud.outbox where endpoint = 'theirs' and status = 'pending' and attempts = 0`)).rows[0]!.n).toBe(2500);
  });
});
