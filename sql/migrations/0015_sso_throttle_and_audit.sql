-- 0015: SSO failure throttling, a bounded audit under attack, and revoked
-- tokens that still name their user and client.
--
-- Why: hundreds of failed ticket or client-secret attempts from one address
-- were each answered at full speed and each wrote an audit row kept for 400
-- days; and the audit rows for a replayed code or a revoked access token lost
-- the user and client because revocation deleted the storage rows.
--
--   sso.failure_window        failures per (source, client, kind) per window,
--                             shared by every provider instance
--   sso.record_failure        counts one failure in one statement and says how
--                             long to throttle; writes the audit row itself
--                             (one per failure up to the threshold, then one
--                             aggregate row per window with its count)
--   sso.throttle_wait         how long a (source, client, kind) is throttled now
--   sso.audit.occurrences,
--   sso.audit.last_at         the count and last time of an aggregate row
--   sso.oidc_payload.revoked_at  revocation marks storage rows instead of
--                             deleting them, so the audit can still name the
--                             user and client of a revoked code or token
--   sso.token_owner           that lookup, for the audit
--   sso.purge_expired         also removes ended throttle windows
--
-- SQLSTATEs added:
--   EO027  invalid throttle setting (threshold or window out of range)

alter table sso.audit add column occurrences integer not null default 1,
                      add column last_at timestamptz;
comment on column sso.audit.occurrences is 'How many failures this row stands for: 1, or for an aggregate row (code throttled) the failures of one (source, client, kind) in one throttle window after the threshold.';
comment on column sso.audit.last_at is 'For an aggregate row: when its last failure happened (at is the first).';

alter table sso.oidc_payload add column revoked_at timestamptz;
comment on column sso.oidc_payload.revoked_at is 'When the row was revoked (its grant ended, e.g. a code redeemed twice): the provider no longer finds it, but the audit can still name its user and client until it expires.';

create table sso.failure_window (
  source_key   text not null,         -- host(source address), or '' when unknown
  client_key   text not null,         -- the client id the request named, or ''
  kind         text not null,         -- client_auth, ticket, authorization, userinfo, end_session, ...
  window_start timestamptz not null,  -- the first failure of the current window (a window starts with a failure, not on the clock)
  failures     integer not null,
  last_at      timestamptz not null,
  audit_id     bigint,                -- the aggregate sso.audit row of this window, once the threshold is passed
  primary key (source_key, client_key, kind)
);
comment on table sso.failure_window is 'Failed SSO requests counted per (source address, client, kind) in the current throttle window, shared by every provider instance (sso.record_failure). A window starts with the first failure after the previous one ended; successes are not counted. Rows idle for a day are removed by sso.purge_expired.';
comment on column sso.failure_window.failures is 'Failures in this window so far (the audit holds one row each up to the threshold, then one aggregate row with the rest).';
comment on column sso.failure_window.audit_id is 'The aggregate audit row (code throttled) counting this window''s failures past the threshold.';

create function sso._check_throttle(p_threshold integer, p_window interval) returns void
language plpgsql immutable set search_path = '' as $$
begin
  if p_threshold is null or p_threshold < 1 or p_window is null or p_window < interval '1 second' or p_window > interval '1 day' then
    raise exception using errcode = 'EO027', message = 'an SSO throttle threshold must be 1 or more and its window between 1 second and 1 day',
      hint = 'Set ERP_CLOUD_SSO_THROTTLE_FAILURES (failures before throttling) and ERP_CLOUD_SSO_THROTTLE_WINDOW_S (seconds) within range.';
  end if;
end $$;
comment on function sso._check_throttle(integer, interval) is 'Internal: EO027 unless the threshold is 1 or more and the window between 1 second and 1 day.';

create function sso.record_failure(
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
    select p_now, 'failure', p_user_id, (select u.login from erp.app_user u where u.id = p_user_id), p_client_id, p_source_addr,
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
comment on function sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz) is 'Counts one failed SSO request of (source, claimed client, kind) in the current throttle window and audits it: one sso.audit row per failure up to p_threshold, then one aggregate row (code throttled, occurrences counting) per window, so an attack is kept with its size but cannot flood the audit. Returns the seconds to throttle that key for (the rest of the window) once p_threshold failures are reached, else null. EO027 for a bad threshold or window.';

create function sso.throttle_wait(
  p_source_addr     inet,
  p_throttle_client text,           -- as for sso.record_failure
  p_kind            text,
  p_threshold   integer,
  p_window      interval,
  p_now         timestamptz default pg_catalog.now()
) returns integer
language plpgsql stable security definer set search_path = '' as $$
declare
  v_end timestamptz;
