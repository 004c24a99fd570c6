/**
 * The comparison system, run as a child process like the erp-cloud listener:
 * graphile-worker (concurrency GW_CONCURRENCY, localQueue 100, completeJobBatchDelay 0)
 * with one task, `deliver`, that makes the very same HTTP call as the listener
 * (listener/delivery/http.ts attemptDelivery, provider 'webhook'). A non-ok outcome
 * throws, so graphile-worker records the failure and retries like any job.
 *
 * Env: DATABASE_URL, SINK_URL, GW_CONCURRENCY, GW_LOCAL_QUEUE, GW_COMPLETE_DELAY.
 * IPC: sends {ready: true} once the runner is up; {cmd: 'stop'} stops it.
 */
import { randomUUID } from 'node:crypto';
import { Logger, run, type Runner, type Task } from 'graphile-worker';
import { closeAgents, policyOf, type EgressPolicy } from '../listener/delivery/egress.js';
import { attemptDelivery } from '../listener/delivery/http.js';
import type { ClaimedMessage } from '../listener/providers/index.js';

const env = (k: string, d?: string): string => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is required`);
  return v;
};

const sinkUrl = env('SINK_URL');
/** The same egress check the listener makes, with the sink's loopback address allowed as the bench endpoint allows it. */
const SINK_POLICY: EgressPolicy = policyOf({ name: 'sink', base_url: `${sinkUrl}/webhook`, allow_hosts: [], allow_cidrs: [], allow_private: true });
const quiet = new Logger(() => (level, message) => {
  if (level === 'error') process.stderr.write(`graphile-worker ${level}: ${message}\n`);
});

const deliver: Task = async (payload, helpers) => {
  const msg: ClaimedMessage = {
    request_id: randomUUID(),
    endpoint: 'sink',
    operation: 'bench.ping',
    payload,
    attempt: helpers.job.attempts,
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
  const result = await attemptDelivery(msg, { logBodyBytes: 64 * 1024, policy: SINK_POLICY });
  if (result.outcome !== 'ok') throw new Error(`${result.error_class}: ${result.error_message}`);
};

let runner: Runner | null = null;
let stopping = false;

async function stop(code = 0): Promise<void> {
  if (stopping) return;
  stopping = true;
  try {
    await runner?.stop();
  } finally {
    closeAgents();
    process.exit(code);
  }
}

process.on('message', (m: { cmd?: string }) => {
  if (m.cmd === 'stop') void stop();
});
process.on('SIGTERM', () => void stop());
process.on('disconnect', () => void stop());

runner = await run({
  connectionString: env('DATABASE_URL'),
  concurrency: Number(env('GW_CONCURRENCY', '10')),
  noHandleSignals: true,
  logger: quiet,
  taskList: { deliver },
  preset: {
    worker: {
      localQueue: { size: Number(env('GW_LOCAL_QUEUE', '100')) },
      completeJobBatchDelay: Number(env('GW_COMPLETE_DELAY', '0')),
      failJobBatchDelay: Number(env('GW_COMPLETE_DELAY', '0')),
    },
  },
});
process.send?.({ ready: true });
void runner.promise.catch((err: unknown) => {
  process.stderr.write(`graphile-worker runner failed: ${err instanceof Error ? err.message : String(err)}\n`);
  void stop(1);
});
