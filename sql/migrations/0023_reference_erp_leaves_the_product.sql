-- 0023 — the reference ERP leaves the product (issue 11 part 3; ADR 0001
-- §5.2, the ADR's 0025, numbered 0023 here): it becomes the example
-- sql/examples/reference-erp, which uses only the public contracts, and no
-- function of cloud, tax, scm, sso or vault names schema erp any more.
--
-- 1. Dropped: the transitional pieces 0018–0020 left so that each file was a
--    working installation: tax.issue_invoices, tax._reference_erp_document,
--    the trigger functions tax.tg_settlement__500_issue,
--    tax.tg_shipment__500_issue, tax.tg_document__100_stamp (and their
--    triggers on erp.settlement / erp.shipment), the reversal trigger of
--    tax.reversal with its legacy branch (every reversal comes through
--    tax.enqueue_reversal now, so the trigger had nothing left to do, and
--    the ERP role loses its column grants on tax.reversal),
--    scm._reference_erp_order, scm._sync_purchase_order, the reference ERP's
--    enqueue triggers and functions, erp.tg_supplier__500_put, erp.on_order,
--    erp.buyer_of; scm._supplier_upsert loses its p_id path (a supplier gets
--    erp-cloud's own id; an ERP looks it up by code).
-- 2. Dropped: the compatibility views erp.ar_invoice, erp.ar_invoice_line,
--    erp.invoice_reversal_request, erp.asn_document, erp.asn_line and
--    erp.app_user. They read erp-cloud's tables directly, which an example
--    never does, and they would tie every later change of those tables to
--    schema erp. Readers use tax.invoice_status, tax.red_invoice_status,
--    scm.asn_status and sso.app_user; the ERP asks for a reversal with an
--    insert into its own erp.invoice_reversal.
-- 3. Then, by what the database had before this run (the runner sets
--    erp_cloud.history_before_run to the highest migration applied before
--    the run started):
--    - upgraded (0007 ran in an earlier run, so the reference ERP's tables
--      may hold the ERP's data): the example is adopted. This file asks the
--      runner (erp_cloud.adopt_example) to apply
--      sql/examples/reference-erp/install.sql in this same transaction and
--      record it in erp_cloud.example, so the ERP's triggers are never
--      absent; its tables keep their rows and ids and change owner.
--      erp.attachment (the ERP's own attachments since 0018) stays when it
--      has rows, and is dropped when empty.
--    - fresh (0007–0009 ran in this same run): everything 0007–0021 made in
--      schema erp is dropped by an explicit list, refusing if any table has
--      a row, then the schema and the reference-erp source registrations:
--      a fresh erp-cloud has no schema erp (`migrate --with-example
--      reference-erp` installs it).
--    Run outside erp-cloud migrate (no erp_cloud.history_before_run, e.g. by
--    another runner), the file cannot install the example, so it takes the
--    fresh branch, which refuses when any of the tables has a row.

-- 1. Transitional pieces ----------------------------------------------------------

drop trigger if exists settlement_100_stamp on erp.settlement;
drop trigger if exists settlement_500_issue on erp.settlement;
drop trigger if exists shipment_100_stamp on erp.shipment;
drop trigger if exists shipment_500_issue on erp.shipment;
drop function tax.tg_settlement__500_issue();
drop function tax.tg_shipment__500_issue();
drop function tax.tg_document__100_stamp();
drop function tax.issue_invoices(text, bigint);
drop function erp.buyer_of(text);
drop function tax._reference_erp_document(text, bigint);

drop trigger reversal_500_request on tax.reversal;
drop function tax.tg_reversal__500_request();
revoke insert on tax.reversal from erp_cloud_app;

drop trigger purchase_order_500_enqueue on erp.purchase_order;
drop trigger purchase_order_line_500_enqueue on erp.purchase_order_line;
drop function erp.tg_purchase_order__500_enqueue_header();
drop function erp.tg_purchase_order__500_enqueue();
drop function scm._sync_purchase_order(bigint);
drop function scm._reference_erp_order(bigint);
drop function erp.on_order(scm.order_result);
drop trigger supplier_500_put on erp.supplier;
drop function erp.tg_supplier__500_put();

drop function scm._supplier_upsert(text, text, text, text, bigint);
create function scm._supplier_upsert(p_code text, p_name text, p_tax_id text, p_cloud_id text) returns scm.supplier
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v scm.supplier;
begin
  insert into scm.supplier as s (code, name, tax_id, cloud_id)
  values (p_code, p_name, p_tax_id, p_cloud_id)
  on conflict (code) do update
     set name = excluded.name, tax_id = excluded.tax_id, cloud_id = coalesce(excluded.cloud_id, s.cloud_id), updated_at = now()
   where (s.name, s.tax_id, s.cloud_id) is distinct from (excluded.name, excluded.tax_id, coalesce(excluded.cloud_id, s.cloud_id))
  returning * into v;
  if v.id is null then
    select * into v from scm.supplier where code = p_code;
  end if;
  return v;
end $$;
comment on function scm._supplier_upsert(text, text, text, text) is 'Internal: the supplier by code, added or brought up to date (name, tax id; a cloud id is kept when none is given).';
revoke all on function scm._supplier_upsert(text, text, text, text) from public;

-- 2. Compatibility views ----------------------------------------------------------

drop view erp.invoice_reversal_request;
drop view erp.ar_invoice_line;
drop view erp.ar_invoice;
drop view erp.asn_line;
drop view erp.asn_document;
drop view erp.app_user;

-- 3. Adopted as the example, or gone -------------------------------------------------

do $$
declare
  v_table text;
  v_rows  boolean;
begin
  if coalesce(nullif(current_setting('erp_cloud.history_before_run', true), ''), '0')::integer >= 7 then
    -- upgraded: the runner applies sql/examples/reference-erp/install.sql in this transaction
    if not exists (select from erp.attachment) then
      drop table erp.attachment;
    end if;
    perform set_config('erp_cloud.adopt_example', 'reference-erp', true);
    return;
  end if;
  -- fresh: 0007–0009 made these in this same run; nothing of an ERP is in them
  foreach v_table in array array['erp.settlement_line', 'erp.shipment_line', 'erp.shipment', 'erp.settlement', 'erp.customer',
                                 'erp.purchase_order_line', 'erp.purchase_order', 'erp.supplier', 'erp.attachment'] loop
    execute format('select exists (select from %s)', v_table) into v_rows;
    if v_rows then
      raise exception using errcode = 'object_not_in_prerequisite_state',
        message = format('0023 would drop %s, which has rows', v_table),
        hint = 'Run erp-cloud migrate (it adopts the reference ERP''s tables as the reference-erp example when they existed before the run); if they were made in this same run and written to since, restore the database, migrate to 0022, then migrate again.';
    end if;
  end loop;
  drop table erp.settlement_line, erp.shipment_line, erp.shipment, erp.settlement, erp.customer,
             erp.purchase_order_line, erp.purchase_order, erp.supplier, erp.attachment;
  drop function erp.tg_purchase_order__100_refuse_delete(), erp.tg_purchase_order__100_validate(),
                erp.tg_purchase_order_line__100_validate();
  drop schema erp;
  delete from tax.source where name = 'reference-erp';
  delete from scm.source where name = 'reference-erp';
end $$;
