-- 0034 — a lease is committed without waiting for the WAL flush; a crash of PostgreSQL raises a
-- fence instead (issue 15 §4).
--
-- Measured: the same one-message claim takes 0.97 ms with synchronous_commit on and 0.39 ms with
-- it off (pgbench, one client, this machine): 0.58 ms of the 2.2–2.4 ms from the ERP's commit to
-- the cloud is the claim's commit waiting for its WAL flush before the HTTP call may start.
--
-- 1. cloud.claim_messages sets synchronous_commit off for its own transaction. The lease is
--    visible to every other session the moment the claim commits, flushed or not, so two live
--    listeners still never hold one message. The report (cloud.record_attempts) still commits
--    synchronously, and its flush carries every claim before it: nothing reported is lost.
-- 2. What a crash of PostgreSQL can lose is a lease committed in the last moments before it
--    (the WAL writer flushes within wal_writer_delay): the message is then pending again (or back
--    in the intake) while the listener that held it may still have its HTTP call in flight. Left
--    alone, the next claim would send the same Request_ID beside it. cloud.delivery_fence is an
--    UNLOGGED one-row table: a crash (or a standby's promotion) empties it, a clean restart keeps
--    it. The first claim that finds it empty raises the fence again (cloud._raise_delivery_fence):
--    every message with an id up to the sequence's value after recovery (everything enqueued
--    before the crash) waits until the longest lease a claim could have given before it has run
--    out (the claim's now + the longest endpoint timeout + the lease margin); what the ERP
--    enqueues after the crash goes at once. cloud.next_due_at names the fence's end, so a listener
--    looks again then.
-- 3. cloud._lease_intake takes the fence's id (a new parameter): a fenced intake row goes into the
--    hot table pending, not leased.
-- 4. The comment on cloud.outbox_intake named cloud._move_intake, dropped in 0032.
-- 5. The claim's last step, recording whether its listener is now idle, is cloud._mark_listener_idle
--    (the same UPDATE), so that 0035 can move the flag without writing the claim again.
--
-- Unchanged: every lease's columns, per-key order, SKIP LOCKED, limits and budgets, what a claim
-- returns; a clean restart (pg.sh stop, pg_ctl -m fast or smart) raises no fence.

create unlogged table cloud.delivery_fence (
  one boolean primary key default true check (one),
  fence_id bigint not null,
  fence_until timestamptz not null,
  raised_at timestamptz not null default clock_timestamp()
);
comment on table cloud.delivery_fence is 'One row: messages with an id up to fence_id are not leased before fence_until. UNLOGGED on purpose: a crash of PostgreSQL empties it, and the next claim raises the fence again (cloud._raise_delivery_fence), because the crash may have lost leases committed without a WAL flush while their HTTP calls were in flight. The row the migration writes (0, -infinity) fences nothing.';
insert into cloud.delivery_fence (fence_id, fence_until) values (0, '-infinity');
revoke all on cloud.delivery_fence from public;
grant select on cloud.delivery_fence to erp_cloud_listener, erp_cloud_operator, erp_cloud_console_finance, erp_cloud_console_operator;

create function cloud._raise_delivery_fence(
  p_lease_margin interval,   -- the claim's lease margin
  p_now timestamptz)         -- the claim's now
returns cloud.delivery_fence
language plpgsql security definer
set search_path = ''
as $$
declare
  v cloud.delivery_fence;
begin
  -- after recovery the sequence stands at or beyond every id handed out before the crash (it is
  -- logged ahead of what it hands out, and a message that survived the crash committed its advance)
  insert into cloud.delivery_fence (fence_id, fence_until)
  values ((select s.last_value from cloud.outbox_id_seq s),
          p_now + make_interval(secs => coalesce((select max(e.timeout_ms) from cloud.endpoint e), 0) / 1000.0)
                + greatest(p_lease_margin, interval '0'))
  on conflict (one) do nothing
  returning * into v;
  if not found then  -- a claim beside this one raised it first
    select * into v from cloud.delivery_fence;
  end if;
  return v;
end $$;
comment on function cloud._raise_delivery_fence(interval, timestamptz) is 'Internal (cloud.claim_messages, when cloud.delivery_fence is empty: after a crash of PostgreSQL): writes the fence: messages with an id up to the outbox sequence''s value wait until p_now plus the longest endpoint timeout plus p_lease_margin, the longest lease a claim could have given before the crash. Returns the fence.';
revoke all on function cloud._raise_delivery_fence(interval, timestamptz) from public;
grant execute on function cloud._raise_delivery_fence(interval, timestamptz) to erp_cloud_listener, erp_cloud_operator;

drop function cloud._lease_intake(text, integer, text[], interval, timestamptz);

create function cloud._lease_intake(
  p_worker text,             -- the claiming listener
  p_limit integer,           -- at most this many taken, and leased (the claim's own limit)
  p_endpoints text[],        -- only these endpoints' messages (null: all), as the claim
  p_lease_margin interval,   -- as the claim: the lease runs the endpoint's timeout plus this
  p_now timestamptz,
  p_fence_id bigint)         -- messages with an id up to this one wait (cloud.delivery_fence): they go in pending
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
             t.status = 'pending' and r.name is not null and t.next_attempt_at <= p_now and t.id > p_fence_id
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
comment on function cloud._lease_intake(text, integer, text[], interval, timestamptz, bigint) is 'Internal (cloud.claim_messages, first): takes up to p_limit committed messages of the given endpoints from cloud.outbox_intake (skipping rows another transaction holds) and writes each into cloud.outbox once, with the same request_id and id: leased to p_worker (in_flight) when it is due, is not behind the delivery fence (id above p_fence_id), heads its ordering key, and its endpoint is enabled, unlimited and has nothing older due; pending otherwise. Returns the leased messages as cloud.claim_messages does.';
revoke all on function cloud._lease_intake(text, integer, text[], interval, timestamptz, bigint) from public;
grant execute on function cloud._lease_intake(text, integer, text[], interval, timestamptz, bigint) to erp_cloud_listener, erp_cloud_operator;

-- the claim's last step, one function, so that where the flag lives can change without the claim (0035)
create function cloud._mark_listener_idle(p_worker text, p_idle boolean)
returns void
language plpgsql
as $$
begin
  update cloud.listener set idle = p_idle, heartbeat_at = now()
   where worker_id = p_worker and idle is distinct from p_idle;
end $$;
comment on function cloud._mark_listener_idle(text, boolean) is 'Internal (cloud.claim_messages): records whether listener p_worker now waits on LISTEN (an empty claim) or is busy (a claim with work), writing only when it changes. Nothing for an unregistered worker.';
revoke all on function cloud._mark_listener_idle(text, boolean) from public;
grant execute on function cloud._mark_listener_idle(text, boolean) to erp_cloud_listener, erp_cloud_operator;

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
  v_fence    cloud.delivery_fence;
  v_fence_id bigint := 0;
begin
  -- a lease is committed without waiting for its WAL flush (0034): the HTTP call starts 0.6 ms sooner.
  -- Only a crash of PostgreSQL can lose such a lease, and it empties cloud.delivery_fence (unlogged)
  -- with it: the first claim after the crash raises the fence again, and until the longest lease
  -- given before the crash has run out, no message enqueued before it is leased
  perform pg_catalog.set_config('synchronous_commit', 'off', true);
  select * into v_fence from cloud.delivery_fence;
  if not found then
    v_fence := cloud._raise_delivery_fence(p_lease_margin, p_now);
  end if;
  if p_now < v_fence.fence_until then
    v_fence_id := v_fence.fence_id;
  end if;
  -- what ERP transactions committed into cloud.outbox_intake joins the hot table first (0029), and
  -- what may go at once goes in already leased (0032): one write per message instead of two
  return query select * from cloud._lease_intake(p_worker, p_limit, p_endpoints, p_lease_margin, p_now, v_fence_id);
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
     where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now and o.id > v_fence_id
     order by o.next_attempt_at, o.id
     limit 1;
    continue when not found;
    if not ep.limited then
      -- lease and hand back in one statement; every message goes now
      return query
        with candidate as (
          select o.request_id
            from only cloud.outbox o
           where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now and o.id > v_fence_id
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
       where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now and o.id > v_fence_id
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
  perform cloud._mark_listener_idle(p_worker, v_left = p_limit);
end $$;
comment on function cloud.claim_messages(text, integer, text[], interval, timestamptz) is 'Leases up to p_limit due messages (FOR UPDATE SKIP LOCKED; only the head of each ordering key), endpoint by endpoint within each endpoint''s rate limit, quota, pause and circuit, and none behind the delivery fence (cloud.delivery_fence, raised again by the first claim after a crash). Commits without waiting for the WAL flush (synchronous_commit off for the calling transaction): the fence covers what a crash loses. Returns each message with its endpoint''s settings and egress allowlist as they are at the claim. Records whether the listener is now idle.';

create or replace function cloud.next_due_at(p_endpoints text[] default null, p_now timestamptz default clock_timestamp())
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
      union all
      -- messages behind the delivery fence (0034): when it lifts
      select f.fence_until from cloud.delivery_fence f
    ) s
    where t > p_now);
end $$;
comment on function cloud.next_due_at(text[], timestamptz) is 'When the listener should look again: the earliest retry not yet due, the moment a rate limit, 429 pause or open circuit lets a waiting message go, or the end of the delivery fence after a crash.';

comment on table cloud.outbox_intake is 'Messages enqueued by ERP transactions with a generated request_id, until a claim takes them into cloud.outbox itself, leased when they may go at once (cloud._lease_intake): a child table of cloud.outbox with a primary key and no other index on unkeyed rows, so the ERP''s insert costs little more than one row. Read them through cloud.outbox like any message.';
