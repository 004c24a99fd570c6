/**
 * End to end over real HTTP: the listener delivers outbox messages to the
 * webhook simulator on 127.0.0.1, retries with backoff, honours Retry-After,
 * parks ordering keys, and logs every attempt.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createMetrics } from '../listener/delivery/metrics.js';
import { startOpsServer } from '../listener/ops/status-server.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

let db: TestDb;
let sim: SimServer;
let listeners: InProcessListener[] = [];

beforeAll(async () => {
  db = await createTestDb('delivery');
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await Promise.all(listeners.map((l) => l.stop()));
  listeners = [];
  sim.reset();
  await resetProductState(db.pool);
  // a timeout far above any answer on a loaded machine: these tests count requests and attempts, and a retry
  // after a timeout would be a second one (the test about timeouts sets its own)
  await db.pool.query(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 10000, p_max_attempts => 5, p_backoff_base_ms => 1000, p_backoff_cap_ms => 60000)`, [`${sim.url}/webhook`]);
  await db.pool.query(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});

async function listen(env: Record<string, string> = {}): Promise<InProcessListener> {
  const l = await startListener(db.url, env);
  listeners.push(l);
  return l;
}

async function enqueue(payload: object, key: string | null = null): Promise<string> {
  const { rows } = await db.pool.query(`select cloud.enqueue_message('hook', 'demo.ping', $1::jsonb, 'erp.doc', null, $2) as id`, [JSON.stringify(payload), key]);
  return rows[0].id;
}

const statusOf = async (id: string) => (await db.pool.query(`select status from cloud.outbox where request_id = $1`, [id])).rows[0]?.status;

describe('delivery', () => {
  it('a committed message reaches the cloud once, keyed by its request_id, and its attempt is logged with status and duration', async () => {
    await listen();
    const id = await enqueue({ invoice: 'S-1001', amount: '113.00' });
    await waitFor(async () => (await statusOf(id)) === 'sent', { what: 'sent' });
    const [entry] = sim.ledger();
    expect(entry).toMatchObject({ key: id, body: { invoice: 'S-1001', amount: '113.00' }, hits: 1 });
    const req = sim.requests();
    expect(req).toHaveLength(1);
    const log = await db.pool.query(`select attempt, outcome, http_status, duration_ms::float8 as ms, request_headers from cloud.log where request_id = $1`, [id]);
    expect(log.rows).toHaveLength(1);
    expect(log.rows[0]).toMatchObject({ attempt: 1, outcome: 'ok', http_status: 200 });
    expect(log.rows[0].ms).toBeGreaterThan(0);
    expect(log.rows[0].request_headers).toMatchObject({ 'x-request-id': id, 'idempotency-key': id });
    const { rows } = await db.pool.query(`select response from cloud.outbox where request_id = $1`, [id]);
    expect(rows[0].response).toMatchObject({ ok: true, received: id });
  });

  it('retries back off about 1 s then 2 s, a Retry-After is honoured, and every attempt has its cloud.log row', async () => {
    await listen();
    sim.setFaults({ schedule: [{ kind: 'status', status: 500 }, { kind: 'status', status: 503 }, { kind: 'status', status: 429, retryAfter: 3 }] });
    const id = await enqueue({ n: 1 });
    await waitFor(async () => (await statusOf(id)) === 'sent', { timeoutMs: 20_000, what: 'sent after retries' });
    const at = sim.requests().map((r) => r.at);
    expect(at).toHaveLength(4);
    const gaps = at.slice(1).map((t, i) => (t - at[i]!) / 1000);
    // lower bounds only: a loaded machine can only add to a wait (the delays' upper bounds are
    // cloud.compute_backoff_delay's, checked without a clock in engine.test.ts)
    expect(gaps[0]).toBeGreaterThanOrEqual(0.8);
    expect(gaps[1]).toBeGreaterThanOrEqual(1.6);
    expect(gaps[2]).toBeGreaterThanOrEqual(3.0); // Retry-After: 3 beats the 4 s ± 20 % backoff's low end
    const log = await db.pool.query(`select attempt, outcome, http_status, error_class from cloud.log where request_id = $1 order by attempt`, [id]);
    expect(log.rows).toEqual([
      { attempt: 1, outcome: 'retryable', http_status: 500, error_class: 'http_500' },
      { attempt: 2, outcome: 'retryable', http_status: 503, error_class: 'http_503' },
      { attempt: 3, outcome: 'retryable', http_status: 429, error_class: 'http_429' },
      { attempt: 4, outcome: 'ok', http_status: 200, error_class: null },
    ]);
    expect(sim.ledger()).toHaveLength(1);
  });

  it('a permanent 4xx goes to failed with the reason and is not retried', async () => {
    await listen();
    sim.setFaults({ schedule: [{ kind: 'status', status: 422, body: { code: 'E9106', describe: '购方税号不合法' } }] });
    const id = await enqueue({ n: 1 });
    await waitFor(async () => (await statusOf(id)) === 'failed', { what: 'failed' });
    await new Promise((r) => setTimeout(r, 1500));
    expect(sim.requests()).toHaveLength(1);
    const { rows } = await db.pool.query(`select attempts, last_error, last_http_status, response from cloud.outbox where request_id = $1`, [id]);
    expect(rows[0]).toMatchObject({ attempts: 1, last_http_status: 422, response: { code: 'E9106' } });
    expect(rows[0].last_error).toContain('购方税号不合法');
  });

  it('attempts exhausted → dead → replay → sent, with the same request_id at the cloud', async () => {
    await db.pool.query(`update cloud.endpoint set max_attempts = 2, backoff_base_ms = 100, backoff_cap_ms = 200`);
    await listen();
    sim.setFaults({ fault: { kind: 'status', status: 502 } });
    const id = await enqueue({ n: 1 });
    await waitFor(async () => (await statusOf(id)) === 'dead', { what: 'dead' });
    expect(sim.requests()).toHaveLength(2);
    sim.setFaults(null);
    await db.pool.query(`select cloud.replay_message($1, 'gateway fixed')`, [id]);
    await waitFor(async () => (await statusOf(id)) === 'sent', { what: 'sent after replay' });
    expect(sim.ledger().map((e) => e.key)).toEqual([id]);
    expect((await db.pool.query(`select count(*)::int n from cloud.log where request_id = $1`, [id])).rows[0].n).toBe(3);
  });

  it('timeouts and dropped connections are retried and the cloud sees one effect', async () => {
    // 2 s: the held request times out, while the 50 ms answer is in time even on a loaded machine
    await db.pool.query(`update cloud.endpoint set timeout_ms = 2000, backoff_base_ms = 50, backoff_cap_ms = 100`);
    await listen();
    sim.setFaults({ schedule: [{ kind: 'timeout', ms: 10_000 }, { kind: 'drop' }, { kind: 'slow', ms: 50 }] });
    const id = await enqueue({ n: 1 });
    await waitFor(async () => (await statusOf(id)) === 'sent', { what: 'sent' });
    const log = await db.pool.query(`select outcome, error_class from cloud.log where request_id = $1 order by attempt`, [id]);
    expect(log.rows.map((r) => r.error_class)).toEqual(['timeout', expect.stringMatching(/econnreset|socket|network/), null]);
    expect(sim.ledger()).toHaveLength(1);
  });

  it('messages of one ordering key reach the cloud in enqueue order under concurrency and random failures', async () => {
    await db.pool.query(`update cloud.endpoint set backoff_base_ms = 20, backoff_cap_ms = 100, max_attempts = 50`);
    await Promise.all([listen({ ERP_CLOUD_CONCURRENCY: '16' }), listen({ ERP_CLOUD_CONCURRENCY: '16' })]);
    sim.setFaults({ rate: 0.2, fault: { kind: 'status', status: 503 } });
    const keys = 20;
    const perKey = 8;
    const ids: string[] = [];
    for (let seq = 0; seq < perKey; seq++) {
      for (let k = 0; k < keys; k++) ids.push(await enqueue({ k, seq }, `po:${k}`));
    }
    await waitFor(async () => (await statusCounts(db.pool)).sent === ids.length, { timeoutMs: 40_000, what: 'all sent' });
    const byKey = new Map<number, number[]>();
    for (const e of [...sim.ledger()].sort((a, b) => a.seq - b.seq)) {
      const body = e.body as { k: number; seq: number };
      byKey.set(body.k, [...(byKey.get(body.k) ?? []), body.seq]);
    }
    for (let k = 0; k < keys; k++) expect(byKey.get(k), `key po:${k}`).toEqual([...Array(perKey).keys()]);
    expect(sim.ledger()).toHaveLength(ids.length);
  });

  it('a dead message parks its key: the rest wait, and after a replay all arrive in order', async () => {
    await db.pool.query(`update cloud.endpoint set max_attempts = 2, backoff_base_ms = 50, backoff_cap_ms = 100`);
    await listen();
    const first = await enqueue({ seq: 0 }, 'po:9');
    sim.setFaults({ key: first, fault: { kind: 'status', status: 500 } });
    await enqueue({ seq: 1 }, 'po:9');
    await enqueue({ seq: 2 }, 'po:9');
    const other = await enqueue({ seq: 0 }, 'po:10');
    await waitFor(async () => (await statusOf(first)) === 'dead', { what: 'dead head' });
    await waitFor(async () => (await statusOf(other)) === 'sent', { what: 'other key unaffected' });
    await new Promise((r) => setTimeout(r, 500));
    expect(await statusCounts(db.pool)).toEqual({ dead: 1, pending: 2, sent: 1 });
    const parked = await db.pool.query(`select ordering_key, waiting::int from cloud.parked_keys`);
    expect(parked.rows).toEqual([{ ordering_key: 'po:9', waiting: 2 }]);
    sim.setFaults(null);
    await db.pool.query(`select cloud.replay_message($1, 'cloud fixed')`, [first]);
    await waitFor(async () => (await statusCounts(db.pool)).sent === 4, { what: 'all sent' });
    const order = sim.ledger().filter((e) => (e.body as { seq: number }).seq !== undefined && e.key !== other).sort((a, b) => a.seq - b.seq);
    expect(order.map((e) => (e.body as { seq: number }).seq)).toEqual([0, 1, 2]);
  });

  it('a disabled endpoint holds its messages without burning attempts, and delivers them when enabled', async () => {
    await db.pool.query(`update cloud.endpoint set enabled = false`);
    await listen();
    const id = await enqueue({ n: 1 });
    await new Promise((r) => setTimeout(r, 600));
    expect((await db.pool.query(`select status, attempts from cloud.outbox`)).rows).toEqual([{ status: 'pending', attempts: 0 }]);
    await db.pool.query(`update cloud.endpoint set enabled = true`);
    await waitFor(async () => (await statusOf(id)) === 'sent', { what: 'sent once enabled' });
  });

  it('a backlog many times the concurrency is delivered completely: each message once, each attempt logged once, none left in flight', async () => {
    // reports are batched (a few ms, or half the concurrency's worth of results) and a claim after a report waits for a
    // worthwhile batch: neither may strand a message or lose an attempt's row
    await listen({ ERP_CLOUD_CONCURRENCY: '4', ERP_CLOUD_BATCH_SIZE: '3' });
    const ids: string[] = [];
    for (let i = 0; i < 60; i++) ids.push(await enqueue({ n: i }, i % 3 === 0 ? `key-${i % 5}` : null));
    await waitFor(async () => (await statusCounts(db.pool)).sent === 60, { what: '60 sent', timeoutMs: 60_000 });
    expect(new Set(sim.ledger().map((e) => e.key))).toEqual(new Set(ids));
    expect(sim.ledger().every((e) => e.hits === 1)).toBe(true);
    const log = await db.pool.query(`select count(*)::int n, count(distinct request_id)::int ids from cloud.log`);
    expect(log.rows[0]).toEqual({ n: 60, ids: 60 });
    expect(await statusCounts(db.pool)).toEqual({ sent: 60 });
  });

  it('/healthz answers 200 and /metrics exports deliveries, attempt latency, claim round trips, queue depth and oldest pending age', async () => {
    const l = await listen();
    const metrics = createMetrics(db.pool);
    const ops = await startOpsServer('127.0.0.1', 0, l.worker, metrics);
    try {
      const id = await enqueue({ n: 1 });
      await waitFor(async () => (await statusOf(id)) === 'sent', { what: 'sent' });
      const health = await fetch(`${ops.url}/healthz`, { signal: AbortSignal.timeout(2000) });
      expect(health.status).toBe(200);
      expect(await health.json()).toMatchObject({ ok: true, listen: true, database: true });
      // the worker's own registry counts its deliveries; this one reads queue figures from the database
      const own = await l.metrics.registry.metrics();
      expect(own).toMatch(/erp_cloud_deliveries_total\{endpoint="hook",outcome="sent"\} 1/);
      expect(own).toMatch(/erp_cloud_attempt_duration_seconds_count\{endpoint="hook",outcome="ok"\} 1/);
      expect(own).toMatch(/erp_cloud_claim_duration_seconds_count\{result="work"\} [1-9]/);
      await db.pool.query(`update cloud.endpoint set enabled = false`);
      await enqueue({ n: 2 });
      const text = await (await fetch(`${ops.url}/metrics`, { signal: AbortSignal.timeout(2000) })).text();
      expect(text).toMatch(/erp_cloud_queue_depth\{endpoint="hook",status="pending"\} 1/);
      expect(text).toMatch(/erp_cloud_oldest_pending_age_seconds\{endpoint="hook"\} \d/);
      expect((await fetch(`${ops.url}/nope`, { signal: AbortSignal.timeout(2000) })).status).toBe(404);
    } finally {
      await ops.close();
    }
  });
});
