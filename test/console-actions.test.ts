/**
 * The operations console's actions, authorised again in the database
 * (sql/migrations/0025_operations_console.sql): each *_from_console function
 * checks the signed-in ERP user (erp_cloud.console_user) and their console
 * role, and the database role the console works as may execute only what
 * that console role allows. Every action is audited with the user's name.
 */
import type pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { createTestDb, sqlstateOf, type TestDb } from './helpers/db.js';

let db: TestDb;

beforeAll(async () => {
  db = await createTestDb('console_actions');
  await db.pool.query(`select sso.put_user('ops', '运维小王'), sso.put_user('fin', '财务小李'), sso.put_user('nobody', '访客'),
                              sso.put_user('gone', '已离职', null, false)`);
  await db.pool.query(`select cloud.put_console_role('ops', 'operator'), cloud.put_console_role('fin', 'finance'), cloud.put_console_role('gone', 'operator')`);
  await db.pool.query(`select cloud.put_endpoint('hooks', 'http://127.0.0.1:9/', 'webhook', p_max_attempts => 1)`);
});
afterAll(() => db.drop());

let dead: string;
beforeEach(async () => {
  const { rows } = await db.pool.query(`select cloud.enqueue_message('hooks', 'demo.ping', '{"n": 1}') as id`);
  dead = rows[0].id;
  await db.pool.query(`update cloud.outbox set status = 'dead', attempts = 1, last_error = 'connection refused' where request_id = $1`, [dead]);
});

/** Runs `sql` in one transaction as the console does: SET LOCAL ROLE, then the signed-in login. */
async function asConsole(role: string, login: string | null, sql: string, params: unknown[]): Promise<pg.QueryResult> {
  const c = await db.pool.connect();
  try {
    await c.query('begin');
    await c.query(`set local role ${role}`);
    if (login !== null) await c.query(`select set_config('erp_cloud.console_user', $1, true)`, [login]);
    const r = await c.query(sql, params);
    await c.query('commit');
    return r;
  } catch (err) {
    await c.query('rollback');
    throw err;
  } finally {
    c.release();
  }
}

const statusOf = async (id: string) => (await db.pool.query('select status from cloud.outbox where request_id = $1', [id])).rows[0].status as string;
const auditCount = async () => Number((await db.pool.query('select count(*) from cloud.console_audit')).rows[0].count);

