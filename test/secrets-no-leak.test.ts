/**
 * Secrets never leak: a full delivery cycle with a bearer token and a signing
 * key from System_Vault — successes, a retry, a permanent failure, a cloud
 * that echoes the token back — and then every output an operator or an
 * attacker could read is searched for the secret values. Then every SQL
 * function that takes a secret is made to fail on each of its paths (the
 * secret passed as a bind parameter, as the listener and the CLI pass it):
 * the error (message, detail, hint, context, internal query), the notices and
 * the PostgreSQL server log written meanwhile must hold none of them. Each
 * path has its own marker secret, so a hit names the path.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { signWebhookBody } from '../listener/providers/webhook.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';
import { locateServerLog, logOffset, logSince, type ServerLog } from './helpers/server-log.js';

const run = promisify(execFile);
const masterKey = `vault-master-${randomBytes(12).toString('hex')}`;
const token = `tok_${randomBytes(16).toString('hex')}`;
const signingKey = `sig_${randomBytes(16).toString('hex')}`;
const SECRETS = [masterKey, token, signingKey];

let db: TestDb;
let sim: SimServer;
let listener: ChildListener | undefined;
let serverLog: ServerLog;
let logStart = 0;

/** Every secret this file hands the database, by the path it took (the server-log scan reports the path). */
const markers = new Map<string, string>([['vault master key', masterKey], ['bearer token', token], ['signing key', signingKey]]);
/** A fresh secret for one path: never a valid name (upper case), so no check can mistake it for one. */
function secretFor(path: string, length = 24): string {
  const s = `S${randomBytes(length).toString('hex').slice(0, length - 2)}X`;
  markers.set(path, s);
  return s;
}

