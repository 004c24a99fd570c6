/**
 * The package as an operator gets it: `npm pack`, then `npm install --offline --omit=dev` of the
 * tarball into an empty directory, with an empty npm cache and an unreachable registry. The
 * production dependencies travel inside the tarball (bundleDependencies), so nothing is fetched;
 * the installed `erp-cloud` then migrates, reports and listens against a database of its own, and
 * the systemd unit in deploy/ starts the listener with its own command line.
 *
 * The tarball is packed with --ignore-scripts: `make test` has just built dist/, and the prepack
 * script (clean + build) would rewrite dist/ under the other test files' running processes.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDb, waitFor, type TestDb } from './helpers/db.js';

const run = promisify(execFile);
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(path.join(repo, 'package.json'), 'utf8')) as {
  version: string; dependencies: Record<string, string>; devDependencies: Record<string, string>;
};
const lock = JSON.parse(readFileSync(path.join(repo, 'package-lock.json'), 'utf8')) as {
  packages: Record<string, { dev?: boolean }>;
};

/** Every package the lockfile marks dev-only (needed by tests, the simulators, the demo or bench, and nothing else). */
const devOnly = new Set(Object.entries(lock.packages)
  .filter(([key, e]) => key && e.dev)
  .map(([key]) => key.slice(key.lastIndexOf('node_modules/') + 'node_modules/'.length)));

/** The unit's prefix, which the test's empty directory stands in for. */
const UNIT_PREFIX = '/opt/erp-cloud/';

interface PackResult {
  filename: string;
  size: number;
  entryCount: number;
  files: Array<{ path: string }>;
  bundled: string[];
}

let tmp: string;
let app: string; // the empty directory the package is installed into (the unit's /opt/erp-cloud)
let bin: string;
let packed: PackResult;
let db: TestDb;
const children: ChildProcess[] = [];

/** A shell with no npm state of its own: the node running this test first on PATH, a private empty cache, no registry. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    PATH: `${path.dirname(process.execPath)}${path.delimiter}${process.env.PATH ?? ''}`,
    HOME: path.join(tmp, 'home'),
    npm_config_cache: path.join(tmp, 'npm-cache'),
    npm_config_registry: 'http://127.0.0.1:9/', // discard port: any registry request fails at once
    npm_config_update_notifier: 'false',
    npm_config_audit: 'false',
    npm_config_fund: 'false',
    ...extra,
  };
}

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return run(bin, args, { env: cleanEnv({ DATABASE_URL: db.url }) }).then(
    (r) => ({ code: 0, ...r }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

/** Package names under a node_modules directory, nested ones included. */
function installedPackages(dir: string, out = new Set<string>()): Set<string> {
  if (!existsSync(dir)) return out;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    const names = e.name.startsWith('@') ? readdirSync(path.join(dir, e.name)).map((n) => `${e.name}/${n}`) : [e.name];
    for (const name of names) {
      out.add(name);
      installedPackages(path.join(dir, name, 'node_modules'), out);
    }
  }
  return out;
}

/** `erp-cloud listen` as its own process; resolves once its row is in cloud.listener. */
async function startListening(command: string, args: string[], env: NodeJS.ProcessEnv) {
  let output = '';
  const proc = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  proc.stdout!.on('data', (d) => (output += d));
  proc.stderr!.on('data', (d) => (output += d));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const row = await Promise.race([
    waitFor(async () => (await db.pool.query<{ worker_id: string }>('select worker_id from cloud.listener where pid = $1', [proc.pid])).rows[0],
      { timeoutMs: 30_000, what: 'the listener to register' }),
    exited.then((code) => { throw new Error(`listener exited with ${code} before it registered:\n${output}`); }),
  ]);
  return { proc, row, exited, output: () => output };
}

async function stopWithSigterm(l: Awaited<ReturnType<typeof startListening>>): Promise<number | null> {
  l.proc.kill('SIGTERM');
  const code = await Promise.race([l.exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 30_000))]);
  if (code === 'hung') throw new Error(`listener did not stop within 30 s of SIGTERM:\n${l.output()}`);
  return code;
}

/** The [Service] section of a unit file: key → values, in order (Environment= may repeat). */
function serviceSection(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = header[1]!;
      continue;
    }
    const eq = line.indexOf('=');
    if (section !== 'Service' || eq < 0) continue;
    const key = line.slice(0, eq).trim();
    out.set(key, [...(out.get(key) ?? []), line.slice(eq + 1).trim()]);
  }
  return out;
}

