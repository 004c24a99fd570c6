/**
 * Loads the `pg` package the way a listener's start wants it. On Node 20, pg's stream module asks
 * whether it runs in a Cloudflare Worker by constructing a `Response` (lib/stream.js,
 * isCloudflareRuntime: Node 20 has no `navigator`), and the first touch of `Response` loads Node's
 * whole fetch implementation (undici): about 20 ms of CPU at every start of a process that never
 * fetches. While pg loads (synchronously, so no other code can observe it) `Response` reads as
 * undefined, and pg chooses Node's sockets as it would anyway; the global is restored untouched
 * (still the lazy getter). Where `navigator` exists (Node 21+) pg asks that first and this does nothing.
 */
import { createRequire } from 'node:module';

export function loadPg(): void {
  const response = Object.getOwnPropertyDescriptor(globalThis, 'Response');
  if (typeof (globalThis as { navigator?: unknown }).navigator !== 'undefined' || !response?.configurable) return;
  Object.defineProperty(globalThis, 'Response', { value: undefined, configurable: true, writable: true, enumerable: response.enumerable ?? false });
  try {
    createRequire(import.meta.url)('pg');
  } finally {
    Object.defineProperty(globalThis, 'Response', response);
  }
}
