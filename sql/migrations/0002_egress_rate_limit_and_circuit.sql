-- 0002 — the egress guard, part one: a rate limiter, 429 pauses and a circuit
-- breaker per endpoint, enforced when work is claimed.
--
-- Why in the claim: the limit then holds across any number of listener
-- processes and hosts, because they all take their budget from the same
-- endpoint row. A cloud outage opens the circuit: messages stay pending without
-- burning attempts, the ERP keeps committing, and a single probe decides when
-- the backlog may drain again (at the allowed rate).
--
-- SQLSTATEs added to the registry in 0001 (mirrored in listener/errors.ts):
--   EC010  invalid rate limit or circuit setting

alter table cloud.endpoint
  add column rate_per_s          double precision,
  add column burst               integer not null default 1,
  add column tokens              double precision not null default 1,
  add column tokens_at           timestamptz not null default now(),
  add column paused_until        timestamptz,
  add column pause_reason        text,
  add column circuit_state       text not null default 'closed',
  add column circuit_failures    integer not null default 0,
  add column circuit_threshold   integer not null default 5,
  add column circuit_cooldown_ms integer not null default 30000,
  add column circuit_opened_at   timestamptz,
  add column circuit_reason      text,
  add column circuit_probe       uuid,
  add constraint endpoint_rate_positive check (rate_per_s is null or rate_per_s > 0),
  add constraint endpoint_burst_positive check (burst >= 1),
  add constraint endpoint_circuit_state_known check (circuit_state in ('closed', 'open', 'half_open')),
  add constraint endpoint_circuit_settings check (circuit_threshold >= 1 and circuit_cooldown_ms >= 100);
comment on column cloud.endpoint.rate_per_s is 'Token bucket refill rate (requests per second) shared by every listener; null = unlimited.';
comment on column cloud.endpoint.paused_until is 'No claims before this time: set by a 429 (Retry-After) for all listeners; pause_reason says why.';
comment on column cloud.endpoint.circuit_state is 'closed: normal. open: no calls until circuit_opened_at + cooldown. half_open: one probe (circuit_probe) in flight decides.';

-- claims now go endpoint by endpoint (each with its own budget), so the
-- working-set index leads with the endpoint after the status
drop index cloud.outbox_active;
create index outbox_active on cloud.outbox (status, endpoint, next_attempt_at, id)
  where status in ('pending', 'in_flight', 'failed', 'dead');

create function cloud.put_endpoint_limits(
  p_name                text,              -- endpoint name
  p_rate_per_s          double precision,  -- requests per second across all listeners; null = unlimited
  p_burst               integer default 1, -- requests that may go at once after a quiet spell
  p_circuit_threshold   integer default 5, -- consecutive failures that open the circuit
  p_circuit_cooldown_ms integer default 30000 -- how long an open circuit waits before one probe
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
begin
  if (p_rate_per_s is not null and not p_rate_per_s > 0) or p_burst is null or p_burst < 1 then
    raise exception using errcode = 'EC010', message = format('endpoint %s: rate %s/s with burst %s is not valid', p_name, p_rate_per_s, p_burst),
      hint = 'Give a positive rate (or null for unlimited) and a burst of at least 1.';
  elsif p_circuit_threshold is null or p_circuit_threshold < 1 or p_circuit_cooldown_ms is null or p_circuit_cooldown_ms < 100 then
    raise exception using errcode = 'EC010',
      message = format('endpoint %s: circuit threshold %s / cool-down %s ms is not valid', p_name, p_circuit_threshold, p_circuit_cooldown_ms),
      hint = 'The threshold is at least 1 failure and the cool-down at least 100 ms.';
  end if;
  update cloud.endpoint
     set rate_per_s = p_rate_per_s, burst = p_burst, tokens = p_burst, tokens_at = now(),
         circuit_threshold = p_circuit_threshold, circuit_cooldown_ms = p_circuit_cooldown_ms, updated_at = now()
   where name = p_name
  returning * into v_row;
  if not found then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_name),
      hint = 'Create it first with cloud.put_endpoint(...).';
  end if;
  return v_row;
end $$;
comment on function cloud.put_endpoint_limits is 'Sets an endpoint''s rate limit (token bucket shared by all listeners) and circuit breaker; EC010 names a bad setting.';

