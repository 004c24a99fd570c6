-- 0012 — the rate limit holds at the cloud even when a listener falls behind.
--
-- Why: cloud.claim_messages gives each rate-limited message a send slot (the
-- k-th message takes the k-th token of the shared bucket). A listener whose
-- event loop stalled (GC, a loaded host, SIGSTOP) woke up with slots that had
-- passed and sent them at once, into time the bucket had already given to other
-- listeners: the cloud saw a burst above the rate (and answered 429). Carrying
-- the lag forward inside one listener cannot fix that across listeners.
--
-- Now a message may only be sent within a short grace after its slot
-- (cloud.send_grace: half a token's spacing, between 5 and 50 ms). A message
-- whose slot passed by more than that is not sent on the old slot: the listener
-- asks cloud.take_send_slots for a new one, taken from the same shared bucket,
-- and only while it still holds the message's lease. A message that cannot get a
-- slot early enough to finish within its lease (or whose endpoint is paused or
-- its circuit open) is given back unsent: pending again, due now, and the
-- attempt it never made is not counted.
--
-- The guarantee, with r = rate_per_s, b = burst, g = cloud.send_grace(r): in any
-- window of W seconds the listeners together start at most r·(W + g) + b sends
-- to an endpoint, however many listeners there are and however late their
-- timers fire. claim_messages is unchanged.
--
-- SQLSTATEs added to the registry in 0001 (mirrored in listener/errors.ts):
--   EC015  invalid send-slot request (no worker, no or duplicate request ids, too many, bad lead)

create function cloud.send_grace(
  p_rate_per_s double precision  -- the endpoint's rate limit; null = unlimited
) returns interval
language sql immutable parallel safe as $$
  -- half a token's spacing keeps the excess over the rate below one send (r·g <= 0.5),
  -- never under 5 ms (timers on a healthy host fire within a few ms; less would make
  -- fast endpoints re-slot constantly) nor over 50 ms (a gateway measures in ms)
  select case when p_rate_per_s is not null
              then least(interval '50 milliseconds', greatest(interval '5 milliseconds', make_interval(secs => 0.5 / p_rate_per_s)))
         end;
$$;
comment on function cloud.send_grace is 'How late after its slot a rate-limited message may still be sent: min(50 ms, max(5 ms, 0.5 / rate)); null for an unlimited endpoint. Later than this the message takes a new slot (cloud.take_send_slots).';

create type cloud.send_slot as (
  request_id uuid,
  outcome    text,         -- slotted | given_back | lease_lost
  send_at    timestamptz,  -- slotted: not before this
  send_by    timestamptz   -- slotted: not after this (null = no rate limit)
);
comment on type cloud.send_slot is 'The answer of cloud.take_send_slots for one message: slotted (send in [send_at, send_by]), given_back (pending again, unsent) or lease_lost (this worker no longer holds it: do not send).';

create function cloud.take_send_slots(
  p_worker      text,                                  -- the worker that holds the leases
  p_request_ids uuid[],                                -- its messages whose slots passed by more than the grace
  p_lead        interval default '100 milliseconds',   -- new slots are at least this far ahead (the answer's round trip)
  p_now         timestamptz default clock_timestamp()
) returns setof cloud.send_slot
language plpgsql as $$
declare
  v_endpoint text;
  e          cloud.endpoint;
  m          record;
  v_t0       timestamptz;
  v_avail    double precision;
  v_taken    integer;
  v_slot     timestamptz;
  v_back     uuid[] := '{}';
begin
  if p_worker is null or p_worker = '' then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_worker is empty',
      hint = 'Pass the worker id that claimed the messages (cloud.listener.worker_id).';
  elsif p_request_ids is null or array_position(p_request_ids, null) is not null then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_request_ids is null or holds a null',
      hint = 'Pass the request ids of the claimed messages, none of them null.';
  elsif cardinality(p_request_ids) > 1000 then
    raise exception using errcode = 'EC015', message = format('take_send_slots: p_request_ids holds %s ids; at most 1000', cardinality(p_request_ids)),
      hint = 'Ask for new slots in batches of at most 1000 messages.';
  elsif (select count(distinct x) from unnest(p_request_ids) x) <> cardinality(p_request_ids) then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_request_ids names a message twice',
      hint = 'Each message takes one token: name it once.';
  elsif p_lead is null or p_lead < interval '0' or p_lead > interval '10 seconds' then
    raise exception using errcode = 'EC015', message = format('take_send_slots: p_lead %s is not between 0 and 10 seconds', p_lead),
      hint = 'Give the lead time new slots need (about one database round trip), e.g. 100 ms.';
  elsif p_now is null then
    raise exception using errcode = 'EC015', message = 'take_send_slots: p_now is null',
      hint = 'Leave p_now out to use the current time.';
  end if;

  -- endpoint by endpoint, in name order; each endpoint row is locked before its
  -- outbox rows, as claim_messages does, so the two never wait on each other in a cycle
  for v_endpoint in
    select distinct o.endpoint from cloud.outbox o where o.request_id = any (p_request_ids) order by 1
  loop
    select * into e from cloud.endpoint where name = v_endpoint for update;
    v_t0 := greatest(p_now + p_lead, e.tokens_at);
    v_avail := cloud._tokens_available(e, v_t0);
    v_taken := 0;
    for m in
      select o.request_id, o.locked_until
        from cloud.outbox o
       where o.request_id = any (p_request_ids) and o.endpoint = v_endpoint
         and o.status = 'in_flight' and o.locked_by = p_worker and o.locked_until > p_now
       order by o.id
         for update skip locked  -- a row the reaper holds is being taken away from this worker
    loop
      if e.paused_until > p_now or (e.circuit_state <> 'closed' and m.request_id is distinct from e.circuit_probe) then
        v_back := v_back || m.request_id;  -- a 429 pause or an open circuit: no calls now
        continue;
      end if;
      if e.rate_per_s is null then
        v_slot := p_now;  -- the limit was lifted meanwhile
      else
        -- the next token of the shared bucket, as claim_messages hands them out
        v_slot := v_t0 + make_interval(secs => greatest(0, (v_taken + 1 - v_avail) / e.rate_per_s));
      end if;
      if v_slot + make_interval(secs => e.timeout_ms / 1000.0) > m.locked_until then
        v_back := v_back || m.request_id;  -- the call could outlive the lease: another worker could send it too
        continue;
      end if;
      if e.rate_per_s is not null then
        v_taken := v_taken + 1;
      end if;
      return next (m.request_id, 'slotted', v_slot, v_slot + cloud.send_grace(e.rate_per_s))::cloud.send_slot;
    end loop;
    if v_taken > 0 then
      update cloud.endpoint set tokens = v_avail - v_taken, tokens_at = v_t0 where name = v_endpoint;
    end if;
  end loop;

  if cardinality(v_back) > 0 then
    -- never sent: pending again and due now; the claim's attempt is taken back
    update cloud.outbox
       set status = 'pending', locked_by = null, locked_until = null, next_attempt_at = p_now,
           attempts = greatest(attempts - 1, 0), updated_at = p_now
     where request_id = any (v_back);
    -- a half-open probe given back is a lost probe: another after a cool-down (as the reaper does)
    update cloud.endpoint set circuit_state = 'open', circuit_opened_at = p_now, circuit_probe = null
     where circuit_state = 'half_open' and circuit_probe = any (v_back);
    return query select b, 'given_back', null::timestamptz, null::timestamptz from unnest(v_back) b;
  end if;
  -- everything else is no longer this worker's to send
  return query
    select x, 'lease_lost', null::timestamptz, null::timestamptz
      from unnest(p_request_ids) x
     where not exists (select from cloud.outbox o
                        where o.request_id = x and o.status = 'in_flight' and o.locked_by = p_worker and o.locked_until > p_now)
       and x <> all (v_back);
end $$;
comment on function cloud.take_send_slots is 'Gives a worker''s messages whose send slot passed by more than cloud.send_grace new slots from the endpoint''s shared token bucket, at least p_lead ahead, while it holds their leases. A message that cannot be sent and finished within its lease (or whose endpoint is paused or its circuit open) is given back unsent (pending, due now, attempt not counted); one whose lease is gone is lease_lost. EC015 for bad input.';

revoke execute on function cloud.send_grace(double precision), cloud.take_send_slots(text, uuid[], interval, timestamptz) from public;
grant execute on function cloud.send_grace(double precision), cloud.take_send_slots(text, uuid[], interval, timestamptz) to erp_cloud_listener;
grant execute on function cloud.send_grace(double precision) to erp_cloud_operator;
