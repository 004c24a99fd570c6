/**
 * The egress guard: which hosts and addresses an endpoint may reach.
 *
 * Two checks, both on every attempt: the URL's host must be the endpoint's own
 * host or one it allows, and every address the connection would use must be
 * allowed — checked inside the DNS lookup the socket itself uses, so a name
 * that resolves differently the second time (DNS rebinding) cannot slip
 * through. Loopback, private, link-local and cloud-metadata addresses are
 * refused unless the endpoint allows private addresses; metadata addresses are
 * refused always. A refusal is a permanent failure (error class
 * `egress_refused`): retrying cannot make a forbidden address allowed.
 */
import dns, { type LookupAddress, type LookupOptions } from 'node:dns';
import net from 'node:net';

export interface EgressPolicy {
  endpoint: string;
  /** The host of the endpoint's base URL: always allowed as a name. */
  baseHost: string;
  /** Extra host names; '*.example.com' allows subdomains. */
  allowHosts: string[];
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

/** An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is judged as the IPv4 address it is. */
function normalise(ip: string): { ip: string; family: 'ipv4' | 'ipv6' } {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  if (mapped) return { ip: mapped[1]!, family: 'ipv4' };
  return { ip, family: net.isIPv6(ip) ? 'ipv6' : 'ipv4' };
}

/** 'metadata', 'loopback', 'private', 'link-local', 'unspecified', 'multicast' or 'public'. */
export function classifyAddress(address: string): string {
  const { ip, family } = normalise(address);
  if (METADATA.check(ip, family)) return 'metadata';
  for (const [kind, list] of NOT_PUBLIC) if (list.check(ip, family)) return kind;
  return 'public';
}

/** Whether an address (IPv4, IPv6 or IPv4-mapped) is inside one of the CIDR ranges. */
export function inRanges(address: string, cidrs: string[]): boolean {
  const { ip, family } = normalise(address);
  const list = new net.BlockList();
  for (const c of cidrs) {
    const [base, bits] = c.split('/');
    const fam = net.isIPv6(base!) ? 'ipv6' : 'ipv4';
    list.addSubnet(base!, Number(bits ?? (fam === 'ipv6' ? 128 : 32)), fam);
  }
  return list.check(ip, family);
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

function hostAllowed(host: string, policy: EgressPolicy): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '');
  if (h === policy.baseHost.toLowerCase().replace(/^\[|\]$/g, '')) return true;
  return policy.allowHosts.some((a) => (a.startsWith('*.') ? h.endsWith(a.slice(1)) && h.length > a.length - 1 : h === a));
}

/** Throws EgressRefused unless the URL is http(s) to an allowed host; an IP literal is checked as an address too. */
export function assertUrlAllowed(url: string, policy: EgressPolicy): void {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new EgressRefused(`egress refused: ${JSON.stringify(url)} is not a URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new EgressRefused(`egress refused: scheme ${u.protocol} is not http(s)`);
  if (u.username || u.password) throw new EgressRefused('egress refused: credentials in the URL');
  if (!hostAllowed(u.hostname, policy)) {
    throw new EgressRefused(`egress refused: host ${u.hostname} is not allowed for endpoint ${policy.endpoint} (allowed: ${[policy.baseHost, ...policy.allowHosts].join(', ')})`);
  }
  const literal = u.hostname.replace(/^\[|\]$/g, '');
  if (net.isIP(literal)) assertAddressAllowed(literal, policy);
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

/** The policy for an endpoint row (cloud.endpoint). */
export function policyOf(row: { name: string; base_url: string; allow_hosts: string[]; allow_cidrs: string[]; allow_private: boolean }): EgressPolicy {
  return {
    endpoint: row.name,
    baseHost: new URL(row.base_url).hostname,
    allowHosts: row.allow_hosts ?? [],
    allowCidrs: row.allow_cidrs ?? [],
    allowPrivate: row.allow_private,
  };
}
