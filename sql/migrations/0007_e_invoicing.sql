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
--                            22 → failed with the platform's fail cause (a new orderNo may re-issue it)
--                            24 (issued, signing failed) → reInvoice on the serial no., keep polling
--   timeouts / 5xx until the attempts run out, or a failed query → failed, error_code
--                            unknown_outcome: only tax.requery_invoice (same orderNo), never a new one
--   tax.download_pdf write-back: %PDF checked, size capped, sha256 → erp.attachment
--   erp.invoice_reversal_request insert → red ar_invoice → tax.red_confirm
--           → tax.red_query (backing off, at most 73 h) → tax.query of the red invoice → issued,
--           original marked reversed (every line) or partially_reversed.
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
--   EI018  reissue refused: the invoice was not refused for certain (outcome unknown, or not failed)
--   EI019  requery refused: the invoice is not waiting for a final answer

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
  e9500_min_wait_ms   integer not null default 600000,  -- E9500 is a definite "never created" only this long after the submit
  updated_at          timestamptz not null default now(),
  -- the limits live here, so a direct UPDATE cannot break them either
  constraint config_seller_tax_id check (seller_tax_id is null or seller_tax_id ~ '^[A-Z0-9]{15}$|^[A-Z0-9]{17,18}$|^[A-Z0-9]{20}$'),
  constraint config_max_invoice_amount check (max_invoice_amount is null or max_invoice_amount > 0),
  constraint config_max_invoice_lines check (max_invoice_lines between 1 and 2000),
  constraint config_max_parts check (max_parts between 1 and 1000),
  -- 50 ms is the floor (tests and benchmarks poll a fast simulator); production uses seconds (default 3000)
  constraint config_first_poll_ms check (first_poll_ms between 50 and 600000),
  constraint config_poll_cap_ms check (poll_cap_ms between first_poll_ms and 3600000),
  constraint config_max_polls check (max_polls between 1 and 1000),
  constraint config_max_pdf_bytes check (max_pdf_bytes between 1024 and 104857600),
  constraint config_e9500_min_wait_ms check (e9500_min_wait_ms between 0 and 86400000)
);
comment on table tax.config is 'The one row of e-invoicing settings: which endpoint issues, the seller, splitting limits, polling schedule, PDF size cap, callback URL. Change with tax.put_config; the CHECK constraints hold the limits (first poll 50 ms–10 min, cap up to 1 h, 1–1000 polls, PDF cap 1 KiB–100 MiB, 1–2000 lines).';
insert into tax.config default values;

