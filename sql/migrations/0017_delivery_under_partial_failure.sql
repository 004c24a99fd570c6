-- 0017 — delivery under partial failure: a circuit breaker that lets a flaky
-- cloud's traffic through, answers for a lease that is gone that change
-- nothing, attempts that count only a message's own failures, listeners that
-- notice they were forgotten.
--
-- 1. The circuit judges the endpoint's answers in the order they happened
--    (each answer's start + duration), across batches and listeners, over a
--    sliding window: it opens when, among the last circuit_window answers
--    (default 20), at least circuit_threshold (default 5) are the cloud's
--    failures AND they are at least circuit_failure_ratio (default 0.8) of the
--    window. A dead cloud opens it after 5 failures on a fresh window (16 of
--    20 after a healthy spell); a cloud that fails 30 % of its calls at random
--    keeps it closed (16 failures in 20 answers at p = 0.3: about 5 in a
--    million). Before, 5 failures anywhere in one reported batch opened it,
--    even interleaved with 15 successes. After the cool-down the half-open
--    state lets circuit_probes messages (default 3) go, not one and not a
--    batch: the first probe the cloud answers closes the circuit (with a fresh
--    window); when every probe failed or was lost it opens again.
-- 2. An answer reported for a lease the reporter no longer holds (its listener
--    was paused past its lease, and the reaper already logged lease_expired
--    for that attempt) is logged with late = true and changes neither the
--    circuit nor the 429 pause. A late success still completes the message if
--    nobody has claimed it again (the cloud did it; sending it again would be
--    the second effect). cloud.attempt_history shows one row per attempt, with
--    a late answer beside what the engine acted on.
-- 3. outbox.failures counts what the cloud answered about the message and the
--    network failures of its own calls; max_attempts bounds that. Expired
--    leases (a crash, a freeze) count in outbox.lost_leases instead, bounded by
--    the endpoint's max_lost_leases (default 10: what a message that crashes
--    its listener looks like); 429s, a listener's shutdown and listener-side
--    conditions (a secret or an allowlist it cannot read, a token quota) count
--    toward nothing. outbox.attempts keeps numbering the tries (cloud.log's
--    attempt) and is no longer reset by a replay, so (request_id, attempt)
--    names one try for good. Messages given back unsent take their attempt back.
-- 4. cloud.record_listener_heartbeat says whether the listener is still
--    registered; one the reaper forgot (silent for 2 minutes: SIGSTOP, a VM
--    freeze) registers again on its next heartbeat.
--
-- SQLSTATEs: none new (EC010 covers the new circuit settings; EC015, invalid
-- send-slot request, also covers a give-back whose arrays differ in length).

------------------------------------------------------------------------------
-- Storage
------------------------------------------------------------------------------
alter table cloud.outbox
  add column failures    integer not null default 0,
  add column lost_leases integer not null default 0;
comment on column cloud.outbox.attempts is 'Tries so far (each claim that may send): numbers the attempts in cloud.log; never reset, so (request_id, attempt) names one try. A try given back unsent is taken back.';
comment on column cloud.outbox.failures is 'The message''s own failures: what the cloud answered about it (a 5xx, a refusal) and network failures of its own calls. Dead at the endpoint''s max_attempts. Not counted: 429s, expired leases, a listener''s shutdown. Reset by a replay.';
comment on column cloud.outbox.lost_leases is 'Tries whose lease expired with no answer (its listener died or froze). Dead at the endpoint''s max_lost_leases. Reset by a replay.';
-- what was counted before this migration counted every try: keep the budget messages already spent
update cloud.outbox
   set failures = greatest(attempts - (status = 'in_flight')::integer, 0)
 where status in ('pending', 'in_flight') and attempts > 0;

alter table cloud.endpoint
  add column circuit_window        integer not null default 20,
  add column circuit_failure_ratio numeric(4, 3) not null default 0.8,
  add column circuit_probes        integer not null default 3,
  add column circuit_recent        text not null default '',
  add column circuit_probe_ids     uuid[] not null default '{}',
  add column max_lost_leases       integer not null default 10,
  add constraint endpoint_circuit_window_settings
    check (circuit_window between 1 and 1000 and circuit_failure_ratio > 0 and circuit_failure_ratio <= 1
           and circuit_probes between 1 and 100),
  add constraint endpoint_circuit_recent_shape check (circuit_recent ~ '^[x.]*$'),
  add constraint endpoint_max_lost_leases_in_range check (max_lost_leases between 1 and 1000);
