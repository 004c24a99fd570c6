#!/usr/bin/env bash
# The current definition of every product schema, one file each in sql/schema/,
# and the baseline a fresh database is installed from, sql/baseline/NNNN_baseline.sql,
# both made from a database migrated file by file (sql/README.md says why and how).
#
#   scripts/dump-schema.sh                       make schema: create a scratch database on the server of
#                                                DATABASE_URL, migrate it file by file (dist/listener/cli.js
#                                                migrate --no-baseline), dump it into sql/schema/ and write
#                                                sql/baseline/NNNN_baseline.sql (older baselines go), drop it.
#                                                Nothing else on that server is touched.
#   scripts/dump-schema.sh --from URL --out DIR [--baseline DIR]
#                                                dump the already migrated database URL into DIR, and its
#                                                baseline into the other DIR (the tests: test/schema-dump.test.ts,
#                                                test/baseline.test.ts)
#   scripts/dump-schema.sh --list-schemas URL    print the product schemas of the migrated database URL
#
# Each file is byte-stable across runs and machines of one PostgreSQL major: what
# pg_dump prints about itself (banners, version lines, SET statements, the random
# \restrict key), the owner of objects owned by the role that ran the migrations,
# and (in sql/schema only) trailing whitespace are taken out; grants, comments and
# owners that are one of the product's roles stay. Partitions bounded by dates are
# made at run time from the clock (cloud.log's months), so they are left out and named
# in the header; the baseline makes them at install time.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Which schemas are the product's, decided here only (the tests read these lines, or ask
# --list-schemas). Every schema a migrated database has is the product's except:
# - EXCLUDED_SCHEMAS: the migration history and the database's default schema
#   (extensions, postgres-migrations' table);
# - EXAMPLE_SCHEMAS: the example ERPs' schemas (sql/examples/<name>: erp is reference-erp's,
#   acme is acme's), never made by `migrate` alone, so not dumped even when a database has an
#   example installed; the baseline refuses to be made from a database whose migrations
#   still fill one (it would leave that out);
# - system schemas and schemas an extension made (pg_cron's cron).
# A schema a new migration creates gets its file and its place in the baseline without a
# change here.
EXCLUDED_SCHEMAS=(public erp_cloud)
EXAMPLE_SCHEMAS=(erp acme)

# Extensions the migrations create only where they can, and skip otherwise: pg_cron in
# the database cron.database_name names (0001), postgres_fdw where it is available and
# the migrating role may create it (0008). The baseline does the same. Every other
# extension of the migrated database is required, in the schema it has there.
OPTIONAL_EXTENSIONS=(pg_cron postgres_fdw)

say() { printf 'dump-schema: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage='usage: scripts/dump-schema.sh [--from URL --out DIR [--baseline DIR] | --list-schemas URL]'
from='' out='' baseline_out='' list=''
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=${2:?--from needs a database URL}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --baseline) baseline_out=${2:?--baseline needs a directory}; shift 2 ;;
    --list-schemas) list=${2:?--list-schemas needs a database URL}; shift 2 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 ($usage)" ;;
  esac
done

# url_with_db URL DB: URL naming database DB instead
url_with_db() { node -e 'const u = new URL(process.argv[1]); u.pathname = "/" + process.argv[2]; console.log(u.toString())' "$1" "$2"; }

# psql from PATH, or from the newest server installation (any psql reads any server)
psql_bin=$(command -v psql || ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -t/ -k4 -n -r | head -n 1 || true)
[ -n "$psql_bin" ] || die "psql not found: install postgresql-client"
# unaligned, tuples only, UTC and ISO dates: what a query prints is the same on every machine
psql_() { PGTZ=UTC PGDATESTYLE='ISO, YMD' PGOPTIONS='-c intervalstyle=postgres -c extra_float_digits=3' "$psql_bin" -X -q -v ON_ERROR_STOP=1 -At "$@"; }

