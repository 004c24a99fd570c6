-- 0020 — procurement gets the shape e-invoicing got in 0018 + 0019 (ADR 0001
-- §2.7–2.9, §3.5; the ADR's 0021 and 0022 in one file, because the order
-- store and the ASN store only make sense together): erp-cloud keeps its own
-- procurement store in scm, any ERP publishes, revises and closes an order
-- through a contract keyed by its own (source, reference), and reads the
-- results through views and callbacks.
--
-- 1. Sources: scm.source registers an ERP (its label for an order, its
--    on_order and on_asn callbacks, what its fields are called);
--    scm.put_source writes it; scm.contract_field lists the contract's paths.
-- 2. The store: scm.supplier (copied from erp.supplier with the same ids, so
--    every RLS policy and portal binding stays valid), scm.purchase_order /
--    scm.purchase_order_line (the cloud side of every PO that left draft,
--    same ids; cloud_revision, cloud_payload_hash, cloud_synced_at and
--    supplier_confirmed_at move here from erp.purchase_order), and the ASNs
--    moved in place: erp.asn_document → scm.asn (source → received_via, new
--    delivered_at, delivery_error), erp.asn_line → scm.asn_line (ids,
--    sequences, the GIN index, RLS policies and column grants move with
--    them). Outbox rows of every status say scm.purchase_order now.
-- 3. Contracts: scm.enqueue_order(source, reference, order jsonb) validates in
--    the caller's terms and publishes / revises / sends nothing (the payload
--    hash decides; one revision per transaction), scm.enqueue_order_close,
--    scm.put_supplier; views scm.order_status and scm.asn_status (RLS of the
--    supplier portal applies through them).
-- 4. Results: the source's on_order is called with a scm.order_result in the
--    transaction that changed the order's cloud state; an accepted ASN is
--    delivered to the on_asn of its order's source in the ingest
--    transaction. A failing callback never fails that transaction
--    (scm.callback_failure, scm.replay_callbacks).
-- 5. The reference ERP goes the contract's way (transitional, until 0025):
--    its triggers call scm._sync_purchase_order, which builds the order
--    document from erp.purchase_order(_line) / erp.supplier and calls the
--    contract; its cloud_status, cloud_ref, cloud_error are written by its
--    on_order callback erp.on_order. Compatibility views erp.asn_document and
--    erp.asn_line keep an upgraded installation's readers working.
--
-- SQLSTATEs added:
--   ES019  order document malformed (a field missing or of the wrong type; DETAIL: its JSON path)
--   ES020  procurement source not registered
--   ES021  invalid procurement source registration
--   ES022  order number already used by another reference
--   ES023  no order under this (source, reference)

-- nothing is enqueued or completed against the old names while the store moves
lock table cloud.outbox in share row exclusive mode;

-- 1. Sources -----------------------------------------------------------------

create table scm.contract_field (
  path    text primary key,
  meaning text not null
);
comment on table scm.contract_field is 'The paths of the order document (scm.enqueue_order) a source may name in its field map (scm.put_source p_field_names): reference, po_no, supplier.*, lines[].* ….';
comment on column scm.contract_field.path is 'A path of the contract: supplier.code, lines[].quantity …';
comment on column scm.contract_field.meaning is 'What the field is, in one line.';
insert into scm.contract_field (path, meaning) values
  ('reference', 'the caller''s key of the order (p_reference)'),
  ('po_no', 'the order number the supplier sees; unique across sources'),
  ('supplier', 'the supplier object'),
  ('supplier.code', 'the supplier''s code, the key the procurement cloud and ASNs use'),
  ('supplier.name', 'the supplier''s name'),
  ('supplier.tax_id', 'the supplier''s 统一社会信用代码'),
  ('supplier.cloud_id', 'the supplier''s id in the procurement cloud, when known'),
  ('currency', 'ISO 4217 code, default CNY'),
  ('order_date', 'the order date, yyyy-mm-dd'),
  ('purchase_org', 'the purchasing organisation'),
  ('note', 'a remark for the supplier'),
  ('lines', 'the order''s lines'),
  ('lines[].line_no', 'the caller''s line number, unique in the order; ASNs name it'),
  ('lines[].material_code', 'material code'),
  ('lines[].material_name', 'material name'),
  ('lines[].quantity', 'ordered quantity, positive'),
  ('lines[].unit', 'unit of measure, default PCS'),
  ('lines[].price', 'unit price excluding tax, not negative'),
  ('lines[].tax_rate', 'tax rate as a fraction: 0.13, default 0.13'),
  ('lines[].delivery_date', 'requested delivery date, yyyy-mm-dd');
revoke all on scm.contract_field from public;
grant select on scm.contract_field to erp_cloud_app, erp_cloud_operator;

create table scm.source (
  name           text primary key constraint source_name check (name ~ '^[a-z][a-z0-9_-]{0,39}$'),
  document_label text not null default 'purchase order',
  on_order       regprocedure,
  on_asn         regprocedure,
  field_names    jsonb not null default '{}',
  created_at     timestamptz not null default now(),
  updated_at     timestamptz not null default now()
);
comment on table scm.source is 'An ERP (or one of its order types) that hands purchase orders to scm.enqueue_order. Written by scm.put_source.';
comment on column scm.source.name is 'The p_source every contract call names: lower-case letters, digits, - and _.';
comment on column scm.source.document_label is 'How messages name one of its orders: 采购订单 PO-0001.';
comment on column scm.source.on_order is 'f(scm.order_result) returns void, called in the transaction that changed the cloud state of one of its orders; null: no callback.';
comment on column scm.source.on_asn is 'f(scm.asn_delivery) returns void, called in the transaction that accepted an ASN against one of its orders; null: ASNs are only kept (scm.asn_status).';
comment on column scm.source.field_names is 'Contract path → the caller''s name for it ({"lines[].quantity": "po_line.sl"}); messages and hints use these names.';
revoke all on scm.source from public;
grant select on scm.source to erp_cloud_operator;

-- the reference ERP's orders (transitional: 0025 makes it an example that registers itself)
insert into scm.source (name, document_label, field_names) values ('reference-erp', 'purchase order',
  '{"reference": "erp.purchase_order.po_no", "po_no": "erp.purchase_order.po_no", "supplier.code": "erp.supplier.code",
    "supplier.name": "erp.supplier.name", "supplier.tax_id": "erp.supplier.tax_id", "supplier.cloud_id": "erp.supplier.cloud_id",
    "currency": "erp.purchase_order.currency", "order_date": "erp.purchase_order.order_date",
    "purchase_org": "erp.purchase_order.purchase_org", "note": "erp.purchase_order.note",
    "lines[].line_no": "erp.purchase_order_line.line_no", "lines[].material_code": "erp.purchase_order_line.material_code",
    "lines[].material_name": "erp.purchase_order_line.material_name", "lines[].quantity": "erp.purchase_order_line.quantity",
    "lines[].unit": "erp.purchase_order_line.unit", "lines[].price": "erp.purchase_order_line.price",
    "lines[].tax_rate": "erp.purchase_order_line.tax_rate", "lines[].delivery_date": "erp.purchase_order_line.delivery_date"}');

create table scm.callback_failure (
  id          bigint generated always as identity primary key,
  source      text not null references scm.source (name) on delete cascade,
  event       text not null constraint callback_failure_event check (event in ('order', 'asn')),
  object_id   bigint not null,
  sqlstate    text not null,
  message     text not null,
  failed_at   timestamptz not null default now(),
  replayed_at timestamptz
);
create index callback_failure_unreplayed on scm.callback_failure (source, failed_at) where replayed_at is null;
comment on table scm.callback_failure is 'A source''s on_order or on_asn that raised: its own writes were rolled back, the transaction that called it committed. scm.replay_callbacks calls it again.';
comment on column scm.callback_failure.event is 'order: on_order for scm.purchase_order object_id; asn: on_asn for scm.asn object_id.';
comment on column scm.callback_failure.object_id is 'The order (event order) or ASN (event asn) the callback was called for.';
comment on column scm.callback_failure.replayed_at is 'When scm.replay_callbacks called the source again for this failure (null: not yet).';
revoke all on scm.callback_failure from public;
grant select on scm.callback_failure to erp_cloud_operator;

create type scm.order_result as (
  order_id              bigint,
  source                text,
  reference             text,
  po_no                 text,
  state                 text,
  operation             text,
  cloud_status          text,
  cloud_ref             text,
  cloud_error           text,
  revision              integer,
  synced_at             timestamptz,
  supplier_confirmed_at timestamptz
);
comment on type scm.order_result is 'What a source''s on_order callback receives: the whole current state of one order: state (open, closed, cancelled), the last operation handed to the cloud (publish, revise, close), cloud_status (queued, published, revised, closed, rejected, undeliverable), the cloud''s order id (cloud_ref), its refusal (cloud_error), the revision, when the cloud last answered, and when the supplier confirmed it.';

create type scm.order_enqueued as (
  order_id   bigint,
  operation  text,
  request_id uuid
);
comment on type scm.order_enqueued is 'What scm.enqueue_order returns: the order''s id, the operation this call enqueued (publish, revise; null: the cloud has this order already, nothing sent) and the message''s request_id.';

create type scm.asn_delivery_line as (
  line_no         integer,
  po_line_no      integer,
  material_code   text,
  batch_no        text,
  quantity        numeric(18,4),
  production_date date
);
comment on type scm.asn_delivery_line is 'One line of a delivered ASN: which line of the order (po_line_no, the caller''s lines[].line_no) is shipped, how much, which batch.';

