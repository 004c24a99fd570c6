/**
 * `erp-cloud doctor`: is this installation able to deliver? One line per
 * check (ok / warn / fail), in the order a DBA would look: the database and
 * its migrations, who runs maintenance (pg_cron or the listener), roles and
 * grants, the vault key, then every enabled endpoint from the network's point
 * of view — DNS, the egress allowlist (白名单), TCP, TLS and the certificate —
 * and its circuit.
 *
 * Read-only: the doctor changes nothing in the database and sends no request
 * to a cloud (it opens a TCP connection and, for https, completes a TLS
 * handshake, then hangs up). It judges the network the way the listener does:
 * the same allowlist code (egress.ts) and Node's default trust store (plus
 * NODE_EXTRA_CA_CERTS, which the listener honours too).
 */
import { createHash } from 'node:crypto';
import dns from 'node:dns';
import net from 'node:net';
import tls from 'node:tls';
import pg from 'pg';
import { migrationsDir } from '../kernel/db.js';
import { assertAddressAllowed, assertUrlAllowed, policyOf } from '../delivery/egress.js';
import { describePgError } from '../kernel/errors.js';
import { findLegacyHistory, loadMigrationFiles } from '../kernel/migrations.js';
import { doctorSql as q } from '../delivery/queries.js';
import { loadVaultKey } from '../kernel/vault.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckLine {
  check: string;
  target: string;
  status: CheckStatus;
  detail: string;
}

export interface DoctorOptions {
  /** Where ERP_CLOUD_VAULT_KEY / ERP_CLOUD_VAULT_KEY_FILE come from (process.env). */
  env?: NodeJS.ProcessEnv;
  /** Limit for each DNS lookup, TCP connect and TLS handshake. */
  networkTimeoutMs?: number;
}

/** A certificate that expires sooner than this is a warning. */
const CERT_WARN_DAYS = 14;
const MIN_SERVER_VERSION = 150000;
const ROLES = ['erp_cloud_app', 'erp_cloud_listener', 'erp_cloud_operator'] as const;
const ENQUEUE = 'cloud.enqueue_message(text,text,jsonb,text,text,text,uuid,timestamptz)';
const CLAIM = 'cloud.claim_messages(text,integer,text[],interval,timestamptz)';
const RECORD = 'cloud.record_attempts(text,jsonb,timestamptz)';

const line = (check: string, target: string, status: CheckStatus, detail: string): CheckLine => ({ check, target, status, detail });
const errText = (err: unknown) => describePgError(err);

/** host:port/database of a connection URL, without user or password. */
function databaseTarget(url: string): string {
  try {
    const u = new URL(url);
    return `${u.hostname || 'local socket'}:${u.port || '5432'}${u.pathname}`;
  } catch {
    return 'database';
  }
}

/** Runs every check and returns the lines; never throws (a check that cannot run is a `fail` line). */
export async function runDoctor(url: string, opts: DoctorOptions = {}): Promise<CheckLine[]> {
  const lines: CheckLine[] = [];
  const client = new pg.Client({
    connectionString: url,
    application_name: 'erp-cloud doctor',
    connectionTimeoutMillis: 5000,
    statement_timeout: 10_000,
  });
  client.on('error', () => undefined); // a dropped connection fails the next query instead of crashing
  try {
    await client.connect();
  } catch (err) {
    lines.push(line('database connection', databaseTarget(url), 'fail', errText(err)));
    return lines;
  }
  try {
    lines.push(...(await checkDatabase(client, databaseTarget(url))));
    lines.push(...(await checkMaintenance(client)));
    lines.push(...(await checkRolesAndGrants(client)));
    lines.push(await checkVaultKey(client, opts.env ?? process.env));
    lines.push(...(await checkEndpoints(client, opts.networkTimeoutMs ?? 3000)));
    lines.push(...(await checkSso(client, opts.env ?? process.env)));
  } finally {
    await client.end().catch(() => undefined);
  }
  return lines;
}

