/**
 * Figure 3: what the integration trigger costs the ERP.
 *
 * Requirement: "erp_insert_ratio: ERP insert transactions per second with the
 * integration triggers installed ÷ without, 8 clients, listeners running and
 * busy." The busy listener is there in BOTH terms of the ratio, so that the
 * ratio isolates what the trigger costs the ERP under the same background load.
 *
 * pgbench (-n -c 8 -j 2 -T 15; quick: -T 2, the quiet baseline run once
 * instead of twice and it and the naive run -T 1, seven runs in all) runs a one-row INSERT into
 * bench_erp.doc in one migrated database, in this order:
 *   1. quiet baseline: no trigger, no listener.
 *   2. busy baseline: no trigger; one listener process (`erp-cloud listen`,
 *      listener defaults plus the bench's LISTENER_ENV) delivering to the sink
 *      a backlog enqueued before it started. Sizing: BACKLOG_RATE × (T + 5)
 *      messages up front; once the listener has delivered WARMUP of them, its
 *      unloaded rate r is measured over 1 s (quick: 0.5 s), and if fewer than 1.5 × r × (T + 3)
 *      (at most MAX_BACKLOG) are still pending the backlog is topped up to that
 *      (an unloaded listener is faster than one sharing the CPUs with pgbench).
 *   3. integration: the AFTER INSERT trigger calling cloud.enqueue_message; the
 *      same listener, still running, now busy with what pgbench enqueues plus
 *      what is left of the backlog.
 *      (the listener is stopped: it deregisters, cloud.listener is empty; any
 *      row it left is deleted; the outbox is truncated)
 *   4. the floor: a trigger that writes one row with a uuid primary key and a
 *      jsonb payload (what any durable enqueue costs at least; as
 *      /work/shared/tools/insert-limit.sh), no listener; then trigger only: the
 *      integration trigger, no listener; then the floor again (quick run too).
 *   5. naive (context): a trigger that inserts into a plain table and calls
 *      pg_notify on every row; no listener.
 *   6. quiet baseline again; the quiet baseline is the mean of 1 and 6.
 * Before every run the triggers are dropped (the one under test recreated),
 * bench_erp.doc and bench_erp.naive_queue truncated, and a CHECKPOINT taken.
 *
 * Runs 2 and 3 verify "running and busy" instead of assuming it: outbox rows
 * by status are counted right before and after the run, and the sink's request
 * count is sampled every SAMPLE_MS during it. busy_throughout = the listener
 * is still alive, it delivered in every SAMPLE_MS interval, and messages were
 * still pending at the end (in run 2 nothing is enqueued, so the backlog never
 * ran dry). Both runs also record the CPU of the listener process and its
 * backends, and the NOTIFYs sent: a bench connection LISTENs on the endpoint's
 * wake channel and counts notifications by sending backend (pgbench = ERP
 * transactions; the listener's own maintenance; other). That extra LISTENer
 * costs the ERP something only when NOTIFYs are actually sent.
 *
 * Reported:
 *   erp_insert_ratio                   = 3 ÷ 2 (the headline: same busy listener in both)
 *   erp_insert_ratio_vs_quiet_baseline = 3 ÷ quiet (the trigger plus the CPU delivery takes from the box)
 *   erp_insert.trigger_only_ratio      = trigger only ÷ quiet (the trigger alone, no listener)
 *   erp_insert_vs_floor_ratio          = trigger only ÷ floor (mean of the two floor runs around it)
 *   erp_insert_floor_ratio             = floor ÷ quiet
 *   naive_notify_ratio                 = 5 ÷ quiet (context: naive insert + pg_notify trigger, no listener)
 */
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { benchClient, benchPool } from '../lib/db.js';
import { cpuMark, cpuSince, type CpuScope, type CpuUse } from '../lib/cpu.js';
import { listenerSettings, spawnListener, stopListener, type ListenerProc } from '../lib/listeners.js';
import { enqueueBenchMessages, putSinkEndpoint, outboxCounts } from '../lib/outbox.js';
import { phase } from '../lib/phases.js';
import { adopt } from '../lib/procs.js';
import { progress, round, sleep, waitFor } from '../lib/util.js';

