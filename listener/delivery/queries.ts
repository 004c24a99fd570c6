/** Every SQL statement the listener and the CLI send, in one place. Each calls a cloud.* function or view. */
export const sql = {
  /** Each claimed message with send_by: its slot plus the endpoint's grace (cloud.send_grace); null when unlimited. */
  claim: `select c.*, c.send_at + cloud.send_grace((select e.rate_per_s from cloud.endpoint e where e.name = c.endpoint)) as send_by
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
  maintenance: 'select cloud.run_maintenance() as summary',
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

/**
 * What `erp-cloud doctor` asks (listener/doctor.ts). Read-only; besides cloud.*
 * it reads the catalogs, the migrations table and pg_cron's tables, because
 * those are what it checks.
 */
export const doctorSql = {
  server: `select current_setting('server_version_num')::int as num, current_setting('server_version') as version, current_database() as database, current_user as role`,
  /** erp-cloud's migration history (listener/migrations.ts), schema-qualified: never a table the search path finds. */
  migrationsTable: `select pg_catalog.to_regclass('erp_cloud.migration') is not null as present`,
  migrationRows: 'select id, name, sha256 from erp_cloud.migration order by id',
  cronScheduled: 'select cloud.cron_jobs_scheduled() as scheduled',
  cronJobs: `
    select j.jobname, j.schedule, j.active, r.status as last_status, r.return_message as last_message, r.at as last_at,
           s.at as last_success_at, coalesce(s.at > now() - interval '10 minutes', false) as recent_success
      from cron.job j
      left join lateral (select d.status, d.return_message, coalesce(d.end_time, d.start_time) as at
                           from cron.job_run_details d where d.jobid = j.jobid order by d.runid desc limit 1) r on true
      left join lateral (select max(coalesce(d.end_time, d.start_time)) as at
                           from cron.job_run_details d where d.jobid = j.jobid and d.status = 'succeeded') s on true
     where j.jobname like 'erp-cloud: %'
     order by j.jobname`,
  /** Every registered listener; live = a heartbeat within the last minute. */
  listeners: `
    select worker_id, host, pid, endpoints, greatest(round(extract(epoch from now() - heartbeat_at)), 0)::int as age_s,
           heartbeat_at > now() - interval '1 minute' as live
      from cloud.listener
     order by heartbeat_at desc, worker_id`,
  /** Enabled endpoints with pending messages that no live listener serves (cloud.listener.endpoints; null = all). */
  unservedEndpoints: `
    select e.name, count(o.*)::int as pending
      from cloud.endpoint e
      join cloud.outbox o on o.endpoint = e.name and o.status = 'pending'
     where e.enabled
       and not exists (select from cloud.listener l
                        where l.heartbeat_at > now() - interval '1 minute' and (l.endpoints is null or e.name = any (l.endpoints)))
     group by e.name
     order by e.name`,
  roleExists: 'select exists (select from pg_catalog.pg_roles where rolname = $1) as present',
  functionPrivilege: `select has_function_privilege($1::text, $2::text, 'execute') as granted`,
  columnPrivilege: 'select has_any_column_privilege($1::text, $2::text, $3::text) as granted',
  publicExecutable: `
    select p.oid::regprocedure::text as fn
      from pg_catalog.pg_proc p
     where p.pronamespace = 'cloud'::regnamespace
       and exists (select from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                    where a.grantee = 0 and a.privilege_type = 'EXECUTE')
     order by 1`,
  vaultInstalled: `select to_regnamespace('vault') is not null as installed`,
  vaultKeyIds: 'select key_id, count(*)::int as secrets from vault.list_secrets() group by key_id order by 2 desc, 1',
  ssoInstalled: `select to_regclass('sso.client') is not null as installed`,
  ssoIssuer: `select value as issuer, updated_at from sso.setting where name = 'issuer'`,
  ssoClients: `select client_id, enabled, cardinality(redirect_uris)::int as redirect_uris, initiate_login_uri from sso.client_status order by client_id`,
  ssoSigningKeys: `select kid, state, public_jwk, signs_from, signs_until, verify_until, round(extract(epoch from now() - signs_from) / 86400)::int as age_days
                     from sso.signing_key_status order by signs_from`,
  ssoVaultSecret: `select version, coalesce(rotated_at, created_at) as written_at from vault.list_secrets() where name = 'sso.signing_keys'`,
  ssoCanReadVault: `select has_function_privilege('vault.read_secret(text, text)', 'execute') as can`,
  ssoReadVault: `select vault.read_secret('sso.signing_keys', $1) as value`,
  ssoStaleStorage: `select case when has_table_privilege('sso.oidc_payload', 'select')
                                then (select count(*)::int from sso.oidc_payload where expires_at < now() - interval '1 hour') end as stale`,
  endpoints: `
    select e.name, e.base_url, e.enabled, e.allow_hosts, e.allow_cidrs::text[] as allow_cidrs, e.allow_private,
           s.circuit_state, s.circuit_opened_at, s.circuit_reason, s.paused_until, s.pause_reason
      from cloud.endpoint e
      left join cloud.endpoint_status s on s.endpoint = e.name
     order by e.name`,
} as const;

/**
 * What `erp-cloud tail` asks (listener/tail.ts): only the columns it prints,
 * never bodies, headers or the URL (they may carry business data).
 * $1 endpoint or null, $2 request_id or null.
 */
const tailColumns = `started_at, (extract(epoch from started_at) * 1000000)::bigint::text as started_us, endpoint, request_id,
  attempt, outcome, http_status, duration_ms::float8 as duration_ms, error_class, left(error_message, 500) as error_message, late`;
const tailFilter = `($1::text is null or endpoint = $1) and ($2::uuid is null or request_id = $2)`;
export const tailSql = {
  /** How late an attempt can be recorded after it started: the longest endpoint timeout. */
  longestTimeout: 'select coalesce(max(timeout_ms), 10000)::int as timeout_ms from cloud.endpoint',
  /** The newest $3 attempts, newest first. */
  last: `select ${tailColumns} from cloud.log where ${tailFilter} order by started_at desc, request_id desc, attempt desc limit $3`,
  /** Every attempt that started at most $4 seconds before the cursor $3 (epoch µs; null = all), oldest first. */
  window: `select ${tailColumns} from cloud.log
            where ${tailFilter} and ($3::bigint is null or started_at >= to_timestamp($3::float8 / 1000000) - make_interval(secs => $4::float8))
            order by started_at, request_id, attempt`,
} as const;
