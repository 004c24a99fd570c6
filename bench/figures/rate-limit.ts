/**
 * Figure 5: rate-limit accuracy. Endpoint 'limited' is limited to 50 requests/s
 * (burst 1) with cloud.put_endpoint_limits; three `erp-cloud listen` processes
 * share that one token bucket. The endpoint points at the webhook simulator
 * (listener/sim, in this process: at 50 req/s it is light), whose own gateway
 * limit is 55/s with a burst of 5, so any overshoot by the listeners shows up
 * as a 429 there.
 *
 * More than enough messages (50/s × duration × 1.5) are enqueued first, so the
 * queue never runs dry; the listeners start, and from the first request the
 * simulator answered 200, for exactly `duration` seconds (20, quick 5), the
 * 200s the simulator received are counted by their arrival times:
 *   rate_limit_delivered_per_s = 200s in the window ÷ duration
 *   rate_limit_accuracy        = delivered_per_s ÷ 50, by arrival: context. Arrival times carry the
 *                                network's and the simulator's jitter: an arrival that opens the window
 *                                a few ms late lets one more in at the other edge (1002 against 1001
 *                                allowed in one run of three, while the same run's sends went at 49.86/s)
 *   rate_limit_send_accuracy   = the sends cloud.log records (started_at: when a listener decided the
 *                                message may go) in [first send, first send + duration) ÷ (50 ×
 *                                duration), the target, within [0.95, 1 + 1/(50 × duration)]: the
 *                                bucket's one burst token is spent on the send that opens the window,
 *                                so a bucket that is exact lets 50 × duration + 1 go
 *   span_rate_per_s            = the mean rate between the window's first and last arrival (and the
 *                                same for the sends): free of a count's one-message resolution
 *   rate_limit_429s            = requests the simulator answered 429 (fault
 *                                'rate_limited'), over the whole run (target 0)
 *   rate_limit_max_1s          = most requests arriving in any 1-second sliding
 *                                window, over the whole run
 */
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchPool } from '../lib/db.js';
import { listenerSettings, spawnListener, stopListener, type ListenerProc } from '../lib/listeners.js';
import { enqueueBenchMessages, outboxCounts, type OutboxCounts } from '../lib/outbox.js';
import { epochMs, percentile, progress, round, sleep, waitFor } from '../lib/util.js';
import { startSim, webhookRoutes, type RequestRecord, type SimServer } from '../../listener/sim/index.js';

const ENDPOINT = 'limited';
const RATE_PER_S = 50;
const BURST = 1;
const LISTENERS = 3;
/** The simulator's gateway: slightly above our limit, so only a real overshoot is refused. */
const SIM_GATE = { perSecond: 55, burst: 5 };
/** After the window closes, how long to wait for requests already in flight to be answered. */
const SETTLE_MS = 300;

export interface RateLimitResult {
  rate_limit_delivered_per_s: number;
  rate_limit_accuracy: number;
  /** Sends cloud.log records (started_at) in [first send, first send + window) ÷ (50 × window): what the bucket promises. */
  rate_limit_send_accuracy: number;
  rate_limit_429s: number;
  rate_limit_max_1s: number;
  rate_limit: {
    limit_per_s: number;
    burst: number;
    listeners: number;
    window_s: number;
    /** 200s whose arrival fell in [first 200, first 200 + window). */
    window_ok: number;
    /** Every request arriving in the window, whatever its answer. */
    window_requests: number;
    window_429s: number;
    /** Most requests arriving in any 1-s sliding window inside the measured window. */
    window_max_1s: number;
    /** Most sends cloud.log records (started_at) in any 1-s sliding window, over the whole run. */
    log_max_1s: number;
    /** 200s in the window less one, over the time between the first and the last (arrivals at the simulator). */
    span_rate_per_s: number | null;
    /** The same for the sends cloud.log records (started_at: when a listener decided the message may go), from the first over `window_s`. */
    log_span_rate_per_s: number | null;
    /** Gaps between consecutive 200s in the window. */
    gap_ms_p50: number;
    gap_ms_p99: number;
    gap_ms_max: number;
    /** From listener spawn to the first 200 at the simulator. */
    first_delivery_after_ms: number;
    run_requests: number;
    run_statuses: Record<string, number>;
    run_faults: Record<string, number>;
    enqueued: number;
    outbox_after: OutboxCounts;
    /** The queue still had pending work when the listeners stopped: the rate was limited by the bucket, not by supply. */
    backlog_left: boolean;
    /** 429s the listeners recorded in cloud.log (should match the simulator's). */
    log_429s: number;
    /** Attempts per listener (cloud.log, whole run): the three share one bucket. */
    attempts_by_worker: Record<string, number>;
    /** Median gap between consecutive attempts as the listeners timed them (cloud.log.started_at, whole run). */
    log_gap_ms_p50: number | null;
    sim_gateway: { perSecond: number; burst: number };
    config: Record<string, unknown>;
  };
}

