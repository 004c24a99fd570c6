-- reference-erp: the ERP erp-cloud was first built against (customers, settlements, shipments, suppliers, purchase
-- orders), connected through the public contracts only. Version 1. Idempotent: `erp-cloud migrate --with-example
-- reference-erp`, or `psql -1 -f install.sql` as a superuser. It runs on a fresh database and on one upgraded past
-- release 0022, whose erp tables exist with data (migration 0023 adopts them: they change owner, nothing else).
--
-- Business rules that are the ERP's own and live in its triggers: customer.invoice_on says whether a settlement's
-- approval or a shipment's posting invoices; a settlement or its shipment is invoiced, never both; purchase orders
-- go draft → approved → changed → closed | cancelled, and only drafts are deleted (ES001, ES003, ES009).
-- Reversal requests are the ERP's own rows (erp.invoice_reversal, reason in its codes 1 销货退回, 2 开票有误,
-- 3 服务中止, 4 销售折让).

-- The ERP's owner role: owns the schema and runs the triggers and callbacks (erp-cloud refuses a callback owned by a
-- superuser). Member of erp_cloud_app: that is what lets it call the tax.* / scm.* contracts and read their views.
do $$
begin
  begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'erp_example_owner') then
      create role erp_example_owner nologin;
      comment on role erp_example_owner is 'Owns schema erp (the reference example ERP) and runs its triggers and callbacks; nobody logs in as it.';
    end if;
  exception when duplicate_object or unique_violation then null;  -- another database of this cluster made it just now
  end;
  if not pg_catalog.pg_has_role('erp_example_owner', 'erp_cloud_app', 'member') then grant erp_cloud_app to erp_example_owner; end if;
  if not pg_catalog.pg_has_role(current_user, 'erp_example_owner', 'member') then execute format('grant erp_example_owner to %I', current_user); end if;
end $$;
create schema if not exists erp authorization erp_example_owner;
alter schema erp owner to erp_example_owner;
comment on schema erp is 'The reference example ERP (sql/examples/reference-erp): customers, settlements, shipments, suppliers, purchase orders; e-invoicing and procurement through the tax.* and scm.* contracts.';

-- An installation upgraded from a release where these were erp-cloud's own: the tables, their sequences and the
-- functions become the ERP's (ids, rows and grants stay as they are).
do $$
declare r record;
begin
  for r in select c.oid::regclass as rel, c.relkind from pg_catalog.pg_class c
            where c.relnamespace = 'erp'::regnamespace and c.relkind in ('r', 'p', 'v')
              and c.relowner <> 'erp_example_owner'::regrole loop
    execute format(case when r.relkind = 'v' then 'alter view %s owner to erp_example_owner' else 'alter table %s owner to erp_example_owner' end, r.rel);
  end loop;
  for r in select p.oid::regprocedure as fn from pg_catalog.pg_proc p
            where p.pronamespace = 'erp'::regnamespace and p.proowner <> 'erp_example_owner'::regrole loop
    execute format('alter function %s owner to erp_example_owner', r.fn);
  end loop;
end $$;
set role erp_example_owner;

-- Tables: the ERP's own. erp-cloud never reads them; the triggers hand it documents, the callbacks write back.
create table if not exists erp.customer (
  id bigint generated always as identity primary key,
  name text not null,
  tax_id text,
  address text,
  phone text,
  bank_name text,
  bank_account text,
  email text,
  invoice_on text not null default 'settlement' check (invoice_on in ('settlement', 'shipment')),
  tax_id_check_override boolean not null default false,
  created_at timestamptz not null default now()
);
comment on table erp.customer is 'Customers (buyers on the invoice). invoice_on: which event issues their invoices, settlement approval (default) or shipment posting.';
comment on column erp.customer.tax_id_check_override is 'An operator confirmed that this 18-character tax id is legal although it fails the GB 32100 check digit (early pilot codes): issue with a warning instead of EI002.';

create table if not exists erp.settlement (
  id bigint generated always as identity primary key,
  settlement_no text not null unique,
  customer_id bigint not null references erp.customer,
  status text not null default 'draft' check (status in ('draft', 'approved', 'cancelled')),
  approved_at timestamptz,
  invoice_kind text not null default 'normal' check (invoice_kind in ('normal', 'special')),
  remark text,
  created_at timestamptz not null default now()
);
comment on table erp.settlement is '结算单. Approving it (status → approved) issues its invoice(s) when the customer invoices on settlement. invoice_kind: normal = 数电普票 (pc), special = 数电专票 (bs).';