// ─── 1. the database ─────────────────────────────────────────────────────────

async function checkDatabase(c: pg.Client, target: string): Promise<CheckLine[]> {
  let s: { num: number; version: string; database: string; role: string };
  try {
    s = (await c.query(q.server)).rows[0];
  } catch (err) {
    return [line('database connection', target, 'fail', errText(err))];
  }
  const out = [
    line('database connection', target, 'ok', `connected to ${s.database} as ${s.role}`),
    line('server version', s.database, s.num >= MIN_SERVER_VERSION ? 'ok' : 'fail',
      s.num >= MIN_SERVER_VERSION ? `PostgreSQL ${s.version}` : `PostgreSQL ${s.version}: erp-cloud needs 15 or newer`),
  ];
  out.push(await checkMigrations(c, s.database));
  return out;
}

async function checkMigrations(c: pg.Client, database: string): Promise<CheckLine> {
  const name = 'migrations current';
  try {
    const files = loadMigrationFiles(migrationsDir);
    const latest = files.at(-1)?.name;
    // postgres-migrations' history (releases up to 0017), recognised only when its rows are our files
    const legacy = await findLegacyHistory(c, files);
    if (!(await c.query(q.migrationsTable)).rows[0].present) {
      if (legacy) {
        return line(name, database, 'warn',
          `installed by an earlier release (history in ${legacy.table}, postgres-migrations): run erp-cloud migrate (it copies that history into erp_cloud.migration and applies what is missing)`);
      }
      return line(name, database, 'fail', `no migration history (erp_cloud.migration): run erp-cloud migrate (${files.length} migration(s) to apply)`);
    }
    const rows = (await c.query<{ id: number; name: string; sha256: string }>(q.migrationRows)).rows;
    const applied = new Map(rows.map((r) => [r.id, r]));
    const known = new Set(files.map((f) => f.id));
    const missing = files.filter((f) => !applied.has(f.id)).map((f) => f.name);
    const extra = rows.filter((r) => !known.has(r.id)).map((r) => r.name);
    const edited = files.filter((f) => applied.has(f.id) && (applied.get(f.id)!.sha256 !== f.sha256 || applied.get(f.id)!.name !== f.name)).map((f) => f.name);
    if (missing.length) return line(name, database, 'fail', `not applied: ${missing.join(', ')} (run erp-cloud migrate)`);
    const notes = [
      extra.length && `applied but not in ${migrationsDir}: ${extra.join(', ')} (a newer release migrated this database?)`,
      edited.length && `changed since applied: ${edited.join(', ')} (erp-cloud migrate will refuse; a landed file is never edited, a fix is a new file)`,
    ].filter(Boolean);
    if (notes.length) return line(name, database, 'warn', notes.join('; '));
    const obsolete = legacy
      ? `; ${legacy.table} (postgres-migrations' history, copied into erp_cloud.migration) is obsolete and can be dropped once no release older than this one will migrate this database`
      : '';
    return line(name, database, 'ok', `${files.length} migration(s), all applied (latest ${latest})${obsolete}`);
  } catch (err) {
    return line(name, database, 'fail', describePgError(err));
  }
}

// ─── 2. who runs maintenance ─────────────────────────────────────────────────

async function checkMaintenance(c: pg.Client): Promise<CheckLine[]> {
  let scheduled: boolean;
  try {
    scheduled = (await c.query(q.cronScheduled)).rows[0].scheduled;
  } catch (err) {
    return [line('pg_cron', 'cloud.cron_jobs_scheduled()', 'fail', errText(err))];
  }
  const listeners = await checkListeners(c, scheduled);
  if (!scheduled) {
    return [line('pg_cron', 'maintenance', 'warn', "pg_cron absent here: the listener's fallback timer runs maintenance"), ...listeners];
  }
  return [...(await checkCronJobs(c)), ...listeners];
}

