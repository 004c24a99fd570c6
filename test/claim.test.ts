/**
 * The claim's promises on its cheap paths (migration 0028): an endpoint without due work and an
 * endpoint without limits cost the claim no lock and no write, and every rule still holds —
 * rate-limit tokens, quotas, pause, the circuit's half-open probes, per-key ordering, SKIP LOCKED,
 * the listener's idle flag and the returned settings and allowlist.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { sql } from '../listener/delivery/queries.js';
import { withEndpointSettings } from '../listener/delivery/worker.js';
import { createTestDb, inTransaction, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

let db: TestDb;
let q: pg.Pool['query'];

const T0 = '2030-01-01T00:00:00Z';

beforeAll(async () => {
  db = await createTestDb('claim');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('fast', 'http://127.0.0.1:9/fast', p_timeout_ms => 2000)`);
  await q(`select cloud.put_endpoint('slow', 'http://127.0.0.1:9/slow')`);
  await q(`select cloud.put_endpoint('idle', 'http://127.0.0.1:9/idle')`);
});

interface Claimed {
  request_id: string;
  endpoint: string;
  attempt: number;
  ordering_key: string | null;
  base_url: string;
  timeout_ms: number;
  locked_until: Date;
  send_at: Date;
  allow_hosts: string[];
  allow_cidrs: string[];
  allow_private: boolean;
  download_hosts: string[];
}

/** Enqueues n messages due at T0 (p_not_before), in order. */
const enqueueMany = async (endpoint: string, n: number, key: string | null = null) =>
  (
    await q<{ id: string }>(
      `select cloud.enqueue_message($1, 'demo.ping', jsonb_build_object('n', g), null, null, $2, null, $3::timestamptz) as id
         from generate_series(1, $4::int) g order by g`,
      [endpoint, key, T0, n],
    )
  ).rows.map((r) => r.id);

/** A claim at T0 + offsetMs. */
const claim = async (worker: string, limit: number, offsetMs = 0, endpoints: string[] | null = null) =>
  (
    await q<Claimed>(
      `select * from cloud.claim_messages($1, $2, $3, '5 seconds', $4::timestamptz + make_interval(secs => $5::float8 / 1000))`,
      [worker, limit, endpoints, T0, offsetMs],
    )
  ).rows;

/** The row version of an endpoint (xmin changes with every write, even one that changes nothing). */
const endpointVersion = async (name: string) =>
  (await q<{ v: string }>(`select xmin::text as v from cloud.endpoint where name = $1`, [name])).rows[0]!.v;

