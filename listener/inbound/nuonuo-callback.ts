/**
 * The Nuonuo callback receiver: POST /callbacks/nuonuo, form-encoded
 * (operater, orderno, content = a JSON string). Nuonuo does not sign callbacks,
 * so a callback is only a hint: it makes the invoice's pending result query
 * due now (tax.accept_invoice_callback; for operater=redConfirmCallback the red
 * invoice's pending form query, tax.accept_red_confirm_callback), and the query's answer is what the
 * ERP books. Accepted only from ERP_CLOUD_NUONUO_CALLBACK_CIDRS (comma list of
 * ranges; empty = nobody, fail closed).
 */
import { admitSource } from '../inbound.js';
import { registerInboundRoute } from '../inbound-server.js';

const REPLY_OK = JSON.stringify({ status: '0000', message: '同步成功' });

/** The form's billId in a redConfirmCallback content (its field list is not documented: billId, or the c_-prefixed spelling). */
function billIdOf(content: Record<string, unknown>): string {
  for (const k of ['billId', 'c_billId', 'billid']) {
    const v = content[k];
    if (typeof v === 'string' && v !== '') return v;
  }
  return '';
}

registerInboundRoute({
  name: 'tax.nuonuo_callback',
  method: 'POST',
  path: '/callbacks/nuonuo',
  maxBytes: 64 * 1024,
  async handle(req, res, body, deps) {
    const allowCidrs = (deps.env.ERP_CLOUD_NUONUO_CALLBACK_CIDRS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
    if (!admitSource(req, res, { name: 'tax.nuonuo_callback', allowCidrs }, deps.log)) return;
    const form = new URLSearchParams(body.toString('utf8'));
    const operater = form.get('operater') ?? '';
    let content: Record<string, unknown> = {};
    try {
      const parsed: unknown = JSON.parse(form.get('content') ?? '{}');
      if (typeof parsed === 'object' && parsed !== null) content = parsed as Record<string, unknown>;
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ status: '9999', message: 'content is not JSON' }));
      return;
    }
    const orderNo = form.get('orderno') ?? String(content.c_orderno ?? '');
    if (operater === 'callback' && orderNo) {
      const { rows } = await deps.pool.query<{ done: string }>('select tax.accept_invoice_callback($1, $2::jsonb) as done', [orderNo, JSON.stringify(content)]);
      deps.log.info({ receiver: 'tax.nuonuo_callback', orderNo, outcome: rows[0]?.done }, 'invoice callback: result query moved up');
    } else if (operater === 'redConfirmCallback' && (billIdOf(content) || orderNo)) {
      // the red-confirmation form changed (buyer confirmed, bureau issued, voided): also only a hint
      const billId = billIdOf(content) || orderNo;
      const { rows } = await deps.pool.query<{ done: string }>('select tax.accept_red_confirm_callback($1, $2::jsonb) as done', [billId, JSON.stringify(content)]);
      deps.log.info({ receiver: 'tax.nuonuo_callback', billId, outcome: rows[0]?.done }, 'red-confirmation callback: form query moved up');
    } else {
      deps.log.info({ receiver: 'tax.nuonuo_callback', operater }, 'callback ignored (not an issue result)');
    }
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(REPLY_OK);
  },
});
