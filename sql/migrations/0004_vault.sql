-- 0004 — System_Vault (schema vault): named secrets encrypted at rest.
--
-- Adds the place where the cloud credentials the listener needs (app keys,
-- app secrets, tokens) live when the twelve-factor path (an environment
-- variable per secret) is not wanted: one row per named secret, encrypted with
-- pgcrypto (OpenPGP symmetric, AES-256) under a master key that never lives in
-- the database. The caller passes the key as an argument on every call; it is
-- never stored, and our errors never quote it. What the database keeps is a
-- short fingerprint of the key (key_id), so a wrong key is refused with a
-- clear error instead of pgcrypto's "Wrong key or corrupt data".
-- Why in the database at all: a dump, a backup, a replica or the ERP's role
-- then hold only ciphertext, rotation is one audited call, and the listeners
-- on every host read the same current value.
--
-- Who may do what: the listener reads (vault.read_secret), operators write
-- and list (never read), the ERP role has no access to the schema. The
-- functions are SECURITY DEFINER owned by erp_cloud_vault_owner, a NOLOGIN
-- role that owns nothing but this schema, so the roles need no table
-- privileges and a definer function can reach nothing outside the vault.
--
-- Logging (an operator note, repeated in README.md): our own errors never
-- include the key or a value. But PostgreSQL logs statement text: with
-- log_statement = 'all' every call is logged (vault calls are SELECTs, so
-- 'mod' and 'ddl' do not log them), and for a bind-parameter call ($1, $2 —
-- what the listener and the CLI send) the parameter values are logged with
-- it. So are calls caught by log_min_duration_statement. With the defaults
-- (log_statement = 'none', log_parameter_max_length_on_error = 0) a failing
-- bind-parameter call logs the statement text only, never the values; a call
-- with the key written as a literal (psql) logs the key on any error. So:
-- call the vault through the CLI, and keep log_statement below 'all'.
--
-- SQLSTATEs added to the registry in 0001 (mirrored in listener/errors.ts):
--   EC020  no secret with this name
--   EC021  the master key does not match the key the vault is encrypted with
--   EC022  master key missing or shorter than 16 characters
--   EC023  invalid secret name
--   EC024  secret value is empty
--   EC025  secret cannot be decrypted although the key fingerprint matches (damaged ciphertext)
--   EC026  the new master key is the same as the current one (rekey)
--   EC027..EC029  reserved for the vault

------------------------------------------------------------------------------
-- The owner role: nologin, owns the vault schema and runs its SECURITY
-- DEFINER functions. The migrating role must be able to SET ROLE to it.
------------------------------------------------------------------------------
do $$
begin
  begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'erp_cloud_vault_owner') then
      create role erp_cloud_vault_owner nologin;
      comment on role erp_cloud_vault_owner is 'Owns schema vault and runs its SECURITY DEFINER functions; nobody logs in as it.';
    end if;
  exception when duplicate_object or unique_violation then null;
  end;
  if not pg_catalog.pg_has_role(current_user, 'erp_cloud_vault_owner', 'member') then
    execute format('grant erp_cloud_vault_owner to %I', current_user);
  end if;
end $$;

-- pgcrypto goes where the DBA already put it, or into the default schema; the
-- owner gets exactly the two functions it needs from it.
create extension if not exists pgcrypto;
do $$
declare
  v_schema name := (select n.nspname from pg_catalog.pg_extension e
                      join pg_catalog.pg_namespace n on n.oid = e.extnamespace
                     where e.extname = 'pgcrypto');
begin
  execute format('grant usage on schema %I to erp_cloud_vault_owner', v_schema);
  execute format('grant execute on function %1$I.pgp_sym_encrypt(text, text, text), %1$I.pgp_sym_decrypt(bytea, text) to erp_cloud_vault_owner', v_schema);
end $$;

create schema vault authorization erp_cloud_vault_owner;
comment on schema vault is 'System_Vault: named secrets encrypted at rest under a master key the database never stores. Listener reads, operators write.';

-- Everything below is created by (so owned by) the vault owner.
set local role erp_cloud_vault_owner;

revoke all on schema vault from public;
grant usage on schema vault to erp_cloud_listener, erp_cloud_operator;

