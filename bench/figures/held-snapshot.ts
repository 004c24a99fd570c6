/**
 * Figure 9: delivery while something holds the xmin horizon (a pg_dump, a
 * month-end report, an idle-in-transaction client), after
 * /work/shared/tools/held-snapshot.sh.
 *
 * One listener delivers to the sink what an ERP table's trigger enqueues
 * (bench_erp.doc, AFTER INSERT → cloud.enqueue_message), pgbench inserting at a
 * steady RATE/s (-c 8 -j 2 -R RATE); a second pgbench reads a bystander table
 * (200k rows, primary-key look-ups, 50/s). Two phases of the same run:
 *   quiet   nothing holds a snapshot;
 *   held    a REPEATABLE READ transaction has taken its snapshot (it read the
 *           bystander table) and stays open for the whole phase.
 * Then the holder commits and the queue gets a few seconds to recover (the
 * figure's tail: the runner lets the next figure set itself up meanwhile).
 *
 * Per phase: delivered/s (sink), the ERP's insert rate and latency (pgbench),
 * the listener's claim round trip (its erp_cloud_claim_duration_seconds
 * histogram, mean over the phase), the bystander's query latency, and for every
 * relation of schema cloud (from pg_stat_user_tables, whatever the queue's
 * storage is; cloud.log's partitions are reported apart: the audit grows by
 * design) its dead tuples and size at the end of the phase, and the index
 * entries read per scan of schema cloud's indexes (pg_stat_user_indexes): while
 * the horizon is held no scan may mark a dead entry killed, so every claim walks
 * the entries of every message's pending version since the last rotation
 * (outbox_active: ~9 per scan quiet, 1,400-2,700 held at 1,000/s), which is what
 * makes the claim round trip grow (index_walk_ratio).
 *
 * held_snapshot_ratio = delivered/s held ÷ delivered/s quiet.
 * quick: quiet 2 s, held 30 s, 2 s after release; full: quiet 60 s, held 180 s, 20 s after.
 * Every figure of a phase is a rate or a mean over that phase (delivered/s,
 * inserts/s, mean latencies), so the quiet baseline need not be as long as the
 * held phase: in the quick run it is 2 s (about 2,000 messages), which keeps the
 * quick run within its budget while the hold keeps the 30 s the issue asks for.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchClient, benchPool } from '../lib/db.js';
import { freePort, listenerSettings, meanMs, scrapeHistogram, spawnListener, stopListener, waitListenerIdle, type ListenerProc } from '../lib/listeners.js';
import { putSinkEndpoint } from '../lib/outbox.js';
import { progress, round, sleep } from '../lib/util.js';
import { findPgbench, runPgbench, type PgbenchRun } from './erp-insert.js';

const RATE = 1000;
const BYSTANDER_RATE = 50;

const SETUP = `
create schema bench_erp;
create table bench_erp.doc (id bigserial primary key, customer text, amount numeric, created_at timestamptz default now());
create function bench_erp.doc_to_cloud() returns trigger language plpgsql as $$
begin
  perform cloud.enqueue_message('sink', 'bench.doc',
    jsonb_build_object('id', NEW.id, 'customer', NEW.customer, 'amount', NEW.amount), 'bench_erp.doc', NEW.id::text);
  return null;
end $$;
create trigger doc_to_cloud after insert on bench_erp.doc for each row execute function bench_erp.doc_to_cloud();
create table public.hs_bystander as select g as id, md5(g::text) as v from generate_series(1, 200000) g;
alter table public.hs_bystander add primary key (id);
analyze public.hs_bystander;
`;

const INSERT_SCRIPT = `\\set cid random(1, 5000)
\\set amt random(1, 1000000)
insert into bench_erp.doc (customer, amount) values ('customer-' || :cid, :amt / 100.0);
`;
const BYSTANDER_SCRIPT = `\\set k random(1, 200000)
select v from public.hs_bystander where id = :k;
`;

export interface RelationState {
  relation: string;
  dead_tuples: number;
  live_tuples: number;
  size_bytes: number;
}

export interface QueueState {
  /** Every relation of schema cloud but cloud.log's partitions. */
  dead_tuples: number;
  size_bytes: number;
  /** cloud.log's partitions (the audit: insert-only, grows with the messages in any design). */
  log_size_bytes: number;
  relations: RelationState[];
}