update cloud.endpoint set circuit_probe_ids = array[circuit_probe] where circuit_probe is not null;
alter table cloud.endpoint drop column circuit_probe;
comment on column cloud.endpoint.circuit_threshold is 'Fewest cloud failures among the last circuit_window answers that open the circuit (with circuit_failure_ratio).';
comment on column cloud.endpoint.circuit_window is 'How many of the endpoint''s latest answers the circuit judges (in the order they happened).';
comment on column cloud.endpoint.circuit_failure_ratio is 'Share of the window that must be cloud failures (besides circuit_threshold of them) to open the circuit.';
comment on column cloud.endpoint.circuit_probes is 'Messages the half-open state lets go after the cool-down; the first the cloud answers closes the circuit.';
comment on column cloud.endpoint.circuit_recent is 'The latest answers the circuit judges, oldest first: x = the cloud failed (network, timeout, 5xx), . = it answered. Cleared when the circuit closes.';
comment on column cloud.endpoint.circuit_probe_ids is 'Half-open: the probes still out. Empty otherwise.';
comment on column cloud.endpoint.circuit_failures is 'The cloud failures at the end of the window, in a row (for reading; the window decides).';
comment on column cloud.endpoint.circuit_state is 'closed: normal. open: no calls until circuit_opened_at + cooldown. half_open: circuit_probe_ids are out; the first answered closes it.';
comment on column cloud.endpoint.max_lost_leases is 'Expired leases (no answer: the listener died or froze) after which a message is dead; they do not count toward max_attempts.';
grant update (circuit_recent, circuit_probe_ids) on cloud.endpoint to erp_cloud_listener;

alter table cloud.log add column late boolean not null default false;
comment on column cloud.log.late is 'An answer reported after its lease was gone (the reaper logged lease_expired for this attempt, or another try owns the message): it changed no circuit, pause or retry; a late success still completed a message nobody had claimed again.';

------------------------------------------------------------------------------
-- How an attempt is judged (one place for the circuit and the attempt budget)
------------------------------------------------------------------------------
create function cloud._circuit_mark(
  p_outcome     text,     -- ok | retryable | permanent
  p_http_status integer,  -- the cloud's HTTP status; null when none came back
  p_error_class text      -- the listener's classification
) returns text
language sql immutable parallel safe as $$
  -- x: the cloud failed this call (network, timeout, 5xx); .: the cloud answered (2xx, 4xx, even a
  -- business refusal); null: says nothing about the cloud (a 429 is a pause, not a failure; the call
  -- was not made or its answer never came: a shutdown, a lost lease, a listener-side problem)
  select case
           when p_http_status = 429
             or p_error_class in ('lease_expired', 'shutdown', 'secret_unavailable', 'egress_policy_unavailable', 'token_quota')
             then null
           when p_outcome = 'retryable' and (p_http_status is null or p_http_status >= 500) then 'x'
           when p_http_status is not null or p_outcome = 'ok' then '.'
         end;
$$;
comment on function cloud._circuit_mark is 'Internal: what one attempt tells the circuit breaker: x (the cloud failed: network, timeout, 5xx), . (the cloud answered) or null (nothing: a 429, a lost lease, a shutdown, a listener-side problem).';

create function cloud._counts_toward_attempts(
  p_outcome     text,     -- retryable | permanent (ok ends the message anyway)
  p_http_status integer,
  p_error_class text
) returns boolean
language sql immutable parallel safe as $$
  -- what the cloud answered about this message, or a network failure of its own call
  select p_outcome <> 'ok'
         and coalesce(p_http_status, 0) <> 429
         and coalesce(p_error_class, '') not in ('lease_expired', 'shutdown', 'secret_unavailable', 'egress_policy_unavailable', 'token_quota');
$$;
comment on function cloud._counts_toward_attempts is 'Internal: whether a failed attempt is the message''s own failure and counts toward max_attempts (not a 429, a lost lease, a shutdown or a listener-side problem).';

------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------
drop function cloud.put_endpoint_limits(text, double precision, integer, integer, integer);
create function cloud.put_endpoint_limits(
  p_name                  text,                    -- endpoint name
  p_rate_per_s            double precision,        -- requests per second across all listeners; null = unlimited
  p_burst                 integer default 1,       -- requests that may go at once after a quiet spell
  p_circuit_threshold     integer default 5,       -- fewest cloud failures in the window that open the circuit
  p_circuit_cooldown_ms   integer default 30000,   -- how long an open circuit waits before its probes
  p_circuit_window        integer default 20,      -- latest answers the circuit judges
  p_circuit_failure_ratio numeric default 0.8,     -- share of the window that must be cloud failures
  p_circuit_probes        integer default 3,       -- messages the half-open state lets go
  p_max_lost_leases       integer default 10       -- expired leases after which a message is dead
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
  elsif p_circuit_window is null or p_circuit_window not between 1 and 1000 then
    raise exception using errcode = 'EC010', message = format('endpoint %s: circuit window %s is not valid', p_name, p_circuit_window),
      hint = 'The window holds 1 to 1000 answers (a threshold above it never opens the circuit).';
  elsif p_circuit_failure_ratio is null or not (p_circuit_failure_ratio > 0 and p_circuit_failure_ratio <= 1)
        or round(p_circuit_failure_ratio, 3) <> p_circuit_failure_ratio then
    raise exception using errcode = 'EC010',
      message = format('endpoint %s: circuit failure ratio %s is not valid', p_name, p_circuit_failure_ratio),
      hint = 'Give a share of the window above 0 and at most 1, with at most 3 decimals (0.8 = 80 %).';
  elsif p_circuit_probes is null or p_circuit_probes not between 1 and 100 then
    raise exception using errcode = 'EC010', message = format('endpoint %s: %s half-open probes is not valid', p_name, p_circuit_probes),
      hint = 'Let 1 to 100 probes go after the cool-down (3 is usual).';
  elsif p_max_lost_leases is null or p_max_lost_leases not between 1 and 1000 then
    raise exception using errcode = 'EC010', message = format('endpoint %s: max_lost_leases %s is not valid', p_name, p_max_lost_leases),
      hint = 'Allow 1 to 1000 expired leases per message (10 is usual).';
  end if;
  update cloud.endpoint
     set rate_per_s = p_rate_per_s, burst = p_burst, tokens = p_burst, tokens_at = now(),
         circuit_threshold = p_circuit_threshold, circuit_cooldown_ms = p_circuit_cooldown_ms,
         circuit_window = p_circuit_window, circuit_failure_ratio = p_circuit_failure_ratio,
         circuit_recent = right(circuit_recent, p_circuit_window), circuit_probes = p_circuit_probes,
         max_lost_leases = p_max_lost_leases, updated_at = now()
   where name = p_name
  returning * into v_row;
  if not found then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_name),
      hint = 'Create it first with cloud.put_endpoint(...).';
  end if;
  return v_row;
