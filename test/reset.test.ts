/**
 * The test kernel's reset (test/helpers/reset.ts): after it, every table and
 * sequence of the product schemas reads as in a fresh clone of the migrated
 * template, whatever a test wrote (also into a partition made at run time and
 * into seeded configuration); what a file asks to keep stays as it is.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';

let db: TestDb;
let fresh: TestDb;
beforeAll(async () => {
  db = await createTestDb('reset');
  fresh = await createTestDb('reset_fresh');
});
afterAll(async () => {
  await db.drop();
  await fresh.drop();
});

/** Each product table's rows (as sorted text, digested) and each product sequence's state, by name. */
async function state(pool: pg.Pool): Promise<Record<string, string>> {
  const { rows: tables } = await pool.query<{ t: string }>(`
    select c.oid::regclass::text t from pg_class c
     where c.relnamespace::regnamespace::text in ('cloud', 'tax', 'scm', 'sso', 'vault', 'erp') and c.relkind in ('r', 'p') order by 1`);
  const out: Record<string, string> = {};
  for (const { t } of tables) {
    out[t] = (await pool.query(`select md5(coalesce(string_agg(x::text, E'\\n' order by x::text), '')) d from ${t} x`)).rows[0].d;
  }
  const { rows: seqs } = await pool.query(`select schemaname || '.' || sequencename s, coalesce(last_value, 0)::text v from pg_sequences
                                            where schemaname in ('cloud', 'tax', 'scm', 'sso', 'vault', 'erp')`);
  for (const r of seqs) out[`sequence ${r.s}`] = r.v;
  return out;
}

async function writeEverywhere(): Promise<void> {
  await db.pool.query(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/hook')`);
  await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 3) g`);
  await db.pool.query(`select cloud.ensure_log_partitions(1, now() + interval '2 years')`); // partitions the template has not
  await db.pool.query(`insert into cloud.log (request_id, endpoint, operation, attempt, outcome, started_at)
                       select request_id, endpoint, operation, 1, 'ok', now() + interval '2 years' from cloud.outbox`);
  await db.pool.query(`update cloud.setting set value = '1 day' where name = 'log_retention'`);
  await db.pool.query(`delete from tax.text_limit where ctid = (select min(ctid) from tax.text_limit)`);
  await db.pool.query(`insert into erp.supplier (code, name, tax_id) values ('S9', 'Nine', '91320500MA1W0000X1')`);
}

describe('resetProductState', () => {
  it('leaves every product table and sequence as a fresh clone of the template has it, seeded configuration included', async () => {
    const before = await state(fresh.pool);
    await writeEverywhere();
    expect(await state(db.pool)).not.toEqual(before);
    await resetProductState(db.pool);
    const after = await state(db.pool);
    // partitions made at run time stay (empty): compare the tables both have
    const made = Object.keys(after).filter((k) => !(k in before));
    expect(made.every((k) => k.startsWith('cloud.log_p'))).toBe(true);
    for (const k of made) delete after[k];
    expect(after).toEqual(before);
  });

  it('keeps what a file asks to keep, with the tables it references, and still resets the rest', async () => {
    await resetProductState(db.pool);
    await writeEverywhere();
    const kept = (await db.pool.query(`select name, base_url from cloud.endpoint`)).rows;
    await resetProductState(db.pool, { keep: ['cloud.endpoint'] });
    expect((await db.pool.query(`select name, base_url from cloud.endpoint`)).rows).toEqual(kept);
    expect((await db.pool.query(`select count(*)::int n from cloud.outbox`)).rows[0].n).toBe(0);
    expect((await db.pool.query(`select value::text from cloud.setting where name = 'log_retention'`)).rows[0].value).toBe('90 days');
    // the kept endpoint takes a new message
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    expect((await db.pool.query(`select count(*)::int n from cloud.outbox`)).rows[0].n).toBe(1);
  });

  it('names a table to keep that does not exist', async () => {
    await expect(resetProductState(db.pool, { keep: ['cloud.no_such_table'] })).rejects.toThrow(/no table cloud\.no_such_table to keep/);
  });
});
