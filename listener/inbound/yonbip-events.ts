/**
 * YonBIP's own event push (cloud-protocols.md §4.5): the real platform posts an
 * EncryptionHolder, not our signed format (asn-webhook.ts). ASN events go into
 * the same scm.ingest_asn (source push). An event that arrived intact but
 * cannot be ingested — a type not configured as an ASN event (ES018), or an ASN
 * whose fields are unusable (ES004) — is kept in scm.asn_quarantine and answered
 * `success`: retrying cannot fix it, and nothing is lost. CHECK_URL (the
 * platform's test of the address) is answered `success` and kept nowhere.
 *
 *   POST /scm/yonbip/events   body {signature | msgSignature, timestamp, nonce, encrypt}
 *   signature  = hex SHA1 (or SHA-256, ERP_CLOUD_YONBIP_EVENTS_SIGNATURE) of the sorted
 *                [appSecret, timestamp, nonce, encrypt] joined (listener/yonbip-crypto.ts)
 *   encrypt    = AES-256-CBC of 16 random bytes ‖ length ‖ message ‖ appKey, key from the appSecret
 *   message    = {eventId, type | eventType, content: ASN object or JSON string (发货单保存's data, or {data})}
 *
 * Checks, in order; each refusal has its own status and log line and writes nothing:
 *   403 source outside ERP_CLOUD_ASN_WEBHOOK_CIDRS (none configured = nobody), before the body is read
 *   413 body over ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES (default 256 KiB)
 *   503 appKey or appSecret not configured, or an unknown signature setting
 *   400 the body is no EncryptionHolder (not JSON, a field missing)
 *   401 bad_signature; stale_timestamp (timestamp in ms or s, further than ERP_CLOUD_ASN_WEBHOOK_MAX_AGE_S
 *       from now, either way); bad_padding (the ciphertext does not open); wrong_app_key (encrypted for another app)
 *   400 the decrypted message is not JSON or has no eventId
 *   409 the eventId was used for another ASN (ES017)
 *   503 + Retry-After the PO or ASN is locked longer than ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS
 * Accepted, rejected (kept with its reason), duplicate and quarantined ASNs answer 200 `success`
 * (X-Scm-Asn-Status says which); the eventId is the dedupe key (cloud_event_id), so the cloud's retries change nothing.
 *
 * Settings: ERP_CLOUD_YONBIP_EVENTS_APP_KEY_NAME (default yonbip.app_key: env ERP_CLOUD_SECRET_YONBIP_APP_KEY,
 * else the vault) and ERP_CLOUD_YONBIP_EVENTS_APP_SECRET_NAME (default yonbip.app_secret, the secret the
 * YonBIP adapter's app_secret_secret usually names); ERP_CLOUD_YONBIP_EVENTS_SIGNATURE sha1 (default) | sha256;
 * ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES, comma-separated event types that carry an ASN (default scm.asn.created).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { registerInboundRoute, type InboundDeps } from '../inbound-server.js';
import { decryptEvent, deriveAesKey, eventSignature, signatureMatches, YonbipCryptoError, type SignatureAlgorithm } from '../yonbip-crypto.js';
import { admitAsnSource, asnMaxAgeS, asnMaxBytes, ingestPushedAsn } from './asn-ingest.js';

export const YONBIP_EVENTS_PATH = '/scm/yonbip/events';
const NAME = 'scm.yonbip_events';

function answer(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': typeof body === 'string' ? 'text/plain; charset=utf-8' : 'application/json', ...headers }).end(text);
}

const admit = admitAsnSource(NAME);

/** Event types that only test the address: answered, kept nowhere. */
const HANDSHAKE_TYPES = new Set(['CHECK_URL']);

/** Keeps an intact event that cannot be ingested, so the cloud can stop retrying without the event being lost. */
async function quarantine(deps: InboundDeps, event: Record<string, unknown>, eventId: string, sqlstate: 'ES004' | 'ES018', reason: string): Promise<void> {
  await deps.pool.query('select scm.quarantine_pushed_event($1, $2, $3, $4)', [event, eventId, sqlstate, reason]);
}

