/**
 * YonBIP open API (用友开放平台) for the procurement cloud (友云采): purchase
 * orders out (publish / revise / close), the delivery list (ASNs) in.
 *
 * Endpoint: base_url is the tenant-discovery host (https://apigateway.yonyoucloud.com);
 * config names the tenant and the app, and names (never holds) the secret:
 *   tenant_id          the tenant (租户) whose data centre is looked up
 *   app_key            the self-built app's appKey
 *   app_secret_secret  name of the secret holding its appSecret (vault or ERP_CLOUD_SECRET_*)
 *
 * Per attempt: the tenant's gateway and token URLs (discovered, cached per
 * tenant), the access token (ctx.token: cached in the database for all
 * listeners, refreshed 10 minutes before it expires), then one business call.
 * The gateway and token hosts must be on the endpoint's allowlist.
 */
import { createHmac } from 'node:crypto';
import { classifyHttpFailure, parseJsonOrText } from './http-semantics.js';
import { AdapterError, type ClaimedMessage, type OutgoingRequest, type ProviderAdapter, type ProviderContext, type Verdict } from './types.js';

export const YONBIP_PATHS = {
  discovery: '/open-auth/dataCenter/getGatewayAddress',
  selfAppAuth: '/iuap-api-auth/open-auth/selfAppAuth/base/v1/getAccessToken',
  'scm.po_publish': '/yonbip/cpu/puorder/pubOrderToYC',
  'scm.po_revise': '/yonbip/cpu/puorder/revisedOrderToYC',
  'scm.po_close': '/yonbip/cpu/puorder/finalCloseOrderToYC',
  'scm.asn_pull': '/yonbip/cpu/deliveryOrderApi/queryDeliveryList',
} as const;

/** Refresh a token this long before the cloud says it expires (it lives 2 h). */
const TOKEN_MARGIN_MS = 10 * 60_000;
const GATEWAY_TTL_MS = 60 * 60_000;

/**
 * The signature of a self-built-app token request: Base64(HmacSHA256(appSecret,
 * "appKey<appKey>timestamp<timestamp>")). Returned raw: it is URL-encoded exactly
 * once, where the query string is built.
 */
export function signTokenRequest(appKey: string, timestampMs: string, appSecret: string): string {
  // the parameters sorted by name, each name followed by its value (signature itself excluded)
  const message = `appKey${appKey}timestamp${timestampMs}`;
  return createHmac('sha256', appSecret).update(message, 'utf8').digest('base64');
}

/** The token URL's query, each value encoded once (the base64 signature's + / = included). */
export function tokenQuery(appKey: string, timestampMs: string, signature: string): string {
  return `appKey=${encodeURIComponent(appKey)}&timestamp=${encodeURIComponent(timestampMs)}&signature=${encodeURIComponent(signature)}`;
}

/** resubmitCheckKey (≤ 32 chars, globally unique): the request_id's 32 hex digits, so every retry carries the same key. */
export function resubmitCheckKey(requestId: string): string {
  return requestId.replace(/-/g, '').toLowerCase();
}

interface Gateway { gatewayUrl: string; tokenUrl: string; at: number }
const gateways = new Map<string, Gateway>();
/** The token each request went out with, so classify can report a refused one. */
const usedTokens = new Map<string, { key: string; token: string }>();
/** Tokens the cloud refused, forgotten (for every listener) before the next request. */
const refusedTokens = new Map<string, string>();

/** Forgets discovered gateways (tests). */
export function clearYonbipCaches(): void {
  gateways.clear();
  usedTokens.clear();
  refusedTokens.clear();
}

function configText(msg: ClaimedMessage, key: string): string {
  const v = msg.endpoint_config[key];
  if (typeof v !== 'string' || v === '') {
    throw new AdapterError('permanent', 'config', `endpoint ${msg.endpoint}: config.${key} is missing (see listener/providers/yonbip.ts)`);
  }
  return v;
}

