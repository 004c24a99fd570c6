/**
 * The HTTP sink, run as a child process (fork) so that it never shares an
 * event loop with the system under test. It answers every POST with 200
 * {"ok":true}, counts requests, and remembers when each Idempotency-Key
 * arrived (epoch ms, sub-ms precision). The parent talks to it over IPC:
 *
 *   → {id, cmd: 'stats'}           ← {id, count, distinct, duplicates, firstAt, lastAt}
 *   → {id, cmd: 'times', keys?}    ← {id, times: [[key, epochMs], ...]}
 *   → {id, cmd: 'reset'}           ← {id}             (also turns faults off)
 *   → {id, cmd: 'faults', fail, timeoutShare?, seed?, holdMs?}
 *                                  ← {id, faults}     (fail 0 turns them off)
 *   → {id, cmd: 'effects', keys?}  ← {id, requests, ok, answered503, timeouts, heldNow, heldMax,
 *                                       keysWithEffect, secondEffects: [[key, n2xx], ...],
 *                                       firstEffects?: [[key, epochMs of its first 2xx], ...] (with keys: true)}
 *   → {cmd: 'stop'}                   closes the server and exits
 *
 * Faults (the 'faults' figure): a seeded PRNG draws one number per POST in
 * arrival order, so the same seed gives the same sequence of faults over the
 * request sequence (the keys themselves differ from run to run). A share
 * `fail` of the requests fails; of those, `timeoutShare` are held open without
 * an answer for `holdMs` (longer than the endpoint's timeout, so the caller
 * gives up first) and then their connection is destroyed; the rest are
 * answered 503 without Retry-After. A fault never has an effect.
 *
 * An "effect" is a 2xx answer: the sink counts them per Idempotency-Key, so a
 * key with two is a message sent twice with a second effect, and a key of the
 * outbox with none was lost.
 *
 * On start it sends {ready: true, port}.
 */
import http from 'node:http';

const epochMs = () => performance.timeOrigin + performance.now();

interface Faults {
  fail: number;
  timeoutShare: number;
  seed: number;
  holdMs: number;
}

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

let count = 0;
let duplicates = 0;
let firstAt: number | null = null;
let lastAt: number | null = null;
let seen = new Map<string, number>();

let faults: Faults | null = null;
let draw: () => number = () => 1;
let ok = 0;
let answered503 = 0;
let timeouts = 0;
let heldMax = 0;
/** 2xx answers per Idempotency-Key. */
let effects = new Map<string, number>();
/** When each Idempotency-Key got its first 2xx (epoch ms). */
let firstEffectAt = new Map<string, number>();
/** Requests held open by a timeout fault; each one is destroyed after holdMs at the latest. */
const held = new Set<http.ServerResponse>();

const reply = Buffer.from('{"ok":true}');
const unavailable = Buffer.from('{"error":"service unavailable (bench fault)"}');

function hold(res: http.ServerResponse, ms: number): void {
  held.add(res);
  heldMax = Math.max(heldMax, held.size);
  const timer = setTimeout(() => res.destroy(), ms);
  res.on('close', () => {
    clearTimeout(timer);
    held.delete(res);
  });
}

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
  // drawn at arrival, in arrival order: the fault sequence depends on the seed only
  const f = faults;
  const u = f ? draw() : 1;
  const fault = f && u < f.fail ? (u < f.fail * f.timeoutShare ? 'timeout' : '503') : null;
  req.on('data', () => undefined);
  req.on('end', () => {
    if (fault === 'timeout') {
      timeouts++;
      hold(res, f!.holdMs);
    } else if (fault === '503') {
      answered503++;
      res.writeHead(503, { 'content-type': 'application/json', 'content-length': unavailable.length }).end(unavailable);
    } else {
      ok++;
      if (typeof key === 'string') {
        effects.set(key, (effects.get(key) ?? 0) + 1);
        if (!firstEffectAt.has(key)) firstEffectAt.set(key, epochMs());
      }
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': reply.length }).end(reply);
    }
  });
});
server.keepAliveTimeout = 120_000;
server.headersTimeout = 130_000;

type Msg = {
  id?: number;
  cmd: 'stats' | 'times' | 'reset' | 'faults' | 'effects' | 'stop';
  keys?: string[] | boolean;
  fail?: number;
  timeoutShare?: number;
  seed?: number;
  holdMs?: number;
};

const share = (x: unknown, dflt: number) => (typeof x === 'number' && x >= 0 && x <= 1 ? x : dflt);

process.on('message', (m: Msg) => {
  const send = (body: Record<string, unknown>) => process.send?.({ id: m.id, ...body });
  switch (m.cmd) {
    case 'stats':
      send({ count, distinct: seen.size, duplicates, firstAt, lastAt });
      break;
    case 'times': {
      const keys = Array.isArray(m.keys) ? m.keys : null;
      send({ times: keys ? keys.filter((k) => seen.has(k)).map((k) => [k, seen.get(k)]) : [...seen.entries()] });
      break;
    }
    case 'reset':
      count = 0;
      duplicates = 0;
      firstAt = null;
      lastAt = null;
      seen = new Map();
      faults = null;
      ok = 0;
      answered503 = 0;
      timeouts = 0;
      heldMax = held.size;
      effects = new Map();
      firstEffectAt = new Map();
      send({});
      break;
    case 'faults': {
      const fail = share(m.fail, 0);
      const seed = Number.isInteger(m.seed) ? m.seed! : 1;
      const holdMs = typeof m.holdMs === 'number' && m.holdMs > 0 ? Math.min(m.holdMs, 60_000) : 3000;
      faults = fail > 0 ? { fail, timeoutShare: share(m.timeoutShare, 0.5), seed, holdMs } : null;
      draw = mulberry32(seed);
      send({ faults });
      break;
    }
    case 'effects': {
      const second = [...effects.entries()].filter(([, n]) => n > 1);
      send({
        requests: count,
        ok,
        answered503,
        timeouts,
        heldNow: held.size,
        heldMax,
        keysWithEffect: effects.size,
        secondEffects: second,
        ...(m.keys === true ? { firstEffects: [...firstEffectAt.entries()] } : {}),
      });
      break;
    }
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