/** An index of schema cloud over one phase: scans, and the entries they read (dead ones included). */
export interface IndexWalk {
  index: string;
  scans: number;
  tuples_read: number;
  /** Entries read per scan: what a claim walks; it grows when dead entries cannot be removed. */
  per_scan: number;
}

export interface PhaseResult {
  phase: string;
  seconds: number;
  delivered_per_s: number;
  enqueued_per_s: number;
  erp_insert: PgbenchRun;
  bystander: PgbenchRun;
  claim_mean_ms: number | null;
  claims: number | null;
  backlog_at_end: number;
  queue: QueueState;
  /** The indexes of schema cloud read most per scan during the phase (pg_stat_user_indexes). */
  index_walk: IndexWalk[];
}

export interface HeldSnapshotResult {
  /**
   * What the figure leaves running when it returns: the wait after release, its measurement and the
   * teardown. It resolves to the figure's after-release keys; the runner merges them and lets the next
   * figure do its set-up meanwhile (see BenchContext.previousTail).
   */
  tail: Promise<{ held_snapshot: Pick<HeldSnapshotResult['held_snapshot'], 'dead_tuples_after_release' | 'queue_size_after_release_bytes'> }>;
  held_snapshot_ratio: number;
  held_snapshot: {
    rate: number;
    phases: PhaseResult[];
    enqueue_ratio: number;
    erp_insert_latency_ratio: number | null;
    claim_latency_ratio: number | null;
    /**
     * The index read most per scan while the snapshot was held, and its entries read per scan held ÷ quiet:
     * dead entries nobody may remove while the horizon is held, walked by every scan (why the claim slows).
     */
    index_walk: { index: string | null; quiet_per_scan: number | null; held_per_scan: number | null };
    index_walk_ratio: number | null;
    bystander_latency_ratio: number | null;
    dead_tuples_quiet: number;
    dead_tuples_held: number;
    /** Set by the tail (null until it ends). */
    dead_tuples_after_release: number | null;
    queue_size_quiet_bytes: number;
    queue_size_held_bytes: number;
    queue_size_after_release_bytes: number | null;
    listener_config: Record<string, unknown>;
  };
}

/** Dead tuples and size of every relation of schema cloud (pg_stat_user_tables: whatever tables the queue uses today). */
async function queueState(pool: pg.Pool): Promise<QueueState> {
  const { rows } = await pool.query<{ relation: string; dead: string; live: string; size: string; is_log: boolean }>(
    `select s.relid::regclass::text relation, s.n_dead_tup dead, s.n_live_tup live, pg_total_relation_size(s.relid) size,
            exists (select from pg_inherits i where i.inhrelid = s.relid and i.inhparent = 'cloud.log'::regclass) is_log
       from pg_stat_user_tables s
      where s.schemaname = 'cloud'
      order by s.n_dead_tup desc, pg_total_relation_size(s.relid) desc`,
  );
  const queue = rows.filter((r) => !r.is_log);
  return {
    dead_tuples: queue.reduce((a, r) => a + Number(r.dead), 0),
    size_bytes: queue.reduce((a, r) => a + Number(r.size), 0),
    log_size_bytes: rows.filter((r) => r.is_log).reduce((a, r) => a + Number(r.size), 0),
    relations: queue.slice(0, 8).map((r) => ({ relation: r.relation, dead_tuples: Number(r.dead), live_tuples: Number(r.live), size_bytes: Number(r.size) })),
  };
}

/** Scans and entries read so far, per index of schema cloud (log partitions aside). */
async function indexReads(pool: pg.Pool): Promise<Map<string, { scans: number; read: number }>> {
  const { rows } = await pool.query<{ index: string; scans: string; read: string }>(
    `select s.indexrelid::regclass::text index, s.idx_scan scans, s.idx_tup_read read
       from pg_stat_user_indexes s
      where s.schemaname = 'cloud'
        and not exists (select from pg_inherits i where i.inhrelid = s.relid and i.inhparent = 'cloud.log'::regclass)`,
  );
  return new Map(rows.map((r) => [r.index, { scans: Number(r.scans), read: Number(r.read) }]));
}

