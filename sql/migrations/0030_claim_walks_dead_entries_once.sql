-- 0030 — the claim and the listener's idle path, at the database (issue 15 §2, §3):
-- three costs found by measurement, not guessed.
--
-- 1. The claim's round trip grew 1.9× while a REPEATABLE READ snapshot was held (make bench,
--    held_snapshot). Every claim moves a message from pending to in_flight, which changes
--    `status`, a key column of outbox_active: never a HOT update, so each message leaves behind
--    the index entry of its pending version. Normally the next scan marks such an entry dead and
--    later scans skip it; while the xmin horizon is held no scan may, so every claim walked all
--    of them since the last rotation — twice: once in its "any due work?" probe and once in the
--    lease statement. Measured at 1,000 messages/s, 25 s into a hold: the probe 0.7 ms
--    (1,137 buffers), the lease 4.4 ms (1,712 buffers), against 0.1 and 0.17 ms quiet; entries
--    read per outbox_active scan 1,400–2,700 against 9. Now the probe returns the endpoint's
--    first due message's key (next_attempt_at, id) and the lease's index scan starts there:
--    the entries in front of it are walked once per claim, not twice. Safe: an entry in front
--    of that key was not visible to the probe (dead, or a message not yet committed, which the
--    next claim takes), and the order the lease takes messages in is unchanged.
-- 2. cloud.next_due_at was a SQL function: PostgreSQL 15 plans a SQL function's statement again
--    on every call (1.7–2.2 ms of database CPU per call, 0.2 ms of it execution), and an idle
--    listener calls it after every empty claim, about once per message on the wake path. Now
--    PL/pgSQL with a generic plan kept for the session: the same query, planned once.
-- 3. cloud.purge_finished_messages called cloud._retention (a look-up of cloud.setting) once
--    per row it scanned, at every maintenance round: the cut-off is now worked out once.
--
-- Unchanged: every signature and result; the claim's per-endpoint order (next_attempt_at, id),
-- head-of-key rule, SKIP LOCKED, limits, budget and the intake move of 0029; what next_due_at
-- answers; what purge deletes.

create or replace function cloud.claim_messages(
  p_worker text, p_limit integer default 100, p_endpoints text[] default null,
  p_lease_margin interval default interval '5 seconds', p_now timestamptz default clock_timestamp())
returns setof cloud.claimed_message
language plpgsql
set enable_seqscan to 'off'
set enable_bitmapscan to 'off'
set enable_hashjoin to 'off'
set enable_mergejoin to 'off'
set jit to 'off'
set plan_cache_mode to 'force_generic_plan'
as $$
declare
  ep         record;
  v_limited  boolean;
  v_budget   integer;
  v_ids      uuid[];
  v_n        integer;
  v_avail    double precision;
  v_rate     double precision;
  v_slot0    timestamptz;
  v_left     integer := p_limit;
  v_from_at  timestamptz;
  v_from_id  bigint;
