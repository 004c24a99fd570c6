-- 0035 — a listener's idle flag is a bit of a sequence, not a row version (issue 15 §2).
--
-- Measured (quick held_snapshot figure, 1,000 messages a second, a REPEATABLE READ snapshot held 30 s):
-- a listener flips between idle and busy about 100 times a second at that rate, and every flip was an
-- UPDATE of its cloud.listener row. While the snapshot held the xmin horizon none of those versions
-- could go: cloud.listener ended the hold with 3,691 dead tuples in 434 kB, every claim's update walked
-- 23 index entries of listener_pkey to find its row (1 when quiet), and every ERP enqueue's wake
-- look-up scanned the whole table (an hour's hold would leave about 360,000 versions behind, 40 MB,
-- read by every enqueue). The ERP's insert latency read 7.99 ms held against 4.18 ms quiet.
--
-- 1. cloud.listener_idle_slots is a sequence used as a 63-bit mask: bit n set = the listener in slot n
--    waits on LISTEN. A sequence is updated in place (setval: no row version, nothing for vacuum, no
--    index entry), so the flips leave nothing behind however long a snapshot is held.
-- 2. cloud.record_listener_start gives each listener the lowest free slot (0–62; beyond 63 live
--    listeners they share slots, and an idle one may then wait for its poll instead of a NOTIFY) and
--    clears its bit; deleting a listener's row (its clean stop, the reaper) clears its bit unless another
--    listener shares the slot (trigger listener_100_free_slot).
-- 3. cloud._mark_listener_idle, the claim's last step (was: an UPDATE of the row, 0034), reads the
--    slot and the mask and writes only when the bit changes, under an advisory lock held to the claim's
--    commit (two listeners' read-modify-writes of the mask never lose one another's bit).
-- 4. cloud.enqueue_message and cloud._wake_listeners read the mask first (pg_sequence_last_value: 0.2 µs,
--    against 2.6 µs for the EXISTS over an empty cloud.listener it replaces, and more for every version
--    a held snapshot keeps) and look at the listener table only when some bit is set: under load (every
--    listener busy) an enqueue reads one sequence tuple.
-- 5. The column cloud.listener.idle goes; cloud.listener_status shows every listener with its idle
--    flag as the mask has it.
-- 6. What still writes a listener's row is its heartbeat (every ERP_CLOUD_MAINTENANCE_MS, 5 s): now at most
--    every 30 s, or when its channels change (the reaper forgets a listener after 2 minutes of silence,
--    doctor calls it live within 1 minute). Under an hour's held snapshot that is 120 versions per
--    listener for the claim's look-up of its slot to walk, not 720 (nor the flips' 360,000).
--
-- Unchanged: when an enqueue NOTIFYs (some listener on the endpoint's channel waits on LISTEN), and
-- that an empty claim marks its listener idle and one with work marks it busy.

create sequence cloud.listener_idle_slots as bigint minvalue 0 maxvalue 9223372036854775807 start 0 no cycle;
select setval('cloud.listener_idle_slots', 0, true);  -- is_called: pg_sequence_last_value reads 0, not null
comment on sequence cloud.listener_idle_slots is 'Not a counter: a 63-bit mask written with setval (in place: no row versions, however long a snapshot is held). Bit n set = the listener in slot n (cloud.listener.slot) waits on LISTEN, so enqueuers on its channels NOTIFY. Written by cloud._set_idle_slot only.';
revoke all on sequence cloud.listener_idle_slots from public;
grant select on sequence cloud.listener_idle_slots to erp_cloud_listener, erp_cloud_operator, erp_cloud_console_finance, erp_cloud_console_operator;

alter table cloud.listener drop column idle;
alter table cloud.listener add column slot integer not null default 0 constraint listener_slot_in_mask check (slot between 0 and 62);
-- listeners running through the upgrade keep running: each gets a slot of its own (they start busy; their next
-- empty claim sets their bit)
update cloud.listener l set slot = n.slot
  from (select worker_id, ((row_number() over (order by started_at, worker_id) - 1) % 63)::integer as slot from cloud.listener) n
 where n.worker_id = l.worker_id;
comment on column cloud.listener.slot is 'The bit of cloud.listener_idle_slots that says whether this listener waits on LISTEN (0–62; shared only beyond 63 live listeners).';
comment on table cloud.listener is 'Live listener processes and the channels they LISTEN on. Whether one is idle (waits on LISTEN: only then do ERP transactions pay for a NOTIFY) is the bit of cloud.listener_idle_slots its slot names: cloud.listener_status shows both.';

create function cloud._set_idle_slot(p_slot integer, p_idle boolean)
returns void
language plpgsql security definer
set search_path = ''
as $$
declare
  v_bit  bigint := 1::bigint << p_slot;
  v_mask bigint := coalesce(pg_sequence_last_value('cloud.listener_idle_slots'), 0);
begin
  if ((v_mask & v_bit) <> 0) = p_idle then
    return;  -- already so: no lock, no write
  end if;
  -- read, change, write: serialised (to this transaction's end) so that two listeners flipping at once
  -- never write back a mask without the other's bit
  perform pg_advisory_xact_lock(hashtextextended('cloud.listener_idle_slots', 0));
  v_mask := coalesce(pg_sequence_last_value('cloud.listener_idle_slots'), 0);
  perform setval('cloud.listener_idle_slots', case when p_idle then v_mask | v_bit else v_mask & ~v_bit end, true);
end $$;
comment on function cloud._set_idle_slot(integer, boolean) is 'Internal: sets (p_idle) or clears bit p_slot of the mask cloud.listener_idle_slots, writing only when it changes, under an advisory lock held to the end of the transaction.';
revoke all on function cloud._set_idle_slot(integer, boolean) from public;
grant execute on function cloud._set_idle_slot(integer, boolean) to erp_cloud_listener, erp_cloud_operator;

create or replace function cloud._mark_listener_idle(p_worker text, p_idle boolean)
returns void
language plpgsql
as $$
declare
  v_slot integer;
begin
  -- PL/pgSQL, not SQL: its plans live as long as the session, not one claim's transaction
  select l.slot into v_slot from cloud.listener l where l.worker_id = p_worker;
  if found and ((coalesce(pg_sequence_last_value('cloud.listener_idle_slots'), 0) >> v_slot) & 1 = 1) <> p_idle then
    perform cloud._set_idle_slot(v_slot, p_idle);
  end if;
end $$;
comment on function cloud._mark_listener_idle(text, boolean) is 'Internal (cloud.claim_messages): records whether listener p_worker now waits on LISTEN (an empty claim) or is busy (a claim with work), in its bit of cloud.listener_idle_slots. Nothing for an unregistered worker.';
create or replace function cloud.record_listener_start(p_worker text, p_channels text[], p_endpoints text[] default null,
                                                       p_host text default null, p_pid integer default null)
returns void
language plpgsql
as $$
declare
  v_slot integer;
begin
  -- one registration at a time picks a slot: the lowest no other listener has (shared beyond 63)
  perform pg_advisory_xact_lock(hashtextextended('cloud.listener_idle_slots', 0));
  v_slot := coalesce(
    (select min(s) from generate_series(0, 62) s
      where not exists (select from cloud.listener l where l.slot = s and l.worker_id <> p_worker)),
    (select count(*)::integer % 63 from cloud.listener l where l.worker_id <> p_worker));
  insert into cloud.listener (worker_id, channels, endpoints, slot, host, pid)
  values (p_worker, p_channels, p_endpoints, v_slot, p_host, p_pid)
  on conflict (worker_id) do update set channels = excluded.channels, endpoints = excluded.endpoints,
    slot = excluded.slot, host = excluded.host, pid = excluded.pid, started_at = now(), heartbeat_at = now();
  -- a listener starts busy: its first claim says whether it waits
  perform cloud._set_idle_slot(v_slot, false);
end $$;
comment on function cloud.record_listener_start(text, text[], text[], text, integer) is 'Registers a listener process and the channels it listens on, gives it a slot of cloud.listener_idle_slots (the lowest free one) and marks it busy until its first claim.';

create function cloud.tg_listener__100_free_slot()
returns trigger
language plpgsql
as $$
begin
  if not exists (select from cloud.listener l where l.slot = old.slot) then
    perform cloud._set_idle_slot(old.slot, false);
  end if;
  return null;
end $$;
comment on function cloud.tg_listener__100_free_slot() is 'Trigger listener_100_free_slot: a listener''s row is gone (its clean stop, the reaper): its bit of cloud.listener_idle_slots is cleared, unless another listener shares the slot.';
create trigger listener_100_free_slot after delete on cloud.listener
  for each row execute function cloud.tg_listener__100_free_slot();

create or replace function cloud._wake_listeners(p_channel text)
returns void
language plpgsql
as $$
begin
  -- NOTIFY serialises commits cluster-wide, so only pay for it when a listener
  -- has declared itself idle; busy listeners find the row on their next claim,
  -- and every listener polls as the safety net
  if exists (select from cloud.listener l, coalesce(pg_sequence_last_value('cloud.listener_idle_slots'), 0) m(idle)
              where m.idle <> 0 and p_channel = any (l.channels) and (m.idle >> l.slot) & 1 = 1) then
    perform pg_catalog.pg_notify(p_channel, '');
  end if;
end $$;

create view cloud.listener_status as
  select l.worker_id, l.host, l.pid, l.channels, l.endpoints, l.slot,
         (m.idle >> l.slot) & 1 = 1 as idle,
         l.started_at, l.heartbeat_at
    from cloud.listener l, coalesce(pg_sequence_last_value('cloud.listener_idle_slots'), 0) m(idle);
comment on view cloud.listener_status is 'Every registered listener with its idle flag (waits on LISTEN, so enqueuers on its channels NOTIFY) as cloud.listener_idle_slots has it.';
revoke all on cloud.listener_status from public;
grant select on cloud.listener_status to erp_cloud_listener, erp_cloud_operator, erp_cloud_console_finance, erp_cloud_console_operator;

create or replace function cloud.enqueue_message(p_endpoint text, p_operation text, p_payload jsonb, p_aggregate_type text DEFAULT NULL::text, p_aggregate_id text DEFAULT NULL::text, p_ordering_key text DEFAULT NULL::text, p_request_id uuid DEFAULT NULL::uuid, p_not_before timestamp with time zone DEFAULT NULL::timestamp with time zone) RETURNS uuid
language plpgsql security definer
as $_$
-- SECURITY DEFINER without SET search_path (0029, ADR 0003): every table, function and type below is
-- schema-qualified and every operator is OPERATOR(pg_catalog.…), so the caller's search_path decides
-- nothing here; keep it so (test/enqueue-cost.test.ts runs it under a hostile search_path)
declare
  v_channel    pg_catalog.text;
  v_request_id pg_catalog.uuid;
  -- the idle listeners' bits (0035): pg_sequence_last_value reads the sequence's tuple for 0.2 µs
  v_idle       pg_catalog.int8 := coalesce(pg_catalog.pg_sequence_last_value('cloud.listener_idle_slots'::pg_catalog.regclass), 0);
begin
  -- one statement: the endpoint, and the operation and payload checks
  select e.wake_channel
    into v_channel
    from cloud.endpoint e
   where e.name operator(pg_catalog.=) p_endpoint
     and p_operation operator(pg_catalog.~) '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$'::pg_catalog.text
     and pg_catalog.jsonb_typeof(p_payload) operator(pg_catalog.=) any ('{object,array}'::pg_catalog.text[]);
  if not found then
    perform cloud._refuse_enqueue(p_endpoint, p_operation, p_payload);  -- raises EC001, EC002 or EC003
  end if;
  if p_ordering_key is not null then
    -- ids must follow commit order within a key: serialise enqueuers of one key until commit
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('cloud.ordering_key:'::pg_catalog.text operator(pg_catalog.||) p_ordering_key, 0::pg_catalog.int8));
  end if;
  if p_request_id is null then
    insert into cloud.outbox_intake (request_id, endpoint, operation, payload, aggregate_type, aggregate_id, ordering_key, next_attempt_at)
    values (cloud.new_request_id(), p_endpoint, p_operation, p_payload, p_aggregate_type, p_aggregate_id, p_ordering_key,
            coalesce(p_not_before, pg_catalog.now()))
    returning request_id into v_request_id;
  else
    insert into cloud.outbox (request_id, endpoint, operation, payload, aggregate_type, aggregate_id, ordering_key, next_attempt_at)
    values (p_request_id, p_endpoint, p_operation, p_payload, p_aggregate_type, p_aggregate_id, p_ordering_key,
            coalesce(p_not_before, pg_catalog.now()))
    on conflict (request_id) do nothing;
    -- the message may wait in the intake, or (sent) in the archive; looked up after the insert, which holds
    -- off a rotation, and which a move of the same id would wait for
    if not found
       or exists (select from cloud.outbox_intake i where i.request_id operator(pg_catalog.=) p_request_id)
       or exists (select from cloud.outbox_archive a where a.request_id operator(pg_catalog.=) p_request_id) then
      raise exception using errcode = 'EC004', message = pg_catalog.format('a message with request_id %s already exists', p_request_id),
        hint = 'Each Request_ID is sent once; let enqueue_message generate one, or look the existing message up in cloud.outbox.';
    end if;
    v_request_id := p_request_id;
  end if;
  -- "does a listener wait on its channel?": the listener table is read only when some listener's idle bit
  -- is set (0035), so a busy queue's enqueue reads one sequence tuple, and the flag's flips leave no row
  -- versions for this look-up to walk. Two steps on purpose: in one statement (or one IF) with the
  -- look-up, a zero v_idle makes each custom plan cheaper than the generic one, and the statement is
  -- planned again at every call (measured: 25 µs more per enqueue)
  if v_idle operator(pg_catalog.<>) 0::pg_catalog.int8 then
    if exists (select from cloud.listener l
                where v_channel operator(pg_catalog.=) any (l.channels)
                  and (v_idle operator(pg_catalog.>>) l.slot) operator(pg_catalog.&) 1::pg_catalog.int8 operator(pg_catalog.=) 1::pg_catalog.int8) then
      perform pg_catalog.pg_notify(v_channel, ''::pg_catalog.text);
    end if;
  end if;
  return v_request_id;
end $_$;

create or replace function cloud.record_listener_heartbeat(p_worker text, p_channels text[] default null)
returns boolean
language sql
as $$
  -- the row is written when it is 30 s old or the channels change: each write is a version a held snapshot keeps
  with beat as (
    update cloud.listener set heartbeat_at = now(), channels = coalesce(p_channels, channels)
     where worker_id = p_worker
       and (heartbeat_at < now() - interval '30 seconds' or channels is distinct from coalesce(p_channels, channels))
    returning 1
  ) select exists (select from beat) or exists (select from cloud.listener where worker_id = p_worker);
$$;
comment on function cloud.record_listener_heartbeat(text, text[]) is 'Marks a listener alive (called every few seconds; its row is written at most every 30 s, or when its channels change). False when it is not registered (the reaper forgot it after 2 minutes of silence): it then registers again with cloud.record_listener_start.';
