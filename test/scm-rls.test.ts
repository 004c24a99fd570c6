/**
 * The supplier portal sees and writes only its own supplier's rows, chosen by
 * a transaction-local setting (the shared portal login) or by the binding of
 * its login role (scm.portal_login); without either it sees nothing. Attacked
 * here: another supplier's id, a missing or malformed setting, RESET ROLE /
 * SET ROLE, rows moved to another supplier, a bound login naming another supplier.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, rolledBack, sqlstateOf, urlFor, type TestDb } from './helpers/db.js';
import { addPo, addSuppliers, asnDoc } from './helpers/scm.js';

let db: TestDb;
let portal: pg.Client;
let bound: pg.Client;
const role = `portal_${randomBytes(4).toString('hex')}`;
const boundRole = `portal_s1_${randomBytes(4).toString('hex')}`;
let s1: number;
/** erp-cloud's ids of suppliers S001 and S002 (scm.supplier), looked up by code: the ERP's ids are its own */
let scmS1: string;
let scmS2: string;
let s2: number;

async function admin(sql: string): Promise<void> {
  const c = new pg.Client({ connectionString: urlFor('postgres') });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

beforeAll(async () => {
  db = await createTestDb('scm_rls');
  await admin(`create role ${role} login noinherit`);
  await admin(`grant erp_cloud_supplier_portal to ${role}`);
  await admin(`create role ${boundRole} login noinherit`);
  await admin(`grant erp_cloud_supplier_portal to ${boundRole}`);
  ({ s1, s2 } = await addSuppliers(db.pool));
  const scmId = async (code: string) => (await db.pool.query(`select id::text from scm.supplier where code = $1`, [code])).rows[0].id as string;
  scmS1 = await scmId('S001');
  scmS2 = await scmId('S002');
  await db.pool.query(`select cloud.put_endpoint('yonbip', 'http://127.0.0.1:9', 'yonbip')`);
  const a = await addPo(db.pool, 'PO-S1', s1);
  const b = await addPo(db.pool, 'PO-S2', s2);
  await addPo(db.pool, 'PO-S1-DRAFT', s1, 'draft');
  expect(a && b).toBeTruthy();
  const ingest = (doc: unknown) => db.pool.query(`select scm.ingest_asn($1::jsonb, 'push')`, [JSON.stringify(doc)]);
  await ingest(asnDoc('ASN-S1', 'PO-S1', [{ line: 1, qty: 5, batch: 'LOT-7' }]));
  await ingest(asnDoc('ASN-S2', 'PO-S2', [{ line: 1, qty: 5, batch: 'LOT-7' }], 'S002'));
  const u = new URL(db.url);
  u.username = role;
  portal = new pg.Client({ connectionString: u.toString() });
  await portal.connect();
  // the portal's login role holds erp_cloud_supplier_portal without inheriting it: it must SET ROLE, as the portal does
  await portal.query('set role erp_cloud_supplier_portal');
  // a second login, bound to S001 by an operator
  const op = await db.pool.connect();
  try {
    await op.query('set role erp_cloud_operator');
    await op.query('select scm.bind_portal_login($1, $2)', [boundRole, 'S001']);
    await op.query('select scm.register_shared_portal_login($1)', [role]); // the portal app's login
  } finally {
    await op.query('reset role');
    op.release();
  }
  u.username = boundRole;
  bound = new pg.Client({ connectionString: u.toString() });
  await bound.connect();
  await bound.query('set role erp_cloud_supplier_portal');
});
afterAll(async () => {
  await portal?.end();
  await bound?.end();
  await db.drop();
  await admin(`drop role if exists ${role}`);
  await admin(`drop role if exists ${boundRole}`);
});

/** Runs fn in a portal transaction acting for `supplierCode` (or with no setting), then rolls back. */
function asSupplier<T>(supplierCode: string | null, fn: () => Promise<T>): Promise<T> {
  return rolledBack(portal, async () => {
    if (supplierCode) await portal.query('select scm.act_as_supplier($1)', [supplierCode]);
    return fn();
  });
}
const q = async (sql: string, params: unknown[] = []) => (await portal.query(sql, params)).rows;

describe('supplier portal isolation', () => {
  it('row-level security is on for every table that holds supplier data', async () => {
    const { rows } = await db.pool.query(`select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
      where n.nspname = 'scm' and c.relkind = 'r' and c.relrowsecurity and c.relname in ('supplier', 'purchase_order', 'purchase_order_line', 'asn', 'asn_line') order by 1`);
    expect(rows.map((r) => r.relname)).toEqual(['asn', 'asn_line', 'purchase_order', 'purchase_order_line', 'supplier']);
    const policies = await db.pool.query(`select policyname from pg_policies where schemaname = 'scm' and 'erp_cloud_supplier_portal' = any (roles)`);
    expect(policies.rows.length).toBeGreaterThanOrEqual(9);
    for (const p of policies.rows) expect(p.policyname).toMatch(/^Suppliers( [A-Za-z]+){3,}$/); // sentences
  });

  it('a supplier sees only its own supplier record, purchase orders, lines, ASNs and ASN lines', async () => {
    await asSupplier('S001', async () => {
      expect(await q(`select code from scm.supplier`)).toEqual([{ code: 'S001' }]);
      // (a draft is the ERP's own business: erp-cloud keeps only orders handed to it)
      expect(await q(`select po_no from scm.purchase_order order by po_no`)).toEqual([{ po_no: 'PO-S1' }]);
      expect(await q(`select po_no, supplier_code from scm.order_status`)).toEqual([{ po_no: 'PO-S1', supplier_code: 'S001' }]);
      expect((await q(`select distinct po_id from scm.purchase_order_line`))).toHaveLength(1);
      expect(await q(`select asn_no from scm.asn_status`)).toEqual([{ asn_no: 'ASN-S1' }]);
      expect(await q(`select asn_no from scm.asn`)).toEqual([{ asn_no: 'ASN-S1' }]);
      expect(await q(`select count(*)::int n from scm.asn_line`)).toEqual([{ n: 1 }]);
      // asking for the other supplier's rows by id finds nothing
      expect(await q(`select po_no from scm.purchase_order where supplier_id = $1`, [s2])).toEqual([]);
      // the search is bound by the same policies
      expect((await q(`select asn_no from scm.search_asn_lines('M-100', 'LOT-7')`)).map((r) => r.asn_no)).toEqual(['ASN-S1']);
    });
  });

  it('with no setting, or an empty or malformed one, the portal sees nothing (fails closed), without an error', async () => {
    for (const value of [null, '', 'abc', `${s1} or true`, '-1', `${s1},${s2}`]) {
      await asSupplier(null, async () => {
        if (value !== null) await portal.query(`select set_config('scm.supplier_id', $1, true)`, [value]);
        expect(await q(`select count(*)::int n from scm.purchase_order`)).toEqual([{ n: 0 }]);
        expect(await q(`select count(*)::int n from scm.asn`)).toEqual([{ n: 0 }]);
        expect(await q(`select count(*)::int n from scm.supplier`)).toEqual([{ n: 0 }]);
      });
    }
  });

  it('the setting lasts one transaction: the next one sees nothing until it sets its own', async () => {
    await portal.query('begin');
    await portal.query(`select scm.act_as_supplier('S001')`);
    await portal.query('commit');
    expect(await q(`select count(*)::int n from scm.purchase_order`)).toEqual([{ n: 0 }]);
  });

  it("writing a row for another supplier is refused with 42501: a new ASN, a moved ASN, a moved PO", async () => {
    // the policies hold even where a DBA widened the portal's grants
    await db.pool.query(`grant insert on scm.asn to erp_cloud_supplier_portal; grant update (supplier_id) on scm.asn to erp_cloud_supplier_portal`);
    try {
      await asSupplier('S001', async () => {
        const insert = portal.query(`insert into scm.asn (asn_no, supplier_code, supplier_id, status, detail, received_via) values ('FAKE', 'S002', $1, 'accepted', '{}', 'portal')`, [s2]);
        expect(await sqlstateOf(insert)).toBe('42501');
      });
      await asSupplier('S001', async () => {
        expect(await sqlstateOf(portal.query(`update scm.asn set supplier_id = $1 where asn_no = 'ASN-S1'`, [s2]))).toBe('42501');
      });
      await asSupplier('S001', async () => {
        // another supplier's row is invisible, so an update of it changes nothing
        const r = await portal.query(`update scm.asn set tracking_no = 'HACKED' where asn_no = 'ASN-S2'`);
        expect(r.rowCount).toBe(0);
      });
      // with the column granted, moving one's own PO to another supplier meets the policy's WITH CHECK
      await db.pool.query(`grant update (supplier_id) on scm.purchase_order to erp_cloud_supplier_portal`);
      try {
        await asSupplier('S001', async () => {
          const moved = portal.query(`update scm.purchase_order set supplier_id = $1 where po_no = 'PO-S1'`, [s2]);
          await expect(moved).rejects.toMatchObject({ code: '42501', message: expect.stringMatching(/row-level security policy/) });
        });
      } finally {
        await db.pool.query(`revoke update (supplier_id) on scm.purchase_order from erp_cloud_supplier_portal`);
      }
      await asSupplier('S001', async () => {
        const mine = await portal.query(`update scm.purchase_order set supplier_confirmed_at = now() where po_no in ('PO-S1', 'PO-S2')`);
        // (PO-S2 is invisible: only PO-S1 is confirmed)
        expect(mine.rowCount).toBe(1);
      });
    } finally {
      await db.pool.query(`revoke insert on scm.asn from erp_cloud_supplier_portal; revoke update (supplier_id) on scm.asn from erp_cloud_supplier_portal`);
    }
    const { rows } = await db.pool.query(`select asn_no, supplier_id, tracking_no from scm.asn order by asn_no`);
    expect(rows.map((r) => [r.asn_no, Number(r.supplier_id)])).toEqual([['ASN-S1', Number(scmS1)], ['ASN-S2', Number(scmS2)]]);
    expect(rows.every((r) => r.tracking_no !== 'HACKED')).toBe(true);
  });

  it('an ASN filed through the portal goes in only under the supplier the transaction acts for', async () => {
    await asSupplier('S001', async () => {
      expect(await sqlstateOf(portal.query(`select scm.submit_asn($1::jsonb)`, [JSON.stringify(asnDoc('ASN-X', 'PO-S2', [{ line: 1, qty: 1 }], 'S002'))]))).toBe('42501');
    });
    await asSupplier(null, async () => {
      expect(await sqlstateOf(portal.query(`select scm.submit_asn($1::jsonb)`, [JSON.stringify(asnDoc('ASN-Y', 'PO-S1', [{ line: 1, qty: 1 }]))]))).toBe('42501');
    });
    await asSupplier('S001', async () => {
      const r = await q(`select (scm.submit_asn($1::jsonb)).status`, [JSON.stringify(asnDoc('ASN-Z', 'PO-S1', [{ line: 1, qty: 1 }]))]);
      expect(r).toEqual([{ status: 'accepted' }]);
    });
    expect(await sqlstateOf(portal.query(`select scm.act_as_supplier('S404')`))).toBe('ES008');
  });

  it("the portal cannot tell another supplier's purchase order from one that does not exist, and its rejected ASN keeps no link to it", async () => {
    const submit = (code: string, po: string) => q(`select (r).status, (r).reject_code, (r).reason from scm.submit_asn($1::jsonb) r`, [JSON.stringify(asnDoc(code, po, [{ line: 1, qty: 1 }]))]);
    await asSupplier('S001', async () => {
      const [other] = await submit('ASN-PEEK-1', 'PO-S2');
      const [none] = await submit('ASN-PEEK-2', 'PO-NONE');
      expect(other).toEqual({ status: 'rejected', reject_code: 'ES011', reason: 'purchase order PO-S2 does not exist' });
      expect(none).toEqual({ status: 'rejected', reject_code: 'ES011', reason: 'purchase order PO-NONE does not exist' });
      expect(await q(`select po_id from scm.asn where asn_no = 'ASN-PEEK-1'`)).toEqual([{ po_id: null }]);
    });
  });

  it('RESET ROLE and SET ROLE do not get the portal out: no other role is reachable, and the login role itself sees nothing', async () => {
    for (const target of ['erp_cloud_app', 'erp_cloud_operator', 'postgres']) {
      expect(await sqlstateOf(portal.query(`set role ${target}`))).toBe('42501');
    }
    expect(await sqlstateOf(portal.query('set session authorization postgres'))).toBe('42501');
    await portal.query('reset role');
    try {
      await portal.query('begin');
      await portal.query(`select set_config('scm.supplier_id', $1, true)`, [String(s2)]);
      // without the portal role (noinherit), the login role has no privileges on the tables at all
      expect(await sqlstateOf(portal.query(`select * from scm.asn`))).toBe('42501');
      await portal.query('rollback');
    } finally {
      await portal.query('set role erp_cloud_supplier_portal');
    }
  });

  it('the ERP and operators still see every supplier', async () => {
    const u = new URL(db.url);
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      for (const r of ['erp_cloud_app', 'erp_cloud_operator']) {
        await c.query(`set role ${r}`);
        expect((await c.query(`select count(*)::int n from scm.asn`)).rows[0].n).toBeGreaterThanOrEqual(2);
        await c.query('reset role');
      }
    } finally {
      await c.end();
    }
  });
});

