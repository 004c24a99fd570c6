/**
 * The HTTP sink, run as a child process (fork) so that it never shares an
 * event loop with the system under test. It answers every POST with 200
 * {"ok":true}, counts requests, and remembers when each Idempotency-Key
 * arrived (epoch ms, sub-ms precision). The parent talks to it over IPC:
 *
 *   → {id, cmd: 'stats'}           ← {id, count, distinct, duplicates, firstAt, lastAt}
 *   → {id, cmd: 'times', keys?}    ← {id, times: [[key, epochMs], ...]}
 *   → {id, cmd: 'reset'}           ← {id}
 *   → {cmd: 'stop'}                   closes the server and exits
 *
 * On start it sends {ready: true, port}.
 */
import http from 'node:http';

const epochMs = () => performance.timeOrigin + performance.now();

let count = 0;
let duplicates = 0;
let firstAt: number | null = null;
let lastAt: number | null = null;
let seen = new Map<string, number>();

const reply = Buffer.from('{"ok":true}');

const server = http.createServer((req, res) => {
  const at = epochMs();
  if (req.method !== 'POST') {
    res.writeHead(req.url === '/healthz' ? 200 : 405, { 'content-type': 'application/json' }).end(reply);
    return;
  }
  count++;
  firstAt ??= at;
  lastAt = at;
  const key = req.headers['idempotency-key'];
  if (typeof key === 'string') {
    if (seen.has(key)) duplicates++;
    else seen.set(key, at);
  }
  req.on('data', () => undefined);
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': reply.length }).end(reply);
  });
});
server.keepAliveTimeout = 120_000;
server.headersTimeout = 130_000;

type Msg = { id?: number; cmd: 'stats' | 'times' | 'reset' | 'stop'; keys?: string[] };

process.on('message', (m: Msg) => {
  const send = (body: Record<string, unknown>) => process.send?.({ id: m.id, ...body });
  switch (m.cmd) {
    case 'stats':
      send({ count, distinct: seen.size, duplicates, firstAt, lastAt });
      break;
    case 'times':
      send({ times: m.keys ? m.keys.filter((k) => seen.has(k)).map((k) => [k, seen.get(k)]) : [...seen.entries()] });
      break;
    case 'reset':
      count = 0;
      duplicates = 0;
      firstAt = null;
      lastAt = null;
      seen = new Map();
      send({});
      break;
    case 'stop':
      server.closeAllConnections();
      server.close(() => process.exit(0));
      setTimeout(() => process.exit(0), 2000).unref();
      break;
  }
});
// the parent went away: do not outlive it
process.on('disconnect', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));

server.listen(0, '127.0.0.1', () => {
  const addr = server.address();
  process.send?.({ ready: true, port: typeof addr === 'object' && addr ? addr.port : 0 });
});
