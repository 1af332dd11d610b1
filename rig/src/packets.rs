//! Ethernet frames built by hand for BPF_PROG_TEST_RUN (tests and benchmarks): the
//! programs only read headers, so checksums are left zero.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// A frame from `src` to `dst` (same family) of IP protocol `proto`; TCP/UDP get
/// source port 40000 and destination port `dport`, ICMP/ICMPv6 an echo request.
/// `size` is the whole frame's length (at least the headers).
pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, dport: u16, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    let l4: Vec<u8> = match proto {
        TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&40000u16.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h
        }
        UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&40000u16.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h
        }
        ICMP => vec![8, 0, 0, 0, 0, 1, 0, 1],
        ICMPV6 => vec![128, 0, 0, 0, 0, 1, 0, 1],
        _ => vec![0; 8],
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let total = size.max(14 + 20 + l4.len()) - 14;
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            let payload = size.max(14 + 40 + l4.len()) - 14 - 40;
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
    f.extend_from_slice(&l4);
    f.resize(size.max(f.len()), 0);
    f
}