create table if not exists erp.settlement_line (
  id bigint generated always as identity primary key,
  settlement_id bigint not null references erp.settlement on delete cascade,
  line_no integer not null,
  item_name text not null,
  tax_code text not null,
  spec text,
  unit text,
  quantity numeric,
  unit_price numeric,
  amount numeric(16,2) not null,
  tax_rate numeric(6,4) not null,
  tax_amount numeric(16,2),
  unique (settlement_id, line_no)
);
comment on table erp.settlement_line is 'Settlement lines. amount is tax-inclusive; tax_code is the 19-digit 税收分类编码; tax_amount is optional (computed from amount and rate when null, checked against the 0.06 tolerance when given).';

create table if not exists erp.shipment (
  id bigint generated always as identity primary key,
  shipment_no text not null unique,
  customer_id bigint not null references erp.customer,
  settlement_id bigint references erp.settlement,
  status text not null default 'draft' check (status in ('draft', 'posted', 'cancelled')),
  posted_at timestamptz,
  invoice_kind text not null default 'normal' check (invoice_kind in ('normal', 'special')),
  remark text,
  created_at timestamptz not null default now()
);
comment on table erp.shipment is '销售出库. Posting it (status → posted) issues its invoice(s) when the customer invoices on shipment. settlement_id links it to the settlement that bills it: one of the two is invoiced, never both.';

create table if not exists erp.shipment_line (
  id bigint generated always as identity primary key,
  shipment_id bigint not null references erp.shipment on delete cascade,
  line_no integer not null,
  item_name text not null,
  tax_code text not null,
  spec text,
  unit text,
  quantity numeric,
  unit_price numeric,
  amount numeric(16,2) not null,
  tax_rate numeric(6,4) not null,
  tax_amount numeric(16,2),
  unique (shipment_id, line_no)
);
comment on table erp.shipment_line is 'Shipment lines, the same shape as settlement lines (tax-inclusive amount, 19-digit tax code).';

create table if not exists erp.invoice_reversal (
  id bigint generated always as identity primary key,
  invoice_id bigint not null,
  reason text not null check (reason in ('1', '2', '3', '4')),
  line_nos integer[],
  red_invoice_id bigint,
  requested_at timestamptz not null default now()
);
comment on table erp.invoice_reversal is '红冲申请: the ERP asks for a red invoice of a blue one (invoice_id as tax.invoice_status shows it), whole or by line_nos (the invoice''s line numbers). reason: 1 销货退回, 2 开票有误, 3 服务中止, 4 销售折让. Inserting a row calls tax.enqueue_reversal (reference reversal/<id>) and fills red_invoice_id; the red invoice''s state is in tax.red_invoice_status.';
do $$
begin
  -- an upgraded installation asked for reversals as reversal/<tax-side id> before: new ones start past them
  if not exists (select from erp.invoice_reversal) then
    execute format('alter table erp.invoice_reversal alter column id restart with %s',
      (select coalesce(max(substring(s.reference from '^reversal/([0-9]{1,18})$')::bigint), 0) + 1
         from tax.red_invoice_status s where s.source = 'reference-erp'));
  end if;
end $$;

create table if not exists erp.supplier (
  id bigint generated always as identity primary key,
  code text not null unique constraint supplier_code_is_simple check (code ~ '^[A-Za-z0-9_.-]{1,64}$'),
  name text not null,
  tax_id text,
  cloud_id text,
  created_at timestamptz not null default now()
);
comment on table erp.supplier is 'Suppliers. code is the key the procurement cloud and ASNs use; cloud_id is the supplier''s id in the cloud, when known. Each one is put into erp-cloud (scm.put_supplier) by code: erp-cloud''s supplier id is its own, look it up by code.';

