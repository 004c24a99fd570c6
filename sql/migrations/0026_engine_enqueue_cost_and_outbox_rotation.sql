-- 0026 — the engine at its limits (issue 15 §1 and §2; ADR docs/adr/0002):
-- what the ERP pays per enqueue, and no bloat while something holds the
-- xmin horizon.
--
-- §1. cloud.enqueue_message does in the ERP's transaction only what must
-- happen there. Measured per call (20,000 enqueues in one rolled-back
-- transaction, the minimum of five interleaved runs) and with
-- /work/shared/tools/insert-limit.sh: the message row is the cost that has to
-- stay (it is what makes the enqueue durable and rolled back with the ERP);
-- around it the enqueue paid for two look-ups, a UUID v7 built with numeric
-- arithmetic, and two CHECK constraints prepared again for every insert.
--
-- 1. One look-up instead of two: the endpoint row and "is a listener of its
--    wake channel idle?" are read by one statement.
-- 2. cloud.new_request_id builds the millisecond from date_part (float8)
--    instead of extract (numeric in PostgreSQL 14+): the same UUID version 7,
--    a third cheaper.
-- 3. The outbox's two CHECK constraints (status known; a lease only while in
--    flight) cost the ERP's insert more than any index: PostgreSQL prepares
--    every CHECK expression once per INSERT statement, and the enqueue is
--    one statement per message (about 5 µs of the 37 µs an enqueue cost).
--    Only cloud.enqueue_message inserts into the outbox (the ERP role has no
--    privilege on it), and it always writes a pending row without a lease,
--    so the invariants are checked where they can break: on UPDATE, by
--    trigger outbox_100_validate, whose WHEN clause is prepared once per
--    UPDATE statement (the listener updates a batch per statement) and whose
--    function only runs to raise 23514, naming the constraint as before.
--    (Rewriting the partial indexes' ARRAY[...] predicates as one array
--    constant would save another 0.5 µs: not worth rebuilding the indexes of
--    a full outbox under the migration's lock.)
--
-- Unchanged: the signature, SECURITY DEFINER with search_path '' (the ERP
-- role still has no privilege on the outbox), EC001 unknown endpoint, EC002
-- operation name, EC003 payload shape, EC004 duplicate request_id, all raised
-- at enqueue; the per-key advisory lock; the NOTIFY only while a listener is
-- idle; rolled back with the ERP, never lost once committed.
--
-- §2. Sent messages leave the hot table by rotation, not by UPDATE and DELETE:
--
-- 4. cloud.outbox_archive, a child table of cloud.outbox (INHERITS: every
--    reader of cloud.outbox, the views, the write-back handlers' row type,
--    replay, skip, purge and doctor still see every message in one place),
--    holds sent messages only (a CHECK the planner uses to leave it out of
--    every query about unfinished ones). cloud.rotate_outbox copies the sent
--    rows of cloud.outbox there, empties cloud.outbox by TRUNCATE and puts
--    back what is not sent (pending, in flight with its lease, failed, dead,
--    skipped: same ids, same values). TRUNCATE removes the dead row versions
--    and dead index entries that two UPDATEs per message leave behind even
--    while a pg_dump, a long report or an idle-in-transaction client holds the
--    xmin horizon and vacuum can reclaim none of them; the archive only takes
--    inserts. It needs the table alone for a moment: it waits at most 50 ms
--    (lock_timeout) and otherwise gives up until the next round, so a pg_dump
--    holding ACCESS SHARE on the outbox delays rotation (the table then bloats
--    as before, until the dump ends) but never queues the ERP behind it.
--    TRUNCATE is not MVCC-safe: a REPEATABLE READ transaction whose snapshot
--    predates a rotation and that first reads cloud.outbox after it sees the
--    moved rows as not there (one that read it before holds the lock, and the
--    rotation waits for it).
-- 5. cloud.reap_expired_leases rotates when at least 1,000 sent messages wait
--    in cloud.outbox: every listener reaps every 5 s (ERP_CLOUD_MAINTENANCE_MS)
--    and pg_cron every minute, so rotation needs no job of its own and no
--    change to the listener.
-- 6. An explicit request_id is refused (EC004) also when it names an archived
--    message.

create or replace function cloud.new_request_id() returns uuid
  language sql parallel safe
  as $$
  -- 48-bit Unix time in milliseconds, then version 7 (0111) over the version 4
  -- nibble (0100: bits 52 and 53 set), variant and random bits as generated;
  -- date_part is float8 (extract would be numeric, three times the cost)
  select pg_catalog.encode(pg_catalog.set_bit(pg_catalog.set_bit(
           overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
             placing substring(pg_catalog.int8send(pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::bigint) from 3)
             from 1 for 6),
           52, 1), 53, 1), 'hex')::uuid
