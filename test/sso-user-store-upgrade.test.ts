/**
 * Migration 0021 on an installation that has been signing users in: a database migrated to the
 * file before 0021 with live SSO data (users written into erp.app_user by the ERP, one of them
 * since deleted; a jump ticket issued and already bound to the browser that opened it; a provider
 * session; audit rows) is migrated to 0021 while the OpenID Provider keeps running. The users keep
 * their ids (the OIDC subject) in sso.app_user, the ticket, session and audit rows are untouched,
 * the waiting browser finishes its jump and signs in with the subject it had before, the ERP puts
 * its users with sso.put_user from then on (same ids, a new login past every id ever used), and
 * readers still find the users at erp.app_user, read-only.
 */
import { copyFileSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrationsDir } from '../listener/kernel/db.js';
import { migrationFilesThrough } from './helpers/legacy-release.js';
import { Browser, completeJump } from '../listener/sim/demo-rp.js';
import { PgAdapter } from '../listener/sso/adapter.js';
import { providerSql } from '../listener/sso/provider.js';
import { createTestDb, rolledBack, sqlstateOf } from './helpers/db.js';
import { startSsoWorld, type SsoWorld } from './helpers/sso.js';
import { migrateWith } from './helpers/examples.js';

let w: SsoWorld;
let dirBefore: string;

/** The installation's migration files before 0021 (the upgrade starts from the last of them). */
function filesBefore0021(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-before-0021-'));
  for (const f of readdirSync(migrationsDir).filter((x) => x.endsWith('.sql') && Number(x.slice(0, 4)) < 21)) {
    copyFileSync(path.join(migrationsDir, f), path.join(dir, f));
  }
  return dir;
}

/** The users as the ERP wrote them before 0021: straight into its table; wang.fang came and went. */
const USERS_BEFORE_0021 = `insert into erp.app_user (login, display_name, email, company_code, company_name, scm_role) values
    ('zhang.wei', '张伟', 'zhang.wei@example.com', 'C001', '华东机电有限公司', 'buyer'),
    ('wang.fang', '王芳', null, 'C002', '华南贸易有限公司', null),
    ('li.na', '李娜', 'li.na@example.com', 'C001', '华东机电有限公司', 'viewer');
  delete from erp.app_user where login = 'wang.fang'`;

/**
 * The provider of this release calls the SQL names 0022 gave its functions (sso.put_issuer,
 * sso.audit_event, …). On the installation before 0021 they are reached through these bridges,
 * dropped again just before the upgrade, whose 0022 renames the functions they call to these names.
 */
const PROVIDER_NAMES_BEFORE_0022 = `
  create function sso.put_issuer(p_issuer text) returns void language sql as $$ select sso.record_issuer(p_issuer) $$;
  create function sso.put_id_token_ttl(p_seconds integer) returns void language sql as $$ select sso.record_id_token_ttl(p_seconds) $$;
  create function sso.audit_event(p_event text, p_client_id text, p_user_id bigint, p_source_addr inet, p_code text default null, p_detail text default null)
    returns void language sql as $$ select sso.record_event(p_event, p_client_id, p_user_id, p_source_addr, p_code, p_detail) $$;
  create function sso.audit_failure(p_source_addr inet, p_throttle_client text, p_kind text, p_client_id text, p_user_id bigint, p_code text, p_detail text,
                                    p_threshold integer, p_window interval, p_audited boolean default false, p_now timestamptz default now())
    returns integer language sql as $$ select sso.record_failure(p_source_addr, p_throttle_client, p_kind, p_client_id, p_user_id, p_code, p_detail,
                                                                   p_threshold, p_window, p_audited, p_now) $$`;
const DROP_PROVIDER_NAMES_BEFORE_0022 = `drop function sso.put_issuer(text), sso.put_id_token_ttl(integer),
  sso.audit_event(text, text, bigint, inet, text, text),
  sso.audit_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz)`;

