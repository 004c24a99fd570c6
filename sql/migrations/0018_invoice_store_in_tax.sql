-- 0018 — the e-invoicing store moves from schema erp into tax, in place
-- (ADR 0001 §2.1–2.6; the ADR's 0019, numbered 0018 here: the contract
-- functions come on top of it).
--
-- erp-cloud's invoices, their lines, PDFs and reversal requests are
-- erp-cloud's own data, not the reference ERP's, so they live in tax now:
--
--   erp.ar_invoice               → tax.invoice
--   erp.ar_invoice_line          → tax.invoice_line   (ar_invoice_id → invoice_id)
--   erp.attachment               → tax.attachment     (doc_type, doc_id → invoice_id)
--   erp.invoice_reversal_request → tax.reversal       (ar_invoice_id → invoice_id)
--   tax.invoice_event.ar_invoice_id → invoice_id
--
-- The tables are moved with ALTER TABLE … SET SCHEMA and renamed: ids,
-- identity sequences, indexes, foreign keys, triggers, comments and grants
-- move with them; no row is copied (a PDF stays where it is on disk).
-- Constraints and indexes whose names said ar_invoice are renamed.
--
-- New: tax.document, one row per document an ERP handed in (source,
-- reference, kind, remark, the document as jsonb and its sha256). Every
-- settlement / shipment that has a blue invoice gets its row, rebuilt from
-- the erp rows (source 'reference-erp', reference 'settlement/<no>' or
-- 'shipment/<no>'). A blue invoice points to its document (document_id), a
-- red one to its reversal (reversal_id); settlement_id / shipment_id are
-- dropped. The buyer's address, phone, bank and email, which the payload
-- builder used to read from erp.customer at every build, are kept on the
-- invoice (a snapshot taken at issue, refreshed by tax.reissue_invoice).
--
-- Every tax function that named the moved tables is re-created against
-- them; tax.issue_invoices keeps its signature and behaviour and still reads
-- the reference ERP's settlement / shipment / customer (transitional: the
-- contract replaces it). Outbox rows of every status with aggregate_type
-- 'erp.ar_invoice' now say 'tax.invoice' (aggregate_id is the same id), and
-- every enqueue uses 'tax.invoice'.
--
-- For readers of an upgraded installation, schema erp keeps compatibility
-- views: erp.ar_invoice and erp.ar_invoice_line (read-only, the old columns,
-- settlement_id / shipment_id derived from the document's reference) and
-- erp.invoice_reversal_request (auto-updatable, so the reference ERP's
-- inserts still reach tax.reversal and its trigger). erp.attachment is
-- re-created empty in its old shape for the ERP's own attachments; rows that
-- were not invoice PDFs of an existing invoice are moved back into it.
--
-- The product roles keep exactly the access they had, on the moved tables
-- and on the views; tax.document is readable by erp_cloud_app and
-- erp_cloud_operator, who could read the erp rows it is made of.
--
-- SQLSTATEs: none new.

-- nothing is enqueued or completed against the old names while the tables move
lock table cloud.outbox in share row exclusive mode;

-- 1. the documents ------------------------------------------------------------

create table tax.document (
  id          bigint generated always as identity primary key,
  source      text not null,
  reference   text not null,
  kind        text not null check (kind in ('normal', 'special')),
  remark      text,
  doc         jsonb not null,
  doc_sha256  text not null,
  received_at timestamptz not null default now(),
  constraint document_source_reference_key unique (source, reference)
);
comment on table tax.document is 'One row per document an ERP handed in to be invoiced, found by (source, reference): its kind, the remark printed on its invoices, the document itself (doc, as ADR 0001 §3.2 describes it) and the sha256 of its text. Blue invoices point here (tax.invoice.document_id); red invoices point to their reversal instead.';
comment on column tax.document.source is 'The ERP that handed the document in (''reference-erp'' for the reference ERP''s settlements and shipments).';
comment on column tax.document.reference is 'The caller''s key of the document, unique per source (''settlement/<settlement_no>'' or ''shipment/<shipment_no>'' for the reference ERP).';
comment on column tax.document.kind is 'normal (数电普票) or special (数电专票): every invoice of the document has this kind.';
comment on column tax.document.remark is 'The remark printed on the document''s invoices (with " (n/m)" when it is split); the reference ERP''s is its document number.';
comment on column tax.document.doc is 'The document as handed in: kind, remark, buyer (name, tax_id, address, phone, bank_name, bank_account, email, tax_id_check_override) and lines; for documents from before release 0018, rebuilt from the reference ERP''s rows when the store moved.';
comment on column tax.document.doc_sha256 is 'encode(sha256(doc::text::bytea), ''hex''): tells a document handed in again with other content from the same one.';
comment on column tax.document.received_at is 'When the document was handed in (for documents from before release 0018: when the settlement was approved or the shipment posted).';
grant select on tax.document to erp_cloud_app, erp_cloud_operator;

-- the reference ERP's settlement or shipment as an invoicing document (ADR 0001 §3.2)
create function tax._reference_erp_document(p_source text, p_id bigint) returns jsonb
language sql stable as $$
  select jsonb_build_object(
           'kind', d.invoice_kind,
           'remark', d.no,
           'buyer', jsonb_build_object('name', c.name, 'tax_id', c.tax_id, 'address', c.address, 'phone', c.phone,
                                       'bank_name', c.bank_name, 'bank_account', c.bank_account, 'email', c.email,
                                       'tax_id_check_override', c.tax_id_check_override),
           'lines', coalesce((
             select jsonb_agg(jsonb_build_object('line_no', l.line_no, 'item_name', l.item_name, 'tax_code', l.tax_code, 'spec', l.spec,
                                                 'unit', l.unit, 'quantity', l.quantity, 'unit_price', l.unit_price, 'amount', l.amount,
                                                 'tax_rate', l.tax_rate, 'tax_amount', l.tax_amount) order by l.line_no)
               from (select sl.line_no, sl.item_name, sl.tax_code, sl.spec, sl.unit, sl.quantity, sl.unit_price, sl.amount, sl.tax_rate, sl.tax_amount
                       from erp.settlement_line sl where p_source = 'settlement' and sl.settlement_id = p_id
                     union all
                     select hl.line_no, hl.item_name, hl.tax_code, hl.spec, hl.unit, hl.quantity, hl.unit_price, hl.amount, hl.tax_rate, hl.tax_amount
                       from erp.shipment_line hl where p_source = 'shipment' and hl.shipment_id = p_id) l), '[]'::jsonb))
    from (select s.invoice_kind, s.settlement_no as no, s.customer_id from erp.settlement s where p_source = 'settlement' and s.id = p_id
          union all
          select h.invoice_kind, h.shipment_no, h.customer_id from erp.shipment h where p_source = 'shipment' and h.id = p_id) d
    join erp.customer c on c.id = d.customer_id
$$;
comment on function tax._reference_erp_document(text, bigint) is 'Internal, transitional (until the reference ERP hands its documents in through the contract): the reference ERP''s settlement or shipment p_id as an invoicing document (kind, remark = its number, buyer from erp.customer, lines), as ADR 0001 §3.2 describes it.';
revoke all on function tax._reference_erp_document(text, bigint) from public;

insert into tax.document (source, reference, kind, remark, doc, doc_sha256, received_at)
select 'reference-erp', k.src || '/' || k.no, k.doc->>'kind', k.no, k.doc, encode(sha256(k.doc::text::bytea), 'hex'), k.received_at
  from (select 'settlement' as src, s.settlement_no as no, tax._reference_erp_document('settlement', s.id) as doc,
               coalesce(s.approved_at, (select min(a.created_at) from erp.ar_invoice a where a.settlement_id = s.id), now()) as received_at, s.id as ord
          from erp.settlement s where exists (select from erp.ar_invoice a where a.settlement_id = s.id and a.invoice_type = 'blue')
        union all
        select 'shipment', h.shipment_no, tax._reference_erp_document('shipment', h.id),
               coalesce(h.posted_at, (select min(a.created_at) from erp.ar_invoice a where a.shipment_id = h.id), now()), h.id
          from erp.shipment h where exists (select from erp.ar_invoice a where a.shipment_id = h.id and a.invoice_type = 'blue')) k
 order by k.received_at, k.src, k.ord;

-- 2. invoices -----------------------------------------------------------------

alter table erp.ar_invoice set schema tax;
alter table tax.ar_invoice rename to invoice;
alter sequence tax.ar_invoice_id_seq rename to invoice_id_seq;
alter table tax.invoice rename constraint ar_invoice_pkey to invoice_pkey;
alter table tax.invoice rename constraint ar_invoice_order_no_key to invoice_order_no_key;
alter table tax.invoice rename constraint ar_invoice_request_id_key to invoice_request_id_key;
alter table tax.invoice rename constraint ar_invoice_invoice_kind_check to invoice_invoice_kind_check;
alter table tax.invoice rename constraint ar_invoice_invoice_status_check to invoice_invoice_status_check;
alter table tax.invoice rename constraint ar_invoice_invoice_type_check to invoice_invoice_type_check;
alter table tax.invoice rename constraint ar_invoice_number_is_digital to invoice_number_is_digital;
alter table tax.invoice rename constraint ar_invoice_original_invoice_id_fkey to invoice_original_invoice_id_fkey;
alter index tax.ar_invoice_original rename to invoice_original;

alter table erp.ar_invoice_line set schema tax;
alter table tax.ar_invoice_line rename to invoice_line;
alter table tax.invoice_line rename column ar_invoice_id to invoice_id;
alter sequence tax.ar_invoice_line_id_seq rename to invoice_line_id_seq;
alter table tax.invoice_line rename constraint ar_invoice_line_pkey to invoice_line_pkey;
alter table tax.invoice_line rename constraint ar_invoice_line_ar_invoice_id_line_no_key to invoice_line_invoice_id_line_no_key;
alter table tax.invoice_line rename constraint ar_invoice_line_ar_invoice_id_fkey to invoice_line_invoice_id_fkey;

-- 3. reversals ----------------------------------------------------------------

alter table erp.invoice_reversal_request set schema tax;
alter table tax.invoice_reversal_request rename to reversal;
alter table tax.reversal rename column ar_invoice_id to invoice_id;
alter sequence tax.invoice_reversal_request_id_seq rename to reversal_id_seq;
alter table tax.reversal rename constraint invoice_reversal_request_pkey to reversal_pkey;
alter table tax.reversal rename constraint invoice_reversal_request_status_check to reversal_status_check;
alter table tax.reversal rename constraint invoice_reversal_request_ar_invoice_id_fkey to reversal_invoice_id_fkey;
alter table tax.reversal rename constraint invoice_reversal_request_red_invoice_id_fkey to reversal_red_invoice_id_fkey;
alter trigger invoice_reversal_request_500_request on tax.reversal rename to reversal_500_request;
alter table tax.reversal add column source text, add column reference text;
comment on table tax.reversal is '红冲 requests. Insert one for an issued invoice (invoice_id; reason: Nuonuo code 1 销货退回, 2 开票有误, 3 服务中止, 4 销售折让; line_nos null = full, else those invoice lines) and the 数电 red-confirmation flow runs; status pending → confirming → issued | failed. The red invoice is red_invoice_id (its tax.invoice.reversal_id points back here). The reference ERP inserts through the view erp.invoice_reversal_request.';
comment on column tax.reversal.invoice_id is 'The blue invoice reversed (all of it, or its lines line_nos).';
comment on column tax.reversal.source is 'The ERP that asked for the reversal (its key with reference); null for requests made before the reversal contract.';
comment on column tax.reversal.reference is 'The caller''s key of the reversal, with source; null for requests made before the reversal contract.';

-- 4. invoices: document, reversal and buyer snapshot --------------------------

alter table tax.invoice
  add column document_id bigint references tax.document,
  add column reversal_id bigint references tax.reversal,
  add column buyer_address text,
  add column buyer_phone text,
  add column buyer_bank_name text,
  add column buyer_account text,
  add column buyer_email text;

update tax.invoice i
   set document_id = case when i.invoice_type = 'blue' then d.id end,
       buyer_address = c.address, buyer_phone = c.phone, buyer_bank_name = c.bank_name, buyer_account = c.bank_account, buyer_email = c.email
  from (select a.id, coalesce(s.customer_id, h.customer_id) as customer_id,
               coalesce('settlement/' || s.settlement_no, 'shipment/' || h.shipment_no) as reference
          from tax.invoice a
          left join erp.settlement s on s.id = a.settlement_id
          left join erp.shipment h on h.id = a.shipment_id) k
  join erp.customer c on c.id = k.customer_id
  left join tax.document d on d.source = 'reference-erp' and d.reference = k.reference
 where i.id = k.id;
update tax.invoice i set reversal_id = r.id from tax.reversal r where r.red_invoice_id = i.id;

alter table tax.invoice drop constraint ar_invoice_one_source, drop constraint ar_invoice_red_has_original;
-- their foreign keys and the partial unique indexes ar_invoice_settlement_part / ar_invoice_shipment_part go with them
alter table tax.invoice drop column settlement_id, drop column shipment_id;
alter table tax.invoice
  add constraint invoice_blue_has_document check ((invoice_type = 'blue') = (document_id is not null)),
  add constraint invoice_red_has_reversal check ((invoice_type = 'red') = (reversal_id is not null)
                                                 and (invoice_type = 'red') = (original_invoice_id is not null)),
  add constraint invoice_document_id_part_no_key unique (document_id, part_no),
  add constraint invoice_reversal_id_key unique (reversal_id);

comment on table tax.invoice is 'Invoices issued through the tax cloud: a blue one per part of a document (document_id, part_no of part_count), a red one per reversal (reversal_id, original_invoice_id). invoice_status: pending → issuing → issued, or failed (error_code / error_message say why: unknown_outcome and poll_limit mean the platform may still have issued it, so only tax.requery_invoice applies; any other code is a definite refusal that tax.reissue_invoice may issue again), then partially_reversed while some lines have an issued red invoice, and reversed when every line has. tax_cloud_response keeps the latest raw answer of each step under its own key: submit (tax.issue accepted), issue (tax.issue failed), query (result query, answered or failed), reinvoice (signing retry) with reinvoices / reinvoice_at (how many were sent, the last when), red_confirm and red_query (the red-letter confirmation form and its status), stale (an answer about an earlier orderNo); after tax.reissue_invoice it starts again with previous (the earlier answers) and previous_request_id. The PDF is not kept here but in tax.attachment.';
comment on column tax.invoice.document_id is 'The document a blue invoice is (a part of); null for a red invoice.';
comment on column tax.invoice.reversal_id is 'The reversal a red invoice carries out (one red invoice per reversal); null for a blue invoice.';
comment on column tax.invoice.buyer_address is 'The buyer''s address as it was when the invoice was (re)issued: it goes into the payload (buyerAddress).';
comment on column tax.invoice.buyer_phone is 'The buyer''s phone as it was when the invoice was (re)issued: it goes into the payload (buyerTel).';
comment on column tax.invoice.buyer_bank_name is 'The buyer''s bank as it was when the invoice was (re)issued: it goes into the payload before the account (buyerAccount).';
comment on column tax.invoice.buyer_account is 'The buyer''s bank account number as it was when the invoice was (re)issued: it goes into the payload after the bank name (buyerAccount).';
comment on column tax.invoice.buyer_email is 'Where the platform mails the invoice (pushMode 0), as it was when the invoice was (re)issued; null: not mailed.';
comment on table tax.invoice_line is 'Invoice lines after price–tax separation in numeric: excl = round(incl / (1 + rate), 2), tax = incl − excl (or the ERP''s own tax within 0.06). source_line_no is the line_no of the document''s line.';

alter table tax.invoice_event rename column ar_invoice_id to invoice_id;
comment on table tax.invoice_event is 'Invoice event log: every change of tax.invoice.invoice_no (trigger update_invoice_status), with the status at that moment and who made it.';

-- 5. attachments --------------------------------------------------------------

alter table erp.attachment set schema tax;

-- the reference ERP keeps a table of its own for its documents' files
create table erp.attachment (
  id           bigint generated always as identity primary key,
  doc_type     text not null,
  doc_id       bigint not null,
  file_name    text not null,
  content_type text not null,
  content      bytea not null,
  sha256       text not null,
  byte_size    integer not null,
  source_url   text,
  created_at   timestamptz not null default now(),
  unique (doc_type, doc_id, file_name)
);
comment on table erp.attachment is '单据附件: files attached to the ERP''s own documents (doc_type = table name). Invoice PDFs are not here but in tax.attachment (since release 0018).';
grant select on erp.attachment to erp_cloud_app, erp_cloud_operator;

-- what was not the PDF of one of our invoices goes back to the ERP, with its id
insert into erp.attachment (id, doc_type, doc_id, file_name, content_type, content, sha256, byte_size, source_url, created_at)
overriding system value
select a.id, a.doc_type, a.doc_id, a.file_name, a.content_type, a.content, a.sha256, a.byte_size, a.source_url, a.created_at
  from tax.attachment a
 where a.doc_type <> 'erp.ar_invoice' or not exists (select from tax.invoice i where i.id = a.doc_id)
 order by a.id;
delete from tax.attachment a where exists (select from erp.attachment e where e.id = a.id);
select setval(pg_get_serial_sequence('erp.attachment', 'id'), coalesce(max(id), 0) + 1, false) from erp.attachment;

alter table tax.attachment add column invoice_id bigint;
update tax.attachment set invoice_id = doc_id;
alter table tax.attachment
  alter column invoice_id set not null,
  drop column doc_type,
  drop column doc_id,
  add constraint attachment_invoice_id_file_name_key unique (invoice_id, file_name),
  add constraint attachment_invoice_id_fkey foreign key (invoice_id) references tax.invoice;
comment on table tax.attachment is 'Files of an invoice: its PDF lands here after issue (tax.record_pdf), with its sha256 and size; one file name per invoice.';
comment on column tax.attachment.invoice_id is 'The invoice the file belongs to.';

-- 6. the outbox: messages about an invoice name it by its new table -----------

update cloud.outbox set aggregate_type = 'tax.invoice' where aggregate_type = 'erp.ar_invoice';

-- 7. functions ----------------------------------------------------------------

create or replace function tax._answer_is_stale(m cloud.outbox, p_inv tax.invoice) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
  -- a submit under an earlier orderNo (before tax.reissue_invoice), or a query about one
  select case when m.operation in ('tax.issue', 'tax.red_confirm') then m.request_id <> p_inv.request_id
              when m.operation = 'tax.query' then
                   (m.payload ? 'orderNos' and m.payload #>> '{orderNos,0}' is distinct from p_inv.order_no)
                or (m.payload ? 'serialNos' and m.payload #>> '{serialNos,0}' is distinct from p_inv.invoice_serial_no)
              else false end
$$;

create or replace function tax._enqueue_query(p_inv tax.invoice, p_by text, p_delay_ms bigint) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
declare
  v_id uuid;
begin
  v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.query',
            case when p_by = 'serial' then jsonb_build_object('serialNos', jsonb_build_array(p_inv.invoice_serial_no), 'isOfferInvoiceDetail', '0')
                 else jsonb_build_object('orderNos', jsonb_build_array(p_inv.order_no), 'isOfferInvoiceDetail', '0') end,
            'tax.invoice', p_inv.id::text, null, null, clock_timestamp() + make_interval(secs => p_delay_ms / 1000.0));
  -- remembered so a callback finds the pending query by primary key
  update tax.invoice set next_query_id = v_id where id = p_inv.id;
  return v_id;
end $$;

create or replace function tax._keep_stale_answer(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE sql
    AS $$
  update tax.invoice a
     set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('stale', jsonb_build_object(
           'operation', m.operation, 'request_id', m.request_id, 'payload', m.payload, 'answer', r)),
         updated_at = now()
   where a.id = m.aggregate_id::bigint
$$;

create or replace function tax._mark_original_reversed(p_original bigint) RETURNS void
    LANGUAGE sql
    AS $$
  update tax.invoice o
     set invoice_status = case when exists (
           select from tax.invoice_line l where l.invoice_id = o.id and l.line_no not in (
             select rl.line_no from tax.invoice r join tax.invoice_line rl on rl.invoice_id = r.id
              where r.original_invoice_id = o.id and r.invoice_type = 'red' and r.invoice_status = 'issued'))
           then 'partially_reversed' else 'reversed' end,
         updated_at = now()
   where o.id = p_original and o.invoice_status in ('issued', 'partially_reversed')
$$;

create or replace function tax._outcome_unknown(p_inv tax.invoice) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
  select p_inv.invoice_status = 'failed' and p_inv.error_code in ('unknown_outcome', 'poll_limit')
$$;

create or replace function tax._query_now(p_inv tax.invoice) RETURNS text
    LANGUAGE plpgsql
    AS $$
declare
  v_n integer;
begin
  if p_inv.invoice_status <> 'issuing' then
    return 'final';
  end if;
  -- the callback is unsigned: it only moves the next scheduled query to now
  update cloud.outbox set next_attempt_at = clock_timestamp(), updated_at = clock_timestamp()
   where request_id = p_inv.next_query_id and status = 'pending' and next_attempt_at > clock_timestamp();
  get diagnostics v_n = row_count;
  if v_n > 0 then
    perform cloud._wake_listeners((select e.wake_channel from cloud.endpoint e join tax.config c on c.endpoint = e.name));
  end if;
  return 'query_now';
end $$;

create or replace function tax.accept_invoice_callback(p_order_no text, p_content jsonb) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv tax.invoice;
begin
  select * into v_inv from tax.invoice where order_no = p_order_no;
  if not found then
    return 'unknown';
  end if;
  return tax._query_now(v_inv);
end $$;

create or replace function tax.accept_red_confirm_callback(p_bill_id text, p_content jsonb) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv tax.invoice;
begin
  -- the billId is the red invoice's orderNo (unique)
  select * into v_inv from tax.invoice where order_no = p_bill_id and invoice_type = 'red';
  if not found then
    return 'unknown';
  end if;
  return tax._query_now(v_inv);
end $$;

create or replace function tax.build_invoice_payload(p_invoice_id bigint) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  select jsonb_build_object('order', jsonb_strip_nulls(jsonb_build_object(
           'buyerName', i.buyer_name,
           'buyerTaxNum', i.buyer_tax_id,
           'buyerTel', i.buyer_phone,
           'buyerAddress', i.buyer_address,
           'buyerAccount', nullif(concat_ws(' ', i.buyer_bank_name, i.buyer_account), ''),
           'salerTaxNum', cfg.seller_tax_id,
           'salerTel', cfg.seller_phone,
           'salerAddress', cfg.seller_address,
           'salerAccount', cfg.seller_bank_account,
           'orderNo', i.order_no,
           'invoiceDate', to_char(i.created_at at time zone 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS'),
           'clerk', cfg.clerk,
           'invoiceType', '1',
           'invoiceLine', case i.invoice_kind when 'special' then 'bs' else 'pc' end,
           'pushMode', case when i.buyer_email is not null then '0' else '-1' end,
           'email', i.buyer_email,
           'remark', concat_ws(' ', d.remark,
                               case when i.part_count > 1 then format('(%s/%s)', i.part_no, i.part_count) end),
           'callBackUrl', cfg.callback_url,
           'invoiceDetail', (
             select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                      'goodsName', l.item_name,
                      'goodsCode', l.tax_code,
                      'specType', l.spec,
                      'unit', l.unit,
                      'num', tax.decimal_text(l.quantity),
                      'price', tax.decimal_text(l.unit_price),
                      'withTaxFlag', '1',
                      'taxRate', tax.decimal_text(l.tax_rate),
                      'taxExcludedAmount', l.amount_excl_tax::text,
                      'tax', l.tax_amount::text,
                      'taxIncludedAmount', l.amount_incl_tax::text,
                      'invoiceLineProperty', '0')) order by l.line_no)
               from tax.invoice_line l where l.invoice_id = i.id))))
    from tax.invoice i
    cross join tax.config cfg
    left join tax.document d on d.id = i.document_id
   where i.id = p_invoice_id
$$;

create or replace function tax.issue_invoices(p_source text, p_id bigint) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_cfg      tax.config;
  v_customer erp.customer;
  v_kind     text;
  v_doc      text;
  v_no       text;
  v_linked   bigint;
  v_lines    tax.source_line[];
  v_line     tax.source_line;
  v_parts    integer[];
  v_count    integer;
  v_plain    integer;
  v_warning  text;
  v_inv      bigint;
  v_req      uuid;
  v_dev      numeric;
  v_part_lines tax.source_line[];
  v_docjson  jsonb;
  v_document bigint;
  p          integer;
begin
  if p_source = 'settlement' then
    select s.invoice_kind, s.settlement_no into v_kind, v_no from erp.settlement s where s.id = p_id;
    select c.* into v_customer from erp.settlement s join erp.customer c on c.id = s.customer_id where s.id = p_id;
    v_doc := 'settlement ' || v_no;
  else
    select s.invoice_kind, s.shipment_no, s.settlement_id into v_kind, v_no, v_linked from erp.shipment s where s.id = p_id;
    select c.* into v_customer from erp.shipment s join erp.customer c on c.id = s.customer_id where s.id = p_id;
    v_doc := 'shipment ' || v_no;
  end if;
  if v_customer.invoice_on <> p_source then
    return 0;
  end if;
  -- one document is invoiced once: serialise approvals of it, and look at what exists
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('tax.issue:' || p_source || ':' || p_id, 0));
  if p_source = 'settlement' then
    if exists (select from tax.document d where d.source = 'reference-erp' and d.reference = 'settlement/' || v_no)
       or exists (select from tax.document d join erp.shipment sh on d.reference = 'shipment/' || sh.shipment_no
                   where d.source = 'reference-erp' and sh.settlement_id = p_id) then
      return 0;
    end if;
    select array_agg(row(l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price, l.amount, l.tax_rate, l.tax_amount)::tax.source_line order by l.line_no)
      into v_lines from erp.settlement_line l where l.settlement_id = p_id;
  else
    if exists (select from tax.document d where d.source = 'reference-erp' and d.reference = 'shipment/' || v_no)
       or (v_linked is not null and exists (select from tax.document d join erp.settlement s on d.reference = 'settlement/' || s.settlement_no
                                             where d.source = 'reference-erp' and s.id = v_linked)) then
      return 0;
    end if;
    select array_agg(row(l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price, l.amount, l.tax_rate, l.tax_amount)::tax.source_line order by l.line_no)
      into v_lines from erp.shipment_line l where l.shipment_id = p_id;
  end if;
  v_cfg := tax._config();
  if v_lines is null then
    raise exception using errcode = 'EI006', message = format('%s has no lines to invoice', v_doc),
      hint = 'Add the lines before approving, or cancel the document.';
  end if;
  -- the seller's texts go into every payload too
  perform tax._check_text('seller_address', v_cfg.seller_address, v_doc || ': the seller', 'the seller address (tax.put_config p_seller_address)');
  perform tax._check_text('seller_phone', v_cfg.seller_phone, v_doc || ': the seller', 'the seller phone (tax.put_config p_seller_phone)');
  perform tax._check_text('seller_account', v_cfg.seller_bank_account, v_doc || ': the seller', 'the seller bank account (tax.put_config p_seller_bank_account)');
  perform tax._check_text('clerk', v_cfg.clerk, v_doc || ': the seller', 'the clerk (tax.put_config p_clerk)');
  v_warning := tax.validate_buyer(v_customer, v_kind, v_doc);
  foreach v_line in array v_lines loop
    perform tax.validate_line(v_line, v_doc);
  end loop;
  v_parts := tax.split_lines(v_lines, v_cfg.max_invoice_amount, v_cfg.max_invoice_lines, v_doc);
  v_count := v_parts[cardinality(v_parts)];
  if v_count > v_cfg.max_parts then
    v_plain := (tax._split_lines(v_lines, v_cfg.max_invoice_amount, v_cfg.max_invoice_lines, v_doc, null))[cardinality(v_parts)];
    if v_plain <= v_cfg.max_parts then
      -- the limits alone fit; keeping every invoice within 1.27 is what needs more
      raise exception using errcode = 'EI008',
        message = format('%s: keeping each invoice''s tax within 1.27 of excl × rate needs %s invoices, more than the %s allowed', v_doc, v_count, v_cfg.max_parts),
        hint = tax._tolerance_hint(v_lines);
    end if;
    raise exception using errcode = 'EI006', message = format('%s would need %s invoices, more than the %s allowed', v_doc, v_count, v_cfg.max_parts),
      hint = 'Split the document, or raise the limits with tax.put_config.';
  end if;
  -- the remark is the document number (and part): the longest one is checked before anything is written
  perform tax._check_text('remark', concat_ws(' ', v_no, case when v_count > 1 then format('(%s/%s)', v_count, v_count) end),
                          v_doc, format('the %s number (%s_no, which the remark carries)', p_source, p_source));
  -- the document as the reference ERP hands it in (transitional: the contract takes it from the ERP)
  v_docjson := tax._reference_erp_document(p_source, p_id);
  insert into tax.document (source, reference, kind, remark, doc, doc_sha256)
  values ('reference-erp', p_source || '/' || v_no, v_kind, v_no, v_docjson, encode(sha256(v_docjson::text::bytea), 'hex'))
  returning id into v_document;
  for p in 1 .. v_count loop
    v_req := cloud.new_request_id();
    insert into tax.invoice (document_id, part_no, part_count, invoice_kind, request_id, order_no,
                             buyer_name, buyer_tax_id, buyer_address, buyer_phone, buyer_bank_name, buyer_account, buyer_email,
                             amount_excl_tax, tax_amount, amount_incl_tax, tax_id_warning)
    values (v_document, p, v_count, v_kind, v_req, tax.order_no_for(v_req), v_customer.name, nullif(v_customer.tax_id, ''),
            v_customer.address, v_customer.phone, v_customer.bank_name, v_customer.bank_account, v_customer.email, 0, 0, 0, v_warning)
    returning id into v_inv;
    insert into tax.invoice_line (invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                  tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
    select v_inv, row_number() over (order by l.line_no), l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price,
           l.tax_rate, sep.amount_excl_tax, sep.tax_amount, l.amount
      from unnest(v_lines) with ordinality as l(line_no, item_name, tax_code, spec, unit, quantity, unit_price, amount, tax_rate, tax_amount, ord)
      cross join lateral tax.separate_price_tax(l.amount, l.tax_rate, l.tax_amount) sep
     where v_parts[l.ord] = p;
    -- the splitter keeps this within 1.27; checked again on what was written, so a defect there can never send one
    select sum(l.tax_amount - l.amount_excl_tax * l.tax_rate) into v_dev from tax.invoice_line l where l.invoice_id = v_inv;
    if abs(v_dev) > 1.27 then
      select array_agg(v_lines[o] order by o) into v_part_lines from generate_series(1, cardinality(v_lines)) o where v_parts[o] = p;
      raise exception using errcode = 'EI008',
        message = format('%s invoice %s of %s: line taxes differ from excl × rate by %s in total, more than 1.27', v_doc, p, v_count, round(v_dev, 4)),
        hint = tax._tolerance_hint(v_part_lines);
    end if;
    update tax.invoice a
       set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
      from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from tax.invoice_line where invoice_id = v_inv) t
     where a.id = v_inv;
    perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(v_inv), 'tax.invoice', v_inv::text,
                                  null, v_req);
  end loop;
  return v_count;
