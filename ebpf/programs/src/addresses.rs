//! What a logical network's check reads of a packet: its addresses (IP, ARP) and
//! neighbour discovery's targets. Used by trellis-tc only.

use crate::packet::{at, pull_headers, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMPV6};
use aya_ebpf::programs::TcContext;

const ETH_P_ARP: u16 = 0x0806;
/// The first six bytes of an ARP packet for IPv4 over Ethernet: hardware type 1,
/// protocol IPv4, address lengths 6 and 4.
const ARP_ETHER_IPV4: u64 = 0x0001_0800_0604;
/// ICMPv6 neighbour discovery (RFC 4861): router solicitation and advertisement,
/// neighbour solicitation and advertisement, redirect.
pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;

/// The addresses a logical network's check looks at.
pub enum Addrs {
    /// Neither IPv4, IPv6 nor ARP for IPv4 over Ethernet, or VLAN-tagged.
    Other,
    /// A packet whose addresses could not be read.
    Unreadable,
    /// ARP: sender and target protocol addresses.
    Arp(u32, u32),
    V4(u32, u32),
    V6([u64; 2], [u64; 2]),
    /// ICMPv6 neighbour discovery right after the IPv6 header: its type, its target
    /// address (neighbour solicitations and advertisements; else zero), source and
    /// destination.
    Nd(u8, [u64; 2], [u64; 2], [u64; 2]),
}

/// Whether an IPv6 address is link-local (fe80::/10).
#[inline(always)]
pub fn link_local(a: [u64; 2]) -> bool {
    a[0] >> 54 == 0x3fa
}

/// Whether an IPv6 address is link-scope multicast (ff02::/16).
#[inline(always)]
pub fn link_multicast(a: [u64; 2]) -> bool {
    a[0] >> 48 == 0xff02
}

/// The addresses of the packet (host byte order). A VLAN tag, in the frame or
/// already taken into the packet's metadata, makes it Other: a pod on a logical
/// network has no business tagging. (A priority tag, VLAN ID 0, in the metadata is
/// no VLAN: the kernel takes such a frame as untagged.)
#[inline(always)]
pub fn addresses(ctx: &TcContext) -> Addrs {
    // SAFETY: the context the kernel passed; vlan_present and vlan_tci are readable
    // in tc programs.
    let (present, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
    if present != 0 && tci & 0x0fff != 0 {
        return Addrs::Other;
    }
    pull_headers(ctx);
    read_addresses(ctx).unwrap_or(Addrs::Unreadable)
}

/// As `addresses`; None: a frame too short for what it says it is. Read as `parse`
/// reads (one `?` per load): other shapes leave LLVM's code unverifiable.
#[inline(always)]
fn read_addresses(ctx: &TcContext) -> Option<Addrs> {
    const L3: usize = ETH_HLEN;
    let proto = u16::from_be(at::<u16>(ctx, 12)?);
    match proto {
        ETH_P_IP => {
            let src = u32::from_be(at::<u32>(ctx, L3 + 12)?);
            let dst = u32::from_be(at::<u32>(ctx, L3 + 16)?);
            Some(Addrs::V4(src, dst))
        }
        ETH_P_ARP => {
            let head = u64::from_be(at::<u64>(ctx, L3)?);
            if head >> 16 != ARP_ETHER_IPV4 {
                return Some(Addrs::Other);
            }
            let spa = u32::from_be(at::<u32>(ctx, L3 + 14)?);
            let tpa = u32::from_be(at::<u32>(ctx, L3 + 24)?);
            Some(Addrs::Arp(spa, tpa))
        }
        ETH_P_IPV6 => {
            let next: u8 = at(ctx, L3 + 6)?;
            let sh = u64::from_be(at::<u64>(ctx, L3 + 8)?);
            let sl = u64::from_be(at::<u64>(ctx, L3 + 16)?);
            let dh = u64::from_be(at::<u64>(ctx, L3 + 24)?);
            let dl = u64::from_be(at::<u64>(ctx, L3 + 32)?);
            let (src, dst) = ([sh, sl], [dh, dl]);
            if next == IPPROTO_ICMPV6 {
                // Type and code read together, as in `parse`.
                let [t, _] = at::<[u8; 2]>(ctx, L3 + 40)?;
                if t == ND_NEIGHBOR_SOLICIT || t == ND_NEIGHBOR_ADVERT {
                    let th = u64::from_be(at::<u64>(ctx, L3 + 48)?);
                    let tl = u64::from_be(at::<u64>(ctx, L3 + 56)?);
                    return Some(Addrs::Nd(t, [th, tl], src, dst));
                }
                if (ND_FIRST..=ND_LAST).contains(&t) {
                    return Some(Addrs::Nd(t, [0; 2], src, dst));
                }
            }
            Some(Addrs::V6(src, dst))
        }
        _ => Some(Addrs::Other),
    }
}
