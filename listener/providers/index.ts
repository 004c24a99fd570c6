/** The provider adapters by name (cloud.endpoint.provider). Later clouds register here. */
import type { ProviderAdapter } from './types.js';
import { baiwangAdapter } from './baiwang.js';
import { nuonuoAdapter } from './nuonuo.js';
import { webhookAdapter } from './webhook.js';
import { yonbipAdapter } from './yonbip.js';

const adapters = new Map<string, ProviderAdapter>([
  [webhookAdapter.name, webhookAdapter],
  [nuonuoAdapter.name, nuonuoAdapter],
  [yonbipAdapter.name, yonbipAdapter],
  [baiwangAdapter.name, baiwangAdapter],
]);

export function adapterFor(name: string): ProviderAdapter | undefined {
  return adapters.get(name);
}

export function registerAdapter(adapter: ProviderAdapter): void {
  adapters.set(adapter.name, adapter);
}

export type { AuxAnswer, AuxRequest, ProviderAdapter, ProviderContext, ClaimedMessage, OutgoingRequest, HttpAnswer, Verdict } from './types.js';
export { AdapterError } from './types.js';