-- when a rate-limited message may go (claims may run up to 100 ms ahead of the bucket)
alter type cloud.claimed_message add attribute send_at timestamptz;
comment on type cloud.claimed_message is 'A leased message with what the provider adapter needs to send it, and when it may be sent (send_at: now, or its rate-limit slot).';

create function cloud._tokens_available(
  e     cloud.endpoint,  -- the endpoint row
  p_now timestamptz
) returns double precision
language sql immutable as $$
  -- negative while claims have run ahead of the bucket; a claim whose clock reading is older
  -- than the last refill (it queued on the row lock) must not count that time twice
  select least(e.burst::double precision, e.tokens + greatest(0, extract(epoch from p_now - e.tokens_at)) * e.rate_per_s);
$$;
comment on function cloud._tokens_available is 'Internal: the token bucket''s level now (refilled at rate_per_s, capped at burst; negative when claims ran ahead).';

create function cloud._take_budget(
  p_endpoint text,         -- endpoint to claim for
  p_want     integer,      -- how many messages the listener could take
  p_now      timestamptz
) returns integer
language plpgsql as $$
declare
  e cloud.endpoint;
begin
  -- the common case (no limit, circuit closed, not paused) takes no lock
  select * into e from cloud.endpoint where name = p_endpoint;
  if e.rate_per_s is null and e.circuit_state = 'closed' and (e.paused_until is null or e.paused_until <= p_now) then
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
  return greatest(p_want, 0);
end $$;
comment on function cloud._take_budget is 'Internal: how many messages may be claimed for an endpoint now (rate limit, 429 pause, circuit). Locks the endpoint row when any limit applies.';

create function cloud._spend_budget(
  p_endpoint text,
  p_claimed  uuid[],       -- what was claimed under the budget
  p_now      timestamptz
) returns void
language sql as $$
  update cloud.endpoint ep
     set tokens = case when rate_per_s is null then tokens
                       else cloud._tokens_available(ep, p_now) - cardinality(p_claimed) end,
         tokens_at = greatest(tokens_at, p_now),
         circuit_state = case when circuit_state = 'open' then 'half_open' else circuit_state end,
         circuit_probe = case when circuit_state = 'open' then p_claimed[1] else circuit_probe end
   where name = p_endpoint
     and (rate_per_s is not null or circuit_state = 'open');
$$;
comment on function cloud._spend_budget is 'Internal: takes the claimed messages out of the token bucket; a claim on an open circuit becomes its half-open probe.';

create or replace function cloud.claim_messages(
  p_worker       text,                      -- the listener's worker id (cloud.listener)
  p_limit        integer default 100,       -- batch size
  p_endpoints    text[] default null,       -- only these endpoints; all when null
  p_lease_margin interval default '5 seconds', -- lease = endpoint timeout + this
  p_now          timestamptz default clock_timestamp()
) returns setof cloud.claimed_message
language plpgsql
-- walk outbox_active in order whatever the statistics say (a new or just-truncated
-- outbox has none); jit off because disabled plan types inflate costs past jit_above_cost
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  v_endpoint text;
  v_budget   integer;
  v_ids      uuid[];
  v_avail    double precision;
  v_rate     double precision;
  v_slot0    timestamptz;
  v_left     integer := p_limit;
