/**
 * Cloud simulator framework: a small HTTP server on 127.0.0.1 that plays a
 * cloud API for tests and demos.
 *
 * A simulator sits behind two layers, in this order, like a real cloud sits
 * behind its gateway:
 *
 *   1. a fault injector (the "gateway"): it can answer an error status, hang,
 *      drop the connection or delay the request. A faulted request never
 *      reaches the service, so it produces no effect.
 *   2. an idempotency ledger (the "service"): the first request with a given
 *      Idempotency-Key produces an effect and its answer is stored; every later
 *      request with that key gets the stored answer back and no new effect.
 *
 * Tests assert on the ledger ("exactly one effect per key, in this order") and
 * on the request log ("the client retried three times"), either in-process via
 * the SimServer object or over HTTP via the /__sim/* control API.
 */
import http from 'node:http';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

export type FaultKind = 'status' | 'timeout' | 'drop' | 'slow';

export interface Fault {
  kind: FaultKind;
  /** For 'status' (e.g. 500, 503, 429, 400). Defaults to 500. */
  status?: number;
  /** Seconds; sets the Retry-After header on a 'status' answer. */
  retryAfter?: number;
  /** 'slow': delay before answering normally (default 1000). 'timeout': how long to hold the socket before destroying it (default 60000). */
  ms?: number;
  /** Optional JSON body for 'status' (default `{ error: "injected", status }`). */
  body?: unknown;
}

/** A schedule slot that explicitly means "answer normally" (same as null). */
export interface OkSlot {
  kind: 'ok';
}

export type ScheduleEntry = Fault | OkSlot | null;

export interface FaultPlan {
  /** Exact schedule: the next matching requests get these entries in order, one each. */
  schedule?: ScheduleEntry[];
  /** Each matching request independently gets `fault` with probability `rate` (0..1; default 1 when `fault` is given). */
  rate?: number;
  fault?: Fault;
  /** Only requests whose key (Idempotency-Key, else X-Request-Id) equals this are affected. */
  key?: string;
  /** Only requests whose path starts with this are affected (combined with `key` by AND when both are set). */
  pathPrefix?: string;
  /** Keep applying the schedule's LAST entry forever once the schedule runs out. */
  persist?: boolean;
}

export interface LedgerEntry {
  /** Idempotency-Key (or X-Request-Id when no Idempotency-Key). */
  key: string;
  method: string;
  path: string;
  /** Parsed JSON body of the first request that produced an effect (raw string if not JSON, null if empty). */
  body: unknown;
  /** Status of the stored first answer. */
  status: number;
  /** Stored first answer body. */
  response: unknown;
  /** How many requests arrived with this key and reached the ledger (the effect is counted once). */
  hits: number;
  /** Epoch ms (float, sub-ms precision) of the effect. */
  firstAt: number;
  /** Global order in which effects happened (1, 2, 3, ...). */
  seq: number;
}

export interface RequestRecord {
  key: string | null;
  method: string;
  path: string;
  /** Epoch ms (float) when the request arrived. */
  at: number;
  /** Kind of the injected fault, or null. */
  fault: string | null;
  /** Status sent, or null when nothing was sent (drop, timeout, client gone). */
  status: number | null;
}

export interface RouteContext {
  key: string | null;
  body: unknown;
  rawBody: string;
  headers: IncomingHttpHeaders;
  method: string;
  path: string;
  query: URLSearchParams;
  /** For a new effect on an idempotent route: the seq this effect will get if it is stored (status < 500). */
  seq?: number;
}

export interface RouteResult {
  status: number;
  body?: unknown;
  /** A binary answer (a PDF): sent as these bytes instead of JSON. */
  raw?: Buffer;
  headers?: Record<string, string>;
}

export type RouteHandler = (ctx: RouteContext) => RouteResult | Promise<RouteResult>;

export interface SimRoute {
  method: string;
  path: string | RegExp;
  handler: RouteHandler;
  /** Default true: keyed requests go through the idempotency ledger. */
  idempotent?: boolean;
}

