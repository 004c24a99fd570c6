/**
 * A listener's idle flag ("it waits on LISTEN, so enqueuers NOTIFY") is a bit of the sequence
 * cloud.listener_idle_slots, not a column of its row (issue 15 §2, migration 0035): a listener flips
 * between idle and busy about a hundred times a second under load, and as row updates every flip left a
 * version that a held snapshot kept, for every claim and every ERP enqueue to walk. These tests hold
 * what the flag promises (per listener, per channel, nothing lost when two flip at once, freed when a
 * listener goes) and that flipping it writes no row. Counts and states only, never a duration.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('idle_flag');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook')`);
  await q(`select cloud.put_endpoint('other', 'http://127.0.0.1:9/other', p_wake_channel => 'other_channel')`);
});

const start = (worker: string, channels = '{cloud_outbox}') => q(`select cloud.record_listener_start($1, $2::text[])`, [worker, channels]);
const claim = async (worker: string, c: pg.Pool | pg.ClientBase = db.pool) =>
  (await c.query(`select * from cloud.claim_messages($1, 10)`, [worker])).rows;
const mask = async () => Number((await q<{ m: string }>(`select last_value::text as m from cloud.listener_idle_slots`)).rows[0]!.m);
const status = async () =>
  Object.fromEntries((await q<{ worker_id: string; slot: number; idle: boolean }>(
    `select worker_id, slot, idle from cloud.listener_status order by worker_id`)).rows.map((r) => [r.worker_id, { slot: r.slot, idle: r.idle }]));
const enqueue = (endpoint = 'hook') => q(`select cloud.enqueue_message($1, 'demo.ping', '{}')`, [endpoint]);

describe("a listener's idle flag", () => {
  it('gives each listener a slot of its own and flips only its bit: an empty claim sets it, a claim with work clears it', async () => {
    await start('w1');
    await start('w2');
    expect(await status()).toEqual({ w1: { slot: 0, idle: false }, w2: { slot: 1, idle: false } });
    await claim('w1');
    await claim('w2');
    expect(await mask()).toBe(0b11);
    await enqueue();
    expect(await claim('w2')).toHaveLength(1);
    expect(await status()).toEqual({ w1: { slot: 0, idle: true }, w2: { slot: 1, idle: false } });
    expect(await mask()).toBe(0b01);
  });

  it('leaves no row version behind, however many times it flips while a snapshot is held', async () => {
    await start('w1');
    const row = async () => (await q(`select xmin::text, ctid::text from cloud.listener where worker_id = 'w1'`)).rows[0];
    const before = await row();
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      await holder.query('begin isolation level repeatable read');
      await holder.query('select count(*) from cloud.outbox');
      for (let i = 0; i < 50; i++) {
        await enqueue();
        expect(await claim('w1')).toHaveLength(1); // busy
        expect(await claim('w1')).toHaveLength(0); // idle
      }
      expect(await row()).toEqual(before);
      expect((await status()).w1!.idle).toBe(true);
    } finally {
      await holder.query('rollback');
      await holder.end();
    }
  });

  it('loses no bit when two listeners flip at once: the second waits for the first one\'s read-modify-write', async () => {
    await start('w1');
    await start('w2');
    const c1 = await db.pool.connect();
    const c2 = await db.pool.connect();
    try {
      await c1.query('begin');
      await claim('w1', c1); // sets bit 0 and holds the mask's lock until commit
      const second = claim('w2', c2);
      await c1.query('commit');
      await second;
    } finally {
      c1.release();
      c2.release();
    }
    expect(await mask()).toBe(0b11);
  });

  it('is cleared when its listener stops or is reaped, and its slot goes to the next listener', async () => {
    await start('w1');
    await start('w2');
    await claim('w1');
    await claim('w2');
    await q(`select cloud.record_listener_stop('w1')`);
    expect(await mask()).toBe(0b10);
    await start('w3');
    expect((await status()).w3).toEqual({ slot: 0, idle: false });
    // w2 falls silent: the reaper forgets it after 2 minutes, and its bit with it
    await q(`update cloud.listener set heartbeat_at = now() - interval '3 minutes' where worker_id = 'w2'`);
    await q(`select cloud.reap_expired_leases()`);
    expect(await status()).toEqual({ w3: { slot: 0, idle: false } });
    expect(await mask()).toBe(0);
  });

  it('beyond 63 listeners shares slots, and a shared slot\'s bit outlives a sharer that goes', async () => {
    for (let i = 0; i < 64; i++) await start(`w${String(i).padStart(2, '0')}`);
    const s = await status();
    expect(new Set(Object.values(s).map((x) => x.slot)).size).toBe(63);
    expect(s.w63!.slot).toBe(0);
    await claim('w63');
    expect(await mask()).toBe(1);
    await q(`select cloud.record_listener_stop('w00')`); // w63 still has slot 0 and waits
    expect(await mask()).toBe(1);
    expect((await status()).w63!.idle).toBe(true);
  });

  it('makes an enqueue NOTIFY only when a listener on its own channel is idle, and makes a busy queue\'s enqueue read no listener row', async () => {
    const listen = new pg.Client({ connectionString: db.url });
    await listen.connect();
    const heard: string[] = [];
    listen.on('notification', (n) => heard.push(n.channel));
    await listen.query('listen cloud_outbox');
    await listen.query('listen other_channel');
    try {
      await start('w1', '{cloud_outbox}');
      await start('w2', '{other_channel}');
      // every listener busy: the enqueue reads the mask and stops there
      // (a connection of its own: the statistics a session has not flushed yet count in pg_stat_xact_*)
      const c = new pg.Client({ connectionString: db.url });
      await c.connect();
      try {
        await c.query('begin');
        await c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
        const { rows: [scans] } = await c.query<{ n: number }>(
          `select (seq_scan + coalesce(idx_scan, 0))::int as n from pg_stat_xact_user_tables where relid = 'cloud.listener'::regclass`);
        expect(scans?.n ?? 0).toBe(0);
        await c.query('commit');
      } finally {
        await c.end();
      }
      await claim('w2'); // takes the message above (same claim, all endpoints) and stays busy
      await claim('w2'); // empty: idle on other_channel only
      await enqueue('hook'); // cloud_outbox: its listener is busy
      await enqueue('other');
      await claim('w1'); // w1 takes both: busy still
      await claim('w1'); // now idle
      await enqueue('hook');
      // a marker on our own connection: notifications are delivered in commit order, so everything before it has arrived
      await q(`select pg_notify('other_channel', 'marker')`);
      await new Promise<void>((resolve) => {
        const check = () => (heard.length >= 3 ? resolve() : setTimeout(check, 10));
        check();
      });
      expect(heard).toEqual(['other_channel', 'cloud_outbox', 'other_channel']);
    } finally {
      await listen.end();
    }
  });

  it('leaves its heartbeat as the only writer of a listener\'s row, at most every 30 s or when its channels change', async () => {
    await start('w1');
    const row = async () => (await q(`select xmin::text, ctid::text from cloud.listener where worker_id = 'w1'`)).rows[0];
    const beat = async (channels: string | null = null) =>
      (await q<{ ok: boolean }>(`select cloud.record_listener_heartbeat('w1', $1::text[]) as ok`, [channels])).rows[0]!.ok;
    const registered = await row();
    expect(await beat()).toBe(true);
    expect(await beat('{cloud_outbox}')).toBe(true);
    expect(await row()).toEqual(registered);
    await q(`update cloud.listener set heartbeat_at = now() - interval '31 seconds' where worker_id = 'w1'`);
    const aged = await row();
    expect(await beat()).toBe(true);
    expect(await row()).not.toEqual(aged);
    const fresh = await row();
    expect(await beat('{cloud_outbox,other_channel}')).toBe(true);
    expect(await row()).not.toEqual(fresh);
    expect((await q(`select channels from cloud.listener where worker_id = 'w1'`)).rows[0]).toEqual({ channels: ['cloud_outbox', 'other_channel'] });
    await q(`select cloud.record_listener_stop('w1')`);
    expect(await beat()).toBe(false);
  });
});
