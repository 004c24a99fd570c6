/**
 * The claim loop. Wakes on NOTIFY, on a timer set to the earliest retry, and
 * on a short poll; claims a batch (cloud.claim_messages), runs up to
 * `concurrency` HTTP attempts at once, and reports results in batches
 * (cloud.record_attempts), which also writes cloud.log. No transaction is
 * open while an HTTP call is in flight: the lease in the outbox row is the
 * only claim on a message.
 */
import os from 'node:os';
import type pg from 'pg';
import type { Config } from '../kernel/config.js';
import { createListenConnection, type ListenConnection } from '../kernel/db.js';
import { policyFor, type EgressPolicy } from './egress.js';
import { attemptDelivery, LEASE_UNSAFE, notSent, type AttemptResult } from './http.js';
import { providerContext } from './provider-context.js';
import type { Logger } from '../kernel/logger.js';
import type { Metrics } from './metrics.js';
import type { ClaimedMessage } from '../providers/index.js';
import { sql } from './queries.js';
import { loadVaultKey, SecretResolver } from '../kernel/vault.js';

/**
 * A claimed message, with the latest moment it may still be sent: its slot plus
 * the endpoint's grace (cloud.send_grace); null when the endpoint has no rate limit.
 */
type Claimed = ClaimedMessage & { send_by: Date | null };

/** The endpoint's columns of a claimed message, which sql.claim sends once per run of an endpoint's rows. */
type EndpointSettings = Pick<ClaimedMessage, 'provider' | 'base_url' | 'timeout_ms' | 'endpoint_config' | 'allow_hosts' | 'allow_cidrs' | 'allow_private' | 'download_hosts'>
  & { send_grace_ms: number | null };

/** A row of sql.claim: the endpoint's settings on the rows where `settings` is true, null on the others. */
type ClaimRow = Omit<ClaimedMessage, keyof EndpointSettings> & { settings: boolean } & { [K in keyof EndpointSettings]: EndpointSettings[K] | null };

/**
 * Each claimed message with its endpoint's settings, taken from the last row of the claim that carried that
 * endpoint's (sql.claim sends them on the first row of each run of an endpoint's rows), and send_by: its slot
 * plus the endpoint's grace, null when the endpoint has no rate limit. Throws on a row whose endpoint no row
 * before it described (a claim statement that lost its order), rather than send with another endpoint's settings.
 */
export function withEndpointSettings(rows: ClaimRow[]): Claimed[] {
  const byEndpoint = new Map<string, EndpointSettings>();
  return rows.map((row) => {
    if (row.settings) {
      byEndpoint.set(row.endpoint, {
        provider: row.provider!, base_url: row.base_url!, timeout_ms: row.timeout_ms!, endpoint_config: row.endpoint_config!,
        allow_hosts: row.allow_hosts!, allow_cidrs: row.allow_cidrs!, allow_private: row.allow_private!,
        download_hosts: row.download_hosts ?? undefined, send_grace_ms: row.send_grace_ms,
      });
    }
    const ep = byEndpoint.get(row.endpoint);
    if (!ep) throw new Error(`claim: message ${row.request_id} came without the settings of endpoint ${row.endpoint}`);
    // one object literal of a fixed shape (an object rest and spread of these rows cost 12 µs a message)
    return {
      request_id: row.request_id, endpoint: row.endpoint, operation: row.operation, payload: row.payload, attempt: row.attempt,
      aggregate_type: row.aggregate_type, aggregate_id: row.aggregate_id, ordering_key: row.ordering_key,
      provider: ep.provider, base_url: ep.base_url, timeout_ms: ep.timeout_ms, endpoint_config: ep.endpoint_config,
      locked_until: row.locked_until, send_at: row.send_at,
      allow_hosts: ep.allow_hosts, allow_cidrs: ep.allow_cidrs, allow_private: ep.allow_private, download_hosts: ep.download_hosts,
      send_by: ep.send_grace_ms === null ? null : new Date(row.send_at.getTime() + ep.send_grace_ms),
    };
  });
}

