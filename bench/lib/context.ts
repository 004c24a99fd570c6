/**
 * What every figure gets from the runner: the server URL, quick or full mode,
 * the database registry (so everything created is dropped), and the one HTTP
 * sink process shared by all figures (reset between measurements).
 */
import type { DbRegistry } from './db.js';
import type { Sink } from './sink-client.js';

export interface BenchContext {
  serverUrl: string;
  quick: boolean;
  dbs: DbRegistry;
  sink: Sink;
  /**
   * The previous figure's tail: work it left running when it returned its result (held_snapshot's wait
   * after release, measured in its own database, and its teardown). The runner starts a figure that
   * declares it overlaps (run.ts, OVERLAPS_PREVIOUS_TAIL) while the tail runs: such a figure does its set-up
   * in its own database and awaits this before it measures anything. Every other figure starts after it.
   */
  previousTail: Promise<void>;
}
