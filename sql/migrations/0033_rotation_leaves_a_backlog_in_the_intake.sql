-- 0033 — rotation costs the ERP nothing while a backlog waits, and runs a tenth as often when
-- nobody holds a snapshot (issue 15 §1–§3).
--
-- Measured (one backend, a backlog of 25,600 messages in cloud.outbox_intake delivered 64 a claim,
-- the listener's tick calling cloud.rotate_outbox(1000, 100) after each report, 2 rounds):
--
-- 1. Every rotation copied the whole intake into the hot table, then everything unfinished out and
--    back in, under an exclusive lock on both tables: with 25,000 messages waiting, each rotation
--    (one per 1,000 sent) copied 50,000 rows while the ERP's enqueues waited on the intake's lock,
--    and rotation cost 121 µs of time per message delivered (60 µs with a backlog of 12,800). Now
--    the intake is emptied with the hot table when at most 1,000 messages wait in it, or when its dead
--    tuples (one per message a claim took, as counted by the statistics) outnumber those waiting: a
--    copy then costs no more than the dead tuples it removes, and they stay bounded by the backlog
--    even while a snapshot holds the horizon (measured: with a growing backlog under a held snapshot,
--    leaving a large intake alone let it reach 19,000 dead tuples in 30 s). Otherwise the hot table
--    rotates alone and the intake is not locked at all, so the ERP's enqueues (which write only the
--    intake) do not wait for that rotation. The 50,000-row backlog guard counts
--    the hot table only, since that is what a rotation copies now.
-- 2. A rotation costs its backend a fixed 15 ms of CPU (the TRUNCATE of two tables and their
--    indexes, and every session's plans on them made again afterwards: the claim and the report
--    cost 27 µs a message each with rotations every 10,000 messages, 31 µs every 1,000) plus about
--    4.5 µs per message archived. With nothing holding the xmin horizon, vacuum and the scans'
--    own pruning keep the dead tuples down without it, so the default batch is now 10,000 sent
--    messages (rotation 38 µs a message in the same run, from 121); while a snapshot has been held
--    for over a second the listener's tick still rotates at 100 (0031).
--
-- Unchanged: what is archived, what goes back and how (same ids, same leases), the results (null,
-- 0, how many archived), the advisory lock, the 50 ms lock_timeout and giving way to long holders.
-- cloud.rotate_outbox(n) means what it meant; only the default n is now 10,000.

create or replace function cloud.rotate_outbox(
  p_min_sent integer default 10000,      -- rotate when cloud.outbox itself holds at least this many sent messages
  p_min_sent_held integer default null)  -- or this many, while a snapshot of this database is over a second old (null: p_min_sent)
returns integer
language plpgsql security definer
set search_path = ''
set lock_timeout = '50ms'
as $$
declare
  v_kept   cloud.outbox[];
  v_copied uuid[];
  v_late   integer;
  v_sent   integer;
  v_intake  boolean;
  v_waiting integer;
