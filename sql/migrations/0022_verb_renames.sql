-- 0022 — the stragglers take the verbs of the vocabulary (issue 16; the ADR's
-- 0024, numbered 0022 here). Behaviour is unchanged: every renamed function
-- keeps its body, signature, grants and comment, and its old name stays one
-- release as a thin wrapper (same signature, same grants, calling the new
-- name, commented 'Deprecated: …'), so a listener or provider of the
-- previous release keeps working during a rolling restart. The next release
-- drops the wrappers.
--
-- The vocabulary is the verb table of sql/README.md ("Naming"); a test
-- (test/conventions.test.ts) now fails when a public function's name matches
-- none of its patterns.
--
--   retention, one verb (purge_):
--     cloud.age_out_log                 → cloud.purge_log_partitions
--   inbound, one verb (ingest_):
--     tax.accept_invoice_callback       → tax.ingest_invoice_callback
--     tax.accept_red_confirm_callback   → tax.ingest_red_confirm_callback
--   settings, one verb (put_):
--     sso.set_client_uris               → sso.put_client_uris
--     sso.enable_client, disable_client → sso.put_client_enabled(p_client_id, p_enabled)
--     sso.record_issuer                 → sso.put_issuer
--     sso.record_id_token_ttl           → sso.put_id_token_ttl
--   write-back handlers, record_<operation>_<outcome>:
--     tax.record_pdf                    → tax.record_pdf_downloaded      (tax.download_pdf)
--     tax.record_invoice_result         → tax.record_query_answered      (tax.query)
--     tax.record_reinvoice_answer       → tax.record_reinvoice_answered  (tax.reinvoice)
--     tax.record_red_confirm_status     → tax.record_red_query_answered  (tax.red_query)
--     scm.record_asn_pull               → scm.record_asn_pull_answered   (scm.asn_pull)
--   the SSO audit trail, its own verb (audit_), not an outcome:
--     sso.record_event, record_failure  → sso.audit_event, sso.audit_failure
--   triggers named for their table and order (STYLE.md 4):
--     tax.invoice  update_invoice_status → invoice_800_record_event,
--                  tax.log_invoice_event → tax.tg_invoice__800_record_event
--     sso.client   client_uris_valid     → client_100_validate_uris,
--                  sso._client_uris_valid → sso.tg_client__100_validate_uris
--
-- After this, record_ means one thing: write down what happened (the
-- engine's attempts and listener life, and a cloud's answer about one
-- operation in the write-back handlers).
--
-- cloud.operation_handler names its handlers by OID (regprocedure), so the
-- renamed handlers stay registered; they are registered again by their new
-- names all the same, so the rows this file leaves are what it says.
-- cloud.run_maintenance, cloud._log_partition_comment and the pg_cron job
-- text (cloud.schedule_maintenance_jobs, re-run when pg_cron is present)
-- name cloud.purge_log_partitions; the sso functions that audit or name a
-- renamed function in a hint are re-created with the new names. Comments of
-- tables and of the existing cloud.log partitions follow.
--
-- The invoice-event trigger fired after invoice_900_call_source only because
-- its name sorted after it; as invoice_800_record_event it fires before,
-- which is the order its number says: the event is written down before the
-- source hears of the change. Neither reads what the other writes.
--
-- Not renamed here: the reference ERP's triggers and trigger functions on
-- erp.settlement, erp.shipment and erp.purchase_order(_line)
-- (tax.tg_document__100_stamp, erp.tg_purchase_order__500_enqueue, …):
-- 0023 moves the reference ERP out of the product and renames them there.
--
-- SQLSTATEs (class EO; mirrored in listener/kernel/errors.ts):
--   EO029  invalid client setting: sso.put_client_enabled without true or false


-- 1. cloud: retention is purge_ ------------------------------------------------

alter function cloud.age_out_log(interval, timestamptz) rename to purge_log_partitions;