# find_pg_dump MAJOR: a pg_dump of the server's major (another major prints other text)
find_pg_dump() {
  local major=$1 c v
  for c in "/usr/lib/postgresql/$major/bin/pg_dump" "$(pg_config --bindir 2>/dev/null || true)/pg_dump" "$(command -v pg_dump || true)"; do
    [ -x "$c" ] || continue
    v=$("$c" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/')
    if [ "$v" = "$major" ]; then echo "$c"; return; fi
  done
  die "pg_dump $major not found (the server is PostgreSQL $major): install postgresql-client-$major"
}

# name_array NAME…: a SQL name[] literal of simple names ('{a,b}'::name[])
name_array() { local IFS=,; printf "'{%s}'::name[]" "$*"; }

# product_schemas URL: the product schemas of the migrated database URL, one a line (the rule is at the top)
product_schemas() {
  psql_ -d "$1" -c "
    select n.nspname from pg_catalog.pg_namespace n
     where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
       and n.nspname <> all ($(name_array "${EXCLUDED_SCHEMAS[@]}" "${EXAMPLE_SCHEMAS[@]}"))
       and not exists (select from pg_catalog.pg_depend d
                        where d.classid = 'pg_catalog.pg_namespace'::regclass and d.objid = n.oid and d.deptype = 'e')
     order by 1"
}

# dated_partitions URL SCHEMA…: "schema.table parent" for each partition bounded by dates (made at run time from the clock)
dated_partitions() {
  local url=$1; shift
  psql_ -d "$url" -v schemas="$(IFS=,; echo "$*")" <<'SQL'
set search_path = '';
select c.oid::regclass::text || ' ' || i.inhparent::regclass::text
  from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  join pg_catalog.pg_inherits i on i.inhrelid = c.oid
 where n.nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[]) and c.relispartition
   and pg_catalog.pg_get_expr(c.relpartbound, c.oid) ~ '\d{4}-\d{2}-\d{2}'
 order by 1;
SQL
}

# normalise MIGRATOR: pg_dump's text on stdin, the stable text on stdout: what the baseline runs
# (executable, below), without trailing whitespace and with at most two blank lines in a row (taking
# lines out leaves longer runs), none at the start or end
normalise() {
  executable "$1" | awk '
    { sub(/[ \t\r]+$/, "") }
    $0 == "" { blank++; next }
    { if (started && blank > 0) printf "%s", (blank > 1 ? "\n\n" : "\n"); blank = 0; started = 1; print }
  '
}

