-- 0037 — a source's callback gives way to the ERP's own transaction instead of deadlocking it.
--
-- Found in CI (test/yonbip.test.ts, a suite under two busy loops): the ERP closed an order while the
-- listener wrote back the cloud's answer to the order's revision, and PostgreSQL aborted the ERP's
-- statement with 40P01 deadlock_detected. The two transactions take the same two rows in opposite order:
--
--   the ERP:      UPDATE of its own order row  → its deferred trigger → scm.enqueue_order_close
--                 → SELECT … FROM scm.purchase_order … FOR UPDATE
--   the listener: scm.record_po_delivered → UPDATE scm.purchase_order → the row's AFTER trigger
--                 → scm._call_source → the source's on_order → UPDATE of the ERP's order row
--
-- tax has the same shape (tax.enqueue_reversal locks tax.invoice; a write-back updates tax.invoice and
-- calls on_invoice, which writes the ERP's invoice row). PostgreSQL breaks a deadlock by aborting the
-- transaction whose deadlock_timeout (1 s) runs out first, that is the one that began to wait first;
-- when the ERP's lock request came between the listener's lock on erp-cloud's row and its callback's lock
-- request, that was the ERP.
--
-- Now a callback waits for a lock at most 50 ms (cloud.callback_lock_timeout(), or less when the caller
-- has set a shorter lock_timeout): long before any deadlock_timeout, so the ERP is never the one
-- aborted (unless it had already waited about a second for the listener's row when the callback began to
-- wait: within 50 ms of its one deadlock check). The timeout is caught as every callback error is: only
-- the callback's own writes roll back and the write-back commits, so the ERP's transaction goes on. What
-- is new is that a callback that gave way to a lock (55P03, or 40P01 / 40001 when it lost a deadlock or
-- a serialization check) is not left for an operator:
--
-- * it is kept as one row of callback_failure per invoice (tax: with the latest event, as the operator's
--   replay_callbacks already calls only that) or per order or ASN (scm), attempts counting its tries
--   (last_attempt_at the latest), not one row per try;
-- * tax.replay_deferred_callbacks / scm.replay_deferred_callbacks call it again with the current state,
--   first at once, then 5 s later per try, up to a minute apart; the listener calls both in every
--   maintenance round (ERP_CLOUD_MAINTENANCE_MS);
-- * a later call for the same object that goes through delivers the whole current state, so it marks
--   the object's deferred failures replayed: an older event is never called after a newer one.
--
-- * once one callback of a transaction has given way, its later callbacks are not called but kept the
--   same way (cloud.callback_gave_way): a transaction waits on the ERP's locks 50 ms at most in all, not
--   50 ms per order of an ERP transaction closing fifty.
--
-- A callback that raises anything else is kept as before, for the operator (replay_callbacks); it ends
-- the object's waiting row, if any (the operator's replay gives the current state too).
-- A lock_timeout in the callback's own SET clause replaces the 50 ms for its body (PostgreSQL applies
-- a function's SET on entry): put_source now refuses one of 0 or of deadlock_timeout or more
-- (EI027 / ES021), which would give the deadlock back to the ERP.

-- ─── which errors are a lock given way to ──────────────────────────────────────

create function cloud.sqlstate_is_lock_conflict(p_sqlstate text) returns boolean
language sql immutable parallel safe
return p_sqlstate in ('55P03', '40P01', '40001');

comment on function cloud.sqlstate_is_lock_conflict(text) is
  'Whether an error is a lock conflict rather than a fault: 55P03 lock_not_available (a lock_timeout ran out), 40P01 deadlock_detected, 40001 serialization_failure. A callback that failed with one gave way to another transaction and is called again by replay_deferred_callbacks.';

create function cloud.callback_lock_timeout() returns text
language sql stable parallel safe
return case when current_setting('lock_timeout')::interval > interval '0'
             and current_setting('lock_timeout')::interval < interval '50 milliseconds'
            then current_setting('lock_timeout') else '50ms' end;

