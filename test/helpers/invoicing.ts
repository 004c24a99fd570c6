/** ERP fixtures for the e-invoicing tests: customers, settlements, shipments, the tax endpoint. */
import type pg from 'pg';

export interface Line {
  item: string;
  code?: string;
  rate?: number | string;
  amount: number | string;
  qty?: number | string | null;
  price?: number | string | null;
  tax?: number | string | null;
  unit?: string | null;
  spec?: string | null;
}

export const OATS = '1010101070000000000';
export const SOFTWARE = '3040201030000000000';
/** Valid USCCs (reference §3.1). */
export const USCC_OK = ['91330106MA2AYNWD8M', '91350100M000100Y43', '91440101MA5APD8X8J', '91310230674560485R'];

/** GB 32100 character set (no I, O, S, V, Z) and the check character of the first 17 (reference §3.1). */
const USCC_CHARS = '0123456789ABCDEFGHJKLMNPQRTUWXY';
export function withUsccCheckDigit(first17: string): string {
  let sum = 0;
  let w = 1;
  for (let i = 0; i < 17; i++) {
    sum += USCC_CHARS.indexOf(first17[i]!) * w;
    w = (w * 3) % 31;
  }
  return first17 + USCC_CHARS[(31 - (sum % 31)) % 31];
}

export interface CustomerOptions {
  name?: string;
  taxId?: string | null;
  invoiceOn?: string;
  email?: string | null;
  override?: boolean;
  address?: string | null;
  phone?: string | null;
  bankName?: string | null;
  bankAccount?: string | null;
}

export async function customer(pool: pg.Pool, o: CustomerOptions = {}): Promise<number> {
  const { rows } = await pool.query(
    `insert into erp.customer (name, tax_id, invoice_on, email, tax_id_check_override, address, phone, bank_name, bank_account)
     values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning id`,
    [o.name ?? '华东机电有限公司', o.taxId === undefined ? USCC_OK[0] : o.taxId, o.invoiceOn ?? 'settlement', o.email ?? null, o.override ?? false,
      o.address === undefined ? '杭州市西湖区文三路 1 号' : o.address, o.phone === undefined ? '0571-88888888' : o.phone,
      o.bankName === undefined ? '工商银行杭州分行' : o.bankName, o.bankAccount === undefined ? '1202020209900000001' : o.bankAccount]);
  return Number(rows[0].id);
}

let docSeq = 0;

