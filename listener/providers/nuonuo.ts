/**
 * Nuonuo open platform (诺诺开放平台) adapter: one gateway call per attempt,
 * signed with X-Nuonuo-Sign (HMAC-SHA1 over the exact body bytes sent), with
 * an access token obtained by client credentials and cached in the database
 * for its lifetime (token calls are quota-limited).
 *
 * Operations (the SQL chain in migration 0007 enqueues them):
 *   tax.issue        → <prefix>.requestBillingNew      ({"order": …}; the payload's orderNo, sent as built in SQL)
 *   tax.query        → <prefix>.queryInvoiceResult     ({"serialNos"|"orderNos": […]})
 *   tax.reinvoice    → nuonuo.OpeMplatform.reInvoice     ({"fpqqlsh", "orderno"}: retry signing of a status-24 invoice)
 *   tax.red_confirm  → nuonuo.OpeMplatform.saveInvoiceRedConfirm
 *   tax.red_query    → nuonuo.OpeMplatform.queryInvoiceRedConfirm
 *   tax.download_pdf → GET the invoice's pdfUrl (binary; only hosts allowed for the endpoint,
 *                      redirects refused: a 3xx is a permanent failure naming its Location)
 *
 * Endpoint config (names of secrets, never values):
 *   app_key          the appKey (not secret: it travels in the query string)
 *   app_secret_name  secret holding the appSecret (default 'nuonuo.app_secret')
 *   token_url        default: the base URL's origin + /accessToken
 *   method_prefix    default 'nuonuo.OpeMplatform' (诺税通 SaaS; 'nuonuo.ElectronInvoice' for the classic product)
 *   user_tax         optional userTax header (ISV apps)
 */
import { createHmac, randomBytes, randomInt } from 'node:crypto';
import { AdapterError, type ClaimedMessage, type HttpAnswer, type OutgoingRequest, type ProviderAdapter, type ProviderContext, type Verdict } from './types.js';
import { classifyHttpFailure, parseJsonOrText } from './http-semantics.js';
import { classifyDownload, downloadRequest } from './file-download.js';

export interface SignInput {
  appSecret: string;
  appKey: string;
  senid: string;
  nonce: string | number;
  timestamp: string | number;
  body: string;
  /** The gateway path, default /open/v1/services. */
  path?: string;
}

/** X-Nuonuo-Sign: base64(HMAC-SHA1(appSecret, "a=…&l=…&p=…&k=appKey&i=senid&n=nonce&t=timestamp&f=body")). */
export function nuonuoSign(s: SignInput): string {
  const pieces = (s.path ?? '/open/v1/services').split('/');
  const msg = `a=${pieces[3] ?? ''}&l=${pieces[2] ?? ''}&p=${pieces[1] ?? ''}&k=${s.appKey}&i=${s.senid}&n=${s.nonce}&t=${s.timestamp}&f=${s.body}`;
  return createHmac('sha1', s.appSecret).update(msg, 'utf8').digest('base64');
}

/** The Nuonuo orderNo for an outbox request_id: the same on every retry, so the platform refuses a second issue (E9106). */
export function orderNoFor(requestId: string): string {
  return requestId.replace(/-/g, '');
}

/** Token refusals: the cached token is forgotten and the attempt retried with a new one. */
const TOKEN_REFUSED = new Set(['070304', '070305', '070307']);
const TOKEN_QUOTA = '070306';
/** The ERP's data is at fault: a person must correct it (other business codes too). */
const SIGN_MISMATCH = '070601';

/** Tokens a cloud refused, by endpoint (one entry per endpoint): classify() has no context, so the next buildRequest forgets them. */
const refusedTokens = new Map<string, string>();
/** The token each in-flight request carries (request_id → token), for the refusal above. */
const tokenOf = new Map<string, string>();
/** In-flight requests are few (a claim batch); entries of attempts that never reached classify (network errors) are evicted oldest first. */
export const TOKEN_OF_MAX = 1024;

