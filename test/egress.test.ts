/**
 * The egress guard: a token bucket per endpoint shared by every listener, 429
 * pauses for all listeners, and a circuit breaker that keeps a cloud outage
 * from costing attempts (or the ERP anything).
 */
import pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { assertAddressAllowed, assertUrlAllowed, classifyAddress, EgressRefused, type EgressPolicy } from '../listener/egress.js';
import { SqlState } from '../listener/errors.js';
import { startSim, webhookRoutes, type SimServer } from '../listener/sim/index.js';
import { createTestDb, sqlstateOf, statusCounts, waitFor, type TestDb } from './helpers/db.js';
import { startListener, type InProcessListener } from './helpers/listener.js';

let db: TestDb;
let q: pg.Pool['query'];
let sim: SimServer;
let listeners: InProcessListener[] = [];

beforeAll(async () => {
  db = await createTestDb('egress');
  q = db.pool.query.bind(db.pool) as pg.Pool['query'];
  sim = await startSim({ routes: webhookRoutes() });
});
afterAll(async () => {
  await Promise.all(listeners.map((l) => l.stop()));
  await sim.close();
  await db.drop();
});
beforeEach(async () => {
  await Promise.all(listeners.map((l) => l.stop()));
  listeners = [];
  sim.reset();
  sim.setRateLimit(null); // a test that failed before clearing its gateway limit must not fail the next one
  await q(`truncate cloud.outbox, cloud.log, cloud.listener, cloud.endpoint_usage`);
  await q(`delete from cloud.endpoint`);
  await q(`select cloud.put_endpoint('hook', $1, p_timeout_ms => 500, p_backoff_base_ms => 100, p_backoff_cap_ms => 1000, p_max_attempts => 20)`, [`${sim.url}/webhook`]);
  await q(`select cloud.put_endpoint_allowlist('hook', '{}', '{}', true)`); // the simulator is on 127.0.0.1
});

const T0 = Date.parse('2030-01-01T00:00:00Z');
const at = (ms: number) => new Date(T0 + ms).toISOString();
const enqueueMany = (n: number) => q(`select cloud.enqueue_message('hook', 'demo.ping', jsonb_build_object('n', g), p_not_before => '2020-01-01') from generate_series(1, $1) g`, [n]);
const claim = async (worker: string, ms: number, limit = 100) =>
  (await q<{ request_id: string }>(`select request_id from cloud.claim_messages($1, $2, null, '5 seconds', $3)`, [worker, limit, at(ms)])).rows.map((r) => r.request_id);
const report = (worker: string, ms: number, results: Array<{ request_id: string; outcome: string; http_status?: number | null; retry_after_ms?: number }>) =>
  q(`select * from cloud.record_attempts($1, $2::jsonb, $3)`, [worker, JSON.stringify(results.map((r) => ({ attempt: 1, error_message: `HTTP ${r.http_status}`, ...r }))), at(ms)]);
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
    await q(`select cloud.put_endpoint_limits('hook', 20, 2)`);
    sim.setRateLimit({ perSecond: 24, burst: 3 }); // the cloud's own gateway limit, a little above ours
    await enqueueMany(50);
    listeners.push(await startListener(db.url), await startListener(db.url));
    await waitFor(async () => (await statusCounts(db.pool)).sent === 50, { timeoutMs: 15_000, what: 'all sent' });
    // every message arrived (a retry after a 500 ms timeout on a loaded machine is a second arrival of the same
    // idempotency key, and it took a token like any call: it counts in the windows below)
    expect(new Set(sim.requests().map((r) => r.key)).size).toBe(50);
    const times = sim.requests().map((r) => r.at).sort((a, b) => a - b);
    expect(times.length).toBeGreaterThanOrEqual(50);
    // in any one-second window: at most the rate plus the burst
    const busiest = Math.max(...times.map((t) => times.filter((u) => u >= t && u < t + 1000).length));
    expect(busiest).toBeLessThanOrEqual(22);
    expect((times.at(-1)! - times[0]!) / 1000).toBeGreaterThanOrEqual((50 - 2) / 20 - 0.1);
    expect(sim.requests().filter((r) => r.status === 429)).toEqual([]); // so the cloud never had to say 429
    sim.setRateLimit(null);
  });
});

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
    expect((await q(`select cloud.age_out_log() as n`)).rows[0].n).toBe(0);
    await q(`select cloud.put_setting('log_retention', '30 days')`);
    expect((await q(`select cloud.age_out_log() as n`)).rows[0].n).toBeGreaterThanOrEqual(1);
    expect(await sqlstateOf(q(`select cloud.put_setting('nope', '1 day')`))).toBe(SqlState.invalidSetting);
    expect(await sqlstateOf(q(`select cloud.put_setting('log_retention', '5 minutes')`))).toBe(SqlState.invalidSetting);
    await q(`select cloud.put_setting('log_retention', '90 days')`);
  });
});

