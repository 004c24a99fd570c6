#!/usr/bin/env node
/**
 * erp-cloud: the command line. Verbs: migrate, listen, status, replay, sim, vault, doctor, tail, sso, console.
 * -c/--connection defaults to DATABASE_URL; any failure exits with code 1.
 *
 * Each verb imports its own modules when it runs, so `listen`, `migrate`, `status` and `doctor` never
 * load the simulators, the demo relying party or their packages (pdf-lib, openid-client, tough-cookie),
 * which a production install (`npm install --omit=dev`) leaves out.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import type { Command } from 'commander';
import type pg from 'pg';
import { ConfigError, loadConfig, redactUrl } from './kernel/config.js';
import { describePgError } from './kernel/errors.js';

class UsageError extends Error {}

/** The version in the package.json next to the code: ../../ from dist/listener/ (built), ../ from listener/ (vitest). */
function packageVersion(): string {
  for (const rel of ['../../package.json', '../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'erp-cloud' && pkg.version) return pkg.version;
    } catch {
      // not this one
    }
  }
  return 'unknown';
}

/**
 * Loads the modules of a development verb (simulators, demo relying party). A production install
 * leaves out their code and packages; say so instead of printing a module-resolution stack.
 */
async function devModule<T>(verb: string, load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ERR_MODULE_NOT_FOUND') throw err;
    const missing = /Cannot find (?:package|module) '([^']+)'/.exec((err as Error).message)?.[1] ?? 'a module';
    const what = missing.includes('/dist/') ? missing.slice(missing.lastIndexOf('/dist/') + 1) : missing;
    throw new UsageError(`\`erp-cloud ${verb}\` is a development verb (demos and tests) and this installation leaves it out (missing: ${what}); `
      + 'run it from a source checkout after `npm ci`');
  }
}

function connectionOf(cmd: Command): string {
  const url = cmd.optsWithGlobals().connection as string | undefined;
  if (!url) throw new UsageError('no database: pass -c/--connection postgres://… or set DATABASE_URL');
  return url;
}

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const { default: pg } = await import('pg');
  const client = new pg.Client({ connectionString: url, application_name: 'erp-cloud cli' });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/**
 * The listener (the `listen` verb). It loads only what a delivery needs: the /healthz and /metrics
 * server and prom-client when ERP_CLOUD_HTTP_PORT is on, the inbound receivers when
 * ERP_CLOUD_INBOUND_PORT is; no zod, no commander (listenOnly), nothing of sso/ or console/.
 */
async function listen(url: string): Promise<void> {
  const config = loadConfig(process.env, { DATABASE_URL: url });
  (await import('./kernel/pg-load.js')).loadPg();
  const withOps = config.ERP_CLOUD_HTTP_PORT >= 0;
  const withInbound = config.ERP_CLOUD_INBOUND_PORT >= 0;
  const [{ createPool, waitForDatabase }, { closeAgents }, { createLogger }, { Worker }, ops, inbound] = await Promise.all([
    import('./kernel/db.js'), import('./delivery/egress.js'), import('./kernel/logger.js'), import('./delivery/worker.js'),
    withOps ? Promise.all([import('./delivery/metrics.js'), import('./ops/status-server.js')]) : null,
    // the receivers register themselves with the inbound server
    withInbound ? import('./inbound/inbound-server.js').then(async (m) => (await import('./inbound/routes.js'), m)) : null,
  ]);
  const log = createLogger(config.ERP_CLOUD_LOG_LEVEL);
  // one stop signal for the whole run: while waiting for the database it ends the wait (exit 0)
  const stop = new AbortController();
  const shutdown = (signal: string) => {
    if (stop.signal.aborted) return;
    log.info({ signal }, 'shutdown requested');
    stop.abort();
  };
  const onTerm = () => shutdown('SIGTERM');
  const onInt = () => shutdown('SIGINT');
  process.once('SIGTERM', onTerm);
  process.once('SIGINT', onInt);
  try {
    if (!(await waitForDatabase(config.DATABASE_URL, { maxWaitMs: config.ERP_CLOUD_START_WAIT_MS, log, signal: stop.signal }))) {
      log.info('stopped before the database was reachable');
      return;
    }
    const pool = createPool(config.DATABASE_URL, config.ERP_CLOUD_POOL_SIZE, log);
    const metrics = ops ? ops[0].createMetrics(pool) : undefined;
    const worker = new Worker(config, pool, log, metrics);
    await worker.start();
    const opsServer = ops && metrics ? await ops[1].startOpsServer(config.ERP_CLOUD_HTTP_HOST, config.ERP_CLOUD_HTTP_PORT, worker, metrics) : null;
    if (opsServer) log.info({ url: opsServer.url }, 'health and metrics');
    const inboundServer = inbound
      ? await inbound.startInboundServer(config.ERP_CLOUD_INBOUND_HOST, config.ERP_CLOUD_INBOUND_PORT, {
        pool, log, env: process.env, secret: (name) => worker.secret(name),
      })
      : null;
    if (inboundServer) log.info({ url: inboundServer.url }, 'inbound receivers');
    if (!stop.signal.aborted) await new Promise<void>((resolve) => stop.signal.addEventListener('abort', () => resolve(), { once: true }));
    await inboundServer?.close();
    await worker.stop();
    await opsServer?.close();
    await pool.end();
    closeAgents();
  } finally {
    process.off('SIGTERM', onTerm);
    process.off('SIGINT', onInt);
  }
}