$$;

create or replace function cloud.enqueue_message(
  p_endpoint text,                         -- cloud.endpoint.name
  p_operation text,                        -- dotted lower-case operation, e.g. tax.issue
  p_payload jsonb,                         -- a JSON object or array
  p_aggregate_type text default null,      -- the document's kind, for look-ups
  p_aggregate_id text default null,        -- the document's id, for look-ups
  p_ordering_key text default null,        -- messages sharing it go one at a time, in order
  p_request_id uuid default null,          -- the caller's own Request_ID (else a UUID v7 is made)
  p_not_before timestamptz default null)   -- not sent before this time
returns uuid
language plpgsql security definer
set search_path = ''
as $_$
declare
  v_channel    text;
  v_wake       boolean;
  v_request_id uuid := coalesce(p_request_id, cloud.new_request_id());
begin
  -- one statement for the endpoint and for "does a listener wait on its channel?"
  select e.wake_channel, exists (select from cloud.listener l where l.idle and e.wake_channel = any (l.channels))
    into v_channel, v_wake
    from cloud.endpoint e where e.name = p_endpoint;
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
    -- a sent message may live in cloud.outbox_archive; looked up after the insert, which holds off a rotation
    if not found or exists (select from cloud.outbox_archive a where a.request_id = p_request_id) then
      raise exception using errcode = 'EC004', message = format('a message with request_id %s already exists', p_request_id),
        hint = 'Each Request_ID is sent once; let enqueue_message generate one, or look the existing message up in cloud.outbox.';
    end if;
  end if;
  if v_wake then
    perform pg_catalog.pg_notify(v_channel, '');
  end if;
  return v_request_id;
end $_$;

