/**
 * The claim's round trip stays flat while a snapshot is held (issue 15 §2, migration 0031): every claim
 * walks one dead index entry per message claimed since the last rotation while the xmin horizon is held,
 * so a busy listener asks for a rotation on a short tick of its own (ERP_CLOUD_ROTATE_MS), apart from its
 * maintenance round: at 10,000 sent messages (1,000 before 0033), or 100 while a transaction has held a snapshot for over a
 * second. A call with nothing to do stops at its first count. Counts only, never a duration.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { keepAutovacuumOffTheQueue, reportDelivered } from './helpers/outbox.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

let db: TestDb;
let sim: SimServer;
let listener: InProcessListener | null = null;

beforeAll(async () => {
  db = await createTestDb('rotation_tick');
  await keepAutovacuumOffTheQueue(db.pool);  // a test here asserts what one rotation did
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  await listener?.stop();
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await listener?.stop();
  listener = null;
  sim.reset();
  await resetProductState(db.pool);
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 10000)`, [`${sim.url}/webhook`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});

const enqueue = (n: number) =>
  db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('i', g), 'erp.doc', g::text) from generate_series(1, $1) g`, [n]);
const count = async (sql: string) => (await db.pool.query<{ n: number }>(sql)).rows[0]!.n;
const archived = () => count(`select count(*)::int as n from cloud.outbox_archive`);
const sent = async () => (await statusCounts(db.pool)).sent ?? 0;

/** The listener's tick state (private): what it reported since its last tick, and whether a tick's call is running. */
const tickOf = (l: InProcessListener) => l.worker as unknown as { sentSinceTick: number; rotating: boolean };

/** Until a tick has asked (and been answered) since the listener's last report of a sent message. */
const tickAnswered = (l: InProcessListener) =>
  waitFor(async () => tickOf(l).sentSinceTick === 0 && !tickOf(l).rotating, { what: 'a rotation tick after the last report' });

