/**
 * A development aid (not part of `make bench`): two or more listener builds
 * compared interleaved in one run, on what issue 15 §3 and §4 measure of the
 * listener alone — CPU per message (robust on a shared machine: CPU time, not
 * wall time), its start-up, and commit-to-sink latency with an idle listener.
 *
 *   DATABASE_URL=… node dist/bench/listener-ab.js A=path/to/dist/listener/cli.js B=other/cli.js
 *     AB_ROUNDS=4 AB_MESSAGES=1200 AB_CONCURRENCY=128 AB_LISTENERS=1 AB_LATENCY=100 (samples per build per round; 0 = none)
 *
 * Delivery: per round and build (the order alternates per round), a fresh copy of a migrated
 * database with AB_MESSAGES pending messages to the bench's sink; the listener(s) spawn and the
 * run ends when every attempt is reported (its cloud.log row). Reported per build: start-up (spawn to the
 * first request at the sink: wall ms and the listener's CPU ms), the listener's and the database
 * backends' CPU ms per message over the whole run and from the first request on (steady), the rate.
 * Latency: one idle listener per build, each on its own database; single-message ERP commits go
 * to the builds in turn, 20 ms apart; commit → sink receive time, p50 / p99 per build.
 * Medians over the rounds, with min–max.
 */
import path from 'node:path';
import pg from 'pg';
import { cpuMark, cpuSince, procCpuSeconds, type CpuScope } from './lib/cpu.js';
import { benchClient, benchPool, DbRegistry } from './lib/db.js';
import { LISTENER_ENV, waitListenerIdle, type ListenerProc } from './lib/listeners.js';
import { enqueueBenchMessages, putSinkEndpoint } from './lib/outbox.js';
import { spawnChild, stopAllChildren, stopChild } from './lib/procs.js';
import { startSink, type Sink } from './lib/sink-client.js';
import { epochMs, percentile, round, sleep, textTable, waitFor } from './lib/util.js';

const serverUrl = process.env.DATABASE_URL;
if (!serverUrl) throw new Error('set DATABASE_URL (the server to create bench databases on)');
const builds = process.argv.slice(2).map((a) => {
  const i = a.indexOf('=');
  return i > 0 ? { name: a.slice(0, i), cli: path.resolve(a.slice(i + 1)) } : { name: a, cli: path.resolve(a) };
});
if (builds.length === 0) throw new Error('usage: listener-ab.js NAME=path/to/cli.js [NAME=path …]');
const ROUNDS = Number(process.env.AB_ROUNDS ?? 4);
const N = Number(process.env.AB_MESSAGES ?? 1200);
const CONC = process.env.AB_CONCURRENCY ?? '128';
const LISTENERS = Number(process.env.AB_LISTENERS ?? 1);
const LAT = Number(process.env.AB_LATENCY ?? 100);
const EXTRA = (n: string): string[] => [
  ...(process.env.AB_PROFILE_DIR ? ['--cpu-prof', `--cpu-prof-dir=${process.env.AB_PROFILE_DIR}`, `--cpu-prof-name=${n}-${Date.now()}.cpuprofile`] : []),
  ...(process.env.AB_NODE_ARGS ? process.env.AB_NODE_ARGS.split(' ') : []),
];

function spawnBuild(cli: string, dbUrl: string, id: string, env: Record<string, string> = {}): ListenerProc {
  const child = spawnChild(`listener ${id}`, process.execPath, [...EXTRA(id), cli, 'listen'], {
    env: { PATH: process.env.PATH, DATABASE_URL: dbUrl, ERP_CLOUD_WORKER_ID: id, ...LISTENER_ENV, ERP_CLOUD_CONCURRENCY: CONC, ...env },
  });
  return Object.assign(child, { workerId: id });
}

interface Run { backends: number; startWallMs: number; startCpuMs: number; wholeListener: number; wholeDb: number; steadyListener: number; steadyDb: number; perS: number }

