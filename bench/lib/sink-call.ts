/**
 * The HTTP call the bench's comparison children make (bench/graphile-child.ts, bench/ceiling-child.ts):
 * the listener's own attemptDelivery (listener/delivery/http.ts, provider 'webhook') to the bench's sink,
 * under the egress check the listener makes, with the sink's loopback address allowed as the bench
 * endpoint allows it. One definition, so that both make the very same call.
 */
import { randomUUID } from 'node:crypto';
import { policyOf, type EgressPolicy } from '../../listener/delivery/egress.js';
import { attemptDelivery, type AttemptResult } from '../../listener/delivery/http.js';
import type { ClaimedMessage } from '../../listener/providers/index.js';

/** A caller of the sink: `call(payload, attempt)` makes one attempt with a fresh Request_ID. */
export function sinkCaller(sinkUrl: string): (payload: unknown, attempt: number) => Promise<AttemptResult> {
  const policy: EgressPolicy = policyOf({ name: 'sink', base_url: `${sinkUrl}/webhook`, allow_hosts: [], allow_cidrs: [], allow_private: true });
  return (payload, attempt) => {
    const msg: ClaimedMessage = {
      request_id: randomUUID(),
      endpoint: 'sink',
      operation: 'bench.ping',
      payload,
      attempt,
      aggregate_type: null,
      aggregate_id: null,
      ordering_key: null,
      provider: 'webhook',
      allow_hosts: [],
      allow_cidrs: [],
      allow_private: true,
      base_url: `${sinkUrl}/webhook`,
      timeout_ms: 10_000,
      endpoint_config: {},
      locked_until: new Date(Date.now() + 15_000),
      send_at: new Date(),
    };
    return attemptDelivery(msg, { logBodyBytes: 64 * 1024, policy });
  };
}