interface ListenerRow { worker_id: string; host: string | null; pid: number | null; endpoints: string[] | null; age_s: number; live: boolean }

/**
 * The listeners as cloud.listener has them, with or without pg_cron: who is
 * live (a heartbeat within the last minute), who has gone silent (paused or
 * frozen: the reaper forgets it after 2 minutes, and it registers again when it
 * resumes), and endpoints with pending messages that no live listener serves.
 * Without pg_cron a live listener is also what runs maintenance.
 */
async function checkListeners(c: pg.Client, cron: boolean): Promise<CheckLine[]> {
  const name = 'listener heartbeat';
  try {
    const rows = (await c.query<ListenerRow>(q.listeners)).rows;
    const live = rows.filter((r) => r.live);
    const silent = rows.filter((r) => !r.live);
    const out: CheckLine[] = [];
    if (live.length === 0) {
      const last = rows.length ? `; last heartbeat ${Math.min(...rows.map((r) => r.age_s))} s ago` : '';
      out.push(line(name, 'cloud.listener', 'warn', cron
        ? `no listener running${last}: messages wait in the outbox until one starts (pg_cron runs maintenance)`
        : `no listener running${last}: nothing delivers and nothing runs maintenance (no pg_cron, no live listener)`));
    } else {
      const who = live.map((r) => `${r.worker_id}${r.host ? ` on ${r.host}` : ''}${r.pid ? ` pid ${r.pid}` : ''}`).join(', ');
      out.push(line(name, 'cloud.listener', 'ok',
        `${live.length} listener(s) live (${who}), last heartbeat ${Math.min(...live.map((r) => r.age_s))} s ago${cron ? '' : '; they run maintenance'}`));
    }
    for (const r of silent) {
      out.push(line('listener silent', r.worker_id, 'warn',
        `no heartbeat for ${r.age_s} s: paused, frozen or gone? The reaper forgets it after 120 s; it registers again if it resumes`));
    }
    if (live.length > 0) {
      for (const e of (await c.query<{ name: string; pending: number }>(q.unservedEndpoints)).rows) {
        out.push(line('listener coverage', e.name, 'warn', `${e.pending} pending message(s) and no live listener serves this endpoint (ERP_CLOUD_ENDPOINTS)`));
      }
    }
    return out;
  } catch (err) {
    return [line(name, 'cloud.listener', 'fail', errText(err))];
  }
}

async function checkCronJobs(c: pg.Client): Promise<CheckLine[]> {
  try {
    const jobs = (await c.query(q.cronJobs)).rows as Array<{
      jobname: string; schedule: string; active: boolean; last_status: string | null; last_message: string | null;
      last_at: Date | null; last_success_at: Date | null; recent_success: boolean;
    }>;
    return jobs.map((j) => {
      const target = j.jobname;
      if (!j.active) return line('pg_cron job', target, 'fail', `inactive (cron.job.active = false): maintenance "${j.jobname}" does not run`);
      if (j.last_status === 'failed') return line('pg_cron job', target, 'fail', `last run failed at ${iso(j.last_at)}: ${j.last_message ?? '(no message)'}`);
      if (!j.last_status) return line('pg_cron job', target, 'warn', `no run recorded yet (schedule ${j.schedule}; is cron.log_run on?)`);
      if (j.schedule.trim() === '* * * * *' && !j.recent_success) {
        return line('pg_cron job', target, 'fail', j.last_success_at
          ? `runs every minute but last succeeded at ${iso(j.last_success_at)} (last run ${j.last_status})`
          : `runs every minute but has not succeeded yet (last run ${j.last_status})`);
      }
      return line('pg_cron job', target, 'ok', `${j.schedule}: last run ${j.last_status} at ${iso(j.last_at)}`);
    });
  } catch (err) {
    return [line('pg_cron job', 'cron.job', 'fail', errText(err))];
  }
}

// ─── SSO (schema sso, erp-cloud sso serve) ───────────────────────────────────

