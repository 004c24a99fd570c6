# Part of make demo (scripts/demo.sh): e-invoicing through the Nuonuo simulator.
# Sample customers and settlements are approved (one transaction each); the database
# validates, builds the payloads and enqueues them; the listener issues them, polls,
# downloads the PDFs; one invoice is reversed (红冲). Prints each settlement with its
# invoice number, status and attachment size.

invoicing_setup() {
echo "== invoicing: start the Nuonuo simulator (credentials from the environment, never from code)"
ERP_CLOUD_SIM_NUONUO_APP_KEY="demo-$(node -e 'console.log(require("crypto").randomBytes(4).toString("hex"))')"
ERP_CLOUD_SIM_NUONUO_APP_SECRET="$(node -e 'console.log(require("crypto").randomBytes(16).toString("hex"))')"
export ERP_CLOUD_SIM_NUONUO_APP_KEY ERP_CLOUD_SIM_NUONUO_APP_SECRET
# the listener reads the app secret by its name (nuonuo.app_secret) from the environment, else from the vault
export ERP_CLOUD_SECRET_NUONUO_APP_SECRET="$ERP_CLOUD_SIM_NUONUO_APP_SECRET"
# the callback receiver admits the simulator's address only
export ERP_CLOUD_NUONUO_CALLBACK_CIDRS=127.0.0.1/32
invoicing_sim_url=$(start_sim --cloud nuonuo)
echo "   simulator: $invoicing_sim_url"
# the tax bureau does not know one buyer: its invoice will fail with status 22
curl -fsS -X POST "$invoicing_sim_url/__nuonuo/settings" -H 'content-type: application/json' \
  -d '{"issueDelayMs": 800, "rejectBuyers": {"91310230674560485R": "购买方纳税人识别号在税务局登记信息中不存在"}}' >/dev/null

echo "== invoicing: the tax endpoint, the seller, sample customers and settlements"
PGOPTIONS='-c client_min_messages=warning' psql_ -o /dev/null <<SQL
select cloud.put_endpoint('nuonuo', '$invoicing_sim_url/open/v1/services', 'nuonuo', 'invoice_request',
                          p_timeout_ms => 3000, p_backoff_base_ms => 500, p_backoff_cap_ms => 5000,
                          p_config => '{"app_key": "$ERP_CLOUD_SIM_NUONUO_APP_KEY", "app_secret_name": "nuonuo.app_secret"}');
select cloud.put_endpoint_allowlist('nuonuo', '{}', '{}', true);  -- the simulator runs on 127.0.0.1
select tax.put_config(p_seller_tax_id => '91330106MA2AYNWD8M', p_seller_name => '演示销售有限公司', p_clerk => '张三',
                      p_seller_address => '杭州市西湖区文三路 90 号', p_seller_phone => '0571-88880000',
                      p_max_invoice_amount => 100000, p_first_poll_ms => 1000, p_poll_cap_ms => 4000);
delete from cloud.outbox where endpoint = 'nuonuo';
delete from cloud.provider_token where endpoint = 'nuonuo';
truncate tax.attachment, tax.reversal, tax.invoice_line, tax.invoice, tax.document, erp.shipment_line, erp.shipment,
         erp.settlement_line, erp.settlement, erp.customer, tax.invoice_event restart identity cascade;
insert into erp.customer (name, tax_id, address, phone, bank_name, bank_account, email, invoice_on) values
  ('华东机电有限公司', '91350100M000100Y43', '福州市鼓楼区五四路 1 号', '0591-87654321', '工商银行福州分行', '1402020209000012345', 'ap@huadong.example', 'settlement'),
  ('苏州精密制造有限公司', '91440101MA5APD8X8J', '苏州工业园区星湖街 2 号', '0512-66661234', '建设银行苏州分行', '3225019874100000001', null, 'settlement'),
  ('宁波港务物流有限公司', '91330108MA2H2FMAXF', '宁波市北仑区 3 号', '0574-86860000', '宁波银行北仑支行', '5101220000001', null, 'shipment'),
  ('上海未登记贸易有限公司', '91310230674560485R', '上海市崇明区 4 号', '021-59590000', '交通银行上海分行', '3100660000001', null, 'settlement');
insert into erp.settlement (settlement_no, customer_id, invoice_kind)
select 'JS-2026-' || lpad(g::text, 4, '0'), case when g = 7 then 4 else 1 + (g % 2) end, case when g % 3 = 0 then 'special' else 'normal' end
  from generate_series(1, 7) g;
insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, unit, quantity, unit_price, amount, tax_rate)
select s.id, l.n, l.item, l.code, l.unit, l.qty * s.id, l.price, l.qty * s.id * l.price, l.rate
  from erp.settlement s
 cross join (values (1, '伺服电机', '1090613010000000000', '台', 2, 4520.00, 0.13),
                    (2, '安装调试服务', '3040201030000000000', '次', 1, 1060.00, 0.06),
                    (3, '运输服务', '3010102020100000000', '次', 1, 327.00, 0.09)) l(n, item, code, unit, qty, price, rate);
