# Part of make demo (scripts/demo.sh): the foreign-shaped example ERP acme (sql/examples/acme, installed by
# `erp-cloud migrate --with-example acme`). Its clerk approves one 销售开票单 in acme's own table (zt 0 → 1);
# acme's trigger hands the document to tax.enqueue_invoices, the listener issues it through the Nuonuo
# simulator that the invoicing part started, and acme's callback writes the invoice number, the state and
# the PDF into acme's own columns. Then its buyer approves one 采购单 in acme.po_head (zt 0 → 1): acme's
# deferred trigger hands it to scm.enqueue_order, the listener publishes it to the YonBIP simulator that the
# procurement part started, and acme.on_order writes the cloud state and order id into po_head. Prints the ERP's own rows.

acme_setup() {
# a document number of its own per run: erp-cloud keeps every (source, reference) it was given
acme_djbh="XS-$(date +%Y%m%d-%H%M%S)"
echo "== acme: a customer and the 销售开票单 $acme_djbh in acme's own tables (draft, zt 0)"
psql_ -o /dev/null <<SQL
insert into acme.customer (khbh, khmc, khsh, dz, dh, khh, zh)
values ('KH-0001', '杭州湾精工有限公司', '91330106MA2AYNWD8M', '杭州市滨江区江南大道 8 号', '0571-86860001', '招商银行杭州分行', '571900000000001')
on conflict (khbh) do nothing;
insert into acme.so_invoice_head (djbh, khbh, fplx, bz) values ('$acme_djbh', 'KH-0001', '02', '合同 HT-2026-118');
insert into acme.so_invoice_line (djbh, hh, spmc, ssbm, ggxh, dw, sl, dj, je, slv) values
  ('$acme_djbh', 1, '数控刀具', '1090613010000000000', 'DJ-40', '把', 20, 33.90, 678.00, 0.13),
  ('$acme_djbh', 2, '刀具修磨服务', '3040201030000000000', null, '次', 1, 212.00, 212.00, 0.06);
SQL
acme_cgdh="CG-$(date +%Y%m%d-%H%M%S)"
echo "== acme: a supplier and the 采购单 $acme_cgdh in acme's own tables (draft, zt 0)"
psql_ -o /dev/null <<SQL
insert into acme.gys (gysbh, gysmc, gyssh) values ('GYS-0001', '宁波精密紧固件有限公司', '91330200MA2H0000Y2') on conflict (gysbh) do nothing;
begin;
insert into acme.po_head (cgdh, gysbh, bz, dhrq) values ('$acme_cgdh', 'GYS-0001', 'CNY', current_date + 10);
insert into acme.po_line (cgdh, hh, wlbm, wlmc, sl, dw, dj, slv) values
  ('$acme_cgdh', 1, 'M-100', '六角螺栓 M8×30', 5000, 'PCS', 0.42, 0.13),
  ('$acme_cgdh', 2, 'M-300', '弹簧垫圈 8mm', 5000, 'PCS', 0.03, 0.13);
commit;
SQL
}

acme_run() {
echo "== acme: the clerk approves $acme_djbh (update acme.so_invoice_head set zt = '1')"
psql_ -c "update acme.so_invoice_head set zt = '1' where djbh = '$acme_djbh'"
wait_for "select kpzt in ('Y', 'S') and not exists (select from acme.so_invoice_fp f where f.djbh = h.djbh and f.kpzt = 'Y' and f.pdf is null)
            from acme.so_invoice_head h where djbh = '$acme_djbh'" 150 || { echo "acme FAILED: $acme_djbh not invoiced"; return 1; }
echo
echo "== acme result: the ERP's own rows, written by its callback acme.on_invoice"
psql_ -c "select djbh, khbh, zt, kpzt, fphm, kprq, coalesce(cwxx, '') as cwxx from acme.so_invoice_head where djbh = '$acme_djbh'"
psql_ -c "select djbh, xh, fphm, kprq, kpzt, length(pdf) as pdf_bytes from acme.so_invoice_fp where djbh = '$acme_djbh' order by xh"
local ok
ok=$(psql_ -tAc "select count(*) from acme.so_invoice_head h join acme.so_invoice_fp f using (djbh)
                  where h.djbh = '$acme_djbh' and h.kpzt = 'Y' and f.fphm ~ '^\d{20}$' and substr(f.pdf, 1, 5) = '%PDF-'::bytea")
[ "$ok" = 1 ] || { echo "acme FAILED: $acme_djbh has no issued invoice with its PDF in acme.so_invoice_fp"; return 1; }
echo "acme: $acme_djbh approved in acme's own table, invoiced, number and PDF written back into acme.so_invoice_fp"

echo "== acme: the buyer approves the 采购单 $acme_cgdh (update acme.po_head set zt = '1')"
psql_ -c "update acme.po_head set zt = '1' where cgdh = '$acme_cgdh'"
wait_for "select yzt in ('F', 'J', 'S') from acme.po_head where cgdh = '$acme_cgdh'" || { echo "acme FAILED: $acme_cgdh not published"; return 1; }
echo "== acme result: the 采购单 as the ERP's own row, written back by its callback acme.on_order (yzt F 已发布, yddh 云单号)"
psql_ -c "select cgdh, gysbh, zt, yzt, yddh, coalesce(ycw, '') as ycw from acme.po_head where cgdh = '$acme_cgdh'"
psql_ -c "select source, reference, po_no, state, cloud_status, cloud_ref, revision from scm.order_status where source = 'acme' and reference = '$acme_cgdh'"
if [ "$(psql_ -tAc "select yzt = 'F' and yddh is not null from acme.po_head where cgdh = '$acme_cgdh'")" = t ]; then
  echo "acme OK: $acme_djbh invoiced and $acme_cgdh published, each from acme's own tables, results in acme's own columns"
else
  echo "acme FAILED: $acme_cgdh was not published"; return 1
fi
}
