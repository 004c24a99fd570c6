/**
 * What `erp-cloud doctor` asks (listener/ops/doctor/). Read-only; besides cloud.*
 * it reads the catalogs, the migrations table and pg_cron's tables, because
 * those are what it checks.
 */
export const doctorSql = {
  server: `select current_setting('server_version_num')::int as num, current_setting('server_version') as version, current_database() as database, current_user as role`,
  /** erp-cloud's migration history (listener/kernel/migrations.ts), schema-qualified: never a table the search path finds. */
  migrationsTable: `select pg_catalog.to_regclass('erp_cloud.migration') is not null as present`,
  /** callbacks of ERP sources (on_invoice, on_order, on_asn) that failed and wait for a replay, per source; one that gave way to a lock only once it has waited over a minute (the listener calls those again) */
  callbackFailures: `
    select 'tax' as domain, f.source, count(*)::int as failures, min(f.failed_at) as since,
           (array_agg(f.sqlstate || ' ' || f.message order by f.failed_at desc))[1] as last
      from tax.callback_failure f where f.replayed_at is null and (not cloud.sqlstate_is_lock_conflict(f.sqlstate) or f.failed_at < now() - interval '1 minute') group by f.source
    union all
    select 'scm', f.source, count(*)::int, min(f.failed_at), (array_agg(f.sqlstate || ' ' || f.message order by f.failed_at desc))[1]
      from scm.callback_failure f where f.replayed_at is null and (not cloud.sqlstate_is_lock_conflict(f.sqlstate) or f.failed_at < now() - interval '1 minute') group by f.source
    order by 1, 2`,
  /** registered callbacks whose own SET lock_timeout is 0 or at least deadlock_timeout (0037: put_source refuses them now; older ones stay) */
  callbackLockTimeouts: `
    select what, source, fn::text as fn, ms::int as ms, current_setting('deadlock_timeout') as deadlock_timeout
      from cloud._callbacks_with_long_lock_timeout()`,
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
  /** The delivery fence (migration 0034): no row = emptied by a crash and not raised again yet (no claim since). */
  deliveryFence: `
    select f.raised_at, f.fence_until, f.fence_until = '-infinity' as never_raised, f.fence_until > now() as in_force,
           (select count(*)::int from cloud.outbox o where o.id <= f.fence_id and o.status = 'pending') as waiting
      from cloud.delivery_fence f`,
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
