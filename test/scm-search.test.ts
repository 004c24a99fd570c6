/** The ASN search by material code and batch number is a containment search the GIN index serves. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, type TestDb } from './helpers/db.js';

let db: TestDb;

beforeAll(async () => {
  db = await createTestDb('scm_search');
  await db.pool.query(`select scm.put_supplier('S001', 'A')`);
  // 4,000 ASNs of 5 lines: material M-<n % 500>, batch B-<ASN>-<line>
  await db.pool.query(`
    insert into scm.asn (asn_no, supplier_code, supplier_id, status, detail, received_via)
    select 'ASN-' || g, 'S001', (select id from scm.supplier), 'accepted',
           jsonb_build_object('code', 'ASN-' || g, 'supplier', 'S001', 'details',
             (select jsonb_agg(jsonb_build_object('lineno', l, 'orderCode', 'PO-' || g, 'orderDetailId', l,
                                                  'material', 'M-' || ((g * 5 + l) % 500), 'batchNo', 'B-' || g || '-' || l, 'purchaseNum', 10))
                from generate_series(1, 5) l)), 'pull'
      from generate_series(1, 4000) g`);
  await db.pool.query('analyze scm.asn');
});
afterAll(async () => {
  await db.drop();
});

describe('ASN search', () => {
  it('finds the lines by material and batch, or by material alone, exactly as a full scan does', async () => {
    const one = await db.pool.query(`select asn_no, line->>'batchNo' batch from scm.search_asn_lines('M-17', 'B-1000-17')`);
    expect(one.rows).toEqual([]);
    const hit = await db.pool.query(`select asn_no, line->>'batchNo' batch, line->>'material' m from scm.search_asn_lines('M-7', 'B-1-2')`);
    expect(hit.rows).toEqual([{ asn_no: 'ASN-1', batch: 'B-1-2', m: 'M-7' }]);
    const all = await db.pool.query(`select count(*)::int n from scm.search_asn_lines('M-7')`);
    const scan = await db.pool.query(`select count(*)::int n from scm.asn d, jsonb_array_elements(d.detail->'details') l where l->>'material' = 'M-7'`);
    expect(all.rows[0].n).toBe(scan.rows[0].n);
    expect(all.rows[0].n).toBe(40);
  });

  it('the plan the function runs uses the GIN index on scm.asn.detail', async () => {
    // auto_explain reports the plan of the statement inside the function, as a NOTICE to this session
    const c = await db.pool.connect();
    const notices: string[] = [];
    const onNotice = (n: { message?: string }) => notices.push(n.message ?? '');
    c.on('notice', onNotice);
    try {
      await c.query(`load 'auto_explain'`);
      await c.query(`set auto_explain.log_min_duration = 0; set auto_explain.log_nested_statements = on; set auto_explain.log_level = 'notice'; set auto_explain.log_format = 'json'`);
      const { rows } = await c.query(`select asn_no from scm.search_asn_lines('M-7', 'B-1-2')`);
      expect(rows).toEqual([{ asn_no: 'ASN-1' }]);
    } finally {
      await c.query('reset all');
      c.off('notice', onNotice);
      c.release(true);
    }
    const inner = notices.find((n) => n.includes('jsonb_array_elements'));
    expect(inner, notices.join('\n')).toBeDefined();
    expect(inner).toContain('"Index Name": "asn_detail"');
    expect(inner).not.toContain('"Node Type": "Seq Scan"');
  });

  it('the index is jsonb_path_ops, chosen for containment', async () => {
    const { rows } = await db.pool.query(`select pg_get_indexdef('scm.asn_detail'::regclass) d`);
    expect(rows[0].d).toMatch(/USING gin \(detail jsonb_path_ops\)/);
  });
});
