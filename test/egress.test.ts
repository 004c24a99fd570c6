/**
 * The egress guard: a token bucket per endpoint shared by every listener, 429
 * pauses for all listeners, and a circuit breaker that keeps a cloud outage
 * from costing attempts (or the ERP anything).
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { assertAddressAllowed, assertUrlAllowed, classifyAddress, EgressRefused, type EgressPolicy } from '../listener/delivery/egress.js';
import { SqlState } from '../listener/kernel/errors.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, sqlstateOf, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { resetProductState } from './helpers/reset.js';
import { spawnListener, startListener, type ChildListener, type InProcessListener } from './helpers/listener.js';

let db: TestDb;
let q: pg.Pool['query'];
let sim: SimServer;
let listeners: InProcessListener[] = [];
let children: ChildListener[] = [];

/** Listener processes of their own, so the simulator (in this process) measures arrivals on an event loop they do not share. */
function spawnChild(env: Record<string, string> = {}): ChildListener {
  const c = spawnListener(db.url, { ERP_CLOUD_LOG_LEVEL: 'warn', ...env });
  children.push(c);
  return c;
}
async function killChildren(): Promise<void> {
  for (const c of children) {
    c.proc.kill('SIGCONT');
    c.proc.kill('SIGKILL');
  }
  await Promise.all(children.map((c) => c.exited));
  children = [];
}