/** Remembers the token a request carries; drops the oldest entries (Map keeps insertion order) beyond TOKEN_OF_MAX. */
export function rememberToken(requestId: string, token: string): void {
  tokenOf.delete(requestId);
  tokenOf.set(requestId, token);
  while (tokenOf.size > TOKEN_OF_MAX) {
    const oldest = tokenOf.keys().next().value;
    if (oldest === undefined) break;
    tokenOf.delete(oldest);
  }
}

/** How many tokens are remembered (tests). */
export const rememberedTokens = (): number => tokenOf.size;

interface Cfg {
  appKey: string;
  appSecretName: string;
  tokenUrl: string;
  prefix: string;
  userTax: string | null;
}

function configOf(msg: ClaimedMessage): Cfg {
  const c = msg.endpoint_config;
  const str = (k: string): string | null => (typeof c[k] === 'string' && c[k] !== '' ? (c[k] as string) : null);
  const appKey = str('app_key');
  if (!appKey) throw new AdapterError('permanent', 'config', `endpoint ${msg.endpoint}: config.app_key is missing (cloud.put_endpoint … p_config => '{"app_key": "…"}')`);
  return {
    appKey,
    appSecretName: str('app_secret_name') ?? 'nuonuo.app_secret',
    tokenUrl: str('token_url') ?? `${new URL(msg.base_url).origin}/accessToken`,
    prefix: str('method_prefix') ?? 'nuonuo.OpeMplatform',
    userTax: str('user_tax'),
  };
}

function methodFor(operation: string, prefix: string): string {
  switch (operation) {
    case 'tax.issue': return `${prefix}.requestBillingNew`;
    case 'tax.query': return `${prefix}.queryInvoiceResult`;
    case 'tax.reinvoice':
      if (prefix !== 'nuonuo.OpeMplatform') throw new AdapterError('permanent', 'unsupported', `${prefix} has no reInvoice (only nuonuo.OpeMplatform)`);
      return 'nuonuo.OpeMplatform.reInvoice';
    case 'tax.red_confirm': return 'nuonuo.OpeMplatform.saveInvoiceRedConfirm';
    case 'tax.red_query': return 'nuonuo.OpeMplatform.queryInvoiceRedConfirm';
    default: throw new AdapterError('permanent', 'unknown_operation', `the nuonuo adapter has no method for operation ${operation}`);
  }
}

async function obtainToken(ctx: ProviderContext, cfg: Cfg, appSecret: string): Promise<{ token: string; expiresAt: Date }> {
  const body = new URLSearchParams({ client_id: cfg.appKey, client_secret: appSecret, grant_type: 'client_credentials' }).toString();
  const answer = await ctx.fetch({ method: 'POST', url: cfg.tokenUrl, headers: { 'content-type': 'application/x-www-form-urlencoded' }, body });
  const parsed = parseJsonOrText(answer.text()) as Record<string, unknown> | string | null;
  const obj = typeof parsed === 'object' && parsed !== null ? parsed : {};
  if (answer.status >= 500 || answer.status === 429) {
    throw new AdapterError('retryable', 'token_unavailable', `token endpoint answered HTTP ${answer.status}`);
  }
  if (typeof obj.access_token === 'string' && obj.access_token !== '') {
    const life = Number(obj.expires_in ?? 86400);
    return { token: obj.access_token, expiresAt: new Date(Date.now() + (Number.isFinite(life) && life > 0 ? life : 86400) * 1000) };
  }
  const code = String(obj.error ?? obj.code ?? `http_${answer.status}`);
  const why = String(obj.error_description ?? obj.describe ?? '');
  if (code === TOKEN_QUOTA) {
    // the quota refills by itself; hammering it only delays that
    throw new AdapterError('retryable', 'token_quota', `token calls used up (${code} ${why}); the token is cached, so this should be rare`, 15 * 60_000);
  }
  throw new AdapterError('permanent', 'token_refused', `token refused: ${code} ${why}`.trim());
}

