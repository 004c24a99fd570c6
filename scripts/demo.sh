#!/usr/bin/env bash
# make demo: migrate, start the cloud simulators and the listener, push sample
# ERP documents through the outbox, and print what happened.
# Expects DATABASE_URL (the Makefile passes the private cluster's) and a built dist/.
#
# Each product area is one part in scripts/demo.d/NN-name.sh defining
# name_setup (simulator, endpoints, sample data; runs before the listener
# starts) and name_run (the ERP's actions, waiting, printing; returns non-zero
# when the result is wrong). Parts run in file-name order.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL must be set (make demo sets it)}"

psql_() { psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
cli() { node dist/listener/cli.js "$@"; }
pids=()
pidfile=$(mktemp)
cleanup() { for p in "${pids[@]}" $(cat "$pidfile" 2>/dev/null); do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# start_sim [--cloud NAME]: starts a simulator on a free 127.0.0.1 port in the background; prints its URL
start_sim() {
  local log; log=$(mktemp)
  node dist/listener/cli.js sim --port 0 "$@" >"$log" 2>&1 &
  echo $! >>"$pidfile"
  for _ in $(seq 100); do grep -q '"url"' "$log" && break; sleep 0.1; done
  local url; url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$log")
  [ -n "$url" ] || { cat "$log" >&2; echo "simulator $* did not start" >&2; return 1; }
  echo "$url"
}
# wait_for SQL [tries]: polls until the query returns t (every 0.2 s)
wait_for() {
  local tries=${2:-150}
  for _ in $(seq "$tries"); do [ "$(psql_ -tAc "$1")" = t ] && return 0; sleep 0.2; done
  return 1
}

echo "== migrate ($(node -e 'const u=new URL(process.argv[1]);u.password&&(u.password="***");console.log(u.toString())' "$DATABASE_URL"))"
cli migrate --with-example reference-erp --with-example acme

parts=()
for f in scripts/demo.d/[0-9]*.sh; do
  # shellcheck source=/dev/null
  source "$f"
  name=$(basename "$f" .sh); name=${name#*-}; name=${name//-/_}
  parts+=("$name")
done
for p in "${parts[@]}"; do "${p}_setup"; done

# the inbound door (webhooks, callbacks) listens on a free loopback port; parts read $inbound_url
inbound_port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
export inbound_url="http://127.0.0.1:$inbound_port"
echo "== start the listener (inbound receivers on $inbound_url)"
ERP_CLOUD_LOG_LEVEL=warn ERP_CLOUD_HTTP_PORT=0 ERP_CLOUD_INBOUND_HOST=127.0.0.1 ERP_CLOUD_INBOUND_PORT=$inbound_port \
  node dist/listener/cli.js listen & pids+=($!)
sleep 1

failed=()
for p in "${parts[@]}"; do "${p}_run" || failed+=("$p"); done

echo "== erp-cloud status"
cli status
echo
if [ ${#failed[@]} -eq 0 ]; then echo "demo OK: ${parts[*]}"; else echo "demo FAILED: ${failed[*]}"; exit 1; fi

# The operations console (erp-cloud console), signed in through the demo's OpenID Provider (part 40-sso),
# left running for a person to look at until Ctrl-C. ERP_CLOUD_DEMO_NO_WAIT=1 starts and checks it, then ends.
echo
echo "== console: the operations console for the demo operator demo.ops"
console_port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
console_url="http://127.0.0.1:$console_port"
console_secret=$(PGOPTIONS='-c client_min_messages=warning' psql_ -tA <<SQL
select sso.put_user('demo.ops', '演示运维 Demo Operator') \\g /dev/null
select cloud.put_console_role('demo.ops', 'operator') \\g /dev/null
delete from sso.client where client_id = 'console';
select client_secret from sso.register_client('console', 'Operations console (demo)', array['$console_url/callback'], '{}', '$console_url/login');
SQL
)
console_log=$(mktemp)
ERP_CLOUD_CONSOLE_URL=$console_url ERP_CLOUD_CONSOLE_PORT=$console_port ERP_CLOUD_CONSOLE_ISSUER=$sso_issuer \
  ERP_CLOUD_CONSOLE_CLIENT_SECRET=$console_secret ERP_CLOUD_LOG_LEVEL=warn \
  node dist/listener/cli.js console >"$console_log" 2>&1 & console_pid=$!; pids+=($console_pid)
for _ in $(seq 100); do grep -q '"console"' "$console_log" && break; sleep 0.1; done
grep -q '"console"' "$console_log" || { cat "$console_log" >&2; echo "console FAILED: it did not start"; exit 1; }
curl -fsS -o /dev/null "$console_url/healthz" || { echo "console FAILED: $console_url/healthz"; exit 1; }
echo "   console:  $console_url"
echo "   sign in as the demo operator demo.ops (one use, valid 10 minutes): $(cli console link demo.ops)"
echo "   a new link: DATABASE_URL=… node dist/listener/cli.js console link demo.ops"
[ "${ERP_CLOUD_DEMO_NO_WAIT:-}" = 1 ] && exit 0
echo "   the console, the listener and the simulators keep running; Ctrl-C stops them"
wait "$console_pid"
