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
   * Each claimed message with send_by: its slot plus the endpoint's grace (cloud.send_grace); null when unlimited.
   * The columns are named (a prepared statement's result type must not change when cloud.claimed_message gains one).
   */
  claim: `select c.request_id, c.endpoint, c.operation, c.payload, c.attempt, c.aggregate_type, c.aggregate_id, c.ordering_key,
                 c.provider, c.base_url, c.timeout_ms, c.endpoint_config, c.locked_until, c.send_at,
                 c.allow_hosts, c.allow_cidrs, c.allow_private, c.download_hosts,
                 c.send_at + cloud.send_grace((select e.rate_per_s from cloud.endpoint e where e.name = c.endpoint)) as send_by
            from cloud.claim_messages($1, $2, $3, make_interval(secs => $4::float8 / 1000)) c`,
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