function indexWalk(a: Map<string, { scans: number; read: number }>, b: Map<string, { scans: number; read: number }>): IndexWalk[] {
  const out: IndexWalk[] = [];
  for (const [index, y] of b) {
    const x = a.get(index) ?? { scans: 0, read: 0 };
    const scans = y.scans - x.scans;
    if (scans <= 0) continue;
    out.push({ index, scans, tuples_read: y.read - x.read, per_scan: round((y.read - x.read) / scans, 1) });
  }
  return out.sort((p, q) => q.per_scan - p.per_scan).slice(0, 4);
}

/** The index read most per scan in the held phase, and the same index's figure in the quiet one. */
function walkOf(quiet: PhaseResult, held: PhaseResult): { index: string | null; quiet_per_scan: number | null; held_per_scan: number | null } {
  const top = held.index_walk[0];
  if (!top) return { index: null, quiet_per_scan: null, held_per_scan: null };
  return { index: top.index, held_per_scan: top.per_scan, quiet_per_scan: quiet.index_walk.find((w) => w.index === top.index)?.per_scan ?? null };
}

const ratio = (a: number | null, b: number | null) => (a === null || b === null || b === 0 ? null : round(a / b, 3));

export async function heldSnapshotFigure(ctx: BenchContext): Promise<HeldSnapshotResult> {
  const quietS = ctx.quick ? 2 : 60;
  const heldS = ctx.quick ? 30 : 180;
  const bin = findPgbench();
  progress(`figure 9: held snapshot, ERP inserts at ${RATE}/s through one listener; quiet ${quietS} s, then a REPEATABLE READ snapshot held ${heldS} s`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('held');
  const pool = benchPool(db.url, 'held-snapshot', 2);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'erp-cloud-bench-'));
  const insertFile = path.join(tmp, 'insert.sql');
  const byFile = path.join(tmp, 'bystander.sql');
  writeFileSync(insertFile, INSERT_SCRIPT);
  writeFileSync(byFile, BYSTANDER_SCRIPT);
  let listener: ListenerProc | null = null;
  let holder: pg.Client | null = null;
  const teardown = async () => {
    if (holder) await holder.end().catch(() => undefined);
    if (listener) await stopListener(listener);
    rmSync(tmp, { recursive: true, force: true });
    await pool.end();
    await ctx.dbs.drop(db.name);
  };
  let handedOver = false;
  try {
    await putSinkEndpoint(pool, ctx.sink.url);
    const port = await freePort();
    const env = { ERP_CLOUD_HTTP_PORT: String(port), ERP_CLOUD_HTTP_HOST: '127.0.0.1' };
    // the ERP's tables and the bystander's 200k rows are made while the listener starts (it needs the endpoint only)
    listener = spawnListener(db.url, 'bench-held', env);
    await pool.query(SETUP);
    await waitListenerIdle(pool, listener);
    const metricsUrl = `http://127.0.0.1:${port}/metrics`;
    await ctx.sink.reset();

    // every document enqueued one message: what the ERP committed and the sink has not seen yet
    // (counted outside the queue, so that this works whatever the queue's storage is)
    const pending = async () => {
      const docs = Number((await pool.query<{ n: string }>('select count(*) n from bench_erp.doc')).rows[0]!.n);
      return Math.max(0, docs - (await ctx.sink.stats()).distinct);
    };
    const measure = async (name: string, seconds: number): Promise<PhaseResult> => {
      phase(name);
      const l = listener!;
      if (l.proc.exitCode !== null) throw new Error(`listener exited (${l.proc.exitCode}): ${l.output()}`);
      const c0 = await scrapeHistogram(metricsUrl, 'erp_cloud_claim_duration_seconds');
      const i0 = await indexReads(pool);
      const s0 = (await ctx.sink.stats()).count;
      const [ins, by] = await Promise.all([
        runPgbench(bin, db.url, insertFile, seconds, `held ${name} insert`, { clients: 8, threads: 2, rate: RATE }),
        runPgbench(bin, db.url, byFile, seconds, `held ${name} bystander`, { clients: 1, threads: 1, rate: BYSTANDER_RATE }),
      ]);
      const s1 = (await ctx.sink.stats()).count;
      const c1 = await scrapeHistogram(metricsUrl, 'erp_cloud_claim_duration_seconds');
      const walk = indexWalk(i0, await indexReads(pool));
      const claims = c0 && c1 ? c1.count - c0.count : null;
      const r: PhaseResult = {
        phase: name,
        seconds,
        delivered_per_s: round((s1 - s0) / seconds, 1),
        enqueued_per_s: ins.tps,
        erp_insert: ins,
        bystander: by,
        claim_mean_ms: meanMs(c0, c1),
        claims,
        backlog_at_end: await pending(),
        queue: await queueState(pool),
        index_walk: walk,
      };
      progress(
        `  ${name}: delivered ${r.delivered_per_s}/s, enqueued ${r.enqueued_per_s}/s (insert latency ${ins.latency_avg_ms} ms), claim ${r.claim_mean_ms} ms, ` +
          `bystander ${by.latency_avg_ms} ms, backlog ${r.backlog_at_end}, cloud dead tuples ${r.queue.dead_tuples}, size ${Math.round(r.queue.size_bytes / 1024)} kB, ` +
          `index entries read per scan ${walk.slice(0, 2).map((w) => `${w.index} ${w.per_scan}`).join(', ')}`,
      );
      return r;
    };

    const quiet = await measure('quiet', quietS);
    phase('take the snapshot');
    holder = benchClient(db.url, 'held-snapshot holder');
    await holder.connect();
    await holder.query('begin isolation level repeatable read');
    await holder.query('select count(*) from public.hs_bystander');
    const held = await measure('held', heldS);
    await holder.query('commit');
    await holder.end();
    holder = null;
    // released: what vacuum gets back in a few seconds (autovacuum_naptime is 10 s on the private cluster).
    // Nothing of this figure is measured meanwhile but that count, in this database: the next figure may
    // do its own set-up in its own database during the wait (it measures only once this tail has ended).
    const afterS = ctx.quick ? 2 : 20;
    const tail = (async () => {
      try {
        await sleep(afterS * 1000);
        const after = await queueState(pool);
        progress(`  held snapshot, ${afterS} s after release: cloud dead tuples ${after.dead_tuples}, size ${Math.round(after.size_bytes / 1024)} kB`);
        return { held_snapshot: { dead_tuples_after_release: after.dead_tuples, queue_size_after_release_bytes: after.size_bytes } };
      } finally {
        await teardown();
      }
    })();
    handedOver = true;
    return {
      tail,
      held_snapshot_ratio: round(held.delivered_per_s / quiet.delivered_per_s, 3),
      held_snapshot: {
        rate: RATE,
        phases: [quiet, held],
        enqueue_ratio: round(held.enqueued_per_s / quiet.enqueued_per_s, 3),
        erp_insert_latency_ratio: ratio(held.erp_insert.latency_avg_ms, quiet.erp_insert.latency_avg_ms),
        claim_latency_ratio: ratio(held.claim_mean_ms, quiet.claim_mean_ms),
        index_walk: walkOf(quiet, held),
        index_walk_ratio: ratio(walkOf(quiet, held).held_per_scan, walkOf(quiet, held).quiet_per_scan),
        bystander_latency_ratio: ratio(held.bystander.latency_avg_ms, quiet.bystander.latency_avg_ms),
        dead_tuples_quiet: quiet.queue.dead_tuples,
        dead_tuples_held: held.queue.dead_tuples,
        dead_tuples_after_release: null,
        queue_size_quiet_bytes: quiet.queue.size_bytes,
        queue_size_held_bytes: held.queue.size_bytes,
        queue_size_after_release_bytes: null,
        listener_config: listenerSettings(1, env),
      },
    };
  } finally {
    if (!handedOver) await teardown();
  }
}