function parseJson(text: string): Record<string, unknown> | null {
  try {
    const v = JSON.parse(text) as unknown;
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

const trimSlash = (u: string) => u.replace(/\/+$/, '');

async function auxJson(ctx: ProviderContext, url: string, what: string): Promise<Record<string, unknown>> {
  let answer;
  try {
    answer = await ctx.fetch({ method: 'GET', url, maxBytes: 64 * 1024 });
  } catch (err) {
    const e = err as { code?: string; message?: string };
    if (e.code === 'EEGRESS') throw new AdapterError('permanent', 'egress_refused', `${what}: ${e.message ?? String(err)}`);
    throw new AdapterError('retryable', `${what.replace(/\W+/g, '_')}_unreachable`, `${what}: ${e.message ?? String(err)}`);
  }
  if (answer.status >= 500 || answer.status === 429 || answer.status === 408) {
    throw new AdapterError('retryable', `${what.replace(/\W+/g, '_')}_http_${answer.status}`, `${what}: HTTP ${answer.status}`);
  }
  const body = parseJson(answer.text());
  if (answer.status !== 200 || !body) {
    throw new AdapterError('permanent', `${what.replace(/\W+/g, '_')}_refused`, `${what}: HTTP ${answer.status} ${answer.text().slice(0, 200)}`);
  }
  return body;
}

const discovering = new Map<string, Promise<Gateway>>();

/** The tenant's gateway and token URLs: discovered once per tenant (concurrent callers share the lookup), kept an hour. */
async function gatewayFor(msg: ClaimedMessage, ctx: ProviderContext, tenant: string): Promise<Gateway> {
  const id = `${msg.endpoint}\u0000${tenant}`;
  const hit = gateways.get(id);
  if (hit && Date.now() - hit.at < GATEWAY_TTL_MS) return hit;
  let p = discovering.get(id);
  if (!p) {
    p = discover(msg, ctx, tenant).then((gw) => { gateways.set(id, gw); return gw; }).finally(() => discovering.delete(id));
    discovering.set(id, p);
  }
  return p;
}

async function discover(msg: ClaimedMessage, ctx: ProviderContext, tenant: string): Promise<Gateway> {
  const body = await auxJson(ctx, `${trimSlash(msg.base_url)}${YONBIP_PATHS.discovery}?tenantId=${encodeURIComponent(tenant)}`, 'gateway discovery');
  const data = body.data as Record<string, unknown> | undefined;
  if (String(body.code) !== '00000' || typeof data?.gatewayUrl !== 'string' || typeof data?.tokenUrl !== 'string') {
    throw new AdapterError('permanent', 'gateway_discovery_refused', `gateway discovery for tenant ${tenant}: ${String(body.message ?? JSON.stringify(body).slice(0, 200))}`);
  }
  return { gatewayUrl: trimSlash(data.gatewayUrl), tokenUrl: trimSlash(data.tokenUrl), at: Date.now() };
}

async function accessToken(msg: ClaimedMessage, ctx: ProviderContext, tenant: string, tokenUrl: string): Promise<{ key: string; token: string }> {
  const appKey = configText(msg, 'app_key');
  const key = `tenant:${tenant}:app:${appKey}`;
  const refused = refusedTokens.get(key);
  if (refused) {
    refusedTokens.delete(key);
    await ctx.forgetToken(key, refused);
  }
  const token = await ctx.token(key, async () => {
    const appSecret = await ctx.secret(configText(msg, 'app_secret_secret'));
    const ts = String(Date.now());
    // the token host may sit under a path prefix (…/iuap-api-auth): the API path carries its own
    const base = tokenUrl.endsWith('/iuap-api-auth') ? tokenUrl.slice(0, -'/iuap-api-auth'.length) : tokenUrl;
    const body = await auxJson(ctx, `${base}${YONBIP_PATHS.selfAppAuth}?${tokenQuery(appKey, ts, signTokenRequest(appKey, ts, appSecret))}`, 'token');
    const data = body.data as Record<string, unknown> | undefined;
    if (String(body.code) !== '00000' || typeof data?.access_token !== 'string' || data.access_token === '') {
      throw new AdapterError('permanent', 'token_refused', `token for app ${appKey}: ${String(body.message ?? 'no access_token')} (check app_key and the app secret)`);
    }
    const ttlS = Number(data.expire ?? 7200);
    return { token: data.access_token, expiresAt: new Date(Date.now() + (Number.isFinite(ttlS) && ttlS > 0 ? ttlS : 7200) * 1000) };
  }, { marginMs: TOKEN_MARGIN_MS });
  return { key, token };
}

/** The business body: the SQL payload, with each array field packed into a JSON string where the API wants one. */
export function businessBody(msg: ClaimedMessage): Record<string, unknown> {
  const payload = (msg.payload ?? {}) as Record<string, unknown>;
  if (msg.operation === 'scm.asn_pull') return { ...payload };
  const body: Record<string, unknown> = { resubmitCheckKey: resubmitCheckKey(msg.request_id) };
  for (const [k, v] of Object.entries(payload)) body[k] = Array.isArray(v) ? JSON.stringify(v) : v;
  return body;
}

function remember(requestId: string, used: { key: string; token: string }): void {
  usedTokens.set(requestId, used);
  if (usedTokens.size > 10_000) usedTokens.delete(usedTokens.keys().next().value as string);
}

export const yonbipAdapter: ProviderAdapter = {
  name: 'yonbip',
  async buildRequest(msg: ClaimedMessage, ctx: ProviderContext): Promise<OutgoingRequest> {
    const path = YONBIP_PATHS[msg.operation as keyof typeof YONBIP_PATHS];
    if (!path || !msg.operation.startsWith('scm.')) {
      throw new AdapterError('permanent', 'unknown_operation', `the yonbip adapter does not know operation ${msg.operation}`);
    }
    const tenant = configText(msg, 'tenant_id');
    const gw = await gatewayFor(msg, ctx, tenant);
    const used = await accessToken(msg, ctx, tenant, gw.tokenUrl);
    remember(msg.request_id, used);
    // new tokens are long and carry special characters: encoded once, here
    const query = `access_token=${encodeURIComponent(used.token)}` + (msg.operation === 'scm.asn_pull' ? '' : `&accountID=${encodeURIComponent(tenant)}`);
    return {
      method: 'POST',
      url: `${gw.gatewayUrl}${path}?${query}`,
      headers: { 'content-type': 'application/json; charset=utf-8' },
      body: JSON.stringify(businessBody(msg)),
      secrets: [used.token, encodeURIComponent(used.token)],
    };
  },
  classify(answer, msg): Verdict {
    const used = usedTokens.get(msg.request_id);
    usedTokens.delete(msg.request_id);
    if (answer.status < 200 || answer.status >= 300) return classifyHttpFailure(answer);
    const body = parseJson(answer.body);
    if (!body) return { outcome: 'retryable', errorClass: 'bad_answer', message: `not a JSON object: ${answer.body.slice(0, 200)}`, response: parseJsonOrText(answer.body) };
    const code = String(body.code ?? '');
    if (code === '200') return { outcome: 'ok', response: body };
    const message = `code ${code}: ${String(body.message ?? '')}`;
    // a refused token: forget it (every listener) and try again with a new one
    if (/token/i.test(String(body.message ?? '')) || code === '310036' || code === '1090003500065') {
      if (used) refusedTokens.set(used.key, used.token);
      return { outcome: 'retryable', errorClass: 'token_rejected', message, response: body };
    }
    return { outcome: 'permanent', errorClass: 'business_rejected', message, response: body };
  },
};
