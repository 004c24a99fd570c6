/** Doctor, 2. who runs maintenance: pg_cron's jobs, or the listeners' fallback timer; the listeners' heartbeats; the delivery fence. */
import type pg from 'pg';
import { errText, iso, line, type CheckLine } from './lines.js';
import { doctorSql as q } from './sql.js';

export async function checkMaintenance(c: pg.Client): Promise<CheckLine[]> {
  let scheduled: boolean;
  try {
    scheduled = (await c.query(q.cronScheduled)).rows[0].scheduled;
  } catch (err) {
    return [line('pg_cron', 'cloud.cron_jobs_scheduled()', 'fail', errText(err))];
  }
  const listeners = [...(await checkListeners(c, scheduled)), await checkDeliveryFence(c)];
  if (!scheduled) {
    return [line('pg_cron', 'maintenance', 'warn', "pg_cron absent here: the listener's fallback timer runs maintenance"), ...listeners];
  }
  return [...(await checkCronJobs(c)), ...listeners];
}

interface ListenerRow { worker_id: string; host: string | null; pid: number | null; endpoints: string[] | null; age_s: number; live: boolean }

/**
 * The listeners as cloud.listener has them, with or without pg_cron: who is
 * live (a heartbeat within the last minute), who has gone silent (paused or
 * frozen: the reaper forgets it after 2 minutes, and it registers again when it
 * resumes), and endpoints with pending messages that no live listener serves.
 * Without pg_cron a live listener is also what runs maintenance.
 */
async function checkListeners(c: pg.Client, cron: boolean): Promise<CheckLine[]> {
  const name = 'listener heartbeat';
  try {
    const rows = (await c.query<ListenerRow>(q.listeners)).rows;
    const live = rows.filter((r) => r.live);
    const silent = rows.filter((r) => !r.live);
    const out: CheckLine[] = [];
    if (live.length === 0) {
      const last = rows.length ? `; last heartbeat ${Math.min(...rows.map((r) => r.age_s))} s ago` : '';
      out.push(line(name, 'cloud.listener', 'warn', cron
        ? `no listener running${last}: messages wait in the outbox until one starts (pg_cron runs maintenance)`
        : `no listener running${last}: nothing delivers and nothing runs maintenance (no pg_cron, no live listener)`));
    } else {
      const who = live.map((r) => `${r.worker_id}${r.host ? ` on ${r.host}` : ''}${r.pid ? ` pid ${r.pid}` : ''}`).join(', ');
      out.push(line(name, 'cloud.listener', 'ok',
        `${live.length} listener(s) live (${who}), last heartbeat ${Math.min(...live.map((r) => r.age_s))} s ago${cron ? '' : '; they run maintenance'}`));
    }
    for (const r of silent) {
      out.push(line('listener silent', r.worker_id, 'warn',
        `no heartbeat for ${r.age_s} s: paused, frozen or gone? The reaper forgets it after 120 s; it registers again if it resumes`));
    }
    if (live.length > 0) {
      for (const e of (await c.query<{ name: string; pending: number }>(q.unservedEndpoints)).rows) {
        out.push(line('listener coverage', e.name, 'warn', `${e.pending} pending message(s) and no live listener serves this endpoint (ERP_CLOUD_ENDPOINTS)`));
      }
    }
    return out;
  } catch (err) {
    return [line(name, 'cloud.listener', 'fail', errText(err))];
  }
}

async function checkCronJobs(c: pg.Client): Promise<CheckLine[]> {
  try {
    const jobs = (await c.query(q.cronJobs)).rows as Array<{
      jobname: string; schedule: string; active: boolean; last_status: string | null; last_message: string | null;
      last_at: Date | null; last_success_at: Date | null; recent_success: boolean;
    }>;
    return jobs.map((j) => {
      const target = j.jobname;
      if (!j.active) return line('pg_cron job', target, 'fail', `inactive (cron.job.active = false): maintenance "${j.jobname}" does not run`);
      if (j.last_status === 'failed') return line('pg_cron job', target, 'fail', `last run failed at ${iso(j.last_at)}: ${j.last_message ?? '(no message)'}`);
      if (!j.last_status) return line('pg_cron job', target, 'warn', `no run recorded yet (schedule ${j.schedule}; is cron.log_run on?)`);
      if (j.schedule.trim() === '* * * * *' && !j.recent_success) {
        return line('pg_cron job', target, 'fail', j.last_success_at
          ? `runs every minute but last succeeded at ${iso(j.last_success_at)} (last run ${j.last_status})`
          : `runs every minute but has not succeeded yet (last run ${j.last_status})`);
      }
      return line('pg_cron job', target, 'ok', `${j.schedule}: last run ${j.last_status} at ${iso(j.last_at)}`);
    });
  } catch (err) {
    return [line('pg_cron job', 'cron.job', 'fail', errText(err))];
  }
}

interface FenceRow { raised_at: Date; fence_until: Date; never_raised: boolean; in_force: boolean; waiting: number }

/**
 * The delivery fence (migration 0034): after a crash of PostgreSQL, what was enqueued before it waits
 * until the longest lease a claim could have given had run out, so that no message goes out twice at
 * once. While it holds, pending messages that do not move are expected: this line says why, and until when.
 */
async function checkDeliveryFence(c: pg.Client): Promise<CheckLine> {
  const name = 'delivery fence';
  try {
    const f = (await c.query<FenceRow>(q.deliveryFence)).rows[0];
    if (!f) {
      return line(name, 'cloud.delivery_fence', 'warn',
        'emptied by a crash of PostgreSQL (or a standby\'s promotion), and no claim has run since: the next claim holds what was enqueued before the crash until the longest lease could have run out');
    }
    if (f.in_force) {
      return line(name, 'cloud.delivery_fence', 'warn',
        `raised at ${iso(f.raised_at)} after a crash of PostgreSQL: ${f.waiting} pending message(s) enqueued before it wait until ${iso(f.fence_until)} (the longest lease a claim could have given before the crash); what is enqueued since goes at once`);
    }
    return line(name, 'cloud.delivery_fence', 'ok', f.never_raised ? 'none: no crash since installation' : `none in force (last raised at ${iso(f.raised_at)}, lifted at ${iso(f.fence_until)})`);
  } catch (err) {
    return line(name, 'cloud.delivery_fence', 'fail', errText(err));
  }
}
