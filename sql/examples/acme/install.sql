-- acme: an ERP that is not ours, connected to erp-cloud's e-invoicing and procurement through the public contracts
-- only. Version 2 (1 + procurement). Idempotent: `erp-cloud migrate --with-example acme`, or `psql -1 -f install.sql` as a superuser.
-- Pinyin names: 客户 customer (khbh 编号, khmc 名称, khsh 税号, dz 地址, dh 电话, khh 开户行, zh 账号, yx 邮箱,
-- bjyz 不校验校验位); 销售开票单 so_invoice_head (djbh 单据编号, fplx 01 专票 | 02 普票, zt 0 录入 | 1 审核 | 9 作废,
-- bz 备注, kpzt 开票状态, fphm 发票号码, kprq 开票日期, cwxx 错误信息); lines (hh 行号, spmc 商品名称, ssbm 税收编码,
-- ggxh 规格型号, dw 单位, sl 数量, dj 单价, je 含税金额, slv 税率, se 税额); so_invoice_fp one row per invoice part
-- (xh 序号); 红冲单 so_red_head (hcdh 红冲单号, hh 行号, yy 原因 1 销货退回 | 2 开票有误 | 3 服务中止 | 4 销售折让).
-- kpzt: Q 已提交, K 开票中, Y 已开票, S 失败, H 已红冲, B 部分红冲.
-- Procurement: 供应商 gys (gysbh 编号, gysmc 名称, gyssh 税号); 采购单 po_head (cgdh 采购单号, bz 币种, cgrq 采购日期,
-- dhrq 到货日期, zt 0 录入 | 1 审核 | 2 变更 | 8 关闭 | 9 作废, yzt 云状态, yddh 云单号, ycw 云错误); po_line (wlbm 物料编码,
-- wlmc 物料名称, sl 数量, dw 单位, dj 无税单价, slv 税率, jhrq 交货日期); 到货通知收件箱 dh_inbox (fhdh 发货单号, cghh 采购行号,
-- ph 批号, scrq 生产日期, fhrq 发货日期, yjdh 预计到货, cys 承运商, ydh 运单号, qd 渠道).
-- yzt: Q 已提交, F 已发布, B 已变更, G 已关闭, J 被拒, S 失败.

-- The ERP's owner role: owns the schema and runs the triggers and the callbacks (erp-cloud refuses a callback
-- owned by a superuser). Member of erp_cloud_app: that lets it call tax.enqueue_* / scm.enqueue_order* and read the *_status views.
do $$
begin
  begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'acme_owner') then
      create role acme_owner nologin;
      comment on role acme_owner is 'Owns schema acme (the example ERP) and runs its triggers and callbacks; nobody logs in as it.';
    end if;
  exception when duplicate_object or unique_violation then null;  -- another database of this cluster made it just now
  end;
  if not pg_catalog.pg_has_role('acme_owner', 'erp_cloud_app', 'member') then grant erp_cloud_app to acme_owner; end if;
  if not pg_catalog.pg_has_role(current_user, 'acme_owner', 'member') then execute format('grant acme_owner to %I', current_user); end if;
end $$;
create schema if not exists acme authorization acme_owner;
comment on schema acme is 'The acme example ERP (sql/examples/acme): pinyin tables, its own status codes, e-invoicing and procurement through the tax.* and scm.* contracts.';
set role acme_owner;

-- Tables: the ERP's own. erp-cloud never reads them; the triggers hand it documents, the callbacks write back.
create table if not exists acme.customer (
  khbh text primary key, khmc text not null, khsh text, dz text, dh text, khh text, zh text, yx text,
  bjyz boolean not null default false);
create table if not exists acme.so_invoice_head (
  djbh text primary key, khbh text not null references acme.customer,
  fplx text not null default '02' check (fplx in ('01', '02')),
  zt text not null default '0' check (zt in ('0', '1', '9')),
  bz text, kpzt text check (kpzt in ('Q', 'K', 'Y', 'S', 'H', 'B')), fphm text, kprq date, cwxx text);
