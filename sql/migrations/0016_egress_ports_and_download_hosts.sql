-- 0016 — egress by (scheme, host, port), and a download allowlist of its own.
--
-- Why: the allowlist compared host names and ignored ports, so with
-- '*.nuonuo.com' allowed a cloud's answer could point the PDF download at
-- sdk.nuonuo.com:6379; with allow_private (the demo, the tests) a cloud-supplied
-- URL reached every port of 127.0.0.1, the database included, in any spelling
-- (0x7f000001, 2130706433, 127.1). Now:
--   * an allowlist entry may carry a port ('files.example.com:8443',
--     '*.nuonuo.com:443'); without one it means the default port of the
--     scheme in use, never any port (the listener, listener/egress.ts, judges);
--   * cloud.endpoint.download_hosts: where URLs from the cloud's answers (PDF,
--     OFD, XML downloads) may go besides the base URL's origin, independent of
--     allow_hosts; set with cloud.put_endpoint_download_hosts;
--   * an entry that is an IP literal (any spelling WHATWG URL accepts: dotted,
--     decimal, hex, octal, short forms, IPv6, IPv4-mapped) in a metadata range
--     is refused always; in a loopback, private, link-local, unspecified or
--     multicast range it is refused unless allow_private, and then accepted
--     with a WARNING naming it; a bad port is refused;
--   * the claim returns download_hosts with the rest of the allowlist.
--
-- SQLSTATEs added: none (EC011, invalid allowlist setting, covers every refusal).

alter table cloud.endpoint add column download_hosts text[] not null default '{}';
comment on column cloud.endpoint.download_hosts is 'Where URLs taken from the cloud''s answers (PDF/OFD/XML downloads) may go besides the base URL''s own origin: ''host'', ''host:port'', ''*.example.com[:port]''; no port means the scheme''s default port. Independent of allow_hosts.';
comment on column cloud.endpoint.allow_hosts is 'Hosts this endpoint''s API calls may reach besides the base URL''s own origin: ''host'', ''host:port'', ''*.example.com[:port]'' (subdomains); no port means the scheme''s default port (443 / 80), never any port.';

create function cloud._egress_ip_literal(
  p_host text  -- a host without port, lower case, as written in an allowlist entry
) returns inet
language plpgsql immutable
set search_path = pg_catalog
as $$
declare
  v_parts text[];
  v_n     integer;
  v_val   numeric := 0;
  v_num   numeric;
  v_part  text;
  v_ip    inet;
begin
  if p_host ~ ':' then  -- IPv6, bracketed or not
    begin
      v_ip := btrim(p_host, '[]')::inet;
    exception when others then
      return null;
    end;
    if family(v_ip) = 6 and v_ip <<= '::ffff:0.0.0.0/96'::inet then
      return '0.0.0.0'::inet + (v_ip - '::ffff:0.0.0.0'::inet);  -- IPv4-mapped: the IPv4 address it is
    end if;
    return v_ip;
  end if;
  -- WHATWG URL: a host whose every label is a number (decimal, 0x hex, 0 octal) is an IPv4 address;
  -- the last number fills the remaining bytes ('127.1', '2130706433')
  v_parts := string_to_array(rtrim(p_host, '.'), '.');
  v_n := cardinality(v_parts);
  if v_n is null or v_n = 0 or v_n > 4 then return null; end if;
  for i in 1 .. v_n loop
    v_part := v_parts[i];
    if v_part ~ '^0x[0-9a-f]{0,16}$' then
      v_num := ('x' || lpad(coalesce(nullif(substr(v_part, 3), ''), '0'), 16, '0'))::bit(64)::bigint;
    elsif v_part ~ '^0[0-7]{1,22}$' then
      v_num := 0;
      for j in 2 .. length(v_part) loop v_num := v_num * 8 + substr(v_part, j, 1)::integer; end loop;
    elsif v_part ~ '^[0-9]{1,20}$' then
      v_num := v_part::numeric;
    else
      return null;
    end if;
    if i < v_n then
      if v_num > 255 then return null; end if;
      v_val := v_val + v_num * 256 ^ (4 - i);
    else
      if v_num >= 256 ^ (5 - v_n) then return null; end if;
      v_val := v_val + v_num;
    end if;
  end loop;
  return '0.0.0.0'::inet + v_val::bigint;
