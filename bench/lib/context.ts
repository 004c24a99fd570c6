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
}