create table if not exists erp.purchase_order (
  id bigint generated always as identity primary key,
  po_no text not null unique,
  supplier_id bigint not null references erp.supplier,
  status text not null default 'draft' constraint purchase_order_status_known check (status in ('draft', 'approved', 'changed', 'closed', 'cancelled')),
  currency text not null default 'CNY' constraint purchase_order_currency_iso check (currency ~ '^[A-Z]{3}$'),
  order_date date not null default current_date,
  purchase_org text,
  note text,
  cloud_status text,
  cloud_ref text,
  cloud_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index if not exists purchase_order_supplier on erp.purchase_order (supplier_id);
comment on table erp.purchase_order is 'Purchase orders of the reference ERP. Approving one publishes it to the procurement cloud through scm.enqueue_order; later changes follow as revisions, closing or cancelling as a close. cloud_status, cloud_ref, cloud_error are written by its on_order callback (erp.on_order); the rest of the cloud side is in scm.order_status.';
comment on column erp.purchase_order.status is 'draft → approved → changed (edited after approval) → closed | cancelled. Only approved / changed / closed / cancelled orders reach the cloud.';
comment on column erp.purchase_order.cloud_status is 'queued / published / revised / closed (the cloud confirmed), rejected (the cloud refused: see cloud_error), undeliverable (retries exhausted).';

create table if not exists erp.purchase_order_line (
  id bigint generated always as identity primary key,
  po_id bigint not null references erp.purchase_order on delete cascade,
  line_no integer not null,
  material_code text not null,
  material_name text not null,
  quantity numeric(18,4) not null constraint purchase_order_line_quantity_positive check (quantity > 0),
  unit text not null default 'PCS',
  price numeric(18,6) not null constraint purchase_order_line_price_not_negative check (price >= 0),
  tax_rate numeric(5,4) not null default 0.13 constraint purchase_order_line_tax_rate_fraction check (tax_rate >= 0 and tax_rate < 1),
  delivery_date date,
  unique (po_id, line_no)
);
comment on table erp.purchase_order_line is 'Purchase order lines: price excludes tax, tax_rate is a fraction (0.13 = 13 %).';

-- Who may do what: the ERP application writes its documents, operators read them. The supplier portal reads the
-- cloud side of orders (scm.order_status, under its RLS), not the ERP's tables.
alter table erp.supplier enable row level security;
alter table erp.purchase_order enable row level security;
alter table erp.purchase_order_line enable row level security;
drop policy if exists "Suppliers see only their own supplier record" on erp.supplier;
drop policy if exists "Suppliers see only their own purchase orders" on erp.purchase_order;
drop policy if exists "Suppliers change only their own purchase orders and cannot hand" on erp.purchase_order;
drop policy if exists "Suppliers see only the lines of their own purchase orders" on erp.purchase_order_line;
drop policy if exists "Operators see every supplier" on erp.supplier;
create policy "Operators see every supplier" on erp.supplier for select to erp_cloud_operator using (true);
drop policy if exists "Operators see every purchase order" on erp.purchase_order;
create policy "Operators see every purchase order" on erp.purchase_order for select to erp_cloud_operator using (true);
drop policy if exists "Operators see every purchase order line" on erp.purchase_order_line;
create policy "Operators see every purchase order line" on erp.purchase_order_line for select to erp_cloud_operator using (true);
drop policy if exists "The ERP sees and changes every supplier's rows" on erp.supplier;
create policy "The ERP sees and changes every supplier's rows" on erp.supplier to erp_cloud_app using (true) with check (true);
drop policy if exists "The ERP sees and changes every purchase order" on erp.purchase_order;
create policy "The ERP sees and changes every purchase order" on erp.purchase_order to erp_cloud_app using (true) with check (true);
drop policy if exists "The ERP sees and changes every purchase order line" on erp.purchase_order_line;
create policy "The ERP sees and changes every purchase order line" on erp.purchase_order_line to erp_cloud_app using (true) with check (true);

-- (an upgraded installation: the product's other roles had grants here when erp was the product's; they go)
revoke all on schema erp from public, erp_cloud_listener, erp_cloud_sso, erp_cloud_supplier_portal;
revoke all on all tables in schema erp from erp_cloud_listener, erp_cloud_sso, erp_cloud_supplier_portal;
grant usage on schema erp to erp_cloud_app, erp_cloud_operator;
grant select, insert, update, delete on erp.customer, erp.settlement, erp.settlement_line, erp.shipment, erp.shipment_line,
  erp.supplier, erp.purchase_order, erp.purchase_order_line to erp_cloud_app;
grant select on erp.invoice_reversal to erp_cloud_app;
grant insert (invoice_id, reason, line_nos) on erp.invoice_reversal to erp_cloud_app;
grant select on erp.customer, erp.settlement, erp.settlement_line, erp.shipment, erp.shipment_line, erp.invoice_reversal,
  erp.supplier, erp.purchase_order, erp.purchase_order_line to erp_cloud_operator;

-- E-invoicing ------------------------------------------------------------------------------------------------------

-- a settlement or shipment as the invoice document of tax.enqueue_invoices (the seller is erp-cloud's tax.config)
create or replace function erp._invoice_document(p_kind text, p_id bigint) returns jsonb
  language sql stable security definer set search_path = '' as $$
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
                       from erp.settlement_line sl where p_kind = 'settlement' and sl.settlement_id = p_id
                     union all
                     select hl.line_no, hl.item_name, hl.tax_code, hl.spec, hl.unit, hl.quantity, hl.unit_price, hl.amount, hl.tax_rate, hl.tax_amount
                       from erp.shipment_line hl where p_kind = 'shipment' and hl.shipment_id = p_id) l), '[]'::jsonb))
    from (select s.invoice_kind, s.settlement_no as no, s.customer_id from erp.settlement s where p_kind = 'settlement' and s.id = p_id
          union all
          select h.invoice_kind, h.shipment_no, h.customer_id from erp.shipment h where p_kind = 'shipment' and h.id = p_id) d
    join erp.customer c on c.id = d.customer_id
