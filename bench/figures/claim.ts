/**
 * Figure 4: does the queue stay healthy? The claim/complete cycle
 * (cloud.claim_messages + cloud.record_attempts, no HTTP) is timed over a
 * 20,000-message window (quick: 2,000) on a fresh database; then 1,000,000
 * messages (quick: 10,000; time budget 300 s, quick 3 s) are pushed through
 * the same cycle as fast as possible; after a
 * short pause in which autovacuum may run (no manual VACUUM: the point is
 * whether the table stays healthy on its own), the same window is timed again.
 * A brand-new table has no planner statistics (autoanalyze has not run yet),
 * so a second fresh window is timed right after ANALYZE as a control; the
 * headline ratio is against the first, as-is fresh window.
 *
 * For evidence, one claim+record cycle of 100 after each window is run with
 * auto_explain (nested statements, ANALYZE, BUFFERS) and the plans are written
 * to bench/results/claim-plans.txt; table and index sizes and the outbox's
 * vacuum statistics go into the results.
 */
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchClient } from '../lib/db.js';
import { enqueueBenchMessages } from '../lib/outbox.js';
import { progress, round, sleep } from '../lib/util.js';

const WORKER = 'bench';
/** Messages per measured window and per enqueue within it (full; quick uses QUICK_WINDOW in one chunk). */
const WINDOW = 20_000;
const QUICK_WINDOW = 2_000;
const ENQUEUE_CHUNK = 10_000;

export interface WindowResult {
  messages: number;
  seconds: number;
  per_s: number;
  batch: number;
  batches: number;
  batch_ms_p50: number;
  batch_ms_max: number;
}

export interface StatementTime {
  statement: string;
  calls: number;
  total_ms: number;
  max_ms: number;
}

export interface ClaimResult {
  claim_after_1m_ratio: number;
  claim_fresh_per_s: number;
  claim_after_1m_per_s: number;
  /** Control: after ÷ a second fresh-database window measured right after ANALYZE (not VACUUM). */
  claim_after_1m_vs_analyzed_ratio: number;
  claim: {
    fresh: WindowResult;
    fresh_analyzed: WindowResult;
    after: WindowResult;
    pushed_messages: number;
    push_target: number;
    push_seconds: number;
    push_per_s: number;
    push_claim_batch: number;
    push_chunk: number;
    push_budget_s: number;
    autovacuum_wait_s: number;
    autovacuum_finished_during_wait: boolean;
    autovacuum_during_after_window: boolean;
    manual_vacuum: false;
    outbox_stats_after_push: Record<string, unknown>;
    outbox_stats_after_wait: Record<string, unknown>;
    sizes_fresh: Record<string, string>;
    sizes_after: Record<string, string>;
    explain_fresh: StatementTime[];
    explain_after: StatementTime[];
  };
  plansText: string;
}

/** n messages in one statement (n <= ENQUEUE_CHUNK everywhere below). */
async function enqueue(c: pg.Client, n: number): Promise<void> {
  await enqueueBenchMessages(c, n, ENQUEUE_CHUNK);
}

/** One claim + record cycle; returns how many messages it moved. */
async function cycle(c: pg.Client, batch: number): Promise<number> {
  const { rows } = await c.query<{ request_id: string; attempt: number }>(
    'select request_id, attempt from cloud.claim_messages($1, $2)',
    [WORKER, batch],
  );
  if (rows.length === 0) return 0;
  const startedAt = new Date().toISOString();
  const results = rows.map((r) => ({
    request_id: r.request_id, attempt: r.attempt, outcome: 'ok', http_status: 200, duration_ms: 1.234, started_at: startedAt,
  }));
  const rec = await c.query<{ status: string }>('select status from cloud.record_attempts($1, $2::jsonb)', [WORKER, JSON.stringify(results)]);
  const notSent = rec.rows.filter((r) => r.status !== 'sent');
  if (notSent.length) throw new Error(`record_attempts returned ${notSent.length} non-sent outcomes, e.g. ${notSent[0]!.status}`);
  return rows.length;
}

/** Drains `n` just-enqueued messages in batches of `batch`; bounded by the batch count. Returns ms per batch. */
async function drain(c: pg.Client, n: number, batch: number): Promise<number[]> {
  const times: number[] = [];
  let left = n;
  const maxBatches = Math.ceil(n / batch) + 10;
  while (left > 0) {
    if (times.length >= maxBatches) throw new Error(`drain did not finish in ${maxBatches} batches (${left} left)`);
    const t = performance.now();
    const moved = await cycle(c, batch);
    times.push(performance.now() - t);
    if (moved === 0) throw new Error(`claim returned nothing with ${left} messages still expected`);
    left -= moved;
  }
  return times;
}

