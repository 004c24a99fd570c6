/**
 * What the listener gives an adapter while it builds a request: secrets by
 * name, auxiliary HTTP calls under the endpoint's egress guard, and access
 * tokens cached in cloud.provider_token (shared by every listener, obtained
 * once at a time across all of them).
 */
import type pg from 'pg';
import type { EgressPolicy } from './egress.js';
import { SqlState } from '../kernel/errors.js';
import { auxFetch, isRequestError } from './http.js';
import { AdapterError, type ProviderContext } from '../providers/index.js';
import { sql } from './queries.js';

interface Cached { token: string; expiresAt: number }

/** Tokens this process has seen, so most calls skip the database; keyed by endpoint and token key. */
const memo = new Map<string, Cached>();
const pending = new Map<string, Promise<string>>();

export interface ContextOptions {
  pool: pg.Pool;
  endpoint: string;
  policy: EgressPolicy;
  timeoutMs: number;
  secret(name: string): Promise<string>;
  signal?: AbortSignal;
  /** How long to wait for another listener obtaining the same token (default 30 s). */
  tokenLockTimeoutMs?: number;
}

const DEFAULT_MARGIN_MS = 5 * 60_000;
/** How long a listener waits for another one that is obtaining the same token. */
const DEFAULT_TOKEN_LOCK_TIMEOUT_MS = 30_000;

export function providerContext(o: ContextOptions): ProviderContext {
  return {
    secret: o.secret,
    fetch: (req) => auxFetch(req, o.policy, o.timeoutMs, o.signal),
    token(key, obtain, opts) {
      const margin = opts?.marginMs ?? DEFAULT_MARGIN_MS;
      const id = `${o.endpoint}\u0000${key}`;
      const hit = memo.get(id);
      if (hit && hit.expiresAt - margin > Date.now()) return Promise.resolve(hit.token);
      let p = pending.get(id);
      if (!p) {
        const lockTimeoutMs = o.tokenLockTimeoutMs ?? DEFAULT_TOKEN_LOCK_TIMEOUT_MS;
        p = cachedOrObtain(o.pool, o.endpoint, key, margin, lockTimeoutMs, obtain)
          .then((c) => { memo.set(id, c); return c.token; }, (err: unknown) => { throw asAttemptError(err, lockTimeoutMs); })
          .finally(() => pending.delete(id));
        pending.set(id, p);
      }
      return p;
    },
    async forgetToken(key, token) {
      const id = `${o.endpoint}\u0000${key}`;
      if (memo.get(id)?.token === token) memo.delete(id);
      await o.pool.query(sql.forgetProviderToken, [o.endpoint, key, token]);
    },
  };
}

async function cachedOrObtain(pool: pg.Pool, endpoint: string, key: string, marginMs: number, lockTimeoutMs: number,
  obtain: () => Promise<{ token: string; expiresAt: Date }>): Promise<Cached> {
  const valid = async (q: pg.Pool | pg.PoolClient): Promise<Cached | null> => {
    const { rows } = await q.query<{ token: string | null; expires_at: Date | null }>(sql.validProviderToken, [endpoint, key, marginMs]);
    const r = rows[0];
    return r?.token && r.expires_at ? { token: r.token, expiresAt: r.expires_at.getTime() } : null;
  };
  const found = await valid(pool);
  if (found) return found;
  // a session-level lock on a connection of its own: no transaction stays open during the token call;
  // a listener that waits longer than lockTimeoutMs for another one gives up this attempt (it is retried)
  const client = await pool.connect();
  let broken = false;
  try {
    await client.query(`set lock_timeout = ${Math.max(1, Math.round(lockTimeoutMs))}`);
    try {
      await client.query(sql.lockProviderToken, [endpoint, key]);
    } finally {
      await client.query('reset lock_timeout');
    }
    try {
      // another listener may have obtained one while this one waited for the lock
      const meanwhile = await valid(client);
      if (meanwhile) return meanwhile;
      const fresh = await obtain();
      await client.query(sql.storeProviderToken, [endpoint, key, fresh.token, fresh.expiresAt]);
      return { token: fresh.token, expiresAt: fresh.expiresAt.getTime() };
    } finally {
      // a connection that cannot say unlock is closed, which releases the lock with the session
      await client.query(sql.unlockProviderToken, [endpoint, key]).catch(() => { broken = true; });
    }
  } finally {
    client.release(broken);
  }
}

/**
 * The token cache's own failures (database unreachable, another listener holding
 * the lock too long) are worth a retry; the adapter's errors, the egress guard's
 * and network errors from the token call keep their own meaning.
 */
function asAttemptError(err: unknown, lockTimeoutMs: number): unknown {
  if (err instanceof AdapterError || isRequestError(err) || (err as { code?: string }).code === 'EEGRESS') return err;
  const code = (err as { code?: string }).code;
  const message = err instanceof Error ? err.message : String(err);
  if (code === SqlState.invalidProviderToken) return new AdapterError('permanent', 'invalid_token', message);
  if (code === '55P03') return new AdapterError('retryable', 'token_cache_unavailable', `another listener has been obtaining this token for over ${lockTimeoutMs} ms`);
  if (typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code)) return new AdapterError('retryable', 'token_cache_unavailable', `token cache: ${message}`);
  return new AdapterError('retryable', 'token_unavailable', `obtaining the token: ${message}`);
}

/** Forgets every token this process remembers (tests that reset the database use it). */
export function clearTokenMemo(): void {
  memo.clear();
}