end $$;
comment on function cloud.put_endpoint_limits is 'Sets an endpoint''s rate limit (token bucket shared by all listeners), its circuit breaker (window, threshold, ratio, cool-down, probes) and how many expired leases a message may take; EC010 names a bad setting.';

------------------------------------------------------------------------------
-- The circuit
------------------------------------------------------------------------------
create function cloud._forget_probes(
  p_request_ids uuid[],      -- probes that did not show the cloud up: failed, lost or given back
  p_now         timestamptz,
  p_reason      text default 'its probes brought no answer (lost or given back)' -- the reason when the circuit opens again
) returns void
language sql as $$
  -- a half-open circuit whose every probe is gone without the cloud answering waits another cool-down
  update cloud.endpoint
     set circuit_probe_ids = array(select p from unnest(circuit_probe_ids) p where p <> all (p_request_ids)),
         circuit_state = case when circuit_probe_ids <@ p_request_ids then 'open' else circuit_state end,
         circuit_opened_at = case when circuit_probe_ids <@ p_request_ids then p_now else circuit_opened_at end,
         circuit_reason = case when circuit_probe_ids <@ p_request_ids then p_reason else circuit_reason end
   where circuit_state = 'half_open' and circuit_probe_ids && p_request_ids;
$$;
comment on function cloud._forget_probes is 'Internal: removes probes that did not show the cloud up (failed, lost, given back) from half-open circuits; a circuit left with none opens again for another cool-down, with the reason given.';

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
    p_want := least(p_want, e.circuit_probes);  -- cool-down over: a few probes decide
  elsif e.circuit_state = 'half_open' then
    return 0;     -- the probes are still out
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
comment on function cloud._take_budget is 'Internal: how many messages may be claimed for an endpoint now (rate limit, quotas, 429 pause, circuit: circuit_probes after an open circuit''s cool-down, none while they are out). Locks the endpoint row when any limit applies; pauses it when a quota is used up.';

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
         circuit_probe_ids = case when circuit_state = 'open' then p_claimed else circuit_probe_ids end
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
comment on function cloud._spend_budget is 'Internal: takes the claimed messages out of the token bucket and the quota ledger; a claim on an open circuit becomes its half-open probes.';

create or replace function cloud._record_endpoint_health(
  p_results cloud.attempt_result[],  -- one batch of attempts, each for a lease its reporter still held
  p_now     timestamptz
) returns void
language plpgsql as $$
declare
  h        record;
  e        cloud.endpoint;
  v_recent text;
  v_fails  integer;
  v_run    integer;
  v_open   boolean;
