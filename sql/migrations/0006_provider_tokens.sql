-- 0006 — provider access tokens cached in the database, shared by every listener.
--
-- Why: cloud platforms hand out access tokens by client credentials and count
-- those calls against a small quota (Nuonuo: a token lives 24 h and token
-- calls are limited per day; YonBIP: per tenant, ~2 h). A token obtained by one
-- listener must serve every listener until shortly before it expires, and two
-- listeners that find none at the same moment must not both ask for one.
-- Adapters reach this through the listener's ProviderContext.token(); the
-- single-flight is a session-level advisory lock per (endpoint, key): no
-- transaction stays open while the listener waits for the token endpoint.
--
-- SQLSTATEs added (mirrored in listener/errors.ts):
--   EC014  invalid provider token (empty, or already expired when stored)

-- One EC001 for the functions of this and later migrations that take an
-- endpoint name (0002, 0003 and 0005 keep their own copies: they have landed).
create function cloud._raise_unknown_endpoint(p_name text) returns void
language plpgsql as $$
begin
  raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_name),
    hint = 'Create it first with cloud.put_endpoint(...).';
end $$;
comment on function cloud._raise_unknown_endpoint is 'Internal: the one EC001 (unknown cloud endpoint) for functions that take an endpoint name.';
revoke execute on function cloud._raise_unknown_endpoint(text) from public;
grant execute on function cloud._raise_unknown_endpoint(text) to erp_cloud_operator;

create table cloud.provider_token (
  endpoint    text not null references cloud.endpoint (name) on update cascade on delete cascade,
  token_key   text not null,
  token       text not null,
  expires_at  timestamptz not null,
  obtained_at timestamptz not null default clock_timestamp(),
  obtained_count bigint not null default 1,
  primary key (endpoint, token_key)
);
comment on table cloud.provider_token is 'Access tokens the listener obtained from a cloud, per endpoint and key (e.g. a tenant), reused until shortly before expires_at. Readable only by the listener role.';
comment on column cloud.provider_token.token_key is 'What the token is for within the endpoint: an app key, a tenant id, a scope.';
comment on column cloud.provider_token.obtained_count is 'How many times a token was obtained for this key: the token calls spent.';
revoke all on cloud.provider_token from public;
grant select on cloud.provider_token to erp_cloud_listener;

create function cloud.lock_provider_token(
  p_endpoint  text,  -- cloud.endpoint name
  p_token_key text   -- the token's key within the endpoint
) returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
  select pg_catalog.pg_advisory_lock(pg_catalog.hashtextextended('cloud.provider_token:' || p_endpoint || ':' || p_token_key, 0))
$$;
comment on function cloud.lock_provider_token is 'Serialises obtaining one token across listeners: a session-level lock (no transaction stays open during the token call), held until cloud.unlock_provider_token or the end of the session; the second listener then finds the first one''s token.';

create function cloud.unlock_provider_token(
  p_endpoint  text,
  p_token_key text
) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
  select pg_catalog.pg_advisory_unlock(pg_catalog.hashtextextended('cloud.provider_token:' || p_endpoint || ':' || p_token_key, 0))
$$;
comment on function cloud.unlock_provider_token is 'Releases the lock cloud.lock_provider_token took in this session; false when this session did not hold it.';

create function cloud.valid_provider_token(
  p_endpoint  text,
  p_token_key text,
  p_margin    interval default interval '5 minutes'  -- refresh this long before the token expires
) returns cloud.provider_token
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
  select t from cloud.provider_token t
   where t.endpoint = p_endpoint and t.token_key = p_token_key and t.expires_at > clock_timestamp() + p_margin
$$;
comment on function cloud.valid_provider_token is 'The cached token for (endpoint, key) when it stays valid for at least p_margin; null otherwise.';

create function cloud.store_provider_token(
  p_endpoint   text,
  p_token_key  text,
  p_token      text,
  p_expires_at timestamptz
) returns cloud.provider_token
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_row cloud.provider_token;
begin
  if coalesce(p_token, '') = '' or p_expires_at is null or p_expires_at <= clock_timestamp() then
    raise exception using errcode = 'EC014',
      message = format('provider token for endpoint %s, key %s: empty or already expired (%s)', p_endpoint, p_token_key, p_expires_at),
      hint = 'The cloud''s token answer did not carry a usable token and lifetime; see the adapter''s log line.';
  end if;
  perform cloud._raise_unknown_endpoint(p_endpoint) where not exists (select from cloud.endpoint where name = p_endpoint);
  insert into cloud.provider_token as t (endpoint, token_key, token, expires_at)
  values (p_endpoint, p_token_key, p_token, p_expires_at)
  on conflict (endpoint, token_key) do update
     set token = excluded.token, expires_at = excluded.expires_at, obtained_at = clock_timestamp(), obtained_count = t.obtained_count + 1
  returning * into v_row;
  return v_row;
end $$;
comment on function cloud.store_provider_token is 'Keeps a freshly obtained token for (endpoint, key) and counts the token call. EC014 when the token is empty or already expired.';

create function cloud.forget_provider_token(
  p_endpoint  text,
  p_token_key text,
  p_token     text default null  -- forget only if this is still the cached value (another listener may have refreshed it)
) returns boolean
language sql security definer set search_path = pg_catalog, pg_temp as $$
  with gone as (
    delete from cloud.provider_token
     where endpoint = p_endpoint and token_key = p_token_key and (p_token is null or token = p_token)
    returning 1)
  select exists (select from gone)
$$;
comment on function cloud.forget_provider_token is 'Drops a cached token the cloud refused, so the next call obtains a new one. Returns whether a row was dropped.';

revoke all on function cloud.lock_provider_token(text, text), cloud.unlock_provider_token(text, text),
  cloud.valid_provider_token(text, text, interval), cloud.store_provider_token(text, text, text, timestamptz),
  cloud.forget_provider_token(text, text, text) from public;
-- the token itself only ever reaches the listener; an operator may only make it be obtained again
grant execute on function cloud.lock_provider_token(text, text), cloud.unlock_provider_token(text, text),
  cloud.valid_provider_token(text, text, interval), cloud.store_provider_token(text, text, text, timestamptz),
  cloud.forget_provider_token(text, text, text)
  to erp_cloud_listener;
grant execute on function cloud.forget_provider_token(text, text, text) to erp_cloud_operator;