/**
 * When this listener may still start a message's call, on its own clock: the
 * lease runs timeout + margin from the claim, and the call may take the
 * timeout, so a call started later than claim + margin could be answered after
 * the lease ends, when another listener may own the message. Measured from
 * before the claim was asked for (so never later than the database's own
 * lease), and with the local clock only (so clock skew between hosts does not
 * matter). A listener that was paused (SIGSTOP, a VM freeze, a long GC) finds
 * its waiting messages past this and gives them back instead of sending.
 */
type LeaseClock = { startBy: number };

/** cloud.take_send_slots's answer for one message. */
interface SendSlot {
  request_id: string;
  outcome: 'slotted' | 'given_back' | 'lease_lost';
  send_at: Date | null;
  send_by: Date | null;
}

/** New slots start at least this far ahead: the answer's round trip on a busy host. */
const RESLOT_LEAD_MS = 100;
/** Slots one message may take after its first before it is given back (the lease bounds it too). */
const MAX_RESLOTS = 3;
const FLUSH_BATCH = 500;
/**
 * The claim is a prepared statement (parsed and planned once per connection, not per claim: a
 * quarter of a millisecond of the database's time on the wake → claim → send path). Its columns are
 * named, so that a migration adding a field to cloud.claimed_message does not change its result type.
 */
const CLAIM_STATEMENT = 'erp-cloud claim';
/**
 * How often reports (cloud.record_attempts) go while calls are in flight: at most one per
 * REPORT_GAP_MS, with every result that finished meanwhile. A report costs the database about the
 * same for one attempt as for dozens (a call, its plan, its commit), so under load the results of
 * a few milliseconds go together; a batch of refillAt results goes at once, and so does the report
 * of a listener with nothing left in flight (an idle listener reports, and claims again, at once).
 * It delays no send (the call is over), only the message's status, its log row, and the next
 * message of its ordering key, by REPORT_GAP_MS at most.
 */
const REPORT_GAP_MS = 10;
/** A retry due in weeks is looked at again within the hour (setTimeout caps at 2^31-1 ms anyway). */
const MAX_TIMER_MS = 3_600_000;
/**
 * The rotation tick (ERP_CLOUD_ROTATE_MS, migrations 0031, 0033): cloud.rotate_outbox archives the sent
 * messages of the hot table and empties it by TRUNCATE once 10,000 wait, or 100 while a transaction has
 * held a snapshot for over a second. Meanwhile no scan may remove the dead index entry each claimed
 * message leaves in outbox_active, and every claim walks them all: a busy listener asks every second,
 * not once per maintenance round (more often made the ERP wait at the rotations' exclusive moments:
 * ADR 0002 §7). With nothing to do the call stops at its first count (sql.rotate).
 */

interface Finished {
  endpoint: string;
  result: AttemptResult;
}

export class Worker {
  readonly id: string;
  private readonly inflight = new Map<string, AbortController>();
  private finished: Finished[] = [];
  private pumping = false;
  private rewake = false;
  private flushing: Promise<void> | null = null;
  private flushTimer: NodeJS.Timeout | null = null;
  /** When the last report went (performance.now()): see REPORT_GAP_MS. */
  private lastReportAt = -Infinity;
  private stopping = false;
  private listen: ListenConnection | null = null;
  private channels: string[] = [];
  private timers: NodeJS.Timeout[] = [];
  private dueTimer: NodeJS.Timeout | null = null;
  private dueAt = Infinity;
  private retryTimer: NodeJS.Timeout | null = null;
  private lookingAhead = false;
  private lookAgain = false;
  private cronScheduled = false;
  private maintaining = false;
  /** Sent messages this listener reported since its last rotation tick (none: the tick asks nothing). */
  private sentSinceTick = 0;
  private rotating = false;
  /** Messages waiting for a new send slot; asked for together (see takeSendSlot). */
  private reslots: Array<{ id: string; answer: (slot: SendSlot) => void }> = [];
  private reslotting = false;
  private readonly secrets: SecretResolver;
  private dbOk = true;
  private lastDbError: string | null = null;

  /** Free slots that justify a claim before the running report finishes. */
  private readonly refillAt: number;

