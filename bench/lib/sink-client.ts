/**
 * The parent's handle on the HTTP sink child (bench/sink.ts): start it, ask it
 * for counts and receive times over IPC (each request with a timeout), turn
 * its fault injection on or off and read its per-key effects, stop it.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { forkChild, stopChild, type Child } from './procs.js';
import { withTimeout } from './util.js';

const here = path.dirname(fileURLToPath(import.meta.url));

export interface SinkStats {
  count: number;
  distinct: number;
  duplicates: number;
  firstAt: number | null;
  lastAt: number | null;
}

/** Fault injection: a share `fail` of the requests fails, `timeoutShare` of those by holding the request `holdMs` unanswered, the rest with a 503. */
export interface SinkFaults {
  fail: number;
  timeoutShare: number;
  seed: number;
  holdMs: number;
}

/** What the sink answered since the last reset; an effect is a 2xx answer. */
export interface SinkEffects {
  requests: number;
  ok: number;
  answered503: number;
  timeouts: number;
  /** Requests held open by a timeout fault right now, and at most at once. */
  heldNow: number;
  heldMax: number;
  /** Distinct Idempotency-Keys that got at least one 2xx. */
  keysWithEffect: number;
  /** Keys that got more than one 2xx, with their count. */
  secondEffects: Array<[string, number]>;
  /** Every key that got a 2xx, with the epoch ms of its first (only when asked for). */
  firstEffects?: Array<[string, number]>;
}

export interface Sink {
  url: string;
  child: Child;
  stats(): Promise<SinkStats>;
  /** Receive time (epoch ms) per Idempotency-Key; all keys when none are given. */
  times(keys?: string[]): Promise<Map<string, number>>;
  /** Clears every count and turns faults off. */
  reset(): Promise<void>;
  /** Turns fault injection on (fail > 0) or off (fail 0); the PRNG restarts from the seed. */
  faults(f: Partial<SinkFaults> & { fail: number }): Promise<SinkFaults | null>;
  effects(withKeys?: boolean): Promise<SinkEffects>;
  stop(): Promise<void>;
}

export async function startSink(): Promise<Sink> {
  const child = forkChild('sink', path.join(here, '..', 'sink.js'), { env: { PATH: process.env.PATH } });
  const pending = new Map<number, (m: Record<string, unknown>) => void>();
  let nextId = 1;
  const ready = new Promise<number>((resolve, reject) => {
    child.proc.on('message', (m: Record<string, unknown>) => {
      if (m.ready) resolve(Number(m.port));
      else if (typeof m.id === 'number') {
        pending.get(m.id)?.(m);
        pending.delete(m.id);
      }
    });
    void child.exited.then((code) => reject(new Error(`sink exited (${code}) before it was ready: ${child.output()}`)));
  });
  const port = await withTimeout(ready, 10_000, 'sink start');

  const ask = (cmd: string, extra: Record<string, unknown> = {}): Promise<Record<string, unknown>> => {
    const id = nextId++;
    const answer = new Promise<Record<string, unknown>>((resolve) => pending.set(id, resolve));
    child.proc.send({ id, cmd, ...extra });
    return withTimeout(answer, 10_000, `sink ${cmd}`).finally(() => pending.delete(id));
  };

  return {
    url: `http://127.0.0.1:${port}`,
    child,
    async stats() {
      return (await ask('stats')) as unknown as SinkStats;
    },
    async times(keys) {
      const m = await ask('times', keys ? { keys } : {});
      return new Map(m.times as Array<[string, number]>);
    },
    async reset() {
      await ask('reset');
    },
    async faults(f) {
      return ((await ask('faults', { ...f })).faults ?? null) as SinkFaults | null;
    },
    async effects(withKeys = false) {
      const { id: _id, ...rest } = await ask('effects', withKeys ? { keys: true } : {});
      return rest as unknown as SinkEffects;
    },
    async stop() {
      await stopChild(child, 3000, () => child.proc.send({ cmd: 'stop' }));
    },
  };
}
