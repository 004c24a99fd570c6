/**
 * The delivery engine's promises, checked in SQL with real commits and no HTTP:
 * enqueue, claim, backoff, ordering, write-back, replay, reaping, privileges.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, inTransaction, rolledBack, sqlstateOf, statusCounts, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('engine');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook', p_max_attempts => 3, p_backoff_base_ms => 1000, p_backoff_cap_ms => 60000)`);
});

const enqueue = async (payload: object = { n: 1 }, key: string | null = null, endpoint = 'hook') =>
  (await q<{ id: string }>(`select cloud.enqueue_message($1, 'demo.ping', $2::jsonb, 'erp.doc', '1', $3) as id`, [endpoint, JSON.stringify(payload), key])).rows[0]!.id;

const claim = async (worker = 'w1', limit = 100, now = 'clock_timestamp()') =>
  (await q<{ request_id: string; attempt: number; ordering_key: string | null }>(`select * from cloud.claim_messages($1, $2, null, '5 seconds', ${now})`, [worker, limit])).rows;

const report = (worker: string, results: object[], now = 'clock_timestamp()') =>
  q<{ request_id: string; status: string }>(`select * from cloud.record_attempts($1, $2::jsonb, ${now})`, [worker, JSON.stringify(results)]);

const result = (request_id: string, attempt: number, outcome: string, extra: object = {}) => ({
  request_id, attempt, outcome, method: 'POST', url: 'http://127.0.0.1:9/webhook', http_status: outcome === 'ok' ? 200 : 500,
  duration_ms: 1.25, started_at: new Date().toISOString(), ...extra,
});

describe('enqueue', () => {
  it('an enqueue inside a rolled-back transaction leaves nothing to send', async () => {
    await rolledBack(db.pool, (c) => c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}')`));
    expect(await statusCounts(db.pool)).toEqual({});
    expect(await claim()).toEqual([]);
  });

  it('a committed enqueue returns the request_id that the outbox row carries', async () => {
    const id = await enqueue();
    const { rows } = await q(`select status, attempts, endpoint, operation, aggregate_type, aggregate_id from cloud.outbox where request_id = $1`, [id]);
    expect(rows).toEqual([{ status: 'pending', attempts: 0, endpoint: 'hook', operation: 'demo.ping', aggregate_type: 'erp.doc', aggregate_id: '1' }]);
  });


  it('a generated request_id is a UUID version 7: it starts with the millisecond it was made, the rest is random', async () => {
    const before = Date.now();
    const ids = (await q<{ id: string }>(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('i', g)) as id from generate_series(1, 500) g`)).rows.map((r) => r.id);
    const after = Date.now();
    expect(new Set(ids).size).toBe(500);
    for (const id of ids) {
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      const ms = parseInt(id.replace(/-/g, '').slice(0, 12), 16);
      expect(ms).toBeGreaterThanOrEqual(before - 1000); // the database clock, not ours: allow a little skew
      expect(ms).toBeLessThanOrEqual(after + 1000);
    }
    const ms = ids.map((id) => parseInt(id.replace(/-/g, '').slice(0, 12), 16));
    expect(ms).toEqual([...ms].sort((a, b) => a - b)); // made in order, so they sort in order
    // the random part differs even within one millisecond
    expect(new Set(ids.map((id) => id.replace(/-/g, '').slice(12))).size).toBe(500);
    const { rows } = await q(`select count(*)::int n from cloud.outbox where request_id = any ($1::uuid[])`, [ids]);
    expect(rows[0]).toEqual({ n: 500 });
  });
  it('bad input is refused with its own SQLSTATE and writes nothing', async () => {
    expect(await sqlstateOf(q(`select cloud.enqueue_message('nope', 'demo.ping', '{}')`))).toBe(SqlState.unknownEndpoint);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'Bad Op!', '{}')`))).toBe(SqlState.invalidOperation);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', '"text"')`))).toBe(SqlState.invalidPayload);
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', null)`))).toBe(SqlState.invalidPayload);
    expect(await statusCounts(db.pool)).toEqual({});
  });

  it('a request_id is enqueued once; a second enqueue with it is refused with EC004 and the first is untouched', async () => {
    const id = await enqueue({ first: true });
    expect(await sqlstateOf(q(`select cloud.enqueue_message('hook', 'demo.ping', '{"second":true}', p_request_id => $1)`, [id]))).toBe(SqlState.duplicateRequestId);
    const { rows } = await q(`select payload from cloud.outbox`);
    expect(rows).toEqual([{ payload: { first: true } }]);
  });

  it('enqueuers NOTIFY only while a listener is idle, so busy listeners cost the ERP no commit serialisation', async () => {
    const listen = new pg.Client({ connectionString: db.url });
    await listen.connect();
    const heard: string[] = [];
    listen.on('notification', (n) => heard.push(n.channel));
    await listen.query('listen cloud_outbox');
    try {
      await q(`select cloud.record_listener_start('w1', '{cloud_outbox}')`);
      await enqueue(); // registered, not idle yet: no notify
      await claim('w1'); // claims one → busy
      await enqueue();
      await new Promise((r) => setTimeout(r, 150));
      expect(heard).toEqual([]);
      expect(await claim('w1')).toHaveLength(1);
      expect(await claim('w1')).toHaveLength(0); // empty claim → idle
      await enqueue();
      await new Promise((r) => setTimeout(r, 150));
      expect(heard).toEqual(['cloud_outbox']);
    } finally {
      await listen.end();
    }
  });
});

describe('backoff', () => {
  it('the retry delay doubles from 1 s with ±20 % jitter and stops at the cap', async () => {
    const { rows } = await q<{ attempt: number; lo: number; mid: number; hi: number }>(`
      select a as attempt,
             extract(epoch from cloud.compute_backoff_delay(a, 1000, 30000, null, 0))::float8 as lo,
             extract(epoch from cloud.compute_backoff_delay(a, 1000, 30000, null, 0.5))::float8 as mid,
             extract(epoch from cloud.compute_backoff_delay(a, 1000, 30000, null, 1))::float8 as hi
        from generate_series(1, 8) a`);
    expect(rows.map((r) => r.mid)).toEqual([1, 2, 4, 8, 16, 30, 30, 30]);
    expect(rows.map((r) => r.lo)).toEqual([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30]);
    expect(rows.map((r) => r.hi)).toEqual([1.2, 2.4, 4.8, 9.6, 19.2, 30, 30, 30]);
  });

  it('a Retry-After from the cloud is honoured, even above the cap', async () => {
    const { rows } = await q(`select extract(epoch from cloud.compute_backoff_delay(1, 1000, 30000, 120000, 0.5))::float8 as s`);
    expect(rows[0].s).toBe(120);
  });

  it('a retryable failure goes back to pending at the backoff time; attempts exhausted → dead; permanent → failed', async () => {
    const a = await enqueue({ a: 1 });
    const b = await enqueue({ b: 1 });
    for (let attempt = 1; attempt <= 3; attempt++) {
      const t = `'2030-01-01 00:00:0${attempt}'::timestamptz`;
      await q(`update cloud.outbox set next_attempt_at = ${t} where request_id = $1 and status = 'pending'`, [a]);
      const got = await claim('w1', 100, t);
      expect(got.map((m) => m.request_id)).toContain(a);
      const res = await report('w1', [result(a, attempt, 'retryable', { error_class: 'http_503', error_message: 'HTTP 503' })], t);
      expect(res.rows).toEqual([{ request_id: a, status: attempt < 3 ? 'pending' : 'dead' }]);
      if (attempt < 3) {
        const { rows } = await q(`select extract(epoch from next_attempt_at - ${t})::float8 as wait from cloud.outbox where request_id = $1`, [a]);
        const expected = 2 ** (attempt - 1);
        expect(rows[0].wait).toBeGreaterThanOrEqual(expected * 0.8 - 1e-6);
        expect(rows[0].wait).toBeLessThanOrEqual(expected * 1.2 + 1e-6);
      }
      if (attempt === 1) {
        const p = await report('w1', [result(b, 1, 'permanent', { http_status: 422, error_class: 'http_422', error_message: 'HTTP 422: tax id invalid' })], t);
        expect(p.rows).toEqual([{ request_id: b, status: 'failed' }]);
      }
    }
    const { rows } = await q(`select request_id, status, attempts, last_error from cloud.outbox order by id`);
    expect(rows).toEqual([
      { request_id: a, status: 'dead', attempts: 3, last_error: 'HTTP 503' },
      { request_id: b, status: 'failed', attempts: 1, last_error: 'HTTP 422: tax id invalid' },
    ]);
    const log = await q(`select request_id, attempt, outcome, http_status, duration_ms from cloud.log order by started_at, attempt`);
    expect(log.rows).toHaveLength(4);
    expect(log.rows.every((r) => r.duration_ms !== null && r.http_status !== null)).toBe(true);
  });
});

describe('ordering keys', () => {
  it('only the head of an ordering key is claimable, and the next one follows its completion', async () => {
    const k1 = [await enqueue({ n: 1 }, 'po:1'), await enqueue({ n: 2 }, 'po:1'), await enqueue({ n: 3 }, 'po:1')];
    const free = await enqueue({ n: 0 });
    const first = await claim('w1');
    expect(first.map((m) => m.request_id).sort()).toEqual([k1[0], free].sort());
    expect(await claim('w2')).toEqual([]);
    await report('w1', [result(k1[0]!, 1, 'ok')]);
    expect((await claim('w2')).map((m) => m.request_id)).toEqual([k1[1]]);
  });

  it('a dead head parks its key (visible in cloud.parked_keys) until an operator skips or replays it', async () => {
    const [m1, m2] = [await enqueue({ n: 1 }, 'po:7'), await enqueue({ n: 2 }, 'po:7')];
    await q(`update cloud.endpoint set max_attempts = 1`);
    await claim();
    await report('w1', [result(m1!, 1, 'retryable')]);
    expect(await claim()).toEqual([]);
    const parked = await q(`select ordering_key, head_request_id, status, waiting from cloud.parked_keys`);
    expect(parked.rows).toEqual([{ ordering_key: 'po:7', head_request_id: m1, status: 'dead', waiting: '1' }]);
    const st = await q(`select parked_keys, dead, pending from cloud.endpoint_status`);
    expect(st.rows[0]).toEqual({ parked_keys: '1', dead: '1', pending: '1' });
    await q(`select cloud.skip_message($1, 'superseded by revision 2')`, [m1]);
    expect((await claim()).map((m) => m.request_id)).toEqual([m2]);
  });
});

describe('write-back handlers', () => {
  beforeEach(async () => {
    await q(`create table if not exists public.erp_doc (id text primary key, cloud_ref text, cloud_error text)`);
    await q(`truncate public.erp_doc`);
    await q(`insert into public.erp_doc values ('1', null, null)`);
    await q(`create or replace function public.on_ping_done(m cloud.outbox, r jsonb) returns void language plpgsql as $$
             begin
               update public.erp_doc set cloud_ref = r->>'ref' where id = m.aggregate_id;
               if r->>'ref' = 'boom' then raise exception 'cannot write back' using errcode = 'EC999'; end if;
             end $$`);
    await q(`create or replace function public.on_ping_failed(m cloud.outbox, e jsonb) returns void language sql as $$
             update public.erp_doc set cloud_error = e->>'error' where id = m.aggregate_id $$`);
    await q(`select cloud.put_operation_handler('demo.*', 'public.on_ping_done(cloud.outbox, jsonb)', 'public.on_ping_failed(cloud.outbox, jsonb)')`);
  });

  it("completion hands the response to the operation's handler in the same transaction", async () => {
    const id = await enqueue();
    await claim();
    const res = await report('w1', [result(id, 1, 'ok', { response: { ref: 'INV-42' } })]);
    expect(res.rows).toEqual([{ request_id: id, status: 'sent' }]);
    expect((await q(`select cloud_ref from public.erp_doc`)).rows).toEqual([{ cloud_ref: 'INV-42' }]);
  });

  it('a handler that raises leaves nothing half-written and marks the message failed with the reason', async () => {
    const id = await enqueue();
    await claim();
    const res = await report('w1', [result(id, 1, 'ok', { response: { ref: 'boom' } })]);
    expect(res.rows).toEqual([{ request_id: id, status: 'failed' }]);
    expect((await q(`select cloud_ref from public.erp_doc`)).rows).toEqual([{ cloud_ref: null }]);
    const { rows } = await q(`select last_error_class, last_error from cloud.outbox`);
    expect(rows[0].last_error_class).toBe('handler');
    expect(rows[0].last_error).toMatch(/cannot write back.*EC999/);
  });

  it('a permanent failure runs the on_fail handler so the ERP document shows the reason', async () => {
    const id = await enqueue();
    await claim();
    await report('w1', [result(id, 1, 'permanent', { http_status: 400, error_message: 'HTTP 400: buyer tax id missing' })]);
    expect((await q(`select cloud_error from public.erp_doc`)).rows).toEqual([{ cloud_error: 'HTTP 400: buyer tax id missing' }]);
  });
});

describe('replay, skip and leases', () => {
  it('replay keeps the request_id, restores the attempt budget and is audited; bad replays are refused', async () => {
    const id = await enqueue();
    await q(`update cloud.endpoint set max_attempts = 1`);
    await claim();
    await report('w1', [result(id, 1, 'retryable')]);
    expect(await sqlstateOf(q(`select cloud.replay_message($1, '  ')`, [id]))).toBe(SqlState.reasonRequired);
    await q(`select cloud.replay_message($1, 'cloud was down', 'dba_li')`, [id]);
    // a fresh budget; the try numbers go on, so the next try is attempt 2 in cloud.log
    const { rows } = await q(`select status, attempts, failures, lost_leases from cloud.outbox where request_id = $1`, [id]);
    expect(rows).toEqual([{ status: 'pending', attempts: 1, failures: 0, lost_leases: 0 }]);
    const audit = await q(`select action, actor, reason, previous_status from cloud.replay_audit`);
    expect(audit.rows).toEqual([{ action: 'replay', actor: 'dba_li', reason: 'cloud was down', previous_status: 'dead' }]);
    expect((await claim()).map((m) => m.request_id)).toEqual([id]);
    await report('w1', [result(id, 2, 'ok')]);
    expect((await q(`select attempt, outcome from cloud.log where request_id = $1 order by attempt`, [id])).rows)
      .toEqual([{ attempt: 1, outcome: 'retryable' }, { attempt: 2, outcome: 'ok' }]);
    expect(await sqlstateOf(q(`select cloud.replay_message($1, 'again')`, [id]))).toBe(SqlState.messageNotReplayable);
    expect(await sqlstateOf(q(`select cloud.skip_message($1, 'no')`, [id]))).toBe(SqlState.messageNotSkippable);
    expect(await sqlstateOf(q(`select cloud.replay_message(gen_random_uuid(), 'x')`))).toBe(SqlState.messageNotFound);
    expect(await sqlstateOf(q(`select cloud.replay_dead_messages('nope', 'x')`))).toBe(SqlState.unknownEndpoint);
  });

  it('an expired lease is reaped back to pending with a cloud.log row, and the late result of its old worker is not applied twice', async () => {
    const id = await enqueue();
    await claim('dead-worker');
    expect(await q(`select cloud.reap_expired_leases(clock_timestamp() + interval '1 hour') as n`).then((r) => r.rows[0].n)).toBe(1);
    const { rows } = await q(`select status, attempts, last_error_class from cloud.outbox`);
    expect(rows).toEqual([{ status: 'pending', attempts: 1, last_error_class: 'lease_expired' }]);
    const log = await q(`select worker_id, outcome, error_class from cloud.log`);
    expect(log.rows).toEqual([{ worker_id: 'dead-worker', outcome: 'retryable', error_class: 'lease_expired' }]);
    await q(`update cloud.outbox set next_attempt_at = now()`);
    await claim('w2');
    const late = await report('dead-worker', [result(id, 1, 'retryable')]);
    expect(late.rows).toEqual([{ request_id: id, status: 'lease_lost' }]);
    expect((await q(`select status, locked_by from cloud.outbox`)).rows).toEqual([{ status: 'in_flight', locked_by: 'w2' }]);
  });

  it('two reapers at once (pg_cron and a listener) log and retry each expired lease once', async () => {
    await q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 20) g`);
    await claim('gone');
    const later = `clock_timestamp() + interval '1 hour'`;
    const a = await db.pool.connect();
    try {
      await a.query('begin');
      expect((await a.query(`select cloud.reap_expired_leases(${later}) as n`)).rows[0].n).toBe(20);
      // the second reaper runs while the first still holds the rows: it skips them
      expect((await q(`select cloud.reap_expired_leases(${later}) as n`)).rows[0].n).toBe(0);
      await a.query('commit');
    } finally {
      a.release();
    }
    expect((await q(`select count(*)::int n from cloud.log where error_class = 'lease_expired'`)).rows[0].n).toBe(20);
    expect((await q(`select max(attempts)::int m from cloud.outbox`)).rows[0].m).toBe(1);
  });

  it('SKIP LOCKED: two sessions claiming at once never get the same message', async () => {
    await q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 500) g`);
    const [a, b] = await Promise.all([
      inTransaction(db.pool, async (c) => (await c.query(`select request_id from cloud.claim_messages('a', 300)`)).rows),
      inTransaction(db.pool, async (c) => (await c.query(`select request_id from cloud.claim_messages('b', 300)`)).rows),
    ]);
    // all but the rows a claim read past its limit to know it reached it (at most two, held until it commits: 0036)
    expect(a.length + b.length).toBeGreaterThanOrEqual(498);
    const rest = (await q(`select request_id from cloud.claim_messages('c', 300)`)).rows;
    const ids = [...a, ...b, ...rest].map((r) => r.request_id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.length).toBe(500);
  });
});

describe('operations', () => {
  it('put_endpoint names the bad setting with EC008', async () => {
    for (const call of [
      `select cloud.put_endpoint('Bad Name', 'http://x')`,
      `select cloud.put_endpoint('ok', 'ftp://x')`,
      `select cloud.put_endpoint('ok', 'http://x', p_timeout_ms => 5)`,
      `select cloud.put_endpoint('ok', 'http://x', p_backoff_base_ms => 5000, p_backoff_cap_ms => 1000)`,
      `select cloud.put_endpoint('ok', 'http://x', p_wake_channel => 'no-dash')`,
    ]) expect(await sqlstateOf(q(call)), call).toBe(SqlState.invalidEndpointSetting);
    expect((await q(`select count(*)::int n from cloud.endpoint`)).rows[0].n).toBe(1);
  });

  it('cloud.log is partitioned by month and months past retention are dropped, not deleted', async () => {
    await q(`select cloud.ensure_log_partitions(2, '2020-01-15')`);
    const parts = async () => (await q(`select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid where i.inhparent = 'cloud.log'::regclass order by 1`)).rows.map((r) => r.relname);
    expect(await parts()).toEqual(expect.arrayContaining(['log_default', 'log_p202001', 'log_p202002', 'log_p202003']));
    expect((await q(`select cloud.purge_log_partitions('90 days', '2020-07-15') as n`)).rows[0].n).toBe(3);
    expect(await parts()).not.toContain('log_p202001');
    expect(await parts()).toContain(`log_p${new Date().toISOString().slice(0, 7).replace('-', '')}`);
  });

  it('finished messages are purged after the retention period; unfinished ones never are', async () => {
    const sent = await enqueue();
    const dead = await enqueue();
    await claim();
    await report('w1', [result(sent, 1, 'ok'), result(dead, 1, 'permanent')]);
    expect((await q(`select cloud.purge_finished_messages('7 days', 1000, now() + interval '8 days') as n`)).rows[0].n).toBe(1);
    expect((await q(`select request_id from cloud.outbox`)).rows).toEqual([{ request_id: dead }]);
  });

  it('the ERP role may enqueue but may not read cloud.log, the outbox, or claim', async () => {
    await rolledBack(db.pool, async (c) => {
      await c.query('set local role erp_cloud_app');
      await c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
      for (const stmt of ['select * from cloud.log', 'select * from cloud.outbox', `select * from cloud.claim_messages('x')`]) {
        await c.query('savepoint s');
        expect(await sqlstateOf(c.query(stmt)), stmt).toBe('42501');
        await c.query('rollback to savepoint s');
      }
    });
  });

  it('the operator role can read the views and replay, but cannot enqueue', async () => {
    await rolledBack(db.pool, async (c) => {
      await c.query('set local role erp_cloud_operator');
      await c.query('select * from cloud.endpoint_status');
      await c.query('select * from cloud.log limit 1');
      expect(await sqlstateOf(c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`))).toBe('42501');
    });
  });
});
