/** What every doctor check returns: one line (check, target, status, detail), and how the lines are judged and printed. */
import { describePgError } from '../../kernel/errors.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckLine {
  check: string;
  target: string;
  status: CheckStatus;
  detail: string;
}

export const line = (check: string, target: string, status: CheckStatus, detail: string): CheckLine => ({ check, target, status, detail });
export const errText = (err: unknown) => describePgError(err);

export function iso(d: Date | null): string {
  return d ? d.toISOString() : '?';
}

/** The worst status of all lines. */
export function overallStatus(lines: CheckLine[]): CheckStatus {
  return lines.some((l) => l.status === 'fail') ? 'fail' : lines.some((l) => l.status === 'warn') ? 'warn' : 'ok';
}

/** The table: padded columns, the detail last and never cut (it carries the reason). */
export function formatChecks(lines: CheckLine[]): string {
  const cols = ['check', 'target', 'status'] as const;
  const widths = cols.map((c) => Math.max(c.length, ...lines.map((l) => l[c].length)));
  const row = (vals: string[], detail: string) => [...vals.map((v, i) => v.padEnd(widths[i]!)), detail].join('  ').trimEnd();
  const count = (s: CheckStatus) => lines.filter((l) => l.status === s).length;
  return [
    row([...cols], 'detail'),
    row(widths.map((w) => '-'.repeat(w)), '------'),
    ...lines.map((l) => row([l.check, l.target, l.status], l.detail.replace(/\s+/g, ' '))),
    '',
    `${count('ok')} ok, ${count('warn')} warning(s), ${count('fail')} failure(s)`,
  ].join('\n');
}