const snapshot = {
  users: 'select id, login, display_name, email, active, company_code, company_name, scm_role, created_at, updated_at from {users} order by id',
  tickets: `select encode(ticket_sha256, 'hex') as ticket, user_id, client_id, issued_at, expires_at, host(issued_from) as issued_from,
                   opened_at, encode(bound_sha256, 'hex') as bound, consumed_at from sso.jump_ticket order by 1`,
  payloads: 'select model, id, payload, grant_id, uid, expires_at, consumed_at, revoked_at from sso.oidc_payload order by model, id',
  audit: 'select id, at, event, user_id, login, client_id, host(source_addr) as source_addr, code, detail from sso.audit order by id',
};
const rows = async (sql: string) => (await w.db.pool.query(sql)).rows;

let before: { users: unknown[]; tickets: unknown[]; payloads: unknown[]; audit: Array<{ id: string }> };
let ids: Record<string, string>;
let lastIdBefore: string;
let waiting: { browser: Browser; next: string };

beforeAll(async () => {
  dirBefore = filesBefore0021();
  const db = await createTestDb('sso_user_store_upgrade', { template: null });
  await migrateWith(db, dirBefore);
  await db.pool.query(PROVIDER_NAMES_BEFORE_0022);
  // the provider of this release, running on the installation before 0021
  w = await startSsoWorld('sso_user_store_upgrade', {}, { db, usersSql: USERS_BEFORE_0021 });
  ids = Object.fromEntries((await rows('select login, id::text from erp.app_user')).map((r) => [r.login, r.id]));
  lastIdBefore = (await rows(`select last_value::text as v from pg_sequences where schemaname = 'erp' and sequencename = 'app_user_id_seq'`))[0]!.v;

  // a jump zhang.wei started before the upgrade: issued by the ERP, opened at /jump, bound to this browser
  const browser = new Browser();
  const jumpUrl = await w.issue('zhang.wei', 'procurement', { ttl: '10 minutes' });
  const opened = await browser.request(jumpUrl);
  expect(opened.status).toBe(303);
  waiting = { browser, next: opened.location! };
  // li.na's provider session and a login of hers in the audit
  await new PgAdapter('Session', w.db.pool).upsert('upgrade-session', { kind: 'Session', jti: 'upgrade-session', uid: 'upgrade-session-uid',
    accountId: ids['li.na'], loginTs: Math.floor(Date.now() / 1000) } as never, 3600);
  await w.db.pool.query(`select sso.record_event('login', 'procurement', $1, '198.51.100.4', 'jump', null)`, [ids['li.na']]);

  before = {
    users: await rows(snapshot.users.replace('{users}', 'erp.app_user')),
    tickets: await rows(snapshot.tickets),
    payloads: await rows(snapshot.payloads),
    audit: await rows(snapshot.audit),
  };
  expect(before.users).toHaveLength(2);
  expect(before.tickets).toHaveLength(1);
  expect(before.audit.length).toBeGreaterThanOrEqual(2);

  await w.db.pool.query(DROP_PROVIDER_NAMES_BEFORE_0022);
  const through22 = migrationFilesThrough(migrationsDir, 22); // up to 0022: 0023 makes the reference ERP an example
  try {
    await migrateWith(w.db, through22.dir);
  } finally {
    through22.remove();
  }
});
afterAll(async () => {
  await w?.close();
  if (dirBefore) rmSync(dirBefore, { recursive: true, force: true });
});

