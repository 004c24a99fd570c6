-- 0007 — claims walk the queue once, and completion looks handlers up once per
-- operation.
--
-- 0002's claim first asked each endpoint "any due message?" and then claimed
-- from it: two walks over the same index range. After a million messages the
-- front of that range holds dead entries until autovacuum gets to them, and the
-- second walk halved the claim rate (bench: claim_after_1m_ratio 0.52). Now
-- each endpoint is claimed from directly; the rate limit, quota and circuit
-- budget is taken first, as before.
--
-- complete_messages looked up the write-back handler once per message (the
-- planner pushed the lookup below the DISTINCT): 6 ms of a 100-message batch.
--
-- complete_messages and fail_messages joined the batch to the outbox with a
-- status predicate; with statistics taken while the queue was empty, the
-- planner walked outbox_active for every result (190-250 ms a batch at a 10k
-- backlog). They now look each result up by primary key, and fail_messages
-- returns at once for an empty batch.

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

create or replace function cloud.complete_messages(
  p_worker  text,                     -- worker that holds the leases
  p_results cloud.attempt_result[],   -- successful attempts
  p_now     timestamptz default clock_timestamp()
) returns setof cloud.attempt_outcome
language plpgsql
-- plans by request_id whatever the statistics say (a new or just-truncated outbox has none);
-- jit off because disabled plan types inflate costs past jit_above_cost (45 ms of JIT per call)
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  r         cloud.outbox;
  v_err     text;
  v_done    uuid[];
  v_handled uuid[];
  v_failed  uuid[] := '{}';
begin
  with target as materialized (
    -- one primary-key lookup per result (LATERAL): a status predicate in the join
    -- lets the planner walk outbox_active instead, which statistics taken while
    -- the queue was empty make look free and a backlog makes ruinous
    select x.request_id, x.response, x.http_status
      from unnest(p_results) x
      cross join lateral (select o.status, o.locked_by from cloud.outbox o where o.request_id = x.request_id for update) o
     -- a lease reaped but not yet re-claimed is still ours to finish
     where (o.status = 'in_flight' and o.locked_by = p_worker) or o.status = 'pending'
  ), done as (
    update cloud.outbox o
       set status = 'sent', response = t.response, last_http_status = t.http_status, sent_at = p_now,
           locked_by = null, locked_until = null, updated_at = p_now
      from target t
     where o.request_id = t.request_id
    returning o.request_id, o.operation
  ), operations as materialized (
    select distinct d.operation from done d
  ), with_handler as materialized (
    -- once per operation in the batch, not once per message
    select o.operation from operations o where (cloud._handler_for(o.operation)).on_complete is not null
  )
  select coalesce(array_agg(d.request_id), '{}'),
         coalesce(array_agg(d.request_id) filter (where d.operation in (select operation from with_handler)), '{}')
    into v_done, v_handled
    from done d;

  -- write-back, one message at a time, each in its own subtransaction
  for r in select * from cloud.outbox where request_id = any (v_handled) loop
    v_err := cloud._run_handler((cloud._handler_for(r.operation)).on_complete, r, r.response);
    if v_err is not null then
      update cloud.outbox
         set status = 'failed', last_error = 'write-back failed: ' || v_err, last_error_class = 'handler', last_error_at = p_now
       where request_id = r.request_id;
      v_failed := v_failed || r.request_id;
    end if;
  end loop;

  return query
    select d.id, case when d.id = any (v_failed) then 'failed' else 'sent' end::text from unnest(v_done) d(id);
  if cardinality(v_done) < cardinality(p_results) then
    return query
      select x.request_id, 'lease_lost'::text from unnest(p_results) x where x.request_id <> all (v_done);
  end if;
end $$;
comment on function cloud.complete_messages is 'Marks successful attempts sent and runs each operation''s write-back handler in the same transaction (a handler error marks that message failed, nothing half-written).';

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
    -- one primary-key lookup per result, as in complete_messages
    select x.*, e.max_attempts, e.backoff_base_ms, e.backoff_cap_ms, o.attempts as tries
      from unnest(p_results) x
      cross join lateral (select o.status, o.locked_by, o.attempts, o.endpoint from cloud.outbox o
                           where o.request_id = x.request_id for update) o
      join cloud.endpoint e on e.name = o.endpoint
     where o.status = 'in_flight' and o.locked_by = p_worker
  ), failed as (
    update cloud.outbox o
       set status = case when f.outcome = 'permanent' then 'failed'
                         when f.tries >= f.max_attempts then 'dead'
                         else 'pending' end,
           next_attempt_at = case when f.outcome <> 'permanent' and f.tries < f.max_attempts
                                  then p_now + cloud.compute_backoff_delay(f.tries, f.backoff_base_ms, f.backoff_cap_ms, f.retry_after_ms)
                                  else o.next_attempt_at end,
           last_error = coalesce(f.error_message, 'HTTP ' || f.http_status), last_error_class = f.error_class,
           last_error_at = p_now, last_http_status = f.http_status, response = coalesce(f.response, o.response),
           locked_by = null, locked_until = null, updated_at = p_now
      from f
     where o.request_id = f.request_id
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
comment on function cloud.fail_messages is 'Classifies failed attempts: retryable → pending after exponential backoff (Retry-After honoured), permanent → failed, attempts exhausted → dead; runs on_fail handlers for failed and dead.';