end $$;
comment on function cloud._egress_ip_literal is 'Internal: the address an allowlist host denotes when it is an IP literal in any spelling WHATWG URL accepts (dotted, decimal, hex, octal, short forms, IPv6, IPv4-mapped as IPv4); null for a name.';
revoke execute on function cloud._egress_ip_literal(text) from public;
grant execute on function cloud._egress_ip_literal(text) to erp_cloud_operator;

create function cloud._egress_address_kind(
  p_ip inet  -- an address
) returns text
language sql immutable
set search_path = pg_catalog
as $$
  select case
    when p_ip = any ('{169.254.169.254,169.254.170.2,100.100.100.200,fd00:ec2::254}'::inet[]) then 'metadata'
    when p_ip <<= any ('{127.0.0.0/8,::1/128}'::inet[]) then 'loopback'
    when p_ip <<= any ('{0.0.0.0/8,::/128}'::inet[]) then 'unspecified'
    when p_ip <<= any ('{10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7}'::inet[]) then 'private'
    when p_ip <<= any ('{169.254.0.0/16,fe80::/10}'::inet[]) then 'link-local'
    when p_ip <<= any ('{224.0.0.0/4,240.0.0.0/4,ff00::/8}'::inet[]) then 'multicast'
    else 'public' end
$$;
comment on function cloud._egress_address_kind is 'Internal: metadata, loopback, unspecified, private, link-local, multicast or public — the classes listener/egress.ts refuses or allows.';
revoke execute on function cloud._egress_address_kind(inet) from public;
grant execute on function cloud._egress_address_kind(inet) to erp_cloud_operator;

create function cloud._check_egress_hosts(
  p_endpoint      text,    -- endpoint name, for the message
  p_what          text,    -- 'allowed host' or 'download host', for the message
  p_hosts         text[],  -- the entries
  p_allow_private boolean  -- whether the endpoint allows private addresses
) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  v_entry text;
  v_m     text[];
  v_host  text;
  v_ip    inet;
  v_kind  text;
begin
  if p_hosts is null then
    raise exception using errcode = 'EC011', message = format('endpoint %s: the %s list is null', p_endpoint, p_what),
      hint = 'Give an empty array ''{}'' for none.';
  end if;
  foreach v_entry in array p_hosts loop
    v_m := regexp_match(lower(coalesce(v_entry, '')), '^(\*\.)?(\[[0-9a-f:.]+\]|[^:\[\]/@?#\s]+)(?::([0-9]*))?$');
    v_host := rtrim(v_m[2], '.');
    if v_m is null or v_host = '' then
      raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L is not a host name', p_endpoint, p_what, v_entry),
        hint = 'Give host names such as api.nuonuo.com, *.yonyoucloud.com or files.example.com:8443; no scheme, path or credentials.';
    end if;
    if v_m[3] is not null and (v_m[3] !~ '^[0-9]{1,5}$' or v_m[3]::integer not between 1 and 65535) then
      raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L has a bad port', p_endpoint, p_what, v_entry),
        hint = 'A port is a number from 1 to 65535 after the host (files.example.com:8443); leave it out for the scheme''s default port.';
    end if;
    v_ip := cloud._egress_ip_literal(v_host);
    if v_ip is null then
      if v_host ~ '(^|\.)(0x[0-9a-f]*|[0-9]+)$' or v_host ~ ':'
         or v_host !~ '^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$' then
        raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L is neither a host name nor an IP address', p_endpoint, p_what, v_entry),
          hint = 'Give host names such as api.nuonuo.com or *.yonyoucloud.com, or a public IP address.';
      end if;
      continue;
    end if;
    if v_m[1] is not null then
      raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L puts a wildcard before an IP address', p_endpoint, p_what, v_entry),
        hint = 'Wildcards (*.) are for host names; list the address itself.';
    end if;
    v_kind := cloud._egress_address_kind(v_ip);
    if v_kind = 'metadata' then
      raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L is a cloud metadata address (%s)', p_endpoint, p_what, v_entry, host(v_ip)),
        hint = 'Metadata addresses are never reachable; remove the entry.';
    elsif v_kind <> 'public' and not p_allow_private then
      raise exception using errcode = 'EC011', message = format('endpoint %s: %s %L is a %s address (%s) and the endpoint does not allow private addresses', p_endpoint, p_what, v_entry, v_kind, host(v_ip)),
        hint = 'Remove the entry, or if this endpoint really is on a private network pass p_allow_private => true to cloud.put_endpoint_allowlist first.';
    elsif v_kind <> 'public' then
      raise warning using message = format('endpoint %s: %s %L is a %s address (%s); allowed because the endpoint allows private addresses', p_endpoint, p_what, v_entry, v_kind, host(v_ip)),
        hint = 'Make sure this is meant: URLs naming it can reach that address.';
    end if;
  end loop;
