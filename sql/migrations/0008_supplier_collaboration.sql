-- 0008 — reserved for supplier collaboration (issue 4); its branch replaces this file.
create schema if not exists erp;
comment on schema erp is 'The ERP''s own documents (the reference model erp-cloud reacts to): customers, settlements, shipments, invoices, suppliers, purchase orders, ASNs, users.';