begin
  for h in
    select o.endpoint,
           -- the answers in the order they happened (when each became known), one mark each
           string_agg(cloud._circuit_mark(x.outcome, x.http_status, x.error_class), ''
                      order by coalesce(x.started_at, p_now) + make_interval(secs => coalesce(x.duration_ms, 0) / 1000.0), x.request_id) as answers,
           max(greatest(x.retry_after_ms, 1000)) filter (where x.http_status = 429) as pause_ms,
           array_agg(x.request_id) filter (where x.request_id = any (ep.circuit_probe_ids)) as probes_back,
           -- a probe the cloud answered (a 429 too: it is up, and the pause governs)
           coalesce(bool_or(x.http_status = 429 or cloud._circuit_mark(x.outcome, x.http_status, x.error_class) = '.')
                      filter (where x.request_id = any (ep.circuit_probe_ids)), false) as probe_answered,
           (array_agg(coalesce(x.error_message, 'HTTP ' || x.http_status)
                      order by coalesce(x.started_at, p_now) + make_interval(secs => coalesce(x.duration_ms, 0) / 1000.0) desc)
              filter (where cloud._circuit_mark(x.outcome, x.http_status, x.error_class) = 'x'))[1] as reason
      from unnest(p_results) x
      join cloud.outbox o on o.request_id = x.request_id
      join cloud.endpoint ep on ep.name = o.endpoint
     group by o.endpoint
  loop
    if h.pause_ms is not null then
      update cloud.endpoint
         set paused_until = greatest(coalesce(paused_until, p_now), p_now + make_interval(secs => h.pause_ms / 1000.0)),
             pause_reason = format('HTTP 429 from the cloud at %s: paused %s s for all listeners', p_now, round(h.pause_ms / 1000.0, 1))
       where name = h.endpoint;
    end if;
    select * into e from cloud.endpoint where name = h.endpoint;
    if e.circuit_state = 'half_open' then
      continue when h.probes_back is null;
      if h.probe_answered then
        update cloud.endpoint
           set circuit_state = 'closed', circuit_failures = 0, circuit_recent = '', circuit_probe_ids = '{}', circuit_reason = null
         where name = h.endpoint and circuit_state = 'half_open';
      else
        -- a probe the cloud failed: the others may still bring an answer; when none is left, another cool-down
        perform cloud._forget_probes(h.probes_back, p_now, format('probes failed; last: %s', coalesce(h.reason, 'no answer')));
      end if;
      continue;
    end if;
    -- open: these answers are to calls made before it opened; the cool-down and the probes decide
    continue when e.circuit_state <> 'closed' or coalesce(h.answers, '') = '';
    -- a healthy endpoint whose window is already full of answers has nothing to record
    continue when position('x' in h.answers) = 0 and position('x' in e.circuit_recent) = 0
              and length(e.circuit_recent) >= e.circuit_window;
    -- the window is read and written under the row lock: another listener's batch may be sliding it too
    select * into e from cloud.endpoint where name = h.endpoint for update;
    continue when e.circuit_state <> 'closed';
    -- slide the window answer by answer: the circuit opens at the first answer where the rule holds
    v_recent := e.circuit_recent;
    v_open := false;
    v_run := e.circuit_failures;  -- failures in a row so far (for reading; the window decides)
    for i in 1 .. length(h.answers) loop
      v_recent := right(v_recent || substr(h.answers, i, 1), e.circuit_window);
      if substr(h.answers, i, 1) <> 'x' then
        v_run := 0;
        continue;
      end if;
      v_run := v_run + 1;
      v_fails := length(v_recent) - length(replace(v_recent, 'x', ''));
      if v_fails >= e.circuit_threshold and v_fails >= e.circuit_failure_ratio * length(v_recent) then
        v_open := true;
        exit;
      end if;
    end loop;
    update cloud.endpoint
       set circuit_recent = v_recent,
           circuit_failures = v_run,
           circuit_state = case when v_open then 'open' else circuit_state end,
           circuit_opened_at = case when v_open then p_now else circuit_opened_at end,
           circuit_reason = case when v_open
                                 then format('%s of the last %s answers were cloud failures (%s in a row at the end); last: %s',
                                             v_fails, length(v_recent), v_run, h.reason)
                                 else circuit_reason end
     where name = h.endpoint and circuit_state = 'closed';
  end loop;
end $$;
comment on function cloud._record_endpoint_health is 'Internal: feeds a batch of answers (leases still held) to each endpoint''s circuit breaker in the order they happened — it opens when at least circuit_threshold of the last circuit_window answers are cloud failures and they are at least circuit_failure_ratio of them; a probe the cloud answers closes it — and turns a 429 into a pause for all listeners.';

------------------------------------------------------------------------------
-- Recording attempts
------------------------------------------------------------------------------
create or replace function cloud.fail_messages(
  p_worker  text,                     -- worker that holds the leases
  p_results cloud.attempt_result[],   -- failed attempts: outcome retryable or permanent
  p_now     timestamptz default clock_timestamp()
) returns setof cloud.attempt_outcome
language plpgsql
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  r       cloud.outbox;
  v_fn    regprocedure;
  v_err   text;
  v_out   cloud.attempt_outcome[];
  v_final uuid[];