comment on function cloud.callback_lock_timeout() is
  'The lock_timeout a source''s callback runs under: 50 ms, or the caller''s own when that is shorter. Far below deadlock_timeout (1 s), so a callback waiting on a row an ERP transaction holds, while that transaction waits for erp-cloud, gives way before PostgreSQL picks a transaction to abort.';

-- ─── callback_failure: one row per deferred object, its tries counted ─────────

alter table tax.callback_failure
  add column attempts integer not null default 1,
  add column last_attempt_at timestamptz not null default now();
alter table scm.callback_failure
  add column attempts integer not null default 1,
  add column last_attempt_at timestamptz not null default now();

comment on column tax.callback_failure.attempts is
  'How many calls failed: 1 for a fault; for a lock conflict (cloud.sqlstate_is_lock_conflict), the tries of tax.replay_deferred_callbacks so far.';
comment on column tax.callback_failure.last_attempt_at is 'When the last of those calls failed (failed_at: the first).';
comment on column scm.callback_failure.attempts is
  'How many calls failed: 1 for a fault; for a lock conflict (cloud.sqlstate_is_lock_conflict), the tries of scm.replay_deferred_callbacks so far.';
comment on column scm.callback_failure.last_attempt_at is 'When the last of those calls failed (failed_at: the first).';
comment on table tax.callback_failure is
  'A source''s on_invoice that raised: its own writes were rolled back, the write-back that called it committed. A lock conflict is called again by tax.replay_deferred_callbacks (the listener''s maintenance), any other failure by the operator''s tax.replay_callbacks.';
comment on table scm.callback_failure is
  'A source''s on_order or on_asn that raised: its own writes were rolled back, the transaction that called it committed. A lock conflict is called again by scm.replay_deferred_callbacks (the listener''s maintenance), any other failure by the operator''s scm.replay_callbacks.';
comment on column tax.callback_failure.replayed_at is
  'When the source was called again for this failure (tax.replay_callbacks, or for a lock conflict tax.replay_deferred_callbacks or a later call for the invoice that went through); null: not yet.';
comment on column scm.callback_failure.replayed_at is
  'When the source was called again for this failure (scm.replay_callbacks, or for a lock conflict scm.replay_deferred_callbacks or a later call for the object that went through); null: not yet.';

create index callback_failure_deferred on tax.callback_failure (invoice_id)
  where replayed_at is null and cloud.sqlstate_is_lock_conflict(sqlstate);
create index callback_failure_deferred on scm.callback_failure (object_id)
  where replayed_at is null and cloud.sqlstate_is_lock_conflict(sqlstate);

-- ─── keeping a failure ───────────────────────────────────────────────────────

create function tax._keep_callback_failure(p_source text, p_invoice_id bigint, p_event text, p_sqlstate text, p_message text)
returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if cloud.sqlstate_is_lock_conflict(p_sqlstate) then
    -- one waiting row per invoice: the call gives the whole current state, so only the latest event matters
    update tax.callback_failure f
       set event = p_event, attempts = f.attempts + 1, last_attempt_at = now(), sqlstate = p_sqlstate, message = p_message
     where f.invoice_id = p_invoice_id and f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate);
    if found then
      return;
    end if;
  else
    -- a fault now stands for the invoice: the operator's replay calls it with the current state
    update tax.callback_failure f set replayed_at = now()
     where f.invoice_id = p_invoice_id and f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate);
  end if;
  insert into tax.callback_failure (source, invoice_id, event, sqlstate, message) values (p_source, p_invoice_id, p_event, p_sqlstate, p_message);
end $$;

comment on function tax._keep_callback_failure(text, bigint, text, text, text) is
  'Internal: keeps a failed on_invoice call in tax.callback_failure: a lock conflict adds a try to the invoice''s waiting row, if there is one, and makes its event the latest (the call always gives the current state); any other failure is a new row, which the operator''s replay_callbacks answers, and ends the invoice''s waiting row.';

