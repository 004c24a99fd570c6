-- 0009 — single sign-on (schema sso): erp-cloud as the OpenID Provider.
--
-- Adds what the OpenID Provider (listener/sso/, `erp-cloud sso serve`, built
-- on oidc-provider) keeps in PostgreSQL, so it survives restarts and runs as
-- several instances: the identity source erp.app_user; the relying parties
-- (client registrations, managed by SQL functions, secrets kept as SHA-256
-- only); the provider's own storage (sessions, grants, codes, tokens); the
-- signing keys' public halves and rotation schedule (the private halves live
-- encrypted in System_Vault as the secret sso.signing_keys); one-time jump
-- tickets the ERP issues for the "open the procurement platform" button; and
-- the audit trail of every ticket, login and failure.
-- Why in SQL: the ERP issues a jump inside its own session (one function
-- call), registrations and disables take effect on the next request on every
-- instance, and the audit sits where the DBA already looks.
--
-- SQLSTATEs (class EO; mirrored in listener/errors.ts):
--   EO001  unknown SSO client
--   EO002  an SSO client with this id is already registered
--   EO003  invalid redirect, logout or login-initiation URI
--   EO004  invalid client id or display name
--   EO005  the SSO client is disabled
--   EO006  unknown ERP user
--   EO007  the ERP user is inactive
--   EO008  the client has no login-initiation URI, so no jump can start there
--   EO009  a signing-key rotation is already scheduled
--   EO010  invalid signing key or rotation setting
--   EO011  the SSO issuer is not known yet (start erp-cloud sso serve once)
--   EO012  the SSO service asked the vault for a secret outside sso.*
--   EO020  jump ticket unknown
--   EO021  jump ticket already used
--   EO022  jump ticket expired
--   EO023  jump ticket issued for another client
--   EO024  jump ticket opened in another browser
--   EO025  audit retention shorter than 180 days
--   EO026  a client secret grace period outside 0 to 7 days
-- EO020..EO024 (and EO005, EO007 at consumption) are not raised: consuming a
-- ticket must leave an audit row even when it fails, so sso.consume_jump_ticket
-- records the failure and returns its code instead of rolling back.
create schema if not exists erp;
comment on schema erp is 'The ERP''s own documents (the reference model erp-cloud reacts to): customers, settlements, shipments, invoices, suppliers, purchase orders, ASNs, users.';

------------------------------------------------------------------------------
-- The SSO server's role
------------------------------------------------------------------------------
do $$
begin
  begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'erp_cloud_sso') then
      create role erp_cloud_sso nologin;
      comment on role erp_cloud_sso is 'The erp-cloud OpenID Provider (erp-cloud sso serve): reads users and clients, owns the provider storage, consumes jump tickets, writes the SSO audit.';
    end if;
  exception when duplicate_object or unique_violation then null;
  end;
end $$;