  constructor(
    private readonly config: Config,
    private readonly pool: pg.Pool,
    private readonly log: Logger,
    private readonly metrics?: Metrics,
  ) {
    this.id = config.ERP_CLOUD_WORKER_ID;
    this.refillAt = Math.max(1, Math.min(config.ERP_CLOUD_BATCH_SIZE, Math.ceil(config.ERP_CLOUD_CONCURRENCY / 2)));
    this.secrets = new SecretResolver({ pool, masterKey: loadVaultKey(config, { optional: true }), ttlMs: config.ERP_CLOUD_SECRET_TTL_MS });
  }

  async start(): Promise<void> {
    this.channels = await this.loadChannels();
    // registered (enqueuers NOTIFY a listener by its row) and listening before the first claim, which
    // may declare it idle; the LISTEN connection opens while the registration runs
    const [registered, listen] = await Promise.allSettled([
      this.pool.query(sql.listenerStart, [this.id, this.channels, this.config.ERP_CLOUD_ENDPOINTS, os.hostname(), process.pid]),
      createListenConnection(this.config.DATABASE_URL, () => this.wake(), this.log),
    ]);
    if (registered.status === 'rejected' || listen.status === 'rejected') {
      if (listen.status === 'fulfilled') await listen.value.close();
      throw registered.status === 'rejected' ? registered.reason : (listen as PromiseRejectedResult).reason;
    }
    this.listen = listen.value;
    await this.listen.listenTo(this.channels);
    this.timers.push(setInterval(() => this.wake(), this.config.ERP_CLOUD_POLL_MS));
    this.timers.push(setInterval(() => void this.maintain(), this.config.ERP_CLOUD_MAINTENANCE_MS));
    if (this.config.ERP_CLOUD_ROTATE_MS > 0) this.timers.push(setInterval(() => void this.rotate(), this.config.ERP_CLOUD_ROTATE_MS));
    this.log.info({ worker: this.id, channels: this.channels, concurrency: this.config.ERP_CLOUD_CONCURRENCY }, 'listener started');
    // the first claim does not wait for the first maintenance round (reaping, and without pg_cron the
    // periodic jobs): both start now; leases it reaps wake the loop again
    this.wake();
    await this.maintain();
  }

  /** Health for /healthz: the LISTEN connection is up and the last database call worked. */
  health(): { ok: boolean; worker: string; listen: boolean; database: boolean; inflight: number; lastDbError: string | null } {
    const listen = this.listen?.connected() ?? false;
    return { ok: listen && this.dbOk, worker: this.id, listen, database: this.dbOk, inflight: this.inflight.size, lastDbError: this.lastDbError };
  }

  /** Asks the loop to claim now. Cheap and safe to call often: concurrent calls coalesce. */
  wake(): void {
    if (this.stopping) return;
    if (this.pumping) {
      this.rewake = true;
      return;
    }
    void this.pump();
  }

  private async pump(): Promise<void> {
    this.pumping = true;
    try {
      do {
        this.rewake = false;
        while (!this.stopping) {
          const room = this.config.ERP_CLOUD_CONCURRENCY - this.inflight.size;
          if (room <= 0) break;
          const want = Math.min(room, this.config.ERP_CLOUD_BATCH_SIZE);
          const lease: LeaseClock = { startBy: Date.now() + this.config.ERP_CLOUD_LEASE_MARGIN_MS };
          const asked = performance.now();
          const rows = withEndpointSettings((await this.pool.query<ClaimRow>({
            name: CLAIM_STATEMENT, text: sql.claim, values: [this.id, want, this.config.ERP_CLOUD_ENDPOINTS, this.config.ERP_CLOUD_LEASE_MARGIN_MS],
          })).rows);
          this.metrics?.claimSeconds.observe({ result: rows.length > 0 ? 'work' : 'empty' }, (performance.now() - asked) / 1000);
          this.markDb(null);
          for (const msg of rows) this.dispatch(msg, lease);
          if (rows.length === 0) this.lookAhead();
          if (rows.length < want) break;
        }
      } while (this.rewake && !this.stopping);
    } catch (err) {
      this.markDb(err);
      this.log.warn({ err: errText(err) }, 'claim failed; retrying');
      this.retryLater();
    } finally {
      this.pumping = false;
    }
  }