$$;
comment on function erp._invoice_document(text, bigint) is 'Internal: settlement or shipment p_id with its lines and its customer as the invoice document tax.enqueue_invoices takes (remark: the document number).';

-- the ERP's rules, then the contract: invoice on the customer's event, a settlement or its shipment, never both
create or replace function erp._issue_invoices(p_kind text, p_id bigint) returns integer
  language plpgsql security definer set search_path = '' as $$
declare
  v_no     text;
  v_on     text;
  v_linked bigint;
  v_ref    text;
begin
  if p_kind = 'settlement' then
    select s.settlement_no, c.invoice_on, s.id into v_no, v_on, v_linked
      from erp.settlement s join erp.customer c on c.id = s.customer_id where s.id = p_id;
  else
    select s.shipment_no, c.invoice_on, s.settlement_id into v_no, v_on, v_linked
      from erp.shipment s join erp.customer c on c.id = s.customer_id where s.id = p_id;
  end if;
  if v_on is distinct from p_kind then
    return 0;
  end if;
  v_ref := p_kind || '/' || v_no;
  -- serialise on the settlement, then look at what erp-cloud holds already
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('erp.issue:settlement:' || coalesce(v_linked, -p_id), 0));
  if exists (select from tax.invoice_status st where st.source = 'reference-erp' and st.reference = v_ref) then
    return 0;  -- approving again issues nothing more
  end if;
  if p_kind = 'settlement' then
    if exists (select from erp.shipment sh join tax.invoice_status st on st.source = 'reference-erp' and st.reference = 'shipment/' || sh.shipment_no
                where sh.settlement_id = p_id) then
      return 0;
    end if;
  elsif v_linked is not null and exists (select from erp.settlement s join tax.invoice_status st on st.source = 'reference-erp' and st.reference = 'settlement/' || s.settlement_no
                                          where s.id = v_linked) then
    return 0;
  end if;
  return pg_catalog.cardinality(tax.enqueue_invoices('reference-erp', v_ref, erp._invoice_document(p_kind, p_id)));
end $$;
comment on function erp._issue_invoices(text, bigint) is 'Internal: hands approved settlement or posted shipment p_id to tax.enqueue_invoices as reference settlement/<no> or shipment/<no> when its customer invoices on that event and neither it nor its linked settlement or shipment was invoiced; returns the number of invoices (0: nothing to do).';

create or replace function erp.tg_settlement__100_stamp() returns trigger
  language plpgsql as $$
begin
  if new.status = 'approved' and old.status is distinct from 'approved' then
    new.approved_at := coalesce(new.approved_at, now());
  end if;
  return new;
