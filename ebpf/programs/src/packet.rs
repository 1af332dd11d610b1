//! Packet parsing shared by the programs: what an ACL looks at.

use aya_ebpf::programs::TcContext;
use trellis_ebpf_common::{AclRule, Counters, DIR_INGRESS, PROTO_ANY};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;
/// Enough linear data for a VLAN tag, an IPv6 header and the ports.
const HEADERS: usize = ETH_HLEN + 4 + 40 + 4;

/// What the ACL looks at: the remote address, the protocol and the destination
/// port (if the packet carries one).
pub struct Packet {
    pub v6: bool,
    pub remote4: u32,
    pub remote6: [u64; 2],
    pub proto: u8,
    pub dport: Option<u16>,
}

#[inline(always)]
fn at<T>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

#[inline(always)]
fn ports_of(ctx: &TcContext, proto: u8, off: usize) -> Option<u16> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => at::<u16>(ctx, off + 2).map(u16::from_be),
        _ => None,
    }
}

/// Parses Ethernet (one VLAN tag), IPv4/IPv6 and the L4 ports. None: not IP, or
/// IPv6 neighbour discovery, which an ACL never blocks (it would cut the link).
#[inline(always)]
pub fn parse(ctx: &TcContext, dir: u32) -> Option<Packet> {
    let linear = ctx.data_end() - ctx.data();
    if linear < HEADERS && (ctx.len() as usize) > linear {
        let _ = ctx.pull_data(HEADERS as u32);
    }
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
            // Later fragments carry no ports.
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
            })
        }
        ETH_P_IPV6 => {
            let next: u8 = at(ctx, l3 + 6)?;
            let a = l3 + 8 + 16 * remote_off;
            let hi = u64::from_be(at::<u64>(ctx, a)?);
            let lo = u64::from_be(at::<u64>(ctx, a + 8)?);
            let l4 = l3 + 40;
            if next == IPPROTO_ICMPV6 {
                // Router/neighbour solicitation and advertisement, redirect.
                let t: u8 = at(ctx, l4)?;
                if (133..=137).contains(&t) {
                    return None;
                }
            }
            Some(Packet {
                v6: true,
                remote4: 0,
                remote6: [hi, lo],
                proto: next,
                dport: ports_of(ctx, next, l4),
            })
        }
        _ => None,
    }
}

/// Counts one packet in `c`: as a drop, or as a packet and its bytes.
///
/// # Safety
/// `c` points at a per-CPU map entry that nothing else writes while the program runs.
#[inline(always)]
pub unsafe fn count(c: *mut Counters, dropped: bool, len: u32) {
    // SAFETY: as the caller promises.
    unsafe {
        if dropped {
            (*c).drops += 1;
        } else {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        }
    }
}

/// Whether `r`'s protocol (0: any) and destination port range (0-0: any) match `p`.
#[inline(always)]
pub fn rule_matches(r: &AclRule, p: &Packet) -> bool {
    (r.proto == PROTO_ANY || r.proto == p.proto)
        && (r.port_hi == 0 || matches!(p.dport, Some(d) if d >= r.port_lo && d <= r.port_hi))
}