async function addLines(pool: pg.Pool, table: string, fk: string, id: number, lines: Line[]): Promise<void> {
  for (const [i, l] of lines.entries()) {
    await pool.query(
      `insert into erp.${table} (${fk}, line_no, item_name, tax_code, unit, quantity, unit_price, amount, tax_rate, tax_amount, spec)
       values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
      [id, i + 1, l.item, l.code ?? SOFTWARE, l.unit ?? null, l.qty ?? null, l.price ?? null, l.amount, l.rate ?? 0.06, l.tax ?? null, l.spec ?? null]);
  }
}

export async function settlement(pool: pg.Pool, customerId: number, lines: Line[], kind: 'normal' | 'special' = 'normal', o: { no?: string } = {}): Promise<{ id: number; no: string }> {
  const no = o.no ?? `JS-${process.pid}-${++docSeq}`;
  const { rows } = await pool.query(`insert into erp.settlement (settlement_no, customer_id, invoice_kind) values ($1, $2, $3) returning id`, [no, customerId, kind]);
  const id = Number(rows[0].id);
  await addLines(pool, 'settlement_line', 'settlement_id', id, lines);
  return { id, no };
}

export async function shipment(pool: pg.Pool, customerId: number, lines: Line[], settlementId: number | null = null): Promise<{ id: number; no: string }> {
  const no = `CK-${process.pid}-${++docSeq}`;
  const { rows } = await pool.query(`insert into erp.shipment (shipment_no, customer_id, settlement_id) values ($1, $2, $3) returning id`, [no, customerId, settlementId]);
  const id = Number(rows[0].id);
  await addLines(pool, 'shipment_line', 'shipment_id', id, lines);
  return { id, no };
}

export const approve = (pool: pg.Pool, id: number) => pool.query(`update erp.settlement set status = 'approved' where id = $1`, [id]);
export const post = (pool: pg.Pool, id: number) => pool.query(`update erp.shipment set status = 'posted' where id = $1`, [id]);

/** The tax endpoint on the simulator, and the seller's settings. */
export async function configureTax(pool: pg.Pool, baseUrl: string, appKey: string, o: { timeoutMs?: number; firstPollMs?: number; callbackUrl?: string | null; maxAmount?: number | null; maxLines?: number; maxPolls?: number; pollCapMs?: number; backoffBaseMs?: number } = {}): Promise<void> {
  await pool.query(`select cloud.put_endpoint('nuonuo', $1, 'nuonuo', 'invoice_request', p_timeout_ms => $2, p_max_attempts => 8,
                      p_backoff_base_ms => $4, p_backoff_cap_ms => greatest($4, 500), p_config => $3)`,
  [`${baseUrl}/open/v1/services`, o.timeoutMs ?? 2000, JSON.stringify({ app_key: appKey, app_secret_name: 'nuonuo.app_secret' }), o.backoffBaseMs ?? 100]);
  await pool.query(`select cloud.put_endpoint_allowlist('nuonuo', '{}', '{}', true)`);
  // put_config keeps what it is not given: the optional settings a test leaves out are cleared by name
  const unset = [...(o.maxAmount == null ? ['max_invoice_amount'] : []), ...(o.callbackUrl == null ? ['callback_url'] : [])];
  await pool.query(`select tax.put_config(p_seller_tax_id => '339902999999789113', p_seller_name => '浙江诺诺网络科技', p_clerk => '张三',
                      p_max_invoice_amount => $1, p_max_invoice_lines => $2, p_first_poll_ms => $3, p_poll_cap_ms => $6, p_max_polls => $4,
                      p_callback_url => $5, p_max_pdf_bytes => 5242880, p_unset => $7)`,
  [o.maxAmount ?? null, o.maxLines ?? 200, o.firstPollMs ?? 200, o.maxPolls ?? 30, o.callbackUrl ?? null, o.pollCapMs ?? Math.max(1000, o.firstPollMs ?? 200), unset]);
}

export interface InvoiceRow {
  id: string;
  invoice_no: string | null;
  invoice_status: string;
  amount_excl_tax: string;
  tax_amount: string;
  amount_incl_tax: string;
  error_code: string | null;
  error_message: string | null;
  tax_cloud_response: Record<string, unknown>;
  order_no: string;
  part_no: number;
  invoice_date: Date | null;
}

/** The SQL of the tax.document id of the reference ERP's settlement (or shipment) $1. */
export const documentOf = (source: 'settlement' | 'shipment' = 'settlement', param = '$1') =>
  `(select d.id from tax.document d join erp.${source} e on d.reference = '${source}/' || e.${source}_no where d.source = 'reference-erp' and e.id = ${param})`;

export async function invoicesOf(pool: pg.Pool, settlementId: number, source: 'settlement' | 'shipment' = 'settlement'): Promise<InvoiceRow[]> {
  const { rows } = await pool.query(`select * from tax.invoice where document_id = ${documentOf(source)} and invoice_type = 'blue' order by part_no`, [settlementId]);
  return rows;
}

/**
 * The reference ERP asks for a 红冲 of blue invoice `invoiceId` (an insert into its own erp.invoice_reversal, reason
 * 1–4, optionally by line): the rows are erp-cloud's reversal it made (tax.reversal: id, bill_id), as a query answers.
 */
export async function requestReversal(pool: pg.Pool, invoiceId: string | number, reason: string, lineNos: number[] | null = null):
  Promise<{ rows: Array<{ id: string; bill_id: string | null }> }> {
  const { rows } = await pool.query(`insert into erp.invoice_reversal (invoice_id, reason, line_nos) values ($1, $2, $3) returning red_invoice_id`,
    [invoiceId, reason, lineNos]);
  return pool.query(`select id, bill_id from tax.reversal where red_invoice_id = $1`, [rows[0].red_invoice_id]);
}
