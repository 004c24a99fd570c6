-- 0007 — e-invoicing (schema tax over the ERP tables in schema erp).
--
-- Adds the ERP's reference documents (customer, settlement 结算单, shipment
-- 销售出库, AR invoice, attachment 单据附件) and what turns an approved
-- settlement (or a posted shipment, per the customer's invoice_on) into an
-- issued 数电 invoice with its PDF attached, with no one touching it:
--
--   approve ──trigger──► validate (tax id, tax code, rate, price–tax separation)
--           ──► split by amount / line limits ──► erp.ar_invoice (+ lines)
--           ──► build the requestBillingNew payload (jsonb_build_object / jsonb_agg)
--           ──► cloud.enqueue_message('tax.issue'), same transaction
--   tax.issue    write-back: serial no. → enqueue tax.query (after first_poll)
--   tax.query    write-back: 2 → issued (invoice_no, date, raw) → enqueue tax.download_pdf
--                            20/21/E9500 → enqueue the next query (backing off)
--                            22/24 → failed with the platform's fail cause
--   tax.download_pdf write-back: %PDF checked, size capped, sha256 → erp.attachment
--   erp.invoice_reversal_request insert → red ar_invoice → tax.red_confirm
--           → tax.red_query (backing off) → tax.query of the red invoice → issued,
--           original marked reversed.
--
-- Why in SQL: the ERP's approval and the message that issues the invoice
-- commit together or not at all, invalid data stops the approval with a
-- SQLSTATE the clerk can act on, and every step of the chain is an outbox
-- message (retries, log, replay) written back in the completing transaction.
--
-- SQLSTATE registry (class EI, mirrored in listener/errors.ts):
--   EI001  buyer tax id malformed (not 15, 17, 18 or 20 letters/digits)
--   EI002  buyer USCC fails its GB 32100 check digit (override: erp.customer.tax_id_check_override)
--   EI003  tax classification code is not 19 digits
--   EI004  tax rate not one of the rates in use
--   EI005  quantity, unit price or amount invalid (line named)
--   EI006  document has no lines, or more than the splitting limit allows
--   EI007  line tax outside the 0.06 tolerance
--   EI008  invoice tax outside the 1.27 tolerance
--   EI009  buyer name missing
--   EI010  数电专票 needs the buyer's tax id
--   EI011  one line alone exceeds the per-invoice amount limit (a line is never split)
--   EI012  e-invoicing is not configured (seller tax id / endpoint)
--   EI013  reversal: the invoice is not issued
--   EI014  reversal: reason code not 1–4
--   EI015  reversal: a line number is not on the invoice
--   EI016  reversal: the invoice is already reversed or has a reversal under way
--   EI017  invalid e-invoicing setting

create schema if not exists erp;
comment on schema erp is 'The ERP''s own documents (the reference model erp-cloud reacts to): customers, settlements, shipments, invoices, suppliers, purchase orders, ASNs, users.';
create schema tax;
comment on schema tax is 'E-invoicing: validation, Tax_Invoice_Payload builders, write-back of invoice number / status / raw response, the invoice event log, PDF attachments.';
revoke all on schema tax from public;
grant usage on schema erp to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;
grant usage on schema tax to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;

------------------------------------------------------------------------------
-- Settings
------------------------------------------------------------------------------
create table tax.config (
  id                  boolean primary key default true check (id),
  endpoint            text not null default 'nuonuo',
  seller_tax_id       text,
  seller_name         text,
  seller_address      text,
  seller_phone        text,
  seller_bank_account text,
  clerk               text,
  max_invoice_amount  numeric(16, 2),            -- tax-inclusive ceiling per invoice; null = none
  max_invoice_lines   integer not null default 200,
  max_parts           integer not null default 100,
  first_poll_ms       integer not null default 3000,
  poll_cap_ms         integer not null default 60000,
  max_polls           integer not null default 30,
  max_pdf_bytes       integer not null default 5242880,
  callback_url        text,
  updated_at          timestamptz not null default now()
);
comment on table tax.config is 'The one row of e-invoicing settings: which endpoint issues, the seller, splitting limits, polling schedule, PDF size cap, callback URL. Change with tax.put_config.';
insert into tax.config default values;

create function tax.put_config(
  p_endpoint            text    default 'nuonuo',  -- cloud.endpoint that issues invoices
  p_seller_tax_id       text    default null,      -- 销方税号 (salerTaxNum)
  p_seller_name         text    default null,
  p_seller_address      text    default null,
  p_seller_phone        text    default null,
  p_seller_bank_account text    default null,
  p_clerk               text    default null,      -- 开票人: must match the e-tax bureau login user for 数电
  p_max_invoice_amount  numeric default null,      -- split above this tax-inclusive amount; null = no ceiling
  p_max_invoice_lines   integer default 200,       -- split above this many lines
  p_first_poll_ms       integer default 3000,      -- first result query after submit
  p_poll_cap_ms         integer default 60000,     -- longest wait between queries
  p_max_polls           integer default 30,        -- queries before the invoice is marked failed (requery with tax.requery_invoice)
  p_max_pdf_bytes       integer default 5242880,   -- larger PDFs are refused
  p_callback_url        text    default null       -- callBackUrl sent with each order (the listener's inbound door)
) returns tax.config
language plpgsql as $$
declare
  v_row tax.config;
begin
  if p_endpoint is null or p_max_invoice_lines is null or p_max_invoice_lines not between 1 and 2000
     or coalesce(p_max_invoice_amount, 1) <= 0 or p_first_poll_ms not between 0 and 600000
     or p_poll_cap_ms < p_first_poll_ms or p_max_polls not between 1 and 1000 or p_max_pdf_bytes not between 1024 and 104857600 then
    raise exception using errcode = 'EI017', message = 'invalid e-invoicing setting',
      detail = format('endpoint %s, max lines %s, max amount %s, polls %s ms / cap %s ms × %s, pdf cap %s bytes',
                      p_endpoint, p_max_invoice_lines, p_max_invoice_amount, p_first_poll_ms, p_poll_cap_ms, p_max_polls, p_max_pdf_bytes),
      hint = 'Lines 1–2000, amount above 0 or null, first poll 0–600000 ms and the cap at least that, 1–1000 polls, PDF cap 1 KiB–100 MiB.';
  end if;
  if p_seller_tax_id is not null and p_seller_tax_id !~ '^[A-Z0-9]{15}$|^[A-Z0-9]{17,18}$|^[A-Z0-9]{20}$' then
    raise exception using errcode = 'EI017', message = format('seller tax id %L is not 15, 17, 18 or 20 letters and digits', p_seller_tax_id),
      hint = 'Use the seller''s 统一社会信用代码 / 纳税人识别号 in capitals.';
  end if;
  update tax.config set endpoint = p_endpoint, seller_tax_id = p_seller_tax_id, seller_name = p_seller_name,
         seller_address = p_seller_address, seller_phone = p_seller_phone, seller_bank_account = p_seller_bank_account,
         clerk = p_clerk, max_invoice_amount = p_max_invoice_amount, max_invoice_lines = p_max_invoice_lines,
         first_poll_ms = p_first_poll_ms, poll_cap_ms = p_poll_cap_ms, max_polls = p_max_polls,
         max_pdf_bytes = p_max_pdf_bytes, callback_url = p_callback_url, updated_at = now()
  returning * into v_row;
  return v_row;
end $$;
comment on function tax.put_config is 'Sets the e-invoicing settings (seller, endpoint, splitting limits, polling, PDF cap, callback URL); EI017 names a bad one.';

------------------------------------------------------------------------------
-- The ERP's documents (reference model)
------------------------------------------------------------------------------
create table erp.customer (
  id             bigint generated always as identity primary key,
  name           text not null,
  tax_id         text,
  address        text,
  phone          text,
  bank_name      text,
  bank_account   text,
  email          text,
  invoice_on     text not null default 'settlement' check (invoice_on in ('settlement', 'shipment')),
  tax_id_check_override boolean not null default false,
  created_at     timestamptz not null default now()
);
comment on table erp.customer is 'Customers (buyers on the invoice). invoice_on: which event issues their invoices, settlement approval (default) or shipment posting.';
comment on column erp.customer.tax_id_check_override is 'An operator confirmed that this 18-character tax id is legal although it fails the GB 32100 check digit (early pilot codes): issue with a warning instead of EI002.';

create table erp.settlement (
  id             bigint generated always as identity primary key,
  settlement_no  text not null unique,
  customer_id    bigint not null references erp.customer,
  status         text not null default 'draft' check (status in ('draft', 'approved', 'cancelled')),
  approved_at    timestamptz,
  invoice_kind   text not null default 'normal' check (invoice_kind in ('normal', 'special')),
  remark         text,
  created_at     timestamptz not null default now()
);
comment on table erp.settlement is '结算单. Approving it (status → approved) issues its invoice(s) when the customer invoices on settlement. invoice_kind: normal = 数电普票 (pc), special = 数电专票 (bs).';

create table erp.settlement_line (
  id             bigint generated always as identity primary key,
  settlement_id  bigint not null references erp.settlement on delete cascade,
  line_no        integer not null,
  item_name      text not null,
  tax_code       text not null,
  spec           text,
  unit           text,
  quantity       numeric,
  unit_price     numeric,
  amount         numeric(16, 2) not null,
  tax_rate       numeric(6, 4) not null,
  tax_amount     numeric(16, 2),
  unique (settlement_id, line_no)
);
comment on table erp.settlement_line is 'Settlement lines. amount is tax-inclusive; tax_code is the 19-digit 税收分类编码; tax_amount is optional (computed from amount and rate when null, checked against the 0.06 tolerance when given).';

create table erp.shipment (
  id             bigint generated always as identity primary key,
  shipment_no    text not null unique,
  customer_id    bigint not null references erp.customer,
  settlement_id  bigint references erp.settlement,
  status         text not null default 'draft' check (status in ('draft', 'posted', 'cancelled')),
  posted_at      timestamptz,
  invoice_kind   text not null default 'normal' check (invoice_kind in ('normal', 'special')),
  remark         text,
  created_at     timestamptz not null default now()
);
comment on table erp.shipment is '销售出库. Posting it (status → posted) issues its invoice(s) when the customer invoices on shipment. settlement_id links it to the settlement that bills it: one of the two is invoiced, never both.';

create table erp.shipment_line (
  id             bigint generated always as identity primary key,
  shipment_id    bigint not null references erp.shipment on delete cascade,
  line_no        integer not null,
  item_name      text not null,
  tax_code       text not null,
  spec           text,
  unit           text,
  quantity       numeric,
  unit_price     numeric,
  amount         numeric(16, 2) not null,
  tax_rate       numeric(6, 4) not null,
  tax_amount     numeric(16, 2),
  unique (shipment_id, line_no)
);
comment on table erp.shipment_line is 'Shipment lines, the same shape as settlement lines (tax-inclusive amount, 19-digit tax code).';

create table erp.ar_invoice (
  id                 bigint generated always as identity primary key,
  settlement_id      bigint references erp.settlement,
  shipment_id        bigint references erp.shipment,
  original_invoice_id bigint references erp.ar_invoice,
  part_no            integer not null default 1,
  part_count         integer not null default 1,
  invoice_type       text not null default 'blue' check (invoice_type in ('blue', 'red')),
  invoice_kind       text not null check (invoice_kind in ('normal', 'special')),
  request_id         uuid not null unique,
  order_no           text not null unique,
  buyer_name         text not null,
  buyer_tax_id       text,
  invoice_serial_no  text,
  invoice_no         text,
  invoice_status     text not null default 'pending' check (invoice_status in ('pending', 'issuing', 'issued', 'failed', 'reversed')),
  invoice_date       timestamptz,
  amount_excl_tax    numeric(16, 2) not null,
  tax_amount         numeric(16, 2) not null,
  amount_incl_tax    numeric(16, 2) not null,
  pdf_url            text,
  ofd_url            text,
  xml_url            text,
  polls              integer not null default 0,
  next_query_id      uuid,
  tax_cloud_response jsonb not null default '{}',
  tax_id_warning     text,
  error_code         text,
  error_message      text,
  created_at         timestamptz not null default now(),
  updated_at         timestamptz not null default now(),
  constraint ar_invoice_one_source check (num_nonnulls(settlement_id, shipment_id) = 1),
  constraint ar_invoice_red_has_original check ((invoice_type = 'red') = (original_invoice_id is not null)),
  constraint ar_invoice_number_is_digital check (invoice_no is null or invoice_no ~ '^\d{20}$' or invoice_no ~ '^\d{8}$')
);
create unique index ar_invoice_settlement_part on erp.ar_invoice (settlement_id, part_no) where settlement_id is not null and invoice_type = 'blue';
create unique index ar_invoice_shipment_part on erp.ar_invoice (shipment_id, part_no) where shipment_id is not null and invoice_type = 'blue';
create index ar_invoice_original on erp.ar_invoice (original_invoice_id) where original_invoice_id is not null;
comment on table erp.ar_invoice is 'AR invoices issued through the tax cloud. invoice_status: pending → issuing → issued, or failed (error_code / error_message say why), and reversed after a red invoice. tax_cloud_response keeps each step''s raw answer (submit, query, pdf).';
comment on column erp.ar_invoice.order_no is 'Nuonuo orderNo: the request_id without dashes, so a retry after a timeout can never issue twice (E9106 = already submitted).';
comment on column erp.ar_invoice.next_query_id is 'The request_id of the latest result query enqueued for this invoice (a callback moves it up).';
comment on column erp.ar_invoice.invoice_no is 'The 20-digit 数电 invoice number (allElectronicInvoiceNumber). Every change is logged in tax.invoice_event.';

create table erp.ar_invoice_line (
  id               bigint generated always as identity primary key,
  ar_invoice_id    bigint not null references erp.ar_invoice on delete cascade,
  line_no          integer not null,
  source_line_no   integer not null,
  item_name        text not null,
  tax_code         text not null,
  spec             text,
  unit             text,
  quantity         numeric,
  unit_price       numeric,
  tax_rate         numeric(6, 4) not null,
  amount_excl_tax  numeric(16, 2) not null,
  tax_amount       numeric(16, 2) not null,
  amount_incl_tax  numeric(16, 2) not null,
  unique (ar_invoice_id, line_no)
);
comment on table erp.ar_invoice_line is 'Invoice lines after price–tax separation in numeric: excl = round(incl / (1 + rate), 2), tax = incl − excl (or the ERP''s own tax within 0.06).';

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
comment on table erp.attachment is '单据附件: files attached to ERP documents (doc_type = table name, e.g. erp.ar_invoice). The invoice PDF lands here after issue, with its sha256 and size.';

create table erp.invoice_reversal_request (
  id                bigint generated always as identity primary key,
  ar_invoice_id     bigint not null references erp.ar_invoice,
  reason            text not null,
  line_nos          integer[],
  status            text not null default 'pending' check (status in ('pending', 'confirming', 'issued', 'failed')),
  bill_id           text,
  bill_status       text,
  red_invoice_id    bigint references erp.ar_invoice,
  error_message     text,
  requested_at      timestamptz not null default now(),
  finished_at       timestamptz
);
comment on table erp.invoice_reversal_request is '红冲 requests. Insert one for an issued invoice (reason: Nuonuo code 1 销货退回, 2 开票有误, 3 服务中止, 4 销售折让; line_nos null = full, else those invoice lines) and the 数电 red-confirmation flow runs; status pending → confirming → issued | failed.';

create table tax.invoice_event (
  id              bigint generated always as identity primary key,
  ar_invoice_id   bigint not null,
  old_invoice_no  text,
  new_invoice_no  text,
  invoice_status  text not null,
  changed_at      timestamptz not null default clock_timestamp(),
  changed_by      text not null default session_user
);
create index invoice_event_invoice on tax.invoice_event (ar_invoice_id, id);
comment on table tax.invoice_event is 'Invoice event log: every change of erp.ar_invoice.invoice_no (trigger update_invoice_status), with the status at that moment and who made it.';

------------------------------------------------------------------------------
-- Small helpers
------------------------------------------------------------------------------
create type tax.source_line as (
  line_no integer, item_name text, tax_code text, spec text, unit text,
  quantity numeric, unit_price numeric, amount numeric, tax_rate numeric, tax_amount numeric
);
comment on type tax.source_line is 'A settlement or shipment line as the validators and the splitter see it.';

create function tax.order_no_for(p_request_id uuid) returns text
language sql immutable as $$ select replace(p_request_id::text, '-', '') $$;
comment on function tax.order_no_for is 'The Nuonuo orderNo for a request_id (32 hex characters): the idempotency key a retry reuses.';

create function tax.decimal_text(p numeric) returns text
language sql immutable as $$
  select case when p is null then null when p = trunc(p) then trunc(p)::text
              else rtrim(p::text, '0') end
$$;
comment on function tax.decimal_text is 'A number as the cloud wants it: no trailing zeros (0.1300 → 0.13, 5.000 → 5).';

create function tax.uscc_check_digit_ok(p_code text) returns boolean
language sql immutable as $$
  with cs(chars) as (select '0123456789ABCDEFGHJKLMNPQRTUWXY'),
  s as (
    select sum((strpos(cs.chars, substr(p_code, i + 1, 1)) - 1) * ((3 ^ i)::numeric % 31)) as total
      from cs, generate_series(0, 16) i)
  select p_code ~ '^[0-9A-HJ-NPQRTUWXY]{2}\d{6}[0-9A-HJ-NPQRTUWXY]{10}$'
         and substr(cs.chars, ((31 - s.total::integer % 31) % 31) + 1, 1) = substr(p_code, 18, 1)
    from cs, s
$$;
comment on function tax.uscc_check_digit_ok is 'Whether an 18-character 统一社会信用代码 is well formed and its GB 32100 check character matches.';

create function tax.tax_rate_in_use(p_rate numeric) returns boolean
language sql immutable as $$ select p_rate in (0.13, 0.09, 0.06, 0.05, 0.03, 0.015, 0.01, 0) $$;
comment on function tax.tax_rate_in_use is 'Whether a rate is one the tax platforms accept (13, 9, 6, 5, 3, 1.5, 1, 0 %).';

create function tax.separate_price_tax(
  p_amount_incl numeric,  -- tax-inclusive line amount
  p_rate        numeric,  -- tax rate
  p_tax_given   numeric default null -- the ERP's own tax amount, when it has one
) returns table (amount_excl_tax numeric, tax_amount numeric)
language sql immutable as $$
  select round(p_amount_incl - coalesce(p_tax_given, p_amount_incl - round(p_amount_incl / (1 + p_rate), 2)), 2),
         coalesce(p_tax_given, p_amount_incl - round(p_amount_incl / (1 + p_rate), 2))
$$;
comment on function tax.separate_price_tax is 'Price–tax separation in numeric: excl = round(incl / (1 + rate), 2), tax = incl − excl (incl stays exact); with the ERP''s tax given, excl = incl − tax.';

------------------------------------------------------------------------------
-- Validation (raises with a SQLSTATE in class EI; the message names the line and field)
------------------------------------------------------------------------------
create function tax.validate_buyer(
  p_customer erp.customer,
  p_kind     text,        -- normal | special
  p_doc      text         -- the document, for messages
) returns text            -- a warning to keep on the invoice, or null
language plpgsql as $$
begin
  if coalesce(btrim(p_customer.name), '') = '' then
    raise exception using errcode = 'EI009', message = format('%s: the customer has no name to print as buyer', p_doc),
      hint = format('Enter erp.customer.name for customer %s.', p_customer.id);
  end if;
  if p_customer.tax_id is null or p_customer.tax_id = '' then
    if p_kind = 'special' then
      raise exception using errcode = 'EI010', message = format('%s: a 数电专票 needs the buyer''s tax id, customer %s has none', p_doc, p_customer.name),
        hint = 'Enter the buyer''s 纳税人识别号 on the customer, or issue a normal invoice (invoice_kind = normal).';
    end if;
    return null;
  end if;
  if p_customer.tax_id !~ '^[A-Z0-9]{15}$|^[A-Z0-9]{17,18}$|^[A-Z0-9]{20}$' then
    raise exception using errcode = 'EI001',
      message = format('%s: buyer tax id %L of customer %s is not 15, 17, 18 or 20 capital letters and digits', p_doc, p_customer.tax_id, p_customer.name),
      hint = 'Correct erp.customer.tax_id (统一社会信用代码 or 纳税人识别号, capitals, no spaces).';
  end if;
  if length(p_customer.tax_id) = 18 and p_customer.tax_id ~ '^[0-9A-HJ-NPQRTUWXY]{2}\d{6}' and not tax.uscc_check_digit_ok(p_customer.tax_id) then
    if not p_customer.tax_id_check_override then
      raise exception using errcode = 'EI002',
        message = format('%s: buyer tax id %s of customer %s fails the GB 32100 check digit', p_doc, p_customer.tax_id, p_customer.name),
        hint = 'Check the code against the business licence. If it is right (some early pilot codes fail the check), set erp.customer.tax_id_check_override = true and approve again.';
    end if;
    raise warning 'buyer tax id % of customer % fails the GB 32100 check digit; issued because the operator overrode the check', p_customer.tax_id, p_customer.name;
    return format('tax id %s fails the GB 32100 check digit (operator override)', p_customer.tax_id);
  end if;
  return null;
end $$;
comment on function tax.validate_buyer is 'Checks the buyer: name (EI009), tax id shape (EI001), USCC check digit (EI002 unless overridden: then a warning, returned), tax id for 专票 (EI010).';

create function tax.validate_line(
  p_line tax.source_line,
  p_doc  text
) returns void
language plpgsql as $$
declare
  v_where text := format('%s line %s (%s)', p_doc, p_line.line_no, p_line.item_name);
  v_sep   record;
begin
  if p_line.tax_code is null or p_line.tax_code !~ '^\d{19}$' then
    raise exception using errcode = 'EI003', message = format('%s: tax_code %L is not a 19-digit 税收分类编码', v_where, p_line.tax_code),
      hint = 'Use the 19-digit goods and services tax classification code, right-padded with zeros (e.g. 3040201030000000000).';
  end if;
  if p_line.tax_rate is null or not tax.tax_rate_in_use(p_line.tax_rate) then
    raise exception using errcode = 'EI004', message = format('%s: tax_rate %s is not a rate in use', v_where, p_line.tax_rate),
      hint = 'Use 0.13, 0.09, 0.06, 0.05, 0.03, 0.015, 0.01 or 0.';
  end if;
  if p_line.amount is null or p_line.amount <= 0 then
    raise exception using errcode = 'EI005', message = format('%s: amount %s must be above zero', v_where, p_line.amount),
      hint = 'Enter the tax-inclusive line amount; discounts go on the invoice as their own lines later.';
  end if;
  if (p_line.quantity is null) <> (p_line.unit_price is null) then
    raise exception using errcode = 'EI005', message = format('%s: quantity and unit_price must be given together', v_where),
      hint = 'Give both (the amount is then checked against them) or neither.';
  end if;
  if p_line.quantity is not null then
    if p_line.quantity <= 0 or p_line.unit_price <= 0 then
      raise exception using errcode = 'EI005', message = format('%s: quantity %s and unit_price %s must be above zero', v_where, p_line.quantity, p_line.unit_price),
        hint = 'Correct the line''s quantity or unit price.';
    end if;
    if scale(p_line.quantity) > 8 or scale(p_line.unit_price) > 8 then
      raise exception using errcode = 'EI005', message = format('%s: quantity %s or unit_price %s has more than 8 decimals', v_where, p_line.quantity, p_line.unit_price),
        hint = 'The tax platform takes at most 8 decimals; round the quantity or unit price.';
    end if;
    if abs(p_line.quantity * p_line.unit_price - p_line.amount) > 0.01 then
      raise exception using errcode = 'EI005',
        message = format('%s: amount %s differs from quantity × unit_price = %s', v_where, p_line.amount, round(p_line.quantity * p_line.unit_price, 4)),
        hint = 'The amount is tax-inclusive and must equal quantity × unit price within 0.01.';
    end if;
  end if;
  select * into v_sep from tax.separate_price_tax(p_line.amount, p_line.tax_rate, p_line.tax_amount);
  if abs(v_sep.tax_amount - v_sep.amount_excl_tax * p_line.tax_rate) > 0.06 then
    raise exception using errcode = 'EI007',
      message = format('%s: tax_amount %s differs from (amount − tax) × rate = %s by more than 0.06', v_where, v_sep.tax_amount,
                       round(v_sep.amount_excl_tax * p_line.tax_rate, 4)),
      hint = 'Clear tax_amount to let the database compute it, or correct it.';
  end if;
end $$;
comment on function tax.validate_line is 'Checks one line: tax code (EI003), rate (EI004), amount / quantity / price (EI005), line tax tolerance 0.06 (EI007). The message names the line and the field.';

------------------------------------------------------------------------------
-- Splitting and issuing
------------------------------------------------------------------------------
create function tax.split_lines(
  p_lines      tax.source_line[],
  p_max_amount numeric,   -- tax-inclusive ceiling per invoice, or null
  p_max_lines  integer,
  p_doc        text
) returns integer[]       -- the part number of each line, in order
language plpgsql immutable as $$
declare
  v_parts  integer[] := '{}';
  v_part   integer := 1;
  v_sum    numeric := 0;
  v_count  integer := 0;
  v_line   tax.source_line;
begin
  foreach v_line in array p_lines loop
    if p_max_amount is not null and v_line.amount > p_max_amount then
      raise exception using errcode = 'EI011',
        message = format('%s line %s (%s): amount %s alone exceeds the per-invoice limit %s', p_doc, v_line.line_no, v_line.item_name, v_line.amount, p_max_amount),
        hint = 'A line is never split across invoices: split it into several lines in the document, or raise max_invoice_amount (tax.put_config).';
    end if;
    if v_count > 0 and (v_count + 1 > p_max_lines or (p_max_amount is not null and v_sum + v_line.amount > p_max_amount)) then
      v_part := v_part + 1;
      v_sum := 0;
      v_count := 0;
    end if;
    v_sum := v_sum + v_line.amount;
    v_count := v_count + 1;
    v_parts := v_parts || v_part;
  end loop;
  return v_parts;
end $$;
comment on function tax.split_lines is 'Splits a document''s lines into invoices by the amount and line-count limits, in line order, never splitting a line (EI011 when one line alone is over the amount limit).';

create function tax.build_invoice_payload(p_invoice_id bigint) returns jsonb
language sql stable as $$
  select jsonb_build_object('order', jsonb_strip_nulls(jsonb_build_object(
           'buyerName', i.buyer_name,
           'buyerTaxNum', i.buyer_tax_id,
           'buyerTel', c.phone,
           'buyerAddress', c.address,
           'buyerAccount', nullif(concat_ws(' ', c.bank_name, c.bank_account), ''),
           'salerTaxNum', cfg.seller_tax_id,
           'salerTel', cfg.seller_phone,
           'salerAddress', cfg.seller_address,
           'salerAccount', cfg.seller_bank_account,
           'orderNo', i.order_no,
           'invoiceDate', to_char(i.created_at at time zone 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS'),
           'clerk', cfg.clerk,
           'invoiceType', '1',
           'invoiceLine', case i.invoice_kind when 'special' then 'bs' else 'pc' end,
           'pushMode', case when c.email is not null then '0' else '-1' end,
           'email', c.email,
           'remark', concat_ws(' ', coalesce(s.settlement_no, sh.shipment_no),
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
               from erp.ar_invoice_line l where l.ar_invoice_id = i.id))))
    from erp.ar_invoice i
    cross join tax.config cfg
    left join erp.settlement s on s.id = i.settlement_id
    left join erp.shipment sh on sh.id = i.shipment_id
    join erp.customer c on c.id = coalesce(s.customer_id, sh.customer_id)
   where i.id = p_invoice_id
$$;
comment on function tax.build_invoice_payload is 'The Tax_Invoice_Payload of one AR invoice: the requestBillingNew {"order": …} with buyer, seller, orderNo and the invoiceDetail lines (jsonb_agg).';

create function tax._config() returns tax.config
language plpgsql stable as $$
declare
  v tax.config;
begin
  select * into v from tax.config;
  if v.seller_tax_id is null or not exists (select from cloud.endpoint e where e.name = v.endpoint) then
    raise exception using errcode = 'EI012', message = format('e-invoicing is not configured (seller tax id %s, endpoint %s)',
                                                              coalesce(v.seller_tax_id, 'missing'), v.endpoint),
      hint = 'Run tax.put_config(p_seller_tax_id => …, p_seller_name => …, p_clerk => …) and cloud.put_endpoint(''nuonuo'', …, ''nuonuo'', ''invoice_request'').';
  end if;
  return v;
end $$;
comment on function tax._config is 'Internal: the settings, or EI012 when the seller or the endpoint is missing.';

create function tax.issue_invoices(
  p_source text,    -- 'settlement' or 'shipment'
  p_id     bigint   -- the document's id
) returns integer   -- invoices created (0 when this event does not invoice this customer, or it was invoiced already)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_cfg      tax.config;
  v_customer erp.customer;
  v_kind     text;
  v_doc      text;
  v_linked   bigint;
  v_lines    tax.source_line[];
  v_line     tax.source_line;
  v_parts    integer[];
  v_count    integer;
  v_warning  text;
  v_inv      bigint;
  v_req      uuid;
  v_dev      numeric;
  i          integer;
  p          integer;
begin
  if p_source = 'settlement' then
    select s.invoice_kind, s.settlement_no into v_kind, v_doc from erp.settlement s where s.id = p_id;
    select c.* into v_customer from erp.settlement s join erp.customer c on c.id = s.customer_id where s.id = p_id;
    v_doc := 'settlement ' || v_doc;
  else
    select s.invoice_kind, s.shipment_no, s.settlement_id into v_kind, v_doc, v_linked from erp.shipment s where s.id = p_id;
    select c.* into v_customer from erp.shipment s join erp.customer c on c.id = s.customer_id where s.id = p_id;
    v_doc := 'shipment ' || v_doc;
  end if;
  if v_customer.invoice_on <> p_source then
    return 0;
  end if;
  -- one document is invoiced once: serialise approvals of it, and look at what exists
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('tax.issue:' || p_source || ':' || p_id, 0));
  if p_source = 'settlement' then
    if exists (select from erp.ar_invoice a where a.settlement_id = p_id and a.invoice_type = 'blue')
       or exists (select from erp.ar_invoice a join erp.shipment sh on sh.id = a.shipment_id where sh.settlement_id = p_id) then
      return 0;
    end if;
    select array_agg(row(l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price, l.amount, l.tax_rate, l.tax_amount)::tax.source_line order by l.line_no)
      into v_lines from erp.settlement_line l where l.settlement_id = p_id;
  else
    if exists (select from erp.ar_invoice a where a.shipment_id = p_id and a.invoice_type = 'blue')
       or (v_linked is not null and exists (select from erp.ar_invoice a where a.settlement_id = v_linked)) then
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
  v_warning := tax.validate_buyer(v_customer, v_kind, v_doc);
  foreach v_line in array v_lines loop
    perform tax.validate_line(v_line, v_doc);
  end loop;
  v_parts := tax.split_lines(v_lines, v_cfg.max_invoice_amount, v_cfg.max_invoice_lines, v_doc);
  v_count := v_parts[cardinality(v_parts)];
  if v_count > v_cfg.max_parts then
    raise exception using errcode = 'EI006', message = format('%s would need %s invoices, more than the %s allowed', v_doc, v_count, v_cfg.max_parts),
      hint = 'Split the document, or raise the limits with tax.put_config.';
  end if;
  for p in 1 .. v_count loop
    v_req := gen_random_uuid();
    insert into erp.ar_invoice (settlement_id, shipment_id, part_no, part_count, invoice_kind, request_id, order_no,
                                buyer_name, buyer_tax_id, amount_excl_tax, tax_amount, amount_incl_tax, tax_id_warning)
    values (case when p_source = 'settlement' then p_id end, case when p_source = 'shipment' then p_id end, p, v_count, v_kind,
            v_req, tax.order_no_for(v_req), v_customer.name, nullif(v_customer.tax_id, ''), 0, 0, 0, v_warning)
    returning id into v_inv;
    i := 0;
    insert into erp.ar_invoice_line (ar_invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                     tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
    select v_inv, row_number() over (order by l.line_no), l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price,
           l.tax_rate, sep.amount_excl_tax, sep.tax_amount, l.amount
      from unnest(v_lines) with ordinality as l(line_no, item_name, tax_code, spec, unit, quantity, unit_price, amount, tax_rate, tax_amount, ord)
      cross join lateral tax.separate_price_tax(l.amount, l.tax_rate, l.tax_amount) sep
     where v_parts[l.ord] = p;
    select sum(l.tax_amount - l.amount_excl_tax * l.tax_rate) into v_dev from erp.ar_invoice_line l where l.ar_invoice_id = v_inv;
    if abs(v_dev) > 1.27 then
      raise exception using errcode = 'EI008',
        message = format('%s invoice %s of %s: line taxes differ from excl × rate by %s in total, more than 1.27', v_doc, p, v_count, round(v_dev, 4)),
        hint = 'Clear the lines'' tax_amount to let the database compute it, or lower max_invoice_lines so the invoice is split.';
    end if;
    update erp.ar_invoice a
       set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
      from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from erp.ar_invoice_line where ar_invoice_id = v_inv) t
     where a.id = v_inv;
    perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(v_inv), 'erp.ar_invoice', v_inv::text,
                                  null, v_req);
  end loop;
  return v_count;
end $$;
comment on function tax.issue_invoices is 'Turns an approved settlement or posted shipment into AR invoice(s): validates, splits by the limits, separates price and tax, builds each payload and enqueues tax.issue in the caller''s transaction. Returns 0 when the customer is invoiced on the other event or the document (or its linked one) was invoiced already.';

create function tax.tg_settlement__500_issue() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  perform tax.issue_invoices('settlement', new.id);
  return null;
end $$;
comment on function tax.tg_settlement__500_issue is 'Trigger: an approved settlement issues its invoice(s) (tax.issue_invoices).';

create function tax.tg_shipment__500_issue() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  perform tax.issue_invoices('shipment', new.id);
  return null;
end $$;
comment on function tax.tg_shipment__500_issue is 'Trigger: a posted shipment issues its invoice(s) when its customer invoices on shipment.';

create function tax.tg_document__100_stamp() returns trigger
language plpgsql as $$
begin
  if tg_table_name = 'settlement' and new.status = 'approved' and old.status is distinct from 'approved' then
    new.approved_at := coalesce(new.approved_at, now());
  elsif tg_table_name = 'shipment' and new.status = 'posted' and old.status is distinct from 'posted' then
    new.posted_at := coalesce(new.posted_at, now());
  end if;
  return new;
end $$;
comment on function tax.tg_document__100_stamp is 'Trigger: stamps approved_at / posted_at when a settlement is approved or a shipment posted.';

create trigger settlement_100_stamp before update of status on erp.settlement
  for each row execute function tax.tg_document__100_stamp();
create trigger settlement_500_issue after update of status on erp.settlement
  for each row when (new.status = 'approved' and old.status is distinct from 'approved')
  execute function tax.tg_settlement__500_issue();
create trigger shipment_100_stamp before update of status on erp.shipment
  for each row execute function tax.tg_document__100_stamp();
create trigger shipment_500_issue after update of status on erp.shipment
  for each row when (new.status = 'posted' and old.status is distinct from 'posted')
  execute function tax.tg_shipment__500_issue();

------------------------------------------------------------------------------
-- Invoice event log
------------------------------------------------------------------------------
create function tax.log_invoice_event() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if old.invoice_no is distinct from new.invoice_no then
    insert into tax.invoice_event (ar_invoice_id, old_invoice_no, new_invoice_no, invoice_status)
    values (new.id, old.invoice_no, new.invoice_no, new.invoice_status);
  end if;
  return null;
end $$;
comment on function tax.log_invoice_event is 'Trigger update_invoice_status: records each change of an invoice''s invoice_no in tax.invoice_event.';

create trigger update_invoice_status after update of invoice_no on erp.ar_invoice
  for each row execute function tax.log_invoice_event();

------------------------------------------------------------------------------
-- Write-back chain (operation handlers; run by cloud.complete_messages / fail_messages)
------------------------------------------------------------------------------
create function tax._enqueue_query(
  p_inv   erp.ar_invoice,
  p_by    text,            -- 'serial' or 'order'
  p_delay_ms bigint
) returns uuid
language plpgsql as $$
declare
  v_id uuid;
begin
  v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.query',
            case when p_by = 'serial' then jsonb_build_object('serialNos', jsonb_build_array(p_inv.invoice_serial_no), 'isOfferInvoiceDetail', '0')
                 else jsonb_build_object('orderNos', jsonb_build_array(p_inv.order_no), 'isOfferInvoiceDetail', '0') end,
            'erp.ar_invoice', p_inv.id::text, null, null, clock_timestamp() + make_interval(secs => p_delay_ms / 1000.0));
  -- remembered so a callback finds the pending query by primary key
  update erp.ar_invoice set next_query_id = v_id where id = p_inv.id;
  return v_id;
