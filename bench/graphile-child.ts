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
import { Logger, run, type Runner, type Task } from 'graphile-worker';
import { closeAgents } from '../listener/delivery/egress.js';
import { sinkCaller } from './lib/sink-call.js';

const env = (k: string, d?: string): string => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is required`);
  return v;
};

const sinkUrl = env('SINK_URL');
const callSink = sinkCaller(sinkUrl);
const quiet = new Logger(() => (level, message) => {
  if (level === 'error') process.stderr.write(`graphile-worker ${level}: ${message}\n`);
});

const deliver: Task = async (payload, helpers) => {
  const result = await callSink(payload, helpers.job.attempts);
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