------------------------------------------------------------------------------
-- Storage
------------------------------------------------------------------------------
create table vault.secret (
  name        text primary key,
  ciphertext  bytea not null,
  key_id      text not null,
  version     integer not null default 1,
  description text,
  created_at  timestamptz not null default now(),
  rotated_at  timestamptz,
  rekeyed_at  timestamptz,
  constraint secret_name_is_simple check (name ~ '^[a-z][a-z0-9_.-]{0,62}$'),
  constraint secret_key_id_is_fingerprint check (key_id ~ '^[0-9a-f]{12}$'),
  constraint secret_version_positive check (version >= 1)
);
comment on table vault.secret is 'One named secret, encrypted with pgp_sym_encrypt under the master key. Write with vault.put_secret / vault.rotate_secret; the listener reads with vault.read_secret. Nobody has table privileges.';
comment on column vault.secret.name is 'The name providers refer to, e.g. nuonuo.app_secret. The environment variable ERP_CLOUD_SECRET_<NAME> (upper-cased, other characters as _) overrides it in the listener.';
comment on column vault.secret.ciphertext is 'OpenPGP symmetric message (AES-256, salted and iterated S2K, no compression) of the value.';
comment on column vault.secret.key_id is 'Fingerprint of the master key the value is encrypted under: the first 12 hex digits of sha256(''erp-cloud vault key id:'' || key). Lets a wrong key be refused with EC021. Every row carries the same key_id.';
comment on column vault.secret.version is 'Starts at 1; every put or rotate of an existing secret adds 1. A rekey does not change it (the value is the same).';
comment on column vault.secret.rotated_at is 'When the value last changed (put over an existing secret, or rotate); null while it is the first value.';
comment on column vault.secret.rekeyed_at is 'When the value was last re-encrypted under a new master key (vault.rekey_secrets).';

-- History keeps who changed which secret when, and under which key, but no
-- ciphertexts. A secret is usually rotated because the old value leaked or was
-- revoked at the cloud; keeping it decryptable would keep the leak alive and
-- would make every rekey re-encrypt dead values too. Audit needs who and when,
-- not the value; a rollback is a put of the value the cloud console still
-- shows. No foreign key: the audit trail outlives the secret.
create table vault.secret_version (
  name    text not null,
  version integer not null,
  action  text not null,
  key_id  text not null,
  actor   text not null default session_user,
  at      timestamptz not null default now(),
  primary key (name, version),
  constraint secret_version_action_known check (action in ('create', 'replace', 'rotate'))
);
comment on table vault.secret_version is 'Audit trail: one row per version of a secret (who, when, which key id, create / replace / rotate). Values and ciphertexts are deliberately not kept.';
comment on column vault.secret_version.actor is 'The session user (the login), not the definer role the vault functions run as.';

create type vault.secret_summary as (
  name        text,
  version     integer,
  description text,
  key_id      text,
  created_at  timestamptz,
  rotated_at  timestamptz,
  rekeyed_at  timestamptz
);
comment on type vault.secret_summary is 'What may be shown about a secret: name, version, description, key fingerprint and dates. Never the value.';

------------------------------------------------------------------------------
-- Internal helpers (no grants: only the SECURITY DEFINER functions below,
-- running as the owner, call them)
------------------------------------------------------------------------------
create function vault._key_id(p_key text) returns text
language sql immutable strict set search_path = '' as $$
  -- a labelled hash, so the stored fingerprint never equals a plain sha256 of
  -- the key that some other tool might print
  select pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to('erp-cloud vault key id:' || p_key, 'UTF8')), 'hex'), 12);
$$;
comment on function vault._key_id is 'Internal: the 12-hex-digit fingerprint stored as vault.secret.key_id.';

create function vault._check_key(
  p_key  text,                      -- the master key as given
  p_what text default 'master key'  -- how the message names it
) returns text
language plpgsql immutable set search_path = '' as $$
begin
  if p_key is null or pg_catalog.length(p_key) < 16 then
    -- never quote the key, not even a short one: it may be a real key cut short
    raise exception using errcode = 'EC022',
      message = format('the %s is missing or shorter than 16 characters', p_what),
      hint = 'Pass the vault''s master key (the listener and CLI read ERP_CLOUD_VAULT_KEY or ERP_CLOUD_VAULT_KEY_FILE). Generate one with: openssl rand -base64 32';
  end if;
  return vault._key_id(p_key);
end $$;
comment on function vault._check_key is 'Internal: EC022 unless the key is at least 16 characters; returns its fingerprint.';

create function vault._check_key_matches(p_key_id text) returns void
language plpgsql stable set search_path = '' as $$
declare
  v_other text;
begin
  select s.key_id into v_other from vault.secret s where s.key_id <> p_key_id limit 1;
  if found then
    raise exception using errcode = 'EC021',
      message = 'the master key does not match the key the vault is encrypted with',
      detail = format('The vault''s secrets are encrypted under key id %s.', v_other),
      hint = 'Use the current master key (ERP_CLOUD_VAULT_KEY / ERP_CLOUD_VAULT_KEY_FILE); to change it, use vault.rekey_secrets (erp-cloud vault rekey).';
  end if;
end $$;
comment on function vault._check_key_matches is 'Internal: EC021 when any secret is encrypted under a key other than p_key_id (the vault has one master key at a time).';