/** A holder field as text: strings as they are, integers written out (the signature covers the text). */
function field(v: unknown): string | null {
  if (typeof v === 'string' && v !== '') return v;
  if (typeof v === 'number' && Number.isSafeInteger(v)) return String(v);
  return null;
}

/** The event types that carry an ASN. */
function asnTypes(env: NodeJS.ProcessEnv): Set<string> {
  return new Set((env.ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES || 'scm.asn.created').split(',').map((s) => s.trim()).filter(Boolean));
}

/** The ASN document in an event's content: an object or a JSON string, either 发货单保存's data itself or {data: …}. */
function asnFromContent(content: unknown): Record<string, unknown> | null {
  let c = content;
  if (typeof c === 'string') {
    try {
      c = JSON.parse(c) as unknown;
    } catch {
      return null;
    }
  }
  if (!c || typeof c !== 'object' || Array.isArray(c)) return null;
  const o = c as Record<string, unknown>;
  if (o.details === undefined && o.data && typeof o.data === 'object' && !Array.isArray(o.data)) return o.data as Record<string, unknown>;
  return o;
}

async function handle(req: IncomingMessage, res: ServerResponse, body: Buffer, deps: InboundDeps): Promise<void> {
  if (!admit(req, deps)) return answer(res, 403, { error: 'source_not_allowed' });
  const remote = req.socket.remoteAddress;

  const keyName = deps.env.ERP_CLOUD_YONBIP_EVENTS_APP_KEY_NAME || 'yonbip.app_key';
  const secretName = deps.env.ERP_CLOUD_YONBIP_EVENTS_APP_SECRET_NAME || 'yonbip.app_secret';
  const algorithm = (deps.env.ERP_CLOUD_YONBIP_EVENTS_SIGNATURE || 'sha1') as SignatureAlgorithm;
  let appKey: string;
  let appSecret: string;
  let aesKey: Buffer;
  try {
    if (algorithm !== 'sha1' && algorithm !== 'sha256') throw new Error(`ERP_CLOUD_YONBIP_EVENTS_SIGNATURE is ${String(algorithm)}, not sha1 or sha256`);
    appKey = await deps.secret(keyName);
    appSecret = await deps.secret(secretName);
    aesKey = deriveAesKey(appSecret);
  } catch (err) {
    deps.log.error({ receiver: NAME, app_key_secret: keyName, app_secret_secret: secretName, err: err instanceof Error ? err.message : String(err) },
      'YonBIP event refused: app key or secret not configured');
    return answer(res, 503, { error: 'not_configured' }, { 'retry-after': '60' });
  }

  let holder: Record<string, unknown>;
  try {
    holder = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
    if (!holder || typeof holder !== 'object' || Array.isArray(holder)) throw new Error('not an object');
  } catch {
    deps.log.warn({ receiver: NAME, remote, bytes: body.length }, 'YonBIP event refused: malformed holder (not a JSON object)');
    return answer(res, 400, { error: 'malformed', detail: 'body is not a JSON object' });
  }
  const signature = field(holder.signature) ?? field(holder.msgSignature);
  const timestamp = field(holder.timestamp);
  const nonce = field(holder.nonce);
  const encrypt = field(holder.encrypt);
  if (!signature || !timestamp || !nonce || !encrypt) {
    deps.log.warn({ receiver: NAME, remote }, 'YonBIP event refused: malformed holder (signature, timestamp, nonce and encrypt are required)');
    return answer(res, 400, { error: 'malformed', detail: 'an EncryptionHolder needs signature (or msgSignature), timestamp, nonce and encrypt' });
  }

  if (!signatureMatches(signature, eventSignature(appSecret, timestamp, nonce, encrypt, algorithm))) {
    deps.log.warn({ receiver: NAME, remote, algorithm }, 'YonBIP event refused: bad signature');
    return answer(res, 401, { error: 'bad_signature' });
  }
  const maxAge = asnMaxAgeS(deps.env);
  const n = /^\d{1,16}$/.test(timestamp) ? Number(timestamp) : NaN;
  const signedAtS = n >= 1e12 ? Math.floor(n / 1000) : n; // milliseconds (13 digits) or seconds
  const age = Math.floor(Date.now() / 1000) - signedAtS;
  if (!Number.isFinite(age) || Math.abs(age) > maxAge) {
    deps.log.warn({ receiver: NAME, remote, timestamp, age_s: Number.isFinite(age) ? age : null, max_age_s: maxAge }, 'YonBIP event refused: stale timestamp (replay?)');
    return answer(res, 401, { error: 'stale_timestamp' });
  }

  let message: string;
  try {
    message = decryptEvent(encrypt, aesKey, appKey);
  } catch (err) {
    if (!(err instanceof YonbipCryptoError)) throw err;
    if (err.reason === 'wrong_app_key') {
      deps.log.warn({ receiver: NAME, remote }, 'YonBIP event refused: encrypted for another app (wrong appKey)');
      return answer(res, 401, { error: 'wrong_app_key' });
    }
    deps.log.warn({ receiver: NAME, remote, reason: err.reason, detail: err.message }, 'YonBIP event refused: ciphertext does not decrypt (bad padding)');
    return answer(res, 401, { error: 'bad_padding', detail: err.reason });
  }

  let event: Record<string, unknown>;
  try {
    event = JSON.parse(message) as Record<string, unknown>;
    if (!event || typeof event !== 'object' || Array.isArray(event)) throw new Error('not an object');
  } catch {
    deps.log.warn({ receiver: NAME, remote, bytes: message.length }, 'YonBIP event refused: malformed message (not a JSON object)');
    return answer(res, 400, { error: 'malformed', detail: 'the decrypted message is not a JSON object' });
  }
  const eventId = field(event.eventId);
  if (!eventId) {
    deps.log.warn({ receiver: NAME, remote }, 'YonBIP event refused: malformed message (no eventId)');
    return answer(res, 400, { error: 'malformed', detail: 'the event has no eventId' });
  }
  const type = field(event.type) ?? field(event.eventType) ?? '';
  if (HANDSHAKE_TYPES.has(type)) {
    deps.log.info({ receiver: NAME, event_id: eventId, event_type: type }, 'YonBIP address check answered');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'handshake' });
  }
  if (!asnTypes(deps.env).has(type)) {
    await quarantine(deps, event, eventId, 'ES018', `event type ${JSON.stringify(type)} is not configured as an ASN event (ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES)`);
    deps.log.warn({ receiver: NAME, event_id: eventId, event_type: type }, 'YonBIP event quarantined: not an ASN event type (ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES)');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'quarantined' });
  }
  const asn = asnFromContent(event.content);
  if (!asn) {
    await quarantine(deps, event, eventId, 'ES004', 'the ASN event has no content: the ASN as an object or a JSON string');
    deps.log.warn({ receiver: NAME, remote, event_id: eventId, event_type: type }, 'YonBIP event quarantined: no ASN content');
    return answer(res, 200, 'success', { 'x-scm-asn-status': 'quarantined' });
  }

  const outcome = await ingestPushedAsn(deps.pool, deps.env, asn, eventId); // other errors: the inbound server answers 500, the cloud retries
  switch (outcome.kind) {
    case 'ingested':
      deps.log.info({ receiver: NAME, event_id: eventId, event_type: type, asn_id: outcome.asnId, status: outcome.status, reject_code: outcome.rejectCode }, 'ASN received');
      return answer(res, 200, 'success', { 'x-scm-asn-status': outcome.status });
    case 'malformed_asn':
      await quarantine(deps, event, eventId, 'ES004', `${outcome.message}${outcome.field ? ` (${outcome.field})` : ''}`);
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, reason: outcome.message, detail: outcome.field }, 'YonBIP event quarantined: malformed ASN');
      return answer(res, 200, 'success', { 'x-scm-asn-status': 'quarantined' });
    case 'event_conflict':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, reason: outcome.message }, 'YonBIP event refused: event id already used for another ASN');
      return answer(res, 409, { error: 'event_conflict', code: outcome.code, detail: outcome.message });
    case 'locked':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, lock_timeout_ms: outcome.lockTimeoutMs }, 'YonBIP event deferred: purchase order locked');
      return answer(res, 503, { error: 'busy' }, { 'retry-after': '5' });
  }
}

registerInboundRoute({
  name: NAME,
  method: 'POST',
  path: YONBIP_EVENTS_PATH,
  maxBytes: asnMaxBytes,
  admit,
  handle,
});