  private dispatch(msg: Claimed, lease: LeaseClock): void {
    const abort = new AbortController();
    // by try, not by message: a try held up past its lease may still be here when the same message is claimed again
    const key = `${msg.request_id}#${msg.attempt}`;
    this.inflight.set(key, abort);
    void this.attempt(msg, lease, abort.signal).then((result) => {
      this.inflight.delete(key);
      if (result === null) {
        // not sent and not this listener's any more (given back, or its lease is gone): nothing to report
        if (this.config.ERP_CLOUD_CONCURRENCY - this.inflight.size >= this.refillAt) this.wake();
        return;
      }
      if (abort.signal.aborted && result.outcome !== 'ok') {
        result.error_class = 'shutdown';
        result.error_message = `aborted: listener ${this.id} shut down before the cloud answered`;
      }
      this.metrics?.attemptSeconds.observe({ endpoint: msg.endpoint, outcome: result.outcome }, result.duration_ms / 1000);
      this.finished.push({ endpoint: msg.endpoint, result });
      this.scheduleFlush();
      // claim again as soon as a worthwhile batch fits, without waiting for the report:
      // HTTP calls and database round trips then overlap instead of taking turns. With nothing
      // left in flight the report goes now and claims when it ends (flush): one claim, not two
      if (this.inflight.size > 0 && this.config.ERP_CLOUD_CONCURRENCY - this.inflight.size >= this.refillAt) this.wake();
    });
  }

  /** One attempt, or null when the message was not sent and is no longer this listener's to report. */
  private async attempt(msg: Claimed, lease: LeaseClock, signal: AbortSignal): Promise<AttemptResult | null> {
    // the allowlist as it was when the message was claimed: a change by an operator applies to the next claim
    let policy: EgressPolicy;
    try {
      policy = policyFor({ name: msg.endpoint, base_url: msg.base_url, allow_hosts: msg.allow_hosts, allow_cidrs: msg.allow_cidrs, allow_private: msg.allow_private, download_hosts: msg.download_hosts });
    } catch (err) {
      // nothing went out: an endpoint whose URL cannot be read has no host to allow
      return notSent(msg, 'retryable', 'egress_policy_unavailable', `could not read the allowlist of endpoint ${msg.endpoint}: ${errText(err)}`);
    }
    const decidedAt = await this.waitForSlot(msg, signal);
    if (decidedAt === null) return null;
    const result = await attemptDelivery(msg, {
      logBodyBytes: this.config.ERP_CLOUD_LOG_BODY_BYTES, signal, policy,
      context: providerContext({
        pool: this.pool, endpoint: msg.endpoint, policy, timeoutMs: msg.timeout_ms, signal,
        secret: (name) => this.secrets.resolve(name),
      }),
      // the answer could come after the lease: by then another listener may be sending it too
      mayStart: () => Date.now() <= lease.startBy,
    });
    if (result.error_class === LEASE_UNSAFE) {
      return this.giveBack(msg, `its lease could end before the answer (${Date.now() - lease.startBy} ms past the last safe start: was this listener paused or starved?)`);
    }
    // the attempt started when the listener decided it may go (within its slot's grace): what the rate limit promises
    result.started_at = new Date(decidedAt).toISOString();
    return result;
  }

  /**
   * A rate-limited message waits for its slot (at most ~100 ms ahead: see
   * cloud._take_budget) and goes only if it is still within the endpoint's
   * grace (send_by). Later than that (timers fired late: a stalled event loop,
   * a loaded host) its slot may already be another listener's turn, so it is
   * not sent late: it takes a new slot from the shared bucket
   * (cloud.take_send_slots), at most MAX_RESLOTS times and only while this
   * listener holds its lease. Returns the moment it decided the message may go,
   * or null when it was given back unsent or is no longer this listener's.
   */
  private async waitForSlot(msg: Claimed, signal: AbortSignal): Promise<number | null> {
    let slot = msg.send_at.getTime();
    let by = msg.send_by?.getTime() ?? null;
    for (let reslots = 0; ; reslots++) {
      for (let now = Date.now(); now < slot && !signal.aborted; now = Date.now()) await sleep(slot - now, signal);
      if (signal.aborted) return this.giveBack(msg, 'the listener is shutting down');
      const now = Date.now();
      if (by === null || now <= by) return now; // no await between this check and the send
      if (reslots === MAX_RESLOTS) return this.giveBack(msg, `its send slot passed ${MAX_RESLOTS + 1} times`);
      const next = await this.takeSendSlot(msg.request_id);
      if (next.outcome !== 'slotted' || !next.send_at) {
        this.log.info({ request_id: msg.request_id, endpoint: msg.endpoint, outcome: next.outcome }, 'send slot passed; not sent');
        if (next.outcome === 'given_back') this.wake();
        return null;
      }
      slot = next.send_at.getTime();
      by = next.send_by?.getTime() ?? null;
    }
  }