describe('console actions are authorised in the database', () => {
  it('an operator replays a dead message, audited with their name in both audits', async () => {
    await asConsole('erp_cloud_console_operator', 'ops', 'select cloud.replay_message_from_console($1, $2)', [dead, '云平台已恢复']);
    expect(await statusOf(dead)).toBe('pending');
    const audit = (await db.pool.query('select login, console_role, action, reason, result from cloud.console_audit where target = $1', [dead])).rows;
    expect(audit).toEqual([{ login: 'ops', console_role: 'operator', action: 'replay', reason: '云平台已恢复', result: dead }]);
    const replay = (await db.pool.query('select actor, action from cloud.replay_audit where request_id = $1', [dead])).rows;
    expect(replay).toEqual([{ actor: 'console:ops', action: 'replay' }]);
  });

  it('a finance user cannot replay: the database role may not execute it, and the function refuses the user too', async () => {
    const before = await auditCount();
    expect(await sqlstateOf(asConsole('erp_cloud_console_finance', 'fin', 'select cloud.replay_message_from_console($1, $2)', [dead, 'try']))).toBe('42501');
    // even as a role that may execute it, a finance user is refused by the function's own check
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'fin', 'select cloud.replay_message_from_console($1, $2)', [dead, 'try']))).toBe(SqlState.consoleRoleRefused);
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'fin', 'select cloud.skip_message_from_console($1, $2)', [dead, 'try']))).toBe(SqlState.consoleRoleRefused);
    expect(await statusOf(dead)).toBe('dead');
    expect(await auditCount()).toBe(before);
  });

  it('without a signed-in user, for a user without a console role, or for an inactive one, nothing happens', async () => {
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', null, 'select cloud.replay_message_from_console($1, $2)', [dead, 'x']))).toBe(SqlState.consoleNoUser);
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', '', 'select cloud.replay_message_from_console($1, $2)', [dead, 'x']))).toBe(SqlState.consoleNoUser);
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'nobody', 'select cloud.replay_message_from_console($1, $2)', [dead, 'x']))).toBe(SqlState.consoleRoleRefused);
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'gone', 'select cloud.replay_message_from_console($1, $2)', [dead, 'x']))).toBe(SqlState.consoleRoleRefused);
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'nobody', 'select cloud.requery_invoice_from_console($1, $2)', [1, 'x']))).toBe(SqlState.consoleRoleRefused);
    expect(await statusOf(dead)).toBe('dead');
  });

  it('the role a user without a console role works as reads nothing and does nothing', async () => {
    expect(await sqlstateOf(asConsole('erp_cloud_console', 'nobody', 'select count(*) from cloud.outbox', []))).toBe('42501');
    expect(await sqlstateOf(asConsole('erp_cloud_console', 'nobody', 'select count(*) from tax.invoice_status', []))).toBe('42501');
    expect(await sqlstateOf(asConsole('erp_cloud_console', 'ops', 'select cloud.replay_message_from_console($1, $2)', [dead, 'x']))).toBe('42501');
    const { rows } = await asConsole('erp_cloud_console', 'nobody', 'select cloud.console_role($1) as a, cloud.console_role($2) as b, cloud.console_role($3) as c', ['ops', 'nobody', 'gone']);
    expect(rows[0]).toEqual({ a: 'operator', b: null, c: null });
  });

  it('an action without a reason is refused (EC007) and leaves no audit', async () => {
    const before = await auditCount();
    expect(await sqlstateOf(asConsole('erp_cloud_console_operator', 'ops', 'select cloud.replay_message_from_console($1, $2)', [dead, '  ']))).toBe(SqlState.reasonRequired);
    expect(await sqlstateOf(asConsole('erp_cloud_console_finance', 'fin', 'select cloud.reissue_invoice_from_console($1, null, $2)', [1, null]))).toBe(SqlState.reasonRequired);
    expect(await statusOf(dead)).toBe('dead');
    expect(await auditCount()).toBe(before);
  });

  it('finance may requery and reissue: the request reaches the invoicing API, which judges the invoice', async () => {
    expect(await sqlstateOf(asConsole('erp_cloud_console_finance', 'fin', 'select cloud.requery_invoice_from_console($1, $2)', [424242, '再查一次']))).toBe(SqlState.invoiceRequeryRefused);
    expect(await sqlstateOf(asConsole('erp_cloud_console_finance', 'fin', `select cloud.reissue_invoice_from_console($1, '{"name": "x"}', $2)`, [424242, '更正税号']))).toBe(SqlState.invoiceReissueRefused);
  });

  it('an operator skips a dead message, audited', async () => {
    await asConsole('erp_cloud_console_operator', 'ops', 'select cloud.skip_message_from_console($1, $2)', [dead, '重复的消息']);
    expect(await statusOf(dead)).toBe('skipped');
    expect((await db.pool.query('select action, login from cloud.console_audit where target = $1', [dead])).rows).toEqual([{ action: 'skip', login: 'ops' }]);
  });

  it('console roles are put by operators: operator, finance or none; another role or an unknown login is refused', async () => {
    expect(await sqlstateOf(db.pool.query(`select cloud.put_console_role('nobody', 'admin')`))).toBe(SqlState.consoleRoleInvalid);
    expect(await sqlstateOf(db.pool.query(`select cloud.put_console_role('no.such.user', 'finance')`))).toBe(SqlState.ssoUnknownUser);
    await db.pool.query(`select cloud.put_console_role('nobody', 'finance')`);
    expect((await db.pool.query(`select cloud.console_role('nobody') as r`)).rows[0].r).toBe('finance');
    await db.pool.query(`select cloud.put_console_role('nobody', null)`);
    expect((await db.pool.query(`select cloud.console_role('nobody') as r`)).rows[0].r).toBeNull();
    const { rows } = await db.pool.query(`select has_function_privilege('erp_cloud_operator', 'cloud.put_console_role(text, text)', 'execute') as op,
                                                 has_function_privilege('erp_cloud_console_operator', 'cloud.put_console_role(text, text)', 'execute') as console`);
    expect(rows[0]).toEqual({ op: true, console: false });
  });

  it('the console\'s roles can read no secret: no vault, no endpoint config, no provider token', async () => {
    const { rows } = await db.pool.query(`
      select r.rolname,
             has_schema_privilege(r.rolname, 'vault', 'usage') as vault,
             has_column_privilege(r.rolname, 'cloud.endpoint', 'config', 'select') as config,
             has_table_privilege(r.rolname, 'cloud.provider_token', 'select') as token,
             has_table_privilege(r.rolname, 'sso.oidc_payload', 'select') as sso
        from pg_roles r where r.rolname in ('erp_cloud_console', 'erp_cloud_console_finance', 'erp_cloud_console_operator') order by 1`);
    expect(rows).toEqual(['erp_cloud_console', 'erp_cloud_console_finance', 'erp_cloud_console_operator']
      .map((rolname) => ({ rolname, vault: false, config: false, token: false, sso: false })));
  });
});
