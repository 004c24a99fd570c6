# Part of make demo (scripts/demo.sh): single sign-on. Starts the OpenID
# Provider, registers the built-in test relying party as the procurement
# platform, lets the ERP issue a jump URL for a signed-in user, and follows it
# like a browser: the platform ends up with a verified ID token.

# The vault master key for the provider's keys: the demo's own when demo.sh
# exports one, else one derived from the database URL (stable across runs, so
# the secrets of an earlier run still open; never a production key).
sso_vault_key=${ERP_CLOUD_VAULT_KEY:-$(printf 'erp-cloud demo vault %s' "$DATABASE_URL" | sha256sum | cut -c1-40)}

sso_free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

sso_setup() {
sso_port=$(sso_free_port)
sso_rp_port=$(sso_free_port)
sso_issuer="http://127.0.0.1:$sso_port"
sso_rp="http://127.0.0.1:$sso_rp_port"

echo "== sso: a demo ERP user and the procurement platform registered as a client"
sso_secret=$(PGOPTIONS='-c client_min_messages=warning' psql_ -tA <<SQL
select sso.put_user('zhang.wei', '张伟', 'zhang.wei@example.com', true, 'C001', '华东机电有限公司', 'buyer') \\g /dev/null
delete from sso.client where client_id = 'demo-procurement';
select client_secret from sso.register_client('demo-procurement', '友云采 procurement platform (demo RP)',
  array['$sso_rp/callback'], array['$sso_rp/logged-out'], '$sso_rp/login');
SQL
)
[ -n "$sso_secret" ] || { echo "sso: could not register the demo client" >&2; return 1; }

echo "== sso: start the OpenID Provider on $sso_issuer"
local log; log=$(mktemp)
ERP_CLOUD_SSO_ISSUER=$sso_issuer ERP_CLOUD_SSO_PORT=$sso_port ERP_CLOUD_VAULT_KEY=$sso_vault_key ERP_CLOUD_LOG_LEVEL=warn \
  node dist/listener/cli.js sso serve >"$log" 2>&1 &
echo $! >>"$pidfile"
for _ in $(seq 100); do grep -q '"issuer"' "$log" && break; sleep 0.1; done
grep -q '"issuer"' "$log" || { cat "$log" >&2; echo "sso: the provider did not start" >&2; return 1; }
}

sso_run() {
echo "== sso: discovery and keys"
curl -fsS "$sso_issuer/.well-known/openid-configuration" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s);console.log(`   issuer ${m.issuer}; PKCE ${m.code_challenge_methods_supported}; scopes ${m.scopes_supported.join(" ")}`)})'
cli sso keys

echo "== sso: the ERP issues a jump URL for zhang.wei (valid 60 s, single use)"
local jump_url
jump_url=$(psql_ -tAc "select sso.issue_jump_ticket('zhang.wei', 'demo-procurement', '192.0.2.10')")
echo "   $jump_url"

echo "== sso: the browser follows it: jump → platform → provider (ticket consumed, signed in) → platform callback"
local out
if ! out=$(ERP_CLOUD_SSO_DEMO_CLIENT_SECRET=$sso_secret cli sso demo-rp --issuer "$sso_issuer" --client-id demo-procurement --port "$sso_rp_port" --jump "$jump_url"); then
  echo "$out"; echo "sso FAILED: the jump did not complete"; return 1
fi
echo "$out" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const r=JSON.parse(s);console.log("   verified ID token claims:");console.log(JSON.stringify(r.claims,null,2).replace(/^/gm,"   "))})'

echo "== sso: the same link a second time is refused"
curl -sS -o /dev/null -w '   HTTP %{http_code}\n' "$jump_url"

echo "== sso.audit"
psql_ -c "select event, login, client_id, host(source_addr) as source, code, left(detail, 50) as detail from sso.audit where client_id = 'demo-procurement' order by id desc limit 5"
echo "sso OK: one click from the ERP, signed in at the platform without a password"
}