create table if not exists acme.so_invoice_line (
  djbh text not null references acme.so_invoice_head on delete cascade, hh integer not null,
  spmc text not null, ssbm text, ggxh text, dw text, sl numeric(18,6), dj numeric(18,8),
  je numeric(16,2) not null, slv numeric(5,4) not null, se numeric(16,2), primary key (djbh, hh));
create table if not exists acme.so_invoice_fp (
  djbh text not null references acme.so_invoice_head, xh integer not null,
  fphm text, kprq date, kpzt text, pdf bytea, primary key (djbh, xh));
create table if not exists acme.so_red_head (
  hcdh text primary key, djbh text not null references acme.so_invoice_head, hh integer[],
  yy text not null check (yy in ('1', '2', '3', '4')), zt text not null default '1' check (zt in ('0', '1')),
  fphm text, kpzt text, cwxx text);
-- procurement: 供应商, 采购单 head and lines, and the inbox acme.on_asn fills (one row per ASN line)
create table if not exists acme.gys (gysbh text primary key, gysmc text not null, gyssh text);
create table if not exists acme.po_head (
  cgdh text primary key, gysbh text not null references acme.gys, bz text not null default 'CNY',
  cgrq date not null default current_date, dhrq date,
  zt text not null default '0' check (zt in ('0', '1', '2', '8', '9')), yzt text, yddh text, ycw text);
create table if not exists acme.po_line (
  cgdh text not null references acme.po_head on delete cascade, hh integer not null, wlbm text not null, wlmc text not null,
  sl numeric(18,4) not null, dw text, dj numeric(18,6) not null, slv numeric(5,4) not null default 0.13, jhrq date,
  primary key (cgdh, hh));
create table if not exists acme.dh_inbox (
  gysbh text not null, fhdh text not null, hh integer not null, cgdh text not null, cghh integer not null, wlbm text,
  sl numeric(18,4) not null, ph text, scrq date, fhrq date, yjdh date, cys text, ydh text, qd text,
  jsrq timestamptz not null default now(), primary key (gysbh, fhdh, hh));

-- Trigger: approval (zt 0 → 1) hands the document to erp-cloud in the approving transaction. A validation
-- error (EI…, naming customer.khsh etc.) fails the approval and nothing is written.
create or replace function acme.tg_so_invoice_head__500_issue() returns trigger
  language plpgsql security definer set search_path = '' as $$
declare v_doc jsonb;
begin
  select jsonb_build_object(
           'kind', case new.fplx when '01' then 'special' else 'normal' end,
           'remark', coalesce(new.bz, new.djbh),
           'buyer', jsonb_build_object('name', c.khmc, 'tax_id', c.khsh, 'address', c.dz, 'phone', c.dh,
                      'bank_name', c.khh, 'bank_account', c.zh, 'email', c.yx, 'tax_id_check_override', c.bjyz),
           'lines', (select jsonb_agg(jsonb_build_object('line_no', l.hh, 'item_name', l.spmc, 'tax_code', l.ssbm,
                        'spec', l.ggxh, 'unit', l.dw, 'quantity', l.sl, 'unit_price', l.dj, 'amount', l.je,
                        'tax_rate', l.slv, 'tax_amount', l.se) order by l.hh)
                       from acme.so_invoice_line l where l.djbh = new.djbh))
    into v_doc from acme.customer c where c.khbh = new.khbh;
  perform tax.enqueue_invoices('acme', new.djbh, v_doc);  -- approving again returns the same invoices, sends nothing
  update acme.so_invoice_head set kpzt = 'Q' where djbh = new.djbh and kpzt is null;
  return null;
end $$;
comment on function acme.tg_so_invoice_head__500_issue() is
  'Approval of a 销售开票单 (zt → 1): builds the invoice document from the head, its lines and the customer and calls tax.enqueue_invoices.';
create or replace trigger so_invoice_head_500_issue after update of zt on acme.so_invoice_head for each row
  when (new.zt = '1' and old.zt is distinct from '1') execute function acme.tg_so_invoice_head__500_issue();