export interface SimOptions {
  /** 0 (default) = ephemeral port. */
  port?: number;
  /** Default 127.0.0.1: simulators are never reachable from outside the host. */
  host?: string;
  routes?: SimRoute[];
  name?: string;
  /** Default 1 MiB; bigger bodies get 413. */
  maxBodyBytes?: number;
  /** Random source for rate-based faults (default Math.random); inject one for deterministic tests. */
  random?: () => number;
  /** Enforce a request rate like a real cloud gateway: over it, 429 with Retry-After. */
  rateLimit?: RateLimit | null;
}

/** A cloud's own rate limit: a token bucket of `burst` refilled at `perSecond`. */
export interface RateLimit {
  perSecond: number;
  burst: number;
  /**
   * Delay variation the gateway forgives (default 0): a request may arrive up
   * to this many ms before its token is due, as real gateways allow for jitter
   * on the way (the bucket then holds burst + perSecond × toleranceMs / 1000).
   */
  toleranceMs?: number;
}

export interface SimServer {
  url: string;
  port: number;
  close(): Promise<void>;
  ledger(): LedgerEntry[];
  requests(): RequestRecord[];
  setFaults(plan: FaultPlan | null): void;
  setRateLimit(limit: RateLimit | null): void;
  reset(): void;
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;
const DEFAULT_TIMEOUT_HOLD_MS = 60_000;
const DEFAULT_SLOW_MS = 1_000;
const CONTROL_PREFIX = '/__sim/';

/** Epoch milliseconds with sub-millisecond precision, so effects in the same ms still order. */
function now(): number {
  return performance.timeOrigin + performance.now();
}

function headerValue(headers: IncomingHttpHeaders, name: string): string | null {
  const value = headers[name];
  const first = Array.isArray(value) ? value[0] : value;
  return first === undefined || first === '' ? null : first;
}

/** The idempotency key of a request: Idempotency-Key, else X-Request-Id. */
function requestKey(headers: IncomingHttpHeaders): string | null {
  return headerValue(headers, 'idempotency-key') ?? headerValue(headers, 'x-request-id');
}

/** JSON if it parses, otherwise the raw text; an empty body is null. */
function parseBody(raw: string): unknown {
  if (raw === '') return null;
  try {
    return JSON.parse(raw) as unknown;
  } catch {
    return raw;
  }
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

interface BodyRead {
  raw: string;
  tooLarge: boolean;
}

/**
 * Reads the whole request body. Past the limit we stop buffering but keep
 * draining: answering 413 while the client is still uploading makes many
 * clients report a socket error instead of the 413 we want them to see.
 */
function readBody(req: IncomingMessage, limit: number): Promise<BodyRead> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let ended = false;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= limit) chunks.push(chunk);
    });
    req.on('end', () => {
      ended = true;
      const tooLarge = size > limit;
      resolve({ raw: tooLarge ? '' : Buffer.concat(chunks).toString('utf8'), tooLarge });
    });
    req.on('error', reject);
    req.on('close', () => {
      if (!ended) reject(new Error('client closed the connection before sending the whole body'));
    });
  });
}

/** A JSON answer ready to write; `text` is kept so idempotent replays are byte-identical. */
interface Answer {
  status: number;
  text: string;
  headers: Record<string, string>;
  raw?: Buffer;
}

function toAnswer(result: RouteResult): Answer {
  return {
    status: result.status,
    text: result.body === undefined ? '' : JSON.stringify(result.body),
    headers: result.headers ?? {},
    raw: result.raw,
  };
}

function jsonAnswer(status: number, body: unknown, headers: Record<string, string> = {}): Answer {
  return { status, text: JSON.stringify(body), headers };
}

function writeAnswer(res: ServerResponse, answer: Answer): void {
  if (res.headersSent || res.destroyed) return;
  const headers: Record<string, string | number> = { ...answer.headers };
  if (answer.raw) {
    headers['content-length'] = answer.raw.length;
    res.writeHead(answer.status, headers);
    res.end(answer.raw);
    return;
  }
  if (answer.text !== '') headers['content-type'] ??= 'application/json; charset=utf-8';
  headers['content-length'] = Buffer.byteLength(answer.text);
  res.writeHead(answer.status, headers);
  res.end(answer.text);
}

