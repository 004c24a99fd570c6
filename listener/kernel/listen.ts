/**
 * The one dedicated LISTEN connection, on the `pg` client alone (no pg-listen).
 *
 * - LISTENs on the given channels (names quoted with pg's escapeIdentifier) and calls `onWake(channel)`
 *   for every NOTIFY on them.
 * - Notices a lost connection three ways: the client's 'error' and 'end' events, and a keep-alive
 *   `select 1` every `keepAliveMs`: a query still unanswered at the next tick (a silently dead TCP
 *   connection) counts as lost, so a dead socket is noticed within two intervals.
 * - Reconnects forever (until close) with capped exponential backoff plus jitter, the numbers the
 *   pg-listen configuration had: min(250 ms × 2^attempt, 5 s) × 0.8–1.2; re-issues LISTEN for every
 *   channel, then calls `onWake('reconnected')` once so nothing committed while it was deaf waits
 *   for the poll.
 * - close() ends the client and clears every timer: nothing keeps the process alive afterwards.
 */
import pg from 'pg';
import type { Logger } from './logger.js';

export interface ListenConnection {
  /** True while the connection is up and LISTENs on every channel. */
  connected(): boolean;
  /** LISTENs on these channels too (already known ones are skipped); remembered for every reconnect. */
  listenTo(channels: string[]): Promise<void>;
  close(): Promise<void>;
}

export interface ListenOptions {
  /** application_name of the connection (what pg_stat_activity shows). */
  applicationName?: string;
  /** Keep-alive query interval; pg-listen ran its "paranoid checking" every 10 s. */
  keepAliveMs?: number;
  /** First reconnect delay and its cap (before the ±20 % jitter). */
  baseMs?: number;
  capMs?: number;
}

/** The keep-alive interval pg-listen was configured with (paranoidChecking: 10_000). */
const KEEP_ALIVE_MS = 10_000;

export async function createListenConnection(
  connectionString: string,
  onWake: (channel: string) => void,
  log: Logger,
  opts: ListenOptions = {},
): Promise<ListenConnection> {
  const applicationName = opts.applicationName ?? 'erp-cloud listen';
  const keepAliveMs = opts.keepAliveMs ?? KEEP_ALIVE_MS;
  const baseMs = opts.baseMs ?? 250;
  const capMs = opts.capMs ?? 5000;
  const channels = new Set<string>();
  let client: pg.Client | null = null;
  let up = false;
  let closed = false;
  let reconnecting = false;
  let pinging = false;
  let keepAlive: NodeJS.Timeout | null = null;
  let sleeping: { timer: NodeJS.Timeout; wakeUp: () => void } | null = null;

  /** Drops a client without waiting for it: its socket is destroyed, so a dead peer cannot hold anything open. */
  function discard(c: pg.Client): void {
    c.removeAllListeners('notification');
    c.removeAllListeners('end');
    c.removeAllListeners('error');
    c.on('error', () => undefined); // late errors of a dropped client are nobody's business
    (c as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
    c.end().catch(() => undefined);
  }

  /** Connects a new client, LISTENs on every channel (also those added meanwhile), and makes it the current one. */
  async function open(): Promise<void> {
    const c = new pg.Client({
      connectionString, application_name: applicationName, keepAlive: true, keepAliveInitialDelayMillis: keepAliveMs,
      connectionTimeoutMillis: Math.max(keepAliveMs, 1000),
    });
    c.on('error', (err) => lost(c, err));
    c.on('end', () => lost(c, new Error('connection ended')));
    c.on('notification', (n) => {
      if (c === client) onWake(n.channel);
    });
    try {
      await c.connect();
      // a Set's iteration also visits channels listenTo adds while this loop awaits
      for (const ch of channels) await c.query(`LISTEN ${c.escapeIdentifier(ch)}`);
    } catch (err) {
      discard(c);
      throw err;
    }
    if (closed) {
      discard(c);
      throw new Error('LISTEN connection closed');
    }
    // only now the current client: until here its 'error' and 'end' are this attempt's failure, not a loss
    client = c;
    up = true;
    pinging = false;
  }

  /** The current client is gone (error, end, unanswered keep-alive): drop it and reconnect. */
  function lost(c: pg.Client, err: Error): void {
    if (c !== client || closed) return;
    client = null;
    up = false;
    discard(c);
    log.error({ err: err.message }, 'LISTEN connection failed');
    void reconnect();
  }

  async function reconnect(): Promise<void> {
    if (reconnecting) return;
    reconnecting = true;
    try {
      for (let attempt = 1; !closed; attempt++) {
        log.warn({ attempt }, 'LISTEN connection lost, reconnecting');
        const delay = Math.min(baseMs * 2 ** Math.min(attempt - 1, 20), capMs) * (0.8 + Math.random() * 0.4);
        await sleep(delay);
        if (closed) return;
        try {
          await open();
        } catch (err) {
          if (closed) return;
          log.warn({ attempt, err: (err as Error).message }, 'LISTEN reconnect failed');
          continue;
        }
        log.info({ attempts: attempt, channels: [...channels] }, 'LISTEN connection re-established');
        onWake('reconnected');
        return;
      }
    } finally {
      reconnecting = false;
    }
  }

  function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wakeUp = (): void => {
        clearTimeout(timer);
        sleeping = null;
        resolve();
      };
      const timer = setTimeout(wakeUp, ms);
      sleeping = { timer, wakeUp };
    });
  }

  /** One cheap query per interval; the previous one still unanswered means the connection is dead. */
  function tick(): void {
    const c = client;
    if (!c || !up) return;
    if (pinging) {
      lost(c, new Error(`keep-alive query unanswered for ${keepAliveMs} ms`));
      return;
    }
    pinging = true;
    c.query('select 1').then(
      () => {
        if (c === client) pinging = false;
      },
      (err: Error) => lost(c, err),
    );
  }

  await open();
  keepAlive = setInterval(tick, keepAliveMs);

  return {
    connected: () => up,
    async listenTo(list) {
      for (const ch of list) {
        if (channels.has(ch)) continue;
        channels.add(ch); // remembered first: a reconnect LISTENs on it even when this query is cut off
        const c = client;
        if (!c || !up) continue;
        try {
          await c.query(`LISTEN ${c.escapeIdentifier(ch)}`);
        } catch (err) {
          if (c === client && up) {
            channels.delete(ch); // the connection is fine: the channel itself was refused
            throw err;
          }
        }
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      up = false;
      if (keepAlive) clearInterval(keepAlive);
      keepAlive = null;
      sleeping?.wakeUp();
      const c = client;
      client = null;
      if (!c) return;
      c.removeAllListeners('end');
      c.removeAllListeners('error');
      c.on('error', () => undefined);
      // a clean end (Terminate), but never waiting longer than a second for a peer that does not answer
      let timer: NodeJS.Timeout | undefined;
      const ended = await Promise.race([
        c.end().then(() => true, () => true),
        new Promise<false>((r) => {
          timer = setTimeout(() => r(false), 1000);
        }),
      ]);
      clearTimeout(timer);
      if (!ended) discard(c);
    },
  };
}