create or replace function acme.tg_so_red_head__500_reverse() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin
  perform tax.enqueue_reversal('acme', new.djbh, new.hcdh,
    case new.yy when '1' then 'return' when '2' then 'error' when '3' then 'service_stopped' else 'allowance' end, new.hh);
  update acme.so_red_head set kpzt = 'Q' where hcdh = new.hcdh and kpzt is null;
  return null;
end $$;
comment on function acme.tg_so_red_head__500_reverse() is
  'An approved 红冲单 (zt 1): asks erp-cloud for red invoices of the document''s blue invoices (lines hh, or all), keyed by hcdh.';
create or replace trigger so_red_head_500_reverse after insert or update of zt on acme.so_red_head for each row
  when (new.zt = '1') execute function acme.tg_so_red_head__500_reverse();

-- Callback: erp-cloud calls it in the transaction that changed an invoice, with its whole current state
-- (so a second call is harmless). Short and no network. No lock_timeout of its own: erp-cloud calls it
-- with 50 ms, and when an acme job holds the rows it writes, the call gives way (kept in
-- tax.callback_failure) and the listener calls it again once they are free. A fault it raises waits for
-- tax.replay_callbacks('acme').
create or replace function acme.on_invoice(r tax.invoice_result) returns void
  language plpgsql security definer set search_path = '' as $$
declare
  v_kpzt constant jsonb := '{"pending": "Q", "issuing": "K", "issued": "Y", "failed": "S", "reversed": "H", "partially_reversed": "B"}';
begin
  if r.invoice_type = 'red' then  -- a red invoice writes its own 红冲单 only, never the blue one's rows
    update acme.so_red_head h
       set kpzt = v_kpzt ->> r.status, cwxx = r.error_message,
           fphm = (select string_agg(s.invoice_no, ',' order by s.invoice_id) from tax.red_invoice_status s
                    where s.source = 'acme' and s.reference = r.reference)
     where h.hcdh = r.reference;
    return;
  end if;
  insert into acme.so_invoice_fp as f (djbh, xh, fphm, kprq, kpzt, pdf)
  select r.reference, r.part_no, r.invoice_no, (r.invoice_date at time zone 'Asia/Shanghai')::date, v_kpzt ->> r.status, s.pdf
    from tax.invoice_status s where s.invoice_id = r.invoice_id
  on conflict (djbh, xh) do update set fphm = excluded.fphm, kprq = excluded.kprq, kpzt = excluded.kpzt, pdf = excluded.pdf;
  -- the head: every part's number, and the state of the document as a whole
  update acme.so_invoice_head h
     set fphm = a.fphm, kprq = a.kprq, cwxx = a.cwxx,
         kpzt = case when a.failed then 'S' when a.pending then 'Q' when a.issuing then 'K'
                     when a.issued then 'Y' when a.reversed then 'H' else 'B' end
    from (select string_agg(s.invoice_no, ',' order by s.part_no) fphm, max(s.invoice_date at time zone 'Asia/Shanghai')::date kprq,
                 string_agg(s.error_message, '; ' order by s.part_no) cwxx, bool_or(s.status = 'failed') failed,
                 bool_or(s.status = 'pending') pending, bool_or(s.status = 'issuing') issuing,
                 bool_and(s.status = 'issued') issued, bool_and(s.status = 'reversed') reversed
            from tax.invoice_status s where s.source = 'acme' and s.reference = r.reference) a
   where h.djbh = r.reference;
end $$;
comment on function acme.on_invoice(tax.invoice_result) is
  'erp-cloud''s callback for source acme: writes number, date, state and PDF into so_invoice_fp and so_invoice_head, a red invoice into so_red_head.';