  /** Asks for a new send slot; every message that asks in the same turn of the event loop is asked for in one call. */
  private takeSendSlot(id: string): Promise<SendSlot> {
    return new Promise((answer) => {
      this.reslots.push({ id, answer });
      if (this.reslotting) return;
      this.reslotting = true;
      setImmediate(() => void this.flushReslots());
    });
  }

  private async flushReslots(): Promise<void> {
    while (this.reslots.length > 0) {
      const batch = this.reslots.splice(0, 1000);
      let rows: SendSlot[] = [];
      try {
        rows = (await this.pool.query<SendSlot>(sql.takeSendSlots, [this.id, batch.map((b) => b.id), RESLOT_LEAD_MS])).rows;
        this.markDb(null);
      } catch (err) {
        // no new slot, so no send: the leases run out and the messages are retried (cloud.reap_expired_leases)
        this.markDb(err);
        this.log.warn({ err: errText(err), messages: batch.length }, 'could not take new send slots; the messages wait for their leases to expire');
      }
      const byId = new Map(rows.map((r) => [r.request_id, r]));
      for (const b of batch) b.answer(byId.get(b.id) ?? { request_id: b.id, outcome: 'lease_lost', send_at: null, send_by: null });
    }
    this.reslotting = false;
  }

  /** Gives a message back unsent (pending, due now). Always null: the message does not go. */
  private async giveBack(msg: Claimed, why: string): Promise<null> {
    try {
      await this.pool.query(sql.giveBack, [this.id, [msg.request_id], [msg.attempt]]);
      this.log.info({ request_id: msg.request_id, endpoint: msg.endpoint }, `given back unsent: ${why}`);
      this.wake();
    } catch (err) {
      this.markDb(err);
      this.log.warn({ err: errText(err), request_id: msg.request_id }, 'could not give a message back; its lease expires on its own');
    }
    return null;
  }

  /**
   * A report goes when refillAt results wait, or no call is in flight any more, or REPORT_GAP_MS
   * after the previous report went; only one runs at a time (while it runs, the next batch accumulates).
   */
  private scheduleFlush(): void {
    if (this.flushing) return; // the running report takes what waits when it ends
    const wait = this.reportDue();
    if (wait <= 0) {
      if (this.flushTimer) clearTimeout(this.flushTimer);
      this.flushTimer = null;
      void this.flush();
      return;
    }
    this.flushTimer ??= setTimeout(() => {
      this.flushTimer = null;
      void this.flush();
    }, wait);
  }

  /** How long the waiting results should still wait for others (<= 0: report now). */
  private reportDue(): number {
    // nothing else in flight: nothing to wait for
    if (this.finished.length >= this.refillAt || this.inflight.size === 0 || this.stopping) return 0;
    return this.lastReportAt + REPORT_GAP_MS - performance.now();
  }

