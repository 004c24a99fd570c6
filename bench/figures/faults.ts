/**
 * Figure 8: delivery under 30 % faults (issue 14). The same workload runs
 * twice, each in a fresh migrated database: once against a healthy sink, once
 * with the sink failing a seeded-random 30 % of requests, half of those
 * answered 503 (no Retry-After) and half held unanswered past the endpoint's
 * 1-s timeout (then their connection is dropped). A fault never has an effect.
 *
 * Workload: N messages (3,000; quick 150) enqueued up front for endpoint
 * 'sink', set as a flaky cloud would be: timeout 1 s, 10 attempts, backoff
 * 200 ms doubling to a 10-s cap, rate limit 50/s with a burst of 5, and the
 * circuit breaker as cloud.put_endpoint_limits leaves it by default (the
 * figure measures what a user gets, so the circuit is not tuned). Two
 * `erp-cloud listen` processes. The clock runs from their spawn until no
 * message is pending or in flight (bounded: 10 min, quick 3; a run that times
 * out reports what was sent by then and the rate so far).
 *
 * Quick mode (BENCH_QUICK=1) keeps the shape but not the proportions: 150
 * messages per run, the rate limit and the stream's offer at 150/s, the timeout
 * 300 ms (faults held 1 s), the backoff 50 ms doubling to a 1-s cap and the
 * circuit's cool-down 1 s instead of its default 30 s (one opening would
 * otherwise be most of a quick run), so the four runs take well under 10 s
 * instead of two minutes. The retry tail (the
 * unluckiest chains of retries, a few backoffs long whatever the run's size) is
 * then a much larger share of a 2-s run than of a 60-s one, so quick mode's
 * faults_delivery_ratio and faults_stream_ratio are NOT comparable with the full
 * run's (nor with its 0.6 target: the runner reports them as full-run-only);
 * lost messages and second effects are exact in both modes.
 *
 * Every ~250 ms the bench samples the endpoint row (circuit_state and whatever
 * circuit columns exist) and the unfinished outbox rows; an opening shorter
 * than a sample can be missed by the share and the transition count, not by
 * the count of distinct circuit_opened_at values (unless two fall between
 * the same two samples).
 *
 *   healthy_delivered_per_s   messages sent ÷ seconds, healthy sink
 *   faults_delivered_per_s    the same under faults
 *   faults_delivery_ratio     faults ÷ healthy (target >= 0.6)
 *   faults_lost               messages that ended unsent (failed, dead,
 *                             skipped) or are `sent` while their key never got
 *                             a 2xx at the sink (target 0)
 *   faults_second_effects     keys that got more than one 2xx (target 0)
 *   faults_circuit_open_share share of the samples with circuit_state 'open'
 *   faults_circuit_opens      times the circuit opened, a lower bound: the
 *                             larger of the transitions into 'open' between
 *                             samples and the distinct circuit_opened_at values
 *                             seen (an opening closed again within one sample,
 *                             by answers already in flight, shows only there)
 */
import type pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchPool } from '../lib/db.js';
import { listenerSettings, spawnListener, stopListener, type ListenerProc } from '../lib/listeners.js';
import { enqueueBenchMessages, outboxCounts, type OutboxCounts } from '../lib/outbox.js';
import type { SinkFaults } from '../lib/sink-client.js';
import { epochMs, progress, round, sleep } from '../lib/util.js';

const ENDPOINT = 'sink';
const LISTENERS = 2;
const SAMPLE_MS = 250;
/** A flaky cloud's endpoint: timeouts cost time, retries come back within the run, nothing runs out of attempts. */
const FULL = {
  messages: 3000,
  timeoutMs: 600_000,
  endpoint: { timeout_ms: 1000, max_attempts: 10, backoff_base_ms: 200, backoff_cap_ms: 10_000 },
  limits: { rate_per_s: 50, burst: 5 },
  /** stream: documents the ERP commits per second, in ticks of 100 ms. */
  offerPerS: 50,
  /** Held timeouts outlast the 1-s endpoint timeout, then the connection is dropped. */
  faults: { fail: 0.3, timeoutShare: 0.5, seed: 14, holdMs: 3000 } as SinkFaults,
  /** null: the circuit as cloud.put_endpoint_limits leaves it by default (what a user gets). */
  circuitCooldownMs: null as number | null,
};
type Params = typeof FULL;
/** Quick mode: fewer messages, a higher rate, time constants halved (see the header: its ratios are not the full run's). */
const QUICK: Params = {
  messages: 150,
  timeoutMs: 120_000,
  endpoint: { timeout_ms: 300, max_attempts: 10, backoff_base_ms: 50, backoff_cap_ms: 1_000 },
  limits: { rate_per_s: 150, burst: 5 },
  offerPerS: 150,
  faults: { fail: 0.3, timeoutShare: 0.5, seed: 14, holdMs: 1000 },
  circuitCooldownMs: 1000,
};