describe('the SSO users move from erp into sso in place (0021)', () => {
  it('the users keep their ids and every column in sso.app_user, the identity sequence goes on from where it was, and erp.app_user shows the same rows', async () => {
    expect(await rows(snapshot.users.replace('{users}', 'sso.app_user'))).toEqual(before.users);
    expect(await rows(snapshot.users.replace('{users}', 'erp.app_user'))).toEqual(before.users);
    const seq = await rows(`select schemaname, sequencename, last_value::text as v from pg_sequences where sequencename = 'app_user_id_seq'`);
    expect(seq).toEqual([{ schemaname: 'sso', sequencename: 'app_user_id_seq', v: lastIdBefore }]);
    const kinds = await rows(`select n.nspname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relname = 'app_user' order by 1`);
    expect(kinds).toEqual([{ nspname: 'erp', relkind: 'v' }, { nspname: 'sso', relkind: 'r' }]);
  });

  it('the jump tickets, provider storage and audit rows are unchanged, and the tickets\' foreign key names sso.app_user', async () => {
    expect(await rows(snapshot.tickets)).toEqual(before.tickets);
    expect(await rows(snapshot.payloads)).toEqual(before.payloads);
    expect(await rows(`${snapshot.audit.replace(' order by id', '')} where id <= ${before.audit.at(-1)!.id} order by id`)).toEqual(before.audit);
    expect(await rows(`select confrelid::regclass::text as target from pg_constraint where conrelid = 'sso.jump_ticket'::regclass and contype = 'f' order by 1`))
      .toEqual([{ target: 'sso.app_user' }, { target: 'sso.client' }]);
    // the session still names its user, whom the provider finds
    const session = await new PgAdapter('Session', w.db.pool).find('upgrade-session');
    expect(session?.accountId).toBe(ids['li.na']);
    expect((await w.db.pool.query(providerSql.account, [session!.accountId])).rows).toMatchObject([{ id: ids['li.na'], login: 'li.na' }]);
  });

  it('no sso function names erp.app_user any more', async () => {
    expect(await rows(`select p.oid::regprocedure::text as fn from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                        where n.nspname in ('sso', 'scm', 'tax', 'cloud', 'vault') and p.prosrc ilike '%erp.app_user%' order by 1`)).toEqual([]);
  });

  it('the browser that opened its jump link before the upgrade signs in after it, with the subject it had', async () => {
    const since = Number(before.audit.at(-1)!.id);
    const res = await waiting.browser.get(waiting.next);
    const result = JSON.parse(res.body) as { ok?: boolean; claims?: Record<string, unknown>; error_description?: string };
    expect(result.error_description ?? null).toBeNull();
    expect(result.ok).toBe(true);
    expect(result.claims).toMatchObject({ sub: ids['zhang.wei'], preferred_username: 'zhang.wei', name: '张伟', scm_role: 'buyer' });
    expect((await w.audit(since)).map((a) => [a.event, a.user_id, a.code])).toEqual([
      ['ticket_consumed', ids['zhang.wei'], null],
      ['login', ids['zhang.wei'], 'jump'],
    ]);
  });

  it('a jump issued after the upgrade signs the user in with the same subject', async () => {
    const result = await completeJump(await w.issue('li.na', 'procurement'));
    expect(result.ok).toBe(true);
    expect(result.claims).toMatchObject({ sub: ids['li.na'], preferred_username: 'li.na' });
  });

  it('the ERP puts its users with sso.put_user: a known login keeps its id, a new one gets an id past every id used before', async () => {
    const { rows: known } = await w.db.pool.query(`select sso.put_user('zhang.wei', '张伟', 'zhang.wei@example.com', true, 'C001', '华东机电有限公司', 'buyer_manager')::text as id`);
    expect(known[0].id).toBe(ids['zhang.wei']);
    const { rows: back } = await w.db.pool.query(`select sso.put_user('wang.fang', '王芳')::text as id`);
    expect(BigInt(back[0].id)).toBeGreaterThan(BigInt(lastIdBefore));
    expect(Object.values(ids)).not.toContain(back[0].id);
    const result = await completeJump(await w.issue('zhang.wei', 'procurement'));
    expect(result.claims).toMatchObject({ sub: ids['zhang.wei'], scm_role: 'buyer_manager' });
  });

  it('erp.app_user is read-only for the ERP: reading works, writing through it is refused', async () => {
    await rolledBack(w.db.pool, async (c) => {
      await c.query('set local role erp_cloud_app');
      expect((await c.query(`select id::text from erp.app_user where login = 'li.na'`)).rows).toEqual([{ id: ids['li.na'] }]);
      expect(await sqlstateOf(c.query(`insert into erp.app_user (login, display_name) values ('x.y', 'X')`))).toBe('42501');
    });
    await rolledBack(w.db.pool, async (c) => {
      await c.query('set local role erp_cloud_app');
      expect(await sqlstateOf(c.query(`update erp.app_user set active = false where login = 'li.na'`))).toBe('42501');
    });
  });
});
