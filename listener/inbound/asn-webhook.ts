/**
 * The ASN webhook: the procurement cloud pushes a supplier's advance shipping
 * notice (发货单) here, and it goes into scm.ingest_asn (source push).
 *
 *   POST /scm/asn   body {eventId, eventType, asn: {...}}
 *   X-Scm-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">   (the shared secret)
 *   The event id is body.eventId only (inside the signature); the same event again changes nothing,
 *   the same event id with another ASN is a conflict (409, ES017).
 *
 * Refusals write nothing and each has its own status and log line:
 *   403 source address outside ERP_CLOUD_ASN_WEBHOOK_CIDRS (the 白名单; none configured = nobody), before the body is read
 *   415 + Accept-Post a Content-Type other than application/json (any case, parameters allowed), a charset other
 *       than UTF-8, or none: refused unread, before the signature is checked (the inbound server)
 *   413 body over ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES (default 256 KiB; the inbound server refuses it unread)
 *   409 the event id was already used for another ASN (ES017)
 *   503 + Retry-After the PO or ASN is locked for longer than ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS (default 2000)
 *   401 signature missing or wrong (bad_signature), or older than ERP_CLOUD_ASN_WEBHOOK_MAX_AGE_S (stale_timestamp, default 300)
 *   400 body not JSON or no asn object (malformed); 422 ASN fields unusable (ES004)
 *   503 the shared secret is not configured
 * Accepted, rejected (kept with its reason) and duplicate ASNs all answer 200 `success`, as YonBIP expects,
 * with the outcome in X-Scm-Asn-Status. The shared secret is the secret named by
 * ERP_CLOUD_ASN_WEBHOOK_SECRET_NAME (default scm.asn_webhook_secret: env ERP_CLOUD_SECRET_SCM_ASN_WEBHOOK_SECRET, else the vault).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { registerInboundRoute, type InboundDeps } from './inbound-server.js';
import { admitAsnSource, asnMaxAgeS, asnMaxBytes, ingestPushedAsn } from './asn-ingest.js';

export const ASN_WEBHOOK_PATH = '/scm/asn';
const NAME = 'scm.asn_webhook';

/** Checks `t=<s>,v1=<hex>` against the raw body; returns the signing time in seconds, or null when it does not verify. */
export function verifySignature(header: string | undefined, body: Buffer, secret: string): number | null {
  const m = /^t=(\d{1,12}),v1=([0-9a-f]{64})$/.exec((header ?? '').trim());
  if (!m) return null;
  const want = createHmac('sha256', secret).update(`${m[1]}.`).update(body).digest();
  const got = Buffer.from(m[2]!, 'hex');
  return got.length === want.length && timingSafeEqual(got, want) ? Number(m[1]) : null;
}

function answer(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': typeof body === 'string' ? 'text/plain; charset=utf-8' : 'application/json', ...headers }).end(text);
}

/** Runs before the body is read: only the configured source ranges get in. */
const admit = admitAsnSource(NAME);

async function handle(req: IncomingMessage, res: ServerResponse, body: Buffer, deps: InboundDeps): Promise<void> {
  if (!admit(req, deps)) return answer(res, 403, { error: 'source_not_allowed' });
  const remote = req.socket.remoteAddress;

  let secret: string;
  const secretName = deps.env.ERP_CLOUD_ASN_WEBHOOK_SECRET_NAME || 'scm.asn_webhook_secret';
  try {
    secret = await deps.secret(secretName);
  } catch (err) {
    deps.log.error({ receiver: NAME, secret: secretName, err: err instanceof Error ? err.message : String(err) }, 'ASN webhook refused: shared secret not configured');
    return answer(res, 503, { error: 'not_configured' });
  }
  const header = req.headers['x-scm-signature'];
  const signedAt = verifySignature(Array.isArray(header) ? header[0] : header, body, secret);
  if (signedAt === null) {
    deps.log.warn({ receiver: NAME, remote }, 'ASN webhook refused: bad signature');
    return answer(res, 401, { error: 'bad_signature' });
  }
  const maxAge = asnMaxAgeS(deps.env);
  const age = Math.floor(Date.now() / 1000) - signedAt;
  if (Math.abs(age) > maxAge) {
    deps.log.warn({ receiver: NAME, remote, age_s: age, max_age_s: maxAge }, 'ASN webhook refused: stale timestamp (replay?)');
    return answer(res, 401, { error: 'stale_timestamp' });
  }

  let parsed: Record<string, unknown>;
  try {
    parsed = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
  } catch {
    deps.log.warn({ receiver: NAME, remote, bytes: body.length }, 'ASN webhook refused: malformed body (not JSON)');
    return answer(res, 400, { error: 'malformed', detail: 'body is not JSON' });
  }
  const asn = parsed && typeof parsed === 'object' ? parsed.asn : undefined;
  if (!asn || typeof asn !== 'object' || Array.isArray(asn)) {
    deps.log.warn({ receiver: NAME, remote }, 'ASN webhook refused: malformed body (no asn object)');
    return answer(res, 400, { error: 'malformed', detail: 'body needs an asn object' });
  }
  // only the signed body names the event: a header could be changed in transit without breaking the signature
  const eventId = typeof parsed.eventId === 'string' && parsed.eventId !== '' ? parsed.eventId : null;

  const outcome = await ingestPushedAsn(deps.pool, deps.env, asn, eventId); // other errors: the inbound server answers 500, the cloud retries
  switch (outcome.kind) {
    case 'ingested':
      deps.log.info({ receiver: NAME, event_id: eventId, asn_id: outcome.asnId, status: outcome.status, reject_code: outcome.rejectCode }, 'ASN received');
      return answer(res, 200, 'success', { 'x-scm-asn-status': outcome.status });
    case 'malformed_asn':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, reason: outcome.message, detail: outcome.field }, 'ASN webhook refused: malformed ASN');
      return answer(res, 422, { error: 'malformed_asn', code: outcome.code, detail: outcome.message, field: outcome.field });
    case 'event_conflict':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, reason: outcome.message }, 'ASN webhook refused: event id already used for another ASN');
      return answer(res, 409, { error: 'event_conflict', code: outcome.code, detail: outcome.message });
    case 'locked':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, lock_timeout_ms: outcome.lockTimeoutMs }, 'ASN webhook deferred: purchase order locked');
      return answer(res, 503, { error: 'busy' }, { 'retry-after': '5' });
  }
}

registerInboundRoute({
  name: NAME,
  method: 'POST',
  path: ASN_WEBHOOK_PATH,
  accepts: ['application/json'],
  maxBytes: asnMaxBytes,
  admit,
  handle,
});
