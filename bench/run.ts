/**
 * erp-cloud benchmark: `make bench` (node dist/bench/run.js, DATABASE_URL set).
 *
 * Measures, side by side in one run, on 127.0.0.1 only:
 *   1. delivery_per_s vs graphile_worker_per_s  (figures/delivery.ts)
 *   2. latency_p50_ms / latency_p99_ms           (figures/latency.ts)
 *   3. erp_insert_ratio (trigger ÷ no trigger, a busy listener in both),
 *      erp_insert_ratio_vs_quiet_baseline, naive_notify_ratio (figures/erp-insert.ts)
 *   4. claim_after_1m_ratio                      (figures/claim.ts)
 *   5. rate_limit_accuracy, rate_limit_429s      (figures/rate-limit.ts)
 *   6. invoices_per_s, approval_to_pdf_p50_ms    (figures/invoicing.ts)
 *   7. asn_search_speedup, asn_search_p50_ms     (figures/asn-search.ts)
 *   8. faults_delivery_ratio, faults_lost, faults_second_effects,
 *      faults_circuit_open_share: delivery under 30 % faults (figures/faults.ts)
 *   9. platforms.<nuonuo|baiwang>.invoices_per_s: e-invoices per second through
 *      each tax platform's simulator, same conditions (figures/baiwang.ts)
 * and writes bench/results/latest.json (and a copy, latest-quick.json or
 * latest-full.json) plus a table on stdout. Targets are
 * informational: the exit code is non-zero only when something failed.
 *
 * BENCH_QUICK=1   a reduced version of every figure (same keys, < 90 s, except
 *                 faults: 1.5 to 2 min on its own, set by its retry tail).
 * BENCH_ONLY=a,b  development aid: run only these figures (delivery, latency,
 *                 erp_insert, claim, rate_limit, invoicing, asn_search, faults, platforms); results go to bench/results/partial.json.
 *
 * The results also record which engine ran (migrations and built listener,
 * hashed) and, since the server may be shared, whether other sessions used
 * it during each figure (shared_server; a warning is printed when they did).
 *
 * Every child process and every bench_* database created is removed at the
 * end, also on failure or SIGINT/SIGTERM.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { asnSearchFigure } from './figures/asn-search.js';
import { platformsFigure } from './figures/baiwang.js';
import { claimFigure } from './figures/claim.js';
import { consoleFigure } from './figures/console.js';
import { deliveryFigure } from './figures/delivery.js';
import { erpInsertFigure } from './figures/erp-insert.js';
import { faultsFigure } from './figures/faults.js';
import { invoicingFigure } from './figures/invoicing.js';
import { latencyFigure } from './figures/latency.js';
import { rateLimitFigure } from './figures/rate-limit.js';
import type { BenchContext } from './lib/context.js';
import { machineTicks } from './lib/cpu.js';
import { adminQuery, DbRegistry } from './lib/db.js';
import { engineFingerprint } from './lib/engine.js';
import { ForeignActivityMonitor } from './lib/monitor.js';
import { killAllChildrenSync, stopAllChildren } from './lib/procs.js';
import { startSink, type Sink } from './lib/sink-client.js';
import { errText, progress, sleep, textTable } from './lib/util.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** bench/results, found from dist/bench/. */
const resultsDir = path.resolve(here, '..', '..', 'bench', 'results');

interface Target {
  key: string;
  label: string;
  /** 'in': target is [low, high], both inclusive. */
  op: '>=' | '<=' | '=' | 'in';
  target: number | [number, number] | null;
  unit: string;
}

