-- 0008 — supplier collaboration (issue 4): purchase orders out to the
-- procurement cloud (YonBIP 友云采), advance shipping notices (ASN, 发货单) back.
--
-- Adds the ERP's supplier, purchase order and ASN tables (schema erp), and in
-- schema scm: the PO payload builders and the deferred trigger that enqueues
-- publish / revise / close with one ordering key per PO; the write-back of the
-- cloud's reference, status and rejection reason; ONE ingest function for ASN
-- documents that all three inbound paths use (webhook push, pg_cron pull
-- through the adapter, postgres_fdw copy from the cloud's middle database);
-- row-level security for the supplier portal; a GIN-indexed ASN search.
--
-- Why a deferred trigger: a buyer edits a PO's header and lines in one
-- transaction; the payload is built once, at commit, from the final rows, and
-- a revision is only sent when the payload actually changed.
--
-- SQLSTATE registry (class ES; mirrored in listener/errors.ts):
--   ES001  purchase order status change not allowed
--   ES002  a purchase order needs at least one line to be approved
--   ES003  a closed or cancelled purchase order (or its lines) cannot change; a published one keeps its number and supplier
--   ES004  ASN document malformed (not stored: the sender must fix it)
--   ES005  shared-database (postgres_fdw) setup refused
--   ES006  invalid ASN pull setting
--   (ES007 unused: a portal submission for another supplier raises 42501, as RLS does)
--   ES008  unknown supplier (portal, shared login)
--   ES009  a purchase order that left draft cannot be deleted (cancel it)
--   ES017  an event id already used for another ASN (conflict)
--   ES018  a pushed event of a type not configured as an ASN event (kept in scm.asn_quarantine, never raised)
--   ES010..ES016 are ASN rejection reasons, stored on the ASN (asn_document.reject_code), never raised:
--   ES010  unknown supplier
--   ES011  unknown purchase order
--   ES012  the purchase order belongs to another supplier
--   ES013  an ASN line does not match a line of the purchase order
--   ES014  quantity not positive
--   ES015  quantity exceeds what is still open on the PO line
--   ES016  the purchase order is not open for deliveries (draft, closed or cancelled)

create schema if not exists erp;
comment on schema erp is 'The ERP''s own documents (the reference model erp-cloud reacts to): customers, settlements, shipments, invoices, suppliers, purchase orders, ASNs, users.';

create schema scm;
comment on schema scm is 'Supplier collaboration: PO payloads and write-back, ASN ingestion (push, pull, shared database), supplier-portal isolation, ASN search.';
revoke all on schema scm from public;

do $$
begin
  if not exists (select from pg_catalog.pg_roles where rolname = 'erp_cloud_supplier_portal') then
    create role erp_cloud_supplier_portal nologin;
    comment on role erp_cloud_supplier_portal is 'The supplier portal: sees and writes only the supplier named by the transaction-local setting scm.supplier_id (row-level security).';
  end if;
exception when duplicate_object or unique_violation then null;
end $$;

grant usage on schema erp to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;
grant usage on schema scm to erp_cloud_app, erp_cloud_listener, erp_cloud_operator, erp_cloud_supplier_portal;

------------------------------------------------------------------------------
-- The ERP's tables
------------------------------------------------------------------------------
create table erp.supplier (
  id        bigint generated always as identity primary key,
  code      text not null unique,
  name      text not null,
  tax_id    text,
  cloud_id  text,
  created_at timestamptz not null default now(),
  constraint supplier_code_is_simple check (code ~ '^[A-Za-z0-9_.-]{1,64}$')
);
comment on table erp.supplier is 'Suppliers. code is the key the procurement cloud and ASNs use; cloud_id is the supplier''s id in the cloud, when known.';

create table erp.purchase_order (
  id           bigint generated always as identity primary key,
  po_no        text not null unique,
  supplier_id  bigint not null references erp.supplier (id),
  status       text not null default 'draft',
  currency     text not null default 'CNY',
  order_date   date not null default current_date,
  purchase_org text,
  note         text,
  supplier_confirmed_at timestamptz,
  cloud_status text,
  cloud_ref    text,
  cloud_error  text,
  cloud_revision integer,
  cloud_payload_hash text,
  cloud_synced_at timestamptz,
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  constraint purchase_order_status_known check (status in ('draft', 'approved', 'changed', 'closed', 'cancelled')),
  constraint purchase_order_currency_iso check (currency ~ '^[A-Z]{3}$')
);
comment on table erp.purchase_order is 'Purchase orders. Approving one publishes it to the procurement cloud; later changes follow as revisions, closing or cancelling as a close. cloud_* columns are written back by the delivery engine.';
comment on column erp.purchase_order.status is 'draft → approved → changed (edited after approval) → closed | cancelled. Only approved / changed / closed / cancelled orders reach the cloud.';
comment on column erp.purchase_order.cloud_status is 'queued / published / revised / closed (the cloud confirmed), rejected (the cloud refused: see cloud_error), undeliverable (retries exhausted).';
comment on column erp.purchase_order.cloud_revision is 'How many messages about this PO went to the outbox, minus one: 0 is the publication, 1.. the revisions.';
comment on column erp.purchase_order.cloud_payload_hash is 'md5 of the last payload enqueued: a revision is sent only when the payload changes.';
create index purchase_order_supplier on erp.purchase_order (supplier_id);

create table erp.purchase_order_line (
  id            bigint generated always as identity primary key,
  po_id         bigint not null references erp.purchase_order (id) on delete cascade,
  line_no       integer not null,
  material_code text not null,
  material_name text not null,
  quantity      numeric(18, 4) not null,
  unit          text not null default 'PCS',
  price         numeric(18, 6) not null,
  tax_rate      numeric(5, 4) not null default 0.13,
  delivery_date date,
  unique (po_id, line_no),
  constraint purchase_order_line_quantity_positive check (quantity > 0),
  constraint purchase_order_line_price_not_negative check (price >= 0),
  constraint purchase_order_line_tax_rate_fraction check (tax_rate >= 0 and tax_rate < 1)
);
comment on table erp.purchase_order_line is 'Purchase order lines: price excludes tax, tax_rate is a fraction (0.13 = 13 %).';

create table erp.asn_document (
  id             bigint generated always as identity primary key,
  asn_no         text not null,
  supplier_code  text not null,
  supplier_id    bigint references erp.supplier (id),
  po_no          text,
  po_id          bigint references erp.purchase_order (id),
  ship_date      date,
  eta            date,
  carrier        text,
  tracking_no    text,
  status         text not null,
  reject_code    text,
  reject_reason  text,
  detail         jsonb not null,
  source         text not null,
  cloud_event_id text unique,
  received_at    timestamptz not null default now(),
  unique (supplier_code, asn_no),
  constraint asn_document_status_known check (status in ('accepted', 'rejected')),
  constraint asn_document_rejection_has_reason check ((status = 'rejected') = (reject_code is not null and reject_reason is not null)),
  constraint asn_document_source_known check (source in ('push', 'pull', 'shared_db', 'portal')),
  constraint asn_document_detail_object check (jsonb_typeof(detail) = 'object')
);
comment on table erp.asn_document is 'Advance shipping notices (发货单) from suppliers, written only by scm.ingest_asn. Rejected ones are kept with reject_code (ES010..ES016) and reject_reason; detail is the original document as received.';
comment on column erp.asn_document.source is 'How it arrived: push (webhook), pull (delivery list fetched by the listener), shared_db (postgres_fdw copy), portal (scm.submit_asn).';
create index asn_document_po on erp.asn_document (po_id);
create index asn_document_supplier on erp.asn_document (supplier_id);
-- jsonb_path_ops on purpose: the search is containment (@>) only, and this
-- operator class indexes one hash per path-to-value, so the index is a
-- fraction of jsonb_ops' size and a lookup on {material, batchNo} inside the
-- details array needs no key-only entries. It cannot serve ?, ?| or ?&, which
-- nothing here uses. fastupdate off: ASNs arrive a few at a time, so writing
-- straight into the index costs little, while a pending list would be scanned
-- by every search until vacuum merges it (and makes the planner skip the
-- index on a freshly filled table: measured, seq scan until VACUUM).
create index asn_document_detail on erp.asn_document using gin (detail jsonb_path_ops) with (fastupdate = off);

create table erp.asn_line (
  id              bigint generated always as identity primary key,
  asn_id          bigint not null references erp.asn_document (id) on delete cascade,
  line_no         integer not null,
  po_line_no      integer not null,
  material_code   text not null,
  batch_no        text,
  quantity        numeric(18, 4) not null,
  production_date date,
  unique (asn_id, line_no)
);
comment on table erp.asn_line is 'ASN lines: which PO line is shipped, how much, which batch.';

------------------------------------------------------------------------------
-- PO: validation, payloads, enqueue
------------------------------------------------------------------------------
create function erp.tg_purchase_order__100_validate() returns trigger
language plpgsql as $$
begin
  if tg_op = 'UPDATE' and new.status is distinct from old.status and not (
       (old.status = 'draft' and new.status in ('approved', 'cancelled'))
    or (old.status in ('approved', 'changed') and new.status in ('approved', 'changed', 'closed', 'cancelled'))) then
    raise exception using errcode = 'ES001',
      message = format('purchase order %s cannot go from %s to %s', new.po_no, old.status, new.status),
      hint = 'Drafts are approved or cancelled; approved orders are changed, closed or cancelled; closed and cancelled orders are final (create a new order).';
  end if;
  if tg_op = 'INSERT' and new.status not in ('draft', 'approved') then
    raise exception using errcode = 'ES001', message = format('purchase order %s cannot be created as %s', new.po_no, new.status),
      hint = 'Create it as draft (or approved), then change its status.';
  end if;
  if tg_op = 'UPDATE' and old.status in ('closed', 'cancelled') and
     (new.supplier_id, new.currency, new.order_date, new.po_no) is distinct from (old.supplier_id, old.currency, old.order_date, old.po_no) then
    raise exception using errcode = 'ES003', message = format('purchase order %s is %s and cannot change', old.po_no, old.status),
      hint = 'Create a new purchase order.';
  end if;
  if tg_op = 'UPDATE' and old.cloud_revision is not null and
     (new.po_no, new.supplier_id) is distinct from (old.po_no, old.supplier_id) then
    raise exception using errcode = 'ES003',
      message = format('purchase order %s was published to the procurement cloud: its number and supplier cannot change', old.po_no),
      hint = 'Cancel it (the cloud gets a close) and create a new purchase order for the other number or supplier.';
  end if;
  new.updated_at := now();
  return new;
end $$;
comment on function erp.tg_purchase_order__100_validate is 'Trigger: allowed status changes (ES001), closed and cancelled orders are final, a published order keeps its number and supplier (ES003).';
create trigger purchase_order_100_validate before insert or update on erp.purchase_order
  for each row execute function erp.tg_purchase_order__100_validate();

create function erp.tg_purchase_order__100_refuse_delete() returns trigger
language plpgsql as $$
begin
  if old.status <> 'draft' or old.cloud_revision is not null then
    raise exception using errcode = 'ES009',
      message = format('purchase order %s is %s and cannot be deleted', old.po_no, old.status),
      hint = 'Only drafts are deleted. Cancel an approved order instead: the procurement cloud then gets a close.';
  end if;
  return old;
end $$;
comment on function erp.tg_purchase_order__100_refuse_delete is 'Trigger: only drafts that never reached the cloud can be deleted (ES009); others are cancelled, so the cloud hears of it.';
create trigger purchase_order_100_refuse_delete before delete on erp.purchase_order
  for each row execute function erp.tg_purchase_order__100_refuse_delete();

create function erp.tg_purchase_order_line__100_validate() returns trigger
language plpgsql as $$
declare
  v_po_id bigint := case when tg_op = 'DELETE' then old.po_id else new.po_id end;
  v_status text;
  v_po_no text;
begin
  select status, po_no into v_status, v_po_no from erp.purchase_order where id = v_po_id;
  if v_status in ('closed', 'cancelled') then
    raise exception using errcode = 'ES003', message = format('purchase order %s is %s: its lines cannot change', v_po_no, v_status),
      hint = 'Create a new purchase order.';
  end if;
  return case when tg_op = 'DELETE' then old else new end;
end $$;
comment on function erp.tg_purchase_order_line__100_validate is 'Trigger: lines of closed or cancelled orders are final (ES003).';
create trigger purchase_order_line_100_validate before insert or update or delete on erp.purchase_order_line
  for each row execute function erp.tg_purchase_order_line__100_validate();

create function scm.build_po_publish_payload(
  p_po_id bigint  -- erp.purchase_order.id
) returns jsonb
language sql stable as $$
  select jsonb_build_object(
    'supplydatas', jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
       'code', s.code, 'name', s.name, 'taxNo', s.tax_id, 'supplierId', s.cloud_id))),
    'orderdatas', jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
       'orderno', po.po_no, 'supplierCode', s.code, 'currencyCode', po.currency,
       'orderDate', to_char(po.order_date, 'YYYY-MM-DD'), 'purchaseOrg', po.purchase_org, 'memo', po.note,
       'totalMoney', (select sum(round(l.quantity * l.price * (1 + l.tax_rate), 2)) from erp.purchase_order_line l where l.po_id = po.id)))),
    'itemdatas', coalesce((
       select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                'orderno', po.po_no, 'lineNum', l.line_no, 'materialCode', l.material_code, 'productName', l.material_name,
                'purchaseNum', l.quantity, 'unit', l.unit, 'price', l.price,
                'taxPrice', round(l.price * (1 + l.tax_rate), 6), 'taxrate', round(l.tax_rate * 100, 2),
                'reqDate', to_char(l.delivery_date, 'YYYY-MM-DD'))) order by l.line_no)
         from erp.purchase_order_line l where l.po_id = po.id), '[]'::jsonb))
  from erp.purchase_order po join erp.supplier s on s.id = po.supplier_id
  where po.id = p_po_id
