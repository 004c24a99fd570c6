/**
 * IP addresses and CIDR ranges: the one range check both directions use, the
 * egress guard (delivery/egress.ts, where a connection may go) and the inbound
 * admission (inbound/admission.ts, who may call a receiver).
 */
import net from 'node:net';

/** An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is judged as the IPv4 address it is. */
export function normalise(ip: string): { ip: string; family: 'ipv4' | 'ipv6' } {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  if (mapped) return { ip: mapped[1]!, family: 'ipv4' };
  return { ip, family: net.isIPv6(ip) ? 'ipv6' : 'ipv4' };
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