/** The measured window: enqueue `chunk` (untimed), claim+record them in batches of 100 (timed); until `window` are done. */
async function measureWindow(c: pg.Client, window: number): Promise<WindowResult> {
  const batch = 100;
  const chunk = Math.min(window, ENQUEUE_CHUNK);
  const times: number[] = [];
  for (let done = 0; done < window; done += chunk) {
    await enqueue(c, chunk);
    times.push(...(await drain(c, chunk, batch)));
  }
  const ms = times.reduce((a, b) => a + b, 0);
  const sorted = [...times].sort((a, b) => a - b);
  return {
    messages: window,
    seconds: round(ms / 1000, 3),
    per_s: round(window / (ms / 1000), 1),
    batch,
    batches: times.length,
    batch_ms_p50: round(sorted[Math.floor(sorted.length / 2)]!, 2),
    batch_ms_max: round(sorted[sorted.length - 1]!, 2),
  };
}

async function outboxStats(c: pg.Client): Promise<Record<string, unknown>> {
  const { rows } = await c.query(
    `select n_live_tup, n_dead_tup, n_tup_hot_upd, n_tup_upd, autovacuum_count, autoanalyze_count, vacuum_count,
            last_autovacuum, last_autoanalyze
       from pg_stat_user_tables where relid = 'cloud.outbox'::regclass`,
  );
  return rows[0] ?? {};
}

/** Is a (auto)vacuum of cloud.outbox running right now? */
async function vacuumRunning(c: pg.Client): Promise<boolean> {
  const { rows } = await c.query(`select 1 from pg_stat_progress_vacuum where relid = 'cloud.outbox'::regclass`);
  return rows.length > 0;
}

async function sizes(c: pg.Client): Promise<Record<string, string>> {
  const { rows } = await c.query<{ name: string; size: string }>(
    `select c.oid::regclass::text as name, pg_size_pretty(pg_relation_size(c.oid)) as size
       from pg_class c join pg_namespace n on n.oid = c.relnamespace
      where n.nspname = 'cloud' and c.relkind in ('r', 'i') and (c.relname like 'outbox%' or c.relname like 'log%')
        and pg_relation_size(c.oid) > 0
      order by pg_relation_size(c.oid) desc`,
  );
  return Object.fromEntries(rows.map((r) => [r.name, r.size]));
}

/** One claim+record cycle of 100 with auto_explain on; returns the plans (as LOG messages sent to this client). */
async function explainCycle(c: pg.Client, label: string): Promise<{ text: string; summary: StatementTime[] }> {
  await enqueue(c, 100);
  const logs: string[] = [];
  const onNotice = (n: { message?: string }) => {
    if (n.message?.startsWith('duration:')) logs.push(n.message);
  };
  c.on('notice', onNotice);
  try {
    await c.query(`load 'auto_explain'`);
    await c.query(
      `set auto_explain.log_min_duration = 0; set auto_explain.log_analyze = on; set auto_explain.log_buffers = on;
       set auto_explain.log_nested_statements = on; set auto_explain.log_timing = on; set client_min_messages = log`,
    );
    await cycle(c, 100);
  } finally {
    await c.query('set client_min_messages = notice; set auto_explain.log_min_duration = -1');
    c.off('notice', onNotice);
  }
  // one entry per distinct statement (nested ones included), slowest first
  const byStatement = new Map<string, StatementTime>();
  for (const l of logs) {
    const ms = Number(/^duration: ([\d.]+) ms/.exec(l)?.[1] ?? NaN);
    const text = /Query Text: ([\s\S]*?)\n(?=\S)/.exec(l)?.[1] ?? l.split('\n')[1] ?? '';
    const statement = text.replace(/\s+/g, ' ').trim().slice(0, 140);
    const e = byStatement.get(statement) ?? { statement, calls: 0, total_ms: 0, max_ms: 0 };
    e.calls++;
    e.total_ms = round(e.total_ms + ms, 3);
    e.max_ms = Math.max(e.max_ms, round(ms, 3));
    byStatement.set(statement, e);
  }
  const summary = [...byStatement.values()].sort((a, b) => b.total_ms - a.total_ms);
  return { text: `===== ${label} =====\n${logs.join('\n\n')}\n`, summary };
}