create function vault._check_name(p_name text) returns void
language plpgsql immutable set search_path = '' as $$
begin
  if p_name is null or p_name !~ '^[a-z][a-z0-9_.-]{0,62}$' then
    raise exception using errcode = 'EC023', message = format('secret name %L is not valid', p_name),
      hint = 'Use lower-case letters, digits, dot, dash or underscore, starting with a letter, e.g. nuonuo.app_secret.';
  end if;
end $$;
comment on function vault._check_name is 'Internal: EC023 unless the name is a simple lower-case name.';

create function vault._check_value(p_name text, p_value text) returns void
language plpgsql immutable set search_path = '' as $$
begin
  if p_value is null or p_value = '' then
    raise exception using errcode = 'EC024', message = format('the value for secret %s is empty', p_name),
      hint = 'Give the value on standard input: printf %s "$VALUE" | erp-cloud vault put NAME';
  end if;
end $$;
comment on function vault._check_value is 'Internal: EC024 when a value is null or empty (almost always a mistake in the pipe that fed it).';

-- The two pgcrypto calls, qualified with the schema pgcrypto lives in (known
-- only now), so every caller can keep search_path = ''.
do $$
declare
  v_schema name := (select n.nspname from pg_catalog.pg_extension e
                      join pg_catalog.pg_namespace n on n.oid = e.extnamespace
                     where e.extname = 'pgcrypto');
begin
  execute format($f$
    create function vault._encrypt(p_value text, p_key text) returns bytea
    language sql volatile strict set search_path = '' as
    $b$ select %1$I.pgp_sym_encrypt(p_value, p_key, 'cipher-algo=aes256, compress-algo=0') $b$
  $f$, v_schema);
  execute format($f$
    create function vault._decrypt(p_name text, p_ciphertext bytea, p_key text) returns text
    language plpgsql volatile set search_path = '' as
    $b$
    begin
      return %1$I.pgp_sym_decrypt(p_ciphertext, p_key);
    exception when others then
      -- pgcrypto's own message would do, but say it in our words and code
      raise exception using errcode = 'EC025', message = pg_catalog.format('secret %%s cannot be decrypted', p_name),
        detail = 'The master key matches the fingerprint stored with the secret, but the ciphertext does not open with it.',
        hint = 'The stored value is damaged: put the secret again (erp-cloud vault put).';
    end
    $b$
  $f$, v_schema);
end $$;
comment on function vault._encrypt is 'Internal: pgp_sym_encrypt with AES-256 and no compression.';
comment on function vault._decrypt is 'Internal: pgp_sym_decrypt, with any failure turned into EC025 (never quoting the key).';

------------------------------------------------------------------------------
-- The interface
------------------------------------------------------------------------------
create function vault.put_secret(
  p_name        text,              -- e.g. 'nuonuo.app_secret'
  p_value       text,              -- the plaintext; never logged by us, never returned
  p_master_key  text,              -- the vault's master key (never stored)
  p_description text default null  -- what it is and where it comes from; null keeps the current one
) returns vault.secret_summary
language plpgsql security definer set search_path = '' as $$
declare
  v_key_id text := vault._check_key(p_master_key);
  v_row    vault.secret;
begin
  perform vault._check_name(p_name);
  perform vault._check_value(p_name, p_value);
  -- writers one at a time (readers are not blocked), so a put cannot slip a
  -- row under the old key past a concurrent rekey
  lock table vault.secret in share row exclusive mode;
  perform vault._check_key_matches(v_key_id);
  insert into vault.secret as s (name, ciphertext, key_id, description)
  values (p_name, vault._encrypt(p_value, p_master_key), v_key_id, p_description)
  on conflict (name) do update set
    ciphertext = excluded.ciphertext, key_id = excluded.key_id, version = s.version + 1,
    description = coalesce(excluded.description, s.description), rotated_at = pg_catalog.now()
  returning * into v_row;
  insert into vault.secret_version (name, version, action, key_id)
  values (p_name, v_row.version, case when v_row.version = 1 then 'create' else 'replace' end, v_key_id);
  return (v_row.name, v_row.version, v_row.description, v_row.key_id, v_row.created_at, v_row.rotated_at, v_row.rekeyed_at)::vault.secret_summary;
end $$;
comment on function vault.put_secret(text, text, text, text) is 'Creates a secret, or replaces its value (version + 1). Refuses a key other than the vault''s (EC021), a short key (EC022), a bad name (EC023), an empty value (EC024). Returns the summary, never the value.';

create function vault.rotate_secret(
  p_name       text,  -- an existing secret
  p_new_value  text,  -- the new plaintext
  p_master_key text   -- the vault's master key
) returns vault.secret_summary
language plpgsql security definer set search_path = '' as $$
declare
  v_key_id text := vault._check_key(p_master_key);
  v_row    vault.secret;
