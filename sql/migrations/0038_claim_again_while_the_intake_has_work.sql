-- 0038 — a listener whose claim leased nothing looks again at once while the intake holds work it may take
-- (issue 15 §2, §3; noted with 0036).
--
-- Since 0036 a claim reads at most 2,000 rows of cloud.outbox_intake it may not lease (another listener's
-- messages that have waited over a second, a paused endpoint's backlog) and moves them into the hot table.
-- A claim that moved such rows and leased nothing ended the listener's round: cloud.next_due_at did not
-- look at the intake, so the listener waited for its next NOTIFY or poll (ERP_CLOUD_POLL_MS, 500 ms by
-- default). Its own messages enqueued behind a backlog of 40,000 then waited twenty polls, about 10 s.
--
-- Now next_due_at answers p_now + 50 ms while the intake holds a row the listener's claim would read:
-- one of its endpoints' (any endpoint's when p_endpoints is null), or any that has waited over a second.
-- The listener claims again 50 ms later, and a backlog leaves the intake 2,000 rows a claim, 50 ms apart.
-- Another listener's fresh messages are not counted (its claim's to take), so they wake nobody.
--
-- The 50 ms, not 0: a row some other transaction holds locked is skipped by every claim until that
-- transaction ends (an operator's SELECT … FOR UPDATE on the intake); meanwhile an idle listener claims
-- 20 times a second, not without pause. The look costs an idle listener one probe of the intake after
-- an empty claim: the first row that qualifies ends it; rows of another listener's that are under a
-- second old are read and passed over.

create or replace function cloud.next_due_at(p_endpoints text[] default null, p_now timestamptz default clock_timestamp())
returns timestamptz language plpgsql stable set plan_cache_mode = force_generic_plan as $$
begin
  -- PL/pgSQL keeps this plan for the session (0030): as a SQL function it was planned on every call
  return (
    select min(t) from (
      select min(o.next_attempt_at) as t
        from cloud.outbox o
       where o.status = 'pending' and o.next_attempt_at > p_now
         and (p_endpoints is null or o.endpoint = any (p_endpoints))
      union all
      -- due messages held back by a limit: when the limit lets the next one go
      select case when e.paused_until > p_now then e.paused_until
                  when e.circuit_state = 'open' then e.circuit_opened_at + make_interval(secs => e.circuit_cooldown_ms / 1000.0)
                  when e.rate_per_s is not null  -- a claim may run 100 ms ahead of the bucket
                  then e.tokens_at + make_interval(secs => greatest(0, 1 - e.rate_per_s * 0.1 - e.tokens) / e.rate_per_s)
             end
        from cloud.endpoint e
       where e.enabled and (p_endpoints is null or e.name = any (p_endpoints))
         and exists (select from cloud.outbox o where o.status = 'pending' and o.endpoint = e.name and o.next_attempt_at <= p_now)
      union all
      -- messages behind the delivery fence (0034): when it lifts
      select f.fence_until from cloud.delivery_fence f
      union all
      -- work in the intake this listener's claim would read (0036's filter): claim again shortly
      select p_now + interval '50 milliseconds'
       where exists (select from cloud.outbox_intake i
                      where p_endpoints is null or i.endpoint = any (p_endpoints) or i.created_at < p_now - interval '1 second')
    ) s
    where t > p_now);
end $$;

comment on function cloud.next_due_at(text[], timestamptz) is
  'When the listener should look again: the earliest retry not yet due, the moment a rate limit, 429 pause or open circuit lets a waiting message go, the end of the delivery fence after a crash, or in 50 ms while cloud.outbox_intake holds a row this listener''s claim would read (of its endpoints, or waiting over a second).';
