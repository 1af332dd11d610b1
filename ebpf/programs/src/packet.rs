//! Packet parsing shared by the programs: what an ACL looks at.

use aya_ebpf::programs::TcContext;
use trellis_ebpf_common::{AclRule, Counters, DIR_INGRESS, PROTO_ANY};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers walked to find the transport header: hop-by-hop options,
/// routing, destination options (length in 8-octet units after the first 8),
/// fragment (8 octets), authentication (length in 4-octet units after the first 8).
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// At most this many extension headers are walked (Cilium walks 4)...
const IPV6_MAX_EXT: u32 = 8;
/// ...and the transport header must start within this many bytes of the frame.
const MAX_L4_OFFSET: usize = 512;
/// Linear data pulled in before parsing: every header the walk may read.
const HEADERS: usize = MAX_L4_OFFSET + 4;

/// What the ACL looks at: the remote address, the protocol and the destination
/// port (if the packet carries one). `malformed`: an IPv6 packet whose extension
/// headers could not be walked to the transport header (too many, too long, cut
/// short): an ACL drops it rather than judge it without its port.
pub struct Packet {
    pub v6: bool,
    pub remote4: u32,
    pub remote6: [u64; 2],
    pub proto: u8,
    pub dport: Option<u16>,
    pub malformed: bool,
}

#[inline(always)]
pub(crate) fn at<T>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// Whether the ACL's port rules apply to protocol `proto`.
#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

#[inline(always)]
fn ports_of(ctx: &TcContext, proto: u8, off: usize) -> Option<u16> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => at::<u16>(ctx, off + 2).map(u16::from_be),
        _ => None,
    }
}

/// Makes the headers linear (as far as a walk may read) for `at`.
#[inline(always)]
pub(crate) fn pull_headers(ctx: &TcContext) {
    let linear = ctx.data_end() - ctx.data();
    if linear < HEADERS && (ctx.len() as usize) > linear {
        let want = if (ctx.len() as usize) < HEADERS {
            ctx.len()
        } else {
            HEADERS as u32
        };
        let _ = ctx.pull_data(want);
    }
}

/// Parses Ethernet (one VLAN tag), IPv4/IPv6 and the L4 ports. None: not IP, or
/// IPv6 neighbour discovery, which an ACL never blocks (it would cut the link).
#[inline(always)]
pub fn parse(ctx: &TcContext, dir: u32) -> Option<Packet> {
    pull_headers(ctx);
    let mut l3 = ETH_HLEN;
    let mut proto = u16::from_be(at::<u16>(ctx, 12)?);
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be(at::<u16>(ctx, 16)?);
        l3 += 4;
    }
    // The remote end: the source of what comes in, the destination of what goes out.
    let remote_off = if dir == DIR_INGRESS { 0 } else { 1 };
    match proto {
        ETH_P_IP => {
            let vihl: u8 = at(ctx, l3)?;
            let l4proto: u8 = at(ctx, l3 + 9)?;
            let frag = u16::from_be(at::<u16>(ctx, l3 + 6)?) & 0x1fff;
            let remote = u32::from_be(at::<u32>(ctx, l3 + 12 + 4 * remote_off)?);
            let l4 = l3 + ((vihl & 0x0f) as usize) * 4;
            // Later fragments carry no ports; a first fragment (or whole datagram)
            // of a port protocol too short to hold them is malformed (the tiny
            // fragment attack of RFC 1858 puts them in the next fragment).
            let dport = if frag == 0 {
                ports_of(ctx, l4proto, l4)
            } else {
                None
            };
            Some(Packet {
                v6: false,
                remote4: remote,
                remote6: [0; 2],
                proto: l4proto,
                dport,
                malformed: frag == 0 && has_ports(l4proto) && dport.is_none(),
            })
        }
        ETH_P_IPV6 => {
            let a = l3 + 8 + 16 * remote_off;
            let hi = u64::from_be(at::<u64>(ctx, a)?);
            let lo = u64::from_be(at::<u64>(ctx, a + 8)?);
            let mut p = Packet {
                v6: true,
                remote4: 0,
                remote6: [hi, lo],
                proto: 0,
                dport: None,
                malformed: true,
            };
            let Some((next, l4, later_fragment)) = walk_ipv6(ctx, l3) else {
                return Some(p);
            };
            p.proto = next;
            p.malformed = false;
            if next == IPPROTO_ICMPV6 && !later_fragment {
                // Router/neighbour solicitation and advertisement, redirect (type
                // and code read together, as in the walk).
                let [t, _] = at::<[u8; 2]>(ctx, l4)?;
                if (133..=137).contains(&t) {
                    return None;
                }
            }
            // Later fragments carry no ports, as with IPv4.
            if !later_fragment {
                p.dport = ports_of(ctx, next, l4);
                p.malformed = has_ports(next) && p.dport.is_none();
            }
            Some(p)
        }
        _ => None,
    }
}

