/** The few HTML pages the provider shows people (errors, "start from the ERP", logout). No scripts, no external assets. */

export function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** A complete page; `body` is trusted HTML (escape every value with esc). */
export function htmlPage(title: string, body: string): string {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em;line-height:1.5}
.error{color:#a40000}button,.button{font-size:1em;padding:.4em 1em;margin:.3em .3em 0 0}</style>
</head><body>${body}</body></html>`;
}