  /** Reports finished attempts in batches; while one report is running the next batch accumulates. */
  private flush(): Promise<void> {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = null;
    if (this.flushing) return this.flushing;
    this.flushing = (async () => {
      try {
        while (this.finished.length > 0) {
          const batch = this.finished.splice(0, FLUSH_BATCH);
          this.lastReportAt = performance.now();
          try {
            const { rows } = await this.pool.query<{ request_id: string; status: string }>(sql.recordAttempts, [
              this.id, JSON.stringify(batch.map((f) => f.result)),
            ]);
            this.markDb(null);
            if (this.metrics) {
              const endpointOf = new Map(batch.map((f) => [f.result.request_id, f.endpoint]));
              for (const r of rows) this.metrics.deliveries.inc({ endpoint: endpointOf.get(r.request_id) ?? '?', outcome: r.status });
            }
            for (const r of rows) if (r.status === 'sent') this.sentSinceTick++;
          } catch (err) {
            // keep the results: the database may be restarting; the leases protect the messages meanwhile
            this.finished.unshift(...batch);
            this.markDb(err);
            this.log.warn({ err: errText(err), pending: this.finished.length }, 'recording attempts failed; retrying');
            await sleep(250 + Math.random() * 750);
            if (this.stopping && this.shutdownDeadline < Date.now()) return; // stop() gives back what is left
            continue;
          }
          // what finished meanwhile waits for its turn (REPORT_GAP_MS), unless it should go now
          if (this.reportDue() > 0) break;
        }
      } finally {
        this.flushing = null;
      }
      if (this.finished.length > 0 && !this.stopping) this.scheduleFlush();
      // room for a worthwhile batch (ordering keys may have moved on too); a smaller room is
      // filled when enough calls end (dispatch) or by the poll: claims of a few messages each
      // would cost the database nearly as much as full ones
      if (this.config.ERP_CLOUD_CONCURRENCY - this.inflight.size >= this.refillAt) this.wake();
    })();
    return this.flushing;
  }

  /**
   * After an empty claim: arms a timer for the earliest work not due yet (armDueTimer), beside the
   * claim loop, so that a claim a NOTIFY asks for meanwhile does not wait for the answer (the look-up
   * takes the database milliseconds). One at a time; asked again while one runs, it runs once more.
   */
  private lookAhead(): void {
    if (this.lookingAhead) {
      this.lookAgain = true;
      return;
    }
    this.lookingAhead = true;
    void (async () => {
      try {
        do {
          this.lookAgain = false;
          await this.armDueTimer();
        } while (this.lookAgain && !this.stopping);
      } catch (err) {
        this.markDb(err);
        this.log.warn({ err: errText(err) }, 'looking for the next due message failed; retrying');
        this.retryLater();
      } finally {
        this.lookingAhead = false;
      }
    })();
  }

  private async armDueTimer(): Promise<void> {
    const { rows } = await this.pool.query<{ at: Date | null }>(sql.nextDue, [this.config.ERP_CLOUD_ENDPOINTS]);
    const at = rows[0]?.at?.getTime();
    if (at === undefined || at >= this.dueAt || this.stopping) return;
    if (this.dueTimer) clearTimeout(this.dueTimer);
    this.dueAt = at;
    this.dueTimer = setTimeout(() => {
      this.dueTimer = null;
      this.dueAt = Infinity;
      this.wake();
    }, Math.min(Math.max(0, at - Date.now()) + 2, MAX_TIMER_MS));
  }