------------------------------------------------------------------------------
-- The identity source
------------------------------------------------------------------------------
create table erp.app_user (
  id           bigint generated always as identity primary key,
  login        text not null unique,
  display_name text not null,
  email        text,
  active       boolean not null default true,
  company_code text,
  company_name text,
  scm_role     text,
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  constraint app_user_login_is_simple check (login ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'),
  constraint app_user_email_has_at check (email is null or email ~ '^[^@\s]+@[^@\s]+$'),
  constraint app_user_scm_role_is_simple check (scm_role is null or scm_role ~ '^[a-z][a-z0-9_]{0,39}$')
);
comment on table erp.app_user is 'ERP users: the identity source of the OpenID Provider. An inactive user cannot sign in anywhere through SSO, even with a live session. A real deployment maps its own user table here.';
comment on column erp.app_user.id is 'The subject (sub claim) the procurement platform sees: stable, never reused.';
comment on column erp.app_user.login is 'The ERP login name (preferred_username claim); what the ERP passes to sso.issue_jump_ticket.';
comment on column erp.app_user.company_code is 'The company (legal entity) the user works for (company claim, scope erp).';
comment on column erp.app_user.scm_role is 'The user''s supplier-collaboration role on the procurement platform, e.g. buyer, buyer_manager, viewer (scm_role claim, scope erp); null when the user has none.';

------------------------------------------------------------------------------
-- Schema sso
------------------------------------------------------------------------------
create schema sso;
comment on schema sso is 'Single sign-on: the OpenID Provider''s clients, storage, signing-key schedule, jump tickets and audit.';
revoke all on schema sso from public;
grant usage on schema sso to erp_cloud_app, erp_cloud_sso, erp_cloud_operator;

-- random bytes from pgcrypto, qualified with the schema it lives in (known only now)
-- (0001's default privileges keep pgcrypto's functions from PUBLIC, hence the definer)
create extension if not exists pgcrypto;
do $$
declare
  v_schema name := (select n.nspname from pg_catalog.pg_extension e
                      join pg_catalog.pg_namespace n on n.oid = e.extnamespace
                     where e.extname = 'pgcrypto');
begin
  execute format($f$
    create function sso._random_token() returns text
    language sql volatile security definer set search_path = '' as
    $b$ select pg_catalog.translate(pg_catalog.rtrim(pg_catalog.encode(%1$I.gen_random_bytes(32), 'base64'), '='), '+/', '-_') $b$
  $f$, v_schema);
end $$;
comment on function sso._random_token is 'Internal: 32 random bytes (pgcrypto) as base64url: client secrets and jump tickets. SECURITY DEFINER so its callers need no grant on pgcrypto (whose functions are not PUBLIC here).';

create function sso._sha256(p_text text) returns bytea
language sql immutable strict set search_path = '' as $$
  select pg_catalog.sha256(pg_catalog.convert_to(p_text, 'UTF8'))
$$;
comment on function sso._sha256 is 'Internal: SHA-256 of a text; what is stored of secrets and tickets (both are 256-bit random, so no salt or stretching is needed).';

create table sso.setting (
  name       text primary key,
  value      text not null,
  updated_at timestamptz not null default now(),
  constraint setting_name_known check (name in ('issuer', 'id_token_ttl_s'))
);
comment on table sso.setting is 'SSO settings, recorded by erp-cloud sso serve at start. issuer: the OpenID Provider''s issuer URL; jump URLs are built from it. id_token_ttl_s: the ID-token lifetime the servers use (seconds); a key rotation keeps the old key at least this long.';

create function sso.record_issuer(p_issuer text) returns void
language plpgsql set search_path = '' as $$
begin
  if p_issuer is null or p_issuer !~ '^https?://[^\s/?#]+(/[^\s?#]*[^\s?#/])?$' then
    raise exception using errcode = 'EO003', message = format('issuer %L is not a valid URL', p_issuer),
      hint = 'Set ERP_CLOUD_SSO_ISSUER to the https URL the browsers reach, without a trailing slash, e.g. https://sso.erp.example.com';
  end if;
  insert into sso.setting (name, value) values ('issuer', p_issuer)
  on conflict (name) do update set value = excluded.value, updated_at = pg_catalog.now()
   where sso.setting.value is distinct from excluded.value;
end $$;
create function sso.record_id_token_ttl(p_seconds integer) returns void
language plpgsql set search_path = '' as $$
begin
  if p_seconds is null or p_seconds < 0 then
    raise exception using errcode = 'EO010', message = format('ID-token lifetime %s is not valid', p_seconds),
      hint = 'Set ERP_CLOUD_SSO_ID_TOKEN_TTL_S to a number of seconds (60 to 86400).';
  end if;
  insert into sso.setting (name, value) values ('id_token_ttl_s', p_seconds::text)
  on conflict (name) do update set value = excluded.value, updated_at = pg_catalog.now()
   where sso.setting.value is distinct from excluded.value;
end $$;
comment on function sso.record_id_token_ttl(integer) is 'Records the ID-token lifetime (seconds) the provider issues tokens with (called by erp-cloud sso serve at start); sso.schedule_signing_key keeps a retiring key at least this long, whatever the caller passes. EO010 for a negative value.';

comment on function sso.record_issuer(text) is 'Records the issuer URL the provider serves (called by erp-cloud sso serve at start); jump URLs start with it. EO003 for a malformed URL.';

------------------------------------------------------------------------------
-- Clients (the relying parties: the procurement platform, ...)
------------------------------------------------------------------------------
create table sso.client (
  client_id                 text primary key,
  display_name              text not null,
  redirect_uris             text[] not null,
  post_logout_redirect_uris text[] not null default '{}',
  initiate_login_uri        text,
  secret_sha256             bytea not null,
  enabled                   boolean not null default true,
  created_at                timestamptz not null default now(),
  secret_rotated_at         timestamptz,
  previous_secret_sha256    bytea,
  previous_secret_until     timestamptz,
  disabled_at               timestamptz,
  constraint client_id_is_simple check (client_id ~ '^[a-z][a-z0-9_.-]{1,62}$'),
  constraint client_has_redirect_uri check (cardinality(redirect_uris) >= 1)
);
comment on table sso.client is 'One relying party. Managed with sso.register_client, sso.rotate_client_secret, sso.disable_client / sso.enable_client; the provider reads it on every request, so changes apply at once on every instance.';
comment on column sso.client.secret_sha256 is 'SHA-256 of the client secret. The secret itself is shown once (register / rotate) and never stored.';
comment on column sso.client.previous_secret_sha256 is 'After a rotation with a grace period: SHA-256 of the secret it replaced, accepted too until previous_secret_until, so the platform can switch without an outage.';
comment on column sso.client.initiate_login_uri is 'The platform''s login-initiation URL (OpenID Connect third-party-initiated login): where a jump sends the browser so the platform starts the authorization request with its own state, nonce and PKCE.';

create type sso.client_credentials as (client_id text, client_secret text);
comment on type sso.client_credentials is 'A client id with its secret in clear: returned once by sso.register_client / sso.rotate_client_secret, to be handed to the platform''s administrator.';

create function sso._check_uris(
  p_what text,     -- how the message names the list
  p_uris text[]    -- the URIs to check
) returns void
language plpgsql immutable set search_path = '' as $$
declare
  v_uri text;
begin
  foreach v_uri in array coalesce(p_uris, '{}') loop
    -- https anywhere; plain http only on the loopback (development, tests); never a fragment
    if v_uri is null or not (v_uri ~ '^https://[^\s/?#]+(/[^\s#]*)?$'
                             or v_uri ~ '^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?(/[^\s#]*)?$') then
      raise exception using errcode = 'EO003', message = format('%s: %L is not an acceptable URI', p_what, v_uri),
        hint = 'Use absolute https URIs without a fragment (#); http is accepted only for 127.0.0.1 / localhost.';
    end if;
  end loop;
end $$;
comment on function sso._check_uris is 'Internal: EO003 unless every URI is absolute https (or http on the loopback) without a fragment.';

create function sso._client_uris_valid() returns trigger
language plpgsql set search_path = '' as $$
begin
  perform sso._check_uris('redirect URI', new.redirect_uris);
  perform sso._check_uris('post-logout redirect URI', new.post_logout_redirect_uris);
  perform sso._check_uris('login-initiation URI', case when new.initiate_login_uri is null then '{}'::text[] else array[new.initiate_login_uri] end);
  return new;
end $$;
comment on function sso._client_uris_valid() is 'Internal (trigger on sso.client): every write of a client''s URIs passes sso._check_uris, whoever makes it (EO003).';
create trigger client_uris_valid before insert or update of redirect_uris, post_logout_redirect_uris, initiate_login_uri on sso.client
  for each row execute function sso._client_uris_valid();

create function sso._client(p_client_id text) returns sso.client
language plpgsql stable set search_path = '' as $$
declare
  v_row sso.client;
begin
  select * into v_row from sso.client c where c.client_id = p_client_id;
  if not found then
    raise exception using errcode = 'EO001', message = format('no SSO client %L', p_client_id),
      hint = 'Register it with sso.register_client; select client_id from sso.client_status lists the registered ones.';
  end if;
  return v_row;
end $$;
comment on function sso._client is 'Internal: the client row, or EO001.';

create function sso.register_client(
  p_client_id                 text,               -- e.g. 'procurement'
  p_display_name              text,               -- what people see, e.g. '友云采 procurement platform'
  p_redirect_uris             text[],             -- the platform's callback URL(s), exact match
  p_post_logout_redirect_uris text[] default '{}',-- where the platform may send the browser after logout
  p_initiate_login_uri        text default null   -- the platform's login-initiation URL (needed for jumps)
) returns sso.client_credentials
language plpgsql security definer set search_path = '' as $$
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
      hint = 'Choose another id, or use sso.rotate_client_secret / sso.disable_client on the existing one.';
  end if;
  return (p_client_id, v_secret)::sso.client_credentials;
end $$;
comment on function sso.register_client(text, text, text[], text[], text) is 'Registers a relying party with its redirect URIs and returns its secret, once (only its SHA-256 is kept). EO002 if the id is taken, EO003 for a bad URI, EO004 for a bad id or name.';

create function sso.rotate_client_secret(
  p_client_id text,                          -- the client whose secret changes
  p_grace     interval default interval '0'  -- how long the old secret still works (0 to 7 days)
) returns sso.client_credentials
language plpgsql security definer set search_path = '' as $$
declare
  v_secret text := sso._random_token();
begin
  if p_grace is null or p_grace < interval '0' or p_grace > interval '7 days' then
    raise exception using errcode = 'EO026', message = format('a client secret grace period of %s is not allowed', coalesce(p_grace::text, 'NULL')),
      hint = 'Give 0 (the old secret stops at commit) up to 7 days, e.g. ''1 hour'': long enough to change the secret on the platform.';
  end if;
  perform sso._client(p_client_id);
  update sso.client
     set previous_secret_sha256 = case when p_grace > interval '0' then secret_sha256 end,
         previous_secret_until  = case when p_grace > interval '0' then pg_catalog.now() + p_grace end,
         secret_sha256 = sso._sha256(v_secret), secret_rotated_at = pg_catalog.now()
   where client_id = p_client_id;
  return (p_client_id, v_secret)::sso.client_credentials;
end $$;
comment on function sso.rotate_client_secret(text, interval) is 'Gives a client a new secret and returns it, once. The old secret keeps working for p_grace (0: it stops at commit; at most 7 days, EO026), so the platform can switch without an outage; a later rotation ends any earlier grace. EO001 for an unknown client.';

create function sso.disable_client(p_client_id text) returns void
language plpgsql security definer set search_path = '' as $$
begin
  perform sso._client(p_client_id);
  update sso.client set enabled = false, disabled_at = pg_catalog.now() where client_id = p_client_id and enabled;
end $$;
comment on function sso.disable_client(text) is 'Stops a client at once on every provider instance: no new logins, no code exchange, no jumps. EO001 for an unknown client.';

create function sso.enable_client(p_client_id text) returns void
language plpgsql security definer set search_path = '' as $$
begin
  perform sso._client(p_client_id);
  update sso.client set enabled = true, disabled_at = null where client_id = p_client_id and not enabled;
end $$;
comment on function sso.enable_client(text) is 'Lets a disabled client sign users in again. EO001 for an unknown client.';

create function sso.set_client_uris(
  p_client_id                 text,    -- the client whose URIs change
  p_redirect_uris             text[],  -- the complete new list of redirect URIs (at least one)
  p_post_logout_redirect_uris text[],  -- the complete new list ('{}' for none)
  p_initiate_login_uri        text     -- the login-initiation URL (null: no jumps to this client)
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  perform sso._client(p_client_id);
  if coalesce(cardinality(p_redirect_uris), 0) = 0 then
    raise exception using errcode = 'EO003', message = format('client %s needs at least one redirect URI', p_client_id),
      hint = 'Pass the complete list of the platform''s callback URLs, e.g. array[''https://saas.example.com/oidc/callback''].';
  end if;
  -- the trigger client_uris_valid checks every URI (EO003)
  update sso.client
     set redirect_uris = p_redirect_uris, post_logout_redirect_uris = coalesce(p_post_logout_redirect_uris, '{}'),
         initiate_login_uri = p_initiate_login_uri
   where client_id = p_client_id;
end $$;
comment on function sso.set_client_uris(text, text[], text[], text) is 'Replaces a client''s redirect, post-logout and login-initiation URIs (each list complete, as registered). Applies on the next request on every instance. EO001 unknown client, EO003 bad or missing URI.';

create function sso.client_metadata(p_client_id text) returns jsonb
language sql stable set search_path = '' as $$
  -- what oidc-provider needs; client_secret carries the stored hash, which
  -- the provider compares against (listener/sso/provider.ts compareClientSecret)
  select pg_catalog.jsonb_build_object(
           'client_id', c.client_id,
           'client_name', c.display_name,
           -- the current hash, then the replaced one while its grace period lasts
           'client_secret', 'sha256:' || pg_catalog.encode(c.secret_sha256, 'hex')
             || case when c.previous_secret_until > pg_catalog.now()
                     then ',sha256:' || pg_catalog.encode(c.previous_secret_sha256, 'hex') else '' end,
           'redirect_uris', pg_catalog.to_jsonb(c.redirect_uris),
           'post_logout_redirect_uris', pg_catalog.to_jsonb(c.post_logout_redirect_uris),
           'grant_types', pg_catalog.jsonb_build_array('authorization_code'),
           'response_types', pg_catalog.jsonb_build_array('code'),
           'token_endpoint_auth_method', 'client_secret_basic')
    from sso.client c
   where c.client_id = p_client_id and c.enabled
$$;
comment on function sso.client_metadata(text) is 'The client''s registration as oidc-provider metadata, or null when the client is unknown or disabled (the provider then answers invalid_client).';

create view sso.client_status as
  select c.client_id, c.display_name, c.enabled, c.redirect_uris, c.post_logout_redirect_uris, c.initiate_login_uri,
         c.created_at, c.secret_rotated_at, c.disabled_at,
         case when c.previous_secret_until > now() then c.previous_secret_until end as previous_secret_until
    from sso.client c;
comment on view sso.client_status is 'The registered clients without their secret hashes, for operators.';

------------------------------------------------------------------------------
-- oidc-provider storage (listener/sso/adapter.ts): one table for every model
------------------------------------------------------------------------------
create table sso.oidc_payload (
  model       text not null,
  id          text not null,
  payload     jsonb not null,
  grant_id    text,
  uid         text,
  user_code   text,
  expires_at  timestamptz,
  consumed_at timestamptz,
  primary key (model, id)
);
comment on table sso.oidc_payload is 'oidc-provider''s storage: sessions, interactions, grants, authorization codes, access tokens, replay detection... one row per (model, id). Expired rows are invisible to the provider and removed by sso.purge_expired.';
comment on column sso.oidc_payload.grant_id is 'The grant a token belongs to (revokeByGrantId removes them together).';
comment on column sso.oidc_payload.uid is 'A session''s uid (findByUid).';
comment on column sso.oidc_payload.user_code is 'A device code''s user code (findByUserCode).';
comment on column sso.oidc_payload.consumed_at is 'When a one-time artefact (authorization code) was used; the provider refuses a second use and revokes its grant.';
create index oidc_payload_grant_id on sso.oidc_payload (model, grant_id) where grant_id is not null;
create index oidc_payload_uid on sso.oidc_payload (model, uid) where uid is not null;
create index oidc_payload_user_code on sso.oidc_payload (model, user_code) where user_code is not null;
create index oidc_payload_expires_at on sso.oidc_payload (expires_at) where expires_at is not null;

------------------------------------------------------------------------------
-- Signing keys: public half and schedule here, private half in the vault
------------------------------------------------------------------------------
create table sso.signing_key (
  kid          text primary key,
  alg          text not null default 'RS256',
  public_jwk   jsonb not null,
  created_at   timestamptz not null default now(),
  signs_from   timestamptz not null,
  signs_until  timestamptz,
  verify_until timestamptz,
  constraint signing_key_kid_is_simple check (kid ~ '^[A-Za-z0-9_-]{8,64}$'),
  constraint signing_key_public_only check (jsonb_typeof(public_jwk) = 'object' and not public_jwk ?| array['d', 'p', 'q', 'dp', 'dq', 'qi', 'k']),
  constraint signing_key_schedule_ordered check (
    (signs_until is null) = (verify_until is null)
    and (signs_until is null or (signs_until >= signs_from and verify_until >= signs_until)))
);
comment on table sso.signing_key is 'ID-token signing keys: public JWK and schedule. Published in the JWKS from creation; signs from signs_from until signs_until; stays in the JWKS until verify_until (when the last token it signed has expired), then sso.retire_signing_keys removes it and the server drops its private half from the vault secret sso.signing_keys.';
comment on column sso.signing_key.signs_from is 'When the key starts signing: a rotation publishes the new key this long before (the publish lead), so relying parties that cache the JWKS already know it.';

create function sso.lock_signing_keys() returns void
language sql set search_path = '' as $$
  select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('sso.signing_key', 0))
$$;
comment on function sso.lock_signing_keys() is 'Serialises key changes (first key, rotation, retirement) across provider instances and the CLI until the caller''s transaction ends.';

create function sso.schedule_signing_key(
  p_kid            text,                                -- the new key's id
  p_public_jwk     jsonb,                               -- its public JWK (no private members)
  p_publish_lead   interval default interval '10 minutes', -- how long it is published before it signs
  p_token_lifetime interval default interval '1 hour', -- the longest life of a token the old key signed
  p_now            timestamptz default now()
) returns sso.signing_key
language plpgsql set search_path = '' as $$
declare
  v_pending  sso.signing_key;
  v_row      sso.signing_key;
  v_current  boolean;
  v_lifetime interval;
begin
  if p_publish_lead is null or p_publish_lead < interval '0' or p_token_lifetime is null or p_token_lifetime < interval '0' then
    raise exception using errcode = 'EO010', message = 'the publish lead and token lifetime must be zero or more',
      hint = 'Pass intervals such as ''10 minutes'' and ''1 hour''.';
  end if;
  perform sso.lock_signing_keys();
  -- the servers' own ID-token lifetime (recorded at serve start) wins when it is longer
  v_lifetime := greatest(p_token_lifetime,
    (select pg_catalog.make_interval(secs => s.value::double precision) from sso.setting s where s.name = 'id_token_ttl_s'));
  select * into v_pending from sso.signing_key k where k.signs_from > p_now order by k.signs_from limit 1;
  if found then
    raise exception using errcode = 'EO009', message = format('signing key %s is already scheduled to start signing at %s', v_pending.kid, v_pending.signs_from),
      hint = 'Wait until it signs (sso.signing_key_status shows the schedule) before rotating again.';
  end if;
  v_current := exists (select from sso.signing_key k where k.signs_until is null);
  begin
    insert into sso.signing_key (kid, public_jwk, signs_from)
    values (p_kid, p_public_jwk, case when v_current then p_now + p_publish_lead else p_now end)
    returning * into v_row;
  exception when check_violation or unique_violation or not_null_violation then
    raise exception using errcode = 'EO010', message = format('signing key %L is not acceptable: %s', p_kid, sqlerrm),
      hint = 'Pass a new kid and a public JWK without private members.';
  end;
  -- the key signing now hands over when the new one starts, and stays
  -- verifiable until the last token it signed has expired
  update sso.signing_key k
     set signs_until = v_row.signs_from, verify_until = v_row.signs_from + v_lifetime
   where k.signs_until is null and k.kid <> v_row.kid;
  return v_row;
end $$;
comment on function sso.schedule_signing_key(text, jsonb, interval, interval, timestamptz) is 'Adds a signing key. The first key signs at once; a later one is published now and signs after the publish lead, when the current key stops signing and stays verifiable for the token lifetime (p_token_lifetime or the servers'' recorded ID-token lifetime, whichever is longer). EO009 while another rotation is pending, EO010 for bad input.';

create type sso.signing_key_state as (
  kid          text,
  alg          text,
  state        text,
  public_jwk   jsonb,
  signs_from   timestamptz,
  signs_until  timestamptz,
  verify_until timestamptz
);
comment on type sso.signing_key_state is 'A signing key at a point in time: state published (not signing yet), signing, or verifying (signed before, kept for its tokens).';

create function sso.signing_keys_at(p_now timestamptz default now()) returns setof sso.signing_key_state
language sql stable set search_path = '' as $$
  select s.* from (
    select k.kid, k.alg,
           case when k.signs_from > p_now then 'published'
                when k.signs_until is null or k.signs_until > p_now then 'signing'
                else 'verifying' end as state,
           k.public_jwk, k.signs_from, k.signs_until, k.verify_until
      from sso.signing_key k
     where k.verify_until is null or k.verify_until > p_now) s
   -- the signing key first: oidc-provider signs with the first key that fits
   order by case s.state when 'signing' then 0 when 'published' then 1 else 2 end, s.signs_from desc
$$;
comment on function sso.signing_keys_at(timestamptz) is 'The keys in the JWKS at p_now, the signing one first (the provider signs with the first). Retired keys are left out.';

create view sso.signing_key_status as select * from sso.signing_keys_at(now());
comment on view sso.signing_key_status is 'The JWKS as it stands now: each key''s state and schedule.';

create function sso.retire_signing_keys(p_now timestamptz default now()) returns setof text
language sql set search_path = '' as $$
  delete from sso.signing_key k where k.verify_until <= p_now returning k.kid
$$;
comment on function sso.retire_signing_keys(timestamptz) is 'Removes keys whose tokens have all expired and returns their kids; the caller drops their private halves from the vault secret in the same transaction.';

------------------------------------------------------------------------------
-- Audit
------------------------------------------------------------------------------
create table sso.audit (
  id          bigint generated always as identity primary key,
  at          timestamptz not null default now(),
  event       text not null,
  user_id     bigint,
  login       text,
  client_id   text,
  source_addr inet,
  code        text,
  detail      text,
  constraint audit_event_known check (event in ('ticket_issued', 'ticket_consumed', 'login', 'logout', 'failure'))
);
comment on table sso.audit is 'Every jump ticket issued and consumed, every login and logout, and every failure (refused ticket, OAuth error at any endpoint), with user, client, time and source address. No foreign keys: the trail outlives users and clients.';
comment on column sso.audit.code is 'For failures: our SQLSTATE (EO0xx) or the OAuth error code (invalid_grant, invalid_redirect_uri, ...). For logins: how (jump, session).';
comment on column sso.audit.source_addr is 'The browser''s address as the provider saw it (X-Forwarded-For only with ERP_CLOUD_SSO_PROXY); for ticket_issued, what the ERP passed (else the ERP''s own connection address).';
create index audit_at on sso.audit (at);
create index audit_user on sso.audit (user_id, at) where user_id is not null;

create function sso.record_event(
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
  select pg_catalog.now(), p_event, p_user_id, (select u.login from erp.app_user u where u.id = p_user_id), p_client_id, p_source_addr,
         p_code, pg_catalog.left(p_detail, 1000)
$$;
comment on function sso.record_event(text, text, bigint, inet, text, text) is 'Appends one row to sso.audit at the database''s time (the login is looked up from the user id). The only way the provider writes the audit.';

------------------------------------------------------------------------------
-- Jump tickets
------------------------------------------------------------------------------
create table sso.jump_ticket (
  ticket_sha256 bytea primary key,
  user_id       bigint not null references erp.app_user (id) on delete cascade,
  client_id     text not null references sso.client (client_id) on delete cascade,
  issued_at     timestamptz not null,
  expires_at    timestamptz not null,
  issued_from   inet,
  opened_at     timestamptz,
  bound_sha256  bytea,
  consumed_at   timestamptz,
  consumed_from inet
);
comment on table sso.jump_ticket is 'One-time tickets for the ERP''s jump button: for one (user, client), about a minute, single use, bound to the first browser that opens it. Only the SHA-256 of the ticket is kept.';
comment on column sso.jump_ticket.bound_sha256 is 'SHA-256 of the random value the first browser to open the jump link got in its HttpOnly cookie: only that browser can use the ticket.';
create index jump_ticket_expires_at on sso.jump_ticket (expires_at);

create function sso.issue_jump_ticket(
  p_login       text,                          -- the ERP user signed in to the ERP
  p_client_id   text,                          -- the platform to open
  p_source_addr inet default null,             -- the user's browser address as the ERP saw it
  p_ttl         interval default interval '60 seconds'
) returns text
language plpgsql security definer set search_path = '' as $$
declare
  v_user   erp.app_user;
  v_client sso.client;
  v_issuer text;
  v_ticket text := sso._random_token();
  v_source inet := coalesce(p_source_addr, pg_catalog.inet_client_addr());
  v_now    timestamptz := pg_catalog.now();  -- never the caller's clock: the lifetime and audit time are ours
begin
  select * into v_user from erp.app_user u where u.login = p_login;
  if not found then
    raise exception using errcode = 'EO006', message = format('no ERP user with login %L', p_login),
      hint = 'Pass the login of the user signed in to the ERP (erp.app_user.login).';
  end if;
  if not v_user.active then
    raise exception using errcode = 'EO007', message = format('ERP user %s is inactive', p_login),
      hint = 'An administrator reactivates the user (erp.app_user.active) before the user may open the platform.';
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
comment on function sso.issue_jump_ticket(text, text, inet, interval) is 'For the ERP, while the user is signed in: issues a one-time ticket for (user, client), valid p_ttl from the database''s clock, and returns the jump URL the ERP''s button opens. Audited. EO006 unknown user, EO007 inactive user, EO001 / EO005 unknown or disabled client, EO008 client without login-initiation URI, EO011 issuer unknown.';

create type sso.jump_outcome as (
  user_id            bigint,  -- the user signed in (null on failure)
  client_id          text,    -- the client the ticket was issued for
  initiate_login_uri text,    -- where the jump continues (sso.open_jump_ticket)
  code               text,    -- null on success, else EO005 / EO007 / EO020..EO024
  reason             text     -- one line for a person (and the OAuth error_description)
);
comment on type sso.jump_outcome is 'What became of a presented jump ticket.';

create function sso.open_jump_ticket(
  p_ticket      text,              -- the ticket as presented at /jump
  p_binding     text,              -- a random value the provider puts in this browser's HttpOnly cookie
  p_source_addr inet default null  -- the browser's address
) returns setof sso.jump_outcome
language plpgsql set search_path = '' as $$
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
    perform sso.record_event('failure', v_t.client_id, v_t.user_id, p_source_addr, 'EO024',
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
end $$;
comment on function sso.open_jump_ticket(text, text, inet) is 'The /jump step: binds a live ticket to the browser holding p_binding (only its SHA-256 is kept) and returns the client and login-initiation URI, without consuming it. No row when the ticket is unknown, used, expired or its client disabled; EO024 (audited) when another browser opened it first.';

create function sso.consume_jump_ticket(
  p_ticket      text,              -- the ticket as presented
  p_client_id   text,              -- the client whose authorization request it is presented to
  p_source_addr inet default null, -- the browser's address
  p_binding     text default null  -- the value in the browser's jump cookie (sso.open_jump_ticket)
) returns sso.jump_outcome
language plpgsql set search_path = '' as $$
declare
  v_t      sso.jump_ticket;
  v_user   erp.app_user;
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
    select * into v_user from erp.app_user u where u.id = v_t.user_id;
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
comment on function sso.consume_jump_ticket(text, text, inet, text) is 'For the provider''s interaction: uses a ticket up (single use, also when refused) and returns the user to sign in, or the refusal code (EO020 unknown, EO021 used, EO022 expired, EO023 other client, EO024 not the browser that opened it, EO005 client disabled, EO007 user inactive). Every outcome leaves an audit row. The time is the database''s, never the caller''s.';

create function sso.purge_expired(
  p_audit_retention interval default interval '400 days' -- how long the audit keeps a row (180 days at least)
) returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_a integer;
  v_b integer;
  v_c integer;
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
  return v_a + v_b + v_c;
end $$;
comment on function sso.purge_expired(interval) is 'Removes expired provider storage rows, jump tickets older than a day past expiry (the audit keeps their story) and audit rows older than the retention (400 days unless given; EO025 under 180 days); returns how many. The provider runs it periodically (SECURITY DEFINER: erp_cloud_sso cannot delete tickets or audit rows otherwise).';

------------------------------------------------------------------------------
-- The vault, narrowed to the SSO secrets
------------------------------------------------------------------------------
-- The provider keeps the private halves of its signing keys and its cookie
-- keys as vault secrets sso.signing_keys and sso.cookie_keys (it makes them
-- on first start and rotates them, so it may put as well as read). It gets
-- these two wrappers, not vault.read_secret / vault.put_secret, so it can
-- never read or overwrite another service's secret. They are owned by
-- erp_cloud_vault_owner (who runs the vault's own functions).
create function sso._vault_name_is_sso(p_name text) returns void
language plpgsql immutable set search_path = '' as $$
begin
  if p_name is null or pg_catalog.left(p_name, 4) <> 'sso.' then
    raise exception using errcode = 'EO012', message = format('the SSO service may not use vault secret %L', p_name),
      hint = 'The OpenID Provider only keeps secrets named sso.* (sso.signing_keys, sso.cookie_keys); other secrets belong to other services.';
  end if;
end $$;
comment on function sso._vault_name_is_sso(text) is 'Internal: EO012 unless the secret name starts with sso.';

create function sso.read_vault_secret(p_name text, p_master_key text) returns text
language plpgsql security definer set search_path = '' as $$
begin
  perform sso._vault_name_is_sso(p_name);
  return vault.read_secret(p_name, p_master_key);
end $$;
comment on function sso.read_vault_secret(text, text) is 'vault.read_secret for the OpenID Provider, limited to secrets named sso.* (EO012 for any other; EC020 when missing, EC021 wrong key).';

create function sso.put_vault_secret(p_name text, p_value text, p_master_key text, p_description text default null) returns vault.secret_summary
language plpgsql security definer set search_path = '' as $$
begin
  perform sso._vault_name_is_sso(p_name);
  return vault.put_secret(p_name, p_value, p_master_key, p_description);
end $$;
comment on function sso.put_vault_secret(text, text, text, text) is 'vault.put_secret for the OpenID Provider, limited to secrets named sso.* (EO012 for any other).';

------------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC
------------------------------------------------------------------------------
revoke all on all tables in schema sso from public;
revoke execute on all functions in schema sso from public;
revoke all on erp.app_user from public;

-- the ERP: its users, and the jump
grant select, insert, update on erp.app_user to erp_cloud_app;
grant execute on function sso.issue_jump_ticket(text, text, inet, interval) to erp_cloud_app;

-- the provider (erp-cloud sso serve, and erp-cloud sso rotate-keys, which
-- needs the provider's vault key and so runs with the provider's login)
grant usage on schema erp to erp_cloud_app, erp_cloud_sso, erp_cloud_operator;
grant select on erp.app_user to erp_cloud_sso;
grant select on sso.client, sso.setting, sso.signing_key, sso.client_status, sso.signing_key_status to erp_cloud_sso;
grant select, insert, update, delete on sso.oidc_payload to erp_cloud_sso;
grant select, insert, update, delete on sso.signing_key, sso.setting to erp_cloud_sso;
grant select, update on sso.jump_ticket to erp_cloud_sso;
grant select on sso.audit to erp_cloud_sso; -- appends only through sso.record_event
grant execute on function
  sso.record_issuer(text), sso.record_id_token_ttl(integer), sso.client_metadata(text), sso.lock_signing_keys(),
  sso.schedule_signing_key(text, jsonb, interval, interval, timestamptz), sso.signing_keys_at(timestamptz),
  sso.retire_signing_keys(timestamptz), sso.record_event(text, text, bigint, inet, text, text),
  sso.open_jump_ticket(text, text, inet), sso.consume_jump_ticket(text, text, inet, text),
  sso.purge_expired(interval), sso._sha256(text),
  sso.read_vault_secret(text, text), sso.put_vault_secret(text, text, text, text)
  to erp_cloud_sso;

-- operators: clients through the functions only (they check the URIs and
-- never show a secret twice); keys and audit read-only. Signing keys change
-- only with their private halves, i.e. by the provider's login.
grant select on sso.client_status, sso.signing_key_status, sso.signing_key, sso.audit, sso.setting, erp.app_user to erp_cloud_operator;
grant execute on function
  sso.register_client(text, text, text[], text[], text), sso.rotate_client_secret(text, interval),
  sso.disable_client(text), sso.enable_client(text), sso.set_client_uris(text, text[], text[], text),
  sso.signing_keys_at(timestamptz)
  to erp_cloud_operator;

-- the wrappers run as the vault's owner, which may call the vault's functions
set local role erp_cloud_vault_owner;
grant usage on schema vault to erp_cloud_sso;
reset role;
grant create on schema sso to erp_cloud_vault_owner;
alter function sso.read_vault_secret(text, text) owner to erp_cloud_vault_owner;
alter function sso.put_vault_secret(text, text, text, text) owner to erp_cloud_vault_owner;
revoke create on schema sso from erp_cloud_vault_owner;
grant usage on schema sso to erp_cloud_vault_owner;
grant execute on function sso._vault_name_is_sso(text) to erp_cloud_vault_owner;
