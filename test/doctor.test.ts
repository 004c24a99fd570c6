/**
 * `erp-cloud doctor` and `erp-cloud tail` as an operator runs them: real
 * processes against this file's own database, endpoints on 127.0.0.1 servers
 * started here (plain HTTP, a closed port, a self-signed short-lived TLS
 * certificate) and a name that cannot resolve (.invalid).
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { migrate, migrationsDir } from '../listener/kernel/db.js';
import { loadMigrationFiles } from '../listener/kernel/migrations.js';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { migrateLikeEarlierRelease, PREVIOUS_RELEASE, releaseFiles } from './helpers/legacy-release.js';

const run = promisify(execFile);
const sha256Of2 = loadMigrationFiles(migrationsDir)[1]!.sha256;
let db: TestDb;
let httpServer: http.Server;
let httpsServer: https.Server;
let httpPort: number;
let httpsPort: number;
let closedPort: number;
let certDir: string;

interface Check {
  check: string;
  target: string;
  status: 'ok' | 'warn' | 'fail';
  detail: string;
}

function listen(server: net.Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port)));
}

function close(server: net.Server | undefined): Promise<void> {
  return new Promise((resolve) => (server ? server.close(() => resolve()) : resolve()));
}

beforeAll(async () => {
  db = await createTestDb('doctor');
  httpServer = http.createServer((_req, res) => res.end('ok'));
  httpPort = await listen(httpServer);
  // a port nobody listens on: bind one, then let it go
  const probe = net.createServer();
  closedPort = await listen(probe);
  await close(probe);
  // a self-signed certificate that expires in 5 days (valid for 127.0.0.1 by name, so only trust and age are wrong)
  certDir = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-doctor-'));
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '5', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', path.join(certDir, 'key.pem'), '-out', path.join(certDir, 'cert.pem'),
  ], { stdio: 'ignore', timeout: 30_000 });
  httpsServer = https.createServer({ key: readFileSync(path.join(certDir, 'key.pem')), cert: readFileSync(path.join(certDir, 'cert.pem')) }, (_req, res) => res.end('ok'));
  httpsPort = await listen(httpsServer);
});

afterAll(async () => {
  httpServer?.closeAllConnections();
  httpsServer?.closeAllConnections();
  await close(httpServer);
  await close(httpsServer);
  if (certDir) rmSync(certDir, { recursive: true, force: true });
  await db?.drop();
});

beforeEach(async () => {
  await resetProductState(db.pool);
});

function cli(args: string[], env: Record<string, string> = {}) {
  return run(process.execPath, ['dist/listener/cli.js', '-c', db.url, ...args], { env: { PATH: process.env.PATH, ...env }, timeout: 30_000 }).then(
    (r) => ({ code: 0, stdout: r.stdout, stderr: r.stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

async function doctor(env: Record<string, string> = {}): Promise<{ code: number; checks: Check[]; stderr: string; stdout: string }> {
  const r = await cli(['doctor', '--json'], env);
  const parsed = JSON.parse(r.stdout) as { status: string; checks: Check[] };
  return { code: r.code, checks: parsed.checks, stderr: r.stderr, stdout: r.stdout };
}

const find = (checks: Check[], check: string, target?: string) => checks.filter((c) => c.check === check && (target === undefined || c.target === target));
const one = (checks: Check[], check: string, target?: string) => {
  const found = find(checks, check, target);
  expect(found, `${check} ${target ?? ''}`).toHaveLength(1);
  return found[0]!;
};

async function endpoint(name: string, url: string, allowPrivate = true): Promise<void> {
  await db.pool.query(`select cloud.put_endpoint($1, $2)`, [name, url]);
  if (allowPrivate) await db.pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [name]);
}

describe('erp-cloud doctor', () => {
  it('a source callback that failed and waits for a replay is a warning naming the source and the replay to run; one that gave way to a lock only after a minute of tries; none waiting is ok', async () => {
    expect(one((await doctor()).checks, 'source callbacks')).toMatchObject({ target: 'every source', status: 'ok' });
    await db.pool.query(`insert into scm.source (name) values ('doctor-erp')`);
    // gave way to a lock just now: the listener calls it again, nothing for anyone to do yet
    await db.pool.query(`insert into scm.callback_failure (source, event, object_id, sqlstate, message) values ('doctor-erp', 'order', 1, '55P03', 'lock timeout')`);
    expect(one((await doctor()).checks, 'source callbacks')).toMatchObject({ target: 'every source', status: 'ok' });
    // still giving way after a minute: something holds the ERP's row
    await db.pool.query(`update scm.callback_failure set failed_at = now() - interval '61 seconds'`);
    const locked = one((await doctor()).checks, 'source callbacks');
    expect(locked).toMatchObject({ target: 'scm:doctor-erp', status: 'warn' });
    expect(locked.detail).toContain('55P03 lock timeout');
    await db.pool.query(`update scm.callback_failure set replayed_at = now()`);
    // a fault of the callback: at once
    await db.pool.query(`insert into scm.callback_failure (source, event, object_id, sqlstate, message) values ('doctor-erp', 'order', 2, 'P0001', 'buyer desk is closed')`);
    const waiting = one((await doctor()).checks, 'source callbacks');
    expect(waiting).toMatchObject({ target: 'scm:doctor-erp', status: 'warn' });
    expect(waiting.detail).toContain(`select scm.replay_callbacks('doctor-erp')`);
    expect(waiting.detail).toContain('P0001 buyer desk is closed');
    await db.pool.query(`update scm.callback_failure set replayed_at = now()`);
    expect(one((await doctor()).checks, 'source callbacks')).toMatchObject({ target: 'every source', status: 'ok' });
  });

  it('a registered callback whose own lock_timeout could let PostgreSQL abort the ERP (registered before put_source refused it) is a warning naming the function and the fix', async () => {
    expect(one((await doctor()).checks, 'callback lock_timeout')).toMatchObject({ target: 'every source', status: 'ok' });
    await db.pool.query(`create schema if not exists doctor_erp`);
    await db.pool.query(`create function doctor_erp.on_order(r scm.order_result) returns void language sql security definer set search_path = '' set lock_timeout = '2s' as $$ select $$`);
    // as a registration of an earlier release left it: written directly, past today's put_source
    await db.pool.query(`insert into scm.source (name, on_order) values ('doctor-patient', 'doctor_erp.on_order(scm.order_result)')`);
    const warned = one((await doctor()).checks, 'callback lock_timeout');
    expect(warned).toMatchObject({ target: 'doctor-patient:on_order', status: 'warn' });
    expect(warned.detail).toContain('doctor_erp.on_order(scm.order_result) sets lock_timeout 2000 ms');
    expect(warned.detail).toContain('ALTER FUNCTION doctor_erp.on_order(scm.order_result) RESET lock_timeout');
    await db.pool.query(`alter function doctor_erp.on_order(scm.order_result) set lock_timeout = '0'`);
    expect(one((await doctor()).checks, 'callback lock_timeout').detail).toContain('sets lock_timeout 0 (no limit)');
    await db.pool.query(`alter function doctor_erp.on_order(scm.order_result) set lock_timeout = '200ms'`);
    expect(one((await doctor()).checks, 'callback lock_timeout')).toMatchObject({ target: 'every source', status: 'ok' });
    await db.pool.query(`delete from scm.source where name = 'doctor-patient'`);
  });

  it('a healthy setup exits 0: database, migrations, roles and grants are ok, and a local endpoint passes DNS, allowlist, TCP and circuit', async () => {
    await endpoint('hook', `http://127.0.0.1:${httpPort}/webhook`);
    await db.pool.query(`insert into cloud.listener (worker_id) values ('doctor-test')`); // a live heartbeat

    const { code, checks } = await doctor();
    expect(checks.filter((c) => c.status === 'fail')).toEqual([]);
    expect(code).toBe(0);
    for (const name of ['database connection', 'server version', 'migrations current', 'listener heartbeat']) expect(one(checks, name).status).toBe('ok');
    expect(one(checks, 'pg_cron')).toMatchObject({ status: 'warn', detail: "pg_cron absent here: the listener's fallback timer runs maintenance" });
    expect(find(checks, 'role exists').map((c) => [c.target, c.status])).toEqual([
      ['erp_cloud_app', 'ok'], ['erp_cloud_listener', 'ok'], ['erp_cloud_operator', 'ok'],
    ]);
    expect(find(checks, 'grants')).toHaveLength(6);
    expect(find(checks, 'grants').every((c) => c.status === 'ok')).toBe(true);
    expect(one(checks, 'dns', 'hook')).toMatchObject({ status: 'ok', detail: expect.stringContaining('127.0.0.1') });
    expect(one(checks, 'allowlist', 'hook')).toMatchObject({ status: 'ok', detail: '127.0.0.1 allowed' });
    expect(one(checks, 'tcp', 'hook')).toMatchObject({ status: 'ok', detail: expect.stringContaining(`127.0.0.1:${httpPort}`) });
    expect(one(checks, 'circuit', 'hook').status).toBe('ok');
    expect(find(checks, 'tls')).toEqual([]); // plain http: no handshake to check

    // the table form says the same, one line per check
    const table = await cli(['doctor']);
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/^check\s+target\s+status\s+detail$/m);
    expect(table.stdout).toMatch(/^tcp\s+hook\s+ok\s+connected to 127\.0\.0\.1:\d+/m);
    expect(table.stdout).toMatch(/\d+ ok, \d+ warning\(s\), 0 failure\(s\)/);
  });

  it('without pg_cron and without a live listener it warns that nothing runs maintenance, but does not fail', async () => {
    const { code, checks } = await doctor();
    expect(code).toBe(0);
    expect(one(checks, 'listener heartbeat')).toMatchObject({ status: 'warn', detail: expect.stringContaining('nothing runs maintenance') });
    expect(one(checks, 'endpoints')).toMatchObject({ status: 'warn' }); // none configured
  });

  it('listeners: the live ones are named, a silent one is a warning saying what happens to it, and an endpoint no live listener serves is named', async () => {
    await endpoint('hook', `http://127.0.0.1:${httpPort}/webhook`);
    await endpoint('tax', `http://127.0.0.1:${httpPort}/tax`);
    await db.pool.query(`select cloud.enqueue_message('tax', 'demo.ping', '{"n":1}')`);
    await db.pool.query(`insert into cloud.listener (worker_id, host, pid, endpoints) values ('live-1', 'erp-app-1', 4242, '{hook}')`);
    await db.pool.query(`insert into cloud.listener (worker_id, heartbeat_at) values ('frozen', now() - interval '90 seconds')`);
    const { code, checks } = await doctor();
    expect(code).toBe(0);
    expect(one(checks, 'listener heartbeat')).toMatchObject({ status: 'ok', detail: expect.stringMatching(/^1 listener\(s\) live \(live-1 on erp-app-1 pid 4242\).*they run maintenance/) });
    expect(one(checks, 'listener silent', 'frozen')).toMatchObject({ status: 'warn', detail: expect.stringMatching(/no heartbeat for 9\d s: .*registers again/) });
    expect(one(checks, 'listener coverage', 'tax')).toMatchObject({ status: 'warn', detail: expect.stringContaining('1 pending message(s)') });
    expect(find(checks, 'listener coverage', 'hook')).toEqual([]);

    // only a silent listener: nothing delivers, and without pg_cron nothing maintains either
    await db.pool.query(`delete from cloud.listener where worker_id = 'live-1'`);
    const quiet = await doctor();
    expect(one(quiet.checks, 'listener heartbeat')).toMatchObject({
      status: 'warn', detail: expect.stringMatching(/^no listener running; last heartbeat 9\d s ago: nothing delivers and nothing runs maintenance/),
    });
    expect(find(quiet.checks, 'listener coverage')).toEqual([]); // said once, by the line above
  });

  it('the delivery fence: none on a database that never crashed; emptied by a crash, then raised by the next claim, it is a warning saying how many messages wait and until when', async () => {
    await endpoint('hook', `http://127.0.0.1:${httpPort}/webhook`);
    expect(one((await doctor()).checks, 'delivery fence')).toMatchObject({ status: 'ok', detail: 'none: no crash since installation' });
    await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}') from generate_series(1, 2)`);
    await db.pool.query('truncate cloud.delivery_fence'); // what crash recovery does to an unlogged table
    expect(one((await doctor()).checks, 'delivery fence')).toMatchObject({ status: 'warn', detail: expect.stringMatching(/^emptied by a crash of PostgreSQL .* the next claim holds/) });
    expect((await db.pool.query(`select * from cloud.claim_messages('w1', 10)`)).rows).toEqual([]);
    const { code, checks } = await doctor();
    expect(code).toBe(0);
    expect(one(checks, 'delivery fence')).toMatchObject({ status: 'warn', detail: expect.stringMatching(/^raised at \S+ after a crash of PostgreSQL: 2 pending message\(s\) enqueued before it wait until \S+/) });
    await db.pool.query(`update cloud.delivery_fence set fence_until = now() - interval '1 second'`);
    expect(one((await doctor()).checks, 'delivery fence')).toMatchObject({ status: 'ok', detail: expect.stringMatching(/^none in force \(last raised at \S+, lifted at \S+\)$/) });
  });

  it('an endpoint whose host does not resolve fails the DNS line and exits 1', async () => {
    await endpoint('ghost', 'http://nothing.invalid/');
    const { code, checks } = await doctor();
    expect(code).toBe(1);
    expect(one(checks, 'dns', 'ghost')).toMatchObject({ status: 'fail', detail: expect.stringContaining('nothing.invalid') });
    expect(find(checks, 'tcp', 'ghost')).toEqual([]); // nothing to connect to
  });

  it('an endpoint on 127.0.0.1 without allow_private fails the allowlist line with the refusal reason and is never connected to', async () => {
    await endpoint('private', `http://127.0.0.1:${httpPort}/`, false);
    let connections = 0;
    const count = () => connections++;
    httpServer.on('connection', count);
    const { code, checks } = await doctor().finally(() => httpServer.off('connection', count));
    expect(code).toBe(1);
    expect(one(checks, 'allowlist', 'private')).toMatchObject({
      status: 'fail',
      detail: 'egress refused: 127.0.0.1 is a loopback address and endpoint private does not allow private addresses',
    });
    expect(find(checks, 'tcp', 'private')).toEqual([]);
    expect(connections).toBe(0);
  });

  it('an endpoint whose addresses fall outside its allowed ranges (白名单) fails the allowlist line', async () => {
    await endpoint('ranged', `http://127.0.0.1:${httpPort}/`, false);
    await db.pool.query(`select cloud.put_endpoint_allowlist('ranged', '{}', '{203.0.113.0/24}', true)`);
    const { code, checks } = await doctor();
    expect(code).toBe(1);
    expect(one(checks, 'allowlist', 'ranged')).toMatchObject({ status: 'fail', detail: expect.stringContaining('outside the address ranges allowed') });
  });

  it('credentials in a base URL fail the allowlist line, and the doctor does not print them', async () => {
    await endpoint('creds', `http://clerk:s3cr3t-pw@127.0.0.1:${httpPort}/?token=t0k3n`);
    const { code, checks, stdout } = await doctor();
    expect(code).toBe(1);
    expect(one(checks, 'allowlist', 'creds')).toMatchObject({ status: 'fail', detail: expect.stringContaining('credentials in the URL') });
    expect(stdout).not.toMatch(/s3cr3t-pw|t0k3n/);
  });

  it('a closed port fails the TCP line', async () => {
    await endpoint('closed', `http://127.0.0.1:${closedPort}/`);
    const { code, checks } = await doctor();
    expect(code).toBe(1);
    expect(one(checks, 'allowlist', 'closed').status).toBe('ok');
    expect(one(checks, 'tcp', 'closed')).toMatchObject({ status: 'fail', detail: expect.stringContaining('connection refused') });
  });

  it('a self-signed certificate fails the TLS line as untrusted, and one that expires in 5 days warns with the days left', async () => {
    await endpoint('tls', `https://127.0.0.1:${httpsPort}/`);
    const { code, checks } = await doctor();
    expect(code).toBe(1);
    expect(one(checks, 'tcp', 'tls').status).toBe('ok');
    expect(one(checks, 'tls', 'tls')).toMatchObject({ status: 'fail', detail: expect.stringMatching(/^self-signed \/ untrusted: self-signed certificate/) });
    const cert = one(checks, 'certificate', 'tls');
    expect(cert.status).toBe('warn');
    expect(cert.detail).toMatch(/^issuer CN=localhost; [45] days left/);
  });

  it('a disabled endpoint gets one warning line and is not probed', async () => {
    await endpoint('off', 'http://nothing.invalid/');
    await db.pool.query(`update cloud.endpoint set enabled = false where name = 'off'`);
    const { code, checks } = await doctor();
    expect(code).toBe(0);
    expect(checks.filter((c) => c.target === 'off')).toEqual([{ check: 'endpoint', target: 'off', status: 'warn', detail: expect.stringContaining('disabled') }]);
  });

  it('an open circuit or a 429 pause is a warning on the endpoint', async () => {
    await endpoint('tripped', `http://127.0.0.1:${httpPort}/`);
    await db.pool.query(`update cloud.endpoint set circuit_state = 'open', circuit_opened_at = now(), circuit_reason = '5 failures in a row',
                           paused_until = now() + interval '1 minute', pause_reason = 'HTTP 429' where name = 'tripped'`);
    const { code, checks } = await doctor();
    expect(code).toBe(0);
    expect(one(checks, 'circuit', 'tripped')).toMatchObject({ status: 'warn', detail: expect.stringMatching(/circuit open since .*5 failures in a row; paused until .*HTTP 429/) });
  });

  it('a migration file without a row in erp_cloud.migration fails "migrations current" and names the file', async () => {
    const { rows } = await db.pool.query(`select * from erp_cloud.migration order by id desc limit 1`);
    const last = rows[0];
    await db.pool.query(`delete from erp_cloud.migration where id = $1`, [last.id]);
    try {
      const { code, checks } = await doctor();
      expect(code).toBe(1);
      const m = one(checks, 'migrations current');
      expect(m.status).toBe('fail');
      expect(m.detail).toContain(`not applied: ${last.name}`);
    } finally {
      await db.pool.query(`insert into erp_cloud.migration select * from jsonb_populate_record(null::erp_cloud.migration, $1::jsonb)`, [JSON.stringify(last)]);
    }
    // an applied migration this checkout does not know is only a warning
    await db.pool.query(`insert into erp_cloud.migration (id, name, sha256) values (9999, '9999_from_the_future.sql', repeat('0', 64))`);
    try {
      const m = one((await doctor()).checks, 'migrations current');
      expect(m).toMatchObject({ status: 'warn', detail: expect.stringContaining('9999_from_the_future.sql') });
    } finally {
      await db.pool.query(`delete from erp_cloud.migration where id = 9999`);
    }
    // a landed file whose recorded sha256 differs is named too
    await db.pool.query(`update erp_cloud.migration set sha256 = repeat('f', 64) where id = 2`);
    try {
      const m = one((await doctor()).checks, 'migrations current');
      expect(m).toMatchObject({ status: 'warn', detail: expect.stringMatching(/changed since applied: 0002_\w+\.sql/) });
    } finally {
      await db.pool.query(`update erp_cloud.migration m set sha256 = $1 where id = 2`, [sha256Of2]);
    }
  });

  it('an installation of an earlier release not yet upgraded warns "run erp-cloud migrate"; once upgraded, it is ok and public.migrations is called obsolete', async () => {
    const old = await createTestDb('doctor_old', { template: null });
    const release = releaseFiles(PREVIOUS_RELEASE, 16);
    try {
      await migrateLikeEarlierRelease(old.url, release.dir);
      const doctorOf = async () => {
        const r = await run(process.execPath, ['dist/listener/cli.js', '-c', old.url, 'doctor', '--json'], { env: { PATH: process.env.PATH }, timeout: 30_000 })
          .then((x) => x.stdout, (e: { stdout: string }) => e.stdout);
        return one((JSON.parse(r) as { checks: Check[] }).checks, 'migrations current');
      };
      expect(await doctorOf()).toMatchObject({ status: 'warn', detail: expect.stringMatching(/earlier release \(history in public\.migrations.*run erp-cloud migrate/) });
      await migrate(old.url);
      expect(await doctorOf()).toMatchObject({ status: 'ok', detail: expect.stringMatching(/all applied.*public\.migrations .*obsolete and can be dropped/) });
    } finally {
      release.remove();
      await old.drop();
    }
  });

  it('a grant the ERP role must not have, or a function executable by PUBLIC, fails its grants line', async () => {
    // table and function privileges live in this database only, so other test files never see them
    await db.pool.query(`grant select on cloud.log to erp_cloud_app`);
    await db.pool.query(`grant execute on function cloud.reap_expired_leases(timestamptz) to public`);
    try {
      const { code, checks } = await doctor();
      expect(code).toBe(1);
      expect(one(checks, 'grants', 'erp_cloud_app select cloud.log')).toMatchObject({ status: 'fail', detail: expect.stringContaining('revoke select on cloud.log from erp_cloud_app') });
      expect(one(checks, 'grants', 'PUBLIC execute cloud.*')).toMatchObject({ status: 'fail', detail: expect.stringContaining('cloud.reap_expired_leases(timestamp with time zone)') });
      expect(one(checks, 'grants', 'erp_cloud_app execute cloud.enqueue_message').status).toBe('ok');
    } finally {
      await db.pool.query(`revoke select on cloud.log from erp_cloud_app`);
      await db.pool.query(`revoke execute on function cloud.reap_expired_leases(timestamptz) from public`);
    }
    expect((await doctor()).code).toBe(0);
  });

  it('with pg_cron scheduled, each erp-cloud job is checked: a failed last run fails with its message, no run yet warns', async () => {
    // pg_cron lives in another database of this cluster, so this database gets stand-ins for its two tables
    await db.pool.query(`
      create schema cron;
      create table cron.job (jobid bigint primary key, schedule text, command text, database text, username text, active boolean, jobname text);
      create table cron.job_run_details (jobid bigint, runid bigint, status text, return_message text, start_time timestamptz, end_time timestamptz);
      insert into cron.job values
        (1, '* * * * *', 'select 1', current_database(), 'postgres', true, 'erp-cloud: reap expired leases'),
        (2, '* * * * *', 'select 1', current_database(), 'postgres', true, 'erp-cloud: wake due retries'),
        (3, '7 * * * *', 'select 1', current_database(), 'postgres', true, 'erp-cloud: log partitions'),
        (4, '17 * * * *', 'select 1', current_database(), 'postgres', true, 'erp-cloud: purge finished');
      insert into cron.job_run_details values
        (1, 10, 'succeeded', '1 row', now() - interval '61 seconds', now() - interval '60 seconds'),
        (2, 11, 'succeeded', '1 row', now() - interval '2 minutes', now() - interval '2 minutes'),
        (2, 12, 'failed', 'ERROR:  permission denied for table outbox', now() - interval '1 minute', now() - interval '1 minute'),
        (4, 13, 'succeeded', '1 row', now() - interval '30 minutes', now() - interval '30 minutes');`);
    try {
      const { code, checks } = await doctor();
      expect(code).toBe(1);
      expect(find(checks, 'pg_cron')).toEqual([]);
      expect(one(checks, 'pg_cron job', 'erp-cloud: reap expired leases').status).toBe('ok');
      expect(one(checks, 'pg_cron job', 'erp-cloud: wake due retries')).toMatchObject({ status: 'fail', detail: expect.stringContaining('permission denied for table outbox') });
      expect(one(checks, 'pg_cron job', 'erp-cloud: log partitions').status).toBe('warn');
      expect(one(checks, 'pg_cron job', 'erp-cloud: purge finished').status).toBe('ok');

      // an every-minute job whose last success is old means pg_cron is not running it
      await db.pool.query(`update cron.job_run_details set start_time = start_time - interval '1 hour', end_time = end_time - interval '1 hour' where jobid = 1`);
      expect(one((await doctor()).checks, 'pg_cron job', 'erp-cloud: reap expired leases')).toMatchObject({ status: 'fail', detail: expect.stringContaining('last succeeded at') });
    } finally {
      await db.pool.query(`drop schema cron cascade`);
    }
  });

  it('the vault key is compared by fingerprint only: a matching key is ok, another key fails, and neither is ever printed', async () => {
    const { rows } = await db.pool.query(`select to_regnamespace('vault') is not null as installed`);
    if (!rows[0].installed) {
      expect(one((await doctor()).checks, 'vault key')).toMatchObject({ status: 'warn', detail: 'vault not installed' });
      return;
    }
    const right = `right-key-${randomUUID()}`;
    const wrong = `wrong-key-${randomUUID()}`;
    expect(one((await doctor()).checks, 'vault key').status).toBe('warn'); // no key, no secrets
    await db.pool.query(`select vault.put_secret('doctor.test', 'the-value', $1)`, [right]);
    try {
      const good = await doctor({ ERP_CLOUD_VAULT_KEY: right });
      expect(one(good.checks, 'vault key')).toMatchObject({ status: 'ok', detail: expect.stringContaining('matches key id') });
      const bad = await doctor({ ERP_CLOUD_VAULT_KEY: wrong });
      expect(bad.code).toBe(1);
      expect(one(bad.checks, 'vault key')).toMatchObject({ status: 'fail', detail: expect.stringContaining('does not match') });
      const none = await doctor();
      expect(one(none.checks, 'vault key')).toMatchObject({ status: 'fail', detail: expect.stringContaining('1 secret(s)') });
      for (const r of [good, bad, none]) {
        expect(r.stdout + r.stderr).not.toContain(right);
        expect(r.stdout + r.stderr).not.toContain(wrong);
        expect(r.stdout + r.stderr).not.toContain('the-value');
      }
    } finally {
      await resetProductState(db.pool);
    }
  });

  it('SSO: nothing is checked until a client is registered; then issuer, signing key, its private half and each client are', async () => {
    const sso = (checks: Check[]) => checks.filter((c) => c.check.startsWith('sso')).map((c) => [c.check, c.target, c.status]);
    expect(sso((await doctor()).checks)).toEqual([['sso', 'sso.client', 'ok']]);
    const key = `doctor-sso-key-${randomUUID()}`;
    try {
      await db.pool.query(`select sso.register_client('procurement', '友云采', array['https://saas.example.com/cb'])`);
      await db.pool.query(`select sso.register_client('legacy', 'old portal', array['https://old.example.com/cb'], '{}', 'https://old.example.com/login')`);
      await db.pool.query(`select sso.put_client_enabled('legacy', false)`);
      // registered, but the provider has never started: warnings, not failures
      let r = await doctor();
      expect(sso(r.checks)).toEqual([
        ['sso issuer', 'sso.setting', 'warn'],
        ['sso signing key', 'sso.signing_key', 'warn'],
        ['sso client', 'legacy', 'ok'],
        ['sso client', 'procurement', 'warn'],
        ['sso storage', 'sso.oidc_payload', 'ok'],
      ]);
      expect(one(r.checks, 'sso client', 'procurement').detail).toContain('no initiate_login_uri');

      // started on a plain-http public issuer, its key published but the private half lost from the vault
      await db.pool.query(`select sso.put_issuer('http://sso.example.com')`);
      await db.pool.query(`select sso.schedule_signing_key('doctor-key-1', '{"kty":"RSA","n":"AQAB","e":"AQAB"}')`);
      await db.pool.query(`select sso.put_client_uris('procurement', array['https://saas.example.com/cb'], '{}', 'https://saas.example.com/login')`);
      r = await doctor({ ERP_CLOUD_SSO_ISSUER: 'https://sso.example.com' });
      expect(r.code).toBe(1);
      expect(one(r.checks, 'sso issuer')).toMatchObject({ status: 'warn', detail: expect.stringContaining('recorded http://sso.example.com') });
      r = await doctor();
      expect(one(r.checks, 'sso issuer')).toMatchObject({ status: 'fail', detail: expect.stringContaining('plain http') });
      expect(one(r.checks, 'sso signing key', 'doctor-key-1')).toMatchObject({ status: 'ok', detail: expect.stringContaining('1 key(s) in the JWKS') });
      expect(one(r.checks, 'sso private keys')).toMatchObject({ status: 'fail', detail: expect.stringContaining('missing from the vault') });
      expect(one(r.checks, 'sso client', 'procurement')).toMatchObject({ status: 'ok', detail: expect.stringContaining('https://saas.example.com/login') });

      // https issuer; a vault secret that lacks the key's private half fails once decrypted, and is unverified without the vault key
      await db.pool.query(`select sso.put_issuer('https://sso.example.com')`);
      await db.pool.query(`select vault.put_secret('sso.signing_keys', '{"another-kid":{"d":"x"}}', $1)`, [key]);
      expect(one((await doctor({ ERP_CLOUD_VAULT_KEY: key })).checks, 'sso private keys')).toMatchObject({ status: 'fail', detail: expect.stringContaining('for doctor-key-1') });
      // a private half of another key under the right kid fails too, and so does a value that is no JSON object
      await db.pool.query(`select vault.put_secret('sso.signing_keys', '{"doctor-key-1":{"kty":"RSA","n":"other","e":"AQAB","d":"x"}}', $1)`, [key]);
      expect(one((await doctor({ ERP_CLOUD_VAULT_KEY: key })).checks, 'sso private keys')).toMatchObject({ status: 'fail', detail: expect.stringContaining('matching the published key') });
      await db.pool.query(`select vault.put_secret('sso.signing_keys', 'null', $1)`, [key]);
      r = await doctor({ ERP_CLOUD_VAULT_KEY: key });
      expect(one(r.checks, 'sso private keys')).toMatchObject({ status: 'fail', detail: expect.stringContaining('not a JSON object') });
      expect(one(r.checks, 'sso client', 'procurement').status).toBe('ok'); // the rest of the SSO section still runs
      expect(one((await doctor()).checks, 'sso private keys')).toMatchObject({ status: 'warn', detail: expect.stringContaining('not verified') });
      // with it: every SSO line passes
      await db.pool.query(`select vault.put_secret('sso.signing_keys', '{"doctor-key-1":{"kty":"RSA","n":"AQAB","e":"AQAB","d":"private-exponent-must-not-show"}}', $1)`, [key]);
      r = await doctor({ ERP_CLOUD_VAULT_KEY: key });
      expect(one(r.checks, 'sso private keys')).toMatchObject({ status: 'ok', detail: expect.stringContaining('doctor-key-1') });
      expect(r.stdout).not.toContain('private-exponent-must-not-show');
      expect(r.checks.filter((c) => c.check.startsWith('sso') && c.status !== 'ok')).toEqual([]);
      expect(r.stdout).not.toContain(key);

      // a session two hours past its expiry: no provider is purging
      await db.pool.query(`insert into sso.oidc_payload (model, id, payload, expires_at) values ('Session', 'stale', '{}', now() - interval '2 hours')`);
      expect(one((await doctor({ ERP_CLOUD_VAULT_KEY: key })).checks, 'sso storage')).toMatchObject({ status: 'warn', detail: expect.stringContaining('1 row(s)') });

      // a key that has signed for over a year is a warning to rotate
      await db.pool.query(`update sso.signing_key set signs_from = now() - interval '400 days', created_at = now() - interval '400 days'`);
      expect(one((await doctor({ ERP_CLOUD_VAULT_KEY: key })).checks, 'sso signing key')).toMatchObject({ status: 'warn', detail: expect.stringContaining('rotate') });
    } finally {
      await resetProductState(db.pool);
    }
  });

  it('an unreachable database is one failing line and exit code 1', async () => {
    const r = await run(process.execPath, ['dist/listener/cli.js', '-c', 'postgres://postgres:hunter2@127.0.0.1:1/none', 'doctor', '--json'], { env: { PATH: process.env.PATH } }).catch((e) => e);
    expect(r.code).toBe(1);
    const { checks } = JSON.parse(r.stdout) as { checks: Check[] };
    expect(checks).toEqual([{ check: 'database connection', target: '127.0.0.1:1/none', status: 'fail', detail: expect.stringContaining('ECONNREFUSED') }]);
    expect(r.stdout).not.toContain('hunter2');
  });
});

// ─── tail ───────────────────────────────────────────────────────────────────

const BODY_MARK = 'BODY-MUST-NOT-SHOW';

async function logAttempt(a: { endpoint: string; requestId?: string; attempt?: number; outcome?: string; status?: number | null; startedAt: string; error?: string | null }): Promise<string> {
  const id = a.requestId ?? randomUUID();
  await db.pool.query(
    `insert into cloud.log (request_id, attempt, endpoint, operation, worker_id, method, url, request_headers, request_body,
                            http_status, response_headers, response_body, duration_ms, outcome, error_class, error_message, started_at)
     values ($1, $2, $3, 'demo.ping', 'w1', 'POST', $4, $5, $6, $7, $5, $6, 12.5, $8, $9, $10, $11::timestamptz)`,
    [id, a.attempt ?? 1, a.endpoint, `http://127.0.0.1/${BODY_MARK}`, JSON.stringify({ authorization: BODY_MARK }), `{"invoice":"${BODY_MARK}"}`,
      a.status === undefined ? 200 : a.status, a.outcome ?? 'ok', a.error ? 'http_5xx' : null, a.error ?? null, a.startedAt],
  );
  return id;
}

describe('erp-cloud tail', () => {
  it('tail --once prints the last attempts oldest first, one line each, without bodies, headers or URLs, and filters by endpoint and request_id', async () => {
    const t = Date.now() - 60_000;
    const at = (s: number) => new Date(t + s * 1000).toISOString();
    const a1 = await logAttempt({ endpoint: 'tax', startedAt: at(1) });
    const b1 = await logAttempt({ endpoint: 'scm', startedAt: at(2), outcome: 'retryable', status: 503, error: 'HTTP 503 Service Unavailable' });
    const a2 = await logAttempt({ endpoint: 'tax', startedAt: at(3) });
    const b2 = await logAttempt({ endpoint: 'scm', requestId: b1, attempt: 2, startedAt: at(4) });

    const all = await cli(['tail', '--once']);
    expect(all.code).toBe(0);
    const lines = all.stdout.trim().split('\n');
    expect(lines.map((l) => l.split(/\s+/)[2])).toEqual([a1, b1, a2, b2]);
    expect(lines[1]).toMatch(new RegExp(`^${at(2).replace(/\./g, '\\.')}\\s+scm\\s+${b1}\\s+#1\\s+retryable\\s+503\\s+13ms\\s+http_5xx: HTTP 503 Service Unavailable$`));
    expect(all.stdout).not.toContain(BODY_MARK);

    const two = await cli(['tail', '--once', '--lines', '2']);
    expect(two.stdout.trim().split('\n').map((l) => l.split(/\s+/)[2])).toEqual([a2, b2]);

    const tax = await cli(['tail', '--once', '--endpoint', 'tax', '--json']);
    const rows = tax.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(rows.map((r) => r.request_id)).toEqual([a1, a2]);
    expect(Object.keys(rows[0]).sort()).toEqual(['attempt', 'duration_ms', 'endpoint', 'error_class', 'error_message', 'http_status', 'late', 'outcome', 'request_id', 'started_at']);
    expect(tax.stdout).not.toContain(BODY_MARK);

    const one_ = await cli(['tail', '--once', '--request-id', b1, '--json']);
    expect(one_.stdout.trim().split('\n').map((l) => JSON.parse(l).attempt)).toEqual([1, 2]);

    expect((await cli(['tail', '--once', '--request-id', 'not-a-uuid'])).code).toBe(1);
    expect((await cli(['tail', '--once', '--lines', '-3'])).code).toBe(1);
  });

  it('tail follows new attempts live: each exactly once, including ones sharing a timestamp and one recorded late, and stops on SIGINT with exit 0', async () => {
    const first = await logAttempt({ endpoint: 'tax', startedAt: new Date(Date.now() - 30_000).toISOString() });
    const proc = spawn(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'tail', '--lines', '1', '--interval', '100', '--json'], {
      env: { PATH: process.env.PATH }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    proc.stdout.on('data', (d) => (out += d));
    proc.stderr.on('data', (d) => (out += d));
    const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
    const printed = () => out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l).request_id as string);
    try {
      await waitFor(async () => printed().includes(first), { timeoutMs: 10_000, what: 'the last attempt' });
      const now = Date.now();
      const newer = await logAttempt({ endpoint: 'tax', startedAt: new Date(now - 1000).toISOString() });
      await waitFor(async () => printed().includes(newer), { timeoutMs: 10_000, what: 'a new attempt' });
      // two attempts that started in the same microsecond, and one whose result came back late (started before `newer`)
      const same = new Date(now - 500).toISOString();
      const twinA = await logAttempt({ endpoint: 'scm', startedAt: same });
      const twinB = await logAttempt({ endpoint: 'scm', startedAt: same });
      const late = await logAttempt({ endpoint: 'tax', startedAt: new Date(now - 5000).toISOString(), outcome: 'retryable', status: null, error: 'timeout' });
      await waitFor(async () => [twinA, twinB, late].every((id) => printed().includes(id)), { timeoutMs: 10_000, what: 'twins and the late attempt' });
      await new Promise((r) => setTimeout(r, 400)); // a few more polls: nothing may repeat
      expect(printed().sort()).toEqual([first, newer, twinA, twinB, late].sort());
      expect(out).not.toContain(BODY_MARK);
      proc.kill('SIGINT');
      expect(await exited).toBe(0);
    } finally {
      proc.kill('SIGKILL');
    }
  });
});
