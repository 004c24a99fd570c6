/**
 * What the ERP pays per enqueued document (issue 15 §1, ADR 0003, migration 0029): cloud.enqueue_message
 * writes one lean row into cloud.outbox_intake, a child table of cloud.outbox that the claim drains into
 * the hot table, and runs as SECURITY DEFINER without SET search_path, every name qualified. These tests
 * hold what that must not change: the caller's search_path decides nothing, a message reads the same
 * wherever it waits, per-key order holds across the two tables, the intake does not bloat, and the ERP
 * role still has no privilege on any outbox table. (How much it costs is measured in bench/, never here.)
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, sqlstateOf, statusCounts, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { keepAutovacuumOffTheQueue, reportDelivered, whereMessages } from './helpers/outbox.js';

let db: TestDb;
let q: pg.Pool['query'];

beforeAll(async () => {
  db = await createTestDb('enqueue_cost');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
  await keepAutovacuumOffTheQueue(db.pool);  // a test here asserts what one rotation did
});
afterAll(() => db.drop());

beforeEach(async () => {
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/webhook')`);
});

const enqueue = async (key: string | null = null, n = 1) =>
  (await q<{ id: string }>(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('i', g), 'erp.doc', g::text, $1) as id
                              from generate_series(1, $2) g`, [key, n])).rows.map((r) => r.id);

const ok = (worker: string, claimed: Array<{ request_id: string; attempt: number }>) => reportDelivered(db.pool, worker, claimed);
const where = () => whereMessages(db.pool);

const claim = async (worker = 'w1', limit = 100) =>
  (await q<{ request_id: string; attempt: number }>(`select * from cloud.claim_messages($1, $2)`, [worker, limit])).rows;

/**
 * A schema of the caller's with its own =, ~, ||, *, jsonb_typeof, now, format and a uuid domain, each of which
 * writes a row into evil.calls when it runs. Unqualified SQL in a SECURITY DEFINER function that trusted the
 * caller's search_path would run them as the function's owner.
 */
const HOSTILE = `
  drop schema if exists evil cascade;
  create schema evil;
  create table evil.calls (what text, by_role text default current_user);
  grant usage on schema evil to public;
  grant insert, select on evil.calls to public;
  create function evil.trap(what text) returns boolean language sql volatile as $$
    insert into evil.calls (what) values (what); select true $$;
  create function evil.eq(a text, b text) returns boolean language sql volatile as $$
    select evil.trap('=') and a operator(pg_catalog.=) b $$;
  create operator evil.= (leftarg = text, rightarg = text, function = evil.eq);
  create function evil.re(a text, b text) returns boolean language sql volatile as $$
    select evil.trap('~') and a operator(pg_catalog.~) b $$;
  create operator evil.~ (leftarg = text, rightarg = text, function = evil.re);
  create function evil.cat(a text, b text) returns text language sql volatile as $$
    select case when evil.trap('||') then a operator(pg_catalog.||) b end $$;
  create operator evil.|| (leftarg = text, rightarg = text, function = evil.cat);
  create function evil.mul(a float8, b float8) returns float8 language sql volatile as $$
    select case when evil.trap('*') then a operator(pg_catalog.*) b end $$;
  create operator evil.* (leftarg = float8, rightarg = float8, function = evil.mul);
  create function evil.mul(a float8, b integer) returns float8 language sql volatile as $$
    select case when evil.trap('*') then a operator(pg_catalog.*) b end $$;
  create operator evil.* (leftarg = float8, rightarg = integer, function = evil.mul);
  create function evil.jsonb_typeof(j jsonb) returns text language sql volatile as $$
    select case when evil.trap('jsonb_typeof') then pg_catalog.jsonb_typeof(j) end $$;
  create function evil.now() returns timestamptz language sql volatile as $$
    select case when evil.trap('now') then pg_catalog.now() end $$;
  create function evil.format(f text, a text) returns text language sql volatile as $$
    select case when evil.trap('format') then pg_catalog.format(f, a) end $$;
  create domain evil.uuid as pg_catalog.uuid check (evil.trap('uuid'));
  grant execute on all functions in schema evil to public;
`;

