-- 0001 — the delivery engine (schema cloud).
--
-- Adds the transactional outbox that ERP triggers write to, the endpoint
-- registry, the per-attempt log (Cloud_Log, partitioned by month), the
-- claim / complete / fail / replay / reap verbs the listener and operators
-- call, the operator views, the roles, and the pg_cron maintenance jobs.
-- Why in SQL: the ERP's transaction decides what is sent (rollback = nothing
-- sent), and every decision about retries, ordering and dead letters is
-- visible and auditable where the DBA already works.
--
-- SQLSTATE registry (mirrored in listener/errors.ts; tests assert codes):
--   EC001  unknown cloud endpoint
--   EC002  invalid operation name
--   EC003  invalid payload (must be a JSON object or array)
--   EC004  a message with this request_id already exists
--   EC005  no message with this request_id
--   EC006  message cannot be replayed in its current status
--   EC007  a reason is required (replay / skip are audited)
--   EC008  invalid endpoint setting
--   EC009  message cannot be skipped in its current status

------------------------------------------------------------------------------
-- Roles (cluster-wide, so created only when missing; concurrent migrations of
-- two databases may race here, hence the exception handlers).
------------------------------------------------------------------------------
do $$
declare
  v_role record;
begin
  for v_role in
    select * from (values
      ('erp_cloud_app', 'The ERP application: may enqueue through cloud.enqueue_message (the triggers), nothing else in schema cloud.'),
      ('erp_cloud_listener', 'The erp-cloud listener: claims, completes and fails messages, writes cloud.log, reads endpoint config.'),
      ('erp_cloud_operator', 'Operators (DBAs): read the outbox, log and views; replay or skip messages; manage endpoints.')
    ) as r(name, description)
  loop
    begin
      if not exists (select from pg_catalog.pg_roles where rolname = v_role.name) then
        execute format('create role %I nologin', v_role.name);
        execute format('comment on role %I is %L', v_role.name, v_role.description);
      end if;
    exception when duplicate_object or unique_violation then null;
    end;
  end loop;
end $$;

alter default privileges revoke execute on functions from public;

create schema cloud;
comment on schema cloud is 'The delivery engine: endpoints, the transactional outbox, Cloud_Log, and the verbs that move messages.';
revoke all on schema cloud from public;
grant usage on schema cloud to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;

