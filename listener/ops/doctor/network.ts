/**
 * Doctor, 5. endpoints, from the network's point of view: DNS, the egress
 * allowlist (白名单), TCP, TLS and the certificate, and the circuit. It judges
 * the network the way the listener does: the same allowlist code
 * (delivery/egress.ts) and Node's default trust store (plus
 * NODE_EXTRA_CA_CERTS, which the listener honours too). It opens a TCP
 * connection and, for https, completes a TLS handshake, then hangs up.
 */
import dns from 'node:dns';
import net from 'node:net';
import tls from 'node:tls';
import type pg from 'pg';
import { assertAddressAllowed, assertUrlAllowed, policyOf } from '../../delivery/egress.js';
import { errText, iso, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

/** A certificate that expires sooner than this is a warning. */
const CERT_WARN_DAYS = 14;

interface EndpointRow {
  name: string;
  base_url: string;
  enabled: boolean;
  allow_hosts: string[];
  allow_cidrs: string[];
  allow_private: boolean;
  circuit_state: string | null;
  circuit_opened_at: Date | null;
  circuit_reason: string | null;
  paused_until: Date | null;
  pause_reason: string | null;
}

export async function checkEndpoints(c: pg.Client, timeoutMs: number): Promise<CheckLine[]> {
  let rows: EndpointRow[];
  try {
    rows = (await c.query<EndpointRow>(q.endpoints)).rows;
  } catch (err) {
    return [line('endpoints', 'cloud.endpoint', 'fail', errText(err))];
  }
  if (!rows.length) return [line('endpoints', 'cloud.endpoint', 'warn', 'no endpoint configured (cloud.put_endpoint)')];
  // endpoints are independent: probe them at once, print them in name order
  const perEndpoint = await Promise.all(rows.map((e) => (e.enabled ? checkEndpoint(e, timeoutMs) : Promise.resolve([
    line('endpoint', e.name, 'warn', `disabled: not checked (${shownUrl(e.base_url)})`),
  ]))));
  return perEndpoint.flat();
}

async function checkEndpoint(e: EndpointRow, timeoutMs: number): Promise<CheckLine[]> {
  const out: CheckLine[] = [];
  out.push(...(await probeEndpoint(e, timeoutMs)));
  out.push(circuitLine(e));
  return out;
}

async function probeEndpoint(e: EndpointRow, timeoutMs: number): Promise<CheckLine[]> {
  const out: CheckLine[] = [];
  let u: URL;
  let policy: ReturnType<typeof policyOf>;
  try {
    u = new URL(e.base_url);
    policy = policyOf(e);
    // the URL itself: scheme, credentials in it. An IP literal's address is judged below, with the resolved ones.
    assertUrlAllowed(e.base_url, { ...policy, allowPrivate: true, allowCidrs: [] });
  } catch (err) {
    out.push(line('allowlist', e.name, 'fail', `${shownUrl(e.base_url)}: ${(err as Error).message}`));
    return out;
  }
  const host = u.hostname.replace(/^\[|\]$/g, '');
  const https = u.protocol === 'https:';
  const port = Number(u.port || (https ? 443 : 80));

  // DNS, the way the listener's socket resolves (dns.lookup: getaddrinfo, /etc/hosts included)
  let addresses: string[];
  if (net.isIP(host)) {
    addresses = [host];
    out.push(line('dns', e.name, 'ok', `${host} is an IP address (no lookup)`));
  } else {
    try {
      const found = await withTimeout(dns.promises.lookup(host, { all: true }), timeoutMs, `no answer for ${host} within ${timeoutMs} ms`);
      addresses = [...new Set(found.map((a) => a.address))];
      out.push(line('dns', e.name, 'ok', `${host} → ${addresses.join(', ')}`));
    } catch (err) {
      const code = (err as { code?: string }).code;
      out.push(line('dns', e.name, 'fail', `${host}: ${code ? `${code} ` : ''}${code === 'ENOTFOUND' ? 'does not resolve' : (err as Error).message}`));
      return out;
    }
  }

  // the allowlist, address by address (the listener refuses the whole name if any one is refused)
  const allowed: string[] = [];
  for (const a of addresses) {
    try {
      assertAddressAllowed(a, policy);
      allowed.push(a);
      out.push(line('allowlist', e.name, 'ok', `${a} allowed${policy.allowCidrs.length ? ` (inside ${policy.allowCidrs.join(', ')})` : ''}`));
    } catch (err) {
      out.push(line('allowlist', e.name, 'fail', (err as Error).message));
    }
  }
  const first = allowed[0];
  if (first === undefined) return out;

  const hostPort = `${net.isIPv6(first) ? `[${first}]` : first}:${port}`;
  try {
    const ms = await tcpConnect(first, port, timeoutMs);
    out.push(line('tcp', e.name, 'ok', `connected to ${hostPort} in ${ms} ms`));
  } catch (err) {
    out.push(line('tcp', e.name, 'fail', `${hostPort}: ${(err as Error).message}`));
    return out;
  }
  if (https) out.push(...(await checkTls(e.name, host, first, port, timeoutMs)));
  return out;
}

/** A base URL as printed: no user, password or query string (they can carry credentials). */
function shownUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '(not a URL)';
  }
}

