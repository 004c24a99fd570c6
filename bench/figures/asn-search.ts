/**
 * Figure 6: the ASN search. 1,000,000 ASN lines (100,000 ASNs of 10 lines;
 * quick: 50,000 lines) are generated set-based in SQL, then
 * scm.search_asn_lines(material, batch) — a containment search on
 * scm.asn.detail — is timed with the GIN index (jsonb_path_ops) and
 * without it (the index dropped, the same queries). asn_search_speedup is
 * p50 without ÷ p50 with. Generation has a time budget; the lines actually
 * made are recorded.
 */
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchClient } from '../lib/db.js';
import { percentile, progress, round } from '../lib/util.js';

export interface AsnSearchResult {
  asn_search_speedup: number;
  asn_search_p50_ms: number;
  asn_search: {
    lines: number;
    documents: number;
    generate_s: number;
    index_build_s: number;
    index_mb: number;
    table_mb: number;
    with_index: { queries: number; p50_ms: number; p95_ms: number; max_ms: number };
    without_index: { queries: number; p50_ms: number; max_ms: number };
    rows_checked_equal: boolean;
  };
}

const LINES_PER_DOC = 10;
const MATERIALS = 5000;

export async function asnSearchFigure(ctx: BenchContext): Promise<AsnSearchResult> {
  const docs = ctx.quick ? 5_000 : 100_000;
  const chunk = 10_000;
  const budgetMs = ctx.quick ? 30_000 : 180_000;
  progress(`figure 6: ASN search over ${(docs * LINES_PER_DOC).toLocaleString('en')} lines, GIN index vs none`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('asn_search');
  const c = benchClient(db.url, 'asn_search');
  await c.connect();
  try {
    const indexDef = (await c.query<{ d: string }>(`select pg_get_indexdef('scm.asn_detail'::regclass) d`)).rows[0]!.d;
    await c.query(`select scm.put_supplier('S001', 'bench supplier')`);
    // load without the index, then build it once (how a DBA would load history)
    await c.query('drop index scm.asn_detail');
    phase('generate');
    const t0 = performance.now();
    let made = 0;
    while (made < docs && performance.now() - t0 < budgetMs) {
      const n = Math.min(chunk, docs - made);
      await c.query(`
        insert into scm.asn (asn_no, supplier_code, supplier_id, status, detail, received_via)
        select 'ASN-' || g, 'S001', s.id, 'accepted',
               jsonb_build_object('code', 'ASN-' || g, 'supplier', 'S001', 'deliveryDate', '2026-11-24',
                 'logisticalComp', 'SF', 'logisticalCode', 'SF' || g, 'details',
                 (select jsonb_agg(jsonb_build_object('lineno', l, 'orderCode', 'PO-' || (g / 3), 'orderDetailId', l,
                          'material', 'M-' || ((g * 7919 + l * 104729) % $3), 'batchNo', 'B-' || g || '-' || l,
                          'purchaseNum', 10 + l, 'productionDate', '2026-11-01'))
                    from generate_series(1, ${LINES_PER_DOC}) l)), 'pull'
          from generate_series($1::int, $2::int) g, scm.supplier s`, [made + 1, made + n, MATERIALS]);
      made += n;
    }
    const generateS = (performance.now() - t0) / 1000;
    phase('index');
    const t1 = performance.now();
    await c.query(indexDef);
    const indexBuildS = (performance.now() - t1) / 1000;
    await c.query('analyze scm.asn');
    const sizes = (await c.query<{ i: string; t: string }>(
      `select pg_relation_size('scm.asn_detail') i, pg_total_relation_size('scm.asn') - pg_indexes_size('scm.asn') t`)).rows[0]!;

    // existing (material, batch) pairs, spread over the table
    const queries: Array<[string, string]> = [];
    const want = ctx.quick ? 100 : 300;
    for (let k = 0; k < want; k++) {
      const g = 1 + Math.floor(((k * 2654435761) % 1_000_003) / 1_000_003 * made);
      const l = 1 + (k % LINES_PER_DOC);
      queries.push([`M-${(g * 7919 + l * 104729) % MATERIALS}`, `B-${g}-${l}`]);
    }
    const run = async (pairs: Array<[string, string]>) => {
      const ms: number[] = [];
      const counts: number[] = [];
      for (const [m, b] of pairs) {
        const s = performance.now();
        const { rows } = await c.query<{ n: number }>('select count(*)::int n from scm.search_asn_lines($1, $2)', [m, b]);
        ms.push(performance.now() - s);
        counts.push(rows[0]!.n);
      }
      return { ms, counts };
    };
    phase('queries');
    await run(queries.slice(0, 20)); // warm the cache
    const withIdx = await run(queries);
    const slowPairs = queries.slice(0, ctx.quick ? 5 : 10);
    await c.query('drop index scm.asn_detail');
    await run(slowPairs.slice(0, 1)); // warm the table into the cache
    const without = await run(slowPairs);
    await c.query(indexDef);
    const p50With = percentile(withIdx.ms, 50);
    const p50Without = percentile(without.ms, 50);
    return {
      asn_search_speedup: round(p50Without / p50With, 1),
      asn_search_p50_ms: round(p50With, 3),
      asn_search: {
        lines: made * LINES_PER_DOC,
        documents: made,
        generate_s: round(generateS, 1),
        index_build_s: round(indexBuildS, 1),
        index_mb: round(Number(sizes.i) / 2 ** 20, 1),
        table_mb: round(Number(sizes.t) / 2 ** 20, 1),
        with_index: { queries: withIdx.ms.length, p50_ms: round(p50With, 3), p95_ms: round(percentile(withIdx.ms, 95), 3), max_ms: round(Math.max(...withIdx.ms), 3) },
        without_index: { queries: without.ms.length, p50_ms: round(p50Without, 1), max_ms: round(Math.max(...without.ms), 1) },
        // every query found its line, with and without the index
        rows_checked_equal: withIdx.counts.every((n) => n === 1) && without.counts.every((n, i) => n === withIdx.counts[i]),
      },
    };
  } finally {
    phase('teardown');
    await c.end();
    await ctx.dbs.drop(db.name);
  }
}