create function tax.put_config(
  p_endpoint            text    default null,  -- cloud.endpoint that issues invoices
  p_seller_tax_id       text    default null,  -- 销方税号 (salerTaxNum)
  p_seller_name         text    default null,
  p_seller_address      text    default null,
  p_seller_phone        text    default null,
  p_seller_bank_account text    default null,
  p_clerk               text    default null,  -- 开票人: must match the e-tax bureau login user for 数电
  p_max_invoice_amount  numeric default null,  -- split above this tax-inclusive amount (p_unset => '{max_invoice_amount}' for no ceiling)
  p_max_invoice_lines   integer default null,  -- split above this many lines
  p_first_poll_ms       integer default null,  -- first result query after submit (50 ms floor; use seconds in production)
  p_poll_cap_ms         integer default null,  -- longest wait between queries
  p_max_polls           integer default null,  -- queries before the invoice is marked failed (requery with tax.requery_invoice)
  p_max_pdf_bytes       integer default null,  -- larger PDFs are refused
  p_callback_url        text    default null,  -- callBackUrl sent with each order (the listener's inbound door)
  p_unset               text[]  default '{}',  -- optional settings to clear: seller_address, seller_phone, seller_bank_account, clerk, max_invoice_amount, callback_url
  p_e9500_min_wait_ms   integer default null   -- E9500 proves nothing was created only this long after the submit (0–24 h; default 10 min)
) returns tax.config
language plpgsql as $$
declare
  v_row tax.config;
  v_bad text;
begin
  -- a setting not given keeps its value; a nullable one is cleared only by naming it in p_unset
  select u into v_bad from unnest(coalesce(p_unset, '{}')) u
   where u not in ('seller_address', 'seller_phone', 'seller_bank_account', 'clerk', 'max_invoice_amount', 'callback_url') limit 1;
  if v_bad is not null then
    raise exception using errcode = 'EI017', message = format('setting %L cannot be cleared', v_bad),
      hint = 'p_unset takes seller_address, seller_phone, seller_bank_account, clerk, max_invoice_amount, callback_url.';
  end if;
  update tax.config c
     set endpoint = coalesce(p_endpoint, c.endpoint),
         seller_tax_id = coalesce(p_seller_tax_id, c.seller_tax_id),
         seller_name = coalesce(p_seller_name, c.seller_name),
         seller_address = case when 'seller_address' = any (p_unset) then null else coalesce(p_seller_address, c.seller_address) end,
         seller_phone = case when 'seller_phone' = any (p_unset) then null else coalesce(p_seller_phone, c.seller_phone) end,
         seller_bank_account = case when 'seller_bank_account' = any (p_unset) then null else coalesce(p_seller_bank_account, c.seller_bank_account) end,
         clerk = case when 'clerk' = any (p_unset) then null else coalesce(p_clerk, c.clerk) end,
         max_invoice_amount = case when 'max_invoice_amount' = any (p_unset) then null else coalesce(p_max_invoice_amount, c.max_invoice_amount) end,
         max_invoice_lines = coalesce(p_max_invoice_lines, c.max_invoice_lines),
         first_poll_ms = coalesce(p_first_poll_ms, c.first_poll_ms),
         poll_cap_ms = coalesce(p_poll_cap_ms, c.poll_cap_ms),
         max_polls = coalesce(p_max_polls, c.max_polls),
         max_pdf_bytes = coalesce(p_max_pdf_bytes, c.max_pdf_bytes),
         callback_url = case when 'callback_url' = any (p_unset) then null else coalesce(p_callback_url, c.callback_url) end,
         e9500_min_wait_ms = coalesce(p_e9500_min_wait_ms, c.e9500_min_wait_ms),
         updated_at = now()
  returning * into v_row;
  return v_row;
exception when check_violation then
  get stacked diagnostics v_bad = constraint_name;
  raise exception using errcode = 'EI017', message = format('invalid e-invoicing setting (%s)', v_bad),
    detail = format('endpoint %s, seller tax id %s, max lines %s, max amount %s, polls %s ms / cap %s ms × %s, pdf cap %s bytes',
                    p_endpoint, p_seller_tax_id, p_max_invoice_lines, p_max_invoice_amount, p_first_poll_ms, p_poll_cap_ms, p_max_polls, p_max_pdf_bytes),
    hint = 'Seller tax id 15, 17, 18 or 20 capitals and digits; lines 1–2000; amount above 0; first poll 50–600000 ms and the cap at least that (≤ 1 h); 1–1000 polls; PDF cap 1 KiB–100 MiB; E9500 wait 0–86400000 ms.';
end $$;
comment on function tax.put_config is 'Sets the e-invoicing settings given (the others keep their values; p_unset clears optional ones): seller, endpoint, splitting limits, polling, PDF cap, callback URL. EI017 names the broken limit (the CHECK constraints of tax.config).';

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
  invoice_status     text not null default 'pending' check (invoice_status in ('pending', 'issuing', 'issued', 'failed', 'partially_reversed', 'reversed')),
  invoice_date       timestamptz,
  amount_excl_tax    numeric(16, 2) not null,
  tax_amount         numeric(16, 2) not null,
  amount_incl_tax    numeric(16, 2) not null,
  pdf_url            text,
  ofd_url            text,
  xml_url            text,
  polls              integer not null default 0,
  next_query_id      uuid,
  submitted_at       timestamptz,
  order_known        boolean not null default false,
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
comment on table erp.ar_invoice is 'AR invoices issued through the tax cloud. invoice_status: pending → issuing → issued, or failed (error_code / error_message say why: unknown_outcome and poll_limit mean the platform may still have issued it, so only tax.requery_invoice applies; any other code is a definite refusal that tax.reissue_invoice may issue again), then partially_reversed while some lines have an issued red invoice, and reversed when every line has. tax_cloud_response keeps each step''s raw answer (submit, query, pdf).';
comment on column erp.ar_invoice.order_no is 'Nuonuo orderNo: the request_id without dashes, so a retry after a timeout can never issue twice (E9106 = already submitted).';
comment on column erp.ar_invoice.submitted_at is 'When the platform first took the submit under the current orderNo (tax.issue answered); E9500 counts as "never created" only tax.config.e9500_min_wait_ms after it.';
comment on column erp.ar_invoice.order_known is 'The platform once answered a query by the current orderNo with anything but E9500: a later E9500 then never proves nothing was created.';
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
  form_submitted_at timestamptz,
  finished_at       timestamptz
);
comment on column erp.invoice_reversal_request.form_submitted_at is 'When the platform took the red-confirmation form (tax.red_confirm answered): the 72-hour confirmation deadline counts from here.';
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
    v_req := cloud.new_request_id();
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
  -- the exponent stops at 30 (first × 2^30 fits a bigint), so poll 53 or 5000 waits the cap instead of overflowing
  select least(c.poll_cap_ms::bigint, c.first_poll_ms::bigint * (2::bigint ^ least(greatest(p_poll - 1, 0), 30))::bigint) from tax.config c
$$;
comment on function tax._poll_delay_ms is 'Internal: the wait before query number p_poll + 1: first_poll_ms, doubling (exponent capped at 30), capped at poll_cap_ms.';

create function tax._outcome_unknown(p_inv erp.ar_invoice) returns boolean
language sql immutable as $$
  select p_inv.invoice_status = 'failed' and p_inv.error_code in ('unknown_outcome', 'poll_limit')
