/**
 * What the ASN receivers share (asn-webhook.ts: our signed format; yonbip-events.ts:
 * YonBIP's EncryptionHolder): the source check before the body is read, the settings
 * read from the environment per request, and the one call into scm.ingest_asn (source push).
 */
import type { IncomingMessage } from 'node:http';
import type pg from 'pg';
import { SqlState } from '../kernel/errors.js';
import { sourceAllowed } from './admission.js';
import type { InboundDeps } from './inbound-server.js';

export function envInt(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
  const v = Number(env[name]);
  return Number.isInteger(v) && v > 0 ? v : fallback;
}

/** Body size cap of every ASN receiver: ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES (default 256 KiB). */
export function asnMaxBytes(env: NodeJS.ProcessEnv): number {
  return envInt(env, 'ERP_CLOUD_ASN_WEBHOOK_MAX_BYTES', 256 * 1024);
}

/** Replay window of the signed webhook in seconds: ERP_CLOUD_ASN_WEBHOOK_MAX_AGE_S (default 300). */
export function asnMaxAgeS(env: NodeJS.ProcessEnv): number {
  return envInt(env, 'ERP_CLOUD_ASN_WEBHOOK_MAX_AGE_S', 300);
}

/**
 * The `admit` hook of an ASN receiver: only ERP_CLOUD_ASN_WEBHOOK_CIDRS (the 白名单) gets in,
 * none configured = nobody. Runs before the body is read.
 */
export function admitAsnSource(name: string): (req: IncomingMessage, deps: InboundDeps) => boolean {
  return (req, deps) => {
    const cidrs = (deps.env.ERP_CLOUD_ASN_WEBHOOK_CIDRS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
    if (sourceAllowed(req.socket.remoteAddress, { name, allowCidrs: cidrs })) return true;
    deps.log.warn({ receiver: name, remote: req.socket.remoteAddress, path: req.url }, 'inbound request refused: source address not allowed');
    return false;
  };
}

export type AsnIngestOutcome =
  /** status accepted | rejected | duplicate | not_shipped, or quarantined (ingestPushedEvent; rejectCode is then the SQLSTATE) */
  | { kind: 'ingested'; asnId: string | null; status: string; rejectCode: string | null }
  /** ES004: the ASN's fields are unusable. */
  | { kind: 'malformed_asn'; code: string; message: string; field: string | undefined }
  /** ES017: the event id was already used for another ASN. */
  | { kind: 'event_conflict'; code: string; message: string }
  /** 55P03: the PO or ASN stayed locked longer than the lock timeout. */
  | { kind: 'locked'; lockTimeoutMs: number };

/**
 * scm.ingest_asn(asn, 'push', eventId) in its own transaction, waiting at most
 * ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS (default 2000) for locks. Other errors are thrown.
 */
export function ingestPushedAsn(pool: pg.Pool, env: NodeJS.ProcessEnv, asn: unknown, eventId: string | null): Promise<AsnIngestOutcome> {
  return ingestInTransaction(pool, env, 'select asn_id, status, reject_code from scm.ingest_asn($1::jsonb, $2, $3)', [JSON.stringify(asn), 'push', eventId]);
}

/**
 * scm.ingest_pushed_event(event, asn, eventId): the same ingest, but what it refuses for
 * good (ES004, ES017, a data error) is kept with the whole event in scm.asn_quarantine and
 * comes back as status `quarantined` instead of an error. Lock timeouts are still `locked`.
 */
export function ingestPushedEvent(pool: pg.Pool, env: NodeJS.ProcessEnv, event: unknown, asn: unknown, eventId: string): Promise<AsnIngestOutcome> {
  return ingestInTransaction(pool, env, 'select asn_id, status, reject_code from scm.ingest_pushed_event($1::jsonb, $2::jsonb, $3)',
    [JSON.stringify(event), JSON.stringify(asn), eventId]);
}

async function ingestInTransaction(pool: pg.Pool, env: NodeJS.ProcessEnv, statement: string, params: unknown[]): Promise<AsnIngestOutcome> {
  const lockTimeoutMs = envInt(env, 'ERP_CLOUD_ASN_WEBHOOK_LOCK_TIMEOUT_MS', 2000);
  const client = await pool.connect();
  try {
    await client.query('begin');
    await client.query(`select set_config('lock_timeout', $1, true)`, [`${lockTimeoutMs}ms`]);
    const { rows } = await client.query<{ asn_id: string | null; status: string; reject_code: string | null }>(statement, params);
    await client.query('commit');
    const r = rows[0]!;
    return { kind: 'ingested', asnId: r.asn_id, status: r.status, rejectCode: r.reject_code };
  } catch (err) {
    await client.query('rollback').catch(() => undefined);
    const e = err as { code?: string; message?: string; detail?: string };
    if (e.code === SqlState.asnMalformed) return { kind: 'malformed_asn', code: e.code, message: e.message ?? '', field: e.detail };
    if (e.code === SqlState.asnEventIdConflict) return { kind: 'event_conflict', code: e.code, message: e.message ?? '' };
    if (e.code === '55P03') return { kind: 'locked', lockTimeoutMs };
    throw err;
  } finally {
    client.release();
  }
}