/** Runs a route handler; a throwing handler becomes a 500 (which the ledger will not store). */
async function runHandler(handler: RouteHandler, ctx: RouteContext): Promise<Answer> {
  try {
    return toAnswer(await handler(ctx));
  } catch (err) {
    return jsonAnswer(500, { error: 'handler_failed', message: errorMessage(err) });
  }
}

/** Runs async tasks one at a time, in call order. */
class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(task: () => Promise<T>): Promise<T> {
    const result = this.tail.then(task);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

// ---------------------------------------------------------------------------
// Fault plans
// ---------------------------------------------------------------------------

const FAULT_KINDS: ReadonlySet<string> = new Set<FaultKind>(['status', 'timeout', 'drop', 'slow']);

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isNonNegativeNumber(value: unknown): boolean {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0;
}

/** Returns why `value` is not a valid Fault, or null if it is. */
function faultProblem(value: unknown, allowOk: boolean): string | null {
  if (value === null && allowOk) return null;
  if (!isRecord(value)) return 'a fault must be an object';
  if (value.kind === 'ok' && allowOk) return null;
  if (typeof value.kind !== 'string' || !FAULT_KINDS.has(value.kind)) {
    return `unknown fault kind ${JSON.stringify(value.kind)}`;
  }
  const status = value.status;
  if (status !== undefined && !(Number.isInteger(status) && (status as number) >= 100 && (status as number) <= 599)) {
    return 'fault.status must be an integer HTTP status';
  }
  if (value.retryAfter !== undefined && !isNonNegativeNumber(value.retryAfter)) return 'fault.retryAfter must be >= 0';
  if (value.ms !== undefined && !isNonNegativeNumber(value.ms)) return 'fault.ms must be >= 0';
  return null;
}

/** Returns why `value` is not a valid FaultPlan, or null if it is. Checked up front so a typo fails the test that made it. */
function planProblem(value: unknown): string | null {
  if (!isRecord(value)) return 'a fault plan must be an object or null';
  if (value.schedule !== undefined) {
    if (!Array.isArray(value.schedule)) return 'schedule must be an array';
    for (const entry of value.schedule) {
      const problem = faultProblem(entry, true);
      if (problem) return `schedule: ${problem}`;
    }
  }
  if (value.rate !== undefined && !(isNonNegativeNumber(value.rate) && (value.rate as number) <= 1)) {
    return 'rate must be between 0 and 1';
  }
  if (value.rate !== undefined && value.fault === undefined) return 'rate needs a fault';
  if (value.fault !== undefined) {
    const problem = faultProblem(value.fault, false);
    if (problem) return `fault: ${problem}`;
  }
  if (value.key !== undefined && typeof value.key !== 'string') return 'key must be a string';
  if (value.pathPrefix !== undefined && typeof value.pathPrefix !== 'string') return 'pathPrefix must be a string';
  if (value.persist !== undefined && typeof value.persist !== 'boolean') return 'persist must be a boolean';
  return null;
}

function asFault(entry: ScheduleEntry | undefined): Fault | null {
  return !entry || entry.kind === 'ok' ? null : entry;
}

/** Decides, per arriving request, which fault (if any) the "gateway" injects. */
class FaultInjector {
  private plan: FaultPlan | null = null;
  private cursor = 0;

  constructor(private readonly random: () => number) {}

  /** Replaces the plan and restarts its schedule. Throws on an invalid plan. */
  set(plan: FaultPlan | null): void {
    if (plan !== null) {
      const problem = planProblem(plan);
      if (problem) throw new Error(`invalid fault plan: ${problem}`);
    }
    // Copy so a caller mutating its object later cannot change the running plan.
    this.plan = plan === null ? null : structuredClone(plan);
    this.cursor = 0;
  }

  /**
   * The fault for one request. Called synchronously on arrival, so schedule
   * slots are handed out in arrival order. Order of precedence: the schedule,
   * then (once exhausted) its last entry if `persist`, then the rate.
   */
  next(key: string | null, path: string): Fault | null {
    const plan = this.plan;
    if (!plan || !this.matches(plan, key, path)) return null;
    const schedule = plan.schedule ?? [];
    if (this.cursor < schedule.length) return asFault(schedule[this.cursor++]);
    if (plan.persist && schedule.length > 0) return asFault(schedule[schedule.length - 1]);
    if (plan.fault && this.random() < (plan.rate ?? 1)) return plan.fault;
    return null;
  }

