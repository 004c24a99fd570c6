/** Doctor, 4. the vault key: does the key this environment would give the listener open the vault? */
import { createHash } from 'node:crypto';
import type pg from 'pg';
import { loadVaultKey } from '../../kernel/vault.js';
import { errText, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

/**
 * Does the master key this environment would give the listener open the vault?
 * The key is loaded the way the listener loads it (kernel/vault.ts: ERP_CLOUD_VAULT_KEY
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
