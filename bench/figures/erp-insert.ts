/**
 * Figure 3: what the integration trigger costs the ERP. pgbench (8 clients,
 * 2 threads, -n) runs a one-row INSERT into bench_erp.doc:
 *   - baseline: no trigger (measured before and after the others; mean used),
 *   - integration: AFTER INSERT trigger calling cloud.enqueue_message, with a
 *     listener process running and draining the outbox to the sink meanwhile,
 *   - naive: a trigger that inserts into a plain table and calls pg_notify on
 *     every row (context only; no listener),
 *   - diagnostic: the integration trigger with no listener running, which
 *     separates the trigger's own cost from the CPU the delivery takes.
 * Between runs the doc table is truncated and a CHECKPOINT taken, so every
 * run starts from the same state.
 */
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { benchPool } from '../lib/db.js';
import { backendPids, machineTicks, procCpuSeconds, sumCpu } from '../lib/cpu.js';
import { LISTENER_ENV, spawnListener, stopListener, waitListenerIdle, type ListenerProc } from '../lib/listeners.js';
import { adopt } from '../lib/procs.js';
import { progress, round } from '../lib/util.js';

export interface PgbenchRun {
  label: string;
  tps: number;
  transactions: number;
  latency_avg_ms: number | null;
  failed: number;
}