async function deliveryRun(dbs: DbRegistry, tpl: string, sink: Sink, cli: string, label: string): Promise<Run> {
  const db = await dbs.createFrom(`ab_${label}`, tpl);
  const pool = benchPool(db.url, 'ab');
  const procs: ListenerProc[] = [];
  try {
    await putSinkEndpoint(pool, sink.url);
    await enqueueBenchMessages(pool, N);
    await pool.query('analyze');
    await sink.reset();
    const scope = (): CpuScope => ({ pool, db: db.name, workerPids: procs.map((p) => p.proc.pid), sinkPid: sink.child.proc.pid });
    const mark = await cpuMark(scope());
    const t0 = epochMs();
    for (let i = 0; i < LISTENERS; i++) procs.push(spawnBuild(cli, db.url, `ab-${label}-${i + 1}`));
    const alive = () => {
      for (const p of procs) if (p.proc.exitCode !== null) throw new Error(`listener exited (${p.proc.exitCode}): ${p.output()}`);
    };
    const first = await waitFor(async () => {
      alive();
      return (await sink.stats()).count;
    }, { timeoutMs: 60_000, intervalMs: 2, what: 'the first request' });
    const t1 = epochMs();
    const startCpu = procs.reduce((a, p) => a + (procCpuSeconds(p.proc.pid) ?? 0), 0);
    const steady = await cpuMark(scope());
    await waitFor(async () => {
      alive();
      const { rows } = await pool.query<{ n: number }>(`select count(*)::int n from cloud.log where outcome = 'ok'`);
      return rows[0]!.n >= N;
    }, { timeoutMs: 120_000, intervalMs: 20, what: 'every attempt reported' });
    const seconds = (epochMs() - t0) / 1000;
    const backends = new Set([...mark.lastSeen.keys(), ...steady.lastSeen.keys()]).size;
    const whole = await cpuSince(scope(), mark, N);
    const st = await cpuSince(scope(), steady, N - first);
    return {
      backends, startWallMs: t1 - t0, startCpuMs: startCpu * 1000,
      wholeListener: whole.worker_ms_per_msg ?? NaN, wholeDb: whole.db_ms_per_msg ?? NaN,
      steadyListener: st.worker_ms_per_msg ?? NaN, steadyDb: st.db_ms_per_msg ?? NaN, perS: N / seconds,
    };
  } finally {
    await Promise.all(procs.map((p) => stopChild(p, 10_000)));
    if (process.env.AB_NODE_ARGS) for (const p of procs) console.error(p.output().split('\n').filter((l) => l.startsWith('QCOUNT')).join('\n'));
    await pool.end();
    await dbs.drop(db.name);
  }
}

async function latencyRound(dbs: DbRegistry, tpl: string, sink: Sink, round_: number): Promise<number[][]> {
  const setups = await Promise.all(builds.map(async (b, i) => {
    const db = await dbs.createFrom(`ablat_${i}`, tpl);
    const pool = benchPool(db.url, 'ab');
    await putSinkEndpoint(pool, sink.url);
    const client = benchClient(db.url, 'ab erp');
    await client.connect();
    const l = spawnBuild(b.cli, db.url, `ablat-${b.name}`, { ERP_CLOUD_HTTP_PORT: '-1' });
    return { db, pool, client, l };
  }));
  try {
    for (const s of setups) await waitListenerIdle(s.pool, s.l);
    const commits: Array<Map<string, number>> = builds.map(() => new Map());
    const send = async (i: number, seq: number) => {
      const c = setups[i]!.client;
      await c.query('begin');
      const { rows } = await c.query<{ id: string }>(`select cloud.enqueue_message('sink', 'bench.ping', jsonb_build_object('seq', $1::int)) as id`, [seq]);
      await c.query('commit');
      commits[i]!.set(rows[0]!.id, epochMs());
    };
    // warm-up, not counted
    for (let k = 0; k < 20; k++) for (let i = 0; i < builds.length; i++) {
      await send(i, -1);
      await sleep(20);
    }
    for (const m of commits) m.clear();
    await sleep(200);
    await sink.reset();
    const start = epochMs();
    let k = 0;
    for (let s = 0; s < LAT; s++) {
      for (let j = 0; j < builds.length; j++) {
        const i = (j + round_) % builds.length;
        const wait = start + k++ * 20 - epochMs();
        if (wait > 0) await sleep(wait);
        await send(i, s);
      }
    }
    const total = LAT * builds.length;
    await waitFor(async () => (await sink.stats()).distinct >= total, { timeoutMs: 20_000, what: 'latency deliveries' });
    const got = await sink.times();
    return commits.map((m) => [...m].map(([id, at]) => (got.get(id) ?? NaN) - at));
  } finally {
    for (const s of setups) {
      await stopChild(s.l, 10_000);
      await s.client.end().catch(() => undefined);
      await s.pool.end();
      await dbs.drop(s.db.name);
    }
  }
}