export interface FaultRun {
  kind: 'healthy' | 'faults';
  messages: number;
  /** False when the run hit its time bound: sent and per_s are then what was sent by then. */
  finished: boolean;
  seconds: number;
  sent: number;
  per_s: number;
  /** Ended unsent, or `sent` without any 2xx at the sink. */
  lost: number;
  lost_detail: { unsent_terminal: number; sent_without_2xx: number; not_finished: number };
  /** Seconds from spawn until 50/90/99/100 % of the messages had their first 2xx at the sink. */
  first_2xx_by_share_s: { p50: number | null; p90: number | null; p99: number | null; p100: number | null };
  /** 90 % of the messages ÷ the time to their first 2xx (the rate without the retry tail; diagnostic). */
  per_s_to_90pct: number | null;
  second_effects: number;
  second_effect_keys: Array<[string, number]>;
  sink: { requests: number; ok: number; answered503: number; timeouts: number; held_max: number; keys_with_effect: number };
  circuit: {
    samples: number;
    open_share: number;
    half_open_share: number;
    /** Times it opened (lower bound): max(sampled_opens, distinct_opened_at). */
    opens: number;
    /** Transitions into 'open' between consecutive samples. */
    sampled_opens: number;
    /** Distinct circuit_opened_at values seen (catches re-opens between samples), when the column exists. */
    distinct_opened_at: number | null;
    /** Seconds from spawn of each sampled transition into 'open'. */
    opened_at_s: number[];
    /** The endpoint's circuit settings and state at the end (every circuit_* column). */
    endpoint_after: Record<string, unknown>;
  };
  outbox_after: OutboxCounts;
  log_by_outcome: Record<string, number>;
  log_by_error_class: Record<string, number>;
  /** Messages by the attempts they took. */
  attempts_histogram: Record<string, number>;
}

export interface FaultsResult {
  faults_delivery_ratio: number;
  faults_delivered_per_s: number;
  healthy_delivered_per_s: number;
  faults_lost: number;
  faults_second_effects: number;
  faults_circuit_open_share: number;
  faults_circuit_opens: number;
  /** stream workload (OFFER_PER_S a second, endpoint unlimited): faulty ÷ healthy delivered rate, and the same checks */
  faults_stream_ratio: number;
  faults_stream_delivered_per_s: number;
  faults_stream_circuit_open_share: number;
  faults_stream_circuit_opens: number;
  faults_stream_lost: number;
  faults_stream_second_effects: number;
  faults: {
    messages: number;
    /** quick mode: why its ratios are not the full run's (null in a full run) */
    quick_not_comparable: string | null;
    time_bound_s: number;
    endpoint: Params['endpoint'] & Params['limits'] & { circuit: string };
    sink_faults: SinkFaults;
    listeners: Record<string, unknown>;
    healthy: FaultRun;
    faulty: FaultRun;
    stream: { offered_per_s: number; rate_limit: null; healthy: FaultRun; faulty: FaultRun };
  };
}

interface Sample {
  at: number;
  state: string;
  openedAt: string | null;
  unfinished: number;
}

const LOG_COUNTS = {
  outcome: 'select outcome k, count(*)::int n from cloud.log where endpoint = $1 group by 1 order by 1',
  error_class: 'select error_class k, count(*)::int n from cloud.log where endpoint = $1 group by 1 order by 1',
} as const;

/** cloud.log rows of the endpoint by outcome or by error class. */
async function logCounts(pool: pg.Pool, by: keyof typeof LOG_COUNTS): Promise<Record<string, number>> {
  const { rows } = await pool.query<{ k: string | null; n: number }>(LOG_COUNTS[by], [ENDPOINT]);
  return Object.fromEntries(rows.map((r) => [String(r.k), r.n]));
}

/**
 * How the work arrives. backlog: all n messages enqueued before the listeners start, endpoint limited to
 * 50/s (LIMITS). stream: the ERP commits OFFER_PER_S messages a second while the listeners run, endpoint
 * unlimited — the shape of issue 14's report (3,000 documents in a minute to a cloud that fails 30 %).
 */