// System_Vault. Values come from stdin, never argv (argv shows in `ps`); the
// master key from ERP_CLOUD_VAULT_KEY / _FILE; both go to SQL as $n only.
async function readSecretFromStdin(): Promise<string> {
  if (process.stdin.isTTY) {
    throw new UsageError('give the value on standard input, e.g.: read -rs V && printf %s "$V" | erp-cloud vault put NAME');
  }
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, ''); // what `echo` adds is not part of the value
}

async function vaultKeyFor(cmd: Command): Promise<{ url: string; key: string }> {
  const url = connectionOf(cmd);
  const { loadVaultKey } = await import('./kernel/vault.js');
  return { url, key: loadVaultKey(loadConfig(process.env, { DATABASE_URL: url })) };
}

/**
 * The command line of a plain `erp-cloud listen` (with at most -c/--connection before the verb): the
 * database URL to listen on, or null for any other command line, which commander reads. A listener's
 * start then skips commander (about 15 ms of CPU at every start).
 */
function listenOnly(args: string[]): string | null {
  let url: string | undefined = process.env.DATABASE_URL || undefined;
  let rest = args;
  if ((rest[0] === '-c' || rest[0] === '--connection') && rest.length >= 2 && !rest[1]!.startsWith('-')) {
    url = rest[1];
    rest = rest.slice(2);
  } else if (rest[0]?.startsWith('--connection=')) {
    url = rest[0].slice('--connection='.length);
    rest = rest.slice(1);
  }
  if (rest.length !== 1 || rest[0] !== 'listen') return null;
  if (!url) throw new UsageError('no database: pass -c/--connection postgres://… or set DATABASE_URL');
  return url;
}