begin
  if cardinality(p_results) = 0 then
    return;
  end if;
  with f as materialized (
    -- one primary-key lookup per result, as in complete_messages; only the try this worker holds
    select x.*, e.max_attempts, e.max_lost_leases, e.backoff_base_ms, e.backoff_cap_ms, o.failures, o.lost_leases,
           cloud._counts_toward_attempts(x.outcome, x.http_status, x.error_class) as own,
           coalesce(x.error_class = 'lease_expired', false) as lost
      from unnest(p_results) x
      cross join lateral (select o.status, o.locked_by, o.attempts, o.endpoint, o.failures, o.lost_leases from cloud.outbox o
                           where o.request_id = x.request_id offset 0 for update) o
      join cloud.endpoint e on e.name = o.endpoint
     where o.status = 'in_flight' and o.locked_by = p_worker and o.attempts = x.attempt
  ), judged as materialized (
    select f.*,
           case when f.outcome = 'permanent' then 'failed'
                when f.own and f.failures + 1 >= f.max_attempts then 'dead'
                when f.lost and f.lost_leases + 1 >= f.max_lost_leases then 'dead'
                else 'pending' end as next_status,
           -- the backoff grows with what this kind of trouble has cost the message so far
           case when f.lost then f.lost_leases + 1 when f.own then f.failures + 1 else greatest(f.failures, 1) end as nth
      from f
  ), failed as (
    update cloud.outbox o
       set status = j.next_status,
           failures = o.failures + j.own::integer,
           lost_leases = o.lost_leases + j.lost::integer,
           next_attempt_at = case when j.next_status = 'pending'
                                  then p_now + cloud.compute_backoff_delay(j.nth, j.backoff_base_ms, j.backoff_cap_ms, j.retry_after_ms)
                                  else o.next_attempt_at end,
           last_error = case when j.next_status = 'dead' and j.lost
                             then format('%s (its lease expired %s times with no answer: a message that makes its listener crash or hang looks like this)',
                                         coalesce(j.error_message, 'lease expired'), j.lost_leases + 1)
                             else coalesce(j.error_message, 'HTTP ' || j.http_status) end,
           last_error_class = j.error_class,
           last_error_at = p_now, last_http_status = j.http_status, response = coalesce(j.response, o.response),
           locked_by = null, locked_until = null, updated_at = p_now
      from judged j
     where o.request_id = j.request_id
    returning o.request_id, o.status
  )
  select coalesce(array_agg((request_id, status)::cloud.attempt_outcome), '{}'),
         coalesce(array_agg(request_id) filter (where status in ('failed', 'dead')), '{}')
    into v_out, v_final
    from failed;

  -- the ERP document learns why its message will not go (on_fail handler)
  for r in select * from cloud.outbox where request_id = any (v_final) loop
    v_fn := (cloud._handler_for(r.operation)).on_fail;
    continue when v_fn is null;
    v_err := cloud._run_handler(v_fn, r,
               jsonb_build_object('status', r.status, 'error', r.last_error, 'error_class', r.last_error_class,
                                  'http_status', r.last_http_status, 'response', r.response));
    if v_err is not null then
      update cloud.outbox set last_error = last_error || ' (write-back of the failure failed: ' || v_err || ')'
       where request_id = r.request_id;
    end if;
  end loop;

  return query select * from unnest(v_out);
  if cardinality(v_out) < cardinality(p_results) then
    return query
      select x.request_id, 'lease_lost'::text from unnest(p_results) x
       where x.request_id <> all (array(select o.request_id from unnest(v_out) o));
  end if;
end $$;
comment on function cloud.fail_messages is 'Classifies failed attempts of tries the worker still holds: retryable → pending after exponential backoff (Retry-After honoured), permanent → failed, the message''s own failures reaching max_attempts or its expired leases reaching max_lost_leases → dead (429s, shutdowns and listener-side problems count toward neither); runs on_fail handlers for failed and dead.';

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
  v_held    cloud.attempt_result[];
begin
  select coalesce(array_agg(r), '{}') into v_results
    from jsonb_populate_recordset(null::cloud.attempt_result, p_attempts) r;

  -- each message is locked first, so the reaper cannot take a lease away between this judgement and
  -- the completion: an answer is on time when this worker still holds this very try
  with judged as materialized (
    select x as result, o.endpoint, o.operation,
           coalesce(o.status = 'in_flight' and o.locked_by = p_worker and o.attempts = x.attempt, false) as held
      from unnest(v_results) x
      left join lateral (select o.status, o.locked_by, o.attempts, o.endpoint, o.operation from cloud.outbox o
                          where o.request_id = x.request_id offset 0 for update) o on true
  ), logged as (
    insert into cloud.log (request_id, attempt, endpoint, operation, worker_id, method, url, request_headers, request_body,
                           http_status, response_headers, response_body, duration_ms, outcome, error_class, error_message,
                           started_at, late)
    select (j.result).request_id, (j.result).attempt, coalesce(j.endpoint, '?'), j.operation, p_worker, (j.result).method,
           (j.result).url, (j.result).request_headers, (j.result).request_body, (j.result).http_status,
           (j.result).response_headers, (j.result).response_body, (j.result).duration_ms, (j.result).outcome,
           (j.result).error_class, (j.result).error_message, coalesce((j.result).started_at, p_now), not j.held
      from judged j
  )
  select coalesce(array_agg(j.result) filter (where j.held), '{}') into v_held from judged j;

  -- a late answer changes no circuit and no pause: the endpoint may have healed since
  perform cloud._record_endpoint_health(v_held, p_now);
  -- a late success still completes a message nobody has claimed again (the cloud did it)
  return query select * from cloud.complete_messages(p_worker, array(select r from unnest(v_results) r where r.outcome = 'ok'), p_now);
  return query select * from cloud.fail_messages(p_worker, array(select r from unnest(v_held) r where r.outcome <> 'ok'), p_now);
  return query
    select r.request_id, 'lease_lost'::text from unnest(v_results) r
     where r.outcome <> 'ok' and not exists (select from unnest(v_held) h where h.request_id = r.request_id);
