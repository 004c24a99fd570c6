/**
 * Figure 2: commit-to-delivery latency with an idle listener. One listener
 * runs and has declared itself idle; the bench commits single-message ERP
 * transactions ~20 ms apart and notes the epoch time right after each COMMIT
 * returns. The sink (another process) notes when the request with that
 * Idempotency-Key (= request_id) arrived. Latency = receive − commit.
 */
import pg from 'pg';
import type { BenchContext } from '../lib/context.js';
import { phase } from '../lib/phases.js';
import { benchClient, benchPool } from '../lib/db.js';
import { freePort, listenerSettings, meanMs, scrapeHistogram, spawnListener, stopListener, waitListenerIdle, type ListenerProc } from '../lib/listeners.js';
import { putSinkEndpoint } from '../lib/outbox.js';
import { epochMs, percentile, progress, round, sleep, waitFor } from '../lib/util.js';

export interface LatencyResult {
  latency_p50_ms: number;
  latency_p99_ms: number;
  latency: {
    samples: number;
    spacing_ms: number;
    mean_ms: number;
    p90_ms: number;
    max_ms: number;
    min_ms: number;
    over_100ms: number;
    /** The listener's own view (its /metrics), mean over the measured messages: a claim that brought work, and the HTTP attempt. */
    claim_with_work_mean_ms: number | null;
    attempt_mean_ms: number | null;
    warmup_messages: number;
    config: Record<string, unknown>;
  };
}

async function sendOne(client: pg.Client, seq: number): Promise<{ id: string; committedAt: number }> {
  await client.query('begin');
  const { rows } = await client.query<{ id: string }>(
    `select cloud.enqueue_message('sink', 'bench.ping', jsonb_build_object('seq', $1::int)) as id`,
    [seq],
  );
  await client.query('commit');
  return { id: rows[0]!.id, committedAt: epochMs() };
}

/** Sends `count` transactions on a fixed ~spacing cadence; returns commit times by request_id. */
async function sendPaced(client: pg.Client, count: number, spacingMs: number, seqBase: number): Promise<Map<string, number>> {
  const commits = new Map<string, number>();
  const start = epochMs();
  for (let i = 0; i < count; i++) {
    const wait = start + i * spacingMs - epochMs();
    if (wait > 0) await sleep(wait);
    const { id, committedAt } = await sendOne(client, seqBase + i);
    commits.set(id, committedAt);
  }
  return commits;
}

export async function latencyFigure(ctx: BenchContext): Promise<LatencyResult> {
  const samples = ctx.quick ? 100 : 300;
  const warmup = 20;
  // far apart enough that the listener is idle (waiting on LISTEN) when each commits: 10 ms apart, the
  // report, the empty claim and the due-time look-up after a delivery overlapped the next commit now and
  // then, and the quick run's p99 went from 4–6 ms to 10–11 ms
  const spacingMs = 20;
  progress(`figure 2: commit-to-sink latency, ${samples} transactions ${spacingMs} ms apart`);
  phase('set-up');
  const db = await ctx.dbs.createMigrated('latency');
  const pool = benchPool(db.url, 'latency');
  const client = benchClient(db.url, 'latency erp');
  let listener: ListenerProc | null = null;
  try {
    await putSinkEndpoint(pool, ctx.sink.url);
    await client.connect();
    const port = await freePort();
    const env = { ERP_CLOUD_HTTP_PORT: String(port), ERP_CLOUD_HTTP_HOST: '127.0.0.1' };
    const metricsUrl = `http://127.0.0.1:${port}/metrics`;
    phase('listener start');
    listener = spawnListener(db.url, 'bench-latency', env);
    await waitListenerIdle(pool, listener);

    // warm-up: connections, JIT, keep-alive sockets; not counted
    phase('warm-up');
    await ctx.sink.reset();
    await sendPaced(client, warmup, spacingMs, -warmup);
    await waitFor(async () => (await ctx.sink.stats()).count >= warmup, { timeoutMs: 10_000, what: 'warm-up deliveries' });
    await waitListenerIdle(pool, listener, 5000);
    await ctx.sink.reset();

    phase('measured');
    const claims0 = await scrapeHistogram(metricsUrl, 'erp_cloud_claim_duration_seconds', 'result="work"');
    const attempts0 = await scrapeHistogram(metricsUrl, 'erp_cloud_attempt_duration_seconds');
    const commits = await sendPaced(client, samples, spacingMs, 0);
    await waitFor(async () => (await ctx.sink.stats()).distinct >= samples, {
      timeoutMs: 15_000,
      what: `${samples} deliveries at the sink`,
    });
    await waitListenerIdle(pool, listener, 5000);
    const claims1 = await scrapeHistogram(metricsUrl, 'erp_cloud_claim_duration_seconds', 'result="work"');
    const attempts1 = await scrapeHistogram(metricsUrl, 'erp_cloud_attempt_duration_seconds');
    const received = await ctx.sink.times([...commits.keys()]);
    const lat: number[] = [];
    for (const [id, at] of commits) {
      const got = received.get(id);
      if (got === undefined) throw new Error(`sink never saw request ${id}`);
      lat.push(got - at);
    }
    const result: LatencyResult = {
      latency_p50_ms: round(percentile(lat, 50), 2),
      latency_p99_ms: round(percentile(lat, 99), 2),
      latency: {
        samples: lat.length,
        spacing_ms: spacingMs,
        mean_ms: round(lat.reduce((a, b) => a + b, 0) / lat.length, 2),
        p90_ms: round(percentile(lat, 90), 2),
        max_ms: round(Math.max(...lat), 2),
        min_ms: round(Math.min(...lat), 2),
        over_100ms: lat.filter((x) => x > 100).length,
        claim_with_work_mean_ms: meanMs(claims0, claims1),
        attempt_mean_ms: meanMs(attempts0, attempts1),
        warmup_messages: warmup,
        config: listenerSettings(1, env),
      },
    };
    progress(`  p50 ${result.latency_p50_ms} ms, p99 ${result.latency_p99_ms} ms, max ${result.latency.max_ms} ms; listener: claim ${result.latency.claim_with_work_mean_ms} ms, attempt ${result.latency.attempt_mean_ms} ms (means)`);
    return result;
  } finally {
    phase('teardown');
    if (listener) await stopListener(listener);
    await client.end().catch(() => undefined);
    await pool.end();
    await ctx.dbs.drop(db.name);
  }
}