create or replace function cloud.run_maintenance(p_now timestamptz default clock_timestamp()) returns jsonb
language sql as $$
  select jsonb_build_object(
    'reaped', cloud.reap_expired_leases(p_now),
    'woken_channels', cloud.wake_due_messages(p_now),
    'partitions_created', cloud.ensure_log_partitions(2, p_now),
    'partitions_dropped', cloud.purge_log_partitions(null, p_now),
    'messages_purged', cloud.purge_finished_messages(null, 100000, p_now),
    'usage_purged', cloud.purge_endpoint_usage(p_now),
    'cron_history_purged', cloud.purge_cron_history());
$$;

create or replace function cloud._log_partition_comment(p_month date) returns text
language sql immutable set search_path = '' as $$
  select pg_catalog.format('Cloud_Log for %s (UTC): one month of cloud.log. Created ahead by cloud.ensure_log_partitions; dropped whole by cloud.purge_log_partitions once the month is older than the log_retention setting.',
                           pg_catalog.to_char(p_month, 'YYYY-MM'))
$$;

create or replace function cloud.schedule_maintenance_jobs() returns integer
language plpgsql as $$
begin
  if to_regnamespace('cron') is null then
    return 0;
  end if;
  perform cron.schedule('erp-cloud: reap expired leases', '* * * * *', 'select cloud.reap_expired_leases()');
  perform cron.schedule('erp-cloud: wake due retries', '* * * * *', 'select cloud.wake_due_messages()');
  perform cron.schedule('erp-cloud: log partitions', '7 * * * *', 'select cloud.ensure_log_partitions(); select cloud.purge_log_partitions()');
  perform cron.schedule('erp-cloud: purge finished', '17 * * * *',
    'select cloud.purge_finished_messages(); select cloud.purge_endpoint_usage(); select cloud.purge_cron_history()');
  return 4;
end $$;

-- the job 'erp-cloud: log partitions' is updated in place (cron.schedule by name)
do $$
begin
  if to_regnamespace('cron') is not null then
    perform cloud.schedule_maintenance_jobs();
  end if;
end $$;

-- the partitions that exist now get the comment new ones get
do $$
declare
  v_part record;
begin
  for v_part in
    select c.relname from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'cloud.log'::regclass and c.relname ~ '^log_p[0-9]{6}$'
  loop
    execute format('comment on table cloud.%I is %L', v_part.relname,
                   cloud._log_partition_comment(to_date(substr(v_part.relname, 6), 'YYYYMM')));
  end loop;
end $$;

comment on table cloud.log is 'Cloud_Log: one row per HTTP attempt, secrets redacted, bodies size-capped. Partitioned by month (cloud.log_pYYYYMM); old months are dropped by cloud.purge_log_partitions.';
comment on table cloud.log_default is 'Cloud_Log rows of a month that has no partition of its own. Normally empty: cloud.ensure_log_partitions creates this month and the next two ahead (pg_cron hourly, or the listener''s maintenance). Rows here mean partitions were missing; that month''s partition cannot be created while they are here, and cloud.purge_log_partitions never drops them.';

create function cloud.age_out_log(p_keep interval default null, p_now timestamptz default clock_timestamp()) returns integer
language sql as $$ select cloud.purge_log_partitions(p_keep, p_now) $$;
comment on function cloud.age_out_log(interval, timestamptz) is 'Deprecated: use cloud.purge_log_partitions; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function cloud.age_out_log(interval, timestamptz) from public;
grant execute on function cloud.age_out_log(interval, timestamptz) to erp_cloud_listener;

-- 2. tax: inbound is ingest_, write-backs record_<operation>_<outcome> --------

