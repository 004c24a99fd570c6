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
import { closeAgents } from '../listener/delivery/egress.js';
import { sinkCaller } from './lib/sink-call.js';

const env = (k: string): string => {
  const v = process.env[k];
  if (v === undefined) throw new Error(`${k} is required`);
  return v;
};

const sinkUrl = env('SINK_URL');
const total = Number(env('CEIL_MESSAGES'));
const concurrency = Number(env('CEIL_CONCURRENCY'));
const first = Number(env('CEIL_FIRST'));
const callSink = sinkCaller(sinkUrl);

let next = 0;
async function lane(): Promise<void> {
  while (next < total) {
    const i = first + next++;
    const result = await callSink({ i, note: 'benchmark message' }, 1);
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