begin
  perform sso._check_throttle(p_threshold, p_window);
  select f.window_start + p_window into v_end from sso.failure_window f
   where f.source_key = coalesce(pg_catalog.host(p_source_addr), '') and f.client_key = coalesce(p_throttle_client, '')
     and f.kind = p_kind and f.failures >= p_threshold and f.window_start + p_window > p_now;
  if v_end is null then
    return null;
  end if;
  return greatest(1, ceil(extract(epoch from (v_end - p_now)))::integer);
end $$;
comment on function sso.throttle_wait(inet, text, text, integer, interval, timestamptz) is 'Seconds a (source, client, kind) is throttled for now (p_threshold failures in the current window), else null. The provider answers 429 with Retry-After without handling the request. EO027 for a bad threshold or window.';

create function sso.token_owner(
  p_model text,  -- AuthorizationCode, AccessToken, ...
  p_id    text   -- the code or opaque token as presented
) returns table (account_id text, client_id text)
language sql stable security definer set search_path = '' as $$
  -- also consumed and revoked rows: the audit of a replayed code or a revoked token names who it was
  select p.payload ->> 'accountId', p.payload ->> 'clientId' from sso.oidc_payload p where p.model = p_model and p.id = p_id
$$;
comment on function sso.token_owner(text, text) is 'The user and client a presented code or token was issued to, also when it was consumed or revoked (until it expires and is purged): for the audit of a refused one.';

create or replace function sso.purge_expired(
  p_audit_retention interval default interval '400 days' -- how long the audit keeps a row (180 days at least)
) returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_a integer;
  v_b integer;
  v_c integer;
  v_d integer;
begin
  if p_audit_retention is null or p_audit_retention < interval '180 days' then
    raise exception using errcode = 'EO025', message = format('an audit retention of %s is too short', coalesce(p_audit_retention::text, 'NULL')),
      hint = 'Keep the sign-in audit at least 180 days (six months, as the Cybersecurity Law asks of network logs): set ERP_CLOUD_SSO_AUDIT_RETENTION_DAYS to 180 or more.';
  end if;
  -- SECURITY DEFINER: the provider may not delete tickets or audit rows itself; the clock is the database's
  delete from sso.oidc_payload where expires_at <= pg_catalog.now();
  get diagnostics v_a = row_count;
  delete from sso.jump_ticket where expires_at <= pg_catalog.now() - interval '1 day';
  get diagnostics v_b = row_count;
  delete from sso.audit where at < pg_catalog.now() - p_audit_retention;
  get diagnostics v_c = row_count;
  -- windows last a day at most (sso._check_throttle); their story is in the audit
  delete from sso.failure_window where window_start < pg_catalog.now() - interval '1 day';
  get diagnostics v_d = row_count;
  return v_a + v_b + v_c + v_d;
end $$;
comment on function sso.purge_expired(interval) is 'Removes expired provider storage rows (revoked ones too), jump tickets older than a day past expiry (the audit keeps their story), audit rows older than the retention (400 days unless given; EO025 under 180 days) and throttle windows over a day old; returns how many. The provider runs it periodically (SECURITY DEFINER: erp_cloud_sso cannot delete tickets or audit rows otherwise).';

revoke all on sso.failure_window from public;
revoke execute on function sso._check_throttle(integer, interval), sso.token_owner(text, text),
  sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz),
  sso.throttle_wait(inet, text, text, integer, interval, timestamptz) from public;
grant select on sso.failure_window to erp_cloud_sso, erp_cloud_operator;
grant execute on function sso.token_owner(text, text),
  sso.record_failure(inet, text, text, text, bigint, text, text, integer, interval, boolean, timestamptz),
  sso.throttle_wait(inet, text, text, integer, interval, timestamptz) to erp_cloud_sso;

comment on table sso.audit is 'Every jump ticket issued and consumed, every login and logout, and every failure (refused ticket, OAuth error at any endpoint), with user, client, time and source address. Past the throttle threshold, the failures of one (source, client, kind) in one window are one row (code throttled) with their count in occurrences. No foreign keys: the trail outlives users and clients.';
comment on column sso.oidc_payload.grant_id is 'The grant a token belongs to (revokeByGrantId marks them revoked together).';
comment on function sso.record_event(text, text, bigint, inet, text, text) is 'Appends one row to sso.audit at the database''s time (the login is looked up from the user id). With sso.record_failure (which counts failures for throttling and aggregates them past the threshold), the only way the provider writes the audit.';