end $$;

create or replace function tax.log_invoice_event() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
begin
  if old.invoice_no is distinct from new.invoice_no then
    insert into tax.invoice_event (invoice_id, old_invoice_no, new_invoice_no, invoice_status)
    values (new.id, old.invoice_no, new.invoice_no, new.invoice_status);
  end if;
  return null;
end $$;

create or replace function tax.record_invoice_result(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv  tax.invoice;
  v_res  jsonb := r #> '{result,0}';
  v_st   text := r #>> '{result,0,status}';
  v_no   text;
  v_cfg  tax.config;
  v_unknown boolean;
  v_n    integer;
begin
  select * into v_inv from tax.invoice a where a.id = m.aggregate_id::bigint for update;
  if not found then
    return;
  end if;
  if tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, r);  -- about an earlier orderNo / serial no.
    return;
  end if;
  v_unknown := tax._outcome_unknown(v_inv);
  if v_inv.invoice_status <> 'issuing' and not v_unknown then
    return;  -- a hint-triggered query raced a scheduled one: the first final answer wins
  end if;
  select * into v_cfg from tax.config;
  if v_st = '2' then
    v_no := coalesce(nullif(v_res->>'allElectronicInvoiceNumber', ''), v_res->>'invoiceNo');
    update tax.invoice a
       set invoice_no = v_no, invoice_status = 'issued',
           invoice_serial_no = coalesce(v_res->>'serialNo', a.invoice_serial_no),
           invoice_date = to_timestamp((v_res->>'invoiceTime')::bigint / 1000.0),
           pdf_url = v_res->>'pdfUrl', ofd_url = v_res->>'ofdUrl', xml_url = v_res->>'xmlUrl',
           polls = a.polls + 1, error_code = null, error_message = null,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r),
           updated_at = now()
     where a.id = v_inv.id;
    if v_inv.invoice_type = 'red' then
      update tax.reversal set status = 'issued', finished_at = now(), error_message = null
       where red_invoice_id = v_inv.id and status in ('pending', 'confirming', 'failed');
      perform tax._mark_original_reversed(v_inv.original_invoice_id);
    end if;
    if coalesce(v_res->>'pdfUrl', '') <> '' then
      perform cloud.enqueue_message(v_cfg.endpoint, 'tax.download_pdf',
        jsonb_build_object('url', v_res->>'pdfUrl', 'max_bytes', v_cfg.max_pdf_bytes, 'invoice_no', v_no),
        'tax.invoice', v_inv.id::text);
    end if;
  elsif v_st = '22' then
    -- 开票失败: a definite refusal; a new orderNo (tax.reissue_invoice) may issue it
    update tax.invoice a
       set invoice_status = 'failed', error_code = 'nuonuo_22',
           error_message = coalesce(nullif(v_res->>'failCause', ''), v_res->>'statusMsg', 'the platform failed the invoice'),
           polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
    update tax.reversal set status = 'failed', error_message = v_res->>'failCause', finished_at = now()
     where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  elsif v_unknown then
    -- a late non-final answer for an invoice that gave up: kept; the operator's requery polls again
    update tax.invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
  elsif v_inv.polls + 1 >= v_cfg.max_polls then
    if r->>'code' = 'E9500' and v_inv.invoice_serial_no is null and not v_inv.order_known
       and coalesce(v_inv.tax_cloud_response #>> '{submit,code}', '') <> 'E9106'
       and clock_timestamp() >= v_inv.submitted_at + make_interval(secs => v_cfg.e9500_min_wait_ms / 1000.0) then
      -- every query by this orderNo answered E9500 for at least e9500_min_wait_ms after the submit (and never E9106):
      -- nothing was created, a new orderNo is safe
      update tax.invoice a
         set invoice_status = 'failed', error_code = 'nuonuo_E9500',
             error_message = format('the platform has no invoice under orderNo %s after %s queries; tax.reissue_invoice(%s) issues it again', a.order_no, v_inv.polls + 1, v_inv.id),
             polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
       where a.id = v_inv.id;
    else
      update tax.invoice a
         set invoice_status = 'failed', error_code = 'poll_limit',
             error_message = format('no final answer after %s queries (last status %s); run tax.requery_invoice(%s) to ask again', v_inv.polls + 1, coalesce(v_st, r->>'code'), v_inv.id),
             invoice_serial_no = coalesce(v_res->>'serialNo', a.invoice_serial_no),
             order_known = a.order_known or r->>'code' is distinct from 'E9500',
             polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
       where a.id = v_inv.id;
    end if;
  else
    -- 20 开票中, 21 签章中, 24 开票成功签章失败 (issued, not signed: never a new orderNo), or E9500 (not visible yet)
    -- the serial no. and "the platform knows this orderNo" are kept: a later E9500 then proves nothing
    update tax.invoice a set polls = a.polls + 1, invoice_serial_no = coalesce(v_res->>'serialNo', a.invoice_serial_no),
           order_known = a.order_known or r->>'code' is distinct from 'E9500',
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    if v_st = '24' and coalesce(v_res->>'serialNo', v_inv.invoice_serial_no) is not null and tax._reinvoice_supported() then
      v_n := coalesce((v_inv.tax_cloud_response->>'reinvoices')::integer, 0);
      -- the platform allows 20 per serial no. per day (E9613), and signing after a reInvoice takes a while:
      -- polls that still see 24 right after one must not spend the allowance, so one per minute at most
      if v_n < 20 and coalesce((v_inv.tax_cloud_response->>'reinvoice_at')::timestamptz < now() - interval '1 minute', true) then
        update tax.invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('reinvoices', v_n + 1, 'reinvoice_at', now())
         where a.id = v_inv.id;
        perform cloud.enqueue_message(v_cfg.endpoint, 'tax.reinvoice',
          jsonb_build_object('fpqqlsh', coalesce(v_res->>'serialNo', v_inv.invoice_serial_no), 'orderno', v_inv.order_no),
          'tax.invoice', v_inv.id::text);
      end if;
    end if;
    perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, tax._poll_delay_ms(v_inv.polls));
  end if;