create function scm._keep_callback_failure(p_source text, p_event text, p_object_id bigint, p_sqlstate text, p_message text)
returns void language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if cloud.sqlstate_is_lock_conflict(p_sqlstate) then
    update scm.callback_failure f
       set attempts = f.attempts + 1, last_attempt_at = now(), sqlstate = p_sqlstate, message = p_message
     where f.object_id = p_object_id and f.event = p_event and f.replayed_at is null
       and cloud.sqlstate_is_lock_conflict(f.sqlstate);
    if found then
      return;
    end if;
  else
    -- a fault now stands for the object: the operator's replay calls it with the current state
    update scm.callback_failure f set replayed_at = now()
     where f.object_id = p_object_id and f.event = p_event and f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate);
  end if;
  insert into scm.callback_failure (source, event, object_id, sqlstate, message) values (p_source, p_event, p_object_id, p_sqlstate, p_message);
end $$;

comment on function scm._keep_callback_failure(text, text, bigint, text, text) is
  'Internal: keeps a failed on_order / on_asn call in scm.callback_failure: a lock conflict adds a try to the object''s and event''s waiting row, if there is one; any other failure is a new row, which the operator''s replay_callbacks answers, and ends the object''s waiting row.';

revoke all on function tax._keep_callback_failure(text, bigint, text, text, text) from public;
revoke all on function scm._keep_callback_failure(text, text, bigint, text, text) from public;

-- ─── calling a source ────────────────────────────────────────────────────────
--
-- Once one callback of a transaction has given way, the transaction's later callbacks are not called
-- at all (kept as lock conflicts, 'not called: …'): a write-back of 50 orders an ERP transaction is
-- closing would otherwise wait 50 ms on each, and PostgreSQL's one deadlock check of the ERP's wait
-- would likely fall in one of those waits. So a transaction waits on the ERP for 50 ms at most in all.

create function cloud.callback_gave_way() returns boolean
language sql stable parallel safe
return coalesce(current_setting('erp_cloud.callback_gave_way', true), '') = 'on';

comment on function cloud.callback_gave_way() is
  'Whether a source''s callback has given way to a lock in this transaction (set by tax._call_source / scm._call_source): then the transaction''s later callbacks are not called but kept for replay_deferred_callbacks, so it waits on the ERP''s locks at most once.';

create or replace function tax._call_source(p_invoice_id bigint, p_event text) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_res     tax.invoice_result := tax._invoice_result(p_invoice_id, p_event);
  v_call    text;
  v_timeout text := current_setting('lock_timeout');
  v_state   text;
  v_msg     text;
begin
  select format('select %I.%I($1)', n.nspname, p.proname) into v_call
    from tax.source s join pg_proc p on p.oid = s.on_invoice join pg_namespace n on n.oid = p.pronamespace
   where s.name = v_res.source;
  if v_call is null then
    return true;
  end if;
  if cloud.callback_gave_way() then
    v_state := '55P03';
    v_msg := 'not called: a callback earlier in this transaction gave way to a lock';
  else
    perform set_config('lock_timeout', cloud.callback_lock_timeout(), true);
    begin
      execute v_call using v_res;
    exception when others then
      -- the callback's own writes are rolled back; the write-back that called it goes on
      get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    end;
    perform set_config('lock_timeout', v_timeout, true);
  end if;
  if v_state is not null then
    perform tax._keep_callback_failure(v_res.source, p_invoice_id, p_event, v_state, v_msg);
    if cloud.sqlstate_is_lock_conflict(v_state) then
      perform set_config('erp_cloud.callback_gave_way', 'on', true);
      raise warning 'on_invoice of source % gave way to a lock for invoice % (%): % %', v_res.source, p_invoice_id, p_event, v_state, v_msg
        using hint = 'Another transaction held a row the callback writes; tax.replay_deferred_callbacks (the listener''s maintenance) calls it again.';
    else
      raise warning 'on_invoice of source % failed for invoice % (%): % %', v_res.source, p_invoice_id, p_event, v_state, v_msg
        using hint = 'The change is committed without the callback''s writes; fix the callback and run tax.replay_callbacks.';
    end if;
    return false;
  end if;
  -- the call delivered the invoice's whole current state: what waited for a lock is delivered too
  update tax.callback_failure f set replayed_at = now()
   where f.invoice_id = p_invoice_id and f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate);
  return true;
