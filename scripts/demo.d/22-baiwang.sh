# Part of make demo (scripts/demo.sh): the same e-invoicing through the Baiwang (百望云) simulator.
# The platform is the endpoint's: tax.put_config(p_endpoint => 'baiwang') points e-invoicing at a
# cloud.endpoint whose provider is 'baiwang'; the ERP (its tables, triggers, reversal requests) is
# unchanged. Three settlements are issued through Baiwang (one buyer is refused by the simulated
# bureau, with the reason a clerk reads), one is reversed (红冲), then e-invoicing points back at
# Nuonuo for the parts after this one.

baiwang_setup() {
echo "== baiwang: start the Baiwang simulator (credentials from the environment, never from code)"
local rnd='console.log(require("crypto").randomBytes(12).toString("hex"))'
ERP_CLOUD_SIM_BAIWANG_APP_KEY="demo-bw-$(node -e 'console.log(require("crypto").randomBytes(4).toString("hex"))')"
ERP_CLOUD_SIM_BAIWANG_APP_SECRET="$(node -e "$rnd")"
ERP_CLOUD_SIM_BAIWANG_USERNAME="demo-user"
ERP_CLOUD_SIM_BAIWANG_PASSWORD="$(node -e "$rnd")"
ERP_CLOUD_SIM_BAIWANG_SALT="$(node -e "$rnd")"
export ERP_CLOUD_SIM_BAIWANG_APP_KEY ERP_CLOUD_SIM_BAIWANG_APP_SECRET ERP_CLOUD_SIM_BAIWANG_USERNAME ERP_CLOUD_SIM_BAIWANG_PASSWORD ERP_CLOUD_SIM_BAIWANG_SALT
# the listener reads them by name (baiwang.app_secret, baiwang.password, baiwang.salt): the environment, else the vault
export ERP_CLOUD_SECRET_BAIWANG_APP_SECRET="$ERP_CLOUD_SIM_BAIWANG_APP_SECRET"
export ERP_CLOUD_SECRET_BAIWANG_PASSWORD="$ERP_CLOUD_SIM_BAIWANG_PASSWORD"
export ERP_CLOUD_SECRET_BAIWANG_SALT="$ERP_CLOUD_SIM_BAIWANG_SALT"
baiwang_sim_url=$(start_sim --cloud baiwang)
echo "   simulator: $baiwang_sim_url"
curl -fsS -X POST "$baiwang_sim_url/__baiwang/settings" -H 'content-type: application/json' \
  -d '{"issueDelayMs": 800, "rejectBuyers": {"91310230674560485R": "购买方纳税人识别号在税务局登记信息中不存在"}}' >/dev/null

echo "== baiwang: the endpoint (provider baiwang) and three more settlements"
PGOPTIONS='-c client_min_messages=warning' psql_ -o /dev/null <<SQL
select cloud.put_endpoint('baiwang', '$baiwang_sim_url/router/rest', 'baiwang', 'invoice_request',
                          p_timeout_ms => 3000, p_backoff_base_ms => 500, p_backoff_cap_ms => 5000,
                          p_config => '{"app_key": "$ERP_CLOUD_SIM_BAIWANG_APP_KEY", "username": "demo-user", "tax_no": "91330106MA2AYNWD8M"}');
select cloud.put_endpoint_allowlist('baiwang', '{}', '{}', true);  -- the simulator runs on 127.0.0.1
delete from cloud.outbox where endpoint = 'baiwang';
delete from cloud.provider_token where endpoint = 'baiwang';
insert into erp.settlement (settlement_no, customer_id, invoice_kind) values
  ('JS-2026-0101', 1, 'normal'), ('JS-2026-0102', 2, 'special'), ('JS-2026-0103', 4, 'normal');
insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, unit, quantity, unit_price, amount, tax_rate)
select s.id, l.n, l.item, l.code, l.unit, l.qty, l.price, l.qty * l.price, l.rate
  from erp.settlement s
 cross join (values (1, '伺服驱动器', '1090613010000000000', '台', 3, 2260.00, 0.13),
                    (2, '年度维保服务', '3040201030000000000', '年', 1, 5300.00, 0.06)) l(n, item, code, unit, qty, price, rate)
 where s.settlement_no in ('JS-2026-0101', 'JS-2026-0102', 'JS-2026-0103');