beforeAll(async () => {
  db = await createTestDb('egress');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  await killChildren();
  await Promise.all(listeners.map((l) => l.stop()));
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await killChildren();
  await Promise.all(listeners.map((l) => l.stop()));
  listeners = [];
  sim.reset();
  sim.setRateLimit(null); // a test that failed before clearing its gateway limit must not fail the next one
  await resetProductState(db.pool);
  await q(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 500, p_backoff_base_ms => 100, p_backoff_cap_ms => 1000, p_max_attempts => 20)`, [`${sim.url}/webhook`]);
  await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});

const T0 = Date.parse('2030-01-01T00:00:00Z');
const at = (ms: number) => new Date(T0 + ms).toISOString();
const enqueueMany = (n: number) => q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g), p_not_before => '2020-01-01') from generate_series(1, $1) g`, [n]);
const claim = async (worker: string, ms: number, limit = 100) =>
  (await q<{ request_id: string }>(`select request_id from cloud.claim_messages($1, $2, null, '5 seconds', $3)`, [worker, limit, at(ms)])).rows.map((r) => r.request_id);
/** Reports answers for the tries the messages are on now (outbox.attempts), as a listener would. */
const report = async (worker: string, ms: number, results: Array<{ request_id: string; outcome: string; http_status?: number | null; retry_after_ms?: number }>) => {
  const tries = new Map((await q(`select request_id, attempts from cloud.outbox where request_id = any ($1::uuid[])`, [results.map((r) => r.request_id)])).rows
    .map((r) => [r.request_id as string, r.attempts as number]));
  return q(`select * from cloud.record_attempts($1, $2::jsonb, $3)`,
    [worker, JSON.stringify(results.map((r) => ({ attempt: tries.get(r.request_id) ?? 1, error_message: `HTTP ${r.http_status}`, ...r }))), at(ms)]);
};
const endpoint = async () => (await q(`select * from cloud.endpoint_status where endpoint = 'hook'`)).rows[0];

describe('rate limit', () => {
  it('bad limits are refused with EC010, an unknown endpoint with EC001', async () => {
    expect(await sqlstateOf(q(`select cloud.put_endpoint_limits('hook', 0)`))).toBe(SqlState.invalidLimitSetting);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_limits('hook', 5, 0)`))).toBe(SqlState.invalidLimitSetting);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_limits('hook', 5, 1, 0)`))).toBe(SqlState.invalidLimitSetting);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_limits('nope', 5)`))).toBe(SqlState.unknownEndpoint);
  });

  it('the token bucket lets a burst go at once, then the rate per second, however many listeners claim', async () => {
    await q(`select cloud.put_endpoint_limits('hook', 10, 5)`);
    await q(`update cloud.endpoint set tokens = 5, tokens_at = $1`, [at(0)]);
    await enqueueMany(100);
    // the burst goes now, plus the next 100 ms worth of tokens, each with its own send time
    const first = (await q(`select request_id, extract(epoch from send_at - $1)::float8 as after from cloud.claim_messages('a', 100, null, '5 seconds', $1)`, [at(0)])).rows;
    expect(first.map((r) => r.after)).toEqual([0, 0, 0, 0, 0, expect.closeTo(0.1, 5)]);
    expect(await claim('b', 0)).toHaveLength(0);
    expect(await claim('b', 300)).toHaveLength(3);
    expect(await claim('a', 400)).toHaveLength(1);
    expect(await claim('a', 60_000)).toHaveLength(6); // a quiet minute refills only up to the burst (+ the 100 ms look-ahead)
    const { rows } = await q(`select extract(epoch from cloud.next_due_at(null, $1) - $1)::float8 as wait`, [at(60_000)]);
    expect(rows[0].wait).toBeCloseTo(0.1, 5); // one token every 100 ms
  });

  it('a listener never sends a rate-limited endpoint more than its rate, across two listeners', async () => {
    const [rate, burst] = [20, 2];
    const grace = await graceMs(rate);
    await q(`select cloud.put_endpoint_limits('hook', $1, $2)`, [rate, burst]);
    // the timeout is not what this test is about: long enough that a loaded machine never retries
    await q(`update cloud.endpoint set timeout_ms = 5000`);
    // the cloud's gateway at our own rate and burst, forgiving a second of delay variation on the way
    sim.setRateLimit({ perSecond: rate, burst, toleranceMs: 1000 });
    await enqueueMany(50);
    spawnChild({ ERP_CLOUD_WORKER_ID: 'rate-a' });
    spawnChild({ ERP_CLOUD_WORKER_ID: 'rate-b' });
    await waitFor(async () => (await statusCounts(db.pool)).sent === 50, { timeoutMs: 30_000, what: 'all sent' });
    const sends = await sendsSeen();
    expect(new Set(sends.map((s) => s.key)).size).toBe(50);
    expect(new Set(sends.map((s) => s.worker))).toEqual(new Set(['rate-a', 'rate-b'])); // both listeners took part
    // as the listeners recorded their sends: in any window of W s at most rate·(W + grace) + burst
    expect(worstWindow(sends.map((s) => s.startedAt), rate, burst, grace + CLOCK_MS), 'as the listeners recorded their sends').toBeLessThanOrEqual(0);
    // as the cloud saw them: the same bound, give or take how much the time on the way varied
    const jitter = transitJitter(sends);
    expect(worstWindow(sends.map((s) => s.arrivedAt), rate, burst, grace + CLOCK_MS + jitter), `jitter ${jitter} ms`).toBeLessThanOrEqual(0);
    const times = sends.map((s) => s.arrivedAt).sort((a, b) => a - b);
    // and, from the same bound, the 50 could not have gone faster
    expect(times.at(-1)! - times[0]!).toBeGreaterThanOrEqual(((50 - burst) / rate) * 1000 - grace - CLOCK_MS - jitter);
    expect(sim.requests().filter((r) => r.status === 429)).toEqual([]); // so the cloud never had to say 429
    sim.setRateLimit(null);
  });

  it('a listener whose event loop stalls does not bunch its late sends onto slots another listener already used', async () => {
    const [rate, burst] = [20, 1]; // a burst of one: a single late send over the rate shows
    const grace = await graceMs(rate);
    await q(`select cloud.put_endpoint_limits('hook', $1, $2)`, [rate, burst]);
    // a lease that outlives the stall (2 s call + 3 s margin), so the stalled listener's messages take new slots
    await q(`update cloud.endpoint set timeout_ms = 2000`);
    await enqueueMany(70);
    const stalled = spawnChild({ ERP_CLOUD_WORKER_ID: 'stalls', ERP_CLOUD_LEASE_MARGIN_MS: '3000' });
    spawnChild({ ERP_CLOUD_WORKER_ID: 'steady', ERP_CLOUD_LEASE_MARGIN_MS: '3000' });
    await waitFor(async () => sim.requests().length >= 8, { timeoutMs: 20_000, what: 'both listeners sending' });
    // freeze it while it holds claimed messages waiting for their slots (a frozen process is a stalled event loop)
    let held: string[] = [];
    let stopAt = 0;
    await waitFor(async () => {
      if ((await heldBy('stalls')).length === 0) return false;
      stalled.proc.kill('SIGSTOP');
      stopAt = Date.now();
      held = await heldBy('stalls');
      if (held.length === 0) stalled.proc.kill('SIGCONT'); // it sent them just before: try again
      return held.length > 0;
    }, { timeoutMs: 20_000, intervalMs: 5, what: 'the listener frozen while it holds messages' });
    await new Promise((r) => setTimeout(r, 1500)); // the other listener keeps sending meanwhile
    const contAt = Date.now();
    stalled.proc.kill('SIGCONT');
    await waitFor(async () => (await statusCounts(db.pool)).sent === 70, { timeoutMs: 40_000, what: 'all sent' });
    const sends = await sendsSeen();
    expect(new Set(sends.map((s) => s.key)).size).toBe(70);
    expect(sends.filter((s) => held.includes(s.key))).toHaveLength(held.length); // each held message went once
    // as the listeners recorded their sends: in any window of W s at most rate·(W + grace) + burst
    expect(worstWindow(sends.map((s) => s.startedAt), rate, burst, grace + CLOCK_MS), 'as the listeners recorded their sends').toBeLessThanOrEqual(0);
    // as the cloud saw them: a request already on its way when the process froze arrives when it thaws;
    // everything else keeps the bound, give or take how much the time on the way varied
    const onTheWay = sends.filter((s) => s.startedAt <= stopAt && s.arrivedAt >= contAt);
    expect(onTheWay.filter((s) => !held.includes(s.key))).toEqual([]);
    const rest = sends.filter((s) => !onTheWay.includes(s));
    const jitter = transitJitter(rest);
    expect(worstWindow(rest.map((s) => s.arrivedAt), rate, burst, grace + CLOCK_MS + jitter), `jitter ${jitter} ms`).toBeLessThanOrEqual(0);
  });

  it('new send slots after a stall come from the shared bucket: several workers never put more than burst + rate·W in any window', async () => {
    const [rate, burst] = [10, 3];
    await q(`select cloud.put_endpoint_limits('hook', $1, $2)`, [rate, burst]);
    await q(`update cloud.endpoint set tokens = $2, tokens_at = $1`, [at(0), burst]);
    await enqueueMany(60);
    // three workers take turns claiming every 40 ms for 3 s; w2's event loop stalls right after its first
    // claim (the burst) until 1.7 s: it neither claims nor sends then, and afterwards asks for new slots
    const sent: number[] = []; // the slots messages actually went on (s since T0)
    const resent: number[] = []; // those of them that are new slots
    const naive: number[] = []; // what w2 would have sent had it gone on its old slots when it woke
    const waiting = new Map<string, { id: string; slot: number; again?: boolean }[]>([['w1', []], ['w2', []], ['w3', []]]);
    const stalled = (w: string, t: number) => w === 'w2' && t > 0 && t < 1700;
    let missed: { id: string; slot: number }[] = [];
    for (let t = 0, turn = 0; t <= 3000; t += 40, turn++) {
      if (t >= 1700 && missed.length === 0) {
        missed = waiting.get('w2')!;
        waiting.set('w2', []);
        naive.push(...missed.map(() => t / 1000));
        const { rows } = await q(`select request_id, outcome, extract(epoch from send_at - $3)::float8 as slot, extract(epoch from send_by - send_at)::float8 as grace
                                    from cloud.take_send_slots('w2', $1, '100 milliseconds', $2)`, [missed.map((m) => m.id), at(t), at(0)]);
        expect(rows.map((r) => r.outcome)).toEqual(missed.map(() => 'slotted'));
        expect(rows.every((r) => r.slot >= t / 1000 + 0.1 - 1e-9 && r.grace === 0.05)).toBe(true); // a lead of 100 ms; grace min(50 ms, 0.5 / rate)
        waiting.get('w2')!.push(...rows.map((r) => ({ id: r.request_id, slot: r.slot, again: true })));
      }
      for (const [w, list] of waiting) {
        if (stalled(w, t)) continue;
        for (const m of list.filter((x) => x.slot * 1000 <= t)) {
          sent.push(m.slot);
          if (m.again) resent.push(m.slot);
        }
        waiting.set(w, list.filter((x) => x.slot * 1000 > t));
      }
      const w = ['w2', 'w3', 'w1'][turn % 3]!;
      if (stalled(w, t)) continue;
      const { rows } = await q(`select request_id, extract(epoch from send_at - $2)::float8 as slot from cloud.claim_messages($3, 100, null, '5 seconds', $1)`, [at(t), at(0), w]);
      waiting.get(w)!.push(...rows.map((r) => ({ id: r.request_id, slot: r.slot })));
    }
    expect(missed.length).toBeGreaterThanOrEqual(burst); // the stall caught w2 holding its burst
    expect(resent).toHaveLength(missed.length);
    expect(sent.length).toBeGreaterThan(25);
    const ms = (xs: number[]) => xs.map((x) => x * 1000);
    expect(worstWindow(ms(sent), rate, burst, 0)).toBeLessThanOrEqual(1e-6);
    // the scenario matters: sending the missed slots late, as they were, would have broken the bound
    const others = sent.filter((x) => !resent.includes(x));
    expect(worstWindow(ms([...others, ...naive]), rate, burst, 0)).toBeGreaterThan(0);
  });

  it('a worker whose lease is gone gets no new slot, and one whose slot would outlive its lease gives the message back unsent', async () => {
    await q(`select cloud.put_endpoint_limits('hook', 10, 1)`);
    await q(`update cloud.endpoint set tokens = 1, tokens_at = $1`, [at(0)]);
    await enqueueMany(3);
    const [a1, a2] = await claim('a', 0, 2); // timeout 500 ms + 5 s margin: leases end at 5.5 s
    const bucket = async () => (await q(`select tokens, tokens_at from cloud.endpoint`)).rows[0];
    const outbox = async () => (await q(`select request_id, status, attempts, locked_by, locked_until from cloud.outbox order by id`)).rows;
    const slots = (worker: string, ids: string[], ms: number) =>
      q(`select request_id, outcome, send_at from cloud.take_send_slots($1, $2, '100 milliseconds', $3)`, [worker, ids, at(ms)]).then((r) => r.rows);
    const before = { bucket: await bucket(), outbox: await outbox() };
    // another worker, an expired lease, a message never claimed: nothing, and nothing changes
    expect(await slots('b', [a1!], 1000)).toEqual([{ request_id: a1, outcome: 'lease_lost', send_at: null }]);
    expect(await slots('a', [a1!, a2!], 6000)).toEqual([
      { request_id: a1, outcome: 'lease_lost', send_at: null }, { request_id: a2, outcome: 'lease_lost', send_at: null }]);
    const unclaimed = (await outbox()).find((r) => r.status === 'pending')!.request_id;
    expect(await slots('a', [unclaimed], 1000)).toEqual([{ request_id: unclaimed, outcome: 'lease_lost', send_at: null }]);
    expect({ bucket: await bucket(), outbox: await outbox() }).toEqual(before);
    // a slot that leaves the 500 ms call no room before the lease ends: given back, pending, its attempt not counted
    await q(`update cloud.endpoint set tokens = -48, tokens_at = $1`, [at(1000)]); // the next token is 4.9 s away
    const back = await slots('a', [a1!], 1000);
    expect(back).toEqual([{ request_id: a1, outcome: 'given_back', send_at: null }]);
    expect((await outbox()).find((r) => r.request_id === a1)).toMatchObject({ status: 'pending', attempts: 0, locked_by: null });
    expect(await bucket()).toEqual({ tokens: -48, tokens_at: new Date(at(1000)) }); // no token taken for it
    // a 429 pause: no calls now, so given back too
    await q(`update cloud.endpoint set tokens = 1, tokens_at = $1, paused_until = $2`, [at(1000), at(5000)]);
    expect(await slots('a', [a2!], 1000)).toEqual([{ request_id: a2, outcome: 'given_back', send_at: null }]);
    expect(await statusCounts(db.pool)).toEqual({ pending: 3 });
    expect((await q(`select count(*)::int n from cloud.log`)).rows[0].n).toBe(0); // nothing was attempted
  });

  it('bad requests for new send slots are refused with EC015, naming the field, and take nothing', async () => {
    await q(`select cloud.put_endpoint_limits('hook', 10, 1)`);
    await enqueueMany(2);
    const [id] = await claim('a', 0, 1);
    const before = (await q(`select tokens, tokens_at from cloud.endpoint`)).rows[0];
    const cases: Array<[string, unknown[], RegExp]> = [
      ['select * from cloud.take_send_slots($1, $2)', [null, [id]], /p_worker/],
      ['select * from cloud.take_send_slots($1, $2)', ['', [id]], /p_worker/],
      ['select * from cloud.take_send_slots($1, $2)', ['a', null], /p_request_ids/],
      ['select * from cloud.take_send_slots($1, $2)', ['a', [id, null]], /p_request_ids/],
      ['select * from cloud.take_send_slots($1, $2)', ['a', [id, id]], /p_request_ids/],
      ['select * from cloud.take_send_slots($1, array_fill($2::uuid, array[1001]))', ['a', id], /p_request_ids/],
      ['select * from cloud.take_send_slots($1, $2, $3)', ['a', [id], '-1 second'], /p_lead/],
      ['select * from cloud.take_send_slots($1, $2, $3)', ['a', [id], '1 minute'], /p_lead/],
      ['select * from cloud.take_send_slots($1, $2, $3)', ['a', [id], null], /p_lead/],
      ['select * from cloud.take_send_slots($1, $2, $3, $4)', ['a', [id], '100 ms', null], /p_now/],
    ];
    for (const [text, params, field] of cases) {
      const err = await q(text, params).then(() => null, (e: { code?: string; message: string; hint?: string }) => e);
      expect(err?.code, `${JSON.stringify(params)}`).toBe(SqlState.invalidSendSlotRequest);
      expect(err!.message).toMatch(field);
      expect(err!.hint).toBeTruthy();
    }
    expect((await q(`select tokens, tokens_at from cloud.endpoint`)).rows[0]).toEqual(before);
    expect((await q(`select status, locked_by from cloud.outbox where request_id = $1`, [id])).rows[0]).toEqual({ status: 'in_flight', locked_by: 'a' });
  });
});

/** Send times are compared in whole milliseconds on both sides (the slot as a JS Date, cloud.log's started_at). */
const CLOCK_MS = 2;

/** The endpoint's send grace in ms (cloud.send_grace). */
async function graceMs(rate: number): Promise<number> {
  return Number((await q(`select extract(epoch from cloud.send_grace($1)) * 1000 as ms`, [rate])).rows[0].ms);
}

/** Messages the listener holds (claimed, not yet reported). */
async function heldBy(worker: string): Promise<string[]> {
  return (await q(`select request_id from cloud.outbox where status = 'in_flight' and locked_by = $1`, [worker])).rows.map((r) => r.request_id);
}

interface Send { key: string; worker: string; startedAt: number; arrivedAt: number }

/**
 * Every attempt that went out, as the listener recorded it (cloud.log started_at, its worker) and as the
 * simulated cloud received it: the n-th arrival of an idempotency key is the n-th attempt of that message.
 */
async function sendsSeen(): Promise<Send[]> {
  const { rows } = await q(`select request_id, worker_id, extract(epoch from started_at) * 1000 as at
                              from cloud.log where method is not null order by request_id, attempt`);
  const arrivals = new Map<string, number[]>();
  for (const r of sim.requests()) if (r.key) arrivals.set(r.key, [...(arrivals.get(r.key) ?? []), r.at]);
  const seen = new Map<string, number>();
  const sends = rows.map((r) => {
    const n = seen.get(r.request_id) ?? 0;
    seen.set(r.request_id, n + 1);
    return { key: r.request_id as string, worker: r.worker_id as string, startedAt: Number(r.at), arrivedAt: arrivals.get(r.request_id)?.[n] ?? NaN };
  });
  expect(sends.filter((s) => Number.isNaN(s.arrivedAt))).toEqual([]); // everything recorded as sent reached the cloud
  expect(sends).toHaveLength(sim.requests().length); // and the cloud saw nothing else
  return sends;
}

/** How much the time from the listener's record to the cloud's arrival varied (max − min, ms). */
function transitJitter(sends: Send[]): number {
  const transit = sends.map((s) => s.arrivedAt - s.startedAt);
  return Math.max(...transit) - Math.min(...transit);
}

/**
 * The promise as a number: the most that any window (starting and ending at a send) holds over
 * rate·(W + grace) + burst. Zero or less when the promise held.
 */
function worstWindow(timesMs: number[], rate: number, burst: number, graceMs: number): number {
  const t = [...timesMs].sort((a, b) => a - b);
  let worst = -Infinity;
  for (let i = 0; i < t.length; i++) {
    for (let j = i; j < t.length; j++) worst = Math.max(worst, j - i + 1 - (rate * (t[j]! - t[i]! + graceMs)) / 1000 - burst);
  }
  return worst;
}

describe('429 pause', () => {
  it('a 429 pauses the endpoint for every listener until Retry-After, and the status view says why', async () => {
    await enqueueMany(10);
    const [first] = await claim('a', 0, 1);
    await report('a', 10, [{ request_id: first!, outcome: 'retryable', http_status: 429, retry_after_ms: 3000 }]);
    expect(await claim('b', 20)).toEqual([]);
    expect(await claim('b', 2900)).toEqual([]);
    const { rows } = await q(`select paused_until, pause_reason from cloud.endpoint`);
    expect(new Date(rows[0].paused_until).getTime()).toBe(T0 + 3010);
    expect(rows[0].pause_reason).toMatch(/429/);
    const wait = await q(`select extract(epoch from cloud.next_due_at(null, $1) - $1)::float8 as s`, [at(20)]);
    expect(wait.rows[0].s).toBeCloseTo(2.99, 5);
    expect((await claim('b', 3100)).length).toBeGreaterThan(0);
  });

  it('erp-cloud status shows the pause and its reason, and the circuit', async () => {
    await q(`update cloud.endpoint set paused_until = now() + interval '1 minute', pause_reason = 'HTTP 429 from the cloud', circuit_state = 'open', circuit_opened_at = now(), circuit_reason = '5 consecutive failures; last: HTTP 503'`);
    const { execFile } = await import('node:child_process');
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ['dist/listener/cli.js', '-c', db.url, 'status'], (err, stdout) => (err ? reject(err) : resolve(stdout))),
    );
    expect(out).toMatch(/circuit_state\s+paused_until/);
    expect(out).toMatch(/^hook\s.*\sopen\s+20\d\d-/m);
    expect(out).toMatch(/hook: circuit open since .*5 consecutive failures; last: HTTP 503; HTTP 429 from the cloud/);
  });
});

describe('quotas and retention settings', () => {
  it('a daily quota stops claims when used up and pauses the endpoint until local midnight, saying why', async () => {
    await q(`select cloud.put_endpoint_quotas('hook', 5, null, 'Asia/Shanghai')`);
    await enqueueMany(12);
    expect(await claim('a', 0)).toHaveLength(5); // 2030-01-01 08:00 in Shanghai
    expect(await claim('b', 1000)).toEqual([]);
    const { rows } = await q(`select paused_until, pause_reason from cloud.endpoint`);
    expect(new Date(rows[0].paused_until).toISOString()).toBe('2030-01-01T16:00:00.000Z'); // midnight in Shanghai
    expect(rows[0].pause_reason).toMatch(/daily quota of 5 calls used up/);
    expect(await claim('b', 16 * 3600_000 - 1000)).toEqual([]);
    expect(await claim('b', 16 * 3600_000 + 1000)).toHaveLength(5);
    const usage = await q(`select period, period_start::text, calls from cloud.endpoint_usage order by period, period_start`);
    expect(usage.rows).toEqual([
      { period: 'day', period_start: '2030-01-01', calls: 5 },
      { period: 'day', period_start: '2030-01-02', calls: 5 },
      { period: 'month', period_start: '2030-01-01', calls: 10 },
    ]);
  });

  it('a monthly quota holds across days, and bad quotas are refused with EC012', async () => {
    await q(`select cloud.put_endpoint_quotas('hook', null, 3, 'UTC')`);
    await enqueueMany(5);
    expect(await claim('a', 0)).toHaveLength(3);
    expect(await claim('a', 5 * 86400_000)).toEqual([]);
    expect((await q(`select pause_reason from cloud.endpoint`)).rows[0].pause_reason).toMatch(/monthly quota of 3 calls used up; resumes 2030-02-01/);
    expect(await claim('a', 31 * 86400_000 + 1000)).toHaveLength(2);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_quotas('hook', 0)`))).toBe(SqlState.invalidQuotaSetting);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_quotas('hook', 10, null, 'Mars/Olympus')`))).toBe(SqlState.invalidQuotaSetting);
  });

  it('retention periods come from cloud.setting, which an operator can change', async () => {
    await q(`select cloud.ensure_log_partitions(0, now() - interval '200 days')`); // a month long gone
    await q(`select cloud.put_setting('log_retention', '400 days')`);
    expect((await q(`select cloud.purge_log_partitions() as n`)).rows[0].n).toBe(0);
    await q(`select cloud.put_setting('log_retention', '30 days')`);
    expect((await q(`select cloud.purge_log_partitions() as n`)).rows[0].n).toBeGreaterThanOrEqual(1);
    expect(await sqlstateOf(q(`select cloud.put_setting('nope', '1 day')`))).toBe(SqlState.invalidSetting);
    expect(await sqlstateOf(q(`select cloud.put_setting('log_retention', '5 minutes')`))).toBe(SqlState.invalidSetting);
    await q(`select cloud.put_setting('log_retention', '90 days')`);
  });
});

describe('circuit breaker', () => {
  beforeEach(async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, 1, 3, 10000)`);
  });

  it('cloud failures filling the window open the circuit: the rest stay pending without burning attempts', async () => {
    await enqueueMany(20);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 503 })));
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'open', circuit_failures: 3 });
    expect(ep.circuit_reason).toMatch(/^3 of the last 3 answers were cloud failures \(3 in a row at the end\)/);
    expect(await claim('b', 5000)).toEqual([]);
    const attempts = await q(`select sum(attempts)::int n from cloud.outbox`);
    expect(attempts.rows[0].n).toBe(3);
  });

  it('after the cool-down a few probes go (circuit_probes, not a batch); the first answered closes the circuit and the backlog drains', async () => {
    await enqueueMany(20);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 502 })));
    const probes = await claim('a', 10_200);
    expect(probes).toHaveLength(3);
    expect((await endpoint()).circuit_state).toBe('half_open');
    expect(await claim('b', 10_300)).toEqual([]);
    await report('a', 10_400, [{ request_id: probes[0]!, outcome: 'ok', http_status: 200 }]);
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_failures: 0 });
    expect(await claim('b', 20_000)).toHaveLength(17); // 20 - the three probes (one sent, two still out)
  });

  it('failed probes re-open the circuit for another cool-down', async () => {
    await enqueueMany(5);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: null })));
    const probes = await claim('a', 10_200);
    await report('a', 10_300, probes.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 504 })));
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('open');
    expect(new Date(ep.circuit_opened_at).getTime()).toBe(T0 + 10_300);
    expect(await claim('a', 15_000)).toEqual([]);
    expect(await claim('a', 20_400)).toHaveLength(3);
  });

  it('lost probes (their listener died) do not leave the circuit half-open forever', async () => {
    await enqueueMany(5);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 500 })));
    await claim('dies', 10_200);
    await q(`select cloud.reap_expired_leases($1)`, [at(30_000)]);
    expect((await endpoint()).circuit_state).toBe('open');
    expect(await claim('a', 40_100)).toHaveLength(3);
  });

  it("4xx answers are the message's problem, not the cloud's: they never open the circuit", async () => {
    await enqueueMany(10);
    const batch = await claim('a', 0, 10);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'permanent', http_status: 400 })));
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_failures: 0 });
  });

  it('a cloud outage costs the ERP nothing: 5,000 documents wait behind the open circuit and are delivered once after recovery', async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, 1, 5, 500)`);
    // the timeout is not what this test is about: attempts are counted, and on a loaded machine 5,000 calls
    // at once could otherwise time out and retry (and count as cloud failures)
    await q(`update cloud.endpoint set timeout_ms = 5000`);
    sim.setFaults({ fault: { kind: 'status', status: 503 } });
    listeners.push(await startListener(db.url));
    for (let i = 0; i < 10; i++) {
      // the ERP keeps committing during the outage, 500 documents a transaction
      await q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('batch', $1::int, 'n', g)) from generate_series(1, 500) g`, [i]);
    }
    await waitFor(async () => (await endpoint()).circuit_state !== 'closed', { what: 'circuit open' });
    await new Promise((r) => setTimeout(r, 2500)); // several cool-downs and probes into the outage
    const during = await q(`select count(*) filter (where attempts > 0)::int touched, max(attempts)::int most from cloud.outbox`);
    expect(during.rows[0].touched).toBeLessThan(200); // the first batch in flight plus probes, not 5,000
    sim.setFaults(null);
    await waitFor(async () => (await statusCounts(db.pool)).sent === 5000, { timeoutMs: 40_000, what: '5,000 sent after recovery' });
    expect(sim.ledger()).toHaveLength(5000);
    const after = await q(`select max(attempts)::int most, avg(attempts)::float8 mean from cloud.outbox`);
    expect(after.rows[0].most).toBeLessThanOrEqual(6);
    expect(after.rows[0].mean).toBeLessThan(1.2);
    expect((await endpoint()).circuit_state).toBe('closed');
  });
});

