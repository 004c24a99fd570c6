-- acme: disconnect the example ERP from erp-cloud. Removes its triggers, its callback and buyer function and
-- their registration; keeps every table and row of schema acme (the ERP's data) and every document, invoice and
-- PDF erp-cloud holds for source acme (tax.invoice_status still shows them). `psql -1 -f uninstall.sql`.
select tax.put_source('acme', p_unset => '{on_invoice,refresh_buyer}') from tax.source where name = 'acme';
drop trigger if exists so_invoice_head_500_issue on acme.so_invoice_head;
drop trigger if exists so_red_head_500_reverse on acme.so_red_head;
drop function if exists acme.tg_so_invoice_head__500_issue(), acme.tg_so_red_head__500_reverse(),
  acme.on_invoice(tax.invoice_result), acme.buyer_of(text);
do $$ begin
  if pg_catalog.to_regclass('erp_cloud.example') is not null then delete from erp_cloud.example where name = 'acme'; end if;
end $$;