type Workload = 'backlog' | 'stream';
async function run(ctx: BenchContext, P: Params, kind: 'healthy' | 'faults', workload: Workload = 'backlog'): Promise<FaultRun> {
  const { messages: n, timeoutMs, endpoint: ENDPOINT_SETTINGS, limits: LIMITS, offerPerS: OFFER_PER_S } = P;
  phase('set-up');
  const db = await ctx.dbs.createMigrated(`faults_${workload}_${kind}`);
  const pool = benchPool(db.url, 'faults');
  const procs: ListenerProc[] = [];
  try {
    await pool.query(
      `select cloud.put_endpoint(p_name => $1, p_base_url => $2, p_timeout_ms => $3, p_max_attempts => $4,
                                 p_backoff_base_ms => $5, p_backoff_cap_ms => $6)`,
      [ENDPOINT, `${ctx.sink.url}/webhook`, ENDPOINT_SETTINGS.timeout_ms, ENDPOINT_SETTINGS.max_attempts, ENDPOINT_SETTINGS.backoff_base_ms, ENDPOINT_SETTINGS.backoff_cap_ms],
    );
    // the sink is on 127.0.0.1: the egress guard refuses it unless private addresses are allowed
    await pool.query(`select cloud.put_endpoint_allowlist($1, '{}', '{}', true)`, [ENDPOINT]);
    // circuit threshold and cool-down left to the function's defaults: what a user gets
    if (workload === 'backlog' || P.circuitCooldownMs !== null) {
      // stream: no rate limit (null); quick mode: the circuit's cool-down shortened, its other settings the defaults
      const rate = workload === 'backlog' ? [LIMITS.rate_per_s, LIMITS.burst] : [null, 1];
      if (P.circuitCooldownMs === null) await pool.query(`select cloud.put_endpoint_limits($1, $2, $3)`, [ENDPOINT, ...rate]);
      else await pool.query(`select cloud.put_endpoint_limits($1, $2, $3, p_circuit_cooldown_ms => $4)`, [ENDPOINT, ...rate, P.circuitCooldownMs]);
    }
    if (workload === 'backlog') {
      await enqueueBenchMessages(pool, n, 5000, ENDPOINT);
    }
    await pool.query('analyze cloud.outbox');
    await ctx.sink.reset();
    if (kind === 'faults') await ctx.sink.faults(P.faults);

    const alive = () => {
      for (const p of procs) if (p.proc.exitCode !== null) throw new Error(`listener ${p.workerId} exited (${p.proc.exitCode}): ${p.output()}`);
    };
    phase(`${workload} ${kind} run`);
    const samples: Sample[] = [];
    const t0 = epochMs();
    for (let i = 0; i < LISTENERS; i++) procs.push(spawnListener(db.url, `bench-faults-${i + 1}`));
    // stream: the ERP commits OFFER_PER_S documents a second from now on (bounded by n and by the time bound)
    let enqueued = workload === 'backlog' ? n : 0;
    const feeding = workload === 'backlog' ? Promise.resolve() : (async () => {
      const perTick = OFFER_PER_S / 10;
      for (let tick = 0; enqueued < n && epochMs() - t0 < timeoutMs; tick++) {
        const due = t0 + tick * 100;
        if (due > epochMs()) await sleep(due - epochMs());
        const k = Math.min(perTick, n - enqueued);
        await pool.query(
          `select count(cloud.enqueue_message($2::text, 'bench.ping', jsonb_build_object('i', g, 'note', 'benchmark message')))
             from generate_series(1, $1::int) g`, [k, ENDPOINT]);
        enqueued += k;
      }
    })();
    let finished = false;
    let tEnd = t0;
    // bounded by time and by count; one small query per sample
    const maxSamples = Math.ceil(timeoutMs / SAMPLE_MS) + 10;
    for (let i = 0; i < maxSamples && epochMs() - t0 < timeoutMs; i++) {
      const started = epochMs();
      alive();
      const { rows } = await pool.query<{ e: Record<string, unknown>; unfinished: number }>(
        `select to_jsonb(e) e,
                (select count(*)::int from cloud.outbox where status in ('pending', 'in_flight')) unfinished
           from cloud.endpoint e where e.name = $1`,
        [ENDPOINT],
      );
      const row = rows[0]!;
      const at = epochMs();
      samples.push({
        at: at - t0,
        state: String(row.e.circuit_state),
        openedAt: row.e.circuit_opened_at == null ? null : String(row.e.circuit_opened_at),
        unfinished: row.unfinished,
      });
      if (row.unfinished === 0 && enqueued >= n) {
        finished = true;
        tEnd = at;
        break;
      }
      await sleep(Math.max(1, SAMPLE_MS - (epochMs() - started)));
    }
    if (!finished) tEnd = epochMs();
    await feeding;
    const seconds = (tEnd - t0) / 1000;
    const sentAtEnd = (await pool.query<{ n: number }>(`select count(*)::int n from cloud.outbox where status = 'sent'`)).rows[0]!.n;
    alive();
    await Promise.all(procs.map((p) => stopListener(p)));

    phase('counts');
    const fx = await ctx.sink.effects(true);
    const firstEffects = fx.firstEffects ?? [];
    const withEffect = new Set(firstEffects.map(([k]) => k));
    // seconds from spawn until a share of the messages had their first 2xx: the tail (the unluckiest retry chains) apart from the bulk
    const effectS = firstEffects.map(([, at]) => (at - t0) / 1000).sort((a, b) => a - b);
    const byShare = (p: number) => {
      const k = Math.ceil((p / 100) * n);
      return k >= 1 && k <= effectS.length ? round(effectS[k - 1]!, 2) : null;
    };
    const progressS = { p50: byShare(50), p90: byShare(90), p99: byShare(99), p100: byShare(100) };
    const { rows: outbox } = await pool.query<{ request_id: string; status: string }>(
      `select request_id::text, status from cloud.outbox where endpoint = $1`,
      [ENDPOINT],
    );
    const sentWithout2xx = outbox.filter((r) => r.status === 'sent' && !withEffect.has(r.request_id)).length;
    const unsentTerminal = outbox.filter((r) => !['sent', 'pending', 'in_flight'].includes(r.status)).length;
    const notFinished = outbox.filter((r) => r.status === 'pending' || r.status === 'in_flight').length;
    const endpointAfter = (await pool.query<{ e: Record<string, unknown> }>('select to_jsonb(e) e from cloud.endpoint e where name = $1', [ENDPOINT])).rows[0]!.e;
    const hist = await pool.query<{ attempts: number; n: number }>(
      'select attempts, count(*)::int n from cloud.outbox where endpoint = $1 group by 1 order by 1',
      [ENDPOINT],
    );

    let opens = 0;
    const openedAtS: number[] = [];
    samples.forEach((s, i) => {
      if (s.state === 'open' && (i === 0 || samples[i - 1]!.state !== 'open')) {
        opens++;
        openedAtS.push(round(s.at / 1000, 2));
      }
    });
    const hasOpenedAt = 'circuit_opened_at' in endpointAfter;
    const distinctOpenedAt = hasOpenedAt ? new Set(samples.map((s) => s.openedAt).filter((x) => x !== null)).size : null;
    const share = (state: string) => (samples.length ? round(samples.filter((s) => s.state === state).length / samples.length, 3) : 0);
    const result: FaultRun = {
      kind,
      messages: n,
      finished,
      seconds: round(seconds, 3),
      sent: sentAtEnd,
      per_s: round(sentAtEnd / seconds, 2),
      lost: unsentTerminal + sentWithout2xx,
      lost_detail: { unsent_terminal: unsentTerminal, sent_without_2xx: sentWithout2xx, not_finished: notFinished },
      first_2xx_by_share_s: progressS,
      per_s_to_90pct: progressS.p90 ? round((0.9 * n) / progressS.p90, 2) : null,
      second_effects: fx.secondEffects.length,
      second_effect_keys: fx.secondEffects.slice(0, 20),
      sink: {
        requests: fx.requests,
        ok: fx.ok,
        answered503: fx.answered503,
        timeouts: fx.timeouts,
        held_max: fx.heldMax,
        keys_with_effect: fx.keysWithEffect,
      },
      circuit: {
        samples: samples.length,
        open_share: share('open'),
        half_open_share: share('half_open'),
        opens: Math.max(opens, distinctOpenedAt ?? 0),
        sampled_opens: opens,
        distinct_opened_at: distinctOpenedAt,
        opened_at_s: openedAtS.slice(0, 100),
        endpoint_after: Object.fromEntries(Object.entries(endpointAfter).filter(([k]) => k.startsWith('circuit_'))),
      },
      outbox_after: await outboxCounts(pool),
      log_by_outcome: await logCounts(pool, 'outcome'),
      log_by_error_class: await logCounts(pool, 'error_class'),
      attempts_histogram: Object.fromEntries(hist.rows.map((r) => [String(r.attempts), r.n])),
    };
    progress(
      `  ${kind}: ${result.sent}/${n} sent in ${result.seconds}s = ${result.per_s}/s${finished ? '' : ' (TIMED OUT)'}; ` +
        `90 % by ${String(progressS.p90)}s (${String(result.per_s_to_90pct)}/s); lost ${result.lost}, second effects ${result.second_effects}; sink ${fx.requests} requests (${fx.answered503} 503, ${fx.timeouts} timeouts); ` +
        `circuit open ${Math.round(result.circuit.open_share * 100)} % of ${samples.length} samples, opened ${result.circuit.opens} times (${opens} seen in samples); log ${JSON.stringify(result.log_by_outcome)}`,
    );
    return result;
  } finally {
    phase('teardown');
    await Promise.all(procs.map((p) => stopListener(p)));
    await ctx.sink.reset().catch(() => undefined);
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}

export async function faultsFigure(ctx: BenchContext): Promise<FaultsResult> {
  const P = ctx.quick ? QUICK : FULL;
  const { messages: n, timeoutMs, endpoint: ENDPOINT_SETTINGS, limits: LIMITS, offerPerS: OFFER_PER_S, faults: FAULTS } = P;
  progress(
    `figure 8: delivery under ${FAULTS.fail * 100} % faults, ${n} messages, ${LISTENERS} listeners, ` +
      `${LIMITS.rate_per_s}/s burst ${LIMITS.burst}, timeout ${ENDPOINT_SETTINGS.timeout_ms} ms, ${P.circuitCooldownMs === null ? 'default circuit' : `circuit cool-down ${P.circuitCooldownMs} ms (quick)`}`,
  );
  const healthy = await run(ctx, P, 'healthy');
  const faulty = await run(ctx, P, 'faults');
  progress(`figure 8, stream: the ERP commits ${OFFER_PER_S} documents/s (${n} in all), endpoint unlimited, ${P.circuitCooldownMs === null ? 'default circuit' : `circuit cool-down ${P.circuitCooldownMs} ms (quick)`}`);
  const streamHealthy = await run(ctx, P, 'healthy', 'stream');
  const streamFaulty = await run(ctx, P, 'faults', 'stream');
  const c = faulty.circuit.endpoint_after;
  return {
    faults_stream_ratio: round(streamFaulty.per_s / streamHealthy.per_s, 3),
    faults_stream_delivered_per_s: streamFaulty.per_s,
    faults_stream_circuit_open_share: streamFaulty.circuit.open_share,
    faults_stream_circuit_opens: streamFaulty.circuit.opens,
    faults_stream_lost: streamFaulty.lost,
    faults_stream_second_effects: streamFaulty.second_effects,
    faults_delivery_ratio: round(faulty.per_s / healthy.per_s, 3),
    faults_delivered_per_s: faulty.per_s,
    healthy_delivered_per_s: healthy.per_s,
    faults_lost: faulty.lost,
    faults_second_effects: faulty.second_effects,
    faults_circuit_open_share: faulty.circuit.open_share,
    faults_circuit_opens: faulty.circuit.opens,
    faults: {
      messages: n,
      quick_not_comparable: ctx.quick
        ? `quick mode: ${n} messages at ${OFFER_PER_S}/s with a 300-ms timeout, a 50-ms backoff doubling to ${P.endpoint.backoff_cap_ms / 1000} s and a ${(P.circuitCooldownMs ?? 0) / 1000}-s circuit cool-down; the retry tail weighs far more than in the full run, so its ratios are not comparable with the full run's`
        : null,
      time_bound_s: timeoutMs / 1000,
      endpoint: {
        ...ENDPOINT_SETTINGS,
        ...LIMITS,
        circuit: `defaults: threshold ${String(c.circuit_threshold)}, cool-down ${String(c.circuit_cooldown_ms)} ms`,
      },
      sink_faults: FAULTS,
      listeners: listenerSettings(LISTENERS),
      healthy,
      faulty,
      stream: { offered_per_s: OFFER_PER_S, rate_limit: null, healthy: streamHealthy, faulty: streamFaulty },
    },
  };
}
