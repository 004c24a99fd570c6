-- 0013 — e-invoicing validation hardening (issue 10 §2).
--
-- What 0007 let through or refused for the wrong reason, fixed as classes:
--
--   * Buyer tax ids. An 18-character id is either a resident identity number
--     (GB 11643: region, birth date, MOD 11-2 check; natural persons and
--     individual businesses use it as their 纳税人识别号) or a 统一社会信用代码
--     that must follow GB 32100's structure: the 31-character set (never I, O,
--     S, V, Z) in every position, a registration authority (position 1) and an
--     entity type (position 2) that the standard assigns, a GB/T 2260 region
--     code in positions 3–8 (digits, a province that exists, or 100000 for
--     national registrations). Only then is the check digit tested, and only a
--     check-digit failure can be overridden (erp.customer.tax_id_check_override):
--     the override never admits a malformed code. 15-, 17- and 20-character ids
--     keep 0007's rule (capital letters and digits).
--   * Numbers. Decimals are counted as significant decimals (min_scale), not
--     the column's scale: 2.0000000000 from a numeric(18,10) column is 2.
--     Quantity and unit price take 8, amounts and tax amounts 2.
--   * Text. Every text the payload carries (buyer name, address, phone, bank
--     account, e-mail, item name, spec, unit, remark, the seller's address,
--     phone, account and the clerk) is checked against tax.text_limit, whose
--     defaults are Nuonuo's requestBillingNew lengths, counted in characters
--     (Nuonuo states its limits in 字符, and the 数电 platform counts
--     characters; the payload is UTF-8 JSON). Over-long text stops the approval
--     with EI023; nothing is ever cut short.
--   * The 1.27 invoice tolerance. The splitter also starts a new invoice when
--     the next line would take Σ(tax − excl × rate) past 1.27, so every invoice
--     it makes is within the tolerance (300 lines of 1.00 at 13 % no longer stop
--     the approval). EI008 is left for a split that needs more than max_parts
--     invoices because of the tolerance; its hint names the lines with a tax
--     amount of the clerk's own, and never asks to clear one nobody set.
--
-- Functions replaced (0007 definitions, none redefined in 0008–0012):
-- tax.validate_buyer, tax.validate_line, tax.split_lines, tax.issue_invoices.
--
-- SQLSTATEs added (class EI, mirrored in listener/errors.ts):
--   EI020  buyer USCC has a character GB 32100 never uses (I, O, S, V, Z), position named
--   EI021  buyer USCC registration authority (position 1) or entity type (position 2) not assigned by GB 32100
--   EI022  buyer USCC region code (positions 3–8) is not a GB/T 2260 region
--   EI023  a text the invoice carries is longer than the tax platform takes (field and limit named)
--   EI024  invalid text-limit setting (tax.put_text_limit)

------------------------------------------------------------------------------
-- Text limits
------------------------------------------------------------------------------
create table tax.text_limit (
  field        text primary key,
  label        text not null,
  payload_key  text not null,
  max_chars    integer not null,
  source       text not null,
  updated_at   timestamptz not null default now(),
  constraint text_limit_max_chars check (max_chars between 1 and 10000)
);
comment on table tax.text_limit is 'How long each text on an invoice may be, in characters (Unicode code points, as the 数电 platform counts them; never bytes). Approval refuses longer text with EI023 and never truncates it. Defaults are Nuonuo''s requestBillingNew lengths; change with tax.put_text_limit.';
comment on column tax.text_limit.field is 'The field as the validation names it (buyer_name, item_name, remark, …).';
comment on column tax.text_limit.label is 'The field in a clerk''s words, used in the error message.';
comment on column tax.text_limit.payload_key is 'The requestBillingNew key(s) the text goes into.';
comment on column tax.text_limit.max_chars is 'The most characters allowed (1–10000).';
comment on column tax.text_limit.source is 'Where the default comes from.';

