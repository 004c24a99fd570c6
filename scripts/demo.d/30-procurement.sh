# Part of make demo (scripts/demo.sh): supplier collaboration with the YonBIP procurement cloud.
# A purchase order is approved, published and revised; the supplier ships; the ASN arrives
# by webhook (our signed format and YonBIP's own encrypted event push) and by the delivery-list pull,
# and the ERP shows it.

procurement_setup() {
echo "== procurement: start the YonBIP procurement-cloud simulator on 127.0.0.1"
yonbip_sim_url=$(start_sim --cloud yonbip)
echo "   simulator: $yonbip_sim_url"
# secrets are made up for this run and reach the listener through its environment
procurement_app_secret=$(openssl rand -hex 16)
procurement_webhook_secret=$(openssl rand -hex 24)
export ERP_CLOUD_SECRET_YONBIP_APP_SECRET=$procurement_app_secret
export ERP_CLOUD_SECRET_SCM_ASN_WEBHOOK_SECRET=$procurement_webhook_secret
export ERP_CLOUD_SECRET_YONBIP_APP_KEY=erp-demo-app   # the YonBIP event push (/scm/yonbip/events) decrypts with the app's key and secret
export ERP_CLOUD_ASN_WEBHOOK_CIDRS=127.0.0.0/8
curl -fsS -X POST "$yonbip_sim_url/__yonbip/apps" -H 'content-type: application/json' \
  -d "{\"appKey\":\"erp-demo-app\",\"appSecret\":\"$procurement_app_secret\"}" >/dev/null

procurement_run_id=$(date +%s)
PGOPTIONS='-c client_min_messages=warning' psql_ -o /dev/null <<SQL
select cloud.put_endpoint('yonbip', '$yonbip_sim_url', 'yonbip', p_timeout_ms => 3000, p_backoff_base_ms => 500, p_backoff_cap_ms => 5000,
  p_config => '{"tenant_id": "demo-tenant", "app_key": "erp-demo-app", "app_secret_secret": "yonbip.app_secret"}');
select cloud.put_endpoint_allowlist('yonbip', '{}', '{}', true);
insert into erp.supplier (code, name, tax_id) values ('SUP-SZ01', '苏州精密制造有限公司', '91320500MA1W2X3Y4Z')
  on conflict (code) do nothing;
SQL
}

procurement_run() {
local po="PO-DEMO-$procurement_run_id" asn="ASN-DEMO-$procurement_run_id"
echo "== procurement: the buyer enters $po (draft) and approves it"
psql_ <<SQL
begin;
insert into erp.purchase_order (po_no, supplier_id, currency, order_date, purchase_org)
  select '$po', id, 'CNY', current_date, 'ORG-SH' from erp.supplier where code = 'SUP-SZ01';
insert into erp.purchase_order_line (po_id, line_no, material_code, material_name, quantity, unit, price, tax_rate, delivery_date)
  select id, l.n, l.m, l.name, l.q, 'PCS', l.p, 0.13, current_date + 7
    from erp.purchase_order, (values (1, 'M-100', '六角螺栓 M8×30', 1000, 0.42), (2, 'M-200', '平垫圈 8mm', 2000, 0.05)) l(n, m, name, q, p)
   where po_no = '$po';
commit;
update erp.purchase_order set status = 'approved' where po_no = '$po';
SQL
wait_for "select cloud_status = 'published' from erp.purchase_order where po_no = '$po'" || { echo "procurement FAILED: not published"; return 1; }
echo "== procurement: published; the buyer raises line 1 to 1200 (a revision follows the order, same ordering key)"
psql_ -c "begin; update erp.purchase_order_line set quantity = 1200 where po_id = (select id from erp.purchase_order where po_no = '$po') and line_no = 1; update erp.purchase_order set status = 'changed' where po_no = '$po'; commit;"
wait_for "select cloud_status = 'revised' from erp.purchase_order where po_no = '$po'" || { echo "procurement FAILED: not revised"; return 1; }
psql_ -c "select p.po_no, p.status, p.cloud_status, p.cloud_ref, s.revision from erp.purchase_order p join scm.order_status s on s.source = 'reference-erp' and s.reference = p.po_no where p.po_no = '$po'"

echo "== procurement: the supplier ships part of line 1; the cloud pushes the ASN to the listener's webhook ($inbound_url/scm/asn)"
local doc
doc=$(cat <<JSON
{"code":"$asn-1","supplier":"SUP-SZ01","deliveryDate":"$(date +%F)","planArrivalDate":"$(date -d '+2 days' +%F)","logisticalComp":"顺丰速运","logisticalCode":"SF1400$procurement_run_id",
 "details":[{"lineno":1,"orderCode":"$po","orderDetailId":1,"material":"M-100","purchaseNum":600,"batchNo":"LOT-2611-A","productionDate":"$(date +%F)"}]}
JSON
)
curl -fsS -X POST "$yonbip_sim_url/__yonbip/ship" -H 'content-type: application/json' \
  -d "{\"via\":\"push\",\"webhookUrl\":\"$inbound_url/scm/asn\",\"webhookSecret\":\"$procurement_webhook_secret\",\"asn\":$doc}" \
  | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const r=JSON.parse(s);console.log(`   webhook answered HTTP ${r.status} ${r.body}`)})'