const med = (xs: number[]) => percentile(xs, 50);
const fmt = (xs: number[], d = 3) => `${round(med(xs), d)} (${round(Math.min(...xs), d)}–${round(Math.max(...xs), d)})`;

async function main(): Promise<void> {
  const dbs = new DbRegistry(serverUrl!);
  const sink = await startSink();
  try {
    const tpl = (await dbs.createMigrated('ab_tpl')).name;
    const runs = new Map<string, Run[]>(builds.map((b) => [b.name, []]));
    const lats = new Map<string, { p50: number[]; p99: number[]; all: number[] }>(builds.map((b) => [b.name, { p50: [], p99: [], all: [] }]));
    for (let r = 0; r < ROUNDS; r++) {
      const order = r % 2 === 0 ? builds : [...builds].reverse();
      if (N > 0) {
        for (const b of order) {
          const run = await deliveryRun(dbs, tpl, sink, b.cli, `${b.name}_${r}`);
          runs.get(b.name)!.push(run);
          console.error(`round ${r + 1} ${b.name}: start ${round(run.startWallMs, 0)} ms wall / ${round(run.startCpuMs, 0)} ms CPU; whole ${round(run.wholeListener, 3)} + ${round(run.wholeDb, 3)} ms/msg; steady ${round(run.steadyListener, 3)} + ${round(run.steadyDb, 3)}; ${round(run.perS, 0)}/s; ${run.backends} backends`);
        }
      }
      if (LAT > 0) {
        const l = await latencyRound(dbs, tpl, sink, r);
        builds.forEach((b, i) => {
          const x = l[i]!;
          const e = lats.get(b.name)!;
          e.p50.push(percentile(x, 50));
          e.p99.push(percentile(x, 99));
          e.all.push(...x);
          console.error(`round ${r + 1} ${b.name}: latency p50 ${round(percentile(x, 50), 2)} p99 ${round(percentile(x, 99), 2)} ms`);
        });
      }
    }
    const rows = builds.map((b) => {
      const rs = runs.get(b.name)!;
      const l = lats.get(b.name)!;
      const col = (f: (r: Run) => number, d = 3) => (rs.length ? fmt(rs.map(f), d) : 'n/a');
      return [b.name, col((r) => r.startWallMs, 0), col((r) => r.startCpuMs, 0), col((r) => r.wholeListener), col((r) => r.wholeDb),
        col((r) => r.steadyListener), col((r) => r.steadyDb), col((r) => r.perS, 0),
        l.p50.length ? fmt(l.p50, 2) : 'n/a', l.p99.length ? fmt(l.p99, 2) : 'n/a', l.all.length ? `${round(percentile(l.all, 50), 2)} / ${round(percentile(l.all, 99), 2)}` : 'n/a'];
    });
    console.log(`${ROUNDS} rounds, ${N} messages, ${LISTENERS} listener(s) at concurrency ${CONC}; medians (min–max)`);
    console.log(textTable(['build', 'start wall ms', 'start CPU ms', 'whole listener ms/msg', 'db', 'steady listener ms/msg', 'db', 'msg/s',
      'latency p50', 'p99', 'pooled p50/p99'], rows));
  } finally {
    await stopAllChildren();
    await sink.stop();
    await dbs.dropAll();
  }
}

await main();
