/**
 * The shared-database path: the cloud's middle database (here a second
 * database in the private cluster) over postgres_fdw, copied by watermark
 * through the same ingest function; and the pg_cron jobs of the pull and the copy.
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { startYonbipSim, type YonbipSim } from '../listener/sim/yonbip.js';
import { withCronDatabase } from './helpers/cron.js';
import { createTestDb, sqlstateOf, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { addPo, addSuppliers, asnDoc } from './helpers/scm.js';

let db: TestDb;
let middle: TestDb;
let sim: YonbipSim;

beforeAll(async () => {
  db = await createTestDb('scm_shared');
  middle = await createTestDb('scm_middle', { template: null });
  // the cloud's table: an identity column the ERP side only reads
  await middle.pool.query(`create table public.asn_outbox (id bigint generated always as identity primary key, event_id text,
                             doc jsonb not null, created_at timestamptz not null default now())`);
  sim = await startYonbipSim();
  const u = new URL(db.url);
  await db.pool.query(`select scm.create_shared_asn_server('yonbip_middle', $1, $2, $3)`, [u.hostname, Number(u.port || 5432), middle.name]);
  await db.pool.query(`select scm.create_shared_asn_user_mapping('yonbip_middle', $1)`, [decodeURIComponent(u.username) || 'postgres']);
  const { rows } = await db.pool.query(`select scm.create_shared_asn_foreign_table('yonbip_middle')::text t`);
  expect(rows[0].t).toBe('scm_middle.asn_outbox');
  const { s1 } = await addSuppliers(db.pool);
  await db.pool.query(`select cloud.put_endpoint('yonbip', 'http://127.0.0.1:9', 'yonbip')`);
  await addPo(db.pool, 'PO-M', s1);
});
afterAll(async () => {
  await sim.close();
  await db.drop(); // first: its fdw connections hold the middle database open
  await middle.drop();
});
beforeEach(async () => {
  await middle.pool.query('truncate public.asn_outbox restart identity');
  // the foreign table's source, the endpoint and the PO (with its supplier) of beforeAll stay
  await resetProductState(db.pool, { keep: ['scm.shared_asn_source', 'cloud.endpoint', 'erp.purchase_order_line', 'scm.purchase_order_line'] });
  await db.pool.query('update scm.shared_asn_source set last_id = 0');
});

const ship = (code: string, qty: number, eventId?: string) =>
  sim.ship({ asn: asnDoc(code, 'PO-M', [{ line: 1, qty }]), via: 'middle', middleDbUrl: middle.url, eventId });
const copy = async () => (await db.pool.query(`select scm.copy_all_shared_asns() n`)).rows[0].n as number;
const asns = async () => (await db.pool.query(`select asn_no, status, received_via as source from scm.asn order by asn_no`)).rows;

describe('ASNs from the cloud\'s middle database (postgres_fdw)', () => {
  it('new rows are copied through the ingest function by watermark; copying again changes nothing', async () => {
    await ship('ASN-M1', 10);
    await ship('ASN-M2', 20);
    expect(await copy()).toBe(2);
    expect(await asns()).toEqual([
      { asn_no: 'ASN-M1', status: 'accepted', source: 'shared_db' },
      { asn_no: 'ASN-M2', status: 'accepted', source: 'shared_db' },
    ]);
    expect((await db.pool.query(`select last_id from scm.shared_asn_source`)).rows[0].last_id).toBe('2');
    await copy(); // re-reads the overlap below the watermark: harmless
    await ship('ASN-M3', 500); // more than the line orders: kept, rejected
    await copy();
    expect(await asns()).toHaveLength(3);
    expect((await asns())[2]).toMatchObject({ asn_no: 'ASN-M3', status: 'rejected' });
    expect((await db.pool.query(`select count(*)::int n from scm.asn_line`)).rows[0].n).toBe(3);
  });

  it('the same event written twice to the middle database is one ASN; malformed rows go to quarantine, the rest is copied', async () => {
    await ship('ASN-D', 5, 'ev-dup');
    await ship('ASN-D', 5, 'ev-dup');
    await middle.pool.query(`insert into public.asn_outbox (event_id, doc) values ('ev-bad', '{"code": ""}')`);
    // a line number that is no number, and two lines with one number: once a 22P02 and a 23505 that stopped the copy for good
    const badLine = asnDoc('ASN-BAD-1', 'PO-M', [{ line: 1, qty: 1 }]);
    (badLine.details as Array<Record<string, unknown>>)[0]!.lineno = 'one';
    const twice = asnDoc('ASN-BAD-2', 'PO-M', [{ line: 1, qty: 1 }, { line: 1, qty: 1 }]);
    (twice.details as Array<Record<string, unknown>>)[1]!.lineno = 1;
    await sim.ship({ asn: badLine, via: 'middle', middleDbUrl: middle.url, eventId: 'ev-bad-line' });
    await sim.ship({ asn: twice, via: 'middle', middleDbUrl: middle.url, eventId: 'ev-twice' });
    await ship('ASN-E', 5);
    expect(await copy()).toBe(6);
    expect((await asns()).map((a) => a.asn_no)).toEqual(['ASN-D', 'ASN-E']);
    expect((await db.pool.query(`select last_id from scm.shared_asn_source`)).rows[0].last_id).toBe('6');
    const q = await db.pool.query(`select source, event_id, sqlstate, reason, doc ->> 'code' code from scm.asn_quarantine order by event_id`);
    expect(q.rows.map((r) => [r.event_id, r.source, r.sqlstate, r.code])).toEqual([
      ['ev-bad', 'shared_db', 'ES004', ''], ['ev-bad-line', 'shared_db', 'ES004', 'ASN-BAD-1'], ['ev-twice', 'shared_db', 'ES004', 'ASN-BAD-2']]);
    expect(q.rows[1].reason).toMatch(/lineno/);
    await copy(); // the overlap re-reads them: still one quarantine row each
    expect((await db.pool.query(`select count(*)::int n from scm.asn_quarantine`)).rows[0].n).toBe(3);
  });

  it('setup step 2 run again replaces the mapping and the copy keeps working; a missing server or role, an empty password are ES005 naming them', async () => {
    const user = decodeURIComponent(new URL(db.url).username) || 'postgres';
    await db.pool.query(`select scm.create_shared_asn_user_mapping('yonbip_middle', $1)`, [user]);
    expect((await db.pool.query(`select count(*)::int n from pg_user_mappings where srvname = 'yonbip_middle'`)).rows[0].n).toBe(1);
    await ship('ASN-R1', 1);
    expect(await copy()).toBe(1);
    for (const [args, named] of [
      [['nosuch_middle', user, null, null], 'nosuch_middle'],
      [['yonbip_middle', user, 'pw-0123456789', 'nosuch_role'], 'nosuch_role'],
      [['yonbip_middle', user, '', null], 'yonbip_middle'],
      [['yonbip_middle', '', 'pw-0123456789', null], 'yonbip_middle'],
    ] as const) {
      const err = await db.pool.query(`select scm.create_shared_asn_user_mapping($1, $2, $3, $4)`, [...args]).then(() => null, (e: unknown) => e as { code: string; message: string });
      expect(err?.code, JSON.stringify(args)).toBe(SqlState.sharedDbSetupRefused);
      expect(err!.message).toContain(named);
      expect(JSON.stringify(err)).not.toContain('pw-0123456789');
    }
    expect((await db.pool.query(`select count(*)::int n from pg_user_mappings where srvname = 'yonbip_middle'`)).rows[0].n).toBe(1);
  });

  it('setup refuses what postgres_fdw would refuse later: odd names, a password-less mapping made by a non-superuser', async () => {
    expect(await sqlstateOf(db.pool.query(`select scm.create_shared_asn_server('Bad Name', 'h', 5432, 'd')`))).toBe(SqlState.sharedDbSetupRefused);
    expect(await sqlstateOf(db.pool.query(`select scm.create_shared_asn_foreign_table('yonbip_middle', 'x; drop table erp.supplier')`))).toBe(SqlState.sharedDbSetupRefused);
    const c = await db.pool.connect();
    try {
      await c.query('set role erp_cloud_operator');
      expect(await sqlstateOf(c.query(`select scm.create_shared_asn_user_mapping('yonbip_middle', 'cloud_reader')`))).toBe(SqlState.sharedDbSetupRefused);
    } finally {
      await c.query('reset role');
      c.release();
    }
  });
});

describe('pg_cron jobs of supplier collaboration', () => {
  it('the pull and the shared-database copy are scheduled every minute in the cron database', () => withCronDatabase(async (cronDb, url) => {
    expect(cronDb, 'the server must preload pg_cron (scripts/pg.sh configures it)').toBeTruthy();
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      const { rows } = await c.query(`select jobname, schedule, command, active from cron.job where jobname like 'erp-cloud scm: %' order by jobname`);
      expect(rows).toEqual([
        { jobname: 'erp-cloud scm: copy shared-database ASNs', schedule: '* * * * *', command: 'select scm.copy_all_shared_asns()', active: true },
        { jobname: 'erp-cloud scm: pull ASNs', schedule: '* * * * *', command: 'select scm.enqueue_asn_pulls()', active: true },
      ]);
    } finally {
      await c.end();
    }
  }), 240_000);
});
