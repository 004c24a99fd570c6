-- 0032 — a message the ERP enqueued goes into the hot table already leased (issue 15 §2, §3).
--
-- Measured (one backend, 12,800 messages through claim → record_attempts, 64 a claim, 3 rounds):
-- the claim cost 29–40 µs of database time per message, the report 29–43. Since 0029 every
-- message the ERP enqueued was written twice by the claim: the move from cloud.outbox_intake
-- inserted it into cloud.outbox as pending, then the lease updated it to in_flight. That update
-- changes `status`, a key column of outbox_active, so it is never HOT: a second heap tuple, two
-- more index entries (the primary key, outbox_active), and a dead pending entry in outbox_active
-- that every later claim's probe walks until a scan marks it dead, which nothing may do while a
-- snapshot holds the xmin horizon (held_snapshot: 428 entries read per claim scan, against 2–7
-- quiet).
--
-- 1. cloud._lease_intake (replaces cloud._move_intake): takes the committed intake rows as the move
--    did (up to the claim's limit, SKIP LOCKED, same request_id and id) and writes each into
--    cloud.outbox once: in_flight with its lease when it may go now, pending otherwise. It may go
--    now when it is pending and due, its endpoint is enabled and unlimited (no rate limit, no quota,
--    circuit closed, not paused: a limited endpoint's messages still take the budget in the claim's
--    loop), nothing of that endpoint is already due in the hot table (older work goes first, as
--    before), and it heads its ordering key: no message of the key with a lower id pending, in
--    flight, failed or dead anywhere in cloud.outbox, the intake included (the statement's snapshot
--    still sees the rows it takes, so of two messages of one key taken together only the first
--    goes). Returns the leased messages as the claim does.
-- 2. cloud.claim_messages calls it first and counts what it leased against its limit; the rest of
--    the claim (the endpoint loop, budgets, the idle flag) is unchanged.
--
-- Unchanged: every guarantee of the claim (one lease per message, per-key order, SKIP LOCKED, the
-- limit, limits and budgets, what is returned), the lease's columns (attempts + 1, locked_by,
-- locked_until = now + timeout + margin, updated_at), and an explicit request_id that slipped past
-- enqueue's EC004 in REPEATABLE READ still keeps the message already there (ON CONFLICT DO NOTHING).

-- the one rule for "its messages go without taking a budget", read by the claim's loop and by the lease on the way in
create function cloud._endpoint_limited(e cloud.endpoint, p_now timestamptz)
returns boolean
language sql stable
as $$
  select e.rate_per_s is not null or e.quota_per_day is not null or e.quota_per_month is not null
      or e.circuit_state <> 'closed' or coalesce(e.paused_until > p_now, false)
$$;
comment on function cloud._endpoint_limited(cloud.endpoint, timestamptz) is 'Internal (cloud.claim_messages, cloud._lease_intake): true when an endpoint''s messages must take a budget before they go: a rate limit, a daily or monthly quota, a circuit not closed, or a pause until after p_now.';
revoke all on function cloud._endpoint_limited(cloud.endpoint, timestamptz) from public;
grant execute on function cloud._endpoint_limited(cloud.endpoint, timestamptz) to erp_cloud_listener, erp_cloud_operator;