end $$;
comment on function cloud._check_egress_hosts is 'Internal: refuses (EC011) an allowlist or download entry that is not host[:port], has a bad port, is a metadata IP literal, or a private/loopback/link-local IP literal when private addresses are not allowed (a WARNING when they are).';
revoke execute on function cloud._check_egress_hosts(text, text, text[], boolean) from public;
grant execute on function cloud._check_egress_hosts(text, text, text[], boolean) to erp_cloud_operator;

create or replace function cloud.put_endpoint_allowlist(
  p_name          text,               -- endpoint name
  p_allow_hosts   text[] default '{}', -- extra hosts: 'host', 'host:port', '*.example.com[:port]'; no port = the scheme's default
  p_allow_cidrs   cidr[] default '{}', -- address ranges every resolved address must fall in; empty = any public address
  p_allow_private boolean default false -- allow loopback / private / link-local addresses
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
begin
  if p_allow_cidrs is null or p_allow_private is null then
    raise exception using errcode = 'EC011', message = format('endpoint %s: allowed ranges and allow_private may not be null', p_name),
      hint = 'Give ''{}'' for no ranges and true or false for allow_private.';
  end if;
  perform cloud._raise_unknown_endpoint(p_name) where not exists (select from cloud.endpoint where name = p_name);
  perform cloud._check_egress_hosts(p_name, 'allowed host', p_allow_hosts, p_allow_private);
  -- download hosts stay valid under the new allow_private
  perform cloud._check_egress_hosts(p_name, 'download host', e.download_hosts, p_allow_private)
     from cloud.endpoint e where e.name = p_name;
  update cloud.endpoint
     set allow_hosts = p_allow_hosts, allow_cidrs = p_allow_cidrs, allow_private = p_allow_private, updated_at = now()
   where name = p_name
  returning * into v_row;
  return v_row;
end $$;
comment on function cloud.put_endpoint_allowlist(text, text[], cidr[], boolean) is 'Sets which hosts (host[:port]) and address ranges an endpoint''s API calls may reach, and whether private addresses are allowed; EC011 names a bad entry (bad port, metadata IP, private IP without allow_private).';

create function cloud.put_endpoint_download_hosts(
  p_name           text,   -- endpoint name
  p_download_hosts text[]  -- 'host', 'host:port', '*.example.com[:port]'; '{}' = only the base URL's origin
) returns cloud.endpoint
language plpgsql as $$
declare
  v_row cloud.endpoint;
begin
  perform cloud._raise_unknown_endpoint(p_name) where not exists (select from cloud.endpoint where name = p_name);
  perform cloud._check_egress_hosts(p_name, 'download host', p_download_hosts, e.allow_private)
     from cloud.endpoint e where e.name = p_name;
  update cloud.endpoint set download_hosts = p_download_hosts, updated_at = now()
   where name = p_name
  returning * into v_row;
  return v_row;
end $$;
comment on function cloud.put_endpoint_download_hosts(text, text[]) is 'Sets where URLs from the cloud''s answers (PDF/OFD/XML downloads) may go besides the base URL''s origin, independent of the API allowlist; EC011 names a bad entry.';
revoke execute on function cloud.put_endpoint_download_hosts(text, text[]) from public;
grant execute on function cloud.put_endpoint_download_hosts(text, text[]) to erp_cloud_operator;

alter type cloud.claimed_message add attribute download_hosts text[];
comment on type cloud.claimed_message is 'A leased message with what the provider adapter needs to send it, when it may be sent (send_at: now, or its rate-limit slot), and where it may go (the endpoint''s allowlist and download hosts at the claim).';

create or replace function cloud.claim_messages(
  p_worker       text,                      -- the listener's worker id (cloud.listener)
  p_limit        integer default 100,       -- batch size
  p_endpoints    text[] default null,       -- only these endpoints; all when null
  p_lease_margin interval default '5 seconds', -- lease = endpoint timeout + this
  p_now          timestamptz default clock_timestamp()
) returns setof cloud.claimed_message
language plpgsql
-- walk outbox_active in order whatever the statistics say (a new or just-truncated
-- outbox has none); jit off because disabled plan types inflate costs past jit_above_cost
set enable_seqscan = off set enable_bitmapscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
as $$
declare
  v_endpoint text;
  v_budget   integer;
  v_ids      uuid[];
  v_avail    double precision;
  v_rate     double precision;
  v_slot0    timestamptz;
  v_left     integer := p_limit;
begin
  -- no "has due work?" pre-check: after millions of messages the front of the
  -- pending range is full of dead index entries until vacuum, and walking it
  -- twice per claim halves the claim rate; an endpoint without work costs one
  -- short index probe here
  for v_endpoint in
    select e.name from cloud.endpoint e
     where e.enabled and (p_endpoints is null or e.name = any (p_endpoints))
     order by random()  -- no endpoint starves another
  loop
    exit when v_left <= 0;
    v_budget := cloud._take_budget(v_endpoint, v_left, p_now);
    continue when v_budget <= 0;
    with candidate as (
      select o.request_id
        from cloud.outbox o
       where o.status = 'pending' and o.endpoint = v_endpoint and o.next_attempt_at <= p_now
         and (o.ordering_key is null or not exists (
               select from cloud.outbox h
                where h.ordering_key = o.ordering_key and h.id < o.id
                  and h.status in ('pending', 'in_flight', 'failed', 'dead')))
       order by o.next_attempt_at, o.id
       limit v_budget
       for update of o skip locked
    ), leased as (
      update cloud.outbox o
         set status = 'in_flight', attempts = o.attempts + 1, locked_by = p_worker,
             locked_until = p_now + make_interval(secs => e.timeout_ms / 1000.0) + p_lease_margin,
             updated_at = p_now
        from candidate c, cloud.endpoint e
       where o.request_id = c.request_id and e.name = o.endpoint
      returning o.request_id
    )
    select coalesce(array_agg(request_id), '{}') into v_ids from leased;
    continue when cardinality(v_ids) = 0;
    select cloud._tokens_available(e, p_now), e.rate_per_s, greatest(p_now, e.tokens_at)
      into v_avail, v_rate, v_slot0 from cloud.endpoint e where e.name = v_endpoint;
    perform cloud._spend_budget(v_endpoint, v_ids, p_now);
    v_left := v_left - cardinality(v_ids);
    return query
      select o.request_id, o.endpoint, o.operation, o.payload, o.attempts, o.aggregate_type, o.aggregate_id,
             o.ordering_key, e.provider, e.base_url, e.timeout_ms, e.config, o.locked_until,
             -- the k-th message takes the k-th token: it goes when that token is due
             case when v_rate is null then p_now
                  else v_slot0 + make_interval(secs => greatest(0, (row_number() over (order by o.id) - v_avail) / v_rate)) end,
             e.allow_hosts, e.allow_cidrs::text[], e.allow_private, e.download_hosts
        from cloud.outbox o join cloud.endpoint e on e.name = o.endpoint
       where o.request_id = any (v_ids)
       order by o.id;
  end loop;
  -- an empty claim means this listener is about to wait on LISTEN: from now on
  -- enqueuers NOTIFY; a non-empty one means it is busy: they stop paying for it
  update cloud.listener set idle = (v_left = p_limit), heartbeat_at = p_now
   where worker_id = p_worker and idle is distinct from (v_left = p_limit);
end $$;
comment on function cloud.claim_messages is 'Leases up to p_limit due messages (FOR UPDATE SKIP LOCKED; only the head of each ordering key), endpoint by endpoint within each endpoint''s rate limit, quota, pause and circuit. Returns each message with its endpoint''s settings and egress allowlist as they are at the claim. Records whether the listener is now idle.';
