/**
 * The console's SQL, one text per read or action (STYLE 14). Every read is a
 * view or table of the SQL API the CLI and DBAs use (cloud.endpoint_status,
 * tax.invoice_status, scm.order_status, …), every action a *_from_console
 * function that authorises the signed-in user again in the database. Lists
 * are keyset-paginated (a cursor id, never OFFSET) on indexed columns.
 */
export const PAGE_SIZE = 50;

export const consoleSql = {
  /** as erp_cloud_console, at sign-in and on every request */
  roleOf: 'select cloud.console_role($1) as role',

  // --- overview
  endpointStatus: `select endpoint, enabled, provider, pending, due, in_flight, failed, dead, parked_keys, oldest_pending_age_s, last_error, last_error_at,
                          rate_per_s, burst, circuit_state, circuit_failures, circuit_opened_at, circuit_reason, paused_until, pause_reason
                     from cloud.endpoint_status order by endpoint`,
  endpointSettings: `select * from cloud.endpoint_settings order by endpoint`,
  attemptsPerMinute: `select endpoint, minute, delivered, failed from cloud.attempts_per_minute(now() - make_interval(hours => $1::int)) order by endpoint, minute`,

  // --- documents: exact lookups on indexed keys; each hit names the page to open
  search: `
    select 'tax' as kind, d.id::text as key, d.source, d.reference as label from tax.document d
     where d.reference = $1 or substring(d.reference from '[^/]*$') = $1
    union
    select 'tax', d.id::text, d.source, d.reference
      from tax.reversal r join tax.invoice b on b.id = r.invoice_id join tax.document d on d.id = b.document_id
     where r.reference = $1 or substring(r.reference from '[^/]*$') = $1
    union
    select 'tax', d.id::text, d.source, d.reference
      from tax.invoice i left join tax.invoice b on b.id = i.original_invoice_id join tax.document d on d.id = coalesce(i.document_id, b.document_id)
     where i.invoice_no = $1 or i.order_no = $1 or i.request_id = $2::uuid
    union
    select 'po', po.id::text, po.source, po.reference from scm.purchase_order po where po.po_no = $1 or po.reference = $1
    union
    select 'asn', a.id::text, a.supplier_code, a.asn_no from scm.asn a where a.asn_no = $1
    union
    select 'message', o.request_id::text, o.endpoint, o.operation from cloud.outbox o where o.request_id = $2::uuid
    union
    select 'message', l.request_id::text, l.endpoint, l.operation from cloud.log l where l.request_id = $2::uuid
    limit 50`,
  taxDocument: `select id, source, reference, kind, remark, received_at from tax.document where id = $1`,
  invoicesOfDocument: `select s.invoice_id, s.part_no, s.part_count, s.kind, s.status, s.outcome, s.invoice_no, s.invoice_date, s.amount_incl_tax,
                              s.buyer_name, s.buyer_tax_id, s.error_code, s.error_message, s.pdf_url, s.ofd_url, s.xml_url, s.pdf_attachment_id,
                              s.responses, i.request_id, i.next_query_id, i.order_no
                         from tax.invoice_status s join tax.invoice i on i.id = s.invoice_id
                        where s.source = $1 and s.reference = $2 order by s.part_no`,
  redInvoicesOf: `select r.invoice_id, r.original_invoice_id, r.reference, r.reason, r.reversal_status, r.status, r.outcome, r.invoice_no, r.invoice_date,
                         r.amount_incl_tax, r.error_code, r.error_message, r.pdf_attachment_id, i.request_id, i.next_query_id
                    from tax.red_invoice_status r join tax.invoice i on i.id = r.invoice_id
                   where r.original_invoice_id = any ($1::bigint[]) order by r.invoice_id`,
  invoiceEvents: `select invoice_id, old_invoice_no, new_invoice_no, invoice_status, changed_at, changed_by
                    from tax.invoice_event where invoice_id = any ($1::bigint[]) order by id`,
  /** the messages of some aggregates (an invoice, a PO), oldest first */
  messagesOf: `select request_id, id, endpoint, operation, aggregate_type, aggregate_id, status, attempts, last_error, last_error_class, last_http_status,
                      created_at, sent_at, updated_at
                 from cloud.outbox where aggregate_type = $1 and aggregate_id = any ($2::text[]) order by id`,
  message: `select request_id, id, endpoint, operation, aggregate_type, aggregate_id, ordering_key, status, attempts, last_error, last_error_class,
                   last_http_status, created_at, sent_at, updated_at
              from cloud.outbox where request_id = $1::uuid`,
  /** every attempt of some messages, with the redacted, size-capped request and answer cloud.log keeps */
  attemptsOf: `select request_id, attempt, endpoint, operation, started_at, duration_ms, outcome, http_status, error_class, error_message, late,
                      method, url, request_headers, request_body, response_headers, response_body
                 from cloud.log where request_id = any ($1::uuid[]) order by started_at, attempt limit 500`,
  /** replays and skips from psql or the CLI (cloud.replay_audit), and every console action (cloud.console_audit, which names the role too) */
  auditOf: `select at, actor as who, action, reason, request_id::text as target from cloud.replay_audit
             where request_id = any ($1::uuid[]) and actor not like 'console:%'
            union all
            select at, 'console:' || login || ' (' || console_role || ')', action, reason, target from cloud.console_audit where target = any ($2::text[])
            order by at`,
  invoicePdf: `select a.file_name, a.content_type, a.content from tax.attachment a where a.invoice_id = $1 and a.content_type = 'application/pdf'`,
  invoiceBuyers: `select id, buyer_name, buyer_tax_id, buyer_address, buyer_phone, buyer_bank_name, buyer_account, buyer_email
                    from tax.invoice where id = any ($1::bigint[])`,
  invoiceDocument: `select coalesce(i.document_id, b.document_id) as document_id
                      from tax.invoice i left join tax.invoice b on b.id = i.original_invoice_id where i.id = $1`,
  purchaseOrder: `select source, reference, order_id, po_no, supplier_code, state, operation, cloud_status, cloud_ref, cloud_error, revision, synced_at,
                         supplier_confirmed_at, created_at, updated_at, lines
                    from scm.order_status where order_id = $1`,
  asnsOfOrder: `select asn_id, asn_no, supplier_code, po_no, status, reject_code, reject_reason, received_via, received_at, delivered_at, delivery_error
                  from scm.asn_status where order_reference = $1 and source = $2 order by asn_id`,
  asn: `select source, order_reference, asn_id, asn_no, supplier_code, po_no, status, reject_code, reject_reason, received_via, received_at,
               delivered_at, delivery_error, ship_date, eta, carrier, tracking_no, lines
          from scm.asn_status where asn_id = $1`,

  // --- needs attention (keyset: id below the cursor, newest first)
  failedMessages: `select request_id, id, endpoint, operation, aggregate_type, aggregate_id, status, attempts, last_error, last_error_class, last_http_status, last_error_at
                     from cloud.outbox where status in ('failed', 'dead') and ($1::bigint is null or id < $1) order by id desc limit ${PAGE_SIZE}`,
  failedInvoices: `select s.source, s.reference, s.invoice_id, s.part_no, s.part_count, s.kind, s.status, s.outcome, s.amount_incl_tax, s.buyer_name, s.buyer_tax_id,
                          s.error_code, s.error_message, s.updated_at, d.id as document_id
                     from tax.invoice_status s join tax.document d on d.source = s.source and d.reference = s.reference
                    where s.status = 'failed' and ($1::bigint is null or s.invoice_id < $1) order by s.invoice_id desc limit ${PAGE_SIZE}`,

  failedRedInvoices: `select r.invoice_id, r.original_invoice_id, r.original_reference, r.reference, r.reason, r.status, r.outcome, r.amount_incl_tax,
                             r.error_code, r.error_message, r.updated_at, d.id as document_id, d.source
                        from tax.red_invoice_status r join tax.invoice o on o.id = r.original_invoice_id join tax.document d on d.id = o.document_id
                       where r.status = 'failed' and ($1::bigint is null or r.invoice_id < $1) order by r.invoice_id desc limit ${PAGE_SIZE}`,

  // --- procurement
  orders: `select order_id, source, reference, po_no, supplier_code, state, operation, cloud_status, cloud_error, synced_at
             from scm.order_status where ($1::bigint is null or order_id < $1) order by order_id desc limit ${PAGE_SIZE}`,
  asns: `select asn_id, asn_no, supplier_code, po_no, source, order_reference, status, reject_code, reject_reason, received_via, received_at, delivery_error
           from scm.asn_status where ($1::bigint is null or asn_id < $1) order by asn_id desc limit ${PAGE_SIZE}`,
  quarantine: `select id, source, event_id, sqlstate, reason, received_at from scm.asn_quarantine
                where ($1::bigint is null or id < $1) order by id desc limit ${PAGE_SIZE}`,

  // --- settings (never secrets: endpoint_settings has no config)
  consoleUsers: `select login, role, granted_by, granted_at from cloud.console_user order by login`,
  taxSources: `select name, document_label from tax.source order by name`,
  scmSources: `select name, document_label from scm.source order by name`,

  // --- actions: each authorises the user again (EA001, EA002) and is audited with the user's name
  replay: 'select cloud.replay_message_from_console($1::uuid, $2) as result',
  skip: 'select cloud.skip_message_from_console($1::uuid, $2) as result',
  requery: 'select cloud.requery_invoice_from_console($1::bigint, $2) as result',
  reissue: 'select cloud.reissue_invoice_from_console($1::bigint, $2::jsonb, $3) as result',
} as const;