create function cloud._lease_intake(
  p_worker text,             -- the claiming listener
  p_limit integer,           -- at most this many taken, and leased (the claim's own limit)
  p_endpoints text[],        -- only these endpoints' messages (null: all), as the claim
  p_lease_margin interval,   -- as the claim: the lease runs the endpoint's timeout plus this
  p_now timestamptz)
returns setof cloud.claimed_message
language plpgsql security definer
set search_path = ''
as $$
begin
  return query
    with taken as (
      -- rows another transaction holds (another listener's claim taking them, an operator's skip) are
      -- skipped, not waited for: that claim takes them, or the next one; until then the head-of-key
      -- checks, which read the intake too, keep their keys' order
      delete from only cloud.outbox_intake i
       where i.ctid = any (array(select t.ctid from only cloud.outbox_intake t
                                  where p_endpoints is null or t.endpoint = any (p_endpoints)
                                  limit greatest(p_limit, 1) for update skip locked))
      returning i.*
    ), ready as materialized (
      -- endpoints whose messages may be leased on the way in: enabled, unlimited (a limited one's go through
      -- the claim's budget), and nothing of theirs already due in the hot table (that goes first)
      select e.name, e.timeout_ms
        from cloud.endpoint e
       where e.name in (select t.endpoint from taken t) and p_limit > 0 and e.enabled
         and not cloud._endpoint_limited(e, p_now)
         and not exists (select from only cloud.outbox o
                          where o.status = 'pending' and o.endpoint = e.name and o.next_attempt_at <= p_now)
    ), judged as (
      select t.*, r.timeout_ms,
             t.status = 'pending' and r.name is not null and t.next_attempt_at <= p_now
             -- heads its key: the snapshot still sees the rows taken above, so a lower id taken with it holds it back
             and (t.ordering_key is null or not exists (
                   select from cloud.outbox h
                    where h.ordering_key = t.ordering_key and h.id < t.id
                      and h.status in ('pending', 'in_flight', 'failed', 'dead'))) as lease
        from taken t left join ready r on r.name = t.endpoint
    ), moved as (
      insert into cloud.outbox overriding system value
      select j.request_id, j.id, j.endpoint, j.operation, j.payload, j.aggregate_type, j.aggregate_id, j.ordering_key,
             case when j.lease then 'in_flight' else j.status end,
             case when j.lease then j.attempts + 1 else j.attempts end,
             j.next_attempt_at,
             case when j.lease then p_worker else j.locked_by end,
             case when j.lease then p_now + make_interval(secs => j.timeout_ms / 1000.0) + p_lease_margin else j.locked_until end,
             j.last_error, j.last_error_class, j.last_error_at, j.last_http_status, j.response, j.created_at,
             case when j.lease then p_now else j.updated_at end,
             j.sent_at, j.failures, j.lost_leases
        from judged j
      -- an explicit request_id that slipped past enqueue's EC004 look-up (possible only in REPEATABLE READ,
      -- for an id committed into the intake after that transaction's snapshot) keeps the message already there
      on conflict (request_id) do nothing
      returning *
    )
    -- an intake row is never in flight before this (claims lease only the hot table), so in_flight here is this lease
    select m.request_id, m.endpoint, m.operation, m.payload, m.attempts, m.aggregate_type, m.aggregate_id,
           m.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, m.locked_until, p_now,
           e.allow_hosts, e.allow_cidrs::text[], e.allow_private, e.download_hosts
      from moved m join cloud.endpoint e on e.name = m.endpoint
     where m.status = 'in_flight'
     order by m.id;
end $$;
comment on function cloud._lease_intake(text, integer, text[], interval, timestamptz) is 'Internal (cloud.claim_messages, first): takes up to p_limit committed messages of the given endpoints from cloud.outbox_intake (skipping rows another transaction holds) and writes each into cloud.outbox once, with the same request_id and id: leased to p_worker (in_flight) when it is due, heads its ordering key, and its endpoint is enabled, unlimited and has nothing older due; pending otherwise. Returns the leased messages as cloud.claim_messages does.';
revoke all on function cloud._lease_intake(text, integer, text[], interval, timestamptz) from public;
grant execute on function cloud._lease_intake(text, integer, text[], interval, timestamptz) to erp_cloud_listener, erp_cloud_operator;

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
  -- what ERP transactions committed into cloud.outbox_intake joins the hot table first (0029), and
  -- what may go at once goes in already leased (0032): one write per message instead of two
  return query select * from cloud._lease_intake(p_worker, p_limit, p_endpoints, p_lease_margin, p_now);
  get diagnostics v_n = row_count;
  v_left := v_left - v_n;
  -- an endpoint without due work costs one index probe (below); the dead index entries in front of
  -- its first due message (one per message claimed since the last rotation while a snapshot holds
  -- the xmin horizon and no scan may mark them dead) are walked once per claim, by that probe
  for ep in
    select e.name,
           -- the common case (no limit, no quota, circuit closed, not paused) takes no lock and spends nothing
           cloud._endpoint_limited(e, p_now) as limited
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


drop function cloud._move_intake(integer, text[]);
