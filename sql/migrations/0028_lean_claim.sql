-- 0028 — a cheaper claim (issue 15 §4): what cloud.claim_messages costs the
-- database on the listener's wake path (NOTIFY → claim 1–few messages → send →
-- report → an empty claim) and on a busy listener's batch, measured with
-- pg_stat_statements (track = all, track_planning = on) and the backend's CPU
-- time per claim cycle, not guessed:
--
-- 1. Plans: the RETURN QUERY that hands the leased rows back
--    (request_id = any (v_ids)) was planned again on every call that leased
--    anything (custom plans: ~160 µs of planning per endpoint with work, more
--    than every other statement of the claim together). The shapes are fixed
--    by the function's own planner settings (index scans, nested loops), so
--    the generic plan is the same plan without the planning:
--    plan_cache_mode = force_generic_plan, as 0027 did for the report.
-- 2. Executor set-up, not execution, was most of the rest (perf: ExecutorStart
--    ~28 % of the backend's CPU, ExecInitModifyTable ~9 %): every endpoint
--    cost the full lease statement (an UPDATE over cloud.outbox and its child
--    cloud.outbox_archive) whether it had due work or not. Now:
--    a. one index-only probe per endpoint (outbox_active, a few buffers)
--       skips an endpoint without due work before anything else: no budget
--       look-up, no row lock on a limited endpoint, no UPDATE to set up, no
--       write. The old objection (walking the front of the pending range twice
--       when it is full of dead index entries) is bounded since 0026 rotates the
--       hot table, and the probe stops at the first due entry.
--    b. the endpoint loop reads each endpoint's limits itself, so an endpoint
--       without rate limit, quota, pause or open circuit no longer costs a call
--       of cloud._take_budget (a PL/pgSQL call and a look-up of its row) before
--       its lease, nor the token read and the cloud._spend_budget call after
--       it; its lease and its result rows are one statement (UPDATE …
--       RETURNING with the endpoint's settings) instead of three.
--    c. UPDATE ONLY cloud.outbox: the archive holds sent messages only
--       (CHECK outbox_archive_sent_only) and a claim leases pending ones, so
--       its half of the UPDATE (a second result relation and a primary-key
--       probe per message) was pure cost.
--    An endpoint with any limit goes the way it went: _take_budget locks its
--    row and decides, _spend_budget takes the tokens, quota calls and
--    half-open probes, and each message gets its token's send time.
--
-- Unchanged: the signature and result columns, FOR UPDATE SKIP LOCKED, only the
-- head of each ordering key, the per-endpoint order (next_attempt_at, id) and
-- the result's order (id within each endpoint), the random endpoint order, the
-- listener's idle flag (written only when it changes), the allowlist returned
-- as it is at the claim. The limits are read once per claim, at the start of
-- the endpoint loop, instead of once per endpoint moments later; a limit set
-- while a claim is running applies from the next claim, as it did for a limit
-- set between _take_budget's read and the lease.

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
begin
  -- an endpoint without due work costs one index-only probe (below); since
  -- 0026 rotates the hot table, the dead index entries at the front of the
  -- pending range that made a second walk expensive stay few
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
    -- one short index probe: an endpoint without due work costs no lock, no write and no UPDATE to set up
    continue when not exists (
      select from only cloud.outbox o where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now);
    if not ep.limited then
      -- lease and hand back in one statement; every message goes now
      return query
        with candidate as (
          select o.request_id
            from only cloud.outbox o
           where o.status = 'pending' and o.endpoint = ep.name and o.next_attempt_at <= p_now
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