end $$;

comment on function tax._call_source(bigint, text) is
  'Internal: calls the on_invoice of the invoice''s source with its current state, under cloud.callback_lock_timeout() (not at all once a callback of this transaction gave way: cloud.callback_gave_way()); an error is caught (only the callback''s writes are undone), kept in tax.callback_failure with a WARNING, and false returned. A call that goes through marks the invoice''s lock conflicts replayed.';

create or replace function scm._call_source(p_event text, p_object_id bigint) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_source  text;
  v_fn      regprocedure;
  v_call    text;
  v_timeout text := current_setting('lock_timeout');
  v_state   text;
  v_msg     text;
begin
  if p_event = 'order' then
    select po.source, s.on_order into v_source, v_fn from scm.purchase_order po join scm.source s on s.name = po.source where po.id = p_object_id;
  else
    select po.source, s.on_asn into v_source, v_fn
      from scm.asn a join scm.purchase_order po on po.id = a.po_id join scm.source s on s.name = po.source
     where a.id = p_object_id and a.status = 'accepted';
  end if;
  if v_fn is null then
    return true;
  end if;
  select format('select %I.%I($1)', n.nspname, p.proname) into v_call
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.oid = v_fn;
  if cloud.callback_gave_way() then
    v_state := '55P03';
    v_msg := 'not called: a callback earlier in this transaction gave way to a lock';
  else
    perform set_config('lock_timeout', cloud.callback_lock_timeout(), true);
    begin
      if p_event = 'order' then
        execute v_call using scm._order_result(p_object_id);
      else
        execute v_call using scm._asn_delivery(p_object_id);
      end if;
    exception when others then
      -- the callback's own writes are rolled back; the transaction that called it goes on
      get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    end;
    perform set_config('lock_timeout', v_timeout, true);
  end if;
  if v_state is not null then
    perform scm._keep_callback_failure(v_source, p_event, p_object_id, v_state, v_msg);
    if p_event = 'asn' then
      update scm.asn set delivery_error = left(v_state || ': ' || v_msg, 1000) where id = p_object_id;
    end if;
    if cloud.sqlstate_is_lock_conflict(v_state) then
      perform set_config('erp_cloud.callback_gave_way', 'on', true);
      raise warning 'on_% of source % gave way to a lock for % % : % %', p_event, v_source, p_event, p_object_id, v_state, v_msg
        using hint = 'Another transaction held a row the callback writes; scm.replay_deferred_callbacks (the listener''s maintenance) calls it again.';
    else
      raise warning 'on_% of source % failed for % % : % %', p_event, v_source, p_event, p_object_id, v_state, v_msg
        using hint = 'The change is committed without the callback''s writes; fix the callback and run scm.replay_callbacks.';
    end if;
    return false;
  end if;
  if p_event = 'asn' then
    update scm.asn set delivered_at = now(), delivery_error = null where id = p_object_id;
  end if;
  -- the call delivered the object's whole current state: what waited for a lock is delivered too
  update scm.callback_failure f set replayed_at = now()
   where f.object_id = p_object_id and f.event = p_event and f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate);
  return true;
end $$;