end $$;
comment on function tax._enqueue_query is 'Internal: enqueues the next queryInvoiceResult for an invoice, by serial no. or by orderNo, after a delay.';

create function tax._poll_delay_ms(p_poll integer) returns bigint
language sql stable as $$
  select least(c.poll_cap_ms::bigint, c.first_poll_ms::bigint * (2 ^ greatest(p_poll - 1, 0))::bigint) from tax.config c
$$;
comment on function tax._poll_delay_ms is 'Internal: the wait before query number p_poll + 1: first_poll_ms, doubling, capped at poll_cap_ms.';

create function tax.record_issue_submitted(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  update erp.ar_invoice a
     set invoice_status = 'issuing',
         invoice_serial_no = coalesce(r #>> '{result,invoiceSerialNum}', a.invoice_serial_no),
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object('submit', r),
         updated_at = now()
   where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing')
  returning * into v_inv;
  if not found then
    return;
  end if;
  -- E9106: the platform has this orderNo already (an earlier attempt got through): query it by orderNo
  perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end,
                             (select first_poll_ms from tax.config));
end $$;
comment on function tax.record_issue_submitted is 'Write-back of tax.issue: keeps the serial no. and the raw answer, marks the invoice issuing and enqueues the first result query (by orderNo after E9106).';

create function tax.record_issue_failed(m cloud.outbox, e jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  update erp.ar_invoice a
     set invoice_status = 'failed',
         error_code = coalesce(e #>> '{response,code}', e->>'error_class'),
         error_message = coalesce(e #>> '{response,describe}', e->>'error'),
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
         updated_at = now()
   where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
  update erp.invoice_reversal_request q
     set status = 'failed', error_message = coalesce(e #>> '{response,describe}', e->>'error'), finished_at = now()
   where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
end $$;
comment on function tax.record_issue_failed is 'on_fail of tax.issue and tax.query: the invoice is failed with the cloud''s code and message (or the delivery error).';

create function tax.record_invoice_result(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv  erp.ar_invoice;
  v_res  jsonb := r #> '{result,0}';
  v_st   text := r #>> '{result,0,status}';
  v_no   text;
  v_cfg  tax.config;
begin
  select * into v_inv from erp.ar_invoice a where a.id = m.aggregate_id::bigint for update;
  if not found or v_inv.invoice_status <> 'issuing' then
    return;  -- a hint-triggered query raced a scheduled one: the first final answer wins
  end if;
  select * into v_cfg from tax.config;
  if v_st = '2' then
    v_no := coalesce(nullif(v_res->>'allElectronicInvoiceNumber', ''), v_res->>'invoiceNo');
    update erp.ar_invoice a
       set invoice_no = v_no, invoice_status = 'issued',
           invoice_serial_no = coalesce(v_res->>'serialNo', a.invoice_serial_no),
           invoice_date = to_timestamp((v_res->>'invoiceTime')::bigint / 1000.0),
           pdf_url = v_res->>'pdfUrl', ofd_url = v_res->>'ofdUrl', xml_url = v_res->>'xmlUrl',
           polls = a.polls + 1, error_code = null, error_message = null,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r),
           updated_at = now()
     where a.id = v_inv.id;
    if v_inv.invoice_type = 'red' then
      update erp.ar_invoice set invoice_status = 'reversed', updated_at = now() where id = v_inv.original_invoice_id;
      update erp.invoice_reversal_request set status = 'issued', finished_at = now()
       where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
    end if;
    if coalesce(v_res->>'pdfUrl', '') <> '' then
      perform cloud.enqueue_message(v_cfg.endpoint, 'tax.download_pdf',
        jsonb_build_object('url', v_res->>'pdfUrl', 'max_bytes', v_cfg.max_pdf_bytes, 'invoice_no', v_no),
        'erp.ar_invoice', v_inv.id::text);
    end if;
  elsif v_st in ('22', '24') then
    update erp.ar_invoice a
       set invoice_status = 'failed', error_code = 'nuonuo_' || v_st,
           error_message = coalesce(nullif(v_res->>'failCause', ''), v_res->>'statusMsg', 'the platform failed the invoice'),
           polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
    update erp.invoice_reversal_request set status = 'failed', error_message = v_res->>'failCause', finished_at = now()
     where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  elsif v_inv.polls + 1 >= v_cfg.max_polls then
    update erp.ar_invoice a
       set invoice_status = 'failed', error_code = 'poll_limit',
           error_message = format('no final answer after %s queries (last status %s); run tax.requery_invoice(%s) to ask again', v_inv.polls + 1, coalesce(v_st, r->>'code'), v_inv.id),
           polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
  else
    -- 20 开票中, 21 签章中, or E9500 (not visible yet): ask again later
    update erp.ar_invoice a set polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, tax._poll_delay_ms(v_inv.polls));
  end if;
end $$;
comment on function tax.record_invoice_result is 'Write-back of tax.query: status 2 → issued (20-digit number, date, URLs, raw answer) and the PDF download enqueued; 22/24 → failed with the fail cause; still issuing → the next query, backing off, up to max_polls.';

create function tax.record_pdf(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_pdf  bytea := decode(r->>'content_base64', 'base64');
  v_max  integer := (select max_pdf_bytes from tax.config);
begin
  if v_pdf is null or substring(v_pdf from 1 for 5) <> '\x255044462d'::bytea or length(v_pdf) > v_max then
    update erp.ar_invoice set error_code = 'pdf_refused',
           error_message = format('the PDF from %s was refused: not a PDF or over %s bytes', m.payload->>'url', v_max), updated_at = now()
     where id = m.aggregate_id::bigint;
    return;
  end if;
  insert into erp.attachment (doc_type, doc_id, file_name, content_type, content, sha256, byte_size, source_url)
  values ('erp.ar_invoice', m.aggregate_id::bigint, coalesce(m.payload->>'invoice_no', m.aggregate_id) || '.pdf', 'application/pdf',
          v_pdf, encode(sha256(v_pdf), 'hex'), length(v_pdf), m.payload->>'url')
  on conflict (doc_type, doc_id, file_name) do nothing;
  update erp.ar_invoice set error_code = null, error_message = null, updated_at = now()
   where id = m.aggregate_id::bigint and error_code in ('pdf_download', 'pdf_refused');
  -- the bytes live in erp.attachment now; the outbox keeps only the facts
  update cloud.outbox set response = r - 'content_base64' where request_id = m.request_id;
end $$;
comment on function tax.record_pdf is 'Write-back of tax.download_pdf: checks the %PDF magic and the size cap again, stores the PDF as the invoice''s erp.attachment with its sha256, and drops the bytes from the outbox row.';

create function tax.record_pdf_failed(m cloud.outbox, e jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  update erp.ar_invoice
     set error_code = 'pdf_download', error_message = format('PDF not stored (%s): %s', e->>'error_class', e->>'error'), updated_at = now()
   where id = m.aggregate_id::bigint;
end $$;
comment on function tax.record_pdf_failed is 'on_fail of tax.download_pdf: the invoice stays issued; error_code pdf_download says why its PDF is missing (refused host, redirect, not a PDF, too large).';

create function tax.requery_invoice(p_invoice_id bigint) returns uuid
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  update erp.ar_invoice set invoice_status = 'issuing', polls = 0, error_code = null, error_message = null, updated_at = now()
   where id = p_invoice_id and invoice_status = 'failed' and error_code = 'poll_limit'
  returning * into v_inv;
  if not found then
    raise exception using errcode = 'EI013', message = format('invoice %s is not waiting for a final answer', p_invoice_id),
      hint = 'Only an invoice failed with error_code poll_limit can be queried again.';
  end if;
  return tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, 0);
end $$;
comment on function tax.requery_invoice is 'Operator: asks the platform again about an invoice that gave up polling (error_code poll_limit).';

create function tax.reissue_invoice(p_invoice_id bigint) returns uuid
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv  erp.ar_invoice;
  v_cust erp.customer;
  v_cfg  tax.config;
  v_req  uuid := gen_random_uuid();
begin
  select * into v_inv from erp.ar_invoice where id = p_invoice_id for update;
  if not found or v_inv.invoice_status <> 'failed' or v_inv.invoice_type <> 'blue' or v_inv.error_code = 'poll_limit' then
    raise exception using errcode = 'EI013', message = format('invoice %s is not a failed blue invoice that can be issued again', p_invoice_id),
      hint = 'Only a blue invoice the platform refused can be re-issued; one that gave up polling is asked again with tax.requery_invoice.';
  end if;
  select c.* into v_cust from erp.customer c
   where c.id = (select coalesce(s.customer_id, sh.customer_id) from erp.ar_invoice i
                   left join erp.settlement s on s.id = i.settlement_id left join erp.shipment sh on sh.id = i.shipment_id where i.id = p_invoice_id);
  v_cfg := tax._config();
  -- the corrected buyer (tax id, name) is checked again; a refused invoice needs a new orderNo
  update erp.ar_invoice
     set request_id = v_req, order_no = tax.order_no_for(v_req), invoice_status = 'pending', invoice_serial_no = null,
         buyer_name = v_cust.name, buyer_tax_id = nullif(v_cust.tax_id, ''),
         tax_id_warning = tax.validate_buyer(v_cust, v_inv.invoice_kind, format('invoice %s', p_invoice_id)),
         polls = 0, error_code = null, error_message = null,
         tax_cloud_response = jsonb_build_object('previous', v_inv.tax_cloud_response), updated_at = now()
   where id = p_invoice_id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(p_invoice_id), 'erp.ar_invoice', p_invoice_id::text, null, v_req);
  return v_req;
end $$;
comment on function tax.reissue_invoice is 'Operator: issues a refused (failed) blue invoice again under a new orderNo, with the customer''s current name and tax id (checked again); the previous answers are kept under tax_cloud_response.previous.';

create function tax.accept_invoice_callback(
  p_order_no text,   -- orderno of the callback
  p_content  jsonb   -- its content (a hint only: never booked)
) returns text       -- what was done: 'query_now', 'final', 'unknown'
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
  v_n   integer;
begin
  select * into v_inv from erp.ar_invoice where order_no = p_order_no;
  if not found then
    return 'unknown';
  elsif v_inv.invoice_status <> 'issuing' then
    return 'final';
  end if;
  -- the callback is unsigned: it only moves the next scheduled query to now
  update cloud.outbox set next_attempt_at = clock_timestamp(), updated_at = clock_timestamp()
   where request_id = v_inv.next_query_id and status = 'pending' and next_attempt_at > clock_timestamp();
  get diagnostics v_n = row_count;
  if v_n > 0 then
    perform cloud._wake_listeners((select e.wake_channel from cloud.endpoint e join tax.config c on c.endpoint = e.name));
  end if;
  return 'query_now';
end $$;
comment on function tax.accept_invoice_callback is 'The Nuonuo callback receiver''s SQL side: a callback is a hint, so it only makes the invoice''s pending result query due now; the query''s answer is what gets booked.';

------------------------------------------------------------------------------
-- Red-letter (红冲)
------------------------------------------------------------------------------
create function tax.tg_reversal__500_request() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_orig erp.ar_invoice;
  v_cfg  tax.config;
  v_red  bigint;
  v_req  uuid := gen_random_uuid();
  v_bad  integer;
begin
  select * into v_orig from erp.ar_invoice where id = new.ar_invoice_id for update;
  if v_orig.invoice_status = 'reversed' or exists (
       select from erp.invoice_reversal_request q where q.ar_invoice_id = new.ar_invoice_id and q.id <> new.id and q.status in ('pending', 'confirming', 'issued')) then
    raise exception using errcode = 'EI016', message = format('invoice %s is already reversed or has a reversal under way', v_orig.invoice_no),
      hint = 'See erp.invoice_reversal_request for this invoice.';
  end if;
  if v_orig.invoice_status <> 'issued' or v_orig.invoice_type <> 'blue' then
    raise exception using errcode = 'EI013', message = format('invoice %s (%s) is not an issued blue invoice and cannot be reversed', new.ar_invoice_id, v_orig.invoice_status),
      hint = 'Only issued invoices can be reversed; a failed one was never issued.';
  end if;
  if new.reason is null or new.reason not in ('1', '2', '3', '4') then
    raise exception using errcode = 'EI014', message = format('reversal reason %L is not 1–4', new.reason),
      hint = '1 销货退回, 2 开票有误, 3 服务中止, 4 销售折让 (Nuonuo''s numbering).';
  end if;
  select n into v_bad from unnest(new.line_nos) n
   where not exists (select from erp.ar_invoice_line l where l.ar_invoice_id = v_orig.id and l.line_no = n) limit 1;
  if v_bad is not null or cardinality(new.line_nos) = 0 then
    raise exception using errcode = 'EI015', message = format('reversal of invoice %s: line %s is not on the invoice', v_orig.invoice_no, coalesce(v_bad::text, '(none given)')),
      hint = 'line_nos lists erp.ar_invoice_line.line_no values of the invoice; leave it null for a full reversal.';
  end if;
  v_cfg := tax._config();
  insert into erp.ar_invoice (settlement_id, shipment_id, original_invoice_id, invoice_type, invoice_kind, request_id, order_no,
                              buyer_name, buyer_tax_id, amount_excl_tax, tax_amount, amount_incl_tax, invoice_status)
  values (v_orig.settlement_id, v_orig.shipment_id, v_orig.id, 'red', v_orig.invoice_kind, v_req, tax.order_no_for(v_req),
          v_orig.buyer_name, v_orig.buyer_tax_id, 0, 0, 0, 'pending')
  returning id into v_red;
  insert into erp.ar_invoice_line (ar_invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                   tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
  select v_red, l.line_no, l.source_line_no, l.item_name, l.tax_code, l.spec, l.unit, -l.quantity, l.unit_price,
         l.tax_rate, -l.amount_excl_tax, -l.tax_amount, -l.amount_incl_tax
    from erp.ar_invoice_line l
   where l.ar_invoice_id = v_orig.id and (new.line_nos is null or l.line_no = any (new.line_nos));
  update erp.ar_invoice a set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
    from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from erp.ar_invoice_line where ar_invoice_id = v_red) t
   where a.id = v_red;
  update erp.invoice_reversal_request set red_invoice_id = v_red, bill_id = left(tax.order_no_for(v_req), 32) where id = new.id;
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
         from erp.ar_invoice_line l where l.ar_invoice_id = v_red) end)),
    'erp.ar_invoice', v_red::text, null, v_req);
  return null;
