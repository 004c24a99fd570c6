/**
 * The bench's endpoint, messages and outbox state: register the sink as
 * endpoint 'sink', enqueue n identical benchmark messages in chunks (one
 * statement per chunk), and count outbox rows by status.
 */
import type pg from 'pg';

/** A pg.Pool or a connected pg.Client. */
export interface Queryable {
  query<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<pg.QueryResult<R>>;
}

/**
 * Registers endpoint 'sink' (provider webhook) at the bench's HTTP sink. The
 * sink listens on 127.0.0.1, which the listener's egress guard refuses unless
 * the endpoint allows private addresses: this one does.
 */
export async function putSinkEndpoint(q: Queryable, sinkUrl: string): Promise<void> {
  await q.query(`select cloud.put_endpoint('sink', $1)`, [`${sinkUrl}/webhook`]);
  await q.query(`select cloud.put_endpoint_allowlist('sink', '{}', '{}', true)`);
}

/** Enqueues `n` 'bench.ping' messages for `endpoint` (default 'sink') through cloud.enqueue_message, `chunk` per statement. */
export async function enqueueBenchMessages(q: Queryable, n: number, chunk = 5000, endpoint = 'sink'): Promise<void> {
  for (let from = 1; from <= n; from += chunk) {
    await q.query(
      `select count(cloud.enqueue_message($3::text, 'bench.ping', jsonb_build_object('i', g, 'note', 'benchmark message')))
         from generate_series($1::int, $2::int) g`,
      [from, Math.min(n, from + chunk - 1), endpoint],
    );
  }
}

export interface OutboxCounts {
  total: number;
  pending: number;
  in_flight: number;
  sent: number;
  /** failed, dead, skipped */
  other: number;
}

/** Outbox rows by status (a full count: call it outside the measured windows). */
export async function outboxCounts(q: Queryable): Promise<OutboxCounts> {
  const { rows } = await q.query<OutboxCounts>(
    `select count(*)::int total,
            count(*) filter (where status = 'pending')::int pending,
            count(*) filter (where status = 'in_flight')::int in_flight,
            count(*) filter (where status = 'sent')::int sent,
            count(*) filter (where status not in ('pending', 'in_flight', 'sent'))::int other
       from cloud.outbox`,
  );
  return rows[0]!;
}