describe('circuit breaker', () => {
  beforeEach(async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, 1, 3, 10000)`);
  });

  it('consecutive cloud failures open the circuit: the rest stay pending without burning attempts', async () => {
    await enqueueMany(20);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 503 })));
    const ep = await endpoint();
    expect(ep).toMatchObject({ circuit_state: 'open', circuit_failures: 3 });
    expect(ep.circuit_reason).toMatch(/3 consecutive failures/);
    expect(await claim('b', 5000)).toEqual([]);
    const attempts = await q(`select sum(attempts)::int n from cloud.outbox`);
    expect(attempts.rows[0].n).toBe(3);
  });

  it('after the cool-down exactly one probe goes; its success closes the circuit and the backlog drains', async () => {
    await enqueueMany(20);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 502 })));
    const probe = await claim('a', 10_200);
    expect(probe).toHaveLength(1);
    expect((await endpoint()).circuit_state).toBe('half_open');
    expect(await claim('b', 10_300)).toEqual([]);
    await report('a', 10_400, [{ request_id: probe[0]!, outcome: 'ok', http_status: 200 }]);
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_failures: 0 });
    expect(await claim('b', 20_000)).toHaveLength(19); // 20 - the probe (the three failed ones are due again)
  });

  it('a failed probe re-opens the circuit for another cool-down', async () => {
    await enqueueMany(5);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: null })));
    const probe = await claim('a', 10_200);
    await report('a', 10_300, [{ request_id: probe[0]!, outcome: 'retryable', http_status: 504 }]);
    const ep = await endpoint();
    expect(ep.circuit_state).toBe('open');
    expect(new Date(ep.circuit_opened_at).getTime()).toBe(T0 + 10_300);
    expect(await claim('a', 15_000)).toEqual([]);
    expect(await claim('a', 20_400)).toHaveLength(1);
  });

  it('a lost probe (its listener died) does not leave the circuit half-open forever', async () => {
    await enqueueMany(5);
    const batch = await claim('a', 0, 3);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'retryable', http_status: 500 })));
    await claim('dies', 10_200);
    await q(`select cloud.reap_expired_leases($1)`, [at(30_000)]);
    expect((await endpoint()).circuit_state).toBe('open');
    expect(await claim('a', 40_100)).toHaveLength(1);
  });

  it("4xx answers are the message's problem, not the cloud's: they never open the circuit", async () => {
    await enqueueMany(10);
    const batch = await claim('a', 0, 10);
    await report('a', 100, batch.map((id) => ({ request_id: id, outcome: 'permanent', http_status: 400 })));
    expect(await endpoint()).toMatchObject({ circuit_state: 'closed', circuit_failures: 0 });
  });

  it('a cloud outage costs the ERP nothing: 5,000 documents wait behind the open circuit and are delivered once after recovery', async () => {
    await q(`select cloud.put_endpoint_limits('hook', null, 1, 5, 500)`);
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
