-- 0024 — a second tax platform: Baiwang (百望云) behind the same e-invoicing
-- contract (issue 13). The provider is the endpoint's (cloud.endpoint.provider):
-- an ERP switches platforms with cloud.put_endpoint and tax.put_config(p_endpoint
-- => …), never with its triggers, callback or tables.
--
-- The SQL chain keeps one payload shape and one answer shape for every platform
-- (the write-back shape of 0007: requestBillingNew's order, queryInvoiceResult's
-- result[].status 2 / 20 / 22, red forms by billStatus). The Baiwang adapter
-- (listener/providers/baiwang.ts) translates both ways and keeps the platform's
-- own answer under platform_answer, for audit. The one platform-specific piece
-- left in SQL was the error code of a refused invoice, hard-wired to nuonuo_22:
--
-- 1. tax.record_query_answered takes the refusal's code from the answer
--    (result[0].errorCode, set by adapters that have their own, e.g.
--    baiwang_70001); an answer without one (Nuonuo's) keeps nuonuo_22. The
--    reason stays the platform's readable fail cause.
-- 2. An invoice stays with the platform it was submitted to: its result
--    queries, PDF download, red-letter form and requery go to the endpoint its
--    submit went to (tax._endpoint_of; the answering message's own endpoint in
--    the write-backs), not to whatever tax.config names now. So an ERP switches
--    platforms with invoices under way, and reverses an older invoice on the
--    platform that issued it. tax._reinvoice_supported takes that endpoint.
-- 3. Comments that named Nuonuo alone now say what holds for every platform.
--
-- No table, type or grant changes; no new SQLSTATE.

CREATE FUNCTION tax._endpoint_of(p_inv tax.invoice) RETURNS text
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  -- the endpoint its current submit (tax.issue, or tax.red_confirm of a red invoice) went to;
  -- the configured one when that message is gone (retention) or was never sent
  select coalesce((select o.endpoint from cloud.outbox o where o.request_id = p_inv.request_id),
                  (select c.endpoint from tax.config c))
$$;

COMMENT ON FUNCTION tax._endpoint_of(p_inv tax.invoice) IS 'Internal: the endpoint (so the platform) an invoice was submitted to: its later calls (result queries, red-letter forms, PDF download) go there even after tax.config points elsewhere; tax.config''s endpoint when the submit message is gone.';

REVOKE ALL ON FUNCTION tax._endpoint_of(p_inv tax.invoice) FROM PUBLIC;

CREATE FUNCTION tax._reinvoice_supported(p_endpoint text) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  select e.provider = 'nuonuo' and coalesce(nullif(e.config->>'method_prefix', ''), 'nuonuo.OpeMplatform') = 'nuonuo.OpeMplatform'
    from cloud.endpoint e where e.name = p_endpoint
$$;

COMMENT ON FUNCTION tax._reinvoice_supported(p_endpoint text) IS 'Internal: whether an endpoint can retry signing (nuonuo.OpeMplatform.reInvoice; the classic ElectronInvoice product and Baiwang have no such method).';

REVOKE ALL ON FUNCTION tax._reinvoice_supported(p_endpoint text) FROM PUBLIC;

DROP FUNCTION tax._reinvoice_supported();

CREATE OR REPLACE FUNCTION tax._enqueue_query(p_inv tax.invoice, p_by text, p_delay_ms bigint) RETURNS uuid
    LANGUAGE plpgsql
    AS $$
declare
  v_id uuid;
begin
  v_id := cloud.enqueue_message(tax._endpoint_of(p_inv), 'tax.query',
            case when p_by = 'serial' then jsonb_build_object('serialNos', jsonb_build_array(p_inv.invoice_serial_no), 'isOfferInvoiceDetail', '0')
                 else jsonb_build_object('orderNos', jsonb_build_array(p_inv.order_no), 'isOfferInvoiceDetail', '0') end,
            'tax.invoice', p_inv.id::text, null, null, clock_timestamp() + make_interval(secs => p_delay_ms / 1000.0));
  -- remembered so a callback finds the pending query by primary key
  update tax.invoice set next_query_id = v_id where id = p_inv.id;
  return v_id;
end $$;

CREATE OR REPLACE FUNCTION tax._query_now(p_inv tax.invoice) RETURNS text
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
    perform cloud._wake_listeners((select e.wake_channel from cloud.endpoint e join cloud.outbox o on o.endpoint = e.name where o.request_id = p_inv.next_query_id));
  end if;
  return 'query_now';
end $$;

CREATE OR REPLACE FUNCTION tax._issue_red(p_reversal_id bigint) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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
  -- the red-letter form goes to the platform that issued the blue invoice
  perform cloud.enqueue_message(tax._endpoint_of(v_orig), 'tax.red_confirm', jsonb_strip_nulls(jsonb_build_object(
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

CREATE OR REPLACE FUNCTION tax.record_query_answered(m cloud.outbox, r jsonb) RETURNS void
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
      perform cloud.enqueue_message(m.endpoint, 'tax.download_pdf',
        jsonb_build_object('url', v_res->>'pdfUrl', 'max_bytes', v_cfg.max_pdf_bytes, 'invoice_no', v_no),
        'tax.invoice', v_inv.id::text);
    end if;
  elsif v_st = '22' then
    -- 开票失败: a definite refusal; a new orderNo (tax.reissue_invoice) may issue it. The code is the
    -- adapter's (errorCode: baiwang_… for Baiwang); an answer without one is Nuonuo's status 22
    update tax.invoice a
       set invoice_status = 'failed', error_code = coalesce(nullif(v_res->>'errorCode', ''), 'nuonuo_22'),
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
    if v_st = '24' and coalesce(v_res->>'serialNo', v_inv.invoice_serial_no) is not null and tax._reinvoice_supported(m.endpoint) then
      v_n := coalesce((v_inv.tax_cloud_response->>'reinvoices')::integer, 0);
      -- the platform allows 20 per serial no. per day (E9613), and signing after a reInvoice takes a while:
      -- polls that still see 24 right after one must not spend the allowance, so one per minute at most
      if v_n < 20 and coalesce((v_inv.tax_cloud_response->>'reinvoice_at')::timestamptz < now() - interval '1 minute', true) then
        update tax.invoice a set tax_cloud_response = a.tax_cloud_response || jsonb_build_object('reinvoices', v_n + 1, 'reinvoice_at', now())
         where a.id = v_inv.id;
        perform cloud.enqueue_message(m.endpoint, 'tax.reinvoice',
          jsonb_build_object('fpqqlsh', coalesce(v_res->>'serialNo', v_inv.invoice_serial_no), 'orderno', v_inv.order_no),
          'tax.invoice', v_inv.id::text);
      end if;
    end if;
    perform tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, tax._poll_delay_ms(v_inv.polls));
  end if;
end $$;

CREATE OR REPLACE FUNCTION tax.record_red_confirm_submitted(m cloud.outbox, r jsonb) RETURNS void
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
  v_id := cloud.enqueue_message(m.endpoint, 'tax.red_query',
    jsonb_build_object('identity', '0', 'billId', m.payload->>'billId'), 'tax.invoice', m.aggregate_id, null, null,
    clock_timestamp() + make_interval(secs => tax._poll_delay_ms(1) / 1000.0));
  update tax.invoice set next_query_id = v_id where id = v_inv.id;
end $$;

CREATE OR REPLACE FUNCTION tax.record_red_query_answered(m cloud.outbox, r jsonb) RETURNS void
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
    v_id := cloud.enqueue_message(m.endpoint, 'tax.red_query', m.payload, 'tax.invoice', m.aggregate_id, null, null,
      clock_timestamp() + make_interval(secs => tax._poll_delay_ms(v_n) / 1000.0));
    update tax.invoice set next_query_id = v_id where id = v_inv.id;
  end if;
end $$;

CREATE OR REPLACE FUNCTION tax.requery_invoice(p_invoice_id bigint) RETURNS uuid
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
    v_id := cloud.enqueue_message(tax._endpoint_of(v_inv), 'tax.red_query', jsonb_build_object('identity', '0', 'billId', v_bill),
                                  'tax.invoice', v_inv.id::text);
    update tax.invoice set next_query_id = v_id where id = v_inv.id;
    return v_id;
  end if;
  return tax._enqueue_query(v_inv, case when v_inv.invoice_serial_no is null then 'order' else 'serial' end, 0);
end $$;

COMMENT ON FUNCTION tax.record_query_answered(m cloud.outbox, r jsonb) IS 'Write-back of tax.query: status 2 → issued (20-digit number, date, URLs, raw answer), the PDF download enqueued, a red invoice marks its original (partially) reversed; 22 → failed with the fail cause and the adapter''s error code (result[0].errorCode; nuonuo_22 when the answer has none); 24 (issued, signing failed) → signing retried with reInvoice (same serial no., at most once a minute and 20 times) and polled; still issuing → the next query, backing off, up to max_polls. An invoice failed with an unknown outcome still takes a final answer.';

COMMENT ON COLUMN tax.invoice.order_no IS 'The platform''s idempotency key (Nuonuo orderNo, Baiwang serialNo): the request_id without dashes, so a retry after a timeout can never issue twice (a duplicate answer, E9106 or Baiwang''s duplicate serial, means already submitted: look it up).';

COMMENT ON FUNCTION tax.order_no_for(p_request_id uuid) IS 'The platform''s idempotency key for a request_id (32 hex characters: Nuonuo orderNo, Baiwang serialNo), which a retry reuses.';

COMMENT ON FUNCTION tax.build_invoice_payload(p_invoice_id bigint) IS 'The Tax_Invoice_Payload of one invoice, the same for every platform (the adapter translates it: Baiwang''s issue body is made from it): the requestBillingNew {"order": …} with the buyer (the invoice''s snapshot), the seller (tax.config), orderNo, the remark (the document''s, with " (n/m)" for a part) and the invoiceDetail lines (jsonb_agg).';