begin
  -- what ERP transactions committed into cloud.outbox_intake joins the hot table first (0029): the
  -- listener pays for the move in its own transaction, the ERP paid for one lean row
  perform cloud._move_intake(p_limit, p_endpoints);
  -- an endpoint without due work costs one index probe (below); the dead index entries in front of
  -- its first due message (one per message claimed since the last rotation while a snapshot holds
  -- the xmin horizon and no scan may mark them dead) are walked once per claim, by that probe
  for ep in
    select e.name,
           -- the common case (no limit, no quota, circuit closed, not paused) takes no lock and spends nothing
           (e.rate_per_s is not null or e.quota_per_day is not null or e.quota_per_month is not null
            or e.circuit_state <> 'closed' or coalesce(e.paused_until > p_now, false)) as limited
      from cloud.endpoint e
     where e.enabled and (p_endpoints is null or e.name = any (p_endpoints))
     order by random()  -- no endpoint starves another
  loop
    exit when v_left <= 0;
    -- one short index probe finds the endpoint's first due message: without one the endpoint costs
    -- no lock, no write and no UPDATE to set up; with one, the lease below starts its index scan at
    -- that key (0030) instead of walking again the dead entries in front of it
    select o.next_attempt_at, o.id into v_from_at, v_from_id
      from only cloud.outbox o
     where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now
     order by o.next_attempt_at, o.id
     limit 1;
    continue when not found;
    if not ep.limited then
      -- lease and hand back in one statement; every message goes now
      return query
        with candidate as (
          select o.request_id
            from only cloud.outbox o
           where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now
             and (o.next_attempt_at, o.id) >= (v_from_at, v_from_id)
             and (o.ordering_key is null or not exists (
                   select from cloud.outbox h
                    where h.ordering_key = o.ordering_key and h.id < o.id
                      and h.status in ('pending', 'in_flight', 'failed', 'dead')))
           order by o.next_attempt_at, o.id
           limit v_left
           for update of o skip locked
        ), leased as (
          update only cloud.outbox o
             set status = 'in_flight', attempts = o.attempts + 1, locked_by = p_worker,
                 locked_until = p_now + make_interval(secs => e.timeout_ms / 1000.0) + p_lease_margin,
                 updated_at = p_now
            from candidate c, cloud.endpoint e
           where o.request_id = c.request_id and e.name = o.endpoint
          returning o.id, o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
                    o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until,
                    e.allow_hosts, e.allow_cidrs, e.allow_private, e.download_hosts
        )
        select l.request_id, l.endpoint, l.operation, l.payload, l.attempts, l.aggregate_type, l.aggregate_id,
               l.ordering_key, l.provider, l.base_url, l.timeout_ms, l.config, l.locked_until, p_now,
               l.allow_hosts, l.allow_cidrs::text[], l.allow_private, l.download_hosts
          from leased l
         order by l.id;
      get diagnostics v_n = row_count;
      v_left := v_left - v_n;
      continue;
    end if;
    v_budget := cloud._take_budget(ep.name, v_left, p_now);
    continue when v_budget <= 0;
    with candidate as (
      select o.request_id
        from only cloud.outbox o
       where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now
         and (o.next_attempt_at, o.id) >= (v_from_at, v_from_id)
         and (o.ordering_key is null or not exists (
               select from cloud.outbox h
                where h.ordering_key = o.ordering_key and h.id < o.id
                  and h.status in ('pending', 'in_flight', 'failed', 'dead')))
       order by o.next_attempt_at, o.id
       limit v_budget
       for update of o skip locked
    ), leased as (
      update only cloud.outbox o
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
      into v_avail, v_rate, v_slot0 from cloud.endpoint e where e.name = ep.name;
    perform cloud._spend_budget(ep.name, v_ids, p_now);
    v_left := v_left - cardinality(v_ids);
    return query
      select o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
             o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until,
             -- the k-th message takes the k-th token: it goes when that token is due
             case when v_rate is null then p_now
                  else v_slot0 + make_interval(secs => greatest(0, (row_number() over (order by o.id) - v_avail) / v_rate)) end,
             e.allow_hosts, e.allow_cidrs::text[], e.allow_private, e.download_hosts
        from only cloud.outbox o join cloud.endpoint e on e.name = o.endpoint
       where o.request_id = any (v_ids)
       order by o.id;
  end loop;
  -- an empty claim means this listener is about to wait on LISTEN: from now on
  -- enqueuers NOTIFY; a non-empty one means it is busy: they stop paying for it
  update cloud.listener set idle = (v_left = p_limit), heartbeat_at = p_now
   where worker_id = p_worker and idle is distinct from (v_left = p_limit);
end $$;

create or replace function cloud.next_due_at(
  p_endpoints text[] default null,           -- only these endpoints (null: all)
  p_now timestamptz default clock_timestamp())
returns timestamptz
language plpgsql stable
set plan_cache_mode to 'force_generic_plan'
as $$
begin
  -- PL/pgSQL keeps this plan for the session (0030): as a SQL function it was planned on every call
  return (
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
    where t > p_now);
end $$;

create or replace function cloud.purge_finished_messages(
  p_keep interval default null,                -- keep finished messages this long (null: cloud.setting finished_retention)
  p_limit integer default 100000,              -- at most this many per call
  p_now timestamptz default clock_timestamp())
returns integer
language sql
as $$
  with doomed as (
    select request_id from cloud.outbox
     -- the cut-off is an init plan, worked out once (0030), not once per row scanned
     where status in ('sent', 'skipped')
       and updated_at < (select p_now - coalesce(p_keep, cloud._retention('finished_retention')))
     limit p_limit
  ), gone as (
    delete from cloud.outbox o using doomed d where o.request_id = d.request_id returning 1
  ) select count(*)::integer from gone;
$$;
