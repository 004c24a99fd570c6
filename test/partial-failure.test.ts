/**
 * Delivery under partial failure: a cloud that fails some of its calls keeps
 * its traffic (the circuit judges answers in the order they happened, over a
 * window), answers for a lease that is gone change nothing, a message's
 * attempts are spent only on its own failures, and a listener the reaper
 * forgot comes back. The SQL cases drive cloud.claim_messages,
 * cloud.record_attempts and cloud.reap_expired_leases with explicit times; the
 * last ones stop and continue real listener processes.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SqlState } from '../listener/kernel/errors.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, sqlstateOf, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { spawnListener, type ChildListener } from './helpers/listener.js';

let db: TestDb;
let q: pg.Pool['query'];
let sim: SimServer;
let children: ChildListener[] = [];

beforeAll(async () => {
  db = await createTestDb('partial_failure');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  await killChildren();
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await killChildren();
  sim.reset();
  await resetProductState(db.pool);
  // no listener runs in the SQL cases: the URL is never called
  await q(`select cloud.put_endpoint('hook', 'http://127.0.0.1:9/hook', p_timeout_ms => 500, p_backoff_base_ms => 100, p_backoff_cap_ms => 1000, p_max_attempts => 20)`);
});

async function killChildren(): Promise<void> {
  for (const c of children) {
    c.proc.kill('SIGCONT');
    c.proc.kill('SIGKILL');
  }
  await Promise.all(children.map((c) => c.exited));
  children = [];
}

const T0 = Date.parse('2030-01-01T00:00:00Z');
const at = (ms: number) => new Date(T0 + ms).toISOString();
const enqueueMany = (n: number) =>
  q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g), p_not_before => '2020-01-01') from generate_series(1, $1) g`, [n]);
const claim = async (worker: string, ms: number, limit = 100) =>
  (await q<{ request_id: string }>(`select request_id from cloud.claim_messages($1, $2, null, '5 seconds', $3)`, [worker, limit, at(ms)])).rows.map((r) => r.request_id);
const reap = (ms: number) => q(`select cloud.reap_expired_leases($1) as n`, [at(ms)]).then((r) => r.rows[0].n as number);
const endpoint = async () => (await q(`select * from cloud.endpoint where name = 'hook'`)).rows[0];

type Answer = 'ok' | 'fail' | 'timeout' | '4xx' | '429' | 'shutdown';
/** What a listener reports for each kind of answer. */
const shapes: Record<Answer, object> = {
  ok: { outcome: 'ok', http_status: 200 },
  fail: { outcome: 'retryable', http_status: 503, error_class: 'http_503', error_message: 'HTTP 503' },
  timeout: { outcome: 'retryable', http_status: null, error_class: 'timeout', error_message: 'no answer within 500 ms' },
  '4xx': { outcome: 'permanent', http_status: 422, error_class: 'http_422', error_message: 'HTTP 422' },
  '429': { outcome: 'retryable', http_status: 429, error_class: 'http_429', error_message: 'HTTP 429', retry_after_ms: 2000 },
  shutdown: { outcome: 'retryable', http_status: null, error_class: 'shutdown', error_message: 'aborted: listener shut down' },
};

/**
 * Reports one answer per message, for the try each is on now. Answer k started at
 * startMs + k·stepMs and took durationMs (so it became known at their sum); a
 * negative step lists the answers in the reverse of the order they happened.
 */
async function report(worker: string, nowMs: number, ids: string[], answers: Answer[], timing: { startMs?: number; stepMs?: number; durationMs?: number } = {}) {
  const tries = new Map((await q(`select request_id, attempts from cloud.outbox where request_id = any ($1::uuid[])`, [ids])).rows
    .map((r) => [r.request_id as string, r.attempts as number]));
  const { startMs = nowMs - 400, stepMs = 1, durationMs = 5 } = timing;
  const results = ids.map((id, k) => ({
    request_id: id, attempt: tries.get(id), ...shapes[answers[k]!],
    started_at: at(startMs + k * stepMs), duration_ms: durationMs,
  }));
  return (await q<{ request_id: string; status: string }>(`select * from cloud.record_attempts($1, $2::jsonb, $3)`, [worker, JSON.stringify(results), at(nowMs)])).rows;
}