end $$;
comment on function erp.tg_settlement__100_stamp() is 'Trigger: an approved settlement gets its approved_at.';
create or replace trigger settlement_100_stamp before update of status on erp.settlement
  for each row execute function erp.tg_settlement__100_stamp();

create or replace function erp.tg_settlement__500_issue() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform erp._issue_invoices('settlement', new.id);
  return null;
end $$;
comment on function erp.tg_settlement__500_issue() is 'Trigger: approving a settlement issues its invoice(s) through tax.enqueue_invoices in the approving transaction (a validation error fails the approval).';
create or replace trigger settlement_500_issue after update of status on erp.settlement
  for each row when (new.status = 'approved' and old.status is distinct from 'approved') execute function erp.tg_settlement__500_issue();

create or replace function erp.tg_shipment__100_stamp() returns trigger
  language plpgsql as $$
begin
  if new.status = 'posted' and old.status is distinct from 'posted' then
    new.posted_at := coalesce(new.posted_at, now());
  end if;
  return new;
end $$;
comment on function erp.tg_shipment__100_stamp() is 'Trigger: a posted shipment gets its posted_at.';
create or replace trigger shipment_100_stamp before update of status on erp.shipment
  for each row execute function erp.tg_shipment__100_stamp();

create or replace function erp.tg_shipment__500_issue() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform erp._issue_invoices('shipment', new.id);
  return null;
end $$;
comment on function erp.tg_shipment__500_issue() is 'Trigger: posting a shipment issues its invoice(s) through tax.enqueue_invoices when its customer invoices on shipment.';
create or replace trigger shipment_500_issue after update of status on erp.shipment
  for each row when (new.status = 'posted' and old.status is distinct from 'posted') execute function erp.tg_shipment__500_issue();

create or replace function erp.tg_invoice_reversal__500_request() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  new.red_invoice_id := tax.enqueue_reversal(new.invoice_id, 'reversal/' || new.id,
    coalesce(case new.reason when '1' then 'return' when '2' then 'error' when '3' then 'service_stopped' when '4' then 'allowance' end,
             new.reason), new.line_nos);  -- another code: the contract refuses it (EI014) before the table's own check would
  return new;
end $$;
comment on function erp.tg_invoice_reversal__500_request() is 'Trigger: a reversal request asks erp-cloud for the red invoice (tax.enqueue_reversal, reference reversal/<id>, reason 1–4 named) and keeps its id; EI013–EI016 refuse the insert.';
create or replace trigger invoice_reversal_500_request before insert on erp.invoice_reversal
  for each row execute function erp.tg_invoice_reversal__500_request();

-- what a reissue uses: the customer row as it is now
create or replace function erp.buyer_of(p_reference text) returns jsonb
  language sql stable security definer set search_path = '' as $$
  select erp._invoice_document(split_part(p_reference, '/', 1),
           case split_part(p_reference, '/', 1)
             when 'settlement' then (select s.id from erp.settlement s where s.settlement_no = substr(p_reference, 12))
             when 'shipment' then (select s.id from erp.shipment s where s.shipment_no = substr(p_reference, 10)) end) -> 'buyer'
$$;
comment on function erp.buyer_of(text) is 'The reference ERP''s refresh_buyer: the buyer of settlement/<no> or shipment/<no> as erp.customer has it now (what a reissue uses).';

-- Procurement ------------------------------------------------------------------------------------------------------

create or replace function erp.tg_purchase_order__100_refuse_delete() returns trigger
  language plpgsql as $$
begin
  if old.status <> 'draft' or old.cloud_status is not null then
    raise exception using errcode = 'ES009',
      message = format('purchase order %s is %s and cannot be deleted', old.po_no, old.status),
      hint = 'Only drafts are deleted. Cancel an approved order instead: the procurement cloud then gets a close.';
  end if;
  return old;
end $$;
comment on function erp.tg_purchase_order__100_refuse_delete() is 'Trigger: only drafts that never reached the cloud can be deleted (ES009); others are cancelled, so the cloud hears of it.';
create or replace trigger purchase_order_100_refuse_delete before delete on erp.purchase_order
  for each row execute function erp.tg_purchase_order__100_refuse_delete();