create type scm.asn_delivery as (
  asn_id          bigint,
  source          text,
  order_reference text,
  po_no           text,
  asn_no          text,
  supplier_code   text,
  ship_date       date,
  eta             date,
  carrier         text,
  tracking_no     text,
  received_via    text,
  lines           scm.asn_delivery_line[],
  detail          jsonb
);
comment on type scm.asn_delivery is 'What a source''s on_asn callback receives: an accepted ASN (发货单) against one of its orders, by the order''s reference, with its lines and the original document (detail).';

create type scm.validation_context as (
  source         text,
  reference      text,
  document_label text,
  field_names    jsonb
);
comment on type scm.validation_context is 'Internal: who is validated, so a message names the caller''s order and fields.';

create function scm._check_callback(p_fn regprocedure, p_arg regtype, p_what text) returns void
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  p pg_proc;
begin
  select * into p from pg_proc where oid = p_fn;
  if p.pronargs <> 1 or p.proargtypes[0] <> p_arg or p.prorettype <> 'void'::regtype then
    raise exception using errcode = 'ES021', message = format('%s %s must take one %s and return void', p_what, p_fn, p_arg),
      hint = format('Declare it as f(%s) returns void.', p_arg);
  end if;
  if not p.prosecdef or not exists (select from unnest(p.proconfig) c where c like 'search_path=%') then
    raise exception using errcode = 'ES021', message = format('%s %s must be SECURITY DEFINER with its own search_path', p_what, p_fn),
      hint = 'It runs inside erp-cloud''s transaction: declare it SECURITY DEFINER SET search_path = '''' so it runs with its owner''s (the ERP''s) rights.';
  end if;
  if (select rolsuper from pg_roles where oid = p.proowner) then
    raise exception using errcode = 'ES021', message = format('%s %s is owned by a superuser', p_what, p_fn),
      hint = 'Make the ERP''s own role its owner (ALTER FUNCTION … OWNER TO), so it runs with the ERP''s rights, not the migrator''s.';
  end if;
end $$;
comment on function scm._check_callback(regprocedure, regtype, text) is 'Internal: ES021 unless a function a source registers takes the contract''s type and returns void, is SECURITY DEFINER with a search_path, and is not owned by a superuser.';
revoke all on function scm._check_callback(regprocedure, regtype, text) from public;

create function scm.put_source(
  p_name           text,
  p_document_label text default null,          -- how messages name an order of this source
  p_on_order       regprocedure default null,  -- f(scm.order_result) returns void
  p_on_asn         regprocedure default null,  -- f(scm.asn_delivery) returns void
  p_field_names    jsonb default null,          -- {"lines[].quantity": "po_line.sl", …}
  p_unset          text[] default '{}'         -- document_label, on_order, on_asn, field_names: back to the default
) returns scm.source
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_bad text;
  v_row scm.source;
begin
  if p_name is null or p_name !~ '^[a-z][a-z0-9_-]{0,39}$' then
    raise exception using errcode = 'ES021', message = format('source name %L is not 1–40 lower-case letters, digits, - or _, starting with a letter', p_name),
      hint = 'Name the ERP or its order type: acme, odoo-purchase.';
  end if;
  select u into v_bad from unnest(p_unset) u where u not in ('document_label', 'on_order', 'on_asn', 'field_names') limit 1;
  if v_bad is not null then
    raise exception using errcode = 'ES021', message = format('p_unset names %L, which scm.put_source does not set', v_bad),
      hint = 'p_unset takes document_label, on_order, on_asn and field_names.';
  end if;
  if p_on_order is not null then
    perform scm._check_callback(p_on_order, 'scm.order_result'::regtype, 'on_order');
  end if;
  if p_on_asn is not null then
    perform scm._check_callback(p_on_asn, 'scm.asn_delivery'::regtype, 'on_asn');
  end if;
  if p_field_names is not null then
    if jsonb_typeof(p_field_names) <> 'object' then
      raise exception using errcode = 'ES021', message = 'p_field_names must be a JSON object of contract path → your name',
        hint = 'For example {"lines[].quantity": "po_line.sl"}; the paths are in scm.contract_field.';
    end if;
    select k into v_bad from jsonb_object_keys(p_field_names) k where not exists (select from scm.contract_field f where f.path = k) limit 1;
    if v_bad is not null then
      raise exception using errcode = 'ES021', message = format('p_field_names: %L is not a path of the order document', v_bad),
        hint = 'The paths are listed in scm.contract_field (po_no, supplier.code, lines[].quantity …).';
    end if;
    select e.key into v_bad from jsonb_each(p_field_names) e where jsonb_typeof(e.value) <> 'string' or btrim(e.value #>> '{}') = '' limit 1;
    if v_bad is not null then
      raise exception using errcode = 'ES021', message = format('p_field_names: the name given for %L is not a non-empty string', v_bad),
        hint = 'Give your column as messages should name it: "po_head.djbh".';
    end if;
  end if;
  insert into scm.source as s (name, document_label, on_order, on_asn, field_names)
  values (p_name, coalesce(p_document_label, 'purchase order'), p_on_order, p_on_asn, coalesce(p_field_names, '{}'))
  on conflict (name) do update
     set document_label = case when 'document_label' = any (p_unset) then 'purchase order' else coalesce(p_document_label, s.document_label) end,
         on_order       = case when 'on_order' = any (p_unset) then null else coalesce(p_on_order, s.on_order) end,
         on_asn         = case when 'on_asn' = any (p_unset) then null else coalesce(p_on_asn, s.on_asn) end,
         field_names    = case when 'field_names' = any (p_unset) then '{}' else coalesce(p_field_names, s.field_names) end,
         updated_at     = now()
  returning * into v_row;
  return v_row;
end $$;
comment on function scm.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) is 'Operator: registers or changes a procurement source. A parameter not given keeps its value; p_unset clears one. ES021 for a bad name, a callback of the wrong signature, not SECURITY DEFINER with a search_path or owned by a superuser, or a field map naming an unknown path.';
revoke all on function scm.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) from public;
grant execute on function scm.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) to erp_cloud_operator;

create function scm._source(p_source text) returns scm.source
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  v scm.source;
begin
  select * into v from scm.source where name = p_source;
  if not found then
    raise exception using errcode = 'ES020', message = format('procurement source %L is not registered', p_source),
      hint = 'An operator registers it once with scm.put_source(''<name>'', …); see scm.source for the registered ones.';
  end if;
  return v;
end $$;
comment on function scm._source(text) is 'Internal: the registered source, ES020 if there is none.';
revoke all on function scm._source(text) from public;

-- 2. The store ------------------------------------------------------------------

-- 2a. suppliers: erp-cloud's copy, same ids (scm.portal_login and every policy keep their meaning)
create table scm.supplier (
  id         bigint generated by default as identity primary key,
  code       text not null constraint supplier_code_key unique constraint supplier_code_is_simple check (code ~ '^[A-Za-z0-9_.-]{1,64}$'),
  name       text not null,
  tax_id     text,
  cloud_id   text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on table scm.supplier is 'The suppliers erp-cloud publishes orders to and takes ASNs from, by code (the key the procurement cloud and ASNs use); cloud_id is the supplier''s id in the cloud, when known. Written by scm.put_supplier and by the order documents; the supplier portal''s RLS is keyed on this id.';
insert into scm.supplier (id, code, name, tax_id, cloud_id, created_at)
  overriding system value
  select id, code, name, tax_id, cloud_id, created_at from erp.supplier order by id;
select setval(pg_get_serial_sequence('scm.supplier', 'id'), greatest((select max(id) from scm.supplier), 1), (select max(id) from scm.supplier) is not null);

alter table scm.portal_login drop constraint portal_login_supplier_id_fkey;
alter table scm.portal_login add constraint portal_login_supplier_id_fkey foreign key (supplier_id) references scm.supplier (id);

alter table scm.supplier enable row level security;
create policy "Operators see every supplier" on scm.supplier for select to erp_cloud_operator using (true);
create policy "Suppliers see only their own supplier record" on scm.supplier for select to erp_cloud_supplier_portal
  using (id = (select scm.current_supplier_id()));
create policy "The ERP sees every supplier" on scm.supplier for select to erp_cloud_app using (true);
revoke all on scm.supplier from public;
grant select on scm.supplier to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;

-- 2b. purchase orders: the cloud side of every PO that left draft, same ids
create table scm.purchase_order (
  id                    bigint generated by default as identity primary key,
  source                text not null references scm.source (name),
  reference             text not null,
  po_no                 text not null constraint purchase_order_po_no_key unique,
  supplier_id           bigint not null references scm.supplier (id),
  currency              text not null default 'CNY' constraint purchase_order_currency_iso check (currency ~ '^[A-Z]{3}$'),
  order_date            date not null,
  purchase_org          text,
  note                  text,
  state                 text not null default 'open' constraint purchase_order_state_known check (state in ('open', 'closed', 'cancelled')),
  supplier_confirmed_at timestamptz,
  cloud_status          text,
  cloud_ref             text,
  cloud_error           text,
  cloud_revision        integer,
  cloud_payload_hash    text,
  cloud_synced_at       timestamptz,
  last_operation        text constraint purchase_order_last_operation_known check (last_operation in ('publish', 'revise', 'close')),
  doc                   jsonb,
  created_at            timestamptz not null default now(),
  updated_at            timestamptz not null default now(),
  constraint purchase_order_source_reference_key unique (source, reference)
);
create index purchase_order_supplier on scm.purchase_order (supplier_id);
comment on table scm.purchase_order is 'The purchase orders erp-cloud publishes, by the caller''s (source, reference): the order as the cloud has it (header here, lines in scm.purchase_order_line, the document as handed in as doc), its state, and the cloud''s side (cloud_*). Written by scm.enqueue_order(_close) and the write-backs; the supplier portal sees its own (RLS) and writes supplier_confirmed_at.';
comment on column scm.purchase_order.state is 'open (published or revised), closed or cancelled (final: a close went or goes to the cloud).';
comment on column scm.purchase_order.cloud_status is 'queued / published / revised / closed (the cloud confirmed), rejected (the cloud refused: see cloud_error), undeliverable (retries exhausted).';
comment on column scm.purchase_order.cloud_revision is 'How many messages about this order went to the outbox, minus one: 0 is the publication, 1.. the revisions; null: nothing sent.';
comment on column scm.purchase_order.cloud_payload_hash is 'md5 of the last publish payload enqueued (''closed'' once the close is): a revision is sent only when the payload changes.';
comment on column scm.purchase_order.last_operation is 'The last operation handed to the cloud: publish, revise or close.';
comment on column scm.purchase_order.doc is 'The order document as last handed in (null for orders from before release 0020 that were not handed in again).';

create table scm.purchase_order_line (
  id            bigint generated always as identity primary key,
  po_id         bigint not null references scm.purchase_order (id) on delete cascade,
  line_no       integer not null,
  material_code text not null,
  material_name text not null,
  quantity      numeric(18,4) not null constraint purchase_order_line_quantity_positive check (quantity > 0),
  unit          text not null default 'PCS',
  price         numeric(18,6) not null constraint purchase_order_line_price_not_negative check (price >= 0),
  tax_rate      numeric(5,4) not null default 0.13 constraint purchase_order_line_tax_rate_fraction check (tax_rate >= 0 and tax_rate < 1),
  delivery_date date,
  constraint purchase_order_line_po_id_line_no_key unique (po_id, line_no)
);
comment on table scm.purchase_order_line is 'The lines of an order as the cloud has them (line_no is the caller''s lines[].line_no, which ASNs name): price excludes tax, tax_rate is a fraction (0.13 = 13 %).';

insert into scm.purchase_order (id, source, reference, po_no, supplier_id, currency, order_date, purchase_org, note, state,
                                supplier_confirmed_at, cloud_status, cloud_ref, cloud_error, cloud_revision, cloud_payload_hash,
                                cloud_synced_at, last_operation, created_at, updated_at)
  overriding system value
  select po.id, 'reference-erp', po.po_no, po.po_no, po.supplier_id, po.currency, po.order_date, po.purchase_org, po.note,
         case po.status when 'closed' then 'closed' when 'cancelled' then 'cancelled' else 'open' end,
         po.supplier_confirmed_at, po.cloud_status, po.cloud_ref, po.cloud_error, po.cloud_revision, po.cloud_payload_hash,
         po.cloud_synced_at,
         case when po.cloud_payload_hash = 'closed' then 'close' when po.cloud_revision = 0 then 'publish' when po.cloud_revision > 0 then 'revise' end,
         po.created_at, po.updated_at
    from erp.purchase_order po
   where po.status <> 'draft' or po.cloud_revision is not null
   order by po.id;
insert into scm.purchase_order_line (po_id, line_no, material_code, material_name, quantity, unit, price, tax_rate, delivery_date)
  select l.po_id, l.line_no, l.material_code, l.material_name, l.quantity, l.unit, l.price, l.tax_rate, l.delivery_date
    from erp.purchase_order_line l join scm.purchase_order p on p.id = l.po_id
   order by l.po_id, l.line_no;
select setval(pg_get_serial_sequence('scm.purchase_order', 'id'),
              greatest((select max(id) from scm.purchase_order), (select max(id) from erp.purchase_order), 1),
              coalesce((select max(id) from scm.purchase_order), (select max(id) from erp.purchase_order)) is not null);

alter table scm.purchase_order enable row level security;
alter table scm.purchase_order_line enable row level security;
create policy "Operators see every purchase order" on scm.purchase_order for select to erp_cloud_operator using (true);
create policy "Suppliers see only their own purchase orders" on scm.purchase_order for select to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id()));
create policy "Suppliers change only their own purchase orders" on scm.purchase_order
  for update to erp_cloud_supplier_portal
  using (supplier_id = (select scm.current_supplier_id())) with check (supplier_id = (select scm.current_supplier_id()));
create policy "The ERP sees every purchase order" on scm.purchase_order for select to erp_cloud_app using (true);
create policy "Operators see every purchase order line" on scm.purchase_order_line for select to erp_cloud_operator using (true);
create policy "Suppliers see only the lines of their own purchase orders" on scm.purchase_order_line for select to erp_cloud_supplier_portal
  using (exists (select from scm.purchase_order po where po.id = purchase_order_line.po_id and po.supplier_id = (select scm.current_supplier_id())));
create policy "The ERP sees every purchase order line" on scm.purchase_order_line for select to erp_cloud_app using (true);
revoke all on scm.purchase_order, scm.purchase_order_line from public;
grant select on scm.purchase_order, scm.purchase_order_line to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;
grant update (supplier_confirmed_at) on scm.purchase_order to erp_cloud_supplier_portal;

-- 2c. ASNs: moved in place (ids, sequences, the GIN index, policies and column grants move with the tables)
alter table erp.asn_document set schema scm;
alter table scm.asn_document rename to asn;
alter table scm.asn rename column source to received_via;
alter sequence scm.asn_document_id_seq rename to asn_id_seq;
alter table scm.asn rename constraint asn_document_pkey to asn_pkey;
alter table scm.asn rename constraint asn_document_cloud_event_id_key to asn_cloud_event_id_key;
alter table scm.asn rename constraint asn_document_supplier_code_asn_no_key to asn_supplier_code_asn_no_key;
alter table scm.asn rename constraint asn_document_detail_object to asn_detail_object;
alter table scm.asn rename constraint asn_document_rejection_has_reason to asn_rejection_has_reason;
alter table scm.asn rename constraint asn_document_source_known to asn_received_via_known;
alter table scm.asn rename constraint asn_document_status_known to asn_status_known;
alter index scm.asn_document_detail rename to asn_detail;
alter index scm.asn_document_po rename to asn_po;
alter index scm.asn_document_supplier rename to asn_supplier;
alter table scm.asn drop constraint asn_document_po_id_fkey;
alter table scm.asn drop constraint asn_document_supplier_id_fkey;
-- an ASN whose PO never left draft (it was rejected) keeps po_no and loses the link
update scm.asn a set po_id = null where a.po_id is not null and not exists (select from scm.purchase_order p where p.id = a.po_id);
alter table scm.asn add constraint asn_po_id_fkey foreign key (po_id) references scm.purchase_order (id);
alter table scm.asn add constraint asn_supplier_id_fkey foreign key (supplier_id) references scm.supplier (id);
alter table scm.asn add column delivered_at timestamptz, add column delivery_error text;
comment on table scm.asn is 'Advance shipping notices (发货单) from suppliers, written only by scm.ingest_asn. Rejected ones are kept with reject_code (ES010..ES016) and reject_reason and are not delivered; accepted ones are delivered to the on_asn of their order''s source (delivered_at, or delivery_error). detail is the original document as received (GIN-indexed, scm.search_asn_lines).';
comment on column scm.asn.received_via is 'How it arrived: push (webhook), pull (delivery list fetched by the listener), shared_db (postgres_fdw copy), portal (scm.submit_asn).';
comment on column scm.asn.delivered_at is 'When the on_asn of the order''s source took it (null: not delivered: rejected, no on_asn registered, or the callback failed).';
comment on column scm.asn.delivery_error is 'Why the last delivery to on_asn failed (SQLSTATE: message); scm.replay_callbacks delivers it again.';

alter table erp.asn_line set schema scm;
comment on table scm.asn_line is 'ASN lines: which PO line is shipped, how much, which batch.';

-- compatibility views for an upgraded installation's readers (read-only, the old names)
create view erp.asn_document with (security_invoker = true) as
  select a.id, a.asn_no, a.supplier_code, a.supplier_id, a.po_no, a.po_id, a.ship_date, a.eta, a.carrier, a.tracking_no,
         a.status, a.reject_code, a.reject_reason, a.detail, a.received_via as source, a.cloud_event_id, a.received_at
    from scm.asn a;
comment on view erp.asn_document is 'Compatibility view (read-only) for readers of an installation upgraded past release 0020: the ASNs, which live in scm.asn now (source is scm.asn.received_via). Read scm.asn_status instead.';
create view erp.asn_line with (security_invoker = true) as
  select l.id, l.asn_id, l.line_no, l.po_line_no, l.material_code, l.batch_no, l.quantity, l.production_date from scm.asn_line l;
comment on view erp.asn_line is 'Compatibility view (read-only) for readers of an installation upgraded past release 0020: the ASN lines, which live in scm.asn_line now. Read scm.asn_status.lines instead.';
grant select on erp.asn_document, erp.asn_line to erp_cloud_app, erp_cloud_operator;

-- 2d. the outbox: messages about a PO name it by its new table (same id)
update cloud.outbox
   set aggregate_type = 'scm.purchase_order',
       ordering_key = case when ordering_key like 'erp.purchase_order:%' then 'scm.purchase_order:' || substr(ordering_key, 20) else ordering_key end
 where aggregate_type = 'erp.purchase_order';

-- 2e. the reference ERP's columns that were erp-cloud's (copied above)
alter table erp.purchase_order drop column cloud_revision, drop column cloud_payload_hash, drop column cloud_synced_at,
  drop column supplier_confirmed_at;
comment on table erp.purchase_order is 'Purchase orders of the reference ERP. Approving one publishes it to the procurement cloud through scm.enqueue_order; later changes follow as revisions, closing or cancelling as a close. cloud_status, cloud_ref, cloud_error are written by its on_order callback (erp.on_order); the rest of the cloud side is in scm.order_status.';

-- 3. Functions re-pointed to the store -------------------------------------------

create or replace function scm._shipped_quantity(p_po_id bigint, p_line_no integer) returns numeric
  language sql stable as $$
  select coalesce(sum(al.quantity), 0)
    from scm.asn ad join scm.asn_line al on al.asn_id = ad.id
   where ad.po_id = p_po_id and ad.status = 'accepted' and al.po_line_no = p_line_no
$$;

drop function scm._asn_rejection(jsonb, erp.supplier, erp.purchase_order);
create function scm._asn_rejection(p_doc jsonb, p_supplier scm.supplier, p_po scm.purchase_order) returns text[]
  language plpgsql stable as $$
declare
  d jsonb;
  v_line scm.purchase_order_line;
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
  if p_po.state <> 'open' then
    return array['ES016', format('purchase order %s is %s and takes no deliveries', p_po.po_no, p_po.state)];
  end if;
  for d in select value from jsonb_array_elements(p_doc -> 'details') loop
    select * into v_line from scm.purchase_order_line l where l.po_id = p_po.id and l.line_no = (d ->> 'orderDetailId')::integer;
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
      from scm.purchase_order_line l where l.po_id = p_po.id and l.line_no = t.line_no;
    if t.qty > v_open then
      return array['ES015', format('line %s of %s: %s shipped but only %s still open', t.line_no, p_po.po_no, t.qty, greatest(v_open, 0))];
    end if;
  end loop;
  return null;
end $$;
comment on function scm._asn_rejection(jsonb, scm.supplier, scm.purchase_order) is 'Internal: why an ASN must be rejected ([code, reason]), or null when it is acceptable: checked against the orders erp-cloud knows (scm.purchase_order(_line)).';
revoke all on function scm._asn_rejection(jsonb, scm.supplier, scm.purchase_order) from public;

create or replace function scm.act_as_supplier(p_supplier_code text) returns bigint
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
  select id into v_id from scm.supplier where code = p_supplier_code;
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

create or replace function scm.bind_portal_login(p_login_role name, p_supplier_code text) returns void
  language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  if p_supplier_code is null then
    delete from scm.portal_login where login_role = p_login_role;
    return;
  end if;
  select id into v_id from scm.supplier where code = p_supplier_code;
  if not found then
    raise exception using errcode = 'ES008', message = format('supplier %s is not known', p_supplier_code),
      hint = 'Bind the login to an existing supplier code (scm.supplier.code; scm.put_supplier adds one).';
  end if;
  insert into scm.portal_login (login_role, supplier_id) values (p_login_role, v_id)
  on conflict (login_role) do update set supplier_id = excluded.supplier_id, bound_at = pg_catalog.now();
end $$;

create or replace function scm.search_asn_lines(p_material_code text, p_batch_no text default null)
  returns table (asn_id bigint, asn_no text, supplier_code text, po_no text, status text, ship_date date, line jsonb)
  language plpgsql stable as $_$
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
       from scm.asn d
      cross join lateral jsonb_array_elements(d.detail -> ''details'') l
      where d.detail @> $1 and l.value @> $2'
    using jsonb_build_object('details', jsonb_build_array(v_line)), v_line;
end $_$;
comment on function scm.search_asn_lines(text, text) is 'ASN lines by material code and batch number: a containment search (detail @> {details: [{material, batchNo}]}) served by the GIN index on scm.asn.detail (jsonb_path_ops). The portal sees only its own ASNs (RLS).';

create or replace function scm.submit_asn(p_doc jsonb) returns scm.asn_ingest_result
  language plpgsql security definer set search_path = '' as $$
begin
  if scm.current_supplier_id() is null
     or not exists (select from scm.supplier where id = scm.current_supplier_id() and code = p_doc ->> 'supplier') then
    raise exception using errcode = '42501', message = 'an ASN can only be submitted for the supplier this session acts for',
      hint = 'Call scm.act_as_supplier(code) in this transaction, and send ASNs in that supplier''s name only.';
  end if;
  return scm.ingest_asn(p_doc, 'portal', null);
end $$;

create or replace function scm.build_po_close_payload(p_po_id bigint) returns jsonb
  language sql stable as $$
  select jsonb_build_object('orderdatas', jsonb_build_array(jsonb_build_object(
           'orderno', po.po_no, 'supplierCode', s.code,
           'closeReason', case po.state when 'cancelled' then 'cancelled in the ERP' else 'closed in the ERP' end)))
    from scm.purchase_order po join scm.supplier s on s.id = po.supplier_id
   where po.id = p_po_id
$$;

create or replace function scm.build_po_publish_payload(p_po_id bigint) returns jsonb
  language sql stable as $$
  select jsonb_build_object(
    'supplydatas', jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
       'code', s.code, 'name', s.name, 'taxNo', s.tax_id, 'supplierId', s.cloud_id))),
    'orderdatas', jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
       'orderno', po.po_no, 'supplierCode', s.code, 'currencyCode', po.currency,
       'orderDate', to_char(po.order_date, 'YYYY-MM-DD'), 'purchaseOrg', po.purchase_org, 'memo', po.note,
       'totalMoney', (select sum(round(l.quantity * l.price * (1 + l.tax_rate), 2)) from scm.purchase_order_line l where l.po_id = po.id)))),
    'itemdatas', coalesce((
       select jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                'orderno', po.po_no, 'lineNum', l.line_no, 'materialCode', l.material_code, 'productName', l.material_name,
                'purchaseNum', l.quantity, 'unit', l.unit, 'price', l.price,
                'taxPrice', round(l.price * (1 + l.tax_rate), 6), 'taxrate', round(l.tax_rate * 100, 2),
                'reqDate', to_char(l.delivery_date, 'YYYY-MM-DD'))) order by l.line_no)
         from scm.purchase_order_line l where l.po_id = po.id), '[]'::jsonb))
  from scm.purchase_order po join scm.supplier s on s.id = po.supplier_id
  where po.id = p_po_id
$$;

create or replace function scm.record_po_delivered(p_msg cloud.outbox, p_response jsonb) returns void
  language plpgsql security definer set search_path = '' as $$
begin
  update scm.purchase_order
     set cloud_status = case
           -- a later message of this PO (a revision, the close) is still on its way: the PO is not yet as the cloud has it
           when exists (select from cloud.outbox o where o.ordering_key = p_msg.ordering_key and o.id > p_msg.id
                           and o.status in ('pending', 'in_flight')) then 'queued'
           when p_msg.operation = 'scm.po_publish' then 'published'
           when p_msg.operation = 'scm.po_revise' then 'revised' else 'closed' end,
         cloud_ref = coalesce(p_response #>> '{data,orderId}', p_response #>> '{data,id}', cloud_ref),
         cloud_error = null,
         cloud_synced_at = pg_catalog.now(),
         updated_at = pg_catalog.now()
   where id = p_msg.aggregate_id::bigint;
end $$;

create or replace function scm.record_po_refused(p_msg cloud.outbox, p_error jsonb) returns void
  language plpgsql security definer set search_path = '' as $$
begin
  update scm.purchase_order
     set cloud_status = case when p_error ->> 'status' = 'dead' then 'undeliverable' else 'rejected' end,
         cloud_error = left(coalesce(p_error #>> '{response,message}', p_error ->> 'error', 'unknown error'), 1000),
         cloud_synced_at = pg_catalog.now(),
         updated_at = pg_catalog.now()
   where id = p_msg.aggregate_id::bigint;
end $$;

-- 4. The order contract --------------------------------------------------------

create function scm._field(p_ctx scm.validation_context, p_path text) returns text
  language sql immutable as $$
  with g(path) as (select regexp_replace(regexp_replace(p_path, '^\$\.', ''), '\[\d+\]', '[]', 'g'))
  select coalesce(p_ctx.field_names ->> g.path,
                  -- an unmapped line field is named by itself: the message already says which line
                  case when g.path like 'lines[].%' then substr(g.path, 9) else g.path end)
    from g
$$;
comment on function scm._field(scm.validation_context, text) is 'Internal: the caller''s name of a JSON path ($.lines[2].quantity → lines[].quantity → po_line.sl), from the source''s field map; an unmapped path is named as itself.';
revoke all on function scm._field(scm.validation_context, text) from public;

create function scm._where(p_ctx scm.validation_context, p_line_no integer default null) returns text
  language sql immutable as $$
  select concat_ws(' ', nullif(p_ctx.document_label, ''), p_ctx.reference) || coalesce(' line ' || p_line_no, '')
$$;
comment on function scm._where(scm.validation_context, integer) is 'Internal: how a message names the order (and line): 采购订单 PO-0001 line 2.';
revoke all on function scm._where(scm.validation_context, integer) from public;

create function scm._malformed(p_ctx scm.validation_context, p_path text, p_problem text, p_hint text, p_line_no integer default null) returns void
  language plpgsql immutable as $$
begin
  raise exception using errcode = 'ES019',
    message = format('%s: %s %s', scm._where(p_ctx, p_line_no), scm._field(p_ctx, p_path), p_problem), detail = p_path,
    hint = replace(p_hint, '%field%', scm._field(p_ctx, p_path));
end $$;
comment on function scm._malformed(scm.validation_context, text, text, text, integer) is 'Internal: raises ES019 naming the caller''s field (%field% in the hint is replaced by it), with the JSON path as DETAIL.';
revoke all on function scm._malformed(scm.validation_context, text, text, text, integer) from public;

create function scm._doc_text(p_value jsonb, p_ctx scm.validation_context, p_path text, p_required boolean default false,
                              p_line_no integer default null) returns text
  language plpgsql immutable as $$
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' or (jsonb_typeof(p_value) = 'string' and btrim(p_value #>> '{}') = '') then
    if p_required then
      perform scm._malformed(p_ctx, p_path, 'is missing', 'Fill in %field%.', p_line_no);
    end if;
    return null;
  elsif jsonb_typeof(p_value) in ('string', 'number') then
    return p_value #>> '{}';
  end if;
  perform scm._malformed(p_ctx, p_path, format('is a JSON %s, not a text', jsonb_typeof(p_value)), 'Hand in %field% as a JSON string.', p_line_no);
  return null;
end $$;
comment on function scm._doc_text(jsonb, scm.validation_context, text, boolean, integer) is 'Internal: a text field of the order document at p_path (a number is taken as its text); ES019 for an object, array or boolean, or when a required field is missing or empty.';
revoke all on function scm._doc_text(jsonb, scm.validation_context, text, boolean, integer) from public;

create function scm._doc_numeric(p_value jsonb, p_ctx scm.validation_context, p_path text, p_line_no integer default null) returns numeric
  language plpgsql immutable as $$
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' then
    return null;
  elsif jsonb_typeof(p_value) = 'number' then
    return (p_value #>> '{}')::numeric;
  elsif jsonb_typeof(p_value) = 'string' and btrim(p_value #>> '{}') ~ '^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$' then
    return btrim(p_value #>> '{}')::numeric;
  end if;
  perform scm._malformed(p_ctx, p_path, format('is %s, not a number', left(p_value::text, 40)),
                         'Hand in %field% as a JSON number or a numeric string ("12.50").', p_line_no);
  return null;
end $$;
comment on function scm._doc_numeric(jsonb, scm.validation_context, text, integer) is 'Internal: a number of the order document, given as a JSON number or a numeric string; ES019 for anything else.';
revoke all on function scm._doc_numeric(jsonb, scm.validation_context, text, integer) from public;

create function scm._doc_date(p_value jsonb, p_ctx scm.validation_context, p_path text, p_line_no integer default null) returns date
  language plpgsql immutable as $$
declare
  v text := scm._doc_text(p_value, p_ctx, p_path, false, p_line_no);
begin
  if v is null then
    return null;
  elsif v ~ '^\d{4}-\d{2}-\d{2}$' and scm._is_date(v) then
    return v::date;
  end if;
  perform scm._malformed(p_ctx, p_path, format('is %L, not a date (yyyy-mm-dd)', left(v, 40)), 'Hand in %field% as yyyy-mm-dd.', p_line_no);
  return null;
end $$;
comment on function scm._doc_date(jsonb, scm.validation_context, text, integer) is 'Internal: a date of the order document (yyyy-mm-dd); ES019 for anything else.';
revoke all on function scm._doc_date(jsonb, scm.validation_context, text, integer) from public;

create function scm._supplier_upsert(p_code text, p_name text, p_tax_id text, p_cloud_id text, p_id bigint default null) returns scm.supplier
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v scm.supplier;
begin
  if p_id is not null and not exists (select from scm.supplier s where s.id = p_id and s.code <> p_code) then
    -- the reference ERP's suppliers keep their ids (transitional until 0025: its portal bindings and tests name them)
    insert into scm.supplier as s (id, code, name, tax_id, cloud_id) overriding system value
    values (p_id, p_code, p_name, p_tax_id, p_cloud_id)
    on conflict (code) do update
       set name = excluded.name, tax_id = excluded.tax_id, cloud_id = coalesce(excluded.cloud_id, s.cloud_id), updated_at = now()
     where (s.name, s.tax_id, s.cloud_id) is distinct from (excluded.name, excluded.tax_id, coalesce(excluded.cloud_id, s.cloud_id))
    returning * into v;
    -- the identity never hands out an id taken this way
    perform setval(pg_get_serial_sequence('scm.supplier', 'id'),
                   greatest(p_id, (select max(id) from scm.supplier)), true);
  else
    insert into scm.supplier as s (code, name, tax_id, cloud_id)
    values (p_code, p_name, p_tax_id, p_cloud_id)
    on conflict (code) do update
       set name = excluded.name, tax_id = excluded.tax_id, cloud_id = coalesce(excluded.cloud_id, s.cloud_id), updated_at = now()
     where (s.name, s.tax_id, s.cloud_id) is distinct from (excluded.name, excluded.tax_id, coalesce(excluded.cloud_id, s.cloud_id))
    returning * into v;
  end if;
  if v.id is null then
    select * into v from scm.supplier where code = p_code;
  end if;
  return v;
end $$;
comment on function scm._supplier_upsert(text, text, text, text, bigint) is 'Internal: the supplier by code, added or brought up to date (name, tax id; a cloud id is kept when none is given); with p_id a new one gets that id when it is free.';
revoke all on function scm._supplier_upsert(text, text, text, text, bigint) from public;

create function scm.put_supplier(
  p_code     text,               -- the key the procurement cloud and ASNs use
  p_name     text,
  p_tax_id   text default null,  -- 统一社会信用代码
  p_cloud_id text default null   -- the supplier's id in the cloud, when known; null keeps the known one
) returns scm.supplier
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if p_code is null or p_code !~ '^[A-Za-z0-9_.-]{1,64}$' then
    raise exception using errcode = 'ES019', message = format('supplier code %L is not 1–64 letters, digits, ., _ or -', p_code),
      detail = '$.supplier.code', hint = 'Use the supplier''s code as the procurement cloud knows it.';
  end if;
  if coalesce(btrim(p_name), '') = '' then
    raise exception using errcode = 'ES019', message = format('supplier %s has no name', p_code),
      detail = '$.supplier.name', hint = 'Give the supplier''s name.';
  end if;
  return scm._supplier_upsert(p_code, p_name, nullif(btrim(p_tax_id), ''), nullif(btrim(p_cloud_id), ''));
end $$;
comment on function scm.put_supplier(text, text, text, text) is 'Contract: adds a supplier or brings it up to date, by code (an order document does the same with its supplier object); returns it. ES019 for a code that is not simple or an empty name. Bind a portal login to it with scm.bind_portal_login.';
revoke all on function scm.put_supplier(text, text, text, text) from public;
grant execute on function scm.put_supplier(text, text, text, text) to erp_cloud_app, erp_cloud_operator;

create function scm._set_enqueuing(p_on boolean) returns void
  language sql as $$
  select set_config('scm.enqueuing', case when p_on then 'on' else '' end, true)
$$;
comment on function scm._set_enqueuing(boolean) is 'Internal: marks (transaction-local) that an enqueue contract is writing an order, so the order''s source is not called back from its own call.';
revoke all on function scm._set_enqueuing(boolean) from public;

create function scm.enqueue_order(
  p_source    text,
  p_reference text,   -- the caller's key of the order
  p_order     jsonb   -- {po_no, supplier {code, name, tax_id, cloud_id}, currency, order_date, purchase_org, note, lines [...]}
) returns scm.order_enqueued
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src      scm.source := scm._source(p_source);
  v_ctx      scm.validation_context := row(p_source, p_reference, v_src.document_label, v_src.field_names)::scm.validation_context;
  v_po       scm.purchase_order;
  v_other    scm.purchase_order;
  v_supplier scm.supplier;
  v_po_no    text;
  v_sup      jsonb;
  v_sup_code text;
  v_currency text;
  v_date     date;
  v_line     jsonb;
  v_path     text;
  v_no       numeric;
  v_nos      integer[] := '{}';
  v_lines    jsonb := '[]';
  v_qty      numeric;
  v_price    numeric;
  v_rate     numeric;
  v_payload  jsonb;
  v_hash     text;
  v_op       text;
  v_req      uuid;
  v_pending  uuid;
  i          integer := 0;
begin
  if p_reference is null or btrim(p_reference) = '' then
    raise exception using errcode = 'ES019', message = format('%s: the order has no reference', v_src.document_label),
      detail = '$.reference', hint = format('Pass your key of the order (%s) as p_reference.', scm._field(v_ctx, '$.reference'));
  end if;
  if p_order is null or jsonb_typeof(p_order) <> 'object' then
    perform scm._malformed(v_ctx, '$', 'is not a JSON object', 'Hand in the order as {"po_no": …, "supplier": {…}, "lines": [ … ]}.');
  end if;
  -- validate everything first, then write
  v_po_no := scm._doc_text(p_order -> 'po_no', v_ctx, '$.po_no', true);
  v_sup := p_order -> 'supplier';
  if v_sup is null or jsonb_typeof(v_sup) <> 'object' then
    perform scm._malformed(v_ctx, '$.supplier', 'is missing or not an object', 'Give the supplier as {"code": …, "name": …, "tax_id": …}.');
  end if;
  v_sup_code := scm._doc_text(v_sup -> 'code', v_ctx, '$.supplier.code', true);
  if v_sup_code !~ '^[A-Za-z0-9_.-]{1,64}$' then
    perform scm._malformed(v_ctx, '$.supplier.code', format('%L is not 1–64 letters, digits, ., _ or -', left(v_sup_code, 70)),
                           'Use the supplier''s code as the procurement cloud knows it in %field%.');
  end if;
  perform scm._doc_text(v_sup -> 'name', v_ctx, '$.supplier.name', true);
  perform scm._doc_text(v_sup -> 'tax_id', v_ctx, '$.supplier.tax_id');
  perform scm._doc_text(v_sup -> 'cloud_id', v_ctx, '$.supplier.cloud_id');
  v_currency := coalesce(scm._doc_text(p_order -> 'currency', v_ctx, '$.currency'), 'CNY');
  if v_currency !~ '^[A-Z]{3}$' then
    perform scm._malformed(v_ctx, '$.currency', format('%L is not a currency code', left(v_currency, 20)), 'Use three capital letters (ISO 4217) in %field%: CNY, USD.');
  end if;
  v_date := coalesce(scm._doc_date(p_order -> 'order_date', v_ctx, '$.order_date'), current_date);
  perform scm._doc_text(p_order -> 'purchase_org', v_ctx, '$.purchase_org');
  perform scm._doc_text(p_order -> 'note', v_ctx, '$.note');
  if p_order -> 'lines' is null or jsonb_typeof(p_order -> 'lines') <> 'array' then
    perform scm._malformed(v_ctx, '$.lines', 'is missing or not an array', 'Give the order''s lines as a JSON array of objects.');
  end if;
  if jsonb_array_length(p_order -> 'lines') = 0 then
    raise exception using errcode = 'ES002', message = format('%s has no lines', scm._where(v_ctx)),
      detail = '$.lines', hint = 'Add at least one line before approving it.';
  end if;
  for v_line in select e from jsonb_array_elements(p_order -> 'lines') e loop
    v_path := format('$.lines[%s]', i);
    if jsonb_typeof(v_line) <> 'object' then
      perform scm._malformed(v_ctx, v_path, 'is not an object', 'Each line is a JSON object with line_no, material_code, material_name, quantity, price ….');
    end if;
    v_no := scm._doc_numeric(v_line -> 'line_no', v_ctx, v_path || '.line_no');
    if v_no is null or v_no <> trunc(v_no) or v_no < 1 or v_no > 2147483647 then
      perform scm._malformed(v_ctx, v_path || '.line_no', format('is %s, not a line number (a whole number from 1)', coalesce((v_line -> 'line_no')::text, 'missing')),
                             'Number the lines of an order 1, 2, 3 … in %field%; each number once.');
    end if;
    if v_no::integer = any (v_nos) then
      perform scm._malformed(v_ctx, v_path || '.line_no', format('%s appears twice in the order', v_no), 'Each line of an order has its own %field%.');
    end if;
    v_nos := v_nos || v_no::integer;
    v_qty := scm._doc_numeric(v_line -> 'quantity', v_ctx, v_path || '.quantity', v_no::integer);
    if v_qty is null or v_qty <= 0 or v_qty >= 1e14 then
      perform scm._malformed(v_ctx, v_path || '.quantity', format('is %s, not a positive quantity', coalesce(v_qty::text, 'missing')),
                             'Order a positive quantity in %field%, or leave the line out.', v_no::integer);
    end if;
    v_price := scm._doc_numeric(v_line -> 'price', v_ctx, v_path || '.price', v_no::integer);
    if v_price is null or v_price < 0 or v_price >= 1e12 then
      perform scm._malformed(v_ctx, v_path || '.price', format('is %s, not a price (0 or more)', coalesce(v_price::text, 'missing')),
                             'Give the unit price excluding tax in %field%.', v_no::integer);
    end if;
    v_rate := coalesce(scm._doc_numeric(v_line -> 'tax_rate', v_ctx, v_path || '.tax_rate', v_no::integer), 0.13);
    if v_rate < 0 or v_rate >= 1 then
      perform scm._malformed(v_ctx, v_path || '.tax_rate', format('is %s, not a fraction from 0 to below 1', v_rate),
                             'Give the tax rate as a fraction in %field%: 0.13 for 13 %.', v_no::integer);
    end if;
    v_lines := v_lines || jsonb_build_object(
      'line_no', v_no::integer,
      'material_code', scm._doc_text(v_line -> 'material_code', v_ctx, v_path || '.material_code', true, v_no::integer),
      'material_name', scm._doc_text(v_line -> 'material_name', v_ctx, v_path || '.material_name', true, v_no::integer),
      'quantity', v_qty, 'price', v_price, 'tax_rate', v_rate,
      'unit', coalesce(scm._doc_text(v_line -> 'unit', v_ctx, v_path || '.unit', false, v_no::integer), 'PCS'),
      'delivery_date', scm._doc_date(v_line -> 'delivery_date', v_ctx, v_path || '.delivery_date', v_no::integer));
    i := i + 1;
  end loop;

  -- one call at a time per order, and per order number
  perform pg_advisory_xact_lock(hashtextextended('scm.purchase_order:' || p_source || ':' || p_reference, 0));
  perform pg_advisory_xact_lock(hashtextextended('scm.po_no:' || v_po_no, 0));
  select * into v_po from scm.purchase_order where source = p_source and reference = p_reference for update;
  select * into v_other from scm.purchase_order where po_no = v_po_no and (source, reference) is distinct from (p_source, p_reference);
  if v_other.id is not null then
    raise exception using errcode = 'ES022',
      message = format('%s: %s %L is already the number of %s %s of source %s', scm._where(v_ctx), scm._field(v_ctx, '$.po_no'), v_po_no,
                       case when v_other.source = p_source then v_src.document_label else 'order' end, v_other.reference, v_other.source),
      detail = '$.po_no', hint = format('Give this order its own %s: an order number is used once.', scm._field(v_ctx, '$.po_no'));
  end if;
  if v_po.id is not null then
    if v_po.state <> 'open' then
      raise exception using errcode = 'ES003', message = format('%s is %s and cannot change', scm._where(v_ctx), v_po.state),
        hint = 'Closed and cancelled orders are final: create a new order.';
    end if;
    if v_po.cloud_revision is not null and (v_po.po_no <> v_po_no
         or v_sup_code <> (select s.code from scm.supplier s where s.id = v_po.supplier_id)) then
      raise exception using errcode = 'ES003',
        message = format('%s was published to the procurement cloud: its %s and %s cannot change', scm._where(v_ctx),
                         scm._field(v_ctx, '$.po_no'), scm._field(v_ctx, '$.supplier.code')),
        detail = case when v_po.po_no <> v_po_no then '$.po_no' else '$.supplier.code' end,
        hint = 'Cancel it (scm.enqueue_order_close: the cloud gets a close) and hand in a new order for the other number or supplier.';
    end if;
  end if;

  if v_po.id is not null and v_po.doc is not distinct from p_order and v_po.cloud_payload_hash is not null then
    return (v_po.id, null, null)::scm.order_enqueued;  -- the same document again (a write-back, a confirmation): nothing to do
  end if;

  -- write: supplier, order, lines
  v_supplier := scm._supplier_upsert(v_sup_code, v_sup ->> 'name', nullif(btrim(v_sup ->> 'tax_id'), ''), nullif(btrim(v_sup ->> 'cloud_id'), ''));
  perform scm._set_enqueuing(true);
  if v_po.id is null then
    insert into scm.purchase_order (source, reference, po_no, supplier_id, currency, order_date, purchase_org, note, doc)
    values (p_source, p_reference, v_po_no, v_supplier.id, v_currency, v_date, p_order ->> 'purchase_org', p_order ->> 'note', p_order)
    returning * into v_po;
  else
    update scm.purchase_order
       set po_no = v_po_no, supplier_id = v_supplier.id, currency = v_currency, order_date = v_date,
           purchase_org = p_order ->> 'purchase_org', note = p_order ->> 'note', doc = p_order, updated_at = now()
     where id = v_po.id
    returning * into v_po;
  end if;
  delete from scm.purchase_order_line where po_id = v_po.id;
  insert into scm.purchase_order_line (po_id, line_no, material_code, material_name, quantity, unit, price, tax_rate, delivery_date)
  select v_po.id, (l ->> 'line_no')::integer, l ->> 'material_code', l ->> 'material_name', (l ->> 'quantity')::numeric, l ->> 'unit',
         (l ->> 'price')::numeric, (l ->> 'tax_rate')::numeric, (l ->> 'delivery_date')::date
    from jsonb_array_elements(v_lines) l;

  -- the payload decides: nothing the cloud would see changed → nothing is sent
  v_payload := scm.build_po_publish_payload(v_po.id);
  v_hash := md5(v_payload::text);
  if v_hash is not distinct from v_po.cloud_payload_hash then
    perform scm._set_enqueuing(false);
    return (v_po.id, null, null)::scm.order_enqueued;
  end if;
  -- one revision per transaction: a message this transaction enqueued (no one can have claimed it) takes the new payload
  v_pending := nullif(current_setting('scm.order_msg_' || v_po.id, true), '')::uuid;
  if v_pending is not null then
    update cloud.outbox o
       set payload = v_payload || jsonb_build_object('revision', v_po.cloud_revision), updated_at = clock_timestamp()
     where o.request_id = v_pending and o.status = 'pending' and o.operation in ('scm.po_publish', 'scm.po_revise')
    returning o.request_id, split_part(o.operation, '_', 2) into v_req, v_op;
  end if;
  if v_req is null then
    v_op := case when v_po.cloud_revision is null then 'publish' else 'revise' end;
    v_req := cloud.enqueue_message(scm._po_endpoint(), 'scm.po_' || v_op,
                                   v_payload || jsonb_build_object('revision', coalesce(v_po.cloud_revision + 1, 0)),
                                   'scm.purchase_order', v_po.id::text, 'scm.purchase_order:' || v_po.id);
    perform set_config('scm.order_msg_' || v_po.id, v_req::text, true);
    update scm.purchase_order
       set cloud_revision = coalesce(cloud_revision + 1, 0), last_operation = v_op
     where id = v_po.id;
  end if;
  update scm.purchase_order set cloud_payload_hash = v_hash, cloud_status = 'queued', cloud_error = null where id = v_po.id;
  perform scm._set_enqueuing(false);
  return (v_po.id, v_op, v_req)::scm.order_enqueued;
end $$;
comment on function scm.enqueue_order(text, text, jsonb) is 'Contract: publishes an order (ADR 0001 §3.5) by the caller''s (source, reference), in the caller''s transaction: validates it (ES019 naming the caller''s field, DETAIL its JSON path; ES002 without lines), keeps it in scm.purchase_order(_line), and enqueues a publish, a revision when what the cloud sees changed, or nothing (operation null). Called again in the same transaction, it replaces the payload of the message this transaction enqueued: one revision per transaction. ES003 when a published order''s number or supplier would change or the order is closed or cancelled, ES022 when the order number belongs to another reference, ES020 for an unknown source.';
revoke all on function scm.enqueue_order(text, text, jsonb) from public;
grant execute on function scm.enqueue_order(text, text, jsonb) to erp_cloud_app;

create function scm.enqueue_order_close(
  p_source    text,
  p_reference text,
  p_state     text default 'closed'  -- closed or cancelled
) returns uuid
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src     scm.source := scm._source(p_source);
  v_po      scm.purchase_order;
  v_pending uuid;
  v_req     uuid;
begin
  if p_state is null or p_state not in ('closed', 'cancelled') then
    raise exception using errcode = 'ES019', message = format('%s %s: %L is not a state an order is closed with', v_src.document_label, p_reference, p_state),
      detail = 'p_state', hint = 'Close an order with p_state ''closed'' (finished) or ''cancelled''.';
  end if;
  perform pg_advisory_xact_lock(hashtextextended('scm.purchase_order:' || p_source || ':' || p_reference, 0));
  select * into v_po from scm.purchase_order where source = p_source and reference = p_reference for update;
  if not found then
    raise exception using errcode = 'ES023', message = format('%s %s was never handed to procurement', v_src.document_label, p_reference),
      hint = 'Only an order handed in with scm.enqueue_order can be closed; one that never was needs no close. scm.order_status lists the orders of a source.';
  end if;
  if v_po.state <> 'open' then
    return null;  -- closed already: the close went or goes
  end if;
  perform scm._set_enqueuing(true);
  v_pending := nullif(current_setting('scm.order_msg_' || v_po.id, true), '')::uuid;
  if v_po.cloud_revision = 0 and v_pending is not null
     and exists (select from cloud.outbox o where o.request_id = v_pending and o.status = 'pending' and o.operation = 'scm.po_publish') then
    -- published and closed in one transaction: the cloud never hears of it
    delete from cloud.outbox o where o.request_id = v_pending;
    update scm.purchase_order
       set state = p_state, cloud_revision = null, cloud_payload_hash = 'closed', cloud_status = null, last_operation = null, updated_at = now()
     where id = v_po.id;
    perform set_config('scm.order_msg_' || v_po.id, '', true);
    perform scm._set_enqueuing(false);
    return null;
  end if;
  update scm.purchase_order set state = p_state, updated_at = now() where id = v_po.id;
  if v_po.cloud_revision is not null then
    v_req := cloud.enqueue_message(scm._po_endpoint(), 'scm.po_close', scm.build_po_close_payload(v_po.id),
                                   'scm.purchase_order', v_po.id::text, 'scm.purchase_order:' || v_po.id);
    update scm.purchase_order
       set cloud_revision = cloud_revision + 1, cloud_payload_hash = 'closed', cloud_status = 'queued', cloud_error = null, last_operation = 'close'
     where id = v_po.id;
  end if;
  perform scm._set_enqueuing(false);
  return v_req;
end $$;
comment on function scm.enqueue_order_close(text, text, text) is 'Contract: closes (p_state closed) or cancels an order by (source, reference) in the caller''s transaction and enqueues the close after its publish and revisions; returns the close''s request_id, or null when nothing is sent: the order is closed already, or it was published in this same transaction (that publish is withdrawn: the cloud never hears of it). ES023 for an order never handed in, ES019 for another state, ES020 for an unknown source.';
revoke all on function scm.enqueue_order_close(text, text, text) from public;
grant execute on function scm.enqueue_order_close(text, text, text) to erp_cloud_app;

-- 5. Results: views and callbacks ---------------------------------------------------

create view scm.order_status with (security_invoker = true) as
  select po.source, po.reference, po.id as order_id, po.po_no, s.code as supplier_code, po.state, po.last_operation as operation,
         po.cloud_status, po.cloud_ref, po.cloud_error, po.cloud_revision as revision, po.cloud_synced_at as synced_at,
         po.supplier_confirmed_at, po.created_at, po.updated_at,
         (select jsonb_agg(to_jsonb(l) - 'id' - 'po_id' order by l.line_no) from scm.purchase_order_line l where l.po_id = po.id) as lines
    from scm.purchase_order po
    join scm.supplier s on s.id = po.supplier_id;
comment on view scm.order_status is 'Contract: the orders of every source by (source, reference): state (open, closed, cancelled), the last operation sent (publish, revise, close), cloud_status (queued, published, revised, closed, rejected, undeliverable), the cloud''s order id (cloud_ref) or refusal (cloud_error), revision, when the cloud last answered, the supplier''s confirmation, and the lines as the cloud has them. Runs with the reader''s rights: a supplier portal sees its own orders only.';
grant select on scm.order_status to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;

create view scm.asn_status with (security_invoker = true) as
  select po.source, po.reference as order_reference, a.id as asn_id, a.asn_no, a.supplier_code, a.po_no, a.status, a.reject_code,
         a.reject_reason, a.received_via, a.received_at, a.delivered_at, a.delivery_error, a.ship_date, a.eta, a.carrier, a.tracking_no,
         (select jsonb_agg(to_jsonb(l) - 'id' - 'asn_id' order by l.line_no) from scm.asn_line l where l.asn_id = a.id) as lines
    from scm.asn a
    left join scm.purchase_order po on po.id = a.po_id;
comment on view scm.asn_status is 'Contract: every ASN kept, accepted or rejected (reject_code, reject_reason), with the order it ships against by its source and reference (null for an order erp-cloud does not know), how it arrived, when it was delivered to the source''s on_asn (or why not: delivery_error), and its lines. Runs with the reader''s rights: a supplier portal sees its own ASNs only.';
grant select on scm.asn_status to erp_cloud_app, erp_cloud_operator, erp_cloud_supplier_portal;

create function scm._order_result(p_order_id bigint) returns scm.order_result
  language sql stable set search_path = pg_catalog, pg_temp as $$
  select row(po.id, po.source, po.reference, po.po_no, po.state, po.last_operation, po.cloud_status, po.cloud_ref, po.cloud_error,
             po.cloud_revision, po.cloud_synced_at, po.supplier_confirmed_at)::scm.order_result
    from scm.purchase_order po where po.id = p_order_id
$$;
comment on function scm._order_result(bigint) is 'Internal: the scm.order_result an on_order callback receives for one order now.';
revoke all on function scm._order_result(bigint) from public;

create function scm._asn_delivery(p_asn_id bigint) returns scm.asn_delivery
  language sql stable set search_path = pg_catalog, pg_temp as $$
  select row(a.id, po.source, po.reference, a.po_no, a.asn_no, a.supplier_code, a.ship_date, a.eta, a.carrier, a.tracking_no, a.received_via,
             array(select row(l.line_no, l.po_line_no, l.material_code, l.batch_no, l.quantity, l.production_date)::scm.asn_delivery_line
                     from scm.asn_line l where l.asn_id = a.id order by l.line_no),
             a.detail)::scm.asn_delivery
    from scm.asn a join scm.purchase_order po on po.id = a.po_id
   where a.id = p_asn_id
$$;
comment on function scm._asn_delivery(bigint) is 'Internal: the scm.asn_delivery an on_asn callback receives for one ASN.';
revoke all on function scm._asn_delivery(bigint) from public;

create function scm._call_source(p_event text, p_object_id bigint) returns boolean
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_source text;
  v_fn     regprocedure;
  v_call   text;
  v_state  text;
  v_msg    text;
begin
  if p_event = 'order' then
    select po.source, s.on_order into v_source, v_fn from scm.purchase_order po join scm.source s on s.name = po.source where po.id = p_object_id;
  else
    select po.source, s.on_asn into v_source, v_fn
      from scm.asn a join scm.purchase_order po on po.id = a.po_id join scm.source s on s.name = po.source
     where a.id = p_object_id and a.status = 'accepted';
  end if;
  if v_fn is null then
    return true;
  end if;
  select format('select %I.%I($1)', n.nspname, p.proname) into v_call
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.oid = v_fn;
  begin
    if p_event = 'order' then
      execute v_call using scm._order_result(p_object_id);
    else
      execute v_call using scm._asn_delivery(p_object_id);
    end if;
  exception when others then
    -- the callback's own writes are rolled back; the transaction that called it goes on
    get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    insert into scm.callback_failure (source, event, object_id, sqlstate, message) values (v_source, p_event, p_object_id, v_state, v_msg);
    if p_event = 'asn' then
      update scm.asn set delivery_error = left(v_state || ': ' || v_msg, 1000) where id = p_object_id;
    end if;
    raise warning 'on_% of source % failed for % % : % %', p_event, v_source, p_event, p_object_id, v_state, v_msg
      using hint = 'The change is committed without the callback''s writes; fix the callback and run scm.replay_callbacks.';
    return false;
  end;
  if p_event = 'asn' then
    update scm.asn set delivered_at = now(), delivery_error = null where id = p_object_id;
  end if;
  return true;
end $$;
comment on function scm._call_source(text, bigint) is 'Internal: calls the on_order (event order) or on_asn (event asn: an accepted ASN, which is then marked delivered) of the source the order belongs to; an error is caught (only the callback''s writes are undone), kept in scm.callback_failure (and as the ASN''s delivery_error) with a WARNING, and false returned. No callback registered: nothing happens.';
revoke all on function scm._call_source(text, bigint) from public;

create function scm.tg_purchase_order__900_call_source() returns trigger
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if current_setting('scm.enqueuing', true) = 'on' then
    return null;  -- the caller's own enqueue: it has the result already
  end if;
  perform scm._call_source('order', new.id);
  return null;
end $$;
comment on function scm.tg_purchase_order__900_call_source() is 'Trigger: an order whose cloud state (status, reference, error, state) or supplier confirmation changed calls its source''s on_order with the whole current state; not when the change is the caller''s own enqueue_order(_close).';
revoke all on function scm.tg_purchase_order__900_call_source() from public;
create trigger purchase_order_900_call_source after update on scm.purchase_order for each row
  when (old.cloud_status is distinct from new.cloud_status or old.cloud_ref is distinct from new.cloud_ref
        or old.cloud_error is distinct from new.cloud_error or old.state is distinct from new.state
        or old.supplier_confirmed_at is distinct from new.supplier_confirmed_at)
  execute function scm.tg_purchase_order__900_call_source();

create function scm.replay_callbacks(p_source text, p_since timestamptz default null) returns integer
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src scm.source := scm._source(p_source);
  v     record;
  n     integer := 0;
begin
  for v in
    with due as (
      update scm.callback_failure f set replayed_at = now()
       where f.source = v_src.name and f.replayed_at is null and (p_since is null or f.failed_at >= p_since)
      returning f.event, f.object_id)
    select distinct event, object_id from due order by event, object_id
  loop
    perform scm._call_source(v.event, v.object_id);
    n := n + 1;
  end loop;
  return n;
end $$;
comment on function scm.replay_callbacks(text, timestamptz) is 'Operator: calls the source''s on_order again with the current state of every order, and its on_asn again for every ASN, whose callback failed (since p_since) and was not replayed; returns how many calls were made. A call that fails again is kept as a new failure.';
revoke all on function scm.replay_callbacks(text, timestamptz) from public;
grant execute on function scm.replay_callbacks(text, timestamptz) to erp_cloud_operator;

-- ingest: the store is scm's, and an accepted ASN goes to its order's source in the same transaction
create or replace function scm.ingest_asn(p_doc jsonb, p_source text, p_event_id text default null) returns scm.asn_ingest_result
  language plpgsql security definer set search_path = '' as $$
declare
  v_asn_no text;
  v_supplier_code text;
  v_supplier scm.supplier;
  v_po scm.purchase_order;
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
    select id, asn_no, supplier_code, status, reject_code, reject_reason into v_existing from scm.asn where cloud_event_id = p_event_id;
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
  select id, asn_no, status, reject_code, reject_reason into v_existing from scm.asn
   where supplier_code = v_supplier_code and asn_no = v_asn_no;
  if found then
    return (v_existing.id, v_existing.asn_no, 'duplicate', v_existing.reject_code, v_existing.reject_reason)::scm.asn_ingest_result;
  end if;

  select * into v_supplier from scm.supplier where code = v_supplier_code;
  -- lock the PO: two ASNs against one line must not both take its open quantity
  select * into v_po from scm.purchase_order where po_no = p_doc #>> '{details,0,orderCode}' for update;
  v_reject := scm._asn_rejection(p_doc, v_supplier, v_po);
  if p_source = 'portal' and v_reject[1] = 'ES012' then
    -- the portal must not learn whether another supplier's PO exists: the same answer as for no such PO
    v_reject := array['ES011', format('purchase order %s does not exist', p_doc #>> '{details,0,orderCode}')];
  end if;

  insert into scm.asn (asn_no, supplier_code, supplier_id, po_no, po_id, ship_date, eta, carrier, tracking_no,
                       status, reject_code, reject_reason, detail, received_via, cloud_event_id)
  values (v_asn_no, v_supplier_code, v_supplier.id, p_doc #>> '{details,0,orderCode}',
          -- a rejected ASN keeps no link to a PO of another supplier
          case when v_po.supplier_id = v_supplier.id then v_po.id end,
          left(p_doc ->> 'deliveryDate', 10)::date,
          coalesce(left(p_doc ->> 'planArrivalDate', 10), left(p_doc #>> '{details,0,planArrivalDate}', 10))::date,
          p_doc ->> 'logisticalComp', p_doc ->> 'logisticalCode',
          case when v_reject is null then 'accepted' else 'rejected' end, v_reject[1], v_reject[2],
          p_doc, p_source, p_event_id)
  returning id into v_id;
  insert into scm.asn_line (asn_id, line_no, po_line_no, material_code, batch_no, quantity, production_date)
  select v_id, coalesce((d.value ->> 'lineno')::integer, d.n::integer), (d.value ->> 'orderDetailId')::integer, d.value ->> 'material',
         d.value ->> 'batchNo', (d.value ->> 'purchaseNum')::numeric, left(d.value ->> 'productionDate', 10)::date
    from jsonb_array_elements(p_doc -> 'details') with ordinality d(value, n);
  if v_reject is null then
    perform scm._call_source('asn', v_id);  -- a failing on_asn is kept (delivery_error), the ASN stays accepted
  end if;
  return (v_id, v_asn_no, case when v_reject is null then 'accepted' else 'rejected' end, v_reject[1], v_reject[2])::scm.asn_ingest_result;
end $$;
comment on function scm.ingest_asn(jsonb, text, text) is 'The one door for ASNs (webhook push, pull, shared database, portal): idempotent by cloud event id and by (supplier, ASN number), ES017 when a known event id comes with another ASN; delivery statuses that are no shipment are skipped (not_shipped); checks PO, supplier, lines and open quantities against scm.purchase_order(_line); stores accepted and rejected ASNs (with reason) in scm.asn and the original as detail; an accepted ASN is delivered to the on_asn of its order''s source in this transaction (a duplicate is not delivered again). ES004 when the document is malformed (nothing stored).';

-- 6. The reference ERP goes the contract's way (transitional, until 0025) -----------

-- the reference ERP's purchase order as an order document (ADR 0001 §3.5)
create function scm._reference_erp_order(p_po_id bigint) returns jsonb
  language sql stable set search_path = pg_catalog, pg_temp as $$
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
comment on function scm._reference_erp_order(bigint) is 'Transitional (until 0025): the reference ERP''s purchase order (erp.purchase_order, its lines and erp.supplier) as the order document scm.enqueue_order takes.';
revoke all on function scm._reference_erp_order(bigint) from public;

update scm.purchase_order p set doc = scm._reference_erp_order(p.id) where p.source = 'reference-erp';

create or replace function scm._sync_purchase_order(p_po_id bigint) returns void
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
    if exists (select from scm.purchase_order o where o.source = 'reference-erp' and o.reference = po.po_no) then
      if scm.enqueue_order_close('reference-erp', po.po_no, po.status) is not null then
        update erp.purchase_order set cloud_status = 'queued', cloud_error = null where id = po.id;
      end if;
    end if;
    return;
  end if;
  v := scm.enqueue_order('reference-erp', po.po_no, scm._reference_erp_order(po.id));
  if v.operation is not null then
    update erp.purchase_order set cloud_status = 'queued', cloud_error = null where id = po.id and cloud_status is distinct from 'queued';
  end if;
end $$;
comment on function scm._sync_purchase_order(bigint) is 'Transitional (until 0025): the reference ERP''s deferred PO triggers hand the PO to the contract at commit: an approved or changed PO to scm.enqueue_order (source reference-erp, reference its po_no), a closed or cancelled one to scm.enqueue_order_close; the PO says queued when something was enqueued.';

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
  -- cloud_status is set once the PO was handed to procurement (scm._sync_purchase_order, then erp.on_order)
  if tg_op = 'UPDATE' and old.cloud_status is not null and
     (new.po_no, new.supplier_id) is distinct from (old.po_no, old.supplier_id) then
    raise exception using errcode = 'ES003',
      message = format('purchase order %s was published to the procurement cloud: its number and supplier cannot change', old.po_no),
      hint = 'Cancel it (the cloud gets a close) and create a new purchase order for the other number or supplier.';
  end if;
  new.updated_at := now();
  return new;
end $$;

-- the reference ERP's suppliers reach erp-cloud with their ids (transitional, until 0025)
create function erp.tg_supplier__500_put() returns trigger
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  perform scm._supplier_upsert(new.code, new.name, new.tax_id, new.cloud_id, new.id);
  return null;
end $$;
comment on function erp.tg_supplier__500_put() is 'Trigger (transitional, until 0025): a supplier the reference ERP adds or changes is put into scm.supplier with the same id when it is free, so portal bindings and RLS name it before any order of it is published.';
revoke all on function erp.tg_supplier__500_put() from public;
create trigger supplier_500_put after insert or update on erp.supplier for each row execute function erp.tg_supplier__500_put();

-- the reference ERP's on_order: its own three columns
create function erp.on_order(p_result scm.order_result) returns void
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  update erp.purchase_order po
     set cloud_status = p_result.cloud_status, cloud_ref = p_result.cloud_ref, cloud_error = p_result.cloud_error
   where po.po_no = p_result.reference
     and (po.cloud_status, po.cloud_ref, po.cloud_error) is distinct from (p_result.cloud_status, p_result.cloud_ref, p_result.cloud_error);
end $$;
comment on function erp.on_order(scm.order_result) is 'The reference ERP''s on_order: writes the cloud status, the cloud''s order id and its refusal into erp.purchase_order (by po_no, its reference).';
revoke all on function erp.on_order(scm.order_result) from public;
update scm.source set on_order = 'erp.on_order(scm.order_result)'::regprocedure where name = 'reference-erp';