/** A small seeded PRNG (mulberry32), so a "random" cloud is the same on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('the circuit judges answers in the order they happened', () => {
  it('15 successes and 5 failures interleaved, never two failures in one row, leave the circuit closed', async () => {
    await enqueueMany(20);
    const ids = await claim('a', 0, 20);
    const answers: Answer[] = Array.from({ length: 20 }, (_, k) => (k % 4 === 1 ? 'fail' : 'ok'));
    await report('a', 500, ids, answers);
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'closed', circuit_failures: 0 });
    expect(ep.circuit_recent).toBe('.x..'.repeat(5));
  });

  it('a batch is judged by when each answer came, not by its place in the report', async () => {
    await enqueueMany(10);
    const ids = await claim('a', 0, 10);
    // listed alternating, but the five failures came first, one after another (a fresh window: 5 of 5)
    const answers: Answer[] = ['fail', 'ok', 'fail', 'ok', 'fail', 'ok', 'fail', 'ok', 'fail', 'ok'];
    const results = ids.map((id, k) => ({ id, a: answers[k]!, start: answers[k] === 'fail' ? k : 100 + k }));
    const tries = new Map(results.map((r) => [r.id, 1]));
    await q(`select * from cloud.record_attempts('a', $1::jsonb, $2)`, [JSON.stringify(results.map((r) => ({
      request_id: r.id, attempt: tries.get(r.id), ...shapes[r.a], started_at: at(r.start), duration_ms: 1,
    }))), at(500)]);
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('open');
    expect(ep.circuit_reason).toMatch(/^5 of the last 5 answers were cloud failures/);

    // the same answers, listed the same way, but the failures were spread between the successes: closed
    await q(`update cloud.endpoint set circuit_state = 'closed', circuit_recent = '', circuit_failures = 0, circuit_reason = null`);
    await enqueueMany(10);
    const more = await claim('a', 60_000, 10);
    await report('a', 60_500, more, answers, { startMs: 60_000 });
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_recent: 'x.x.x.x.x.' });
  });

  it('answers reported by two listeners are one sequence: failures split across their batches still open the circuit', async () => {
    await enqueueMany(6);
    const a = await claim('a', 0, 3);
    const b = await claim('b', 0, 3);
    await report('a', 300, a, ['fail', 'fail', 'fail'], { startMs: 100, stepMs: 10 });
    expect((await endpoint()).circuit_state).toBe('closed');
    await report('b', 400, b, ['fail', 'fail', 'ok'], { startMs: 200, stepMs: 10 });
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('open');
    expect(ep.circuit_recent).toBe('xxxxx');
  });

  it('a cloud failing 30 % of 3,000 calls at random keeps the circuit closed; then failing every call opens it within one window', async () => {
    const random = prng(20261206);
    await enqueueMany(3000);
    let now = 0;
    let answered = 0;
    let failures = 0;
    for (let round = 0; round < 200 && answered < 3000; round++) {
      now += 2000; // past the longest backoff (1 s cap): retries are due again
      const ids = await claim(`w${round % 3}`, now, 50);
      if (ids.length === 0) continue;
      const answers = ids.map((): Answer => (random() < 0.3 ? (random() < 0.5 ? 'fail' : 'timeout') : 'ok'));
      failures += answers.filter((x) => x !== 'ok').length;
      answered += ids.length;
      await report(`w${round % 3}`, now + 600, ids, answers, { startMs: now, stepMs: 10 });
      expect((await endpoint()).circuit_state, `after ${answered} answers`).toBe('closed');
    }
    expect(answered).toBeGreaterThanOrEqual(3000);
    expect(failures / answered).toBeGreaterThan(0.25);

    // the cloud goes down: the window (20 answers, about 6 failures in it) fills with failures
    let fails = 0;
    for (let round = 0; round < 30 && (await endpoint()).circuit_state === 'closed'; round++) {
      now += 2000;
      const [id] = await claim('w0', now, 1);
      await report('w0', now + 600, [id!], ['fail'], { startMs: now });
      fails++;
    }
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('open');
    expect(fails).toBeGreaterThanOrEqual(ep.circuit_threshold);
    expect(fails).toBeLessThanOrEqual(ep.circuit_window);
    expect(ep.circuit_reason).toMatch(/^(1[6-9]|20) of the last 20 answers were cloud failures/);
  });

  it("429s, shutdowns and 4xx answers: a 429 pauses, a shutdown says nothing, a 4xx shows the cloud is up", async () => {
    await enqueueMany(8);
    const ids = await claim('a', 0, 8);
    await report('a', 500, ids, ['fail', 'fail', 'fail', 'shutdown', '4xx', '4xx', 'shutdown', 'fail']);
    // the shutdowns are not in the window; the 4xx answers are: 4 failures of 6 answers, under 80 %
    const ep = await endpoint();
    expect(ep.circuit_recent).toBe('xxx..x');
    expect(ep.circuit_state).toBe('closed');
    await enqueueMany(1);
    const [one] = await claim('a', 10_000, 1);
    await report('a', 10_500, [one!], ['429']);
    const paused = await endpoint();
    expect(paused.circuit_recent).toBe('xxx..x');
    expect(new Date(paused.paused_until).getTime()).toBe(T0 + 12_500);
  });

  it('bad circuit settings are refused with EC010, naming the setting', async () => {
    const bad = [
      `select cloud.put_endpoint_limits('hook', null, p_circuit_window => 0)`,
      `select cloud.put_endpoint_limits('hook', null, p_circuit_failure_ratio => 0)`,
      `select cloud.put_endpoint_limits('hook', null, p_circuit_failure_ratio => 1.5)`,
      `select cloud.put_endpoint_limits('hook', null, p_circuit_failure_ratio => 0.12345)`,
      `select cloud.put_endpoint_limits('hook', null, p_circuit_probes => 0)`,
      `select cloud.put_endpoint_limits('hook', null, p_max_lost_leases => 0)`,
    ];
    for (const stmt of bad) expect(await sqlstateOf(q(stmt)), stmt).toBe(SqlState.invalidLimitSetting);
    const msg = await q(`select cloud.put_endpoint_limits('hook', null, p_circuit_window => 0)`).catch((e: Error) => e.message);
    expect(msg).toMatch(/circuit window 0/);
    const row = (await q(`select (cloud.put_endpoint_limits('hook', null, 1, 3, 1000, 10, 0.6, 2, 4)).*`)).rows[0];
    expect(row).toMatchObject({ circuit_threshold: 3, circuit_window: 10, circuit_failure_ratio: '0.600', circuit_probes: 2, max_lost_leases: 4 });
  });
});

describe('half-open: a few probes, not a batch', () => {
  beforeEach(async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, 1, 3, 10000)`);
    await enqueueMany(20);
    const ids = await claim('a', 0, 3);
    await report('a', 100, ids, ['fail', 'fail', 'fail']);
    expect((await endpoint()).circuit_state).toBe('open');
  });

  it('after the cool-down circuit_probes messages go, and none while they are out', async () => {
    expect(await claim('a', 5000)).toEqual([]);
    const probes = await claim('a', 10_200);
    expect(probes).toHaveLength(3);
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('half_open');
    expect([...ep.circuit_probe_ids].sort()).toEqual([...probes].sort());
    expect(await claim('b', 10_300)).toEqual([]);
  });

  it('the first probe the cloud answers closes the circuit with a fresh window; the backlog drains', async () => {
    const probes = await claim('a', 10_200);
    await report('a', 10_400, [probes[0]!], ['ok']);
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_recent: '', circuit_failures: 0, circuit_probe_ids: [] });
    // the other two probes are still out; everything else goes
    expect(await claim('b', 11_000)).toHaveLength(17);
    // their answers now feed the fresh window
    await report('a', 11_100, probes.slice(1), ['fail', 'ok']);
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_recent: 'x.' });
  });

  it('a failed probe keeps it half-open while others are out; when all have failed it opens for another cool-down', async () => {
    const probes = await claim('a', 10_200);
    await report('a', 10_300, [probes[0]!], ['fail']);
    expect(await endpoint()).toMatchObject({ circuit_state: 'half_open' });
    await report('a', 10_400, probes.slice(1), ['timeout', 'fail']);
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'open', circuit_probe_ids: [] });
    expect(new Date(ep.circuit_opened_at).getTime()).toBe(T0 + 10_400);
    expect(ep.circuit_reason).toMatch(/^probes failed; last: HTTP 503/);
    expect(await claim('a', 15_000)).toEqual([]);
    expect(await claim('a', 20_500)).toHaveLength(3);
  });

  it('probes whose listener died, or that were given back, bring no answer: with none left it opens again', async () => {
    const probes = await claim('dies', 10_200);
    await q(`select cloud.give_back_messages('dies', $1::uuid[], $2)`, [[probes[0]], at(10_250)]);
    expect((await endpoint()).circuit_state).toBe('half_open');
    expect(await reap(30_000)).toBe(2);
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'open', circuit_probe_ids: [] });
    expect(ep.circuit_reason).toMatch(/no answer/);
    expect(await claim('a', 40_100)).toHaveLength(3);
  });
});

describe('answers for a lease that is gone change nothing', () => {
  it('ten late timeouts and a late 429 from a stale listener change neither the circuit nor the pause of a healthy endpoint', async () => {
    await enqueueMany(11);
    const ids = await claim('stale', 0, 11);
    expect(await reap(60_000)).toBe(11);
    const late = await report('stale', 61_000, ids, [...Array<Answer>(10).fill('timeout'), '429'], { startMs: 100 });
    expect(late.map((r) => r.status)).toEqual(Array(11).fill('lease_lost'));
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'closed', circuit_recent: '', circuit_failures: 0, paused_until: null });
    // the retries are due after the reaper's backoff, and go at once: no circuit, no pause
    expect(await claim('fresh', 63_000)).toHaveLength(11);
    // nothing the late answers said was applied to the messages
    const { rows } = await q(`select distinct last_error_class, failures, lost_leases from cloud.outbox`);
    expect(rows).toEqual([{ last_error_class: 'lease_expired', failures: 0, lost_leases: 1 }]);
  });

  it('a late answer is kept in cloud.log as late beside the reaper\'s row, and attempt_history has one row per try', async () => {
    await enqueueMany(1);
    const [id] = await claim('stale', 0, 1);
    await reap(60_000);
    await report('stale', 61_000, [id!], ['fail'], { startMs: 100 });
    const log = await q(`select attempt, worker_id, outcome, http_status, error_class, late from cloud.log where request_id = $1 order by late`, [id]);
    expect(log.rows).toEqual([
      { attempt: 1, worker_id: 'stale', outcome: 'retryable', http_status: null, error_class: 'lease_expired', late: false },
      { attempt: 1, worker_id: 'stale', outcome: 'retryable', http_status: 503, error_class: 'http_503', late: true },
    ]);
    const [fresh] = await claim('fresh', 63_000, 1);
    expect(fresh).toBe(id);
    await report('fresh', 63_500, [id!], ['ok'], { startMs: 63_100 });
    const history = await q(`select attempt, outcome, error_class, answered_late, counted, late_outcome, late_http_status
                               from cloud.attempt_history where request_id = $1 order by attempt`, [id]);
    expect(history.rows).toEqual([
      { attempt: 1, outcome: 'retryable', error_class: 'lease_expired', answered_late: false, counted: false, late_outcome: 'retryable', late_http_status: 503 },
      { attempt: 2, outcome: 'ok', error_class: null, answered_late: false, counted: false, late_outcome: null, late_http_status: null },
    ]);
  });

  it('a late success completes a message nobody claimed again (the cloud did it); once another listener holds it, it changes nothing', async () => {
    await enqueueMany(2);
    const [first, second] = await claim('stale', 0, 2);
    await reap(60_000);
    await claim('fresh', 63_000, 1); // takes one of them again (attempt 2)
    const heldByFresh = (await q(`select request_id from cloud.outbox where locked_by = 'fresh'`)).rows[0].request_id as string;
    const other = heldByFresh === first ? second! : first!;
    const out = await report('stale', 64_000, [heldByFresh, other], ['ok', 'ok'], { startMs: 100 });
    expect(Object.fromEntries(out.map((r) => [r.request_id, r.status]))).toEqual({ [heldByFresh]: 'lease_lost', [other]: 'sent' });
    expect((await q(`select status, locked_by, attempts from cloud.outbox where request_id = $1`, [heldByFresh])).rows[0])
      .toEqual({ status: 'in_flight', locked_by: 'fresh', attempts: 2 });
    expect((await q(`select count(*)::int n from cloud.log where late`)).rows[0].n).toBe(2);
    expect(await endpoint()).toMatchObject({ circuit_recent: '' });
  });
});

describe("attempts are spent on the message's own failures", () => {
  it('expired leases, 429s and shutdowns spend no attempt: the message still gets all of its max_attempts', async () => {
    await q(`update cloud.endpoint set max_attempts = 3`);
    await enqueueMany(1);
    let now = 0;
    const tryOnce = async (answer: Answer | 'crash') => {
      now += 10_000;
      const [id] = await claim('w', now, 1);
      expect(id, `a claim at ${now} ms`).toBeTruthy();
      if (answer === 'crash') await reap(now + 6_000);
      else await report('w', now + 100, [id!], [answer], { startMs: now });
      return id!;
    };
    for (let i = 0; i < 5; i++) await tryOnce('crash');
    for (let i = 0; i < 3; i++) await tryOnce('429');
    await tryOnce('shutdown');
    await tryOnce('fail');
    await tryOnce('timeout');
    expect((await q(`select status, failures from cloud.outbox`)).rows[0]).toEqual({ status: 'pending', failures: 2 });
    const id = await tryOnce('fail');
    expect((await q(`select status, attempts, failures, lost_leases from cloud.outbox`)).rows[0])
      .toEqual({ status: 'dead', attempts: 12, failures: 3, lost_leases: 5 });
    const history = await q(`select attempt, counted from cloud.attempt_history where request_id = $1 order by attempt`, [id]);
    expect(history.rows.map((r) => r.attempt)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    expect(history.rows.filter((r) => r.counted).map((r) => r.attempt)).toEqual([10, 11, 12]);
  });

  it('a message whose lease keeps expiring is dead after max_lost_leases, saying why', async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, p_max_lost_leases => 3)`);
    await enqueueMany(1);
    for (let i = 1; i <= 3; i++) {
      expect(await claim('crashes', i * 60_000, 1)).toHaveLength(1);
      await reap(i * 60_000 + 10_000);
    }
    const { rows } = await q(`select status, failures, lost_leases, last_error from cloud.outbox`);
    expect(rows[0]).toMatchObject({ status: 'dead', failures: 0, lost_leases: 3 });
    expect(rows[0].last_error).toMatch(/lease expired 3 times/);
  });

  it('a try given back unsent is taken back; one released after it may have been sent stays numbered', async () => {
    await enqueueMany(2);
    const [a, b] = await claim('w', 0, 2);
    expect((await q(`select cloud.give_back_messages('w', $1::uuid[], $2) as n`, [[a], at(10)])).rows[0].n).toBe(1);
    expect((await q(`select cloud.release_messages('w', $1::uuid[], $2) as n`, [[b], at(10)])).rows[0].n).toBe(1);
    const { rows } = await q(`select request_id, status, attempts, failures from cloud.outbox order by id`);
    expect(rows).toEqual([
      { request_id: a, status: 'pending', attempts: 0, failures: 0 },
      { request_id: b, status: 'pending', attempts: 1, failures: 0 },
    ]);
    // another worker's messages are not given back, nor a newer try of the same worker by a stale one
    const mine = await claim('w', 100, 2);
    expect((await q(`select cloud.give_back_messages('intruder', $1::uuid[], $2) as n`, [mine, at(110)])).rows[0].n).toBe(0);
    const tries = (await q(`select request_id, attempts from cloud.outbox order by id`)).rows;
    expect(tries.map((t) => t.attempts)).toEqual([1, 2]);
    expect((await q(`select cloud.give_back_messages('w', $1::uuid[], $2, $3::integer[]) as n`, [[b], at(120), [1]])).rows[0].n).toBe(0);
    expect((await q(`select cloud.give_back_messages('w', $1::uuid[], $2, $3::integer[]) as n`, [[b], at(120), [2]])).rows[0].n).toBe(1);
    expect(await sqlstateOf(q(`select cloud.give_back_messages('w', $1::uuid[], $2, '{1,2}')`, [[a], at(130)]))).toBe(SqlState.invalidSendSlotRequest);
  });
});

describe('listeners that disappear and come back', () => {
  const simHook = async () => {
    await q(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 2000, p_backoff_base_ms => 100, p_backoff_cap_ms => 1000)`, [`${sim.url}/webhook`]);
    await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
  };
  const spawnChild = (env: Record<string, string>) => {
    const c = spawnListener(db.url, { ERP_CLOUD_LOG_LEVEL: 'info', ...env });
    children.push(c);
    return c;
  };
  const registered = async (worker: string) =>
    (await q(`select idle from cloud.listener_status where worker_id = $1`, [worker])).rows[0] as { idle: boolean } | undefined;

  it('a listener the reaper forgot registers again on its next heartbeat, and NOTIFYs reach it again (no waiting for the poll)', async () => {
    await simHook();
    // the longest poll (60 s): a message delivered well before it came through NOTIFY
    const child = spawnChild({ ERP_CLOUD_WORKER_ID: 'forgotten', ERP_CLOUD_POLL_MS: '60000', ERP_CLOUD_MAINTENANCE_MS: '300' });
    const started = Date.now();
    await waitFor(async () => (await registered('forgotten'))?.idle, { timeoutMs: 30_000, what: 'the listener registered and idle' });
    child.proc.kill('SIGSTOP');
    try {
      // what the reaper does to a listener silent for more than 2 minutes
      await q(`select cloud.reap_expired_leases(clock_timestamp() + interval '3 minutes')`);
      expect(await registered('forgotten')).toBeUndefined();
    } finally {
      child.proc.kill('SIGCONT');
    }
    await waitFor(async () => (await registered('forgotten'))?.idle, { timeoutMs: 30_000, what: 'registered again, idle' });
    // its log line follows the registration's commit, through a pipe: waited for, not assumed to be there already
    await waitFor(async () => /this listener had been forgotten.*registered again/.test(child.output()), { timeoutMs: 30_000, what: 'the log line of registering again' });
    const { rows } = await q(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}') as id`);
    await waitFor(async () => (await q(`select status from cloud.outbox where request_id = $1`, [rows[0].id])).rows[0].status === 'sent',
      { timeoutMs: Math.max(1000, 55_000 - (Date.now() - started)), what: 'delivered through NOTIFY, before the first poll' });
    expect(sim.ledger().map((e) => e.key)).toEqual([rows[0].id]);
  });

  it('a listener held up past its lease between claim and send gives the message back instead of sending it', async () => {
    const masterKey = `vault-master-${randomBytes(12).toString('hex')}`;
    await q(`select vault.put_secret('hook.token', 'token-value-1', $1)`, [masterKey]);
    await simHook();
    await q(`update cloud.endpoint set config = '{"bearer_secret": "hook.token"}'`);
    const child = spawnChild({ ERP_CLOUD_WORKER_ID: 'held-up', ERP_CLOUD_VAULT_KEY: masterKey, ERP_CLOUD_SECRET_TTL_MS: '600000' });
    await waitFor(() => registered('held-up'), { timeoutMs: 30_000, what: 'the listener registered' });
    // the listener's secret lookup waits on this lock: its try is held up between claim and send
    const blocker = await db.pool.connect();
    try {
      await blocker.query('begin');
      await blocker.query('lock table vault.secret in access exclusive mode');
      const { rows } = await q(`select cloud.enqueue_message('hook', 'demo.ping', '{"n":1}') as id`);
      const id = rows[0].id as string;
      // held up past its lease: the reaper (the listener's own maintenance) takes the try back, and the
      // listener claims the message again (try 2), which waits on the same lock
      await waitFor(async () => {
        const m = (await q(`select lost_leases, attempts, status from cloud.outbox where request_id = $1`, [id])).rows[0];
        return m.lost_leases >= 1 && m.attempts >= 2 && m.status === 'in_flight';
      }, { timeoutMs: 60_000, what: 'the lease expired, was reaped, and the message was claimed again' });
      await blocker.query('rollback');
      await waitFor(async () => (await q(`select status from cloud.outbox where request_id = $1`, [id])).rows[0].status === 'sent',
        { timeoutMs: 60_000, what: 'sent by a later try' });
      // the try whose lease ran out never reached the cloud: one request in all, from a later try, and no late answer
      const log = await q(`select attempt, error_class, late from cloud.log where request_id = $1 order by attempt, late`, [id]);
      expect(log.rows[0]).toEqual({ attempt: 1, error_class: 'lease_expired', late: false });
      expect(log.rows.filter((r) => r.late)).toEqual([]);
      const sent = log.rows.filter((r) => r.error_class === null);
      expect(sent).toHaveLength(1);
      expect(sent[0]!.attempt).toBeGreaterThanOrEqual(2);
      expect(sim.requests().filter((r) => r.path === '/webhook')).toHaveLength(1);
      // its log line comes through a pipe, after the give-back's commit: waited for, not assumed to be there already
      await waitFor(async () => /given back unsent: its lease could end before the answer/.test(child.output()), { timeoutMs: 30_000, what: 'the log line of giving back' });
      expect(child.output()).toMatch(/given back unsent: its lease could end before the answer/);
    } finally {
      await blocker.query('rollback').catch(() => undefined);
      blocker.release();
    }
  });
});