/** A signing key older than this gets a warning: rotate it (erp-cloud sso rotate-keys). */
const SIGNING_KEY_WARN_DAYS = 365;

interface SsoClientRow { client_id: string; enabled: boolean; redirect_uris: number; initiate_login_uri: string | null }
interface SsoKeyRow { kid: string; state: string; public_jwk: Record<string, unknown>; signs_from: Date; age_days: number }

/**
 * The OpenID Provider's state as the database holds it: issuer recorded, a key
 * that signs with its private half in the vault, clients a jump can reach, and
 * expired storage being purged. Nothing is checked while no client is registered.
 */
async function checkSso(c: pg.Client, env: NodeJS.ProcessEnv): Promise<CheckLine[]> {
  try {
    if (!(await c.query(q.ssoInstalled)).rows[0].installed) return [];
    const clients = (await c.query<SsoClientRow>(q.ssoClients)).rows;
    if (clients.length === 0) return [line('sso', 'sso.client', 'ok', 'not in use: no client registered')];
    const out: CheckLine[] = [];
    const issuer = (await c.query<{ issuer: string }>(q.ssoIssuer)).rows[0]?.issuer ?? null;
    out.push(ssoIssuerLine(issuer, env.ERP_CLOUD_SSO_ISSUER));
    const keys = (await c.query<SsoKeyRow>(q.ssoSigningKeys)).rows;
    const vault = (await c.query<{ version: number; written_at: Date }>(q.ssoVaultSecret)).rows[0] ?? null;
    out.push(...ssoKeyLines(keys, issuer !== null));
    if (keys.length > 0) out.push(await ssoPrivateKeysLine(c, keys, vault !== null, env));
    for (const cl of clients) out.push(ssoClientLine(cl));
    const stale = (await c.query<{ stale: number | null }>(q.ssoStaleStorage)).rows[0]?.stale ?? null;
    if (stale !== null) {
      out.push(stale === 0
        ? line('sso storage', 'sso.oidc_payload', 'ok', 'no session, code or grant more than an hour past its expiry')
        : line('sso storage', 'sso.oidc_payload', 'warn', `${stale} row(s) more than an hour past expiry: no provider has run sso.purge_expired() lately (is erp-cloud sso serve running?)`));
    }
    return out;
  } catch (err) {
    return [line('sso', 'schema sso', 'fail', errText(err))];
  }
}

function ssoIssuerLine(recorded: string | null, configured: string | undefined): CheckLine {
  if (recorded === null) return line('sso issuer', 'sso.setting', 'warn', 'no issuer recorded: erp-cloud sso serve has not started yet, so jump URLs cannot be built');
  if (configured && configured !== recorded) {
    return line('sso issuer', recorded, 'warn', `ERP_CLOUD_SSO_ISSUER here is ${configured}, but the running provider recorded ${recorded}: relying parties validate the issuer exactly`);
  }
  let host = '';
  try {
    host = new URL(recorded).hostname;
  } catch {
    return line('sso issuer', recorded, 'fail', 'not a URL');
  }
  const loopback = host === 'localhost' || host === '[::1]' || /^127\./.test(host);
  if (recorded.startsWith('http:') && !loopback) {
    return line('sso issuer', recorded, 'fail', 'plain http on a non-loopback host: sessions and codes would cross the network in clear; use https');
  }
  return line('sso issuer', recorded, 'ok', recorded.startsWith('https:') ? 'https' : 'http on loopback (development only)');
}

