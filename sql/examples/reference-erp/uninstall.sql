-- reference-erp: disconnect the reference example ERP from erp-cloud. Removes its triggers, callbacks and helper
-- functions and their registration; keeps every table and row of schema erp (the ERP's data) and every document,
-- invoice, PDF and order erp-cloud holds for source reference-erp (tax.invoice_status, scm.order_status still show
-- them). `psql -1 -f uninstall.sql`.
select tax.put_source('reference-erp', p_unset => '{on_invoice,refresh_buyer}') from tax.source where name = 'reference-erp';
select scm.put_source('reference-erp', p_unset => '{on_order,on_asn}') from scm.source where name = 'reference-erp';
drop trigger if exists settlement_100_stamp on erp.settlement;
drop trigger if exists settlement_500_issue on erp.settlement;
drop trigger if exists shipment_100_stamp on erp.shipment;
drop trigger if exists shipment_500_issue on erp.shipment;
drop trigger if exists invoice_reversal_500_request on erp.invoice_reversal;
drop trigger if exists purchase_order_100_refuse_delete on erp.purchase_order;
drop trigger if exists purchase_order_100_validate on erp.purchase_order;
drop trigger if exists purchase_order_500_enqueue on erp.purchase_order;
drop trigger if exists purchase_order_line_100_validate on erp.purchase_order_line;
drop trigger if exists purchase_order_line_500_enqueue on erp.purchase_order_line;
drop trigger if exists supplier_500_put on erp.supplier;
drop function if exists erp.tg_settlement__100_stamp(), erp.tg_settlement__500_issue(), erp.tg_shipment__100_stamp(),
  erp.tg_shipment__500_issue(), erp.tg_invoice_reversal__500_request(), erp.tg_purchase_order__100_refuse_delete(),
  erp.tg_purchase_order__100_validate(), erp.tg_purchase_order__500_enqueue(), erp.tg_purchase_order_line__100_validate(),
  erp.tg_purchase_order_line__500_enqueue(), erp.tg_supplier__500_put(), erp._issue_invoices(text, bigint),
  erp._invoice_document(text, bigint), erp._enqueue_order(bigint), erp._order_document(bigint),
  erp.buyer_of(text), erp.on_order(scm.order_result);
do $$ begin
  if pg_catalog.to_regclass('erp_cloud.example') is not null then delete from erp_cloud.example where name = 'reference-erp'; end if;
end $$;
