-- 0036 — a claim takes from cloud.outbox_intake in bounded steps, whatever waits there (issue 15 §2, §3).
--
-- Found while measuring the claim: cloud._lease_intake (0032) took "up to p_limit rows of the listener's
-- endpoints" from the intake, which has no index but its primary key (what keeps the ERP's insert cheap).
-- Two backlogs made that take go wrong:
--
-- 1. Rows of endpoints this listener does not serve (ERP_CLOUD_ENDPOINTS splits endpoints among
--    listeners, and the other listener is down): the take's scan skipped them, every claim again. With
--    40,000 of them waiting, a one-message claim of the other endpoints took 9.2–9.8 ms instead of about
--    1 ms (p50 of 100, this machine), and stayed so until their own listener came back.
-- 2. Rows this listener serves but may not lease on the way in (a paused, disabled or rate-limited
--    endpoint, an open circuit; a message not due yet, or behind the delivery fence): the take moved
--    p_limit of them into the hot table as pending and leased none, so the claim came back with less than asked and the listener waited
--    for its next wake. A backlog of 40,000 (a listener started after an outage while the endpoint was
--    paused) left the intake 64 rows a poll, about five minutes, and every other endpoint's message
--    enqueued behind it waited as long.
--
-- Now the take reads the intake in its own order (heap order, roughly the order of commit) and stops at
-- whichever comes first: the p_limit-th row it may lease on the way in (of an endpoint of this listener's,
-- enabled and unlimited, due, and not behind the delivery fence), or the 2,000th row of any other. It
-- takes every row it read, locking each as it reads it (rows another claim holds are skipped and not
-- counted, as before), but the one that ended the read; its own endpoints' rows past p_limit stay in the
-- intake for the next claim (no second write for them). Counted by two running counts whose run conditions
-- stop the scan (PostgreSQL 15 WindowAgg), which fetches one row ahead: a claim that stops at its limit
-- holds up to two rows it did not take until it commits. Whether a taken endpoint is still enabled and
-- unlimited, and has older work due in the hot table, is asked as before in the statement that leases,
-- and only of the endpoints taken: then its rows go in pending. A claim of no message takes nothing.
--
-- So a claim reads and moves at most p_limit + 2,000 rows of the intake, and a backlog nobody may lease
-- leaves the intake 2,000 rows a claim. Rows of endpoints the listener does not serve are its to move only
-- once they have waited a second in the intake (their own listener is down or far behind): fresh ones are
-- neither locked nor counted, so a claim never takes a message from under its own listener's concurrent
-- claim (which would skip it, and leave it for its next wake). Moved, they join the hot table as pending,
-- untouched; their listener claims them there as any pending message, and per-key order is read across
-- both tables, as before. What may be leased at once goes as before: in one write, leased.
--
-- Unchanged: what is leased and when (due, heads its key, not behind the delivery fence, endpoint enabled
-- and unlimited with nothing older due), the claim's limit, skip-locked taking, the result.

create or replace function cloud._lease_intake(p_worker text, p_limit integer, p_endpoints text[], p_lease_margin interval,
                                               p_now timestamptz, p_fence_id bigint)
  returns setof cloud.claimed_message
  language plpgsql security definer
  set search_path = ''
as $$
declare
  -- what counts as a row this claim may lease on the way in, for the read's limit: an endpoint of this
  -- listener's, enabled and unlimited (whether older work of it is due is asked below, for what was taken)
  v_ready text[] := array(
    select e.name
      from cloud.endpoint e
     where (p_endpoints is null or e.name = any (p_endpoints)) and e.enabled
       and not cloud._endpoint_limited(e, p_now));