echo "== procurement: line 2 ships; YonBIP pushes it in its own format (EncryptionHolder: AES-256-CBC + SHA1 signature) to $inbound_url/scm/yonbip/events"
doc3=$(cat <<JSON
{"code":"$asn-3","supplier":"SUP-SZ01","deliveryDate":"$(date +%F)","logisticalComp":"顺丰速运","logisticalCode":"SF1402$procurement_run_id",
 "details":[{"lineno":1,"orderCode":"$po","orderDetailId":2,"material":"M-200","purchaseNum":2000,"batchNo":"LOT-2611-B","productionDate":"$(date +%F)"}]}
JSON
)
curl -fsS -X POST "$yonbip_sim_url/__yonbip/ship" -H 'content-type: application/json' \
  -d "{\"via\":\"push\",\"pushFormat\":\"yonbip\",\"appKey\":\"erp-demo-app\",\"webhookUrl\":\"$inbound_url/scm/yonbip/events\",\"asn\":$doc3}" \
  | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const r=JSON.parse(s);console.log(`   event push answered HTTP ${r.status} ${r.body}`)})'

echo "== procurement: the rest ships later and is only listed by the cloud; the pull (pg_cron every minute, run now) fetches it (the pushed ASN is listed too and changes nothing)"
doc2=$(cat <<JSON
{"code":"$asn-2","supplier":"SUP-SZ01","deliveryDate":"$(date +%F)","logisticalComp":"顺丰速运","logisticalCode":"SF1401$procurement_run_id",
 "details":[{"lineno":1,"orderCode":"$po","orderDetailId":1,"material":"M-100","purchaseNum":600,"batchNo":"LOT-2611-C","productionDate":"$(date +%F)"}]}
JSON
)
curl -fsS -X POST "$yonbip_sim_url/__yonbip/ship" -H 'content-type: application/json' -d "{\"via\":\"list\",\"asn\":$doc2}" >/dev/null
psql_ -o /dev/null -c "select scm.put_asn_pull('yonbip'); select scm.enqueue_asn_pulls();"
wait_for "select count(*) = 3 from scm.asn where asn_no like '$asn-%'" || { echo "procurement FAILED: ASNs not in the ERP"; return 1; }
psql_ -o /dev/null -c "select scm.put_asn_pull('yonbip', false)"  # the simulator goes away with the demo

echo
echo "== procurement result: the ASNs in erp-cloud's store (scm.asn)"
psql_ -c "select asn_no, po_no, status, received_via as source, ship_date, eta, carrier, tracking_no from scm.asn where asn_no like '$asn-%' order by asn_no"
psql_ -c "select d.asn_no, l.po_line_no, l.material_code, l.batch_no, l.quantity from scm.asn_line l join scm.asn d on d.id = l.asn_id where d.asn_no like '$asn-%' order by 1, 2, 4"
echo "== procurement: search by material and batch (GIN index on the ASN detail)"
psql_ -c "select asn_no, status, line->>'purchaseNum' as qty from scm.search_asn_lines('M-100', 'LOT-2611-C')"
echo "== the simulator's purchase-order ledger"
curl -fsS "$yonbip_sim_url/__yonbip/state" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const st=JSON.parse(s);for(const e of st.poLedger)console.log(`   ${e.seq}. ${e.op} ${e.orderno} revision ${e.revision} (${e.lines} lines)`);console.log(`   tokens issued: ${st.tokensIssued}`)})'
local accepted
accepted=$(psql_ -tAc "select count(*) from scm.asn where asn_no like '$asn-%' and status = 'accepted'")
echo
if [ "$accepted" = 3 ]; then echo "procurement OK: $po published and revised in order; 3 ASNs arrived (signed push, YonBIP event push, pull) and were accepted"; else echo "procurement FAILED: $accepted of 3 ASNs accepted"; return 1; fi
}
