/**
 * The inbound side of the 白名单: requests a cloud pushes to us (webhooks) are
 * accepted only from that cloud's configured source ranges. One mechanism
 * with the egress guard (the same range check, kernel/addresses.ts `inRanges`), and
 * fail-closed: no configured range means nobody gets in. And the media types a
 * receiver speaks (contentTypeRefusal), which inbound-server.ts checks for every route.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { inRanges } from '../kernel/addresses.js';
import type { Logger } from '../kernel/logger.js';

export interface InboundPolicy {
  /** Which receiver this is, for log lines (e.g. 'scm.asn_webhook'). */
  name: string;
  /** Source ranges allowed to call it, e.g. the supplier cloud's published egress ranges. */
  allowCidrs: string[];
}

/** Whether a peer address may call a receiver. An unknown address or an empty list is refused. */
export function sourceAllowed(remoteAddress: string | undefined, policy: InboundPolicy): boolean {
  if (!remoteAddress || policy.allowCidrs.length === 0) return false;
  try {
    return inRanges(remoteAddress, policy.allowCidrs);
  } catch {
    return false; // a malformed configured range refuses rather than lets through
  }
}

/**
 * Answers 403 and logs one line when the request's peer address is not allowed;
 * returns whether the caller may go on. Uses the socket's address, never a
 * forwarded-for header, which the sender controls.
 */
export function admitSource(req: IncomingMessage, res: ServerResponse, policy: InboundPolicy, log?: Logger): boolean {
  const remote = req.socket.remoteAddress;
  if (sourceAllowed(remote, policy)) return true;
  log?.warn({ receiver: policy.name, remote, path: req.url }, 'inbound request refused: source address not allowed');
  res.writeHead(403, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'source_not_allowed' }));
  return false;
}

/**
 * The media types a receiver speaks. A request whose Content-Type is another type, has a
 * charset other than UTF-8, cannot be parsed, or is missing is refused (415) before its body
 * is read, its signature checked or the database touched: a body in a format the receiver
 * does not speak is never guessed at, even when it happens to parse.
 */
export interface MediaType {
  /** type/subtype, lower case. */
  essence: string;
  /** Parameter names lower case; values as sent (quoted strings unquoted). */
  params: Map<string, string>;
}

const TOKEN = "[!#$%&'*+.^_`|~0-9A-Za-z-]+";
const MEDIA_TYPE = new RegExp(`^[ \\t]*(${TOKEN})/(${TOKEN})[ \\t]*`);
const PARAMETER = new RegExp(`^;[ \\t]*(?:(${TOKEN})=(?:(${TOKEN})|"((?:[^"\\\\\\x00-\\x08\\x0a-\\x1f\\x7f]|\\\\[\\t\\x20-\\x7e\\x80-\\xff])*)"))?[ \\t]*`);

/** A Content-Type value parsed as RFC 9110 §8.3.1 writes it; null when it is not one (or names a parameter twice). */
export function parseMediaType(value: string | undefined): MediaType | null {
  if (value === undefined) return null;
  const head = MEDIA_TYPE.exec(value);
  if (!head) return null;
  const params = new Map<string, string>();
  let rest = value.slice(head[0].length);
  while (rest !== '') {
    const p = PARAMETER.exec(rest);
    if (!p) return null;
    if (p[1] !== undefined) {
      const name = p[1].toLowerCase();
      if (params.has(name)) return null; // two charsets: which one would the sender mean?
      params.set(name, p[2] ?? p[3]!.replace(/\\(.)/g, '$1'));
    }
    rest = rest.slice(p[0].length);
  }
  return { essence: `${head[1]}/${head[2]}`.toLowerCase(), params };
}

/**
 * Why a Content-Type is refused by a receiver speaking `accepts` (type/subtype, lower case),
 * or null when it is spoken: the type is one of them (any case, with parameters) and its
 * charset, when given, is UTF-8.
 */
export function contentTypeRefusal(value: string | undefined, accepts: readonly string[]): string | null {
  if (value === undefined || value.trim() === '') return 'no Content-Type';
  const m = parseMediaType(value);
  if (!m) return 'Content-Type is not a media type';
  if (!accepts.includes(m.essence)) return `${m.essence} is not ${accepts.join(' or ')}`;
  const charset = m.params.get('charset');
  if (charset !== undefined && !/^utf-?8$/i.test(charset)) return `charset ${charset} is not UTF-8`;
  return null;
}