  private retryLater(): void {
    if (this.retryTimer || this.stopping) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.wake();
    }, 500 + Math.random() * 1000);
  }

  /**
   * A source callback that gave way to a lock an ERP transaction held (0037) is the listener's to call
   * again, not an operator's. Its own failure (say, a statement_timeout) is logged, and does not make the
   * database count as down.
   */
  private async replayDeferredCallbacks(): Promise<void> {
    try {
      const { rows } = await this.pool.query<{ replayed: number }>(sql.replayDeferredCallbacks);
      if ((rows[0]?.replayed ?? 0) > 0) this.log.info({ replayed: rows[0]!.replayed }, 'source callbacks that had given way to a lock were called again');
    } catch (err) {
      this.log.warn({ err: errText(err) }, 'calling deferred source callbacks again failed');
    }
  }

  /** Heartbeat, lease reaping, and the pg_cron jobs' work when pg_cron is not there. */
  private async maintain(): Promise<void> {
    if (this.stopping || this.maintaining) return; // a slow round is not overtaken by the next tick
    this.maintaining = true;
    try {
      const channels = await this.loadChannels();
      const beat = await this.pool.query<{ registered: boolean }>(sql.listenerHeartbeat, [this.id, channels]);
      if (!beat.rows[0]?.registered) {
        // the reaper forgot this listener (silent for 2 minutes): without its row nobody sends it a NOTIFY
        await this.pool.query(sql.listenerStart, [this.id, channels, this.config.ERP_CLOUD_ENDPOINTS, os.hostname(), process.pid]);
        this.log.warn({ worker: this.id }, 'this listener had been forgotten (no heartbeat for 2 minutes: was it paused?); registered again');
        this.wake();
      }
      if (channels.some((c) => !this.channels.includes(c))) {
        await this.listen?.listenTo(channels);
        this.channels = channels;
      }
      const { rows } = await this.pool.query<{ scheduled: boolean }>(sql.cronScheduled);
      this.cronScheduled = rows[0]?.scheduled ?? false;
      // reaping is cheap and makes recovery from a dead listener take seconds, not a cron minute
      const reaped = await this.pool.query<{ reaped: number }>(sql.reap);
      if (!this.cronScheduled) await this.pool.query(sql.maintenance);
      this.markDb(null);
      await this.replayDeferredCallbacks();
      if ((reaped.rows[0]?.reaped ?? 0) > 0) this.wake();
    } catch (err) {
      this.markDb(err);
      this.log.warn({ err: errText(err) }, 'maintenance failed');
    } finally {
      this.maintaining = false;
    }
  }

  /** The rotation tick: only after this listener reported sent messages, never beside a running rotation or maintenance round. */
  private async rotate(): Promise<void> {
    if (this.stopping || this.rotating || this.maintaining || this.sentSinceTick === 0) return;
    this.rotating = true;
    const sent = this.sentSinceTick;
    this.sentSinceTick = 0;
    try {
      const { rows } = await this.pool.query<{ rotated: number | null }>(sql.rotate);
      // null: it could not have its tables (a claim or a report held them over 50 ms, or a transaction has held
      // them for over a second): the next tick asks again, not only the next message this listener sends
      if (rows[0]?.rotated === null) this.sentSinceTick += sent;
    } catch (err) {
      this.markDb(err);
      this.log.warn({ err: errText(err) }, 'rotating the outbox failed');
    } finally {
      this.rotating = false;
    }
  }

  /** A secret by name through this listener's resolver (the inbound receivers use it for signing keys). */
  secret(name: string): Promise<string> {
    return this.secrets.resolve(name);
  }

  private async loadChannels(): Promise<string[]> {
    const { rows } = await this.pool.query<{ wake_channel: string }>(sql.channels, [this.config.ERP_CLOUD_ENDPOINTS]);
    return rows.map((r) => r.wake_channel);
  }

  private markDb(err: unknown): void {
    this.dbOk = err === null;
    if (err !== null) this.lastDbError = errText(err);
  }

  private shutdownDeadline = Infinity;

  /**
   * SIGTERM: stop claiming, let in-flight calls finish within the grace period,
   * abort the rest, report everything, give back what could not be reported.
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.shutdownDeadline = Date.now() + this.config.ERP_CLOUD_SHUTDOWN_GRACE_MS;
    for (const t of this.timers) clearInterval(t);
    if (this.dueTimer) clearTimeout(this.dueTimer);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.log.info({ inflight: this.inflight.size }, 'stopping: no more claims, finishing in-flight calls');
    while (this.inflight.size > 0 && Date.now() < this.shutdownDeadline) await sleep(20);
    for (const abort of this.inflight.values()) abort.abort();
    while (this.inflight.size > 0) await sleep(5);
    this.shutdownDeadline = Date.now() + Math.max(2000, this.config.ERP_CLOUD_SHUTDOWN_GRACE_MS / 2);
    while ((this.finished.length > 0 || this.flushing) && Date.now() < this.shutdownDeadline) await this.flush();
    const unreported = this.finished.map((f) => f.result.request_id);
    try {
      if (unreported.length > 0) await this.pool.query(sql.release, [this.id, unreported]);
      await this.pool.query(sql.listenerStop, [this.id]);
    } catch (err) {
      this.log.warn({ err: errText(err), unreported: unreported.length }, 'could not release leases; they expire on their own');
    }
    await this.listen?.close();
    this.log.info('stopped');
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((r) => {
    const t = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      r();
    }
  });
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