/** Most arrivals within any half-open 1-second span [t, t + 1000), for sorted times. */
function maxInOneSecond(sortedAt: number[]): number {
  let best = 0;
  let i = 0;
  for (let j = 0; j < sortedAt.length; j++) {
    while (sortedAt[j]! - sortedAt[i]! >= 1000) i++;
    best = Math.max(best, j - i + 1);
  }
  return best;
}

function tally(values: Array<string | number | null>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const v of values) out[String(v)] = (out[String(v)] ?? 0) + 1;
  return out;
}

export async function rateLimitFigure(ctx: BenchContext): Promise<RateLimitResult> {
  const windowS = ctx.quick ? 5 : 20;
  const n = Math.ceil(RATE_PER_S * windowS * 1.5);
  progress(`figure 5: rate-limit accuracy, ${LISTENERS} listeners, ${RATE_PER_S}/s burst ${BURST}, ${windowS} s window, ${n} messages`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('ratelimit');
  const pool = benchPool(db.url, 'rate-limit');
  const procs: ListenerProc[] = [];
  let sim: SimServer | null = null;
  try {
    sim = await startSim({ routes: webhookRoutes(), name: 'bench-limited' });
    sim.setRateLimit(SIM_GATE);
    await pool.query(`select cloud.put_endpoint($1, $2)`, [ENDPOINT, `${sim.url}/webhook`]);
    await pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [ENDPOINT]);
    await pool.query(`select cloud.put_endpoint_limits($1, $2, $3)`, [ENDPOINT, RATE_PER_S, BURST]);
    await enqueueBenchMessages(pool, n, 5000, ENDPOINT);
    await pool.query('analyze cloud.outbox');
    sim.reset();
    sim.setRateLimit(SIM_GATE); // a full gateway bucket at the start

    const alive = () => {
      for (const p of procs) if (p.proc.exitCode !== null) throw new Error(`listener ${p.workerId} exited (${p.proc.exitCode}): ${p.output()}`);
    };
    phase('spawn to first 200');
    const spawnedAt = epochMs();
    for (let i = 0; i < LISTENERS; i++) procs.push(spawnListener(db.url, `bench-rl-${i + 1}`));
    const s = sim;
    // in-memory polls of the simulator's log only: no database load while the listeners work
    const t0 = await waitFor(
      () => {
        alive();
        return s.requests().find((r) => r.status === 200)?.at;
      },
      { timeoutMs: 30_000, intervalMs: 10, what: `the first delivery to '${ENDPOINT}'` },
    );
    phase('window and settle');
    const t1 = t0 + windowS * 1000;
    // bounded: the window is fixed; wake every 250 ms to notice a listener that died
    while (epochMs() < t1 + SETTLE_MS) {
      alive();
      await sleep(Math.min(250, Math.max(1, t1 + SETTLE_MS - epochMs())));
    }
    alive();
    phase('stop and count');
    await Promise.all(procs.map((p) => stopListener(p)));

    const all: RequestRecord[] = s.requests().sort((a, b) => a.at - b.at);
    const inWindow = all.filter((r) => r.at >= t0 && r.at < t1);
    const ok = inWindow.filter((r) => r.status === 200);
    const okAt = ok.map((r) => r.at);
    const gaps = okAt.slice(1).map((at, i) => at - okAt[i]!);
    const is429 = (r: RequestRecord) => r.status === 429 || r.fault === 'rate_limited';
    const counts = await outboxCounts(pool);
    const log429 = (await pool.query<{ n: number }>('select count(*)::int n from cloud.log where http_status = 429')).rows[0]!.n;
    const byWorker = await pool.query<{ worker_id: string; n: number }>(
      'select worker_id, count(*)::int n from cloud.log group by worker_id order by worker_id',
    );
    const logGap = await pool.query<{ p50: number | null }>(
      `select (percentile_cont(0.5) within group (order by gap))::float8 p50
         from (select extract(epoch from started_at - lag(started_at) over (order by started_at)) * 1000 gap from cloud.log) g
        where gap is not null`,
    );

    // the mean rate between the window's first and last 200 (and between the first and last send the log
    // records in the window): free of the count's one-message resolution at the window's edges
    const spanRate = (at: number[]) => (at.length > 1 ? round(((at.length - 1) * 1000) / (at[at.length - 1]! - at[0]!), 3) : null);
    const logAt = (await pool.query<{ ms: number }>(
      `select extract(epoch from started_at)::float8 * 1000 ms from cloud.log where outcome = 'ok' order by started_at`,
    )).rows.map((r) => r.ms);
    const firstLog = logAt[0] ?? 0;
    const logInWindow = logAt.filter((at) => at < firstLog + windowS * 1000);

    const deliveredPerS = ok.length / windowS;
    const result: RateLimitResult = {
      rate_limit_delivered_per_s: round(deliveredPerS, 2),
      rate_limit_accuracy: round(deliveredPerS / RATE_PER_S, 3),
      rate_limit_send_accuracy: round(logInWindow.length / (RATE_PER_S * windowS), 3),
      rate_limit_429s: all.filter(is429).length,
      rate_limit_max_1s: maxInOneSecond(all.map((r) => r.at)),
      rate_limit: {
        limit_per_s: RATE_PER_S,
        burst: BURST,
        listeners: LISTENERS,
        window_s: windowS,
        window_ok: ok.length,
        window_requests: inWindow.length,
        window_429s: inWindow.filter(is429).length,
        window_max_1s: maxInOneSecond(inWindow.map((r) => r.at)),
        log_max_1s: maxInOneSecond(logAt),
        span_rate_per_s: spanRate(okAt),
        log_span_rate_per_s: spanRate(logInWindow),
        gap_ms_p50: round(percentile(gaps, 50), 2),
        gap_ms_p99: round(percentile(gaps, 99), 2),
        gap_ms_max: round(gaps.length ? Math.max(...gaps) : NaN, 2),
        first_delivery_after_ms: round(t0 - spawnedAt, 1),
        run_requests: all.length,
        run_statuses: tally(all.map((r) => r.status)),
        run_faults: tally(all.map((r) => r.fault)),
        enqueued: n,
        outbox_after: counts,
        backlog_left: counts.pending > 0,
        log_429s: log429,
        attempts_by_worker: Object.fromEntries(byWorker.rows.map((r) => [r.worker_id, r.n])),
        log_gap_ms_p50: logGap.rows[0]?.p50 == null ? null : round(logGap.rows[0].p50, 2),
        sim_gateway: SIM_GATE,
        config: listenerSettings(LISTENERS),
      },
    };
    progress(
      `  ${ok.length} delivered in ${windowS} s = ${result.rate_limit_delivered_per_s}/s (accuracy ${result.rate_limit_accuracy}); ` +
        `span rate ${result.rate_limit.span_rate_per_s}/s (sends ${result.rate_limit.log_span_rate_per_s}/s); 429s ${result.rate_limit_429s}; max in 1 s ${result.rate_limit_max_1s} (sends ${result.rate_limit.log_max_1s}); gaps p50 ${result.rate_limit.gap_ms_p50} ms, max ${result.rate_limit.gap_ms_max} ms`,
    );
    if (!result.rate_limit.backlog_left) progress('  WARNING: the queue ran dry: the figure measured supply, not the limit');
    return result;
  } finally {
    phase('teardown');
    await Promise.all(procs.map((p) => stopListener(p)));
    await sim?.close().catch(() => undefined);
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}
