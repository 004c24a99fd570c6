# Part of make demo (scripts/demo.sh): the generic webhook endpoint.
# A sample table whose approval goes through trigger → outbox → simulator → write-back.

webhook_setup() {
echo "== webhook: start the webhook cloud simulator on 127.0.0.1"
webhook_sim_url=$(start_sim)
echo "   simulator: $webhook_sim_url"
# the cloud is flaky today: the first two calls fail (503, then 429 with Retry-After: 1)
curl -fsS -X POST "$webhook_sim_url/__sim/faults" -H 'content-type: application/json' \
  -d '{"schedule":[{"kind":"status","status":503},{"kind":"status","status":429,"retryAfter":1}]}' >/dev/null

echo "== webhook: a sample ERP table whose approval is sent to the cloud (trigger → outbox, handler → write-back)"
PGOPTIONS='-c client_min_messages=warning' psql_ -o /dev/null <<SQL
select cloud.put_endpoint('demo_webhook', '$webhook_sim_url/webhook', p_timeout_ms => 2000, p_backoff_base_ms => 500, p_backoff_cap_ms => 5000);
-- the simulator runs on 127.0.0.1: private addresses must be allowed explicitly
select cloud.put_endpoint_allowlist('demo_webhook', '{}', '{}', true);
create schema if not exists demo;
create table if not exists demo.sales_order (
  id bigint generated always as identity primary key,
  order_no text unique not null,
  customer text not null,
  amount numeric(14, 2) not null,
  status text not null default 'draft',
  request_id uuid,
  cloud_ref text,
  cloud_status text
);
create or replace function demo.tg_sales_order__500_enqueue() returns trigger language plpgsql as \$\$
begin
  if new.status = 'approved' and old.status is distinct from 'approved' then
    new.request_id := cloud.enqueue_message('demo_webhook', 'demo.order_approved',
      jsonb_build_object('order_no', new.order_no, 'customer', new.customer, 'amount', new.amount),
      'demo.sales_order', new.id::text, 'demo.sales_order:' || new.id);
    new.cloud_status := 'queued';
  end if;
  return new;
end \$\$;
drop trigger if exists sales_order_500_enqueue on demo.sales_order;
create trigger sales_order_500_enqueue before update of status on demo.sales_order
  for each row execute function demo.tg_sales_order__500_enqueue();
create or replace function demo.record_order_sent(m cloud.outbox, r jsonb) returns void language sql as \$\$
  update demo.sales_order set cloud_ref = 'seq ' || (r->>'seq'), cloud_status = 'accepted' where id = m.aggregate_id::bigint
\$\$;
select cloud.put_operation_handler('demo.order_approved', 'demo.record_order_sent(cloud.outbox, jsonb)');
truncate demo.sales_order;
SQL

}

webhook_run() {
webhook_started=$(psql_ -tAc "select now()")
echo "== webhook: the ERP inserts 20 orders and approves them (one transaction each), and rolls one approval back"
psql_ <<'SQL'
insert into demo.sales_order (order_no, customer, amount)
select 'SO-2026-' || lpad(g::text, 4, '0'), (array['华东机电有限公司', '苏州精密制造', '宁波港务物流'])[1 + g % 3], round((1000 + g * 137.5)::numeric, 2)
  from generate_series(1, 21) g;
SQL
for i in $(seq 1 20); do
  psql_ -c "update demo.sales_order set status = 'approved' where order_no = 'SO-2026-$(printf %04d "$i")'"
done
psql_ -c "begin; update demo.sales_order set status = 'approved' where order_no = 'SO-2026-0021'; rollback;"

echo "== webhook: wait for delivery (retries included)"
for _ in $(seq 100); do
  left=$(psql_ -tAc "select count(*) from cloud.outbox where endpoint = 'demo_webhook' and status <> 'sent' and created_at >= '$webhook_started'")
  [ "$left" = 0 ] && break; sleep 0.2
done

echo
echo "== webhook result: the ERP's orders after the round trip"
psql_ -c "select order_no, customer, amount, status, cloud_status, cloud_ref from demo.sales_order order by id limit 6"
psql_ -c "select status, count(*) from demo.sales_order group by status order by status"
echo "== cloud.log: every attempt"
psql_ -c "select outcome, http_status, error_class, count(*), round(avg(duration_ms), 2) as avg_ms from cloud.log where endpoint = 'demo_webhook' and started_at >= '$webhook_started' group by 1, 2, 3 order by 1 desc"
echo "== the simulator's ledger: effects per request_id"
curl -fsS "$webhook_sim_url/__sim/ledger" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const l=JSON.parse(s);const dup=l.entries.filter(e=>e.hits>1).length;console.log(`   ${l.entries.length} effects for ${l.requests.length} requests; keys answered more than once: ${dup}`)})'
sent=$(psql_ -tAc "select count(*) from demo.sales_order where cloud_status = 'accepted'")
echo
if [ "$sent" = 20 ]; then echo "webhook OK: 20 approved orders reached the cloud once each and were written back; the rolled-back approval sent nothing"; else echo "webhook FAILED: $sent of 20 orders written back"; return 1; fi
}
