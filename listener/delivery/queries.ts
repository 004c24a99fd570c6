/**
 * The SQL of the delivery loop (worker, provider-context, metrics) and of the
 * CLI's status and replay verbs, each a call of a cloud.* function or view.
 * Not every statement of the package: each room keeps the SQL only it sends
 * next to its code — ops/doctor/sql.ts, ops/tail.ts, kernel/vault.ts
 * (vaultSql), kernel/migrations.ts and kernel/db.ts, the inbound receivers,
 * the sso/ modules, a few in cli.ts (sso and vault verbs), and the simulators.
 */
export const sql = {
  /**
   * The claimed messages, each endpoint's settings once per run of its rows: `settings` is true on a row whose
   * endpoint differs from the row before, which alone carries the endpoint's columns (provider … download_hosts)
   * and its send grace in ms (cloud.send_grace; null when unlimited); on the rows after it they are null, and
   * withEndpointSettings (worker.ts) fills them in. A claim of 100 messages to one endpoint then formats, sends
   * and parses those columns once, not 100 times (measured: 9 µs of the database's time per message).
   * The columns are named (a prepared statement's result type must not change when cloud.claimed_message gains one).
   */
  claim: `select w.request_id, w.endpoint, w.operation, w.payload, w.attempt, w.aggregate_type, w.aggregate_id, w.ordering_key,
                 w.locked_until, w.send_at, w.settings,
                 case when w.settings then w.provider end as provider,
                 case when w.settings then w.base_url end as base_url,
                 case when w.settings then w.timeout_ms end as timeout_ms,
                 case when w.settings then w.endpoint_config end as endpoint_config,
                 case when w.settings then w.allow_hosts end as allow_hosts,
                 case when w.settings then w.allow_cidrs end as allow_cidrs,
                 case when w.settings then w.allow_private end as allow_private,
                 case when w.settings then w.download_hosts end as download_hosts,
                 case when w.settings then extract(epoch from cloud.send_grace(
                   (select e.rate_per_s from cloud.endpoint e where e.name = w.endpoint)))::float8 * 1000 end as send_grace_ms
            from (select c.*, c.endpoint is distinct from lag(c.endpoint) over () as settings
                    from cloud.claim_messages($1, $2, $3, make_interval(secs => $4::float8 / 1000)) c) w`,
  takeSendSlots: 'select request_id, outcome, send_at, send_by from cloud.take_send_slots($1, $2::uuid[], make_interval(secs => $3::float8 / 1000))',
  recordAttempts: 'select request_id, status from cloud.record_attempts($1, $2::jsonb)',
  /** Claimed and maybe sent, but not reported (shutdown): pending again, tries stay counted. */
  release: 'select cloud.release_messages($1, $2::uuid[]) as released',
  /** Claimed and not sent: pending again, the try taken back. */
  giveBack: 'select cloud.give_back_messages($1, $2::uuid[], p_attempts => $3::integer[]) as given_back',
  nextDue: 'select cloud.next_due_at($1) as at',
  listenerStart: 'select cloud.record_listener_start($1, $2, $3, $4, $5)',
  /** registered = false: the reaper forgot this listener (silent for 2 minutes); it registers again. */
  listenerHeartbeat: 'select cloud.record_listener_heartbeat($1, $2) as registered',
  listenerStop: 'select cloud.record_listener_stop($1)',
  reap: 'select cloud.reap_expired_leases() as reaped',
  /** The rotation tick: at the function's default batch of sent messages (10,000 since 0033), or 100 while a snapshot has been held over a second. */
  rotate: 'select cloud.rotate_outbox(p_min_sent_held => 100) as rotated',
  maintenance: 'select cloud.run_maintenance() as summary',
  /** Source callbacks that gave way to a lock an ERP transaction held (0037): called again with the current state. */
  replayDeferredCallbacks: 'select tax.replay_deferred_callbacks() + scm.replay_deferred_callbacks() as replayed',
  cronScheduled: 'select cloud.cron_jobs_scheduled() as scheduled',
  channels: 'select distinct wake_channel from cloud.endpoint where $1::text[] is null or name = any ($1) order by 1',
  endpointStatus: 'select * from cloud.endpoint_status order by endpoint',
  parkedKeys: 'select * from cloud.parked_keys order by endpoint, ordering_key',
  replayOne: 'select cloud.replay_message($1, $2, $3) as request_id',
  replayDead: 'select cloud.replay_dead_messages($1, $2, $3) as replayed',
  validProviderToken: 'select (t).token, (t).expires_at from cloud.valid_provider_token($1, $2, make_interval(secs => $3::float8 / 1000)) t',
  lockProviderToken: 'select cloud.lock_provider_token($1, $2)',
  unlockProviderToken: 'select cloud.unlock_provider_token($1, $2)',
  storeProviderToken: 'select cloud.store_provider_token($1, $2, $3, $4)',
  forgetProviderToken: 'select cloud.forget_provider_token($1, $2, $3)',
} as const;