-- one big settlement: over the 100,000 limit, so it is split into several invoices
insert into erp.settlement (settlement_no, customer_id) values ('JS-2026-0008', 1);
insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, unit, quantity, unit_price, amount, tax_rate)
select 8, g, '数控机床 ' || g || ' 号', '1090613010000000000', '台', 1, 45200.00, 45200.00, 0.13 from generate_series(1, 5) g;
-- a settlement with a bad tax code: its approval will be refused
insert into erp.settlement (settlement_no, customer_id) values ('JS-2026-0009', 2);
insert into erp.settlement_line (settlement_id, line_no, item_name, tax_code, amount, tax_rate) values (9, 1, '咨询服务', '30402010', 530.00, 0.06);
-- a shipment of the customer invoiced on shipment
insert into erp.shipment (shipment_no, customer_id) values ('CK-2026-0001', 3);
insert into erp.shipment_line (shipment_id, line_no, item_name, tax_code, unit, quantity, unit_price, amount, tax_rate)
values (1, 1, '集装箱堆存服务', '3040802010000000000', '箱', 12, 318.00, 3816.00, 0.06);
SQL
}

invoicing_run() {
# put_config changes only what it is given: the rest of the setup stays
psql_ -qc "select tax.put_config(p_callback_url => '$inbound_url/callbacks/nuonuo')" -o /dev/null
local t0; t0=$(date +%s.%N)
echo "== invoicing: finance approves 8 settlements and posts 1 shipment (one transaction each)"
for i in $(seq 1 8); do
  psql_ -c "update erp.settlement set status = 'approved' where settlement_no = 'JS-2026-$(printf %04d "$i")'"
done
psql_ -c "update erp.shipment set status = 'posted' where shipment_no = 'CK-2026-0001'"
echo "== invoicing: approving JS-2026-0009 (bad tax code) is refused before anything leaves:"
psql -X -q "$DATABASE_URL" -c "update erp.settlement set status = 'approved' where settlement_no = 'JS-2026-0009'" 2>&1 | grep -E '^(ERROR|HINT)' | sed 's/^/   /' || true

echo "== invoicing: wait for issue → query → PDF"
wait_for "select count(*) = 0 from tax.invoice where invoice_status in ('pending', 'issuing')" 200 || { echo "invoicing FAILED: invoices still issuing"; return 1; }
wait_for "select count(*) = 0 from cloud.outbox where endpoint = 'nuonuo' and status in ('pending', 'in_flight')" 100 || true
echo "   all invoices final after $(node -e "console.log((Date.now()/1000 - $t0).toFixed(1))") s"

echo "== invoicing: 红冲 the first invoice of JS-2026-0002 (reason 2 开票有误)"
psql_ -c "insert into erp.invoice_reversal (invoice_id, reason)
          select s.invoice_id, '2' from tax.invoice_status s
           where s.source = 'reference-erp' and s.reference = 'settlement/JS-2026-0002' and s.status = 'issued' order by s.part_no limit 1"
wait_for "select count(*) = 0 from tax.reversal where status in ('pending', 'confirming')" 150 || { echo "invoicing FAILED: reversal still open"; return 1; }
wait_for "select count(*) = 0 from cloud.outbox where endpoint = 'nuonuo' and status in ('pending', 'in_flight')" 100 || true

echo
echo "== invoicing result: each document with its invoice number, status and PDF attachment"
psql_ -c "select coalesce(s.settlement_no, sh.shipment_no) as document, c.name as customer, i.invoice_type as type,
                 i.part_no || '/' || i.part_count as part, i.amount_incl_tax as total, i.invoice_no, i.invoice_status as status,
                 a.byte_size as pdf_bytes, coalesce(i.error_message, '') as reason
            from tax.invoice i
            join tax.document d on d.id = coalesce(i.document_id, (select o.document_id from tax.invoice o where o.id = i.original_invoice_id))
            left join erp.settlement s on d.reference = 'settlement/' || s.settlement_no
            left join erp.shipment sh on d.reference = 'shipment/' || sh.shipment_no
            join erp.customer c on c.id = coalesce(s.customer_id, sh.customer_id)
            left join tax.attachment a on a.invoice_id = i.id
           order by 1, i.id"
echo "== tax.invoice_event (the event log of invoice numbers), last 3"
psql_ -c "select invoice_id, old_invoice_no, new_invoice_no, invoice_status, changed_at::time(0) from tax.invoice_event order by id desc limit 3"
echo "== cloud.log for the tax endpoint"
psql_ -c "select operation, outcome, error_class, count(*) from cloud.log where endpoint = 'nuonuo' and started_at > now() - interval '10 minutes' group by 1, 2, 3 order by 1, 2"
local issued failed reversed pdfs
issued=$(psql_ -tAc "select count(*) from tax.invoice where invoice_type = 'blue' and invoice_status in ('issued', 'reversed')")
failed=$(psql_ -tAc "select count(*) from tax.invoice where invoice_status = 'failed' and error_code = 'nuonuo_22'")
reversed=$(psql_ -tAc "select count(*) from tax.invoice where invoice_status = 'reversed'")
pdfs=$(psql_ -tAc "select count(*) from tax.attachment where byte_size > 0")
echo
# 6 ordinary settlements + 3 parts of the big one + 1 shipment = 10 issued; JS-2026-0007 fails (22); 11 PDFs with the red one
if [ "$issued" = 10 ] && [ "$failed" = 1 ] && [ "$reversed" = 1 ] && [ "$pdfs" = 11 ]; then
  echo "invoicing OK: 10 invoices issued with their PDFs, 1 refused by the tax bureau with its reason, 1 reversed by a red invoice, 1 approval stopped by validation"
else
  echo "invoicing FAILED: issued $issued (want 10), failed $failed (want 1), reversed $reversed (want 1), PDFs $pdfs (want 11)"; return 1
fi
}
