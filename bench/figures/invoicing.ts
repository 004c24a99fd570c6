/**
 * Figure 6: e-invoicing end to end through the Nuonuo simulator. One listener
 * process; every settlement approval runs the whole chain (validate, split,
 * payload, enqueue → requestBillingNew → queryInvoiceResult → PDF download →
 * tax.attachment). Two measurements:
 *   - invoices_per_s: N settlements approved (4 ERP sessions, one approval per
 *     transaction) while no listener runs, then one listener starts: N divided
 *     by the time from its start until the last PDF is attached (each invoice
 *     is three cloud calls: issue, query, download). approvals_per_s is the
 *     ERP side alone (validation, split, payload, enqueue);
 *   - approval_to_pdf_ms: approvals paced 250 ms apart, each from its commit
 *     (settlement.approved_at) to its PDF attachment (attachment.created_at),
 *     both database clocks. It includes the platform's issuing time and the
 *     first poll delay, which are settings (recorded below), not engine cost.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { startNuonuoSim } from '../../listener/sim/nuonuo.js';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchPool } from '../lib/db.js';
import { spawnListener, stopListener, waitListenerIdle } from '../lib/listeners.js';
import { percentile, progress, round, sleep, waitFor } from '../lib/util.js';

export interface InvoicingResult {
  invoices_per_s: number;
  approval_to_pdf_p50_ms: number;
  approval_to_pdf_p99_ms: number;
  invoicing: Record<string, unknown>;
}

const FIRST_POLL_MS = 200;
const ISSUE_DELAY_MS = 100;

async function createSettlements(pool: pg.Pool, prefix: string, n: number): Promise<void> {
  await pool.query(`insert into erp.customer (name, tax_id) select '客户 ' || g, '91330106MA2AYNWD8M' from generate_series(1, 1) g on conflict do nothing`);
  await pool.query(`insert into erp.settlement (settlement_no, customer_id) select $1 || g, (select min(id) from erp.customer) from generate_series(1, $2::int) g`, [prefix, n]);
  await pool.query(`insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, quantity, unit_price, amount, tax_rate)
                    select s.id, l.n, l.item, l.code, 2, l.price, 2 * l.price, l.rate
                      from erp.settlement s
                     cross join (values (1, '伺服电机', '1090613010000000000', 4520.00, 0.13), (2, '安装服务', '3040201030000000000', 530.00, 0.06),
                                        (3, '运输服务', '3010102020100000000', 109.00, 0.09)) l(n, item, code, price, rate)
                     where s.settlement_no like $1 || '%'`, [prefix]);
}

async function attachedCount(pool: pg.Pool, prefix: string): Promise<number> {
  const { rows } = await pool.query<{ n: number }>(
    `select count(*)::int n from tax.attachment a join tax.invoice i on a.invoice_id = i.id join tax.document d on d.id = i.document_id
       join erp.settlement s on d.reference = 'settlement/' || s.settlement_no where s.settlement_no like $1 || '%'`, [prefix]);
  return rows[0]!.n;
}

export async function invoicingFigure(ctx: BenchContext): Promise<InvoicingResult> {
  const n = ctx.quick ? 60 : 1000;
  const paced = ctx.quick ? 6 : 60;
  progress(`figure 6: e-invoicing through the Nuonuo simulator, ${n} approvals back to back, then ${paced} paced`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('invoicing', ['reference-erp']);
  const pool = benchPool(db.url, 'invoicing', 5);
  const appKey = 'bench-app';
  const appSecret = randomBytes(16).toString('hex');
  const sim = await startNuonuoSim({ appKey, appSecret, issueDelayMs: ISSUE_DELAY_MS, tokenQuota: 5 });
  let listener: ReturnType<typeof spawnListener> | null = null;
  try {
    await pool.query(`select cloud.put_endpoint('nuonuo', $1, 'nuonuo', 'invoice_request', p_timeout_ms => 5000, p_config => $2)`,
      [`${sim.url}/open/v1/services`, JSON.stringify({ app_key: appKey })]);
    await pool.query(`select cloud.put_endpoint_allowlist('nuonuo', '{}', '{}', true)`);
    await pool.query(`select tax.put_config(p_seller_tax_id => '339902999999789113', p_seller_name => '基准销方', p_clerk => '张三',
                        p_first_poll_ms => $1, p_poll_cap_ms => 2000)`, [FIRST_POLL_MS]);
    await createSettlements(pool, 'B-', n);
    await createSettlements(pool, 'P-', paced);

    // the ERP side: 4 sessions approve everything, one settlement per transaction
    phase('approvals');
    const t0 = performance.now();
    let next = 1;
    await Promise.all(Array.from({ length: 4 }, async () => {
      for (let i = next++; i <= n; i = next++) await pool.query(`update erp.settlement set status = 'approved' where settlement_no = $1`, [`B-${i}`]);
    }));
    const approvedMs = performance.now() - t0;
    // the cloud side: one listener drains the backlog through issue → query → PDF
    phase('drain');
    const t1 = performance.now();
    listener = spawnListener(db.url, 'bench-invoicing', { ERP_CLOUD_SECRET_NUONUO_APP_SECRET: appSecret });
    await waitFor(async () => (await attachedCount(pool, 'B-')) >= n, { timeoutMs: 600_000, intervalMs: 100, what: `${n} PDFs attached` });
    const totalS = (performance.now() - t1) / 1000;
    await waitListenerIdle(pool, listener);

    // latency: paced approvals on an otherwise idle system
    phase('paced');
    for (let i = 1; i <= paced; i++) {
      await pool.query(`update erp.settlement set status = 'approved' where settlement_no = $1`, [`P-${i}`]);
      await sleep(250);
    }
    await waitFor(async () => (await attachedCount(pool, 'P-')) >= paced, { timeoutMs: 120_000, intervalMs: 100, what: `${paced} paced PDFs attached` });
    const { rows } = await pool.query<{ ms: number }>(
      `select extract(epoch from a.created_at - s.approved_at) * 1000 as ms
         from erp.settlement s join tax.document d on d.reference = 'settlement/' || s.settlement_no
         join tax.invoice i on i.document_id = d.id
         join tax.attachment a on a.invoice_id = i.id
        where s.settlement_no like 'P-%'`);
    const lat = rows.map((r) => Number(r.ms));
    const steps = await pool.query<{ operation: string; n: number }>(`select operation, count(*)::int n from cloud.log group by 1 order by 1`);
    return {
      invoices_per_s: round(n / totalS, 1),
      approval_to_pdf_p50_ms: round(percentile(lat, 50), 0),
      approval_to_pdf_p99_ms: round(percentile(lat, 99), 0),
      invoicing: {
        invoices: n,
        approvals_per_s: round(n / (approvedMs / 1000), 1),
        drain_s: round(totalS, 2),
        paced_samples: lat.length,
        approval_to_pdf_min_ms: round(Math.min(...lat), 0),
        approval_to_pdf_max_ms: round(Math.max(...lat), 0),
        attempts_by_operation: Object.fromEntries(steps.rows.map((r) => [r.operation, r.n])),
        token_calls: sim.tokenCalls(),
        config: { first_poll_ms: FIRST_POLL_MS, sim_issue_delay_ms: ISSUE_DELAY_MS, lines_per_invoice: 3, listeners: 1, erp_sessions: 4 },
      },
    };
  } finally {
    phase('teardown');
    if (listener) await stopListener(listener);
    await sim.close();
    await pool.end();
  }
}
