-- 0010 — a claimed message carries its endpoint's egress allowlist.
--
-- Why: the listener kept every endpoint's allowlist (白名单) in memory and
-- reloaded it once per maintenance tick, so for up to a tick after an operator
-- narrowed an allowlist with cloud.put_endpoint_allowlist, attempts could still
-- go where it no longer allowed (and a widened one kept refusing). The claim
-- already reads the endpoint row for its URL and timeout; it now returns the
-- allowlist too, so every attempt is checked against the allowlist as it is at
-- the moment the message is claimed.

alter type cloud.claimed_message
  add attribute allow_hosts text[],
  add attribute allow_cidrs text[],
  add attribute allow_private boolean;
comment on type cloud.claimed_message is 'A leased message with what the provider adapter needs to send it, when it may be sent (send_at: now, or its rate-limit slot), and where it may go (the endpoint''s allowlist at the claim).';

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
                  else v_slot0 + make_interval(secs => greatest(0, (row_number() over (order by o.id) - v_avail) / v_rate)) end,
             e.allow_hosts, e.allow_cidrs::text[], e.allow_private
        from cloud.outbox o join cloud.endpoint e on e.name = o.endpoint
       where o.request_id = any (v_ids)
       order by o.id;
  end loop;
  -- an empty claim means this listener is about to wait on LISTEN: from now on
  -- enqueuers NOTIFY; a non-empty one means it is busy: they stop paying for it
  update cloud.listener set idle = (v_left = p_limit), heartbeat_at = p_now
   where worker_id = p_worker and idle is distinct from (v_left = p_limit);
end $$;
comment on function cloud.claim_messages is 'Leases up to p_limit due messages (FOR UPDATE SKIP LOCKED; only the head of each ordering key), endpoint by endpoint within each endpoint''s rate limit, quota, pause and circuit. Returns each message with its endpoint''s settings and egress allowlist as they are at the claim. Records whether the listener is now idle.';
