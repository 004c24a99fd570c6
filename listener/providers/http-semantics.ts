/** HTTP facts every adapter shares: which statuses are worth retrying, and Retry-After. */
import type { HttpAnswer, Verdict } from './types.js';

/** 408, 425, 429 and 5xx are the cloud's trouble, not the message's: retry them. */
export function isRetryableStatus(status: number): boolean {
  return status === 408 || status === 425 || status === 429 || status >= 500;
}

/** Retry-After as milliseconds (delta-seconds or an HTTP date), or undefined. */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (!v) return undefined;
  if (/^\s*\d+(\.\d+)?\s*$/.test(v)) return Math.round(Number(v) * 1000);
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

export function parseJsonOrText(body: string): unknown {
  if (body === '') return null;
  try {
    return JSON.parse(body);
  } catch {
    return body;
  }
}

/** The verdict for a non-2xx answer: retryable or permanent by status, with Retry-After. */
export function classifyHttpFailure(answer: HttpAnswer): Verdict {
  const response = parseJsonOrText(answer.body);
  const snippet = answer.body.length > 300 ? `${answer.body.slice(0, 300)}…` : answer.body;
  const message = `HTTP ${answer.status}${snippet ? `: ${snippet}` : ''}`;
  if (isRetryableStatus(answer.status)) {
    return { outcome: 'retryable', errorClass: `http_${answer.status}`, message, retryAfterMs: parseRetryAfter(answer.headers['retry-after']), response };
  }
  return { outcome: 'permanent', errorClass: `http_${answer.status}`, message, response };
}