create or replace function acme.buyer_of(p_djbh text) returns jsonb
  language sql stable security definer set search_path = '' as $$
  select jsonb_build_object('name', c.khmc, 'tax_id', c.khsh, 'address', c.dz, 'phone', c.dh, 'bank_name', c.khh,
                            'bank_account', c.zh, 'email', c.yx, 'tax_id_check_override', c.bjyz)
    from acme.so_invoice_head h join acme.customer c on c.khbh = h.khbh where h.djbh = p_djbh $$;
comment on function acme.buyer_of(text) is
  'The buyer of a 销售开票单 as it is now in acme.customer: what tax.reissue_invoices(''acme'', djbh) issues to after a correction.';

-- Procurement. A deferred trigger: at commit, the order as it is then (head, lines, supplier) goes to
-- scm.enqueue_order, however many rows the transaction changed (one revision per transaction); 8 关闭 and
-- 9 作废 go to scm.enqueue_order_close. An ES… error (naming po_line.sl etc.) fails the commit: nothing is written.
create or replace function acme._enqueue_order(p_cgdh text) returns void
  language plpgsql security definer set search_path = '' as $$
declare h acme.po_head; v_doc jsonb; v scm.order_enqueued;
begin
  select * into h from acme.po_head where cgdh = p_cgdh;
  if not found or h.zt = '0' then return; end if;
  if h.zt in ('8', '9') then  -- a draft cancelled before approval was never handed in: nothing to close
    if exists (select from scm.order_status o where o.source = 'acme' and o.reference = h.cgdh)
       and scm.enqueue_order_close('acme', h.cgdh, case h.zt when '8' then 'closed' else 'cancelled' end) is not null then
      update acme.po_head set yzt = 'Q', ycw = null where cgdh = h.cgdh;
    end if;
    return;
  end if;
  select jsonb_build_object('po_no', h.cgdh, 'currency', h.bz, 'order_date', h.cgrq,
           'supplier', jsonb_build_object('code', g.gysbh, 'name', g.gysmc, 'tax_id', g.gyssh),
           'lines', coalesce((select jsonb_agg(jsonb_build_object('line_no', l.hh, 'material_code', l.wlbm, 'material_name', l.wlmc,
                        'quantity', l.sl, 'unit', l.dw, 'price', l.dj, 'tax_rate', l.slv, 'delivery_date', coalesce(l.jhrq, h.dhrq))
                        order by l.hh) from acme.po_line l where l.cgdh = h.cgdh), '[]'))
    into v_doc from acme.gys g where g.gysbh = h.gysbh;
  v := scm.enqueue_order('acme', h.cgdh, v_doc);  -- operation null: the cloud has this order as it is
  if v.operation is not null then update acme.po_head set yzt = 'Q', ycw = null where cgdh = h.cgdh; end if;
end $$;
comment on function acme._enqueue_order(text) is
  'Internal: hands 采购单 p_cgdh as it is now to procurement: zt 1/2 to scm.enqueue_order, 8 关闭 / 9 作废 to scm.enqueue_order_close.';
create or replace function acme.tg_po_head__500_publish() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin perform acme._enqueue_order(new.cgdh); return null; end $$;
comment on function acme.tg_po_head__500_publish() is 'Deferred trigger on po_head: at commit, the 采购单 goes to procurement (acme._enqueue_order).';
create or replace function acme.tg_po_line__500_publish() returns trigger
  language plpgsql security definer set search_path = '' as $$
begin perform acme._enqueue_order(case tg_op when 'DELETE' then old.cgdh else new.cgdh end); return null; end $$;
comment on function acme.tg_po_line__500_publish() is 'Deferred trigger on po_line: at commit, the line''s 采购单 goes to procurement (acme._enqueue_order).';
drop trigger if exists po_head_500_publish on acme.po_head;  -- a constraint trigger has no "or replace"
create constraint trigger po_head_500_publish after insert or update of zt, gysbh, bz, cgrq, dhrq on acme.po_head
  deferrable initially deferred for each row execute function acme.tg_po_head__500_publish();
drop trigger if exists po_line_500_publish on acme.po_line;
create constraint trigger po_line_500_publish after insert or update or delete on acme.po_line
  deferrable initially deferred for each row execute function acme.tg_po_line__500_publish();

