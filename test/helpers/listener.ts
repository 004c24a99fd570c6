/** Listeners for tests: in-process workers, and real child processes for kill / signal tests. */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { loadConfig, type Config } from '../../listener/kernel/config.js';
import { createPool } from '../../listener/kernel/db.js';
import { createLogger } from '../../listener/kernel/logger.js';
import { createMetrics, type Metrics } from '../../listener/delivery/metrics.js';
import { Worker } from '../../listener/delivery/worker.js';

export interface InProcessListener {
  worker: Worker;
  metrics: Metrics;
  stop(): Promise<void>;
}

export async function startListener(url: string, env: Record<string, string> = {}): Promise<InProcessListener> {
  const config: Config = loadConfig({
    DATABASE_URL: url,
    ERP_CLOUD_WORKER_ID: `test-${randomBytes(3).toString('hex')}`,
    ERP_CLOUD_LOG_LEVEL: 'silent',
    ERP_CLOUD_POLL_MS: '200',
    ERP_CLOUD_MAINTENANCE_MS: '500',
    ERP_CLOUD_LEASE_MARGIN_MS: '1000',
    ERP_CLOUD_POOL_SIZE: '4',
    ...env,
  });
  const log = createLogger(config.ERP_CLOUD_LOG_LEVEL);
  const pool = createPool(config.DATABASE_URL, config.ERP_CLOUD_POOL_SIZE, log);
  const metrics = createMetrics(pool);
  const worker = new Worker(config, pool, log, metrics);
  await worker.start();
  return {
    worker,
    metrics,
    async stop() {
      await worker.stop();
      await pool.end();
    },
  };
}

export interface ChildListener {
  proc: ChildProcess;
  output(): string;
  exited: Promise<number | null>;
}

/** `erp-cloud listen` as a real process (dist/ is built by `make test`). */
export function spawnListener(url: string, env: Record<string, string> = {}): ChildListener {
  let out = '';
  const proc = spawn(process.execPath, ['dist/listener/cli.js', 'listen'], {
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: url,
      ERP_CLOUD_LOG_LEVEL: 'info',
      ERP_CLOUD_HTTP_PORT: '-1',
      ERP_CLOUD_POLL_MS: '200',
      ERP_CLOUD_MAINTENANCE_MS: '500',
      ERP_CLOUD_LEASE_MARGIN_MS: '1000',
      ERP_CLOUD_POOL_SIZE: '4',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  return { proc, output: () => out, exited };
}