/** Every verb, on commander (loaded only when the command line is not a plain `listen`). */
function commandLine({ Command, InvalidArgumentError, Option }: typeof import('commander')): Command {
  /** A commander argParser for an integer option in [min, max]. */
  function intArg(name: string, min: number, max: number) {
    return (v: string): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${name} must be an integer from ${min} to ${max}`);
      return n;
    };
  }

  const program = new Command()
    .name('erp-cloud')
    .description('Deliver ERP outbox messages to cloud APIs (e-invoicing, supplier collaboration).')
    .version(packageVersion(), '-V, --version', 'print the version')
    .addOption(new Option('-c, --connection <url>', 'PostgreSQL connection URL').env('DATABASE_URL'))
    .showHelpAfterError()
    .configureOutput({ outputError: (s, write) => write(s) });

  program
    .command('migrate')
    .description('apply the numbered SQL migrations (safe to run twice, or concurrently); a database without erp-cloud is installed from the baseline')
    .option('--with-example <name>', 'then install the example ERP sql/examples/<name> (repeatable; e.g. acme)',
      (v: string, prev: string[]) => [...prev, v], [] as string[])
    .option('--no-baseline', 'run every migration file one by one, also on a database without erp-cloud (instead of sql/baseline)')
    .action(async (opts: { withExample: string[]; baseline: boolean }, cmd: Command) => {
      const url = connectionOf(cmd);
      const { migrate } = await import('./kernel/db.js');
      const applied = await migrate(url, (m) => console.log(m), opts.withExample, { baseline: opts.baseline });
      console.log(applied.length ? `migrated ${redactUrl(url)}: ${applied.length} migration(s) applied` : `migrated ${redactUrl(url)}: already current`);
    });

  program
    .command('listen')
    .description('run the listener: claim messages, call the clouds, record results (config from ERP_CLOUD_* variables)')
    .action((_opts, cmd: Command) => listen(connectionOf(cmd)));

  program
    .command('status')
    .description('print messages by endpoint and status, and parked ordering keys')
    .option('--json', 'print JSON instead of a table')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const [{ sql }, { formatTable }] = await Promise.all([import('./delivery/queries.js'), import('./kernel/format.js')]);
      await withClient(connectionOf(cmd), async (c) => {
        const endpoints = (await c.query(sql.endpointStatus)).rows;
        const parked = (await c.query(sql.parkedKeys)).rows;
        if (opts.json) {
          console.log(JSON.stringify({ endpoints, parked_keys: parked }, null, 2));
          return;
        }
        console.log(formatTable(endpoints, [
          'endpoint', 'enabled', 'pending', 'due', 'in_flight', 'failed', 'dead', 'parked_keys', 'oldest_pending_age_s',
          'rate_per_s', 'circuit_state', 'paused_until', 'last_error',
        ]));
        for (const e of endpoints.filter((x) => x.circuit_state !== 'closed' || x.paused_until)) {
          console.log(`\n${e.endpoint}: ${[e.circuit_reason && `circuit ${e.circuit_state} since ${e.circuit_opened_at?.toISOString?.() ?? e.circuit_opened_at}: ${e.circuit_reason}`, e.pause_reason].filter(Boolean).join('; ')}`);
        }
        if (parked.length) {
          console.log('\nparked ordering keys (replay or skip the head message):');
          console.log(formatTable(parked, ['endpoint', 'ordering_key', 'head_request_id', 'status', 'waiting', 'last_error']));
        }
      });
    });

  program
    .command('replay')
    .description('send a failed or dead message again with the same request_id (audited)')
    .argument('[request_id]', 'the message to replay')
    .option('--dead', 'replay every dead message of --endpoint')
    .option('--endpoint <name>', 'endpoint whose dead letters to replay (with --dead)')
    .requiredOption('--reason <text>', 'why (kept in cloud.replay_audit)')
    .option('--actor <name>', 'who (kept in cloud.replay_audit)', os.userInfo().username)
    .action(async (requestId: string | undefined, opts: { dead?: boolean; endpoint?: string; reason: string; actor: string }, cmd: Command) => {
      if (opts.dead ? !opts.endpoint || requestId : !requestId) {
        throw new UsageError('give either a request_id, or --dead --endpoint NAME');
      }
      const { sql } = await import('./delivery/queries.js');
      await withClient(connectionOf(cmd), async (c) => {
        if (opts.dead) {
          const { rows } = await c.query(sql.replayDead, [opts.endpoint, opts.reason, opts.actor]);
          console.log(`replayed ${rows[0].replayed} dead message(s) of ${opts.endpoint}`);
        } else {
          await c.query(sql.replayOne, [requestId, opts.reason, opts.actor]);
          console.log(`replayed ${requestId}`);
        }
      });
    });

  program
    .command('sim')
    .description('development: run a cloud simulator on 127.0.0.1 for demos and tests (prints {"sim", "url"} as JSON)')
    .option('--cloud <name>', 'which cloud (webhook, or one a later module registers)', 'webhook')
    .option('--port <n>', 'port (0 = any free port)', '8089')
    .option('--host <addr>', 'address to bind', '127.0.0.1')
    .action(async (opts: { cloud: string; port: string; host: string }) => {
      const { startSimCloud } = await devModule('sim', () => import('./sim/clouds.js'));
      const sim = await startSimCloud(opts.cloud, { port: Number(opts.port), host: opts.host });
      console.log(JSON.stringify({ sim: opts.cloud, url: sim.url }));
      await new Promise<void>((resolve) => {
        process.once('SIGTERM', resolve);
        process.once('SIGINT', resolve);
      });
      await sim.close();
    });

  program
    .command('doctor')
    .description('check the database, maintenance, grants, the vault key and every endpoint (DNS, allowlist, TCP, TLS); exit 1 on any failure')
    .option('--json', 'print JSON instead of a table')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const { formatChecks, overallStatus, runDoctor } = await import('./ops/doctor/index.js');
      const lines = await runDoctor(connectionOf(cmd));
      const status = overallStatus(lines);
      console.log(opts.json ? JSON.stringify({ status, checks: lines }, null, 2) : formatChecks(lines));
      if (status === 'fail') process.exitCode = 1;
    });

  program
    .command('tail')
    .description('follow cloud.log: one line per attempt (never bodies or headers); Ctrl-C stops')
    .addOption(new Option('-n, --lines <n>', 'start with the last N attempts').default(20).argParser(intArg('--lines', 0, 100_000)))
    .addOption(new Option('--interval <ms>', 'poll interval').default(500).argParser(intArg('--interval', 50, 3_600_000)))
    .option('--endpoint <name>', 'only this endpoint')
    .option('--request-id <uuid>', 'only this message', (v: string) => {
      if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(v)) throw new InvalidArgumentError('--request-id must be a UUID');
      return v;
    })
    .option('--json', 'print JSON lines')
    .option('--once', 'print the last N attempts and exit')
    .action(async (opts: { lines: number; interval: number; endpoint?: string; requestId?: string; json?: boolean; once?: boolean }, cmd: Command) => {
      const { tailLog } = await import('./ops/tail.js');
      const stop = new AbortController();
      process.once('SIGINT', () => stop.abort());
      process.once('SIGTERM', () => stop.abort());
      await withClient(connectionOf(cmd), (c) => tailLog(c, {
        lines: opts.lines, intervalMs: opts.interval, endpoint: opts.endpoint ?? null, requestId: opts.requestId ?? null,
        json: opts.json ?? false, once: opts.once ?? false, signal: stop.signal,
      }));
    });

  const vault = program.command('vault').description('System_Vault: named secrets encrypted in the database (master key from ERP_CLOUD_VAULT_KEY or ERP_CLOUD_VAULT_KEY_FILE)');

  vault
    .command('put')
    .description('create a secret or replace its value; the value is read from standard input')
    .argument('<name>', 'secret name, e.g. nuonuo.app_secret')
    .option('--description <text>', 'what it is and where it comes from')
    .action(async (name: string, opts: { description?: string }, cmd: Command) => {
      const { url, key } = await vaultKeyFor(cmd);
      const { vaultSql } = await import('./kernel/vault.js');
      const value = await readSecretFromStdin();
      await withClient(url, async (c) => {
        const { rows } = await c.query(vaultSql.put, [name, value, key, opts.description ?? null]);
        console.log(`stored ${name} (version ${rows[0].version}, key id ${rows[0].key_id})`);
      });
    });

  vault
    .command('rotate')
    .description('give an existing secret a new value, read from standard input')
    .argument('<name>', 'secret name')
    .action(async (name: string, _opts, cmd: Command) => {
      const { url, key } = await vaultKeyFor(cmd);
      const { vaultSql } = await import('./kernel/vault.js');
      const value = await readSecretFromStdin();
      await withClient(url, async (c) => {
        const { rows } = await c.query(vaultSql.rotate, [name, value, key]);
        console.log(`rotated ${name} (version ${rows[0].version}); listeners pick it up within ERP_CLOUD_SECRET_TTL_MS`);
      });
    });

  vault
    .command('list')
    .description('names, versions and dates of the secrets (never values)')
    .option('--json', 'print JSON instead of a table')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const [{ vaultSql }, { formatTable }] = await Promise.all([import('./kernel/vault.js'), import('./kernel/format.js')]);
      await withClient(connectionOf(cmd), async (c) => {
        const { rows } = await c.query(vaultSql.list);
        console.log(opts.json ? JSON.stringify(rows, null, 2) : formatTable(rows, ['name', 'version', 'key_id', 'created_at', 'rotated_at', 'rekeyed_at', 'description']));
      });
    });

  vault
    .command('rekey')
    .description('re-encrypt every secret under the key in ERP_CLOUD_VAULT_NEW_KEY (all or nothing)')
    .action(async (_opts, cmd: Command) => {
      const { url, key } = await vaultKeyFor(cmd);
      const { checkVaultKey, vaultSql } = await import('./kernel/vault.js');
      const newKey = checkVaultKey('ERP_CLOUD_VAULT_NEW_KEY', process.env.ERP_CLOUD_VAULT_NEW_KEY);
      await withClient(url, async (c) => {
        const { rows } = await c.query(vaultSql.rekey, [key, newKey]);
        console.log(`re-encrypted ${rows[0].rekeyed} secret(s) under the new key: give every listener the new ERP_CLOUD_VAULT_KEY and restart it`);
      });
    });

  // Single sign-on: erp-cloud as the OpenID Provider (listener/sso/). oidc-provider
  // and openid-client are imported only by the commands that use them, so the
  // other verbs start as fast as before (and without oidc-provider's runtime notice);
  // demo-rp (openid-client, tough-cookie) is a development verb.
  const sso = program.command('sso').description('single sign-on: the OpenID Provider the procurement platform trusts (config from ERP_CLOUD_SSO_* variables)');

  sso
    .command('serve')
    .description('run the OpenID Provider (prints {"sso", "issuer", "url"} as JSON once it listens)')
    .action(async (_opts, cmd: Command) => {
      const [{ loadSsoConfig }, { loadVaultKey }, { createPool }, { createLogger }] = await Promise.all([
        import('./sso/config.js'), import('./kernel/vault.js'), import('./kernel/db.js'), import('./kernel/logger.js'),
      ]);
      const config = loadSsoConfig(process.env, { DATABASE_URL: connectionOf(cmd) });
      const masterKey = loadVaultKey(config);
      const { startSsoServer } = await import('./sso/sso-server.js');
      const log = createLogger(config.ERP_CLOUD_LOG_LEVEL, 'erp-cloud-sso');
      const pool = createPool(config.DATABASE_URL, config.ERP_CLOUD_SSO_POOL_SIZE, log);
      const server = await startSsoServer({ config, pool, log, masterKey });
      console.log(JSON.stringify({ sso: 'serve', issuer: server.issuer, url: server.url }));
      await new Promise<void>((resolve) => {
        process.once('SIGTERM', resolve);
        process.once('SIGINT', resolve);
      });
      await server.close();
      await pool.end();
    });

  sso
    .command('rotate-keys')
    .description('schedule a new ID-token signing key: published now, signing after --lead; the current key stays verifiable for --token-lifetime (or the servers\' recorded ID-token lifetime, if longer) after that. Run it with the provider\'s database login (erp_cloud_sso) and vault key')
    .addOption(new Option('--lead <seconds>', 'how long the new key is published before it signs (ERP_CLOUD_SSO_KEY_PUBLISH_LEAD_S)').argParser(intArg('--lead', 0, 30 * 86_400)))
    .addOption(new Option('--token-lifetime <seconds>', 'the longest ID-token lifetime (ERP_CLOUD_SSO_ID_TOKEN_TTL_S)').argParser(intArg('--token-lifetime', 0, 86_400)))
    .action(async (opts: { lead?: number; tokenLifetime?: number }, cmd: Command) => {
      const url = connectionOf(cmd);
      const [{ loadSsoConfig }, { rotateSigningKey }, { loadVaultKey }, { createPool }] = await Promise.all([
        import('./sso/config.js'), import('./sso/keys.js'), import('./kernel/vault.js'), import('./kernel/db.js'),
      ]);
      const env = { ERP_CLOUD_SSO_ISSUER: 'http://unused.invalid', ...process.env };
      const config = loadSsoConfig(env, { DATABASE_URL: url });
      const pool = createPool(url, 2);
      try {
        const key = await rotateSigningKey(pool, loadVaultKey(config), {
          publishLeadS: opts.lead ?? config.ERP_CLOUD_SSO_KEY_PUBLISH_LEAD_S,
          tokenLifetimeS: opts.tokenLifetime ?? config.ERP_CLOUD_SSO_ID_TOKEN_TTL_S,
        });
        console.log(`new signing key ${key.kid}: published now, signs from ${key.signs_from.toISOString()}; providers pick it up within ERP_CLOUD_SSO_KEY_CHECK_MS`);
      } catch (err) {
        if ((err as { code?: string }).code === '42501') {
          throw new Error('rotate-keys needs the provider\'s database login (a member of erp_cloud_sso): a signing key changes only together with its private half in the vault');
        }
        throw err;
      } finally {
        await pool.end();
      }
    });

  sso
    .command('keys')
    .description('the signing keys in the JWKS now: state (published, signing, verifying) and schedule')
    .option('--json', 'print JSON instead of a table')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const { formatTable } = await import('./kernel/format.js');
      await withClient(connectionOf(cmd), async (c) => {
        const { rows } = await c.query('select kid, state, signs_from, signs_until, verify_until from sso.signing_key_status');
        console.log(opts.json ? JSON.stringify(rows, null, 2) : formatTable(rows, ['kid', 'state', 'signs_from', 'signs_until', 'verify_until']));
      });
    });

  const collect = (v: string, prev: string[] = []) => [...prev, v];
  sso
    .command('register-client')
    .description('register a relying party (sso.register_client); prints its secret once')
    .argument('<client_id>', 'e.g. procurement')
    .requiredOption('--name <text>', 'display name')
    .requiredOption('--redirect-uri <uri>', 'callback URL (repeat for several)', collect)
    .option('--post-logout-uri <uri>', 'allowed post-logout redirect (repeatable)', collect)
    .option('--login-uri <uri>', 'the platform\'s login-initiation URL (needed for jumps)')
    .option('--json', 'print {"client_id", "client_secret"} as JSON')
    .action(async (clientId: string, opts: { name: string; redirectUri: string[]; postLogoutUri?: string[]; loginUri?: string; json?: boolean }, cmd: Command) => {
      await withClient(connectionOf(cmd), async (c) => {
        const { rows } = await c.query('select * from sso.register_client($1, $2, $3, $4, $5)',
          [clientId, opts.name, opts.redirectUri, opts.postLogoutUri ?? [], opts.loginUri ?? null]);
        if (opts.json) console.log(JSON.stringify(rows[0]));
        else console.log(`registered ${clientId}; its secret (shown once, store it in the platform): ${rows[0].client_secret}`);
      });
    });

  sso
    .command('demo-rp')
    .description('development: a built-in test relying party (openid-client); with --jump, completes one jump and prints the verified ID-token claims')
    .requiredOption('--issuer <url>', 'the provider\'s issuer URL')
    .requiredOption('--client-id <id>', 'the registered client id (secret from ERP_CLOUD_SSO_DEMO_CLIENT_SECRET)')
    .addOption(new Option('--port <n>', 'port (the one registered in the redirect URI)').default(0).argParser(intArg('--port', 0, 65535)))
    .option('--jump <url>', 'a jump URL from sso.issue_jump_ticket: follow it like a browser, print the result and exit')
    .action(async (opts: { issuer: string; clientId: string; port: number; jump?: string }) => {
      const { Browser, completeJump, startDemoRp } = await devModule('sso demo-rp', () => import('./sim/demo-rp.js'));
      const secret = process.env.ERP_CLOUD_SSO_DEMO_CLIENT_SECRET;
      if (!secret) throw new UsageError('set ERP_CLOUD_SSO_DEMO_CLIENT_SECRET to the client\'s secret');
      const rp = await startDemoRp({ issuer: opts.issuer, clientId: opts.clientId, clientSecret: secret, port: opts.port });
      try {
        if (opts.jump) {
          const result = await completeJump(opts.jump, new Browser());
          console.log(JSON.stringify(result.ok ? { ok: true, claims: result.claims, userinfo: result.userinfo } : result, null, 2));
          if (!result.ok) process.exitCode = 1;
          return;
        }
        console.log(JSON.stringify({ rp: 'demo', login: rp.loginUrl, callback: rp.callbackUrl, logout: rp.logoutUrl }));
        await new Promise<void>((resolve) => {
          process.once('SIGTERM', resolve);
          process.once('SIGINT', resolve);
        });
      } finally {
        await rp.close();
      }
    });

  // The operations console (listener/console/): pages over the same SQL views and functions, signed in
  // through erp-cloud's own OpenID Provider; every action authorised again in the database.
  const consoleCommand = program.command('console').description('the operations console: overview, documents, what needs attention, procurement, settings (config from ERP_CLOUD_CONSOLE_* variables)');

  consoleCommand
    .command('serve', { isDefault: true })
    .description('serve the console (prints {"console", "url"} as JSON once it listens); Ctrl-C stops')
    .action(async (_opts, cmd: Command) => {
      const [{ loadConsoleConfig }, { createPool }, { createLogger }, { startConsoleServer }] = await Promise.all([
        import('./console/config.js'), import('./kernel/db.js'), import('./kernel/logger.js'), import('./console/console-server.js'),
      ]);
      const config = loadConsoleConfig(process.env, { DATABASE_URL: connectionOf(cmd) });
      const log = createLogger(config.ERP_CLOUD_LOG_LEVEL, 'erp-cloud-console');
      const pool = createPool(config.DATABASE_URL, config.ERP_CLOUD_CONSOLE_POOL_SIZE, log);
      const server = await startConsoleServer({ config, pool, log });
      console.log(JSON.stringify({ console: 'serve', url: config.ERP_CLOUD_CONSOLE_URL, listening: server.url }));
      await new Promise<void>((resolve) => {
        process.once('SIGTERM', resolve);
        process.once('SIGINT', resolve);
      });
      await server.close();
      await pool.end();
    });

  consoleCommand
    .command('link')
    .description('a one-time sign-in link to the console for an ERP user, as the ERP\'s "open the console" button makes it (sso.issue_jump_ticket)')
    .argument('<login>', 'the ERP login (sso.app_user.login)')
    .option('--client-id <id>', 'the console\'s SSO client id', 'console')
    .addOption(new Option('--ttl <seconds>', 'how long the link may wait to be opened').default(600).argParser(intArg('--ttl', 1, 600)))
    .action(async (login: string, opts: { clientId: string; ttl: number }, cmd: Command) => {
      await withClient(connectionOf(cmd), async (c) => {
        const { rows } = await c.query('select sso.issue_jump_ticket($1, $2, null, make_interval(secs => $3)) as url', [login, opts.clientId, opts.ttl]);
        console.log(rows[0].url);
      });
    });
  return program;
}

try {
  const url = listenOnly(process.argv.slice(2));
  if (url !== null) await listen(url);
  else await commandLine(await import('commander')).parseAsync(process.argv);
} catch (err) {
  if (err instanceof ConfigError || err instanceof UsageError) console.error(`erp-cloud: ${err.message}`);
  else console.error(`erp-cloud: ${describePgError(err)}`);
  process.exit(1);
}