SQL
}

baiwang_run() {
echo "== baiwang: e-invoicing now goes to the endpoint 'baiwang' (the ERP changes nothing else)"
psql_ -qc "select tax.put_config(p_endpoint => 'baiwang')" -o /dev/null
local t0; t0=$(date +%s.%N)
for no in JS-2026-0101 JS-2026-0102 JS-2026-0103; do
  psql_ -c "update erp.settlement set status = 'approved' where settlement_no = '$no'"
done
local mine="d.source = 'reference-erp' and d.reference in ('settlement/JS-2026-0101', 'settlement/JS-2026-0102', 'settlement/JS-2026-0103')"
wait_for "select count(*) = 0 from tax.invoice i join tax.document d on d.id = i.document_id where $mine and i.invoice_status in ('pending', 'issuing')" 200 \
  || { echo "baiwang FAILED: invoices still issuing"; psql_ -qc "select tax.put_config(p_endpoint => 'nuonuo')" -o /dev/null; return 1; }
wait_for "select count(*) = 0 from cloud.outbox where endpoint = 'baiwang' and status in ('pending', 'in_flight')" 100 || true
echo "   final after $(node -e "console.log((Date.now()/1000 - $t0).toFixed(1))") s"
echo "== baiwang: 红冲 the invoice of JS-2026-0101 (reason 2 开票有误)"
psql_ -c "insert into erp.invoice_reversal (invoice_id, reason)
          select s.invoice_id, '2' from tax.invoice_status s
           where s.source = 'reference-erp' and s.reference = 'settlement/JS-2026-0101' and s.status = 'issued' limit 1"
wait_for "select count(*) = 0 from tax.reversal where status in ('pending', 'confirming')" 150 || true
wait_for "select count(*) = 0 from cloud.outbox where endpoint = 'baiwang' and status in ('pending', 'in_flight')" 100 || true
# back to Nuonuo for the parts after this one
psql_ -qc "select tax.put_config(p_endpoint => 'nuonuo')" -o /dev/null

echo
echo "== baiwang result: the settlements issued through Baiwang (status, number, PDF, the reason a clerk reads)"
psql_ -c "select d.reference as document, i.invoice_type as type, i.amount_incl_tax as total, i.invoice_no, i.invoice_status as status,
                 a.byte_size as pdf_bytes, coalesce(i.error_code || ': ' || i.error_message, '') as reason
            from tax.invoice i
            join tax.document d on d.id = coalesce(i.document_id, (select o.document_id from tax.invoice o where o.id = i.original_invoice_id))
            left join tax.attachment a on a.invoice_id = i.id
           where $mine order by 1, i.id"
psql_ -c "select operation, outcome, error_class, count(*) from cloud.log where endpoint = 'baiwang' and started_at > now() - interval '10 minutes' group by 1, 2, 3 order by 1, 2"
local issued refused reversed
issued=$(psql_ -tAc "select count(*) from tax.invoice i join tax.document d on d.id = i.document_id where $mine and i.invoice_status in ('issued', 'reversed')
                       and exists (select from tax.attachment a where a.invoice_id = i.id)")
refused=$(psql_ -tAc "select count(*) from tax.invoice i join tax.document d on d.id = i.document_id where $mine and i.invoice_status = 'failed' and i.error_code like 'baiwang_%'")
reversed=$(psql_ -tAc "select count(*) from tax.invoice i join tax.document d on d.id = i.document_id where $mine and i.invoice_status = 'reversed'")
if [ "$issued" = 2 ] && [ "$refused" = 1 ] && [ "$reversed" = 1 ]; then
  echo "baiwang OK: 2 invoices issued through Baiwang with their PDFs, 1 refused with its reason, 1 reversed by a red invoice"
else
  echo "baiwang FAILED: issued $issued (want 2), refused $refused (want 1), reversed $reversed (want 1)"; return 1
fi
}
