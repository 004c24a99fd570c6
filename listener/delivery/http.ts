/**
 * One HTTP call per attempt: the `got` instance (per-endpoint timeout, its own
 * retries off because the outbox owns them), the Request_ID headers,
 * redaction, and the attempt record for cloud.log. Where a request may go and
 * how (allowlist, address check, redirects, keep-alive agents) is asked of
 * egress.ts once per request (routeFor).
 */
import http from 'node:http';
import https from 'node:https';
import zlib from 'node:zlib';
import type { Got, OptionsInit, RequestError } from 'got';
import { routeFor, type EgressPolicy } from './egress.js';
import { SqlState } from '../kernel/errors.js';
import { redactText } from '../kernel/format.js';
import { AdapterError, adapterFor, type AuxAnswer, type AuxRequest, type ClaimedMessage, type OutgoingRequest, type ProviderContext, type Verdict } from '../providers/index.js';

/** The vault's own errors (a secret missing, a key that does not open it …): a secret that may be there later. */
const VAULT_CODES: ReadonlySet<string> = new Set([SqlState.secretNotFound, SqlState.vaultKeyMismatch, SqlState.vaultKeyInvalid,
  SqlState.invalidSecretName, SqlState.secretValueEmpty, SqlState.secretUndecryptable, SqlState.vaultKeyUnchanged]);

/** The JSON shape of cloud.attempt_result (one cloud.log row + the verdict). */
export interface AttemptResult {
  request_id: string;
  attempt: number;
  outcome: Verdict['outcome'];
  method: string | null;
  url: string | null;
  request_headers: Record<string, string> | null;
  request_body: string | null;
  http_status: number | null;
  response_headers: Record<string, unknown> | null;
  response_body: string | null;
  response: unknown;
  duration_ms: number;
  error_class: string | null;
  error_message: string | null;
  retry_after_ms: number | null;
  started_at: string;
}

/** Header names whose values never reach cloud.log. */
const SECRET_HEADERS = /^(authorization|proxy-authorization|cookie|set-cookie|x-api-key|api-key|accesstoken|access-token|x-nuonuo-sign|x-signature|x-erp-cloud-signature)$/i;

/**
 * got, for the auxiliary calls only (tokens, discovery, downloads: size-capped streams), loaded on
 * the first one: it is a tenth of a second of CPU at every start of a process that may never need
 * it (a webhook listener, graphile-worker in the bench). Where a request may go, which socket it
 * rides and that no redirect is followed: egress.ts (routeFor).
 */
let gotClient: Promise<Got> | null = null;
let RequestErrorClass: typeof RequestError | null = null;
function auxClient(): Promise<Got> {
  gotClient ??= import('got').then(({ got, RequestError: E }) => {
    RequestErrorClass = E;
    return got.extend({ retry: { limit: 0 }, throwHttpErrors: false, decompress: true, responseType: 'buffer' });
  });
  return gotClient;
}

/** A network error of an auxiliary call (got's RequestError: none can exist before got is loaded). */
export function isRequestError(err: unknown): err is RequestError {
  return RequestErrorClass !== null && err instanceof RequestErrorClass;
}

export function redactHeaders(headers: Record<string, unknown>, secrets: string[] = []): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(headers)) {
    if (v === undefined) continue;
    out[k] = SECRET_HEADERS.test(k) ? '[redacted]' : redactText(Array.isArray(v) ? v.join(', ') : String(v), secrets);
  }
  return out;
}

/** A parsed answer with secret values blanked out (a cloud may quote a token back). */
function redactValue(value: unknown, secrets: string[]): unknown {
  if (secrets.length === 0 || value === null) return value;
  return JSON.parse(redactText(JSON.stringify(value), secrets.map((v) => JSON.stringify(v).slice(1, -1))));
}

function cap(text: string, maxBytes: number): string {
  if (Buffer.byteLength(text) <= maxBytes) return text;
  return `${Buffer.from(text).subarray(0, maxBytes).toString('utf8')}…[truncated]`;
}

