/**
 * The box may be shared: once a second while the bench runs, look for client
 * backends on the server that are not this run's (another session's tests,
 * another bench run) and note server restarts, attributed to the figure
 * running at the time.
 * A figure measured while others used the server is disturbed.
 */
import type pg from 'pg';
import { benchClient, withDatabase } from './db.js';
import { errText, sleep } from './util.js';

export interface ActivityReport {
  samples: number;
  /** Samples in which some client backend was not the bench's. */
  with_foreign_activity: number;
  foreign_databases: string[];
  /** Samples that could not be taken (server down or restarting). */
  failed_samples: number;
}

export class ForeignActivityMonitor {
  private label = 'start';
  private readonly byLabel = new Map<string, ActivityReport & { dbs: Set<string> }>();
  private stopped = false;
  private loop: Promise<void> | null = null;
  /** Ends the wait between two samples: stop() does not sit out the rest of an interval. */
  private wake: () => void = () => undefined;
  private readonly woken = new Promise<void>((resolve) => (this.wake = resolve));
  private client: pg.Client | null = null;
  startedAt: string | null = null;

  /** `runTag`: the suffix of this run's databases (DbRegistry.tag); everything else on the server is foreign. */
  constructor(
    private readonly serverUrl: string,
    private readonly runTag: string,
    private readonly intervalMs = 1000,
    private readonly maxMs = 3_600_000,
  ) {}

  /** Attributes the following samples to `label` (a figure name). */
  mark(label: string): void {
    this.label = label;
  }

  start(): void {
    this.loop = (async () => {
      const deadline = Date.now() + this.maxMs;
      for (let i = 0; i < Math.ceil(this.maxMs / this.intervalMs) && !this.stopped && Date.now() < deadline; i++) {
        await this.sample();
        await Promise.race([sleep(this.intervalMs), this.woken]);
      }
    })();
  }

  private entry() {
    let e = this.byLabel.get(this.label);
    if (!e) {
      e = { samples: 0, with_foreign_activity: 0, foreign_databases: [], failed_samples: 0, dbs: new Set() };
      this.byLabel.set(this.label, e);
    }
    return e;
  }

  private async sample(): Promise<void> {
    const e = this.entry();
    try {
      if (!this.client) {
        const c = benchClient(withDatabase(this.serverUrl, 'postgres'), 'monitor');
        await c.connect();
        this.client = c;
        const { rows } = await c.query<{ t: Date }>('select pg_postmaster_start_time() t');
        this.startedAt ??= rows[0]!.t.toISOString();
      }
      // foreign: any session but this run's own, which work in its bench_*_<tag> databases
      // (or briefly in 'postgres' as 'bench admin'); another bench run counts as foreign
      const { rows } = await this.client.query<{ datname: string }>(
        `select distinct datname from pg_stat_activity
          where backend_type = 'client backend' and pid <> pg_backend_pid() and datname is not null
            and datname not like ('bench\\_%\\_' || $1)
            and not (datname = 'postgres' and application_name = 'bench admin')`,
        [this.runTag],
      );
      e.samples++;
      if (rows.length > 0) e.with_foreign_activity++;
      for (const r of rows) e.dbs.add(r.datname);
    } catch (err) {
      e.failed_samples++;
      e.dbs.add(`(sample failed: ${errText(err).slice(0, 80)})`);
      await this.client?.end().catch(() => undefined);
      this.client = null;
    }
  }

  /** Ends the sampling; per label what was seen, and the server's start time at the first and the last sample. */
  async stop(): Promise<{ by_figure: Record<string, ActivityReport>; postmaster_start_first: string | null; postmaster_start_last: string | null }> {
    this.stopped = true;
    this.wake();
    await this.loop;
    let last: string | null = null;
    try {
      if (this.client) last = (await this.client.query<{ t: Date }>('select pg_postmaster_start_time() t')).rows[0]!.t.toISOString();
    } catch {
      /* server gone: last stays null */
    }
    await this.client?.end().catch(() => undefined);
    this.client = null;
    const byFigure: Record<string, ActivityReport> = {};
    for (const [k, { dbs, ...r }] of this.byLabel) byFigure[k] = { ...r, foreign_databases: [...dbs].slice(0, 20) };
    return { by_figure: byFigure, postmaster_start_first: this.startedAt, postmaster_start_last: last };
  }
}