const TARGETS: Target[] = [
  { key: 'delivery_per_s', label: 'erp-cloud delivery', op: '>=', target: null, unit: 'msg/s' },
  { key: 'graphile_worker_per_s', label: 'graphile-worker delivery', op: '>=', target: null, unit: 'msg/s' },
  { key: 'delivery_ratio', label: 'delivery ratio (erp-cloud / graphile-worker)', op: '>=', target: 1.0, unit: '' },
  { key: 'latency_p50_ms', label: 'commit-to-sink latency p50', op: '<=', target: 5, unit: 'ms' },
  { key: 'latency_p99_ms', label: 'commit-to-sink latency p99', op: '<=', target: 25, unit: 'ms' },
  { key: 'erp_insert_ratio', label: 'ERP insert tps, trigger / no trigger (busy listener in both)', op: '>=', target: 0.75, unit: '' },
  { key: 'erp_insert_ratio_vs_quiet_baseline', label: 'ERP insert tps, trigger + busy listener / no trigger, no listener', op: '>=', target: null, unit: '' },
  { key: 'erp_insert.busy_condition_held', label: 'listener verified busy throughout both of those runs', op: '>=', target: null, unit: '' },
  { key: 'erp_insert.busy_baseline_vs_quiet_ratio', label: 'ERP insert tps, no trigger: busy listener / no listener (context)', op: '>=', target: null, unit: '' },
  { key: 'erp_insert.trigger_only_ratio', label: 'ERP insert tps, trigger, no listener / no trigger, no listener (diagnostic)', op: '>=', target: null, unit: '' },
  { key: 'naive_notify_ratio', label: 'naive insert+pg_notify trigger, no listener / no trigger, no listener (context)', op: '>=', target: null, unit: '' },
  { key: 'erp_insert.listener_during_integration.notifies.from_erp_transactions', label: 'NOTIFYs sent by ERP transactions during the integration run', op: '<=', target: null, unit: '' },
  { key: 'claim_fresh_per_s', label: 'claim+record cycle, fresh database', op: '>=', target: null, unit: 'msg/s' },
  { key: 'claim_after_1m_per_s', label: 'claim+record cycle, after the push', op: '>=', target: null, unit: 'msg/s' },
  { key: 'claim_after_1m_ratio', label: 'claim cycle after 1M / fresh', op: '>=', target: 0.9, unit: '' },
  { key: 'claim_after_1m_vs_analyzed_ratio', label: 'claim cycle after 1M / fresh+ANALYZE (control)', op: '>=', target: null, unit: '' },
  { key: 'rate_limit_delivered_per_s', label: 'delivered rate, 3 listeners, endpoint limited to 50/s', op: '>=', target: null, unit: 'req/s' },
  { key: 'rate_limit_accuracy', label: 'rate-limit accuracy (delivered rate / 50)', op: 'in', target: [0.95, 1.0], unit: '' },
  { key: 'rate_limit_429s', label: '429s seen by the simulator (gateway 55/s, burst 5)', op: '=', target: 0, unit: '' },
  { key: 'invoices_per_s', label: 'e-invoices issued end to end through the Nuonuo simulator (PDF attached)', op: '>=', target: null, unit: 'inv/s' },
  { key: 'approval_to_pdf_p50_ms', label: 'settlement approval to PDF attached, p50 (first poll 200 ms, issuing 100 ms)', op: '<=', target: null, unit: 'ms' },
  { key: 'approval_to_pdf_p99_ms', label: 'settlement approval to PDF attached, p99', op: '<=', target: null, unit: 'ms' },
  { key: 'asn_search_speedup', label: 'ASN search by material + batch over 1M lines, no index / GIN index (p50)', op: '>=', target: 100, unit: '×' },
  { key: 'asn_search_p50_ms', label: 'ASN search with the GIN index, p50', op: '<=', target: 2, unit: 'ms' },
  { key: 'rate_limit_max_1s', label: 'most requests in any 1-s sliding window (limit 50/s, burst 1)', op: '<=', target: null, unit: '' },
  { key: 'healthy_delivered_per_s', label: 'delivered rate, healthy sink (2 listeners, 50/s, timeout 1 s)', op: '>=', target: null, unit: 'msg/s' },
  { key: 'faults_delivered_per_s', label: 'delivered rate, same workload, 30 % faults (503 and timeouts)', op: '>=', target: null, unit: 'msg/s' },
  { key: 'faults_delivery_ratio', label: 'delivered rate under 30 % faults / healthy (default circuit)', op: '>=', target: 0.6, unit: '' },
  { key: 'faults_lost', label: 'messages lost under faults (unsent, or sent without a 2xx)', op: '=', target: 0, unit: '' },
  { key: 'faults_second_effects', label: 'keys with more than one 2xx under faults', op: '=', target: 0, unit: '' },
  { key: 'faults_circuit_open_share', label: 'share of the faulty run with the circuit open (250-ms samples)', op: '<=', target: null, unit: '' },
  { key: 'faults_circuit_opens', label: 'times the circuit opened during the faulty run (lower bound)', op: '<=', target: null, unit: '' },
  { key: 'faults.faulty.circuit.distinct_opened_at', label: 'distinct circuit_opened_at values seen in the faulty run (re-opens between samples)', op: '<=', target: null, unit: '' },
  { key: 'faults_stream_ratio', label: 'stream (ERP commits 50/s, no rate limit): delivered rate under 30 % faults / healthy', op: '>=', target: 0.6, unit: '' },
  { key: 'faults_stream_circuit_open_share', label: 'stream: share of the faulty run with the circuit open', op: '<=', target: null, unit: '' },
  { key: 'faults_stream_circuit_opens', label: 'stream: times the circuit opened during the faulty run (lower bound)', op: '<=', target: null, unit: '' },
  { key: 'faults_stream_lost', label: 'stream: messages lost under faults', op: '=', target: 0, unit: '' },
  { key: 'faults_stream_second_effects', label: 'stream: keys with more than one 2xx under faults', op: '=', target: 0, unit: '' },
  { key: 'console_page_p50_ms', label: 'operations console, slowest page p50 (100k invoices, 1M cloud.log rows)', op: '<=', target: null, unit: 'ms' },
  { key: 'faults.faulty.per_s_to_90pct', label: 'rate to 90 % delivered under faults, without the retry tail (diagnostic)', op: '>=', target: null, unit: 'msg/s' },
  { key: 'platforms.nuonuo.invoices_per_s', label: 'e-invoices end to end through the Nuonuo simulator (platform comparison)', op: '>=', target: null, unit: 'inv/s' },
  { key: 'platforms.baiwang.invoices_per_s', label: 'e-invoices end to end through the Baiwang simulator (platform comparison)', op: '>=', target: null, unit: 'inv/s' },
];