const NO_CONTEXT: ProviderContext = {
  secret: (name) => Promise.reject(Object.assign(new Error(`secret ${name}: this listener has no secret resolver`), { secretName: name })),
  fetch: () => Promise.reject(new AdapterError('permanent', 'no_context', 'this caller gave the adapter no HTTP context')),
  token: () => Promise.reject(new AdapterError('permanent', 'no_context', 'this caller gave the adapter no token cache')),
  forgetToken: () => Promise.resolve(),
};

/**
 * An adapter's auxiliary call (token, gateway discovery, download) under the
 * endpoint's egress guard: same host allowlist and address check as the attempt,
 * no redirects, a size cap. Throws on network errors and refusals.
 */
export async function auxFetch(req: AuxRequest, policy: EgressPolicy, defaultTimeoutMs: number, signal?: AbortSignal): Promise<AuxAnswer> {
  const route = routeFor(req.url, policy, req.download ? 'download' : 'api');
  const res = await sendCapped(req.url, {
    ...route,
    method: req.method,
    headers: req.headers,
    body: req.body,
    timeout: { request: req.timeoutMs ?? defaultTimeoutMs },
    signal,
  }, req.maxBytes ?? 1024 * 1024);
  const body = res.body;
  return { status: res.statusCode, headers: res.headers, body, text: () => body.toString('utf8') };
}

type StreamOptions = Omit<OptionsInit, 'isStream' | 'responseType'>;

/** A request whose answer is read as a stream and refused (code ETOOLARGE) once it passes `maxBytes`. */
async function sendCapped(url: string, options: StreamOptions, maxBytes: number):
  Promise<{ statusCode: number; headers: Record<string, string | string[] | undefined>; body: Buffer }> {
  const stream = (await auxClient()).stream(url, options);
  const chunks: Buffer[] = [];
  let size = 0;
  let headers: Record<string, string | string[] | undefined> = {};
  let statusCode = 0;
  stream.once('response', (res: { statusCode: number; headers: Record<string, string | string[] | undefined> }) => {
    statusCode = res.statusCode;
    headers = res.headers;
  });
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes) {
      stream.destroy();
      throw Object.assign(new Error(`${url}: the answer exceeds ${maxBytes} bytes`), { code: 'ETOOLARGE' });
    }
    chunks.push(chunk);
  }
  return { statusCode, headers, body: Buffer.concat(chunks) };
}

/** The attempt's own request gave no complete answer within the endpoint's timeout. */
class AttemptTimeout extends Error {
  readonly code = 'ETIMEDOUT';
  override readonly name = 'TimeoutError';
}

/** The User-Agent of an attempt (an adapter's own user-agent header wins). */
const USER_AGENT = 'erp-cloud';

type Route = ReturnType<typeof routeFor>;

/**
 * One attempt's request on node:http(s) directly, on the route egress.ts chose (its agents, its
 * guarded DNS lookup; a 3xx is an answer like any other). What `got` did for it — a whole-request
 * timeout, the AbortSignal, gzip/deflate/br answers, the body read into a Buffer — without its
 * per-request option merging, hooks and stream wrappers, which the profile showed cost more CPU
 * than the rest of a delivery together. auxFetch (tokens, downloads: size-capped streams) keeps got.
 */