describe('SECURITY DEFINER without SET search_path', () => {
  it('enqueue_message runs nothing of the caller\'s search_path: a hostile schema\'s =, ~, ||, *, jsonb_typeof, now, format and uuid before pg_catalog are never called', async () => {
    await q(HOSTILE);
    const c = new pg.Client({ connectionString: db.url });
    await c.connect();
    try {
      // a fresh session: PL/pgSQL compiles and plans the function for the first time under this search_path
      await c.query('set role erp_cloud_app');
      await c.query('set search_path = evil, pg_catalog');
      // the trap is armed: unqualified SQL under this search_path does run the caller's operators
      await c.query(`select 'a' = 'a', 'a' ~ 'a', 'a' || 'b', 1.5::float8 * 2, jsonb_typeof('{}'), now(), format('%s', 'x'), null::uuid`);
      const armed = (await c.query<{ what: string }>(`select distinct what from evil.calls order by 1`)).rows.map((r) => r.what);
      expect(armed).toEqual(['*', '=', 'format', 'jsonb_typeof', 'now', 'uuid', '||', '~'].sort());
      await c.query('reset role');
      await q('truncate evil.calls');
      await c.query('set role erp_cloud_app');
      // a generated id, a keyed one (its advisory lock), an explicit one, a duplicate, every refusal
      const [{ id }] = (await c.query<{ id: string }>(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}', 'erp.doc', '1') as id`)).rows;
      await c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":2}', 'erp.doc', '2', 'po:1')`);
      await c.query(`select cloud.enqueue_message('hook', 'demo.ping', '[3]', p_request_id => '00000000-0000-7000-8000-000000000003')`);
      expect(await sqlstateOf(c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}', p_request_id => $1)`, [id]))).toBe(SqlState.duplicateRequestId);
      expect(await sqlstateOf(c.query(`select cloud.enqueue_message('nope', 'demo.ping', '{}')`))).toBe(SqlState.unknownEndpoint);
      expect(await sqlstateOf(c.query(`select cloud.enqueue_message('hook', 'Bad Op', '{}')`))).toBe(SqlState.invalidOperation);
      expect(await sqlstateOf(c.query(`select cloud.enqueue_message('hook', 'demo.ping', '3')`))).toBe(SqlState.invalidPayload);
      // and again, now that the plans are cached
      await c.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":4}', 'erp.doc', '4', 'po:1')`);
      await c.query('reset role');
      expect((await q(`select what, by_role from evil.calls`)).rows).toEqual([]);
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(await statusCounts(db.pool)).toEqual({ pending: 4 });
    } finally {
      await c.end();
      await q('drop schema if exists evil cascade');
    }
  });

  it('enqueue_message is the one SECURITY DEFINER function without its own search_path', async () => {
    const { rows } = await q<{ fn: string }>(`
      select p.oid::regprocedure::text as fn from pg_proc p
       where p.prosecdef and p.pronamespace::regnamespace::text in ('cloud', 'scm', 'sso', 'tax', 'vault')
         and not exists (select from unnest(coalesce(p.proconfig, '{}')) s where s like 'search_path=%')`);
    expect(rows.map((r) => r.fn)).toEqual(['cloud.enqueue_message(text,text,jsonb,text,text,text,uuid,timestamp with time zone)']);
  });
});

describe('the intake', () => {
  it('a message the ERP enqueued waits in cloud.outbox_intake and reads through cloud.outbox like any other, until a claim moves it with its request_id and id', async () => {
    const [id] = await enqueue();
    const before = (await q(`select request_id, id, status, attempts, endpoint, operation, payload, aggregate_type, aggregate_id, created_at
                               from cloud.outbox where request_id = $1`, [id])).rows;
    expect(before).toHaveLength(1);
    expect(await where()).toEqual({ 'cloud.outbox_intake pending': 1 });
    const [m] = await claim();
    expect(m!.request_id).toBe(id);
    expect(await where()).toEqual({ 'cloud.outbox in_flight': 1 });
    const after = (await q(`select request_id, id, status, attempts, endpoint, operation, payload, aggregate_type, aggregate_id, created_at
                              from cloud.outbox where request_id = $1`, [id])).rows;
    expect(after).toEqual([{ ...before[0], status: 'in_flight', attempts: 1 }]);
  });

  it('the ERP role may enqueue into the intake but may not read, write or delete it, nor move it, nor raise the delivery fence', async () => {
    const { rows } = await q(`select has_table_privilege('erp_cloud_app', 'cloud.outbox_intake', 'select, insert, update, delete, truncate') as any_priv,
                                     has_function_privilege('erp_cloud_app', 'cloud._lease_intake(text, integer, text[], interval, timestamptz, bigint)', 'execute') as move,
                                     has_table_privilege('erp_cloud_app', 'cloud.delivery_fence', 'select, insert, update, delete, truncate') as fence,
                                     has_function_privilege('erp_cloud_app', 'cloud._raise_delivery_fence(interval, timestamptz)', 'execute') as raise`);
    expect(rows).toEqual([{ any_priv: false, move: false, fence: false, raise: false }]);
  });

  it('a keyed message still in the intake parks the later messages of its key that already reached the hot table', async () => {
    const [first, second] = await enqueue('po:7', 2);
    const holder = await db.pool.connect();
    try {
      // another transaction holds the first row (as an operator's skip would): the claim's move skips it
      await holder.query('begin');
      await holder.query(`select from cloud.outbox_intake where request_id = $1 for update`, [first]);
      expect(await claim()).toEqual([]);
      expect((await q(`select tableoid::regclass::text as t from cloud.outbox where request_id = $1`, [second])).rows).toEqual([{ t: 'cloud.outbox' }]);
      await holder.query('commit');
    } finally {
      await holder.query('rollback').catch(() => {});
      holder.release();
    }
    expect((await claim()).map((m) => m.request_id)).toEqual([first]);
  });

  it('two claims at once move disjoint messages and lease each once', async () => {
    await enqueue(null, 60);
    const a = await db.pool.connect();
    const b = await db.pool.connect();
    try {
      await a.query('begin');
      await b.query('begin');
      const got = [
        ...(await a.query(`select request_id from cloud.claim_messages('a', 40)`)).rows,
        ...(await b.query(`select request_id from cloud.claim_messages('b', 40)`)).rows,  // while a's move is not committed
      ].map((r) => r.request_id);
      await a.query('commit');
      await b.query('commit');
      // all but the rows a claim read past its limit to know it reached it (at most two, held until it commits: 0036)
      expect(got.length).toBeGreaterThanOrEqual(58);
      got.push(...(await db.pool.query(`select request_id from cloud.claim_messages('c', 40)`)).rows.map((r) => r.request_id));
      expect(new Set(got).size).toBe(60);
      expect(got).toHaveLength(60);
    } finally {
      await a.query('rollback').catch(() => {});
      await b.query('rollback').catch(() => {});
      a.release();
      b.release();
    }
  });

  it('rotation moves what waits in the intake into the hot table and empties the intake by TRUNCATE, even while a snapshot is held', async () => {
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      await holder.query('begin isolation level repeatable read');
      await holder.query('select count(*) from cloud.endpoint'); // holds the xmin horizon, no lock on the outbox tables
      for (let r = 0; r < 3; r++) {
        await enqueue(null, 300);
        await ok('w1', await claim('w1', 200)); // moves 200 of them (dead rows in the intake that vacuum may not reclaim now)
        await enqueue('po:9', 2);
        expect((await q(`select cloud.rotate_outbox(0) as n`)).rows[0].n).toBe(200);
        expect((await q(`select pg_relation_size('cloud.outbox_intake')::int as heap, pg_indexes_size('cloud.outbox_intake')::int as idx`)).rows)
          .toEqual([{ heap: 0, idx: 2 * 8192 }]);
      }
      expect(await where()).toEqual({ 'cloud.outbox pending': 306, 'cloud.outbox_archive sent': 600 });
    } finally {
      await holder.query('rollback').catch(() => {});
      await holder.end();
    }
  });
});