begin
  if p_limit <= 0 then
    return;  -- a claim of no message takes, and holds, nothing
  end if;
  return query
    with read as materialized (
      -- the intake in its own order, up to the p_limit-th row of a ready endpoint or the 2,000th of any
      -- other, whichever comes first: both counts only grow, so their conditions stop the scan there.
      -- Rows another transaction holds (another listener's claim taking them, an operator's skip) are
      -- skipped, not waited for, and not counted: that claim takes them, or the next one; until then the
      -- head-of-key checks, which read the intake too, keep their keys' order
      select w.ctid
        from (select s.ctid,
                     count(*) filter (where s.ready) over (rows between unbounded preceding and current row) as n_ready,
                     count(*) filter (where not s.ready) over (rows between unbounded preceding and current row) as n_other
                -- ready: it may go now (a row due later or behind the fence counts with the others, so a
                -- backlog of them leaves 2,000 a claim too)
                from (select t.ctid, t.endpoint = any (v_ready) and t.next_attempt_at <= p_now and t.id > p_fence_id as ready
                        from only cloud.outbox_intake t
                       -- another listener's messages are its own to take while they are fresh: moved (not
                       -- locked, not counted) only once they have waited a second, so a claim never races
                       -- that listener's claim for them (it would skip them, and wait for its next wake)
                       where p_endpoints is null or t.endpoint = any (p_endpoints) or t.created_at < p_now - interval '1 second'
                         for update skip locked) s) w
       where w.n_ready <= p_limit and w.n_other <= 2000
    ), taken as (
      delete from only cloud.outbox_intake i
       where i.ctid = any (array(select r.ctid from read r))
      returning i.*
    ), ready as materialized (
      -- of the endpoints taken, those whose messages may be leased on the way in: ready as above (asked
      -- again in this statement's snapshot, as 0032 did: a pause committed since the first look counts),
      -- and nothing of theirs already due in the hot table (that goes first)
      select e.name, e.timeout_ms
        from cloud.endpoint e
       where e.name in (select t.endpoint from taken t) and e.name = any (v_ready)
         and e.enabled and not cloud._endpoint_limited(e, p_now)
         and not exists (select from only cloud.outbox o
                          where o.status = 'pending' and o.endpoint = e.name and o.next_attempt_at <= p_now)
    ), judged as (
      select t.*, r.timeout_ms,
             t.status = 'pending' and r.name is not null and t.next_attempt_at <= p_now and t.id > p_fence_id
             -- heads its key: the snapshot still sees the rows taken above, so a lower id taken with it holds it back
             and (t.ordering_key is null or not exists (
                   select from cloud.outbox h
                    where h.ordering_key = t.ordering_key and h.id < t.id
                      and h.status in ('pending', 'in_flight', 'failed', 'dead'))) as lease
        from taken t left join ready r on r.name = t.endpoint
    ), moved as (
      insert into cloud.outbox overriding system value
      select j.request_id, j.id, j.endpoint, j.operation, j.payload, j.aggregate_type, j.aggregate_id, j.ordering_key,
             case when j.lease then 'in_flight' else j.status end,
             case when j.lease then j.attempts + 1 else j.attempts end,
             j.next_attempt_at,
             case when j.lease then p_worker else j.locked_by end,
             case when j.lease then p_now + make_interval(secs => j.timeout_ms / 1000.0) + p_lease_margin else j.locked_until end,
             j.last_error, j.last_error_class, j.last_error_at, j.last_http_status, j.response, j.created_at,
             case when j.lease then p_now else j.updated_at end,
             j.sent_at, j.failures, j.lost_leases
        from judged j
      -- an explicit request_id that slipped past enqueue's EC004 look-up (possible only in REPEATABLE READ,
      -- for an id committed into the intake after that transaction's snapshot) keeps the message already there
      on conflict (request_id) do nothing
      returning *
    )
    -- an intake row is never in flight before this (claims lease only the hot table), so in_flight here is this lease
    select m.request_id, m.endpoint, m.operation, m.payload, m.attempts, m.aggregate_type, m.aggregate_id,
           m.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, m.locked_until, p_now,
           e.allow_hosts, e.allow_cidrs::text[], e.allow_private, e.download_hosts
      from moved m join cloud.endpoint e on e.name = m.endpoint
     where m.status = 'in_flight'
     order by m.id;
end $$;

comment on function cloud._lease_intake(text, integer, text[], interval, timestamptz, bigint) is
  'Internal (cloud.claim_messages, first): reads cloud.outbox_intake in its own order up to the p_limit-th message it may lease on the way in or the 2,000th it may not, whichever comes first, and writes every message read into cloud.outbox once (skipping rows another transaction holds), with the same request_id and id: leased to p_worker (in_flight) when it is due, is not behind the delivery fence (id above p_fence_id), heads its ordering key, and its endpoint is one of p_endpoints (all when null), enabled, unlimited and has nothing older due; pending otherwise, as it was (a paused or limited endpoint, or one of another listener''s, which it reads only once they have waited a second in the intake). Messages of leasable endpoints past p_limit stay in the intake. Returns the leased messages as cloud.claim_messages does.';
