/**
 * Figure: e-invoices per second through each tax platform's simulator, under the
 * same conditions (issue 13). For each of Nuonuo and Baiwang: a fresh database
 * with the reference ERP, N settlements approved while no listener runs (one per
 * transaction), then one listener drains issue → result query → PDF download →
 * tax.attachment; invoices_per_s is N divided by the time from its start until
 * the last PDF is attached. The platform is the endpoint's provider, nothing else
 * differs. Nuonuo issues asynchronously (issueDelayMs 100, polled from 200 ms);
 * Baiwang issues synchronously (the number is in the issue's answer; the result
 * query still runs, as for every platform). The two run at once, side by side
 * (each its own database, simulator and listener): same conditions, the time of one.
 */
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { startBaiwangSim } from '../../listener/sim/baiwang.js';
import { startNuonuoSim } from '../../listener/sim/nuonuo.js';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchPool } from '../lib/db.js';
import { spawnListener, stopListener, waitListenerIdle } from '../lib/listeners.js';
import { progress, round, waitFor } from '../lib/util.js';

type Platform = 'nuonuo' | 'baiwang';

export interface PlatformsResult {
  /** platforms.<name>.invoices_per_s, and what each run saw. */
  platforms: Record<Platform, Record<string, unknown>>;
}

const FIRST_POLL_MS = 200;
const ISSUE_DELAY_MS = 100;

interface Running { sim: { close(): Promise<void> }; tokenCalls(): number; baseUrl: string; config: Record<string, unknown>; env: Record<string, string> }

async function simFor(name: Platform, secrets: Record<string, string>): Promise<Running> {
  if (name === 'nuonuo') {
    const sim = await startNuonuoSim({ appKey: 'bench-nn', appSecret: secrets.app!, issueDelayMs: ISSUE_DELAY_MS, tokenQuota: 5 });
    return { sim, tokenCalls: () => sim.tokenCalls(), baseUrl: `${sim.url}/open/v1/services`, config: { app_key: 'bench-nn' },
      env: { ERP_CLOUD_SECRET_NUONUO_APP_SECRET: secrets.app! } };
  }
  const sim = await startBaiwangSim({ appKey: 'bench-bw', appSecret: secrets.app!, username: 'bench', password: secrets.password!, salt: secrets.salt!, issueDelayMs: ISSUE_DELAY_MS });
  return { sim, tokenCalls: () => sim.tokenCalls() + sim.refreshCalls(), baseUrl: `${sim.url}/router/rest`, config: { app_key: 'bench-bw', username: 'bench', tax_no: '339902999999789113' },
    env: { ERP_CLOUD_SECRET_BAIWANG_APP_SECRET: secrets.app!, ERP_CLOUD_SECRET_BAIWANG_PASSWORD: secrets.password!, ERP_CLOUD_SECRET_BAIWANG_SALT: secrets.salt! } };
}

async function attached(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: number }>(`select count(*)::int n from tax.attachment`);
  return rows[0]!.n;
}

async function runPlatform(ctx: BenchContext, name: Platform, n: number): Promise<Record<string, unknown>> {
  const db = await ctx.dbs.createMigrated(`platform_${name}`, ['reference-erp']);
  const pool = benchPool(db.url, `platform_${name}`, 5);
  const secrets = { app: randomBytes(16).toString('hex'), password: randomBytes(8).toString('hex'), salt: randomBytes(4).toString('hex') };
  const p = await simFor(name, secrets);
  let listener: ReturnType<typeof spawnListener> | null = null;
  try {
    await pool.query(`select cloud.put_endpoint($1, $2, $1, 'invoice_request', p_timeout_ms => 5000, p_config => $3)`, [name, p.baseUrl, JSON.stringify(p.config)]);
    await pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [name]);
    await pool.query(`select tax.put_config(p_endpoint => $1, p_seller_tax_id => '339902999999789113', p_seller_name => '基准销方', p_clerk => '张三',
                        p_first_poll_ms => $2, p_poll_cap_ms => 2000)`, [name, FIRST_POLL_MS]);
    await pool.query(`insert into erp.customer (name, tax_id) values ('客户 1', '91330106MA2AYNWD8M')`);
    await pool.query(`insert into erp.settlement (settlement_no, customer_id) select 'B-' || g, (select min(id) from erp.customer) from generate_series(1, $1::int) g`, [n]);
    await pool.query(`insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, quantity, unit_price, amount, tax_rate)
                      select s.id, l.n, l.item, l.code, 2, l.price, 2 * l.price, l.rate from erp.settlement s
                       cross join (values (1, '伺服电机', '1090613010000000000', 4520.00, 0.13), (2, '安装服务', '3040201030000000000', 530.00, 0.06),
                                          (3, '运输服务', '3010102020100000000', 109.00, 0.09)) l(n, item, code, price, rate)`);
    let next = 1;
    await Promise.all(Array.from({ length: 4 }, async () => {
      for (let i = next++; i <= n; i = next++) await pool.query(`update erp.settlement set status = 'approved' where settlement_no = $1`, [`B-${i}`]);
    }));
    const t0 = performance.now();
    listener = spawnListener(db.url, `bench-${name}`, p.env);
    await waitFor(async () => (await attached(pool)) >= n, { timeoutMs: 600_000, intervalMs: 100, what: `${n} PDFs attached through ${name}` });
    const drainS = (performance.now() - t0) / 1000;
    await waitListenerIdle(pool, listener);
    const failed = await pool.query<{ n: number }>(`select count(*)::int n from tax.invoice where invoice_status <> 'issued'`);
    const steps = await pool.query<{ operation: string; n: number }>(`select operation, count(*)::int n from cloud.log group by 1 order by 1`);
    return {
      invoices_per_s: round(n / drainS, 1),
      invoices: n,
      not_issued: failed.rows[0]!.n,
      drain_s: round(drainS, 2),
      token_calls: p.tokenCalls(),
      attempts_by_operation: Object.fromEntries(steps.rows.map((r) => [r.operation, r.n])),
      config: { first_poll_ms: FIRST_POLL_MS, sim_issue_delay_ms: ISSUE_DELAY_MS, lines_per_invoice: 3, listeners: 1 },
    };
  } finally {
    if (listener) await stopListener(listener);
    await p.sim.close();
    await pool.end();
  }
}

export async function platformsFigure(ctx: BenchContext): Promise<PlatformsResult> {
  const n = ctx.quick ? 40 : 500;
  progress(`figure platforms: ${n} e-invoices through the nuonuo and the baiwang simulator, side by side`);
  // both at once, each with its own database, simulator and listener: the same conditions for both (the
  // drains wait on the simulators' issue delay and first poll, not on the CPU), in the time of one
  phase('both platforms');
  const settled = await Promise.allSettled((['nuonuo', 'baiwang'] as const).map((name) => runPlatform(ctx, name, n)));
  const failed = settled.find((x): x is PromiseRejectedResult => x.status === 'rejected');
  if (failed) throw failed.reason;
  const [nuonuo, baiwang] = settled.map((x) => (x as PromiseFulfilledResult<Record<string, unknown>>).value) as [Record<string, unknown>, Record<string, unknown>];
  return { platforms: { nuonuo, baiwang } };
}