$$;
comment on function tax._outcome_unknown is 'Internal: whether a failed invoice may still have been issued by the platform (error_code unknown_outcome or poll_limit): only tax.requery_invoice applies, and a late answer is still booked.';

create function tax._answer_is_stale(m cloud.outbox, p_inv erp.ar_invoice) returns boolean
language sql immutable as $$
  -- a submit under an earlier orderNo (before tax.reissue_invoice), or a query about one
  select case when m.operation in ('tax.issue', 'tax.red_confirm') then m.request_id <> p_inv.request_id
              when m.operation = 'tax.query' then
                   (m.payload ? 'orderNos' and m.payload #>> '{orderNos,0}' is distinct from p_inv.order_no)
                or (m.payload ? 'serialNos' and m.payload #>> '{serialNos,0}' is distinct from p_inv.invoice_serial_no)
              else false end
$$;
comment on function tax._answer_is_stale is 'Internal: whether a tax.issue / tax.red_confirm / tax.query answer is about another orderNo or serial no. than the invoice''s current one (sent before a tax.reissue_invoice): such an answer never changes the invoice.';

create function tax._keep_stale_answer(m cloud.outbox, r jsonb) returns void
language sql as $$
  update erp.ar_invoice a
     set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('stale', jsonb_build_object(
           'operation', m.operation, 'request_id', m.request_id, 'payload', m.payload, 'answer', r)),
         updated_at = now()
   where a.id = m.aggregate_id::bigint
$$;
comment on function tax._keep_stale_answer is 'Internal: keeps an answer about an earlier orderNo under tax_cloud_response.stale, for the operator, without touching the invoice''s status.';

create function tax._issue_refused(m cloud.outbox, e jsonb) returns boolean
language sql stable as $$
  -- definite only when the message ended on a permanent error and either no earlier attempt of this
  -- request_id reached the network (counted in cloud.log: a replay resets outbox.attempts), or the
  -- platform itself answered this orderNo with a business refusal (had an earlier attempt got through,
  -- the answer would be E9106). A gateway/credential refusal (070…, sign, token) says nothing about the orderNo.
  select e->>'status' = 'failed'
         and ((select count(*) from cloud.log l
                where l.request_id = m.request_id
                  and (l.http_status is not null or l.error_class in ('timeout', 'network', 'econnreset', 'epipe')))
              <= case when e->>'http_status' is not null then 1 else 0 end
              or (coalesce((e->>'http_status')::integer, 0) between 200 and 299
                  and coalesce(e #>> '{response,code}', '') not in ('', 'E0000', 'E9106')
                  and coalesce(e #>> '{response,code}', '') not like '070%'
                  and coalesce(e->>'error_class', '') not in ('sign_mismatch', 'token_refused', 'token_quota', 'token_unavailable')))
$$;
comment on function tax._issue_refused is 'Internal: whether a failed tax.issue / tax.red_confirm proves the platform created nothing: a permanent error when no earlier attempt of the request_id reached the network (cloud.log, not the attempt counter a replay resets), or a business refusal of this orderNo (never a 070… gateway / credential code). Timeouts and 5xx until the attempts ran out (status dead) prove nothing.';

create function tax.record_issue_submitted(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  -- a failed invoice of unknown outcome still takes the answer (a replay of its submit, E9106)
  select * into v_inv from erp.ar_invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, r);  -- the submit of an earlier orderNo: never books anything
    return;
  end if;
  update erp.ar_invoice a
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
comment on function tax.record_issue_submitted is 'Write-back of tax.issue: keeps the serial no. and the raw answer, marks the invoice issuing (also one failed with an unknown outcome) and enqueues the first result query (by orderNo after E9106).';

create function tax.record_issue_failed(m cloud.outbox, e jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_why text := coalesce(e #>> '{response,describe}', e->>'error');
  v_inv erp.ar_invoice;
begin
  select * into v_inv from erp.ar_invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, e);
    return;
  end if;
  if tax._issue_refused(m, e) then
    update erp.ar_invoice a
       set invoice_status = 'failed',
           error_code = coalesce(e #>> '{response,code}', e->>'error_class'),
           error_message = v_why,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
           updated_at = now()
     where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
    update erp.invoice_reversal_request q
       set status = 'failed', error_message = v_why, finished_at = now()
     where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
  else
    -- the platform may have it: never a new orderNo, only a query under the same one
    update erp.ar_invoice a
       set invoice_status = 'failed', error_code = 'unknown_outcome',
           error_message = format('%s gave up (%s: %s); the platform may have issued it: run tax.requery_invoice(%s)',
                                  m.operation, e->>'error_class', v_why, a.id),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
           updated_at = now()
     where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
    -- the reversal stays under way (its lines stay blocked) until the outcome is known
    update erp.invoice_reversal_request q
       set error_message = format('outcome unknown (%s); run tax.requery_invoice(%s)', v_why, q.red_invoice_id)
     where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
  end if;
end $$;
comment on function tax.record_issue_failed is 'on_fail of tax.issue and tax.red_confirm: a definite refusal (tax._issue_refused) fails the invoice with the cloud''s code and message; otherwise (timeouts / 5xx until the attempts ran out) it is failed with error_code unknown_outcome, which only tax.requery_invoice resolves.';

create function tax.record_query_failed(m cloud.outbox, e jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  select * into v_inv from erp.ar_invoice a where a.id = m.aggregate_id::bigint for update;
  if found and tax._answer_is_stale(m, v_inv) then
    perform tax._keep_stale_answer(m, e);
    return;
  end if;
  -- a query that fails says nothing about the invoice: its outcome is unknown
  update erp.ar_invoice a
     set invoice_status = 'failed', error_code = 'unknown_outcome',
         error_message = format('%s gave up (%s: %s); run tax.requery_invoice(%s) to ask again',
                                m.operation, e->>'error_class', coalesce(e #>> '{response,describe}', e->>'error'), a.id),
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object(split_part(m.operation, '.', 2), e),
         updated_at = now()
   where a.id = m.aggregate_id::bigint and a.invoice_status in ('pending', 'issuing');
  update erp.invoice_reversal_request q
     set error_message = format('outcome unknown; run tax.requery_invoice(%s)', q.red_invoice_id)
   where q.red_invoice_id = m.aggregate_id::bigint and q.status in ('pending', 'confirming');
end $$;
comment on function tax.record_query_failed is 'on_fail of tax.query and tax.red_query: the invoice is failed with error_code unknown_outcome (never a refusal: only tax.requery_invoice applies to it).';

create function tax._mark_original_reversed(p_original bigint) returns void
language sql as $$
  update erp.ar_invoice o
     set invoice_status = case when exists (
           select from erp.ar_invoice_line l where l.ar_invoice_id = o.id and l.line_no not in (
             select rl.line_no from erp.ar_invoice r join erp.ar_invoice_line rl on rl.ar_invoice_id = r.id
              where r.original_invoice_id = o.id and r.invoice_type = 'red' and r.invoice_status = 'issued'))
           then 'partially_reversed' else 'reversed' end,
         updated_at = now()
   where o.id = p_original and o.invoice_status in ('issued', 'partially_reversed')
$$;
comment on function tax._mark_original_reversed is 'Internal: after a red invoice is issued, its original is reversed when every line has an issued red line, else partially_reversed.';

create function tax._reinvoice_supported() returns boolean
language sql stable as $$
  select e.provider = 'nuonuo' and coalesce(nullif(e.config->>'method_prefix', ''), 'nuonuo.OpeMplatform') = 'nuonuo.OpeMplatform'
    from cloud.endpoint e join tax.config c on c.endpoint = e.name
$$;
comment on function tax._reinvoice_supported is 'Internal: whether the issuing endpoint can retry signing (nuonuo.OpeMplatform.reInvoice; the classic ElectronInvoice product has no such method).';

create function tax.record_invoice_result(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv  erp.ar_invoice;
  v_res  jsonb := r #> '{result,0}';
  v_st   text := r #>> '{result,0,status}';
  v_no   text;
  v_cfg  tax.config;
  v_unknown boolean;
  v_n    integer;
begin
  select * into v_inv from erp.ar_invoice a where a.id = m.aggregate_id::bigint for update;
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
      update erp.invoice_reversal_request set status = 'issued', finished_at = now(), error_message = null
       where red_invoice_id = v_inv.id and status in ('pending', 'confirming', 'failed');
      perform tax._mark_original_reversed(v_inv.original_invoice_id);
    end if;
    if coalesce(v_res->>'pdfUrl', '') <> '' then
      perform cloud.enqueue_message(v_cfg.endpoint, 'tax.download_pdf',
        jsonb_build_object('url', v_res->>'pdfUrl', 'max_bytes', v_cfg.max_pdf_bytes, 'invoice_no', v_no),
        'erp.ar_invoice', v_inv.id::text);
    end if;
  elsif v_st = '22' then
    -- 开票失败: a definite refusal; a new orderNo (tax.reissue_invoice) may issue it
    update erp.ar_invoice a
       set invoice_status = 'failed', error_code = 'nuonuo_22',
           error_message = coalesce(nullif(v_res->>'failCause', ''), v_res->>'statusMsg', 'the platform failed the invoice'),
           polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
    update erp.invoice_reversal_request set status = 'failed', error_message = v_res->>'failCause', finished_at = now()
     where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  elsif v_unknown then
    -- a late non-final answer for an invoice that gave up: kept; the operator's requery polls again
    update erp.ar_invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id;
  elsif v_inv.polls + 1 >= v_cfg.max_polls then
    if r->>'code' = 'E9500' and v_inv.invoice_serial_no is null and not v_inv.order_known
       and coalesce(v_inv.tax_cloud_response #>> '{submit,code}', '') <> 'E9106'
       and clock_timestamp() >= v_inv.submitted_at + make_interval(secs => v_cfg.e9500_min_wait_ms / 1000.0) then
      -- every query by this orderNo answered E9500 for at least e9500_min_wait_ms after the submit (and never E9106):
      -- nothing was created, a new orderNo is safe
      update erp.ar_invoice a
         set invoice_status = 'failed', error_code = 'nuonuo_E9500',
             error_message = format('the platform has no invoice under orderNo %s after %s queries; tax.reissue_invoice(%s) issues it again', a.order_no, v_inv.polls + 1, v_inv.id),
             polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
       where a.id = v_inv.id;
    else
      update erp.ar_invoice a
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
    update erp.ar_invoice a set polls = a.polls + 1, invoice_serial_no = coalesce(v_res->>'serialNo', a.invoice_serial_no),
           order_known = a.order_known or r->>'code' is distinct from 'E9500',
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    if v_st = '24' and coalesce(v_res->>'serialNo', v_inv.invoice_serial_no) is not null and tax._reinvoice_supported() then
      v_n := coalesce((v_inv.tax_cloud_response->>'reinvoices')::integer, 0);
      -- the platform allows 20 per serial no. per day (E9613), and signing after a reInvoice takes a while:
      -- polls that still see 24 right after one must not spend the allowance, so one per minute at most
      if v_n < 20 and coalesce((v_inv.tax_cloud_response->>'reinvoice_at')::timestamptz < now() - interval '1 minute', true) then
        update erp.ar_invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('reinvoices', v_n + 1, 'reinvoice_at', now())
         where a.id = v_inv.id;
        perform cloud.enqueue_message(v_cfg.endpoint, 'tax.reinvoice',
          jsonb_build_object('fpqqlsh', coalesce(v_res->>'serialNo', v_inv.invoice_serial_no), 'orderno', v_inv.order_no),
          'erp.ar_invoice', v_inv.id::text);
      end if;
    end if;
    perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, tax._poll_delay_ms(v_inv.polls));
  end if;
end $$;
comment on function tax.record_invoice_result is 'Write-back of tax.query: status 2 → issued (20-digit number, date, URLs, raw answer), the PDF download enqueued, a red invoice marks its original (partially) reversed; 22 → failed with the fail cause; 24 (issued, signing failed) → signing retried with reInvoice (same serial no., at most once a minute and 20 times) and polled; still issuing → the next query, backing off, up to max_polls. An invoice failed with an unknown outcome still takes a final answer.';

create function tax.record_reinvoice_answer(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  -- the result queries go on either way; the answer is kept for the operator
  update erp.ar_invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('reinvoice', r), updated_at = now()
   where a.id = m.aggregate_id::bigint;
end $$;
comment on function tax.record_reinvoice_answer is 'Write-back (on_complete and on_fail) of tax.reinvoice, the signing retry of a status-24 invoice: keeps the answer; the scheduled result queries decide the invoice.';

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
  v_inv  erp.ar_invoice;
  v_bill text;
  v_id   uuid;
begin
  select * into v_inv from erp.ar_invoice where id = p_invoice_id for update;
  if not found or not tax._outcome_unknown(v_inv) then
    raise exception using errcode = 'EI019', message = format('invoice %s is not waiting for a final answer (%s%s)', p_invoice_id,
                                                            coalesce(v_inv.invoice_status, 'no such invoice'), coalesce(', ' || v_inv.error_code, '')),
      hint = 'Only an invoice failed with error_code unknown_outcome or poll_limit can be queried again; one the platform refused is issued again with tax.reissue_invoice.';
  end if;
  update erp.ar_invoice set invoice_status = 'issuing', polls = 0, error_code = null, error_message = null, updated_at = now()
   where id = p_invoice_id returning * into v_inv;
  if v_inv.invoice_type = 'red' and v_inv.invoice_serial_no is null then
    -- the red-confirmation form may or may not exist: read it back by its billId
    select bill_id into v_bill from erp.invoice_reversal_request where red_invoice_id = v_inv.id;
    v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query', jsonb_build_object('identity', '0', 'billId', v_bill),
                                  'erp.ar_invoice', v_inv.id::text);
    update erp.ar_invoice set next_query_id = v_id where id = v_inv.id;
    return v_id;
  end if;
  return tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, 0);
end $$;
comment on function tax.requery_invoice is 'Operator: asks the platform again, under the same orderNo / serial no. / billId, about an invoice whose outcome is unknown (error_code unknown_outcome or poll_limit); EI019 for any other.';

create function tax.reissue_invoice(p_invoice_id bigint) returns uuid
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv  erp.ar_invoice;
  v_cust erp.customer;
  v_cfg  tax.config;
  v_req  uuid := cloud.new_request_id();
begin
  select * into v_inv from erp.ar_invoice where id = p_invoice_id for update;
  if not found or v_inv.invoice_status <> 'failed' or v_inv.invoice_type <> 'blue' or v_inv.error_code is null or tax._outcome_unknown(v_inv) then
    raise exception using errcode = 'EI018', message = format('invoice %s is not a blue invoice the platform refused (%s%s)', p_invoice_id,
                                                            coalesce(v_inv.invoice_status, 'no such invoice'), coalesce(', ' || v_inv.error_code, '')),
      hint = 'Only a blue invoice refused for certain (status 22, or a permanent error proving nothing was created) gets a new orderNo; one whose outcome is unknown (unknown_outcome, poll_limit) is asked again with tax.requery_invoice.';
  end if;
  select c.* into v_cust from erp.customer c
   where c.id = (select coalesce(s.customer_id, sh.customer_id) from erp.ar_invoice i
                   left join erp.settlement s on s.id = i.settlement_id left join erp.shipment sh on sh.id = i.shipment_id where i.id = p_invoice_id);
  v_cfg := tax._config();
  -- the corrected buyer (tax id, name) is checked again; a refused invoice needs a new orderNo
  -- the earlier orderNo's messages are retired: replay_message / replay_dead_messages can no longer send them
  -- (their attempts stay in cloud.log; an answer still in flight is kept as stale by the write-backs)
  delete from cloud.outbox o
   where o.aggregate_type = 'erp.ar_invoice' and o.aggregate_id = p_invoice_id::text
     and o.operation in ('tax.issue', 'tax.query', 'tax.reinvoice') and o.status in ('pending', 'failed', 'dead', 'skipped');
  update erp.ar_invoice
     set request_id = v_req, order_no = tax.order_no_for(v_req), invoice_status = 'pending', invoice_serial_no = null,
         submitted_at = null, order_known = false, next_query_id = null,
         buyer_name = v_cust.name, buyer_tax_id = nullif(v_cust.tax_id, ''),
         tax_id_warning = tax.validate_buyer(v_cust, v_inv.invoice_kind, format('invoice %s', p_invoice_id)),
         polls = 0, error_code = null, error_message = null,
         tax_cloud_response = jsonb_build_object('previous', v_inv.tax_cloud_response, 'previous_request_id', v_inv.request_id), updated_at = now()
   where id = p_invoice_id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(p_invoice_id), 'erp.ar_invoice', p_invoice_id::text, null, v_req);
  return v_req;
end $$;
comment on function tax.reissue_invoice is 'Operator: issues a refused blue invoice again under a new orderNo, with the customer''s current name and tax id (checked again); the previous answers are kept under tax_cloud_response.previous, and the earlier orderNo''s unfinished messages are deleted so no replay can submit it again. EI018 when the refusal is not certain (unknown_outcome, poll_limit) or the invoice did not fail.';

create function tax._query_now(p_inv erp.ar_invoice) returns text
language plpgsql as $$
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
comment on function tax._query_now is 'Internal: makes an issuing invoice''s pending query (next_query_id: result query or red-form query) due now.';

create function tax.accept_invoice_callback(
  p_order_no text,   -- orderno of the callback
  p_content  jsonb   -- its content (a hint only: never booked)
) returns text       -- what was done: 'query_now', 'final', 'unknown'
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  select * into v_inv from erp.ar_invoice where order_no = p_order_no;
  if not found then
    return 'unknown';
  end if;
  return tax._query_now(v_inv);
end $$;
comment on function tax.accept_invoice_callback is 'The Nuonuo callback receiver''s SQL side: a callback is a hint, so it only makes the invoice''s pending result query due now; the query''s answer is what gets booked.';

create function tax.accept_red_confirm_callback(
  p_bill_id text,    -- billId of the red-confirmation form (also the red invoice''s orderNo)
  p_content jsonb    -- the callback content (a hint only: never booked)
) returns text       -- 'query_now', 'final', 'unknown'
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
begin
  -- the billId is the red invoice's orderNo (unique)
  select * into v_inv from erp.ar_invoice where order_no = p_bill_id and invoice_type = 'red';
  if not found then
    return 'unknown';
  end if;
  return tax._query_now(v_inv);
end $$;
comment on function tax.accept_red_confirm_callback is 'The redConfirmCallback side: a hint that the red-confirmation form changed, so the red invoice''s pending form (or result) query is made due now.';

------------------------------------------------------------------------------
-- Red-letter (红冲)
------------------------------------------------------------------------------
create function tax.tg_reversal__500_request() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_orig erp.ar_invoice;
  v_cfg  tax.config;
  v_red  bigint;
  v_req  uuid := cloud.new_request_id();
  v_bad  integer;
  v_taken integer[];
  v_kinds text[];
begin
  select * into v_orig from erp.ar_invoice where id = new.ar_invoice_id for update;
  -- lines with an issued red invoice, or one under way (its outcome may be unknown)
  select coalesce(array_agg(distinct rl.line_no), '{}') into v_taken
    from erp.invoice_reversal_request q
    join erp.ar_invoice_line rl on rl.ar_invoice_id = q.red_invoice_id
   where q.ar_invoice_id = new.ar_invoice_id and q.id <> new.id and q.status in ('pending', 'confirming', 'issued');
  if v_orig.invoice_status = 'reversed' or (new.line_nos is null and cardinality(v_taken) > 0) or new.line_nos && v_taken then
    raise exception using errcode = 'EI016', message = format('invoice %s: line(s) %s already reversed or with a reversal under way', v_orig.invoice_no,
                                                            coalesce(array_to_string(array(select unnest(v_taken) intersect select unnest(coalesce(new.line_nos, v_taken)) order by 1), ', '), 'all')),
      hint = 'See erp.invoice_reversal_request for this invoice; reverse only the other lines (line_nos), a full reversal is possible only while no line is reversed.';
  end if;
  if v_orig.invoice_status not in ('issued', 'partially_reversed') or v_orig.invoice_type <> 'blue' then
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
  -- 乐企 rule (reference §1.9): service-only lines cannot be 销货退回 (1), goods-only lines cannot be 服务中止 (3)
  select array_agg(distinct left(l.tax_code, 1)) into v_kinds from erp.ar_invoice_line l
   where l.ar_invoice_id = v_orig.id and (new.line_nos is null or l.line_no = any (new.line_nos));
  if (new.reason = '1' and v_kinds <@ array['3']) or (new.reason = '3' and v_kinds <@ array['1']) then
    raise exception using errcode = 'EI014',
      message = format('reversal reason %s (%s) does not fit the reversed lines, which are all %s', new.reason,
                       case new.reason when '1' then '销货退回' else '服务中止' end, case new.reason when '1' then 'services' else 'goods' end),
      hint = 'Services cannot be returned (use 3 服务中止, 2 开票有误 or 4 销售折让); goods cannot be a service stopped (use 1 销货退回, 2 or 4).';
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
comment on function tax.tg_reversal__500_request is 'Trigger: a reversal request for an issued or partially reversed invoice is checked (EI013–EI016; lines already reversed or under way are refused; the reason must fit goods / services), becomes a red erp.ar_invoice (negative lines, full or by line) and enqueues the 数电 red confirmation (saveInvoiceRedConfirm).';

create trigger invoice_reversal_request_500_request after insert on erp.invoice_reversal_request
  for each row execute function tax.tg_reversal__500_request();

create function tax.record_red_confirm_submitted(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv erp.ar_invoice;
  v_id  uuid;
begin
  update erp.ar_invoice a set invoice_status = 'issuing', error_code = null, error_message = null,
         tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_confirm', r), updated_at = now()
   where a.id = m.aggregate_id::bigint and a.request_id = m.request_id and (a.invoice_status = 'pending' or tax._outcome_unknown(a))
  returning * into v_inv;
  if not found then
    return;
  end if;
  -- the 72-hour confirmation deadline counts from the form's creation (the first answer), not from the request
  update erp.invoice_reversal_request set status = 'confirming', error_message = null, form_submitted_at = coalesce(form_submitted_at, now())
   where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query',
    jsonb_build_object('identity', '0', 'billId', m.payload->>'billId'), 'erp.ar_invoice', m.aggregate_id, null, null,
    clock_timestamp() + make_interval(secs => tax._poll_delay_ms(1) / 1000.0));
  update erp.ar_invoice set next_query_id = v_id where id = v_inv.id;
end $$;
comment on function tax.record_red_confirm_submitted is 'Write-back of tax.red_confirm: the red-confirmation form exists (or existed: a duplicate billId is read back); enqueues its status query.';

create function tax.record_red_confirm_status(m cloud.outbox, r jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_form jsonb := coalesce(r #> '{result,list,0}', r #> '{result,0}');
  v_st   text := v_form->>'billStatus';
  v_inv  erp.ar_invoice;
  v_n    integer;
  v_since timestamptz;
  v_id   uuid;
begin
  select * into v_inv from erp.ar_invoice where id = m.aggregate_id::bigint for update;
  if not found or (v_inv.invoice_status <> 'issuing' and not tax._outcome_unknown(v_inv)) then
    return;
  end if;
  update erp.invoice_reversal_request set bill_status = coalesce(v_st, bill_status) where red_invoice_id = v_inv.id
  returning coalesce(form_submitted_at, requested_at) into v_since;
  if v_st in ('01', '04') and coalesce(v_form->>'invoiceSerialNum', '') <> '' then
    -- the bureau issued the red invoice: fetch it like any other (number, PDF)
    update erp.ar_invoice a set invoice_serial_no = v_form->>'invoiceSerialNum', polls = 0, invoice_status = 'issuing', error_code = null, error_message = null,
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning * into v_inv;
    perform tax._enqueue_query(v_inv, 'serial', 0);
  elsif v_st in ('05', '06', '07', '08', '09', '10', '16') then
    -- a definite end of the form
    update erp.ar_invoice a set invoice_status = 'failed', error_code = 'red_bill_' || v_st,
           error_message = format('red-confirmation form %s ended with status %s', v_form->>'billNo', v_st),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
    update erp.invoice_reversal_request set status = 'failed', finished_at = now(),
           error_message = format('red-confirmation form ended with status %s', v_st)
     where red_invoice_id = v_inv.id;
  elsif v_inv.invoice_status <> 'issuing' then
    -- a late non-final answer for a red invoice that gave up: kept; the operator's requery asks again
    update erp.ar_invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
  elsif clock_timestamp() > coalesce(v_since, v_inv.created_at) + interval '73 hours' then
    -- the bureau voids a form nobody confirmed within 72 h (07); an hour's margin, then the reversal is given up
    update erp.ar_invoice a set invoice_status = 'failed', error_code = 'red_deadline', polls = a.polls + 1,
           error_message = format('red-confirmation form %s still %s after 72 hours (buyer never confirmed); the bureau voids it: request a new reversal',
                                  coalesce(v_form->>'billNo', m.payload->>'billId'), coalesce(v_st, 'unknown')),
           tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id;
    update erp.invoice_reversal_request set status = 'failed', finished_at = now(),
           error_message = format('no confirmation within 72 hours (form status %s)', coalesce(v_st, 'unknown'))
     where red_invoice_id = v_inv.id and status in ('pending', 'confirming');
  else
    update erp.ar_invoice a set polls = a.polls + 1, tax_cloud_response = a.tax_cloud_response || jsonb_build_object('red_query', r), updated_at = now()
     where a.id = v_inv.id returning polls into v_n;
    v_id := cloud.enqueue_message((select endpoint from tax.config), 'tax.red_query', m.payload, 'erp.ar_invoice', m.aggregate_id, null, null,
      clock_timestamp() + make_interval(secs => tax._poll_delay_ms(v_n) / 1000.0));
    update erp.ar_invoice set next_query_id = v_id where id = v_inv.id;
  end if;
end $$;
comment on function tax.record_red_confirm_status is 'Write-back of tax.red_query: 01/04 → the red invoice''s serial no. is queried like a blue one; 05–10/16 → the reversal failed; otherwise query the form again later (backing off), until 73 h after the form was created (form_submitted_at; the bureau voids unconfirmed forms at 72 h): then the reversal fails with red_deadline.';

select cloud.put_operation_handler('tax.issue', 'tax.record_issue_submitted(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.query', 'tax.record_invoice_result(cloud.outbox, jsonb)', 'tax.record_query_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.reinvoice', 'tax.record_reinvoice_answer(cloud.outbox, jsonb)', 'tax.record_reinvoice_answer(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.download_pdf', 'tax.record_pdf(cloud.outbox, jsonb)', 'tax.record_pdf_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.red_confirm', 'tax.record_red_confirm_submitted(cloud.outbox, jsonb)', 'tax.record_issue_failed(cloud.outbox, jsonb)');
select cloud.put_operation_handler('tax.red_query', 'tax.record_red_confirm_status(cloud.outbox, jsonb)', 'tax.record_query_failed(cloud.outbox, jsonb)');

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
revoke all on all tables in schema erp from public;
revoke all on all tables in schema tax from public;
revoke all on all functions in schema tax from public;
grant select, insert, update, delete on erp.customer, erp.settlement, erp.settlement_line, erp.shipment, erp.shipment_line to erp_cloud_app;
grant select on erp.ar_invoice, erp.ar_invoice_line, erp.attachment, erp.invoice_reversal_request, tax.invoice_event to erp_cloud_app;
-- the ERP asks for a reversal; its status, form and red invoice are the chain's to write
grant insert (ar_invoice_id, reason, line_nos) on erp.invoice_reversal_request to erp_cloud_app;
grant select on all tables in schema erp to erp_cloud_operator;
grant select on all tables in schema tax to erp_cloud_operator;
grant update on tax.config to erp_cloud_operator;
grant execute on function tax.record_issue_submitted(cloud.outbox, jsonb), tax.record_issue_failed(cloud.outbox, jsonb),
  tax.record_invoice_result(cloud.outbox, jsonb), tax.record_pdf(cloud.outbox, jsonb), tax.record_pdf_failed(cloud.outbox, jsonb),
  tax.record_red_confirm_submitted(cloud.outbox, jsonb), tax.record_red_confirm_status(cloud.outbox, jsonb),
  tax.record_query_failed(cloud.outbox, jsonb), tax.record_reinvoice_answer(cloud.outbox, jsonb),
  tax.accept_invoice_callback(text, jsonb), tax.accept_red_confirm_callback(text, jsonb) to erp_cloud_listener;
grant execute on function tax.put_config(text, text, text, text, text, text, text, numeric, integer, integer, integer, integer, integer, text, text[], integer),
  tax.requery_invoice(bigint), tax.reissue_invoice(bigint) to erp_cloud_operator;
grant execute on function tax.order_no_for(uuid), tax.decimal_text(numeric), tax.uscc_check_digit_ok(text), tax.tax_rate_in_use(numeric),
  tax.separate_price_tax(numeric, numeric, numeric), tax.build_invoice_payload(bigint)
  to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;