/** msg/s assumed for the first backlog fill: above what one listener delivers alone on the 2-core box (figure 1). */
const BACKLOG_RATE = 4000;
/** Messages the listener delivers before its unloaded rate is measured. */
const WARMUP = 2000;
/** quick mode: 1,000 (the warm-up only has to get the listener past its start). */
const QUICK_WARMUP = 1000;
/** Upper bound of the top-up (keeps the fill bounded on a very fast machine). */
const MAX_BACKLOG = 500_000;
/** Sink sampling interval during the busy runs. */
const SAMPLE_MS = 500;

export interface PgbenchRun {
  label: string;
  tps: number;
  transactions: number;
  latency_avg_ms: number | null;
  failed: number;
}

export interface NotifyCount {
  from_erp_transactions: number;
  from_listener: number;
  other: number;
}

/** The listener during one pgbench run: was it running and busy the whole time? */
export interface BusyListenerRun {
  busy_throughout: boolean;
  listener_alive_at_end: boolean;
  sent_before: number;
  sent_after: number;
  delivered: number;
  delivered_per_s: number;
  pending_before: number;
  pending_at_end: number;
  in_flight_at_end: number;
  enqueued_during_run: number;
  sink_requests: number;
  sample_ms: number;
  intervals: number;
  min_interval_deliveries: number | null;
  max_interval_deliveries: number | null;
  notifies: NotifyCount;
  /** worker_* = the listener process, db_* = its backends, per delivered message. */
  cpu: CpuUse;
}

export interface ErpInsertResult {
  erp_insert_ratio: number;
  /** The trigger alone (no listener) ÷ the floor (a trigger writing one uuid-PK jsonb row), same run. */
  erp_insert_vs_floor_ratio: number;
  /** The floor ÷ no trigger, same run. */
  erp_insert_floor_ratio: number;
  erp_insert_ratio_vs_quiet_baseline: number;
  naive_notify_ratio: number;
  erp_insert: {
    pgbench: string;
    runs: PgbenchRun[];
    quiet_baseline_tps: number;
    busy_baseline_tps: number;
    integration_tps: number;
    trigger_only_tps: number;
    floor_tps: number;
    naive_tps: number;
    trigger_only_ratio: number;
    busy_baseline_vs_quiet_ratio: number;
    busy_condition_held: boolean;
    warnings: string[];
    backlog: {
      initial: number;
      listener_unloaded_per_s: number;
      wanted_at_baseline_start: number;
      topped_up: number;
    };
    listener_during_busy_baseline: BusyListenerRun;
    listener_during_integration: BusyListenerRun;
    listener_rows_left_after_stop: number;
    listener_config: Record<string, unknown>;
  };
}

export function findPgbench(): string {
  try {
    const bindir = execFileSync('pg_config', ['--bindir'], { encoding: 'utf8', timeout: 5000 }).trim();
    if (existsSync(path.join(bindir, 'pgbench'))) return path.join(bindir, 'pgbench');
  } catch {
    /* no pg_config on PATH */
  }
  for (const v of ['17', '16', '15', '14']) {
    const p = `/usr/lib/postgresql/${v}/bin/pgbench`;
    if (existsSync(p)) return p;
  }
  throw new Error('pgbench not found (pg_config --bindir, /usr/lib/postgresql/*/bin)');
}

const SCRIPT = `\\set cid random(1, 5000)
\\set amt random(1, 1000000)
insert into bench_erp.doc (customer, amount) values ('customer-' || :cid, :amt / 100.0);
`;

