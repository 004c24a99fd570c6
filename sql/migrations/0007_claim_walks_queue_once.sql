-- 0007 — claims walk the queue once.
--
-- 0002's claim first asked each endpoint "any due message?" and then claimed
-- from it: two walks over the same index range. After a million messages the
-- front of that range holds dead entries until autovacuum gets to them, and the
-- second walk halved the claim rate (bench: claim_after_1m_ratio 0.52). Now
-- each endpoint is claimed from directly; the rate limit, quota and circuit
-- budget is taken first, as before.

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
    perform cloud._spend_budget(v_endpoint, v_ids, p_now);
    v_left := v_left - cardinality(v_ids);
    return query
      select o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
             o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until
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
