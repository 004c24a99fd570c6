/** Prometheus metrics (prom-client), one registry per worker so several can share a process in tests. */
import client from 'prom-client';
import type pg from 'pg';
import { sql } from './queries.js';

export interface Metrics {
  registry: client.Registry;
  deliveries: client.Counter<'endpoint' | 'outcome'>;
  attemptSeconds: client.Histogram<'endpoint' | 'outcome'>;
  /** One claim round trip (cloud.claim_messages), by whether it brought work. */
  claimSeconds: client.Histogram<'result'>;
}

export function createMetrics(pool: pg.Pool): Metrics {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry, prefix: 'erp_cloud_' });
  const deliveries = new client.Counter({
    name: 'erp_cloud_deliveries_total',
    help: 'Attempts by endpoint and the message status they led to (sent, pending = will retry, failed, dead, lease_lost).',
    labelNames: ['endpoint', 'outcome'] as const,
    registers: [registry],
  });
  const attemptSeconds = new client.Histogram({
    name: 'erp_cloud_attempt_duration_seconds',
    help: 'HTTP attempt latency by endpoint and verdict (ok, retryable, permanent).',
    labelNames: ['endpoint', 'outcome'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  const claimSeconds = new client.Histogram({
    name: 'erp_cloud_claim_duration_seconds',
    help: 'One claim round trip (cloud.claim_messages) as the listener sees it, by result (work or empty): it grows when the queue bloats.',
    labelNames: ['result'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    registers: [registry],
  });
  // queue figures are read from cloud.endpoint_status when Prometheus scrapes;
  // both gauges share one query per scrape
  let snapshot: { at: number; rows: Promise<Array<Record<string, unknown>>> } | null = null;
  const endpointRows = () => {
    if (!snapshot || Date.now() - snapshot.at > 500) {
      snapshot = { at: Date.now(), rows: pool.query(sql.endpointStatus).then((r) => r.rows) };
    }
    return snapshot.rows;
  };
  new client.Gauge({
    name: 'erp_cloud_queue_depth',
    help: 'Unfinished messages by endpoint and status (due = pending and due now; parked_keys = ordering keys held by a failed or dead head).',
    labelNames: ['endpoint', 'status'] as const,
    registers: [registry],
    async collect() {
      this.reset();
      for (const r of await endpointRows()) {
        for (const status of ['pending', 'due', 'in_flight', 'failed', 'dead', 'parked_keys']) {
          this.set({ endpoint: String(r.endpoint), status }, Number(r[status]));
        }
      }
    },
  });
  new client.Gauge({
    name: 'erp_cloud_oldest_pending_age_seconds',
    help: 'Age of the oldest pending message by endpoint (0 when none).',
    labelNames: ['endpoint'] as const,
    registers: [registry],
    async collect() {
      this.reset();
      for (const r of await endpointRows()) this.set({ endpoint: String(r.endpoint) }, Number(r.oldest_pending_age_s ?? 0));
    },
  });
  new client.Gauge({
    name: 'erp_cloud_circuit_state',
    help: 'Circuit breaker by endpoint: 0 closed, 1 half-open (a probe is out), 2 open.',
    labelNames: ['endpoint'] as const,
    registers: [registry],
    async collect() {
      this.reset();
      const code: Record<string, number> = { closed: 0, half_open: 1, open: 2 };
      for (const r of await endpointRows()) this.set({ endpoint: String(r.endpoint) }, code[String(r.circuit_state)] ?? 0);
    },
  });
  new client.Gauge({
    name: 'erp_cloud_endpoint_paused',
    help: '1 while an endpoint is paused by a 429 from its cloud (for all listeners), else 0.',
    labelNames: ['endpoint'] as const,
    registers: [registry],
    async collect() {
      this.reset();
      for (const r of await endpointRows()) this.set({ endpoint: String(r.endpoint) }, r.paused_until ? 1 : 0);
    },
  });
  return { registry, deliveries, attemptSeconds, claimSeconds };
}