# dump URL DIR: one file per product schema of the migrated database URL, into DIR
dump() {
  local url=$1 dir=$2 major migrator pgdump s note
  local -a schemas skip parents
  major=$(psql_ -d "$url" -c "select current_setting('server_version_num')::int / 10000")
  migrator=$(psql_ -d "$url" -c "select quote_ident(current_user)")
  pgdump=$(find_pg_dump "$major")
  mapfile -t schemas < <(product_schemas "$url")
  [ ${#schemas[@]} -gt 0 ] || die "no product schema in the database: is it migrated?"
  mkdir -p "$dir"
  for s in "${schemas[@]}"; do
    # partitions bounded by dates: made at run time from the clock, so not part of the definition
    mapfile -t skip < <(dated_partitions "$url" "$s" | awk '{ print "--exclude-table=" $1 }')
    mapfile -t parents < <(dated_partitions "$url" "$s" | awk '{ print $2 }' | sort -u)
    note=''
    if [ ${#parents[@]} -gt 0 ]; then
      note="-- Not listed: the partitions of $(printf '%s, ' "${parents[@]}" | sed 's/, $//') bounded by dates (made at run time from the clock)."$'\n'
    fi
    {
      printf '%s\n' \
        "-- Schema $s: its current definition, as a freshly migrated database has it." \
        "--" \
        "-- GENERATED by scripts/dump-schema.sh (pg_dump --schema-only, PostgreSQL $major): do not edit." \
        "-- Regenerate with \`make schema\` after adding a migration, and commit both." \
        "-- The truth is sql/migrations (history: never edited once landed) plus this file" \
        "-- (what they add up to now). How a change is made: sql/README.md." \
        "-- Objects belong to the role that ran the migrations unless an OWNER TO line names another."
      printf '%s\n' "$note"
      "$pgdump" --schema-only --schema="\"$s\"" ${skip[@]+"${skip[@]}"} -d "$url" | normalise "$migrator"
    } >"$dir/$s.sql"
    say "$dir/$s.sql: $(wc -l <"$dir/$s.sql") lines"
  done
}

# executable MIGRATOR: pg_dump's text on stdin, as the baseline runs it, on stdout. Only what pg_dump
# prints about itself goes (banners, version lines, its SET statements, which the baseline's header sets
# transaction-locally, the \restrict lines psql alone understands) and OWNER TO the migrating role (the
# objects belong to whoever installs). Blank lines and whitespace stay: they may be inside a body.
executable() {
  awk -v migrator="$1" '
    { line[NR] = $0 }
    END {
      for (i = 1; i <= NR; i++) {
        l = line[i]
        if (l == "--" && line[i + 1] ~ /^-- PostgreSQL database dump( complete)?$/ && line[i + 2] == "--") { i += 2; continue }
        if (l ~ /^\\(un)?restrict /) continue
        if (l ~ /^-- Dumped (from database|by pg_dump) version /) continue
        if (l ~ /^SET (statement_timeout|lock_timeout|idle_in_transaction_session_timeout|client_encoding|standard_conforming_strings|check_function_bodies|xmloption|client_min_messages|row_security|default_table_access_method|default_tablespace|default_with_oids|transaction_timeout) = .*;$/) continue
        if (l ~ /^SELECT pg_catalog\.set_config\(.search_path., .., false\);$/) continue
        if (l ~ /^ALTER .* OWNER TO / && substr(l, length(l) - length(migrator) - 10) == " OWNER TO " migrator ";") continue
        if (l ~ /^-- Name: .*; Type: .*; Schema: .*; Owner: /) sub(/; Owner: .*$/, "", l)
        print l
      }
    }
  '
}

# default_privileges URL apply|undo: the ALTER DEFAULT PRIVILEGES (database-wide, for the migrating role)
# that turn the built-in defaults into what the migrations left (apply), or back (undo)
default_privileges() {
  psql_ -d "$1" -v mode="$2" <<'SQL'
with me as (select oid from pg_catalog.pg_roles where rolname = current_user),
d as (select a.defaclobjtype as t, a.defaclacl as acl from pg_catalog.pg_default_acl a
       where a.defaclnamespace = 0 and a.defaclrole = (select oid from me)),
now_ as (select d.t, x.grantee, x.privilege_type from d, pg_catalog.aclexplode(d.acl) x),
builtin as (select d.t, x.grantee, x.privilege_type from d, pg_catalog.aclexplode(pg_catalog.acldefault(d.t, (select oid from me))) x),
diff as (
  select 'grant' as verb, * from (select * from now_ except select * from builtin) g
  union all
  select 'revoke', * from (select * from builtin except select * from now_) r)
select pg_catalog.format('alter default privileges %s %s on %s %s %s;',
         v.verb, pg_catalog.lower(diff.privilege_type),
         case diff.t when 'r' then 'tables' when 'S' then 'sequences' when 'f' then 'functions' when 'T' then 'types' when 'n' then 'schemas' end,
         case v.verb when 'grant' then 'to' else 'from' end,
         case when diff.grantee = 0 then 'public' when diff.grantee = (select oid from me) then 'current_user'
              else pg_catalog.quote_ident(diff.grantee::regrole::text) end)
  from diff, lateral (select case when :'mode' = 'apply' then diff.verb when diff.verb = 'grant' then 'revoke' else 'grant' end as verb) v
 order by 1;
SQL
}

# baseline URL DIR: DIR/NNNN_baseline.sql, what the migrated database URL holds, as SQL that makes it in a
# database without erp-cloud (NNNN: its newest migration). The order is pg_dump's for a whole database:
# cluster-level things first, then the schemas' definitions with their seeded rows, then default
# privileges; then what the migrations made at run time from the clock or the server (dated partitions,
# pg_cron jobs).
baseline() {
  local url=$1 dir=$2 major migrator pgdump n file list t cols vals
  local -a schemas skip parents seeded optional owners
  major=$(psql_ -d "$url" -c "select current_setting('server_version_num')::int / 10000")
  migrator=$(psql_ -d "$url" -c "select quote_ident(current_user)")
  pgdump=$(find_pg_dump "$major")
  mapfile -t schemas < <(product_schemas "$url")
  [ ${#schemas[@]} -gt 0 ] || die "no product schema in the database: is it migrated?"
  t=$(psql_ -d "$url" -c "select pg_catalog.string_agg(distinct n.nspname, ', ') from pg_catalog.pg_namespace n
                             join pg_catalog.pg_depend d on d.refclassid = 'pg_catalog.pg_namespace'::regclass and d.refobjid = n.oid and d.deptype = 'n'
                            where n.nspname = any ($(name_array "${EXAMPLE_SCHEMAS[@]}"))")
  [ -z "$t" ] || die "the example schema(s) $t hold objects in a database migrated from nothing: the baseline leaves example schemas out, so it would not install what the migrations do (make the baseline from a database without examples)"
  list=$(IFS=,; echo "${schemas[*]}")
  n=$(psql_ -d "$url" -c "select pg_catalog.lpad(max(id)::text, 4, '0') from erp_cloud.migration")
  [ -n "$n" ] || die "erp_cloud.migration is empty: is the database migrated?"
  [ "$(psql_ -d "$url" -c "select count(*) = max(id) from erp_cloud.migration")" = t ] || die "erp_cloud.migration has gaps: migrate the database from nothing"
  [ "$(psql_ -d "$url" -c "select count(*) from pg_catalog.pg_default_acl where defaclnamespace <> 0 or defaclrole <> (select oid from pg_catalog.pg_roles where rolname = current_user)")" = 0 ] \
    || die "a migration set default privileges for another role or in a schema: the baseline does not know how to make those (teach baseline() in scripts/dump-schema.sh)"
  optional=$(name_array "${OPTIONAL_EXTENSIONS[@]}")
  mapfile -t skip < <(dated_partitions "$url" "${schemas[@]}" | awk '{ print "--exclude-table=" $1 }')
  mapfile -t parents < <(dated_partitions "$url" "${schemas[@]}" | awk '{ print $2 }' | sort -u)
  file="$dir/${n}_baseline.sql"
  mkdir -p "$dir"
  {
    cat <<EOF
-- erp-cloud baseline $n: what sql/migrations 0001…$n add up to, as one file.
--
-- GENERATED by scripts/dump-schema.sh (\`make schema\`, PostgreSQL $major) from a database migrated
-- file by file: do not edit. It is not a migration: the next \`make schema\` after a new migration
-- replaces it (sql/README.md).
--
-- \`erp-cloud migrate\` installs a database that has no erp-cloud history from this file, in one
-- transaction under the migration lock, and records the files listed below in erp_cloud.migration
-- (copied_from = 'baseline'); the files after $n then run one by one. A database with history never
-- runs it; \`erp-cloud migrate --no-baseline\` runs every file instead. By hand: psql -1 -f <this file>.
-- It creates and changes nothing outside the schemas below but the roles, the extensions and the
-- grants on extension objects that the migrations create too. test/baseline.test.ts proves that it
-- installs what the files do.
--
-- Schemas: ${schemas[*]}
--
EOF
    psql_ -d "$url" -c "select pg_catalog.format('-- migration %s sha256 %s', name, sha256) from erp_cloud.migration order by id"
    cat <<'EOF'

set local check_function_bodies = false;
set local standard_conforming_strings = on;
set local xmloption = content;
set local datestyle = 'ISO, YMD';
set local intervalstyle = postgres;
set local default_tablespace = '';
set local default_table_access_method = heap;

------------------------------------------------------------------------------
-- Roles (cluster-wide: created only where missing), as the migrations create them; the session's
-- search path stays until the schemas come, as for the migrations (extension scripts need one)
------------------------------------------------------------------------------
EOF
    # the roles the product's objects name: owners, grantees, policies' roles
    psql_ -d "$url" -v schemas="$list" <<'SQL'
with product as (select oid from pg_catalog.pg_namespace where nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[])),
refs(r) as (
  select (pg_catalog.aclexplode(nspacl)).grantee from pg_catalog.pg_namespace where oid in (select oid from product)
  union select nspowner from pg_catalog.pg_namespace where oid in (select oid from product)
  union select (pg_catalog.aclexplode(relacl)).grantee from pg_catalog.pg_class where relnamespace in (select oid from product)
  union select relowner from pg_catalog.pg_class where relnamespace in (select oid from product)
  union select (pg_catalog.aclexplode(a.attacl)).grantee from pg_catalog.pg_attribute a join pg_catalog.pg_class c on c.oid = a.attrelid
         where c.relnamespace in (select oid from product) and a.attacl is not null
  union select (pg_catalog.aclexplode(proacl)).grantee from pg_catalog.pg_proc where pronamespace in (select oid from product)
  union select proowner from pg_catalog.pg_proc where pronamespace in (select oid from product)
  union select (pg_catalog.aclexplode(typacl)).grantee from pg_catalog.pg_type where typnamespace in (select oid from product)
  union select typowner from pg_catalog.pg_type where typnamespace in (select oid from product)
  union select pg_catalog.unnest(p.polroles) from pg_catalog.pg_policy p join pg_catalog.pg_class c on c.oid = p.polrelid
         where c.relnamespace in (select oid from product)),
roles as (select r.rolname, r.rolcanlogin, pg_catalog.shobj_description(r.oid, 'pg_authid') as description
            from pg_catalog.pg_roles r
           where r.oid in (select refs.r from refs) and r.rolname <> current_user and r.rolname !~ '^pg_')
select 'do $$
declare
  v_role record;
begin
  for v_role in
    select * from (values
' || pg_catalog.string_agg(pg_catalog.format('      (%L, %L, %L)', rolname, case when rolcanlogin then 'login' else 'nologin' end, description), E',\n' order by rolname) || '
    ) as r(name, attributes, description)
  loop
    begin
      if not exists (select from pg_catalog.pg_roles where rolname = v_role.name) then
        execute pg_catalog.format(''create role %I %s'', v_role.name, v_role.attributes);
        if v_role.description is not null then
          execute pg_catalog.format(''comment on role %I is %L'', v_role.name, v_role.description);
        end if;
      end if;
    exception when duplicate_object or unique_violation then null; -- a concurrent migrate of another database made it
    end;
  end loop;
end $$;'
  from roles having pg_catalog.count(*) > 0;
SQL
    # the roles that own objects: the migrating role must be able to SET ROLE to them (ALTER … OWNER TO)
    mapfile -t owners < <(psql_ -d "$url" -v schemas="$list" <<'SQL'
with product as (select oid from pg_catalog.pg_namespace where nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[])),
owners(r) as (
  select nspowner from pg_catalog.pg_namespace where oid in (select oid from product)
  union select relowner from pg_catalog.pg_class where relnamespace in (select oid from product)
  union select proowner from pg_catalog.pg_proc where pronamespace in (select oid from product)
  union select typowner from pg_catalog.pg_type where typnamespace in (select oid from product))
select rolname from pg_catalog.pg_roles where oid in (select r from owners) and rolname <> current_user order by 1;
SQL
)
    for t in ${owners[@]+"${owners[@]}"}; do
      cat <<EOF

do \$\$
begin
  if not pg_catalog.pg_has_role(current_user, '$t', 'member') then
    execute pg_catalog.format('grant %I to %I', '$t', current_user);
  end if;
end \$\$;
EOF
    done
    cat <<'EOF'

------------------------------------------------------------------------------
-- Default privileges of the installing role, as the migrations leave them
------------------------------------------------------------------------------
EOF
    default_privileges "$url" apply
    cat <<'EOF'

------------------------------------------------------------------------------
-- Extensions (created by the role above, so under its default privileges, as the migrations do)
------------------------------------------------------------------------------
EOF
    psql_ -d "$url" -v optional="$optional" <<'SQL'
select pg_catalog.format($f$do $$
begin
  create extension if not exists %1$I%2$s;
  if (select n.nspname from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace where e.extname = %3$L) <> %4$L then
    raise exception using errcode = '55000',
      message = pg_catalog.format('extension %%s is installed in schema %%s here; the baseline was made with it in schema %%s', %3$L,
        (select n.nspname from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace where e.extname = %3$L), %4$L),
      hint = 'Install file by file instead: erp-cloud migrate --no-baseline (the migrations find the extension where it is).';
  end if;
end $$;$f$, e.extname, case when n.nspname <> 'pg_catalog' then pg_catalog.format(' with schema %I', n.nspname) else '' end, e.extname, n.nspname)
  from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
 where e.extname <> 'plpgsql' and e.extname <> all (:optional)
 order by e.extname;
select pg_catalog.format($f$
do $$
begin
  if not exists (select from pg_catalog.pg_available_extensions where name = %1$L) then
    raise notice 'extension %1$s is not available on this server: erp-cloud works without it';
    return;
  end if;
  begin
    create extension if not exists %1$I%2$s;
  exception when others then
    raise notice 'extension %1$s is not created in database %%: %% (erp-cloud works without it)', pg_catalog.current_database(), sqlerrm;
  end;
end $$;$f$, o.name,
       coalesce((select pg_catalog.format(' with schema %I', n.nspname) from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
                  where e.extname = o.name and n.nspname <> 'pg_catalog'), ''))
  from pg_catalog.unnest(:optional) as o(name)
 order by o.name;
SQL
    cat <<'EOF'

------------------------------------------------------------------------------
-- Grants to the product's roles on objects outside its schemas (extension objects)
------------------------------------------------------------------------------
EOF
    psql_ -d "$url" -v schemas="$list" <<'SQL'
set search_path = '';
with outside as (select oid, nspname from pg_catalog.pg_namespace
             where nspname !~ '^pg_' and nspname not in ('information_schema', 'erp_cloud')
               and nspname <> all (pg_catalog.string_to_array(:'schemas', ',')::name[])),
roles as (select oid, rolname from pg_catalog.pg_roles where rolname <> current_user and rolname !~ '^pg_'),
g(what, stmt) as (
  select 1, pg_catalog.format('grant %s on schema %I to %I;', pg_catalog.lower(a.privilege_type), o.nspname, r.rolname)
    from outside o, pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a, roles r where n.oid = o.oid and r.oid = a.grantee
  union all
  select 2, pg_catalog.format('grant %s on function %s to %I;', pg_catalog.lower(a.privilege_type), p.oid::regprocedure, r.rolname)
    from pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a, roles r where p.pronamespace in (select oid from outside) and r.oid = a.grantee
  union all
  select 3, pg_catalog.format('grant %s on table %s to %I;', pg_catalog.lower(a.privilege_type), c.oid::regclass, r.rolname)
    from pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a, roles r where c.relnamespace in (select oid from outside) and r.oid = a.grantee)
select stmt from g order by what, stmt;
SQL
    cat <<'EOF'

------------------------------------------------------------------------------
-- The schemas (pg_dump), with the built-in default privileges its statements assume
------------------------------------------------------------------------------
EOF
    default_privileges "$url" undo
    # pg_dump gives objects to their owners before it grants anything: a role that owns objects in a schema it
    # does not own needs CREATE there at that moment (a superuser is not asked; the database's owner is). It gets
    # CREATE on every schema made now and loses it afterwards where the migrations did not leave it.
    for t in ${owners[@]+"${owners[@]}"}; do printf 'alter default privileges grant create on schemas to %s;\n' "$t"; done
    printf '%s\n' "set local client_min_messages = warning;" "set local search_path = '';"
    "$pgdump" --section=pre-data ${skip[@]+"${skip[@]}"} $(printf -- '--schema="%s" ' "${schemas[@]}" | tr -d '"') -d "$url" | executable "$migrator"
    for t in ${owners[@]+"${owners[@]}"}; do printf 'alter default privileges revoke create on schemas from %s;\n' "$t"; done
    # (all of it taken, then what the migrations leave given again: the schema's ACL keeps their order)
    psql_ -d "$url" -v schemas="$list" -v owners="$(IFS=,; echo "${owners[*]-}")" <<'SQL'
select pg_catalog.format('revoke all on schema %I from %I;', n.nspname, r.rolname)
       || coalesce((select pg_catalog.format(E'\ngrant %s on schema %I to %I;', pg_catalog.string_agg(pg_catalog.lower(a.privilege_type), ', ' order by a.privilege_type), n.nspname, r.rolname)
                      from pg_catalog.aclexplode(n.nspacl) a where a.grantee = r.oid having pg_catalog.count(*) > 0), '')
  from pg_catalog.pg_namespace n, pg_catalog.pg_roles r
 where n.nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[]) and r.rolname = any (pg_catalog.string_to_array(:'owners', ',')::name[])
   and n.nspowner <> r.oid
 order by n.nspname, r.rolname;
SQL
    cat <<'EOF'

------------------------------------------------------------------------------
-- The rows the migrations insert (tables with rows in a freshly migrated database; columns that
-- default to the clock are left to their default, the time of this install), and sequences
------------------------------------------------------------------------------
EOF
    mapfile -t seeded < <(psql_ -d "$url" -v schemas="$list" <<'SQL'
set search_path = '';
select c.oid::regclass::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
 where n.nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[]) and c.relkind in ('r', 'p') and not c.relispartition
   and (pg_catalog.xpath('/row/n/text()', pg_catalog.query_to_xml(pg_catalog.format('select count(*) as n from %s', c.oid::regclass), false, true, '')))[1]::text::bigint > 0
 order by 1;
SQL
)
    columns_sql="select pg_catalog.string_agg(case when :'what' = 'names' then pg_catalog.quote_ident(a.attname)
                                   else pg_catalog.format('pg_catalog.quote_nullable(t.%I::text)', a.attname) end,
                              case when :'what' = 'names' then ', ' else \$\$ || ', ' || \$\$ end order by a.attnum)
  from pg_catalog.pg_attribute a left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
 where a.attrelid = :'t'::regclass and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
   and coalesce(pg_catalog.pg_get_expr(d.adbin, d.adrelid), '') !~* '\\m(now|clock_timestamp|statement_timestamp|transaction_timestamp|current_timestamp|current_date|current_time|localtimestamp|localtime)\\M';"
    for t in ${seeded[@]+"${seeded[@]}"}; do
      # the insertable columns, and the expression that prints a row's values as literals
      cols=$(psql_ -d "$url" -v t="$t" -v what=names <<<"$columns_sql")
      vals=$(psql_ -d "$url" -v t="$t" -v what=values <<<"$columns_sql")
      psql_ -d "$url" -v t="$t" -v cols="$cols" <<SQL
select pg_catalog.format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES (%s);', :'t', :'cols', $vals) from $t t order by 1;
SQL
    done
    psql_ -d "$url" -v schemas="$list" <<'SQL'
set search_path = '';
select pg_catalog.format('SELECT pg_catalog.setval(%L, %s, %s);', s.seq, s.last_value, case when s.is_called then 'true' else 'false' end)
  from (select c.oid::regclass::text as seq, q.seqstart,
               (pg_catalog.xpath('/row/last_value/text()', x))[1]::text::bigint as last_value,
               (pg_catalog.xpath('/row/is_called/text()', x))[1]::text::boolean as is_called
          from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
          join pg_catalog.pg_sequence q on q.seqrelid = c.oid,
               pg_catalog.query_to_xml(pg_catalog.format('select last_value, is_called from %s', c.oid::regclass), false, true, '') x
         where n.nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[]) and c.relkind = 'S') s
 where (s.last_value, s.is_called) is distinct from (s.seqstart, false)
 order by s.seq;
SQL
    cat <<'EOF'

------------------------------------------------------------------------------
-- Indexes, constraints, triggers, policies (pg_dump)
------------------------------------------------------------------------------
EOF
    "$pgdump" --section=post-data ${skip[@]+"${skip[@]}"} $(printf -- '--schema="%s" ' "${schemas[@]}" | tr -d '"') -d "$url" | executable "$migrator"
    cat <<'EOF'

------------------------------------------------------------------------------
-- Default privileges again, then what the migrations make at run time (in the session's search path, as they do)
------------------------------------------------------------------------------
set local client_min_messages to default;
set local search_path to default;
EOF
    default_privileges "$url" apply
    for t in ${parents[@]+"${parents[@]}"}; do
      # a partitioned table with partitions by date gets them from <schema>.ensure_<table>_partitions(), as the migrations call it
      psql_ -d "$url" -v t="$t" <<'SQL' | grep . || die "$t has partitions by date but no ensure_<table>_partitions() in its schema to make them at install (teach baseline() in scripts/dump-schema.sh)"
set search_path = '';
select pg_catalog.format('select %I.%I();', n.nspname, p.proname)
  from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
  join pg_catalog.pg_class c on c.relnamespace = n.oid and c.oid = :'t'::regclass
 where p.proname = 'ensure_' || c.relname || '_partitions' and p.pronargs = p.pronargdefaults
 order by 1 limit 1;
SQL
    done
    # pg_cron jobs: every schedule_*() of the product (STYLE: schedule_* registers pg_cron jobs), where pg_cron lives
    psql_ -d "$url" -v schemas="$list" <<'SQL'
select $$
do $b$
begin
  if pg_catalog.current_setting('cron.database_name', true) is distinct from pg_catalog.current_database()
     or pg_catalog.to_regnamespace('cron') is null then
    raise notice 'pg_cron is not in database %: its jobs (%) are not scheduled; the listener runs the maintenance on its own timer',
      pg_catalog.current_database(), $$ || pg_catalog.quote_literal(pg_catalog.string_agg(f, ', ' order by f)) || $$;
    return;
  end if;
$$ || pg_catalog.string_agg(pg_catalog.format('  perform %s;', f), E'\n' order by f) || $$
end $b$;$$
  from (select pg_catalog.format('%I.%I()', n.nspname, p.proname) as f
          from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
         where n.nspname = any (pg_catalog.string_to_array(:'schemas', ',')::name[]) and p.proname like 'schedule\_%'
           and p.pronargs = p.pronargdefaults) s
having pg_catalog.count(*) > 0;
SQL
  } >"$file"
  say "$file: $(wc -l <"$file") lines"
}

if [ -n "$list" ]; then
  product_schemas "$list"
  exit 0
fi

if [ -n "$from" ] || [ -n "$out" ] || [ -n "$baseline_out" ]; then
  [ -n "$from" ] && [ -n "$out" ] || die "--from and --out go together ($usage)"
  dump "$from" "$out"
  if [ -n "$baseline_out" ]; then baseline "$from" "$baseline_out"; fi
  exit 0
fi

# make schema: a scratch database of our own, migrated from nothing, file by file
: "${DATABASE_URL:?DATABASE_URL must name the server (make schema sets it)}"
cd "$here"
[ -f dist/listener/cli.js ] || die "dist/ is missing: run make schema (it builds first)"
scratch="erp_cloud_schema_$$"
admin=$(url_with_db "$DATABASE_URL" postgres)
tmp=$(mktemp -d)
cleanup() {
  psql_ -d "$admin" -c "drop database if exists $scratch with (force)" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
psql_ -d "$admin" -c "create database $scratch" >/dev/null
node dist/listener/cli.js -c "$(url_with_db "$DATABASE_URL" "$scratch")" migrate --no-baseline >/dev/null
dump "$(url_with_db "$DATABASE_URL" "$scratch")" "$tmp/schema"
baseline "$(url_with_db "$DATABASE_URL" "$scratch")" "$tmp/baseline"
# replace the checked-in files, so the file of a schema that is gone goes too, and an older baseline
mkdir -p sql/schema sql/baseline
rm -f sql/schema/*.sql sql/baseline/*.sql
cp "$tmp"/schema/*.sql sql/schema/
cp "$tmp"/baseline/*.sql sql/baseline/
say "sql/schema is current: $(cd sql/schema && ls -- *.sql | tr '\n' ' ')"
say "sql/baseline is current: $(cd sql/baseline && ls -- *.sql | tr '\n' ' ')"
