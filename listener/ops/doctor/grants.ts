/** Doctor, 3. roles and grants: the three roles exist, each has what it needs and nothing it must not have. */
import type pg from 'pg';
import { errText, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

const ROLES = ['erp_cloud_app', 'erp_cloud_listener', 'erp_cloud_operator'] as const;
const ENQUEUE = 'cloud.enqueue_message(text,text,jsonb,text,text,text,uuid,timestamptz)';
const CLAIM = 'cloud.claim_messages(text,integer,text[],interval,timestamptz)';
const RECORD = 'cloud.record_attempts(text,jsonb,timestamptz)';

export async function checkRolesAndGrants(c: pg.Client): Promise<CheckLine[]> {
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