describe('a portal login bound to its supplier', () => {
  const bq = async (sql: string, params: unknown[] = []) => (await bound.query(sql, params)).rows;
  const inTx = <T>(fn: () => Promise<T>): Promise<T> => rolledBack(bound, fn);

  it('sees only its own supplier, with or without naming it', async () => {
    await inTx(async () => {
      expect(await bq(`select po_no from scm.order_status order by po_no`)).toEqual([{ po_no: 'PO-S1' }]);
    });
    await inTx(async () => {
      // erp-cloud's own supplier id, which the ERP looks up by code (scm.put_supplier returns it): not erp.supplier's id
      expect(await bq(`select scm.act_as_supplier('S001') id`)).toEqual([{ id: scmS1 }]);
      expect(await bq(`select code from scm.supplier`)).toEqual([{ code: 'S001' }]);
    });
  });

  it("set_config to another supplier's id is refused with 42501, not obeyed", async () => {
    for (const value of [String(s2), `${s2}`, 'abc']) {
      await inTx(async () => {
        await bound.query(`select set_config('scm.supplier_id', $1, true)`, [value]);
        expect(await sqlstateOf(bound.query(`select po_no from scm.purchase_order`))).toBe('42501');
      });
    }
    // session-wide too
    await bound.query(`select set_config('scm.supplier_id', $1, false)`, [String(s2)]);
    try {
      expect(await sqlstateOf(bound.query(`select * from scm.asn`))).toBe('42501');
    } finally {
      await bound.query(`reset scm.supplier_id`);
    }
  });

  it('act_as_supplier with another code is 42501, the same for a code that does not exist', async () => {
    for (const code of ['S002', 'S404']) {
      await inTx(async () => {
        await expect(bound.query(`select scm.act_as_supplier($1)`, [code])).rejects.toMatchObject({
          code: '42501', message: 'this portal login may only act for the supplier it is bound to' });
      });
    }
    await inTx(async () => {
      expect(await sqlstateOf(bound.query(`select scm.submit_asn($1::jsonb)`, [JSON.stringify(asnDoc('ASN-B2', 'PO-S2', [{ line: 1, qty: 1 }], 'S002'))]))).toBe('42501');
    });
  });

  it('SET ROLE and RESET ROLE do not unbind it, and it cannot rebind itself', async () => {
    for (const target of ['erp_cloud_app', 'erp_cloud_operator', 'postgres', role]) {
      expect(await sqlstateOf(bound.query(`set role ${target}`))).toBe('42501');
    }
    await bound.query('reset role');
    try {
      expect(await sqlstateOf(bound.query(`select * from scm.purchase_order`))).toBe('42501');
      expect(await sqlstateOf(bound.query(`select scm.bind_portal_login(session_user, 'S002')`))).toBe('42501');
    } finally {
      await bound.query('set role erp_cloud_supplier_portal');
    }
    expect(await sqlstateOf(bound.query(`select scm.bind_portal_login(session_user, 'S002')`))).toBe('42501');
    expect(await sqlstateOf(bound.query(`delete from scm.portal_login`))).toBe('42501');
    await inTx(async () => {
      expect(await bq(`select po_no from scm.purchase_order where po_no = 'PO-S2'`)).toEqual([]);
    });
  });

  it('a supplier a login is bound to cannot be deleted, so the login never becomes a shared one', async () => {
    const { rows } = await db.pool.query(`insert into erp.supplier (code, name) values ('S-TMP', 'temp') returning id`);
    const scmId = (await db.pool.query(`select id from scm.supplier where code = 'S-TMP'`)).rows[0].id;
    await db.pool.query(`select scm.bind_portal_login($1, 'S-TMP')`, [role]);
    try {
      expect(await sqlstateOf(db.pool.query(`delete from scm.supplier where id = $1`, [scmId]))).toBe('23503');
    } finally {
      await db.pool.query(`select scm.register_shared_portal_login($1)`, [role]);
      await db.pool.query(`delete from scm.supplier where id = $1`, [scmId]);
      await db.pool.query(`delete from erp.supplier where id = $1`, [rows[0].id]);
    }
  });

  it('a login that is not a registered portal login sees nothing and cannot choose a supplier, whatever it sets (fails closed)', async () => {
    const stray = `${role}_stray`;
    await admin(`create role ${stray} login noinherit`);
    await admin(`grant erp_cloud_supplier_portal to ${stray}`);
    const u = new URL(db.url);
    u.username = stray;
    const c = new pg.Client({ connectionString: u.toString() });
    await c.connect();
    try {
      await c.query('set role erp_cloud_supplier_portal');
      await rolledBack(c, async () => {
        await c.query(`select set_config('scm.supplier_id', $1, true)`, [scmS1]);
        expect((await c.query(`select po_no from scm.purchase_order`)).rows).toEqual([]);
        expect((await c.query(`select asn_no from scm.asn`)).rows).toEqual([]);
      });
      expect(await sqlstateOf(c.query(`select scm.act_as_supplier('S001')`))).toBe('42501');
      // and taking a bound login off the portal leaves it with nothing, not with every supplier
      await db.pool.query(`select scm.bind_portal_login($1, 'S001')`, [stray]);
      await db.pool.query(`select scm.bind_portal_login($1, null)`, [stray]);
      await rolledBack(c, async () => {
        await c.query(`select set_config('scm.supplier_id', $1, true)`, [String(s2)]);
        expect((await c.query(`select po_no from scm.purchase_order`)).rows).toEqual([]);
      });
    } finally {
      await c.end();
      await admin(`drop owned by ${stray}; drop role ${stray}`);
    }
  });
});
