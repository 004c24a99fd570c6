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
 * the same allowlist code (delivery/egress.ts) and Node's default trust store (plus
 * NODE_EXTRA_CA_CERTS, which the listener honours too).
 *
 * One module per topic of checks, run in this order: database.ts, cron.ts
 * (who runs maintenance), grants.ts, vault.ts, network.ts (the endpoints),
 * sso.ts; lines.ts is the line they all return and how lines are printed.
 */
import pg from 'pg';
import { checkMaintenance } from './cron.js';
import { checkDatabase, databaseTarget } from './database.js';
import { checkRolesAndGrants } from './grants.js';
import { errText, line, type CheckLine } from './lines.js';
import { checkEndpoints } from './network.js';
import { checkSso } from './sso.js';
import { checkVaultKey } from './vault.js';

export { formatChecks, overallStatus, type CheckLine, type CheckStatus } from './lines.js';
export { vaultKeyId } from './vault.js';

export interface DoctorOptions {
  /** Where ERP_CLOUD_VAULT_KEY / ERP_CLOUD_VAULT_KEY_FILE come from (process.env). */
  env?: NodeJS.ProcessEnv;
  /** Limit for each DNS lookup, TCP connect and TLS handshake. */
  networkTimeoutMs?: number;
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
