/**
 * Generic JSON webhook: POST the payload as JSON to the endpoint's base URL
 * (plus config.path, if any). 2xx is success; the body, if JSON, is the response.
 *
 * Optional endpoint config, naming secrets (never holding them):
 *   bearer_secret   sends `Authorization: Bearer <value>`
 *   signing_secret  sends `X-Erp-Cloud-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<body>">`,
 *                   so the receiver can check the body and refuse replays
 */
import { createHmac } from 'node:crypto';
import type { ClaimedMessage, OutgoingRequest, ProviderAdapter, ProviderContext } from './types.js';
import { classifyHttpFailure, parseJsonOrText } from './http-semantics.js';

/** The signature header value for a body at a time (exported for receivers and tests). */
export function signWebhookBody(secret: string, body: string, unixSeconds: number): string {
  return `t=${unixSeconds},v1=${createHmac('sha256', secret).update(`${unixSeconds}.${body}`).digest('hex')}`;
}

function secretName(config: Record<string, unknown>, key: string): string | null {
  const v = config[key];
  return typeof v === 'string' && v !== '' ? v : null;
}

export const webhookAdapter: ProviderAdapter = {
  name: 'webhook',
  async buildRequest(msg: ClaimedMessage, ctx: ProviderContext): Promise<OutgoingRequest> {
    const path = typeof msg.endpoint_config.path === 'string' ? msg.endpoint_config.path : '';
    const body = JSON.stringify(msg.payload);
    const headers: Record<string, string> = { 'content-type': 'application/json', 'x-erp-cloud-operation': msg.operation };
    const secrets: string[] = [];
    const bearer = secretName(msg.endpoint_config, 'bearer_secret');
    if (bearer) {
      const token = await ctx.secret(bearer);
      secrets.push(token);
      headers.authorization = `Bearer ${token}`;
    }
    const signing = secretName(msg.endpoint_config, 'signing_secret');
    if (signing) {
      const key = await ctx.secret(signing);
      secrets.push(key);
      headers['x-erp-cloud-signature'] = signWebhookBody(key, body, Math.floor(Date.now() / 1000));
    }
    return { method: 'POST', url: msg.base_url.replace(/\/+$/, '') + path, headers, body, secrets };
  },
  classify(answer) {
    if (answer.status >= 200 && answer.status < 300) return { outcome: 'ok', response: parseJsonOrText(answer.body) };
    if (answer.status >= 300 && answer.status < 400) {
      return { outcome: 'permanent', errorClass: 'redirect', message: `HTTP ${answer.status}: redirects are not followed (to ${String(answer.headers.location ?? '?')})` };
    }
    return classifyHttpFailure(answer);
  },
};