function targetText(t: Target): string {
  if (t.target === null) return '';
  return Array.isArray(t.target) ? `${t.op} [${t.target[0]}, ${t.target[1]}]` : `${t.op} ${t.target}`;
}

/** A value from the results by dotted path ('erp_insert.trigger_only_ratio'). */
function lookup(results: Record<string, unknown>, key: string): unknown {
  let v: unknown = results;
  for (const part of key.split('.')) v = v && typeof v === 'object' ? (v as Record<string, unknown>)[part] : undefined;
  return v;
}

const FIGURES = {
  delivery: deliveryFigure,
  latency: latencyFigure,
  erp_insert: erpInsertFigure,
  claim: claimFigure,
  rate_limit: rateLimitFigure,
  invoicing: invoicingFigure,
  asn_search: asnSearchFigure,
  faults: faultsFigure,
  platforms: platformsFigure,
  console: consoleFigure,
} as const;
type FigureName = keyof typeof FIGURES;

const serverUrl = process.env.DATABASE_URL;
if (!serverUrl) {
  console.error('bench: DATABASE_URL is required (make bench sets it)');
  process.exit(2);
}
const quick = process.env.BENCH_QUICK === '1' || process.env.BENCH_QUICK === 'true';
const only = process.env.BENCH_ONLY ? (process.env.BENCH_ONLY.split(',').map((s) => s.trim()) as FigureName[]) : null;
for (const f of only ?? []) {
  if (!(f in FIGURES)) {
    console.error(`bench: unknown figure in BENCH_ONLY: ${f} (known: ${Object.keys(FIGURES).join(', ')})`);
    process.exit(2);
  }
}

const dbs = new DbRegistry(serverUrl);
let sink: Sink | null = null;
let cleaning: Promise<void> | null = null;
const monitor = new ForeignActivityMonitor(serverUrl, dbs.tag);

/** Ends every child and drops every bench database; safe to call more than once. */
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await sink?.stop().catch(() => undefined);
    await monitor.stop().catch(() => undefined);
    await stopAllChildren();
    const failed = await dbs.dropAll();
    for (const f of failed) console.error(`bench: could not drop database ${f}`);
  })();
  return cleaning;
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    progress(`${sig}: cleaning up`);
    void cleanup().finally(() => process.exit(130));
  });
}
process.on('exit', killAllChildrenSync);

async function machine(): Promise<Record<string, unknown>> {
  const { rows } = await adminQuery<{ v: string; full: string }>(serverUrl!, 'select current_setting(\'server_version\') v, version() full');
  return {
    cpus: os.cpus().length,
    cpu_model: os.cpus()[0]?.model ?? null,
    memory_gb: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    pg: rows[0]?.v ?? null,
    pg_full: rows[0]?.full ?? null,
    platform: `${os.platform()} ${os.release()}`,
  };
}

/**
 * How busy the machine is while the bench itself does nothing (1 s sample of
 * /proc/stat): anything well above 0 means another workload shared the CPUs
 * and the figures of this run are disturbed.
 */
async function backgroundBusyPct(): Promise<number | null> {
  const a = machineTicks();
  await sleep(1000);
  const b = machineTicks();
  return a && b ? Math.round((1000 * (b.busy - a.busy)) / Math.max(1, b.total - a.total)) / 10 : null;
}

