/**
 * YonBIP's own event push (cloud-protocols.md §4.5): the real platform posts an
 * EncryptionHolder, not our signed format (asn-webhook.ts). ASN events go into
 * the same scm.ingest_asn (source push). Once an event is authentic (signature,
 * timestamp, decryption, our appKey) it is never refused: what cannot be ingested —
 * a message that is not JSON or has no eventId, a type not configured as an ASN
 * event (ES018), an ASN whose fields are unusable (ES004), an eventId already used
 * for another ASN (ES017), a data error — is kept in scm.asn_quarantine (once per
 * eventId) and answered `success`, since retrying cannot fix it. CHECK_URL (the
 * platform testing the address) is answered `success` and kept nowhere.
 *
 *   POST /scm/yonbip/events   body {signature | msgSignature, timestamp, nonce, encrypt}
 *   signature  = hex SHA1 (or SHA-256, ERP_CLOUD_YONBIP_EVENTS_SIGNATURE) of the sorted
 *                [appSecret, timestamp, nonce, encrypt] joined (listener/yonbip-crypto.ts)
 *   encrypt    = AES-256-CBC of 16 random bytes ‖ length ‖ message ‖ appKey, key from the appSecret
 *   message    = {eventId, type | eventType, content: ASN object or JSON string (发货单保存's data, or {data})}
 *
 * Checks, in order; each refusal has its own status and log line and writes nothing:
 *   403 source outside ERP_CLOUD_ASN_WEBHOOK_CIDRS (none configured = nobody), before the body is read
 *   415 + Accept-Post a Content-Type other than application/json (any case, parameters allowed), a charset other
 *       than UTF-8, or none: refused unread, before the signature is checked or anything is quarantined
 *   413 body over ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES (default 256 KiB)
 *   503 appKey or appSecret not configured, or an unknown signature setting
 *   400 the body is no EncryptionHolder (not JSON, a field missing)
 *   401 bad_signature; stale_timestamp (timestamp in ms or s, older than ERP_CLOUD_YONBIP_EVENTS_MAX_AGE_S,
 *       default 25 h so that the cloud's retries of a body signed once still pass, or over 5 min ahead);
 *       bad_padding (the ciphertext does not open); wrong_app_key (encrypted for another app)
 *   503 + Retry-After the PO or ASN is locked longer than ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS
 * Accepted, rejected (kept with its reason), duplicate and quarantined events answer 200 `success`
 * (X-Scm-Asn-Status or X-Yonbip-Event says which); the eventId is the dedupe key (cloud_event_id).
 *
 * Settings: ERP_CLOUD_YONBIP_EVENTS_APP_KEY_NAME (default yonbip.app_key: env ERP_CLOUD_SECRET_YONBIP_APP_KEY,
 * else the vault) and ERP_CLOUD_YONBIP_EVENTS_APP_SECRET_NAME (default yonbip.app_secret, the secret the
 * YonBIP adapter's app_secret_secret usually names); ERP_CLOUD_YONBIP_EVENTS_SIGNATURE sha1 (default) | sha256;
 * ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES, comma-separated event types that carry an ASN (default scm.asn.created).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { SqlState } from '../kernel/errors.js';
import { registerInboundRoute, type InboundDeps } from './inbound-server.js';
import { decryptEvent, deriveAesKey, eventSignature, signatureMatches, YonbipCryptoError, type SignatureAlgorithm } from '../providers/yonbip-crypto.js';
import { admitAsnSource, asnMaxBytes, envInt, ingestPushedEvent } from './asn-ingest.js';

export const YONBIP_EVENTS_PATH = '/scm/yonbip/events';
const NAME = 'scm.yonbip_events';

function answer(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': typeof body === 'string' ? 'text/plain; charset=utf-8' : 'application/json', ...headers }).end(text);
}

const admit = admitAsnSource(NAME);

/** How far ahead of our clock a timestamp may be (clock skew). */
const FUTURE_SKEW_S = 300;

/** Event types that only test the address: answered, kept nowhere. */
const HANDSHAKE_TYPES = new Set(['CHECK_URL']);