beforeAll(async () => {
  db = await createTestDb('noleak');
  serverLog = await locateServerLog(db.pool);
  if (serverLog.file) logStart = logOffset(serverLog.file);
  sim = await startSim({
    routes: [
      ...webhookRoutes(),
      // a cloud that checks the token and the signature over the exact body
      {
        method: 'POST', path: '/verify', handler: (ctx) => {
          const sig = String(ctx.headers['x-erp-cloud-signature'] ?? '');
          const t = Number(/^t=(\d+),/.exec(sig)?.[1]);
          const fresh = Math.abs(Date.now() / 1000 - t) < 300;
          const ok = ctx.headers.authorization === `Bearer ${token}` && fresh && sig === signWebhookBody(signingKey, ctx.rawBody, t);
          return ok ? { status: 200, body: { ok: true } } : { status: 401, body: { error: 'bad signature or token' } };
        },
      },
      // a careless cloud that quotes the Authorization header back in its error
      { method: 'POST', path: '/echo', handler: (ctx) => ({ status: 400, body: { error: 'bad request', you_sent: ctx.headers.authorization } }) },
    ],
  });
  await db.pool.query(`select vault.put_secret('hook.token', $1, $2)`, [token, masterKey]);
  await db.pool.query(`select vault.put_secret('hook.signing', $1, $2)`, [signingKey, masterKey]);
  const config = { bearer_secret: 'hook.token', signing_secret: 'hook.signing' };
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_config => $2, p_timeout_ms => 300, p_backoff_base_ms => 50, p_backoff_cap_ms => 100)`, [`${sim.url}/verify`, config]);
  await db.pool.query(`select cloud.put_endpoint('echo', $1, p_config => $2)`, [`${sim.url}/echo`, config]);
  for (const e of ['hook', 'echo']) await db.pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [e]);
});
afterAll(async () => {
  listener?.proc.kill('SIGKILL');
  await sim.close();
  await db.drop();
});

describe('secrets', () => {
  it('a full delivery cycle with vault secrets leaves them in no log, table, status, metric or error', async () => {
    sim.setFaults({ schedule: [{ kind: 'status', status: 503 }, { kind: 'timeout', ms: 1000 }] });
    listener = spawnListener(db.url, { ERP_CLOUD_VAULT_KEY: masterKey, ERP_CLOUD_LOG_LEVEL: 'debug', ERP_CLOUD_HTTP_PORT: '0' });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g)) from generate_series(1, 5) g`);
    await db.pool.query(`select cloud.enqueue_message('echo', 'demo.ping', '{"n":99}')`);
    await waitFor(async () => {
      const c = await statusCounts(db.pool);
      return c.sent === 5 && c.failed === 1;
    }, { timeoutMs: 20_000, what: '5 sent and the echo failed' });

    // the secrets were really used: the /verify cloud accepted the token and the signature 5 times
    expect(sim.ledger().filter((e) => e.path === '/verify' && e.status === 200)).toHaveLength(5);
    const { rows: logged } = await db.pool.query(`select request_headers from cloud.log where outcome = 'ok' limit 1`);
    expect(logged[0].request_headers).toMatchObject({ authorization: '[redacted]', 'x-erp-cloud-signature': '[redacted]' });

    const outputs: Record<string, string> = {
      'cloud.log': JSON.stringify((await db.pool.query(`select * from cloud.log`)).rows),
      'cloud.outbox': JSON.stringify((await db.pool.query(`select * from cloud.outbox`)).rows),
      'cloud.endpoint': JSON.stringify((await db.pool.query(`select * from cloud.endpoint`)).rows),
      'vault.secret': JSON.stringify((await db.pool.query(`select name, encode(ciphertext, 'escape') as c from vault.secret`)).rows),
      status: (await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'status', '--json'])).stdout,
      doctor: await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'doctor', '--json'], {
        env: { PATH: process.env.PATH, ERP_CLOUD_VAULT_KEY: masterKey },
      }).then((r) => r.stdout + r.stderr, (e: { stdout: string; stderr: string }) => e.stdout + e.stderr),
      tail: (await run(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'tail', '--once', '--lines', '100', '--json'])).stdout,
    };
    expect(outputs.doctor).toMatch(/vault/i); // doctor did check the vault key, and printed no key
    const metricsUrl = /"url":"(http:\/\/127\.0\.0\.1:\d+)","msg":"health and metrics"/.exec(listener.output())?.[1];
    expect(metricsUrl).toBeTruthy();
    outputs.metrics = await (await fetch(`${metricsUrl}/metrics`, { signal: AbortSignal.timeout(3000) })).text();
    outputs.healthz = await (await fetch(`${metricsUrl}/healthz`, { signal: AbortSignal.timeout(3000) })).text();
    listener.proc.kill('SIGTERM');
    expect(await listener.exited).toBe(0);
    outputs['listener logs'] = listener.output();

    // the echo's answer did carry the token back; what was stored of it is redacted
    expect(outputs['cloud.log']).toContain('Bearer [redacted]');
    for (const [where, text] of Object.entries(outputs)) {
      for (const secret of SECRETS) expect(text.includes(secret), `${where} contains a secret`).toBe(false);
    }
  });

  it('a secret that cannot be read is a retryable attempt with a reason, and the reason names no value', async () => {
    await resetProductState(db.pool, { keep: ['cloud.endpoint', 'vault.secret', 'vault.secret_version'] }); // the endpoints and secrets of beforeAll
    listener = spawnListener(db.url, { ERP_CLOUD_VAULT_KEY: `wrong-key-${randomBytes(8).toString('hex')}` });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await db.pool.query(`select count(*)::int n from cloud.log`)).rows[0].n > 0, { what: 'an attempt' });
    listener.proc.kill('SIGKILL');
    const { rows } = await db.pool.query(`select outcome, error_class, error_message, http_status from cloud.log limit 1`);
    expect(rows[0]).toMatchObject({ outcome: 'retryable', error_class: 'secret_unavailable', http_status: null });
    expect(rows[0].error_message).toMatch(/EC021|master key/i);
    for (const secret of SECRETS) expect(JSON.stringify(rows)).not.toContain(secret);
  });
});

/** Everything a failed call hands the client: message, detail, hint, context (where), internal query. */
function wholeError(err: unknown): string {
  return JSON.stringify({ ...(err as object), message: (err as Error).message });
}

interface Outcome {
  code: string | null;
  /** the error and every notice of the call, as the client received them */
  text: string;
}

