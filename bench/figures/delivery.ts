/**
 * Figure 1: delivery throughput. N messages are enqueued up front in a fresh
 * migrated database; then 1 or 2 `erp-cloud listen` processes start and the
 * clock runs from their spawn until every outbox row is `sent` (each attempt
 * also wrote its cloud.log row). The same N jobs, pre-added to a fresh
 * graphile-worker database, are run by graphile-worker in a child process that
 * makes the same HTTP call (attemptDelivery) to the same sink; its clock runs
 * from spawn until the job table is empty. Both systems include their process
 * start-up in the time, and both databases are ANALYZEd after the load.
 * Each run also records the CPU seconds its worker process(es), its database
 * backends (the bench's own connections excluded) and the sink used, per message.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runMigrations, Logger } from 'graphile-worker';
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { benchPool } from '../lib/db.js';
import { cpuMark, cpuSince, type CpuScope, type CpuUse } from '../lib/cpu.js';
import { listenerSettings, spawnListener, stopListener, type ListenerProc } from '../lib/listeners.js';
import { enqueueBenchMessages, putSinkEndpoint } from '../lib/outbox.js';
import { forkChild, stopChild } from '../lib/procs.js';
import { epochMs, progress, round, waitFor } from '../lib/util.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHUNK = 5000;
/** ANALYZE both queues after loading them (BENCH_NO_ANALYZE=1 skips it, to see plans without statistics). */
const ANALYZE = process.env.BENCH_NO_ANALYZE !== '1';
const GW = { concurrency: 10, localQueue: { size: 100 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 };

export interface RunResult {
  system: string;
  messages: number;
  seconds: number;
  per_s: number;
  /** From the first to the last request the sink saw (excludes process start-up and the final report). */
  sink_window_per_s: number | null;
  sink_requests: number;
  sink_duplicates: number;
  log_rows?: number;
  /** Where the CPU went during the run (Linux /proc; null elsewhere). */
  cpu: CpuUse;
  config: Record<string, unknown>;
}

/** The CPU a run's system took: its worker process(es), its database backends (not the bench's own), the sink. */
function cpuScope(ctx: BenchContext, pool: pg.Pool, db: string, workerPids: Array<number | undefined>): CpuScope {
  return { pool, db, workerPids, sinkPid: ctx.sink.child.proc.pid };
}

export interface DeliveryResult {
  delivery_per_s: number;
  graphile_worker_per_s: number;
  delivery_ratio: number;
  delivery_best_config: Record<string, unknown>;
  runs: RunResult[];
}

async function sinkRates(ctx: BenchContext, n: number) {
  const s = await ctx.sink.stats();
  const window = s.firstAt !== null && s.lastAt !== null && s.lastAt > s.firstAt ? (s.lastAt - s.firstAt) / 1000 : null;
  return { sink_requests: s.count, sink_duplicates: s.duplicates, sink_window_per_s: window ? round(n / window, 1) : null };
}

/** Waits (bounded) until the sink has seen `n` requests: no database load while the systems work. */
async function waitSink(ctx: BenchContext, n: number, timeoutMs: number, alive: () => void): Promise<void> {
  await waitFor(
    async () => {
      alive();
      return (await ctx.sink.stats()).count >= n;
    },
    { timeoutMs, intervalMs: 50, what: `${n} requests at the sink` },
  );
}

async function erpCloudRun(ctx: BenchContext, n: number, listeners: number, timeoutMs: number): Promise<RunResult> {
  const db = await ctx.dbs.createMigrated(`deliv_erp${listeners}`);
  const pool = benchPool(db.url, 'delivery');
  const procs: ListenerProc[] = [];
  try {
    await putSinkEndpoint(pool, ctx.sink.url);
    await enqueueBenchMessages(pool, n, CHUNK);
    if (ANALYZE) await pool.query('analyze cloud.outbox');
    await ctx.sink.reset();

    const mark = await cpuMark(cpuScope(ctx, pool, db.name, []));
    const t0 = epochMs();
    for (let i = 0; i < listeners; i++) procs.push(spawnListener(db.url, `bench-deliv-${i + 1}`));
    const alive = () => {
      for (const p of procs) if (p.proc.exitCode !== null) throw new Error(`listener exited (${p.proc.exitCode}): ${p.output()}`);
    };
    await waitSink(ctx, n, timeoutMs, alive);
    await waitFor(
      async () => {
        alive();
        const { rows } = await pool.query<{ status: string; n: number }>(
          `select status, count(*)::int n from cloud.outbox where status in ('pending', 'in_flight', 'failed', 'dead') group by status`,
        );
        const bad = rows.filter((r) => r.status === 'failed' || r.status === 'dead');
        if (bad.length) throw new Error(`messages failed: ${JSON.stringify(rows)}`);
        return rows.length === 0;
      },
      { timeoutMs: 30_000, intervalMs: 20, what: 'every outbox row to be sent' },
    );
    const seconds = (epochMs() - t0) / 1000;
    const cpu = await cpuSince(cpuScope(ctx, pool, db.name, procs.map((p) => p.proc.pid)), mark, n);
    const logRows = (await pool.query<{ n: number }>('select count(*)::int n from cloud.log')).rows[0]!.n;
    const result: RunResult = {
      system: `erp-cloud x${listeners}`,
      messages: n,
      seconds: round(seconds, 3),
      per_s: round(n / seconds, 1),
      ...(await sinkRates(ctx, n)),
      log_rows: logRows,
      cpu,
      config: { ...listenerSettings(listeners), analyzed_after_load: ANALYZE },
    };
    progress(`  ${result.system}: ${n} msgs in ${result.seconds}s = ${result.per_s}/s (sink window ${result.sink_window_per_s}/s) cpu ${JSON.stringify(cpu)}`);
    return result;
  } finally {
    await Promise.all(procs.map((p) => stopListener(p)));
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}

async function graphileRun(ctx: BenchContext, n: number, timeoutMs: number): Promise<RunResult> {
  const db = await ctx.dbs.create('deliv_gw');
  const pool = benchPool(db.url, 'delivery');
  const quiet = new Logger(() => () => undefined);
  const child = { current: null as ReturnType<typeof forkChild> | null };
  try {
    await runMigrations({ connectionString: db.url, logger: quiet });
    for (let from = 1; from <= n; from += CHUNK) {
      await pool.query(
        `select count(*) from graphile_worker.add_jobs(array(
           select row('deliver', json_build_object('i', g, 'note', 'benchmark message'), null, null, null, null, null, null)::graphile_worker.job_spec
             from generate_series($1::int, $2::int) g))`,
        [from, Math.min(n, from + CHUNK - 1)],
      );
    }
    if (ANALYZE) await pool.query('analyze graphile_worker._private_jobs');
    await ctx.sink.reset();

    const mark = await cpuMark(cpuScope(ctx, pool, db.name, []));
    const t0 = epochMs();
    const c = forkChild('graphile-worker', path.join(here, '..', 'graphile-child.js'), {
      env: {
        PATH: process.env.PATH,
        DATABASE_URL: db.url,
        SINK_URL: ctx.sink.url,
        GW_CONCURRENCY: String(GW.concurrency),
        GW_LOCAL_QUEUE: String(GW.localQueue.size),
        GW_COMPLETE_DELAY: String(GW.completeJobBatchDelay),
      },
    });
    child.current = c;
    const alive = () => {
      if (c.proc.exitCode !== null) throw new Error(`graphile-worker child exited (${c.proc.exitCode}): ${c.output()}`);
    };
    await waitSink(ctx, n, timeoutMs, alive);
    await waitFor(
      async () => {
        alive();
        const { rows } = await pool.query<{ left: number; errors: number }>(
          `select count(*)::int "left", count(*) filter (where last_error is not null)::int errors from graphile_worker._private_jobs`,
        );
        if ((rows[0]?.errors ?? 0) > 0) throw new Error(`graphile-worker jobs failed: ${rows[0]!.errors}`);
        return rows[0]?.left === 0;
      },
      { timeoutMs: 30_000, intervalMs: 20, what: 'graphile-worker to finish every job' },
    );
    const seconds = (epochMs() - t0) / 1000;
    const cpu = await cpuSince(cpuScope(ctx, pool, db.name, [c.proc.pid]), mark, n);
    const result: RunResult = {
      system: 'graphile-worker',
      messages: n,
      seconds: round(seconds, 3),
      per_s: round(n / seconds, 1),
      ...(await sinkRates(ctx, n)),
      cpu,
      config: { ...GW, analyzed_after_load: ANALYZE, version: '0.17', task: 'attemptDelivery (listener/delivery/http.ts), provider webhook' },
    };
    progress(`  ${result.system}: ${n} jobs in ${result.seconds}s = ${result.per_s}/s (sink window ${result.sink_window_per_s}/s) cpu ${JSON.stringify(cpu)}`);
    return result;
  } finally {
    if (child.current) {
      const c = child.current;
      await stopChild(c, 10_000, () => c.proc.send({ cmd: 'stop' }));
    }
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}

export async function deliveryFigure(ctx: BenchContext): Promise<DeliveryResult> {
  const n = ctx.quick ? 4000 : 20_000;
  const timeoutMs = ctx.quick ? 60_000 : 180_000;
  progress(`figure 1: delivery throughput, ${n} messages each`);
  // interleaved so that machine drift hits both systems alike
  const runs: RunResult[] = [];
  runs.push(await erpCloudRun(ctx, n, 1, timeoutMs));
  runs.push(await graphileRun(ctx, n, timeoutMs));
  runs.push(await erpCloudRun(ctx, n, 2, timeoutMs));
  const erp = runs.filter((r) => r.system.startsWith('erp-cloud'));
  const best = erp.reduce((a, b) => (b.per_s > a.per_s ? b : a));
  const gw = runs.find((r) => r.system === 'graphile-worker')!;
  return {
    delivery_per_s: best.per_s,
    graphile_worker_per_s: gw.per_s,
    delivery_ratio: round(best.per_s / gw.per_s, 3),
    delivery_best_config: best.config,
    runs,
  };
}