export interface ErpInsertResult {
  erp_insert_ratio: number;
  naive_notify_ratio: number;
  erp_insert: {
    pgbench: string;
    runs: PgbenchRun[];
    baseline_tps: number;
    integration_tps: number;
    naive_tps: number;
    trigger_only_tps: number;
    trigger_only_ratio: number;
    listener_during_integration: {
      sent_by_end_of_run: number;
      backlog_at_end: number;
      sink_requests: number;
      cpu: Record<string, number | null>;
      config: Record<string, unknown>;
    };
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

create function bench_erp.doc_naive() returns trigger language plpgsql as $$
begin
  insert into bench_erp.naive_queue (doc_id, payload)
  values (NEW.id, jsonb_build_object('id', NEW.id, 'customer', NEW.customer, 'amount', NEW.amount));
  perform pg_notify('x', NEW.id::text);
  return null;
end $$;
`;

function runPgbench(bin: string, dbUrl: string, scriptFile: string, seconds: number, label: string): Promise<PgbenchRun> {
  const u = new URL(dbUrl);
  const args = [
    '-h', u.hostname, '-p', u.port || '5432', '-U', decodeURIComponent(u.username || 'postgres'),
    '-n', '-c', '8', '-j', '2', '-T', String(seconds), '-f', scriptFile, u.pathname.slice(1),
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

export async function erpInsertFigure(ctx: BenchContext): Promise<ErpInsertResult> {
  const seconds = ctx.quick ? 5 : 15;
  const bin = findPgbench();
  progress(`figure 3: ERP insert cost, pgbench -c 8 -j 2 -T ${seconds} (${bin})`);
  const db = await ctx.dbs.createMigrated('erp');
  const pool = benchPool(db.url, 'erp-insert');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-bench-'));
  const scriptFile = path.join(tmp, 'insert_doc.sql');
  writeFileSync(scriptFile, SCRIPT);
  let listener: ListenerProc | null = null;
  try {
    await pool.query(`select cloud.put_endpoint('sink', $1)`, [`${ctx.sink.url}/webhook`]);
    await pool.query(SETUP);
    const fresh = async () => {
      await pool.query('drop trigger if exists doc_to_cloud on bench_erp.doc; drop trigger if exists doc_naive on bench_erp.doc');
      await pool.query('truncate bench_erp.doc, bench_erp.naive_queue restart identity');
      await pool.query('checkpoint');
    };
    const runs: PgbenchRun[] = [];
    const bench = async (label: string) => {
      const r = await runPgbench(bin, db.url, scriptFile, seconds, label);
      runs.push(r);
      progress(`  ${label}: ${r.tps} tps (${r.transactions} tx, avg ${r.latency_avg_ms} ms)`);
      return r;
    };

    await fresh();
    const base1 = await bench('baseline (no trigger)');

    await fresh();
    await pool.query('truncate cloud.outbox');
    await pool.query(
      'create trigger doc_to_cloud after insert on bench_erp.doc for each row execute function bench_erp.doc_to_cloud()',
    );
    listener = spawnListener(db.url, 'bench-erp-insert');
    await waitListenerIdle(pool, listener);
    await ctx.sink.reset();
    // CPU the delivery side takes from the ERP while pgbench runs: the listener process and its backends
    const backends0 = new Map((await backendPids(pool, db.name, 'erp-cloud')).map((pid) => [pid, procCpuSeconds(pid) ?? 0]));
    const cpu0 = { proc: procCpuSeconds(listener.proc.pid), sink: procCpuSeconds(ctx.sink.child.proc.pid), m: machineTicks() };
    const integ = await bench('integration trigger + busy listener');
    const m1 = machineTicks();
    // backends the listener opened during the run count from zero
    const backends1 = await backendPids(pool, db.name, 'erp-cloud');
    const backendCpu = sumCpu(backends1) - backends1.reduce((a, pid) => a + (backends0.get(pid) ?? 0), 0);
    const deliveryCpu = {
      listener_process_s: cpu0.proc === null ? null : round((procCpuSeconds(listener.proc.pid) ?? 0) - cpu0.proc, 2),
      listener_backends_s: round(backendCpu, 2),
      sink_s: cpu0.sink === null ? null : round((procCpuSeconds(ctx.sink.child.proc.pid) ?? 0) - cpu0.sink, 2),
      machine_busy_pct: m1 && cpu0.m ? round((100 * (m1.busy - cpu0.m.busy)) / Math.max(1, m1.total - cpu0.m.total), 1) : null,
      seconds: seconds,
    };
    const counts = (
      await pool.query<{ sent: number; backlog: number }>(
        `select count(*) filter (where status = 'sent')::int sent, count(*) filter (where status <> 'sent')::int backlog from cloud.outbox`,
      )
    ).rows[0]!;
    const sinkCount = (await ctx.sink.stats()).count;
    await stopListener(listener);
    listener = null;

    // diagnostic: the same trigger with no listener at all (no NOTIFY, no CPU taken by delivery)
    await fresh();
    await pool.query('truncate cloud.outbox');
    await pool.query(
      'create trigger doc_to_cloud after insert on bench_erp.doc for each row execute function bench_erp.doc_to_cloud()',
    );
    const triggerOnly = await bench('integration trigger, no listener (diagnostic)');

    await fresh();
    await pool.query('create trigger doc_naive after insert on bench_erp.doc for each row execute function bench_erp.doc_naive()');
    const naive = await bench('naive trigger (insert + pg_notify)');

    await fresh();
    const base2 = await bench('baseline again (no trigger)');

    const baseline = (base1.tps + base2.tps) / 2;
    return {
      erp_insert_ratio: round(integ.tps / baseline, 3),
      naive_notify_ratio: round(naive.tps / baseline, 3),
      erp_insert: {
        pgbench: `-n -c 8 -j 2 -T ${seconds}, script: ${SCRIPT.trim().split('\n').pop()}`,
        runs,
        baseline_tps: round(baseline, 1),
        integration_tps: integ.tps,
        naive_tps: naive.tps,
        trigger_only_tps: triggerOnly.tps,
        trigger_only_ratio: round(triggerOnly.tps / baseline, 3),
        listener_during_integration: {
          sent_by_end_of_run: counts.sent,
          backlog_at_end: counts.backlog,
          sink_requests: sinkCount,
          cpu: deliveryCpu,
          config: { listeners: 1, ...LISTENER_ENV },
        },
      },
    };
  } finally {
    if (listener) await stopListener(listener);
    rmSync(tmp, { recursive: true, force: true });
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}