insert into tax.text_limit (field, label, payload_key, max_chars, source) values
  ('buyer_name',          'buyer name',                       'buyerName',               100, 'Nuonuo requestBillingNew: buyerName length 100'),
  ('buyer_address',       'buyer address',                    'buyerAddress',             80, 'Nuonuo requestBillingNew: buyerAddress length 80'),
  ('buyer_phone',         'buyer phone',                      'buyerTel',                 50, 'Nuonuo requestBillingNew: buyerTel length 50'),
  ('buyer_address_phone', 'buyer address and phone together', 'buyerAddress + buyerTel', 100, 'Nuonuo requestBillingNew: 购方地址+电话总共不超100字符'),
  ('buyer_account',       'buyer bank and account number',    'buyerAccount',            100, 'Nuonuo requestBillingNew: buyerAccount length 100'),
  ('buyer_email',         'buyer e-mail',                     'email',                    50, 'Nuonuo requestBillingNew: email length 50'),
  ('item_name',           'item name',                        'goodsName',                90, 'Nuonuo requestBillingNew: invoiceDetail.goodsName length 90'),
  ('spec',                'specification',                    'specType',                 40, 'Nuonuo requestBillingNew: invoiceDetail.specType length 40'),
  ('unit',                'unit',                             'unit',                     20, 'Nuonuo requestBillingNew: invoiceDetail.unit length 20'),
  ('remark',              'remark',                           'remark',                  200, 'Nuonuo requestBillingNew: remark 230, 数电票时最长为200字符'),
  ('seller_address',      'seller address',                   'salerAddress',             80, 'Nuonuo requestBillingNew: salerAddress length 80'),
  ('seller_phone',        'seller phone',                     'salerTel',                 20, 'Nuonuo requestBillingNew: salerTel length 20'),
  ('seller_account',      'seller bank account',              'salerAccount',            100, 'Nuonuo requestBillingNew: salerAccount length 100'),
  ('clerk',               'clerk (开票人)',                    'clerk',                    20, 'Nuonuo requestBillingNew: clerk length 20');

create function tax.put_text_limit(
  p_field     text,     -- a tax.text_limit field (buyer_name, item_name, remark, …)
  p_max_chars integer   -- the most characters the platform takes (1–10000)
) returns tax.text_limit
language plpgsql as $$
declare
  v_row tax.text_limit;
begin
  update tax.text_limit set max_chars = p_max_chars, updated_at = now() where field = p_field returning * into v_row;
  if not found then
    raise exception using errcode = 'EI024', message = format('there is no text limit %L', p_field),
      hint = format('The fields are: %s.', (select string_agg(field, ', ' order by field) from tax.text_limit));
  end if;
  return v_row;
exception when check_violation or not_null_violation then
  raise exception using errcode = 'EI024', message = format('text limit %s: %s characters is not a valid limit', p_field, coalesce(p_max_chars::text, 'null')),
    hint = 'Give 1–10000 characters, as the tax platform documents the field.';
end $$;
comment on function tax.put_text_limit is 'Sets how many characters one invoice text field may have (tax.text_limit); EI024 for an unknown field or a limit outside 1–10000.';

create function tax._check_text(
  p_field text,   -- the tax.text_limit field
  p_value text,   -- the text as it goes into the payload
  p_where text,   -- the document / line, for the message
  p_fix   text    -- where the clerk or operator corrects it
) returns void
language plpgsql stable as $$
declare
  v_lim tax.text_limit;
  v_len integer := char_length(p_value);
begin
  if p_value is null then
    return;
  end if;
  select * into strict v_lim from tax.text_limit where field = p_field;
  if v_len > v_lim.max_chars then
    raise exception using errcode = 'EI023',
      message = format('%s: %s (%s) is %s characters long, the tax platform takes at most %s', p_where, v_lim.label, p_field, v_len, v_lim.max_chars),
      detail = format('It goes into %s and begins %L.', v_lim.payload_key, left(p_value, 20) || '…'),
      hint = format('Shorten %s to at most %s characters: the invoice text is never cut short. The limit is tax.text_limit %L (tax.put_text_limit).',
                    p_fix, v_lim.max_chars, p_field);
  end if;
end $$;
comment on function tax._check_text is 'Internal: EI023 when a text is longer (in characters) than tax.text_limit allows for its field; the message names the field and the limit, the hint where to shorten it.';

