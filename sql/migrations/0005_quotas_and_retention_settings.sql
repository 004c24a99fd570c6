-- 0005 — daily and monthly call quotas per endpoint, and retention periods an
-- operator can set.
--
-- Why: some clouds sell calls by the day or the month (token calls, credit
-- lines). Burning a quota with calls that will be refused only produces
-- failures, so the claim stops at the quota and the endpoint pauses with a
-- clear reason until the period turns over (at local midnight, in the
-- endpoint's time zone). Retention moves from function defaults into
-- cloud.setting so a DBA can change it without touching the pg_cron jobs.
--
-- SQLSTATEs added (mirrored in listener/errors.ts):
--   EC012  invalid quota setting
--   EC013  unknown or invalid setting

alter table cloud.endpoint
  add column quota_per_day   integer,
  add column quota_per_month integer,
  add column quota_time_zone text not null default 'Asia/Shanghai',
  add constraint endpoint_quotas_positive check ((quota_per_day is null or quota_per_day > 0) and (quota_per_month is null or quota_per_month > 0));
comment on column cloud.endpoint.quota_per_day is 'Calls allowed per local day (quota_time_zone); null = no daily quota.';
comment on column cloud.endpoint.quota_per_month is 'Calls allowed per local month (quota_time_zone); null = no monthly quota.';

create table cloud.endpoint_usage (
  endpoint     text not null,
  period       text not null check (period in ('day', 'month')),
  period_start date not null,
  calls        integer not null default 0,
  primary key (endpoint, period, period_start)
);
comment on table cloud.endpoint_usage is 'Calls made per endpoint per local day and month, counted when messages are claimed; the quota ledger.';

create table cloud.setting (
  name        text primary key,
  value       interval not null,
  description text not null
);
comment on table cloud.setting is 'Operator-set retention periods read by the maintenance jobs. Change with cloud.put_setting.';
insert into cloud.setting (name, value, description) values
  ('log_retention', '90 days', 'cloud.log months that ended longer ago than this are dropped'),
  ('finished_retention', '7 days', 'sent and skipped messages older than this leave cloud.outbox (their attempts stay in cloud.log)');

create function cloud.put_setting(
  p_name  text,     -- log_retention or finished_retention
  p_value interval  -- the new period
) returns cloud.setting
language plpgsql as $$
declare
  v_row cloud.setting;
begin
  if p_value is null or p_value < interval '1 hour' then
    raise exception using errcode = 'EC013', message = format('setting %s: %s is too short', p_name, p_value),
      hint = 'Retention periods are at least 1 hour, e.g. ''90 days''.';
  end if;
  update cloud.setting set value = p_value where name = p_name returning * into v_row;
  if not found then
    raise exception using errcode = 'EC013', message = format('unknown setting %L', p_name),
      hint = 'See the settings in cloud.setting (log_retention, finished_retention).';
  end if;
  return v_row;
end $$;
comment on function cloud.put_setting is 'Changes a retention period (EC013 for an unknown name or a period under an hour).';

create function cloud._retention(p_name text) returns interval
language sql stable as $$
  select value from cloud.setting where name = p_name;
$$;
comment on function cloud._retention is 'Internal: a retention period by name.';

create function cloud.put_endpoint_quotas(
  p_name            text,                 -- endpoint name
  p_quota_per_day   integer,              -- calls per local day; null = none
  p_quota_per_month integer default null, -- calls per local month; null = none
  p_time_zone       text default 'Asia/Shanghai' -- where the provider's day and month begin
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
begin
  if (p_quota_per_day is not null and p_quota_per_day < 1) or (p_quota_per_month is not null and p_quota_per_month < 1)
     or p_time_zone is null or not exists (select from pg_timezone_names where name = p_time_zone) then
    raise exception using errcode = 'EC012',
      message = format('endpoint %s: quota %s/day, %s/month in time zone %L is not valid', p_name, p_quota_per_day, p_quota_per_month, p_time_zone),
      hint = 'Quotas are positive (or null for none) and the time zone is an IANA name such as Asia/Shanghai.';
  end if;
  update cloud.endpoint
     set quota_per_day = p_quota_per_day, quota_per_month = p_quota_per_month, quota_time_zone = p_time_zone, updated_at = now()
   where name = p_name
  returning * into v_row;
  if not found then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_name),
      hint = 'Create it first with cloud.put_endpoint(...).';
  end if;
  return v_row;
end $$;
comment on function cloud.put_endpoint_quotas is 'Sets an endpoint''s daily and monthly call quotas (EC012 names a bad setting).';

create function cloud._quota_left(
  e     cloud.endpoint,
  p_now timestamptz
) returns table (calls_left integer, resets_at timestamptz, which text)
language sql stable as $$
  with local as (select (p_now at time zone e.quota_time_zone) as t),
  periods as (
    select 'day' as period, e.quota_per_day as quota, (select t from local)::date as start,
           (((select t from local)::date + 1)::timestamp at time zone e.quota_time_zone) as resets
    union all
    select 'month', e.quota_per_month, date_trunc('month', (select t from local))::date,
           ((date_trunc('month', (select t from local)) + interval '1 month') at time zone e.quota_time_zone)
  )
  select (p.quota - coalesce(u.calls, 0))::integer, p.resets, p.period
    from periods p
    left join cloud.endpoint_usage u on u.endpoint = e.name and u.period = p.period and u.period_start = p.start
   where p.quota is not null
   order by p.quota - coalesce(u.calls, 0)
   limit 1;
$$;
comment on function cloud._quota_left is 'Internal: the tightest remaining quota of an endpoint now, when it resets, and which one (day or month); no row without quotas.';

create or replace function cloud._take_budget(
  p_endpoint text,         -- endpoint to claim for
  p_want     integer,      -- how many messages the listener could take
  p_now      timestamptz
) returns integer
language plpgsql as $$
declare
  e cloud.endpoint;
  q record;
begin
  -- the common case (no limit, no quota, circuit closed, not paused) takes no lock
  select * into e from cloud.endpoint where name = p_endpoint;
  if e.rate_per_s is null and e.quota_per_day is null and e.quota_per_month is null and e.circuit_state = 'closed'
     and (e.paused_until is null or e.paused_until <= p_now) then
    return p_want;
  end if;
  -- otherwise the endpoint row is the shared budget: every claimer queues on it
  select * into e from cloud.endpoint where name = p_endpoint for update;
  if e.paused_until > p_now then
    return 0;
  end if;
  if e.circuit_state = 'open' then
    if p_now < e.circuit_opened_at + make_interval(secs => e.circuit_cooldown_ms / 1000.0) then
      return 0;
    end if;
    p_want := 1;  -- cool-down over: one probe decides
  elsif e.circuit_state = 'half_open' then
    return 0;     -- the probe is still out
  end if;
  if e.rate_per_s is not null then
    -- tokens due within the next 100 ms may be taken now: claim_messages gives
    -- each such message its send time, so the cloud sees the exact rate even
    -- though listeners wake a little late (a bucket of one cannot bank lateness)
    p_want := least(p_want, floor(cloud._tokens_available(e, p_now) + e.rate_per_s * 0.1)::integer);
  end if;
  select * into q from cloud._quota_left(e, p_now);
  if found then
    if q.calls_left <= 0 then
      -- stop instead of burning calls the cloud will refuse; visible in status until the period turns
      update cloud.endpoint
         set paused_until = q.resets_at,
             pause_reason = format('%s quota of %s calls used up; resumes %s', case q.which when 'day' then 'daily' else 'monthly' end,
                                   case q.which when 'day' then e.quota_per_day else e.quota_per_month end, q.resets_at)
       where name = p_endpoint;
      return 0;
    end if;
    p_want := least(p_want, q.calls_left);
  end if;
  return greatest(p_want, 0);
end $$;
comment on function cloud._take_budget is 'Internal: how many messages may be claimed for an endpoint now (rate limit, quotas, 429 pause, circuit). Locks the endpoint row when any limit applies; pauses it when a quota is used up.';

create or replace function cloud._spend_budget(
  p_endpoint text,
  p_claimed  uuid[],       -- what was claimed under the budget
  p_now      timestamptz
) returns void
language plpgsql as $$
declare
  e cloud.endpoint;
begin
  update cloud.endpoint ep
     set tokens = case when rate_per_s is null then tokens
                       else cloud._tokens_available(ep, p_now) - cardinality(p_claimed) end,
         tokens_at = greatest(tokens_at, p_now),
         circuit_state = case when circuit_state = 'open' then 'half_open' else circuit_state end,
         circuit_probe = case when circuit_state = 'open' then p_claimed[1] else circuit_probe end
   where name = p_endpoint
     and (rate_per_s is not null or circuit_state = 'open' or quota_per_day is not null or quota_per_month is not null)
  returning * into e;
  if e.quota_per_day is not null or e.quota_per_month is not null then
    insert into cloud.endpoint_usage as u (endpoint, period, period_start, calls)
    select p_endpoint, p.period, p.start, cardinality(p_claimed)
      from (values ('day', (p_now at time zone e.quota_time_zone)::date),
                   ('month', date_trunc('month', p_now at time zone e.quota_time_zone)::date)) as p(period, start)
    on conflict (endpoint, period, period_start) do update set calls = u.calls + excluded.calls;
  end if;
end $$;
comment on function cloud._spend_budget is 'Internal: takes the claimed messages out of the token bucket and the quota ledger; a claim on an open circuit becomes its half-open probe.';

-- retention from cloud.setting (an explicit argument still wins)
create or replace function cloud.age_out_log(
  p_keep interval default null,  -- keep at least this much history; cloud.setting log_retention when null
  p_now  timestamptz default clock_timestamp()
) returns integer
language plpgsql as $$
declare
  v_part    record;
  v_keep    interval := coalesce(p_keep, cloud._retention('log_retention'));
  v_dropped integer := 0;
begin
  for v_part in
    select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'cloud.log'::regclass and c.relname ~ '^log_p[0-9]{6}$'
       and (to_date(substr(c.relname, 6), 'YYYYMM') + interval '1 month')::timestamp at time zone 'UTC' <= p_now - v_keep
  loop
    execute format('drop table cloud.%I', v_part.relname);
    v_dropped := v_dropped + 1;
  end loop;
  return v_dropped;
end $$;
comment on function cloud.age_out_log is 'Drops cloud.log months that ended more than the retention period ago (cloud.setting log_retention; a DROP, not a DELETE: no bloat). Returns how many were dropped.';

create or replace function cloud.purge_finished_messages(
  p_keep  interval default null,  -- keep sent and skipped messages this long; cloud.setting finished_retention when null
  p_limit integer default 100000, -- at most this many per run
  p_now   timestamptz default clock_timestamp()
) returns integer
language sql as $$
  with doomed as (
    select request_id from cloud.outbox
     where status in ('sent', 'skipped') and updated_at < p_now - coalesce(p_keep, cloud._retention('finished_retention'))
     limit p_limit
  ), gone as (
    delete from cloud.outbox o using doomed d where o.request_id = d.request_id returning 1
  ) select count(*)::integer from gone;
$$;
comment on function cloud.purge_finished_messages is 'Deletes sent and skipped messages older than the retention period (cloud.setting finished_retention); their attempts stay in cloud.log. Returns how many were deleted.';

create function cloud.purge_endpoint_usage(p_now timestamptz default clock_timestamp()) returns integer
language sql as $$
  with gone as (delete from cloud.endpoint_usage where period_start < (p_now - interval '13 months')::date returning 1)
  select count(*)::integer from gone;
$$;
comment on function cloud.purge_endpoint_usage is 'Forgets quota usage older than 13 months. Returns rows deleted.';

create or replace function cloud.run_maintenance(p_now timestamptz default clock_timestamp()) returns jsonb
language sql as $$
  select jsonb_build_object(
    'reaped', cloud.reap_expired_leases(p_now),
    'woken_channels', cloud.wake_due_messages(p_now),
    'partitions_created', cloud.ensure_log_partitions(2, p_now),
    'partitions_dropped', cloud.age_out_log(null, p_now),
    'messages_purged', cloud.purge_finished_messages(null, 100000, p_now),
    'usage_purged', cloud.purge_endpoint_usage(p_now),
    'cron_history_purged', cloud.purge_cron_history());
$$;

comment on function cloud.run_maintenance is 'Everything the pg_cron jobs do, in one call: the listener''s fallback when pg_cron is not installed in this database.';

create or replace function cloud.schedule_maintenance_jobs() returns integer
language plpgsql as $$
begin
  if to_regnamespace('cron') is null then
    return 0;
  end if;
  perform cron.schedule('erp-cloud: reap expired leases', '* * * * *', 'select cloud.reap_expired_leases()');
  perform cron.schedule('erp-cloud: wake due retries', '* * * * *', 'select cloud.wake_due_messages()');
  perform cron.schedule('erp-cloud: log partitions', '7 * * * *', 'select cloud.ensure_log_partitions(); select cloud.age_out_log()');
  perform cron.schedule('erp-cloud: purge finished', '17 * * * *',
    'select cloud.purge_finished_messages(); select cloud.purge_endpoint_usage(); select cloud.purge_cron_history()');
  return 4;
end $$;

do $$
begin
  if to_regnamespace('cron') is not null then
    perform cloud.schedule_maintenance_jobs();
  end if;
end $$;

revoke execute on all functions in schema cloud from public;
revoke all on cloud.endpoint_usage, cloud.setting from public;
grant select, insert, update, delete on cloud.endpoint_usage to erp_cloud_listener;
grant select on cloud.setting to erp_cloud_listener;
grant select on cloud.endpoint_usage, cloud.setting to erp_cloud_operator;
grant update (paused_until, pause_reason) on cloud.endpoint to erp_cloud_listener;
grant execute on function
  cloud._quota_left(cloud.endpoint, timestamptz),
  cloud._retention(text),
  cloud.purge_endpoint_usage(timestamptz)
  to erp_cloud_listener, erp_cloud_operator;
grant execute on function
  cloud.put_setting(text, interval),
  cloud.put_endpoint_quotas(text, integer, integer, text)
  to erp_cloud_operator;