begin
  if not pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtextextended('cloud.rotate_outbox', 0)) then
    return null;  -- another listener (or pg_cron) is rotating right now
  end if;
  -- the common answer first, and cheaply (0031): busy listeners ask several times a second
  select count(*) into v_sent from (select from only cloud.outbox o where o.status = 'sent' limit greatest(p_min_sent, 1)) s;
  if v_sent < greatest(p_min_sent, 1) then
    -- fewer will do while the xmin horizon is held: every claim walks one dead index entry per message
    -- claimed since the last rotation (outbox_active), and no scan may remove them meanwhile
    if v_sent < greatest(coalesce(p_min_sent_held, p_min_sent), 1)
       or not exists (select from pg_catalog.pg_stat_activity a
                       where a.datname = pg_catalog.current_database() and a.backend_type = 'client backend' and a.backend_xmin is not null
                         and a.xact_start < pg_catalog.clock_timestamp() - interval '1 second'
                         and a.pid <> pg_catalog.pg_backend_pid()) then
      return 0;
    end if;
  end if;
  -- whoever holds the hot table or the intake (an ERP transaction that has not committed yet, a claim, a
  -- pg_dump, a report in REPEATABLE READ that read the outbox) makes this rotation give up within
  -- lock_timeout, whatever it did so far undone, rather than queue the ERP's inserts behind it: the next
  -- round tries again
  begin
    if exists (select from pg_catalog.pg_locks l join pg_catalog.pg_stat_activity a on a.pid = l.pid
                where l.locktype = 'relation' and l.granted
                  -- this database's tables only: another database of the cluster made from the same template has the same oids
                  and l.database = (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database())
                  and l.relation in ('cloud.outbox'::pg_catalog.regclass, 'cloud.outbox_intake'::pg_catalog.regclass)
                  and l.pid <> pg_catalog.pg_backend_pid() and a.xact_start < pg_catalog.clock_timestamp() - interval '1 second') then
      return null;  -- a long holder (a pg_dump, a report): no copies that would only be undone, round after round
    end if;
    -- the hot table's own (0033): a backlog waiting in the intake stays there, see below
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
    -- the intake goes too when little waits in it, or when more messages were taken from it than wait in it
    -- (its dead tuples, one per message a claim took, outnumber the live ones: a copy then costs no more than
    -- the dead tuples it removes, so they stay bounded by the backlog even while the horizon is held). A
    -- backlog the claims have not yet worked through stays there (0033): copying it twice under an exclusive
    -- lock at every rotation held the ERP's inserts for as long, and cost every rotation its size
    v_waiting := (select count(*) from (select from only cloud.outbox_intake i limit 50001) s);
    v_intake := v_waiting <= 1000
                or (v_waiting <= 50000 and pg_catalog.pg_stat_get_dead_tuples('cloud.outbox_intake'::pg_catalog.regclass) >= v_waiting);
    -- then a moment alone with the tables it empties (the intake first, in the order a claim takes them);
    -- without the intake the ERP's enqueues, which write only the intake, do not wait at all
    if v_intake then
      lock table only cloud.outbox_intake, only cloud.outbox in access exclusive mode;
    else
      lock table only cloud.outbox in access exclusive mode;
    end if;
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
    if v_intake then
      -- what waits in the intake joins the hot table (every row in it is committed: the lock waited for its writers)
      insert into cloud.outbox overriding system value select * from only cloud.outbox_intake;
    end if;
    -- what is not finished (pending, in flight, failed, dead, skipped) goes back as it was: same ids, same leases
    select array_agg(o order by o.id) into v_kept from only cloud.outbox o where o.status <> 'sent';
    if v_intake then
      truncate only cloud.outbox, only cloud.outbox_intake;
    else
      truncate only cloud.outbox;
    end if;
    insert into cloud.outbox overriding system value select * from unnest(v_kept);
  exception when lock_not_available then
    return null;
  end;
  return coalesce(cardinality(v_copied), 0) + v_late;
end $$;
comment on function cloud.rotate_outbox(integer, integer) is 'Moves the sent messages of cloud.outbox into cloud.outbox_archive and empties the hot table by TRUNCATE (what is not sent goes back unchanged), and cloud.outbox_intake with it when at most 1,000 messages wait there or its dead tuples outnumber them (they join the hot table), so dead tuples and dead index entries stay bounded by what flows between two rotations (or by the backlog) even while something holds the xmin horizon; otherwise the backlog stays in the intake, which is then not locked. Runs when the hot table holds at least p_min_sent sent messages (default 10,000), or p_min_sent_held while a transaction of this database has held a snapshot for over a second; otherwise returns 0 at once, reading no lock table (listeners ask every ERP_CLOUD_ROTATE_MS). Gives up (null) when another rotation runs, a transaction holding either table has been open over a second, more than 50,000 unfinished messages are in the hot table, or it cannot have its tables within 50 ms. Returns how many were archived.';
