/**
 * Figure 1: delivery throughput, and what it costs in CPU, against
 * graphile-worker at equal process counts, each system at its best concurrency.
 *
 * For each process count (1 and 2) and each concurrency of a short sweep
 * (erp-cloud: ERP_CLOUD_CONCURRENCY per listener; graphile-worker: its
 * `concurrency` per process), interleaved so that machine drift hits both
 * alike: N messages are enqueued up front in a fresh database copied from a
 * migrated template; then the processes start and the clock runs from their
 * spawn until every message is done — for erp-cloud every attempt reported
 * (its full cloud.log row written with the completion); for graphile-worker its job
 * table empty. Both make the very same HTTP call (attemptDelivery) to the same
 * sink; both include process start-up; both queues are ANALYZEd after the load.
 *
 * Every run records the CPU seconds of the worker process(es) and of the
 * database's backends (bench/lib/cpu.ts; the bench's own connections and the
 * sink excluded), and so messages per CPU second of the whole system.
 * Headlines: per process count, each system's best rate and their ratio; the
 * messages per CPU second of each system at its best single-process run, over
 * the whole run (process start-up included, which weighs on a short quick run)
 * and steady (from the first request the sink saw: start-up left out for both).
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runMigrations, Logger } from 'graphile-worker';
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { benchPool, type DbRegistry } from '../lib/db.js';
import { cpuMark, cpuSince, procCpuSeconds, type CpuMark, type CpuScope, type CpuUse } from '../lib/cpu.js';
import { listenerSettings, profileArgs, spawnListener, stopListener, type ListenerProc } from '../lib/listeners.js';
import { enqueueBenchMessages, putSinkEndpoint } from '../lib/outbox.js';
import { phase } from '../lib/phases.js';
import { forkChild, stopChild, type Child } from '../lib/procs.js';
import { epochMs, progress, round, textTable, waitFor } from '../lib/util.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The graphile-worker child; BENCH_GRAPHILE_CHILD=path (an A/B aid, with BENCH_LISTENER_CLI) runs another build's. */
const graphileChild = process.env.BENCH_GRAPHILE_CHILD || path.join(here, '..', 'graphile-child.js');
/** The delivery ceiling's child: the same HTTP call from memory, no database (bench/ceiling-child.ts). */
const ceilingChild = path.join(here, '..', 'ceiling-child.js');
const CHUNK = 5000;
/** ANALYZE both queues after loading them (BENCH_NO_ANALYZE=1 skips it, to see plans without statistics). */
const ANALYZE = process.env.BENCH_NO_ANALYZE !== '1';
/** ANALYZE of every table, partitioned table and materialized view outside the system schemas, in one statement. */
const ANALYZE_USER_TABLES = `do $$ begin
  execute (select 'analyze ' || string_agg(format('%I.%I', n.nspname, c.relname), ', ')
             from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('r', 'p', 'm') and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_toast');
end $$`;
/** graphile-worker's settings besides concurrency: a local queue, and batched completion without delay. */
const GW = { localQueue: { size: 100 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 };

export interface RunResult {
  system: string;
  processes: number;
  /** Per process. */
  concurrency: number;
  messages: number;
  seconds: number;
  per_s: number;
  /** From the first to the last request the sink saw (excludes process start-up and the final report). */
  sink_window_per_s: number | null;
  sink_requests: number;
  sink_duplicates: number;
  log_rows?: number;
  /** Where the CPU went during the run (Linux /proc; null elsewhere), process start-up included. */
  cpu: CpuUse;
  /** The same from the first request the sink saw to the end: per message without start-up. */
  cpu_steady: CpuUse;
  config: Record<string, unknown>;
}

/**
 * The ceiling at one process count: the same HTTP call made from memory by that many processes (no
 * database, no queue), at its best concurrency of the sweep. A queue only adds work to the call, so no
 * system measured here can deliver faster on this machine; what each system spends per message above
 * the ceiling's CPU is what its queue costs (worker and database together).
 */
export interface CeilingRow {
  processes: number;
  /** null in the quick run, which leaves the ceiling out. */
  best_per_s: number | null;
  best_concurrency: number | null;
  /** The ceiling process(es)' CPU per message, steady (from the first request at the sink). */
  worker_ms_per_msg_steady: number | null;
  erp_cloud_of_ceiling: number | null;
  graphile_worker_of_ceiling: number | null;
  /** The goal (1.3 × graphile-worker) as a share of the ceiling: above 1, no queue reaches it here. */
  goal_of_ceiling: number | null;
  /** Steady CPU per message above the ceiling's: the queue's own cost (worker + database), each system at its best run. */
  erp_cloud_queue_ms_per_msg: number | null;
  graphile_worker_queue_ms_per_msg: number | null;
}

export interface SweepRow {
  processes: number;
  erp_cloud_best_per_s: number;
  erp_cloud_best_concurrency: number;
  graphile_worker_best_per_s: number;
  graphile_worker_best_concurrency: number;
  ratio: number;
  erp_cloud_msgs_per_cpu_s: number | null;
  erp_cloud_msgs_per_cpu_s_steady: number | null;
  graphile_worker_msgs_per_cpu_s_steady: number | null;
  cpu_ratio_steady: number | null;
  graphile_worker_msgs_per_cpu_s: number | null;
  cpu_ratio: number | null;
}

export interface DeliveryResult {
  delivery_per_s: number;
  graphile_worker_per_s: number;
  delivery_ratio: number;
  delivery_ratio_x1: number;
  delivery_ratio_x2: number;
  msgs_per_cpu_s: number | null;
  graphile_worker_msgs_per_cpu_s: number | null;
  msgs_per_cpu_s_ratio: number | null;
  msgs_per_cpu_s_steady_ratio: number | null;
  delivery_best_config: Record<string, unknown>;
  /** The ceiling's headline at one process: 1.3 × graphile-worker's best ÷ the ceiling's best (null in the quick run). */
  delivery_goal_of_ceiling_x1: number | null;
  delivery_goal_of_ceiling_x2: number | null;
  delivery: {
    sweep: SweepRow[]; sweep_text: string; ceiling: CeilingRow[]; ceiling_concurrencies: number[];
    erp_cloud_concurrencies: number[]; graphile_worker_concurrencies: number[]; messages_per_run: number;
  };
  runs: RunResult[];
}

/** The CPU a run's system took: its worker process(es), its database backends (not the bench's own), the sink. */
function cpuScope(ctx: BenchContext, pool: pg.Pool, db: string, workerPids: Array<number | undefined>): CpuScope {
  return { pool, db, workerPids, sinkPid: ctx.sink.child.proc.pid };
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

interface Templates { erp: string; gw: string }

/**
 * A second CPU mark once the sink has seen the first request: from there on the processes only
 * deliver (start-up — loading modules, connecting, migrations check — is behind them), so CPU
 * since this mark per message delivered since it is the steady per-message cost. Both systems pay
 * their start-up in the whole-run figure; this one leaves it out for both.
 */
async function steadyMark(ctx: BenchContext, scope: CpuScope, alive: () => void): Promise<{ mark: CpuMark; delivered: number }> {
  const delivered = await firstRequests(ctx, alive);
  return { mark: await cpuMark(scope), delivered };
}

/** Waits (bounded) for the sink's first request; returns how many it has seen by then. */
function firstRequests(ctx: BenchContext, alive: () => void): Promise<number> {
  return waitFor(
    async () => {
      alive();
      return (await ctx.sink.stats()).count;
    },
    { timeoutMs: 60_000, intervalMs: 5, what: 'the first request at the sink' },
  );
}

async function erpCloudRun(ctx: BenchContext, tpl: Templates, n: number, listeners: number, concurrency: number, timeoutMs: number): Promise<RunResult> {
  phase('erp-cloud set-up');
  const db = await ctx.dbs.createFrom(`deliv_erp${listeners}_c${concurrency}`, tpl.erp);
  const pool = benchPool(db.url, 'delivery');
  const procs: ListenerProc[] = [];
  const env = { ERP_CLOUD_CONCURRENCY: String(concurrency) };
  try {
    await putSinkEndpoint(pool, ctx.sink.url);
    await enqueueBenchMessages(pool, n, CHUNK);
    // every user table of the fresh database, whatever the queue's storage is (not the system catalogs:
    // a database-wide ANALYZE spent 0.1-0.25 s of each run's set-up on them, statistics no delivery query is planned with)
    if (ANALYZE) await pool.query(ANALYZE_USER_TABLES);
    await ctx.sink.reset();

    phase('erp-cloud spawn to first request');
    const mark = await cpuMark(cpuScope(ctx, pool, db.name, []));
    const t0 = epochMs();
    for (let i = 0; i < listeners; i++) procs.push(spawnListener(db.url, `bench-deliv-${i + 1}`, env));
    const alive = () => {
      for (const p of procs) if (p.proc.exitCode !== null) throw new Error(`listener exited (${p.proc.exitCode}): ${p.output()}`);
    };
    const steady = await steadyMark(ctx, cpuScope(ctx, pool, db.name, procs.map((p) => p.proc.pid)), alive);
    phase('erp-cloud delivering');
    await waitSink(ctx, n, timeoutMs, alive);
    // done when every attempt is reported: its cloud.log row is written in the transaction that
    // completes the message (read from the log, so that this works whatever the queue's storage is)
    let logRows = 0;
    await waitFor(
      async () => {
        alive();
        const { rows } = await pool.query<{ ok: number; bad: number }>(
          `select count(*) filter (where outcome = 'ok')::int ok, count(*) filter (where outcome <> 'ok')::int bad from cloud.log`,
        );
        if (rows[0]!.bad > 0) throw new Error(`${rows[0]!.bad} attempts failed`);
        logRows = rows[0]!.ok;
        return logRows >= n;
      },
      { timeoutMs: 30_000, intervalMs: 20, what: 'every attempt to be reported (its cloud.log row)' },
    );
    const seconds = (epochMs() - t0) / 1000;
    const cpu = await cpuSince(cpuScope(ctx, pool, db.name, procs.map((p) => p.proc.pid)), mark, n);
    const cpuSteady = await cpuSince(cpuScope(ctx, pool, db.name, procs.map((p) => p.proc.pid)), steady.mark, n - steady.delivered);
    const result: RunResult = {
      system: `erp-cloud x${listeners}`,
      processes: listeners,
      concurrency,
      messages: n,
      seconds: round(seconds, 3),
      per_s: round(n / seconds, 1),
      ...(await sinkRates(ctx, n)),
      log_rows: logRows,
      cpu,
      cpu_steady: cpuSteady,
      config: { ...listenerSettings(listeners, env), analyzed_after_load: ANALYZE },
    };
    progress(`  ${result.system} c${concurrency}: ${result.per_s}/s (sink window ${result.sink_window_per_s}/s), ${cpu.msgs_per_cpu_s} msgs per CPU s (worker ${cpu.worker_ms_per_msg} + db ${cpu.db_ms_per_msg} ms/msg); steady ${cpuSteady.msgs_per_cpu_s} (${cpuSteady.worker_ms_per_msg} + ${cpuSteady.db_ms_per_msg})`);
    return result;
  } finally {
    phase('teardown');
    await Promise.all(procs.map((p) => stopListener(p)));
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}

async function graphileRun(ctx: BenchContext, tpl: Templates, n: number, processes: number, concurrency: number, timeoutMs: number): Promise<RunResult> {
  phase('graphile-worker set-up');
  const db = await ctx.dbs.createFrom(`deliv_gw${processes}_c${concurrency}`, tpl.gw);
  const pool = benchPool(db.url, 'delivery');
  const children: Child[] = [];
  try {
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

    phase('graphile-worker spawn to first request');
    const mark = await cpuMark(cpuScope(ctx, pool, db.name, []));
    const t0 = epochMs();
    for (let i = 0; i < processes; i++) {
      children.push(forkChild(`graphile-worker ${i + 1}`, graphileChild, {
        execArgv: profileArgs(`graphile-worker-${i + 1}`),
        env: {
          PATH: process.env.PATH,
          DATABASE_URL: db.url,
          SINK_URL: ctx.sink.url,
          GW_CONCURRENCY: String(concurrency),
          GW_LOCAL_QUEUE: String(GW.localQueue.size),
          GW_COMPLETE_DELAY: String(GW.completeJobBatchDelay),
        },
      }));
    }
    const alive = () => {
      for (const c of children) if (c.proc.exitCode !== null) throw new Error(`graphile-worker child exited (${c.proc.exitCode}): ${c.output()}`);
    };
    const steady = await steadyMark(ctx, cpuScope(ctx, pool, db.name, children.map((c) => c.proc.pid)), alive);
    phase('graphile-worker delivering');
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
    const cpu = await cpuSince(cpuScope(ctx, pool, db.name, children.map((c) => c.proc.pid)), mark, n);
    const cpuSteady = await cpuSince(cpuScope(ctx, pool, db.name, children.map((c) => c.proc.pid)), steady.mark, n - steady.delivered);
    const result: RunResult = {
      system: `graphile-worker x${processes}`,
      processes,
      concurrency,
      messages: n,
      seconds: round(seconds, 3),
      per_s: round(n / seconds, 1),
      ...(await sinkRates(ctx, n)),
      cpu,
      cpu_steady: cpuSteady,
      config: { concurrency, ...GW, ...(process.env.BENCH_GRAPHILE_CHILD ? { BENCH_GRAPHILE_CHILD: process.env.BENCH_GRAPHILE_CHILD } : {}), analyzed_after_load: ANALYZE, version: '0.17', task: 'attemptDelivery (listener/delivery/http.ts), provider webhook' },
    };
    progress(`  ${result.system} c${concurrency}: ${result.per_s}/s (sink window ${result.sink_window_per_s}/s), ${cpu.msgs_per_cpu_s} msgs per CPU s (worker ${cpu.worker_ms_per_msg} + db ${cpu.db_ms_per_msg} ms/msg); steady ${cpuSteady.msgs_per_cpu_s} (${cpuSteady.worker_ms_per_msg} + ${cpuSteady.db_ms_per_msg})`);
    return result;
  } finally {
    phase('teardown');
    await Promise.all(children.map((c) => stopChild(c, 10_000, () => c.proc.send({ cmd: 'stop' }))));
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}

/** CPU of the ceiling's children since `start` (their pids → CPU seconds then): no database to count. */
function ceilingCpu(children: Child[], start: Map<number, number>, sinkStart: number | null, sinkPid: number | undefined, messages: number): CpuUse {
  let worker = 0;
  for (const c of children) {
    const pid = c.proc.pid;
    const now = pid ? procCpuSeconds(pid) : null;
    if (pid && now !== null) worker += now - (start.get(pid) ?? 0);
  }
  const sinkNow = procCpuSeconds(sinkPid);
  return {
    worker_s: round(worker, 2),
    worker_ms_per_msg: messages > 0 ? round((worker * 1000) / messages, 3) : null,
    db_backends_s: 0,
    db_ms_per_msg: 0,
    sink_s: sinkNow !== null && sinkStart !== null ? round(sinkNow - sinkStart, 2) : null,
    msgs_per_cpu_s: worker > 0 ? Math.round(messages / worker) : null,
    machine_busy_pct: null,
  };
}

/**
 * The ceiling at `processes` processes and `concurrency` calls at once per process: `n` messages split
 * among them, made from memory (bench/ceiling-child.ts); timed from the spawn, like the other runs, to
 * the last answer.
 */
async function ceilingRun(ctx: BenchContext, n: number, processes: number, concurrency: number, timeoutMs: number): Promise<RunResult> {
  phase('ceiling set-up');
  await ctx.sink.reset();
  const children: Child[] = [];
  const sinkPid = ctx.sink.child.proc.pid;
  try {
    phase('ceiling spawn to first request');
    const sinkStart = procCpuSeconds(sinkPid);
    const t0 = epochMs();
    let done = 0;
    const per = Math.ceil(n / processes);
    for (let i = 0; i < processes; i++) {
      const count = Math.min(per, n - i * per);
      const child = forkChild(`ceiling ${i + 1}`, ceilingChild, {
        execArgv: profileArgs(`ceiling-${i + 1}`),
        env: { PATH: process.env.PATH, SINK_URL: ctx.sink.url, CEIL_MESSAGES: String(count), CEIL_CONCURRENCY: String(concurrency), CEIL_FIRST: String(1 + i * per) },
      });
      child.proc.on('message', (m: { done?: number }) => {
        if (typeof m.done === 'number') done += m.done;
      });
      children.push(child);
    }
    const alive = () => {
      for (const c of children) if (c.proc.exitCode !== null) throw new Error(`ceiling child exited (${c.proc.exitCode}): ${c.output()}`);
    };
    const start = new Map<number, number>(children.map((c) => [c.proc.pid ?? 0, 0]));
    const steadyAt = await firstRequests(ctx, alive);
    const steadyStart = new Map<number, number>(children.map((c) => [c.proc.pid ?? 0, procCpuSeconds(c.proc.pid) ?? 0]));
    const steadySink = procCpuSeconds(sinkPid);
    phase('ceiling delivering');
    await waitFor(
      () => {
        alive();
        return Promise.resolve(done >= n);
      },
      { timeoutMs, intervalMs: 5, what: `${n} answered calls of the ceiling` },
    );
    const seconds = (epochMs() - t0) / 1000;
    const cpu = ceilingCpu(children, start, sinkStart, sinkPid, n);
    const cpuSteady = ceilingCpu(children, steadyStart, steadySink, sinkPid, n - steadyAt);
    const result: RunResult = {
      system: `ceiling x${processes}`,
      processes,
      concurrency,
      messages: n,
      seconds: round(seconds, 3),
      per_s: round(n / seconds, 1),
      ...(await sinkRates(ctx, n)),
      cpu,
      cpu_steady: cpuSteady,
      config: { concurrency, task: 'attemptDelivery (listener/delivery/http.ts), provider webhook, from memory: no database' },
    };
    progress(`  ${result.system} c${concurrency}: ${result.per_s}/s (sink window ${result.sink_window_per_s}/s), ${cpu.msgs_per_cpu_s} msgs per CPU s (worker ${cpu.worker_ms_per_msg} ms/msg); steady ${cpuSteady.msgs_per_cpu_s} (${cpuSteady.worker_ms_per_msg})`);
    return result;
  } finally {
    phase('teardown');
    await Promise.all(children.map((c) => stopChild(c, 5_000, () => c.proc.send({ cmd: 'stop' }))));
  }
}

/**
 * This run's graphile-worker template: a database with graphile-worker's schema, migrated once (the runner
 * asks for it beside the erp-cloud templates, before the first figure); every graphile-worker run copies it.
 */
export function graphileTemplate(dbs: DbRegistry): Promise<string> {
  return dbs.templateOf('deliv_gw', (url) => runMigrations({ connectionString: url, logger: new Logger(() => () => undefined) }));
}

/**
 * A migrated erp-cloud database (the run's own template: no copy of it needed) and a graphile-worker one
 * (both made by the runner before the first figure); every run copies one of them (nobody stays connected to them).
 */
async function templates(ctx: BenchContext): Promise<Templates> {
  const [erp, gw] = await Promise.all([ctx.dbs.template(), graphileTemplate(ctx.dbs)]);
  return { erp, gw };
}

const best = (runs: RunResult[]): RunResult => runs.reduce((a, b) => (b.per_s > a.per_s ? b : a));

/** Steady CPU per message of a run, worker and database together (null without /proc). */
function steadyMs(r: RunResult): number | null {
  const w = r.cpu_steady.worker_ms_per_msg;
  const d = r.cpu_steady.db_ms_per_msg;
  return w === null || d === null ? null : w + d;
}

/** The ceiling's row at one process count, against each system's best run there (`e`, `g`); all null without ceiling runs. */
function ceilingRow(processes: number, e: RunResult, g: RunResult, runs: RunResult[]): CeilingRow {
  if (runs.length === 0) {
    return { processes, best_per_s: null, best_concurrency: null, worker_ms_per_msg_steady: null, erp_cloud_of_ceiling: null,
      graphile_worker_of_ceiling: null, goal_of_ceiling: null, erp_cloud_queue_ms_per_msg: null, graphile_worker_queue_ms_per_msg: null };
  }
  const c = best(runs);
  const floor = c.cpu_steady.worker_ms_per_msg;
  const above = (r: RunResult) => {
    const ms = steadyMs(r);
    return ms === null || floor === null ? null : round(ms - floor, 3);
  };
  return {
    processes,
    best_per_s: c.per_s,
    best_concurrency: c.concurrency,
    worker_ms_per_msg_steady: floor,
    erp_cloud_of_ceiling: round(e.per_s / c.per_s, 3),
    graphile_worker_of_ceiling: round(g.per_s / c.per_s, 3),
    goal_of_ceiling: round((1.3 * g.per_s) / c.per_s, 3),
    erp_cloud_queue_ms_per_msg: above(e),
    graphile_worker_queue_ms_per_msg: above(g),
  };
}

export async function deliveryFigure(ctx: BenchContext): Promise<DeliveryResult> {
  const n = ctx.quick ? 1200 : 10_000;
  // quick: each system at the concurrency that was its best in every full run, one run each per process count
  const erpC = ctx.quick ? [128] : [8, 16, 32, 64, 128];
  const gwC = ctx.quick ? [40] : [5, 10, 20, 40, 80];
  // the ceiling is left out of the quick run (its 90 s have no room for it)
  const ceilC = ctx.quick ? [] : [10, 20, 40, 80, 128];
  const timeoutMs = ctx.quick ? 60_000 : 180_000;
  progress(`figure 1: delivery throughput and CPU, ${n} messages per run; 1 and 2 processes; concurrency erp-cloud ${erpC.join('/')}, graphile-worker ${gwC.join('/')}` +
    (ceilC.length > 0 ? `, ceiling (the same call from memory) ${ceilC.join('/')}` : ''));
  phase('templates');
  const tpl = await templates(ctx);
  const runs: RunResult[] = [];
  const sweep: SweepRow[] = [];
  const ceiling: CeilingRow[] = [];
  for (const procs of [1, 2]) {
    // interleaved so that machine drift hits every system alike
    for (let i = 0; i < Math.max(erpC.length, gwC.length, ceilC.length); i++) {
      if (erpC[i] !== undefined) runs.push(await erpCloudRun(ctx, tpl, n, procs, erpC[i]!, timeoutMs));
      if (gwC[i] !== undefined) runs.push(await graphileRun(ctx, tpl, n, procs, gwC[i]!, timeoutMs));
      if (ceilC[i] !== undefined) runs.push(await ceilingRun(ctx, n, procs, ceilC[i]!, timeoutMs));
    }
    const e = best(runs.filter((r) => r.processes === procs && r.system.startsWith('erp-cloud')));
    const g = best(runs.filter((r) => r.processes === procs && r.system.startsWith('graphile-worker')));
    const ec = e.cpu.msgs_per_cpu_s;
    const gc = g.cpu.msgs_per_cpu_s;
    sweep.push({
      processes: procs,
      erp_cloud_best_per_s: e.per_s,
      erp_cloud_best_concurrency: e.concurrency,
      graphile_worker_best_per_s: g.per_s,
      graphile_worker_best_concurrency: g.concurrency,
      ratio: round(e.per_s / g.per_s, 3),
      erp_cloud_msgs_per_cpu_s: ec,
      graphile_worker_msgs_per_cpu_s: gc,
      cpu_ratio: ec !== null && gc !== null ? round(ec / gc, 3) : null,
      erp_cloud_msgs_per_cpu_s_steady: e.cpu_steady.msgs_per_cpu_s,
      graphile_worker_msgs_per_cpu_s_steady: g.cpu_steady.msgs_per_cpu_s,
      cpu_ratio_steady: e.cpu_steady.msgs_per_cpu_s && g.cpu_steady.msgs_per_cpu_s ? round(e.cpu_steady.msgs_per_cpu_s / g.cpu_steady.msgs_per_cpu_s, 3) : null,
    });
    ceiling.push(ceilingRow(procs, e, g, runs.filter((r) => r.processes === procs && r.system.startsWith('ceiling'))));
  }
  const c1 = ceiling.find((r) => r.processes === 1)!;
  const c2 = ceiling.find((r) => r.processes === 2)!;
  const all = best(runs.filter((r) => r.system.startsWith('erp-cloud')));
  const gwAll = best(runs.filter((r) => r.system.startsWith('graphile-worker')));
  const x1 = sweep.find((r) => r.processes === 1)!;
  const x2 = sweep.find((r) => r.processes === 2)!;
  const sweepText = textTable(
    ['system', 'procs', 'conc', 'msg/s', 'worker ms/msg', 'db ms/msg', 'msgs per CPU s', 'steady: worker', 'db', 'msgs per CPU s'],
    runs.map((r) => [r.system.replace(/ x\d$/, ''), String(r.processes), String(r.concurrency), String(r.per_s),
      String(r.cpu.worker_ms_per_msg ?? 'n/a'), String(r.cpu.db_ms_per_msg ?? 'n/a'), String(r.cpu.msgs_per_cpu_s ?? 'n/a'),
      String(r.cpu_steady.worker_ms_per_msg ?? 'n/a'), String(r.cpu_steady.db_ms_per_msg ?? 'n/a'), String(r.cpu_steady.msgs_per_cpu_s ?? 'n/a')]),
  );
  return {
    delivery_per_s: all.per_s,
    graphile_worker_per_s: gwAll.per_s,
    delivery_ratio: round(all.per_s / gwAll.per_s, 3),
    delivery_ratio_x1: x1.ratio,
    delivery_ratio_x2: x2.ratio,
    msgs_per_cpu_s: x1.erp_cloud_msgs_per_cpu_s,
    graphile_worker_msgs_per_cpu_s: x1.graphile_worker_msgs_per_cpu_s,
    msgs_per_cpu_s_ratio: x1.cpu_ratio,
    msgs_per_cpu_s_steady_ratio: x1.cpu_ratio_steady,
    delivery_best_config: all.config,
    delivery_goal_of_ceiling_x1: c1.goal_of_ceiling,
    delivery_goal_of_ceiling_x2: c2.goal_of_ceiling,
    delivery: {
      sweep, sweep_text: sweepText, ceiling, ceiling_concurrencies: ceilC,
      erp_cloud_concurrencies: erpC, graphile_worker_concurrencies: gwC, messages_per_run: n,
    },
    runs,
  };
}