function sendAttempt(url: string, o: { method: string; headers: Record<string, string>; body?: string; timeoutMs: number; signal?: AbortSignal; route: Route }):
  Promise<{ statusCode: number; headers: Record<string, string | string[] | undefined>; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const secure = u.protocol === 'https:';
    const headers: Record<string, string> = { 'user-agent': USER_AGENT, 'accept-encoding': 'gzip, deflate, br', ...o.headers };
    if (o.body !== undefined) headers['content-length'] = String(Buffer.byteLength(o.body));
    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const onAbort = () => fail(Object.assign(new Error('the request was aborted'), { code: 'ABORT_ERR' }));
    const finish = () => {
      settled = true;
      if (timer) clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
    };
    function fail(err: Error): void {
      if (settled) return;
      finish();
      req.destroy();
      reject(err);
    }
    const agents = o.route.agent as { http: http.Agent; https: https.Agent };
    const req = (secure ? https : http).request(u, {
      method: o.method, headers, agent: secure ? agents.https : agents.http, lookup: o.route.dnsLookup as never,
    }, (res) => {
      const enc = String(res.headers['content-encoding'] ?? '').trim().toLowerCase();
      const body: NodeJS.ReadableStream = enc === 'gzip' || enc === 'x-gzip' ? res.pipe(zlib.createGunzip())
        : enc === 'deflate' ? res.pipe(zlib.createInflate())
        : enc === 'br' ? res.pipe(zlib.createBrotliDecompress())
        : res;
      const chunks: Buffer[] = [];
      body.on('data', (c: Buffer) => chunks.push(c));
      body.once('end', () => {
        if (settled) return;
        finish();
        resolve({ statusCode: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) });
      });
      body.once('error', (err: Error) => fail(err));
      res.once('aborted', () => fail(Object.assign(new Error('the connection closed before the whole answer came'), { code: 'ECONNRESET' })));
      res.once('error', (err: Error) => fail(err));
    });
    req.once('error', (err: Error) => fail(err));
    timer = setTimeout(() => fail(new AttemptTimeout(`no answer within ${o.timeoutMs} ms`)), o.timeoutMs);
    if (o.signal?.aborted) return onAbort();
    o.signal?.addEventListener('abort', onAbort, { once: true });
    req.end(o.body);
  });
}

function networkVerdict(err: unknown, timeoutMs: number): Verdict {
  if ((err as { code?: string }).code === 'ETOOLARGE') {
    // the same answer will be just as large next time
    return { outcome: 'permanent', errorClass: 'response_too_large', message: (err as Error).message };
  }
  if ((err as { code?: string }).code === 'EEGRESS') {
    // a forbidden address stays forbidden: retrying cannot help
    return { outcome: 'permanent', errorClass: 'egress_refused', message: (err as Error).message };
  }
  if (err instanceof AttemptTimeout || (isRequestError(err) && err.name === 'TimeoutError')) {
    return { outcome: 'retryable', errorClass: 'timeout', message: `no answer within ${timeoutMs} ms` };
  }
  if (isRequestError(err)) {
    return { outcome: 'retryable', errorClass: err.code ? err.code.toLowerCase() : 'network', message: err.message };
  }
  // a socket error of sendAttempt (node's own: ECONNREFUSED, ECONNRESET …), classed as got classed it
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string' && /^[A-Z][A-Z0-9_]+$/.test(code)) {
    return { outcome: 'retryable', errorClass: code.toLowerCase(), message: err instanceof Error ? err.message : String(err) };
  }
  return { outcome: 'retryable', errorClass: 'network', message: err instanceof Error ? err.message : String(err) };
}

export interface AttemptOptions {
  logBodyBytes: number;
  /** Where this endpoint may connect (cloud.endpoint allow_*); see egress.ts. */
  policy: EgressPolicy;
  /** Secrets by name, for adapters whose endpoint config names some. */
  context?: ProviderContext;
  signal?: AbortSignal;
  /**
   * Asked just before the request goes out (after any token or discovery call):
   * false means do not send, because the answer could come after the message's
   * lease ends. The result is then notSent with error class LEASE_UNSAFE.
   */
  mayStart?: () => boolean;
}

/** The error class of an attempt not made because its lease could end before the answer (see AttemptOptions.mayStart). */
export const LEASE_UNSAFE = 'lease_unsafe';

