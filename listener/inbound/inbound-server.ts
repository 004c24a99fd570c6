/**
 * The listener's inbound door: the HTTP server clouds push to (webhooks,
 * invoice callbacks). Each cloud registers its routes (registerInboundRoute);
 * this server only matches the route and, in this order, refuses a source outside
 * the route's ranges (403, the route's admit hook), a Content-Type the route does
 * not speak (415 with Accept-Post: another type, a charset other than UTF-8, none
 * at all) and an oversized body (413), all before the body is read; then it hands
 * the raw bytes to the route, which checks the signature and the body and calls
 * the SQL function that ingests it.
 * Off unless ERP_CLOUD_INBOUND_PORT is set: it is the one port the outside reaches.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type pg from 'pg';
import { contentTypeRefusal, parseMediaType } from './admission.js';
import type { Logger } from '../kernel/logger.js';

export interface InboundDeps {
  pool: pg.Pool;
  log: Logger;
  /** A secret by name: the environment, else System_Vault. */
  secret(name: string): Promise<string>;
  env: NodeJS.ProcessEnv;
}

export interface InboundRoute {
  /** For log lines, e.g. 'scm.asn_webhook'. */
  name: string;
  method: 'POST' | 'GET';
  path: string;
  /**
   * The media types the body is in (type/subtype, lower case), e.g. ['application/json']; not checked for GET. Another
   * type, a charset other than UTF-8 or no Content-Type is answered 415 with Accept-Post before the
   * body is read, its signature checked, the database touched or anything kept.
   */
  accepts: readonly string[];
  /** Bodies larger than this are refused with 413 before they are read whole. Default 256 KiB. A function reads it from deps.env per request. */
  maxBytes?: number | ((env: NodeJS.ProcessEnv) => number);
  /** Optional: runs before the body is read; false answers 403 unread (e.g. a source outside the allowed ranges). */
  admit?(req: IncomingMessage, deps: InboundDeps): boolean;
  handle(req: IncomingMessage, res: ServerResponse, body: Buffer, deps: InboundDeps): Promise<void>;
}

const routes: InboundRoute[] = [];

export function registerInboundRoute(route: InboundRoute): void {
  if (route.accepts.length === 0 || route.accepts.some((t) => parseMediaType(t)?.essence !== t || t.includes(';'))) {
    throw new Error(`inbound route ${route.name}: accepts must list media types as type/subtype in lower case, without parameters`);
  }
  const i = routes.findIndex((r) => r.method === route.method && r.path === route.path);
  if (i >= 0) routes.splice(i, 1, route);
  else routes.push(route);
}

export function inboundRoutes(): readonly InboundRoute[] {
  return routes;
}

function json(res: ServerResponse, status: number, body: unknown): void {
  if (!res.headersSent) res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

/** Reads the body up to `max` bytes; null when it is larger (the request is then answered 413). */
function readBody(req: IncomingMessage, max: number): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length'] ?? '0');
    if (declared > max) return resolve(null);
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > max) {
        req.removeAllListeners('data');
        req.resume();
        resolve(null);
      } else chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

export async function startInboundServer(host: string, port: number, deps: InboundDeps): Promise<{ url: string; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    void (async () => {
      const path = (req.url ?? '/').split('?')[0];
      const route = routes.find((r) => r.path === path && r.method === req.method);
      if (!route) return json(res, 404, { error: 'not_found' });
      const max = (typeof route.maxBytes === 'function' ? route.maxBytes(deps.env) : route.maxBytes) ?? 256 * 1024;
      try {
        if (route.admit && !route.admit(req, deps)) {
          req.resume();
          return json(res, 403, { error: 'source_not_allowed' });
        }
        const contentType = req.headers['content-type'];
        const refusal = route.method === 'GET' ? null : contentTypeRefusal(contentType, route.accepts);
        if (refusal !== null) {
          req.resume();
          deps.log.warn({ receiver: route.name, remote: req.socket.remoteAddress, content_type: contentType?.slice(0, 120) ?? null, reason: refusal },
            'inbound request refused: unsupported content type');
          if (!res.headersSent) res.writeHead(415, { 'content-type': 'application/json', 'accept-post': route.accepts.join(', ') });
          return res.end(JSON.stringify({ error: 'unsupported_media_type', detail: refusal, accept: route.accepts }));
        }
        const body = await readBody(req, max);
        if (body === null) {
          deps.log.warn({ receiver: route.name, remote: req.socket.remoteAddress, max }, 'inbound request refused: body too large');
          return json(res, 413, { error: 'body_too_large', max_bytes: max });
        }
        await route.handle(req, res, body, deps);
      } catch (err) {
        deps.log.error({ receiver: route.name, err: err instanceof Error ? err.message : String(err) }, 'inbound request failed');
        json(res, 500, { error: 'internal_error' });
      }
    })();
  });
  server.requestTimeout = 15_000;
  server.headersTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${addr.port}`,
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}
