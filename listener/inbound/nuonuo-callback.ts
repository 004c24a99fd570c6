/**
 * The Nuonuo callback receiver: POST /callbacks/nuonuo, form-encoded
 * (operater, orderno, content = a JSON string). Nuonuo does not sign callbacks,
 * so a callback is only a hint: it makes the invoice's pending result query
 * due now (tax.ingest_invoice_callback; for operater=redConfirmCallback the red
 * invoice's pending form query, tax.ingest_red_confirm_callback), and the query's answer is what the
 * ERP books. Accepted only from ERP_CLOUD_NUONUO_CALLBACK_CIDRS (comma list of
 * ranges; empty = nobody, fail closed), checked before the body is read (403), and
 * only as application/x-www-form-urlencoded in UTF-8 (anything else, JSON included: 415
 * with Accept-Post, unread, nothing moved up).
 */
import type { IncomingMessage } from 'node:http';
import { sourceAllowed } from './admission.js';
import { registerInboundRoute, type InboundDeps } from './inbound-server.js';

const NAME = 'tax.nuonuo_callback';

const REPLY_OK = JSON.stringify({ status: '0000', message: '同步成功' });

/** The form's billId in a redConfirmCallback content (its field list is not documented: billId, or the c_-prefixed spelling). */
function billIdOf(content: Record<string, unknown>): string {
  for (const k of ['billId', 'c_billId', 'billid']) {
    const v = content[k];
    if (typeof v === 'string' && v !== '') return v;
  }
  return '';
}

/** Runs before the body is read: only ERP_CLOUD_NUONUO_CALLBACK_CIDRS gets in. */
function admit(req: IncomingMessage, deps: InboundDeps): boolean {
  const allowCidrs = (deps.env.ERP_CLOUD_NUONUO_CALLBACK_CIDRS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  if (sourceAllowed(req.socket.remoteAddress, { name: NAME, allowCidrs })) return true;
  deps.log.warn({ receiver: NAME, remote: req.socket.remoteAddress, path: req.url }, 'inbound request refused: source address not allowed');
  return false;
}

registerInboundRoute({
  name: NAME,
  method: 'POST',
  path: '/callbacks/nuonuo',
  accepts: ['application/x-www-form-urlencoded'],
  maxBytes: 64 * 1024,
  admit,
  async handle(_req, res, body, deps) {
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
      const { rows } = await deps.pool.query<{ done: string }>('select tax.ingest_invoice_callback($1, $2::jsonb) as done', [orderNo, JSON.stringify(content)]);
      deps.log.info({ receiver: NAME, orderNo, outcome: rows[0]?.done }, 'invoice callback: result query moved up');
    } else if (operater === 'redConfirmCallback' && (billIdOf(content) || orderNo)) {
      // the red-confirmation form changed (buyer confirmed, bureau issued, voided): also only a hint
      const billId = billIdOf(content) || orderNo;
      const { rows } = await deps.pool.query<{ done: string }>('select tax.ingest_red_confirm_callback($1, $2::jsonb) as done', [billId, JSON.stringify(content)]);
      deps.log.info({ receiver: NAME, billId, outcome: rows[0]?.done }, 'red-confirmation callback: form query moved up');
    } else {
      deps.log.info({ receiver: NAME, operater }, 'callback ignored (not an issue result)');
    }
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(REPLY_OK);
  },
});
