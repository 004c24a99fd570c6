/** Structured logs (pino, JSON lines on stdout). */
import { pino, type Logger as PinoLogger } from 'pino';

/**
 * What the listener's code asks of a logger: pino's log methods.
 */
export type Logger = Pick<PinoLogger, 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace'>;

/** The log redaction every erp-cloud process applies. */
export const REDACT_PATHS = ['*.authorization', '*.Authorization', '*.password', '*.secret', '*.accessToken', 'headers.*'];

export function createLogger(level: string, name = 'erp-cloud'): PinoLogger {
  return pino({
    name,
    level,
    // secrets must never reach application logs, whatever a caller passes in
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
  });
}
