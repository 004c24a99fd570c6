/**
 * The YonBIP procurement cloud (友云采) as a simulator, on the framework in
 * server.ts (fault injection, request log): tenant gateway discovery, the
 * self-built-app token endpoint (checks the HMAC-SHA256 signature), purchase
 * order publish / revise / close (string-packed arrays, resubmitCheckKey
 * deduplication, an ordered ledger of effects), the delivery list with
 * incremental ts, and a hook that makes a supplier ship an ASN: pushed to a
 * webhook, listed for the pull, or written to a middle database.
 *
 * Test and demo hooks (HTTP, so `erp-cloud sim --cloud yonbip` has them too):
 *   POST /__yonbip/apps   {appKey, appSecret, tokenTtlS?}   register an app
 *   POST /__yonbip/ship   {asn, via: push|list|middle, webhookUrl?, webhookSecret?, pushFormat?, appKey?, eventId?, middleDbUrl?, middleTable?, ts?}
 *
 * A push goes out in our signed format (pushFormat 'signed', the default: X-Scm-Signature with webhookSecret)
 * or as YonBIP itself sends events (pushFormat 'yonbip': an EncryptionHolder encrypted and signed with the
 * registered app's appKey/appSecret, listener/yonbip-crypto.ts).
 *   GET  /__yonbip/state  {orders, poLedger, deliveries, tokensIssued}
 */