-- 3. the invariants, checked on UPDATE (the only INSERT is enqueue_message's pending row without a lease)
create function cloud.tg_outbox__100_validate() returns trigger
  language plpgsql
  set search_path = ''
  as $$
begin
  -- only reached when the trigger's WHEN clause found the new row breaking an invariant
  if new.status is null or new.status <> all ('{pending,in_flight,sent,failed,dead,skipped}'::text[]) then
    raise exception using errcode = '23514', message = format('new row for relation "outbox" violates check constraint "outbox_status_known": status %L', new.status),
      detail = format('request_id %s', new.request_id),
      hint = 'A message is pending, in_flight, sent, failed, dead or skipped; change it through the cloud.* functions.';
  end if;
  raise exception using errcode = '23514', message = format('new row for relation "outbox" violates check constraint "outbox_lease_only_in_flight": status %s with locked_until %s', new.status, coalesce(new.locked_until::text, 'null')),
    detail = format('request_id %s', new.request_id),
    hint = 'Only an in_flight message has a lease (locked_until), and an in_flight one always has; change it through the cloud.* functions.';
end $$;
comment on function cloud.tg_outbox__100_validate() is 'Trigger outbox_100_validate: refuses (23514) an update that leaves a message with an unknown status, or a lease (locked_until) when it is not in flight or none when it is. Runs only when the trigger''s WHEN clause found such a row.';
revoke all on function cloud.tg_outbox__100_validate() from public;

alter table cloud.outbox drop constraint outbox_status_known, drop constraint outbox_lease_only_in_flight;
create trigger outbox_100_validate before update on cloud.outbox
  for each row
  when (not (new.status = any ('{pending,in_flight,sent,failed,dead,skipped}'::text[])
             and (new.status = 'in_flight') = (new.locked_until is not null)))
  execute function cloud.tg_outbox__100_validate();


-- 4. rotation: sent messages leave cloud.outbox by TRUNCATE, not by UPDATE and DELETE
create table cloud.outbox_archive () inherits (cloud.outbox);
alter table cloud.outbox_archive
  add constraint outbox_archive_pkey primary key (request_id),
  add constraint outbox_archive_sent_only check (status = 'sent' and locked_until is null);
comment on table cloud.outbox_archive is 'Sent messages that cloud.rotate_outbox moved out of cloud.outbox, whose child table this is: read them through cloud.outbox like any message. Insert-only until cloud.purge_finished_messages deletes them after the retention period.';
grant select on cloud.outbox_archive to erp_cloud_listener, erp_cloud_operator, erp_cloud_console_finance, erp_cloud_console_operator;

create function cloud.rotate_outbox(
  p_min_sent integer default 1000)  -- rotate only when cloud.outbox itself holds at least this many sent messages
returns integer
language plpgsql security definer
set search_path = ''
set lock_timeout = '50ms'
as $$
declare
  v_kept   cloud.outbox[];
  v_copied uuid[];
  v_late   integer;
begin
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtextextended('cloud.rotate_outbox', 0)) then
    return null;  -- another listener (or pg_cron) is rotating right now
  end if;
  -- whoever holds the hot table (an ERP transaction that has not committed yet, a claim, a pg_dump, a report
  -- in REPEATABLE READ that read the outbox) makes this rotation give up within lock_timeout, whatever it did
  -- so far undone, rather than queue the ERP's inserts behind it: the next round tries again
  begin
    if exists (select from pg_catalog.pg_locks l join pg_catalog.pg_stat_activity a on a.pid = l.pid
                where l.locktype = 'relation' and l.relation = 'cloud.outbox'::pg_catalog.regclass and l.granted
                  and l.pid <> pg_catalog.pg_backend_pid() and a.xact_start < pg_catalog.clock_timestamp() - interval '1 second') then
      return null;  -- a long holder (a pg_dump, a report): no copies that would only be undone, round after round
    end if;
    if (select count(*) from (select from only cloud.outbox o where o.status = 'sent' limit greatest(p_min_sent, 1)) s) < greatest(p_min_sent, 1) then
      return 0;
    end if;
    if (select count(*) from (select from only cloud.outbox o where o.status <> 'sent' limit 50001) s) > 50000 then
      return null;  -- a backlog this large would hold the table too long while it goes back: vacuum keeps it meanwhile
    end if;
    -- the bulk of the work before the table is ours alone: nobody sees these copies before this transaction
    -- commits, and by then cloud.outbox no longer holds them (the TRUNCATE below); sent is final (a replay
    -- refuses it, the archive's CHECK too), so a copy cannot go stale
    with copied as (
      insert into cloud.outbox_archive overriding system value
      select * from only cloud.outbox where status = 'sent'
      returning request_id
    ) select array_agg(request_id) into v_copied from copied;
    -- then a moment alone with the hot table
    lock table only cloud.outbox in access exclusive mode;
    -- sent since the copy
    insert into cloud.outbox_archive overriding system value
    select * from only cloud.outbox o where o.status = 'sent' and o.request_id not in (select unnest(v_copied));
    get diagnostics v_late = row_count;
    -- deleted since the copy (sent rows are purged from the archive days later, so only by hand): not resurrected
    if (select count(*) from only cloud.outbox o where o.status = 'sent') - v_late < coalesce(cardinality(v_copied), 0) then
      delete from cloud.outbox_archive a
       where a.request_id in (select unnest(v_copied))
         and not exists (select from only cloud.outbox o where o.request_id = a.request_id and o.status = 'sent');
    end if;
    -- what is not finished (pending, in flight, failed, dead, skipped) goes back as it was: same ids, same leases
    select array_agg(o order by o.id) into v_kept from only cloud.outbox o where o.status <> 'sent';
    truncate only cloud.outbox;
    insert into cloud.outbox overriding system value select * from unnest(v_kept);
  exception when lock_not_available then
    return null;
  end;
  return coalesce(cardinality(v_copied), 0) + v_late;
end $$;
comment on function cloud.rotate_outbox(integer) is 'Moves the sent messages of cloud.outbox into cloud.outbox_archive and empties the hot table by TRUNCATE (what is not sent goes back unchanged), so its dead tuples stay bounded by what flows between two rotations even while something holds the xmin horizon. Runs when the table holds at least p_min_sent sent messages; gives up (null) when it cannot have the table within 50 ms. Returns how many were archived.';
revoke all on function cloud.rotate_outbox(integer) from public;
grant execute on function cloud.rotate_outbox(integer) to erp_cloud_listener, erp_cloud_operator;

-- 5. every listener reaps every few seconds (ERP_CLOUD_MAINTENANCE_MS, 5 s) and pg_cron every minute:
-- the rotation rides along, so it needs no job of its own and no change to the listener
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
  perform cloud.rotate_outbox();
  return v_total;
end $$;
comment on function cloud.reap_expired_leases(timestamptz) is 'Returns messages whose lease expired (listener died or froze) to pending with backoff — counted in lost_leases, not toward max_attempts; dead at max_lost_leases — re-opens a circuit whose half-open probes were all lost; forgets listeners silent for 2 minutes (they register again on their next heartbeat); rotates the outbox (cloud.rotate_outbox) when enough sent messages wait in it.';