/** KEY=value lines as systemd's EnvironmentFile= reads them (no quotes in ours). */
function envFile(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const eq = line.indexOf('=');
    out[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return out;
}

beforeAll(async () => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-package-'));
  mkdirSync(path.join(tmp, 'home'));
  mkdirSync(path.join(tmp, 'out'));
  app = path.join(tmp, 'app');
  mkdirSync(app);
  const { stdout } = await run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', path.join(tmp, 'out')], {
    cwd: repo, env: cleanEnv(), maxBuffer: 64 << 20,
  });
  packed = (JSON.parse(stdout) as PackResult[])[0]!;
  await run('npm', ['install', '--offline', '--omit=dev', '--no-package-lock', path.join(tmp, 'out', packed.filename)], {
    cwd: app, env: cleanEnv(), maxBuffer: 64 << 20,
  });
  bin = path.join(app, 'node_modules', '.bin', 'erp-cloud');
  db = await createTestDb('package', { template: null });
}, 240_000);

afterAll(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await db?.drop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

describe('the packed package', () => {
  it('holds the built listener, the migrations, the current schema files, the READMEs and the service unit, and no sources, tests, bench or simulators', () => {
    const own = packed.files.map((f) => f.path).filter((p) => !p.startsWith('node_modules/'));
    expect(own).toEqual(expect.arrayContaining([
      'package.json', 'README.md', 'dist/listener/cli.js', 'dist/listener/delivery/worker.js',
      'deploy/erp-cloud-listener.service', 'deploy/listener.env.example',
    ]));
    const migrations = readdirSync(path.join(repo, 'sql', 'migrations')).filter((f) => f.endsWith('.sql'));
    expect(own.filter((p) => p.startsWith('sql/migrations/')).sort()).toEqual(migrations.map((f) => `sql/migrations/${f}`).sort());
    const schemas = readdirSync(path.join(repo, 'sql', 'schema')).filter((f) => f.endsWith('.sql'));
    expect(own.filter((p) => p.startsWith('sql/schema/')).sort()).toEqual(schemas.map((f) => `sql/schema/${f}`).sort());
    expect(own).toContain('sql/README.md');
    const stray = own.filter((p) => !/^(package\.json|README\.md|dist\/listener\/.+\.js|sql\/(migrations|schema)\/[^/]+\.sql|sql\/README\.md|deploy\/[^/]+)$/.test(p));
    expect(stray).toEqual([]);
    expect(own.filter((p) => /^dist\/listener\/sim\/|demo-rp/.test(p))).toEqual([]);
  });

  it('carries its production dependencies inside and no dev-only one, so it installs with no registry and no npm cache', () => {
    expect([...packed.bundled].sort()).toEqual(expect.arrayContaining(Object.keys(pkg.dependencies).sort()));
    expect(packed.bundled.filter((name) => devOnly.has(name))).toEqual([]);
  });

  it('puts erp-cloud on the PATH of the directory it is installed into, and prints its version', async () => {
    expect(existsSync(bin)).toBe(true);
    const { stdout } = await run(bin, ['--version'], { env: cleanEnv() });
    expect(stdout.trim()).toBe(pkg.version);
  });

  it('installs no dev-only package: not the test runner, the simulators\' pdf-lib, nor the demo relying party\'s packages', () => {
    const installed = installedPackages(path.join(app, 'node_modules'));
    expect(installed.has('erp-cloud')).toBe(true);
    for (const name of Object.keys(pkg.dependencies)) expect(installed.has(name), name).toBe(true);
    for (const name of ['pdf-lib', 'openid-client', 'tough-cookie', 'vitest', 'typescript', 'graphile-worker', 'playwright-core']) {
      expect(installed.has(name), name).toBe(false);
    }
    expect([...installed].filter((name) => devOnly.has(name))).toEqual([]);
    expect(existsSync(path.join(app, 'node_modules', 'erp-cloud', 'dist', 'listener', 'sim'))).toBe(false);
  });

  it('migrates an empty database, then reports status and a doctor\'s verdict with no failure', async () => {
    const first = await cli('migrate');
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/migration\(s\) applied/);
    const again = await cli('migrate');
    expect(again.stdout).toMatch(/already current/);

    const status = await cli('status', '--json');
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toEqual({ endpoints: [], parked_keys: [] });

    const doctor = await cli('doctor', '--json');
    expect(doctor.code, doctor.stdout + doctor.stderr).toBe(0);
    const report = JSON.parse(doctor.stdout) as { status: string; checks: Array<{ check: string; status: string }> };
    expect(report.status).not.toBe('fail');
    expect(report.checks.find((c) => c.check === 'migrations current')?.status).toBe('ok');
  });

  it('listens without the simulators or their packages: registers in cloud.listener and exits 0 on SIGTERM', async () => {
    await cli('migrate');
    const l = await startListening(bin, ['listen'], cleanEnv({ DATABASE_URL: db.url, ERP_CLOUD_HTTP_PORT: '0' }));
    expect(await stopWithSigterm(l)).toBe(0);
    expect((await db.pool.query('select 1 from cloud.listener where worker_id = $1', [l.row.worker_id])).rowCount).toBe(0);
  });

  it('says that a development verb is left out of a production install, and exits 1', async () => {
    const sim = await cli('sim', '--port', '0');
    expect(sim.code).toBe(1);
    expect(sim.stderr).toMatch(/`erp-cloud sim` is a development verb.*npm ci/);
  });
});