  private matches(plan: FaultPlan, key: string | null, path: string): boolean {
    if (plan.key !== undefined && key !== plan.key) return false;
    if (plan.pathPrefix !== undefined && !path.startsWith(plan.pathPrefix)) return false;
    return true;
  }
}

// ---------------------------------------------------------------------------
// Idempotency ledger
// ---------------------------------------------------------------------------

interface StoredEntry {
  entry: LedgerEntry;
  answer: Answer;
}

interface LedgerOutcome {
  answer: Answer;
  replayed: boolean;
}

/**
 * Remembers the first answer per key. All keyed work runs through one queue:
 * that makes "first request wins" hold for concurrent duplicates, and lets us
 * tell the handler its seq in advance (ctx.seq) knowing no other effect can
 * take that number meanwhile. Simulator handlers are fast, and faults
 * (including 'slow') run before the queue, so serialising costs nothing real.
 */
class IdempotencyLedger {
  private readonly entries = new Map<string, StoredEntry>();
  private readonly queue = new SerialQueue();
  private lastSeq = 0;
  /** Bumped by clear(), so a handler that was running across a reset does not resurrect old state. */
  private generation = 0;

  handle(key: string, ctx: RouteContext, handler: RouteHandler): Promise<LedgerOutcome> {
    return this.queue.run(async () => {
      const seen = this.entries.get(key);
      if (seen) {
        seen.entry.hits += 1;
        return { answer: seen.answer, replayed: true };
      }
      const generation = this.generation;
      const seq = this.lastSeq + 1;
      const answer = await runHandler(handler, { ...ctx, seq });
      // A 5xx means the service failed; storing it would make every retry fail too.
      if (answer.status < 500 && generation === this.generation) this.store(key, ctx, answer, seq);
      return { answer, replayed: false };
    });
  }

  entriesSnapshot(): LedgerEntry[] {
    return [...this.entries.values()].map(({ entry }) => structuredClone(entry));
  }

  clear(): void {
    this.entries.clear();
    this.lastSeq = 0;
    this.generation += 1;
  }

  private store(key: string, ctx: RouteContext, answer: Answer, seq: number): void {
    this.lastSeq = seq;
    const entry: LedgerEntry = {
      key,
      method: ctx.method,
      path: ctx.path,
      body: ctx.body,
      status: answer.status,
      response: parseBody(answer.text),
      hits: 1,
      firstAt: now(),
      seq,
    };
    this.entries.set(key, { entry, answer });
  }
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

function pathMatches(route: SimRoute, path: string): boolean {
  return typeof route.path === 'string' ? route.path === path : route.path.test(path);
}

/** The route for a request, or the answer to give when there is none (404 unknown path, 405 wrong method). */
function findRoute(routes: SimRoute[], method: string, path: string): SimRoute | Answer {
  const onPath = routes.filter((route) => pathMatches(route, path));
  const route = onPath.find((r) => r.method.toUpperCase() === method);
  if (route) return route;
  if (onPath.length === 0) return jsonAnswer(404, { error: 'not_found', method, path });
  const allow = [...new Set(onPath.map((r) => r.method.toUpperCase()))].join(', ');
  return jsonAnswer(405, { error: 'method_not_allowed', method, path }, { allow });
}

/** The generic JSON webhook cloud: POST to any path starting with /webhook is accepted. */
export function webhookRoutes(): SimRoute[] {
  return [
    {
      method: 'POST',
      path: /^\/webhook/,
      handler: (ctx) => ({ status: 200, body: { ok: true, received: ctx.key, seq: ctx.seq ?? null } }),
    },
  ];
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

function listen(server: http.Server, port: number, host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      const address = server.address();
      resolve(typeof address === 'object' && address !== null ? address.port : port);
    });
  });
}

