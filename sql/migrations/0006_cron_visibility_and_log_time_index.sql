-- 0006 — two fixes found by erp-cloud doctor's tests.
--
-- 1. cron.job has row-level security (a role sees only its own jobs), so
--    cloud.cron_jobs_scheduled() called by a non-superuser listener saw no
--    jobs and ran the fallback maintenance on top of pg_cron. It now runs with
--    its owner's rights, narrowly: it reads job names and the active flag only.
-- 2. cloud.log had no index on started_at, so `erp-cloud tail` and "the last N
--    attempts" scanned the whole current month. A BRIN index is tiny and fits
--    an append-only, time-ordered table.

create or replace function cloud.cron_jobs_scheduled() returns boolean
language plpgsql stable security definer set search_path = '' as $$
declare
  v_n integer;
begin
  if pg_catalog.to_regclass('cron.job') is null then
    return false;
  end if;
  execute $q$select count(*) from cron.job where jobname like 'erp-cloud: %' and active$q$ into v_n;
  return v_n >= 4;
end $$;
comment on function cloud.cron_jobs_scheduled is 'True when pg_cron runs the maintenance jobs in this database (whoever asks: runs as its owner, since cron.job shows each role only its own jobs); otherwise the listener runs cloud.run_maintenance on its own timer.';
revoke execute on function cloud.cron_jobs_scheduled() from public;
grant execute on function cloud.cron_jobs_scheduled() to erp_cloud_listener, erp_cloud_operator;

create index log_started_brin on cloud.log using brin (started_at);