describe('the rotation tick', () => {
  it('a busy listener archives what it sent between two maintenance rounds: at 10,000 sent messages, and not before', async () => {
    // 9,990 sent before the listener starts (claimed and reported here, as another listener would): the tick counts the hot table's
    await enqueue(9990);
    for (let round = 0; round < 10; round++) {
      const claimed = (await db.pool.query<{ request_id: string; attempt: number }>(`select * from cloud.claim_messages('w0', 999)`)).rows;
      await reportDelivered(db.pool, 'w0', claimed);
    }
    expect(await sent()).toBe(9990);
    // one maintenance round, at start (9,990 < 10,000): whatever rotates afterwards is the tick
    listener = await startListener(db.url, { ERP_CLOUD_MAINTENANCE_MS: '600000', ERP_CLOUD_ROTATE_MS: '100' });
    await enqueue(9);
    await waitFor(async () => (await sent()) === 9999, { timeoutMs: 60_000, what: '9,999 sent' });
    await tickAnswered(listener);
    expect(await archived()).toBe(0);  // 9,999 < 10,000, nobody holds a snapshot
    await enqueue(1);
    await waitFor(async () => (await archived()) === 10000, { timeoutMs: 30_000, what: '10,000 archived by the tick' });
    expect(await count(`select count(*)::int as n from only cloud.outbox`)).toBe(0);
    expect(await statusCounts(db.pool)).toEqual({ sent: 10000 });
  });

  it('while a snapshot is held, a busy listener archives at 100 sent messages, so the claim walks few dead index entries; released, it waits for 10,000 again', async () => {
    listener = await startListener(db.url, { ERP_CLOUD_MAINTENANCE_MS: '600000', ERP_CLOUD_ROTATE_MS: '100' });
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      // a report in REPEATABLE READ that never touches the outbox: it holds the xmin horizon, not the tables
      await holder.query(`begin isolation level repeatable read`);
      await holder.query(`select count(*) from pg_catalog.pg_class`);
      await holder.query(`select pg_sleep(1.1)`);  // over a second old
      for (let round = 1; round <= 3; round++) {
        await enqueue(100);
        await waitFor(async () => (await archived()) === 100 * round, { timeoutMs: 30_000, what: `round ${round}: 100 more archived by the tick` });
      }
      // the outbox_active entries every claim would walk: at most one round's, not the 300 messages'
      expect(await count(`select count(*)::int as n from only cloud.outbox`)).toBe(0);
    } finally {
      await holder.query('commit').catch(() => {});
      await holder.end();
    }
    await enqueue(100);
    await waitFor(async () => (await sent()) === 400, { timeoutMs: 30_000, what: '400 sent' });
    await tickAnswered(listener);
    expect(await archived()).toBe(300);  // released: 100 sent wait for the 10,000 again
    expect(await statusCounts(db.pool)).toEqual({ sent: 400 });
  });

  it('a rotation that could not have its tables is asked again at the next tick, not only after the next message sent', async () => {
    // how often the listener's sessions called cloud.rotate_outbox (counted for sessions that start after this)
    await db.pool.query(`alter database ${db.name} set track_functions = 'pl'`);
    const calls = () => count(`select coalesce(sum(calls), 0)::int as n from pg_stat_user_functions
                                where schemaname = 'cloud' and funcname = 'rotate_outbox'`);
    const holder = new pg.Client({ connectionString: db.url });
    const locker = new pg.Client({ connectionString: db.url });
    await Promise.all([holder.connect(), locker.connect()]);
    try {
      listener = await startListener(db.url, { ERP_CLOUD_MAINTENANCE_MS: '600000', ERP_CLOUD_ROTATE_MS: '100' });
      await holder.query(`begin isolation level repeatable read`);
      await holder.query(`select count(*) from pg_catalog.pg_class`);
      await holder.query(`select pg_sleep(1.1)`);  // a snapshot held over a second: the tick archives at 100 sent
      // a session holding the hot table (as pg_dump does): no rotation can have it while this lasts
      await locker.query(`begin`);
      await locker.query(`lock table only cloud.outbox in access share mode`);
      await enqueue(100);
      await waitFor(async () => (await sent()) === 100, { timeoutMs: 30_000, what: '100 sent' });
      const before = await calls();
      // nothing more is sent, and the tick keeps asking
      await waitFor(async () => (await calls()) >= before + 2, { timeoutMs: 30_000, what: 'two more rotation calls after the last message' });
      expect(await archived()).toBe(0);
      await locker.query(`commit`);
      await waitFor(async () => (await archived()) === 100, { timeoutMs: 30_000, what: '100 archived once the table is free' });
      expect(await statusCounts(db.pool)).toEqual({ sent: 100 });
    } finally {
      await locker.query('rollback').catch(() => {});
      await holder.query('rollback').catch(() => {});
      await Promise.all([holder.end(), locker.end()]);
      await db.pool.query(`alter database ${db.name} reset track_functions`);
    }
  });

  it('a rotation with too few sent messages answers 0 at its first count, before it looks for long lock holders', async () => {
    await enqueue(3);
    const claimed = (await db.pool.query<{ request_id: string; attempt: number }>(`select * from cloud.claim_messages('w1', 10)`)).rows;
    await db.pool.query(`select * from cloud.record_attempts('w1', $1::jsonb)`, [JSON.stringify(claimed.map((m) => ({
      request_id: m.request_id, attempt: m.attempt, outcome: 'ok', method: 'POST', url: 'http://127.0.0.1:9/webhook', http_status: 200,
      duration_ms: 1, started_at: new Date().toISOString(), response: { ok: true },
    })))]);
    const dump = new pg.Client({ connectionString: db.url });
    await dump.connect();
    try {
      await dump.query(`begin isolation level repeatable read`);
      await dump.query(`select count(*) from cloud.outbox`);  // ACCESS SHARE until commit, as pg_dump holds it
      await dump.query(`select pg_sleep(1.1)`);
      expect((await db.pool.query(`select cloud.rotate_outbox(1000, 100) as n`)).rows[0].n).toBe(0);  // 3 sent: nothing to do
      expect((await db.pool.query(`select cloud.rotate_outbox(1000, 3) as n`)).rows[0].n).toBeNull();  // enough while held: the long holder wins
      expect((await db.pool.query(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBeNull();
    } finally {
      await dump.query('commit').catch(() => {});
      await dump.end();
    }
    expect((await db.pool.query(`select cloud.rotate_outbox(1000, 3) as n`)).rows[0].n).toBe(0);  // nobody holds a snapshot now
    expect((await db.pool.query(`select cloud.rotate_outbox(3) as n`)).rows[0].n).toBe(3);
  });
});