function ssoKeyLines(keys: SsoKeyRow[], started: boolean): CheckLine[] {
  const signing = keys.find((k) => k.state === 'signing');
  if (!signing) {
    return [line('sso signing key', 'sso.signing_key', started ? 'fail' : 'warn', started
      ? 'no key signs now: ID tokens cannot be issued (erp-cloud sso rotate-keys makes one)'
      : 'none yet: the first erp-cloud sso serve makes one')];
  }
  if (signing.age_days > SIGNING_KEY_WARN_DAYS) {
    return [line('sso signing key', signing.kid, 'warn', `signing for ${signing.age_days} days: rotate it (erp-cloud sso rotate-keys)`)];
  }
  const pending = keys.find((k) => k.state === 'published');
  return [line('sso signing key', signing.kid, 'ok', `signing since ${iso(signing.signs_from)} (${signing.age_days} days)` +
    `${pending ? `; ${pending.kid} published, signs from ${iso(pending.signs_from)}` : ''}; ${keys.length} key(s) in the JWKS`)];
}

/**
 * Every key that signs or will sign has its private half in the vault secret
 * sso.signing_keys. Decrypted and checked kid by kid when this login may read the
 * vault and the vault key is set here; otherwise only the secret's presence is known.
 */
async function ssoPrivateKeysLine(c: pg.Client, keys: SsoKeyRow[], present: boolean, env: NodeJS.ProcessEnv): Promise<CheckLine> {
  const name = 'sso private keys';
  const target = 'vault sso.signing_keys';
  if (!present) return line(name, target, 'fail', 'missing from the vault: the provider cannot sign with the published keys; rotate (erp-cloud sso rotate-keys) to make new ones');
  let key: string | null = null;
  try {
    key = loadVaultKey({ ERP_CLOUD_VAULT_KEY: env.ERP_CLOUD_VAULT_KEY || undefined, ERP_CLOUD_VAULT_KEY_FILE: env.ERP_CLOUD_VAULT_KEY_FILE || undefined }, { optional: true });
  } catch {
    key = null; // the vault key line says what is wrong with it
  }
  const canRead = (await c.query<{ can: boolean }>(q.ssoCanReadVault)).rows[0]?.can ?? false;
  if (key === null || !canRead) {
    return line(name, target, 'warn', `present, not verified: ${key === null ? 'no vault key here (ERP_CLOUD_VAULT_KEY)' : 'this login may not read the vault (vault.read_secret)'}`);
  }
  let stored: unknown;
  try {
    stored = JSON.parse((await c.query<{ value: string }>(q.ssoReadVault, [key])).rows[0]!.value);
  } catch (err) {
    return line(name, target, 'fail', `cannot be read: ${err instanceof SyntaxError ? 'not JSON' : errText(err)}`);
  }
  if (!stored || typeof stored !== 'object' || Array.isArray(stored)) return line(name, target, 'fail', 'cannot be read: not a JSON object of kid -> JWK');
  const privates = stored as Record<string, unknown>;
  const needed = keys.filter((k) => k.state !== 'verifying'); // a key that only verifies no longer signs
  const bad = needed.filter((k) => !privateHalfMatches(privates[k.kid], k.public_jwk)).map((k) => k.kid);
  return bad.length
    ? line(name, target, 'fail', `no private half matching the published key for ${bad.join(', ')}: the provider cannot sign with it; rotate (erp-cloud sso rotate-keys)`)
    : line(name, target, 'ok', `private halves of ${needed.map((k) => k.kid).join(', ')} present, readable and matching the published keys`);
}

/** A private JWK belongs to the published one: it has its private exponent and the same public members (RSA n, e). */
function privateHalfMatches(priv: unknown, pub: Record<string, unknown>): boolean {
  if (!priv || typeof priv !== 'object') return false;
  const p = priv as Record<string, unknown>;
  return typeof p.d === 'string' && p.kty === pub.kty && p.n === pub.n && p.e === pub.e;
}

function ssoClientLine(cl: SsoClientRow): CheckLine {
  if (!cl.enabled) return line('sso client', cl.client_id, 'ok', 'disabled (sso.enable_client to let it sign in again)');
  if (!cl.initiate_login_uri) {
    return line('sso client', cl.client_id, 'warn', `enabled, ${cl.redirect_uris} redirect URI(s), but no initiate_login_uri: jump tickets for it have nowhere to go (sso.set_client_uris)`);
  }
  return line('sso client', cl.client_id, 'ok', `enabled, ${cl.redirect_uris} redirect URI(s), jumps start at ${cl.initiate_login_uri}`);
}

