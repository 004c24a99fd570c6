/**
 * Baiwang (百望云) open-API signing (cloud-protocols §2.1):
 *
 *   sign = upper(MD5(appSecret + Σ key+value over the query parameters sorted by key
 *                    (sign and empty values left out) + compact JSON body + appSecret))
 *
 * The body signed is the exact string sent: callers serialise once (compactJson)
 * and send that string. The password of the token call is SHA-256(plain + salt)
 * in lower-case hex. Nothing here does I/O; the simulator verifies with the same
 * functions, and test/baiwang-crypto.test.ts checks them against `md5sum` and
 * `openssl` run on the same bytes.
 */
import { createHash } from 'node:crypto';

/** The bytes signed: appSecret, the sorted key+value pairs, the body, appSecret (UTF-8). */
export function baiwangSignString(appSecret: string, params: Record<string, string | number | undefined | null>, body: string): string {
  const pairs = Object.keys(params)
    .filter((k) => k !== 'sign' && params[k] !== undefined && params[k] !== null && String(params[k]) !== '')
    // plain code-unit order: the keys are ASCII, as Baiwang's own SDKs sort them (TreeMap)
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
    .map((k) => `${k}${String(params[k])}`)
    .join('');
  return `${appSecret}${pairs}${body}${appSecret}`;
}

/** The `sign` query parameter: upper-case hex MD5 of baiwangSignString. */
export function baiwangSign(appSecret: string, params: Record<string, string | number | undefined | null>, body: string): string {
  return createHash('md5').update(baiwangSignString(appSecret, params, body), 'utf8').digest('hex').toUpperCase();
}

/** The token call's password: SHA-256 of the plain password followed by the user's salt, lower-case hex. */
export function baiwangPasswordHash(plain: string, salt: string): string {
  return createHash('sha256').update(`${plain}${salt}`, 'utf8').digest('hex');
}

/** Compact JSON (no spaces), the only form Baiwang signs: serialise once, sign it, send it. */
export function compactJson(value: unknown): string {
  return JSON.stringify(value);
}

/** The query parameters of a URL as a plain record (the last value of a repeated key wins, as the gateway reads them). */
export function queryRecord(q: URLSearchParams): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of q) out[k] = v;
  return out;
}