end $$;

create or replace function tax.record_issue_failed(m cloud.outbox, e jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_why text := coalesce(e #>> '{response,describe}', e->>'error');
  v_inv tax.invoice;
begin
  select * into v_inv from tax.invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, e);
    return;
  end if;
  if tax._issue_refused(m, e) then
    update tax.invoice a
       set invoice_status = 'failed',
           error_code = coalesce(e #>> '{response,code}', e->>'error_class'),
           error_message = v_why,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
           updated_at = now()
     where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
    update tax.reversal q
       set status = 'failed', error_message = v_why, finished_at = now()
     where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
  else
    -- the platform may have it: never a new orderNo, only a query under the same one
    update tax.invoice a
       set invoice_status = 'failed', error_code = 'unknown_outcome',
           error_message = format('%s gave up (%s: %s); the platform may have issued it: run tax.requery_invoice(%s)',
                                  m.operation, e->>'error_class', v_why, a.id),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
           updated_at = now()
     where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
    -- the reversal stays under way (its lines stay blocked) until the outcome is known
    update tax.reversal q
       set error_message = format('outcome unknown (%s); run tax.requery_invoice(%s)', v_why, q.red_invoice_id)
     where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
  end if;
end $$;

create or replace function tax.record_issue_submitted(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv tax.invoice;
begin
  -- a failed invoice of unknown outcome still takes the answer (a replay of its submit, E9106)
  select * into v_inv from tax.invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, r);  -- the submit of an earlier orderNo: never books anything
    return;
  end if;
  update tax.invoice a
     set invoice_status = 'issuing',
         invoice_serial_no = coalesce(r #>> '{result,invoiceSerialNum}', a.invoice_serial_no),
         submitted_at = coalesce(a.submitted_at, now()),
         error_code = null, error_message = null,
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object('submit', r),
         updated_at = now()
   where a.id = m.aggregate_id::bigint and (a.invoice_status in ('pending', 'issuing') or tax._outcome_unknown(a))
  returning * into v_inv;
  if not found then
    return;
  end if;
  -- E9106: the platform has this orderNo already (an earlier attempt got through): query it by orderNo
  perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end,
                             (select first_poll_ms from tax.config));
end $$;

create or replace function tax.record_pdf(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_pdf  bytea := decode(r->>'content_base64', 'base64');
  v_max  integer := (select max_pdf_bytes from tax.config);
begin
  if v_pdf is null or substring(v_pdf from 1 for 5) <> '\x255044462d'::bytea or length(v_pdf) > v_max then
    update tax.invoice set error_code = 'pdf_refused',
           error_message = format('the PDF from %s was refused: not a PDF or over %s bytes', m.payload->>'url', v_max), updated_at = now()
     where id = m.aggregate_id::bigint;
    return;
  end if;
  insert into tax.attachment (invoice_id, file_name, content_type, content, sha256, byte_size, source_url)
  values (m.aggregate_id::bigint, coalesce(m.payload->>'invoice_no', m.aggregate_id) || '.pdf', 'application/pdf',
          v_pdf, encode(sha256(v_pdf), 'hex'), length(v_pdf), m.payload->>'url')
  on conflict (invoice_id, file_name) do nothing;
  update tax.invoice set error_code = null, error_message = null, updated_at = now()
   where id = m.aggregate_id::bigint and error_code in ('pdf_download', 'pdf_refused');
  -- the bytes live in tax.attachment now; the outbox keeps only the facts
  update cloud.outbox set response = r - 'content_base64' where request_id = m.request_id;
end $$;

create or replace function tax.record_pdf_failed(m cloud.outbox, e jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
begin
  update tax.invoice
     set error_code = 'pdf_download', error_message = format('PDF not stored (%s): %s', e->>'error_class', e->>'error'), updated_at = now()
   where id = m.aggregate_id::bigint;
end $$;

create or replace function tax.record_query_failed(m cloud.outbox, e jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv tax.invoice;
begin
  select * into v_inv from tax.invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, e);
    return;
  end if;
  -- a query that fails says nothing about the invoice: its outcome is unknown
  update tax.invoice a
     set invoice_status = 'failed', error_code = 'unknown_outcome',
         error_message = format('%s gave up (%s: %s); run tax.requery_invoice(%s) to ask again',
                                m.operation, e->>'error_class', coalesce(e #>> '{response,describe}', e->>'error'), a.id),
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
         updated_at = now()
   where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
  update tax.reversal q
     set error_message = format('outcome unknown; run tax.requery_invoice(%s)', q.red_invoice_id)
   where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
end $$;

create or replace function tax.record_red_confirm_status(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_form jsonb := coalesce(r #> '{result,list,0}', r #> '{result,0}');
  v_st   text := v_form->>'billStatus';
  v_inv  tax.invoice;
  v_n    integer;
  v_since timestamptz;
  v_id   uuid;
begin
  select * into v_inv from tax.invoice where id = m.aggregate_id::bigint for update;
  if not found or (v_inv.invoice_status <> 'issuing' and not tax._outcome_unknown(v_inv)) then
    return;
  end if;
  update tax.reversal set bill_status = coalesce(v_st, bill_status) where red_invoice_id = v_inv.id
  returning coalesce(form_submitted_at, requested_at) into v_since;
  if v_st in ('01', '04') and coalesce(v_form->>'invoiceSerialNum', '') <> '' then
    -- the bureau issued the red invoice: fetch it like any other (number, PDF)
    update tax.invoice a set invoice_serial_no = v_form->>'invoiceSerialNum', polls = 0, invoice_status = 'issuing', error_code = null, error_message = null,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    perform tax._enqueue_query(v_inv, 'serial', 0);
  elsif v_st in ('05', '06', '07', '08', '09', '10', '16') then
    -- a definite end of the form
    update tax.invoice a set invoice_status = 'failed', error_code = 'red_bill_' || v_st,
           error_message = format('red-confirmation form %s ended with status %s', v_form->>'billNo', v_st),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
    update tax.reversal set status = 'failed', finished_at = now(),
           error_message = format('red-confirmation form ended with status %s', v_st)
     where red_invoice_id = v_inv.id;
  elsif v_inv.invoice_status <> 'issuing' then
    -- a late non-final answer for a red invoice that gave up: kept; the operator's requery asks again
    update tax.invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
  elsif clock_timestamp() > coalesce(v_since, v_inv.created_at) + interval '73 hours' then
    -- the bureau voids a form nobody confirmed within 72 h (07); an hour's margin, then the reversal is given up
    update tax.invoice a set invoice_status = 'failed', error_code = 'red_deadline', polls = a.polls + 1,
           error_message = format('red-confirmation form %s still %s after 72 hours (buyer never confirmed); the bureau voids it: request a new reversal',
                                  coalesce(v_form->>'billNo', m.payload->>'billId'), coalesce(v_st, 'unknown')),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
    update tax.reversal set status = 'failed', finished_at = now(),
           error_message = format('no confirmation within 72 hours (form status %s)', coalesce(v_st, 'unknown'))
     where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  else
    update tax.invoice a set polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning polls into v_n;
    v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query', m.payload, 'tax.invoice', m.aggregate_id, null, null,
      clock_timestamp() + make_interval(secs => tax._poll_delay_ms(v_n) / 1000.0));
    update tax.invoice set next_query_id = v_id where id = v_inv.id;
  end if;
end $$;

create or replace function tax.record_red_confirm_submitted(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv tax.invoice;
  v_id  uuid;
begin
  update tax.invoice a set invoice_status = 'issuing', error_code = null, error_message = null,
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_confirm', r), updated_at = now()
   where a.id = m.aggregate_id::bigint and a.request_id = m.request_id and (a.invoice_status = 'pending' or tax._outcome_unknown(a))
  returning * into v_inv;
  if not found then
    return;
  end if;
  -- the 72-hour confirmation deadline counts from the form's creation (the first answer), not from the request
  update tax.reversal set status = 'confirming', error_message = null, form_submitted_at = coalesce(form_submitted_at, now())
   where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query',
    jsonb_build_object('identity', '0', 'billId', m.payload->>'billId'), 'tax.invoice', m.aggregate_id, null, null,
    clock_timestamp() + make_interval(secs => tax._poll_delay_ms(1) / 1000.0));
  update tax.invoice set next_query_id = v_id where id = v_inv.id;
end $$;

create or replace function tax.record_reinvoice_answer(m cloud.outbox, r jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
begin
  -- the result queries go on either way; the answer is kept for the operator
  update tax.invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('reinvoice', r), updated_at = now()
   where a.id = m.aggregate_id::bigint;
end $$;

create or replace function tax.reissue_invoice(p_invoice_id bigint) RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv  tax.invoice;
  v_cust erp.customer;
  v_cfg  tax.config;
  v_req  uuid := cloud.new_request_id();
begin
  select * into v_inv from tax.invoice where id = p_invoice_id for update;
  if not found or v_inv.invoice_status <> 'failed' or v_inv.invoice_type <> 'blue' or v_inv.error_code is null or tax._outcome_unknown(v_inv) then
    raise exception using errcode = 'EI018', message = format('invoice %s is not a blue invoice the platform refused (%s%s)', p_invoice_id,
                                                            coalesce(v_inv.invoice_status, 'no such invoice'), coalesce(', ' || v_inv.error_code, '')),
      hint = 'Only a blue invoice refused for certain (status 22, or a permanent error proving nothing was created) gets a new orderNo; one whose outcome is unknown (unknown_outcome, poll_limit) is asked again with tax.requery_invoice.';
  end if;
  -- the customer's current row in the reference ERP (transitional: the contract takes the corrected buyer from the caller)
  select c.* into v_cust from erp.customer c
   where c.id = (select coalesce(s.customer_id, sh.customer_id) from tax.invoice i
                   join tax.document d on d.id = i.document_id and d.source = 'reference-erp'
                   left join erp.settlement s on d.reference = 'settlement/' || s.settlement_no
                   left join erp.shipment sh on d.reference = 'shipment/' || sh.shipment_no
                  where i.id = p_invoice_id);
  v_cfg := tax._config();
  -- the corrected buyer (tax id, name) is checked again; a refused invoice needs a new orderNo
  -- the earlier orderNo's messages are retired: replay_message / replay_dead_messages can no longer send them
  -- (their attempts stay in cloud.log; an answer still in flight is kept as stale by the write-backs)
  delete from cloud.outbox o
   where o.aggregate_type = 'tax.invoice' and o.aggregate_id = p_invoice_id::text
     and o.operation in ('tax.issue', 'tax.query', 'tax.reinvoice') and o.status in ('pending', 'failed', 'dead', 'skipped');
  update tax.invoice
     set request_id = v_req, order_no = tax.order_no_for(v_req), invoice_status = 'pending', invoice_serial_no = null,
         submitted_at = null, order_known = false, next_query_id = null,
         buyer_name = v_cust.name, buyer_tax_id = nullif(v_cust.tax_id, ''),
         buyer_address = v_cust.address, buyer_phone = v_cust.phone, buyer_bank_name = v_cust.bank_name,
         buyer_account = v_cust.bank_account, buyer_email = v_cust.email,
         tax_id_warning = tax.validate_buyer(v_cust, v_inv.invoice_kind, format('invoice %s', p_invoice_id)),
         polls = 0, error_code = null, error_message = null,
         tax_cloud_response = jsonb_build_object('previous', v_inv.tax_cloud_response, 'previous_request_id', v_inv.request_id), updated_at = now()
   where id = p_invoice_id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(p_invoice_id), 'tax.invoice', p_invoice_id::text, null, v_req);
  return v_req;
end $$;

create or replace function tax.requery_invoice(p_invoice_id bigint) RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_inv  tax.invoice;
  v_bill text;
  v_id   uuid;
begin
  select * into v_inv from tax.invoice where id = p_invoice_id for update;
  if not found or not tax._outcome_unknown(v_inv) then
    raise exception using errcode = 'EI019', message = format('invoice %s is not waiting for a final answer (%s%s)', p_invoice_id,
                                                            coalesce(v_inv.invoice_status, 'no such invoice'), coalesce(', ' || v_inv.error_code, '')),
      hint = 'Only an invoice failed with error_code unknown_outcome or poll_limit can be queried again; one the platform refused is issued again with tax.reissue_invoice.';
  end if;
  update tax.invoice set invoice_status = 'issuing', polls = 0, error_code = null, error_message = null, updated_at = now()
   where id = p_invoice_id returning * into v_inv;
  if v_inv.invoice_type = 'red' and v_inv.invoice_serial_no is null then
    -- the red-confirmation form may or may not exist: read it back by its billId
    select bill_id into v_bill from tax.reversal where red_invoice_id = v_inv.id;
    v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query', jsonb_build_object('identity', '0', 'billId', v_bill),
                                  'tax.invoice', v_inv.id::text);
    update tax.invoice set next_query_id = v_id where id = v_inv.id;
    return v_id;
  end if;
  return tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, 0);
end $$;

create or replace function tax.tg_reversal__500_request() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
declare
  v_orig tax.invoice;
  v_cfg  tax.config;
  v_red  bigint;
  v_req  uuid := cloud.new_request_id();
  v_bad  integer;
  v_taken integer[];
  v_kinds text[];
begin
  select * into v_orig from tax.invoice where id = new.invoice_id for update;
  -- lines with an issued red invoice, or one under way (its outcome may be unknown)
  select coalesce(array_agg(distinct rl.line_no), '{}') into v_taken
    from tax.reversal q
    join tax.invoice_line rl on rl.invoice_id = q.red_invoice_id
   where q.invoice_id = new.invoice_id and q.id <> new.id and q.status in ('pending', 'confirming', 'issued');
  if v_orig.invoice_status = 'reversed' or (new.line_nos is null and cardinality(v_taken) > 0) or new.line_nos && v_taken then
    raise exception using errcode = 'EI016', message = format('invoice %s: line(s) %s already reversed or with a reversal under way', v_orig.invoice_no,
                                                            coalesce(array_to_string(array(select unnest(v_taken) intersect select unnest(coalesce(new.line_nos, v_taken)) order by 1), ', '), 'all')),
      hint = 'See tax.reversal for this invoice; reverse only the other lines (line_nos), a full reversal is possible only while no line is reversed.';
  end if;
  if v_orig.invoice_status not in ('issued', 'partially_reversed') or v_orig.invoice_type <> 'blue' then
    raise exception using errcode = 'EI013', message = format('invoice %s (%s) is not an issued blue invoice and cannot be reversed', new.invoice_id, v_orig.invoice_status),
      hint = 'Only issued invoices can be reversed; a failed one was never issued.';
  end if;
  if new.reason is null or new.reason not in ('1', '2', '3', '4') then
    raise exception using errcode = 'EI014', message = format('reversal reason %L is not 1–4', new.reason),
      hint = '1 销货退回, 2 开票有误, 3 服务中止, 4 销售折让 (Nuonuo''s numbering).';
  end if;
  select n into v_bad from unnest(new.line_nos) n
   where not exists (select from tax.invoice_line l where l.invoice_id = v_orig.id and l.line_no = n) limit 1;
  if v_bad is not null or cardinality(new.line_nos) = 0 then
    raise exception using errcode = 'EI015', message = format('reversal of invoice %s: line %s is not on the invoice', v_orig.invoice_no, coalesce(v_bad::text, '(none given)')),
      hint = 'line_nos lists tax.invoice_line.line_no values of the invoice; leave it null for a full reversal.';
  end if;
  -- 乐企 rule (reference §1.9): service-only lines cannot be 销货退回 (1), goods-only lines cannot be 服务中止 (3)
  select array_agg(distinct left(l.tax_code, 1)) into v_kinds from tax.invoice_line l
   where l.invoice_id = v_orig.id and (new.line_nos is null or l.line_no = any (new.line_nos));
  if (new.reason = '1' and v_kinds <@ array['3']) or (new.reason = '3' and v_kinds <@ array['1']) then
    raise exception using errcode = 'EI014',
      message = format('reversal reason %s (%s) does not fit the reversed lines, which are all %s', new.reason,
                       case new.reason when '1' then '销货退回' else '服务中止' end, case new.reason when '1' then 'services' else 'goods' end),
      hint = 'Services cannot be returned (use 3 服务中止, 2 开票有误 or 4 销售折让); goods cannot be a service stopped (use 1 销货退回, 2 or 4).';
  end if;
  v_cfg := tax._config();
  insert into tax.invoice (reversal_id, original_invoice_id, invoice_type, invoice_kind, request_id, order_no,
                           buyer_name, buyer_tax_id, buyer_address, buyer_phone, buyer_bank_name, buyer_account, buyer_email,
                           amount_excl_tax, tax_amount, amount_incl_tax, invoice_status)
  values (new.id, v_orig.id, 'red', v_orig.invoice_kind, v_req, tax.order_no_for(v_req),
          v_orig.buyer_name, v_orig.buyer_tax_id, v_orig.buyer_address, v_orig.buyer_phone, v_orig.buyer_bank_name, v_orig.buyer_account,
          v_orig.buyer_email, 0, 0, 0, 'pending')
  returning id into v_red;
  insert into tax.invoice_line (invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
  select v_red, l.line_no, l.source_line_no, l.item_name, l.tax_code, l.spec, l.unit, -l.quantity, l.unit_price,
         l.tax_rate, -l.amount_excl_tax, -l.tax_amount, -l.amount_incl_tax
    from tax.invoice_line l
   where l.invoice_id = v_orig.id and (new.line_nos is null or l.line_no = any (new.line_nos));
  update tax.invoice a set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
    from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from tax.invoice_line where invoice_id = v_red) t
   where a.id = v_red;
  update tax.reversal set red_invoice_id = v_red, bill_id = left(tax.order_no_for(v_req), 32) where id = new.id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.red_confirm', jsonb_strip_nulls(jsonb_build_object(
    'billId', tax.order_no_for(v_req),
    'blueInvoiceLine', case v_orig.invoice_kind when 'special' then 'bs' else 'pc' end,
    'applySource', '0',
    'blueElecInvoiceNumber', v_orig.invoice_no,
    'sellerTaxNo', v_cfg.seller_tax_id, 'sellerName', v_cfg.seller_name,
    'buyerTaxNo', v_orig.buyer_tax_id, 'buyerName', v_orig.buyer_name,
    'redReason', new.reason,
    'orderNo', tax.order_no_for(v_req),
    'autoInvoice', '1',
    'detail', case when new.line_nos is not null then (
       select jsonb_agg(jsonb_build_object('blueDetailIndex', l.line_no::text, 'goodsName', l.item_name, 'goodsCode', l.tax_code,
                                           'taxRate', tax.decimal_text(l.tax_rate), 'num', tax.decimal_text(l.quantity),
                                           'taxExcludedPrice', tax.decimal_text(round(-l.amount_excl_tax / nullif(-l.quantity, 0), 8)),
                                           'taxExcludedAmount', l.amount_excl_tax::text, 'taxAmount', l.tax_amount::text) order by l.line_no)
         from tax.invoice_line l where l.invoice_id = v_red) end)),
    'tax.invoice', v_red::text, null, v_req);
  return null;
end $$;

comment on function tax.build_invoice_payload(bigint) is 'The Tax_Invoice_Payload of one invoice: the requestBillingNew {"order": …} with the buyer (the invoice''s snapshot), the seller (tax.config), orderNo, the remark (the document''s, with " (n/m)" for a part) and the invoiceDetail lines (jsonb_agg).';
comment on function tax.issue_invoices(text, bigint) is 'Transitional (the reference ERP''s triggers call it until it hands its documents in through the contract): turns an approved settlement or posted shipment into a tax.document and its invoice(s): validates (buyer, lines, every text against tax.text_limit), splits by the limits and the 1.27 invoice tax tolerance, separates price and tax, keeps the buyer on each invoice, builds each payload and enqueues tax.issue in the caller''s transaction. EI008 when the tolerance needs more than max_parts invoices. Returns 0 when the customer is invoiced on the other event or the document (or its linked one) was invoiced already.';
comment on function tax.reissue_invoice(bigint) is 'Operator: issues a refused blue invoice again under a new orderNo, with the customer''s current name, tax id, address, phone, bank and email (read from the reference ERP''s erp.customer, transitional; the tax id checked again); the previous answers are kept under tax_cloud_response.previous, and the earlier orderNo''s unfinished messages are deleted so no replay can submit it again. EI018 when the refusal is not certain (unknown_outcome, poll_limit) or the invoice did not fail.';
comment on function tax.record_pdf(cloud.outbox, jsonb) is 'Write-back of tax.download_pdf: checks the %PDF magic and the size cap again, stores the PDF as the invoice''s tax.attachment with its sha256, and drops the bytes from the outbox row.';
comment on function tax.tg_reversal__500_request() is 'Trigger: a reversal request (tax.reversal) for an issued or partially reversed invoice is checked (EI013–EI016; lines already reversed or under way are refused; the reason must fit goods / services), becomes a red tax.invoice (negative lines, full or by line, the original''s buyer) and enqueues the 数电 red confirmation (saveInvoiceRedConfirm).';

-- 8. compatibility views for readers of an upgraded installation --------------

create view erp.ar_invoice with (security_invoker = true) as
  select i.id, s.id as settlement_id, h.id as shipment_id, i.original_invoice_id, i.part_no, i.part_count, i.invoice_type, i.invoice_kind,
         i.request_id, i.order_no, i.buyer_name, i.buyer_tax_id, i.invoice_serial_no, i.invoice_no, i.invoice_status, i.invoice_date,
         i.amount_excl_tax, i.tax_amount, i.amount_incl_tax, i.pdf_url, i.ofd_url, i.xml_url, i.polls, i.next_query_id, i.submitted_at,
         i.order_known, i.tax_cloud_response, i.tax_id_warning, i.error_code, i.error_message, i.created_at, i.updated_at
    from tax.invoice i
    left join tax.invoice o on o.id = i.original_invoice_id
    left join tax.document d on d.id = coalesce(i.document_id, o.document_id) and d.source = 'reference-erp'
    left join erp.settlement s on d.reference = 'settlement/' || s.settlement_no
    left join erp.shipment h on d.reference = 'shipment/' || h.shipment_no;
comment on view erp.ar_invoice is 'Compatibility view (read-only) for readers of an installation upgraded past release 0018: the invoices, which live in tax.invoice now, with the columns erp.ar_invoice had; settlement_id / shipment_id are derived from the document''s reference (tax.document), a red invoice''s from its original''s. Read tax.invoice and tax.document instead.';
grant select on erp.ar_invoice to erp_cloud_app, erp_cloud_operator;

create view erp.ar_invoice_line with (security_invoker = true) as
  select l.id, l.invoice_id as ar_invoice_id, l.line_no, l.source_line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price,
         l.tax_rate, l.amount_excl_tax, l.tax_amount, l.amount_incl_tax
    from tax.invoice_line l;
comment on view erp.ar_invoice_line is 'Compatibility view (read-only) for readers of an installation upgraded past release 0018: the invoice lines, which live in tax.invoice_line now, with the columns erp.ar_invoice_line had (ar_invoice_id is tax.invoice_line.invoice_id). Read tax.invoice_line instead.';
grant select on erp.ar_invoice_line to erp_cloud_app, erp_cloud_operator;

create view erp.invoice_reversal_request with (security_invoker = true) as
  select r.id, r.invoice_id as ar_invoice_id, r.reason, r.line_nos, r.status, r.bill_id, r.bill_status, r.red_invoice_id, r.error_message,
         r.requested_at, r.form_submitted_at, r.finished_at
    from tax.reversal r;
comment on view erp.invoice_reversal_request is 'Compatibility view (auto-updatable) for the reference ERP of an installation upgraded past release 0018: the reversal requests, which live in tax.reversal now, with the columns erp.invoice_reversal_request had (ar_invoice_id is tax.reversal.invoice_id). An insert of ar_invoice_id, reason and line_nos reaches tax.reversal and its trigger, as before. Replaced by the reversal contract (tax.enqueue_reversal).';
grant select on erp.invoice_reversal_request to erp_cloud_app, erp_cloud_operator;
grant insert (ar_invoice_id, reason, line_nos) on erp.invoice_reversal_request to erp_cloud_app;