function fmt(v: unknown, unit: string): string {
  if (typeof v === 'boolean') return v ? 'yes' : 'NO';
  if (typeof v !== 'number' || Number.isNaN(v)) return 'n/a';
  return `${v}${unit ? ` ${unit}` : ''}`;
}

function verdict(t: Target, v: unknown): string {
  if (t.target === null) return '';
  if (typeof v !== 'number' || Number.isNaN(v)) return 'n/a';
  const g = t.target;
  const ok = Array.isArray(g) ? v >= g[0] && v <= g[1] : t.op === '>=' ? v >= g : t.op === '<=' ? v <= g : v === g;
  return ok ? 'pass' : 'FAIL';
}

async function main(): Promise<number> {
  const started = Date.now();
  const results: Record<string, unknown> = {
    date: new Date().toISOString(),
    quick,
    machine: await machine(),
    engine: engineFingerprint(),
  };
  const stale = (results.engine as ReturnType<typeof engineFingerprint>).stale_build;
  if (stale.length) progress(`WARNING: listener sources newer than dist/ (run npx tsc first): ${stale.join(', ')}`);
  for (const t of TARGETS) if (!t.key.includes('.')) results[t.key] = null;
  const errors: Record<string, string> = {};
  let plansText = '';
  const machineInfo = results.machine as Record<string, unknown>;
  machineInfo.background_busy_pct_before = await backgroundBusyPct();

  monitor.start();
  sink = await startSink();
  const ctx: BenchContext = { serverUrl: serverUrl!, quick, dbs, sink };
  progress(`${quick ? 'quick' : 'full'} run; sink at ${sink.url}`);

  for (const name of Object.keys(FIGURES) as FigureName[]) {
    if (only && !only.includes(name)) continue;
    monitor.mark(name);
    try {
      const r = await FIGURES[name](ctx);
      if ('plansText' in r) {
        plansText = r.plansText;
        const { plansText: _omit, ...rest } = r;
        Object.assign(results, rest);
      } else Object.assign(results, r);
    } catch (err) {
      errors[name] = errText(err);
      progress(`figure ${name} FAILED: ${errText(err)}`);
      if (err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    }
  }

  monitor.mark('end');
  machineInfo.background_busy_pct_after = await backgroundBusyPct();
  const shared = await monitor.stop();
  results.shared_server = shared;
  const disturbed = Object.entries(shared.by_figure).filter(([, r]) => r.with_foreign_activity > 0 || r.failed_samples > 0);
  for (const [k, r] of disturbed) {
    progress(`WARNING: during ${k}, ${r.with_foreign_activity} of ${r.samples} 1-s samples saw other sessions on the server (${r.foreign_databases.join(', ')}); ${r.failed_samples} samples failed`);
  }
  if (shared.postmaster_start_first !== shared.postmaster_start_last) progress(`WARNING: the server restarted during the run (${shared.postmaster_start_first} → ${shared.postmaster_start_last})`);
  progress(`background CPU load (bench idle): before ${String(machineInfo.background_busy_pct_before)} %, after ${String(machineInfo.background_busy_pct_after)} %`);
  results.targets = Object.fromEntries(TARGETS.filter((t) => t.target !== null).map((t) => [t.key, targetText(t)]));
  results.errors = errors;
  results.duration_s = Math.round((Date.now() - started) / 100) / 10;

  mkdirSync(resultsDir, { recursive: true });
  const file = path.join(resultsDir, only ? 'partial.json' : 'latest.json');
  writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  // a copy per mode, so a quick run does not hide the last full one
  if (!only) writeFileSync(path.join(resultsDir, `latest-${quick ? 'quick' : 'full'}.json`), `${JSON.stringify(results, null, 2)}\n`);
  if (plansText) writeFileSync(path.join(resultsDir, only ? 'claim-plans-partial.txt' : 'claim-plans.txt'), plansText);

  const rows = TARGETS.map((t) => {
    const v = lookup(results, t.key);
    return [t.label, fmt(v, t.unit), targetText(t), verdict(t, v)];
  });
  console.log(`\nerp-cloud bench (${quick ? 'quick' : 'full'}, ${results.duration_s} s) → ${path.relative(process.cwd(), file)}\n`);
  console.log(textTable(['figure', 'value', 'target', 'vs target'], rows));
  if (Object.keys(errors).length) {
    console.log('\nerrors:');
    for (const [k, v] of Object.entries(errors)) console.log(`  ${k}: ${v}`);
  }
  return Object.keys(errors).length ? 1 : 0;
}

let code = 1;
try {
  code = await main();
} catch (err) {
  console.error(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  code = 1;
} finally {
  await cleanup();
}
process.exit(code);
