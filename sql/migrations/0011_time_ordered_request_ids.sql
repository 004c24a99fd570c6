-- 0011 — time-ordered request ids (UUID version 7, RFC 9562).
--
-- Why: request_id is the outbox's primary key and cloud.log's lookup key. A
-- random (version 4) id lands on a random page of those B-trees, so every
-- ERP insert dirties a page nobody touched recently — after a checkpoint, a
-- full-page image in the WAL — and the trees stay spread over all their pages
-- once they hold millions of entries. A version 7 id starts with the
-- millisecond it was made, so new ids go to the right edge of the index,
-- where the pages are already in memory and already logged. The other 74
-- bits stay random: ids are still unguessable and unique, and still work as
-- the Idempotency-Key, Nuonuo orderNo and YonBIP resubmitCheckKey.
-- PostgreSQL 18 has uuidv7(); this is the same layout for PostgreSQL 15.

create function cloud.new_request_id() returns uuid
language sql volatile parallel safe as $$
  -- 48-bit Unix time in milliseconds, then version 7 (0111) over the version 4
  -- nibble (0100: bits 52 and 53 set), variant and random bits as generated
  select pg_catalog.encode(pg_catalog.set_bit(pg_catalog.set_bit(
           overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
             placing substring(pg_catalog.int8send(floor(extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint) from 3)
             from 1 for 6),
           52, 1), 53, 1), 'hex')::uuid
$$;
comment on function cloud.new_request_id is 'A new Request_ID: a UUID version 7 (RFC 9562), the creation millisecond followed by 74 random bits, so new outbox rows go to the right edge of its indexes.';
revoke execute on function cloud.new_request_id() from public;
grant execute on function cloud.new_request_id() to erp_cloud_app;

alter table cloud.outbox alter column request_id set default cloud.new_request_id();

create or replace function cloud.enqueue_message(
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
  v_request_id uuid := coalesce(p_request_id, cloud.new_request_id());
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
