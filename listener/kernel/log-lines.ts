/**
 * The listener's log lines: what createLogger (logger.ts, pino) writes — JSON lines on stdout,
 * {"level":30,"time":…,"pid":…,"hostname":…,"name":…, the fields, "msg":…}, pino's level numbers
 * and names, an Error as {type, message, stack, …}, the same keys redacted — written without
 * loading pino: pino and its packages are about 20 ms of CPU at every start of a listener, which
 * logs a few lines. `erp-cloud listen` uses it; the other servers keep pino.
 */
import os from 'node:os';
import { format } from 'node:util';
import type { Logger } from './logger.js';

const LEVELS: Record<string, number> = { fatal: 60, error: 50, warn: 40, info: 30, debug: 20, trace: 10 };
/** Secrets must never reach application logs, whatever a caller passes in: logger.ts's REDACT_PATHS (these keys one level down, and every header). */
const REDACTED_KEYS: ReadonlySet<string> = new Set(['authorization', 'Authorization', 'password', 'secret', 'accessToken']);
const CENSOR = '[redacted]';

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

/** An Error as pino's serializer writes it: its class, message and stack, and its own fields (code …). */
function errorObject(err: Error): Record<string, unknown> {
  const out: Record<string, unknown> = { type: err.constructor?.name ?? 'Error', message: err.message, stack: err.stack };
  for (const [k, v] of Object.entries(err)) if (!(k in out)) out[k] = v instanceof Error ? errorObject(v) : v;
  return out;
}

/** One field's value as logged: an Error serialized, the redacted keys of an object (all of `headers`) censored. */
function loggable(key: string, v: unknown): unknown {
  if (v instanceof Error) return errorObject(v);
  if (!isPlainObject(v)) return v;
  let out: Record<string, unknown> | null = null;
  for (const k of Object.keys(v)) {
    if (key === 'headers' || REDACTED_KEYS.has(k)) (out ??= { ...v })[k] = CENSOR;
  }
  return out ?? v;
}

/** JSON that never throws: a bigint as a number, a cycle as "[Circular]". */
function json(v: unknown): string {
  try {
    return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? Number(x) : x)) ?? 'null';
  } catch {
    const seen = new WeakSet<object>();
    return JSON.stringify(v, (_k, x: unknown) => {
      if (typeof x === 'bigint') return Number(x);
      if (x !== null && typeof x === 'object') {
        if (seen.has(x)) return '[Circular]';
        seen.add(x);
      }
      return x;
    }) ?? 'null';
  }
}

export function createLineLogger(level: string, name = 'erp-cloud', write: (line: string) => void = (line) => void process.stdout.write(line)): Logger {
  const threshold = level === 'silent' ? Infinity : LEVELS[level] ?? LEVELS.info!;
  const head = `,"pid":${process.pid},"hostname":${JSON.stringify(os.hostname())},"name":${JSON.stringify(name)}`;
  const method = (lv: number) => {
    if (lv < threshold) return () => undefined;
    return (first: unknown, ...rest: unknown[]): void => {
      let fields = '';
      let msg: string | undefined;
      if (typeof first === 'string') {
        msg = rest.length > 0 ? format(first, ...rest) : first;
      } else {
        if (first instanceof Error) {
          fields = `,"err":${json(errorObject(first))}`;
          msg = first.message;
        } else if (first !== null && typeof first === 'object') {
          for (const [k, v] of Object.entries(first)) if (v !== undefined) fields += `,${JSON.stringify(k)}:${json(loggable(k, v))}`;
        }
        if (typeof rest[0] === 'string') msg = rest.length > 1 ? format(rest[0], ...rest.slice(1)) : rest[0];
      }
      write(`{"level":${lv},"time":${Date.now()}${head}${fields}${msg === undefined ? '' : `,"msg":${JSON.stringify(msg)}`}}\n`);
    };
  };
  return {
    fatal: method(60), error: method(50), warn: method(40), info: method(30), debug: method(20), trace: method(10),
  } as unknown as Logger;
}
