-- 0031 — the claim's round trip stays flat while a snapshot is held (issue 15 §2; ADR docs/adr/0002,
-- addendum 0031): the hot table rotates often enough that the dead index entries every claim walks
-- stay few.
--
-- Measured (make bench, held_snapshot, 1,000 messages/s through one listener): each claim's
-- pending → in_flight update changes `status`, a key column of outbox_active, so every claimed
-- message leaves its pending version's index entry behind; while a REPEATABLE READ snapshot holds
-- the xmin horizon no scan may mark those dead, and every claim's probe walks all of them since
-- the last rotation. Rotation ran only from cloud.reap_expired_leases, once per listener maintenance
-- round (5 s), so up to ~5,000 entries piled up: 1,100–1,300 entries read per outbox_active scan
-- held against 2–3 quiet, the claim round trip 3.4× the quiet one. The listener now asks for a
-- rotation on a short tick of its own (ERP_CLOUD_ROTATE_MS, 1 s), apart from its maintenance round,
-- whenever it reported a sent message since the last tick; purge and partition work do not run
-- more often.
--
-- Measured in interleaved runs (held_snapshot, quick, a 2-core machine shared with other suites;
-- entries read per outbox_active scan while held, and the ERP's mean insert latency while held):
-- rotation every 5 s at 1,000 sent (before) 1,067–1,632 entries, 3.8–4.5 ms; every 1 s at 1,000
-- sent 609–820; every 1 s at 1,000, or 100 while held (this migration) 444–527 entries, 3.9–4.3 ms;
-- every 500 ms 226–234, 6.9–7.5 ms; every 250 ms 129–149, 6.6–8.7 ms. Each rotation holds the
-- intake and the hot table alone until it commits (the TRUNCATE of both tables and their five
-- indexes 5 ms, the commit 3 ms on this machine), and the ERP's inserts into the intake wait
-- meanwhile: more than one rotation a second made them slower, so the listener asks once a second
-- (the claim round trip held: 2.7–2.9 ms against 3.5–4.9 ms before). A rotation
-- costs its backend about 5 ms of CPU whatever it moves, plus about 10 µs per message (20 rounds
-- each of 100, 250 and 1,000 sent rows, /proc/<pid>/stat): rotating every 250 messages instead of
-- every 1,000 in normal operation would add about 15 µs of database CPU per message, for nothing:
-- with nobody holding the horizon the claim's scans mark the dead entries themselves (2–6 read per
-- scan). So the smaller batch is taken only while something holds the horizon:
--
-- 1. cloud.rotate_outbox(p_min_sent, p_min_sent_held): rotates at p_min_sent sent messages (1,000,
--    as before), or already at p_min_sent_held while a transaction of this database has held a
--    snapshot (backend_xmin) for over a second: a pg_dump, a report, an idle-in-transaction client.
--    The listener asks every ERP_CLOUD_ROTATE_MS (1 s) with (1000, 100), only after it reported
--    sent messages; cloud.reap_expired_leases (every maintenance round, and pg_cron) still calls it
--    with the defaults. Purge and partition work do not run more often.
-- 2. A call with nothing to do must then cost next to nothing. Measured with pgbench, one client,
--    900 sent rows in the hot table: 0.33–0.43 ms a call, most of it the "long holder" look-up
--    (pg_locks joined with pg_stat_activity), and pg_locks takes every lock-manager partition's lock
--    while it copies the lock table, which every other backend's lock acquisition then waits for.
--    The cheap checks now come first: the advisory lock (another rotation runs), "at least
--    p_min_sent sent?" (a count that stops there), the snapshot look-up (pg_stat_activity only, and
--    only when at least p_min_sent_held but fewer than p_min_sent wait), and the lock look-up last,
--    when a rotation is about to run.
--
-- Unchanged: the result (null: could not rotate — another rotation runs, a long holder of the
-- tables, a backlog over 50,000, or the tables not had within lock_timeout 50 ms; 0: too few sent;
-- else how many were archived), what is archived and what goes back, the 50 ms lock_timeout and
-- giving way to long holders, the order of the locks; cloud.rotate_outbox(n) means what it meant.
-- The one observable difference: a long holder with too few sent messages waiting gives 0 (nothing
-- to do) instead of null.

drop function cloud.rotate_outbox(integer);

create function cloud.rotate_outbox(
  p_min_sent integer default 1000,       -- rotate when cloud.outbox itself holds at least this many sent messages
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
    if (select count(*) from (select from cloud.outbox o where o.status <> 'sent' limit 50001) s) > 50000 then
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
    -- then a moment alone with the intake and the hot table (in the order a claim's move takes them)
    lock table only cloud.outbox_intake, only cloud.outbox in access exclusive mode;
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
    -- what waits in the intake joins the hot table (every row in it is committed: the lock waited for its writers)
    insert into cloud.outbox overriding system value select * from only cloud.outbox_intake;
    -- what is not finished (pending, in flight, failed, dead, skipped) goes back as it was: same ids, same leases
    select array_agg(o order by o.id) into v_kept from only cloud.outbox o where o.status <> 'sent';
    truncate only cloud.outbox, only cloud.outbox_intake;
    insert into cloud.outbox overriding system value select * from unnest(v_kept);
  exception when lock_not_available then
    return null;
  end;
  return coalesce(cardinality(v_copied), 0) + v_late;
end $$;
comment on function cloud.rotate_outbox(integer, integer) is 'Moves the sent messages of cloud.outbox into cloud.outbox_archive and empties the hot table and cloud.outbox_intake by TRUNCATE (what is not sent, and what waits in the intake, goes back into the hot table unchanged), so their dead tuples and dead index entries stay bounded by what flows between two rotations even while something holds the xmin horizon. Runs when the hot table holds at least p_min_sent sent messages, or p_min_sent_held while a transaction of this database has held a snapshot for over a second; otherwise returns 0 at once, reading no lock table (listeners ask every ERP_CLOUD_ROTATE_MS). Gives up (null) when another rotation runs, a transaction holding either table has been open over a second, or it cannot have both tables within 50 ms. Returns how many were archived.';
revoke all on function cloud.rotate_outbox(integer, integer) from public;
grant execute on function cloud.rotate_outbox(integer, integer) to erp_cloud_listener, erp_cloud_operator;
