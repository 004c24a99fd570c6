/**
 * The egress guard: which hosts and addresses an endpoint may reach.
 *
 * Two checks, both on every attempt: the URL's (scheme, host, port) must be the
 * endpoint's own origin or one it allows, and every address the connection would use must be
 * allowed — checked inside the DNS lookup the socket itself uses, so a name
 * that resolves differently the second time (DNS rebinding) cannot slip
 * through. Loopback, private, link-local and cloud-metadata addresses are
 * refused unless the endpoint allows private addresses; metadata addresses are
 * refused always. A refusal is a permanent failure (error class
 * `egress_refused`): retrying cannot make a forbidden address allowed.
 *
 * Hosts are compared after the WHATWG URL normalisation (`0x7f000001`,
 * `2130706433` and `127.1` are all 127.0.0.1; `[::ffff:127.0.0.1]` is judged as
 * 127.0.0.1; a trailing dot and upper case do not matter), and always with a
 * port: an entry without one means the default port of the URL's scheme, never
 * any port. URLs that come from a cloud's answer (a PDF to download) are judged
 * against the base URL's origin plus the endpoint's download hosts only, not
 * against the hosts its API calls may reach.
 *
 * The HTTP code asks this module once per request (routeFor): it gets the
 * refusal, or the way out — the guarded DNS lookup, the keep-alive agents of
 * the endpoint's allowlist, and no redirects (a 3xx goes to the adapter; a
 * Location is never followed, so it can never lead past the allowlist).
 */
import dns, { type LookupAddress, type LookupOptions } from 'node:dns';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { inRanges, normalise } from '../kernel/addresses.js';

export interface EgressPolicy {
  endpoint: string;
  /** The host of the endpoint's base URL: always allowed (with its scheme and port). */
  baseHost: string;
  /** The base URL's scheme ('https:'); when absent, either http(s) at its default port. */
  baseScheme?: string;
  /** The base URL's effective port; when absent, the default port of the URL's scheme. */
  basePort?: number;
  /** Extra hosts for API calls: 'host', 'host:port', '*.example.com[:port]'; no port = the scheme's default. */
  allowHosts: string[];
  /** Where URLs from a cloud's answers (downloads) may go besides the base URL's origin; same syntax. */
  downloadHosts?: string[];
  /** When not empty, every resolved address must be inside one of these ranges. */
  allowCidrs: string[];
  /** Allow loopback, private, link-local, CGNAT and unique-local addresses. */
  allowPrivate: boolean;
}

export class EgressRefused extends Error {
  /** got copies `code` from the error a lookup fails with: the attempt recognises it by this. */
  readonly code = 'EEGRESS';
}

function blockList(ranges: Array<[string, number, 'ipv4' | 'ipv6']>, addresses: Array<[string, 'ipv4' | 'ipv6']> = []): net.BlockList {
  const list = new net.BlockList();
  for (const [net_, prefix, family] of ranges) list.addSubnet(net_, prefix, family);
  for (const [a, family] of addresses) list.addAddress(a, family);
  return list;
}

/** Instance-metadata services (AWS/GCP/Azure, ECS, Alibaba Cloud): never reachable, whatever is allowed. */
const METADATA = blockList([], [['169.254.169.254', 'ipv4'], ['169.254.170.2', 'ipv4'], ['100.100.100.200', 'ipv4'], ['fd00:ec2::254', 'ipv6']]);

const NOT_PUBLIC: Array<[string, net.BlockList]> = [
  ['loopback', blockList([['127.0.0.0', 8, 'ipv4'], ['::1', 128, 'ipv6']])],
  ['unspecified', blockList([['0.0.0.0', 8, 'ipv4'], ['::', 128, 'ipv6']])],
  ['private', blockList([['10.0.0.0', 8, 'ipv4'], ['172.16.0.0', 12, 'ipv4'], ['192.168.0.0', 16, 'ipv4'], ['100.64.0.0', 10, 'ipv4'], ['fc00::', 7, 'ipv6']])],
  ['link-local', blockList([['169.254.0.0', 16, 'ipv4'], ['fe80::', 10, 'ipv6']])],
  ['multicast', blockList([['224.0.0.0', 4, 'ipv4'], ['240.0.0.0', 4, 'ipv4'], ['ff00::', 8, 'ipv6']])],
];

