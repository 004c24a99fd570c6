/**
 * The engine's calls as a listener makes them, for tests that drive the outbox from SQL: report
 * claimed messages delivered, and say where each message is (which table of cloud.outbox, which status).
 */
import type pg from 'pg';

export interface ClaimedRef { request_id: string; attempt: number }

/** Reports every claimed message as delivered (HTTP 200), as the listener's record_attempts call does. */
export function reportDelivered(db: pg.Pool | pg.ClientBase, worker: string, claimed: ClaimedRef[]) {
  return db.query(`select * from cloud.record_attempts($1, $2::jsonb)`, [worker, JSON.stringify(claimed.map((m) => ({
    request_id: m.request_id, attempt: m.attempt, outcome: 'ok', method: 'POST', url: 'http://127.0.0.1:9/webhook', http_status: 200,
    duration_ms: 1, started_at: new Date().toISOString(), response: { ok: true },
  })))]);
}

/** How many messages wait where: 'cloud.outbox_intake pending', 'cloud.outbox in_flight', 'cloud.outbox_archive sent' … */
export async function whereMessages(db: pg.Pool | pg.ClientBase): Promise<Record<string, number>> {
  const { rows } = await db.query<{ t: string; n: number }>(
    `select tableoid::regclass::text || ' ' || status as t, count(*)::int as n from cloud.outbox group by 1 order by 1`);
  return Object.fromEntries(rows.map((r) => [r.t, r.n]));
}

/**
 * cloud.rotate_outbox gives up within 50 ms when anybody holds the hot table or the intake, autovacuum and
 * autoanalyze included (they yield their lock to a waiter only after deadlock_timeout, 1 s). In production the
 * next round rotates; a test that asserts what one rotation did switches autovacuum off for those two tables of
 * its own database, so that the rotation's rules decide and not the launcher's timing (on a loaded CI machine
 * one rotation after 10,000 messages gave up, and the test saw them still in the hot table).
 */
export async function keepAutovacuumOffTheQueue(db: pg.Pool | pg.ClientBase): Promise<void> {
  await db.query(`alter table cloud.outbox set (autovacuum_enabled = false)`);
  await db.query(`alter table cloud.outbox_intake set (autovacuum_enabled = false)`);
}