-- Callbacks: the order's cloud state into po_head; each accepted ASN's lines into dh_inbox (a replay adds nothing).
create or replace function acme.on_order(r scm.order_result) returns void
  language sql security definer set search_path = '' as $$
  update acme.po_head
     set yzt = '{"queued": "Q", "published": "F", "revised": "B", "closed": "G", "rejected": "J", "undeliverable": "S"}'::jsonb ->> r.cloud_status,
         yddh = r.cloud_ref, ycw = r.cloud_error
   where cgdh = r.reference $$;
comment on function acme.on_order(scm.order_result) is
  'erp-cloud''s order callback for source acme: writes the cloud state (yzt), the cloud''s order id (yddh) and its refusal (ycw) into po_head.';
create or replace function acme.on_asn(d scm.asn_delivery) returns void
  language sql security definer set search_path = '' as $$
  insert into acme.dh_inbox (gysbh, fhdh, hh, cgdh, cghh, wlbm, sl, ph, scrq, fhrq, yjdh, cys, ydh, qd)
  select d.supplier_code, d.asn_no, l.line_no, d.order_reference, l.po_line_no, l.material_code, l.quantity, l.batch_no,
         l.production_date, d.ship_date, d.eta, d.carrier, d.tracking_no, d.received_via
    from unnest(d.lines) l
  on conflict (gysbh, fhdh, hh) do nothing $$;
comment on function acme.on_asn(scm.asn_delivery) is
  'erp-cloud''s ASN callback for source acme: one dh_inbox row per line of an accepted 发货单 against an acme 采购单; delivered again, it adds nothing.';
revoke execute on all functions in schema acme from public;
reset role;

-- Registration: the callbacks, the buyer re-read, and how acme calls the documents' fields (messages use these names).
select tax.put_source('acme', p_document_label => '销售开票单',
  p_on_invoice => 'acme.on_invoice(tax.invoice_result)', p_refresh_buyer => 'acme.buyer_of(text)',
  p_field_names => '{"reference": "so_invoice_head.djbh", "kind": "so_invoice_head.fplx", "remark": "so_invoice_head.bz",
    "buyer.name": "customer.khmc", "buyer.tax_id": "customer.khsh", "buyer.address": "customer.dz",
    "buyer.phone": "customer.dh", "buyer.bank_name": "customer.khh", "buyer.bank_account": "customer.zh",
    "buyer.email": "customer.yx", "buyer.tax_id_check_override": "customer.bjyz",
    "lines[].line_no": "so_invoice_line.hh", "lines[].item_name": "so_invoice_line.spmc",
    "lines[].tax_code": "so_invoice_line.ssbm", "lines[].spec": "so_invoice_line.ggxh", "lines[].unit": "so_invoice_line.dw",
    "lines[].quantity": "so_invoice_line.sl", "lines[].unit_price": "so_invoice_line.dj", "lines[].amount": "so_invoice_line.je",
    "lines[].tax_rate": "so_invoice_line.slv", "lines[].tax_amount": "so_invoice_line.se"}');
select scm.put_source('acme', p_document_label => '采购单',
  p_on_order => 'acme.on_order(scm.order_result)', p_on_asn => 'acme.on_asn(scm.asn_delivery)',
  p_field_names => '{"reference": "po_head.cgdh", "po_no": "po_head.cgdh", "currency": "po_head.bz", "order_date": "po_head.cgrq",
    "supplier.code": "gys.gysbh", "supplier.name": "gys.gysmc", "supplier.tax_id": "gys.gyssh",
    "lines[].line_no": "po_line.hh", "lines[].material_code": "po_line.wlbm", "lines[].material_name": "po_line.wlmc",
    "lines[].quantity": "po_line.sl", "lines[].unit": "po_line.dw", "lines[].price": "po_line.dj",
    "lines[].tax_rate": "po_line.slv", "lines[].delivery_date": "po_line.jhrq"}');
