/**
 * The inbound side of the 白名单: requests a cloud pushes to us (webhooks) are
 * accepted only from that cloud's configured source ranges. One mechanism
 * with the egress guard (the same range check, egress.ts `inRanges`), and
 * fail-closed: no configured range means nobody gets in.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { inRanges } from './egress.js';
import type { Logger } from './logger.js';

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