/** Sends one attempt for a claimed message and returns its record; never throws. */
export async function attemptDelivery(msg: ClaimedMessage, opts: AttemptOptions): Promise<AttemptResult> {
  const t0 = performance.now();
  const startedAt = new Date().toISOString();
  const adapter = adapterFor(msg.provider);
  if (!adapter) {
    return notSent(msg, 'permanent', 'unknown_provider', `endpoint ${msg.endpoint} names provider "${msg.provider}", which this listener does not have`);
  }
  let req: OutgoingRequest;
  try {
    req = await adapter.buildRequest(msg, opts.context ?? NO_CONTEXT);
  } catch (err) {
    if (err instanceof AdapterError) {
      const r = notSent(msg, err.outcome, err.errorClass, err.message, performance.now() - t0);
      return { ...r, retry_after_ms: err.outcome === 'retryable' ? err.retryAfterMs ?? null : null };
    }
    if ((err as { code?: string }).code === 'EEGRESS' || isRequestError(err)) {
      // an auxiliary call (token, discovery) failed on the network or was refused by the egress guard
      const v = networkVerdict(err, msg.timeout_ms);
      return notSent(msg, v.outcome as 'retryable' | 'permanent', v.outcome === 'ok' ? 'network' : v.errorClass, v.outcome === 'ok' ? '' : v.message, performance.now() - t0);
    }
    // a secret that cannot be had now (vault down, variable not yet set) may be there later
    const secretMissing = (err as { secretName?: string; code?: string }).secretName !== undefined || VAULT_CODES.has(String((err as { code?: string }).code));
    return notSent(msg, secretMissing ? 'retryable' : 'permanent', secretMissing ? 'secret_unavailable' : 'build_request',
      err instanceof Error ? err.message : String(err), performance.now() - t0);
  }
  const headers = { ...req.headers, 'x-request-id': msg.request_id, 'idempotency-key': msg.request_id };
  const secrets = req.secrets ?? [];
  if (opts.mayStart && !opts.mayStart()) {
    return notSent(msg, 'retryable', LEASE_UNSAFE, 'not sent: its lease could end before the answer', performance.now() - t0);
  }
  let verdict: Verdict;
  let status: number | null = null;
  let responseHeaders: Record<string, unknown> | null = null;
  let responseBody: string | null = null;
  try {
    const route = routeFor(req.url, opts.policy, req.download ? 'download' : 'api');
    const res = req.maxResponseBytes === undefined
      ? await sendAttempt(req.url, { method: req.method, headers, body: req.body, timeoutMs: msg.timeout_ms, signal: opts.signal, route })
      : await sendCapped(req.url, { ...route, method: req.method, headers, body: req.body, timeout: { request: msg.timeout_ms }, signal: opts.signal }, req.maxResponseBytes);
    status = res.statusCode;
    responseHeaders = res.headers;
    const text = res.body.toString('utf8');
    responseBody = req.binaryResponse ? `[binary: ${res.body.length} bytes, ${res.headers['content-type'] ?? 'no content-type'}]` : text;
    verdict = adapter.classify({ status: res.statusCode, headers: res.headers, body: text, raw: res.body }, msg);
  } catch (err) {
    verdict = networkVerdict(err, msg.timeout_ms);
  }
  const durationMs = Math.round((performance.now() - t0) * 1000) / 1000;
  // what cloud.log keeps of the request is worked out once it has gone (off the wake → send path);
  // every record has one shape, in notSent's key order (one hidden class: cheap to build and to stringify)
  return {
    request_id: msg.request_id,
    attempt: msg.attempt,
    outcome: verdict.outcome,
    method: req.method,
    url: redactText(req.url, secrets),
    request_headers: redactHeaders(headers, secrets),
    request_body: req.body === undefined ? null : cap(redactText(req.body, secrets), opts.logBodyBytes),
    http_status: status,
    response_headers: responseHeaders ? redactHeaders(responseHeaders, secrets) : null,
    response_body: responseBody === null ? null : cap(redactText(responseBody, secrets), opts.logBodyBytes),
    response: redactValue(verdict.response ?? null, secrets),
    duration_ms: durationMs,
    error_class: verdict.outcome === 'ok' ? null : verdict.errorClass,
    error_message: verdict.outcome === 'ok' ? null : redactText(verdict.message, secrets),
    retry_after_ms: verdict.outcome === 'retryable' ? verdict.retryAfterMs ?? null : null,
    started_at: startedAt,
  };
}

/** The record of an attempt that never reached the network (no adapter, no request, no policy). */
export function notSent(msg: ClaimedMessage, outcome: 'retryable' | 'permanent', errorClass: string, message: string, durationMs = 0): AttemptResult {
  return {
    request_id: msg.request_id, attempt: msg.attempt, outcome, method: null, url: null, request_headers: null, request_body: null,
    http_status: null, response_headers: null, response_body: null, response: null, duration_ms: durationMs,
    error_class: errorClass, error_message: message, retry_after_ms: null, started_at: new Date().toISOString(),
  };
}
