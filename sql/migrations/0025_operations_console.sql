-- 0025 — the operations console (issue 12): who may act from the page, and
-- the actions it takes, authorised again in the database.
--
-- The console (erp-cloud console, listener/console/) signs ERP users in
-- through erp-cloud's own OpenID Provider and then does every read and every
-- action as a database role chosen for the user's console role, with SET
-- LOCAL ROLE inside the request's transaction, and the ERP login in the
-- transaction-local setting erp_cloud.console_user. So the page hides what a
-- user may not do, and the database refuses it again:
--
--   erp_cloud_console           signing in: which console role a login has
--                               (cloud.console_role), nothing else
--   erp_cloud_console_finance   reads what the pages show (the views and
--                               tables below, never secrets: no vault, no
--                               endpoint config, no provider tokens), and
--                               requeries or reissues invoices
--   erp_cloud_console_operator  the same reads, requery and reissue, and
--                               replays or skips any message
--
-- Each role gets its grants directly (no role is a member of another: role
-- memberships are not part of a schema dump, so the baseline could not make
-- them). The console's own database login is granted the three roles by the
-- DBA, so it may SET ROLE to them; it needs no other privilege.
--
-- Which ERP user has which console role is erp-cloud's data:
-- cloud.console_user, kept with cloud.put_console_role (operators). The
-- actions are SECURITY DEFINER functions that check the acting user (the
-- setting, fail closed when missing), their console role, and that they are
-- an active SSO user, call the SQL API (cloud.replay_message, skip_message,
-- tax.requery_invoice, tax.reissue_invoice) with actor 'console:<login>', and
-- append to cloud.console_audit (who, which role, what, why, the result).
--
-- Also: cloud.attempts_per_minute (the overview's chart, from cloud.log's
-- started_at range), cloud.endpoint_settings (endpoints, limits, quota use
-- and allowlists without config or secrets), and the indexes the console's
-- lookups need on tax and scm (invoice number, failed invoices, document and
-- reversal references, also by their last segment after a '/', ASN numbers,
-- order references).
--
-- SQLSTATEs (class EA; mirrored in listener/kernel/errors.ts):
--   EA001  no signed-in console user in this session (erp_cloud.console_user is not set)
--   EA002  the console user's role does not allow this action (or the user has no console role, or is inactive)
--   EA003  invalid console role

-- 1. roles ---------------------------------------------------------------------

do $$
declare
  v_role record;