export async function claimFigure(ctx: BenchContext): Promise<ClaimResult> {
  const pushTarget = ctx.quick ? 10_000 : 1_000_000;
  const pushBudgetMs = ctx.quick ? 3_000 : 300_000;
  const window = ctx.quick ? QUICK_WINDOW : WINDOW;
  // quick: none (autovacuum_naptime is 10 s on the private cluster: a wait of a second or two was a coin toss
  // that never saw one finish in a quick run, so the quick figure is the claim amid the dead tuples as they are)
  const autovacWaitMs = ctx.quick ? 0 : 20_000;
  const pushBatch = 1000;
  /** Messages enqueued, then drained, per push step; the time budget is checked between steps. */
  const pushChunk = ctx.quick ? 5_000 : ENQUEUE_CHUNK;
  progress(`figure 4: claim/complete cycle fresh vs after ${pushTarget.toLocaleString('en')} messages`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('claim');
  const c = benchClient(db.url, 'claim');
  await c.connect();
  try {
    // never called: claims here are reported ok without any HTTP
    await c.query(`select cloud.put_endpoint('sink', 'http://127.0.0.1:9/unused')`);

    phase('fresh windows');
    const fresh = await measureWindow(c, window);
    progress(`  fresh: ${fresh.per_s} msg/s (batch p50 ${fresh.batch_ms_p50} ms)`);
    // control: a fresh table has no planner statistics until autoanalyze gets to it;
    // measure a second window right after ANALYZE so the comparison is not only about that
    await c.query('analyze cloud.outbox');
    const freshAnalyzed = await measureWindow(c, window);
    progress(`  fresh, analyzed: ${freshAnalyzed.per_s} msg/s (batch p50 ${freshAnalyzed.batch_ms_p50} ms)`);
    phase('explain');
    const explainFresh = await explainCycle(c, 'fresh database (analyzed)');
    const sizesFresh = await sizes(c);

    // push phase: bounded by count and by time
    phase('push');
    const t0 = performance.now();
    let pushed = 0;
    let nextReport = 100_000;
    while (pushed < pushTarget && performance.now() - t0 < pushBudgetMs) {
      const n = Math.min(pushChunk, pushTarget - pushed);
      await enqueue(c, n);
      await drain(c, n, pushBatch);
      pushed += n;
      if (pushed >= nextReport) {
        progress(`  pushed ${pushed.toLocaleString('en')} (${round(pushed / ((performance.now() - t0) / 1000), 0)}/s)`);
        nextReport += 100_000;
      }
    }
    const pushSeconds = (performance.now() - t0) / 1000;
    if (pushed < pushTarget) progress(`  push stopped at its time budget: ${pushed} of ${pushTarget}`);
    const statsAfterPush = await outboxStats(c);

    // let autovacuum do its job, if it wants to (bounded); no manual VACUUM.
    // Waits until one has finished since the push ended and none is running, or the budget is spent.
    phase('autovacuum wait');
    const avBefore = Number(statsAfterPush.autovacuum_count ?? 0);
    const waitStart = Date.now();
    let vacuumedDuringWait = false;
    while (Date.now() - waitStart < autovacWaitMs) {
      await sleep(500);
      const s = await outboxStats(c);
      vacuumedDuringWait = Number(s.autovacuum_count ?? 0) > avBefore;
      if (vacuumedDuringWait && !(await vacuumRunning(c))) break;
    }
    const waited = (Date.now() - waitStart) / 1000;
    const statsAfterWait = await outboxStats(c);
    progress(`  waited ${waited.toFixed(1)} s for autovacuum (one finished: ${vacuumedDuringWait}); outbox n_dead_tup ${String(statsAfterWait.n_dead_tup)}`);

    phase('after window');
    const avCountBefore = Number((await outboxStats(c)).autovacuum_count ?? 0);
    const runningAtStart = await vacuumRunning(c);
    const after = await measureWindow(c, window);
    const autovacuumDuringAfter = runningAtStart || (await vacuumRunning(c)) || Number((await outboxStats(c)).autovacuum_count ?? 0) > avCountBefore;
    progress(`  after: ${after.per_s} msg/s (batch p50 ${after.batch_ms_p50} ms)`);
    phase('explain');
    const explainAfter = await explainCycle(c, `after ${pushed} messages`);
    const sizesAfter = await sizes(c);

    return {
      claim_after_1m_ratio: round(after.per_s / fresh.per_s, 3),
      claim_fresh_per_s: fresh.per_s,
      claim_after_1m_per_s: after.per_s,
      claim_after_1m_vs_analyzed_ratio: round(after.per_s / freshAnalyzed.per_s, 3),
      claim: {
        fresh,
        fresh_analyzed: freshAnalyzed,
        after,
        pushed_messages: pushed,
        push_target: pushTarget,
        push_seconds: round(pushSeconds, 1),
        push_per_s: round(pushed / pushSeconds, 0),
        push_claim_batch: pushBatch,
        push_chunk: pushChunk,
        push_budget_s: pushBudgetMs / 1000,
        autovacuum_wait_s: round(waited, 1),
        autovacuum_finished_during_wait: vacuumedDuringWait,
        autovacuum_during_after_window: autovacuumDuringAfter,
        manual_vacuum: false,
        outbox_stats_after_push: statsAfterPush,
        outbox_stats_after_wait: statsAfterWait,
        sizes_fresh: sizesFresh,
        sizes_after: sizesAfter,
        explain_fresh: explainFresh.summary,
        explain_after: explainAfter.summary,
      },
      plansText: explainFresh.text + '\n' + explainAfter.text,
    };
  } finally {
    phase('teardown');
    await c.end().catch(() => undefined);
    await ctx.dbs.drop(db.name);
  }
}
