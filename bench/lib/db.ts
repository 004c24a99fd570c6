/**
 * The benchmark's databases: each figure creates its own `bench_*` database
 * on the server named by DATABASE_URL, and every one created is dropped at the
 * end (WITH (FORCE)), also after a failure.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { migrate } from '../../listener/kernel/db.js';

export function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

/**
 * A small pool for the bench's own queries. Errors on idle connections are
 * ignored: cleanup drops databases WITH (FORCE), which ends those connections.
 */
export function benchPool(url: string, name: string, max = 2): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max, application_name: `bench ${name}` });
  pool.on('error', () => undefined);
  return pool;
}

/** A single connection for the bench (same error policy as benchPool); call connect() on it. */
export function benchClient(url: string, name: string): pg.Client {
  const c = new pg.Client({ connectionString: url, application_name: `bench ${name}` });
  c.on('error', () => undefined);
  return c;
}

export async function adminQuery<T extends pg.QueryResultRow = pg.QueryResultRow>(serverUrl: string, text: string, values?: unknown[]): Promise<pg.QueryResult<T>> {
  const c = benchClient(withDatabase(serverUrl, 'postgres'), 'admin');
  await c.connect();
  try {
    return await c.query<T>(text, values);
  } finally {
    await c.end();
  }
}

export interface BenchDb {
  name: string;
  url: string;
}

export class DbRegistry {
  private readonly created = new Set<string>();
  /** This run's suffix on every database it creates (another run's bench_* databases carry another). */
  readonly tag = randomBytes(3).toString('hex');

  constructor(readonly serverUrl: string) {}

  /** A new empty database bench_<label>_<run tag>. */
  async create(label: string): Promise<BenchDb> {
    const name = `bench_${label.replace(/[^a-z0-9]/gi, '_').toLowerCase()}_${this.tag}`;
    await adminQuery(this.serverUrl, `drop database if exists ${name} with (force)`);
    this.created.add(name);
    await adminQuery(this.serverUrl, `create database ${name}`);
    return { name, url: withDatabase(this.serverUrl, name) };
  }

  /** A new database copied from `template` (a database of this run nobody is connected to): a migrated schema in a fraction of the migration's time. */
  async createFrom(label: string, template: string): Promise<BenchDb> {
    const name = `bench_${label.replace(/[^a-z0-9]/gi, '_').toLowerCase()}_${this.tag}`;
    await adminQuery(this.serverUrl, `drop database if exists ${name} with (force)`);
    this.created.add(name);
    await adminQuery(this.serverUrl, `create database ${name} template ${template}`);
    return { name, url: withDatabase(this.serverUrl, name) };
  }

  /** Migrated templates of this run, by the examples installed in them (migrated once, copied for every figure). */
  private readonly templates = new Map<string, Promise<string>>();

  /**
   * A new database with the erp-cloud migrations applied, and the example ERPs named (e.g. reference-erp) installed.
   * The migrations run once per run and set of examples, into a template database nobody connects to afterwards;
   * every figure gets a copy of it (CREATE DATABASE … TEMPLATE: about 0.15 s instead of about 1 s of migrating).
   * pg_cron schedules nothing in bench databases (it runs in another database), so a copy is what a migration would make.
   */
  async createMigrated(label: string, examples: string[] = []): Promise<BenchDb> {
    return this.createFrom(label, await this.template(examples));
  }

  /**
   * The name of this run's migrated template with these examples installed, migrated on first use (the
   * runner asks for the usual ones at once, at the start, with graphile-worker's: templateOf). Copy it
   * with createFrom; never connect to it (CREATE DATABASE … TEMPLATE needs it unused).
   */
  template(examples: string[] = []): Promise<string> {
    const key = examples.join('+');
    return this.templateOf(key || 'plain', (url) => migrate(url, undefined, examples));
  }

  /**
   * The name of this run's template `key`, made by `make` (given its URL) on first use, e.g. a graphile-worker
   * schema (the delivery figure; the runner asks for it with the others at the start). Same rules as template().
   */
  templateOf(key: string, make: (url: string) => Promise<unknown>): Promise<string> {
    let tpl = this.templates.get(key);
    if (!tpl) {
      tpl = (async () => {
        const t = await this.create(`tpl_${key.replace(/[^a-z0-9]/gi, '_')}`);
        await make(t.url);
        return t.name;
      })();
      this.templates.set(key, tpl);
      tpl.catch(() => this.templates.delete(key));
    }
    return tpl;
  }

  async drop(name: string): Promise<void> {
    await adminQuery(this.serverUrl, `drop database if exists ${name} with (force)`);
    this.created.delete(name);
  }

  /** Drops every database this run created; reports (does not throw) what could not be dropped. */
  async dropAll(): Promise<string[]> {
    const failed: string[] = [];
    for (const name of [...this.created]) {
      try {
        await this.drop(name);
      } catch (err) {
        failed.push(`${name}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    return failed;
  }
}
