/**
 * The delivery ceiling: the very same HTTP call as the listener and the
 * graphile-worker task (listener/delivery/http.ts attemptDelivery, provider
 * 'webhook', the same egress check, the same sink) made CEIL_MESSAGES times
 * at CEIL_CONCURRENCY at once, from memory: no database, no queue. What one
 * such process delivers per second, and its CPU per message, bound what any
 * queue around this call can reach on the machine (a queue only adds work).
 *
 * Env: SINK_URL, CEIL_MESSAGES, CEIL_CONCURRENCY, CEIL_FIRST (the first message's number).
 * IPC: sends {ready: true} once loaded, then {done: n} when every call was answered ok
 * (an answer that is not ok ends the process with code 1); {cmd: 'stop'} ends it.
 */
import { randomUUID } from 'node:crypto';
import { closeAgents, policyOf, type EgressPolicy } from '../listener/delivery/egress.js';
import { attemptDelivery } from '../listener/delivery/http.js';
import type { ClaimedMessage } from '../listener/providers/index.js';

const env = (k: string): string => {
  const v = process.env[k];
  if (v === undefined) throw new Error(`${k} is required`);
  return v;
};

const sinkUrl = env('SINK_URL');
const total = Number(env('CEIL_MESSAGES'));
const concurrency = Number(env('CEIL_CONCURRENCY'));
const first = Number(env('CEIL_FIRST'));
/** The policy graphile-child.ts uses: the sink's loopback address allowed as the bench endpoint allows it. */
const SINK_POLICY: EgressPolicy = policyOf({ name: 'sink', base_url: `${sinkUrl}/webhook`, allow_hosts: [], allow_cidrs: [], allow_private: true });

/** The message graphile-child.ts builds for its task, with the payload the bench enqueues. */
function message(i: number): ClaimedMessage {
  return {
    request_id: randomUUID(),
    endpoint: 'sink',
    operation: 'bench.ping',
    payload: { i, note: 'benchmark message' },
    attempt: 1,
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
}

let next = 0;
async function lane(): Promise<void> {
  while (next < total) {
    const i = first + next++;
    const result = await attemptDelivery(message(i), { logBodyBytes: 64 * 1024, policy: SINK_POLICY });
    if (result.outcome !== 'ok') throw new Error(`message ${i}: ${result.error_class}: ${result.error_message}`);
  }
}

function stop(code: number): void {
  closeAgents();
  process.exit(code);
}

process.on('message', (m: { cmd?: string }) => {
  if (m.cmd === 'stop') stop(0);
});
process.on('SIGTERM', () => stop(0));
process.on('disconnect', () => stop(0));

process.send?.({ ready: true });
try {
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, total)) }, () => lane()));
  process.send?.({ done: total });
} catch (err) {
  process.stderr.write(`ceiling: ${err instanceof Error ? err.message : String(err)}\n`);
  stop(1);
}
