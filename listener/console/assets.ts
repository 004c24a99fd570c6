/** The console's stylesheet and its little script, served from memory (/static/…): no build step, no external assets. */
export const CONSOLE_CSS = `
:root{--fg:#1d2733;--muted:#66707c;--line:#d9dee4;--bg:#f5f7f9;--ok:#2e7d32;--bad:#c62828;--warn:#ef6c00;--accent:#0b5cad}
*{box-sizing:border-box}
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;color:var(--fg);background:var(--bg);font-size:14px;line-height:1.45}
header{display:flex;flex-wrap:wrap;align-items:center;gap:1em;background:#16324f;color:#fff;padding:.6em 1.2em}
header a{color:#dbe8f6;text-decoration:none}
header .brand{font-weight:600;font-size:1.1em}
header nav a{margin-right:1em;padding:.2em .1em}
header nav a.active{color:#fff;border-bottom:2px solid #8ec5ff}
header .who{margin-left:auto;font-size:.92em}
header .who .lang{margin-right:1em;border:1px solid #5d7fa3;border-radius:3px;padding:0 .4em}
form.inline{display:inline}
button.link{background:none;border:0;color:#dbe8f6;cursor:pointer;text-decoration:underline;padding:0;font:inherit}
main{padding:1em 1.2em;max-width:1400px}
h1{font-size:1.4em;margin:.2em 0 .6em}
h1 small,h2 small,h3 small{color:var(--muted);font-weight:normal;font-size:.7em}
h2{font-size:1.15em;margin:1.2em 0 .5em}
h3{font-size:1.02em;margin:.2em 0 .5em}
h4{font-size:.95em;margin:.8em 0 .3em}
.card{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.8em 1em;margin:0 0 1em}
.endpoint{display:grid;grid-template-columns:minmax(380px,1fr) minmax(380px,1.4fr);gap:.4em 1.5em}
.endpoint h2{grid-column:1/-1;margin:0}
.endpoint .chart{grid-column:2;grid-row:2/4;width:100%;height:auto}
table{border-collapse:collapse}
table.counts th{font-weight:normal;color:var(--muted);font-size:.85em;padding:0 .8em 0 0;text-align:left}
table.counts td{font-size:1.5em;padding:0 .8em 0 0}
td.alert{color:var(--bad);font-weight:600}
table.list{width:100%;background:#fff;border:1px solid var(--line)}
table.list th,table.list td{border-bottom:1px solid var(--line);padding:.35em .5em;text-align:left;vertical-align:top}
table.list th{background:#eef2f6;font-weight:600;font-size:.9em}
.num{font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.3em 0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
.badge{display:inline-block;padding:0 .45em;border-radius:3px;font-size:.85em;background:#e3e8ee}
.s-sent,.s-issued,.s-published,.s-accepted,.s-delivered,.o-ok,.c-closed{background:#dff0e0;color:var(--ok)}
.s-failed,.s-dead,.s-rejected,.s-undeliverable,.o-permanent,.c-open{background:#fde2e1;color:var(--bad)}
.s-pending,.s-in_flight,.s-issuing,.s-queued,.o-retryable,.c-half_open{background:#fff0db;color:var(--warn)}
.err{color:var(--bad)}
.advice{background:#fff8e5;border-left:3px solid var(--warn);padding:.3em .6em;margin:.4em 0}
.flash{padding:.6em 1em;border-radius:4px;margin:0 0 1em}
.flash.ok{background:#dff0e0;color:#1b5e20}
.flash.bad{background:#fde2e1;color:#8e0000}
.muted,.hint{color:var(--muted)}
form.action{margin:.4em 0;display:flex;flex-wrap:wrap;gap:.4em;align-items:center}
form.action label{display:inline-flex;gap:.3em;align-items:center}
form.action input[type=text]{padding:.25em .4em;border:1px solid #b8c1cb;border-radius:3px}
form.reissue fieldset{border:1px solid var(--line);display:flex;flex-wrap:wrap;gap:.4em 1em;width:100%}
button{background:var(--accent);color:#fff;border:0;border-radius:3px;padding:.35em .9em;cursor:pointer;font:inherit}
button.secondary{background:#5f6b78}
button:disabled{opacity:.5}
form.search input{padding:.4em;font-size:1em;border:1px solid #b8c1cb;border-radius:3px}
code.rid{font-size:.85em}
pre{background:#f3f5f7;border:1px solid var(--line);padding:.5em;overflow:auto;max-height:24em;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.io{display:grid;grid-template-columns:1fr 1fr;gap:1em;min-width:40em}
iframe.pdf{width:100%;height:520px;border:1px solid var(--line);background:#fff}
.message{border-top:1px dashed var(--line);padding:.4em 0}
svg.chart rect.ok,svg.chart tspan.ok{fill:#43a047}
svg.chart rect.bad,svg.chart tspan.bad{fill:#e53935}
svg.chart .axis{stroke:#9aa5b1;stroke-width:1}
svg.chart text{font-size:10px;fill:#5b6570}
svg.chart .legend{font-size:11px;fill:#1d2733}
.asof{font-size:.6em}
`;

/** Disables an action's buttons once it is sent (no double submit); everything else works without script. */
export const CONSOLE_JS = `
document.addEventListener('submit', function (e) {
  var f = e.target;
  if (!(f instanceof HTMLFormElement) || f.method.toLowerCase() !== 'post') return;
  setTimeout(function () { f.querySelectorAll('button').forEach(function (b) { b.disabled = true; }); }, 0);
});
`;