comment on function scm._call_source(text, bigint) is
  'Internal: calls the on_order (event order) or on_asn (event asn: an accepted ASN, which is then marked delivered) of the source the order belongs to, under cloud.callback_lock_timeout() (not at all once a callback of this transaction gave way: cloud.callback_gave_way()); an error is caught (only the callback''s writes are undone), kept in scm.callback_failure (and as the ASN''s delivery_error) with a WARNING, and false returned. A call that goes through marks the object''s lock conflicts replayed. No callback registered: nothing happens.';

-- ─── calling deferred callbacks again ────────────────────────────────────────

create function tax.replay_deferred_callbacks(p_now timestamptz default clock_timestamp(), p_limit integer default 100)
returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v record;
  n integer := 0;
begin
  for v in
    select f.id, f.invoice_id, f.event from tax.callback_failure f
     where f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate)
       and f.last_attempt_at <= p_now - make_interval(secs => 5 * least(f.attempts - 1, 12))
     order by f.id limit p_limit
       for update skip locked
  loop
    -- one that gives way ends the round (the rest would not be called: cloud.callback_gave_way)
    exit when cloud.callback_gave_way();
    -- a call that gives way again counts a try on the row; one that goes through (or finds no callback
    -- registered any more) is the replay
    if tax._call_source(v.invoice_id, v.event) then
      update tax.callback_failure set replayed_at = now() where id = v.id and replayed_at is null;
      n := n + 1;
    end if;
  end loop;
  return n;
end $$;

comment on function tax.replay_deferred_callbacks(timestamptz, integer) is
  'Calls on_invoice again, with the current state, for up to p_limit invoices whose callback gave way to a lock (cloud.sqlstate_is_lock_conflict) and whose next try is due: at once after the first, then 5 s more per try, at most a minute apart; the first that gives way again ends the round. Rows another call is replaying are skipped. Returns how many calls went through. The listener calls it in every maintenance round.';

create function scm.replay_deferred_callbacks(p_now timestamptz default clock_timestamp(), p_limit integer default 100)
returns integer language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v record;
  n integer := 0;
begin
  for v in
    select f.id, f.event, f.object_id from scm.callback_failure f
     where f.replayed_at is null and cloud.sqlstate_is_lock_conflict(f.sqlstate)
       and f.last_attempt_at <= p_now - make_interval(secs => 5 * least(f.attempts - 1, 12))
     order by f.id limit p_limit
       for update skip locked
  loop
    -- one that gives way ends the round (the rest would not be called: cloud.callback_gave_way)
    exit when cloud.callback_gave_way();
    -- a call that gives way again counts a try on the row; one that goes through (or finds no callback
    -- registered any more) is the replay
    if scm._call_source(v.event, v.object_id) then
      update scm.callback_failure set replayed_at = now() where id = v.id and replayed_at is null;
      n := n + 1;
    end if;
  end loop;
  return n;
end $$;

comment on function scm.replay_deferred_callbacks(timestamptz, integer) is
  'Calls on_order / on_asn again, with the current state, for up to p_limit orders and ASNs whose callback gave way to a lock (cloud.sqlstate_is_lock_conflict) and whose next try is due: at once after the first, then 5 s more per try, at most a minute apart; the first that gives way again ends the round. Rows another call is replaying are skipped. Returns how many calls went through. The listener calls it in every maintenance round.';

revoke all on function tax.replay_deferred_callbacks(timestamptz, integer) from public;
revoke all on function scm.replay_deferred_callbacks(timestamptz, integer) from public;
grant execute on function tax.replay_deferred_callbacks(timestamptz, integer) to erp_cloud_listener, erp_cloud_operator;
grant execute on function scm.replay_deferred_callbacks(timestamptz, integer) to erp_cloud_listener, erp_cloud_operator;

-- ─── a callback may not take the deadlock back ───────────────────────────────