function formatUrl(host: string, port: number): string {
  return `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
}

/**
 * The simulated gateway's token bucket (null = no limit). It measures each
 * request at its arrival (when its headers came in), not when its body has been
 * read: a body that takes a while must not make requests look bunched. Requests
 * admitted out of arrival order never refill the bucket backwards.
 */
class RateGate {
  private tokens = 0;
  private at = now();
  constructor(private limit: RateLimit | null) {
    this.set(limit);
  }
  set(limit: RateLimit | null): void {
    this.limit = limit;
    this.tokens = limit ? this.capacity(limit) : 0;
    this.at = now();
  }
  private capacity(limit: RateLimit): number {
    return limit.burst + (limit.perSecond * (limit.toleranceMs ?? 0)) / 1000;
  }
  /** `arrivedAt`: when the request arrived (epoch ms, as now()). */
  admit(arrivedAt: number): boolean {
    if (!this.limit) return true;
    if (arrivedAt > this.at) {
      this.tokens = Math.min(this.capacity(this.limit), this.tokens + ((arrivedAt - this.at) / 1000) * this.limit.perSecond);
      this.at = arrivedAt;
    }
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

export async function startSim(opts: SimOptions = {}): Promise<SimServer> {
  const host = opts.host ?? '127.0.0.1';
  const routes = opts.routes ?? [];
  const name = opts.name ?? 'sim';
  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;

  const faults = new FaultInjector(opts.random ?? Math.random);
  const gate = new RateGate(opts.rateLimit ?? null);
  const ledger = new IdempotencyLedger();
  const requestLog: RequestRecord[] = [];
  const sockets = new Set<Socket>();
  // Timers for 'slow' and 'timeout' faults, cleared on close so nothing outlives the server.
  const timers = new Set<NodeJS.Timeout>();

  function later(ms: number, fn: () => void): NodeJS.Timeout {
    const timer = setTimeout(() => {
      timers.delete(timer);
      fn();
    }, ms);
    timers.add(timer);
    return timer;
  }

  function reset(): void {
    ledger.clear();
    requestLog.length = 0;
    faults.set(null);
  }

  function send(res: ServerResponse, record: RequestRecord | null, answer: Answer): void {
    if (record && !res.destroyed) record.status = answer.status;
    writeAnswer(res, answer);
  }

  function controlAnswer(method: string, path: string, body: unknown): Answer {
    const route = `${method} ${path.slice(CONTROL_PREFIX.length)}`;
    switch (route) {
      case 'GET health':
        return jsonAnswer(200, { ok: true, name });
      case 'GET ledger': {
        const entries = ledger.entriesSnapshot();
        return jsonAnswer(200, { entries, effects: entries.length, requests: requestLog });
      }
      case 'POST faults': {
        const problem = body === null ? null : planProblem(body);
        if (problem) return jsonAnswer(400, { error: 'invalid_fault_plan', message: problem });
        faults.set(body as FaultPlan | null);
        return jsonAnswer(200, { ok: true });
      }
      case 'DELETE faults':
        faults.set(null);
        return jsonAnswer(200, { ok: true });
      case 'POST rate-limit': {
        const limit = body as RateLimit | null;
        if (limit !== null && !(isRecord(limit) && limit.perSecond > 0 && limit.burst >= 1
                                && (limit.toleranceMs === undefined || isNonNegativeNumber(limit.toleranceMs)))) {
          return jsonAnswer(400, { error: 'invalid_rate_limit', message: 'give {perSecond > 0, burst >= 1, toleranceMs >= 0 (optional)} or null' });
        }
        gate.set(limit);
        return jsonAnswer(200, { ok: true });
      }
      case 'POST reset':
        reset();
        return jsonAnswer(200, { ok: true });
      default:
        return jsonAnswer(404, { error: 'not_found', method, path });
    }
  }

  /**
   * Plays a fault. Returns true when the request is finished (answered or
   * killed), false when it should continue to the service ('slow').
   */
  async function applyFault(fault: Fault, req: IncomingMessage, res: ServerResponse, record: RequestRecord): Promise<boolean> {
    switch (fault.kind) {
      case 'status': {
        const status = fault.status ?? 500;
        const headers: Record<string, string> = {};
        if (fault.retryAfter !== undefined) headers['retry-after'] = String(fault.retryAfter);
        send(res, record, jsonAnswer(status, fault.body ?? { error: 'injected', status }, headers));
        return true;
      }
      case 'drop':
        req.socket.destroy();
        return true;
      case 'timeout': {
        const socket = req.socket;
        const timer = later(fault.ms ?? DEFAULT_TIMEOUT_HOLD_MS, () => socket.destroy());
        // The client usually gives up first; stop holding a socket that is already gone.
        socket.once('close', () => {
          clearTimeout(timer);
          timers.delete(timer);
        });
        return true;
      }
      case 'slow':
        // Deliberately carries on even if the client gives up meanwhile: a real
        // service finishes work the client stopped waiting for, which is exactly
        // the case idempotent retries exist for.
        await new Promise<void>((resolve) => later(fault.ms ?? DEFAULT_SLOW_MS, resolve));
        return false;
    }
  }

  async function serveRoute(ctx: RouteContext, res: ServerResponse, record: RequestRecord): Promise<void> {
    const route = findRoute(routes, ctx.method, ctx.path);
    if (!('handler' in route)) {
      send(res, record, route);
      return;
    }
    if (route.idempotent === false || ctx.key === null) {
      send(res, record, await runHandler(route.handler, ctx));
      return;
    }
    const { answer, replayed } = await ledger.handle(ctx.key, ctx, route.handler);
    // Tell clients (and people reading traces) that this was a replay, as Stripe-style APIs do.
    send(res, record, replayed ? { ...answer, headers: { ...answer.headers, 'idempotent-replayed': 'true' } } : answer);
  }

  async function dispatch(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const arrivedAt = now();
    const method = (req.method ?? 'GET').toUpperCase();
    const url = new URL(req.url ?? '/', 'http://sim.invalid');
    const path = url.pathname;
    const { raw, tooLarge } = await readBody(req, maxBodyBytes);
    const tooLargeAnswer = jsonAnswer(413, { error: 'payload_too_large', limit: maxBodyBytes });

    // The control API is the test harness's back door: never faulted, ledgered or logged.
    if (path.startsWith(CONTROL_PREFIX)) {
      send(res, null, tooLarge ? tooLargeAnswer : controlAnswer(method, path, parseBody(raw)));
      return;
    }

    const key = requestKey(req.headers);
    const record: RequestRecord = { key, method, path, at: arrivedAt, fault: null, status: null };
    requestLog.push(record);
    if (tooLarge) {
      send(res, record, tooLargeAnswer);
      return;
    }

    const fault = faults.next(key, path);
    record.fault = fault?.kind ?? null;
    if (fault && (await applyFault(fault, req, res, record))) return;
    if (!gate.admit(arrivedAt)) {
      record.fault = 'rate_limited';
      send(res, record, jsonAnswer(429, { error: 'rate_limited' }, { 'retry-after': '1' }));
      return;
    }

    const ctx: RouteContext = { key, body: parseBody(raw), rawBody: raw, headers: req.headers, method, path, query: url.searchParams };
    await serveRoute(ctx, res, record);
  }

  const server = http.createServer((req, res) => {
    dispatch(req, res).catch((err: unknown) => {
      // Usually the client went away mid-body; otherwise a bug in the simulator itself.
      if (!res.headersSent && !res.destroyed) writeAnswer(res, jsonAnswer(500, { error: 'sim_failed', message: errorMessage(err) }));
    });
  });
  // Longer than typical client keep-alive (undici ~4 s, load balancers 60 s), so the
  // server is never the side that closes an idle socket a client is about to reuse.
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });

  const port = await listen(server, opts.port ?? 0, host);
  let closing: Promise<void> | null = null;

  return {
    url: formatUrl(host, port),
    port,
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const timer of timers) clearTimeout(timer);
        timers.clear();
        // Held ('timeout') and keep-alive sockets would otherwise keep close() waiting.
        for (const socket of sockets) socket.destroy();
      });
      return closing;
    },
    ledger: () => ledger.entriesSnapshot(),
    requests: () => requestLog.map((record) => ({ ...record })),
    setFaults: (plan) => faults.set(plan),
    setRateLimit: (limit) => gate.set(limit),
    reset,
  };
}
