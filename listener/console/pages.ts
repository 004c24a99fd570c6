/**
 * The console's pages, rendered on the server from rows the SQL API returned.
 * Presentation only: labels, layout, which button a role sees. Whether an
 * action is allowed, and what it does, is the database's decision.
 */
import { minuteChart } from './chart.js';
import { html, raw, type Html } from './html.js';
import { t, type Lang, type LabelKey, hasLabel } from './i18n.js';

// rows as the SQL API returns them
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Row = Record<string, any>;

export type ConsoleRole = 'operator' | 'finance';

export interface PageContext {
  lang: Lang;
  login: string;
  name: string;
  role: ConsoleRole | null;
  csrf: string;
  timeZone: string;
  /** the path and query of this page (where an action returns to) */
  here: string;
  flash: { ok: boolean; text: string } | null;
}

const NAV: Array<[string, LabelKey]> = [['/', 'overview'], ['/documents', 'documents'], ['/attention', 'attention'], ['/procurement', 'procurement'], ['/settings', 'settings']];

export function formatTime(v: unknown, timeZone: string): string {
  if (v === null || v === undefined) return '';
  const d = v instanceof Date ? v : new Date(String(v));
  if (Number.isNaN(d.getTime())) return String(v);
  return new Intl.DateTimeFormat('sv-SE', { timeZone, year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' }).format(d);
}

function label(lang: Lang, key: string, fallback = key): string {
  return hasLabel(key) ? t(lang, key) : fallback;
}

function statusBadge(lang: Lang, status: string | null): Html {
  if (!status) return html``;
  return html`<span class="badge s-${status}">${label(lang, status, status)}</span>`;
}

export function layout(ctx: PageContext, titleKey: LabelKey, body: Html | Html[]): string {
  const other = ctx.lang === 'zh' ? 'en' : 'zh';
  const langUrl = new URL(ctx.here, 'http://console.invalid');
  langUrl.searchParams.set('lang', other);
  const langHref = `${langUrl.pathname}${langUrl.search}`;
  const active = (href: string) => (href === '/' ? ctx.here === '/' || ctx.here.startsWith('/?') : ctx.here.startsWith(href));
  return `<!DOCTYPE html>
${html`<html lang="${ctx.lang === 'zh' ? 'zh-CN' : 'en'}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${t(ctx.lang, titleKey)} · ${t(ctx.lang, 'title')}</title>
<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script>
</head><body>
<header><span class="brand">${t(ctx.lang, 'title')}</span>
<nav>${ctx.role ? NAV.map(([href, key]) => html`<a href="${href}" class="${active(href) ? 'active' : ''}">${t(ctx.lang, key)}</a>`) : ''}</nav>
<span class="who"><a class="lang" href="${langHref}">${t(ctx.lang, 'language')}</a>
${t(ctx.lang, 'signedInAs')}: <strong>${ctx.name}</strong> (${ctx.login}${ctx.role ? html`, <span class="role">${t(ctx.lang, ctx.role === 'operator' ? 'role_operator' : 'role_finance')}</span>` : ''})
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="${ctx.csrf}"><button type="submit" class="link">${t(ctx.lang, 'signOut')}</button></form></span>
</header>
<main>
${ctx.flash ? html`<p class="flash ${ctx.flash.ok ? 'ok' : 'bad'}" role="status">${ctx.flash.text}</p>` : ''}
${body}
</main></body></html>`}`;
}

/** A signed-in user without a console role: this page and nothing else. */
export function noRolePage(ctx: PageContext): string {
  return layout(ctx, 'title', html`<p class="flash bad" id="no-role">${t(ctx.lang, 'noRole')}</p>`);
}

// ---------------------------------------------------------------- overview

export function overviewPage(ctx: PageContext, data: { status: Row[]; settings: Row[]; minutes: Row[]; hours: number; now: Date }): string {
  const L = (k: LabelKey, ...a: Array<string | number>) => t(ctx.lang, k, ...a);
  const from = new Date(Math.floor(data.now.getTime() / 60_000) * 60_000 - data.hours * 3_600_000 + 60_000);
  const to = new Date(Math.floor(data.now.getTime() / 60_000) * 60_000 + 60_000);
  const settingsOf = new Map(data.settings.map((s) => [s.endpoint, s]));
  const cards = data.status.map((e) => {
    const s = settingsOf.get(e.endpoint) ?? {};
    const minutes = data.minutes.filter((m) => m.endpoint === e.endpoint)
      .map((m) => ({ minute: new Date(m.minute), delivered: Number(m.delivered), failed: Number(m.failed) }));
    const counts: Array<[string, number]> = [['pending', e.pending], ['due', e.due], ['in_flight', e.in_flight], ['failed', e.failed], ['dead', e.dead], ['parked_keys', e.parked_keys]];
    const quota = s.quota_per_day || s.quota_per_month
      ? html`${s.quota_per_day ? html`${L('today')} <span class="num">${s.calls_today}</span> / ${s.quota_per_day}` : ''}
             ${s.quota_per_month ? html` · ${L('thisMonth')} <span class="num">${s.calls_this_month}</span> / ${s.quota_per_month}` : ''}`
      : html`${L('noQuota')}`;
    return html`<section class="card endpoint" data-endpoint="${e.endpoint}">
  <h2>${e.endpoint} <small>${e.provider}${e.enabled ? '' : html` · <span class="badge s-failed">${L('enabled')}: ${L('no')}</span>`}</small></h2>
  <table class="counts"><tr>${counts.map(([k]) => html`<th>${L(k as LabelKey)}</th>`)}</tr>
  <tr>${counts.map(([k, v]) => html`<td class="num ${Number(v) > 0 && (k === 'failed' || k === 'dead' || k === 'parked_keys') ? 'alert' : ''}" data-count="${k}">${v}</td>`)}</tr></table>
  <dl class="facts">
    <dt>${L('oldestPending')}</dt><dd data-fact="oldest">${e.oldest_pending_age_s === null ? '—' : html`${Number(e.oldest_pending_age_s).toFixed(1)} ${L('seconds')}`}</dd>
    <dt>${L('rateLimit')}</dt><dd>${e.rate_per_s === null ? L('unlimited') : html`${e.rate_per_s} ${L('perSecond')}, ${L('burst')} ${e.burst}`}</dd>
    <dt>${L('quota')}</dt><dd>${quota}</dd>
    <dt>${L('pause')}</dt><dd>${e.paused_until ? html`<span class="badge s-dead">${L('pausedUntil')} ${formatTime(e.paused_until, ctx.timeZone)}</span> ${e.pause_reason}` : L('notPaused')}</dd>
    <dt>${L('circuit')}</dt><dd data-fact="circuit"><span class="badge c-${e.circuit_state}">${label(ctx.lang, `circuit_${e.circuit_state}`, e.circuit_state)}</span>
      ${e.circuit_state !== 'closed' && e.circuit_opened_at ? html` ${L('since')} ${formatTime(e.circuit_opened_at, ctx.timeZone)}` : ''} ${e.circuit_reason ?? ''}</dd>
    ${e.last_error ? html`<dt>${L('lastError')}</dt><dd class="err">${e.last_error} <small>${formatTime(e.last_error_at, ctx.timeZone)}</small></dd>` : ''}
  </dl>
  ${minuteChart(minutes, from, to, { title: `${L('chartTitle')} (${L('lastHours', data.hours)})`, delivered: L('delivered'), failed: L('failed'), start: formatTime(from, ctx.timeZone).slice(11, 16), end: formatTime(to, ctx.timeZone).slice(11, 16) })}
</section>`;
  });
  return layout(ctx, 'overview', html`<h1>${L('overview')} <small class="asof">${L('asOf')} ${formatTime(data.now, ctx.timeZone)}</small></h1>
${cards.length ? cards : html`<p>${L('noEndpoints')}</p>`}`);
}

// ---------------------------------------------------------------- documents

export function searchPage(ctx: PageContext, q: string, hits: Row[] | null): string {
  const L = (k: LabelKey, ...a: Array<string | number>) => t(ctx.lang, k, ...a);
  const href = (h: Row) => (h.kind === 'tax' ? `/documents/tax/${h.key}` : h.kind === 'po' ? `/documents/po/${h.key}` : h.kind === 'asn' ? `/documents/asn/${h.key}` : `/documents/message/${h.key}`);
  return layout(ctx, 'documents', html`<h1>${L('documents')}</h1>
<form method="get" action="/documents" class="search"><input type="search" name="q" value="${q}" placeholder="${L('searchHint')}" size="60" autofocus>
<button type="submit">${L('search')}</button></form><p class="hint">${L('searchHint')}</p>
${hits === null ? '' : hits.length === 0 ? html`<p class="empty">${L('noMatch', q)}</p>` : html`<table class="list"><tr><th></th><th>${L('source')}</th><th>${L('reference')}</th></tr>
${hits.map((h) => html`<tr><td>${label(ctx.lang, `kind_${h.kind}`)}</td><td>${h.source}</td><td><a href="${href(h)}">${h.label}${h.kind === 'message' ? html` <code>${h.key}</code>` : ''}</a></td></tr>`)}</table>`}`);
}

function jsonBlock(v: unknown): Html {
  if (v === null || v === undefined || v === '') return html`<span class="muted">—</span>`;
  let text = typeof v === 'string' ? v : JSON.stringify(v, null, 2);
  if (typeof v === 'string') {
    try {
      text = JSON.stringify(JSON.parse(v), null, 2);
    } catch {
      // not JSON: as stored
    }
  }
  return html`<pre>${text}</pre>`;
}

function reasonField(ctx: PageContext, id: string): Html {
  return html`<label class="reason">${t(ctx.lang, 'reasonRequired')} <input type="text" name="reason" required minlength="2" maxlength="500" id="${id}"></label>`;
}

function hidden(ctx: PageContext): Html {
  return html`<input type="hidden" name="csrf" value="${ctx.csrf}"><input type="hidden" name="back" value="${ctx.here}">`;
}

/** The replay and skip buttons of a failed or dead message: operators only (the database refuses anyone else again). */
function messageActions(ctx: PageContext, m: Row): Html {
  if (ctx.role !== 'operator' || !['failed', 'dead', 'skipped'].includes(m.status)) return html``;
  return html`<form method="post" action="/actions/replay" class="action" data-action="replay">${hidden(ctx)}<input type="hidden" name="request_id" value="${m.request_id}">
${reasonField(ctx, `reason-replay-${m.request_id}`)} <button type="submit">${t(ctx.lang, 'replay')}</button></form>
${m.status !== 'skipped' ? html`<form method="post" action="/actions/skip" class="action" data-action="skip">${hidden(ctx)}<input type="hidden" name="request_id" value="${m.request_id}">
${reasonField(ctx, `reason-skip-${m.request_id}`)} <button type="submit" class="secondary">${t(ctx.lang, 'skip')}</button></form>` : ''}`;
}

/** Requery (outcome unknown) or reissue after correction (refused): operators and finance. */
function invoiceActions(ctx: PageContext, inv: Row, buyer: Row | null): Html {
  if (!ctx.role || inv.status !== 'failed') return html``;
  if (inv.outcome === 'unknown') {
    return html`<form method="post" action="/actions/requery" class="action" data-action="requery">${hidden(ctx)}<input type="hidden" name="invoice_id" value="${inv.invoice_id}">
${reasonField(ctx, `reason-requery-${inv.invoice_id}`)} <button type="submit">${t(ctx.lang, 'requery')}</button></form>`;
  }
  if (inv.outcome !== 'refused' || !buyer) return html``;
  const f = (name: string, key: LabelKey, value: unknown) => html`<label>${t(ctx.lang, key)} <input type="text" name="${name}" value="${value ?? ''}"></label>`;
  return html`<form method="post" action="/actions/reissue" class="action reissue" data-action="reissue">${hidden(ctx)}<input type="hidden" name="invoice_id" value="${inv.invoice_id}">
<fieldset><legend>${t(ctx.lang, 'buyer')}</legend>
${f('buyer_name', 'name', buyer.buyer_name)} ${f('buyer_tax_id', 'buyerTaxId', buyer.buyer_tax_id)} ${f('buyer_address', 'address', buyer.buyer_address)}
${f('buyer_phone', 'phone', buyer.buyer_phone)} ${f('buyer_bank_name', 'bankName', buyer.buyer_bank_name)} ${f('buyer_account', 'bankAccount', buyer.buyer_account)}
${f('buyer_email', 'email', buyer.buyer_email)}</fieldset>
${reasonField(ctx, `reason-reissue-${inv.invoice_id}`)}
<button type="submit" name="use" value="form">${t(ctx.lang, 'reissue')}</button> <button type="submit" name="use" value="erp" class="secondary">${t(ctx.lang, 'reissueFromErp')}</button></form>`;
}

export function adviceFor(lang: Lang, x: Row): string {
  if (x.outcome === 'refused' && x.original_invoice_id) return t(lang, 'advice_red_refused', [x.error_code, x.error_message].filter(Boolean).join(' '));
  if (x.outcome === 'refused') return t(lang, 'advice_refused', [x.error_code, x.error_message].filter(Boolean).join(' '));
  if (x.outcome === 'unknown') return t(lang, 'advice_unknown', x.error_code ?? '');
  if (x.status === 'failed') return t(lang, 'advice_failed');
  if (x.status === 'dead') return t(lang, 'advice_dead');
  return '';
}

function messagesTable(ctx: PageContext, messages: Row[], attempts: Row[]): Html {
  const L = (k: LabelKey) => t(ctx.lang, k);
  if (!messages.length) return html`<p class="muted">—</p>`;
  return html`${messages.map((m) => {
    const mine = attempts.filter((a) => a.request_id === m.request_id);
    return html`<div class="message" data-request-id="${m.request_id}" data-status="${m.status}">
<h4><code>${m.operation}</code> → ${m.endpoint} ${statusBadge(ctx.lang, m.status)} <small><a href="/documents/message/${m.request_id}">${m.request_id}</a> · ${formatTime(m.created_at, ctx.timeZone)}</small></h4>
${m.last_error && m.status !== 'sent' ? html`<p class="err">${m.last_error}</p>` : ''}${adviceFor(ctx.lang, m) ? html`<p class="advice">${adviceFor(ctx.lang, m)}</p>` : ''}
${messageActions(ctx, m)}
${mine.length ? html`<table class="list attempts"><tr><th>${L('attempt')}</th><th>${L('started')}</th><th>${L('duration')}</th><th>${L('outcome')}</th><th>${L('httpStatus')}</th><th>${L('error')}</th><th></th></tr>
${mine.map((a) => html`<tr><td class="num">${a.attempt}${a.late ? ' *' : ''}</td><td>${formatTime(a.started_at, ctx.timeZone)}</td><td class="num">${a.duration_ms === null ? '' : `${Number(a.duration_ms).toFixed(0)} ms`}</td>
<td><span class="badge o-${a.outcome}">${a.outcome}</span></td><td class="num">${a.http_status ?? ''}</td><td>${a.error_class ?? ''} ${a.error_message ?? ''}</td>
<td><details><summary>${L('request')} / ${L('response')}</summary><div class="io"><div><h5>${L('request')}</h5><p><code>${a.method ?? ''} ${a.url ?? ''}</code></p>${jsonBlock(a.request_headers)}${jsonBlock(a.request_body)}</div>
<div><h5>${L('response')}</h5>${jsonBlock(a.response_headers)}${jsonBlock(a.response_body)}</div></div></details></td></tr>`)}</table>` : ''}
</div>`;
  })}`;
}

function auditTable(ctx: PageContext, audit: Row[]): Html {
  if (!audit.length) return html``;
  const L = (k: LabelKey) => t(ctx.lang, k);
  return html`<h3>${L('audit')}</h3><table class="list audit"><tr><th>${L('when')}</th><th>${L('who')}</th><th>${L('action')}</th><th>${L('reason')}</th><th></th></tr>
${audit.map((a) => html`<tr><td>${formatTime(a.at, ctx.timeZone)}</td><td>${a.who}</td><td>${label(ctx.lang, `action_${a.action}`, a.action)}</td><td>${a.reason}</td><td><code>${a.target}</code></td></tr>`)}</table>`;
}

export interface TaxDocumentData {
  doc: Row;
  invoices: Row[];
  reds: Row[];
  events: Row[];
  messages: Row[];
  attempts: Row[];
  audit: Row[];
  buyers: Map<string, Row>;
}

function invoiceCard(ctx: PageContext, inv: Row, d: TaxDocumentData, red: boolean): Html {
  const L = (k: LabelKey) => t(ctx.lang, k);
  const id = String(inv.invoice_id);
  const msgs = d.messages.filter((m) => m.aggregate_id === id);
  const events = d.events.filter((e) => String(e.invoice_id) === id);
  return html`<section class="card invoice" data-invoice-id="${id}" data-status="${inv.status}">
<h3>${red ? L('reverses') : L('invoice')} #${id}${red ? html` ← #${inv.original_invoice_id}` : html` · ${L('part')} ${inv.part_no}/${inv.part_count}`} ${statusBadge(ctx.lang, inv.status)}</h3>
<dl class="facts">
<dt>${L('invoiceNo')}</dt><dd class="invoice-no">${inv.invoice_no ?? '—'}</dd>
<dt>${L('invoiceDate')}</dt><dd>${formatTime(inv.invoice_date, ctx.timeZone)}</dd>
<dt>${L('amount')}</dt><dd class="num">${inv.amount_incl_tax}</dd>
${red ? html`<dt>${L('reason')}</dt><dd>${inv.reason} ${inv.reference ? html`<code>${inv.reference}</code>` : ''}</dd>` : html`<dt>${L('buyer')}</dt><dd>${inv.buyer_name} <code>${inv.buyer_tax_id ?? ''}</code></dd>`}
${inv.error_code || inv.error_message ? html`<dt>${L('error')}</dt><dd class="err">${inv.error_code ?? ''} ${inv.error_message ?? ''}</dd>` : ''}
</dl>
${inv.status === 'failed' ? html`<p class="advice">${adviceFor(ctx.lang, inv)}</p>` : ''}
${invoiceActions(ctx, inv, d.buyers.get(id) ?? null)}
${inv.pdf_attachment_id ? html`<p class="files"><a href="/invoices/${id}/pdf" target="_blank">${L('pdf')}</a>${inv.ofd_url ? html` · <a href="${inv.ofd_url}" rel="noreferrer">${L('ofd')}</a>` : ''}${inv.xml_url ? html` · <a href="${inv.xml_url}" rel="noreferrer">${L('xml')}</a>` : ''}</p>
<iframe class="pdf" loading="lazy" src="/invoices/${id}/pdf" title="${L('pdf')} ${inv.invoice_no ?? id}"></iframe>` : inv.ofd_url || inv.xml_url ? html`<p class="files">${inv.ofd_url ? html`<a href="${inv.ofd_url}" rel="noreferrer">${L('ofd')}</a>` : ''} ${inv.xml_url ? html`<a href="${inv.xml_url}" rel="noreferrer">${L('xml')}</a>` : ''}</p>` : ''}
${events.length ? html`<h4>${L('writeBacks')}</h4><ul class="events">${events.map((e) => html`<li>${formatTime(e.changed_at, ctx.timeZone)} — ${L('numberChanged')}: ${e.old_invoice_no ?? '∅'} → ${e.new_invoice_no ?? '∅'} (${label(ctx.lang, e.invoice_status, e.invoice_status)}, ${e.changed_by})</li>`)}</ul>` : ''}
${inv.responses && Object.keys(inv.responses).length ? html`<details><summary>${L('cloudAnswers')}</summary>${jsonBlock(inv.responses)}</details>` : ''}
<h4>${L('messages')}</h4>
${messagesTable(ctx, msgs, d.attempts)}
</section>`;
}

export function taxDocumentPage(ctx: PageContext, d: TaxDocumentData): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  return layout(ctx, 'documents', html`<h1>${label(ctx.lang, 'kind_tax')} <code>${d.doc.reference}</code> <small>${L('source')}: ${d.doc.source} · ${formatTime(d.doc.received_at, ctx.timeZone)}</small></h1>
<h2>${L('invoices')}</h2>
${d.invoices.map((inv) => invoiceCard(ctx, inv, d, false))}
${d.reds.length ? html`<h2>${L('redInvoices')}</h2>${d.reds.map((inv) => invoiceCard(ctx, inv, d, true))}` : ''}
${auditTable(ctx, d.audit)}`);
}

export function messagePage(ctx: PageContext, m: Row | null, requestId: string, attempts: Row[], audit: Row[]): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  const link = m?.aggregate_type === 'tax.invoice' ? `/invoices/${m.aggregate_id}` : m?.aggregate_type === 'scm.purchase_order' ? `/documents/po/${m.aggregate_id}` : null;
  return layout(ctx, 'documents', html`<h1>${L('message')} <code>${requestId}</code></h1>
${m ? html`<p>${L('aggregate')}: ${m.aggregate_type ?? '—'} ${m.aggregate_id ?? ''} ${link ? html`<a href="${link}">${L('openDocument')}</a>` : ''}</p>` : ''}
${messagesTable(ctx, m ? [m] : [{ request_id: requestId, operation: attempts[0]?.operation ?? '', endpoint: attempts[0]?.endpoint ?? '', status: null }], attempts)}
${auditTable(ctx, audit)}`);
}

export function orderPage(ctx: PageContext, po: Row, asns: Row[], messages: Row[], attempts: Row[], audit: Row[]): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  return layout(ctx, 'procurement', html`<h1>${L('kind_po')} <code>${po.po_no}</code> <small>${L('source')}: ${po.source} · ${po.reference}</small></h1>
<section class="card"><dl class="facts"><dt>${L('supplier')}</dt><dd>${po.supplier_code}</dd><dt>${L('state')}</dt><dd>${label(ctx.lang, po.state, po.state)}</dd>
<dt>${L('cloudStatus')}</dt><dd>${statusBadge(ctx.lang, po.cloud_status)} ${po.cloud_ref ?? ''}</dd>${po.cloud_error ? html`<dt>${L('cloudError')}</dt><dd class="err">${po.cloud_error}</dd>` : ''}
<dt>${L('syncedAt')}</dt><dd>${formatTime(po.synced_at, ctx.timeZone)}</dd></dl>
<details><summary>${L('lines')}</summary>${jsonBlock(po.lines)}</details></section>
<h2>${L('asns')}</h2>${asnTable(ctx, asns)}
<h2>${L('messages')}</h2>${messagesTable(ctx, messages, attempts)}
${auditTable(ctx, audit)}`);
}

export function asnPage(ctx: PageContext, a: Row): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  return layout(ctx, 'procurement', html`<h1>${L('kind_asn')} <code>${a.asn_no}</code> <small>${a.supplier_code} · ${L('kind_po')} ${a.po_no}</small></h1>
<section class="card"><dl class="facts"><dt>${L('status')}</dt><dd>${statusBadge(ctx.lang, a.status)}</dd>
<dt>${L('receivedVia')}</dt><dd>${label(ctx.lang, `via_${a.received_via}`, a.received_via)}</dd><dt>${L('receivedAt')}</dt><dd>${formatTime(a.received_at, ctx.timeZone)}</dd>
${a.reject_reason ? html`<dt>${L('rejectReason')}</dt><dd class="err">${a.reject_code} ${a.reject_reason}</dd>` : ''}
${a.delivery_error ? html`<dt>${L('error')}</dt><dd class="err">${a.delivery_error}</dd>` : ''}</dl>
<details open><summary>${L('lines')}</summary>${jsonBlock(a.lines)}</details></section>`);
}

function asnTable(ctx: PageContext, asns: Row[]): Html {
  const L = (k: LabelKey) => t(ctx.lang, k);
  if (!asns.length) return html`<p class="muted">—</p>`;
  return html`<table class="list asns"><tr><th>${L('asnNo')}</th><th>${L('supplier')}</th><th>${L('poNo')}</th><th>${L('status')}</th><th>${L('receivedVia')}</th><th>${L('receivedAt')}</th><th>${L('rejectReason')}</th></tr>
${asns.map((a) => html`<tr><td><a href="/documents/asn/${a.asn_id}">${a.asn_no}</a></td><td>${a.supplier_code}</td><td>${a.po_no ?? ''}</td><td>${statusBadge(ctx.lang, a.status)}</td>
<td>${label(ctx.lang, `via_${a.received_via}`, a.received_via)}</td><td>${formatTime(a.received_at, ctx.timeZone)}</td><td class="err">${a.reject_reason ?? ''}${a.delivery_error ? ` ${a.delivery_error}` : ''}</td></tr>`)}</table>`;
}

function moreLink(ctx: PageContext, rows: Row[], key: string, param: string, size: number): Html {
  if (rows.length < size) return html``;
  const u = new URL(ctx.here, 'http://x');
  u.searchParams.set(param, String(rows[rows.length - 1]![key]));
  return html`<p><a class="more" href="${u.pathname}${u.search}">${t(ctx.lang, 'more')}</a></p>`;
}

// ---------------------------------------------------------------- needs attention

export function attentionPage(ctx: PageContext, messages: Row[], invoices: Row[], reds: Row[], buyers: Map<string, Row>, size: number): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  return layout(ctx, 'attention', html`<h1>${L('attention')}</h1>
<h2>${L('refusedInvoices')}</h2>
${invoices.length ? invoices.map((inv) => html`<section class="card invoice" data-invoice-id="${inv.invoice_id}" data-outcome="${inv.outcome}">
<h3><a href="/documents/tax/${inv.document_id}">${inv.reference}</a> <small>${inv.source} · ${L('invoice')} #${inv.invoice_id} · ${L('part')} ${inv.part_no}/${inv.part_count}</small> ${statusBadge(ctx.lang, inv.status)}</h3>
<p>${L('buyer')}: ${inv.buyer_name} <code>${inv.buyer_tax_id ?? ''}</code> · ${L('amount')} ${inv.amount_incl_tax}</p>
<p class="advice">${adviceFor(ctx.lang, inv)}</p>
${invoiceActions(ctx, inv, buyers.get(String(inv.invoice_id)) ?? null)}
</section>`) : html`<p class="empty">${L('nothingToDo')}</p>`}
${moreLink(ctx, invoices, 'invoice_id', 'invoices_before', size)}
${reds.length ? html`<h2>${L('refusedRedInvoices')}</h2>
${reds.map((inv) => html`<section class="card invoice red" data-invoice-id="${inv.invoice_id}" data-outcome="${inv.outcome}">
<h3><a href="/documents/tax/${inv.document_id}">${inv.original_reference}</a> <small>${inv.source} · ${L('reverses')} #${inv.original_invoice_id} · ${inv.reference ?? ''}</small> ${statusBadge(ctx.lang, inv.status)}</h3>
<p>${L('reason')}: ${inv.reason} · ${L('amount')} ${inv.amount_incl_tax}</p>
<p class="advice">${adviceFor(ctx.lang, inv)}</p>
${invoiceActions(ctx, inv, null)}
</section>`)}${moreLink(ctx, reds, 'invoice_id', 'reds_before', size)}` : ''}
<h2>${L('failedMessages')}</h2>
${messages.length ? html`<table class="list messages"><tr><th>${L('message')}</th><th>${L('endpoint')}</th><th>${L('operation')}</th><th>${L('status')}</th><th>${L('attempts')}</th><th>${L('lastError')}</th><th></th></tr>
${messages.map((m) => html`<tr class="message" data-request-id="${m.request_id}" data-status="${m.status}"><td><a href="/documents/message/${m.request_id}"><code class="rid">${m.request_id}</code></a></td><td>${m.endpoint}</td><td><code>${m.operation}</code></td>
<td>${statusBadge(ctx.lang, m.status)}</td><td class="num">${m.attempts}</td><td><span class="err">${m.last_error ?? ''}</span><br><small class="advice">${adviceFor(ctx.lang, m)}</small></td><td>${messageActions(ctx, m)}</td></tr>`)}</table>` : html`<p class="empty">${L('nothingToDo')}</p>`}
${moreLink(ctx, messages, 'id', 'messages_before', size)}`);
}

// ---------------------------------------------------------------- procurement

export function procurementPage(ctx: PageContext, orders: Row[], asns: Row[], quarantine: Row[], size: number): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  return layout(ctx, 'procurement', html`<h1>${L('procurement')}</h1>
<h2>${L('orders')}</h2>
${orders.length ? html`<table class="list orders"><tr><th>${L('poNo')}</th><th>${L('reference')}</th><th>${L('supplier')}</th><th>${L('state')}</th><th>${L('cloudStatus')}</th><th>${L('cloudError')}</th><th>${L('syncedAt')}</th></tr>
${orders.map((o) => html`<tr><td><a href="/documents/po/${o.order_id}">${o.po_no}</a></td><td>${o.source} · ${o.reference}</td><td>${o.supplier_code}</td><td>${label(ctx.lang, o.state, o.state)}</td><td>${statusBadge(ctx.lang, o.cloud_status)}</td><td class="err">${o.cloud_error ?? ''}</td><td>${formatTime(o.synced_at, ctx.timeZone)}</td></tr>`)}</table>` : html`<p class="muted">—</p>`}
${moreLink(ctx, orders, 'order_id', 'orders_before', size)}
<h2>${L('asns')}</h2>${asnTable(ctx, asns)}${moreLink(ctx, asns, 'asn_id', 'asns_before', size)}
<h2>${L('quarantine')}</h2>
${quarantine.length ? html`<table class="list quarantine"><tr><th>#</th><th>${L('source')}</th><th>${L('sqlstate')}</th><th>${L('reason')}</th><th>${L('receivedAt')}</th></tr>
${quarantine.map((q) => html`<tr><td>${q.id}</td><td>${q.source}${q.event_id ? html` <code>${q.event_id}</code>` : ''}</td><td><code>${q.sqlstate}</code></td><td class="err">${q.reason}</td><td>${formatTime(q.received_at, ctx.timeZone)}</td></tr>`)}</table>` : html`<p class="muted">—</p>`}
${moreLink(ctx, quarantine, 'id', 'quarantine_before', size)}`);
}

// ---------------------------------------------------------------- settings

export function settingsPage(ctx: PageContext, endpoints: Row[], users: Row[], taxSources: Row[], scmSources: Row[]): string {
  const L = (k: LabelKey) => t(ctx.lang, k);
  const list = (v: unknown) => (Array.isArray(v) && v.length ? v.join(', ') : '—');
  return layout(ctx, 'settings', html`<h1>${L('settings')}</h1><p class="hint">${L('noSecrets')}</p>
<h2>${L('endpoints')}</h2>
<table class="list settings"><tr><th>${L('endpoint')}</th><th>${L('provider')}</th><th>${L('baseUrl')}</th><th>${L('timeout')}</th><th>${L('maxAttempts')}</th><th>${L('backoff')}</th><th>${L('rateLimit')}</th><th>${L('circuitSettings')}</th><th>${L('quota')}</th><th>${L('allowlist')}</th><th>${L('downloadHosts')}</th></tr>
${endpoints.map((e) => html`<tr><td>${e.endpoint}${e.enabled ? '' : html` <span class="badge s-failed">${L('enabled')}: ${L('no')}</span>`}</td><td>${e.provider}</td><td><code>${e.base_url}</code></td>
<td class="num">${e.timeout_ms} ms</td><td class="num">${e.max_attempts}</td><td>${e.backoff_base_ms}–${e.backoff_cap_ms} ms</td>
<td>${e.rate_per_s === null ? L('unlimited') : `${e.rate_per_s} ${L('perSecond')}, ${L('burst')} ${e.burst}`}</td>
<td>${e.circuit_threshold} / ${e.circuit_window}, ${e.circuit_failure_ratio}, ${e.circuit_cooldown_ms} ms</td>
<td>${e.quota_per_day ?? '—'} / ${e.quota_per_month ?? '—'} (${e.quota_time_zone})</td>
<td>${list(e.allow_hosts)}; ${list(e.allow_cidrs)}${e.allow_private ? html`; ${L('privateAllowed')}` : ''}</td><td>${list(e.download_hosts)}</td></tr>`)}</table>
<h2>${L('sources')}</h2><ul>${taxSources.map((s) => html`<li>tax: ${s.name} (${s.document_label})</li>`)}${scmSources.map((s) => html`<li>scm: ${s.name} (${s.document_label})</li>`)}</ul>
<h2>${L('consoleUsers')}</h2>
<table class="list users"><tr><th>${L('login')}</th><th>${L('role')}</th><th>${L('grantedAt')}</th></tr>
${users.map((u) => html`<tr><td>${u.login}</td><td>${t(ctx.lang, u.role === 'operator' ? 'role_operator' : 'role_finance')}</td><td>${formatTime(u.granted_at, ctx.timeZone)} (${u.granted_by})</td></tr>`)}</table>`);
}

export function errorPage(ctx: PageContext, status: number, text: string): string {
  return layout(ctx, 'title', html`<p class="flash bad">${status} — ${text}</p>`);
}

export { raw };