alter function tax.accept_invoice_callback(text, jsonb) rename to ingest_invoice_callback;
alter function tax.accept_red_confirm_callback(text, jsonb) rename to ingest_red_confirm_callback;
alter function tax.record_pdf(cloud.outbox, jsonb) rename to record_pdf_downloaded;
alter function tax.record_invoice_result(cloud.outbox, jsonb) rename to record_query_answered;
alter function tax.record_reinvoice_answer(cloud.outbox, jsonb) rename to record_reinvoice_answered;
alter function tax.record_red_confirm_status(cloud.outbox, jsonb) rename to record_red_query_answered;

select cloud.put_operation_handler('tax.query', 'tax.record_query_answered(cloud.outbox, jsonb)', 'tax.record_query_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.reinvoice', 'tax.record_reinvoice_answered(cloud.outbox, jsonb)', 'tax.record_reinvoice_answered(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.download_pdf', 'tax.record_pdf_downloaded(cloud.outbox, jsonb)', 'tax.record_pdf_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.red_query', 'tax.record_red_query_answered(cloud.outbox, jsonb)', 'tax.record_query_failed(cloud.outbox, jsonb)');

comment on table tax.attachment is 'Files of an invoice: its PDF lands here after issue (tax.record_pdf_downloaded), with its sha256 and size; one file name per invoice.';

create function tax.accept_invoice_callback(p_order_no text, p_content jsonb) returns text
language sql as $$ select tax.ingest_invoice_callback(p_order_no, p_content) $$;
comment on function tax.accept_invoice_callback(text, jsonb) is 'Deprecated: use tax.ingest_invoice_callback; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.accept_invoice_callback(text, jsonb) from public;
grant execute on function tax.accept_invoice_callback(text, jsonb) to erp_cloud_listener;
create function tax.accept_red_confirm_callback(p_bill_id text, p_content jsonb) returns text
language sql as $$ select tax.ingest_red_confirm_callback(p_bill_id, p_content) $$;
comment on function tax.accept_red_confirm_callback(text, jsonb) is 'Deprecated: use tax.ingest_red_confirm_callback; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.accept_red_confirm_callback(text, jsonb) from public;
grant execute on function tax.accept_red_confirm_callback(text, jsonb) to erp_cloud_listener;
create function tax.record_pdf(m cloud.outbox, r jsonb) returns void
language sql as $$ select tax.record_pdf_downloaded(m, r) $$;
comment on function tax.record_pdf(cloud.outbox, jsonb) is 'Deprecated: use tax.record_pdf_downloaded; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.record_pdf(cloud.outbox, jsonb) from public;
grant execute on function tax.record_pdf(cloud.outbox, jsonb) to erp_cloud_listener;
create function tax.record_invoice_result(m cloud.outbox, r jsonb) returns void
language sql as $$ select tax.record_query_answered(m, r) $$;
comment on function tax.record_invoice_result(cloud.outbox, jsonb) is 'Deprecated: use tax.record_query_answered; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.record_invoice_result(cloud.outbox, jsonb) from public;
grant execute on function tax.record_invoice_result(cloud.outbox, jsonb) to erp_cloud_listener;
create function tax.record_reinvoice_answer(m cloud.outbox, r jsonb) returns void
language sql as $$ select tax.record_reinvoice_answered(m, r) $$;
comment on function tax.record_reinvoice_answer(cloud.outbox, jsonb) is 'Deprecated: use tax.record_reinvoice_answered; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.record_reinvoice_answer(cloud.outbox, jsonb) from public;
grant execute on function tax.record_reinvoice_answer(cloud.outbox, jsonb) to erp_cloud_listener;
create function tax.record_red_confirm_status(m cloud.outbox, r jsonb) returns void
language sql as $$ select tax.record_red_query_answered(m, r) $$;
comment on function tax.record_red_confirm_status(cloud.outbox, jsonb) is 'Deprecated: use tax.record_red_query_answered; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function tax.record_red_confirm_status(cloud.outbox, jsonb) from public;
grant execute on function tax.record_red_confirm_status(cloud.outbox, jsonb) to erp_cloud_listener;

