/**
 * The OpenID Provider process (erp-cloud sso serve): records its issuer,
 * makes the first signing key and the cookie keys on first start, serves
 * oidc-provider plus the jump and interaction pages on one HTTP server, and
 * refuses framing of every answer, and follows the key schedule: when a scheduled key starts signing or an old one
 * retires (or another instance / the CLI rotated), it builds a new Provider
 * with the new JWKS and swaps it in. A Provider holds no state of its own
 * (storage is PostgreSQL), so the swap loses nothing.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type Provider from 'oidc-provider';
import type pg from 'pg';
import type { Logger } from 'pino';
import type { SsoConfig } from './config.js';
import { handleInteractionRoute } from './interactions.js';
import { ensureSigningKey, loadCookieKeys, loadSigningKeys, type SigningKeys } from './keys.js';
import { buildProvider, createAudit, FRAME_DENY_HEADERS } from './provider.js';

export const serverSql = {
  putIssuer: 'select sso.put_issuer($1)',
  putIdTokenTtl: 'select sso.put_id_token_ttl($1)',
  purge: `select sso.purge_expired(make_interval(days => $1)) as purged`,
} as const;

export interface SsoServerOptions {
  config: SsoConfig;
  pool: pg.Pool;
  log: Logger;
  masterKey: string;
  env?: NodeJS.ProcessEnv;
  /** The clock the key schedule is read with (tests move it forward). */
  keyClock?: () => Date;
}

export interface SsoServer {
  /** Where the server listens (the issuer is what browsers use). */
  url: string;
  issuer: string;
  provider(): Provider;
  keys(): SigningKeys;
  /** Re-reads the key schedule now; true when the provider was rebuilt. */
  refreshKeys(): Promise<boolean>;
  close(): Promise<void>;
}

const PURGE_EVERY_MS = 10 * 60_000;

export async function startSsoServer(opts: SsoServerOptions): Promise<SsoServer> {
  const { config, pool, log, masterKey } = opts;
  const clock = opts.keyClock ?? (() => new Date());
  const audit = createAudit(pool, log, { failures: config.ERP_CLOUD_SSO_THROTTLE_FAILURES, windowS: config.ERP_CLOUD_SSO_THROTTLE_WINDOW_S });

  await pool.query(serverSql.putIssuer, [config.ERP_CLOUD_SSO_ISSUER]);
  // a key rotation (from any process) keeps the old key at least this long
  await pool.query(serverSql.putIdTokenTtl, [config.ERP_CLOUD_SSO_ID_TOKEN_TTL_S]);
  if (await ensureSigningKey(pool, masterKey, clock())) log.info('SSO: generated the first signing key (kept encrypted in the vault)');
  const cookieKeys = await loadCookieKeys(pool, masterKey, opts.env ?? process.env);

  let keys = await loadSigningKeys(pool, masterKey, clock());
  let provider = buildProvider({ config, pool, log, audit, jwks: keys.jwks, cookieKeys });
  let callback = provider.callback();
  const ctx = { config, pool, log, audit, provider: () => provider };

  const server = http.createServer((req, res) => {
    // no answer of ours may be framed; oidc-provider's answers get them again
    // from its middleware (Koa drops preset headers on an uncaught error)
    for (const [name, value] of Object.entries(FRAME_DENY_HEADERS)) res.setHeader(name, value);
    if (req.method === 'GET' && req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      return;
    }
    handleInteractionRoute(ctx, req, res)
      .then((handled) => {
        if (!handled) callback(req, res);
      })
      .catch((err) => {
        log.error({ err }, 'SSO request failed');
        if (!res.headersSent) res.writeHead(500).end();
      });
  });

  async function refreshKeys(): Promise<boolean> {
    const next = await loadSigningKeys(pool, masterKey, clock());
    const changed = next.fingerprint !== keys.fingerprint;
    keys = next;
    if (changed) {
      provider = buildProvider({ config, pool, log, audit, jwks: keys.jwks, cookieKeys });
      callback = provider.callback();
      log.info({ keys: keys.states.map((s) => ({ kid: s.kid, state: s.state })) }, 'SSO: signing keys changed');
    }
    return changed;
  }

  let timer: NodeJS.Timeout | null = null;
  let lastPurge = 0;
  let stopped = false;
  const schedule = () => {
    if (stopped) return;
    const untilChange = keys.nextChange ? keys.nextChange.getTime() - clock().getTime() + 50 : Infinity;
    const delay = Math.max(50, Math.min(config.ERP_CLOUD_SSO_KEY_CHECK_MS, untilChange));
    timer = setTimeout(async () => {
      try {
        await refreshKeys();
      } catch (err) {
        log.error({ err }, 'SSO: key refresh failed (the current keys stay in use)');
      }
      if (Date.now() - lastPurge > PURGE_EVERY_MS) {
        lastPurge = Date.now();
        try {
          const { rows } = await pool.query(serverSql.purge, [config.ERP_CLOUD_SSO_AUDIT_RETENTION_DAYS]);
          if (rows[0].purged) log.debug({ purged: rows[0].purged }, 'SSO: expired storage removed');
        } catch (err) {
          log.error({ err }, 'SSO: purging expired sessions, codes and tickets failed (sso.purge_expired)');
        }
      }
      schedule();
    }, delay);
    timer.unref();
  };
  schedule();

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.ERP_CLOUD_SSO_PORT, config.ERP_CLOUD_SSO_HOST, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;

  return {
    url: `http://${host}:${addr.port}`,
    issuer: config.ERP_CLOUD_SSO_ISSUER,
    provider: () => provider,
    keys: () => keys,
    refreshKeys,
    async close() {
      stopped = true;
      if (timer) clearTimeout(timer);
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}
