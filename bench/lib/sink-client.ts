/**
 * The parent's handle on the HTTP sink child (bench/sink.ts): start it, ask it
 * for counts and receive times over IPC (each request with a timeout), stop it.
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

export interface Sink {
  url: string;
  child: Child;
  stats(): Promise<SinkStats>;
  /** Receive time (epoch ms) per Idempotency-Key; all keys when none are given. */
  times(keys?: string[]): Promise<Map<string, number>>;
  reset(): Promise<void>;
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
    async stop() {
      await stopChild(child, 3000, () => child.proc.send({ cmd: 'stop' }));
    },
  };
}