describe('the systemd unit (deploy/erp-cloud-listener.service)', () => {
  const unit = serviceSection(readFileSync(path.join(repo, 'deploy', 'erp-cloud-listener.service'), 'utf8'));
  const example = envFile(readFileSync(path.join(repo, 'deploy', 'listener.env.example'), 'utf8'));

  it('runs as its own user, restarts on failure, and gives a SIGTERM longer than the listener\'s shutdown', () => {
    expect(unit.get('User')).toEqual(['erp-cloud']);
    expect(unit.get('EnvironmentFile')).toEqual(['/etc/erp-cloud/listener.env']);
    expect(unit.get('Restart')).toEqual(['on-failure']);
    expect(unit.get('KillSignal')).toEqual(['SIGTERM']);
    for (const key of ['NoNewPrivileges', 'PrivateTmp']) expect(unit.get(key), key).toEqual(['yes']);
    expect(unit.get('ProtectSystem')).toEqual(['strict']);
    // the worker: grace for in-flight calls, then up to max(2 s, grace / 2) to record results
    const graceS = Number(example.ERP_CLOUD_SHUTDOWN_GRACE_MS ?? 10_000) / 1000;
    expect(Number(/^(\d+)s?$/.exec(unit.get('TimeoutStopSec')?.[0] ?? '')?.[1])).toBeGreaterThan(graceS + Math.max(2, graceS / 2));
  });

  it('starts the installed listener with its own ExecStart line and environment: it registers, and SIGTERM stops it with exit 0', async () => {
    await run(bin, ['migrate'], { env: cleanEnv({ DATABASE_URL: db.url }) });
    const [execStart] = unit.get('ExecStart') ?? [];
    const argv = execStart!.split(/\s+/);
    expect(argv[0]!.startsWith(UNIT_PREFIX)).toBe(true);
    const command = path.join(app, argv[0]!.slice(UNIT_PREFIX.length));

    // systemd's environment: its default PATH (with this node, which the README asks to have on it),
    // the unit's Environment= lines, then the env file; this site's values replace the example's
    const environment = Object.fromEntries((unit.get('Environment') ?? []).flatMap((v) => v.split(/\s+/)).map((kv) => kv.split('=', 2) as [string, string]));
    const keyFile = path.join(tmp, 'vault.key');
    writeFileSync(keyFile, randomBytes(24).toString('base64url'), { mode: 0o600 });
    const pgpass = path.join(tmp, 'pgpass');
    writeFileSync(pgpass, '', { mode: 0o600 });
    expect(Object.keys(example)).toEqual(expect.arrayContaining(['DATABASE_URL', 'ERP_CLOUD_VAULT_KEY_FILE']));
    const env = {
      PATH: `${path.dirname(process.execPath)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
      ...environment,
      ...example,
      DATABASE_URL: db.url,
      PGPASSFILE: pgpass,
      ERP_CLOUD_VAULT_KEY_FILE: keyFile,
      ERP_CLOUD_HTTP_PORT: '0',
    };
    const l = await startListening(command, argv.slice(1), env);
    expect(l.output()).not.toMatch(/"level":(50|60)/); // no error or fatal line
    expect(await stopWithSigterm(l)).toBe(0);
    expect((await db.pool.query('select 1 from cloud.listener where worker_id = $1', [l.row.worker_id])).rowCount).toBe(0);
  });
});
