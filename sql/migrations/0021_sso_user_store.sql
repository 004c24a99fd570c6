-- 0021 — the SSO identity store leaves the reference ERP's schema
-- (ADR 0001 §2.10, §3.6; the ADR's 0023, numbered 0021 here).
--
-- The users the OpenID Provider signs in are erp-cloud's own data, not the
-- reference ERP's, so they live in sso now:
--
--   erp.app_user → sso.app_user
--
-- The table is moved with ALTER TABLE … SET SCHEMA: ids (the OIDC subject,
-- app_user.id, "stable, never reused"), its identity sequence, constraints,
-- indexes, comments and grants move with it, and the foreign key
-- sso.jump_ticket.user_id follows it (a foreign key names the table by OID).
-- No name needs changing: app_user_pkey, app_user_login_key, the three
-- app_user_* checks and app_user_id_seq are free in sso. No row is copied.
--
-- Every sso function that named erp.app_user is re-created against
-- sso.app_user with the same signature, behaviour, grants and comment:
-- sso.issue_jump_ticket (its hints now name sso.put_user),
-- sso.consume_jump_ticket, sso.record_event, sso.record_failure. No other
-- function of any schema names the table.
--
-- New: sso.put_user, how an ERP keeps its users current: an upsert by login
-- that returns the stable subject id (a new login gets a new id, a known one
-- keeps its id whatever else changes). It checks every field before it
-- writes, with EO028 naming the field.
--
-- For readers of an upgraded installation, schema erp keeps a read-only
-- compatibility view erp.app_user (the same columns, security_invoker),
-- readable by the roles that could read the table. Writes go through
-- sso.put_user; the moved table keeps the privileges it had, so an ERP that
-- wrote the rows itself may write sso.app_user instead.
--
-- SQLSTATEs (class EO; mirrored in listener/errors.ts):
--   EO028  invalid ERP user (login, display name, email, active flag or supplier-collaboration role)

-- 1. the table ----------------------------------------------------------------

alter table erp.app_user set schema sso;
comment on table sso.app_user is 'The users the OpenID Provider signs in (its identity source), kept current by the ERP with sso.put_user. An inactive user cannot sign in anywhere through SSO, even with a live session. Until release 0021 this was erp.app_user (same ids); the view erp.app_user still shows it.';
comment on column sso.app_user.login is 'The ERP login name (preferred_username claim); the key of sso.put_user and what the ERP passes to sso.issue_jump_ticket.';
comment on schema sso is 'Single sign-on: the users it signs in (the identity source), the OpenID Provider''s clients, storage, signing-key schedule, jump tickets and audit.';

-- 2. the functions that read it -----------------------------------------------

create or replace function sso.record_event(
  p_event       text,                 -- ticket_issued, ticket_consumed, login, logout, failure
  p_client_id   text,
  p_user_id     bigint,
  p_source_addr inet,
  p_code        text default null,    -- EO0xx or the OAuth error
  p_detail      text default null     -- one line for a person
) returns void
language sql security definer set search_path = '' as $$
  -- SECURITY DEFINER: the provider appends through here only (no INSERT on sso.audit), and the time is the database's
  insert into sso.audit (at, event, user_id, login, client_id, source_addr, code, detail)
  select pg_catalog.now(), p_event, p_user_id, (select u.login from sso.app_user u where u.id = p_user_id), p_client_id, p_source_addr,
         p_code, pg_catalog.left(p_detail, 1000)
$$;

create or replace function sso.issue_jump_ticket(
  p_login       text,                          -- the ERP user signed in to the ERP
  p_client_id   text,                          -- the platform to open
  p_source_addr inet default null,             -- the user's browser address as the ERP saw it
  p_ttl         interval default interval '60 seconds'
) returns text
language plpgsql security definer set search_path = '' as $$
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
      hint = 'An operator re-enables it with sso.enable_client.';
  end if;
  if v_client.initiate_login_uri is null then
    raise exception using errcode = 'EO008', message = format('SSO client %s has no login-initiation URI', p_client_id),
      hint = 'Set the platform''s login-initiation URL with sso.set_client_uris (erp-cloud sso register-client shows the lists), or let users start at the platform''s login page.';
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
  perform sso.record_event('ticket_issued', p_client_id, v_user.id, v_source, null, format('valid until %s', v_now + p_ttl));
  return v_issuer || '/jump?ticket=' || v_ticket;
end $$;

create or replace function sso.consume_jump_ticket(
  p_ticket      text,              -- the ticket as presented
  p_client_id   text,              -- the client whose authorization request it is presented to
  p_source_addr inet default null, -- the browser's address
  p_binding     text default null  -- the value in the browser's jump cookie (sso.open_jump_ticket)
) returns sso.jump_outcome
language plpgsql set search_path = '' as $$
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
    perform sso.record_event('ticket_consumed', p_client_id, v_t.user_id, p_source_addr, null, null);
    return (v_t.user_id, v_t.client_id, v_client.initiate_login_uri, null, null)::sso.jump_outcome;
  end if;
  perform sso.record_event('failure', coalesce(p_client_id, v_t.client_id), v_t.user_id, p_source_addr, v_code,
                           v_reason || case when v_code = 'EO023' then format(' (issued for %s)', v_t.client_id) else '' end);
  return (null, v_t.client_id, null, v_code, v_reason)::sso.jump_outcome;
end $$;

create or replace function sso.record_failure(
  p_source_addr inet,               -- the browser's or platform's address
  p_throttle_client text,           -- the client the request claimed before it was read (Basic user, client_id in the URL), or null: the throttle key
  p_kind        text,               -- what failed: client_auth, ticket, authorization, userinfo, end_session, ...
  p_client_id   text,               -- the client as the audit names it (null when unknown)
  p_user_id     bigint,             -- the user, when known
  p_code        text,               -- EO0xx or the OAuth error
  p_detail      text,               -- one line for a person
  p_threshold   integer,            -- failures per window before throttling
  p_window      interval,           -- the throttle window
  p_audited     boolean default false, -- true when the caller's own SQL already wrote this failure's audit row
  p_now         timestamptz default pg_catalog.now()
) returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_w  sso.failure_window;
  v_id bigint;
begin
  -- SECURITY DEFINER: the provider appends to the audit through here and sso.record_event only
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
      perform sso.record_event('failure', p_client_id, p_user_id, p_source_addr, p_code, p_detail);
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
end $$;


-- 3. how the ERP keeps its users current ----------------------------------------

create function sso.put_user(
  p_login        text,                   -- the ERP login name (preferred_username claim): the key
  p_display_name text,                   -- the user's name as people read it (name claim)
  p_email        text default null,      -- email claim; null: none
  p_active       boolean default true,   -- false: the user signs in nowhere through SSO any more, even with a live session
  p_company_code text default null,      -- the company (legal entity) the user works for (company claim, scope erp)
  p_company_name text default null,      -- its name (company_name claim)
  p_scm_role     text default null       -- supplier-collaboration role on the procurement platform (scm_role claim), e.g. buyer; null: none
) returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  -- SECURITY DEFINER: a caller needs no raw writes on sso.app_user (operators
  -- have none); the checks below name the wrong field before a constraint would
  if p_login is null or p_login !~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$' then
    raise exception using errcode = 'EO028', message = format('ERP user: login %s is not a login name', coalesce(pg_catalog.quote_literal(p_login), 'NULL')),
      detail = 'p_login',
      hint = 'Pass the ERP login: 1 to 128 letters, digits, dots, underscores, @ or hyphens, starting with a letter or digit.';
  end if;
  if p_display_name is null or pg_catalog.btrim(p_display_name) = '' then
    raise exception using errcode = 'EO028', message = format('ERP user %s: display_name is empty', p_login),
      detail = 'p_display_name',
      hint = 'Pass the name people know the user by (the name claim the platform shows).';
  end if;
  if p_email is not null and p_email !~ '^[^@\s]+@[^@\s]+$' then
    raise exception using errcode = 'EO028', message = format('ERP user %s: email %L is not an email address', p_login, p_email),
      detail = 'p_email',
      hint = 'Pass one address like name@example.com, or null when the user has none.';
  end if;
  if p_active is null then
    raise exception using errcode = 'EO028', message = format('ERP user %s: active is null', p_login),
      detail = 'p_active',
      hint = 'Pass true for a user who may sign in, false for one who may not (false also stops their live SSO sessions).';
  end if;
  if p_scm_role is not null and p_scm_role !~ '^[a-z][a-z0-9_]{0,39}$' then
    raise exception using errcode = 'EO028', message = format('ERP user %s: scm_role %L is not a role name', p_login, p_scm_role),
      detail = 'p_scm_role',
      hint = 'Pass the platform''s role name (lower-case letters, digits and underscores, e.g. buyer, buyer_manager, viewer), or null for none.';
  end if;

  insert into sso.app_user as u (login, display_name, email, active, company_code, company_name, scm_role)
  values (p_login, p_display_name, p_email, p_active, p_company_code, p_company_name, p_scm_role)
  on conflict (login) do update
     set display_name = excluded.display_name, email = excluded.email, active = excluded.active,
         company_code = excluded.company_code, company_name = excluded.company_name, scm_role = excluded.scm_role,
         updated_at   = case when (u.display_name, u.email, u.active, u.company_code, u.company_name, u.scm_role)
                                  is distinct from
                                  (excluded.display_name, excluded.email, excluded.active, excluded.company_code, excluded.company_name, excluded.scm_role)
                             then pg_catalog.now() else u.updated_at end
  returning u.id into v_id;
  return v_id;
end $$;
comment on function sso.put_user(text, text, text, boolean, text, text, text) is 'For the ERP: puts one user as the ERP has it now, by login (every field as given; a null clears it), and returns the user''s subject id: new for a new login, the same for a known one (stable, never reused). p_active => false stops the user signing in anywhere through SSO at once. EO028 for an invalid field (the message names it, the DETAIL is the parameter).';
revoke all on function sso.put_user(text, text, text, boolean, text, text, text) from public;
grant execute on function sso.put_user(text, text, text, boolean, text, text, text) to erp_cloud_app, erp_cloud_operator;

-- 4. the compatibility view -----------------------------------------------------

create view erp.app_user with (security_invoker = true) as
  select u.id, u.login, u.display_name, u.email, u.active, u.company_code, u.company_name, u.scm_role, u.created_at, u.updated_at
    from sso.app_user u;
comment on view erp.app_user is 'Compatibility view (read-only) for readers of an installation upgraded past release 0021: the SSO users, which live in sso.app_user now, with the columns erp.app_user had. Read sso.app_user instead; write with sso.put_user.';
grant select on erp.app_user to erp_cloud_app, erp_cloud_sso, erp_cloud_operator;
