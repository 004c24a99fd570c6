/** The OpenID Provider for tests: its own database, a running provider, a relying party (openid-client), users. */
import { createPublicKey, randomBytes, verify } from 'node:crypto';
import net from 'node:net';
import type { Logger } from 'pino';
import { createLogger } from '../../listener/kernel/logger.js';
import { loadSsoConfig } from '../../listener/sso/config.js';
import { discoverProvider, startDemoRp, type DemoRp } from '../../listener/sim/demo-rp.js';
import { startSsoServer, type SsoServer } from '../../listener/sso/sso-server.js';
import { createTestDb, type TestDb } from './db.js';

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export interface SsoWorld {
  db: TestDb;
  masterKey: string;
  issuer: string;
  port: number;
  op: SsoServer;
  rp: DemoRp;
  rpSecret: string;
  /** the key schedule's clock runs this many ms ahead of the wall clock */
  clock: { offsetMs: number };
  log: Logger;
  startOp(): Promise<SsoServer>;
  registerClient(id: string, opts?: { loginUri?: boolean }): Promise<{ secret: string; port: number; redirectUri: string }>;
  userId(login: string): Promise<string>;
  issue(login: string, clientId: string, opts?: { ttl?: string }): Promise<string>;
  /** Moves a ticket's issue and expiry back in time (as the superuser: the ERP cannot choose the clock). */
  ageTicket(jumpUrl: string, seconds: number): Promise<void>;
  audit(sinceId: number): Promise<Array<{ id: number; event: string; user_id: string | null; client_id: string | null; source_addr: string | null; code: string | null; detail: string | null; occurrences: number }>>;
  lastAuditId(): Promise<number>;
  close(): Promise<void>;
}

/** The world's users, as the ERP puts them (sso.put_user). */
export const WORLD_USERS_SQL = `select sso.put_user('zhang.wei', '张伟', 'zhang.wei@example.com', true, 'C001', '华东机电有限公司', 'buyer'),
                                      sso.put_user('li.na', '李娜', 'li.na@example.com', true, 'C001', '华东机电有限公司', 'viewer')`;

/**
 * `env`: further SSO settings for this world (e.g. small throttle values). `opts.db`: a database of
 * the caller's (e.g. migrated to an earlier file; the world drops it on close); `opts.usersSql`: how
 * the users get there (WORLD_USERS_SQL unless given).
 */
export async function startSsoWorld(label: string, env: Record<string, string> = {}, opts: { db?: TestDb; usersSql?: string } = {}): Promise<SsoWorld> {
  const db = opts.db ?? (await createTestDb(label));
  const masterKey = `test-vault-key-${randomBytes(8).toString('hex')}`;
  const port = await freePort();
  const issuer = `http://127.0.0.1:${port}`;
  const clock = { offsetMs: 0 };
  const log = createLogger('silent');
  const config = loadSsoConfig({
    DATABASE_URL: db.url, ERP_CLOUD_SSO_ISSUER: issuer, ERP_CLOUD_SSO_PORT: String(port), ERP_CLOUD_LOG_LEVEL: 'silent',
    ERP_CLOUD_VAULT_KEY: masterKey, ERP_CLOUD_SSO_KEY_CHECK_MS: '3600000', ERP_CLOUD_SSO_ERP_URL: 'https://erp.example.com/', ...env,
  });
  const startOp = () => startSsoServer({ config, pool: db.pool, log, masterKey, env: {}, keyClock: () => new Date(Date.now() + clock.offsetMs) });
  const op = await startOp();

  await db.pool.query(opts.usersSql ?? WORLD_USERS_SQL);

  async function registerClient(id: string, opts: { loginUri?: boolean } = {}) {
    const rpPort = await freePort();
    const base = `http://127.0.0.1:${rpPort}`;
    const { rows } = await db.pool.query('select * from sso.register_client($1, $2, $3, $4, $5)', [
      id, `${id} platform`, [`${base}/callback`], [`${base}/logged-out`], opts.loginUri === false ? null : `${base}/login`]);
    return { secret: rows[0].client_secret as string, port: rpPort, redirectUri: `${base}/callback` };
  }

  const procurement = await registerClient('procurement');
  const rp = await startDemoRp({ issuer, clientId: 'procurement', clientSecret: procurement.secret, port: procurement.port });

  const world: SsoWorld = {
    db, masterKey, issuer, port, op, rp, rpSecret: procurement.secret, clock, log, startOp, registerClient,
    async userId(login) {
      return String((await db.pool.query('select id from sso.app_user where login = $1', [login])).rows[0].id);
    },
    async issue(login, clientId, opts = {}) {
      const { rows } = await db.pool.query(`select sso.issue_jump_ticket($1, $2, '203.0.113.7', coalesce($3::interval, '60 seconds')) as url`,
        [login, clientId, opts.ttl ?? null]);
      return rows[0].url as string;
    },
    async ageTicket(jumpUrl, seconds) {
      const ticket = new URL(jumpUrl).searchParams.get('ticket')!;
      const { rowCount } = await db.pool.query(`update sso.jump_ticket set issued_at = issued_at - make_interval(secs => $2), expires_at = expires_at - make_interval(secs => $2)
                                                 where ticket_sha256 = sha256(convert_to($1, 'UTF8'))`, [ticket, seconds]);
      if (rowCount !== 1) throw new Error('no such ticket');
    },
    async audit(sinceId) {
      const { rows } = await db.pool.query('select id, event, user_id::text, client_id, host(source_addr) as source_addr, code, detail, occurrences from sso.audit where id > $1 order by id', [sinceId]);
      return rows;
    },
    async lastAuditId() {
      return Number((await db.pool.query('select coalesce(max(id), 0) as id from sso.audit')).rows[0].id);
    },
    async close() {
      await world.rp.close();
      await world.op.close();
      await db.drop();
    },
  };
  return world;
}

export { discoverProvider };

/** Checks an ID token's RS256 signature against the provider's JWKS as published now. */
export async function verifiesAgainstJwks(idToken: string, issuer: string): Promise<boolean> {
  const [h, p, s] = idToken.split('.') as [string, string, string];
  const header = JSON.parse(Buffer.from(h, 'base64url').toString()) as { kid: string; alg: string };
  const jwks = (await (await fetch(`${issuer}/jwks`)).json()) as { keys: Array<{ kid: string }> };
  const jwk = jwks.keys.find((k) => k.kid === header.kid);
  if (!jwk || header.alg !== 'RS256') return false;
  return verify('sha256', Buffer.from(`${h}.${p}`), createPublicKey({ key: jwk as never, format: 'jwk' }), Buffer.from(s, 'base64url'));
}

export function kidOf(idToken: string): string {
  return (JSON.parse(Buffer.from(idToken.split('.')[0]!, 'base64url').toString()) as { kid: string }).kid;
}
