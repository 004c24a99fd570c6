-- 0003 — the egress guard, part two: which hosts and addresses each endpoint
-- may reach (the 白名单 made concrete).
--
-- Why: a payload or a cloud's answer can carry URLs (PDF links, redirects). The
-- listener refuses any request whose host, resolved address or redirect target
-- is outside the endpoint's allowlist, and refuses loopback, private,
-- link-local and cloud-metadata addresses unless the endpoint explicitly
-- allows them (tests and the demo run on 127.0.0.1 that way). The check runs
-- on the address actually connected to, so DNS rebinding does not get around it.
--
-- SQLSTATEs added (mirrored in listener/errors.ts):
--   EC011  invalid allowlist setting

alter table cloud.endpoint
  add column allow_hosts   text[] not null default '{}',
  add column allow_cidrs   cidr[] not null default '{}',
  add column allow_private boolean not null default false;
comment on column cloud.endpoint.allow_hosts is 'Hosts this endpoint may call besides the base URL''s own host; ''*.example.com'' matches subdomains.';
comment on column cloud.endpoint.allow_cidrs is 'When not empty, every resolved address must fall in one of these ranges (the provider''s published address ranges).';
comment on column cloud.endpoint.allow_private is 'Allow loopback, private and link-local addresses (tests, the demo, an on-premise cloud). Metadata addresses stay refused.';

create function cloud.put_endpoint_allowlist(
  p_name          text,               -- endpoint name
  p_allow_hosts   text[] default '{}', -- extra hosts ('*.example.com' for subdomains)
  p_allow_cidrs   cidr[] default '{}', -- address ranges every resolved address must fall in; empty = any public address
  p_allow_private boolean default false -- allow loopback / private / link-local addresses
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
  v_bad text;
begin
  select h into v_bad from unnest(coalesce(p_allow_hosts, '{}')) h
   where h !~ '^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$' limit 1;
  if v_bad is not null or p_allow_hosts is null or p_allow_cidrs is null or p_allow_private is null then
    raise exception using errcode = 'EC011', message = format('endpoint %s: allowed host %L is not a host name', p_name, v_bad),
      hint = 'Give lower-case host names such as api.nuonuo.com or *.yonyoucloud.com; no scheme, port or path.';
  end if;
  update cloud.endpoint
     set allow_hosts = p_allow_hosts, allow_cidrs = p_allow_cidrs, allow_private = p_allow_private, updated_at = now()
   where name = p_name
  returning * into v_row;
  if not found then
    raise exception using errcode = 'EC001', message = format('unknown cloud endpoint %L', p_name),
      hint = 'Create it first with cloud.put_endpoint(...).';
  end if;
  return v_row;
end $$;
comment on function cloud.put_endpoint_allowlist is 'Sets which hosts and address ranges an endpoint may reach, and whether private addresses are allowed; EC011 names a bad host.';

revoke execute on function cloud.put_endpoint_allowlist(text, text[], cidr[], boolean) from public;
grant execute on function cloud.put_endpoint_allowlist(text, text[], cidr[], boolean) to erp_cloud_operator;
