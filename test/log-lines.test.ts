/**
 * The listener's log lines (listener/kernel/log-lines.ts, written without loading pino) are the
 * lines pino writes with the same settings (logger.ts): same fields in the same order, same
 * redaction, same Error shape, same levels.
 */
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { createLineLogger } from '../listener/kernel/log-lines.js';
import { REDACT_PATHS } from '../listener/kernel/logger.js';

function both(level: string): { light: ReturnType<typeof createLineLogger>; heavy: pino.Logger; lines: () => { light: string[]; heavy: string[] } } {
  const light: string[] = [];
  const heavy: string[] = [];
  const norm = (l: string) => l.trim().replace(/"time":\d+/, '"time":0');
  return {
    light: createLineLogger(level, 'erp-cloud', (l) => light.push(norm(l))),
    heavy: pino({ name: 'erp-cloud', level, redact: { paths: REDACT_PATHS, censor: '[redacted]' } },
      new Writable({ write(c: Buffer, _e, cb) { heavy.push(norm(c.toString())); cb(); } })),
    lines: () => ({ light, heavy }),
  };
}

describe('the listener\'s log lines', () => {
  it('are pino\'s lines: fields in order, Errors serialized, secrets and headers redacted, printf-style messages, levels filtered', async () => {
    const { light, heavy, lines } = both('info');
    const cases: unknown[][] = [
      [{ worker: 'w1', channels: ['cloud_outbox'], concurrency: 64 }, 'listener started'],
      [{ url: 'http://127.0.0.1:9464' }, 'health and metrics'],
      [{ err: Object.assign(new Error('boom'), { code: '57P01' }), attempt: 2 }, 'claim failed; retrying'],
      [{ headers: { authorization: 'Bearer t0ken', 'x-a': '1' }, auth: { password: 'hunter2', user: 'u' }, at: new Date(0), n: 10n, skip: undefined }, 'redacted'],
      [new Error('direct')],
      ['plain %s and %d', 'text', 42],
      [{ only: 'fields' }],
    ];
    for (const c of cases) {
      (light.warn as (...a: unknown[]) => void)(...c);
      (heavy.warn as (...a: unknown[]) => void)(...c);
    }
    light.debug('below the level');
    heavy.debug('below the level');
    await new Promise((r) => setImmediate(r));
    const { light: l, heavy: h } = lines();
    expect(l).toHaveLength(cases.length);
    expect(l).toEqual(h);
    expect(l.join('\n')).not.toMatch(/t0ken|hunter2/);
    expect(JSON.parse(l[0]!)).toMatchObject({ level: 40, name: 'erp-cloud', pid: process.pid, msg: 'listener started' });
  });

  it('silent writes nothing', () => {
    const out: string[] = [];
    const log = createLineLogger('silent', 'erp-cloud', (l) => out.push(l));
    log.fatal('nothing');
    log.error({ a: 1 }, 'nothing');
    expect(out).toEqual([]);
  });
});
