/** Structured logs (pino, JSON lines on stdout). */
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string, name = 'erp-cloud'): Logger {
  return pino({
    name,
    level,
    // secrets must never reach application logs, whatever a caller passes in
    redact: { paths: ['*.authorization', '*.Authorization', '*.password', '*.secret', '*.accessToken', 'headers.*'], censor: '[redacted]' },
  });
}