end $$;
comment on function cloud.record_attempts is 'The listener''s one call per batch: writes every attempt to cloud.log (late = true for an answer whose lease the worker no longer holds), feeds the answers of held leases to each endpoint''s circuit and 429 pause, then completes the successes and fails the failures. Returns each message''s new status, or lease_lost.';

------------------------------------------------------------------------------
-- Leases that end without an answer
------------------------------------------------------------------------------
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
    -- an expired lease is a try whose result never came back: log it, retry it with backoff (or dead after
    -- max_lost_leases); locked first, so two reapers at once (pg_cron and a listener) never log one expiry twice
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
    -- a dead listener is not the cloud's failure, so the circuit does not count these; but lost
    -- half-open probes must not leave the circuit waiting for them forever
    perform cloud._forget_probes(array(select r.request_id from unnest(v_results) r), p_now);
    v_total := v_total + (select count(*) from cloud.fail_messages(v_worker, v_results, p_now));
  end loop;
  delete from cloud.listener where heartbeat_at < p_now - interval '2 minutes';
  return v_total;
end $$;
comment on function cloud.reap_expired_leases is 'Returns messages whose lease expired (listener died or froze) to pending with backoff — counted in lost_leases, not toward max_attempts; dead at max_lost_leases — re-opens a circuit whose half-open probes were all lost; forgets listeners silent for 2 minutes (they register again on their next heartbeat).';

create or replace function cloud.release_messages(
  p_worker      text,    -- worker giving its leases back
  p_request_ids uuid[],  -- messages it claimed (and may have sent) but will not report
  p_now         timestamptz default clock_timestamp()
) returns integer
language plpgsql as $$
declare
  v_released uuid[];
begin
  with released as (
    update cloud.outbox
       set status = 'pending', locked_by = null, locked_until = null, next_attempt_at = p_now, updated_at = p_now
     where request_id = any (p_request_ids) and status = 'in_flight' and locked_by = p_worker
    returning request_id
  ) select coalesce(array_agg(request_id), '{}') into v_released from released;
  perform cloud._forget_probes(v_released, p_now);
  return cardinality(v_released);
end $$;
comment on function cloud.release_messages is 'Gives leased messages back (pending, due now) when a listener shuts down before reporting them: they may have been sent, so their tries stay numbered; nothing counts toward max_attempts. Returns how many.';

create function cloud.give_back_messages(
  p_worker      text,                 -- worker giving its leases back
  p_request_ids uuid[],               -- messages it claimed and did not send
  p_now         timestamptz default clock_timestamp(),
  p_attempts    integer[] default null -- the try of each (same order); null = whatever try the worker holds
) returns integer
language plpgsql as $$
declare
  v_back uuid[];
begin
  if p_attempts is not null and cardinality(p_attempts) <> cardinality(p_request_ids) then
    raise exception using errcode = 'EC015', message = format('give_back_messages: %s request ids but %s attempts', cardinality(p_request_ids), cardinality(p_attempts)),
      hint = 'Pass one attempt number per request id, in the same order, or none.';
  end if;
  with back as (
    update cloud.outbox o
       set status = 'pending', locked_by = null, locked_until = null, next_attempt_at = p_now,
           attempts = greatest(o.attempts - 1, 0), updated_at = p_now
      from unnest(p_request_ids, coalesce(p_attempts, array_fill(null::integer, array[cardinality(p_request_ids)]))) t(request_id, attempt)
     where o.request_id = t.request_id and o.status = 'in_flight' and o.locked_by = p_worker
       and (t.attempt is null or o.attempts = t.attempt)  -- a stale try never gives back the worker's newer one
    returning o.request_id
  ) select coalesce(array_agg(request_id), '{}') into v_back from back;
  perform cloud._forget_probes(v_back, p_now);
  return cardinality(v_back);
end $$;
comment on function cloud.give_back_messages is 'Gives back messages a worker claimed but did not send (its lease could run out before the answer, it is shutting down): pending and due now, the try taken back. Only the tries the worker still holds (p_attempts names them); EC015 when the arrays differ in length. Returns how many.';