const SETUP = `
create schema bench_erp;
create table bench_erp.doc (id bigserial primary key, customer text, amount numeric, created_at timestamptz default now());
create table bench_erp.naive_queue (id bigserial primary key, doc_id bigint, payload jsonb, created_at timestamptz default now());

create function bench_erp.doc_to_cloud() returns trigger language plpgsql as $$
begin
  perform cloud.enqueue_message('sink', 'bench.doc',
    jsonb_build_object('id', NEW.id, 'customer', NEW.customer, 'amount', NEW.amount), 'bench_erp.doc', NEW.id::text);
  return null;
end $$;

-- the floor of a durable row (as /work/shared/tools/insert-limit.sh): one uuid-keyed jsonb row per document
create table bench_erp.floor_row (id uuid primary key default gen_random_uuid(), payload jsonb not null);
create function bench_erp.doc_floor() returns trigger language plpgsql as $$
begin
  insert into bench_erp.floor_row (payload) values (jsonb_build_object('id', NEW.id, 'customer', NEW.customer, 'amount', NEW.amount));
  return null;
end $$;

create function bench_erp.doc_naive() returns trigger language plpgsql as $$
begin
  insert into bench_erp.naive_queue (doc_id, payload)
  values (NEW.id, jsonb_build_object('id', NEW.id, 'customer', NEW.customer, 'amount', NEW.amount));
  perform pg_notify('x', NEW.id::text);
  return null;
end $$;
`;

/** pgbench with `clients` clients on `threads` threads (default 8 on 2), at most `rate` transactions per second when given. */
export function runPgbench(bin: string, dbUrl: string, scriptFile: string, seconds: number, label: string,
  opts: { clients?: number; threads?: number; rate?: number } = {}): Promise<PgbenchRun> {
  const u = new URL(dbUrl);
  const args = [
    '-h', u.hostname, '-p', u.port || '5432', '-U', decodeURIComponent(u.username || 'postgres'),
    '-n', '-c', String(opts.clients ?? 8), '-j', String(opts.threads ?? 2), '-T', String(seconds),
    ...(opts.rate ? ['-R', String(opts.rate)] : []), '-f', scriptFile, u.pathname.slice(1),
  ];
  const env = { ...process.env, PGPASSWORD: decodeURIComponent(u.password), PGAPPNAME: `bench pgbench ${label}` };
  return new Promise((resolve, reject) => {
    const proc = execFile(bin, args, { env, timeout: (seconds + 60) * 1000, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`pgbench ${label} failed: ${err.message}\n${stderr}`));
      const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(stdout);
      const tx = /number of transactions actually processed: (\d+)/.exec(stdout);
      const lat = /latency average = ([\d.]+) ms/.exec(stdout);
      const failed = /number of failed transactions: (\d+)/.exec(stdout);
      if (!tps || !tx) return reject(new Error(`could not read pgbench output:\n${stdout}\n${stderr}`));
      resolve({
        label,
        tps: round(Number(tps[1]), 1),
        transactions: Number(tx[1]),
        latency_avg_ms: lat ? Number(lat[1]) : null,
        failed: failed ? Number(failed[1]) : 0,
      });
    });
    adopt(`pgbench ${label}`, proc);
  });
}

/**
 * Counts NOTIFYs on one channel by sending backend, from a bench connection
 * that LISTENs on it. Each sender's application_name is looked up once, when
 * its first notification arrives (it is connected then).
 */
async function countNotifies(url: string, pool: pg.Pool, channel: string): Promise<{ stop(): Promise<NotifyCount> }> {
  const c = benchClient(url, 'notify-count');
  await c.connect();
  const byPid = new Map<number, number>();
  const apps = new Map<number, Promise<string>>();
  c.on('notification', (n) => {
    byPid.set(n.processId, (byPid.get(n.processId) ?? 0) + 1);
    if (!apps.has(n.processId)) {
      apps.set(
        n.processId,
        pool
          .query<{ app: string }>('select application_name app from pg_stat_activity where pid = $1', [n.processId])
          .then((r) => r.rows[0]?.app ?? '?', () => '?'),
      );
    }
  });
  await c.query(`listen ${c.escapeIdentifier(channel)}`);
  return {
    async stop() {
      await c.query('select 1').catch(() => undefined); // notifications sent before now have arrived
      await c.end().catch(() => undefined);
      const count: NotifyCount = { from_erp_transactions: 0, from_listener: 0, other: 0 };
      for (const [pid, k] of byPid) {
        const app = await apps.get(pid)!;
        if (app.startsWith('bench pgbench')) count.from_erp_transactions += k;
        else if (app.startsWith('erp-cloud')) count.from_listener += k;
        else count.other += k;
      }
      return count;
    },
  };
}

