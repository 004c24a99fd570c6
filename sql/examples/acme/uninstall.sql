-- acme: disconnect the example ERP from erp-cloud. Removes its triggers, its callbacks and buyer function and
-- their registration; keeps every table and row of schema acme (the ERP's data) and every document, invoice, PDF,
-- order and ASN erp-cloud holds for source acme (tax.invoice_status, scm.order_status still show them).
-- `psql -1 -f uninstall.sql`.
select tax.put_source('acme', p_unset => '{on_invoice,refresh_buyer}') from tax.source where name = 'acme';
drop trigger if exists so_invoice_head_500_issue on acme.so_invoice_head;
drop trigger if exists so_red_head_500_reverse on acme.so_red_head;
select scm.put_source('acme', p_unset => '{on_order,on_asn}') from scm.source where name = 'acme';
drop trigger if exists po_head_500_publish on acme.po_head;
drop trigger if exists po_line_500_publish on acme.po_line;
drop function if exists acme.tg_so_invoice_head__500_issue(), acme.tg_so_red_head__500_reverse(),
  acme.on_invoice(tax.invoice_result), acme.buyer_of(text), acme.tg_po_head__500_publish(), acme.tg_po_line__500_publish(),
  acme._enqueue_order(text), acme.on_order(scm.order_result), acme.on_asn(scm.asn_delivery);
do $$ begin
  if pg_catalog.to_regclass('erp_cloud.example') is not null then delete from erp_cloud.example where name = 'acme'; end if;
end $$;