begin
  perform vault._check_value(p_name, p_new_value);
  lock table vault.secret in share row exclusive mode;
  perform vault._check_key_matches(v_key_id);
  update vault.secret s
     set ciphertext = vault._encrypt(p_new_value, p_master_key), key_id = v_key_id,
         version = s.version + 1, rotated_at = pg_catalog.now()
   where s.name = p_name
  returning * into v_row;
  if not found then
    raise exception using errcode = 'EC020', message = format('no secret named %L', p_name),
      hint = 'Create it first with vault.put_secret (erp-cloud vault put); erp-cloud vault list shows the names.';
  end if;
  insert into vault.secret_version (name, version, action, key_id) values (p_name, v_row.version, 'rotate', v_key_id);
  return (v_row.name, v_row.version, v_row.description, v_row.key_id, v_row.created_at, v_row.rotated_at, v_row.rekeyed_at)::vault.secret_summary;
end $$;
comment on function vault.rotate_secret(text, text, text) is 'Gives an existing secret a new value (version + 1, rotated_at = now); EC020 when there is no such secret. Listeners pick the new value up when their cache expires.';

create function vault.read_secret(
  p_name       text,  -- the secret's name
  p_master_key text   -- the vault's master key
) returns text
language plpgsql security definer set search_path = '' as $$
declare
  v_key_id text := vault._check_key(p_master_key);
  v_row    vault.secret;
begin
  select * into v_row from vault.secret s where s.name = p_name;
  if not found then
    raise exception using errcode = 'EC020', message = format('no secret named %L', p_name),
      hint = 'An operator creates it with erp-cloud vault put; or set the environment variable the listener checks first.';
  end if;
  -- compare fingerprints first: a wrong key gets a clear EC021, not pgcrypto's error
  if v_row.key_id <> v_key_id then
    raise exception using errcode = 'EC021',
      message = format('the master key does not match the key secret %s is encrypted with', p_name),
      detail = format('The secret is encrypted under key id %s.', v_row.key_id),
      hint = 'Check ERP_CLOUD_VAULT_KEY / ERP_CLOUD_VAULT_KEY_FILE: after a rekey, every listener needs the new key.';
  end if;
  return vault._decrypt(p_name, v_row.ciphertext, p_master_key);
end $$;
comment on function vault.read_secret(text, text) is 'The plaintext of a secret, for the listener only. EC020 when missing, EC021 when the key is not the one it is encrypted under, EC022 for a short key.';

create function vault.rekey_secrets(
  p_old_key text,  -- the current master key
  p_new_key text   -- the master key from now on
) returns integer
language plpgsql security definer set search_path = '' as $$
declare
  v_old_id text := vault._check_key(p_old_key);
  v_new_id text := vault._check_key(p_new_key, 'new master key');
  v_n      integer;
begin
  if p_old_key = p_new_key then
    raise exception using errcode = 'EC026', message = 'the new master key is the same as the current one',
      hint = 'Set ERP_CLOUD_VAULT_NEW_KEY to a freshly generated key (openssl rand -base64 32).';
  end if;
  lock table vault.secret in share row exclusive mode;
  perform vault._check_key_matches(v_old_id);
  update vault.secret s
     set ciphertext = vault._encrypt(vault._decrypt(s.name, s.ciphertext, p_old_key), p_new_key),
         key_id = v_new_id, rekeyed_at = pg_catalog.now();
  get diagnostics v_n = row_count;
  return v_n;
end $$;
comment on function vault.rekey_secrets(text, text) is 'Re-encrypts every secret under a new master key in one transaction (all or nothing) and returns how many. The old key stops working at commit; restart listeners with the new key.';

create function vault.list_secrets() returns setof vault.secret_summary
language sql stable security definer set search_path = '' as $$
  select s.name, s.version, s.description, s.key_id, s.created_at, s.rotated_at, s.rekeyed_at
    from vault.secret s
   order by s.name;
$$;
comment on function vault.list_secrets() is 'Names, versions, descriptions, key fingerprint and dates of all secrets. Never a value.';

------------------------------------------------------------------------------
-- Privileges (STYLE.md 5): nothing for PUBLIC, no table privileges for
-- anyone; the listener reads, operators write and list; erp_cloud_app has no
-- usage on the schema at all.
------------------------------------------------------------------------------
revoke all on all tables in schema vault from public;
revoke execute on all functions in schema vault from public;

grant execute on function vault.read_secret(text, text) to erp_cloud_listener;
grant execute on function
  vault.put_secret(text, text, text, text),
  vault.rotate_secret(text, text, text),
  vault.rekey_secrets(text, text),
  vault.list_secrets()
  to erp_cloud_operator;

reset role;
