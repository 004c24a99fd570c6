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
-- 2. Comments that named Nuonuo alone now say what holds for every platform.
--
-- No table, type or grant changes; no new SQLSTATE.

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
      perform cloud.enqueue_message(v_cfg.endpoint, 'tax.download_pdf',
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

COMMENT ON FUNCTION tax.record_query_answered(m cloud.outbox, r jsonb) IS 'Write-back of tax.query: status 2 → issued (20-digit number, date, URLs, raw answer), the PDF download enqueued, a red invoice marks its original (partially) reversed; 22 → failed with the fail cause and the adapter''s error code (result[0].errorCode; nuonuo_22 when the answer has none); 24 (issued, signing failed) → signing retried with reInvoice (same serial no., at most once a minute and 20 times) and polled; still issuing → the next query, backing off, up to max_polls. An invoice failed with an unknown outcome still takes a final answer.';

COMMENT ON COLUMN tax.invoice.order_no IS 'The platform''s idempotency key (Nuonuo orderNo, Baiwang serialNo): the request_id without dashes, so a retry after a timeout can never issue twice (a duplicate answer, E9106 or Baiwang''s duplicate serial, means already submitted: look it up).';

COMMENT ON FUNCTION tax.order_no_for(p_request_id uuid) IS 'The platform''s idempotency key for a request_id (32 hex characters: Nuonuo orderNo, Baiwang serialNo), which a retry reuses.';

COMMENT ON FUNCTION tax.build_invoice_payload(p_invoice_id bigint) IS 'The Tax_Invoice_Payload of one invoice, the same for every platform (the adapter translates it: Baiwang''s issue body is made from it): the requestBillingNew {"order": …} with the buyer (the invoice''s snapshot), the seller (tax.config), orderNo, the remark (the document''s, with " (n/m)" for a part) and the invoiceDetail lines (jsonb_agg).';

COMMENT ON FUNCTION tax._reinvoice_supported() IS 'Internal: whether the issuing endpoint can retry signing (nuonuo.OpeMplatform.reInvoice; the classic ElectronInvoice product and Baiwang have no such method).';