$$;
comment on function scm.build_po_publish_payload is 'The 发布采购订单 (pubOrderToYC) payload of a PO: supplydatas, orderdatas, itemdatas as JSON arrays (the adapter packs each array into a string, as the API wants). Revisions use the same shape.';

create function scm.build_po_close_payload(
  p_po_id bigint  -- erp.purchase_order.id
) returns jsonb
language sql stable as $$
  select jsonb_build_object('orderdatas', jsonb_build_array(jsonb_build_object(
           'orderno', po.po_no, 'supplierCode', s.code,
           'closeReason', case po.status when 'cancelled' then 'cancelled in the ERP' else 'closed in the ERP' end)))
    from erp.purchase_order po join erp.supplier s on s.id = po.supplier_id
   where po.id = p_po_id
$$;
comment on function scm.build_po_close_payload is 'The 整单关闭 (finalCloseOrderToYC) payload of a closed or cancelled PO.';

create function scm._sync_purchase_order(
  p_po_id bigint  -- erp.purchase_order.id
) returns void
language plpgsql security definer set search_path = '' as $$
declare
  po erp.purchase_order;
  v_payload jsonb;
  v_hash text;
  v_operation text;
  v_endpoint text;
begin
  select * into po from erp.purchase_order where id = p_po_id for update;
  if not found or po.status = 'draft' then
    return;
  end if;
  if po.status in ('closed', 'cancelled') then
    if po.cloud_revision is null or po.cloud_payload_hash = 'closed' then
      return;  -- never published, or the close is already on its way
    end if;
    v_operation := 'scm.po_close';
    v_payload := scm.build_po_close_payload(po.id);
    v_hash := 'closed';
  else
    v_payload := scm.build_po_publish_payload(po.id);
    v_hash := pg_catalog.md5(v_payload::text);
    if v_hash is not distinct from po.cloud_payload_hash then
      return;  -- nothing the cloud would see has changed (e.g. a write-back, a supplier confirmation)
    end if;
    if pg_catalog.jsonb_array_length(v_payload -> 'itemdatas') = 0 then
      raise exception using errcode = 'ES002', message = format('purchase order %s has no lines', po.po_no),
        hint = 'Add at least one line before approving it.';
    end if;
    v_operation := case when po.cloud_revision is null then 'scm.po_publish' else 'scm.po_revise' end;
    v_payload := v_payload || jsonb_build_object('revision', coalesce(po.cloud_revision + 1, 0));
  end if;
  v_endpoint := scm._po_endpoint();
  perform cloud.enqueue_message(v_endpoint, v_operation, v_payload, 'erp.purchase_order', po.id::text,
                                'erp.purchase_order:' || po.id);
  update erp.purchase_order
     set cloud_revision = coalesce(cloud_revision + 1, 0), cloud_payload_hash = v_hash, cloud_status = 'queued', cloud_error = null
   where id = po.id;
end $$;
comment on function scm._sync_purchase_order is 'Internal: at commit, enqueues what the cloud has not seen of a PO (publish, revise when the payload changed, close), ordered by the key erp.purchase_order:<id>.';

create table scm.setting (
  name  text primary key,
  value text not null
);
comment on table scm.setting is 'Supplier-collaboration settings: po_endpoint (the cloud.endpoint POs go to, default yonbip).';
insert into scm.setting values ('po_endpoint', 'yonbip');

create function scm._po_endpoint() returns text
language sql stable security definer set search_path = '' as $$
  select coalesce((select value from scm.setting where name = 'po_endpoint'), 'yonbip')
