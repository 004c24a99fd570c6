-- 0009 — reserved for single sign-on (issue 5); its branch replaces this file.
create schema if not exists erp;
comment on schema erp is 'The ERP''s own documents (the reference model erp-cloud reacts to): customers, settlements, shipments, invoices, suppliers, purchase orders, ASNs, users.';