/** 'metadata', 'loopback', 'private', 'link-local', 'unspecified', 'multicast' or 'public'. */
export function classifyAddress(address: string): string {
  const { ip, family } = normalise(address);
  if (METADATA.check(ip, family)) return 'metadata';
  for (const [kind, list] of NOT_PUBLIC) if (list.check(ip, family)) return kind;
  return 'public';
}

/** Throws EgressRefused unless the policy lets a connection go to this address. */
export function assertAddressAllowed(address: string, policy: EgressPolicy): void {
  const kind = classifyAddress(address);
  if (kind === 'metadata') throw new EgressRefused(`egress refused: ${address} is a cloud metadata address (endpoint ${policy.endpoint})`);
  if (kind !== 'public' && !policy.allowPrivate) {
    throw new EgressRefused(`egress refused: ${address} is a ${kind} address and endpoint ${policy.endpoint} does not allow private addresses`);
  }
  if (policy.allowCidrs.length > 0 && !inRanges(address, policy.allowCidrs)) {
    throw new EgressRefused(`egress refused: ${address} is outside the address ranges allowed for endpoint ${policy.endpoint}`);
  }
}

/** Who supplied the URL: the endpoint's own API calls, or a cloud's answer (a file to download). */
export type EgressPurpose = 'api' | 'download';

const defaultPort = (scheme: string): number => (scheme === 'https:' ? 443 : 80);

/**
 * A host as WHATWG URL normalises it, without brackets or a trailing dot, and an
 * IPv4-mapped IPv6 literal as its IPv4 address; null when it is not a valid host.
 */
export function normaliseHost(host: string): string | null {
  let h: string;
  try {
    h = new URL(`http://${host.includes(':') && !host.startsWith('[') ? `[${host}]` : host}/`).hostname;
  } catch {
    return null;
  }
  h = h.replace(/^\[|\]$/g, '').replace(/\.$/, '');
  const mapped = /^::ffff:(?:(\d+\.\d+\.\d+\.\d+)|([0-9a-f]{1,4}):([0-9a-f]{1,4}))$/i.exec(h);
  if (mapped) {
    if (mapped[1]) return mapped[1];
    const hi = parseInt(mapped[2]!, 16), lo = parseInt(mapped[3]!, 16);
    return [hi >> 8, hi & 255, lo >> 8, lo & 255].join('.');
  }
  return h;
}

interface HostEntry { wildcard: boolean; host: string; port: number | null }

/** 'files.example.com', 'files.example.com:8443', '*.nuonuo.com:443', '[2001:db8::1]:8443'. */
export function parseHostEntry(entry: string): HostEntry | null {
  const m = /^(\*\.)?(\[[^\]]+\]|[^:[\]]+)(?::(\d{1,5}))?$/.exec(entry.trim());
  if (!m) return null;
  const port = m[3] === undefined ? null : Number(m[3]);
  if (port !== null && (port < 1 || port > 65535)) return null;
  const host = normaliseHost(m[2]!);
  if (host === null || host === '') return null;
  return { wildcard: m[1] !== undefined, host, port };
}

function entryMatches(entry: string, host: string, port: number, scheme: string): boolean {
  const e = parseHostEntry(entry);
  if (!e) return false;
  if ((e.port ?? defaultPort(scheme)) !== port) return false;
  return e.wildcard ? host.endsWith(`.${e.host}`) : host === e.host;
}

function originAllowed(host: string, port: number, scheme: string, policy: EgressPolicy, purpose: EgressPurpose): boolean {
  const base = normaliseHost(policy.baseHost);
  if (base === host && (policy.baseScheme ?? scheme) === scheme && (policy.basePort ?? defaultPort(scheme)) === port) return true;
  const entries = purpose === 'download' ? policy.downloadHosts ?? [] : policy.allowHosts;
  return entries.some((a) => entryMatches(a, host, port, scheme));
}

