/**
 * Small helpers shared by the benchmark: bounded waits, an epoch clock with
 * sub-millisecond precision that is comparable across processes, percentiles,
 * and progress output on stderr (stdout carries the final table).
 */

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Epoch milliseconds with sub-ms precision. Both the bench and the sink use it,
 * so a commit time taken here and a receive time taken in the sink process can
 * be subtracted (same machine, same wall clock).
 */
export function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Polls `fn` until it returns something truthy; throws after `timeoutMs`. Every wait in the bench goes through here. */
export async function waitFor<T>(
  fn: () => Promise<T | undefined | null | false> | T | undefined | null | false,
  opts: { timeoutMs: number; intervalMs?: number; what: string },
): Promise<T> {
  const deadline = Date.now() + opts.timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${opts.timeoutMs} ms waiting for ${opts.what}`);
    await sleep(opts.intervalMs ?? 50);
  }
}

/** Rejects if `p` does not settle within `ms`. */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
      }),
    ]);
  } finally {
    if (timer) clearTimeout(timer);
  }
}

/** Nearest-rank percentile of an unsorted list (p in 0..100). */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

export function round(x: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

const t0 = Date.now();

/** Progress line on stderr, prefixed with seconds since the bench started. */
export function progress(msg: string): void {
  process.stderr.write(`[bench +${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`);
}

/** A plain left-aligned text table. */
export function textTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

export function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