create function cloud._callback_lock_timeout_ms(p_fn regprocedure) returns bigint
language sql stable parallel safe set search_path = pg_catalog, pg_temp as $$
  -- a value without a unit is milliseconds; with one, an interval PostgreSQL reads ('2s', '500ms', '1min')
  select case when v ~ '^\s*\d+\s*$' then v::bigint
              else (extract(epoch from v::interval) * 1000)::bigint end
    from (select substr(c, length('lock_timeout=') + 1) as v
            from pg_proc p, unnest(p.proconfig) c
           where p.oid = p_fn and c like 'lock_timeout=%') s
$$;

comment on function cloud._callback_lock_timeout_ms(regprocedure) is
  'Internal: the lock_timeout (ms) a function sets in its own SET clause (0: no limit), or null when it sets none.';

create function cloud._callback_lock_timeout_too_long(p_fn regprocedure) returns boolean
language sql stable parallel safe set search_path = pg_catalog, pg_temp as $$
  select coalesce(ms = 0 or ms >= extract(epoch from current_setting('deadlock_timeout')::interval) * 1000, false)
    from (select cloud._callback_lock_timeout_ms(p_fn) as ms) s
$$;

comment on function cloud._callback_lock_timeout_too_long(regprocedure) is
  'Internal: whether a function''s own SET lock_timeout is 0 (no limit) or deadlock_timeout or more: as a callback it would replace cloud.callback_lock_timeout() and could wait on the ERP''s row until PostgreSQL aborts one of the two transactions. False when it sets none.';

create function cloud._callbacks_with_long_lock_timeout()
returns table (what text, source text, fn regprocedure, ms bigint)
language sql stable set search_path = pg_catalog, pg_temp as $$
  select c.what, c.source, c.fn, cloud._callback_lock_timeout_ms(c.fn)
    from (select 'on_invoice' as what, s.name as source, s.on_invoice as fn from tax.source s
          union all select 'on_order', s.name, s.on_order from scm.source s
          union all select 'on_asn', s.name, s.on_asn from scm.source s) c
   where c.fn is not null and cloud._callback_lock_timeout_too_long(c.fn)
   order by 2, 1
$$;

comment on function cloud._callbacks_with_long_lock_timeout() is
  'Internal: the registered callbacks (tax.source.on_invoice, scm.source.on_order / on_asn) that cloud._callback_lock_timeout_too_long names: registered before put_source refused them (0037). Read by this migration''s warning and by erp-cloud doctor.';

