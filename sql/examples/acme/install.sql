-- acme: an ERP that is not ours, connected to erp-cloud's e-invoicing through the public contracts only.
-- Version 1. Idempotent: `erp-cloud migrate --with-example acme`, or `psql -1 -f install.sql` as a superuser.
-- Pinyin names: 客户 customer (khbh 编号, khmc 名称, khsh 税号, dz 地址, dh 电话, khh 开户行, zh 账号, yx 邮箱,
-- bjyz 不校验校验位); 销售开票单 so_invoice_head (djbh 单据编号, fplx 01 专票 | 02 普票, zt 0 录入 | 1 审核 | 9 作废,
-- bz 备注, kpzt 开票状态, fphm 发票号码, kprq 开票日期, cwxx 错误信息); lines (hh 行号, spmc 商品名称, ssbm 税收编码,
-- ggxh 规格型号, dw 单位, sl 数量, dj 单价, je 含税金额, slv 税率, se 税额); so_invoice_fp one row per invoice part
-- (xh 序号); 红冲单 so_red_head (hcdh 红冲单号, hh 行号, yy 原因 1 销货退回 | 2 开票有误 | 3 服务中止 | 4 销售折让).
-- kpzt: Q 已提交, K 开票中, Y 已开票, S 失败, H 已红冲, B 部分红冲.

-- The ERP's owner role: owns the schema and runs the trigger and the callback (erp-cloud refuses a callback
-- owned by a superuser). Member of erp_cloud_app: that is what lets it call tax.enqueue_* and read tax.*_status.
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
comment on schema acme is 'The acme example ERP (sql/examples/acme): pinyin tables, its own status codes, e-invoicing through tax.* contracts.';
set role acme_owner;

-- Tables: the ERP's own. erp-cloud never reads them; the trigger hands it a document, the callback writes back.
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
-- (so a second call is harmless). Short, no network, and a lock wait gives up after 2 s: a failure is
-- kept in tax.callback_failure and tax.replay_callbacks('acme') calls it again.
create or replace function acme.on_invoice(r tax.invoice_result) returns void
  language plpgsql security definer set search_path = '' set lock_timeout = '2s' as $$
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
revoke execute on all functions in schema acme from public;
reset role;

-- Registration: the callback, the buyer re-read, and how acme calls the document's fields (messages use these names).
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
