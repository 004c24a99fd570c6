#!/usr/bin/env bash
# The current definition of every product schema, one file each in sql/schema/,
# dumped from a freshly migrated database (sql/README.md says why and how).
#
#   scripts/dump-schema.sh                       make schema: create a scratch database on the server of
#                                                DATABASE_URL, migrate it (dist/listener/cli.js), dump it into
#                                                sql/schema/, drop it. Nothing else on that server is touched.
#   scripts/dump-schema.sh --from URL --out DIR  dump the already migrated database URL into DIR
#                                                (test/schema-dump.test.ts: a clone of the test template)
#
# Each file is byte-stable across runs and machines of one PostgreSQL major: what
# pg_dump prints about itself (banners, version lines, SET statements, the random
# \restrict key), the owner of objects owned by the role that ran the migrations,
# and trailing whitespace are taken out; grants, comments and owners that are one of
# the product's roles stay. Partitions bounded by dates are made at run time from
# the clock (cloud.log's months), so they are left out and named in the header.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Schemas that are not the product's: migration history and the database's default
# schema (extensions, postgres-migrations' table). System schemas and schemas an
# extension made (pg_cron's cron) are left out as well. Every other schema is dumped,
# so a schema a new migration creates gets its file without a change here.
# test/schema-dump.test.ts reads this line.
EXCLUDED_SCHEMAS=(public erp_cloud)
# Schemas of the example ERPs (sql/examples/<name>: erp is reference-erp's, acme is acme's): not the product's,
# never made by `migrate` alone, so not dumped even when a database has one installed (the test template has).
# test/schema-dump.test.ts reads this line too.
EXAMPLE_SCHEMAS=(erp acme)

say() { printf 'dump-schema: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

from='' out=''
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=${2:?--from needs a database URL}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (usage: scripts/dump-schema.sh [--from URL --out DIR])" ;;
  esac
done

# url_with_db URL DB: URL naming database DB instead
url_with_db() { node -e 'const u = new URL(process.argv[1]); u.pathname = "/" + process.argv[2]; console.log(u.toString())' "$1" "$2"; }

# psql from PATH, or from the newest server installation (any psql reads any server)
psql_bin=$(command -v psql || ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -t/ -k4 -n -r | head -n 1 || true)
[ -n "$psql_bin" ] || die "psql not found: install postgresql-client"
psql_() { "$psql_bin" -X -q -v ON_ERROR_STOP=1 -At "$@"; }

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

# normalise MIGRATOR: pg_dump's text on stdin, the stable text on stdout
normalise() {
  awk -v migrator="$1" '
    { line[NR] = $0 }
    END {
      for (i = 1; i <= NR; i++) {
        l = line[i]
        # the "PostgreSQL database dump (complete)" banners, with their "--" lines
        if (l == "--" && line[i + 1] ~ /^-- PostgreSQL database dump( complete)?$/ && line[i + 2] == "--") { i += 2; continue }
        if (l ~ /^\\(un)?restrict /) continue
        if (l ~ /^-- Dumped (from database|by pg_dump) version /) continue
        if (l ~ /^SET (statement_timeout|lock_timeout|idle_in_transaction_session_timeout|client_encoding|standard_conforming_strings|check_function_bodies|xmloption|client_min_messages|row_security|default_table_access_method|default_tablespace|default_with_oids|transaction_timeout) = .*;$/) continue
        if (l ~ /^SELECT pg_catalog\.set_config\(.search_path., .., false\);$/) continue
        if (l ~ /^ALTER .* OWNER TO / && substr(l, length(l) - length(migrator) - 10) == " OWNER TO " migrator ";") continue
        sub(/[ \t\r]+$/, "", l)
        if (l ~ /^-- Name: .*; Type: .*; Schema: .*; Owner: /) sub(/; Owner: .*$/, "", l)
        if (l == "") { blank++; continue }
        # at most two blank lines in a row (taking lines out leaves longer runs), none at the start or end
        if (started && blank > 0) printf "%s", (blank > 1 ? "\n\n" : "\n")
        blank = 0; started = 1; print l
      }
    }
  '
}

# dump URL DIR: one file per product schema of the migrated database URL, into DIR
dump() {
  local url=$1 dir=$2 major migrator pgdump excluded_sql s note
  local -a schemas skip parents
  major=$(psql_ -d "$url" -c "select current_setting('server_version_num')::int / 10000")
  migrator=$(psql_ -d "$url" -c "select quote_ident(current_user)")
  pgdump=$(find_pg_dump "$major")
  excluded_sql=$(printf "'%s'," "${EXCLUDED_SCHEMAS[@]}" "${EXAMPLE_SCHEMAS[@]}"); excluded_sql="array[${excluded_sql%,}]::name[]"
  mapfile -t schemas < <(psql_ -d "$url" -c "
    select n.nspname from pg_catalog.pg_namespace n
     where n.nspname !~ '^pg_' and n.nspname <> 'information_schema' and n.nspname <> all ($excluded_sql)
       and not exists (select from pg_catalog.pg_depend d
                        where d.classid = 'pg_catalog.pg_namespace'::regclass and d.objid = n.oid and d.deptype = 'e')
     order by 1")
  [ ${#schemas[@]} -gt 0 ] || die "no product schema in the database: is it migrated?"
  mkdir -p "$dir"
  for s in "${schemas[@]}"; do
    # partitions bounded by dates: made at run time from the clock, so not part of the definition
    local dated="from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                  join pg_catalog.pg_inherits i on i.inhrelid = c.oid
                 where n.nspname = :'s' and c.relispartition and pg_catalog.pg_get_expr(c.relpartbound, c.oid) ~ '\d{4}-\d{2}-\d{2}'"
    mapfile -t skip < <(psql_ -d "$url" -v s="$s" <<<"select '--exclude-table=' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) $dated order by 1")
    mapfile -t parents < <(psql_ -d "$url" -v s="$s" <<<"select distinct i.inhparent::regclass::text $dated order by 1")
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

if [ -n "$from" ] || [ -n "$out" ]; then
  [ -n "$from" ] && [ -n "$out" ] || die "--from and --out go together"
  dump "$from" "$out"
  exit 0
fi

# make schema: a scratch database of our own, migrated from nothing
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
node dist/listener/cli.js -c "$(url_with_db "$DATABASE_URL" "$scratch")" migrate >/dev/null
dump "$(url_with_db "$DATABASE_URL" "$scratch")" "$tmp"
# replace the checked-in files, so the file of a schema that is gone goes too
mkdir -p sql/schema
rm -f sql/schema/*.sql
cp "$tmp"/*.sql sql/schema/
say "sql/schema is current: $(cd sql/schema && ls -- *.sql | tr '\n' ' ')"
