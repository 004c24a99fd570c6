#!/usr/bin/env bash
# The project's private PostgreSQL cluster: install check, initdb, start, stop, url.
#
#   scripts/pg.sh start     make sure PostgreSQL 15+ and pg_cron exist, init and start the cluster (no-op if running)
#   scripts/pg.sh stop      stop it
#   scripts/pg.sh crash     stop it as a power cut would (pg_ctl -m immediate: the next start recovers from the WAL);
#                           for tests of what a crash leaves (test/restart.test.ts)
#   scripts/pg.sh url       print the DATABASE_URL of the private cluster
#   scripts/pg.sh status    say whether it runs, and where it lives
#   scripts/pg.sh dir       print the directory that holds data, socket and server log
#
# When DATABASE_URL is set, `start` and `stop` do nothing: that database is used as it is.
# The cluster never touches the system cluster on 5432: it has its own port (54329, or
# ERP_CLOUD_PGPORT), its own socket directory and its own data directory (.pg/ in the
# checkout, or ERP_CLOUD_PGDIR).
#
# pg_cron runs in one database per server (cron.database_name, read only at server start):
# `erp_cloud`, or ERP_CLOUD_CRON_DB. `make test` starts the cluster with the tests' own
# cron database (erp_cloud_test_cron), so no test touches `erp_cloud`; `start` restarts a
# running cluster whose cron database is another one (so make demo after make test, and
# the other way round, restarts it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
port=${ERP_CLOUD_PGPORT:-54329}
dbname=erp_cloud
crondb=${ERP_CLOUD_CRON_DB:-$dbname}

say() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

# PostgreSQL refuses to run as root: as root the server runs as the `postgres` OS user.
as_owner() {
  if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The checkout may sit under a directory the postgres user cannot traverse (CI clones
# wherever it likes): then the cluster lives under /tmp, named after the checkout.
cluster_dir() {
  if [ -n "${ERP_CLOUD_PGDIR:-}" ]; then echo "$ERP_CLOUD_PGDIR"; return; fi
  local inside="$here/.pg"
  if ! is_root || runuser -u postgres -- test -x "$here" 2>/dev/null; then
    echo "$inside"
  else
    echo "/tmp/erp-cloud-pg-$(printf '%s' "$here" | sha1sum | cut -c1-12)"
  fi
}

find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return; fi
  done
}

major_of() { "$1/postgres" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/'; }

apt_install() {
  say "installing: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL 15+ server binaries and the pg_cron extension matching their major.
ensure_packages() {
  local bindir major
  bindir=$(find_bindir)
  if [ -z "$bindir" ]; then
    if is_root && command -v apt-get >/dev/null; then
      apt_install postgresql postgresql-contrib
      bindir=$(find_bindir)
    fi
    [ -n "$bindir" ] || die "PostgreSQL server binaries not found. Install them as root: apt-get install postgresql postgresql-15-cron"
  fi
  major=$(major_of "$bindir")
  [ "$major" -ge 15 ] || die "PostgreSQL $major found in $bindir; erp-cloud needs 15 or newer"
  if [ ! -f "/usr/lib/postgresql/$major/lib/pg_cron.so" ] && [ ! -f "$("$bindir/pg_config" --pkglibdir 2>/dev/null)/pg_cron.so" ]; then
    if is_root && command -v apt-get >/dev/null; then
      apt_install "postgresql-$major-cron"
    else
      die "pg_cron is missing for PostgreSQL $major. Install it as root: apt-get install postgresql-$major-cron"
    fi
  fi
  echo "$bindir"
}

cluster_url() { echo "postgres://postgres@127.0.0.1:$port/$dbname"; }

running() { [ -f "$1/data/PG_VERSION" ] && as_owner "$2/pg_ctl" -D "$1/data" status >/dev/null 2>&1; }

start() {
  if [ -n "${DATABASE_URL:-}" ]; then say "DATABASE_URL is set: using it, starting nothing"; return; fi
  local bindir dir
  bindir=$(ensure_packages)
  dir=$(cluster_dir)
  if running "$dir" "$bindir"; then
    local current
    current=$(as_owner "$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc "select current_setting('cron.database_name', true)" 2>/dev/null || true)
    if [ "$current" = "$crondb" ]; then say "cluster already running in $dir on port $port"; ensure_database "$bindir"; return; fi
    say "cluster running with cron.database_name = '$current': restarting it with '$crondb'"
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  fi
  mkdir -p "$dir/data" "$dir/sock"
  if is_root; then chown -R postgres: "$dir"; fi
  chmod 700 "$dir/data"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$dir/data/postgresql.conf" <<CONF

# --- erp-cloud private cluster ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/sock'
max_connections = 300
shared_buffers = 512MB
max_worker_processes = 32
shared_preload_libraries = 'pg_cron'
cron.database_name = '$dbname'
cron.use_background_workers = on
cron.max_running_jobs = 8
log_min_messages = warning
# the outbox is a queue: its dead index entries must be vacuumed away within
# seconds, not the default minute (recommended for production too: README)
autovacuum_naptime = 10s
CONF
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken by another server; set ERP_CLOUD_PGPORT to a free port"
  fi
  as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "-c cron.database_name=$crondb" -w -t 60 start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2; die "the cluster did not start (log: $dir/server.log)"; }
  ensure_database "$bindir"
  say "cluster running in $dir on port $port"
}

ensure_database() {
  local psql=("$1/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres) d
  for d in $(printf '%s\n' "$dbname" "$crondb" | sort -u); do
    if [ -z "$("${psql[@]}" -d postgres -tAc "select 1 from pg_database where datname = '$d'")" ]; then
      "${psql[@]}" -d postgres -c "create database $d" >/dev/null
    fi
  done
}

stop() {
  if [ -n "${DATABASE_URL:-}" ]; then say "DATABASE_URL is set: nothing to stop"; return; fi
  local bindir dir
  bindir=$(find_bindir); dir=$(cluster_dir)
  [ -n "$bindir" ] || die "PostgreSQL binaries not found"
  if running "$dir" "$bindir"; then as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null; say "stopped"; else say "not running"; fi
}

crash() {
  [ -z "${DATABASE_URL:-}" ] || die "DATABASE_URL is set: refusing to crash a database this script did not start"
  local bindir dir
  bindir=$(find_bindir); dir=$(cluster_dir)
  [ -n "$bindir" ] || die "PostgreSQL binaries not found"
  if running "$dir" "$bindir"; then as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null; say "crashed (immediate stop)"; else say "not running"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  crash) crash ;;
  url) if [ -n "${DATABASE_URL:-}" ]; then echo "$DATABASE_URL"; else cluster_url; fi ;;
  dir) cluster_dir ;;
  status)
    bindir=$(find_bindir); dir=$(cluster_dir)
    if [ -n "$bindir" ] && running "$dir" "$bindir"; then echo "running: $dir, port $port"; else echo "stopped: $dir"; exit 1; fi ;;
  *) die "usage: scripts/pg.sh start|stop|crash|url|status|dir" ;;
esac