import { createHmac, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import pg from 'pg';
import { signWebhookBody } from '../providers/webhook.js';
import { deriveAesKey, encryptEvent, eventSignature, type SignatureAlgorithm } from '../providers/yonbip-crypto.js';
import { YONBIP_PATHS } from '../providers/yonbip.js';
import { startSim, type RouteContext, type RouteResult, type SimRoute, type SimServer } from './sim-server.js';

export interface PoEffect {
  seq: number;
  op: 'publish' | 'revise' | 'close';
  orderno: string;
  revision: number | null;
  resubmitCheckKey: string;
  lines: number;
  at: number;
}

export interface SimOrder {
  orderId: string;
  orderno: string;
  status: 'published' | 'closed';
  revision: number;
  items: unknown[];
}

export interface ShipRequest {
  /** The ASN (发货单) as the supplier entered it, in 发货单保存's shape: code, supplier, status, deliveryDate, details[{lineno, orderCode, orderDetailId, material, purchaseNum, …}]. The sim adds details[].orderId for orders it knows. */
  asn: Record<string, unknown>;
  via: 'push' | 'list' | 'middle';
  webhookUrl?: string;
  webhookSecret?: string;
  /** push: 'signed' (our X-Scm-Signature format, default) or 'yonbip' (the platform's EncryptionHolder). */
  pushFormat?: 'signed' | 'yonbip';
  /** pushFormat yonbip: the registered app whose keys encrypt and sign (default: the only registered app). */
  appKey?: string;
  /** pushFormat yonbip: the event type (default scm.asn.created), the signature hash (default sha1). */
  eventType?: string;
  signatureAlgorithm?: SignatureAlgorithm;
  eventId?: string;
  middleDbUrl?: string;
  middleTable?: string;
  /** The record's change time (yyyy-MM-dd HH:mm:ss, Asia/Shanghai); default now. */
  ts?: string;
}

export interface ShipResult {
  eventId: string;
  ts: string;
  /** push: the webhook's HTTP status and body. */
  status?: number;
  body?: string;
}

export interface YonbipSim extends SimServer {
  addApp(appKey: string, appSecret: string, tokenTtlS?: number): void;
  /** Invalidates every token issued so far (the cloud rotated them). */
  revokeTokens(): void;
  ship(req: ShipRequest): Promise<ShipResult>;
  poLedger(): PoEffect[];
  orders(): SimOrder[];
  deliveries(): Array<Record<string, unknown>>;
  tokensIssued(): number;
}

const GATEWAY_PREFIX = '/iuap-api-gateway';

/** Asia/Shanghai wall time as yyyy-MM-dd HH:mm:ss. */
export function shanghaiTime(d = new Date()): string {
  return new Date(d.getTime() + 8 * 3600_000).toISOString().slice(0, 19).replace('T', ' ');
}

function ok(data: unknown): RouteResult {
  return { status: 200, body: { code: '200', message: '操作成功', data } };
}
function refuse(code: string, message: string): RouteResult {
  return { status: 200, body: { code, message } };
}

function unpack(body: Record<string, unknown>, field: string): unknown[] | string {
  const v = body[field];
  if (typeof v !== 'string') return `${field} must be a JSON array serialised to a string`;
  try {
    const parsed = JSON.parse(v) as unknown;
    return Array.isArray(parsed) ? parsed : `${field} is not an array`;
  } catch {
    return `${field} is not valid JSON`;
  }
}

export async function startYonbipSim(o: { port?: number; host?: string } = {}): Promise<YonbipSim> {
  const apps = new Map<string, { secret: string; ttlS: number }>();
  const tokens = new Map<string, number>(); // token → expiry (epoch ms)
  const orders = new Map<string, SimOrder>();
  const resubmitted = new Map<string, RouteResult>();
  const ledger: PoEffect[] = [];
  const deliveries: Array<Record<string, unknown>> = [];
  let issued = 0;
  let url = '';

  function tokenValid(ctx: RouteContext): boolean {
    const t = ctx.query.get('access_token'); // URLSearchParams decodes once, as the real gateway does
    const exp = t ? tokens.get(t) : undefined;
    return exp !== undefined && exp > Date.now();
  }

  function poRoute(op: PoEffect['op'], path: string): SimRoute {
    return {
      method: 'POST',
      path: GATEWAY_PREFIX + path,
      idempotent: false, // the service's own idempotency is resubmitCheckKey, below
      handler: (ctx) => {
        if (!tokenValid(ctx)) return refuse('1090003500065', '非法token (access_token invalid or expired)');
        const body = (ctx.body ?? {}) as Record<string, unknown>;
        const key = body.resubmitCheckKey;
        if (typeof key !== 'string' || key === '' || key.length > 32) return refuse('999', 'resubmitCheckKey is required (at most 32 characters)');
        const seen = resubmitted.get(key);
        if (seen) return seen;
        const orderdatas = unpack(body, 'orderdatas');
        if (typeof orderdatas === 'string') return refuse('999', orderdatas);
        const orderno = String((orderdatas[0] as Record<string, unknown> | undefined)?.orderno ?? '');
        if (!orderno) return refuse('999', 'orderdatas[0].orderno is required');
        let items: unknown[] = [];
        if (op !== 'close') {
          const supply = unpack(body, 'supplydatas');
          const it = unpack(body, 'itemdatas');
          if (typeof supply === 'string') return refuse('999', supply);
          if (typeof it === 'string') return refuse('999', it);
          items = it;
        }
        const existing = orders.get(orderno);
        let result: RouteResult;
        if (op === 'publish') {
          if (existing) return refuse('999', `订单 ${orderno} 已存在 (already published)`);
          const order: SimOrder = { orderId: `YC${orders.size + 1000}`, orderno, status: 'published', revision: 0, items };
          orders.set(orderno, order);
          result = ok({ orderId: order.orderId, orderCode: orderno });
        } else if (!existing) {
          return refuse('999', `订单 ${orderno} 不存在 (not published)`);
        } else if (existing.status === 'closed') {
          return refuse('999', `订单 ${orderno} 已关闭 (closed)`);
        } else {
          if (op === 'revise') {
            existing.revision += 1;
            existing.items = items;
          } else existing.status = 'closed';
          result = ok({ orderId: existing.orderId, orderCode: orderno });
        }
        ledger.push({ seq: ledger.length + 1, op, orderno, revision: typeof body.revision === 'number' ? body.revision : null, resubmitCheckKey: key, lines: items.length, at: Date.now() });
        resubmitted.set(key, result);
        return result;
      },
    };
  }

  const routes: SimRoute[] = [
    {
      method: 'GET',
      path: YONBIP_PATHS.discovery,
      idempotent: false,
      handler: (ctx) => {
        const tenant = ctx.query.get('tenantId');
        if (!tenant) return { status: 200, body: { code: '1', message: 'tenantId is required' } };
        return { status: 200, body: { code: '00000', message: '成功！', data: { gatewayUrl: url + GATEWAY_PREFIX, tokenUrl: `${url}/iuap-api-auth` } } };
      },
    },
    {
      method: 'GET',
      path: YONBIP_PATHS.selfAppAuth,
      idempotent: false,
      handler: (ctx) => {
        const appKey = ctx.query.get('appKey') ?? '';
        const ts = ctx.query.get('timestamp') ?? '';
        const signature = ctx.query.get('signature') ?? '';
        const app = apps.get(appKey);
        if (!app) return refuse('10000', `appKey ${appKey} unknown`);
        if (!/^\d{13}$/.test(ts) || Math.abs(Date.now() - Number(ts)) > 5 * 60_000) return refuse('10001', 'timestamp (milliseconds) missing or too far from now');
        const want = Buffer.from(createHmac('sha256', app.secret).update(`appKey${appKey}timestamp${ts}`).digest('base64'));
        const got = Buffer.from(signature);
        if (want.length !== got.length || !timingSafeEqual(want, got)) return refuse('10002', 'signature invalid');
        // new-style tokens are long and carry + / =, which must be URL-encoded in a query
        const token = `yb+${randomBytes(24).toString('base64')}/=`;
        tokens.set(token, Date.now() + app.ttlS * 1000);
        issued += 1;
        return { status: 200, body: { code: '00000', message: '成功！', data: { access_token: token, expire: app.ttlS } } };
      },
    },
    poRoute('publish', YONBIP_PATHS['scm.po_publish']),
    poRoute('revise', YONBIP_PATHS['scm.po_revise']),
    poRoute('close', YONBIP_PATHS['scm.po_close']),
    {
      method: 'POST',
      path: GATEWAY_PREFIX + YONBIP_PATHS['scm.asn_pull'],
      idempotent: false,
      handler: (ctx) => {
        if (!tokenValid(ctx)) return refuse('1090003500065', '非法token (access_token invalid or expired)');
        const body = (ctx.body ?? {}) as Record<string, unknown>;
        if (typeof body.deliveryDateStart !== 'string' || typeof body.deliveryDateEnd !== 'string') {
          return refuse('999', 'deliveryDateStart and deliveryDateEnd are required (yyyy-MM-dd HH:mm:ss)');
        }
        const pageSize = Number(body.pageSize ?? 10);
        const pageIndex = Number(body.pageIndex ?? 1);
        if (!(pageSize >= 1 && pageSize <= 50) || !(pageIndex >= 1)) return refuse('999', 'pageSize is 1..50, pageIndex from 1');
        const since = typeof body.ts === 'string' ? body.ts : '';
        const all = deliveries.filter((d) => String(d.ts) >= since).sort((a, b) => String(a.ts).localeCompare(String(b.ts)) || String(a.code).localeCompare(String(b.code)));
        const recordList = all.slice((pageIndex - 1) * pageSize, pageIndex * pageSize);
        return ok({ recordList, recordCount: all.length, pageCount: Math.max(1, Math.ceil(all.length / pageSize)), pageIndex });
      },
    },
    {
      method: 'POST',
      path: '/__yonbip/apps',
      idempotent: false,
      handler: (ctx) => {
        const b = (ctx.body ?? {}) as Record<string, unknown>;
        if (typeof b.appKey !== 'string' || typeof b.appSecret !== 'string') return { status: 400, body: { error: 'give appKey and appSecret' } };
        addApp(b.appKey, b.appSecret, typeof b.tokenTtlS === 'number' ? b.tokenTtlS : undefined);
        return { status: 200, body: { ok: true } };
      },
    },
    {
      method: 'POST',
      path: '/__yonbip/ship',
      idempotent: false,
      handler: async (ctx) => {
        try {
          return { status: 200, body: await ship(ctx.body as ShipRequest) };
        } catch (err) {
          return { status: 400, body: { error: err instanceof Error ? err.message : String(err) } };
        }
      },
    },
    {
      method: 'GET',
      path: '/__yonbip/state',
      idempotent: false,
      handler: () => ({ status: 200, body: { orders: [...orders.values()], poLedger: ledger, deliveries, tokensIssued: issued } }),
    },
  ];

  function addApp(appKey: string, appSecret: string, tokenTtlS = 7200): void {
    apps.set(appKey, { secret: appSecret, ttlS: tokenTtlS });
  }

  async function ship(req: ShipRequest): Promise<ShipResult> {
    if (!req || typeof req.asn !== 'object' || req.asn === null) throw new Error('ship needs {asn, via}');
    const eventId = req.eventId ?? randomUUID();
    const ts = req.ts ?? shanghaiTime();
    // the cloud's own order id on each line, as 发货单 details carry it (orderId), for orders it knows
    const details = Array.isArray(req.asn.details)
      ? (req.asn.details as Array<Record<string, unknown>>).map((d) => {
          const order = orders.get(String(d.orderCode));
          return order && d.orderId === undefined ? { ...d, orderId: order.orderId } : d;
        })
      : req.asn.details;
    const asn = { status: 1, ...req.asn, ...(details === undefined ? {} : { details }) };
    const record = { id: `DO${deliveries.length + 5000}`, ts, eventId, ...asn };
    deliveries.push(record);
    if (req.via === 'list') return { eventId, ts };
    if (req.via === 'push' && req.pushFormat === 'yonbip') {
      if (!req.webhookUrl) throw new Error('push needs webhookUrl');
      const appKey = req.appKey ?? (apps.size === 1 ? [...apps.keys()][0]! : '');
      const app = apps.get(appKey);
      if (!app) throw new Error('pushFormat yonbip needs appKey of a registered app (POST /__yonbip/apps)');
      const timestamp = String(Date.now());
      const message = JSON.stringify({ eventId, type: req.eventType ?? 'scm.asn.created', tenantId: 'sim-tenant', timestamp: Number(timestamp), content: JSON.stringify(asn) });
      const encrypt = encryptEvent(message, appKey, deriveAesKey(app.secret));
      const nonce = randomBytes(8).toString('hex');
      const body = JSON.stringify({ signature: eventSignature(app.secret, timestamp, nonce, encrypt, req.signatureAlgorithm ?? 'sha1'), timestamp, nonce, encrypt });
      const res = await fetch(req.webhookUrl, { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(5000) });
      return { eventId, ts, status: res.status, body: await res.text() };
    }
    if (req.via === 'push') {
      if (!req.webhookUrl || !req.webhookSecret) throw new Error('push needs webhookUrl and webhookSecret');
      const body = JSON.stringify({ eventId, eventType: 'scm.asn.created', asn });
      const res = await fetch(req.webhookUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-scm-signature': signWebhookBody(req.webhookSecret, body, Math.floor(Date.now() / 1000)) },
        body,
        signal: AbortSignal.timeout(5000),
      });
      return { eventId, ts, status: res.status, body: await res.text() };
    }
    if (req.via === 'middle') {
      if (!req.middleDbUrl) throw new Error('middle needs middleDbUrl');
      const table = req.middleTable ?? 'asn_outbox';
      if (!/^[a-z_][a-z0-9_]*$/.test(table)) throw new Error('middleTable must be a plain identifier');
      const c = new pg.Client({ connectionString: req.middleDbUrl });
      await c.connect();
      try {
        await c.query(`insert into ${table} (event_id, doc) values ($1, $2)`, [eventId, JSON.stringify(asn)]);
      } finally {
        await c.end();
      }
      return { eventId, ts };
    }
    throw new Error(`via must be push, list or middle, not ${String(req.via)}`);
  }

  const sim = await startSim({ port: o.port, host: o.host, routes, name: 'yonbip' });
  url = sim.url;
  const baseReset = sim.reset;
  return {
    ...sim,
    reset() {
      baseReset();
      tokens.clear();
      orders.clear();
      resubmitted.clear();
      ledger.length = 0;
      deliveries.length = 0;
      issued = 0;
    },
    addApp,
    revokeTokens: () => tokens.clear(),
    ship,
    poLedger: () => ledger.map((e) => ({ ...e })),
    orders: () => [...orders.values()].map((x) => structuredClone(x)),
    deliveries: () => deliveries.map((d) => structuredClone(d)),
    tokensIssued: () => issued,
  };
}