begin
  for v_role in
    select * from (values
      ('erp_cloud_console', 'The operations console signing a user in: reads the user''s console role (cloud.console_role), nothing else.'),
      ('erp_cloud_console_finance', 'The operations console for a finance user: reads what its pages show (no secrets), and requeries or reissues invoices (cloud.requery_invoice_from_console, cloud.reissue_invoice_from_console).'),
      ('erp_cloud_console_operator', 'The operations console for an operator: the same reads, requery and reissue, and replays or skips any message (cloud.replay_message_from_console, cloud.skip_message_from_console).')
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

grant usage on schema cloud to erp_cloud_console;
grant usage on schema cloud, tax, scm to erp_cloud_console_finance, erp_cloud_console_operator;

-- 2. who has which console role ----------------------------------------------------

create table cloud.console_user (
  login      text primary key,
  role       text not null constraint console_user_role_known check (role in ('operator', 'finance')),
  granted_by text not null,
  granted_at timestamptz not null default now()
);
comment on table cloud.console_user is 'ERP users (sso.app_user.login) who may use the operations console, and as what: operator (everything) or finance (invoices: requery, reissue). A user not listed sees nothing. Kept with cloud.put_console_role.';
comment on column cloud.console_user.role is 'operator: replay and skip any message, requery and reissue invoices; finance: requery and reissue invoices only.';

create table cloud.console_audit (
  id           bigint generated always as identity primary key,
  at           timestamptz not null default now(),
  login        text not null,
  console_role text not null,
  action       text not null constraint console_audit_action_known check (action in ('replay', 'skip', 'requery', 'reissue')),
  target       text not null,
  reason       text not null,
  result       text
);
comment on table cloud.console_audit is 'Every action taken from the operations console: who (ERP login and console role), what (replay, skip, requery, reissue), on which message (request_id) or invoice (id), why, and the resulting request id. Written by the *_from_console functions only.';
comment on column cloud.console_audit.target is 'The request_id of a replayed or skipped message, or the tax.invoice id of a requeried or reissued invoice.';
comment on column cloud.console_audit.result is 'The request id the action queued (the same one for a replay, a new one for a requery or reissue).';
create index console_audit_target on cloud.console_audit (target, id);

create function cloud.put_console_role(
  p_login text,  -- the ERP login (sso.app_user.login)
  p_role  text   -- 'operator', 'finance', or null to take the console away
) returns text
language plpgsql security definer set search_path = '' as $$
begin
  -- SECURITY DEFINER: operators grant console roles without writes on the table
  if p_role is not null and p_role not in ('operator', 'finance') then
    raise exception using errcode = 'EA003', message = format('console role %L is not a console role', p_role),
      detail = 'p_role', hint = 'Pass operator (replay and skip messages, requery and reissue invoices), finance (requery and reissue invoices) or null (no console).';
  end if;
  if p_role is null then
    delete from cloud.console_user u where u.login = p_login;
    return null;
  end if;
  if not exists (select from sso.app_user a where a.login = p_login) then
    raise exception using errcode = 'EO006', message = format('no ERP user with login %L', p_login),
      hint = 'The ERP puts its users with sso.put_user first; then give the login a console role.';
  end if;
  insert into cloud.console_user as u (login, role, granted_by) values (p_login, p_role, session_user)
  on conflict (login) do update set role = excluded.role, granted_by = excluded.granted_by, granted_at = pg_catalog.now()
   where u.role is distinct from excluded.role;
  return p_role;
end $$;
comment on function cloud.put_console_role(text, text) is 'Operator: gives an ERP user a console role (operator or finance), changes it, or takes it away (null). EA003 for another role, EO006 for an unknown login.';

create function cloud.console_role(
  p_login text  -- the ERP login signed in to the console
) returns text
language sql stable security definer set search_path = '' as $$
  -- SECURITY DEFINER: the console learns the role without reading the user table
  select u.role from cloud.console_user u join sso.app_user a on a.login = u.login where u.login = p_login and a.active
$$;
comment on function cloud.console_role(text) is 'The console role of an ERP login (operator, finance), or null: unknown, no console role, or inactive in SSO.';

create function cloud._console_actor(
  p_allowed text[]  -- the console roles the action is for
) returns cloud.console_user
language plpgsql stable set search_path = '' as $$
declare
  v_login text := nullif(pg_catalog.current_setting('erp_cloud.console_user', true), '');
  v_user  cloud.console_user;
begin
  if v_login is null then
    raise exception using errcode = 'EA001', message = 'no console user is signed in to this session',
      hint = 'Console actions run in the console''s request transaction with erp_cloud.console_user set to the signed-in ERP login; from psql use cloud.replay_message and the other SQL verbs.';
  end if;
  select u.* into v_user from cloud.console_user u join sso.app_user a on a.login = u.login where u.login = v_login and a.active;
  if not found or not (v_user.role = any (p_allowed)) then
    raise exception using errcode = 'EA002',
      message = format('console user %s (%s) may not do this', v_login, coalesce(v_user.role, 'no console role')),
      detail = format('needs console role %s', pg_catalog.array_to_string(p_allowed, ' or ')),
      hint = 'An operator gives the user the role with cloud.put_console_role(login, role).';
  end if;
  return v_user;
end $$;
comment on function cloud._console_actor(text[]) is 'Internal: the signed-in console user (erp_cloud.console_user) when their console role is one of p_allowed and they are active; EA001 without a user, EA002 otherwise.';

create function cloud._audit_console_action(p_user cloud.console_user, p_action text, p_target text, p_reason text, p_result text)
returns void
language sql set search_path = '' as $$
  insert into cloud.console_audit (login, console_role, action, target, reason, result)
  values (p_user.login, p_user.role, p_action, p_target, p_reason, p_result)
$$;
comment on function cloud._audit_console_action(cloud.console_user, text, text, text, text) is 'Internal: one row of cloud.console_audit.';

-- 3. the actions -------------------------------------------------------------------

create function cloud.replay_message_from_console(
  p_request_id uuid,  -- the failed, dead or skipped message
  p_reason     text   -- why (required, audited)
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_user cloud.console_user := cloud._console_actor(array['operator']);
begin
  perform cloud._require_reason(p_reason);
  perform cloud.replay_message(p_request_id, p_reason, 'console:' || v_user.login);
  perform cloud._audit_console_action(v_user, 'replay', p_request_id::text, p_reason, p_request_id::text);
  return p_request_id;
end $$;
comment on function cloud.replay_message_from_console(uuid, text) is 'Console, operators only: cloud.replay_message as the signed-in user (actor console:<login>), audited in cloud.console_audit. EA001 / EA002 when no operator is signed in; EC007 without a reason; EC005 / EC006 as cloud.replay_message.';

create function cloud.skip_message_from_console(
  p_request_id uuid,  -- the failed or dead message
  p_reason     text   -- why (required, audited)
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_user cloud.console_user := cloud._console_actor(array['operator']);
begin
  perform cloud._require_reason(p_reason);
  perform cloud.skip_message(p_request_id, p_reason, 'console:' || v_user.login);
  perform cloud._audit_console_action(v_user, 'skip', p_request_id::text, p_reason, null);
  return p_request_id;
end $$;
comment on function cloud.skip_message_from_console(uuid, text) is 'Console, operators only: cloud.skip_message as the signed-in user, audited in cloud.console_audit. EA001 / EA002 when no operator is signed in; EC007 without a reason; EC005 / EC009 as cloud.skip_message.';

create function cloud.requery_invoice_from_console(
  p_invoice_id bigint,  -- tax.invoice id whose outcome is unknown
  p_reason     text     -- why (required, audited)
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_user cloud.console_user := cloud._console_actor(array['operator', 'finance']);
  v_id   uuid;
begin
  perform cloud._require_reason(p_reason);
  v_id := tax.requery_invoice(p_invoice_id);
  perform cloud._audit_console_action(v_user, 'requery', p_invoice_id::text, p_reason, v_id::text);
  return v_id;
end $$;
comment on function cloud.requery_invoice_from_console(bigint, text) is 'Console, operators and finance: tax.requery_invoice as the signed-in user, audited in cloud.console_audit; returns the query message id. EA001 / EA002 without such a user; EC007 without a reason; EI019 as tax.requery_invoice.';

create function cloud.reissue_invoice_from_console(
  p_invoice_id bigint,  -- tax.invoice id the platform refused
  p_buyer      jsonb,   -- the corrected buyer ({"name", "tax_id", …}), or null for the ERP's customer as it is now (the source's refresh_buyer)
  p_reason     text     -- why (required, audited)
) returns uuid
language plpgsql security definer set search_path = '' as $$
declare
  v_user cloud.console_user := cloud._console_actor(array['operator', 'finance']);
  v_id   uuid;
begin
  perform cloud._require_reason(p_reason);
  v_id := tax.reissue_invoice(p_invoice_id, p_buyer);
  perform cloud._audit_console_action(v_user, 'reissue', p_invoice_id::text, p_reason, v_id::text);
  return v_id;
end $$;
comment on function cloud.reissue_invoice_from_console(bigint, jsonb, text) is 'Console, operators and finance: tax.reissue_invoice (new orderNo, corrected buyer checked again) as the signed-in user, audited in cloud.console_audit; returns the new request id. EA001 / EA002 without such a user; EC007 without a reason; EI018, EI029 and the buyer''s validation codes as tax.reissue_invoice.';

-- 4. what the overview and settings pages read ----------------------------------------

create function cloud.attempts_per_minute(
  p_since timestamptz,                          -- the first minute shown
  p_now   timestamptz default clock_timestamp() -- the end of the range
) returns table (endpoint text, minute timestamptz, delivered bigint, failed bigint)
language sql stable set search_path = '' as $$
  select l.endpoint, pg_catalog.date_trunc('minute', l.started_at),
         pg_catalog.count(*) filter (where l.outcome = 'ok'), pg_catalog.count(*) filter (where l.outcome <> 'ok')
    from cloud.log l
   where l.started_at >= p_since and l.started_at < p_now
   group by 1, 2
$$;
comment on function cloud.attempts_per_minute(timestamptz, timestamptz) is 'Attempts per endpoint and minute between p_since and p_now from cloud.log: delivered (answered ok) and failed (any other outcome). Reads only the partitions and blocks of that time range.';

create view cloud.endpoint_settings as
  select e.name as endpoint, e.provider, e.enabled,
         pg_catalog.regexp_replace(e.base_url, '^(https?://)[^/@]*@', '\1') as base_url,
         e.timeout_ms, e.max_attempts, e.backoff_base_ms, e.backoff_cap_ms,
         e.rate_per_s, e.burst, e.circuit_threshold, e.circuit_window, e.circuit_failure_ratio, e.circuit_cooldown_ms, e.circuit_probes,
         e.quota_per_day, e.quota_per_month, e.quota_time_zone,
         coalesce(d.calls, 0) as calls_today, coalesce(m.calls, 0) as calls_this_month,
         e.allow_hosts, e.allow_cidrs, e.allow_private, e.download_hosts, e.updated_at
    from cloud.endpoint e
    left join cloud.endpoint_usage d on d.endpoint = e.name and d.period = 'day'
         and d.period_start = (pg_catalog.now() at time zone e.quota_time_zone)::date
    left join cloud.endpoint_usage m on m.endpoint = e.name and m.period = 'month'
         and m.period_start = pg_catalog.date_trunc('month', pg_catalog.now() at time zone e.quota_time_zone)::date;
comment on view cloud.endpoint_settings is 'Per endpoint, for reading: provider, base URL (any user:password removed), timeouts, retry budget, rate limit, circuit settings, quotas with the calls counted today and this month (in the quota''s time zone), and the egress allowlists. Never the config (secret names, keys) or tokens.';

-- 5. indexes for the console's lookups ---------------------------------------------------

create index invoice_number on tax.invoice (invoice_no) where invoice_no is not null;
create index invoice_failed on tax.invoice (id) where invoice_status = 'failed';
create index document_reference on tax.document (reference);
-- a clerk types the number (JS-2026-0117) where the ERP's reference may carry a prefix (settlement/JS-2026-0117)
create index document_reference_tail on tax.document ((substring(reference from '[^/]*$')));
create index reversal_reference on tax.reversal (reference) where reference is not null;
create index reversal_reference_tail on tax.reversal ((substring(reference from '[^/]*$'))) where reference is not null;
create index reversal_red_invoice on tax.reversal (red_invoice_id) where red_invoice_id is not null;
create index asn_number on scm.asn (asn_no);
create index purchase_order_reference on scm.purchase_order (reference);

-- 6. grants ----------------------------------------------------------------------------

revoke all on function cloud.put_console_role(text, text) from public;
grant execute on function cloud.put_console_role(text, text) to erp_cloud_operator;
revoke all on function cloud.console_role(text) from public;
grant execute on function cloud.console_role(text) to erp_cloud_console, erp_cloud_operator;
revoke all on function cloud._console_actor(text[]) from public;
revoke all on function cloud._audit_console_action(cloud.console_user, text, text, text, text) from public;
revoke all on function cloud.replay_message_from_console(uuid, text) from public;
revoke all on function cloud.skip_message_from_console(uuid, text) from public;
grant execute on function cloud.replay_message_from_console(uuid, text), cloud.skip_message_from_console(uuid, text) to erp_cloud_console_operator;
revoke all on function cloud.requery_invoice_from_console(bigint, text) from public;
revoke all on function cloud.reissue_invoice_from_console(bigint, jsonb, text) from public;
grant execute on function cloud.requery_invoice_from_console(bigint, text), cloud.reissue_invoice_from_console(bigint, jsonb, text) to erp_cloud_console_finance, erp_cloud_console_operator;
revoke all on function cloud.attempts_per_minute(timestamptz, timestamptz) from public;
grant execute on function cloud.attempts_per_minute(timestamptz, timestamptz) to erp_cloud_console_finance, erp_cloud_console_operator, erp_cloud_operator;

grant select on cloud.console_user, cloud.console_audit to erp_cloud_console_finance, erp_cloud_console_operator, erp_cloud_operator;
grant select on cloud.endpoint_settings to erp_cloud_console_finance, erp_cloud_console_operator, erp_cloud_operator;
grant select on cloud.endpoint_status, cloud.parked_keys, cloud.attempt_history, cloud.log, cloud.outbox, cloud.replay_audit,
                cloud.listener
   to erp_cloud_console_finance, erp_cloud_console_operator;
grant select on tax.invoice_status, tax.red_invoice_status, tax.invoice, tax.document, tax.attachment, tax.reversal,
                tax.invoice_event, tax.source
   to erp_cloud_console_finance, erp_cloud_console_operator;
grant select on scm.order_status, scm.asn_status, scm.purchase_order, scm.purchase_order_line, scm.supplier, scm.asn, scm.asn_line,
                scm.asn_quarantine, scm.source
   to erp_cloud_console_finance, erp_cloud_console_operator;

create policy "The operations console sees every purchase order" on scm.purchase_order for select to erp_cloud_console_finance, erp_cloud_console_operator using (true);
create policy "The operations console sees every purchase order line" on scm.purchase_order_line for select to erp_cloud_console_finance, erp_cloud_console_operator using (true);
create policy "The operations console sees every supplier" on scm.supplier for select to erp_cloud_console_finance, erp_cloud_console_operator using (true);
create policy "The operations console sees every ASN" on scm.asn for select to erp_cloud_console_finance, erp_cloud_console_operator using (true);
create policy "The operations console sees every ASN line" on scm.asn_line for select to erp_cloud_console_finance, erp_cloud_console_operator using (true);

-- the views' private functions run with the reader's rights
grant execute on function tax._outcome_unknown(tax.invoice), cloud._counts_toward_attempts(text, integer, text)
   to erp_cloud_console_finance, erp_cloud_console_operator;

-- 7. what the indexes and policies are for ---------------------------------------------

comment on index cloud.console_audit_target is 'The audit of one message or invoice (a document''s timeline).';
comment on index tax.invoice_number is 'The console''s search by invoice number.';
comment on index tax.invoice_failed is 'Needs attention: failed invoices, newest first (keyset on id).';
comment on index tax.document_reference is 'The console''s search by a document''s reference alone (without its source).';
comment on index tax.document_reference_tail is 'The console''s search by the number after the last ''/'' of a reference (settlement/JS-2026-0117 by JS-2026-0117).';
comment on index tax.reversal_reference is 'The console''s search by a reversal''s reference.';
comment on index tax.reversal_reference_tail is 'The console''s search by the number after the last ''/'' of a reversal''s reference.';
comment on index tax.reversal_red_invoice is 'From a red invoice to its reversal.';
comment on index scm.asn_number is 'The console''s search by ASN number (without the supplier).';
comment on index scm.purchase_order_reference is 'The console''s search by an order''s reference alone (without its source).';
comment on column cloud.console_user.login is 'The ERP login (sso.app_user.login) the console signs in.';
comment on column cloud.console_user.granted_by is 'The database user who gave the role (session_user of cloud.put_console_role).';
comment on column cloud.console_audit.login is 'The ERP login signed in to the console (erp_cloud.console_user).';
comment on policy "The operations console sees every purchase order" on scm.purchase_order is 'The console''s finance and operator roles read every order (procurement page).';
comment on policy "The operations console sees every purchase order line" on scm.purchase_order_line is 'The console''s finance and operator roles read every order line.';
comment on policy "The operations console sees every supplier" on scm.supplier is 'The console''s finance and operator roles read every supplier (scm.order_status joins it).';
comment on policy "The operations console sees every ASN" on scm.asn is 'The console''s finance and operator roles read every ASN (procurement page).';
comment on policy "The operations console sees every ASN line" on scm.asn_line is 'The console''s finance and operator roles read every ASN line.';
