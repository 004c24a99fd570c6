/** Shared set-up for the supplier-collaboration tests: the YonBIP endpoint, suppliers, purchase orders. */
import type pg from 'pg';
import type { YonbipSim } from '../../listener/sim/yonbip.js';
import { inTransaction } from './db.js';

export const APP_KEY = 'erp-test-app';
export const APP_SECRET_NAME = 'yonbip.app_secret';
export const APP_SECRET_VALUE = 'sim-app-secret-for-tests'; // secret-scan: allow (a test fixture)

/** The yonbip endpoint on the simulator (127.0.0.1, so private addresses are allowed) with the app registered. */
export async function setupYonbip(pool: pg.Pool, sim: YonbipSim, opts: { maxAttempts?: number; tokenTtlS?: number } = {}): Promise<void> {
  process.env.ERP_CLOUD_SECRET_YONBIP_APP_SECRET = APP_SECRET_VALUE;
  sim.addApp(APP_KEY, APP_SECRET_VALUE, opts.tokenTtlS);
  await pool.query(`select cloud.put_endpoint('yonbip', $1, 'yonbip', p_timeout_ms => 2000, p_max_attempts => $2,
                      p_backoff_base_ms => 100, p_backoff_cap_ms => 400, p_config => $3)`,
  [sim.url, opts.maxAttempts ?? 10, JSON.stringify({ tenant_id: 'tenant-1', app_key: APP_KEY, app_secret_secret: APP_SECRET_NAME })]);
  await pool.query(`select cloud.put_endpoint_allowlist('yonbip', '{}', '{}', true)`);
}

/** Suppliers S001 and S002; returns their ids. */
export async function addSuppliers(pool: pg.Pool): Promise<{ s1: number; s2: number }> {
  const { rows } = await pool.query<{ id: string; code: string }>(
    `insert into erp.supplier (code, name, tax_id) values ('S001', '苏州精密制造', '91320500MA1W0000X1'), ('S002', '宁波港务物流', '91330200MA2H0000Y2')
     on conflict (code) do update set name = excluded.name returning id, code`);
  const by = Object.fromEntries(rows.map((r) => [r.code, Number(r.id)]));
  return { s1: by.S001!, s2: by.S002! };
}

/** A PO with two lines (M-100 × 100, M-200 × 50) in the given status; returns its id. */
export async function addPo(pool: pg.Pool, poNo: string, supplierId: number, status: 'draft' | 'approved' = 'approved'): Promise<number> {
  return inTransaction(pool, async (c) => {
    const { rows } = await c.query<{ id: string }>(`insert into erp.purchase_order (po_no, supplier_id, order_date) values ($1, $2, '2026-11-24') returning id`, [poNo, supplierId]);
    const id = Number(rows[0]!.id);
    await c.query(`insert into erp.purchase_order_line (po_id, line_no, material_code, material_name, quantity, unit, price, tax_rate, delivery_date)
                   values ($1, 1, 'M-100', '六角螺栓 M8', 100, 'PCS', 1.5, 0.13, '2026-12-01'), ($1, 2, 'M-200', '垫圈 8mm', 50, 'PCS', 0.2, 0.13, '2026-12-01')`, [id]);
    if (status === 'approved') await c.query(`update erp.purchase_order set status = 'approved' where id = $1`, [id]);
    return id;
  });
}

/** An ASN document as the cloud sends it. */
export function asnDoc(code: string, poNo: string, lines: Array<{ line: number; material?: string; qty: number; batch?: string }>, supplierCode = 'S001'): Record<string, unknown> {
  return {
    code,
    supplier: supplierCode,
    deliveryDate: '2026-11-25',
    planArrivalDate: '2026-11-27',
    logisticalComp: '顺丰速运',
    logisticalCode: `SF${code.replace(/\D/g, '')}`,
    details: lines.map((l, i) => ({
      lineno: i + 1,
      orderCode: poNo,
      orderDetailId: l.line,
      material: l.material ?? (l.line === 1 ? 'M-100' : 'M-200'),
      purchaseNum: l.qty,
      batchNo: l.batch ?? `B-${code}-${i + 1}`,
      productionDate: '2026-11-20',
    })),
  };
}