function iso(d: Date | null): string {
  return d ? d.toISOString() : '?';
}

// ─── 3. roles and grants ─────────────────────────────────────────────────────

async function checkRolesAndGrants(c: pg.Client): Promise<CheckLine[]> {
  const out: CheckLine[] = [];
  const present = new Set<string>();
  for (const role of ROLES) {
    try {
      const ok = (await c.query(q.roleExists, [role])).rows[0].present as boolean;
      if (ok) present.add(role);
      out.push(line('role exists', role, ok ? 'ok' : 'fail', ok ? 'present' : 'missing: run erp-cloud migrate (it creates the roles)'));
    } catch (err) {
      out.push(line('role exists', role, 'fail', errText(err)));
    }
  }
  // [role, object, what is checked, should it be granted, the privilege query]
  const grants: Array<[string, string, string, boolean, () => Promise<boolean>]> = [
    ['erp_cloud_app', 'cloud.enqueue_message', 'execute', true, () => fnPriv(c, 'erp_cloud_app', ENQUEUE)],
    ['erp_cloud_app', 'cloud.log', 'select', false, () => colPriv(c, 'erp_cloud_app', 'cloud.log', 'select')],
    ['erp_cloud_app', 'cloud.claim_messages', 'execute', false, () => fnPriv(c, 'erp_cloud_app', CLAIM)],
    ['erp_cloud_listener', 'cloud.claim_messages', 'execute', true, () => fnPriv(c, 'erp_cloud_listener', CLAIM)],
    ['erp_cloud_listener', 'cloud.record_attempts', 'execute', true, () => fnPriv(c, 'erp_cloud_listener', RECORD)],
  ];
  for (const [role, object, privilege, wanted, has] of grants) {
    const target = `${role} ${privilege} ${object}`;
    if (!present.has(role)) {
      out.push(line('grants', target, 'fail', `role ${role} is missing`));
      continue;
    }
    try {
      const granted = await has();
      out.push(granted === wanted
        ? line('grants', target, 'ok', wanted ? 'granted' : 'not granted, as it should be')
        : line('grants', target, 'fail', wanted
          ? `not granted: ${role} needs ${privilege} on ${object} (run erp-cloud migrate, or grant it)`
          : `granted, but ${role} must not have ${privilege} on ${object}: revoke ${privilege} on ${object} from ${role}`));
    } catch (err) {
      out.push(line('grants', target, 'fail', errText(err)));
    }
  }
  try {
    const fns = (await c.query<{ fn: string }>(q.publicExecutable)).rows.map((r) => r.fn);
    out.push(fns.length
      ? line('grants', 'PUBLIC execute cloud.*', 'fail', `executable by PUBLIC: ${fns.join(', ')} (revoke execute on function … from public)`)
      : line('grants', 'PUBLIC execute cloud.*', 'ok', 'no function in schema cloud is executable by PUBLIC'));
  } catch (err) {
    out.push(line('grants', 'PUBLIC execute cloud.*', 'fail', errText(err)));
  }
  return out;
}

async function fnPriv(c: pg.Client, role: string, fn: string): Promise<boolean> {
  return (await c.query(q.functionPrivilege, [role, fn])).rows[0].granted;
}

async function colPriv(c: pg.Client, role: string, table: string, privilege: string): Promise<boolean> {
  return (await c.query(q.columnPrivilege, [role, table, privilege])).rows[0].granted;
}

// ─── 4. the vault key ────────────────────────────────────────────────────────