create function cloud._check_callback_lock_timeout(p_fn regprocedure, p_what text, p_errcode text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  v_ms bigint := cloud._callback_lock_timeout_ms(p_fn);
begin
  if cloud._callback_lock_timeout_too_long(p_fn) then
    raise exception using errcode = p_errcode,
      message = format('%s %s sets lock_timeout %s, which lets it wait on your ERP''s rows until PostgreSQL aborts one of the two transactions',
                       p_what, p_fn, case when v_ms = 0 then '0 (no limit)' else v_ms || ' ms' end),
      detail = format('deadlock_timeout is %s: a wait of that long on a row your ERP''s transaction holds, while that transaction waits for erp-cloud, ends in 40P01 for whichever began to wait first.',
                      current_setting('deadlock_timeout')),
      hint = 'Leave lock_timeout out of its SET clause: erp-cloud calls it with lock_timeout 50 ms and calls it again when the row is free. Or set one well under deadlock_timeout.';
  end if;
end $$;

comment on function cloud._check_callback_lock_timeout(regprocedure, text, text) is
  'Internal: raises p_errcode (EI027, ES021) when a callback''s own SET clause gives it lock_timeout 0 or deadlock_timeout or more, which would replace cloud.callback_lock_timeout() for its body.';

create or replace function tax._check_callback(p_fn regprocedure, p_arg regtype, p_result regtype, p_what text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  p pg_proc;
begin
  select * into p from pg_proc where oid = p_fn;
  if p.pronargs <> 1 or p.proargtypes[0] <> p_arg or p.prorettype <> p_result then
    raise exception using errcode = 'EI027', message = format('%s %s must take one %s and return %s', p_what, p_fn, p_arg, p_result),
      hint = format('Declare it as f(%s) returns %s.', p_arg, p_result);
  end if;
  if not p.prosecdef or not exists (select from unnest(p.proconfig) c where c like 'search_path=%') then
    raise exception using errcode = 'EI027', message = format('%s %s must be SECURITY DEFINER with its own search_path', p_what, p_fn),
      hint = 'It runs inside erp-cloud''s transaction: declare it SECURITY DEFINER SET search_path = '''' so it runs with its owner''s (the ERP''s) rights.';
  end if;
  if (select rolsuper from pg_roles where oid = p.proowner) then
    raise exception using errcode = 'EI027', message = format('%s %s is owned by a superuser', p_what, p_fn),
      hint = 'Make the ERP''s own role its owner (ALTER FUNCTION … OWNER TO), so it runs with the ERP''s rights, not the migrator''s.';
  end if;
  if p_what <> 'refresh_buyer' then  -- refresh_buyer reads, in the caller's own transaction
    perform cloud._check_callback_lock_timeout(p_fn, p_what, 'EI027');
  end if;
end $$;

comment on function tax._check_callback(regprocedure, regtype, regtype, text) is
  'Internal: EI027 unless a function a source registers has the contract''s signature, is SECURITY DEFINER with a search_path, is not owned by a superuser, and (on_invoice) sets no lock_timeout of 0 or of deadlock_timeout or more.';

create or replace function scm._check_callback(p_fn regprocedure, p_arg regtype, p_what text) returns void
language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  p pg_proc;
begin
  select * into p from pg_proc where oid = p_fn;
  if p.pronargs <> 1 or p.proargtypes[0] <> p_arg or p.prorettype <> 'void'::regtype then
    raise exception using errcode = 'ES021', message = format('%s %s must take one %s and return void', p_what, p_fn, p_arg),
      hint = format('Declare it as f(%s) returns void.', p_arg);
  end if;
  if not p.prosecdef or not exists (select from unnest(p.proconfig) c where c like 'search_path=%') then
    raise exception using errcode = 'ES021', message = format('%s %s must be SECURITY DEFINER with its own search_path', p_what, p_fn),
      hint = 'It runs inside erp-cloud''s transaction: declare it SECURITY DEFINER SET search_path = '''' so it runs with its owner''s (the ERP''s) rights.';
  end if;
  if (select rolsuper from pg_roles where oid = p.proowner) then
    raise exception using errcode = 'ES021', message = format('%s %s is owned by a superuser', p_what, p_fn),
      hint = 'Make the ERP''s own role its owner (ALTER FUNCTION … OWNER TO), so it runs with the ERP''s rights, not the migrator''s.';
  end if;
  perform cloud._check_callback_lock_timeout(p_fn, p_what, 'ES021');
end $$;

comment on function scm._check_callback(regprocedure, regtype, text) is
  'Internal: ES021 unless a function a source registers takes the contract''s type and returns void, is SECURITY DEFINER with a search_path, is not owned by a superuser, and sets no lock_timeout of 0 or of deadlock_timeout or more.';

-- A callback registered before this migration may already set a lock_timeout that put_source now
-- refuses (the acme example set 2 s): it keeps working, so say so here; erp-cloud doctor says it too.
do $$
declare
  v record;
begin
  for v in select * from cloud._callbacks_with_long_lock_timeout() loop
    raise warning '% of source % (%) sets lock_timeout % ms, which lets it wait until PostgreSQL aborts your ERP''s transaction', v.what, v.source, v.fn, v.ms
      using hint = format('ALTER FUNCTION %s RESET lock_timeout; erp-cloud calls it with lock_timeout 50 ms.', v.fn);
  end loop;
end $$;
