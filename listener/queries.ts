/** Every SQL statement the listener and the CLI send, in one place. Each calls a cloud.* function or view. */
export const sql = {
  claim: 'select * from cloud.claim_messages($1, $2, $3, make_interval(secs => $4::float8 / 1000))',
  recordAttempts: 'select request_id, status from cloud.record_attempts($1, $2::jsonb)',
  release: 'select cloud.release_messages($1, $2::uuid[]) as released',
  nextDue: 'select cloud.next_due_at($1) as at',
  listenerStart: 'select cloud.record_listener_start($1, $2, $3, $4, $5)',
  listenerHeartbeat: 'select cloud.record_listener_heartbeat($1, $2)',
  listenerStop: 'select cloud.record_listener_stop($1)',
  reap: 'select cloud.reap_expired_leases() as reaped',
  maintenance: 'select cloud.run_maintenance() as summary',
  cronScheduled: 'select cloud.cron_jobs_scheduled() as scheduled',
  egressPolicies: 'select name, base_url, allow_hosts, allow_cidrs::text[] as allow_cidrs, allow_private from cloud.endpoint',
  channels: 'select distinct wake_channel from cloud.endpoint where $1::text[] is null or name = any ($1) order by 1',
  endpointStatus: 'select * from cloud.endpoint_status order by endpoint',
  parkedKeys: 'select * from cloud.parked_keys order by endpoint, ordering_key',
  replayOne: 'select cloud.replay_message($1, $2, $3) as request_id',
  replayDead: 'select cloud.replay_dead_messages($1, $2, $3) as replayed',
} as const;