async function gatewayRequest(msg: ClaimedMessage, ctx: ProviderContext, cfg: Cfg): Promise<OutgoingRequest> {
  const method = methodFor(msg.operation, cfg.prefix);
  const appSecret = await ctx.secret(cfg.appSecretName);
  const refused = refusedTokens.get(msg.endpoint);
  if (refused) {
    refusedTokens.delete(msg.endpoint);
    await ctx.forgetToken(cfg.appKey, refused);
  }
  const token = await ctx.token(cfg.appKey, () => obtainToken(ctx, cfg, appSecret), { marginMs: 10 * 60_000 });
  const payload = msg.payload as Record<string, unknown>;
  if (msg.operation === 'tax.issue') {
    // the orderNo is the one SQL stored on the invoice and built into the payload: never recomputed here
    const orderNo = (payload.order as Record<string, unknown> | undefined)?.orderNo;
    if (typeof orderNo !== 'string' || orderNo === '') throw new AdapterError('permanent', 'no_order_no', 'the tax.issue payload has no order.orderNo');
  }
  rememberToken(msg.request_id, token);
  // the exact string signed is the exact string sent
  const body = JSON.stringify(payload);
  const senid = randomBytes(16).toString('hex');
  const nonce = String(randomInt(10_000_000, 100_000_000));
  const timestamp = String(Math.floor(Date.now() / 1000));
  const url = new URL(msg.base_url);
  url.search = new URLSearchParams({ senid, nonce, timestamp, appkey: cfg.appKey }).toString();
  const headers: Record<string, string> = {
    'content-type': 'application/json; charset=utf-8',
    'x-nuonuo-sign': nuonuoSign({ appSecret, appKey: cfg.appKey, senid, nonce, timestamp, body, path: url.pathname }),
    accesstoken: token,
    method,
    sdkver: '2.0.0',
  };
  if (cfg.userTax) headers.usertax = cfg.userTax;
  return { method: 'POST', url: url.toString(), headers, body, secrets: [appSecret, token] };
}

function classifyGateway(answer: HttpAnswer, msg: ClaimedMessage): Verdict {
  const token = tokenOf.get(msg.request_id);
  tokenOf.delete(msg.request_id);
  if (answer.status < 200 || answer.status >= 300) return classifyHttpFailure(answer);
  const parsed = parseJsonOrText(answer.body);
  if (typeof parsed !== 'object' || parsed === null) {
    return { outcome: 'retryable', errorClass: 'nuonuo_garbled', message: `the gateway answered something that is not JSON: ${answer.body.slice(0, 200)}`, response: parsed };
  }
  const env = parsed as { code?: unknown; describe?: unknown };
  const code = String(env.code ?? '');
  const describe = String(env.describe ?? '');
  if (code === 'E0000') return { outcome: 'ok', response: parsed };
  // already submitted (a retry after a timeout): not an error, the write-back queries it by orderNo / billId
  if (code === 'E9106') return { outcome: 'ok', response: { ...(parsed as object), duplicate: true } };
  // the invoice is not visible yet right after submit: the write-back polls again
  if (code === 'E9500' && msg.operation === 'tax.query') return { outcome: 'ok', response: parsed };
  if (TOKEN_REFUSED.has(code)) {
    if (token) refusedTokens.set(msg.endpoint, token);
    return { outcome: 'retryable', errorClass: 'token_refused', message: `${code} ${describe}: the token is refused; a new one is obtained on the next attempt`, response: parsed };
  }
  if (code === TOKEN_QUOTA) return { outcome: 'retryable', errorClass: 'token_quota', message: `${code} ${describe}`, retryAfterMs: 15 * 60_000, response: parsed };
  if (code === SIGN_MISMATCH) return { outcome: 'permanent', errorClass: 'sign_mismatch', message: `${code} ${describe}: check the app key and secret`, response: parsed };
  return { outcome: 'permanent', errorClass: `nuonuo_${code || 'unknown'}`, message: `${code} ${describe}`.trim(), response: parsed };
}

export const nuonuoAdapter: ProviderAdapter = {
  name: 'nuonuo',
  async buildRequest(msg, ctx) {
    if (msg.operation === 'tax.download_pdf') return downloadRequest(msg);
    return gatewayRequest(msg, ctx, configOf(msg));
  },
  classify(answer, msg) {
    return msg.operation === 'tax.download_pdf' ? classifyDownload(answer, msg) : classifyGateway(answer, msg);
  },
};