/**
 * Does the master key this environment would give the listener open the vault?
 * The key is loaded the way the listener loads it (vault.ts: ERP_CLOUD_VAULT_KEY
 * or ERP_CLOUD_VAULT_KEY_FILE, same refusals), then only fingerprints are
 * compared: vault.list_secrets() shows the key id each secret is encrypted
 * under. The key is never printed, and never sent to the database here.
 */
export async function checkVaultKey(c: pg.Client, env: NodeJS.ProcessEnv): Promise<CheckLine> {
  const name = 'vault key';
  const target = env.ERP_CLOUD_VAULT_KEY_FILE ? 'ERP_CLOUD_VAULT_KEY_FILE' : 'ERP_CLOUD_VAULT_KEY';
  try {
    if (!(await c.query(q.vaultInstalled)).rows[0].installed) return line(name, 'vault', 'warn', 'vault not installed');
    const stored = (await c.query<{ key_id: string; secrets: number }>(q.vaultKeyIds)).rows;
    const count = stored.reduce((n, r) => n + r.secrets, 0);
    let key: string | null;
    try {
      key = loadVaultKey({ ERP_CLOUD_VAULT_KEY: env.ERP_CLOUD_VAULT_KEY || undefined, ERP_CLOUD_VAULT_KEY_FILE: env.ERP_CLOUD_VAULT_KEY_FILE || undefined }, { optional: true });
    } catch (err) {
      return line(name, target, 'fail', (err as Error).message); // names the variable, never the value
    }
    if (key === null) {
      return count
        ? line(name, target, 'fail', `neither ERP_CLOUD_VAULT_KEY nor ERP_CLOUD_VAULT_KEY_FILE is set here: the listener could not read the vault's ${count} secret(s)`)
        : line(name, target, 'warn', 'not set here, and the vault holds no secrets yet');
    }
    const id = vaultKeyId(key);
    if (!count) return line(name, target, 'ok', `set (key id ${id}); the vault holds no secrets to check it against`);
    const other = stored.filter((r) => r.key_id !== id);
    if (other.length) {
      return line(name, target, 'fail', `does not match: the vault's secrets are encrypted under key id ${other.map((r) => r.key_id).join(', ')}, this key's id is ${id}`);
    }
    return line(name, target, 'ok', `matches key id ${id} of ${count} secret(s)`);
  } catch (err) {
    return line(name, target, 'fail', errText(err));
  }
}

/** vault._key_id (0004_vault.sql): the first 12 hex digits of sha256('erp-cloud vault key id:' || key). */
export function vaultKeyId(key: string): string {
  return createHash('sha256').update(`erp-cloud vault key id:${key}`, 'utf8').digest('hex').slice(0, 12);
}

// ─── 5. endpoints ────────────────────────────────────────────────────────────

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

async function checkEndpoints(c: pg.Client, timeoutMs: number): Promise<CheckLine[]> {
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

// ─── output ──────────────────────────────────────────────────────────────────

/** The worst status of all lines. */
export function overallStatus(lines: CheckLine[]): CheckStatus {
  return lines.some((l) => l.status === 'fail') ? 'fail' : lines.some((l) => l.status === 'warn') ? 'warn' : 'ok';
}

/** The table: padded columns, the detail last and never cut (it carries the reason). */
export function formatChecks(lines: CheckLine[]): string {
  const cols = ['check', 'target', 'status'] as const;
  const widths = cols.map((c) => Math.max(c.length, ...lines.map((l) => l[c].length)));
  const row = (vals: string[], detail: string) => [...vals.map((v, i) => v.padEnd(widths[i]!)), detail].join('  ').trimEnd();
  const count = (s: CheckStatus) => lines.filter((l) => l.status === s).length;
  return [
    row([...cols], 'detail'),
    row(widths.map((w) => '-'.repeat(w)), '------'),
    ...lines.map((l) => row([l.check, l.target, l.status], l.detail.replace(/\s+/g, ' '))),
    '',
    `${count('ok')} ok, ${count('warn')} warning(s), ${count('fail')} failure(s)`,
  ].join('\n');
}