/// Walks the IPv6 extension headers after the fixed header at `l3`: the transport
/// protocol, where its header starts, and whether this is a fragment after the
/// first. None: the chain is longer than the walk goes, or cut short.
#[inline(always)]
fn walk_ipv6(ctx: &TcContext, l3: usize) -> Option<(u8, usize, bool)> {
    let mut next: u8 = at(ctx, l3 + 6)?;
    let mut off = l3 + 40;
    let mut i = 0;
    while i < IPV6_MAX_EXT {
        if !matches!(
            next,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AUTH | IPV6_FRAGMENT
        ) {
            return Some((next, off, false));
        }
        // Every extension header starts with its next header and a length byte; read
        // as two bytes at once (a one-byte read at a variable offset is compiled into
        // a bounds check the verifier cannot use).
        let [nh, hlen] = at::<[u8; 2]>(ctx, off)?;
        let len = match next {
            IPV6_AUTH => (hlen as usize + 2) * 4,
            IPV6_FRAGMENT => {
                let frag = u16::from_be(at::<u16>(ctx, off + 2)?);
                if frag & 0xfff8 != 0 {
                    // What follows is the middle of the datagram, not headers.
                    return Some((nh, off + 8, true));
                }
                8
            }
            _ => (hlen as usize + 1) * 8,
        };
        next = nh;
        off += len;
        if off > MAX_L4_OFFSET {
            return None;
        }
        i += 1;
    }
    // Still an extension header after the last one walked: too many.
    match next {
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AUTH | IPV6_FRAGMENT => None,
        _ => Some((next, off, false)),
    }
}

/// Counts one packet in `c`: as a drop, or as a packet and its bytes.
///
/// # Safety
/// `c` points at a per-CPU map entry that nothing else writes while the program runs.
#[inline(always)]
pub unsafe fn count(c: *mut Counters, verdict: Verdict, len: u32) {
    // SAFETY: as the caller promises.
    unsafe {
        match verdict {
            Verdict::Pass => {
                (*c).packets += 1;
                (*c).bytes += len as u64;
            }
            Verdict::Denied => (*c).drops += 1,
            Verdict::Limited => {
                (*c).limited += 1;
                (*c).limited_bytes += len as u64;
            }
        }
    }
}

/// What became of a packet, as counted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Dropped by the ACL.
    Denied,
    /// Dropped by the rate limit.
    #[allow(dead_code)] // the LPM bench program has no rate limits
    Limited,
}

/// Whether `r`'s protocol (0: any) and destination port range (0-0: any) match `p`.
#[inline(always)]
pub fn rule_matches(r: &AclRule, p: &Packet) -> bool {
    (r.proto == PROTO_ANY || r.proto == p.proto)
        && (r.port_hi == 0 || matches!(p.dport, Some(d) if d >= r.port_lo && d <= r.port_hi))
}