function describeAllowed(policy: EgressPolicy, purpose: EgressPurpose): string {
  const base = `${policy.baseScheme ? `${policy.baseScheme}//` : ''}${policy.baseHost}${policy.basePort ? `:${policy.basePort}` : ''}`;
  return [base, ...(purpose === 'download' ? policy.downloadHosts ?? [] : policy.allowHosts)].join(', ');
}

/**
 * Throws EgressRefused unless the URL is http(s) to an allowed (scheme, host, port); an IP literal is
 * checked as an address too. `purpose` 'download' judges a URL a cloud's answer supplied.
 */
export function assertUrlAllowed(url: string, policy: EgressPolicy, purpose: EgressPurpose = 'api'): void {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new EgressRefused(`egress refused: ${JSON.stringify(url)} is not a URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new EgressRefused(`egress refused: scheme ${u.protocol} is not http(s)`);
  if (u.username || u.password) throw new EgressRefused('egress refused: credentials in the URL');
  const host = normaliseHost(u.hostname) ?? u.hostname;
  const port = u.port === '' ? defaultPort(u.protocol) : Number(u.port);
  if (!originAllowed(host, port, u.protocol, policy, purpose)) {
    const what = purpose === 'download' ? 'for a download from' : 'for';
    throw new EgressRefused(`egress refused: host ${host} is not allowed on port ${port} (${u.protocol}) ${what} endpoint ${policy.endpoint} (allowed: ${describeAllowed(policy, purpose)})`);
  }
  if (net.isIP(host)) assertAddressAllowed(host, policy);
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/** A dns.lookup for the socket (got's `dnsLookup`) that refuses the whole name when any address is not allowed. */
export function guardedLookup(policy: EgressPolicy) {
  return (hostname: string, options: LookupOptions | number | LookupCallback, callback?: LookupCallback): void => {
    const cb = (typeof options === 'function' ? options : callback)!;
    const opts: LookupOptions = typeof options === 'object' ? options : typeof options === 'number' ? { family: options } : {};
    dns.lookup(hostname, { ...opts, all: true }, (err, addresses) => {
      if (err) return cb(err, []);
      for (const a of addresses) {
        try {
          assertAddressAllowed(a.address, policy);
        } catch (refused) {
          return cb(refused as EgressRefused, []);
        }
      }
      if (opts.all) return cb(null, addresses);
      const first = addresses[0];
      if (!first) return cb(Object.assign(new Error(`no address for ${hostname}`), { code: 'ENOTFOUND' }), []);
      cb(null, first.address, first.family);
    });
  };
}

type PolicyRow = { name: string; base_url: string; allow_hosts: string[]; allow_cidrs: string[]; allow_private: boolean; download_hosts?: string[] | null };

/** The policy for an endpoint row (cloud.endpoint): a new, frozen object on every call. */
export function policyOf(row: PolicyRow): EgressPolicy {
  const base = new URL(row.base_url);
  return Object.freeze({
    endpoint: row.name,
    baseHost: base.hostname,
    baseScheme: base.protocol,
    basePort: base.port === '' ? defaultPort(base.protocol) : Number(base.port),
    allowHosts: Object.freeze([...(row.allow_hosts ?? [])]) as string[],
    downloadHosts: Object.freeze([...(row.download_hosts ?? [])]) as string[],
    allowCidrs: Object.freeze([...(row.allow_cidrs ?? [])]) as string[],
    allowPrivate: row.allow_private,
  });
}

const POLICY_MEMO_MAX = 256;
const policyMemo = new Map<string, EgressPolicy>();

/**
 * policyOf for a claimed message: the same object for the same endpoint row, so that routeFor's
 * verdicts and lookups are worked out once per allowlist, not once per message. A changed
 * allowlist is another key, so another policy (and other agents: see agentsFor).
 */
export function policyFor(row: PolicyRow): EgressPolicy {
  const key = JSON.stringify([row.name, row.base_url, row.allow_hosts, row.allow_cidrs, row.allow_private, row.download_hosts ?? []]);
  let p = policyMemo.get(key);
  if (!p) {
    p = policyOf(row);
    if (policyMemo.size >= POLICY_MEMO_MAX) policyMemo.clear();
    policyMemo.set(key, p);
  }
  return p;
}

type Agents = { http: http.Agent; https: https.Agent };
const newAgents = (): Agents => ({
  http: new http.Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 10_000 }),
  https: new https.Agent({ keepAlive: true, maxSockets: 256, keepAliveMsecs: 10_000 }),
});

/**
 * Keep-alive connections per endpoint and allowlist. The address check runs when
 * a socket connects, so a socket opened under one allowlist never carries a
 * request checked against another: each allowlist an endpoint had gets its own
 * agents. When the allowlist changes, messages claimed before the change still
 * use the old agents (no flapping); once an allowlist has not been used for
 * RETIRE_AFTER_MS, its agents close their idle sockets and their busy ones when
 * the call ends.
 */
const RETIRE_AFTER_MS = 30_000;
const pools = new Map<string, Map<string, { agents: Agents; usedAt: number }>>();

function agentsFor(policy: EgressPolicy, key: string): Agents {
  let byKey = pools.get(policy.endpoint);
  if (!byKey) pools.set(policy.endpoint, (byKey = new Map()));
  const now = Date.now();
  let entry = byKey.get(key);
  if (!entry) byKey.set(key, (entry = { agents: newAgents(), usedAt: now }));
  entry.usedAt = now;
  if (byKey.size > 1) {
    for (const [k, other] of byKey) {
      if (k !== key && now - other.usedAt > RETIRE_AFTER_MS) {
        for (const agent of Object.values(other.agents)) retire(agent);
        byKey.delete(k);
      }
    }
  }
  return entry.agents;
}

function retire(agent: http.Agent): void {
  (agent as http.Agent & { keepAlive: boolean }).keepAlive = false; // a socket freed from now on is closed, not kept
  for (const sockets of Object.values(agent.freeSockets)) for (const socket of sockets ?? []) socket.destroy();
}

/** Closes every kept-alive connection (shutdown, tests). */
export function closeAgents(): void {
  for (const byKey of pools.values()) for (const { agents } of byKey.values()) for (const agent of Object.values(agents)) agent.destroy();
  pools.clear();
}

/**
 * The way out for one request, decided here once. Throws EgressRefused unless the URL may go out
 * (assertUrlAllowed, for the endpoint's API calls or for a download a cloud's answer named);
 * otherwise the got options it is sent with: the address check inside the socket's own DNS lookup
 * (guardedLookup), the keep-alive agents of this endpoint's allowlist (agentsFor), and no redirects.
 */
export function routeFor(url: string, policy: EgressPolicy, purpose: EgressPurpose = 'api') {
  const known = judged(policy);
  const verdictKey = purpose === 'api' ? url : `\u0000download ${url}`;
  if (!known.allowed.has(verdictKey)) {
    assertUrlAllowed(url, policy, purpose);
    if (known.allowed.size >= MAX_KNOWN_URLS) known.allowed.clear();
    known.allowed.add(verdictKey);
  }
  return { dnsLookup: known.lookup as never, agent: agentsFor(policy, known.agentsKey), followRedirect: false } as const;
}

/**
 * What routeFor has worked out for one policy object: its guarded lookup, its agents' key, and the
 * URLs it has already allowed (the verdict depends on the URL and the policy alone, and a policy
 * is never changed after policyOf made it: a new allowlist is a new policy object). The address
 * check still runs on every connection, inside the lookup.
 */
interface Judged { lookup: ReturnType<typeof guardedLookup>; agentsKey: string; allowed: Set<string> }
const MAX_KNOWN_URLS = 1000;
const judgedPolicies = new WeakMap<EgressPolicy, Judged>();

function judged(policy: EgressPolicy): Judged {
  let j = judgedPolicies.get(policy);
  if (!j) {
    j = {
      lookup: guardedLookup(policy),
      agentsKey: JSON.stringify([policy.baseHost, policy.allowHosts, policy.allowCidrs, policy.allowPrivate]),
      allowed: new Set(),
    };
    judgedPolicies.set(policy, j);
  }
  return j;
}