describe('the claim on its cheap paths', () => {
  it('an endpoint without due work costs the claim no lock and no write, even with a rate limit, a quota or a circuit to consult', async () => {
    await q(`select cloud.put_endpoint_limits('idle', 1, 1)`);
    await q(`select cloud.put_endpoint_quotas('idle', 5, null, 'UTC')`);
    await enqueueMany('fast', 2);
    const before = await endpointVersion('idle');
    // another session holds the idle endpoint's row: a claim that wanted its budget would wait
    await inTransaction(db.pool, async (holder) => {
      await holder.query(`select from cloud.endpoint where name = 'idle' for update`);
      const c = await db.pool.connect();
      try {
        await c.query(`set lock_timeout = '2s'`); // a claim that waited on the row would fail with 55P03, not hang
        const { rows } = await c.query(
          `select * from cloud.claim_messages('w1', 10, null, '5 seconds', $1::timestamptz)`,
          [T0],
        );
        expect(rows.map((r) => r.endpoint)).toEqual(['fast', 'fast']);
      } finally {
        await c.query('reset lock_timeout');
        c.release();
      }
    });
    expect(await endpointVersion('idle')).toBe(before);
    expect((await q(`select count(*)::int as n from cloud.endpoint_usage where endpoint = 'idle'`)).rows[0].n).toBe(0);
  });

  it('an endpoint without limits hands out its messages without writing its endpoint row', async () => {
    await enqueueMany('fast', 3);
    const before = await endpointVersion('fast');
    expect(await claim('w1', 10)).toHaveLength(3);
    expect(await endpointVersion('fast')).toBe(before);
  });

  it('the fast path returns each message leased, in id order, with its endpoint settings, lease and allowlist as at the claim', async () => {
    await q(`select cloud.put_endpoint_allowlist('fast', '{api.example.com}', '{203.0.113.0/24}', false)`);
    const ids = await enqueueMany('fast', 4);
    const got = await claim('w1', 10, 250);
    expect(got.map((r) => r.request_id)).toEqual(ids);
    const at = new Date(Date.parse(T0) + 250);
    for (const r of got) {
      expect(r).toMatchObject({ endpoint: 'fast', attempt: 1, base_url: 'http://127.0.0.1:9/fast', timeout_ms: 2000 });
      expect(r.allow_hosts).toEqual(['api.example.com']);
      expect(r.allow_cidrs).toEqual(['203.0.113.0/24']);
      expect(r.allow_private).toBe(false);
      expect(r.send_at.toISOString()).toBe(at.toISOString()); // no limit: every message goes now
      expect(r.locked_until.toISOString()).toBe(new Date(at.getTime() + 2000 + 5000).toISOString()); // timeout + margin
    }
    const { rows } = await q(
      `select status, attempts, locked_by from cloud.outbox where request_id = any ($1::uuid[]) group by 1, 2, 3`,
      [ids],
    );
    expect(rows).toEqual([{ status: 'in_flight', attempts: 1, locked_by: 'w1' }]);
  });

  it('the fast path leases only the head of each ordering key and never a message another session holds', async () => {
    const k1 = await enqueueMany('fast', 3, 'k1');
    const k2 = await enqueueMany('fast', 2, 'k2');
    const free = await enqueueMany('fast', 2);
    const held = await inTransaction(
      db.pool,
      async (c) => {
        const lockedFree = free[0]!;
        await c.query(`select from cloud.outbox where request_id = $1 for update`, [lockedFree]);
        const got = await claim('w1', 100);
        return { lockedFree, got };
      },
      false,
    );
    expect(new Set(held.got.map((r) => r.request_id))).toEqual(new Set([k1[0], k2[0], free[1]]));
    expect(held.got.some((r) => r.request_id === held.lockedFree)).toBe(false);
  });

  it('a claim still respects the rate limit’s tokens next to an endpoint on the fast path', async () => {
    await q(`select cloud.put_endpoint_limits('slow', 10, 2)`); // 10/s, a bucket of 2
    await enqueueMany('fast', 5);
    await enqueueMany('slow', 10);
    const first = await claim('w1', 100);
    const slow = first.filter((r) => r.endpoint === 'slow');
    expect(first.filter((r) => r.endpoint === 'fast')).toHaveLength(5);
    // 2 in the bucket + 1 due within the next 100 ms: the third goes when its token is due
    expect(slow).toHaveLength(3);
    expect(slow.map((r) => Date.parse(r.send_at.toISOString()) - Date.parse(T0))).toEqual([0, 0, 100]);
    expect(await claim('w2', 100)).toEqual([]); // the bucket is spent at the same instant
    // half a second refills 5 tokens, but the bucket holds 2 (it was 1 in debt): 2 + 1 due within 100 ms
    const later = await claim('w2', 100, 500);
    expect(later.map((r) => r.endpoint)).toEqual(Array(3).fill('slow'));
  });

  it('a claim still respects a pause, a quota and an open circuit’s half-open probes', async () => {
    await enqueueMany('fast', 6);
    await enqueueMany('slow', 6);
    await enqueueMany('idle', 6);
    await q(`update cloud.endpoint set paused_until = $1::timestamptz + interval '1 minute', pause_reason = 'test' where name = 'fast'`, [T0]);
    await q(`select cloud.put_endpoint_quotas('slow', 2, null, 'UTC')`);
    await q(
      `update cloud.endpoint set circuit_state = 'open', circuit_opened_at = $1::timestamptz - interval '1 hour', circuit_probes = 2 where name = 'idle'`,
      [T0],
    );
    const got = await claim('w1', 100);
    const by = (e: string) => got.filter((r) => r.endpoint === e).length;
    expect([by('fast'), by('slow'), by('idle')]).toEqual([0, 2, 2]);
    const idle = (await q(`select circuit_state, cardinality(circuit_probe_ids) as probes from cloud.endpoint where name = 'idle'`)).rows[0];
    expect(idle).toEqual({ circuit_state: 'half_open', probes: 2 });
    expect(await claim('w2', 100)).toEqual([]); // quota used up, probes out, still paused
    expect((await claim('w2', 100, 61_000)).map((r) => r.endpoint)).toEqual(Array(6).fill('fast')); // the pause is over
  });

  it('the listener’s idle flag is its bit of cloud.listener_idle_slots: claims set and clear it and never write the listener’s row', async () => {
    await q(`select cloud.record_listener_start('w1', '{cloud_outbox}')`);
    const version = async () => (await q(`select l.xmin::text as v, l.ctid::text as at, s.idle
                                            from cloud.listener l join cloud.listener_status s using (worker_id) where worker_id = 'w1'`)).rows[0];
    const registered = await version();
    expect(registered.idle).toBe(false);
    expect(await claim('w1', 10)).toEqual([]);
    expect(await version()).toEqual({ ...registered, idle: true });
    expect(await claim('w1', 10)).toEqual([]);
    await enqueueMany('fast', 1);
    expect(await claim('w1', 10)).toHaveLength(1);
    expect(await version()).toEqual({ ...registered, idle: false });
  });

  it('while a snapshot is held, a claim walks the dead index entries that earlier claims left once, not twice', async () => {
    // pending → in_flight is never a HOT update: every claimed message leaves its pending version's
    // index entry behind, and while a REPEATABLE READ snapshot holds the xmin horizon no scan may
    // mark it dead; the claim's probe walks them, and its lease starts at the key the probe found
    const holder = new pg.Client({ connectionString: db.url });
    const claimer = new pg.Client({ connectionString: db.url });
    await Promise.all([holder.connect(), claimer.connect()]);
    try {
      await holder.query(`begin isolation level repeatable read`);
      await holder.query(`select count(*) from cloud.endpoint`); // the snapshot is taken: the horizon is held
      const earlier = 400;
      // pending in the hot table first (a claim before they are due moves them there unleased, as messages given
      // back or waiting behind older work are): since 0032 a message due on its way in is inserted leased, no pending version
      const intoHotTable = () => claimer.query(`select * from cloud.claim_messages('w0', 1000, null, '5 seconds', $1::timestamptz - interval '1 minute')`, [T0]);
      await enqueueMany('fast', earlier);
      expect((await intoHotTable()).rows).toEqual([]);
      for (let i = 0; i < earlier / 50; i++) {
        const got = await claimer.query(`select * from cloud.claim_messages('w1', 50, null, '5 seconds', $1::timestamptz)`, [T0]);
        expect(got.rows).toHaveLength(50);
      }
      await enqueueMany('fast', 10);
      expect((await intoHotTable()).rows).toEqual([]);
      await claimer.query(`select pg_stat_force_next_flush()`);
      const read = async () =>
        Number((await q(`select idx_tup_read from pg_stat_user_indexes where schemaname = 'cloud' and indexrelname = 'outbox_active'`)).rows[0].idx_tup_read);
      const before = await read();
      const last = await claimer.query(`select * from cloud.claim_messages('w1', 10, null, '5 seconds', $1::timestamptz)`, [T0]);
      await claimer.query(`select pg_stat_force_next_flush()`);
      const walked = (await read()) - before;
      expect(last.rows).toHaveLength(10);
      expect(walked).toBeGreaterThanOrEqual(earlier); // the dead entries are there, and walked once
      expect(walked).toBeLessThan(earlier + earlier / 2); // not twice (probe and lease each walked them before 0030)
    } finally {
      await holder.query('rollback').catch(() => undefined);
      await Promise.all([holder.end(), claimer.end()]);
    }
  });
});

