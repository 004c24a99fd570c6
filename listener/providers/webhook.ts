/**
 * Generic JSON webhook: POST the payload as JSON to the endpoint's base URL
 * (plus config.path, if any). 2xx is success; the body, if JSON, is the response.
 */
import type { ClaimedMessage, ProviderAdapter } from './types.js';
import { classifyHttpFailure, parseJsonOrText } from './http-semantics.js';

export const webhookAdapter: ProviderAdapter = {
  name: 'webhook',
  buildRequest(msg: ClaimedMessage) {
    const path = typeof msg.endpoint_config.path === 'string' ? msg.endpoint_config.path : '';
    return {
      method: 'POST',
      url: msg.base_url.replace(/\/+$/, '') + path,
      headers: { 'content-type': 'application/json', 'x-erp-cloud-operation': msg.operation },
      body: JSON.stringify(msg.payload),
    };
  },
  classify(answer) {
    if (answer.status >= 200 && answer.status < 300) return { outcome: 'ok', response: parseJsonOrText(answer.body) };
    if (answer.status >= 300 && answer.status < 400) {
      return { outcome: 'permanent', errorClass: 'redirect', message: `HTTP ${answer.status}: redirects are not followed (to ${String(answer.headers.location ?? '?')})` };
    }
    return classifyHttpFailure(answer);
  },
};
