-- 0014 — no secret in any error, notice, context or server-log line; comments
-- on the cloud.log partitions and on what erp.ar_invoice.tax_cloud_response holds.
--
-- Why: PL/pgSQL adds the text of a failing EXECUTE to the error's CONTEXT
-- (or QUERY) line, and PostgreSQL sends that line to the caller and to the
-- server log. scm.create_shared_asn_user_mapping built `create user mapping …
-- options (password '…')`, so a missing server, a missing role, a missing
-- privilege or a second run (its "already exists, skipping" NOTICE) showed
-- the middle database's password — even when the caller passed it as a bind
-- parameter. A NOT NULL or CHECK violation's DETAIL quotes the whole row:
-- cloud.store_provider_token without a key showed the token. And a key or a
-- value given where a name belongs (arguments in the wrong order) came back
-- quoted in "secret name … is not valid", "no secret named …" and "the SSO
-- service may not use vault secret …".
--
-- What changes (the audit of 0001–0011: every EXECUTE, format( and RAISE that
-- can see a secret; the rest only ever see names, ids and numbers):
--   scm.create_shared_asn_user_mapping  checks the server, the role, the remote
--     user and the privilege CREATE USER MAPPING needs before it builds the
--     statement (ES005 / 42501, naming the server and role); any other
--     failure of the statement is raised again with its own SQLSTATE and
--     message, the password cut out, and without the statement. Run again,
--     it replaces the mapping (user and password), instead of silently
--     keeping the old password behind a NOTICE that quoted the new one.
--   cloud.store_provider_token  refuses a missing key (EC014) before the
--     insert, and raises any failure of the insert without the row.
--   vault._check_name  never repeats an invalid name, nor a name that is the
--     vault's master key (EC023); vault.read_secret and vault.rotate_secret
--     check the name first, so EC020 quotes only a proper name.
--   sso._vault_name_is_sso  no longer repeats the name it refuses (EO012).
--   cloud._redact  (new, internal) cuts a secret out of a message.
-- What the server itself logs (statements with parameter values, nested
-- statements, pg_stat_statements, auto_explain, pgaudit) depends on settings
-- a DBA must keep off: README, System_Vault, "Secrets and PostgreSQL's logs".
--
-- Comments: cloud.log_default and every monthly partition (also the ones
-- cloud.ensure_log_partitions creates from now on); erp.ar_invoice named a
-- `pdf` key in tax_cloud_response that nothing writes (the PDF is stored in
-- erp.attachment) and missed the keys that are written.
--
-- SQLSTATEs: none added (ES005, EC014, EC023, EO012 and 42501 as before).

------------------------------------------------------------------------------
-- A secret cut out of a text
------------------------------------------------------------------------------
create function cloud._redact(
  p_text   text,  -- a message, e.g. SQLERRM of a statement that carried the secret
  p_secret text   -- the secret, as given
) returns text
language sql immutable set search_path = '' as $$
  -- as given, and as format('%L') / quote_literal writes it inside a statement
  select case when p_text is null or p_secret is null or p_secret = '' then p_text
              else pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(p_text,
                     p_secret, '[redacted]'),
                     pg_catalog.replace(p_secret, '''', ''''''), '[redacted]'),
                     pg_catalog.replace(pg_catalog.replace(p_secret, '\', '\\'), '''', ''''''), '[redacted]') end
$$;
comment on function cloud._redact(text, text) is 'Internal: p_text with every occurrence of p_secret (as given, or quoted as in a statement) replaced by [redacted], for a message re-raised from a statement that carried the secret.';
revoke execute on function cloud._redact(text, text) from public;
grant execute on function cloud._redact(text, text) to erp_cloud_operator;

------------------------------------------------------------------------------
-- Shared database: the user mapping, checked first, its failures without the statement
------------------------------------------------------------------------------
create or replace function scm.create_shared_asn_user_mapping(
  p_server      text,                   -- the server from step 1
  p_remote_user text,                   -- the role in the middle database
  p_password    text default null,      -- its password; null only for a superuser-made mapping with password_required false
  p_local_role  text default null       -- who uses the mapping (default: the current role, which pg_cron's job runs as)
) returns void
language plpgsql as $$
declare
  v_role   text := coalesce(p_local_role, current_user);
  v_server pg_catalog.pg_foreign_server;
  v_roleid oid;
  v_state  text;
  v_msg    text;
begin
  perform scm._check_identifier('server name', p_server);
  select * into v_server from pg_catalog.pg_foreign_server s where s.srvname = p_server;
  if not found then
    raise exception using errcode = 'ES005', message = format('there is no foreign server %s', p_server),
      hint = 'Create it first with scm.create_shared_asn_server (step 1).';
  end if;
  if v_role = 'public' then
    v_roleid := 0;  -- a mapping for PUBLIC
  else
    select r.oid into v_roleid from pg_catalog.pg_roles r where r.rolname = v_role;
    if not found then
      raise exception using errcode = 'ES005', message = format('role %s does not exist: no user mapping on server %s', v_role, p_server),
        hint = 'Pass the local role that runs the copy (the pg_cron job''s role), or null for the current role.';
    end if;
  end if;
  if coalesce(p_remote_user, '') = '' then
    raise exception using errcode = 'ES005', message = format('user mapping for %s on server %s: the middle database user is missing', v_role, p_server),
      hint = 'Pass the role the cloud created for you in its middle database.';
  end if;
  if p_password = '' then
    raise exception using errcode = 'ES005', message = format('user mapping for %s on server %s: the password is empty', v_role, p_server),
      hint = 'Pass the middle database role''s password (postgres_fdw refuses to connect without one for a non-superuser).';
  end if;
  if p_password is null and not (select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user) then
    raise exception using errcode = 'ES005', message = 'a user mapping without password needs password_required ''false'', which only a superuser may set',
      hint = 'Pass the middle database role''s password, or have a superuser call this function.';
  end if;
  -- CREATE USER MAPPING's own privilege check, made here so that its error (which would quote the statement) never happens
  if not pg_catalog.pg_has_role(current_user, v_server.srvowner, 'USAGE')
     and not (v_role = current_user and pg_catalog.has_server_privilege(v_server.oid, 'USAGE')) then
    raise exception using errcode = '42501',
      message = format('role %s may not create a user mapping for %s on foreign server %s', current_user, v_role, p_server),
      hint = 'The server''s owner (or a superuser) maps any role; another role needs USAGE on the server and maps only itself.';
  end if;
  begin
    -- run again: the new user and password replace the old ones
    if exists (select from pg_catalog.pg_user_mappings m where m.srvid = v_server.oid and m.umuser = v_roleid) then
      execute format('drop user mapping for %I server %I', v_role, p_server);
    end if;
    if p_password is null then
      execute format('create user mapping for %I server %I options (user %L, password_required %L)',
                     v_role, p_server, p_remote_user, 'false');
    else
      execute format('create user mapping for %I server %I options (user %L, password %L)',
                     v_role, p_server, p_remote_user, p_password);
    end if;
  exception when others then
    -- raised again without the statement (its CONTEXT would carry the password) and without DETAIL
    get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    raise exception using errcode = v_state,
      message = format('user mapping for %s on server %s not created: %s', v_role, p_server, cloud._redact(v_msg, p_password)),
      hint = 'The statement is not shown, so that the password is not either; check the server, the role and your privileges.';
  end;
end $$;
comment on function scm.create_shared_asn_user_mapping is 'DBA, step 2: the user mapping (run again: replaces its user and password). Non-superusers must give a password (postgres_fdw insists); password_required false is for superusers only. ES005 for a missing server, role, user or password, 42501 without the privilege; an error never shows the password.';

------------------------------------------------------------------------------
-- Provider tokens: no row in an error
------------------------------------------------------------------------------
create or replace function cloud.store_provider_token(
  p_endpoint   text,
  p_token_key  text,
  p_token      text,
  p_expires_at timestamptz
) returns cloud.provider_token
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_row   cloud.provider_token;
  v_state text;
  v_msg   text;
begin
  if coalesce(p_token, '') = '' or p_token_key is null or p_expires_at is null or p_expires_at <= clock_timestamp() then
    raise exception using errcode = 'EC014',
      message = format('provider token for endpoint %s, key %s: empty, without a key, or already expired (%s)',
                       p_endpoint, coalesce(p_token_key, 'NULL'), coalesce(p_expires_at::text, 'NULL')),
      hint = 'The cloud''s token answer did not carry a usable token and lifetime; see the adapter''s log line.';
  end if;
  perform cloud._raise_unknown_endpoint(p_endpoint) where not exists (select from cloud.endpoint where name = p_endpoint);
  begin
    insert into cloud.provider_token as t (endpoint, token_key, token, expires_at)
    values (p_endpoint, p_token_key, p_token, p_expires_at)
    on conflict (endpoint, token_key) do update
       set token = excluded.token, expires_at = excluded.expires_at, obtained_at = clock_timestamp(), obtained_count = t.obtained_count + 1
    returning * into v_row;
  exception when others then
    -- a constraint's DETAIL ("Failing row contains …") would show the token
    get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    raise exception using errcode = v_state,
      message = format('provider token for endpoint %s, key %s not stored: %s', p_endpoint, p_token_key, cloud._redact(v_msg, p_token)),
      hint = 'The row is not shown, so that the token is not either.';
  end;
  return v_row;
end $$;
comment on function cloud.store_provider_token is 'Keeps a freshly obtained token for (endpoint, key) and counts the token call. EC014 when the token is empty or already expired or has no key; no error shows the token.';

------------------------------------------------------------------------------
-- The vault: a name is repeated only when it is one
------------------------------------------------------------------------------
set local role erp_cloud_vault_owner;

create or replace function vault._check_name(p_name text) returns void
language plpgsql stable set search_path = '' as $$
begin
  -- an invalid name, or the master key itself, is most likely a key or a value
  -- given in the name's place: never repeated
  if p_name is null or p_name !~ '^[a-z][a-z0-9_.-]{0,62}$'
     or exists (select from vault.secret s where s.key_id = vault._key_id(p_name)) then
    raise exception using errcode = 'EC023', message = 'the secret name given is not valid',
      detail = format('It has %s characters. It is not repeated here: it may be a key or a value given in the wrong place.', coalesce(pg_catalog.length(p_name), 0)),
      hint = 'Use lower-case letters, digits, dot, dash or underscore, starting with a letter, e.g. nuonuo.app_secret; check the order of the arguments (name, value, key).';
  end if;
end $$;
comment on function vault._check_name is 'Internal: EC023 unless the name is a simple lower-case name (and not the vault''s master key: arguments in the wrong order). The name is never quoted.';

create or replace function vault.rotate_secret(
  p_name       text,  -- an existing secret
  p_new_value  text,  -- the new plaintext
  p_master_key text   -- the vault's master key
) returns vault.secret_summary
language plpgsql security definer set search_path = '' as $$
declare
  v_key_id text := vault._check_key(p_master_key);
  v_row    vault.secret;
begin
  perform vault._check_name(p_name);
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
comment on function vault.rotate_secret(text, text, text) is 'Gives an existing secret a new value (version + 1, rotated_at = now); EC020 when there is no such secret, EC023 for a name that is not one (not quoted). Listeners pick the new value up when their cache expires.';

create or replace function vault.read_secret(
  p_name       text,  -- the secret's name
  p_master_key text   -- the vault's master key
) returns text
language plpgsql security definer set search_path = '' as $$
declare
  v_key_id text := vault._check_key(p_master_key);
  v_row    vault.secret;
begin
  perform vault._check_name(p_name);
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
comment on function vault.read_secret(text, text) is 'The plaintext of a secret, for the listener only. EC020 when missing, EC021 when the key is not the one it is encrypted under, EC022 for a short key, EC023 for a name that is not one (not quoted: it may be the key, given in the wrong place).';

reset role;

create or replace function sso._vault_name_is_sso(p_name text) returns void
language plpgsql immutable set search_path = '' as $$
begin
  if p_name is null or pg_catalog.left(p_name, 4) <> 'sso.' then
    -- not quoted: a key or a value given in the name's place would land in the log
    raise exception using errcode = 'EO012', message = 'the SSO service may only use vault secrets named sso.*',
      hint = 'The OpenID Provider only keeps secrets named sso.* (sso.signing_keys, sso.cookie_keys); other secrets belong to other services. Check the order of the arguments (name, then key).';
  end if;
end $$;
comment on function sso._vault_name_is_sso(text) is 'Internal: EO012 unless the secret name starts with sso. (the refused name is not quoted).';

------------------------------------------------------------------------------
-- Comments: the cloud.log partitions, erp.ar_invoice.tax_cloud_response
------------------------------------------------------------------------------
comment on table cloud.log_default is 'Cloud_Log rows of a month that has no partition of its own. Normally empty: cloud.ensure_log_partitions creates this month and the next two ahead (pg_cron hourly, or the listener''s maintenance). Rows here mean partitions were missing; that month''s partition cannot be created while they are here, and cloud.age_out_log never drops them.';

create function cloud._log_partition_comment(p_month date) returns text
language sql immutable set search_path = '' as $$
  select pg_catalog.format('Cloud_Log for %s (UTC): one month of cloud.log. Created ahead by cloud.ensure_log_partitions; dropped whole by cloud.age_out_log once the month is older than the log_retention setting.',
                           pg_catalog.to_char(p_month, 'YYYY-MM'))
$$;
comment on function cloud._log_partition_comment(date) is 'Internal: the comment of the cloud.log partition of one month.';
revoke execute on function cloud._log_partition_comment(date) from public;
-- cloud.ensure_log_partitions runs as its caller: pg_cron's job owner, or the listener's maintenance
grant execute on function cloud._log_partition_comment(date) to erp_cloud_listener;

create or replace function cloud.ensure_log_partitions(
  p_months_ahead integer default 2,
  p_now          timestamptz default clock_timestamp()
) returns integer
language plpgsql as $$
declare
  v_month   date;
  v_created integer := 0;
  v_name    text;
begin
  for i in 0 .. p_months_ahead loop
    v_month := (date_trunc('month', p_now at time zone 'UTC') + make_interval(months => i))::date;
    v_name := 'log_p' || to_char(v_month, 'YYYYMM');
    continue when to_regclass('cloud.' || v_name) is not null;
    begin
      execute format('create table cloud.%I partition of cloud.log for values from (%L) to (%L)',
                     v_name, (v_month::timestamp at time zone 'UTC'),
                     ((v_month + interval '1 month')::timestamp at time zone 'UTC'));
      execute format('comment on table cloud.%I is %L', v_name, cloud._log_partition_comment(v_month));
      v_created := v_created + 1;
    exception when duplicate_table then null;  -- a concurrent run made it
    when others then
      raise notice 'cloud.log partition % not created (%): rows keep going to cloud.log_default', v_name, sqlerrm;
    end;
  end loop;
  return v_created;
end $$;
comment on function cloud.ensure_log_partitions is 'Creates this month''s and the next months'' cloud.log partitions (log_pYYYYMM), each with its comment; returns how many were created.';

do $$
declare
  v_part record;
begin
  for v_part in
    select c.relname from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'cloud.log'::regclass and c.relname ~ '^log_p[0-9]{6}$'
       and pg_catalog.obj_description(c.oid, 'pg_class') is null
  loop
    execute format('comment on table cloud.%I is %L', v_part.relname,
                   cloud._log_partition_comment(to_date(substr(v_part.relname, 6), 'YYYYMM')));
  end loop;
end $$;

comment on table erp.ar_invoice is 'AR invoices issued through the tax cloud. invoice_status: pending → issuing → issued, or failed (error_code / error_message say why: unknown_outcome and poll_limit mean the platform may still have issued it, so only tax.requery_invoice applies; any other code is a definite refusal that tax.reissue_invoice may issue again), then partially_reversed while some lines have an issued red invoice, and reversed when every line has. tax_cloud_response keeps the latest raw answer of each step under its own key: submit (tax.issue accepted), issue (tax.issue failed), query (result query, answered or failed), reinvoice (signing retry) with reinvoices / reinvoice_at (how many were sent, the last when), red_confirm and red_query (the red-letter confirmation form and its status), stale (an answer about an earlier orderNo); after tax.reissue_invoice it starts again with previous (the earlier answers) and previous_request_id. The PDF is not kept here but in erp.attachment.';