------------------------------------------------------------------------------
-- Tax ids
------------------------------------------------------------------------------
create function tax.uscc_structure_problem(
  p_code text,          -- an 18-character id of capital letters and digits
  out errcode text,     -- EI020, EI021 or EI022; null when well formed
  out problem text      -- what is wrong, in words
) returns record
language plpgsql immutable as $$
declare
  -- GB 32100-2015 table 1 assigns 1 机构编制, 5 民政, 9 工商, Y 其他; the national standards body assigned
  -- 2 外交, 3 司法行政, 4 文化, 6 旅游, 7 宗教, 8 工会, A 中央军委改革和编制办公室, N 农业 afterwards
  -- (law firms are 31…, village collectives N2…): each with its entity types
  v_types constant jsonb := '{"1": "1239", "2": "19", "3": "123459", "4": "19", "5": "1239", "6": "129", "7": "129",
                              "8": "19", "9": "123", "A": "19", "N": "1239", "Y": "1"}';
  -- GB/T 2260 provinces, and 100000 (the whole country) for national registrations
  v_provinces constant text[] := array['11','12','13','14','15','21','22','23','31','32','33','34','35','36','37',
                                       '41','42','43','44','45','46','50','51','52','53','54','61','62','63','64','65','71','81','82'];
  v_bad integer;
begin
  select min(i) into v_bad from generate_series(1, 18) i where strpos('0123456789ABCDEFGHJKLMNPQRTUWXY', substr(p_code, i, 1)) = 0;
  if v_bad is not null then
    errcode := 'EI020';
    problem := format('position %s is %L, a character GB 32100 never uses (no I, O, S, V or Z)', v_bad, substr(p_code, v_bad, 1));
  elsif not v_types ? substr(p_code, 1, 1) then
    errcode := 'EI021';
    problem := format('position 1 (registration authority) is %L; GB 32100 assigns 1–9, A, N and Y', substr(p_code, 1, 1));
  elsif strpos(v_types->>substr(p_code, 1, 1), substr(p_code, 2, 1)) = 0 then
    errcode := 'EI021';
    problem := format('position 2 (entity type) is %L, which registration authority %s does not assign (it assigns %s)',
                      substr(p_code, 2, 1), substr(p_code, 1, 1), array_to_string(regexp_split_to_array(v_types->>substr(p_code, 1, 1), ''), ', '));
  elsif substr(p_code, 3, 6) !~ '^\d{6}$' then
    errcode := 'EI022';
    problem := format('positions 3–8 (region code) are %L, not 6 digits', substr(p_code, 3, 6));
  elsif not (substr(p_code, 3, 2) = any (v_provinces) or substr(p_code, 3, 6) = '100000') then
    errcode := 'EI022';
    problem := format('positions 3–8 (region code) are %s, and %s is no province in GB/T 2260', substr(p_code, 3, 6), substr(p_code, 3, 2));
  end if;
end $$;
comment on function tax.uscc_structure_problem is 'What breaks GB 32100''s structure in an 18-character 统一社会信用代码, checked in this order: a character outside the 31 it uses (EI020, first bad position), registration authority and entity type (EI021), GB/T 2260 region code (EI022). Both outputs null when well formed (the check digit is tax.uscc_check_digit_ok''s).';