-- the invoice-event trigger: named for its table and order
alter trigger update_invoice_status on tax.invoice rename to invoice_800_record_event;
alter function tax.log_invoice_event() rename to tg_invoice__800_record_event;
comment on function tax.tg_invoice__800_record_event() is 'Trigger invoice_800_record_event: records each change of an invoice''s invoice_no in tax.invoice_event.';
comment on table tax.invoice_event is 'Invoice event log: every change of tax.invoice.invoice_no (trigger invoice_800_record_event), with the status at that moment and who made it.';

-- 3. scm: the delivery-list write-back ------------------------------------------

alter function scm.record_asn_pull(cloud.outbox, jsonb) rename to record_asn_pull_answered;
select cloud.put_operation_handler('scm.asn_pull', 'scm.record_asn_pull_answered(cloud.outbox, jsonb)', null);

create function scm.record_asn_pull(p_msg cloud.outbox, p_response jsonb) returns void
language sql as $$ select scm.record_asn_pull_answered(p_msg, p_response) $$;
comment on function scm.record_asn_pull(cloud.outbox, jsonb) is 'Deprecated: use scm.record_asn_pull_answered; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function scm.record_asn_pull(cloud.outbox, jsonb) from public;
grant execute on function scm.record_asn_pull(cloud.outbox, jsonb) to erp_cloud_listener;

-- 4. sso: settings are put_, the audit trail is audit_ --------------------------

alter function sso.set_client_uris(text, text[], text[], text) rename to put_client_uris;
alter function sso.record_issuer(text) rename to put_issuer;
alter function sso.record_id_token_ttl(integer) rename to put_id_token_ttl;
alter function sso.record_event(text, text, bigint, inet, text, text) rename to audit_event;
alter function sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz) rename to audit_failure;

comment on function sso.audit_event(text, text, bigint, inet, text, text) is 'Appends one row to sso.audit at the database''s time (the login is looked up from the user id). With sso.audit_failure (which counts failures for throttling and aggregates them past the threshold), the only way the provider writes the audit.';
comment on table sso.failure_window is 'Failed SSO requests counted per (source address, client, kind) in the current throttle window, shared by every provider instance (sso.audit_failure). A window starts with the first failure after the previous one ended; successes are not counted. Rows idle for a day are removed by sso.purge_expired.';

