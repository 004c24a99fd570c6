/** A database of its own for each test file, cloned from the migrated template. */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { inject } from 'vitest';

export interface TestDb {
  name: string;
  url: string;
  pool: pg.Pool;
  drop(): Promise<void>;
}

export function urlFor(db: string): string {
  const u = new URL(inject('serverUrl'));
  u.pathname = `/${db}`;
  return u.toString();
}

async function admin<T>(fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: urlFor('postgres') });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

export async function createTestDb(label: string, opts: { template?: string | null } = {}): Promise<TestDb> {
  const name = `t_${label.replace(/[^a-z0-9]/gi, '_').toLowerCase().slice(0, 30)}_${randomBytes(4).toString('hex')}`;
  const template = opts.template === undefined ? inject('templateDb') : opts.template;
  await admin(async (c) => {
    for (let i = 0; ; i++) {
      try {
        await c.query(template ? `create database ${name} template ${template}` : `create database ${name}`);
        return;
      } catch (err) {
        // another file cloning the template at the same moment: try again shortly
        if ((err as { code?: string }).code !== '55006' || i > 50) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  });
  const url = urlFor(name);
  const pool = new pg.Pool({ connectionString: url, max: 6 });
  pool.on('error', () => undefined);
  return {
    name,
    url,
    pool,
    async drop() {
      await pool.end();
      await admin(async (c) => {
        // pool.end() resolves before its sockets have closed, and a file's other pools end the same way: a session
        // still closing when FORCE terminates it reaches a pool that no longer listens for errors, as an uncaught
        // 57P01. Let closing sessions leave first (bounded: 100 × 20 ms), then force whatever is still there.
        for (let i = 0; i < 100; i++) {
          const { rows } = await c.query(`select count(*)::int as n from pg_stat_activity where datname = $1`, [name]);
          if (rows[0].n === 0) break;
          await new Promise((r) => setTimeout(r, 20));
        }
        await c.query(`drop database if exists ${name} with (force)`);
      });
    },
  };
}

/**
 * Runs fn in one transaction and commits it (or rolls it back when `commit` is
 * false); an error in fn rolls back and is thrown on. Given a pool, the
 * transaction runs on a client of its own; given a client, on that client.
 */
export async function inTransaction<T>(db: pg.Pool | pg.ClientBase, fn: (c: pg.ClientBase) => Promise<T>, commit = true): Promise<T> {
  const pooled = db instanceof pg.Pool ? await db.connect() : null;
  const c: pg.ClientBase = pooled ?? (db as pg.ClientBase);
  try {
    await c.query('begin');
    const out = await fn(c);
    await c.query(commit ? 'commit' : 'rollback');
    return out;
  } catch (err) {
    await c.query('rollback').catch(() => undefined);
    throw err;
  } finally {
    pooled?.release();
  }
}

/** Runs fn in one transaction that is always rolled back: to look as a role or a supplier, or to try what must not stay. */
export function rolledBack<T>(db: pg.Pool | pg.ClientBase, fn: (c: pg.ClientBase) => Promise<T>): Promise<T> {
  return inTransaction(db, fn, false);
}

/** The SQLSTATE a promise rejects with (undefined when it resolves). */
export async function sqlstateOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return (err as { code?: string }).code ?? 'no-sqlstate';
  }
}

export async function waitFor<T>(fn: () => Promise<T | undefined | null | false>, opts: { timeoutMs?: number; intervalMs?: number; what?: string } = {}): Promise<T> {
  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${opts.what ?? 'condition'}`);
    await new Promise((r) => setTimeout(r, opts.intervalMs ?? 50));
  }
}

export async function statusCounts(pool: pg.Pool): Promise<Record<string, number>> {
  const { rows } = await pool.query<{ status: string; n: string }>('select status, count(*) n from cloud.outbox group by status');
  return Object.fromEntries(rows.map((r) => [r.status, Number(r.n)]));
}