begin
  -- no "has due work?" pre-check: after millions of messages the front of the
  -- pending range is full of dead index entries until vacuum, and walking it
  -- twice per claim halves the claim rate; an endpoint without work costs one
  -- short index probe here
  for v_endpoint in
    select e.name from cloud.endpoint e
     where e.enabled and (p_endpoints is null or e.name = any (p_endpoints))
     order by random()  -- no endpoint starves another
  loop
    exit when v_left <= 0;
    v_budget := cloud._take_budget(v_endpoint, v_left, p_now);
    continue when v_budget <= 0;
    with candidate as (
      select o.request_id
        from cloud.outbox o
       where o.status = 'pending' and o.endpoint = v_endpoint and o.next_attempt_at <= p_now
         and (o.ordering_key is null or not exists (
               select from cloud.outbox h
                where h.ordering_key = o.ordering_key and h.id < o.id
                  and h.status in ('pending', 'in_flight', 'failed', 'dead')))
       order by o.next_attempt_at, o.id
       limit v_budget
       for update of o skip locked
    ), leased as (
      update cloud.outbox o
         set status = 'in_flight', attempts = o.attempts + 1, locked_by = p_worker,
             locked_until = p_now + make_interval(secs => e.timeout_ms / 1000.0) + p_lease_margin,
             updated_at = p_now
        from candidate c, cloud.endpoint e
       where o.request_id = c.request_id and e.name = o.endpoint
      returning o.request_id
    )
    select coalesce(array_agg(request_id), '{}') into v_ids from leased;
    continue when cardinality(v_ids) = 0;
    select cloud._tokens_available(e, p_now), e.rate_per_s, greatest(p_now, e.tokens_at)
      into v_avail, v_rate, v_slot0 from cloud.endpoint e where e.name = v_endpoint;
    perform cloud._spend_budget(v_endpoint, v_ids, p_now);
    v_left := v_left - cardinality(v_ids);
    return query
      select o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
             o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until,
             -- the k-th message takes the k-th token: it goes when that token is due
             case when v_rate is null then p_now
                  else v_slot0 + make_interval(secs => greatest(0, (row_number() over (order by o.id) - v_avail) / v_rate)) end
        from cloud.outbox o join cloud.endpoint e on e.name = o.endpoint
       where o.request_id = any (v_ids)
       order by o.id;
  end loop;
  -- an empty claim means this listener is about to wait on LISTEN: from now on
  -- enqueuers NOTIFY; a non-empty one means it is busy: they stop paying for it
  update cloud.listener set idle = (v_left = p_limit), heartbeat_at = p_now
   where worker_id = p_worker and idle is distinct from (v_left = p_limit);
end $$;
comment on function cloud.claim_messages is 'Leases up to p_limit due messages (FOR UPDATE SKIP LOCKED; only the head of each ordering key), endpoint by endpoint within each endpoint''s rate limit, quota, pause and circuit. Records whether the listener is now idle.';

create function cloud._record_endpoint_health(
  p_results cloud.attempt_result[],  -- one batch of attempts
  p_now     timestamptz
) returns void
language plpgsql as $$
declare
  h record;
begin
  for h in
    select o.endpoint,
           count(*) filter (where x.outcome = 'ok') as ok,
           -- the cloud's trouble (network, timeout, 5xx) counts; a 4xx is the message's, a 429 is a pause
           count(*) filter (where x.outcome = 'retryable' and coalesce(x.http_status, 599) >= 500) as failed,
           max(greatest(x.retry_after_ms, 1000)) filter (where x.http_status = 429) as pause_ms,
           bool_or(o.request_id = e.circuit_probe) as probe_back,
           max(x.error_message) filter (where x.outcome = 'retryable') as reason
      from unnest(p_results) x
      join cloud.outbox o on o.request_id = x.request_id
      join cloud.endpoint e on e.name = o.endpoint
     group by o.endpoint
  loop
    if h.pause_ms is not null then
      update cloud.endpoint
         set paused_until = greatest(coalesce(paused_until, p_now), p_now + make_interval(secs => h.pause_ms / 1000.0)),
             pause_reason = format('HTTP 429 from the cloud at %s: paused %s s for all listeners', p_now, round(h.pause_ms / 1000.0, 1))
       where name = h.endpoint;
    end if;
    -- any answer that is not the cloud's own failure (a 2xx, even a 4xx) shows it is up again
    if (h.ok > 0 or h.probe_back) and h.failed = 0 then
      update cloud.endpoint
         set circuit_state = 'closed', circuit_failures = 0, circuit_probe = null, circuit_reason = null
       where name = h.endpoint and (circuit_failures > 0 or circuit_state <> 'closed');
    elsif h.failed > 0 then
      update cloud.endpoint
         set circuit_failures = case when h.ok > 0 then h.failed else circuit_failures + h.failed end,
             circuit_state = case when circuit_state = 'half_open' and h.probe_back then 'open'
                                  when (case when h.ok > 0 then h.failed else circuit_failures + h.failed end) >= circuit_threshold
                                  then 'open' else circuit_state end,
             circuit_opened_at = case when circuit_state = 'half_open' and h.probe_back then p_now
                                      when circuit_state = 'closed'
                                       and (case when h.ok > 0 then h.failed else circuit_failures + h.failed end) >= circuit_threshold
                                      then p_now else circuit_opened_at end,
             circuit_reason = case when circuit_state = 'closed'
                                    and (case when h.ok > 0 then h.failed else circuit_failures + h.failed end) >= circuit_threshold
                                   then format('%s consecutive failures; last: %s', circuit_failures + h.failed, h.reason)
                                   when circuit_state = 'half_open' and h.probe_back
                                   then format('probe failed: %s', h.reason)
                                   else circuit_reason end,
             circuit_probe = case when circuit_state = 'half_open' and h.probe_back then null else circuit_probe end
       where name = h.endpoint;
    end if;
  end loop;
