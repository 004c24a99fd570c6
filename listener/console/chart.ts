/**
 * The overview's chart: deliveries and failures per minute as an inline SVG
 * drawn on the server (no script, no chart package). One column per minute:
 * delivered stacked under failed.
 */
import { html, type Html } from './html.js';

export interface MinuteCount {
  minute: Date;
  delivered: number;
  failed: number;
}

export interface ChartLabels {
  title: string;
  delivered: string;
  failed: string;
  start: string;
  end: string;
}

export function minuteChart(counts: MinuteCount[], from: Date, to: Date, labels: ChartLabels): Html {
  const W = 720;
  const H = 140;
  const top = 18;
  const bottom = 20;
  const left = 36;
  const plotW = W - left - 8;
  const plotH = H - top - bottom;
  const minutes = Math.max(1, Math.round((to.getTime() - from.getTime()) / 60_000));
  const byMinute = new Map<number, MinuteCount>();
  for (const c of counts) byMinute.set(Math.floor((c.minute.getTime() - from.getTime()) / 60_000), c);
  const max = Math.max(1, ...counts.map((c) => c.delivered + c.failed));
  const colW = plotW / minutes;
  const bars: Html[] = [];
  for (const [i, c] of byMinute) {
    if (i < 0 || i >= minutes) continue;
    const x = left + i * colW;
    const hOk = (c.delivered / max) * plotH;
    const hBad = (c.failed / max) * plotH;
    const w = Math.max(1, colW - 0.5).toFixed(2);
    if (c.delivered) bars.push(html`<rect class="ok" x="${x.toFixed(2)}" y="${(top + plotH - hOk).toFixed(2)}" width="${w}" height="${hOk.toFixed(2)}"><title>${c.minute.toISOString()}: ${c.delivered} ${labels.delivered}</title></rect>`);
    if (c.failed) bars.push(html`<rect class="bad" x="${x.toFixed(2)}" y="${(top + plotH - hOk - hBad).toFixed(2)}" width="${w}" height="${hBad.toFixed(2)}"><title>${c.minute.toISOString()}: ${c.failed} ${labels.failed}</title></rect>`);
  }
  const total = counts.reduce((a, c) => ({ d: a.d + c.delivered, f: a.f + c.failed }), { d: 0, f: 0 });
  return html`<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${labels.title}" xmlns="http://www.w3.org/2000/svg">
  <text x="${left}" y="12" class="legend">${labels.title} — <tspan class="ok">■ ${labels.delivered} ${total.d}</tspan> <tspan class="bad">■ ${labels.failed} ${total.f}</tspan></text>
  <line x1="${left}" y1="${top + plotH}" x2="${left + plotW}" y2="${top + plotH}" class="axis"/>
  <line x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}" class="axis"/>
  <text x="${left - 4}" y="${top + 8}" class="tick" text-anchor="end">${max}</text>
  <text x="${left - 4}" y="${top + plotH}" class="tick" text-anchor="end">0</text>
  <text x="${left}" y="${H - 4}" class="tick">${labels.start}</text>
  <text x="${left + plotW}" y="${H - 4}" class="tick" text-anchor="end">${labels.end}</text>
  ${bars}
</svg>`;
}
