-- 0019 — the e-invoicing contract: any ERP hands in a document as jsonb under
-- its own (source, reference), reads the results by that key, and is called
-- back in the completing transaction. Builds on 0018 (erp-cloud's own invoice
-- store in schema tax). Nothing here names an ERP table except the
-- transitional reference-ERP shims at the end, which 0025 removes.
--
-- 1. Sources: tax.source registers an ERP (its label for a document, its
--    callback, how to re-read a buyer, and what its fields are called);
--    tax.put_source writes it; tax.contract_field lists the contract's paths.
-- 2. tax.enqueue_invoices(source, reference, document): validates exactly as
--    before (messages now name the caller's own fields, the JSON path in
--    DETAIL), splits, enqueues, returns the blue invoice ids; idempotent by
--    (source, reference).
-- 3. Reversal by invoice id or by (source, reference) with a reversal
--    reference of the caller's; reasons are named (return, error,
--    service_stopped, allowance), the platform's digits are the builder's.
-- 4. Requery and reissue by (source, reference); a reissue takes the corrected
--    buyer from the caller or from the source's refresh_buyer function.
-- 5. Results: views tax.invoice_status (blue) and tax.red_invoice_status, and
--    the source's on_invoice callback with a tax.invoice_result, called in
--    the transaction that changed the invoice; a failing callback never fails
--    that transaction (tax.callback_failure, tax.replay_callbacks).
--
-- SQLSTATEs added:
--   EI025  invoice document malformed (a field missing or of the wrong type; DETAIL: its JSON path)
--   EI026  e-invoicing source not registered
--   EI027  invalid e-invoicing source registration
--   EI028  reversal reference already used for another invoice or other lines
--   EI029  reissue without a corrected buyer
--   EI030  no document under this (source, reference)

-- 1. Sources -----------------------------------------------------------------

create table tax.contract_field (
  path    text primary key,
  meaning text not null
);
comment on table tax.contract_field is 'The paths of the e-invoicing document (tax.enqueue_invoices) a source may name in its field map (tax.put_source p_field_names): reference, kind, remark, buyer.*, lines[].*.';
comment on column tax.contract_field.path is 'A path of the contract: buyer.tax_id, lines[].tax_code …';
comment on column tax.contract_field.meaning is 'What the field is, in one line.';
insert into tax.contract_field (path, meaning) values
  ('reference', 'the caller''s key of the document (p_reference)'),
  ('kind', 'normal (数电普票) or special (数电专票)'),
  ('remark', 'the printed remark; default: the reference'),
  ('buyer', 'the buyer object'),
  ('buyer.name', 'the buyer''s name as printed'),
  ('buyer.tax_id', 'the buyer''s 统一社会信用代码 or 纳税人识别号'),
  ('buyer.address', 'the buyer''s address'),
  ('buyer.phone', 'the buyer''s phone'),
  ('buyer.bank_name', 'the buyer''s bank'),
  ('buyer.bank_account', 'the buyer''s bank account number'),
  ('buyer.email', 'where the platform mails the invoice'),
  ('buyer.tax_id_check_override', 'true: issue although the tax id fails the GB 32100 check digit'),
  ('lines', 'the document''s lines'),
  ('lines[].line_no', 'the caller''s line number, unique in the document'),
  ('lines[].item_name', 'goods or service name'),
  ('lines[].tax_code', '19-digit 税收分类编码'),
  ('lines[].spec', 'specification'),
  ('lines[].unit', 'unit of measure'),
  ('lines[].quantity', 'quantity (with unit_price, or neither)'),
  ('lines[].unit_price', 'tax-inclusive unit price'),
  ('lines[].amount', 'tax-inclusive line amount'),
  ('lines[].tax_rate', 'tax rate: 0.13, 0.09, 0.06 …'),
  ('lines[].tax_amount', 'the line''s tax if the caller fixes it; null: computed');
revoke all on tax.contract_field from public;
grant select on tax.contract_field to erp_cloud_app, erp_cloud_operator;

create table tax.source (
  name           text primary key constraint source_name check (name ~ '^[a-z][a-z0-9_-]{0,39}$'),
  document_label text not null default 'document',
  on_invoice     regprocedure,
  refresh_buyer  regprocedure,
  field_names    jsonb not null default '{}',
  created_at     timestamptz not null default now(),
  updated_at     timestamptz not null default now()
);
comment on table tax.source is 'An ERP (or one of its document types) that hands documents to tax.enqueue_invoices. Written by tax.put_source.';
comment on column tax.source.name is 'The p_source every contract call names: lower-case letters, digits, - and _.';
comment on column tax.source.document_label is 'How messages name one of its documents: 销售开票单 SO-0001.';
comment on column tax.source.on_invoice is 'f(tax.invoice_result) returns void, called in the transaction that changed one of its invoices; null: no callback.';
comment on column tax.source.refresh_buyer is 'f(reference text) returns jsonb: the buyer object as the ERP has it now, used by a reissue without p_buyer.';
comment on column tax.source.field_names is 'Contract path → the caller''s name for it ({"buyer.tax_id": "customer.khsh"}); messages and hints use these names.';
revoke all on tax.source from public;
grant select on tax.source to erp_cloud_operator;

-- the reference ERP's documents (transitional: 0025 makes it an example that registers itself)
insert into tax.source (name, document_label) values ('reference-erp', 'document');

alter table tax.document add constraint document_source_fkey foreign key (source) references tax.source (name);

create table tax.callback_failure (
  id          bigint generated always as identity primary key,
  source      text not null references tax.source (name) on delete cascade,
  invoice_id  bigint not null references tax.invoice (id) on delete cascade,
  event       text not null,
  sqlstate    text not null,
  message     text not null,
  failed_at   timestamptz not null default now(),
  replayed_at timestamptz
);
create index callback_failure_unreplayed on tax.callback_failure (source, failed_at) where replayed_at is null;
comment on table tax.callback_failure is 'A source''s on_invoice that raised: its own writes were rolled back, the write-back that called it committed. tax.replay_callbacks calls it again.';
comment on column tax.callback_failure.event is 'The event the callback was given (tax.invoice_result.event).';
comment on column tax.callback_failure.replayed_at is 'When tax.replay_callbacks called the source again for this failure (null: not yet).';
revoke all on tax.callback_failure from public;
grant select on tax.callback_failure to erp_cloud_operator;

create type tax.invoice_result as (
  invoice_id          bigint,
  source              text,
  reference           text,
  invoice_type        text,
  original_invoice_id bigint,
  original_reference  text,
  part_no             integer,
  part_count          integer,
  kind                text,
  event               text,
  status              text,
  outcome             text,
  invoice_no          text,
  invoice_date        timestamptz,
  amount_excl_tax     numeric(16,2),
  tax_amount          numeric(16,2),
  amount_incl_tax     numeric(16,2),
  error_code          text,
  error_message       text,
  pdf_attachment_id   bigint,
  pdf_url             text,
  ofd_url             text,
  changed_at          timestamptz
);
comment on type tax.invoice_result is 'What a source''s on_invoice callback receives: the whole current state of one invoice (blue: the document''s reference; red: the reversal''s, with original_reference), and the event that changed it (submitted, issued, failed, requeried, reissued, pdf_stored, reversed, partially_reversed, changed). The PDF bytes are in tax.invoice_status.pdf.';

create type tax.validation_context as (
  source         text,
  reference      text,
  document_label text,
  field_names    jsonb
);
comment on type tax.validation_context is 'Internal: who is validated, so a message names the caller''s document and fields.';

