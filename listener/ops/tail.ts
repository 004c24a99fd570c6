/**
 * `erp-cloud tail`: follows cloud.log live, one line per attempt.
 *
 * cloud.log has no id, and an attempt is written when its result comes back,
 * not when it starts: a row can appear with a started_at older than rows
 * already printed (a slow call, another listener's batch). So the cursor is
 * not "after the last row" but a window: each poll reads every attempt that
 * started within the longest endpoint timeout (plus a margin) before the
 * newest one seen, and prints those it has not printed yet, keyed by
 * (request_id, attempt, started_at). Rows sharing a timestamp are neither
 * skipped nor printed twice.
 *
 * Only the columns below ever leave the database: bodies, headers and URLs may
 * carry business data and are never read.
 */
import type pg from 'pg';

/**
 * What `erp-cloud tail` asks: only the columns it prints,
 * never bodies, headers or the URL (they may carry business data).
 * $1 endpoint or null, $2 request_id or null.
 */
const tailColumns = `started_at, (extract(epoch from started_at) * 1000000)::bigint::text as started_us, endpoint, request_id,
  attempt, outcome, http_status, duration_ms::float8 as duration_ms, error_class, left(error_message, 500) as error_message, late`;
const tailFilter = `($1::text is null or endpoint = $1) and ($2::uuid is null or request_id = $2)`;
const q = {
  /** How late an attempt can be recorded after it started: the longest endpoint timeout. */
  longestTimeout: 'select coalesce(max(timeout_ms), 10000)::int as timeout_ms from cloud.endpoint',
  /** The newest $3 attempts, newest first. */
  last: `select ${tailColumns} from cloud.log where ${tailFilter} order by started_at desc, request_id desc, attempt desc limit $3`,
  /** Every attempt that started at most $4 seconds before the cursor $3 (epoch µs; null = all), oldest first. */
  window: `select ${tailColumns} from cloud.log
            where ${tailFilter} and ($3::bigint is null or started_at >= to_timestamp($3::float8 / 1000000) - make_interval(secs => $4::float8))
            order by started_at, request_id, attempt`,
} as const;

export interface TailOptions {
  lines: number;
  intervalMs: number;
  endpoint: string | null;
  requestId: string | null;
  json: boolean;
  /** Print the last `lines` attempts and return. */
  once: boolean;
  /** Stops following (SIGINT / SIGTERM). */
  signal?: AbortSignal;
  write?: (line: string) => void;
}

interface LogRow {
  started_at: Date;
  started_us: string;
  endpoint: string;
  request_id: string;
  attempt: number;
  outcome: string;
  http_status: number | null;
  duration_ms: number | null;
  error_class: string | null;
  error_message: string | null;
  /** An answer that came back after its lease was gone: logged, but it changed nothing (cloud.log.late). */
  late: boolean;
}

/** Lateness allowed on top of the longest endpoint timeout: batching of results, lease margin, clock skew between hosts. */
const LATENESS_MARGIN_S = 30;
const MESSAGE_CHARS = 160;

const keyOf = (r: LogRow) => `${r.request_id}:${r.attempt}:${r.started_us}:${r.late}`;

function truncate(s: string | null, n: number): string | null {
  if (s === null) return null;
  const flat = s.replace(/\s+/g, ' ').trim();
  return flat.length > n ? `${flat.slice(0, n - 1)}…` : flat;
}

/** One attempt as printed: the fields an operator needs, nothing from the request or the response. */
export function formatAttempt(r: LogRow, json: boolean): string {
  const message = truncate(r.error_message, MESSAGE_CHARS);
  if (json) {
    return JSON.stringify({
      started_at: r.started_at.toISOString(), endpoint: r.endpoint, request_id: r.request_id, attempt: r.attempt,
      outcome: r.outcome, http_status: r.http_status, duration_ms: r.duration_ms, error_class: r.error_class, error_message: message,
      late: r.late,
    });
  }
  const error = r.error_class || message ? `${r.error_class ?? 'error'}${message ? `: ${message}` : ''}` : '';
  return [
    r.started_at.toISOString(),
    r.endpoint,
    r.request_id,
    `#${r.attempt}`,
    (r.late ? `${r.outcome}(late)` : r.outcome).padEnd(9),
    String(r.http_status ?? '-').padStart(3),
    r.duration_ms === null ? '-' : `${Math.round(r.duration_ms)}ms`,
    error,
  ].join('  ').trimEnd();
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** Prints the last attempts, then (unless `once`) follows new ones until the signal aborts. */
export async function tailLog(c: pg.Client, opts: TailOptions): Promise<void> {
  const write = opts.write ?? ((s: string) => console.log(s));
  const filter = [opts.endpoint, opts.requestId];
  const lookbackS = (await c.query<{ timeout_ms: number }>(q.longestTimeout)).rows[0]!.timeout_ms / 1000 + LATENESS_MARGIN_S;

  // the last N and the window behind them, from one snapshot: everything in the
  // window older than the last N counts as already seen
  const seen = new Map<string, bigint>();
  let newest: bigint | null = null;
  await c.query('begin isolation level repeatable read read only');
  try {
    const last = (await c.query<LogRow>(q.last, [...filter, opts.lines])).rows.reverse();
    for (const r of last) write(formatAttempt(r, opts.json));
    if (opts.once) return;
    const top = (await c.query<LogRow>(q.last, [...filter, 1])).rows[0];
    if (top) {
      newest = BigInt(top.started_us);
      for (const r of (await c.query<LogRow>(q.window, [...filter, top.started_us, lookbackS])).rows) seen.set(keyOf(r), BigInt(r.started_us));
    }
  } finally {
    await c.query('commit');
  }

  const lookbackUs = BigInt(Math.ceil(lookbackS * 1e6));
  while (!opts.signal?.aborted) {
    await sleep(opts.intervalMs, opts.signal);
    if (opts.signal?.aborted) break;
    const rows = (await c.query<LogRow>(q.window, [...filter, newest === null ? null : newest.toString(), lookbackS])).rows;
    for (const r of rows) {
      const key = keyOf(r);
      if (seen.has(key)) continue;
      const us = BigInt(r.started_us);
      seen.set(key, us);
      if (newest === null || us > newest) newest = us;
      write(formatAttempt(r, opts.json));
    }
    if (newest !== null) {
      const horizon = newest - lookbackUs;
      for (const [k, us] of seen) if (us < horizon) seen.delete(k);
    }
  }
}