end $$;
comment on function tax.tg_reversal__500_request is 'Trigger: a reversal request for an issued invoice is checked (EI013–EI016), becomes a red erp.ar_invoice (negative lines, full or by line) and enqueues the 数电 red confirmation (saveInvoiceRedConfirm).';

create trigger invoice_reversal_request_500_request after insert on erp.invoice_reversal_request
  for each row execute function tax.tg_reversal__500_request();

create function tax.record_red_confirm_submitted(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  update erp.ar_invoice a set invoice_status = 'issuing', tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_confirm', r), updated_at = now()
   where a.id = m.aggregate_id::bigint and a.invoice_status = 'pending';
  update erp.invoice_reversal_request set status = 'confirming' where red_invoice_id = m.aggregate_id::bigint and status = 'pending';
  perform cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query',
    jsonb_build_object('identity', '0', 'billId', m.payload->>'billId'), 'erp.ar_invoice', m.aggregate_id, null, null,
    clock_timestamp() + make_interval(secs => tax._poll_delay_ms(1) / 1000.0));
end $$;
comment on function tax.record_red_confirm_submitted is 'Write-back of tax.red_confirm: the red-confirmation form exists (or existed: a duplicate billId is read back); enqueues its status query.';

create function tax.record_red_confirm_status(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_form jsonb := coalesce(r #> '{result,list,0}', r #> '{result,0}');
  v_st   text := v_form->>'billStatus';
  v_inv  erp.ar_invoice;
  v_n    integer;
begin
  select * into v_inv from erp.ar_invoice where id = m.aggregate_id::bigint for update;
  if not found or v_inv.invoice_status <> 'issuing' then
    return;
  end if;
  update erp.invoice_reversal_request set bill_status = v_st where red_invoice_id = v_inv.id;
  if v_st in ('01', '04') and coalesce(v_form->>'invoiceSerialNum', '') <> '' then
    -- the bureau issued the red invoice: fetch it like any other (number, PDF)
    update erp.ar_invoice a set invoice_serial_no = v_form->>'invoiceSerialNum', polls = 0,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    perform tax._enqueue_query(v_inv, 'serial', 0);
  elsif v_st in ('05', '06', '07', '08', '09', '10', '16') then
    update erp.ar_invoice a set invoice_status = 'failed', error_code = 'red_bill_' || v_st,
           error_message = format('red-confirmation form %s ended with status %s', v_form->>'billNo', v_st),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
    update erp.invoice_reversal_request set status = 'failed', finished_at = now(),
           error_message = format('red-confirmation form ended with status %s', v_st)
     where red_invoice_id = v_inv.id;
  else
    update erp.ar_invoice a set polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning polls into v_n;
    perform cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query', m.payload, 'erp.ar_invoice', m.aggregate_id, null, null,
      clock_timestamp() + make_interval(secs => tax._poll_delay_ms(v_n) / 1000.0));
  end if;
end $$;
comment on function tax.record_red_confirm_status is 'Write-back of tax.red_query: 01/04 → the red invoice''s serial no. is queried like a blue one; 05–10/16 → the reversal failed; otherwise query the form again later.';

select cloud.put_operation_handler('tax.issue', 'tax.record_issue_submitted(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.query', 'tax.record_invoice_result(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.download_pdf', 'tax.record_pdf(cloud.outbox, jsonb)', 'tax.record_pdf_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.red_confirm', 'tax.record_red_confirm_submitted(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.red_query', 'tax.record_red_confirm_status(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
revoke all on all tables in schema erp from public;
revoke all on all tables in schema tax from public;
revoke all on all functions in schema tax from public;
grant select, insert, update, delete on erp.customer, erp.settlement, erp.settlement_line, erp.shipment, erp.shipment_line to erp_cloud_app;
grant select on erp.ar_invoice, erp.ar_invoice_line, erp.attachment, erp.invoice_reversal_request, tax.invoice_event to erp_cloud_app;
grant insert on erp.invoice_reversal_request to erp_cloud_app;
grant select on all tables in schema erp to erp_cloud_operator;
grant select on all tables in schema tax to erp_cloud_operator;
grant update on tax.config to erp_cloud_operator;
grant execute on function tax.record_issue_submitted(cloud.outbox, jsonb), tax.record_issue_failed(cloud.outbox, jsonb),
  tax.record_invoice_result(cloud.outbox, jsonb), tax.record_pdf(cloud.outbox, jsonb), tax.record_pdf_failed(cloud.outbox, jsonb),
  tax.record_red_confirm_submitted(cloud.outbox, jsonb), tax.record_red_confirm_status(cloud.outbox, jsonb),
  tax.accept_invoice_callback(text, jsonb) to erp_cloud_listener;
grant execute on function tax.put_config(text, text, text, text, text, text, text, numeric, integer, integer, integer, integer, integer, text),
  tax.requery_invoice(bigint), tax.reissue_invoice(bigint) to erp_cloud_operator;
grant execute on function tax.order_no_for(uuid), tax.decimal_text(numeric), tax.uscc_check_digit_ok(text), tax.tax_rate_in_use(numeric),
  tax.separate_price_tax(numeric, numeric, numeric), tax.build_invoice_payload(bigint)
  to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;