create or replace function cloud.take_send_slots(
  p_worker      text,                                  -- the worker that holds the leases
  p_request_ids uuid[],                                -- its messages whose slots passed by more than the grace
  p_lead        interval default '100 milliseconds',   -- new slots are at least this far ahead (the answer's round trip)
  p_now         timestamptz default clock_timestamp()
) returns setof cloud.send_slot
language plpgsql as $$
declare
  v_endpoint text;
  e          cloud.endpoint;
  m          record;
  v_t0       timestamptz;
  v_avail    double precision;
  v_taken    integer;
  v_slot     timestamptz;
  v_back     uuid[] := '{}';
begin
  if p_worker is null or p_worker = '' then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_worker is empty',
      hint = 'Pass the worker id that claimed the messages (cloud.listener.worker_id).';
  elsif p_request_ids is null or array_position(p_request_ids, null) is not null then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_request_ids is null or holds a null',
      hint = 'Pass the request ids of the claimed messages, none of them null.';
  elsif cardinality(p_request_ids) > 1000 then
    raise exception using errcode = 'EC015', message = format('take_send_slots: p_request_ids holds %s ids; at most 1000', cardinality(p_request_ids)),
      hint = 'Ask for new slots in batches of at most 1000 messages.';
  elsif (select count(distinct x) from unnest(p_request_ids) x) <> cardinality(p_request_ids) then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_request_ids names a message twice',
      hint = 'Each message takes one token: name it once.';
  elsif p_lead is null or p_lead < interval '0' or p_lead > interval '10 seconds' then
    raise exception using errcode = 'EC015', message = format('take_send_slots: p_lead %s is not between 0 and 10 seconds', p_lead),
      hint = 'Give the lead time new slots need (about one database round trip), e.g. 100 ms.';
  elsif p_now is null then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_now is null',
      hint = 'Leave p_now out to use the current time.';
  end if;
  -- endpoint by endpoint, in name order; each endpoint row is locked before its
  -- outbox rows, as claim_messages does, so the two never wait on each other in a cycle
  for v_endpoint in
    select distinct o.endpoint from cloud.outbox o where o.request_id = any (p_request_ids) order by 1
  loop
    select * into e from cloud.endpoint where name = v_endpoint for update;
    v_t0 := greatest(p_now + p_lead, e.tokens_at);
    v_avail := cloud._tokens_available(e, v_t0);
    v_taken := 0;
    for m in
      select o.request_id, o.locked_until
        from cloud.outbox o
       where o.request_id = any (p_request_ids) and o.endpoint = v_endpoint
         and o.status = 'in_flight' and o.locked_by = p_worker and o.locked_until > p_now
       order by o.id
         for update skip locked  -- a row the reaper holds is being taken away from this worker
    loop
      if e.paused_until > p_now or (e.circuit_state <> 'closed' and m.request_id <> all (e.circuit_probe_ids)) then
        v_back := v_back || m.request_id;  -- a 429 pause or an open circuit: no calls now
        continue;
      end if;
      if e.rate_per_s is null then
        v_slot := p_now;  -- the limit was lifted meanwhile
      else
        -- the next token of the shared bucket, as claim_messages hands them out
        v_slot := v_t0 + make_interval(secs => greatest(0, (v_taken + 1 - v_avail) / e.rate_per_s));
      end if;
      if v_slot + make_interval(secs => e.timeout_ms / 1000.0) > m.locked_until then
        v_back := v_back || m.request_id;  -- the call could outlive the lease: another worker could send it too
        continue;
      end if;
      if e.rate_per_s is not null then
        v_taken := v_taken + 1;
      end if;
      return next (m.request_id, 'slotted', v_slot, v_slot + cloud.send_grace(e.rate_per_s))::cloud.send_slot;
    end loop;
    if v_taken > 0 then
      update cloud.endpoint set tokens = v_avail - v_taken, tokens_at = v_t0 where name = v_endpoint;
    end if;
  end loop;
  if cardinality(v_back) > 0 then
    -- never sent: pending again and due now, the try taken back (a given-back probe is a lost probe)
    perform cloud.give_back_messages(p_worker, v_back, p_now);
    return query select b, 'given_back', null::timestamptz, null::timestamptz from unnest(v_back) b;
  end if;
  -- everything else is no longer this worker's to send
  return query
    select x, 'lease_lost', null::timestamptz, null::timestamptz
      from unnest(p_request_ids) x
     where not exists (select from cloud.outbox o
                        where o.request_id = x and o.status = 'in_flight' and o.locked_by = p_worker and o.locked_until > p_now)
       and x <> all (v_back);
end $$;
comment on function cloud.take_send_slots is 'Gives a worker''s messages whose send slot passed by more than cloud.send_grace new slots from the endpoint''s shared token bucket, at least p_lead ahead, while it holds their leases. A message that cannot be sent and finished within its lease (or whose endpoint is paused or its circuit open and it is not a probe) is given back unsent (cloud.give_back_messages); one whose lease is gone is lease_lost. EC015 for bad input.';

------------------------------------------------------------------------------
-- Replays keep the try numbers
------------------------------------------------------------------------------
create or replace function cloud.replay_message(
  p_request_id uuid,                      -- the message to send again
  p_reason     text,                      -- why (audited)
  p_actor      text default current_user  -- who (audited)
) returns uuid
language plpgsql as $$
declare
  v_msg cloud.outbox;
begin
  perform cloud._require_reason(p_reason);
  select * into v_msg from cloud.outbox where request_id = p_request_id for update;
  if not found then
    raise exception using errcode = 'EC005', message = format('no message with request_id %s', p_request_id),
      hint = 'Check the id in cloud.outbox (finished messages are purged after 7 days; cloud.log keeps their attempts).';
  end if;
  if v_msg.status not in ('failed', 'dead', 'skipped') then
    raise exception using errcode = 'EC006', message = format('message %s is %s and cannot be replayed', p_request_id, v_msg.status),
      detail = 'Only failed, dead or skipped messages are replayed.',
      hint = case when v_msg.status = 'sent' then 'It was delivered already; enqueue a new message if the cloud needs it again.'
                  else 'It is still being delivered; wait for it to finish.' end;
  end if;
  insert into cloud.replay_audit (request_id, action, actor, reason, previous_status, previous_attempts, previous_error)
  values (p_request_id, 'replay', p_actor, p_reason, v_msg.status, v_msg.attempts, v_msg.last_error);
  -- a fresh budget; the try numbers go on, so cloud.log never holds two attempt 1s of one message
  update cloud.outbox
     set status = 'pending', failures = 0, lost_leases = 0, next_attempt_at = now(), updated_at = now()
   where request_id = p_request_id;
  perform cloud._wake_listeners((select wake_channel from cloud.endpoint where name = v_msg.endpoint));
  return p_request_id;
end $$;
comment on function cloud.replay_message is 'Puts a failed, dead or skipped message back to pending with the same request_id and a fresh budget (failures and lost leases reset; attempts keep numbering its tries); audited in cloud.replay_audit.';

------------------------------------------------------------------------------
-- Listeners the reaper forgot
------------------------------------------------------------------------------
drop function cloud.record_listener_heartbeat(text, text[]);
create function cloud.record_listener_heartbeat(
  p_worker   text,              -- worker id
  p_channels text[] default null -- refreshed channel list, unchanged when null
) returns boolean
language sql as $$
  with beat as (
    update cloud.listener set heartbeat_at = now(), channels = coalesce(p_channels, channels)
     where worker_id = p_worker
    returning 1
  ) select exists (select from beat);
$$;
comment on function cloud.record_listener_heartbeat is 'Marks a listener alive (called every few seconds). False when it is not registered (the reaper forgot it after 2 minutes of silence): it then registers again with cloud.record_listener_start.';

------------------------------------------------------------------------------
-- Reading it back
------------------------------------------------------------------------------
create view cloud.attempt_history as
select a.request_id,
       a.attempt,
       a.endpoint,
       a.operation,
       a.worker_id,
       a.started_at,
       a.duration_ms,
       a.outcome,
       a.http_status,
       a.error_class,
       a.error_message,
       a.late as answered_late,
       cloud._counts_toward_attempts(a.outcome, a.http_status, a.error_class) and not a.late as counted,
       l.worker_id as late_worker_id,
       l.outcome as late_outcome,
       l.http_status as late_http_status,
       l.error_class as late_error_class,
       l.error_message as late_error_message
  from (select distinct on (g.request_id, g.attempt) g.*
          from cloud.log g
         order by g.request_id, g.attempt, g.late, g.started_at) a
  left join lateral (
    select x.worker_id, x.outcome, x.http_status, x.error_class, x.error_message
      from cloud.log x
     where x.request_id = a.request_id and x.attempt = a.attempt and x.late and not a.late
     order by x.started_at
     limit 1
  ) l on true;
comment on view cloud.attempt_history is 'One row per try of a message: what the engine acted on (the answer recorded in time, or the reaper''s lease_expired), whether it counted toward max_attempts, and beside it any answer that came back after the lease was gone (late_*). Filter by request_id.';

-- the operator's view grows the circuit's window and probes (appended: existing columns stay put)
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
       case when e.paused_until > now() then e.pause_reason end as pause_reason,
       e.circuit_recent,
       cardinality(e.circuit_probe_ids) as circuit_probes_out
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
comment on view cloud.endpoint_status is 'Per endpoint: messages by unfinished status, due now, parked ordering keys, the oldest pending age, the latest error of a message still in the queue, the rate limit, the circuit (its recent answers, probes out) and any 429 pause.';

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
revoke execute on function
  cloud._circuit_mark(text, integer, text),
  cloud._counts_toward_attempts(text, integer, text),
  cloud._forget_probes(uuid[], timestamptz, text),
  cloud.put_endpoint_limits(text, double precision, integer, integer, integer, integer, numeric, integer, integer),
  cloud.give_back_messages(text, uuid[], timestamptz, integer[]),
  cloud.record_listener_heartbeat(text, text[])
  from public;
grant execute on function
  cloud._circuit_mark(text, integer, text),
  cloud._counts_toward_attempts(text, integer, text),
  cloud._forget_probes(uuid[], timestamptz, text),
  cloud.give_back_messages(text, uuid[], timestamptz, integer[]),
  cloud.record_listener_heartbeat(text, text[])
  to erp_cloud_listener;
grant execute on function
  cloud._counts_toward_attempts(text, integer, text),
  cloud.put_endpoint_limits(text, double precision, integer, integer, integer, integer, numeric, integer, integer)
  to erp_cloud_operator;
grant select on cloud.attempt_history to erp_cloud_listener, erp_cloud_operator;