/** Samples the sink's request count every `intervalMs` until stopped (bounded by `maxMs`). */
function sampleSink(ctx: BenchContext, intervalMs: number, maxMs: number): { stop(): Promise<number[]> } {
  const counts: number[] = [];
  let stopped = false;
  // stop() ends the current interval's wait at once: a partial last interval is not a sample anyway
  let wake: () => void = () => undefined;
  const woken = new Promise<void>((resolve) => (wake = resolve));
  const loop = (async () => {
    counts.push((await ctx.sink.stats()).count);
    const deadline = Date.now() + maxMs;
    for (let i = 0; i < Math.ceil(maxMs / intervalMs) && Date.now() < deadline; i++) {
      await Promise.race([sleep(intervalMs), woken]);
      if (stopped) break; // a partial last interval is not a sample
      counts.push((await ctx.sink.stats()).count);
    }
  })().catch(() => undefined); // the sink gone (cleanup after a failure): the samples end there
  return {
    async stop() {
      stopped = true;
      wake();
      await loop;
      return counts;
    },
  };
}

export async function erpInsertFigure(ctx: BenchContext): Promise<ErpInsertResult> {
  const seconds = ctx.quick ? 2 : 15;
  /** the runs only ratios of context divide by (quiet baseline, naive): 1 s in the quick run, which keeps it within its budget */
  const contextSeconds = ctx.quick ? 1 : seconds;
  const warmup = ctx.quick ? QUICK_WARMUP : WARMUP;
  const bin = findPgbench();
  progress(`figure 3: ERP insert cost, pgbench -c 8 -j 2 -T ${seconds} (${bin}); listener busy in both baseline and integration`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('erp');
  const pool = benchPool(db.url, 'erp-insert', 3);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-bench-'));
  const scriptFile = path.join(tmp, 'insert_doc.sql');
  writeFileSync(scriptFile, SCRIPT);
  let listener: ListenerProc | null = null;
  const warnings: string[] = [];
  try {
    await putSinkEndpoint(pool, ctx.sink.url);
    await pool.query(SETUP);
    const channel = (await pool.query<{ ch: string }>(`select wake_channel ch from cloud.endpoint where name = 'sink'`)).rows[0]!.ch;
    const fresh = async (trigger?: 'doc_to_cloud' | 'doc_naive' | 'doc_floor') => {
      await pool.query('drop trigger if exists doc_to_cloud on bench_erp.doc; drop trigger if exists doc_naive on bench_erp.doc; drop trigger if exists doc_floor on bench_erp.doc');
      await pool.query('truncate bench_erp.doc, bench_erp.naive_queue, bench_erp.floor_row restart identity');
      if (trigger) {
        await pool.query(`create trigger ${trigger} after insert on bench_erp.doc for each row execute function bench_erp.${trigger}()`);
      }
      await pool.query('checkpoint');
    };
    const runs: PgbenchRun[] = [];
    const bench = async (label: string, runSeconds = seconds) => {
      const r = await runPgbench(bin, db.url, scriptFile, runSeconds, label);
      runs.push(r);
      progress(`  ${label}: ${r.tps} tps (${r.transactions} tx, avg ${r.latency_avg_ms} ms)`);
      return r;
    };
    /** A pgbench run with the listener running; verifies and records that it was busy throughout. */
    const busyBench = async (label: string, l: ListenerProc): Promise<{ run: PgbenchRun; listener: BusyListenerRun }> => {
      const scope: CpuScope = { pool, db: db.name, app: 'erp-cloud', workerPids: [l.proc.pid], sinkPid: ctx.sink.child.proc.pid };
      const notifies = await countNotifies(db.url, pool, channel);
      const before = await outboxCounts(pool);
      const sink0 = (await ctx.sink.stats()).count;
      const mark = await cpuMark(scope);
      const samples = sampleSink(ctx, SAMPLE_MS, (seconds + 60) * 1000);
      let run: PgbenchRun;
      try {
        run = await bench(label);
      } catch (err) {
        await samples.stop();
        await notifies.stop();
        throw err;
      }
      const counts = await samples.stop();
      const after = await outboxCounts(pool);
      const sink1 = (await ctx.sink.stats()).count;
      const delivered = after.sent - before.sent;
      const cpu = await cpuSince(scope, mark, delivered);
      const deltas = counts.slice(1).map((c, i) => c - counts[i]!);
      const alive = l.proc.exitCode === null && l.proc.signalCode === null;
      const minDelta = deltas.length ? Math.min(...deltas) : null;
      const r: BusyListenerRun = {
        busy_throughout: alive && minDelta !== null && minDelta > 0 && after.pending > 0,
        listener_alive_at_end: alive,
        sent_before: before.sent,
        sent_after: after.sent,
        delivered,
        delivered_per_s: round(delivered / seconds, 1),
        pending_before: before.pending,
        pending_at_end: after.pending,
        in_flight_at_end: after.in_flight,
        enqueued_during_run: after.total - before.total,
        sink_requests: sink1 - sink0,
        sample_ms: SAMPLE_MS,
        intervals: deltas.length,
        min_interval_deliveries: minDelta,
        max_interval_deliveries: deltas.length ? Math.max(...deltas) : null,
        notifies: await notifies.stop(),
        cpu,
      };
      progress(
        `    listener: delivered ${delivered} (${r.delivered_per_s}/s, per ${SAMPLE_MS} ms min ${minDelta} max ${r.max_interval_deliveries}), ` +
          `pending ${before.pending} → ${after.pending}, busy throughout: ${r.busy_throughout}, NOTIFYs ${JSON.stringify(r.notifies)}`,
      );
      if (!r.busy_throughout) {
        const w = `${label}: the listener was NOT busy throughout (alive ${alive}, min deliveries per ${SAMPLE_MS} ms ${minDelta}, pending at end ${after.pending})`;
        warnings.push(w);
        progress(`  WARNING: ${w}`);
      }
      return { run, listener: r };
    };

    // 1. quiet baseline
    phase('quiet baseline');
    await fresh();
    const quiet1 = await bench('quiet baseline (no trigger, no listener)', contextSeconds);

    // backlog for the busy listener, then the listener itself
    phase('backlog, listener start and warm-up');
    await pool.query('truncate cloud.outbox');
    const initial = Math.ceil(BACKLOG_RATE * (seconds + 5));
    const tFill = performance.now();
    await enqueueBenchMessages(pool, initial);
    progress(`  backlog: ${initial} messages enqueued in ${round((performance.now() - tFill) / 1000, 1)} s`);
    await ctx.sink.reset();
    listener = spawnListener(db.url, 'bench-erp-insert');
    const l = listener;
    const alive = () => {
      if (l.proc.exitCode !== null) throw new Error(`listener exited (${l.proc.exitCode}): ${l.output()}`);
    };
    await waitFor(
      async () => {
        alive();
        return (await ctx.sink.stats()).count >= warmup;
      },
      { timeoutMs: 30_000, intervalMs: 50, what: `the listener to deliver ${warmup} backlog messages` },
    );
    const r0 = (await ctx.sink.stats()).count;
    const rateWindowMs = ctx.quick ? 500 : 1000;
    await sleep(rateWindowMs);
    const unloaded = Math.round((((await ctx.sink.stats()).count - r0) * 1000) / rateWindowMs);
    const wanted = Math.min(MAX_BACKLOG, Math.ceil(1.5 * unloaded * (seconds + 3)));
    const pendingNow = (await outboxCounts(pool)).pending;
    const topUp = Math.max(0, wanted - pendingNow);
    if (topUp > 0) await enqueueBenchMessages(pool, topUp);
    progress(`  listener delivers ${unloaded}/s unloaded; ${pendingNow} pending, wanted ${wanted}: topped up ${topUp}`);

    // 2. busy baseline: no trigger, the listener delivering the backlog
    phase('busy baseline');
    await fresh();
    const busyBase = await busyBench('busy baseline (no trigger, listener busy with backlog)', l);

    // 3. integration: trigger, the same listener busy with what pgbench enqueues plus the rest of the backlog
    phase('integration');
    await fresh('doc_to_cloud');
    const integ = await busyBench('integration (trigger, listener busy)', l);
    alive();
    phase('listener stop');
    await stopListener(l);
    listener = null;
    const leftRows = (await pool.query<{ n: number }>('with d as (delete from cloud.listener returning 1) select count(*)::int n from d')).rows[0]!.n;

    // 4. the same trigger with no listener at all (no NOTIFY, no CPU taken by delivery), between two
    //    runs of the floor: a trigger writing one uuid-keyed jsonb row, what any durable enqueue costs at least
    phase('floor');
    await fresh('doc_floor');
    const floor1 = await bench('floor: trigger writes one uuid-PK jsonb row, no listener');
    phase('trigger only');
    await pool.query('truncate cloud.outbox');
    await fresh('doc_to_cloud');
    const triggerOnly = await bench('integration trigger, no listener');
    phase('floor');
    await fresh('doc_floor');
    // the floor again, also in the quick run, so that drift during the run weighs on both sides of the ratio
    // alike (2-s runs one after the other on a shared machine: the floor alone moved by ±30 % between them)
    const floor2 = await bench('floor again');
    const floor = (floor1.tps + floor2.tps) / 2;

    // 5. context: naive insert + pg_notify trigger, no listener
    phase('naive');
    await fresh('doc_naive');
    const naive = await bench('naive trigger (insert + pg_notify), no listener', contextSeconds);

    // 6. quiet baseline again (full run only, as the floor)
    let quiet2: PgbenchRun | null = null;
    if (!ctx.quick) {
      phase('quiet baseline');
      await fresh();
      quiet2 = await bench('quiet baseline again (no trigger, no listener)');
    }

    const quiet = quiet2 ? (quiet1.tps + quiet2.tps) / 2 : quiet1.tps;
    const held = busyBase.listener.busy_throughout && integ.listener.busy_throughout;
    return {
      erp_insert_ratio: round(integ.run.tps / busyBase.run.tps, 3),
      erp_insert_vs_floor_ratio: round(triggerOnly.tps / floor, 3),
      erp_insert_floor_ratio: round(floor / quiet, 3),
      erp_insert_ratio_vs_quiet_baseline: round(integ.run.tps / quiet, 3),
      naive_notify_ratio: round(naive.tps / quiet, 3),
      erp_insert: {
        pgbench: `-n -c 8 -j 2 -T ${seconds}${contextSeconds !== seconds ? ` (quiet baseline and naive -T ${contextSeconds})` : ''}, script: ${SCRIPT.trim().split('\n').pop()}`,
        runs,
        quiet_baseline_tps: round(quiet, 1),
        busy_baseline_tps: busyBase.run.tps,
        integration_tps: integ.run.tps,
        trigger_only_tps: triggerOnly.tps,
        floor_tps: round(floor, 1),
        naive_tps: naive.tps,
        trigger_only_ratio: round(triggerOnly.tps / quiet, 3),
        busy_baseline_vs_quiet_ratio: round(busyBase.run.tps / quiet, 3),
        busy_condition_held: held,
        warnings,
        backlog: { initial, listener_unloaded_per_s: unloaded, wanted_at_baseline_start: wanted, topped_up: topUp },
        listener_during_busy_baseline: busyBase.listener,
        listener_during_integration: integ.listener,
        listener_rows_left_after_stop: leftRows,
        listener_config: listenerSettings(1),
      },
    };
  } finally {
    phase('teardown');
    if (listener) await stopListener(listener);
    rmSync(tmp, { recursive: true, force: true });
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}