function circuitLine(e: EndpointRow): CheckLine {
  const notes: string[] = [];
  if (e.circuit_state && e.circuit_state !== 'closed') {
    notes.push(`circuit ${e.circuit_state} since ${iso(e.circuit_opened_at)}${e.circuit_reason ? `: ${e.circuit_reason}` : ''}`);
  }
  if (e.paused_until) notes.push(`paused until ${iso(e.paused_until)}${e.pause_reason ? `: ${e.pause_reason}` : ''}`);
  return notes.length ? line('circuit', e.name, 'warn', notes.join('; ')) : line('circuit', e.name, 'ok', 'closed, not paused');
}

function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error(message), { code: 'ETIMEDOUT' })), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** Connects and hangs up; resolves with the milliseconds it took. */
function tcpConnect(address: string, port: number, timeoutMs: number): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: address, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no connection within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(Math.round(performance.now() - t0));
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new Error(err.code === 'ECONNREFUSED' ? 'connection refused (ECONNREFUSED)' : `${err.code ?? ''} ${err.message}`.trim()));
    });
  });
}

interface Handshake {
  authorized: boolean;
  authorizationError: string | null;
  protocol: string | null;
  cert: tls.PeerCertificate;
}

function tlsHandshake(address: string, port: number, servername: string | undefined, timeoutMs: number): Promise<Handshake> {
  return new Promise((resolve, reject) => {
    // rejectUnauthorized off so an untrusted certificate can still be described; authorized says whether it is trusted
    const socket = tls.connect({ host: address, port, servername, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no TLS handshake within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const out: Handshake = {
        authorized: socket.authorized,
        authorizationError: socket.authorizationError ? String(socket.authorizationError) : null,
        protocol: socket.getProtocol(),
        cert: socket.getPeerCertificate(),
      };
      socket.destroy();
      resolve(out);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new Error(`${err.code ? `${err.code} ` : ''}${err.message}`));
    });
  });
}

const TRUST_ERRORS: Record<string, string> = {
  DEPTH_ZERO_SELF_SIGNED_CERT: 'self-signed certificate',
  SELF_SIGNED_CERT_IN_CHAIN: 'self-signed certificate in the chain',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'issuer not trusted (incomplete chain?)',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'issuer not trusted (unknown CA)',
  UNABLE_TO_GET_ISSUER_CERT: 'issuer not trusted (unknown CA)',
  CERT_HAS_EXPIRED: 'certificate expired',
  CERT_NOT_YET_VALID: 'certificate not yet valid',
  CERT_REVOKED: 'certificate revoked',
};

/**
 * TLS as the listener's https agent would see it (SNI = host, Node's trust
 * store). An untrusted certificate is a `fail`: the listener would refuse it,
 * and a real cloud endpoint must never present one.
 */
async function checkTls(endpoint: string, host: string, address: string, port: number, timeoutMs: number): Promise<CheckLine[]> {
  let h: Handshake;
  const servername = net.isIP(host) ? undefined : host; // SNI carries names only
  try {
    h = await tlsHandshake(address, port, servername, timeoutMs);
  } catch (err) {
    return [line('tls', endpoint, 'fail', `handshake with ${host}: ${(err as Error).message}`)];
  }
  const out: CheckLine[] = [];
  if (h.authorized) {
    out.push(line('tls', endpoint, 'ok', `${h.protocol ?? 'TLS'}, certificate trusted for ${host}`));
  } else {
    const code = h.authorizationError ?? 'unknown';
    const reason = code === 'ERR_TLS_CERT_ALTNAME_INVALID'
      ? tls.checkServerIdentity(host, h.cert)?.message ?? `not valid for ${host}`
      : TRUST_ERRORS[code] ? `${TRUST_ERRORS[code]} (${code})` : code;
    out.push(line('tls', endpoint, 'fail', `self-signed / untrusted: ${reason}`));
  }
  out.push(certificateLine(endpoint, h.cert));
  return out;
}

function certificateLine(endpoint: string, cert: tls.PeerCertificate, now = new Date()): CheckLine {
  if (!cert || !cert.valid_to) return line('certificate', endpoint, 'fail', 'the server presented no certificate');
  const issuerCn = firstOf(cert.issuer?.CN) ?? firstOf(cert.issuer?.O) ?? '?';
  const from = new Date(cert.valid_from);
  const to = new Date(cert.valid_to);
  const daysLeft = Math.floor((to.getTime() - now.getTime()) / 86_400_000);
  const dates = `valid ${from.toISOString().slice(0, 10)} to ${to.toISOString().slice(0, 10)}`;
  if (now < from) return line('certificate', endpoint, 'fail', `issuer CN=${issuerCn}; not valid before ${from.toISOString()}`);
  if (now > to) return line('certificate', endpoint, 'fail', `issuer CN=${issuerCn}; expired ${-daysLeft} day(s) ago (${dates})`);
  return line('certificate', endpoint, daysLeft < CERT_WARN_DAYS ? 'warn' : 'ok', `issuer CN=${issuerCn}; ${daysLeft} days left (${dates})`);
}

function firstOf(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}