create function tax.resident_id_ok(p_id text) returns boolean
language plpgsql immutable as $$
declare
  v_birth date;
  v_sum   integer := 0;
  w       constant integer[] := array[7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
begin
  if p_id is null or p_id !~ '^[1-8]\d{16}[0-9X]$' then
    return false;
  end if;
  begin
    v_birth := make_date(substr(p_id, 7, 4)::integer, substr(p_id, 11, 2)::integer, substr(p_id, 13, 2)::integer);
  exception when datetime_field_overflow or invalid_datetime_format or data_exception then
    return false;
  end;
  if v_birth < date '1900-01-01' then
    return false;
  end if;
  for i in 1 .. 17 loop
    v_sum := v_sum + substr(p_id, i, 1)::integer * w[i];
  end loop;
  return substr('10X98765432', v_sum % 11 + 1, 1) = substr(p_id, 18, 1);
end $$;
comment on function tax.resident_id_ok is 'Whether an 18-character id is a well-formed resident identity number (GB 11643: region, a real birth date, ISO 7064 MOD 11-2 check character), the 纳税人识别号 of a natural person or an individual business.';

create or replace function tax.validate_buyer(
  p_customer erp.customer,
  p_kind     text,        -- normal | special
  p_doc      text         -- the document, for messages
) returns text            -- a warning to keep on the invoice, or null
language plpgsql as $$
declare
  v_where   text := format('%s: customer %s', p_doc, left(p_customer.name, 40));
  v_fix     text := format('erp.customer %s', p_customer.id);
  v_struct  record;
  v_account text := nullif(concat_ws(' ', p_customer.bank_name, p_customer.bank_account), '');
begin
  if coalesce(btrim(p_customer.name), '') = '' then
    raise exception using errcode = 'EI009', message = format('%s: the customer has no name to print as buyer', p_doc),
      hint = format('Enter erp.customer.name for customer %s.', p_customer.id);
  end if;
  -- every buyer text the payload carries, as build_invoice_payload puts it there
  perform tax._check_text('buyer_name', p_customer.name, v_where, v_fix || ' name');
  perform tax._check_text('buyer_address', p_customer.address, v_where, v_fix || ' address');
  perform tax._check_text('buyer_phone', p_customer.phone, v_where, v_fix || ' phone');
  perform tax._check_text('buyer_address_phone', coalesce(p_customer.address, '') || coalesce(p_customer.phone, ''), v_where, v_fix || ' address or phone');
  perform tax._check_text('buyer_account', v_account, v_where, v_fix || ' bank_name and bank_account');
  perform tax._check_text('buyer_email', p_customer.email, v_where, v_fix || ' email');
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
  if length(p_customer.tax_id) <> 18 or tax.resident_id_ok(p_customer.tax_id) then
    return null;
  end if;
  -- an 18-character id that is no resident identity number is a 统一社会信用代码: its structure first,
  -- and no override admits a malformed one
  select * into v_struct from tax.uscc_structure_problem(p_customer.tax_id);
  if v_struct.errcode is not null then
    raise exception using errcode = v_struct.errcode,
      message = format('%s: buyer tax id %s of customer %s is not a well-formed 统一社会信用代码: %s', p_doc, p_customer.tax_id, p_customer.name, v_struct.problem),
      hint = format('Correct erp.customer.tax_id of customer %s from the business licence (a 18-digit resident identity number is taken as well). The check-digit override never admits a malformed code.', p_customer.id);
  end if;
  if not tax.uscc_check_digit_ok(p_customer.tax_id) then
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
comment on function tax.validate_buyer is 'Checks the buyer: name (EI009), every buyer text against tax.text_limit (EI023), tax id for 专票 (EI010), tax id shape (EI001); an 18-character id is a resident identity number or a USCC of GB 32100 structure (EI020 character, EI021 authority / type, EI022 region) whose check digit must match (EI002 unless overridden: then a warning, returned; the override never admits a malformed code).';

------------------------------------------------------------------------------
-- Lines
------------------------------------------------------------------------------
create or replace function tax.validate_line(
  p_line tax.source_line,
  p_doc  text
) returns void
language plpgsql as $$
declare
  -- a line is named by its item, shortened: an over-long name must not make an over-long message
  v_name  text := case when char_length(p_line.item_name) > 30 then left(p_line.item_name, 30) || '…' else p_line.item_name end;
  v_where text := format('%s line %s (%s)', p_doc, p_line.line_no, v_name);
  v_fix   text := format('line %s''s', p_line.line_no);
  v_sep   record;
begin
  perform tax._check_text('item_name', p_line.item_name, v_where, v_fix || ' item_name');
  perform tax._check_text('spec', p_line.spec, v_where, v_fix || ' spec');
  perform tax._check_text('unit', p_line.unit, v_where, v_fix || ' unit');
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
  -- decimals are counted where they carry a value (min_scale): 2.0000000000 from a numeric(18,10) column is 2
  if min_scale(p_line.amount) > 2 then
    raise exception using errcode = 'EI005', message = format('%s: amount %s has more than 2 decimals', v_where, p_line.amount),
      hint = 'Amounts go on the invoice in fen: round the line amount to 2 decimals.';
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
    if min_scale(p_line.quantity) > 8 or min_scale(p_line.unit_price) > 8 then
      raise exception using errcode = 'EI005',
        message = format('%s: %s has more than 8 decimals', v_where,
                         case when min_scale(p_line.quantity) > 8 then format('quantity %s', p_line.quantity) else format('unit_price %s', p_line.unit_price) end),
        hint = 'The tax platform takes at most 8 decimals (trailing zeros do not count); round the quantity or unit price.';
    end if;
    if abs(p_line.quantity * p_line.unit_price - p_line.amount) > 0.01 then
      raise exception using errcode = 'EI005',
        message = format('%s: amount %s differs from quantity × unit_price = %s', v_where, p_line.amount, round(p_line.quantity * p_line.unit_price, 4)),
        hint = 'The amount is tax-inclusive and must equal quantity × unit price within 0.01.';
    end if;
  end if;
  if min_scale(p_line.tax_amount) > 2 then
    raise exception using errcode = 'EI007', message = format('%s: tax_amount %s has more than 2 decimals', v_where, p_line.tax_amount),
      hint = 'Round tax_amount to 2 decimals, or clear it to let the database compute it.';
  end if;
  select * into v_sep from tax.separate_price_tax(p_line.amount, p_line.tax_rate, p_line.tax_amount);
  if abs(v_sep.tax_amount - v_sep.amount_excl_tax * p_line.tax_rate) > 0.06 then
    raise exception using errcode = 'EI007',
      message = format('%s: tax_amount %s differs from (amount − tax) × rate = %s by more than 0.06', v_where, v_sep.tax_amount,
                       round(v_sep.amount_excl_tax * p_line.tax_rate, 4)),
      hint = 'Clear tax_amount to let the database compute it, or correct it.';
  end if;
end $$;
comment on function tax.validate_line is 'Checks one line: item name, spec and unit against tax.text_limit (EI023), tax code (EI003), rate (EI004), amount / quantity / price (EI005: significant decimals, 8 for quantity and price, 2 for the amount), tax amount decimals and the 0.06 line tolerance (EI007). The message names the line and the field.';

------------------------------------------------------------------------------
-- Splitting
------------------------------------------------------------------------------
create function tax._split_lines(
  p_lines         tax.source_line[],
  p_max_amount    numeric,   -- tax-inclusive ceiling per invoice, or null
  p_max_lines     integer,
  p_doc           text,
  p_max_deviation numeric    -- |Σ(tax − excl × rate)| per invoice, or null for no tolerance rule
) returns integer[]
language plpgsql immutable as $$
declare
  v_parts  integer[] := '{}';
  v_part   integer := 1;
  v_sum    numeric := 0;
  v_dev    numeric := 0;
  v_count  integer := 0;
  v_line   tax.source_line;
  v_d      numeric;
begin
  foreach v_line in array p_lines loop
    if p_max_amount is not null and v_line.amount > p_max_amount then
      raise exception using errcode = 'EI011',
        message = format('%s line %s (%s): amount %s alone exceeds the per-invoice limit %s', p_doc, v_line.line_no, v_line.item_name, v_line.amount, p_max_amount),
        hint = 'A line is never split across invoices: split it into several lines in the document, or raise max_invoice_amount (tax.put_config).';
    end if;
    -- the line's rounding deviation, as the platform sums it (a line alone is within 0.06: tax.validate_line)
    select s.tax_amount - s.amount_excl_tax * v_line.tax_rate into v_d
      from tax.separate_price_tax(v_line.amount, v_line.tax_rate, v_line.tax_amount) s;
    if v_count > 0 and (v_count + 1 > p_max_lines
                        or (p_max_amount is not null and v_sum + v_line.amount > p_max_amount)
                        or (p_max_deviation is not null and abs(v_dev + v_d) > p_max_deviation)) then
      v_part := v_part + 1;
      v_sum := 0;
      v_dev := 0;
      v_count := 0;
    end if;
    v_sum := v_sum + v_line.amount;
    v_dev := v_dev + v_d;
    v_count := v_count + 1;
    v_parts := v_parts || v_part;
  end loop;
  return v_parts;
end $$;
comment on function tax._split_lines is 'Internal: the part number of each line, in line order, starting a new invoice when the next line would break the line-count limit, the amount limit, or (p_max_deviation) the invoice tax tolerance; a line is never split (EI011 when one alone is over the amount limit).';

create or replace function tax.split_lines(
  p_lines      tax.source_line[],
  p_max_amount numeric,   -- tax-inclusive ceiling per invoice, or null
  p_max_lines  integer,
  p_doc        text
) returns integer[]       -- the part number of each line, in order
language sql immutable as $$
  select tax._split_lines(p_lines, p_max_amount, p_max_lines, p_doc, 1.27)
$$;
comment on function tax.split_lines is 'Splits a document''s lines into invoices by the amount and line-count limits and the 1.27 invoice tax tolerance (each invoice''s Σ(tax − excl × rate) stays within it), in line order, never splitting a line (EI011 when one line alone is over the amount limit).';

create function tax._tolerance_hint(p_lines tax.source_line[]) returns text
language sql immutable as $$
  select case when count(*) filter (where l.tax_amount is not null) = 0 then
           'Every line tax was computed by the database; only rounding adds up here. Raise max_parts (tax.config) or max_invoice_lines, or split the document into smaller ones.'
         else format('Line(s) %s carry a tax_amount of their own: clear it to let the database compute it, or correct it; or raise max_parts (tax.config).',
                     array_to_string((array_agg(l.line_no order by l.line_no) filter (where l.tax_amount is not null))[1:10], ', ')
                     || case when count(*) filter (where l.tax_amount is not null) > 10 then ', …' else '' end) end
    from unnest(p_lines) l
$$;
comment on function tax._tolerance_hint is 'Internal: the EI008 hint. Names the lines whose tax_amount the clerk set; when none was set it never asks to clear one.';

------------------------------------------------------------------------------
-- Issuing
------------------------------------------------------------------------------
create or replace function tax.issue_invoices(
  p_source text,    -- 'settlement' or 'shipment'
  p_id     bigint   -- the document's id
) returns integer   -- invoices created (0 when this event does not invoice this customer, or it was invoiced already)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
  for p in 1 .. v_count loop
    v_req := cloud.new_request_id();
    insert into erp.ar_invoice (settlement_id, shipment_id, part_no, part_count, invoice_kind, request_id, order_no,
                                buyer_name, buyer_tax_id, amount_excl_tax, tax_amount, amount_incl_tax, tax_id_warning)
    values (case when p_source = 'settlement' then p_id end, case when p_source = 'shipment' then p_id end, p, v_count, v_kind,
            v_req, tax.order_no_for(v_req), v_customer.name, nullif(v_customer.tax_id, ''), 0, 0, 0, v_warning)
    returning id into v_inv;
    insert into erp.ar_invoice_line (ar_invoice_id, line_no, source_line_no, item_name, tax_code, spec, unit, quantity, unit_price,
                                     tax_rate, amount_excl_tax, tax_amount, amount_incl_tax)
    select v_inv, row_number() over (order by l.line_no), l.line_no, l.item_name, l.tax_code, l.spec, l.unit, l.quantity, l.unit_price,
           l.tax_rate, sep.amount_excl_tax, sep.tax_amount, l.amount
      from unnest(v_lines) with ordinality as l(line_no, item_name, tax_code, spec, unit, quantity, unit_price, amount, tax_rate, tax_amount, ord)
      cross join lateral tax.separate_price_tax(l.amount, l.tax_rate, l.tax_amount) sep
     where v_parts[l.ord] = p;
    -- the splitter keeps this within 1.27; checked again on what was written, so a defect there can never send one
    select sum(l.tax_amount - l.amount_excl_tax * l.tax_rate) into v_dev from erp.ar_invoice_line l where l.ar_invoice_id = v_inv;
    if abs(v_dev) > 1.27 then
      select array_agg(v_lines[o] order by o) into v_part_lines from generate_series(1, cardinality(v_lines)) o where v_parts[o] = p;
      raise exception using errcode = 'EI008',
        message = format('%s invoice %s of %s: line taxes differ from excl × rate by %s in total, more than 1.27', v_doc, p, v_count, round(v_dev, 4)),
        hint = tax._tolerance_hint(v_part_lines);
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
comment on function tax.issue_invoices is 'Turns an approved settlement or posted shipment into AR invoice(s): validates (buyer, lines, every text against tax.text_limit), splits by the limits and the 1.27 invoice tax tolerance, separates price and tax, builds each payload and enqueues tax.issue in the caller''s transaction. EI008 when the tolerance needs more than max_parts invoices. Returns 0 when the customer is invoiced on the other event or the document (or its linked one) was invoiced already.';

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------
revoke all on tax.text_limit from public;
grant select on tax.text_limit to erp_cloud_operator;
revoke execute on function tax.put_text_limit(text, integer), tax._check_text(text, text, text, text), tax.uscc_structure_problem(text),
  tax.resident_id_ok(text), tax._split_lines(tax.source_line[], numeric, integer, text, numeric), tax._tolerance_hint(tax.source_line[]) from public;
grant execute on function tax.put_text_limit(text, integer) to erp_cloud_operator;
grant execute on function tax.uscc_structure_problem(text), tax.resident_id_ok(text) to erp_cloud_app, erp_cloud_listener, erp_cloud_operator;