create or replace function erp.tg_purchase_order__100_validate() returns trigger
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
  -- cloud_status is set once the PO was handed to procurement (erp._enqueue_order, then erp.on_order)
  if tg_op = 'UPDATE' and old.cloud_status is not null and
     (new.po_no, new.supplier_id) is distinct from (old.po_no, old.supplier_id) then
    raise exception using errcode = 'ES003',
      message = format('purchase order %s was published to the procurement cloud: its number and supplier cannot change', old.po_no),
      hint = 'Cancel it (the cloud gets a close) and create a new purchase order for the other number or supplier.';
  end if;
  new.updated_at := now();
  return new;
end $$;
comment on function erp.tg_purchase_order__100_validate() is 'Trigger: allowed status changes (ES001), closed and cancelled orders are final, a published order keeps its number and supplier (ES003).';
create or replace trigger purchase_order_100_validate before insert or update on erp.purchase_order
  for each row execute function erp.tg_purchase_order__100_validate();

create or replace function erp.tg_purchase_order_line__100_validate() returns trigger
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
comment on function erp.tg_purchase_order_line__100_validate() is 'Trigger: lines of closed or cancelled orders are final (ES003).';
create or replace trigger purchase_order_line_100_validate before insert or update or delete on erp.purchase_order_line
  for each row execute function erp.tg_purchase_order_line__100_validate();

-- a purchase order as the order document of scm.enqueue_order
create or replace function erp._order_document(p_po_id bigint) returns jsonb
  language sql stable security definer set search_path = '' as $$
  select jsonb_build_object(
           'po_no', po.po_no,
           'supplier', jsonb_build_object('code', s.code, 'name', s.name, 'tax_id', s.tax_id, 'cloud_id', s.cloud_id),
           'currency', po.currency, 'order_date', po.order_date, 'purchase_org', po.purchase_org, 'note', po.note,
           'lines', coalesce((select jsonb_agg(jsonb_build_object('line_no', l.line_no, 'material_code', l.material_code,
                                 'material_name', l.material_name, 'quantity', l.quantity, 'unit', l.unit, 'price', l.price,
                                 'tax_rate', l.tax_rate, 'delivery_date', l.delivery_date) order by l.line_no)
                                from erp.purchase_order_line l where l.po_id = po.id), '[]'::jsonb))
    from erp.purchase_order po join erp.supplier s on s.id = po.supplier_id
   where po.id = p_po_id
$$;
comment on function erp._order_document(bigint) is 'Internal: purchase order p_po_id with its lines and its supplier as the order document scm.enqueue_order takes.';

create or replace function erp._enqueue_order(p_po_id bigint) returns void
  language plpgsql security definer set search_path = '' as $$
declare
  po erp.purchase_order;
  v  scm.order_enqueued;
begin
  select * into po from erp.purchase_order where id = p_po_id for update;
  if not found or po.status = 'draft' then
    return;
  end if;
  if po.status in ('closed', 'cancelled') then
    -- a draft that is cancelled was never handed in: nothing to close
    if exists (select from scm.order_status o where o.source = 'reference-erp' and o.reference = po.po_no) then
      if scm.enqueue_order_close('reference-erp', po.po_no, po.status) is not null then
        update erp.purchase_order set cloud_status = 'queued', cloud_error = null where id = po.id;
      end if;
    end if;
    return;
  end if;
  v := scm.enqueue_order('reference-erp', po.po_no, erp._order_document(po.id));
  if v.operation is not null then
    update erp.purchase_order set cloud_status = 'queued', cloud_error = null where id = po.id and cloud_status is distinct from 'queued';
  end if;
end $$;
comment on function erp._enqueue_order(bigint) is 'Internal: at commit, an approved or changed purchase order goes to scm.enqueue_order (reference: its po_no; the payload hash decides publish, revise or nothing), a closed or cancelled one to scm.enqueue_order_close; the order says queued when something was enqueued.';

create or replace function erp.tg_purchase_order__500_enqueue() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform erp._enqueue_order(new.id);
  return null;
end $$;
comment on function erp.tg_purchase_order__500_enqueue() is 'Deferred trigger on purchase orders: at commit, hand the order as it is then to the procurement contract.';
drop trigger if exists purchase_order_500_enqueue on erp.purchase_order;
create constraint trigger purchase_order_500_enqueue after insert or update on erp.purchase_order
  deferrable initially deferred for each row execute function erp.tg_purchase_order__500_enqueue();