describe('allowlist and SSRF', () => {
  const policy = (over: Partial<EgressPolicy> = {}): EgressPolicy => ({
    endpoint: 'tax', baseHost: 'api.tax.example', allowHosts: ['*.files.example'], allowCidrs: [], allowPrivate: false, ...over,
  });

  it('addresses are classified: loopback, private, link-local, metadata, mapped IPv6', () => {
    expect(['127.0.0.1', '10.1.2.3', '172.20.0.1', '192.168.1.1', '100.64.0.1', '169.254.1.1', '169.254.169.254', '100.100.100.200', '::1', 'fe80::1', 'fd12::1', '::ffff:10.0.0.1', '0.0.0.0', '8.8.8.8', '2001:4860:4860::8888']
      .map(classifyAddress)).toEqual(['loopback', 'private', 'private', 'private', 'private', 'link-local', 'metadata', 'metadata', 'loopback', 'link-local', 'private', 'private', 'unspecified', 'public', 'public']);
  });

  it('only the endpoint host and its allowed hosts pass, and never with credentials or another scheme', () => {
    expect(() => assertUrlAllowed('https://api.tax.example/v1', policy())).not.toThrow();
    expect(() => assertUrlAllowed('https://pdf.files.example/a.pdf', policy())).not.toThrow();
    for (const url of ['https://files.example.evil.test/x', 'https://evil.test/x', 'https://api.tax.example@evil.test/x', 'ftp://api.tax.example/x', 'file:///etc/passwd', 'http://user:pw@api.tax.example/']) {
      expect(() => assertUrlAllowed(url, policy()), url).toThrow(EgressRefused);
    }
  });

  it('metadata addresses are refused even where private addresses are allowed; ranges restrict further', () => {
    expect(() => assertAddressAllowed('169.254.169.254', policy({ allowPrivate: true }))).toThrow(/metadata/);
    expect(() => assertAddressAllowed('10.0.0.5', policy())).toThrow(/private/);
    expect(() => assertAddressAllowed('10.0.0.5', policy({ allowPrivate: true }))).not.toThrow();
    expect(() => assertAddressAllowed('8.8.8.8', policy({ allowCidrs: ['203.0.113.0/24'] }))).toThrow(/outside the address ranges/);
    expect(() => assertAddressAllowed('203.0.113.9', policy({ allowCidrs: ['203.0.113.0/24'] }))).not.toThrow();
  });

  it('an endpoint on a loopback address is refused unless it allows private addresses: failed, logged, nothing sent', async () => {
    await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', false)`);
    listeners.push(await startListener(db.url));
    const { rows } = await q(`select cloud.enqueue_message('hook', 'demo.ping', '{}') as id`);
    await waitFor(async () => (await q(`select status from cloud.outbox`)).rows[0]?.status === 'failed', { what: 'failed' });
    const log = await q(`select outcome, error_class, error_message from cloud.log where request_id = $1`, [rows[0].id]);
    expect(log.rows).toEqual([{ outcome: 'permanent', error_class: 'egress_refused', error_message: expect.stringMatching(/127\.0\.0\.1 is a loopback address/) }]);
    expect(sim.requests()).toEqual([]);
  });

  it('a URL bent to another host (user-info trick toward the metadata service) is refused, not retried', async () => {
    await q(`select cloud.put_endpoint('hook', $1, p_config => '{"path":"@169.254.169.254/latest/meta-data"}', p_max_attempts => 5)`, [sim.url]);
    listeners.push(await startListener(db.url));
    await q(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await q(`select status from cloud.outbox`)).rows[0]?.status === 'failed', { what: 'failed' });
    const { rows } = await q(`select attempts, last_error_class, last_error from cloud.outbox`);
    expect(rows[0]).toMatchObject({ attempts: 1, last_error_class: 'egress_refused' });
    expect(rows[0].last_error).toMatch(/credentials in the URL|not allowed/);
    expect(sim.requests()).toEqual([]);
  });

  it('a name that resolves to an address outside the allowed ranges is refused at connect time; a changed allowlist applies to the next claim', async () => {
    await q(`select cloud.put_endpoint('hook', $1)`, [`http://localhost:${new URL(sim.url).port}/webhook`]);
    await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{203.0.113.0/24}', true)`);
    listeners.push(await startListener(db.url));
    await q(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await q(`select status from cloud.outbox`)).rows[0]?.status === 'failed', { what: 'failed' });
    expect((await q(`select last_error from cloud.outbox`)).rows[0].last_error).toMatch(/outside the address ranges allowed for endpoint hook/);
    await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{127.0.0.0/8,::1/128}', true)`);
    // no waiting for a maintenance tick: every claim reads the allowlist afresh
    await q(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await statusCounts(db.pool)).sent === 1, { timeoutMs: 10_000, what: 'sent once the range allows it' });
    await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{203.0.113.0/24}', true)`); // narrowed again: the very next message is refused
    await q(`select cloud.enqueue_message('hook', 'demo.ping', '{}')`);
    await waitFor(async () => (await statusCounts(db.pool)).failed === 2, { timeoutMs: 10_000, what: 'refused again once narrowed' });
    expect(new Set(sim.requests().map((r) => r.key)).size).toBe(1); // only the message sent while the range allowed it
  });

  it('a bad allowed host is refused with EC011', async () => {
    expect(await sqlstateOf(q(`select cloud.put_endpoint_allowlist('hook', '{"https://x.example/"}')`))).toBe(SqlState.invalidAllowlistSetting);
    expect(await sqlstateOf(q(`select cloud.put_endpoint_allowlist('nope', '{}')`))).toBe(SqlState.unknownEndpoint);
  });
});