------------------------------------------------------------------------------
-- Storage
------------------------------------------------------------------------------
create table cloud.endpoint (
  name            text primary key,
  base_url        text not null,
  provider        text not null default 'webhook',
  wake_channel    text not null default 'cloud_outbox',
  timeout_ms      integer not null default 10000,
  max_attempts    integer not null default 10,
  backoff_base_ms integer not null default 1000,
  backoff_cap_ms  integer not null default 300000,
  enabled         boolean not null default true,
  config          jsonb not null default '{}',
  created_at      timestamptz not null default now(),
  updated_at      timestamptz not null default now(),
  constraint endpoint_name_is_simple check (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
  constraint endpoint_base_url_is_http check (base_url ~ '^https?://[^\s/]+'),
  constraint endpoint_provider_is_simple check (provider ~ '^[a-z][a-z0-9_]*$'),
  constraint endpoint_wake_channel_is_identifier check (wake_channel ~ '^[a-z_][a-z0-9_]{0,62}$'),
  constraint endpoint_timeout_in_range check (timeout_ms between 100 and 600000),
  constraint endpoint_max_attempts_in_range check (max_attempts between 1 and 100),
  constraint endpoint_backoff_in_range check (backoff_base_ms between 10 and 3600000 and backoff_cap_ms >= backoff_base_ms),
  constraint endpoint_config_is_object check (jsonb_typeof(config) = 'object')
);
comment on table cloud.endpoint is 'One row per cloud API: where it is, which provider adapter speaks to it, timeouts, retry budget and backoff. Manage with cloud.put_endpoint.';

-- No foreign key to cloud.endpoint on purpose: an FK check takes FOR KEY SHARE
-- on the endpoint row in every ERP transaction, and thousands of concurrent
-- share-lockers of one row turn into MultiXact churn. enqueue_message checks
-- the endpoint instead.
create table cloud.outbox (
  request_id      uuid primary key default gen_random_uuid(),
  id              bigint generated always as identity,  -- enqueue order; indexed only inside the working-set indexes
  endpoint        text not null,
  operation       text not null,
  payload         jsonb not null,
  aggregate_type  text,
  aggregate_id    text,
  ordering_key    text,
  status          text not null default 'pending',
  attempts        integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  locked_by       text,
  locked_until    timestamptz,
  last_error      text,
  last_error_class text,
  last_error_at   timestamptz,
  last_http_status integer,
  response        jsonb,
  created_at      timestamptz not null default now(),
  updated_at      timestamptz not null default now(),
  sent_at         timestamptz,
  constraint outbox_status_known check (status in ('pending', 'in_flight', 'sent', 'failed', 'dead', 'skipped')),
  constraint outbox_lease_only_in_flight check ((status = 'in_flight') = (locked_until is not null))
) with (
  -- a queue table: vacuum it early and often so claims stay fast after millions of messages
  fillfactor = 85,
  autovacuum_vacuum_scale_factor = 0.01,
  autovacuum_vacuum_threshold = 2000,
  autovacuum_vacuum_insert_scale_factor = 0.02,
  autovacuum_analyze_scale_factor = 0.02,
  autovacuum_vacuum_cost_delay = 0
);
comment on table cloud.outbox is 'The transactional outbox: one row per message to a cloud, written in the ERP''s own transaction. request_id is the Request_ID sent as Idempotency-Key; retries reuse it.';
comment on column cloud.outbox.id is 'Enqueue order. Deliberately not a key: every index costs the ERP''s insert, and request_id is the key.';
comment on column cloud.outbox.ordering_key is 'Messages sharing a key are delivered one at a time in enqueue order; a failed or dead head parks the key.';
comment on column cloud.outbox.status is 'pending → in_flight (leased until locked_until) → sent | failed (permanent, needs a person) | dead (retries exhausted) | skipped (an operator gave up on it).';

-- The working set: everything that is not finished. Small even after millions
-- of messages, because sent rows leave it.
create index outbox_active on cloud.outbox (status, next_attempt_at, id)
  where status in ('pending', 'in_flight', 'failed', 'dead');
create index outbox_ordering on cloud.outbox (ordering_key, id)
  where ordering_key is not null and status in ('pending', 'in_flight', 'failed', 'dead');

create table cloud.operation_handler (
  operation   text primary key,
  on_complete regprocedure,
  on_fail     regprocedure,
  constraint operation_handler_pattern check (operation ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?$')
);
comment on table cloud.operation_handler is 'Domain write-back handlers by operation (exact name, or a prefix such as ''tax.*''). on_complete(msg cloud.outbox, response jsonb) runs in the completing transaction; on_fail(msg cloud.outbox, error jsonb) when a message ends failed or dead.';

create table cloud.listener (
  worker_id    text primary key,
  channels     text[] not null default '{}',
  endpoints    text[],
  idle         boolean not null default false,
  host         text,
  pid          integer,
  started_at   timestamptz not null default now(),
  heartbeat_at timestamptz not null default now()
);
comment on table cloud.listener is 'Live listener processes. idle = true means it waits on LISTEN: only then do ERP transactions pay for a NOTIFY.';

create table cloud.replay_audit (
  id                bigint generated always as identity primary key,
  request_id        uuid not null,
  action            text not null check (action in ('replay', 'skip')),
  actor             text not null,
  reason            text not null,
  previous_status   text not null,
  previous_attempts integer not null,
  previous_error    text,
  at                timestamptz not null default now()
);
create index replay_audit_request on cloud.replay_audit (request_id);
comment on table cloud.replay_audit is 'Who replayed or skipped which message, when and why.';

create table cloud.log (
  request_id       uuid not null,
  attempt          integer not null,
  endpoint         text not null,
  operation        text,
  worker_id        text,
  method           text,
  url              text,
  request_headers  jsonb,
  request_body     text,
  http_status      integer,
  response_headers jsonb,
  response_body    text,
  duration_ms      numeric(12, 3),
  outcome          text not null check (outcome in ('ok', 'retryable', 'permanent')),
  error_class      text,
  error_message    text,
  started_at       timestamptz not null
) partition by range (started_at);
create index log_request on cloud.log (request_id, attempt);
create index log_started_brin on cloud.log using brin (started_at);  -- tail, "the last N attempts"
create table cloud.log_default partition of cloud.log default;
comment on table cloud.log is 'Cloud_Log: one row per HTTP attempt, secrets redacted, bodies size-capped. Partitioned by month (cloud.log_pYYYYMM); old months are dropped by cloud.age_out_log.';

------------------------------------------------------------------------------
-- Result types
------------------------------------------------------------------------------
create type cloud.claimed_message as (
  request_id      uuid,
  endpoint        text,
  operation       text,
  payload         jsonb,
  attempt         integer,
  aggregate_type  text,
  aggregate_id    text,
  ordering_key    text,
  provider        text,
  base_url        text,
  timeout_ms      integer,
  endpoint_config jsonb,
  locked_until    timestamptz
);
comment on type cloud.claimed_message is 'A leased message with what the provider adapter needs to send it.';

create type cloud.attempt_result as (
  request_id       uuid,
  attempt          integer,
  outcome          text,
  method           text,
  url              text,
  request_headers  jsonb,
  request_body     text,
  http_status      integer,
  response_headers jsonb,
  response_body    text,
  response         jsonb,
  duration_ms      numeric,
  error_class      text,
  error_message    text,
  retry_after_ms   integer,
  started_at       timestamptz
);
comment on type cloud.attempt_result is 'What the listener reports for one HTTP attempt: outcome ok | retryable | permanent, the redacted exchange, and an optional Retry-After.';

create type cloud.attempt_outcome as (
  request_id uuid,
  status     text
);
comment on type cloud.attempt_outcome is 'The message status after an attempt was recorded, or lease_lost when another worker owns it now.';

------------------------------------------------------------------------------
-- Endpoints and handlers
------------------------------------------------------------------------------
create function cloud.put_endpoint(
  p_name            text,                       -- endpoint name, e.g. 'tax_cloud'
  p_base_url        text,                       -- http(s) URL the provider adapter builds on
  p_provider        text    default 'webhook',  -- provider adapter (listener/providers/<name>.ts)
  p_wake_channel    text    default 'cloud_outbox', -- NOTIFY channel that wakes listeners
  p_timeout_ms      integer default 10000,      -- per-attempt HTTP timeout
  p_max_attempts    integer default 10,         -- attempts before a message is dead
  p_backoff_base_ms integer default 1000,       -- first retry delay; doubles each attempt
  p_backoff_cap_ms  integer default 300000,     -- longest retry delay
  p_config          jsonb   default '{}',       -- provider-specific settings
  p_enabled         boolean default true        -- false: messages wait, nothing is sent
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
begin
  if p_name is null or p_name !~ '^[a-z][a-z0-9_.-]{0,62}$' then
    raise exception using errcode = 'EC008', message = format('endpoint name %L is not valid', p_name),
      hint = 'Use lower-case letters, digits, dot, dash or underscore, starting with a letter.';
  elsif p_base_url is null or p_base_url !~ '^https?://[^\s/]+' then
    raise exception using errcode = 'EC008', message = format('endpoint %s: base URL %L is not an http(s) URL', p_name, p_base_url),
      hint = 'Give the full URL, e.g. https://api.example.com/v1.';
  elsif p_timeout_ms is null or p_timeout_ms not between 100 and 600000 then
    raise exception using errcode = 'EC008', message = format('endpoint %s: timeout_ms %s is out of range', p_name, p_timeout_ms),
      hint = 'Use 100 to 600000 milliseconds.';
  elsif p_max_attempts is null or p_max_attempts not between 1 and 100 then
    raise exception using errcode = 'EC008', message = format('endpoint %s: max_attempts %s is out of range', p_name, p_max_attempts),
      hint = 'Use 1 to 100 attempts.';
  elsif p_backoff_base_ms is null or p_backoff_cap_ms is null
        or p_backoff_base_ms not between 10 and 3600000 or p_backoff_cap_ms < p_backoff_base_ms then
    raise exception using errcode = 'EC008',
      message = format('endpoint %s: backoff base %s ms / cap %s ms is not valid', p_name, p_backoff_base_ms, p_backoff_cap_ms),
      hint = 'The base is 10 ms to 1 h and the cap is at least the base.';
  elsif p_wake_channel is null or p_wake_channel !~ '^[a-z_][a-z0-9_]{0,62}$' then
    raise exception using errcode = 'EC008', message = format('endpoint %s: wake channel %L is not a plain identifier', p_name, p_wake_channel),
      hint = 'Use lower-case letters, digits and underscores, e.g. invoice_request.';
  elsif p_config is null or jsonb_typeof(p_config) <> 'object' then
    raise exception using errcode = 'EC008', message = format('endpoint %s: config must be a JSON object', p_name),
      hint = 'Pass ''{}'' when the provider needs no settings.';
  end if;
  insert into cloud.endpoint as e (name, base_url, provider, wake_channel, timeout_ms, max_attempts,
                                   backoff_base_ms, backoff_cap_ms, config, enabled)
  values (p_name, p_base_url, coalesce(p_provider, 'webhook'), p_wake_channel, p_timeout_ms, p_max_attempts,
          p_backoff_base_ms, p_backoff_cap_ms, p_config, coalesce(p_enabled, true))
  on conflict (name) do update set
    base_url = excluded.base_url, provider = excluded.provider, wake_channel = excluded.wake_channel,
    timeout_ms = excluded.timeout_ms, max_attempts = excluded.max_attempts,
    backoff_base_ms = excluded.backoff_base_ms, backoff_cap_ms = excluded.backoff_cap_ms,
    config = excluded.config, enabled = excluded.enabled, updated_at = now()
  returning e.* into v_row;
  return v_row;
end $$;
comment on function cloud.put_endpoint is 'Creates or updates a cloud endpoint (validated; EC008 names the bad setting). Returns the stored row.';

create function cloud.put_operation_handler(
  p_operation   text,          -- operation name ('tax.issue') or prefix ('tax.*')
  p_on_complete regprocedure,  -- fn(cloud.outbox, jsonb) run when a message is sent, or null
  p_on_fail     regprocedure default null -- fn(cloud.outbox, jsonb) run when it ends failed or dead, or null
) returns void
language sql as $$
  insert into cloud.operation_handler (operation, on_complete, on_fail)
  values (p_operation, p_on_complete, p_on_fail)
  on conflict (operation) do update set on_complete = excluded.on_complete, on_fail = excluded.on_fail;
$$;
comment on function cloud.put_operation_handler is 'Registers the domain write-back functions for an operation or an operation prefix (''scm.*'').';

------------------------------------------------------------------------------
-- Enqueue (called from ERP triggers, in the ERP's transaction)
------------------------------------------------------------------------------
create function cloud._wake_listeners(p_channel text) returns void
language plpgsql as $$
begin
  -- NOTIFY serialises commits cluster-wide, so only pay for it when a listener
  -- has declared itself idle; busy listeners find the row on their next claim,
  -- and every listener polls as the safety net.
  if exists (select from cloud.listener l where l.idle and p_channel = any (l.channels)) then
    perform pg_catalog.pg_notify(p_channel, '');
  end if;
end $$;
comment on function cloud._wake_listeners is 'Internal: NOTIFY the channel only when some listener on it is idle.';

create function cloud.enqueue_message(
  p_endpoint       text,                  -- cloud.endpoint.name
  p_operation      text,                  -- what to do, e.g. 'tax.issue'; selects the write-back handler
  p_payload        jsonb,                 -- request body for the provider adapter (object or array)
  p_aggregate_type text default null,     -- the ERP document type, e.g. 'erp.settlement'
  p_aggregate_id   text default null,     -- the ERP document id
  p_ordering_key   text default null,     -- messages sharing it are delivered one at a time, in order
  p_request_id     uuid default null,     -- caller-chosen Request_ID; generated when null
  p_not_before     timestamptz default null -- earliest delivery time; now when null
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_channel    text;
  v_request_id uuid := coalesce(p_request_id, pg_catalog.gen_random_uuid());
begin
  select e.wake_channel into v_channel from cloud.endpoint e where e.name = p_endpoint;
  if not found then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_endpoint),
      hint = 'Register the endpoint with cloud.put_endpoint(...) or correct the name in the trigger that enqueues it.';
  end if;
  if p_operation is null or p_operation !~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$' then
    raise exception using errcode = 'EC002', message = format('operation %L is not a valid operation name', p_operation),
      hint = 'Use dotted lower-case names such as tax.issue or scm.po_publish.';
  end if;
  if p_payload is null or jsonb_typeof(p_payload) not in ('object', 'array') then
    raise exception using errcode = 'EC003',
      message = format('payload for %s must be a JSON object or array, got %s', p_operation, coalesce(jsonb_typeof(p_payload), 'NULL')),
      hint = 'Build the payload with jsonb_build_object(...).';
  end if;
  if p_ordering_key is not null then
    -- ids must follow commit order within a key: serialise enqueuers of one key until commit
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('cloud.ordering_key:' || p_ordering_key, 0));
  end if;
  if p_request_id is null then
    insert into cloud.outbox (request_id, endpoint, operation, payload, aggregate_type, aggregate_id, ordering_key, next_attempt_at)
    values (v_request_id, p_endpoint, p_operation, p_payload, p_aggregate_type, p_aggregate_id, p_ordering_key,
            coalesce(p_not_before, pg_catalog.now()));
  else
    insert into cloud.outbox (request_id, endpoint, operation, payload, aggregate_type, aggregate_id, ordering_key, next_attempt_at)
    values (v_request_id, p_endpoint, p_operation, p_payload, p_aggregate_type, p_aggregate_id, p_ordering_key,
            coalesce(p_not_before, pg_catalog.now()))
    on conflict (request_id) do nothing;
    if not found then
      raise exception using errcode = 'EC004', message = format('a message with request_id %s already exists', p_request_id),
        hint = 'Each Request_ID is sent once; let enqueue_message generate one, or look the existing message up in cloud.outbox.';
    end if;
  end if;
  -- inline cloud._wake_listeners: this runs in every ERP transaction
  if exists (select from cloud.listener l where l.idle and v_channel = any (l.channels)) then
    perform pg_catalog.pg_notify(v_channel, '');
  end if;
  return v_request_id;
end $$;
comment on function cloud.enqueue_message is 'Puts a message in the outbox inside the caller''s transaction and returns its request_id (the Request_ID / Idempotency-Key). Rolled back with the caller; wakes an idle listener.';

------------------------------------------------------------------------------
-- Claim, complete, fail (the listener's verbs)
------------------------------------------------------------------------------
create function cloud.compute_backoff_delay(
  p_attempt        integer,  -- the attempt that just failed (1 = first)
  p_base_ms        integer,  -- delay after the first failure
  p_cap_ms         integer,  -- longest delay
  p_retry_after_ms integer default null, -- the cloud's Retry-After, honoured even above the cap
  p_jitter         double precision default random() -- 0..1; ±20 % around the exponential delay
) returns interval
language sql immutable as $$
  select make_interval(secs => greatest(
           least(p_cap_ms::double precision,
                 p_base_ms * power(2::double precision, greatest(p_attempt, 1) - 1) * (0.8 + 0.4 * p_jitter)),
           coalesce(p_retry_after_ms, 0)) / 1000.0);
$$;
comment on function cloud.compute_backoff_delay is 'Retry delay after a failed attempt: base·2^(attempt-1) with ±20 % jitter, capped, but never earlier than Retry-After.';

create function cloud.claim_messages(
  p_worker       text,                      -- the listener's worker id (cloud.listener)
  p_limit        integer default 100,       -- batch size
  p_endpoints    text[] default null,       -- only these endpoints; all when null
  p_lease_margin interval default '5 seconds', -- lease = endpoint timeout + this
  p_now          timestamptz default clock_timestamp()
) returns setof cloud.claimed_message
language plpgsql
-- walk outbox_active in (next_attempt_at, id) order whatever the statistics say: a new or
-- just-truncated outbox has none, and a bitmap scan + sort of the whole backlog per claim is ruinous
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  v_claimed integer;
begin
  return query
  with candidate as (
    select o.request_id
      from cloud.outbox o
      join cloud.endpoint e on e.name = o.endpoint and e.enabled
     where o.status = 'pending'
       and o.next_attempt_at <= p_now
       and (p_endpoints is null or o.endpoint = any (p_endpoints))
       and (o.ordering_key is null or not exists (
             select from cloud.outbox h
              where h.ordering_key = o.ordering_key and h.id < o.id
                and h.status in ('pending', 'in_flight', 'failed', 'dead')))
     order by o.next_attempt_at, o.id
     limit p_limit
     for update of o skip locked
  ), leased as (
    update cloud.outbox o
       set status = 'in_flight', attempts = o.attempts + 1, locked_by = p_worker,
           locked_until = p_now + make_interval(secs => e.timeout_ms / 1000.0) + p_lease_margin,
           updated_at = p_now
      from candidate c, cloud.endpoint e
     where o.request_id = c.request_id and e.name = o.endpoint
    returning o.id, o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
              o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until
  )
  select l.request_id, l.endpoint, l.operation, l.payload, l.attempts, l.aggregate_type, l.aggregate_id,
         l.ordering_key, l.provider, l.base_url, l.timeout_ms, l.config, l.locked_until
    from leased l order by l.id;
  get diagnostics v_claimed = row_count;
  -- an empty claim means this listener is about to wait on LISTEN: from now on
  -- enqueuers NOTIFY; a non-empty one means it is busy: they stop paying for it
  update cloud.listener set idle = (v_claimed = 0), heartbeat_at = p_now
   where worker_id = p_worker and idle is distinct from (v_claimed = 0);
end $$;
comment on function cloud.claim_messages is 'Leases up to p_limit due messages (FOR UPDATE SKIP LOCKED; only the head of each ordering key) and returns them with their endpoint settings. Records whether the listener is now idle.';

create function cloud._run_handler(
  p_handler regprocedure,  -- the registered write-back function
  p_msg     cloud.outbox,  -- the message, as stored after the status change
  p_data    jsonb          -- the response (on complete) or the error (on fail)
) returns text
language plpgsql as $$
declare
  v_fn text;
begin
  select format('%I.%I', n.nspname, p.proname) into v_fn
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.oid = p_handler;
  execute format('select %s($1, $2)', v_fn) using p_msg, p_data;
  return null;
exception when others then
  -- a handler error rolls back only the handler's own writes (subtransaction)
  return format('%s: %s [%s]', p_handler, sqlerrm, sqlstate);
end $$;
comment on function cloud._run_handler is 'Internal: runs one domain handler in a subtransaction; returns the error text when it raised.';

create function cloud._handler_for(p_operation text) returns cloud.operation_handler
language sql stable as $$
  select h.* from cloud.operation_handler h
   where h.operation = p_operation
      or (h.operation like '%.*' and p_operation like left(h.operation, -1) || '%')
   order by h.operation = p_operation desc, length(h.operation) desc
   limit 1;
$$;
comment on function cloud._handler_for is 'Internal: the handler registered for an operation, exact name before the longest prefix.';

create function cloud.complete_messages(
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
      -- OFFSET 0 keeps the status test out of this subquery, so only the primary key can serve it
      cross join lateral (select o.status, o.locked_by from cloud.outbox o where o.request_id = x.request_id offset 0 for update) o
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

create function cloud.fail_messages(
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
                           where o.request_id = x.request_id offset 0 for update) o
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

create function cloud.record_attempts(
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

  return query select * from cloud.complete_messages(p_worker, array(select r from unnest(v_results) r where r.outcome = 'ok'), p_now);
  return query select * from cloud.fail_messages(p_worker, array(select r from unnest(v_results) r where r.outcome <> 'ok'), p_now);
end $$;
comment on function cloud.record_attempts is 'The listener''s one call per batch: writes every attempt to cloud.log, then completes the successes and fails the failures. Returns each message''s new status.';

create function cloud.release_messages(
  p_worker      text,    -- worker giving its leases back
  p_request_ids uuid[],  -- messages it claimed but will not finish
  p_now         timestamptz default clock_timestamp()
) returns integer
language sql as $$
  with released as (
    update cloud.outbox
       set status = 'pending', locked_by = null, locked_until = null, next_attempt_at = p_now, updated_at = p_now
     where request_id = any (p_request_ids) and status = 'in_flight' and locked_by = p_worker
    returning 1
  ) select count(*)::integer from released;
$$;
comment on function cloud.release_messages is 'Gives leased messages back (pending, due now) when a listener shuts down before finishing them. Attempts already counted stay counted.';

create function cloud.next_due_at(
  p_endpoints text[] default null,
  p_now       timestamptz default clock_timestamp()
) returns timestamptz
language sql stable as $$
  select min(o.next_attempt_at) from cloud.outbox o
   where o.status = 'pending' and o.next_attempt_at > p_now
     and (p_endpoints is null or o.endpoint = any (p_endpoints));
$$;
comment on function cloud.next_due_at is 'When the earliest retry that is not yet due becomes due: the listener sets its timer by it.';

------------------------------------------------------------------------------
-- Listener presence
------------------------------------------------------------------------------
create function cloud.record_listener_start(
  p_worker    text,    -- unique worker id
  p_channels  text[],  -- channels it LISTENs on
  p_endpoints text[] default null, -- endpoints it serves; all when null
  p_host      text default null,
  p_pid       integer default null
) returns void
language sql as $$
  insert into cloud.listener (worker_id, channels, endpoints, idle, host, pid)
  values (p_worker, p_channels, p_endpoints, false, p_host, p_pid)
  on conflict (worker_id) do update set channels = excluded.channels, endpoints = excluded.endpoints,
    idle = false, host = excluded.host, pid = excluded.pid, started_at = now(), heartbeat_at = now();
$$;
comment on function cloud.record_listener_start is 'Registers a listener process and the channels it listens on.';

create function cloud.record_listener_heartbeat(
  p_worker   text,            -- worker id
  p_channels text[] default null -- refreshed channel list, unchanged when null
) returns void
language sql as $$
  update cloud.listener set heartbeat_at = now(), channels = coalesce(p_channels, channels) where worker_id = p_worker;
$$;
comment on function cloud.record_listener_heartbeat is 'Marks a listener alive (called every few seconds).';

create function cloud.record_listener_stop(p_worker text) returns void
language sql as $$
  delete from cloud.listener where worker_id = p_worker;
$$;
comment on function cloud.record_listener_stop is 'Removes a listener that shuts down cleanly.';

------------------------------------------------------------------------------
-- Maintenance (pg_cron every minute, or the listener's own timer)
------------------------------------------------------------------------------
create function cloud.reap_expired_leases(p_now timestamptz default clock_timestamp()) returns integer
language plpgsql as $$
declare
  v_worker text;
  v_total  integer := 0;
  v_n      integer;
begin
  for v_worker in
    select distinct o.locked_by from cloud.outbox o where o.status = 'in_flight' and o.locked_until < p_now
  loop
    -- an expired lease is a failed attempt whose result never came back: log it, retry it with backoff
    insert into cloud.log (request_id, attempt, endpoint, operation, worker_id, outcome, error_class, error_message, started_at)
    select o.request_id, o.attempts, o.endpoint, o.operation, v_worker, 'retryable', 'lease_expired',
           format('no result from worker %s before its lease expired at %s', v_worker, o.locked_until), p_now
      from cloud.outbox o
     where o.status = 'in_flight' and o.locked_by = v_worker and o.locked_until < p_now;
    select count(*) into v_n from cloud.fail_messages(v_worker, array(
      select row(o.request_id, o.attempts, 'retryable', null, null, null, null, null, null, null, null, null,
                 'lease_expired', format('no result from worker %s before its lease expired at %s', v_worker, o.locked_until),
                 null, null)::cloud.attempt_result
        from cloud.outbox o
       where o.status = 'in_flight' and o.locked_by = v_worker and o.locked_until < p_now), p_now);
    v_total := v_total + v_n;
  end loop;
  delete from cloud.listener where heartbeat_at < p_now - interval '2 minutes';
  return v_total;
end $$;
comment on function cloud.reap_expired_leases is 'Returns messages whose lease expired (listener died or hung) to pending with backoff, or dead when out of attempts; forgets listeners silent for 2 minutes.';

create function cloud.wake_due_messages(p_now timestamptz default clock_timestamp()) returns integer
language plpgsql as $$
declare
  v_channel text;
  v_n       integer := 0;
begin
  for v_channel in
    select distinct e.wake_channel
      from cloud.outbox o join cloud.endpoint e on e.name = o.endpoint and e.enabled
     where o.status = 'pending' and o.next_attempt_at <= p_now
  loop
    perform pg_notify(v_channel, '');
    v_n := v_n + 1;
  end loop;
  return v_n;
end $$;
comment on function cloud.wake_due_messages is 'NOTIFYs the channel of every endpoint that has due messages; returns how many channels were woken.';

create function cloud.ensure_log_partitions(
  p_months_ahead integer default 2,
  p_now          timestamptz default clock_timestamp()
) returns integer
language plpgsql as $$
declare
  v_month   date;
  v_created integer := 0;
  v_name    text;
begin
  for i in 0 .. p_months_ahead loop
    v_month := (date_trunc('month', p_now at time zone 'UTC') + make_interval(months => i))::date;
    v_name := 'log_p' || to_char(v_month, 'YYYYMM');
    continue when to_regclass('cloud.' || v_name) is not null;
    begin
      execute format('create table cloud.%I partition of cloud.log for values from (%L) to (%L)',
                     v_name, (v_month::timestamp at time zone 'UTC'),
                     ((v_month + interval '1 month')::timestamp at time zone 'UTC'));
      v_created := v_created + 1;
    exception when duplicate_table then null;  -- a concurrent run made it
    when others then
      raise notice 'cloud.log partition % not created (%): rows keep going to cloud.log_default', v_name, sqlerrm;
    end;
  end loop;
  return v_created;
end $$;
comment on function cloud.ensure_log_partitions is 'Creates this month''s and the next months'' cloud.log partitions (log_pYYYYMM); returns how many were created.';

create function cloud.age_out_log(
  p_keep interval default '90 days',  -- keep at least this much history
  p_now  timestamptz default clock_timestamp()
) returns integer
language plpgsql as $$
declare
  v_part    record;
  v_dropped integer := 0;
begin
  for v_part in
    select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'cloud.log'::regclass and c.relname ~ '^log_p[0-9]{6}$'
       and (to_date(substr(c.relname, 6), 'YYYYMM') + interval '1 month')::timestamp at time zone 'UTC' <= p_now - p_keep
  loop
    execute format('drop table cloud.%I', v_part.relname);
    v_dropped := v_dropped + 1;
  end loop;
  return v_dropped;
end $$;
comment on function cloud.age_out_log is 'Drops cloud.log months that ended more than p_keep ago (a DROP, not a DELETE: no bloat). Returns how many were dropped.';

create function cloud.purge_finished_messages(
  p_keep  interval default '7 days',  -- keep sent and skipped messages this long
  p_limit integer default 100000,     -- at most this many per run
  p_now   timestamptz default clock_timestamp()
) returns integer
language sql as $$
  with doomed as (
    select request_id from cloud.outbox
     where status in ('sent', 'skipped') and updated_at < p_now - p_keep
     limit p_limit
  ), gone as (
    delete from cloud.outbox o using doomed d where o.request_id = d.request_id returning 1
  ) select count(*)::integer from gone;
$$;
comment on function cloud.purge_finished_messages is 'Deletes sent and skipped messages older than p_keep (their attempts stay in cloud.log). Returns how many were deleted.';

create function cloud.purge_cron_history(p_keep interval default '3 days') returns integer
language plpgsql as $$
declare
  v_n integer := 0;
begin
  if to_regclass('cron.job_run_details') is not null then
    execute 'delete from cron.job_run_details where end_time < now() - $1' using p_keep;
    get diagnostics v_n = row_count;
  end if;
  return v_n;
end $$;
comment on function cloud.purge_cron_history is 'Deletes pg_cron run history older than p_keep (pg_cron never does on its own). Returns rows deleted; 0 without pg_cron.';

create function cloud.run_maintenance(p_now timestamptz default clock_timestamp()) returns jsonb
language sql as $$
  select jsonb_build_object(
    'reaped', cloud.reap_expired_leases(p_now),
    'woken_channels', cloud.wake_due_messages(p_now),
    'partitions_created', cloud.ensure_log_partitions(2, p_now),
    'partitions_dropped', cloud.age_out_log('90 days', p_now),
    'messages_purged', cloud.purge_finished_messages('7 days', 100000, p_now),
    'cron_history_purged', cloud.purge_cron_history());
$$;
comment on function cloud.run_maintenance is 'Everything the pg_cron jobs do, in one call: the listener''s fallback when pg_cron is not installed in this database.';

create function cloud.schedule_maintenance_jobs() returns integer
language plpgsql as $$
begin
  if to_regnamespace('cron') is null then
    return 0;
  end if;
  perform cron.schedule('erp-cloud: reap expired leases', '* * * * *', 'select cloud.reap_expired_leases()');
  perform cron.schedule('erp-cloud: wake due retries', '* * * * *', 'select cloud.wake_due_messages()');
  perform cron.schedule('erp-cloud: log partitions', '7 * * * *', 'select cloud.ensure_log_partitions(); select cloud.age_out_log()');
  perform cron.schedule('erp-cloud: purge finished', '17 * * * *', 'select cloud.purge_finished_messages(); select cloud.purge_cron_history()');
  return 4;
end $$;
comment on function cloud.schedule_maintenance_jobs is 'Registers (or updates) the named pg_cron jobs that keep the engine running unattended. Returns the number of jobs; 0 when pg_cron is absent.';

create function cloud.cron_jobs_scheduled() returns boolean
language plpgsql stable security definer set search_path = '' as $$
declare
  v_n integer;
begin
  if pg_catalog.to_regclass('cron.job') is null then
    return false;
  end if;
  execute $q$select count(*) from cron.job where jobname like 'erp-cloud: %' and active$q$ into v_n;
  return v_n >= 4;
end $$;
comment on function cloud.cron_jobs_scheduled is 'True when pg_cron runs the maintenance jobs in this database (whoever asks: runs as its owner, since cron.job shows each role only its own jobs); otherwise the listener runs cloud.run_maintenance on its own timer.';

------------------------------------------------------------------------------
-- Operators: replay, skip, views
------------------------------------------------------------------------------
create function cloud._require_reason(p_reason text) returns void
language plpgsql immutable as $$
begin
  if p_reason is null or btrim(p_reason) = '' then
    raise exception using errcode = 'EC007', message = 'a reason is required',
      hint = 'Say why (e.g. ''customer tax id corrected''): replays and skips are audited.';
  end if;
end $$;
comment on function cloud._require_reason is 'Internal: EC007 unless a reason is given.';

create function cloud.replay_message(
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
  update cloud.outbox
     set status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
   where request_id = p_request_id;
  perform cloud._wake_listeners((select wake_channel from cloud.endpoint where name = v_msg.endpoint));
  return p_request_id;
end $$;
comment on function cloud.replay_message is 'Puts a failed, dead or skipped message back to pending with the same request_id and a fresh attempt budget; audited in cloud.replay_audit.';

create function cloud.replay_dead_messages(
  p_endpoint text,                      -- endpoint whose dead letters to replay
  p_reason   text,                      -- why (audited per message)
  p_actor    text default current_user  -- who
) returns integer
language plpgsql as $$
declare
  v_id uuid;
  v_n  integer := 0;
begin
  perform cloud._require_reason(p_reason);
  if not exists (select from cloud.endpoint where name = p_endpoint) then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_endpoint),
      hint = 'See the endpoint names in cloud.endpoint_status.';
  end if;
  for v_id in
    select request_id from cloud.outbox where endpoint = p_endpoint and status = 'dead' order by id
  loop
    perform cloud.replay_message(v_id, p_reason, p_actor);
    v_n := v_n + 1;
  end loop;
  return v_n;
end $$;
comment on function cloud.replay_dead_messages is 'Replays every dead message of one endpoint (same request_ids, each audited); returns how many.';

create function cloud.skip_message(
  p_request_id uuid,                      -- the failed or dead message to give up on
  p_reason     text,                      -- why (audited)
  p_actor      text default current_user
) returns uuid
language plpgsql as $$
declare
  v_msg cloud.outbox;
begin
  perform cloud._require_reason(p_reason);
  select * into v_msg from cloud.outbox where request_id = p_request_id for update;
  if not found then
    raise exception using errcode = 'EC005', message = format('no message with request_id %s', p_request_id),
      hint = 'Check the id in cloud.outbox.';
  end if;
  if v_msg.status not in ('failed', 'dead') then
    raise exception using errcode = 'EC009', message = format('message %s is %s and cannot be skipped', p_request_id, v_msg.status),
      hint = 'Only failed or dead messages are skipped (to unpark their ordering key).';
  end if;
  insert into cloud.replay_audit (request_id, action, actor, reason, previous_status, previous_attempts, previous_error)
  values (p_request_id, 'skip', p_actor, p_reason, v_msg.status, v_msg.attempts, v_msg.last_error);
  update cloud.outbox set status = 'skipped', updated_at = now() where request_id = p_request_id;
  perform cloud._wake_listeners((select wake_channel from cloud.endpoint where name = v_msg.endpoint));
  return p_request_id;
end $$;
comment on function cloud.skip_message is 'Gives up on a failed or dead message (audited), which lets the next message of its ordering key go.';

create view cloud.parked_keys as
select o.ordering_key, o.endpoint, o.request_id as head_request_id, o.operation, o.status, o.last_error, o.last_error_at,
       (select count(*) from cloud.outbox w
         where w.ordering_key = o.ordering_key and w.id > o.id and w.status in ('pending', 'in_flight', 'failed', 'dead')) as waiting
  from cloud.outbox o
 where o.ordering_key is not null and o.status in ('failed', 'dead')
   and not exists (select from cloud.outbox h
                    where h.ordering_key = o.ordering_key and h.id < o.id
                      and h.status in ('pending', 'in_flight', 'failed', 'dead'));
comment on view cloud.parked_keys is 'Ordering keys held up by a failed or dead message: replay it (cloud.replay_message) or skip it (cloud.skip_message).';

create view cloud.endpoint_status as
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
       err.last_error_at
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
comment on view cloud.endpoint_status is 'Per endpoint: messages by unfinished status, due now, parked ordering keys, the oldest pending age and the latest error of a message still in the queue.';

------------------------------------------------------------------------------
-- Privileges (STYLE.md 5: nothing for PUBLIC, each role what it needs)
------------------------------------------------------------------------------
revoke all on all tables in schema cloud from public;
revoke execute on all functions in schema cloud from public;

grant execute on function cloud.enqueue_message(text, text, jsonb, text, text, text, uuid, timestamptz) to erp_cloud_app;

grant select on cloud.endpoint, cloud.operation_handler to erp_cloud_listener;
grant select, update, delete on cloud.outbox to erp_cloud_listener;
grant select, insert, update, delete on cloud.listener to erp_cloud_listener;
grant insert on cloud.log to erp_cloud_listener;
grant select on cloud.endpoint_status, cloud.parked_keys to erp_cloud_listener;
grant execute on function
  cloud.claim_messages(text, integer, text[], interval, timestamptz),
  cloud.record_attempts(text, jsonb, timestamptz),
  cloud.complete_messages(text, cloud.attempt_result[], timestamptz),
  cloud.fail_messages(text, cloud.attempt_result[], timestamptz),
  cloud.release_messages(text, uuid[], timestamptz),
  cloud.next_due_at(text[], timestamptz),
  cloud.record_listener_start(text, text[], text[], text, integer),
  cloud.record_listener_heartbeat(text, text[]),
  cloud.record_listener_stop(text),
  cloud.reap_expired_leases(timestamptz),
  cloud.wake_due_messages(timestamptz),
  cloud.ensure_log_partitions(integer, timestamptz),
  cloud.age_out_log(interval, timestamptz),
  cloud.purge_finished_messages(interval, integer, timestamptz),
  cloud.purge_cron_history(interval),
  cloud.run_maintenance(timestamptz),
  cloud.cron_jobs_scheduled(),
  cloud.compute_backoff_delay(integer, integer, integer, integer, double precision),
  cloud._run_handler(regprocedure, cloud.outbox, jsonb),
  cloud._handler_for(text),
  cloud._wake_listeners(text)
  to erp_cloud_listener;

grant select on cloud.endpoint, cloud.outbox, cloud.log, cloud.replay_audit, cloud.listener, cloud.operation_handler,
                cloud.endpoint_status, cloud.parked_keys to erp_cloud_operator;
grant insert, update on cloud.endpoint, cloud.operation_handler to erp_cloud_operator;
grant update on cloud.outbox to erp_cloud_operator;
grant insert on cloud.replay_audit to erp_cloud_operator;
grant execute on function
  cloud.put_endpoint(text, text, text, text, integer, integer, integer, integer, jsonb, boolean),
  cloud.put_operation_handler(text, regprocedure, regprocedure),
  cloud.replay_message(uuid, text, text),
  cloud.replay_dead_messages(text, text, text),
  cloud.skip_message(uuid, text, text),
  cloud._require_reason(text),
  cloud._wake_listeners(text),
  cloud.compute_backoff_delay(integer, integer, integer, integer, double precision),
  cloud.run_maintenance(timestamptz),
  cloud.cron_jobs_scheduled()
  to erp_cloud_operator;
grant select on cloud.listener to erp_cloud_operator;

------------------------------------------------------------------------------
-- Partitions now; pg_cron jobs where pg_cron can live
------------------------------------------------------------------------------
select cloud.ensure_log_partitions();

do $$
begin
  if current_setting('cron.database_name', true) is distinct from current_database()
     or not exists (select from pg_available_extensions where name = 'pg_cron') then
    raise notice 'pg_cron is not available in database % (cron.database_name = %): the listener will run cloud.run_maintenance() on its own timer',
      current_database(), coalesce(current_setting('cron.database_name', true), 'unset');
    return;
  end if;
  create extension if not exists pg_cron;
  perform cloud.schedule_maintenance_jobs();
end $$;