/** Keeps an intact event that cannot be ingested, so the cloud can stop retrying without the event being lost. */
async function quarantine(deps: InboundDeps, event: Record<string, unknown> | string, eventId: string | null, sqlstate: typeof SqlState.asnMalformed | typeof SqlState.eventTypeNotAsn, reason: string): Promise<void> {
  await deps.pool.query('select scm.quarantine_pushed_event($1::jsonb, $2, $3, $4)', [JSON.stringify(event), eventId, sqlstate, reason]);
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
  // the signature proves the event is the cloud's and the eventId makes a replay change nothing, so the window
  // only has to refuse events from nowhere near now; it must outlast the cloud's retries (hourly, for 24 h),
  // in case a retry resends the body as first signed
  const maxAge = envInt(deps.env, 'ERP_CLOUD_YONBIP_EVENTS_MAX_AGE_S', 25 * 3600);
  const n = /^\d{1,16}$/.test(timestamp) ? Number(timestamp) : NaN;
  const signedAtS = n >= 1e12 ? Math.floor(n / 1000) : n; // milliseconds (13 digits) or seconds
  const age = Math.floor(Date.now() / 1000) - signedAtS;
  if (!Number.isFinite(age) || age > maxAge || age < -FUTURE_SKEW_S) {
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

  // from here on the event is authentic: whatever cannot be ingested is kept, never refused
  try {
    await answerAuthentic(res, message, deps, remote);
  } catch (err) {
    // text PostgreSQL's jsonb cannot hold (\u0000, a lone surrogate): keep the message as bytes
    const code = (err as { code?: string }).code;
    if (code !== '22P05' && code !== '22P02') throw err;
    const eventId = /"eventId"\s*:\s*"([^"\\]{1,200})"/.exec(message)?.[1] ?? null;
    await quarantine(deps, { eventId, message_base64: Buffer.from(message, 'utf8').toString('base64') }, eventId, SqlState.asnMalformed,
      `the event holds text the database cannot store as JSON (${code}); the message is kept as base64`);
    deps.log.warn({ receiver: NAME, remote, event_id: eventId, sqlstate: code }, 'YonBIP event quarantined: message not storable as JSON');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'quarantined' });
  }
}

/** An authentic, decrypted event: ingested, or kept in scm.asn_quarantine; answered success either way (or 503 when locked). */
async function answerAuthentic(res: ServerResponse, message: string, deps: InboundDeps, remote: string | undefined): Promise<void> {
  let event: Record<string, unknown>;
  try {
    event = JSON.parse(message) as Record<string, unknown>;
    if (!event || typeof event !== 'object' || Array.isArray(event)) throw new Error('not an object');
  } catch {
    await quarantine(deps, message, null, SqlState.asnMalformed, 'the decrypted message is not a JSON object');
    deps.log.warn({ receiver: NAME, remote, bytes: message.length }, 'YonBIP event quarantined: message not a JSON object');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'quarantined' });
  }
  const type = field(event.type) ?? field(event.eventType) ?? '';
  if (HANDSHAKE_TYPES.has(type)) {
    deps.log.info({ receiver: NAME, event_id: field(event.eventId), event_type: type }, 'YonBIP address check answered');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'handshake' });
  }
  const eventId = field(event.eventId);
  if (!eventId) {
    await quarantine(deps, event, null, SqlState.asnMalformed, 'the event has no eventId');
    deps.log.warn({ receiver: NAME, remote, event_type: type }, 'YonBIP event quarantined: no eventId');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'quarantined' });
  }
  if (!asnTypes(deps.env).has(type)) {
    await quarantine(deps, event, eventId, SqlState.eventTypeNotAsn, `event type ${JSON.stringify(type)} is not configured as an ASN event (ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES)`);
    deps.log.warn({ receiver: NAME, event_id: eventId, event_type: type }, 'YonBIP event quarantined: not an ASN event type (ERP_CLOUD_YONBIP_EVENTS_ASN_TYPES)');
    return answer(res, 200, 'success', { 'x-yonbip-event': 'quarantined' });
  }
  const asn = asnFromContent(event.content);
  if (!asn) {
    await quarantine(deps, event, eventId, SqlState.asnMalformed, 'the ASN event has no content: the ASN as an object or a JSON string');
    deps.log.warn({ receiver: NAME, remote, event_id: eventId, event_type: type }, 'YonBIP event quarantined: no ASN content');
    return answer(res, 200, 'success', { 'x-scm-asn-status': 'quarantined' });
  }

  // ES004 / ES017 / data errors are kept with the event by scm.ingest_pushed_event (status quarantined)
  const outcome = await ingestPushedEvent(deps.pool, deps.env, event, asn, eventId); // other errors: the inbound server answers 500, the cloud retries
  switch (outcome.kind) {
    case 'ingested':
      if (outcome.status === 'quarantined') {
        deps.log.warn({ receiver: NAME, remote, event_id: eventId, event_type: type, sqlstate: outcome.rejectCode }, 'YonBIP event quarantined: ASN not ingestible');
      } else {
        deps.log.info({ receiver: NAME, event_id: eventId, event_type: type, asn_id: outcome.asnId, status: outcome.status, reject_code: outcome.rejectCode }, 'ASN received');
      }
      return answer(res, 200, 'success', { 'x-scm-asn-status': outcome.status });
    case 'locked':
      deps.log.warn({ receiver: NAME, remote, event_id: eventId, lock_timeout_ms: outcome.lockTimeoutMs }, 'YonBIP event deferred: purchase order locked');
      return answer(res, 503, { error: 'busy' }, { 'retry-after': '5' });
    default: // not raised by scm.ingest_pushed_event (it keeps them); answered as the webhook would, should that change
      deps.log.error({ receiver: NAME, remote, event_id: eventId, outcome }, 'YonBIP event: unexpected ingest outcome');
      return answer(res, 500, { error: 'internal' });
  }
}

registerInboundRoute({
  name: NAME,
  method: 'POST',
  path: YONBIP_EVENTS_PATH,
  accepts: ['application/json'],
  maxBytes: asnMaxBytes,
  admit,
  handle,
});