end $$;
comment on function cloud._record_endpoint_health is 'Internal: feeds a batch of attempts to each endpoint''s circuit breaker (consecutive cloud failures open it; the probe''s result closes or re-opens it) and turns a 429 into a pause for all listeners.';

create or replace function cloud.record_attempts(
  p_worker   text,   -- the reporting worker
  p_attempts jsonb,  -- JSON array of cloud.attempt_result objects
  p_now      timestamptz default clock_timestamp()
) returns setof cloud.attempt_outcome
language plpgsql
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  v_results cloud.attempt_result[];
begin
  select coalesce(array_agg(r), '{}') into v_results
    from jsonb_populate_recordset(null::cloud.attempt_result, p_attempts) r;

  insert into cloud.log (request_id, attempt, endpoint, operation, worker_id, method, url, request_headers, request_body,
                         http_status, response_headers, response_body, duration_ms, outcome, error_class, error_message, started_at)
  select r.request_id, r.attempt, coalesce(o.endpoint, '?'), o.operation, p_worker, r.method, r.url, r.request_headers,
         r.request_body, r.http_status, r.response_headers, r.response_body, r.duration_ms, r.outcome, r.error_class,
         r.error_message, coalesce(r.started_at, p_now)
    from unnest(v_results) r
    left join cloud.outbox o on o.request_id = r.request_id;

  perform cloud._record_endpoint_health(v_results, p_now);
  return query select * from cloud.complete_messages(p_worker, array(select r from unnest(v_results) r where r.outcome = 'ok'), p_now);
  return query select * from cloud.fail_messages(p_worker, array(select r from unnest(v_results) r where r.outcome <> 'ok'), p_now);
end $$;
comment on function cloud.record_attempts is 'The listener''s one call per batch: writes every attempt to cloud.log, updates each endpoint''s circuit and 429 pause, then completes the successes and fails the failures. Returns each message''s new status.';

-- the reaper learns about half-open probes
create or replace function cloud.reap_expired_leases(p_now timestamptz default clock_timestamp()) returns integer
language plpgsql as $$
declare
  v_worker  text;
  v_results cloud.attempt_result[];
  v_total   integer := 0;
begin
  for v_worker in
    select distinct o.locked_by from cloud.outbox o where o.status = 'in_flight' and o.locked_until < p_now
  loop
    -- an expired lease is a failed attempt whose result never came back: log it, retry it with backoff
    -- locked first, so two reapers at once (pg_cron and a listener) never log one expiry twice
    select array_agg(row(o.request_id, o.attempts, 'retryable', null, null, null, null, null, null, null, null, null,
                         'lease_expired', format('no result from worker %s before its lease expired at %s', v_worker, o.locked_until),
                         null, p_now)::cloud.attempt_result)
      into v_results
      from (select request_id, attempts, locked_until from cloud.outbox
             where status = 'in_flight' and locked_by = v_worker and locked_until < p_now
               for update skip locked) o;
    continue when v_results is null;
    insert into cloud.log (request_id, attempt, endpoint, operation, worker_id, outcome, error_class, error_message, started_at)
    select r.request_id, r.attempt, o.endpoint, o.operation, v_worker, r.outcome, r.error_class, r.error_message, p_now
      from unnest(v_results) r join cloud.outbox o on o.request_id = r.request_id;
    -- a dead listener is not the cloud's failure, so the circuit does not count these; but a lost
    -- half-open probe must not leave the circuit waiting for it forever: another probe after a cool-down
    update cloud.endpoint set circuit_state = 'open', circuit_opened_at = p_now, circuit_probe = null
     where circuit_state = 'half_open' and circuit_probe = any (array(select r.request_id from unnest(v_results) r));
    v_total := v_total + (select count(*) from cloud.fail_messages(v_worker, v_results, p_now));
  end loop;
  delete from cloud.listener where heartbeat_at < p_now - interval '2 minutes';
  return v_total;