create function sso.put_client_enabled(
  p_client_id text,    -- the client (EO001 when unknown)
  p_enabled   boolean  -- true: it may sign users in; false: stopped at once on every instance
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  if p_enabled is null then
    raise exception using errcode = 'EO029', message = format('enabled for SSO client %s must be true or false, not null', p_client_id),
      hint = 'Pass true to let the client sign users in, false to stop it.';
  end if;
  perform sso._client(p_client_id);
  update sso.client set enabled = p_enabled, disabled_at = case when p_enabled then null else pg_catalog.now() end
   where client_id = p_client_id and enabled <> p_enabled;
end $$;
comment on function sso.put_client_enabled(text, boolean) is 'Enables or disables a client: disabled, it stops at once on every provider instance (no new logins, no code exchange, no jumps); enabled again, it signs users in again. The same call twice is one change. EO001 for an unknown client, EO029 for a null p_enabled.';
revoke execute on function sso.put_client_enabled(text, boolean) from public;
grant execute on function sso.put_client_enabled(text, boolean) to erp_cloud_operator;

-- the old pair: bodies become wrappers (create or replace keeps their grants)
create or replace function sso.enable_client(p_client_id text) returns void
language sql as $$ select sso.put_client_enabled(p_client_id, true) $$;
comment on function sso.enable_client(text) is 'Deprecated: use sso.put_client_enabled(p_client_id, true); removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
create or replace function sso.disable_client(p_client_id text) returns void
language sql as $$ select sso.put_client_enabled(p_client_id, false) $$;
comment on function sso.disable_client(text) is 'Deprecated: use sso.put_client_enabled(p_client_id, false); removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';

comment on table sso.client is 'One relying party. Managed with sso.register_client, sso.rotate_client_secret, sso.put_client_enabled and sso.put_client_uris; the provider reads it on every request, so changes apply at once on every instance.';

-- the functions that audit, or name a renamed function in a hint: same bodies, new names
create or replace function sso.audit_failure(p_source_addr inet, p_throttle_client text, p_kind text, p_client_id text, p_user_id bigint, p_code text, p_detail text, p_threshold integer, p_window interval, p_audited boolean DEFAULT false, p_now timestamp with time zone DEFAULT now())
returns integer
language plpgsql
security definer
set search_path = ''
as $function$
declare
  v_w  sso.failure_window;
  v_id bigint;
begin
  -- SECURITY DEFINER: the provider appends to the audit through here and sso.audit_event only
  perform sso._check_throttle(p_threshold, p_window);
  -- one statement: concurrent failures of one key are serialised by the row
  -- lock it takes; an ended window starts again at this failure
  insert into sso.failure_window as f (source_key, client_key, kind, window_start, failures, last_at)
  values (coalesce(pg_catalog.host(p_source_addr), ''), coalesce(p_throttle_client, ''), p_kind, p_now, 1, p_now)
  on conflict (source_key, client_key, kind) do update
     set window_start = case when f.window_start + p_window <= p_now then p_now else f.window_start end,
         failures     = case when f.window_start + p_window <= p_now then 1 else f.failures + 1 end,
         audit_id     = case when f.window_start + p_window <= p_now then null else f.audit_id end,
         last_at      = greatest(f.last_at, p_now)
  returning * into v_w;

  if v_w.failures <= p_threshold or p_audited then
    -- within the threshold: a row of its own. A failure the caller already
    -- audited (it passed the throttle check just before the threshold was
    -- reached by a concurrent request) keeps its own row and is not counted twice.
    if not p_audited then
      perform sso.audit_event('failure', p_client_id, p_user_id, p_source_addr, p_code, p_detail);
    end if;
  elsif v_w.audit_id is null then
    insert into sso.audit (at, event, user_id, login, client_id, source_addr, code, detail, occurrences, last_at)
    select p_now, 'failure', p_user_id, (select u.login from sso.app_user u where u.id = p_user_id), p_client_id, p_source_addr,
           'throttled', pg_catalog.left(format('%s failures past the threshold of %s in %s from this source (first: %s: %s)',
                                               p_kind, p_threshold, p_window, p_code, p_detail), 1000), 1, p_now
    returning id into v_id;
    update sso.failure_window set audit_id = v_id
     where (source_key, client_key, kind) = (v_w.source_key, v_w.client_key, v_w.kind);
  else
    update sso.audit set occurrences = occurrences + 1, last_at = greatest(last_at, p_now) where id = v_w.audit_id;
  end if;

  if v_w.failures >= p_threshold then
    return greatest(1, ceil(extract(epoch from (v_w.window_start + p_window - p_now)))::integer);
  end if;
  return null;
end $function$;

create or replace function sso.issue_jump_ticket(p_login text, p_client_id text, p_source_addr inet DEFAULT NULL::inet, p_ttl interval DEFAULT '00:01:00'::interval)
returns text
language plpgsql
security definer
set search_path = ''
as $function$
declare
  v_user   sso.app_user;
  v_client sso.client;
  v_issuer text;
  v_ticket text := sso._random_token();
  v_source inet := coalesce(p_source_addr, pg_catalog.inet_client_addr());
  v_now    timestamptz := pg_catalog.now();  -- never the caller's clock: the lifetime and audit time are ours
begin
  select * into v_user from sso.app_user u where u.login = p_login;
  if not found then
    raise exception using errcode = 'EO006', message = format('no ERP user with login %L', p_login),
      hint = 'Pass the login of the user signed in to the ERP, as the ERP put it with sso.put_user (sso.app_user.login).';
  end if;
  if not v_user.active then
    raise exception using errcode = 'EO007', message = format('ERP user %s is inactive', p_login),
      hint = 'The ERP reactivates the user (sso.put_user with p_active => true) before the user may open the platform.';
  end if;
  v_client := sso._client(p_client_id);
  if not v_client.enabled then
    raise exception using errcode = 'EO005', message = format('SSO client %s is disabled', p_client_id),
      hint = 'An operator re-enables it with sso.put_client_enabled(client_id, true).';
  end if;
  if v_client.initiate_login_uri is null then
    raise exception using errcode = 'EO008', message = format('SSO client %s has no login-initiation URI', p_client_id),
      hint = 'Set the platform''s login-initiation URL with sso.put_client_uris (erp-cloud sso register-client shows the lists), or let users start at the platform''s login page.';
  end if;
  select s.value into v_issuer from sso.setting s where s.name = 'issuer';
  if v_issuer is null then
    raise exception using errcode = 'EO011', message = 'the SSO issuer URL is not known yet',
      hint = 'Start the OpenID Provider once (erp-cloud sso serve); it records its issuer URL.';
  end if;
  if p_ttl is null or p_ttl <= interval '0' or p_ttl > interval '10 minutes' then
    raise exception using errcode = 'EO010', message = format('jump ticket lifetime %s is out of range', p_ttl),
      hint = 'Use a lifetime above zero and at most 10 minutes; the default (60 seconds) suits a button click.';
  end if;
  insert into sso.jump_ticket (ticket_sha256, user_id, client_id, issued_at, expires_at, issued_from)
  values (sso._sha256(v_ticket), v_user.id, p_client_id, v_now, v_now + p_ttl, v_source);
  perform sso.audit_event('ticket_issued', p_client_id, v_user.id, v_source, null, format('valid until %s', v_now + p_ttl));
  return v_issuer || '/jump?ticket=' || v_ticket;
end $function$;

create or replace function sso.open_jump_ticket(p_ticket text, p_binding text, p_source_addr inet DEFAULT NULL::inet)
returns SETOF sso.jump_outcome
language plpgsql
set search_path = ''
as $function$
declare
  v_t sso.jump_ticket;
  v_c sso.client;
begin
  -- the /jump step: binds a live ticket to the first browser that opens it.
  -- No row when the ticket is unknown, used, expired or its client disabled
  -- (sso.consume_jump_ticket then records why); EO024 for a second browser.
  select * into v_t from sso.jump_ticket t where t.ticket_sha256 = sso._sha256(p_ticket) for update;
  if not found or v_t.consumed_at is not null or v_t.expires_at <= pg_catalog.now() then
    return;
  end if;
  select * into v_c from sso.client c where c.client_id = v_t.client_id;
  if not v_c.enabled then
    return;
  end if;
  if v_t.bound_sha256 is not null then
    perform sso.audit_event('failure', v_t.client_id, v_t.user_id, p_source_addr, 'EO024',
                             format('the jump link was already opened in another browser at %s', v_t.opened_at));
    return next (null, v_t.client_id, null, 'EO024', 'the jump link was already opened in another browser')::sso.jump_outcome;
    return;
  end if;
  if p_binding is null or pg_catalog.length(p_binding) < 32 then
    raise exception using errcode = 'EO010', message = 'a jump binding needs at least 32 characters of randomness',
      hint = 'The provider passes a fresh random value per browser (listener/sso/interactions.ts).';
  end if;
  update sso.jump_ticket set opened_at = pg_catalog.now(), bound_sha256 = sso._sha256(p_binding)
   where ticket_sha256 = v_t.ticket_sha256;
  return next (v_t.user_id, v_t.client_id, v_c.initiate_login_uri, null, null)::sso.jump_outcome;
end $function$;

create or replace function sso.consume_jump_ticket(p_ticket text, p_client_id text, p_source_addr inet DEFAULT NULL::inet, p_binding text DEFAULT NULL::text)
returns sso.jump_outcome
language plpgsql
set search_path = ''
as $function$
declare
  v_t      sso.jump_ticket;
  v_user   sso.app_user;
  v_client sso.client;
  v_code   text;
  v_reason text;
begin
  select * into v_t from sso.jump_ticket t where t.ticket_sha256 = sso._sha256(p_ticket) for update;
  if not found then
    v_code := 'EO020'; v_reason := 'the jump link is not valid';
  elsif v_t.consumed_at is not null then
    v_code := 'EO021'; v_reason := 'the jump link was already used';
  elsif v_t.expires_at <= pg_catalog.now() then
    v_code := 'EO022'; v_reason := 'the jump link has expired';
  else
    select * into v_client from sso.client c where c.client_id = v_t.client_id;
    select * into v_user from sso.app_user u where u.id = v_t.user_id;
    if not v_client.enabled then
      v_code := 'EO005'; v_reason := 'the application is disabled for single sign-on';
    elsif not v_user.active then
      v_code := 'EO007'; v_reason := 'the ERP user is inactive';
    elsif p_client_id is null or v_t.client_id <> p_client_id then
      -- null: presented outside an authorization request (the /jump step after a failed peek)
      v_code := 'EO023'; v_reason := 'the jump link was issued for another application';
    elsif v_t.bound_sha256 is null or p_binding is null or v_t.bound_sha256 <> sso._sha256(p_binding) then
      -- not opened at /jump, or opened there by another browser: a copied cookie or link
      v_code := 'EO024'; v_reason := 'the jump link was opened in another browser';
    end if;
  end if;
  -- a presented ticket is used up whatever happens next
  if v_t.ticket_sha256 is not null and v_t.consumed_at is null then
    update sso.jump_ticket set consumed_at = pg_catalog.now(), consumed_from = p_source_addr where ticket_sha256 = v_t.ticket_sha256;
  end if;
  if v_code is null then
    perform sso.audit_event('ticket_consumed', p_client_id, v_t.user_id, p_source_addr, null, null);
    return (v_t.user_id, v_t.client_id, v_client.initiate_login_uri, null, null)::sso.jump_outcome;
  end if;
  perform sso.audit_event('failure', coalesce(p_client_id, v_t.client_id), v_t.user_id, p_source_addr, v_code,
                           v_reason || case when v_code = 'EO023' then format(' (issued for %s)', v_t.client_id) else '' end);
  return (null, v_t.client_id, null, v_code, v_reason)::sso.jump_outcome;
end $function$;

create or replace function sso.register_client(p_client_id text, p_display_name text, p_redirect_uris text[], p_post_logout_redirect_uris text[] DEFAULT '{}'::text[], p_initiate_login_uri text DEFAULT NULL::text)
returns sso.client_credentials
language plpgsql
security definer
set search_path = ''
as $function$
declare
  v_secret text := sso._random_token();
begin
  if p_client_id is null or p_client_id !~ '^[a-z][a-z0-9_.-]{1,62}$' or coalesce(pg_catalog.btrim(p_display_name), '') = '' then
    raise exception using errcode = 'EO004', message = format('client id %L or its display name is not valid', p_client_id),
      hint = 'Use a lower-case id (letters, digits, . _ -, 2 to 63 characters) and a non-empty display name.';
  end if;
  if coalesce(cardinality(p_redirect_uris), 0) = 0 then
    raise exception using errcode = 'EO003', message = format('client %s needs at least one redirect URI', p_client_id),
      hint = 'Pass the platform''s OpenID Connect callback URL, e.g. array[''https://saas.example.com/oidc/callback''].';
  end if;
  perform sso._check_uris('redirect URI', p_redirect_uris);
  perform sso._check_uris('post-logout redirect URI', p_post_logout_redirect_uris);
  perform sso._check_uris('login-initiation URI', case when p_initiate_login_uri is null then '{}'::text[] else array[p_initiate_login_uri] end);
  insert into sso.client (client_id, display_name, redirect_uris, post_logout_redirect_uris, initiate_login_uri, secret_sha256)
  values (p_client_id, p_display_name, p_redirect_uris, coalesce(p_post_logout_redirect_uris, '{}'), p_initiate_login_uri, sso._sha256(v_secret))
  on conflict (client_id) do nothing;
  if not found then
    raise exception using errcode = 'EO002', message = format('SSO client %s is already registered', p_client_id),
      hint = 'Choose another id, or use sso.rotate_client_secret / sso.put_client_enabled on the existing one.';
  end if;
  return (p_client_id, v_secret)::sso.client_credentials;
end $function$;

create function sso.set_client_uris(p_client_id text, p_redirect_uris text[], p_post_logout_redirect_uris text[], p_initiate_login_uri text) returns void
language sql as $$ select sso.put_client_uris(p_client_id, p_redirect_uris, p_post_logout_redirect_uris, p_initiate_login_uri) $$;
comment on function sso.set_client_uris(text, text[], text[], text) is 'Deprecated: use sso.put_client_uris; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function sso.set_client_uris(text, text[], text[], text) from public;
grant execute on function sso.set_client_uris(text, text[], text[], text) to erp_cloud_operator;
create function sso.record_issuer(p_issuer text) returns void
language sql as $$ select sso.put_issuer(p_issuer) $$;
comment on function sso.record_issuer(text) is 'Deprecated: use sso.put_issuer; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function sso.record_issuer(text) from public;
grant execute on function sso.record_issuer(text) to erp_cloud_sso;
create function sso.record_id_token_ttl(p_seconds integer) returns void
language sql as $$ select sso.put_id_token_ttl(p_seconds) $$;
comment on function sso.record_id_token_ttl(integer) is 'Deprecated: use sso.put_id_token_ttl; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function sso.record_id_token_ttl(integer) from public;
grant execute on function sso.record_id_token_ttl(integer) to erp_cloud_sso;
create function sso.record_event(p_event text, p_client_id text, p_user_id bigint, p_source_addr inet, p_code text default null, p_detail text default null) returns void
language sql as $$ select sso.audit_event(p_event, p_client_id, p_user_id, p_source_addr, p_code, p_detail) $$;
comment on function sso.record_event(text, text, bigint, inet, text, text) is 'Deprecated: use sso.audit_event; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function sso.record_event(text, text, bigint, inet, text, text) from public;
grant execute on function sso.record_event(text, text, bigint, inet, text, text) to erp_cloud_sso;
create function sso.record_failure(p_source_addr inet, p_throttle_client text, p_kind text, p_client_id text, p_user_id bigint, p_code text, p_detail text, p_threshold integer, p_window interval, p_audited boolean default false, p_now timestamptz default now()) returns integer
language sql as $$ select sso.audit_failure(p_source_addr, p_throttle_client, p_kind, p_client_id, p_user_id, p_code, p_detail, p_threshold, p_window, p_audited, p_now) $$;
comment on function sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz) is 'Deprecated: use sso.audit_failure; removed in the next release. Kept one release so a listener of the previous release keeps working during a rolling restart.';
revoke execute on function sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz) from public;
grant execute on function sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz) to erp_cloud_sso;

-- the URI check on sso.client: named for its table and order
alter trigger client_uris_valid on sso.client rename to client_100_validate_uris;
alter function sso._client_uris_valid() rename to tg_client__100_validate_uris;
comment on function sso.tg_client__100_validate_uris() is 'Trigger client_100_validate_uris on sso.client: every write of a client''s URIs passes sso._check_uris, whoever makes it (EO003).';