create or replace function erp.tg_purchase_order_line__500_enqueue() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform erp._enqueue_order(case when tg_op = 'DELETE' then old.po_id else new.po_id end);
  return null;
end $$;
comment on function erp.tg_purchase_order_line__500_enqueue() is 'Deferred trigger on purchase order lines: at commit, hand their order as it is then to the procurement contract.';
drop trigger if exists purchase_order_line_500_enqueue on erp.purchase_order_line;
create constraint trigger purchase_order_line_500_enqueue after insert or update or delete on erp.purchase_order_line
  deferrable initially deferred for each row execute function erp.tg_purchase_order_line__500_enqueue();

create or replace function erp.tg_supplier__500_put() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform scm.put_supplier(new.code, new.name, new.tax_id, new.cloud_id);
  return null;
end $$;
comment on function erp.tg_supplier__500_put() is 'Trigger: a supplier the ERP adds or changes is put into erp-cloud by code (scm.put_supplier), so a portal login can be bound to it before any order of it is published.';
create or replace trigger supplier_500_put after insert or update on erp.supplier
  for each row execute function erp.tg_supplier__500_put();

-- the on_order callback: the ERP's own three columns
create or replace function erp.on_order(p_result scm.order_result) returns void
  language plpgsql security definer set search_path = '' as $$
begin
  update erp.purchase_order po
     set cloud_status = p_result.cloud_status, cloud_ref = p_result.cloud_ref, cloud_error = p_result.cloud_error
   where po.po_no = p_result.reference
     and (po.cloud_status, po.cloud_ref, po.cloud_error) is distinct from (p_result.cloud_status, p_result.cloud_ref, p_result.cloud_error);
end $$;
comment on function erp.on_order(scm.order_result) is 'The reference ERP''s on_order: writes the cloud status, the cloud''s order id and its refusal into erp.purchase_order (by po_no, its reference).';

revoke all on all functions in schema erp from public, erp_cloud_app, erp_cloud_operator, erp_cloud_listener, erp_cloud_sso,
  erp_cloud_supplier_portal;  -- triggers and callbacks run without anybody's EXECUTE; nobody calls them
reset role;

-- Registration: the callbacks and how the reference ERP calls the documents' fields (messages use these names).
select tax.put_source('reference-erp', p_document_label => 'document', p_refresh_buyer => 'erp.buyer_of(text)',
  p_field_names => '{"buyer.name": "erp.customer.name", "buyer.tax_id": "erp.customer.tax_id", "buyer.address": "erp.customer.address",
    "buyer.phone": "erp.customer.phone", "buyer.bank_name": "erp.customer.bank_name", "buyer.bank_account": "erp.customer.bank_account",
    "buyer.email": "erp.customer.email", "buyer.tax_id_check_override": "erp.customer.tax_id_check_override",
    "kind": "invoice_kind", "remark": "the document number"}');
select scm.put_source('reference-erp', p_document_label => 'purchase order', p_on_order => 'erp.on_order(scm.order_result)',
  p_field_names => '{"reference": "erp.purchase_order.po_no", "po_no": "erp.purchase_order.po_no", "supplier.code": "erp.supplier.code",
    "supplier.name": "erp.supplier.name", "supplier.tax_id": "erp.supplier.tax_id", "supplier.cloud_id": "erp.supplier.cloud_id",
    "currency": "erp.purchase_order.currency", "order_date": "erp.purchase_order.order_date",
    "purchase_org": "erp.purchase_order.purchase_org", "note": "erp.purchase_order.note",
    "lines[].line_no": "erp.purchase_order_line.line_no", "lines[].material_code": "erp.purchase_order_line.material_code",
    "lines[].material_name": "erp.purchase_order_line.material_name", "lines[].quantity": "erp.purchase_order_line.quantity",
    "lines[].unit": "erp.purchase_order_line.unit", "lines[].price": "erp.purchase_order_line.price",
    "lines[].tax_rate": "erp.purchase_order_line.tax_rate", "lines[].delivery_date": "erp.purchase_order_line.delivery_date"}');