$$;
comment on function scm._po_endpoint is 'Internal: the endpoint purchase orders are published to.';

create function scm.put_po_endpoint(
  p_endpoint text  -- a cloud.endpoint name (provider yonbip)
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  if not exists (select from cloud.endpoint where name = p_endpoint) then
    perform cloud._raise_unknown_endpoint(p_endpoint);
  end if;
  insert into scm.setting values ('po_endpoint', p_endpoint) on conflict (name) do update set value = excluded.value;
end $$;
comment on function scm.put_po_endpoint is 'Chooses the endpoint approved purchase orders are published to (EC001 when it does not exist).';

create function erp.tg_purchase_order__500_enqueue() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  perform scm._sync_purchase_order(case when tg_op = 'DELETE' then old.po_id else new.po_id end);
  return null;
end $$;
comment on function erp.tg_purchase_order__500_enqueue is 'Deferred trigger on PO lines: at commit, send the cloud what changed.';

create function erp.tg_purchase_order__500_enqueue_header() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  perform scm._sync_purchase_order(new.id);
  return null;
end $$;
comment on function erp.tg_purchase_order__500_enqueue_header is 'Deferred trigger on POs: at commit, send the cloud what changed.';

create constraint trigger purchase_order_500_enqueue after insert or update on erp.purchase_order
  deferrable initially deferred for each row execute function erp.tg_purchase_order__500_enqueue_header();
create constraint trigger purchase_order_line_500_enqueue after insert or update or delete on erp.purchase_order_line
  deferrable initially deferred for each row execute function erp.tg_purchase_order__500_enqueue();

------------------------------------------------------------------------------
-- PO write-back (run by the delivery engine in the completing transaction)
------------------------------------------------------------------------------
create function scm.record_po_delivered(
  p_msg      cloud.outbox,  -- the message, as sent
  p_response jsonb          -- the cloud's answer: {"code":"200","data":{...}}
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  update erp.purchase_order
     set cloud_status = case
           -- a later message of this PO (a revision, the close) is still on its way: the PO is not yet as the cloud has it
           when exists (select from cloud.outbox o where o.ordering_key = p_msg.ordering_key and o.id > p_msg.id
                           and o.status in ('pending', 'in_flight')) then 'queued'
           when p_msg.operation = 'scm.po_publish' then 'published'
           when p_msg.operation = 'scm.po_revise' then 'revised' else 'closed' end,
         cloud_ref = coalesce(p_response #>> '{data,orderId}', p_response #>> '{data,id}', cloud_ref),
         cloud_error = null,
         cloud_synced_at = pg_catalog.now()
   where id = p_msg.aggregate_id::bigint;
end $$;
comment on function scm.record_po_delivered is 'Write-back: the cloud accepted a publish / revision / close; records its order id and status on the PO (status stays queued while a later message of the PO is pending).';

create function scm.record_po_refused(
  p_msg   cloud.outbox,  -- the message, failed or dead
  p_error jsonb          -- {status, error, error_class, http_status, response}
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  update erp.purchase_order
     set cloud_status = case when p_error ->> 'status' = 'dead' then 'undeliverable' else 'rejected' end,
         cloud_error = left(coalesce(p_error #>> '{response,message}', p_error ->> 'error', 'unknown error'), 1000),
         cloud_synced_at = pg_catalog.now()
   where id = p_msg.aggregate_id::bigint;
end $$;
comment on function scm.record_po_refused is 'Write-back: the cloud refused a PO message (or retries ran out); records the reason on the PO for the buyer.';

select cloud.put_operation_handler('scm.po_publish', 'scm.record_po_delivered(cloud.outbox, jsonb)', 'scm.record_po_refused(cloud.outbox, jsonb)');
select cloud.put_operation_handler('scm.po_revise', 'scm.record_po_delivered(cloud.outbox, jsonb)', 'scm.record_po_refused(cloud.outbox, jsonb)');
select cloud.put_operation_handler('scm.po_close', 'scm.record_po_delivered(cloud.outbox, jsonb)', 'scm.record_po_refused(cloud.outbox, jsonb)');

------------------------------------------------------------------------------
-- ASN ingest: the one door for push, pull and the shared database
------------------------------------------------------------------------------
create type scm.asn_ingest_result as (
  asn_id      bigint,
  asn_no      text,
  status      text,   -- accepted | rejected | duplicate | not_shipped | quarantined
  reject_code text,
  reason      text
);
comment on type scm.asn_ingest_result is 'What scm.ingest_asn did with a document: accepted, rejected (kept, with the reason), duplicate (changed nothing), quarantined (scm.ingest_pushed_event only: kept in scm.asn_quarantine) or not_shipped (a delivery status that is no shipment: 0 待发布, 4 拒签, 9 正在发布, 10 发布失败; nothing stored).';

create function scm._malformed_asn(
  p_what  text,  -- what is wrong, for the message
  p_field text   -- the field, as a JSON path (e.g. details[2].lineno), for the DETAIL
) returns void
language plpgsql as $$
begin
  raise exception using errcode = 'ES004', message = 'ASN document is malformed: ' || p_what,
    detail = 'field: ' || p_field,
    hint = 'The sender must send a JSON object with code, supplier and a non-empty details array (lineno, orderCode, orderDetailId, material, purchaseNum per line, as 发货单保存 defines them); nothing was stored.';
end $$;
comment on function scm._malformed_asn is 'Internal: raises ES004 naming what is wrong with an ASN document, and the field in the DETAIL.';

create function scm._is_date(p_text text) returns boolean
language plpgsql immutable as $$
begin
  if p_text is null or p_text !~ '^\d{4}-\d{2}-\d{2}' then
    return false;
  end if;
  perform left(p_text, 10)::date;
  return true;
exception when others then
  return false;
end $$;
comment on function scm._is_date is 'Internal: whether a text starts with a real yyyy-MM-dd date.';

create function scm._check_asn_shape(
  p_doc jsonb  -- the ASN document
) returns void
language plpgsql as $$
declare
  d jsonb;
  i integer := 0;
  v_linenos text[] := '{}';
begin
  if p_doc is null or jsonb_typeof(p_doc) <> 'object' then
    perform scm._malformed_asn('not a JSON object', '$');
  end if;
  if coalesce(p_doc ->> 'code', '') !~ '^[^\s].{0,63}$' then
    perform scm._malformed_asn('code (the ASN number) is missing or longer than 64 characters', 'code');
  end if;
  if coalesce(p_doc ->> 'supplier', '') = '' or jsonb_typeof(p_doc -> 'supplier') not in ('string', 'number') then
    perform scm._malformed_asn('supplier (the supplier code) is missing', 'supplier');
  end if;
  if jsonb_typeof(p_doc -> 'details') is distinct from 'array' or jsonb_array_length(p_doc -> 'details') = 0 then
    perform scm._malformed_asn('details must be a non-empty array', 'details');
  end if;
  for d in select value from jsonb_array_elements(p_doc -> 'details') loop
    i := i + 1;
    if jsonb_typeof(d) <> 'object' then
      perform scm._malformed_asn(format('details[%s] is not an object', i), format('details[%s]', i));
    elsif coalesce(d ->> 'orderCode', '') = '' then
      perform scm._malformed_asn(format('details[%s] needs orderCode (the purchase order number)', i), format('details[%s].orderCode', i));
    elsif coalesce(d ->> 'material', '') = '' then
      perform scm._malformed_asn(format('details[%s] needs material', i), format('details[%s].material', i));
    elsif coalesce(d ->> 'orderDetailId', '') !~ '^[0-9]{1,9}$' then
      perform scm._malformed_asn(format('details[%s].orderDetailId must be the purchase order line number', i), format('details[%s].orderDetailId', i));
    elsif d ? 'lineno' and coalesce(d ->> 'lineno', '') !~ '^[0-9]{1,9}$' then
      perform scm._malformed_asn(format('details[%s].lineno must be a line number', i), format('details[%s].lineno', i));
    elsif (d ->> 'lineno') = any (v_linenos) then
      perform scm._malformed_asn(format('details[%s].lineno %s is used twice', i, d ->> 'lineno'), format('details[%s].lineno', i));
    elsif coalesce(d ->> 'purchaseNum', '') !~ '^-?[0-9]{1,14}(\.[0-9]{1,4})?$' then
      perform scm._malformed_asn(format('details[%s].purchaseNum must be a number with at most 4 decimals', i), format('details[%s].purchaseNum', i));
    elsif d ? 'productionDate' and not scm._is_date(d ->> 'productionDate') then
      perform scm._malformed_asn(format('details[%s].productionDate must be yyyy-MM-dd', i), format('details[%s].productionDate', i));
    elsif d ? 'planArrivalDate' and not scm._is_date(d ->> 'planArrivalDate') then
      perform scm._malformed_asn(format('details[%s].planArrivalDate must be yyyy-MM-dd', i), format('details[%s].planArrivalDate', i));
    end if;
    -- an implicit line number (its position) must not collide with an explicit one either
    v_linenos := v_linenos || coalesce(d ->> 'lineno', i::text);
  end loop;
  if (select count(*) <> count(distinct x::integer) from unnest(v_linenos) x) then
    perform scm._malformed_asn('details: a lineno repeats a line''s position', 'details[].lineno');
  end if;
  if p_doc ? 'deliveryDate' and not scm._is_date(p_doc ->> 'deliveryDate') then
    perform scm._malformed_asn('deliveryDate must be yyyy-MM-dd', 'deliveryDate');
  end if;
  if p_doc ? 'planArrivalDate' and not scm._is_date(p_doc ->> 'planArrivalDate') then
    perform scm._malformed_asn('planArrivalDate must be yyyy-MM-dd', 'planArrivalDate');
  end if;
end $$;
comment on function scm._check_asn_shape is 'Internal: ES004 (DETAIL names the field) unless the ASN has the fields ingest needs, in usable formats: code, supplier, details[] with orderCode, orderDetailId, material, purchaseNum, unique lineno, real dates.';

create function scm._is_shipment(
  p_doc jsonb  -- the ASN document
) returns boolean
language sql immutable as $$
  -- 发货单 status: 0 待发布, 4 拒签, 9 正在发布, 10 发布失败 are not (or no longer) shipments; no status: a push of a shipment
  select coalesce(p_doc ->> 'status', '') not in ('0', '4', '9', '10')
$$;
comment on function scm._is_shipment is 'Internal: whether an ASN''s delivery status (reference 4.4) is a shipment: everything but 0 待发布, 4 拒签, 9 正在发布, 10 发布失败.';

create table scm.asn_quarantine (
  id          bigint generated always as identity primary key,
  source      text not null,
  event_id    text,
  doc         jsonb,
  sqlstate    text not null,
  reason      text not null,
  received_at timestamptz not null default now(),
  doc_md5     text generated always as (md5(coalesce(doc::text, ''))) stored,
  unique (source, doc_md5)
);
comment on table scm.asn_quarantine is 'ASN records the pull, the shared-database copy and the YonBIP event push (source yonbip_event: also events of a type not configured as an ASN, ES018) could not ingest (ES004 malformed, ES017 event conflict, bad data), kept as received with the reason so the watermark moves on and nothing is lost. An operator fixes the sender and re-ingests with scm.ingest_asn(doc, source, event_id).';

create function scm._quarantine_asn(
  p_doc      jsonb,  -- the record as received
  p_source   text,   -- pull | shared_db
  p_event_id text,   -- its event id, if any
  p_sqlstate text,   -- why ingest refused it
  p_reason   text
) returns void
language sql as $$
  insert into scm.asn_quarantine (source, event_id, doc, sqlstate, reason)
  values (p_source, p_event_id, p_doc, p_sqlstate, left(p_reason, 2000))
  on conflict (source, doc_md5) do update set reason = excluded.reason, sqlstate = excluded.sqlstate, received_at = excluded.received_at
$$;
comment on function scm._quarantine_asn is 'Internal: keeps a record ingest refused in scm.asn_quarantine (once per source and document).';

create unique index asn_quarantine_pushed_event on scm.asn_quarantine (event_id, md5(coalesce(doc -> 'content', doc)::text))
  where source = 'yonbip_event' and event_id is not null;
comment on index scm.asn_quarantine_pushed_event is 'A pushed event is kept once per eventId and content, however often the cloud retries it (a retry may carry another timestamp inside); another ASN under a reused eventId gets its own row.';

create function scm.quarantine_pushed_event(
  p_event    jsonb,  -- the event as it arrived (decrypted): eventId, type, content; or the message text when it is not JSON
  p_event_id text,   -- its eventId, when it has one
  p_sqlstate text,   -- why it was not ingested: ES004 malformed, ES017 event conflict, ES018 not an ASN event type, or the ingest error
  p_reason   text    -- one line for the operator
) returns void
language plpgsql security definer set search_path = '' as $$
begin
  if p_event is null or p_sqlstate is null or p_sqlstate !~ '^[0-9A-Z]{5}$' then
    raise exception using errcode = 'ES004', message = format('a pushed event is kept only with the event and a SQLSTATE, not %s', coalesce(p_sqlstate, 'NULL')),
      hint = 'Pass the decrypted event and the SQLSTATE of why it was not ingested.';
  end if;
  if p_event_id is null then
    insert into scm.asn_quarantine (source, event_id, doc, sqlstate, reason)
    values ('yonbip_event', null, p_event, p_sqlstate, left(coalesce(p_reason, ''), 2000))
    on conflict do nothing;  -- the same message again (source, doc_md5)
  else
    -- a retry of the same event (same id and content) updates the one row with the latest reason
    insert into scm.asn_quarantine (source, event_id, doc, sqlstate, reason)
    values ('yonbip_event', p_event_id, p_event, p_sqlstate, left(coalesce(p_reason, ''), 2000))
    on conflict (event_id, md5(coalesce(doc -> 'content', doc)::text)) where source = 'yonbip_event' and event_id is not null
    do update set sqlstate = excluded.sqlstate, reason = excluded.reason, received_at = excluded.received_at;
  end if;
end $$;
comment on function scm.quarantine_pushed_event is 'For the YonBIP event receiver: keeps an authentic pushed event it could not ingest (ES004 malformed, ES017 event conflict, ES018 an event type not configured as an ASN, a data error) in scm.asn_quarantine, once per eventId and content (a retry updates the reason), so the cloud can be answered success without the event being lost.';

create function scm.ingest_pushed_event(
  p_event    jsonb,  -- the whole event as it arrived (kept if the ASN cannot be ingested)
  p_asn      jsonb,  -- the ASN document it carries
  p_event_id text    -- its eventId (deduplication)
) returns scm.asn_ingest_result
language plpgsql security definer set search_path = '' as $$
declare
  v_detail text;
begin
  return scm.ingest_asn(p_asn, 'push', p_event_id);
exception when sqlstate 'ES004' or sqlstate 'ES017' or data_exception or integrity_constraint_violation then
  -- retrying cannot fix these: keep the event for an operator instead of refusing it until the cloud gives up
  get stacked diagnostics v_detail = pg_exception_detail;
  perform scm.quarantine_pushed_event(p_event, p_event_id, sqlstate, sqlerrm || coalesce(' (' || nullif(v_detail, '') || ')', ''));
  return (null, p_asn ->> 'code', 'quarantined', sqlstate, sqlerrm)::scm.asn_ingest_result;
end $$;
comment on function scm.ingest_pushed_event is 'For the YonBIP event receiver: scm.ingest_asn (source push) for the ASN an event carries; what ingest refuses for good (ES004, ES017, a data or constraint error) is kept with the event in scm.asn_quarantine and reported as status quarantined. A lock timeout is raised, so the cloud retries.';

create function scm._asn_rejection(
  p_doc      jsonb,                  -- the ASN document (shape already checked)
  p_supplier erp.supplier,           -- the supplier it names, or null when unknown
  p_po       erp.purchase_order      -- the PO its lines name (locked), or null when unknown
) returns text[]
language plpgsql stable as $$
declare
  d jsonb;
  v_line erp.purchase_order_line;
  v_qty numeric;
  v_open numeric;
  t record;
begin
  if p_supplier.id is null then
    return array['ES010', format('supplier %s is not known to the ERP', p_doc ->> 'supplier')];
  end if;
  if (select count(distinct value ->> 'orderCode') from jsonb_array_elements(p_doc -> 'details')) > 1 then
    return array['ES013', 'the lines name more than one purchase order: send one ASN per order'];
  end if;
  if p_po.id is null then
    return array['ES011', format('purchase order %s does not exist', p_doc #>> '{details,0,orderCode}')];
  end if;
  if p_po.supplier_id <> p_supplier.id then
    return array['ES012', format('purchase order %s belongs to another supplier', p_po.po_no)];
  end if;
  if p_po.status not in ('approved', 'changed') then
    return array['ES016', format('purchase order %s is %s and takes no deliveries', p_po.po_no, p_po.status)];
  end if;
  for d in select value from jsonb_array_elements(p_doc -> 'details') loop
    select * into v_line from erp.purchase_order_line l where l.po_id = p_po.id and l.line_no = (d ->> 'orderDetailId')::integer;
    if not found then
      return array['ES013', format('purchase order %s has no line %s', p_po.po_no, d ->> 'orderDetailId')];
    elsif v_line.material_code <> d ->> 'material' then
      return array['ES013', format('line %s of %s is material %s, not %s', v_line.line_no, p_po.po_no, v_line.material_code, d ->> 'material')];
    end if;
    v_qty := (d ->> 'purchaseNum')::numeric;
    if v_qty <= 0 then
      return array['ES014', format('line %s of %s: quantity %s is not positive', v_line.line_no, p_po.po_no, v_qty)];
    end if;
  end loop;
  -- per PO line, everything this ASN ships (a line may be split over batches) against what is still open
  for t in select (value ->> 'orderDetailId')::integer as line_no, sum((value ->> 'purchaseNum')::numeric) as qty
             from jsonb_array_elements(p_doc -> 'details') group by 1 order by 1 loop
    select l.quantity - scm._shipped_quantity(p_po.id, l.line_no) into v_open
      from erp.purchase_order_line l where l.po_id = p_po.id and l.line_no = t.line_no;
    if t.qty > v_open then
      return array['ES015', format('line %s of %s: %s shipped but only %s still open', t.line_no, p_po.po_no, t.qty, greatest(v_open, 0))];
    end if;
  end loop;
  return null;
end $$;
comment on function scm._asn_rejection is 'Internal: why an ASN must be rejected ([code, reason]), or null when it is acceptable.';

create function scm._shipped_quantity(
  p_po_id   bigint,  -- erp.purchase_order.id
  p_line_no integer  -- erp.purchase_order_line.line_no
) returns numeric
language sql stable as $$
  select coalesce(sum(al.quantity), 0)
    from erp.asn_document ad join erp.asn_line al on al.asn_id = ad.id
   where ad.po_id = p_po_id and ad.status = 'accepted' and al.po_line_no = p_line_no
$$;
comment on function scm._shipped_quantity is 'Internal: quantity of a PO line on accepted ASNs.';

create function scm.ingest_asn(
  p_doc      jsonb,               -- the ASN document (友云采 发货单 fields: code, supplier, deliveryDate, status, details[...])
  p_source   text,                -- push | pull | shared_db | portal
  p_event_id text default null    -- the cloud's event id, when it has one (deduplication)
) returns scm.asn_ingest_result
language plpgsql security definer set search_path = '' as $$
declare
  v_asn_no text;
  v_supplier_code text;
  v_supplier erp.supplier;
  v_po erp.purchase_order;
  v_reject text[];
  v_id bigint;
  v_existing record;
begin
  perform scm._check_asn_shape(p_doc);
  if p_source is null or p_source not in ('push', 'pull', 'shared_db', 'portal') then
    raise exception using errcode = 'ES004', message = format('ASN source %L is not known', p_source),
      detail = 'field: source', hint = 'Use push, pull, shared_db or portal.';
  end if;
  v_asn_no := p_doc ->> 'code';
  v_supplier_code := p_doc ->> 'supplier';
  if not scm._is_shipment(p_doc) then
    return (null, v_asn_no, 'not_shipped', null, format('delivery status %s is not a shipment', p_doc ->> 'status'))::scm.asn_ingest_result;
  end if;
  -- one ingest at a time per ASN number and per event id, so concurrent duplicates (a push and a pull of the same ASN) see each other
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('scm.asn:' || v_supplier_code || ':' || v_asn_no, 0));
  if p_event_id is not null then
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('scm.asn_event:' || p_event_id, 0));
    select id, asn_no, supplier_code, status, reject_code, reject_reason into v_existing from erp.asn_document where cloud_event_id = p_event_id;
    if found then
      if (v_existing.supplier_code, v_existing.asn_no) is distinct from (v_supplier_code, v_asn_no) then
        raise exception using errcode = 'ES017',
          message = format('event %s was already used for ASN %s of supplier %s, not %s of %s', p_event_id,
                           v_existing.asn_no, v_existing.supplier_code, v_asn_no, v_supplier_code),
          hint = 'The sender reuses event ids: each ASN needs its own. Nothing was stored.';
      end if;
      return (v_existing.id, v_existing.asn_no, 'duplicate', v_existing.reject_code, v_existing.reject_reason)::scm.asn_ingest_result;
    end if;
  end if;
  select id, asn_no, status, reject_code, reject_reason into v_existing from erp.asn_document
   where supplier_code = v_supplier_code and asn_no = v_asn_no;
  if found then
    return (v_existing.id, v_existing.asn_no, 'duplicate', v_existing.reject_code, v_existing.reject_reason)::scm.asn_ingest_result;
  end if;

  select * into v_supplier from erp.supplier where code = v_supplier_code;
  -- lock the PO: two ASNs against one line must not both take its open quantity
  select * into v_po from erp.purchase_order where po_no = p_doc #>> '{details,0,orderCode}' for update;
  v_reject := scm._asn_rejection(p_doc, v_supplier, v_po);
  if p_source = 'portal' and v_reject[1] = 'ES012' then
    -- the portal must not learn whether another supplier's PO exists: the same answer as for no such PO
    v_reject := array['ES011', format('purchase order %s does not exist', p_doc #>> '{details,0,orderCode}')];
  end if;

  insert into erp.asn_document (asn_no, supplier_code, supplier_id, po_no, po_id, ship_date, eta, carrier, tracking_no,
                                status, reject_code, reject_reason, detail, source, cloud_event_id)
  values (v_asn_no, v_supplier_code, v_supplier.id, p_doc #>> '{details,0,orderCode}',
          -- a rejected ASN keeps no link to a PO of another supplier
          case when v_po.supplier_id = v_supplier.id then v_po.id end,
          left(p_doc ->> 'deliveryDate', 10)::date,
          coalesce(left(p_doc ->> 'planArrivalDate', 10), left(p_doc #>> '{details,0,planArrivalDate}', 10))::date,
          p_doc ->> 'logisticalComp', p_doc ->> 'logisticalCode',
          case when v_reject is null then 'accepted' else 'rejected' end, v_reject[1], v_reject[2],
          p_doc, p_source, p_event_id)
  returning id into v_id;
  insert into erp.asn_line (asn_id, line_no, po_line_no, material_code, batch_no, quantity, production_date)
  select v_id, coalesce((d.value ->> 'lineno')::integer, d.n::integer), (d.value ->> 'orderDetailId')::integer, d.value ->> 'material',
         d.value ->> 'batchNo', (d.value ->> 'purchaseNum')::numeric, left(d.value ->> 'productionDate', 10)::date
    from jsonb_array_elements(p_doc -> 'details') with ordinality d(value, n);
  return (v_id, v_asn_no, case when v_reject is null then 'accepted' else 'rejected' end, v_reject[1], v_reject[2])::scm.asn_ingest_result;
end $$;
comment on function scm.ingest_asn is 'The one door for ASNs (webhook push, pull, shared database, portal): idempotent by cloud event id and by (supplier, ASN number), ES017 when a known event id comes with another ASN; delivery statuses that are no shipment are skipped (not_shipped); checks PO, supplier, lines and open quantities; stores accepted and rejected ASNs (with reason) and the original as detail. ES004 when the document is malformed (nothing stored).';

------------------------------------------------------------------------------
-- Pull: pg_cron enqueues an incremental fetch of the delivery list
------------------------------------------------------------------------------
create table scm.asn_pull (
  endpoint     text primary key references cloud.endpoint (name) on update cascade on delete cascade,
  enabled      boolean not null default true,
  watermark    timestamptz not null default '2000-01-01 00:00:00+00',
  page_size    integer not null default 50,
  last_enqueued_at timestamptz,
  last_pulled_at   timestamptz,
  constraint asn_pull_page_size check (page_size between 1 and 50)
);
comment on table scm.asn_pull is 'The delivery-list pull per endpoint: its watermark is the newest ts (the cloud''s change time) already ingested.';

create function scm.put_asn_pull(
  p_endpoint  text,                  -- cloud.endpoint (provider yonbip)
  p_enabled   boolean default true,  -- false stops the pull
  p_watermark timestamptz default null, -- start from here (null: keep, or from 2000-01-01)
  p_page_size integer default 50     -- records per page (the API allows at most 50)
) returns scm.asn_pull
language plpgsql security definer set search_path = '' as $$
declare
  v scm.asn_pull;
begin
  if not exists (select from cloud.endpoint where name = p_endpoint) then
    perform cloud._raise_unknown_endpoint(p_endpoint);
  end if;
  if p_page_size is null or p_page_size not between 1 and 50 then
    raise exception using errcode = 'ES006', message = format('page size %s is out of range', p_page_size),
      hint = 'queryDeliveryList returns at most 50 records per page: use 1 to 50.';
  end if;
  insert into scm.asn_pull as a (endpoint, enabled, watermark, page_size)
  values (p_endpoint, coalesce(p_enabled, true), coalesce(p_watermark, '2000-01-01 00:00:00+00'), p_page_size)
  on conflict (endpoint) do update set enabled = excluded.enabled, page_size = excluded.page_size,
    watermark = coalesce(p_watermark, a.watermark)
  returning a.* into v;
  return v;
end $$;
comment on function scm.put_asn_pull is 'Turns the ASN pull on or off for an endpoint (EC001 unknown endpoint, ES006 bad page size).';

create function scm.enqueue_asn_pulls(
  p_now timestamptz default clock_timestamp()
) returns integer
language plpgsql security definer set search_path = '' as $$
declare
  a scm.asn_pull;
  n integer := 0;
begin
  for a in select * from scm.asn_pull where enabled for update skip locked loop
    -- one pull at a time per endpoint: the next waits until the previous one (and its pages) finished
    continue when exists (select from cloud.outbox o where o.ordering_key = 'scm.asn_pull:' || a.endpoint
                             and o.status in ('pending', 'in_flight'));
    perform cloud.enqueue_message(a.endpoint, 'scm.asn_pull', scm.build_asn_pull_payload(a, 1, p_now),
                                  'scm.asn_pull', a.endpoint, 'scm.asn_pull:' || a.endpoint);
    update scm.asn_pull set last_enqueued_at = p_now where endpoint = a.endpoint;
    n := n + 1;
  end loop;
  return n;
end $$;
comment on function scm.enqueue_asn_pulls is 'pg_cron, every minute: enqueues one incremental delivery-list fetch per enabled pull whose previous fetch has finished. Returns how many.';

create function scm.build_asn_pull_payload(
  p_pull scm.asn_pull,       -- the pull (its watermark)
  p_page integer,            -- 1-based page
  p_now  timestamptz default clock_timestamp()
) returns jsonb
language sql stable as $$
  select jsonb_build_object(
    'pageIndex', p_page, 'pageSize', p_pull.page_size,
    -- deliveryDateStart/End are required by the API; the watermark (ts) does the real filtering
    'deliveryDateStart', to_char((p_pull.watermark at time zone 'Asia/Shanghai') - interval '366 days', 'YYYY-MM-DD "00:00:00"'),
    'deliveryDateEnd', to_char((p_now at time zone 'Asia/Shanghai') + interval '366 days', 'YYYY-MM-DD "23:59:59"'),
    'ts', to_char(p_pull.watermark at time zone 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS'))
$$;
comment on function scm.build_asn_pull_payload is 'The queryDeliveryList request body for one page of an incremental pull (ts = watermark, Asia/Shanghai wall time).';

create function scm.record_asn_pull(
  p_msg      cloud.outbox,  -- the pull message
  p_response jsonb          -- {"code":"200","data":{"recordList":[...],"pageCount":n}}
) returns void
language plpgsql security definer set search_path = '' as $$
declare
  r jsonb;
  v_newest timestamptz;
  v_pull scm.asn_pull;
  v_page integer := coalesce((p_msg.payload ->> 'pageIndex')::integer, 1);
begin
  for r in select value from jsonb_array_elements(coalesce(p_response #> '{data,recordList}', '[]')) loop
    begin
      perform scm.ingest_asn(r, 'pull', nullif(r ->> 'eventId', ''));
    exception when sqlstate 'ES004' or sqlstate 'ES017' or data_exception or integrity_constraint_violation then
      -- a record that cannot be stored goes to quarantine, so the page (and the watermark) moves on without losing it
      perform scm._quarantine_asn(r, 'pull', nullif(r ->> 'eventId', ''), sqlstate, sqlerrm);
    end;
    if r ->> 'ts' ~ '^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}' then
      v_newest := greatest(v_newest, (left(replace(r ->> 'ts', 'T', ' '), 19)::timestamp at time zone 'Asia/Shanghai'));
    end if;
  end loop;
  update scm.asn_pull set watermark = greatest(watermark, coalesce(v_newest, watermark)), last_pulled_at = pg_catalog.now()
   where endpoint = p_msg.endpoint
  returning * into v_pull;
  if found and v_page < coalesce((p_response #>> '{data,pageCount}')::integer, 1) then
    -- the next page of the same window (same ts), right behind this one on the same ordering key
    perform cloud.enqueue_message(p_msg.endpoint, 'scm.asn_pull',
      p_msg.payload || jsonb_build_object('pageIndex', v_page + 1), 'scm.asn_pull', p_msg.endpoint, p_msg.ordering_key);
  end if;
end $$;
comment on function scm.record_asn_pull is 'Write-back of a delivery-list page: every record through scm.ingest_asn (source pull; records it refuses go to scm.asn_quarantine), the watermark advanced to the newest ts, the next page enqueued.';

select cloud.put_operation_handler('scm.asn_pull', 'scm.record_asn_pull(cloud.outbox, jsonb)', null);

------------------------------------------------------------------------------
-- Shared database: postgres_fdw to the cloud's middle database
------------------------------------------------------------------------------
do $$
begin
  if exists (select from pg_available_extensions where name = 'postgres_fdw') then
    create extension if not exists postgres_fdw;
  else
    raise notice 'postgres_fdw is not installed: the shared-database ASN path is unavailable (push and pull still work)';
  end if;
exception when insufficient_privilege then
  raise notice 'postgres_fdw needs a superuser to install (create extension postgres_fdw): the shared-database ASN path waits for it';
end $$;

create table scm.shared_asn_source (
  foreign_table regclass primary key,
  enabled       boolean not null default true,
  last_id       bigint not null default 0,
  overlap       integer not null default 100,
  last_copied_at timestamptz
);
comment on table scm.shared_asn_source is 'Foreign tables of ASNs in a cloud''s middle database that pg_cron copies through scm.ingest_asn. last_id is the watermark; overlap re-reads that many ids below it each time, because ids are handed out before commit and a lower id can become visible later (ingest makes re-reads harmless).';

create function scm._check_identifier(p_what text, p_value text) returns void
language plpgsql as $$
begin
  if p_value is null or p_value !~ '^[a-z_][a-z0-9_]{0,62}$' then
    raise exception using errcode = 'ES005', message = format('%s %L is not a plain identifier', p_what, p_value),
      hint = 'Use lower-case letters, digits and underscores.';
  end if;
end $$;
comment on function scm._check_identifier is 'Internal: ES005 unless a name for the fdw setup is a plain lower-case identifier.';

create function scm.create_shared_asn_server(
  p_server text,          -- the foreign server's name, e.g. yonbip_middle
  p_host   text,          -- the middle database's host
  p_port   integer,       -- its port
  p_dbname text           -- its database
) returns void
language plpgsql as $$
begin
  perform scm._check_identifier('server name', p_server);
  if to_regclass('pg_catalog.pg_foreign_data_wrapper') is null
     or not exists (select from pg_foreign_data_wrapper where fdwname = 'postgres_fdw') then
    raise exception using errcode = 'ES005', message = 'postgres_fdw is not installed in this database',
      hint = 'A superuser runs: create extension postgres_fdw; then grant usage on foreign data wrapper postgres_fdw to the DBA role.';
  end if;
  execute format('create server if not exists %I foreign data wrapper postgres_fdw options (host %L, port %L, dbname %L)',
                 p_server, p_host, p_port::text, p_dbname);
end $$;
comment on function scm.create_shared_asn_server is 'DBA, step 1 of the shared-database path: the postgres_fdw server for the cloud''s middle database.';

create function scm.create_shared_asn_user_mapping(
  p_server     text,                    -- the server from step 1
  p_remote_user text,                   -- the role in the middle database
  p_password   text default null,       -- its password; null only for a superuser-made mapping with password_required false
  p_local_role text default null        -- who uses the mapping (default: the current role, which pg_cron's job runs as)
) returns void
language plpgsql as $$
declare
  v_role text := coalesce(p_local_role, current_user);
begin
  perform scm._check_identifier('server name', p_server);
  if p_password is null then
    if not (select rolsuper from pg_roles where rolname = current_user) then
      raise exception using errcode = 'ES005', message = 'a user mapping without password needs password_required ''false'', which only a superuser may set',
        hint = 'Pass the middle database role''s password, or have a superuser call this function.';
    end if;
    execute format('create user mapping if not exists for %I server %I options (user %L, password_required %L)',
                   v_role, p_server, p_remote_user, 'false');
  else
    execute format('create user mapping if not exists for %I server %I options (user %L, password %L)',
                   v_role, p_server, p_remote_user, p_password);
  end if;
end $$;
comment on function scm.create_shared_asn_user_mapping is 'DBA, step 2: the user mapping. Non-superusers must give a password (postgres_fdw insists); password_required false is for superusers only.';

create function scm.create_shared_asn_foreign_table(
  p_server        text,                     -- the server from step 1
  p_local_schema  text default 'scm_middle',-- a schema of its own for the foreign tables
  p_remote_schema text default 'public',    -- where the cloud keeps the ASN table
  p_remote_table  text default 'asn_outbox' -- (id bigint, event_id text, doc jsonb, created_at timestamptz)
) returns regclass
language plpgsql as $$
declare
  v_table regclass;
begin
  perform scm._check_identifier('server name', p_server);
  perform scm._check_identifier('local schema', p_local_schema);
  perform scm._check_identifier('remote schema', p_remote_schema);
  perform scm._check_identifier('remote table', p_remote_table);
  execute format('create schema if not exists %I', p_local_schema);
  execute format('revoke all on schema %I from public', p_local_schema);
  -- read-only use: id is the remote identity column and the watermark. A foreign table used
  -- for INSERT must leave an identity column out, or the remote refuses the explicit value.
  execute format('create foreign table if not exists %I.%I (id bigint not null, event_id text, doc jsonb not null, created_at timestamptz)
                  server %I options (schema_name %L, table_name %L)',
                 p_local_schema, p_remote_table, p_server, p_remote_schema, p_remote_table);
  v_table := format('%I.%I', p_local_schema, p_remote_table)::regclass;
  insert into scm.shared_asn_source (foreign_table) values (v_table) on conflict do nothing;
  return v_table;
end $$;
comment on function scm.create_shared_asn_foreign_table is 'DBA, step 3: the foreign table of the middle database''s ASNs in a schema of its own, registered for the pg_cron copy.';

create function scm.copy_shared_asns(
  p_foreign_table regclass,       -- a registered foreign table
  p_limit integer default 1000    -- at most this many rows per call
) returns integer
language plpgsql as $$
declare
  s scm.shared_asn_source;
  r record;
  n integer := 0;
  v_max bigint;
begin
  select * into s from scm.shared_asn_source where foreign_table = p_foreign_table for update skip locked;
  if not found then
    return 0;  -- unknown, or another copy of it is running
  end if;
  v_max := s.last_id;
  for r in execute format('select id, event_id, doc from %s where id > $1 order by id limit $2', s.foreign_table)
           using greatest(s.last_id - s.overlap, 0), p_limit loop
    begin
      perform scm.ingest_asn(r.doc, 'shared_db', r.event_id);
    exception when sqlstate 'ES004' or sqlstate 'ES017' or data_exception or integrity_constraint_violation then
      perform scm._quarantine_asn(r.doc, 'shared_db', r.event_id, sqlstate, format('%s (row %s of %s)', sqlerrm, r.id, s.foreign_table));
    end;
    v_max := greatest(v_max, r.id);
    n := n + 1;
  end loop;
  update scm.shared_asn_source set last_id = v_max, last_copied_at = now() where foreign_table = s.foreign_table;
  return n;
end $$;
comment on function scm.copy_shared_asns is 'Copies ASNs newer than the watermark (less the overlap) from one middle-database foreign table through scm.ingest_asn (source shared_db). Returns rows read.';

create function scm.copy_all_shared_asns() returns integer
language plpgsql as $$
declare
  s scm.shared_asn_source;
  n integer := 0;
begin
  for s in select * from scm.shared_asn_source where enabled loop
    n := n + scm.copy_shared_asns(s.foreign_table);
  end loop;
  return n;
end $$;
comment on function scm.copy_all_shared_asns is 'pg_cron, every minute: scm.copy_shared_asns for every enabled middle-database source.';

------------------------------------------------------------------------------
-- pg_cron: the pull and the shared-database copy, where pg_cron lives
------------------------------------------------------------------------------
create function scm.schedule_jobs() returns integer
language plpgsql as $$
begin
  if to_regnamespace('cron') is null then
    return 0;
  end if;
  perform cron.schedule('erp-cloud scm: pull ASNs', '* * * * *', 'select scm.enqueue_asn_pulls()');
  perform cron.schedule('erp-cloud scm: copy shared-database ASNs', '* * * * *', 'select scm.copy_all_shared_asns()');
  return 2;
end $$;
comment on function scm.schedule_jobs is 'Registers (or updates) the pg_cron jobs of supplier collaboration: the delivery-list pull and the shared-database copy. Returns the number of jobs; 0 without pg_cron.';

do $$
begin
  if current_setting('cron.database_name', true) is distinct from current_database()
     or to_regnamespace('cron') is null then
    raise notice 'pg_cron is not in database %: schedule select scm.enqueue_asn_pulls() and select scm.copy_all_shared_asns() every minute some other way',
      current_database();
    return;
  end if;
  perform scm.schedule_jobs();
end $$;

------------------------------------------------------------------------------
-- The supplier portal: row-level security
------------------------------------------------------------------------------
create table scm.portal_login (
  login_role  name primary key,
  -- null: the shared portal login. No cascade: deleting a supplier must not change what a login may do
  supplier_id bigint references erp.supplier (id),
  bound_at    timestamptz not null default now()
);
comment on table scm.portal_login is 'The login roles that may use the supplier portal. A login bound to a supplier (session_user) can only ever act as that supplier, whatever scm.supplier_id says; a login registered as shared (supplier_id null: the trusted portal app) chooses the supplier per transaction with scm.act_as_supplier. A login that is not listed sees nothing (fails closed).';

create function scm.register_shared_portal_login(
  p_login_role name  -- the login the portal application connects with
) returns void
language sql security definer set search_path = '' as $$
  insert into scm.portal_login (login_role, supplier_id) values (p_login_role, null)
  on conflict (login_role) do update set supplier_id = null, bound_at = pg_catalog.now()
$$;
comment on function scm.register_shared_portal_login is 'Operator: lets the portal application''s login choose the supplier per transaction (scm.act_as_supplier). Only for the login of a portal app that authenticates suppliers itself.';

create function scm.bind_portal_login(
  p_login_role    name, -- a login role that holds erp_cloud_supplier_portal
  p_supplier_code text  -- the supplier it may act for, or null to take the login off the portal
) returns void
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  if p_supplier_code is null then
    delete from scm.portal_login where login_role = p_login_role;
    return;
  end if;
  select id into v_id from erp.supplier where code = p_supplier_code;
  if not found then
    raise exception using errcode = 'ES008', message = format('supplier %s is not known', p_supplier_code),
      hint = 'Bind the login to an existing supplier code (erp.supplier.code).';
  end if;
  insert into scm.portal_login (login_role, supplier_id) values (p_login_role, v_id)
  on conflict (login_role) do update set supplier_id = excluded.supplier_id, bound_at = pg_catalog.now();
end $$;
comment on function scm.bind_portal_login is 'Operator: binds a portal login role to one supplier; a null code takes the login off the portal (it then sees nothing). ES008 when the supplier is not known.';

create function scm._refuse_other_supplier() returns void
language plpgsql as $$
begin
  raise exception using errcode = '42501', message = 'this portal login may only act for the supplier it is bound to',
    hint = 'The login is bound in scm.portal_login; sign in with the login of the supplier you work for.';
end $$;
comment on function scm._refuse_other_supplier is 'Internal: the one 42501 a bound portal login gets for any other supplier (the same whether that supplier exists or not).';

create function scm.current_supplier_id() returns bigint
language plpgsql stable security definer set search_path = '' as $$
declare
  v_setting text := pg_catalog.current_setting('scm.supplier_id', true);
  v_login scm.portal_login;
begin
  -- session_user is the login: SET ROLE does not change it, SET SESSION AUTHORIZATION needs a superuser
  select * into v_login from scm.portal_login where login_role = session_user;
  if not found then
    return null;  -- not a portal login: nobody
  end if;
  if v_login.supplier_id is not null then
    if coalesce(v_setting, '') <> '' and v_setting <> v_login.supplier_id::text then
      perform scm._refuse_other_supplier();
    end if;
    return v_login.supplier_id;
  end if;
  return case when v_setting ~ '^[0-9]{1,18}$' then v_setting::bigint end;
end $$;
comment on function scm.current_supplier_id is 'The supplier the portal acts for: for a login bound in scm.portal_login always its own supplier (42501 when scm.supplier_id names another); for a login registered as shared the transaction-local setting (set_config(''scm.supplier_id'', id, true)); null (nobody) for a login not in scm.portal_login, and for no, an empty or a malformed setting.';

create function scm.act_as_supplier(
  p_supplier_code text  -- the supplier the portal user signed in for
) returns bigint
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
  v_login scm.portal_login;
begin
  select * into v_login from scm.portal_login where login_role = session_user;
  if not found then
    raise exception using errcode = '42501', message = format('login %s is not a supplier-portal login', session_user),
      hint = 'An operator registers portal logins: scm.bind_portal_login(login, supplier_code) or scm.register_shared_portal_login(login).';
  end if;
  select id into v_id from erp.supplier where code = p_supplier_code;
  if v_login.supplier_id is not null and v_id is distinct from v_login.supplier_id then
    perform scm._refuse_other_supplier();  -- before ES008: a bound login learns nothing about other codes
  end if;
  if v_id is null then
    raise exception using errcode = 'ES008', message = format('supplier %s is not known', p_supplier_code),
      hint = 'Check the supplier code the portal user is bound to.';
  end if;
  perform pg_catalog.set_config('scm.supplier_id', v_id::text, true);  -- transaction-local: gone at commit or rollback
  return v_id;
end $$;
comment on function scm.act_as_supplier is 'The portal''s first call in each transaction: sets scm.supplier_id for this transaction only and returns it. A login not in scm.portal_login gets 42501; a bound login gets 42501 for any code but its own supplier''s; the shared login gets ES008 for an unknown code.';

create function scm.submit_asn(
  p_doc jsonb  -- an ASN the supplier enters in the portal
) returns scm.asn_ingest_result
language plpgsql security definer set search_path = '' as $$
begin
  if scm.current_supplier_id() is null
     or not exists (select from erp.supplier where id = scm.current_supplier_id() and code = p_doc ->> 'supplier') then
    raise exception using errcode = '42501', message = 'an ASN can only be submitted for the supplier this session acts for',
      hint = 'Call scm.act_as_supplier(code) in this transaction, and send ASNs in that supplier''s name only.';
  end if;
  return scm.ingest_asn(p_doc, 'portal', null);
end $$;
comment on function scm.submit_asn is 'The portal''s way to file an ASN: only in the name of the supplier set for this transaction (42501 otherwise), then through scm.ingest_asn.';

create function scm.search_asn_lines(
  p_material_code text,           -- material code on the ASN line
  p_batch_no      text default null -- batch number, or null for any batch
) returns table (asn_id bigint, asn_no text, supplier_code text, po_no text, status text, ship_date date, line jsonb)
language plpgsql stable as $$
declare
  v_line jsonb := jsonb_strip_nulls(jsonb_build_object('material', p_material_code, 'batchNo', p_batch_no));
begin
  if p_material_code is null then
    return;
  end if;
  -- EXECUTE plans with the pattern's value: GIN can only estimate a containment
  -- whose right side it can see, and with a generic plan it would scan the table
  return query execute
    'select d.id, d.asn_no, d.supplier_code, d.po_no, d.status, d.ship_date, l.value
       from erp.asn_document d
      cross join lateral jsonb_array_elements(d.detail -> ''details'') l
      where d.detail @> $1 and l.value @> $2'
    using jsonb_build_object('details', jsonb_build_array(v_line)), v_line;
end $$;
comment on function scm.search_asn_lines is 'ASN lines by material code and batch number: a containment search (detail @> {details: [{material, batchNo}]}) served by the GIN index on erp.asn_document.detail (jsonb_path_ops). The portal sees only its own ASNs (RLS).';

alter table erp.supplier enable row level security;
alter table erp.purchase_order enable row level security;
alter table erp.purchase_order_line enable row level security;
alter table erp.asn_document enable row level security;
alter table erp.asn_line enable row level security;

create policy "The ERP sees and changes every supplier's rows" on erp.supplier for all to erp_cloud_app using (true) with check (true);
create policy "The ERP sees and changes every purchase order" on erp.purchase_order for all to erp_cloud_app using (true) with check (true);
create policy "The ERP sees and changes every purchase order line" on erp.purchase_order_line for all to erp_cloud_app using (true) with check (true);
create policy "The ERP sees and changes every ASN" on erp.asn_document for all to erp_cloud_app using (true) with check (true);
create policy "The ERP sees and changes every ASN line" on erp.asn_line for all to erp_cloud_app using (true) with check (true);
create policy "Operators see every supplier" on erp.supplier for select to erp_cloud_operator using (true);
create policy "Operators see every purchase order" on erp.purchase_order for select to erp_cloud_operator using (true);
create policy "Operators see every purchase order line" on erp.purchase_order_line for select to erp_cloud_operator using (true);
create policy "Operators see every ASN" on erp.asn_document for select to erp_cloud_operator using (true);
create policy "Operators see every ASN line" on erp.asn_line for select to erp_cloud_operator using (true);

create policy "Suppliers see only their own supplier record" on erp.supplier for select to erp_cloud_supplier_portal
  using (id = (select scm.current_supplier_id()));
create policy "Suppliers see only their own purchase orders" on erp.purchase_order for select to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers change only their own purchase orders and cannot hand one to another supplier" on erp.purchase_order
  for update to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id())) with check (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers see only the lines of their own purchase orders" on erp.purchase_order_line for select to erp_cloud_supplier_portal
  using (exists (select from erp.purchase_order po where po.id = po_id and po.supplier_id = (select scm.current_supplier_id())));
create policy "Suppliers see only their own ASNs" on erp.asn_document for select to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers file ASNs only in their own name" on erp.asn_document for insert to erp_cloud_supplier_portal
  with check (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers change only their own ASNs and cannot move one to another supplier" on erp.asn_document
  for update to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id())) with check (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers see only the lines of their own ASNs" on erp.asn_line for select to erp_cloud_supplier_portal
  using (exists (select from erp.asn_document d where d.id = asn_id and d.supplier_id = (select scm.current_supplier_id())));
create policy "Suppliers add lines only to their own ASNs" on erp.asn_line for insert to erp_cloud_supplier_portal
  with check (exists (select from erp.asn_document d where d.id = asn_id and d.supplier_id = (select scm.current_supplier_id())));

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
revoke all on erp.supplier, erp.purchase_order, erp.purchase_order_line, erp.asn_document, erp.asn_line from public;
revoke all on scm.setting, scm.asn_pull, scm.shared_asn_source, scm.portal_login, scm.asn_quarantine from public;
revoke execute on all functions in schema scm from public;
revoke execute on function erp.tg_purchase_order__100_validate(), erp.tg_purchase_order_line__100_validate(), erp.tg_purchase_order__100_refuse_delete(),
  erp.tg_purchase_order__500_enqueue(), erp.tg_purchase_order__500_enqueue_header() from public;

grant select, insert, update, delete on erp.supplier, erp.purchase_order, erp.purchase_order_line to erp_cloud_app;
grant select, update on erp.asn_document to erp_cloud_app;
grant select on erp.asn_line to erp_cloud_app;
grant select on erp.supplier, erp.purchase_order, erp.purchase_order_line, erp.asn_document, erp.asn_line to erp_cloud_operator;
grant select on scm.asn_pull, scm.shared_asn_source, scm.setting, scm.asn_quarantine to erp_cloud_operator;
grant delete on scm.asn_quarantine to erp_cloud_operator;
grant select on erp.supplier, erp.purchase_order, erp.purchase_order_line, erp.asn_document, erp.asn_line to erp_cloud_supplier_portal;
grant update (supplier_confirmed_at) on erp.purchase_order to erp_cloud_supplier_portal;
grant update (carrier, tracking_no, eta) on erp.asn_document to erp_cloud_supplier_portal;

grant execute on function erp.tg_purchase_order__100_validate(), erp.tg_purchase_order_line__100_validate(),
  erp.tg_purchase_order__100_refuse_delete(), erp.tg_purchase_order__500_enqueue(), erp.tg_purchase_order__500_enqueue_header()
  to erp_cloud_app, erp_cloud_supplier_portal;
grant execute on function scm.bind_portal_login(name, text), scm.register_shared_portal_login(name) to erp_cloud_operator;
grant select on scm.portal_login to erp_cloud_operator;
grant execute on function scm.build_po_publish_payload(bigint), scm.build_po_close_payload(bigint) to erp_cloud_app, erp_cloud_operator;
grant execute on function scm.search_asn_lines(text, text), scm.current_supplier_id()
  to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;
grant execute on function scm.act_as_supplier(text), scm.submit_asn(jsonb) to erp_cloud_supplier_portal;
grant execute on function scm.ingest_asn(jsonb, text, text) to erp_cloud_listener, erp_cloud_operator;
grant execute on function scm.quarantine_pushed_event(jsonb, text, text, text), scm.ingest_pushed_event(jsonb, jsonb, text) to erp_cloud_listener;
grant execute on function scm.record_po_delivered(cloud.outbox, jsonb), scm.record_po_refused(cloud.outbox, jsonb),
  scm.record_asn_pull(cloud.outbox, jsonb) to erp_cloud_listener;
grant execute on function scm.put_po_endpoint(text), scm.put_asn_pull(text, boolean, timestamptz, integer),
  scm.enqueue_asn_pulls(timestamptz), scm.copy_shared_asns(regclass, integer), scm.copy_all_shared_asns(),
  scm.create_shared_asn_server(text, text, integer, text), scm.create_shared_asn_user_mapping(text, text, text, text),
  scm.create_shared_asn_foreign_table(text, text, text, text), scm._check_identifier(text, text), scm.schedule_jobs()
  to erp_cloud_operator;