describe('a failing call that carries a secret quotes it nowhere', () => {
  let c: pg.Client;
  let notices: string[] = [];
  const srv = `leak_srv_${randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    c = new pg.Client({ connectionString: db.url });
    await c.connect();
    c.on('notice', (n) => notices.push(JSON.stringify({ ...n, message: n.message })));
    // the server log gets notices too, and every field of every message
    await c.query(`set log_min_messages = notice; set log_error_verbosity = verbose`);
    await c.query(`select scm.create_shared_asn_server($1, '127.0.0.1', 9, 'nowhere')`, [srv]);
  });
  afterAll(async () => {
    await c.end();
  });

  /** Runs one call (as `role` when given) and returns its SQLSTATE and all it said. */
  async function attempt(sql: string, params: unknown[], role?: string): Promise<Outcome> {
    notices = [];
    let code: string | null = null;
    let error = '';
    if (role) await c.query(`set role ${role}`);
    try {
      await c.query(sql, params);
    } catch (err) {
      code = (err as { code?: string }).code ?? 'no-sqlstate';
      error = wholeError(err);
    } finally {
      if (role) await c.query('reset role');
    }
    return { code, text: [error, ...notices].join('\n') };
  }

  /** The paths whose own secrets show up in what they said (expected: none). */
  function leaks(outcomes: Record<string, Outcome>): string[] {
    return Object.entries(outcomes).flatMap(([path, o]) =>
      [...markers].filter(([, secret]) => o.text.includes(secret)).map(([owner]) => `${path} quotes the secret of ${owner}`));
  }

  const mapping = 'select scm.create_shared_asn_user_mapping($1, $2, $3, $4)';

  it('shared-database setup: a missing server, role, user or privilege, or a failing statement, names the server and role, never the password', async () => {
    const o: Record<string, Outcome> = {
      'fdw: no such server': await attempt(mapping, [`nosuch_${srv}`, 'reader', secretFor('fdw: no such server'), null]),
      'fdw: no such local role': await attempt(mapping, [srv, 'reader', secretFor('fdw: no such local role'), `nosuch_role_${srv}`]),
      'fdw: no remote user': await attempt(mapping, [srv, null, secretFor('fdw: no remote user'), null]),
      'fdw: no usage on the server': await attempt(mapping, [srv, 'reader', secretFor('fdw: no usage on the server'), null], 'erp_cloud_operator'),
      'fdw: not the server owner': await attempt(mapping, [srv, 'reader', secretFor('fdw: not the server owner'), 'erp_cloud_listener'], 'erp_cloud_operator'),
    };
    // a failure of the statement itself (here an event trigger that quotes the new mapping's options back)
    await c.query(`create function public.leak_probe() returns event_trigger language plpgsql as $f$
                   begin
                     raise exception 'mapping refused: %', (select string_agg(array_to_string(m.umoptions, ','), ';')
                       from pg_event_trigger_ddl_commands() d join pg_user_mapping m on m.oid = d.objid);
                   end $f$`);
    await c.query(`create event trigger leak_probe on ddl_command_end when tag in ('CREATE USER MAPPING') execute function public.leak_probe()`);
    try {
      o['fdw: the statement fails'] = await attempt(mapping, [srv, 'reader', secretFor('fdw: the statement fails'), null]);
    } finally {
      await c.query(`drop event trigger leak_probe; drop function public.leak_probe()`);
    }
    expect(o['fdw: the statement fails']!.text).toContain('mapping refused: user=reader,password=[redacted]');
    expect(leaks(o)).toEqual([]);
    expect(Object.fromEntries(Object.entries(o).map(([k, v]) => [k, v.code]))).toEqual({
      'fdw: the statement fails': 'P0001',
      'fdw: no such server': SqlState.sharedDbSetupRefused,
      'fdw: no such local role': SqlState.sharedDbSetupRefused,
      'fdw: no remote user': SqlState.sharedDbSetupRefused,
      'fdw: no usage on the server': '42501',
      'fdw: not the server owner': '42501',
    });
    // the message names what is wrong
    expect(o['fdw: no such server']!.text).toContain(`nosuch_${srv}`);
    expect(o['fdw: no such local role']!.text).toContain(`nosuch_role_${srv}`);
    expect(o['fdw: no usage on the server']!.text).toContain(srv);
    // and nothing was created
    const { rows } = await c.query(`select count(*)::int n from pg_user_mappings where srvname = $1`, [srv]);
    expect(rows[0].n).toBe(0);
  });

  it('shared-database setup run again replaces the mapping\'s user and password, and says neither password', async () => {
    const first = secretFor('fdw: first mapping');
    const second = secretFor('fdw: mapping replaced');
    const o: Record<string, Outcome> = {
      'fdw: first mapping': await attempt(mapping, [srv, 'reader', first, null]),
      'fdw: mapping replaced': await attempt(mapping, [srv, 'reader2', second, null]),
    };
    expect(leaks(o)).toEqual([]);
    expect([o['fdw: first mapping']!.code, o['fdw: mapping replaced']!.code]).toEqual([null, null]);
    // the second password is the one in force (read as the superuser, the only one who may see it)
    const { rows } = await c.query(`select umoptions from pg_user_mappings where srvname = $1`, [srv]);
    expect(rows).toHaveLength(1);
    expect(rows[0].umoptions).toEqual(expect.arrayContaining(['user=reader2', `password=${second}`]));
  });

  it('the vault: a short, wrong or misplaced key or value is refused with its SQLSTATE and quoted nowhere', async () => {
    await c.query(`select vault.put_secret('leak.damaged', $1, $2)`, [secretFor('vault: damaged ciphertext'), masterKey]);
    await c.query(`update vault.secret set ciphertext = substring(ciphertext from 1 for 20) || '\\x00'::bytea where name = 'leak.damaged'`);
    const o: Record<string, Outcome> = {
      'vault: short key': await attempt(`select vault.put_secret('leak.a', $1, $2)`, [secretFor('vault: value under a short key'), secretFor('vault: short key', 14)]),
      'vault: wrong key on read': await attempt(`select vault.read_secret('hook.token', $1)`, [secretFor('vault: wrong key on read')]),
      'vault: other key on put': await attempt(`select vault.put_secret('leak.b', $1, $2)`, [secretFor('vault: value under another key'), secretFor('vault: other key on put')]),
      'vault: value given as the name': await attempt(`select vault.put_secret($1, 'leak.c', $2)`, [secretFor('vault: value given as the name'), masterKey]),
      'vault: key given as the name': await attempt(`select vault.read_secret($1, 'nuonuo.app_secret')`, [secretFor('vault: key given as the name')]),
      'vault: the real key given as the name': await attempt(`select vault.read_secret($1, 'nuonuo.app_secret')`, [masterKey]),
      'vault: empty value': await attempt(`select vault.put_secret('leak.d', '', $1)`, [secretFor('vault: key with an empty value')]),
      'vault: rotate a missing secret': await attempt(`select vault.rotate_secret('leak.none', $1, $2)`, [secretFor('vault: rotate a missing secret'), masterKey]),
      'vault: damaged ciphertext': await attempt(`select vault.read_secret('leak.damaged', $1)`, [masterKey]),
      'vault: rekey with a wrong old key': await attempt(`select vault.rekey_secrets($1, $2)`, [secretFor('vault: wrong old key'), secretFor('vault: new key after a wrong old key')]),
      'vault: rekey to the same key': await attempt(`select vault.rekey_secrets($1, $1)`, [masterKey]),
      'vault: rekey to a short key': await attempt(`select vault.rekey_secrets($1, $2)`, [masterKey, secretFor('vault: short new key', 14)]),
      'sso: the key given as the vault name': await attempt(`select sso.read_vault_secret($1, 'sso.signing_keys')`, [masterKey]),
      'sso: a value given as the vault name': await attempt(`select sso.put_vault_secret($1, 'sso.cookie_keys', $2)`, [secretFor('sso: a value given as the vault name'), masterKey]),
    };
    await c.query(`delete from vault.secret where name = 'leak.damaged'`);
    expect(leaks(o)).toEqual([]);
    expect(Object.fromEntries(Object.entries(o).map(([k, v]) => [k, v.code]))).toEqual({
      'vault: short key': SqlState.vaultKeyInvalid,
      'vault: wrong key on read': SqlState.vaultKeyMismatch,
      'vault: other key on put': SqlState.vaultKeyMismatch,
      'vault: value given as the name': SqlState.invalidSecretName,
      'vault: key given as the name': SqlState.invalidSecretName,
      'vault: the real key given as the name': SqlState.invalidSecretName,
      'vault: empty value': SqlState.secretValueEmpty,
      'vault: rotate a missing secret': SqlState.secretNotFound,
      'vault: damaged ciphertext': SqlState.secretUndecryptable,
      'vault: rekey with a wrong old key': SqlState.vaultKeyMismatch,
      'vault: rekey to the same key': SqlState.vaultKeyUnchanged,
      'vault: rekey to a short key': SqlState.vaultKeyInvalid,
      'sso: the key given as the vault name': SqlState.ssoVaultNameNotSso,
      'sso: a value given as the vault name': SqlState.ssoVaultNameNotSso,
    });
    // a missing secret with a proper name is still named
    expect(o['vault: rotate a missing secret']!.text).toContain('leak.none');
    expect((await c.query(`select name from vault.secret order by name`)).rows.map((r) => r.name)).toEqual(['hook.signing', 'hook.token']);
  });

  it('provider tokens, signing keys, jump tickets and client secrets: refused calls quote none of them', async () => {
    const ok = secretFor('token: stored');
    const o: Record<string, Outcome> = {
      'token: no key': await attempt(`select cloud.store_provider_token('hook', null, $1, now() + interval '1 hour')`, [secretFor('token: no key')]),
      'token: already expired': await attempt(`select cloud.store_provider_token('hook', 'k1', $1, now() - interval '1 hour')`, [secretFor('token: already expired')]),
      'token: unknown endpoint': await attempt(`select cloud.store_provider_token($2, 'k1', $1, now() + interval '1 hour')`, [secretFor('token: unknown endpoint'), `nosuch_${srv}`]),
      'token: stored': await attempt(`select cloud.store_provider_token('hook', 'k1', $1, now() + interval '1 hour')`, [ok]),
      'token: forgotten': await attempt(`select cloud.forget_provider_token('hook', 'k1', $1)`, [ok]),
      'jwk: private member': await attempt(`select sso.schedule_signing_key('kid-leak-0001', jsonb_build_object('kty', 'RSA', 'n', 'x', 'e', 'AQAB', 'd', $1::text))`,
        [secretFor('jwk: private member')]),
      'jump: unknown ticket opened': await attempt(`select * from sso.open_jump_ticket($1, $2)`, [secretFor('jump: unknown ticket opened', 43), secretFor('jump: binding', 43)]),
      'jump: unknown ticket consumed': await attempt(`select * from sso.consume_jump_ticket($1, 'nosuch', null, $2)`, [secretFor('jump: unknown ticket consumed', 43), markers.get('jump: binding')]),
    };
    // a constraint the row breaks: its DETAIL would quote the row, token included
    await c.query(`alter table cloud.provider_token add constraint leak_probe check (length(token) < 8)`);
    try {
      o['token: refused by a constraint'] = await attempt(`select cloud.store_provider_token('hook', 'k2', $1, now() + interval '1 hour')`, [secretFor('token: refused by a constraint')]);
    } finally {
      await c.query(`alter table cloud.provider_token drop constraint leak_probe`);
    }
    const registered = await c.query(`select client_secret from sso.register_client('leak-client', 'x', array['https://x.example.com/cb'])`);
    markers.set('sso: registered client secret', registered.rows[0].client_secret);
    o['sso: client registered twice'] = await attempt(`select sso.register_client('leak-client', 'x', array['https://x.example.com/cb'])`, []);
    expect(leaks(o)).toEqual([]);
    expect(Object.fromEntries(Object.entries(o).map(([k, v]) => [k, v.code]))).toEqual({
      'token: no key': SqlState.invalidProviderToken,
      'token: already expired': SqlState.invalidProviderToken,
      'token: unknown endpoint': SqlState.unknownEndpoint,
      'token: stored': null,
      'token: forgotten': null,
      'token: refused by a constraint': '23514',
      'jwk: private member': SqlState.ssoInvalidKey,
      'jump: unknown ticket opened': null,
      'jump: unknown ticket consumed': null,
      'sso: client registered twice': SqlState.ssoClientExists,
    });
    expect((await c.query(`select count(*)::int n from cloud.provider_token`)).rows[0].n).toBe(0);
    const trail = JSON.stringify((await c.query(`select * from sso.audit`)).rows);
    expect(trail).toContain('EO020'); // the refused ticket was audited, by its code only
    expect([...markers.values()].filter((m) => trail.includes(m))).toEqual([]);
  });

  it('every function that takes a secret is made to fail above', async () => {
    // a new function with a secret parameter must join the paths above
    const { rows } = await c.query<{ fn: string }>(`
      select distinct p.oid::regprocedure::text as fn
        from pg_proc p, unnest(p.proargnames, coalesce(p.proallargtypes, p.proargtypes::oid[])) as a(name, type)
       where p.pronamespace::regnamespace::text in ('cloud', 'tax', 'scm', 'sso', 'vault', 'erp') and p.proname !~ '^_'
         and a.type in ('text'::regtype, 'jsonb'::regtype, 'bytea'::regtype)
         and a.name ~ '^p_((.*_)?(password|passwd|token|secret|ticket|binding|credential)s?|(master_|old_|new_|private_)?key|(new_)?value|private_jwk)$'
       order by 1`);
    expect(rows.map((r) => r.fn)).toEqual([
      'cloud.forget_provider_token(text,text,text)',
      'cloud.store_provider_token(text,text,text,timestamp with time zone)',
      'scm.create_shared_asn_user_mapping(text,text,text,text)',
      'sso.consume_jump_ticket(text,text,inet,text)',
      'sso.open_jump_ticket(text,text,inet)',
      'sso.put_vault_secret(text,text,text,text)',
      'sso.read_vault_secret(text,text)',
      'vault.put_secret(text,text,text,text)',
      'vault.read_secret(text,text)',
      'vault.rekey_secrets(text,text)',
      'vault.rotate_secret(text,text,text)',
    ]);
  });
  it('a function that puts a secret into dynamic SQL catches the statement\'s failures and raises them again without it', async () => {
    // the CONTEXT / QUERY line of a failing EXECUTE is the statement, secret included
    const { rows } = await c.query<{ fn: string; src: string }>(`
      select p.oid::regprocedure::text as fn, p.prosrc as src from pg_proc p
       where p.pronamespace::regnamespace::text in ('cloud', 'tax', 'scm', 'sso', 'vault', 'erp')
         and p.prolang = (select l.oid from pg_language l where l.lanname = 'plpgsql')`);
    const secretArg = /\bp_((\w*_)?(password|passwd|token|secret|ticket|binding|credential)s?|(master_|old_|new_|private_)?key|(new_)?value)\b/;
    const offenders: string[] = [];
    let carrying = 0;
    for (const { fn, src } of rows) {
      const statements = [...src.matchAll(/execute\s+format\(([^;]*);/gi)].map((m) => m[1]!);
      if (!statements.some((st) => secretArg.test(st.replace(/using[\s\S]*$/i, '')))) continue;
      carrying++;
      if (!/exception\s+when\s+others\s+then[\s\S]*get\s+stacked\s+diagnostics[\s\S]*_redact\(/i.test(src)) offenders.push(fn);
    }
    expect(carrying).toBeGreaterThan(0); // scm.create_shared_asn_user_mapping does
    expect(offenders).toEqual([]);
  });
});

describe('the server log', () => {
  it('what PostgreSQL logged while this file ran (errors, notices, their context and statements) holds none of the secrets', async (ctx) => {
    if (!serverLog.file) {
      // only a server that is not the private cluster may hide its log; against the private cluster (make test, CI) this fails
      expect(serverLog.privateCluster, `the private cluster's log must be readable: ${serverLog.why}`).toBe(false);
      ctx.skip(`server log not checked: ${serverLog.why}`);
    }
    const logged = logSince(serverLog.file!, logStart);
    // the failures above did reach the log (so this is the right file, and it was searched)
    expect(logged).toMatch(/leak_srv_[0-9a-f]{8}/);
    expect(logged).toContain('STATEMENT:  select vault.read_secret($1');
    const hits = [...markers].filter(([, secret]) => logged.includes(secret))
      .map(([path, secret]) => `${path}: ${logged.split('\n').find((l) => l.includes(secret))}`);
    expect(hits).toEqual([]);
  });
});