describe('the listener’s claim statement', () => {
  it('sends each endpoint’s settings once per run of its rows, and every message gets them back with its send_by', async () => {
    await q(`select cloud.put_endpoint_allowlist('fast', '{api.example.com}', '{203.0.113.0/24}', false)`);
    await q(`select cloud.put_endpoint('slow', 'http://127.0.0.1:9/slow', p_config => '{"tenant": "t1"}')`);
    await q(`select cloud.put_endpoint_limits('slow', 10, 3)`); // 10/s, a bucket of 3
    const fast = await enqueueMany('fast', 5);
    const slow = (await q<{ id: string }>(`select cloud.enqueue_message('slow', 'demo.ping', jsonb_build_object('n', g)) as id from generate_series(1, 3) g order by g`)).rows.map((r) => r.id);
    // due now (enqueueMany's are due in 2030): the listener's statement claims at clock_timestamp()
    await q(`update cloud.outbox set next_attempt_at = now() where request_id = any ($1::uuid[])`, [fast]);

    const { rows } = await q(sql.claim, ['w1', 100, null, 5000]);
    const runs = rows.filter((r) => r.settings).length;
    expect(rows).toHaveLength(8);
    // one row per run of an endpoint's rows carries its settings; the others carry none
    expect(runs).toBe(rows.filter((r, i) => i === 0 || rows[i - 1].endpoint !== r.endpoint).length);
    expect(runs).toBeLessThan(rows.length);
    for (const r of rows.filter((x) => !x.settings)) {
      expect([r.provider, r.base_url, r.timeout_ms, r.endpoint_config, r.allow_hosts, r.allow_cidrs, r.allow_private, r.download_hosts, r.send_grace_ms])
        .toEqual([null, null, null, null, null, null, null, null, null]);
    }

    const got = withEndpointSettings(rows);
    expect(got.map((m) => m.request_id).sort()).toEqual([...fast, ...slow].sort());
    const settings = (await q(`select name, provider, base_url, timeout_ms, config, allow_hosts, allow_cidrs::text[] as allow_cidrs, allow_private, download_hosts
                                 from cloud.endpoint where name in ('fast', 'slow')`)).rows;
    for (const m of got) {
      const e = settings.find((x) => x.name === m.endpoint)!;
      expect(m).toMatchObject({ provider: e.provider, base_url: e.base_url, timeout_ms: e.timeout_ms, endpoint_config: e.config,
        allow_hosts: e.allow_hosts, allow_cidrs: e.allow_cidrs, allow_private: e.allow_private, download_hosts: e.download_hosts });
      if (m.endpoint === 'fast') expect(m.send_by).toBeNull(); // no limit: no grace
      else expect(m.send_by!.getTime() - m.send_at.getTime()).toBe(50); // cloud.send_grace(10/s): half a token's spacing, at most 50 ms
    }
    expect(got.filter((m) => m.endpoint === 'fast').map((m) => m.allow_hosts)).toEqual(Array(5).fill(['api.example.com']));
  });

  it('refuses a row whose endpoint no row before it described, rather than send it with another endpoint’s settings', () => {
    const row = {
      request_id: 'r1', endpoint: 'fast', operation: 'demo.ping', payload: {}, attempt: 1, aggregate_type: null, aggregate_id: null, ordering_key: null,
      locked_until: new Date(), send_at: new Date(), settings: false, provider: null, base_url: null, timeout_ms: null, endpoint_config: null,
      allow_hosts: null, allow_cidrs: null, allow_private: null, download_hosts: null, send_grace_ms: null,
    };
    expect(() => withEndpointSettings([row])).toThrow(/message r1 came without the settings of endpoint fast/);
  });
});