end $$;
comment on function cloud.reap_expired_leases is 'Returns messages whose lease expired (listener died or hung) to pending with backoff, or dead when out of attempts; re-opens a circuit whose half-open probe was lost; forgets listeners silent for 2 minutes.';

create or replace function cloud.next_due_at(
  p_endpoints text[] default null,
  p_now       timestamptz default clock_timestamp()
) returns timestamptz
language sql stable as $$
  select min(t) from (
    select min(o.next_attempt_at) as t
      from cloud.outbox o
     where o.status = 'pending' and o.next_attempt_at > p_now
       and (p_endpoints is null or o.endpoint = any (p_endpoints))
    union all
    -- due messages held back by a limit: when the limit lets the next one go
    select case when e.paused_until > p_now then e.paused_until
                when e.circuit_state = 'open' then e.circuit_opened_at + make_interval(secs => e.circuit_cooldown_ms / 1000.0)
                when e.rate_per_s is not null  -- a claim may run 100 ms ahead of the bucket
                then e.tokens_at + make_interval(secs => greatest(0, 1 - e.rate_per_s * 0.1 - e.tokens) / e.rate_per_s)
           end
      from cloud.endpoint e
     where e.enabled and (p_endpoints is null or e.name = any (p_endpoints))
       and exists (select from cloud.outbox o where o.status = 'pending' and o.endpoint = e.name and o.next_attempt_at <= p_now)
  ) s
  where t > p_now;
$$;
comment on function cloud.next_due_at is 'When the listener should look again: the earliest retry not yet due, or the moment a rate limit, 429 pause or open circuit lets a waiting message go.';

-- the operator's view grows the limiter and circuit columns (appended: a view's existing columns stay put)
create or replace view cloud.endpoint_status as
select e.name as endpoint,
       e.enabled,
       e.provider,
       coalesce(a.pending, 0) as pending,
       coalesce(a.due, 0) as due,
       coalesce(a.in_flight, 0) as in_flight,
       coalesce(a.failed, 0) as failed,
       coalesce(a.dead, 0) as dead,
       coalesce(p.parked_keys, 0) as parked_keys,
       a.oldest_pending_age_s,
       err.last_error,
       err.last_error_at,
       e.rate_per_s,
       e.burst,
       e.circuit_state,
       e.circuit_failures,
       e.circuit_opened_at,
       e.circuit_reason,
       case when e.paused_until > now() then e.paused_until end as paused_until,
       case when e.paused_until > now() then e.pause_reason end as pause_reason
  from cloud.endpoint e
  left join lateral (
    select count(*) filter (where o.status = 'pending') as pending,
           count(*) filter (where o.status = 'pending' and o.next_attempt_at <= now()) as due,
           count(*) filter (where o.status = 'in_flight') as in_flight,
           count(*) filter (where o.status = 'failed') as failed,
           count(*) filter (where o.status = 'dead') as dead,
           round(extract(epoch from now() - min(o.created_at) filter (where o.status = 'pending'))::numeric, 3) as oldest_pending_age_s
      from cloud.outbox o
     where o.endpoint = e.name and o.status in ('pending', 'in_flight', 'failed', 'dead')
  ) a on true
  left join lateral (
    select o.last_error, o.last_error_at from cloud.outbox o
     where o.endpoint = e.name and o.status in ('pending', 'in_flight', 'failed', 'dead') and o.last_error is not null
     order by o.last_error_at desc limit 1
  ) err on true
  left join lateral (
    select count(*) as parked_keys from cloud.parked_keys k where k.endpoint = e.name
  ) p on true;
comment on view cloud.endpoint_status is 'Per endpoint: messages by unfinished status, due now, parked ordering keys, the oldest pending age, the latest error of a message still in the queue, the rate limit, the circuit and any 429 pause.';

revoke execute on all functions in schema cloud from public;
grant execute on function
  cloud._take_budget(text, integer, timestamptz),
  cloud._spend_budget(text, uuid[], timestamptz),
  cloud._tokens_available(cloud.endpoint, timestamptz),
  cloud._record_endpoint_health(cloud.attempt_result[], timestamptz)
  to erp_cloud_listener;
grant update (tokens, tokens_at, paused_until, pause_reason, circuit_state, circuit_failures, circuit_opened_at,
              circuit_reason, circuit_probe) on cloud.endpoint to erp_cloud_listener;
grant execute on function cloud.put_endpoint_limits(text, double precision, integer, integer, integer) to erp_cloud_operator;