create function tax._check_callback(p_fn regprocedure, p_arg regtype, p_result regtype, p_what text) returns void
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  p pg_proc;
begin
  select * into p from pg_proc where oid = p_fn;
  if p.pronargs <> 1 or p.proargtypes[0] <> p_arg or p.prorettype <> p_result then
    raise exception using errcode = 'EI027', message = format('%s %s must take one %s and return %s', p_what, p_fn, p_arg, p_result),
      hint = format('Declare it as f(%s) returns %s.', p_arg, p_result);
  end if;
  if not p.prosecdef or not exists (select from unnest(p.proconfig) c where c like 'search_path=%') then
    raise exception using errcode = 'EI027', message = format('%s %s must be SECURITY DEFINER with its own search_path', p_what, p_fn),
      hint = 'It runs inside erp-cloud''s transaction: declare it SECURITY DEFINER SET search_path = '''' so it runs with its owner''s (the ERP''s) rights.';
  end if;
  if (select rolsuper from pg_roles where oid = p.proowner) then
    raise exception using errcode = 'EI027', message = format('%s %s is owned by a superuser', p_what, p_fn),
      hint = 'Make the ERP''s own role its owner (ALTER FUNCTION … OWNER TO), so it runs with the ERP''s rights, not the migrator''s.';
  end if;
end $$;
comment on function tax._check_callback(regprocedure, regtype, regtype, text) is 'Internal: EI027 unless a function a source registers has the contract''s signature, is SECURITY DEFINER with a search_path, and is not owned by a superuser.';
revoke all on function tax._check_callback(regprocedure, regtype, regtype, text) from public;

create function tax.put_source(
  p_name           text,
  p_document_label text default null,  -- how messages name a document of this source
  p_on_invoice     regprocedure default null,  -- f(tax.invoice_result) returns void
  p_refresh_buyer  regprocedure default null,  -- f(text) returns jsonb
  p_field_names    jsonb default null,  -- {"buyer.tax_id": "customer.khsh", …}
  p_unset          text[] default '{}'  -- document_label, on_invoice, refresh_buyer, field_names: back to the default
) returns tax.source
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_bad text;
  v_row tax.source;
begin
  if p_name is null or p_name !~ '^[a-z][a-z0-9_-]{0,39}$' then
    raise exception using errcode = 'EI027', message = format('source name %L is not 1–40 lower-case letters, digits, - or _, starting with a letter', p_name),
      hint = 'Name the ERP or its document type: acme, odoo-sales.';
  end if;
  select u into v_bad from unnest(p_unset) u where u not in ('document_label', 'on_invoice', 'refresh_buyer', 'field_names') limit 1;
  if v_bad is not null then
    raise exception using errcode = 'EI027', message = format('p_unset names %L, which tax.put_source does not set', v_bad),
      hint = 'p_unset takes document_label, on_invoice, refresh_buyer and field_names.';
  end if;
  if p_on_invoice is not null then
    perform tax._check_callback(p_on_invoice, 'tax.invoice_result'::regtype, 'void'::regtype, 'on_invoice');
  end if;
  if p_refresh_buyer is not null then
    perform tax._check_callback(p_refresh_buyer, 'text'::regtype, 'jsonb'::regtype, 'refresh_buyer');
  end if;
  if p_field_names is not null then
    if jsonb_typeof(p_field_names) <> 'object' then
      raise exception using errcode = 'EI027', message = 'p_field_names must be a JSON object of contract path → your name',
        hint = 'For example {"buyer.tax_id": "customer.khsh"}; the paths are in tax.contract_field.';
    end if;
    select k into v_bad from jsonb_object_keys(p_field_names) k where not exists (select from tax.contract_field f where f.path = k) limit 1;
    if v_bad is not null then
      raise exception using errcode = 'EI027', message = format('p_field_names: %L is not a path of the invoice document', v_bad),
        hint = 'The paths are listed in tax.contract_field (buyer.tax_id, lines[].tax_code …).';
    end if;
    select e.key into v_bad from jsonb_each(p_field_names) e where jsonb_typeof(e.value) <> 'string' or btrim(e.value #>> '{}') = '' limit 1;
    if v_bad is not null then
      raise exception using errcode = 'EI027', message = format('p_field_names: the name given for %L is not a non-empty string', v_bad),
        hint = 'Give your column as messages should name it: "so_invoice_head.djbh".';
    end if;
  end if;
  insert into tax.source as s (name, document_label, on_invoice, refresh_buyer, field_names)
  values (p_name, coalesce(p_document_label, 'document'), p_on_invoice, p_refresh_buyer, coalesce(p_field_names, '{}'))
  on conflict (name) do update
     set document_label = case when 'document_label' = any (p_unset) then 'document' else coalesce(p_document_label, s.document_label) end,
         on_invoice     = case when 'on_invoice' = any (p_unset) then null else coalesce(p_on_invoice, s.on_invoice) end,
         refresh_buyer  = case when 'refresh_buyer' = any (p_unset) then null else coalesce(p_refresh_buyer, s.refresh_buyer) end,
         field_names    = case when 'field_names' = any (p_unset) then '{}' else coalesce(p_field_names, s.field_names) end,
         updated_at     = now()
  returning * into v_row;
  return v_row;
end $$;
comment on function tax.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) is 'Operator: registers or changes an e-invoicing source. A parameter not given keeps its value; p_unset clears one. EI027 for a bad name, a callback of the wrong signature, not SECURITY DEFINER with a search_path or owned by a superuser, or a field map naming an unknown path.';
revoke all on function tax.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) from public;
grant execute on function tax.put_source(text, text, regprocedure, regprocedure, jsonb, text[]) to erp_cloud_operator;

create function tax._source(p_source text) returns tax.source
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  v tax.source;
begin
  select * into v from tax.source where name = p_source;
  if not found then
    raise exception using errcode = 'EI026', message = format('e-invoicing source %L is not registered', p_source),
      hint = 'An operator registers it once with tax.put_source(''<name>'', …); see tax.source for the registered ones.';
  end if;
  return v;
end $$;
comment on function tax._source(text) is 'Internal: the registered source, EI026 if there is none.';
revoke all on function tax._source(text) from public;

-- 2. Validation in the caller's terms -----------------------------------------

create function tax._field(p_ctx tax.validation_context, p_path text) returns text
  language sql immutable as $$
  with g(path) as (select regexp_replace(regexp_replace(p_path, '^\$\.', ''), '\[\d+\]', '[]', 'g'))
  select coalesce(p_ctx.field_names ->> g.path,
                  -- an unmapped line field is named by itself: the message already says which line
                  case when g.path like 'lines[].%' then substr(g.path, 9) else g.path end)
    from g
$$;
comment on function tax._field(tax.validation_context, text) is 'Internal: the caller''s name of a JSON path ($.lines[2].tax_code → lines[].tax_code → so_invoice_line.ssbm), from the source''s field map; an unmapped path is named as itself.';
revoke all on function tax._field(tax.validation_context, text) from public;

create function tax._where(p_ctx tax.validation_context, p_line tax.source_line default null) returns text
  language sql immutable as $$
  select concat_ws(' ', nullif(p_ctx.document_label, ''), p_ctx.reference)
         || case when p_line.line_no is null then ''
                 else format(' line %s (%s)', p_line.line_no,
                             case when char_length(p_line.item_name) > 30 then left(p_line.item_name, 30) || '…' else p_line.item_name end) end
$$;
comment on function tax._where(tax.validation_context, tax.source_line) is 'Internal: how a message names the document (and line): 销售开票单 SO-0001 line 2 (螺丝).';
revoke all on function tax._where(tax.validation_context, tax.source_line) from public;

create function tax._check_doc_text(p_limit text, p_value text, p_ctx tax.validation_context, p_path text, p_line tax.source_line default null,
                                    p_name text default null) returns void
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  v_lim  tax.text_limit;
  v_len  integer := char_length(p_value);
  v_name text := coalesce(p_name, tax._field(p_ctx, p_path));
begin
  if p_value is null then
    return;
  end if;
  select * into strict v_lim from tax.text_limit where field = p_limit;
  if v_len > v_lim.max_chars then
    raise exception using errcode = 'EI023',
      message = format('%s: %s (%s) is %s characters long, the tax platform takes at most %s', tax._where(p_ctx, p_line), v_name, p_limit, v_len, v_lim.max_chars),
      detail = p_path,
      hint = format('Shorten %s to at most %s characters (it begins %L): the invoice text is never cut short. The limit is tax.text_limit %L (tax.put_text_limit).',
                    v_name, v_lim.max_chars, left(p_value, 20) || '…', p_limit);
  end if;
end $$;
comment on function tax._check_doc_text(text, text, tax.validation_context, text, tax.source_line, text) is 'Internal: EI023 when a text of the caller''s document is longer (in characters) than tax.text_limit allows; the message names the caller''s field and the limit, DETAIL its JSON path.';
revoke all on function tax._check_doc_text(text, text, tax.validation_context, text, tax.source_line, text) from public;

create function tax._doc_text(p_value jsonb, p_ctx tax.validation_context, p_path text) returns text
  language plpgsql immutable as $$
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' then
    return null;
  elsif jsonb_typeof(p_value) in ('string', 'number') then
    return p_value #>> '{}';
  end if;
  raise exception using errcode = 'EI025',
    message = format('%s: %s is a JSON %s, not a text', tax._where(p_ctx), tax._field(p_ctx, p_path), jsonb_typeof(p_value)),
    detail = p_path,
    hint = 'Hand in texts as JSON strings.';
end $$;
comment on function tax._doc_text(jsonb, tax.validation_context, text) is 'Internal: a text field of the document at p_path (a number is taken as its text); EI025 for an object, array or boolean.';
revoke all on function tax._doc_text(jsonb, tax.validation_context, text) from public;

create function tax._doc_numeric(p_value jsonb, p_ctx tax.validation_context, p_path text) returns numeric
  language plpgsql immutable as $$
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' then
    return null;
  elsif jsonb_typeof(p_value) = 'number' then
    return (p_value #>> '{}')::numeric;
  elsif jsonb_typeof(p_value) = 'string' and btrim(p_value #>> '{}') ~ '^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$' then
    return btrim(p_value #>> '{}')::numeric;
  end if;
  raise exception using errcode = 'EI025',
    message = format('%s: %s is %s, not a number', tax._where(p_ctx), tax._field(p_ctx, p_path), left(p_value::text, 40)),
    detail = p_path,
    hint = 'Hand in numbers as JSON numbers or numeric strings ("12.50").';
end $$;
comment on function tax._doc_numeric(jsonb, tax.validation_context, text) is 'Internal: a number of the document, given as a JSON number or a numeric string; EI025 for anything else.';
revoke all on function tax._doc_numeric(jsonb, tax.validation_context, text) from public;

create function tax._malformed(p_ctx tax.validation_context, p_path text, p_problem text, p_hint text) returns void
  language plpgsql immutable as $$
begin
  raise exception using errcode = 'EI025',
    message = format('%s: %s %s', tax._where(p_ctx), tax._field(p_ctx, p_path), p_problem), detail = p_path, hint = p_hint;
end $$;
comment on function tax._malformed(tax.validation_context, text, text, text) is 'Internal: raises EI025 naming the caller''s field, with the JSON path as DETAIL.';
revoke all on function tax._malformed(tax.validation_context, text, text, text) from public;

create function tax._document_lines(p_doc jsonb, p_ctx tax.validation_context) returns tax.source_line[]
  language plpgsql immutable as $$
declare
  v_lines tax.source_line[] := '{}';
  v_line  jsonb;
  v_path  text;
  v_no    numeric;
  i       integer := 0;
begin
  if p_doc -> 'lines' is null or jsonb_typeof(p_doc -> 'lines') <> 'array' then
    perform tax._malformed(p_ctx, '$.lines', 'is missing or not an array', 'Give the document''s lines as a JSON array of objects.');
  end if;
  for v_line in select e from jsonb_array_elements(p_doc -> 'lines') e loop
    v_path := format('$.lines[%s]', i);
    if jsonb_typeof(v_line) <> 'object' then
      perform tax._malformed(p_ctx, v_path, 'is not an object', 'Each line is a JSON object with line_no, item_name, tax_code, amount, tax_rate ….');
    end if;
    v_no := tax._doc_numeric(v_line -> 'line_no', p_ctx, v_path || '.line_no');
    if v_no is null or v_no <> trunc(v_no) or v_no < 1 or v_no > 2147483647 then
      perform tax._malformed(p_ctx, v_path || '.line_no', format('is %s, not a line number (a whole number from 1)', coalesce((v_line -> 'line_no')::text, 'missing')),
                             'Number the lines of a document 1, 2, 3 …; each number once.');
    end if;
    if v_no::integer = any (array(select l.line_no from unnest(v_lines) l)) then
      perform tax._malformed(p_ctx, v_path || '.line_no', format('%s appears twice in the document', v_no),
                             'Each line of a document has its own line number.');
    end if;
    v_lines := v_lines || row(v_no::integer,
      tax._doc_text(v_line -> 'item_name', p_ctx, v_path || '.item_name'), tax._doc_text(v_line -> 'tax_code', p_ctx, v_path || '.tax_code'),
      tax._doc_text(v_line -> 'spec', p_ctx, v_path || '.spec'), tax._doc_text(v_line -> 'unit', p_ctx, v_path || '.unit'),
      tax._doc_numeric(v_line -> 'quantity', p_ctx, v_path || '.quantity'), tax._doc_numeric(v_line -> 'unit_price', p_ctx, v_path || '.unit_price'),
      tax._doc_numeric(v_line -> 'amount', p_ctx, v_path || '.amount'), tax._doc_numeric(v_line -> 'tax_rate', p_ctx, v_path || '.tax_rate'),
      tax._doc_numeric(v_line -> 'tax_amount', p_ctx, v_path || '.tax_amount'))::tax.source_line;
    i := i + 1;
  end loop;
  return v_lines;
end $$;
comment on function tax._document_lines(jsonb, tax.validation_context) is 'Internal: the lines of an invoice document as tax.source_line, in the caller''s order; EI025 (naming the field, DETAIL its path) when lines is not an array of objects, a line_no is not a whole number from 1 or repeats, or a number is not a number.';
revoke all on function tax._document_lines(jsonb, tax.validation_context) from public;

create function tax.validate_buyer(p_buyer jsonb, p_kind text, p_ctx tax.validation_context) returns text
  language plpgsql stable set search_path = pg_catalog, pg_temp as $_$
declare
  v_name     text := tax._doc_text(p_buyer -> 'name', p_ctx, '$.buyer.name');
  v_tax_id   text := nullif(tax._doc_text(p_buyer -> 'tax_id', p_ctx, '$.buyer.tax_id'), '');
  v_address  text := tax._doc_text(p_buyer -> 'address', p_ctx, '$.buyer.address');
  v_phone    text := tax._doc_text(p_buyer -> 'phone', p_ctx, '$.buyer.phone');
  v_account  text := nullif(concat_ws(' ', tax._doc_text(p_buyer -> 'bank_name', p_ctx, '$.buyer.bank_name'), tax._doc_text(p_buyer -> 'bank_account', p_ctx, '$.buyer.bank_account')), '');
  v_override jsonb := p_buyer -> 'tax_id_check_override';
  v_where    text := tax._where(p_ctx);
  v_id_name  text := tax._field(p_ctx, '$.buyer.tax_id');
  v_struct   record;
begin
  -- the document's buyer is re-read here as $.buyer; a reissue's corrected buyer is checked the same way
  if v_override is not null and jsonb_typeof(v_override) not in ('boolean', 'null') then
    perform tax._malformed(p_ctx, '$.buyer.tax_id_check_override', 'is not true or false', 'Give true to issue although the tax id fails the check digit; leave it out otherwise.');
  end if;
  if coalesce(btrim(v_name), '') = '' then
    raise exception using errcode = 'EI009', message = format('%s: the buyer has no name to print (%s is empty)', v_where, tax._field(p_ctx, '$.buyer.name')),
      detail = '$.buyer.name', hint = format('Enter %s.', tax._field(p_ctx, '$.buyer.name'));
  end if;
  v_where := format('%s: buyer %s', v_where, left(v_name, 40));
  -- every buyer text the payload carries, as build_invoice_payload puts it there
  perform tax._check_doc_text('buyer_name', v_name, p_ctx, '$.buyer.name');
  perform tax._check_doc_text('buyer_address', v_address, p_ctx, '$.buyer.address');
  perform tax._check_doc_text('buyer_phone', v_phone, p_ctx, '$.buyer.phone');
  perform tax._check_doc_text('buyer_address_phone', coalesce(v_address, '') || coalesce(v_phone, ''), p_ctx, '$.buyer.address',
                              p_name => format('%s and %s', tax._field(p_ctx, '$.buyer.address'), tax._field(p_ctx, '$.buyer.phone')));
  perform tax._check_doc_text('buyer_account', v_account, p_ctx, '$.buyer.bank_account',
                              p_name => format('%s and %s', tax._field(p_ctx, '$.buyer.bank_name'), tax._field(p_ctx, '$.buyer.bank_account')));
  perform tax._check_doc_text('buyer_email', tax._doc_text(p_buyer -> 'email', p_ctx, '$.buyer.email'), p_ctx, '$.buyer.email');
  if v_tax_id is null then
    if p_kind = 'special' then
      raise exception using errcode = 'EI010', message = format('%s: a 数电专票 needs the buyer''s tax id, and %s is empty', v_where, v_id_name),
        detail = '$.buyer.tax_id', hint = format('Enter the buyer''s 纳税人识别号 in %s, or issue a normal invoice (%s = normal).', v_id_name, tax._field(p_ctx, '$.kind'));
    end if;
    return null;
  end if;
  if v_tax_id !~ '^[A-Z0-9]{15}$|^[A-Z0-9]{17,18}$|^[A-Z0-9]{20}$' then
    raise exception using errcode = 'EI001',
      message = format('%s: %s %L is not 15, 17, 18 or 20 capital letters and digits', v_where, v_id_name, v_tax_id),
      detail = '$.buyer.tax_id', hint = format('Correct %s (统一社会信用代码 or 纳税人识别号, capitals, no spaces).', v_id_name);
  end if;
  if length(v_tax_id) <> 18 or tax.resident_id_ok(v_tax_id) then
    return null;
  end if;
  -- an 18-character id that is no resident identity number is a 统一社会信用代码: its structure first,
  -- and no override admits a malformed one
  select * into v_struct from tax.uscc_structure_problem(v_tax_id);
  if v_struct.errcode is not null then
    raise exception using errcode = v_struct.errcode,
      message = format('%s: %s %s is not a well-formed 统一社会信用代码: %s', v_where, v_id_name, v_tax_id, v_struct.problem),
      detail = '$.buyer.tax_id',
      hint = format('Correct %s from the business licence (a 18-digit resident identity number is taken as well). The check-digit override never admits a malformed code.', v_id_name);
  end if;
  if not tax.uscc_check_digit_ok(v_tax_id) then
    if not coalesce((v_override #>> '{}')::boolean, false) then
      raise exception using errcode = 'EI002',
        message = format('%s: %s %s fails the GB 32100 check digit', v_where, v_id_name, v_tax_id),
        detail = '$.buyer.tax_id',
        hint = format('Check the code against the business licence. If it is right (some early pilot codes fail the check), set %s to true and approve again.',
                      tax._field(p_ctx, '$.buyer.tax_id_check_override'));
    end if;
    raise warning '%: % % fails the GB 32100 check digit; issued because the operator overrode the check', v_where, v_id_name, v_tax_id;
    return format('tax id %s fails the GB 32100 check digit (operator override)', v_tax_id);
  end if;
  return null;
end $_$;
comment on function tax.validate_buyer(jsonb, text, tax.validation_context) is 'Checks the document''s buyer object: name (EI009), every buyer text against tax.text_limit (EI023), tax id for 专票 (EI010), tax id shape (EI001); an 18-character id is a resident identity number or a USCC of GB 32100 structure (EI020 character, EI021 authority / type, EI022 region) whose check digit must match (EI002 unless buyer.tax_id_check_override: then a warning, returned). Messages name the caller''s fields, DETAIL the JSON path.';
revoke all on function tax.validate_buyer(jsonb, text, tax.validation_context) from public;

drop function tax.validate_buyer(erp.customer, text, text);

create function tax.validate_line(p_line tax.source_line, p_ctx tax.validation_context, p_path text) returns void
  language plpgsql stable set search_path = pg_catalog, pg_temp as $_$
declare
  v_where text := tax._where(p_ctx, p_line);
  v_sep   record;
  f       text;  -- the caller's name of the field being checked
begin
  perform tax._check_doc_text('item_name', p_line.item_name, p_ctx, p_path || '.item_name', p_line);
  perform tax._check_doc_text('spec', p_line.spec, p_ctx, p_path || '.spec', p_line);
  perform tax._check_doc_text('unit', p_line.unit, p_ctx, p_path || '.unit', p_line);
  f := tax._field(p_ctx, p_path || '.tax_code');
  if p_line.tax_code is null or p_line.tax_code !~ '^\d{19}$' then
    raise exception using errcode = 'EI003', message = format('%s: %s %L is not a 19-digit 税收分类编码', v_where, f, p_line.tax_code),
      detail = p_path || '.tax_code',
      hint = format('Put the 19-digit goods and services tax classification code in %s, right-padded with zeros (e.g. 3040201030000000000).', f);
  end if;
  f := tax._field(p_ctx, p_path || '.tax_rate');
  if p_line.tax_rate is null or not tax.tax_rate_in_use(p_line.tax_rate) then
    raise exception using errcode = 'EI004', message = format('%s: %s %s is not a rate in use', v_where, f, p_line.tax_rate),
      detail = p_path || '.tax_rate', hint = format('Set %s to 0.13, 0.09, 0.06, 0.05, 0.03, 0.015, 0.01 or 0.', f);
  end if;
  f := tax._field(p_ctx, p_path || '.amount');
  if p_line.amount is null or p_line.amount <= 0 then
    raise exception using errcode = 'EI005', message = format('%s: %s %s must be above zero', v_where, f, p_line.amount),
      detail = p_path || '.amount', hint = format('Enter the tax-inclusive line amount in %s; discounts go on the invoice as their own lines later.', f);
  end if;
  -- decimals are counted where they carry a value (min_scale): 2.0000000000 from a numeric(18,10) column is 2
  if min_scale(p_line.amount) > 2 then
    raise exception using errcode = 'EI005', message = format('%s: %s %s has more than 2 decimals', v_where, f, p_line.amount),
      detail = p_path || '.amount', hint = format('Amounts go on the invoice in fen: round %s to 2 decimals.', f);
  end if;
  if (p_line.quantity is null) <> (p_line.unit_price is null) then
    raise exception using errcode = 'EI005',
      message = format('%s: %s and %s must be given together', v_where, tax._field(p_ctx, p_path || '.quantity'), tax._field(p_ctx, p_path || '.unit_price')),
      detail = p_path || case when p_line.quantity is null then '.quantity' else '.unit_price' end,
      hint = 'Give both (the amount is then checked against them) or neither.';
  end if;
  if p_line.quantity is not null then
    if p_line.quantity <= 0 or p_line.unit_price <= 0 then
      raise exception using errcode = 'EI005',
        message = format('%s: %s %s and %s %s must be above zero', v_where, tax._field(p_ctx, p_path || '.quantity'), p_line.quantity,
                         tax._field(p_ctx, p_path || '.unit_price'), p_line.unit_price),
        detail = p_path || case when p_line.quantity <= 0 then '.quantity' else '.unit_price' end,
        hint = 'Correct the line''s quantity or unit price.';
    end if;
    if min_scale(p_line.quantity) > 8 or min_scale(p_line.unit_price) > 8 then
      f := case when min_scale(p_line.quantity) > 8 then 'quantity' else 'unit_price' end;
      raise exception using errcode = 'EI005',
        message = format('%s: %s %s has more than 8 decimals', v_where, tax._field(p_ctx, p_path || '.' || f),
                         case f when 'quantity' then p_line.quantity else p_line.unit_price end),
        detail = p_path || '.' || f,
        hint = 'The tax platform takes at most 8 decimals (trailing zeros do not count); round the quantity or unit price.';
    end if;
    if abs(p_line.quantity * p_line.unit_price - p_line.amount) > 0.01 then
      raise exception using errcode = 'EI005',
        message = format('%s: %s %s differs from %s × %s = %s', v_where, tax._field(p_ctx, p_path || '.amount'), p_line.amount,
                         tax._field(p_ctx, p_path || '.quantity'), tax._field(p_ctx, p_path || '.unit_price'), round(p_line.quantity * p_line.unit_price, 4)),
        detail = p_path || '.amount',
        hint = 'The amount is tax-inclusive and must equal quantity × unit price within 0.01.';
    end if;
  end if;
  f := tax._field(p_ctx, p_path || '.tax_amount');
  if min_scale(p_line.tax_amount) > 2 then
    raise exception using errcode = 'EI007', message = format('%s: %s %s has more than 2 decimals', v_where, f, p_line.tax_amount),
      detail = p_path || '.tax_amount', hint = format('Round %s to 2 decimals, or clear it to let the database compute it.', f);
  end if;
  select * into v_sep from tax.separate_price_tax(p_line.amount, p_line.tax_rate, p_line.tax_amount);
  if abs(v_sep.tax_amount - v_sep.amount_excl_tax * p_line.tax_rate) > 0.06 then
    raise exception using errcode = 'EI007',
      message = format('%s: %s %s differs from (amount − tax) × rate = %s by more than 0.06', v_where, f, v_sep.tax_amount,
                       round(v_sep.amount_excl_tax * p_line.tax_rate, 4)),
      detail = p_path || '.tax_amount', hint = format('Clear %s to let the database compute it, or correct it.', f);
  end if;
end $_$;
comment on function tax.validate_line(tax.source_line, tax.validation_context, text) is 'Checks one line of a document: item name, spec and unit against tax.text_limit (EI023), tax code (EI003), rate (EI004), amount / quantity / price (EI005: significant decimals, 8 for quantity and price, 2 for the amount), tax amount decimals and the 0.06 line tolerance (EI007). The message names the line and the caller''s field, DETAIL the JSON path (p_path is the line''s, $.lines[n]).';
revoke all on function tax.validate_line(tax.source_line, tax.validation_context, text) from public;

-- the two-argument form stays for callers that check a line on its own; it names the line by p_doc
create or replace function tax.validate_line(p_line tax.source_line, p_doc text) returns void
  language sql stable set search_path = pg_catalog, pg_temp as $$
  select tax.validate_line(p_line, row(null, p_doc, null, '{}')::tax.validation_context, '$.lines[0]')
$$;
comment on function tax.validate_line(tax.source_line, text) is 'Checks one line on its own, naming it by p_doc: tax.validate_line(line, context, path) with no source (fields named as the contract names them).';

-- 3. The document goes in ------------------------------------------------------

create function tax.enqueue_invoices(
  p_source    text,   -- the registered source (tax.put_source)
  p_reference text,   -- the caller's key of the document, unique within the source
  p_document  jsonb   -- {kind, remark, buyer: {…}, lines: [{line_no, item_name, tax_code, quantity, unit_price, amount, tax_rate, …}]}
) returns bigint[]
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src     tax.source := tax._source(p_source);
  v_ctx     tax.validation_context;
  v_cfg     tax.config;
  v_doc_id  bigint;
  v_sha     text;
  v_ids     bigint[];
  v_kind    text;
  v_remark  text;
  v_buyer   jsonb;
  v_lines   tax.source_line[];
  v_parts   integer[];
  v_count   integer;
  v_plain   integer;
  v_warning text;
  v_inv     bigint;
  v_req     uuid;
  v_dev     numeric;
  v_part_lines tax.source_line[];
  v_where   text;
  i         integer;
  p         integer;
begin
  v_ctx := row(p_source, p_reference, v_src.document_label, v_src.field_names)::tax.validation_context;
  if p_reference is null or btrim(p_reference) = '' then
    raise exception using errcode = 'EI025', message = format('%s: the reference (%s) is empty', v_src.document_label, tax._field(v_ctx, '$.reference')),
      detail = 'p_reference', hint = 'Hand in the document''s own key (its number), unique within the source: approving it again then issues nothing more.';
  end if;
  -- one document is invoiced once: serialise calls for it, then look at what exists
  perform pg_advisory_xact_lock(hashtextextended('tax.document:' || p_source || ':' || p_reference, 0));
  if p_document is null or jsonb_typeof(p_document) <> 'object' then
    perform tax._malformed(v_ctx, '$', 'is not a JSON object', 'Hand in {"kind": …, "buyer": {…}, "lines": [ … ]}.');
  end if;
  v_sha := encode(sha256(convert_to(p_document::text, 'UTF8')), 'hex');
  select d.id into v_doc_id from tax.document d where d.source = p_source and d.reference = p_reference;
  if found then
    select array_agg(i.id order by i.part_no) into v_ids from tax.invoice i where i.document_id = v_doc_id;
    if (select d.doc_sha256 from tax.document d where d.id = v_doc_id) <> v_sha then
      raise warning '% %: handed in again with other content; it was invoiced already and nothing more is issued', v_src.document_label, p_reference
        using hint = 'A document is invoiced once. To correct an issued invoice, reverse it (tax.enqueue_reversal) and hand in a new document under a new reference.';
    end if;
    return v_ids;
  end if;
  v_kind := p_document ->> 'kind';
  if jsonb_typeof(p_document -> 'kind') is distinct from 'string' or v_kind not in ('normal', 'special') then
    perform tax._malformed(v_ctx, '$.kind', format('is %s, not normal or special', coalesce((p_document -> 'kind')::text, 'missing')),
                           'normal is a 数电普票, special a 数电专票.');
  end if;
  v_buyer := p_document -> 'buyer';
  if v_buyer is null or jsonb_typeof(v_buyer) <> 'object' then
    perform tax._malformed(v_ctx, '$.buyer', 'is missing or not an object', 'Give the buyer as {"name": …, "tax_id": …, "address": …}.');
  end if;
  v_remark := coalesce(tax._doc_text(p_document -> 'remark', v_ctx, '$.remark'), p_reference);
  v_lines := tax._document_lines(p_document, v_ctx);
  v_cfg := tax._config();
  v_where := tax._where(v_ctx);
  if cardinality(v_lines) = 0 then
    raise exception using errcode = 'EI006', message = format('%s has no lines to invoice', v_where), detail = '$.lines',
      hint = 'Add the lines before approving, or cancel the document.';
  end if;
  -- the seller's texts go into every payload too
  perform tax._check_text('seller_address', v_cfg.seller_address, v_where || ': the seller', 'the seller address (tax.put_config p_seller_address)');
  perform tax._check_text('seller_phone', v_cfg.seller_phone, v_where || ': the seller', 'the seller phone (tax.put_config p_seller_phone)');
  perform tax._check_text('seller_account', v_cfg.seller_bank_account, v_where || ': the seller', 'the seller bank account (tax.put_config p_seller_bank_account)');
  perform tax._check_text('clerk', v_cfg.clerk, v_where || ': the seller', 'the clerk (tax.put_config p_clerk)');
  v_warning := tax.validate_buyer(v_buyer, v_kind, v_ctx);
  for i in 1 .. cardinality(v_lines) loop
    perform tax.validate_line(v_lines[i], v_ctx, format('$.lines[%s]', i - 1));
  end loop;
  v_parts := tax.split_lines(v_lines, v_cfg.max_invoice_amount, v_cfg.max_invoice_lines, v_where);
  v_count := v_parts[cardinality(v_parts)];
  if v_count > v_cfg.max_parts then
    v_plain := (tax._split_lines(v_lines, v_cfg.max_invoice_amount, v_cfg.max_invoice_lines, v_where, null))[cardinality(v_parts)];
    if v_plain <= v_cfg.max_parts then
      -- the limits alone fit; keeping every invoice within 1.27 is what needs more
      raise exception using errcode = 'EI008',
        message = format('%s: keeping each invoice''s tax within 1.27 of excl × rate needs %s invoices, more than the %s allowed', v_where, v_count, v_cfg.max_parts),
        hint = tax._tolerance_hint(v_lines);
    end if;
    raise exception using errcode = 'EI006', message = format('%s would need %s invoices, more than the %s allowed', v_where, v_count, v_cfg.max_parts),
      hint = 'Split the document, or raise the limits with tax.put_config.';
  end if;
  -- the remark (and part) is printed: the longest one is checked before anything is written
  perform tax._check_doc_text('remark', concat_ws(' ', v_remark, case when v_count > 1 then format('(%s/%s)', v_count, v_count) end), v_ctx,
                              case when p_document ? 'remark' then '$.remark' else '$.reference' end);
  insert into tax.document (source, reference, kind, remark, doc, doc_sha256)
  values (p_source, p_reference, v_kind, v_remark, p_document, v_sha)
  returning id into v_doc_id;
  for p in 1 .. v_count loop
    v_req := cloud.new_request_id();
    insert into tax.invoice (document_id, part_no, part_count, invoice_kind, request_id, order_no,
                             buyer_name, buyer_tax_id, buyer_address, buyer_phone, buyer_bank_name, buyer_account, buyer_email,
                             amount_excl_tax, tax_amount, amount_incl_tax, tax_id_warning)
    values (v_doc_id, p, v_count, v_kind, v_req, tax.order_no_for(v_req),
            v_buyer ->> 'name', nullif(v_buyer ->> 'tax_id', ''), v_buyer ->> 'address', v_buyer ->> 'phone',
            v_buyer ->> 'bank_name', v_buyer ->> 'bank_account', v_buyer ->> 'email',
            0, 0, 0, v_warning)
    returning id into v_inv;
    insert into tax.invoice_line (invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                  tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
    select v_inv, row_number() over (order by l.ord), l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price,
           l.tax_rate, sep.amount_excl_tax, sep.tax_amount, l.amount
      from unnest(v_lines) with ordinality as l(line_no, item_name, tax_code, spec, unit, quantity, unit_price, amount, tax_rate, tax_amount, ord)
      cross join lateral tax.separate_price_tax(l.amount, l.tax_rate, l.tax_amount) sep
     where v_parts[l.ord] = p;
    -- the splitter keeps this within 1.27; checked again on what was written, so a defect there can never send one
    select sum(l.tax_amount - l.amount_excl_tax * l.tax_rate) into v_dev from tax.invoice_line l where l.invoice_id = v_inv;
    if abs(v_dev) > 1.27 then
      select array_agg(v_lines[o] order by o) into v_part_lines from generate_series(1, cardinality(v_lines)) o where v_parts[o] = p;
      raise exception using errcode = 'EI008',
        message = format('%s invoice %s of %s: line taxes differ from excl × rate by %s in total, more than 1.27', v_where, p, v_count, round(v_dev, 4)),
        hint = tax._tolerance_hint(v_part_lines);
    end if;
    update tax.invoice a
       set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
      from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from tax.invoice_line where invoice_id = v_inv) t
     where a.id = v_inv;
    perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(v_inv), 'tax.invoice', v_inv::text, null, v_req);
    v_ids := v_ids || v_inv;
  end loop;
  return v_ids;
end $$;
comment on function tax.enqueue_invoices(text, text, jsonb) is 'Contract: hands one document to e-invoicing in the caller''s transaction: validates it (EI001–EI011, EI020–EI023, EI025; messages name the source''s own fields, DETAIL the JSON path), splits it by the limits and the 1.27 tax tolerance, separates price and tax, enqueues tax.issue per invoice and returns the blue invoice ids in part order. The same (source, reference) again returns the same ids and issues nothing (a WARNING if the content differs). EI026 for an unregistered source.';
revoke all on function tax.enqueue_invoices(text, text, jsonb) from public;
grant execute on function tax.enqueue_invoices(text, text, jsonb) to erp_cloud_app;

-- 4. Reversal (红冲) -------------------------------------------------------------

alter table tax.reversal add column source_line_nos integer[];
comment on column tax.reversal.source_line_nos is 'The caller''s lines[].line_no a by-reference reversal named (null: all, or a reversal by invoice id).';
update tax.reversal set reason = case reason when '1' then 'return' when '2' then 'error' when '3' then 'service_stopped' when '4' then 'allowance' else reason end;

create function tax._reason_code(p_reason text) returns text
  language sql immutable as $$
  select case p_reason when 'return' then '1' when 'error' then '2' when 'service_stopped' then '3' when 'allowance' then '4' end
$$;
comment on function tax._reason_code(text) is 'Internal: the platform''s red-invoice reason digit of a contract reason: return 1 销货退回, error 2 开票有误, service_stopped 3 服务中止, allowance 4 销售折让.';
revoke all on function tax._reason_code(text) from public;

create function tax._issue_red(p_reversal_id bigint) returns bigint
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  q      tax.reversal;
  v_orig tax.invoice;
  v_cfg  tax.config;
  v_red  bigint;
  v_req  uuid := cloud.new_request_id();
  v_bad  integer;
  v_taken integer[];
  v_kinds text[];
begin
  select * into strict q from tax.reversal where id = p_reversal_id;
  select * into v_orig from tax.invoice where id = q.invoice_id for update;
  -- lines with an issued red invoice, or one under way (its outcome may be unknown)
  select coalesce(array_agg(distinct rl.line_no), '{}') into v_taken
    from tax.reversal o
    join tax.invoice_line rl on rl.invoice_id = o.red_invoice_id
   where o.invoice_id = q.invoice_id and o.id <> q.id and o.status in ('pending', 'confirming', 'issued');
  if v_orig.invoice_status = 'reversed' or (q.line_nos is null and cardinality(v_taken) > 0) or q.line_nos && v_taken then
    raise exception using errcode = 'EI016', message = format('invoice %s: line(s) %s already reversed or with a reversal under way', v_orig.invoice_no,
                                                            coalesce(array_to_string(array(select unnest(v_taken) intersect select unnest(coalesce(q.line_nos, v_taken)) order by 1), ', '), 'all')),
      hint = 'See tax.red_invoice_status for this invoice; reverse only the other lines, a full reversal is possible only while no line is reversed.';
  end if;
  if v_orig.invoice_status is distinct from 'issued' and v_orig.invoice_status is distinct from 'partially_reversed' or v_orig.invoice_type <> 'blue' then
    raise exception using errcode = 'EI013', message = format('invoice %s (%s) is not an issued blue invoice and cannot be reversed', q.invoice_id, coalesce(v_orig.invoice_status, 'no such invoice')),
      hint = 'Only issued invoices can be reversed; a failed one was never issued.';
  end if;
  if tax._reason_code(q.reason) is null then
    raise exception using errcode = 'EI014', message = format('reversal reason %L is not return, error, service_stopped or allowance', q.reason),
      hint = 'return 销货退回, error 开票有误, service_stopped 服务中止, allowance 销售折让.';
  end if;
  select n into v_bad from unnest(q.line_nos) n
   where not exists (select from tax.invoice_line l where l.invoice_id = v_orig.id and l.line_no = n) limit 1;
  if v_bad is not null or cardinality(q.line_nos) = 0 then
    raise exception using errcode = 'EI015', message = format('reversal of invoice %s: line %s is not on the invoice', v_orig.invoice_no, coalesce(v_bad::text, '(none given)')),
      hint = 'Name invoice lines (tax.invoice_status.lines[].line_no), or reverse by your own line numbers with tax.enqueue_reversal(source, reference, …); null reverses all.';
  end if;
  -- 乐企 rule (reference §1.9): service-only lines cannot be returned (销货退回), goods-only lines cannot be a service stopped (服务中止)
  select array_agg(distinct left(l.tax_code, 1)) into v_kinds from tax.invoice_line l
   where l.invoice_id = v_orig.id and (q.line_nos is null or l.line_no = any (q.line_nos));
  if (q.reason = 'return' and v_kinds <@ array['3']) or (q.reason = 'service_stopped' and v_kinds <@ array['1']) then
    raise exception using errcode = 'EI014',
      message = format('reversal reason %s (%s) does not fit the reversed lines, which are all %s', q.reason,
                       case q.reason when 'return' then '销货退回' else '服务中止' end, case q.reason when 'return' then 'services' else 'goods' end),
      hint = 'Services cannot be returned (use service_stopped, error or allowance); goods cannot be a service stopped (use return, error or allowance).';
  end if;
  v_cfg := tax._config();
  insert into tax.invoice (original_invoice_id, reversal_id, invoice_type, invoice_kind, request_id, order_no,
                           buyer_name, buyer_tax_id, amount_excl_tax, tax_amount, amount_incl_tax, invoice_status)
  values (v_orig.id, q.id, 'red', v_orig.invoice_kind, v_req, tax.order_no_for(v_req),
          v_orig.buyer_name, v_orig.buyer_tax_id, 0, 0, 0, 'pending')
  returning id into v_red;
  insert into tax.invoice_line (invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
  select v_red, l.line_no, l.source_line_no, l.item_name, l.tax_code, l.spec, l.unit, -l.quantity, l.unit_price,
         l.tax_rate, -l.amount_excl_tax, -l.tax_amount, -l.amount_incl_tax
    from tax.invoice_line l
   where l.invoice_id = v_orig.id and (q.line_nos is null or l.line_no = any (q.line_nos));
  update tax.invoice a set amount_excl_tax = t.ex, tax_amount = t.tx, amount_incl_tax = t.inc
    from (select sum(amount_excl_tax) ex, sum(tax_amount) tx, sum(amount_incl_tax) inc from tax.invoice_line where invoice_id = v_red) t
   where a.id = v_red;
  update tax.reversal set red_invoice_id = v_red, bill_id = left(tax.order_no_for(v_req), 32) where id = q.id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.red_confirm', jsonb_strip_nulls(jsonb_build_object(
    'billId', tax.order_no_for(v_req),
    'blueInvoiceLine', case v_orig.invoice_kind when 'special' then 'bs' else 'pc' end,
    'applySource', '0',
    'blueElecInvoiceNumber', v_orig.invoice_no,
    'sellerTaxNo', v_cfg.seller_tax_id, 'sellerName', v_cfg.seller_name,
    'buyerTaxNo', v_orig.buyer_tax_id, 'buyerName', v_orig.buyer_name,
    'redReason', tax._reason_code(q.reason),
    'orderNo', tax.order_no_for(v_req),
    'autoInvoice', '1',
    'detail', case when q.line_nos is not null then (
       select jsonb_agg(jsonb_build_object('blueDetailIndex', l.line_no::text, 'goodsName', l.item_name, 'goodsCode', l.tax_code,
                                           'taxRate', tax.decimal_text(l.tax_rate), 'num', tax.decimal_text(l.quantity),
                                           'taxExcludedPrice', tax.decimal_text(round(-l.amount_excl_tax / nullif(-l.quantity, 0), 8)),
                                           'taxExcludedAmount', l.amount_excl_tax::text, 'taxAmount', l.tax_amount::text) order by l.line_no)
         from tax.invoice_line l where l.invoice_id = v_red) end)),
    'tax.invoice', v_red::text, null, v_req);
  return v_red;
end $$;
comment on function tax._issue_red(bigint) is 'Internal: a reversal request becomes a red invoice: checked (EI013–EI016; lines already reversed or under way are refused; the reason must fit goods / services), negative lines (full or by invoice line), and the 数电 red confirmation (saveInvoiceRedConfirm) enqueued. Returns the red invoice id.';
revoke all on function tax._issue_red(bigint) from public;

create function tax.enqueue_reversal(
  p_invoice_id         bigint,   -- the blue invoice
  p_reversal_reference text,     -- the caller's key of this reversal (its 红冲单号)
  p_reason             text,     -- return | error | service_stopped | allowance
  p_line_nos           integer[] default null  -- invoice line numbers (tax.invoice_status.lines[].line_no); null: the whole invoice
) returns bigint
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_source text;
  v_doc    bigint;
  q        tax.reversal;
  v_id     bigint;
begin
  select d.source, d.id into v_source, v_doc from tax.invoice i join tax.document d on d.id = i.document_id where i.id = p_invoice_id;
  if v_source is null then
    raise exception using errcode = 'EI013', message = format('invoice %s is not a blue invoice of a document and cannot be reversed', p_invoice_id),
      hint = 'Reverse the blue invoice a document was issued as (tax.invoice_status.invoice_id).';
  end if;
  if p_reversal_reference is null or btrim(p_reversal_reference) = '' then
    raise exception using errcode = 'EI025', message = format('reversal of invoice %s: the reversal reference is empty', p_invoice_id),
      detail = 'p_reversal_reference', hint = 'Hand in the reversal''s own key (e.g. the 红冲单号): calling again with it returns the same red invoice.';
  end if;
  perform pg_advisory_xact_lock(hashtextextended('tax.reversal:' || v_source || ':' || p_reversal_reference, 0));
  select * into q from tax.reversal r where r.source = v_source and r.reference = p_reversal_reference and r.invoice_id = p_invoice_id;
  if found then
    if q.reason is distinct from p_reason or q.line_nos is distinct from p_line_nos then
      raise exception using errcode = 'EI028',
        message = format('reversal %s of invoice %s was requested already with reason %s and lines %s', p_reversal_reference, p_invoice_id, q.reason,
                         coalesce(array_to_string(q.line_nos, ', '), 'all')),
        hint = 'A reversal reference names one request; give a new reference for another reversal.';
    end if;
    return q.red_invoice_id;
  end if;
  if exists (select from tax.reversal r join tax.invoice i on i.id = r.invoice_id
              where r.source = v_source and r.reference = p_reversal_reference and i.document_id <> v_doc) then
    raise exception using errcode = 'EI028', message = format('reversal reference %s is already used for another document''s invoice', p_reversal_reference),
      hint = 'A reversal reference names one request; give a new reference for another reversal.';
  end if;
  insert into tax.reversal (invoice_id, reason, line_nos, source, reference)
  values (p_invoice_id, p_reason, p_line_nos, v_source, p_reversal_reference)
  returning id into v_id;
  return tax._issue_red(v_id);
end $$;
comment on function tax.enqueue_reversal(bigint, text, text, integer[]) is 'Contract: reverses (红冲) an issued blue invoice, fully or by invoice line, in the caller''s transaction; returns the red invoice id. The same reversal reference again returns it (EI028 if reason or lines differ, or the reference belongs to another document). EI013–EI016 as for any reversal.';
revoke all on function tax.enqueue_reversal(bigint, text, text, integer[]) from public;
grant execute on function tax.enqueue_reversal(bigint, text, text, integer[]) to erp_cloud_app, erp_cloud_operator;

create function tax.enqueue_reversal(
  p_source             text,
  p_reference          text,     -- the document that was invoiced
  p_reversal_reference text,     -- the caller's key of this reversal
  p_reason             text,     -- return | error | service_stopped | allowance
  p_line_nos           integer[] default null  -- the caller's lines[].line_no; null: every invoice of the document, whole
) returns bigint[]
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src  tax.source := tax._source(p_source);
  v_doc  bigint;
  v_inv  record;
  v_ids  bigint[] := '{}';
  v_bad  integer;
  v_lines integer[];
begin
  select id into v_doc from tax.document where source = p_source and reference = p_reference;
  if v_doc is null then
    raise exception using errcode = 'EI030', message = format('%s %s was never handed to e-invoicing', v_src.document_label, p_reference),
      hint = 'tax.invoice_status lists the documents of a source by reference.';
  end if;
  select n into v_bad from unnest(p_line_nos) n
   where not exists (select from tax.invoice i join tax.invoice_line l on l.invoice_id = i.id where i.document_id = v_doc and l.source_line_no = n) limit 1;
  if v_bad is not null or cardinality(p_line_nos) = 0 then
    raise exception using errcode = 'EI015',
      message = format('reversal %s of %s %s: line %s is not on its invoices', p_reversal_reference, v_src.document_label, p_reference, coalesce(v_bad::text, '(none given)')),
      hint = format('Name the document''s own line numbers (%s); leave them null to reverse the whole document.',
                    tax._field(row(p_source, p_reference, v_src.document_label, v_src.field_names)::tax.validation_context, '$.lines[0].line_no'));
  end if;
  for v_inv in select i.id, i.invoice_status from tax.invoice i where i.document_id = v_doc order by i.part_no loop
    if p_line_nos is null then
      -- the whole document: every part not reversed already, unless this reference did it
      if v_inv.invoice_status = 'reversed' and not exists (select from tax.reversal r where r.invoice_id = v_inv.id and r.source = p_source and r.reference = p_reversal_reference) then
        continue;
      end if;
      v_lines := null;
    else
      select array_agg(l.line_no order by l.line_no) into v_lines from tax.invoice_line l where l.invoice_id = v_inv.id and l.source_line_no = any (p_line_nos);
      if v_lines is null then
        continue;
      end if;
      -- every line of the part named: that is the part's full reversal
      if not exists (select from tax.invoice_line l where l.invoice_id = v_inv.id and l.line_no <> all (v_lines)) then
        v_lines := null;
      end if;
    end if;
    v_ids := v_ids || tax.enqueue_reversal(v_inv.id, p_reversal_reference, p_reason, v_lines);
    update tax.reversal set source_line_nos = p_line_nos where invoice_id = v_inv.id and source = p_source and reference = p_reversal_reference;
  end loop;
  if cardinality(v_ids) = 0 then
    raise exception using errcode = 'EI016', message = format('%s %s: every invoice is reversed already', v_src.document_label, p_reference),
      hint = 'See tax.red_invoice_status for its red invoices.';
  end if;
  return v_ids;
end $$;
comment on function tax.enqueue_reversal(text, text, text, text, integer[]) is 'Contract: reverses (红冲) a document by (source, reference), whole or by the caller''s own line numbers, in the caller''s transaction: one red invoice per affected blue invoice, ids returned in part order. The same reversal reference again returns the same red ids. EI030 for an unknown document, EI015 for a line not on it, EI013–EI016 and EI028 as for a reversal by invoice id.';
revoke all on function tax.enqueue_reversal(text, text, text, text, integer[]) from public;
grant execute on function tax.enqueue_reversal(text, text, text, text, integer[]) to erp_cloud_app, erp_cloud_operator;

-- an insert into tax.reversal without a source (the reference ERP's erp.invoice_reversal_request, reasons as digits)
-- is a reversal request of the old shape: it is named and goes the contract's way; 0025 removes this path
create or replace function tax.tg_reversal__500_request() returns trigger
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  if new.source is not null then
    return null;  -- tax.enqueue_reversal made it, and issues it itself
  end if;
  update tax.reversal r
     set reason = coalesce(case r.reason when '1' then 'return' when '2' then 'error' when '3' then 'service_stopped' when '4' then 'allowance' end, r.reason),
         source = d.source, reference = 'reversal/' || r.id
    from tax.invoice i left join tax.document d on d.id = i.document_id
   where r.id = new.id and i.id = r.invoice_id;
  perform tax._issue_red(new.id);
  return null;
end $$;
comment on function tax.tg_reversal__500_request() is 'Trigger (transitional, until 0025): a reversal inserted without a source, as the reference ERP does through erp.invoice_reversal_request with Nuonuo''s reason digits 1–4, is named (reason return / error / service_stopped / allowance, reference reversal/<id>) and issued by tax._issue_red.';

-- 5. Requery and reissue, by invoice or by document ------------------------------

create function tax._refresh_buyer(p_src tax.source, p_reference text) returns jsonb
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_call text;
  v      jsonb;
begin
  if p_src.refresh_buyer is null then
    return null;
  end if;
  select format('select %I.%I($1)', n.nspname, p.proname) into v_call
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.oid = p_src.refresh_buyer;
  execute v_call into v using p_reference;
  return v;
end $$;
comment on function tax._refresh_buyer(tax.source, text) is 'Internal: the buyer as the source''s ERP has it now (its refresh_buyer function), or null when it registered none.';
revoke all on function tax._refresh_buyer(tax.source, text) from public;

drop function tax.reissue_invoice(bigint);
create function tax.reissue_invoice(
  p_invoice_id bigint,
  p_buyer      jsonb default null  -- the corrected buyer object; null: the source's refresh_buyer reads it from the ERP now
) returns uuid
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_inv   tax.invoice;
  v_doc   tax.document;
  v_src   tax.source;
  v_buyer jsonb;
  v_ctx   tax.validation_context;
  v_cfg   tax.config;
  v_req   uuid := cloud.new_request_id();
begin
  select * into v_inv from tax.invoice where id = p_invoice_id for update;
  if not found or v_inv.invoice_status <> 'failed' or v_inv.invoice_type <> 'blue' or v_inv.error_code is null or tax._outcome_unknown(v_inv) then
    raise exception using errcode = 'EI018', message = format('invoice %s is not a blue invoice the platform refused (%s%s)', p_invoice_id,
                                                            coalesce(v_inv.invoice_status, 'no such invoice'), coalesce(', ' || v_inv.error_code, '')),
      hint = 'Only a blue invoice refused for certain (status 22, or a permanent error proving nothing was created) gets a new orderNo; one whose outcome is unknown (unknown_outcome, poll_limit) is asked again with tax.requery_invoice.';
  end if;
  select * into strict v_doc from tax.document where id = v_inv.document_id;
  v_src := tax._source(v_doc.source);
  v_buyer := coalesce(p_buyer, tax._refresh_buyer(v_src, v_doc.reference));
  if v_buyer is null then
    raise exception using errcode = 'EI029', message = format('invoice %s (%s %s): no corrected buyer to issue it with', p_invoice_id, v_src.document_label, v_doc.reference),
      hint = format('Pass the corrected buyer (p_buyer => ''{"name": …, "tax_id": …}''), or register a refresh_buyer function for source %s (tax.put_source p_refresh_buyer).', v_src.name);
  end if;
  if jsonb_typeof(v_buyer) <> 'object' then
    raise exception using errcode = 'EI025', message = format('invoice %s: the corrected buyer is a JSON %s, not an object', p_invoice_id, jsonb_typeof(v_buyer)),
      detail = '$.buyer', hint = 'Give the buyer as {"name": …, "tax_id": …, "address": …}.';
  end if;
  v_ctx := row(v_src.name, v_doc.reference, v_src.document_label, v_src.field_names)::tax.validation_context;
  v_cfg := tax._config();
  -- the corrected buyer is checked again; a refused invoice needs a new orderNo
  -- the earlier orderNo's messages are retired: replay_message / replay_dead_messages can no longer send them
  -- (their attempts stay in cloud.log; an answer still in flight is kept as stale by the write-backs)
  delete from cloud.outbox o
   where o.aggregate_type = 'tax.invoice' and o.aggregate_id = p_invoice_id::text
     and o.operation in ('tax.issue', 'tax.query', 'tax.reinvoice') and o.status in ('pending', 'failed', 'dead', 'skipped');
  update tax.invoice
     set request_id = v_req, order_no = tax.order_no_for(v_req), invoice_status = 'pending', invoice_serial_no = null,
         submitted_at = null, order_known = false, next_query_id = null,
         tax_id_warning = tax.validate_buyer(v_buyer, v_inv.invoice_kind, v_ctx),
         buyer_name = v_buyer ->> 'name', buyer_tax_id = nullif(v_buyer ->> 'tax_id', ''), buyer_address = v_buyer ->> 'address',
         buyer_phone = v_buyer ->> 'phone', buyer_bank_name = v_buyer ->> 'bank_name', buyer_account = v_buyer ->> 'bank_account',
         buyer_email = v_buyer ->> 'email',
         polls = 0, error_code = null, error_message = null,
         tax_cloud_response = jsonb_build_object('previous', v_inv.tax_cloud_response, 'previous_request_id', v_inv.request_id), updated_at = now()
   where id = p_invoice_id;
  perform cloud.enqueue_message(v_cfg.endpoint, 'tax.issue', tax.build_invoice_payload(p_invoice_id), 'tax.invoice', p_invoice_id::text, null, v_req);
  return v_req;
end $$;
comment on function tax.reissue_invoice(bigint, jsonb) is 'Operator: issues a refused blue invoice again under a new orderNo, with the corrected buyer (p_buyer, else the source''s refresh_buyer: the ERP''s customer row now), checked again in the caller''s terms; the previous answers are kept under tax_cloud_response.previous, and the earlier orderNo''s unfinished messages are deleted so no replay can submit it again. EI018 when the refusal is not certain (unknown_outcome, poll_limit) or the invoice did not fail; EI029 without a buyer.';
revoke all on function tax.reissue_invoice(bigint, jsonb) from public;
grant execute on function tax.reissue_invoice(bigint, jsonb) to erp_cloud_operator;

create function tax._document_id(p_source text, p_reference text) returns bigint
  language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
  v_src tax.source := tax._source(p_source);
  v_id  bigint;
begin
  select id into v_id from tax.document where source = p_source and reference = p_reference;
  if v_id is null then
    raise exception using errcode = 'EI030', message = format('%s %s was never handed to e-invoicing', v_src.document_label, p_reference),
      hint = 'tax.invoice_status lists the documents of a source by reference.';
  end if;
  return v_id;
end $$;
comment on function tax._document_id(text, text) is 'Internal: the document of (source, reference); EI026 for an unknown source, EI030 for an unknown reference.';
revoke all on function tax._document_id(text, text) from public;

create function tax.reissue_invoices(p_source text, p_reference text, p_buyer jsonb default null) returns uuid[]
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_doc bigint := tax._document_id(p_source, p_reference);
  v_ids uuid[] := '{}';
  v_inv tax.invoice;
begin
  for v_inv in select * from tax.invoice i where i.document_id = v_doc order by i.part_no for update loop
    if v_inv.invoice_status = 'failed' and v_inv.error_code is not null and not tax._outcome_unknown(v_inv) then
      v_ids := v_ids || tax.reissue_invoice(v_inv.id, p_buyer);
    end if;
  end loop;
  if cardinality(v_ids) = 0 then
    raise exception using errcode = 'EI018', message = format('%s %s has no invoice the platform refused for certain', p_source, p_reference),
      hint = 'See tax.invoice_status: an invoice whose outcome is unknown is asked again with tax.requery_invoices.';
  end if;
  return v_ids;
end $$;
comment on function tax.reissue_invoices(text, text, jsonb) is 'Contract: issues every refused-for-certain invoice of a document again (tax.reissue_invoice each, in part order) with the corrected buyer; returns the new request ids. EI018 when none was refused for certain, EI029 without a buyer, EI030 for an unknown document.';
revoke all on function tax.reissue_invoices(text, text, jsonb) from public;
grant execute on function tax.reissue_invoices(text, text, jsonb) to erp_cloud_app, erp_cloud_operator;

create function tax.requery_invoices(p_source text, p_reference text) returns uuid[]
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_doc bigint := tax._document_id(p_source, p_reference);
  v_ids uuid[] := '{}';
  v_inv tax.invoice;
begin
  for v_inv in select i.* from tax.invoice i
                where i.document_id = v_doc
                   or i.original_invoice_id in (select b.id from tax.invoice b where b.document_id = v_doc)
                order by i.id for update loop
    if tax._outcome_unknown(v_inv) then
      v_ids := v_ids || tax.requery_invoice(v_inv.id);
    end if;
  end loop;
  if cardinality(v_ids) = 0 then
    raise exception using errcode = 'EI019', message = format('%s %s has no invoice waiting for a final answer', p_source, p_reference),
      hint = 'Only invoices failed with error_code unknown_outcome or poll_limit are asked again; see tax.invoice_status.outcome.';
  end if;
  return v_ids;
end $$;
comment on function tax.requery_invoices(text, text) is 'Contract: asks the platform again about every invoice of a document (blue parts and their red invoices) whose outcome is unknown (tax.requery_invoice each); returns the query message ids. EI019 when none is waiting, EI030 for an unknown document.';
revoke all on function tax.requery_invoices(text, text) from public;
grant execute on function tax.requery_invoices(text, text) to erp_cloud_app, erp_cloud_operator;

-- 6. Results: views and the callback ---------------------------------------------

create view tax.invoice_status as
  select d.source, d.reference, i.id as invoice_id, i.part_no, i.part_count, i.invoice_kind as kind,
         i.invoice_status as status,
         case when i.invoice_status = 'failed' then case when tax._outcome_unknown(i) then 'unknown' else 'refused' end end as outcome,
         i.invoice_no, i.invoice_date, i.amount_excl_tax, i.tax_amount, i.amount_incl_tax,
         i.buyer_name, i.buyer_tax_id, i.tax_id_warning, i.error_code, i.error_message,
         i.pdf_url, i.ofd_url, i.xml_url, i.tax_cloud_response as responses,
         a.id as pdf_attachment_id, a.sha256 as pdf_sha256, a.content as pdf, i.created_at, i.updated_at,
         (select jsonb_agg(to_jsonb(l) - 'invoice_id' order by l.line_no) from tax.invoice_line l where l.invoice_id = i.id) as lines
    from tax.invoice i
    join tax.document d on d.id = i.document_id
    left join tax.attachment a on a.invoice_id = i.id and a.content_type = 'application/pdf';
comment on view tax.invoice_status is 'Contract: the blue invoices of every document by (source, reference): status (pending, issuing, issued, failed, partially_reversed, reversed), outcome of a failure (refused: correct and reissue; unknown: requery), number, date, amounts, the raw responses, the PDF, and the lines (line_no on the invoice, source_line_no the caller''s).';
grant select on tax.invoice_status to erp_cloud_app, erp_cloud_operator;

create view tax.red_invoice_status as
  select q.source, q.reference, r.id as invoice_id, r.original_invoice_id, d.reference as original_reference, o.part_no as original_part_no,
         q.reason, q.line_nos, q.source_line_nos, q.status as reversal_status,
         r.invoice_status as status,
         case when r.invoice_status = 'failed' then case when tax._outcome_unknown(r) then 'unknown' else 'refused' end end as outcome,
         r.invoice_no, r.invoice_date, r.amount_excl_tax, r.tax_amount, r.amount_incl_tax, r.error_code, r.error_message,
         r.tax_cloud_response as responses, a.id as pdf_attachment_id, a.sha256 as pdf_sha256, a.content as pdf, r.created_at, r.updated_at,
         (select jsonb_agg(to_jsonb(l) - 'invoice_id' order by l.line_no) from tax.invoice_line l where l.invoice_id = r.id) as lines
    from tax.invoice r
    join tax.reversal q on q.id = r.reversal_id
    join tax.invoice o on o.id = r.original_invoice_id
    join tax.document d on d.id = o.document_id
    left join tax.attachment a on a.invoice_id = r.id and a.content_type = 'application/pdf';
comment on view tax.red_invoice_status is 'Contract: the red invoices (红冲) by the caller''s reversal (source, reference), with the blue invoice and document they reverse, the reason, the lines (invoice and caller numbering), the red-confirmation status, the red invoice''s status, number, amounts (negative), responses and PDF.';
grant select on tax.red_invoice_status to erp_cloud_app, erp_cloud_operator;

create function tax._invoice_result(p_invoice_id bigint, p_event text) returns tax.invoice_result
  language sql stable set search_path = pg_catalog, pg_temp as $$
  select row(i.id, coalesce(d.source, q.source), coalesce(d.reference, q.reference), i.invoice_type,
             i.original_invoice_id, od.reference, i.part_no, i.part_count, i.invoice_kind, p_event,
             i.invoice_status, case when i.invoice_status = 'failed' then case when tax._outcome_unknown(i) then 'unknown' else 'refused' end end,
             i.invoice_no, i.invoice_date, i.amount_excl_tax, i.tax_amount, i.amount_incl_tax, i.error_code, i.error_message,
             (select a.id from tax.attachment a where a.invoice_id = i.id and a.content_type = 'application/pdf' order by a.id desc limit 1),
             i.pdf_url, i.ofd_url, i.updated_at)::tax.invoice_result
    from tax.invoice i
    left join tax.document d on d.id = i.document_id
    left join tax.reversal q on q.id = i.reversal_id
    left join tax.invoice o on o.id = i.original_invoice_id
    left join tax.document od on od.id = o.document_id
   where i.id = p_invoice_id
$$;
comment on function tax._invoice_result(bigint, text) is 'Internal: the tax.invoice_result a callback receives for one invoice now.';
revoke all on function tax._invoice_result(bigint, text) from public;

create function tax._call_source(p_invoice_id bigint, p_event text) returns boolean
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_res   tax.invoice_result := tax._invoice_result(p_invoice_id, p_event);
  v_call  text;
  v_state text;
  v_msg   text;
begin
  select format('select %I.%I($1)', n.nspname, p.proname) into v_call
    from tax.source s join pg_proc p on p.oid = s.on_invoice join pg_namespace n on n.oid = p.pronamespace
   where s.name = v_res.source;
  if v_call is null then
    return true;
  end if;
  begin
    execute v_call using v_res;
  exception when others then
    -- the callback's own writes are rolled back; the write-back that called it goes on
    get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text;
    insert into tax.callback_failure (source, invoice_id, event, sqlstate, message) values (v_res.source, p_invoice_id, p_event, v_state, v_msg);
    raise warning 'on_invoice of source % failed for invoice % (%): % %', v_res.source, p_invoice_id, p_event, v_state, v_msg
      using hint = 'The change is committed without the callback''s writes; fix the callback and run tax.replay_callbacks.';
    return false;
  end;
  return true;
end $$;
comment on function tax._call_source(bigint, text) is 'Internal: calls the on_invoice of the invoice''s source with its current state; an error is caught (only the callback''s writes are undone), kept in tax.callback_failure with a WARNING, and false returned.';
revoke all on function tax._call_source(bigint, text) from public;

create function tax.tg_invoice__900_call_source() returns trigger
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  perform tax._call_source(new.id,
    case when new.invoice_status in ('issued', 'failed', 'reversed', 'partially_reversed') and new.invoice_status is distinct from old.invoice_status then new.invoice_status
         when old.invoice_status = 'failed' and new.invoice_status = 'pending' then 'reissued'
         when old.invoice_status = 'failed' and new.invoice_status = 'issuing' then 'requeried'
         when old.invoice_status = 'pending' and new.invoice_status = 'issuing' then 'submitted'
         else 'changed' end);
  return null;
end $$;
comment on function tax.tg_invoice__900_call_source() is 'Trigger: an invoice whose status, number or error changed calls its source''s on_invoice (tax._call_source) with the event: submitted, issued, failed, requeried, reissued, reversed, partially_reversed, changed.';
revoke all on function tax.tg_invoice__900_call_source() from public;
create trigger invoice_900_call_source after update on tax.invoice for each row
  when (old.invoice_status is distinct from new.invoice_status or old.invoice_no is distinct from new.invoice_no
        or old.error_code is distinct from new.error_code)
  execute function tax.tg_invoice__900_call_source();

create function tax.tg_attachment__900_call_source() returns trigger
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
  perform tax._call_source(new.invoice_id, 'pdf_stored');
  return null;
end $$;
comment on function tax.tg_attachment__900_call_source() is 'Trigger: a stored PDF calls its invoice''s source''s on_invoice with event pdf_stored.';
revoke all on function tax.tg_attachment__900_call_source() from public;
create trigger attachment_900_call_source after insert on tax.attachment for each row
  when (new.content_type = 'application/pdf')
  execute function tax.tg_attachment__900_call_source();

create function tax.replay_callbacks(p_source text, p_since timestamptz default null) returns integer
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_src tax.source := tax._source(p_source);
  v     record;
  n     integer := 0;
begin
  for v in
    with due as (
      update tax.callback_failure f set replayed_at = now()
       where f.source = v_src.name and f.replayed_at is null and (p_since is null or f.failed_at >= p_since)
      returning f.invoice_id, f.event, f.id)
    select distinct on (invoice_id) invoice_id, event from due order by invoice_id, id desc
  loop
    perform tax._call_source(v.invoice_id, v.event);
    n := n + 1;
  end loop;
  return n;
end $$;
comment on function tax.replay_callbacks(text, timestamptz) is 'Operator: calls the source''s on_invoice again, with the current state and the last failed event, for every invoice whose callback failed (since p_since) and was not replayed; returns how many calls were made. A call that fails again is kept as a new failure.';
revoke all on function tax.replay_callbacks(text, timestamptz) from public;
grant execute on function tax.replay_callbacks(text, timestamptz) to erp_cloud_operator;

-- 7. The reference ERP goes the contract's way (transitional, until 0025) ---------

create function erp.buyer_of(p_reference text) returns jsonb
  language sql stable security definer set search_path = pg_catalog, pg_temp as $$
  select tax._reference_erp_document(split_part(p_reference, '/', 1),
           case split_part(p_reference, '/', 1)
             when 'settlement' then (select s.id from erp.settlement s where s.settlement_no = substr(p_reference, 12))
             when 'shipment' then (select s.id from erp.shipment s where s.shipment_no = substr(p_reference, 10)) end) -> 'buyer'
$$;
comment on function erp.buyer_of(text) is 'The reference ERP''s refresh_buyer: the buyer of settlement/<no> or shipment/<no> as erp.customer has it now (what a reissue uses).';
revoke all on function erp.buyer_of(text) from public;

update tax.source
   set refresh_buyer = 'erp.buyer_of(text)'::regprocedure,
       field_names = '{"buyer.name": "erp.customer.name", "buyer.tax_id": "erp.customer.tax_id", "buyer.address": "erp.customer.address",
                       "buyer.phone": "erp.customer.phone", "buyer.bank_name": "erp.customer.bank_name", "buyer.bank_account": "erp.customer.bank_account",
                       "buyer.email": "erp.customer.email", "buyer.tax_id_check_override": "erp.customer.tax_id_check_override",
                       "kind": "invoice_kind", "remark": "the document number"}'
 where name = 'reference-erp';

create or replace function tax.issue_invoices(p_source text, p_id bigint) returns integer
  language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
  v_no     text;
  v_on     text;
  v_linked bigint;
  v_ref    text;
begin
  if p_source = 'settlement' then
    select s.settlement_no, c.invoice_on, s.id into v_no, v_on, v_linked
      from erp.settlement s join erp.customer c on c.id = s.customer_id where s.id = p_id;
  else
    select s.shipment_no, c.invoice_on, s.settlement_id into v_no, v_on, v_linked
      from erp.shipment s join erp.customer c on c.id = s.customer_id where s.id = p_id;
  end if;
  if v_on is distinct from p_source then
    return 0;
  end if;
  v_ref := p_source || '/' || v_no;
  -- a settlement or its shipment is invoiced, never both: serialise on the settlement, then look at what exists
  perform pg_advisory_xact_lock(hashtextextended('tax.issue:settlement:' || coalesce(v_linked, -p_id), 0));
  if exists (select from tax.document d where d.source = 'reference-erp' and d.reference = v_ref) then
    return 0;
  end if;
  if p_source = 'settlement' then
    if exists (select from erp.shipment sh join tax.document d on d.source = 'reference-erp' and d.reference = 'shipment/' || sh.shipment_no
                where sh.settlement_id = p_id) then
      return 0;
    end if;
  elsif v_linked is not null and exists (select from erp.settlement s join tax.document d on d.source = 'reference-erp' and d.reference = 'settlement/' || s.settlement_no
                                          where s.id = v_linked) then
    return 0;
  end if;
  return cardinality(tax.enqueue_invoices('reference-erp', v_ref, tax._reference_erp_document(p_source, p_id)));
end $$;
comment on function tax.issue_invoices(text, bigint) is 'Transitional (until 0025): the reference ERP''s approved settlement or posted shipment handed to tax.enqueue_invoices as source reference-erp, reference settlement/<no> or shipment/<no>, remark the document number. Returns the number of invoices, 0 when the customer is invoiced on the other event or the document (or its linked one) was invoiced already.';
